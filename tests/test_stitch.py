"""stitch: frame-exact joins at constant 25 fps, and colour matching that brings a shifted segment back."""

from __future__ import annotations

import json
import subprocess
from fractions import Fraction

import numpy as np
import pytest

from engine.media import write_timed_video
from tasks.render import Clip
from tasks.stitch import SEAM_DELTA_E_LIMIT, stitch_clips
from tasks.workspace import Workspace

SIZE = (96, 64)  # (w, h)
LENGTHS = (10, 12, 9)


def moving_picture(i: int, size: tuple[int, int]) -> np.ndarray:
    """A studio-like shot: a fixed coloured backdrop and a small figure moving across it."""
    w, h = size
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    frame = np.stack([90 + 60 * x / w, 70 + 50 * y / h, np.full_like(x, 120.0)], axis=-1)
    frame[20:44, 10 + i : 26 + i] = (200, 160, 140)
    return frame.astype(np.uint8)


def _shifted(frame: np.ndarray, shift: tuple[int, int, int]) -> np.ndarray:
    return np.clip(frame.astype(int) + np.asarray(shift), 0, 255).astype(np.uint8)


def _clips(tmp_path, ws: Workspace, shifts) -> list[Clip]:
    clips, start = [], 0
    for segment, (length, shift) in enumerate(zip(LENGTHS, shifts, strict=True)):
        path = tmp_path / f"clip{segment}.mp4"
        frames = ((i, _shifted(moving_picture(start + i, SIZE), shift)) for i in range(length))
        write_timed_video(path, frames, Fraction(1, 25), crf=10)
        clips.append(Clip(segment, ws.put_file(path), length, "multitalk", start_frame=start))
        start += length
    return clips


def _frame_times(path) -> list[float]:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "frame=pts_time", "-of", "json"]
        + [str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [float(f["pts_time"]) for f in json.loads(out)["frames"]]


@pytest.mark.parametrize("match", [False, True], ids=["copy", "matched"])
def test_stitching_is_frame_exact_with_constant_timestamps(tmp_path, match):
    ws = Workspace(tmp_path / "ws")
    clips = _clips(tmp_path, ws, [(0, 0, 0)] * 3)
    stitched = stitch_clips(ws, clips, sum(LENGTHS), match=match)
    times = _frame_times(ws.path(stitched.picture))
    assert len(times) == sum(LENGTHS)
    np.testing.assert_allclose(times, np.arange(sum(LENGTHS)) / 25, atol=1e-6)


def test_a_wrong_frame_count_is_refused(tmp_path):
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(ValueError, match="stitched picture has 31 frames, the plan has 32"):
        stitch_clips(ws, _clips(tmp_path, ws, [(0, 0, 0)] * 3), 32)


def test_colour_matching_brings_a_shifted_segment_back_under_the_threshold(tmp_path):
    """Still mode (the first segment is the reference): the middle segment came out warm and bright. The
    workspace path has a space and a colon (the LUT's path is an ffmpeg filter argument)."""
    tmp_path = tmp_path / "shot 1: take 2"
    tmp_path.mkdir()
    ws = Workspace(tmp_path / "ws")
    clips = _clips(tmp_path, ws, [(0, 0, 0), (28, 12, -10), (0, 0, 0)])
    report = stitch_clips(ws, clips, sum(LENGTHS), match=True).colour
    assert report["reference"] == "first segment" and report["applied"]
    assert [s["frame"] for s in report["seams"]] == [10, 22]
    for seam in report["seams"]:
        assert seam["delta_e_before"] > 3 * SEAM_DELTA_E_LIMIT
        assert seam["delta_e_after"] < SEAM_DELTA_E_LIMIT
    assert report["segment_shift_delta_e"][1] > 3 * SEAM_DELTA_E_LIMIT


def test_video_segments_are_matched_to_the_source_plate(tmp_path):
    """Video mode: every segment is matched to the source frames it re-renders, the first one included."""
    ws = Workspace(tmp_path / "ws")
    total = sum(LENGTHS)
    write_timed_video(
        tmp_path / "source.mp4", ((i, moving_picture(i, SIZE)) for i in range(total)), Fraction(1, 25), crf=10
    )
    clips = _clips(tmp_path, ws, [(-20, -5, 15), (0, 0, 0), (18, 18, 18)])
    stitched = stitch_clips(ws, clips, total, ws.put_file(tmp_path / "source.mp4", move=False), match=True)
    report = stitched.colour
    assert report["reference"] == "source"
    assert all(s["delta_e_after"] < SEAM_DELTA_E_LIMIT < s["delta_e_before"] for s in report["seams"])
    from engine.media import VideoFrames
    from tasks.seams import mean_colour_delta_e

    matched, plate = VideoFrames(ws.path(stitched.picture)), VideoFrames(tmp_path / "source.mp4")
    for frame in (0, 15, 30):
        assert mean_colour_delta_e(matched.frames25([frame])[0], plate.frames25([frame])[0]) < 1.5


COLOURS = ((220, 40, 40), (40, 200, 60), (50, 60, 230))  # one flat colour per segment


def _coloured_clips(tmp_path, ws: Workspace, overlap: int) -> list[Clip]:
    """Segments of LENGTHS frames in distinct colours; each but the last rendered `overlap` frames longer."""
    clips, start = [], 0
    for segment, (length, colour) in enumerate(zip(LENGTHS, COLOURS, strict=True)):
        extra = overlap if segment < len(LENGTHS) - 1 else 0
        frame = np.broadcast_to(np.asarray(colour, np.uint8), (SIZE[1], SIZE[0], 3))
        path = tmp_path / f"colour{segment}.mp4"
        write_timed_video(path, ((i, frame) for i in range(length + extra)), Fraction(1, 25), crf=4)
        clip = Clip(segment, ws.put_file(path), length + extra, "stand-in", start_frame=start, overlap=extra)
        clips.append(clip)
        start += length
    return clips


def test_overlap_frames_are_crossfaded_and_the_frame_count_stays_exact(tmp_path):
    """Each segment rendered 4 frames past its end: those blend into the next segment's first 4 frames with a
    rising weight, and the picture has exactly the planned frames at constant 25 fps timestamps."""
    from engine.media import VideoFrames

    ws = Workspace(tmp_path / "ws")
    overlap = 4
    stitched = stitch_clips(ws, _coloured_clips(tmp_path, ws, overlap), sum(LENGTHS))
    path = ws.path(stitched.picture)
    assert _frame_times(path) == pytest.approx([i / 25 for i in range(sum(LENGTHS))], abs=1e-6)
    means = np.array([frame.reshape(-1, 3).mean(0) for _, frame in VideoFrames(path).iter_frames()])
    starts = np.concatenate([[0], np.cumsum(LENGTHS)[:-1]])
    plain = means[starts + LENGTHS[-1] - 1]  # each segment's colour as decoded, past any crossfade
    for k, boundary in enumerate(starts[1:]):
        np.testing.assert_allclose(means[boundary - 1], plain[k], atol=1.5)  # the segment's own last frame
        for j in range(overlap):
            weight = (j + 1) / (overlap + 1)
            np.testing.assert_allclose(
                means[boundary + j], (1 - weight) * plain[k] + weight * plain[k + 1], atol=2
            )
        np.testing.assert_allclose(means[boundary + overlap], plain[k + 1], atol=1.5)  # the next one alone
    assert np.abs(plain[1] - plain[0]).max() > 100  # distinct colours: the blend above is no accident
    hard = stitch_clips(ws, _coloured_clips(tmp_path / "hard", ws, 0), sum(LENGTHS))
    hard_means = [f.reshape(-1, 3).mean(0) for _, f in VideoFrames(ws.path(hard.picture)).iter_frames()]
    np.testing.assert_allclose(hard_means[LENGTHS[0]], plain[1], atol=1.5)  # without overlap: a hard cut


def test_segments_render_their_overlap_driven_by_the_next_segments_audio():
    """The planner's view: every segment but the last renders K frames more (never more than the next one
    has), and the overlap is part of the render's key."""
    from tasks.segment import SegmentSpec, with_overlaps

    specs = (SegmentSpec(0, 0, 50, ("a",)), SegmentSpec(1, 50, 53, ("b",)), SegmentSpec(2, 53, 90, ("a",)))
    got = with_overlaps(specs, 5)
    assert [s.overlap for s in got] == [3, 5, 0] and [s.rendered_frames for s in got] == [53, 8, 37]
    assert got[0] != specs[0]  # a different key: the render runs again


def test_overlap_frames_with_chain_is_refused_at_its_line(tmp_path):
    from tasks.manifest import ManifestError, load_manifest
    from tests.hostile_corpus import GOOD

    manifest = tmp_path / "ep.yaml"
    manifest.write_text(
        GOOD.replace("render: {engine: preview, size: 480}", "render: {chain: true, overlap_frames: 4}")
    )
    with pytest.raises(
        ManifestError, match=r"ep.yaml:12:\d+: render.overlap_frames: chain already continues"
    ):
        load_manifest(manifest, check_media=False)
