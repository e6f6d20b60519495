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
