"""stitch: the segment clips, in order, into one picture track with exactly the planned frames,
colour-matched to the episode's reference.

Joining is frame-exact: the clips are concatenated without re-encoding (the engines encode them alike)
and the frame count is checked. Where a segment was rendered past its end (render.overlap_frames: those
frames are driven by the next segment's audio, and show the same instants as the next segment's first
frames), the two are crossfaded over those frames, the next segment's weight rising linearly from
1 / (K + 1) to K / (K + 1), and every clip is cut back to its own frames: the picture still has exactly the
planned frames. Each segment is then colour-matched to the reference, one transfer per
segment (a CIE Lab mean / standard-deviation transfer, the engine's own conversion), so a segment that
came out warmer or darker than its neighbours is brought back without flicker inside it:

- a video source: the source plate itself, the region the segment covers at the same frames;
- a still: the first segment.

The transfer is baked into a 33-point 3D LUT (a .cube file, the post house's own tool) that ffmpeg's
lut3d applies to each clip as it re-encodes it: Lab arithmetic on 36k grid points instead of on every
pixel. The matched clips are concatenated like the originals. The seam CIEDE2000 (mean colours of
frames b - 1 and b at each boundary b) is reported before and after; the picture keeps constant 25 fps
timestamps, frame i at i / 25 s.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from prefect import task

from engine.media import FPS, MediaError, VideoFrames, count_video_frames, run_ffmpeg, write_timed_video
from tasks.render import Clip
from tasks.seams import delta_e2000, mean_lab, rgb_to_lab
from tasks.workspace import Blob, Workspace, stage_cache

SAMPLES_PER_SEGMENT = 8  # frames of a segment (and of its reference) whose colours set its transfer
STATS_STRIDE = 8  # every 8th pixel each way is plenty for a mean and a spread (6,400 of a 480p frame)
SEAM_DELTA_E_LIMIT = 2.0  # CIEDE2000 about 2: the smallest colour step most viewers notice side by side
CRF = 14  # the matched picture is re-encoded once more before paste-back / delivery
LUT_SIZE = 33  # grid points per axis of the 3D LUT: the usual .cube size


@dataclass(frozen=True)
class Stitched:
    picture: Blob
    colour: dict | None  # the colour match: reference, per-segment shift, seam ΔE2000 before and after


def stitch_clips(
    ws: Workspace, clips: list[Clip], total_frames: int, reference: Blob | None = None, match: bool = False
) -> Stitched:
    """Concatenate the clips frame-exactly; with `match`, colour-match each segment to `reference` (the
    source video; None: the first segment)."""
    clips = sorted(clips, key=lambda c: c.segment)
    with ws.scratch() as tmp:
        videos = [ws.path(c.video) for c in clips]
        if any(c.overlap for c in clips):
            videos = crossfade(clips, videos, tmp)
        joined = _checked(concat(videos, tmp / "joined.mp4"), total_frames)
        if not match or not clips:
            return Stitched(ws.put_file(joined), None)
        source = VideoFrames(ws.path(reference)) if reference is not None else None
        picture = VideoFrames(joined)
        ends = [c.start_frame for c in clips[1:]] + [total_frames]
        transfers = [segment_transfer(picture, c, end, source) for c, end in zip(clips, ends, strict=True)]
        anchor = transfers[0].segment  # a still's reference: the first segment
        matched = [
            apply_lut(video, t.lut(anchor), tmp / f"matched{i}.mp4")
            for i, (video, t) in enumerate(zip(videos, transfers, strict=True))
        ]
        out = _checked(concat(matched, tmp / "picture.mp4"), total_frames)
        seams = {b: _seam_delta_e(picture, VideoFrames(out), b) for b in ends[:-1]}
        report = colour_report(clips, transfers, seams, source is not None)
        # a segment that drifts inside itself can be matched on average and still join worse: then the
        # frame-exact concat is delivered as it was, and qc.json says why
        worse = (report["seam_delta_e_after"]["mean"] or 0.0) > (report["seam_delta_e_before"]["mean"] or 0.0)
        report["applied"] = not worse
        return Stitched(ws.put_file(joined if worse else out), report)


def _checked(picture, total_frames: int):
    frames = count_video_frames(picture)
    if frames != total_frames:
        raise MediaError(
            f"stitched picture has {frames} frames, the plan has {total_frames}; a clip is wrong"
        )
    return picture


def crossfade(clips: list[Clip], videos: list[Path], tmp: Path) -> list[Path]:
    """Each clip re-encoded with its own frames only, the first of them blended with the previous clip's
    overlap (the frames it rendered past its end). One clip's overlap is held at a time."""
    out, tail = [], np.zeros((0, 1, 1, 3), np.uint8)  # tail: (K, H, W, 3), the previous clip's overlap
    for i, (clip, path) in enumerate(zip(clips, videos, strict=True)):
        frames = VideoFrames(path)
        if frames.count != clip.num_frames:
            raise MediaError(
                f"segment {clip.segment}: its clip has {frames.count} frames, the render said {clip.num_frames}"
            )
        own, overlap = clip.num_frames - clip.overlap, []
        faded = (
            (j, _blend(tail[j], frame, (j + 1) / (len(tail) + 1)) if j < len(tail) else frame)
            for j, frame in _own_frames(frames.iter_frames(), own, overlap)
        )
        out.append(tmp / f"faded{i}.mp4")
        write_timed_video(out[-1], faded, Fraction(1, FPS), crf=CRF, preset="veryfast")
        tail = np.stack(overlap) if overlap else tail[:0]
    return out


def _own_frames(frames, own: int, overlap: list) -> Iterator[tuple[int, np.ndarray]]:
    """The first `own` frames; the rest are collected into `overlap`."""
    for j, frame in frames:
        if j < own:
            yield j, frame
        else:
            overlap.append(frame)


def _blend(previous: np.ndarray, frame: np.ndarray, weight: float) -> np.ndarray:
    """`weight` of `frame` over `previous` (scaled to the frame's size if the clips differ)."""
    from tasks.pasteback import resize_frame

    previous = resize_frame(previous, (frame.shape[1], frame.shape[0]))
    mixed = previous.astype(np.float32) * (1.0 - weight) + frame.astype(np.float32) * weight
    return np.rint(mixed).astype(np.uint8)


def concat(videos: list, out):
    """Join encoded clips without re-encoding them (they share their codec settings)."""
    listing = out.with_suffix(".txt")
    listing.write_text("".join(f"file '{path}'\n" for path in videos))
    args = ["-f", "concat", "-safe", "0", "-i", str(listing), "-c", "copy", "-an"]
    run_ffmpeg([*args, "-movflags", "+faststart", str(out)], what="stitch")
    return out


@dataclass(frozen=True)
class Transfer:
    """Lab statistics of a segment and of its reference: (2, 3) mean and std rows."""

    segment: np.ndarray
    reference: np.ndarray | None  # None: the first segment's own (a still's reference)

    def lut(self, anchor: np.ndarray) -> np.ndarray:
        """(LUT_SIZE, LUT_SIZE, LUT_SIZE, 3) float RGB in [0, 1], indexed [b, g, r] (the .cube order, red
        fastest): the segment's Lab mean / std moved onto the reference's (`anchor` for a still)."""
        import torch

        from engine.multitalk.colour import lab_to_rgb

        target = anchor if self.reference is None else self.reference
        axis = np.linspace(0.0, 255.0, LUT_SIZE)
        b, g, r = np.meshgrid(axis, axis, axis, indexing="ij")
        lab = rgb_to_lab(np.stack([r, g, b], axis=-1))
        mean, std = self.segment
        moved = (lab - mean) * (target[1] / np.maximum(std, 1e-6)) + target[0]
        return lab_to_rgb(torch.from_numpy(moved).movedim(-1, 0)).movedim(0, -1).numpy()


def apply_lut(clip, lut: np.ndarray, out):
    """Re-encode a clip through a 3D LUT (ffmpeg lut3d, tetrahedral), every frame at its own time."""
    cube = out.with_suffix(".cube")
    rows = "\n".join(f"{r:.6f} {g:.6f} {b:.6f}" for r, g, b in lut.reshape(-1, 3))
    cube.write_text(f"LUT_3D_SIZE {LUT_SIZE}\nDOMAIN_MIN 0 0 0\nDOMAIN_MAX 1 1 1\n{rows}\n")
    run_ffmpeg(
        ["-i", str(clip), "-vf", f"lut3d=file={_filter_path(cube)}:interp=tetrahedral", "-c:v", "libx264"]
        + ["-preset", "veryfast", "-crf", str(CRF), "-pix_fmt", "yuv420p", "-fps_mode", "passthrough"]
        + ["-an", str(out)],
        what="colour match",
    )
    return out


def _filter_path(path) -> str:
    """A path as an ffmpeg filter option value: escaped for the option parser ('\\', ':', quotes), then
    quoted for the filtergraph parser (spaces)."""
    escaped = str(path).replace("\\", "\\\\").replace(":", "\\:").replace("'", "\\'")
    return "'" + escaped.replace("'", "'\\''") + "'"


def segment_transfer(picture: VideoFrames, clip: Clip, end: int, source: VideoFrames | None) -> Transfer:
    """The segment's colour statistics and, for a video source, those of the source region it re-renders
    at the same frames (the engine's crop, `clip.crop`)."""
    sample = np.unique(np.linspace(clip.start_frame, end - 1, SAMPLES_PER_SEGMENT).round().astype(int))
    ours = lab_statistics(picture.frames25(sample))
    if source is None:
        return Transfer(ours, None)
    theirs = source.frames25(sample)
    if clip.crop is not None:
        x0, y0, x1, y1 = clip.crop
        theirs = theirs[:, max(0, y0) : y1, max(0, x0) : x1]
    return Transfer(ours, lab_statistics(theirs))


def lab_statistics(frames: np.ndarray) -> np.ndarray:
    """(n, H, W, 3) uint8 -> (2, 3): Lab mean and standard deviation over all the frames' pixels."""
    lab = rgb_to_lab(frames[:, ::STATS_STRIDE, ::STATS_STRIDE]).reshape(-1, 3)
    return np.stack([lab.mean(0), lab.std(0)])


def _seam_delta_e(before: VideoFrames, after: VideoFrames, boundary: int) -> tuple[float, float]:
    """CIEDE2000 of the mean colours of frames boundary - 1 and boundary, before and after matching."""
    a, b, c, d = (
        f[:: STATS_STRIDE // 2, :: STATS_STRIDE // 2]
        for f in (*before.frames25([boundary - 1, boundary]), *after.frames25([boundary - 1, boundary]))
    )
    return float(delta_e2000(mean_lab(a), mean_lab(b))), float(delta_e2000(mean_lab(c), mean_lab(d)))


def colour_report(clips: list[Clip], transfers: list[Transfer], seams: dict, from_source: bool) -> dict:
    """qc.json's stitch.colour: what each segment was moved by, and every seam's ΔE2000 before and after."""
    first = transfers[0].segment
    shifts = [
        round(float(delta_e2000(t.segment[0], first[0] if t.reference is None else t.reference[0])), 2)
        for t in transfers
    ]
    per_seam = [
        {"frame": f, "delta_e_before": round(b, 2), "delta_e_after": round(a, 2)}
        for f, (b, a) in sorted(seams.items())
    ]
    before, after = [s["delta_e_before"] for s in per_seam], [s["delta_e_after"] for s in per_seam]
    return {
        "reference": "source" if from_source else "first segment",
        "segment_shift_delta_e": dict(zip([c.segment for c in clips], shifts, strict=True)),
        "seams": per_seam,
        "seam_delta_e_before": {"mean": _mean(before), "max": max(before, default=None)},
        "seam_delta_e_after": {"mean": _mean(after), "max": max(after, default=None)},
        "limit": SEAM_DELTA_E_LIMIT,
    }


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 2) if values else None


stitch_task = task(stitch_clips, name="stitch", cache_policy=stage_cache("tasks.stitch"), persist_result=True)
