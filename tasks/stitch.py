"""stitch: the segment clips, in order, into one picture track with exactly the planned frames,
colour-matched to the episode's reference.

Joining is frame-exact: the clips are concatenated without re-encoding (the engines encode them alike)
and the frame count is checked. Each segment is then colour-matched to the reference, one transfer per
segment (a CIE Lab mean / standard-deviation transfer, the engine's own conversion), so a segment that
came out warmer or darker than its neighbours is brought back without flicker inside it:

- a video source: the source plate itself, the region the segment covers at the same frames;
- a still: the first segment.

The seam CIEDE2000 (mean colours of frames b - 1 and b at each boundary b) is reported before and after.
The re-encoded picture has constant 25 fps timestamps, frame i at i / 25 s.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from prefect import task

from engine.base import FPS
from engine.media import MediaError, VideoFrames, count_video_frames, run_ffmpeg, write_timed_video
from tasks.render import Clip
from tasks.seams import delta_e2000, mean_lab, rgb_to_lab
from tasks.workspace import Blob, Workspace, stage_cache

SAMPLES_PER_SEGMENT = 12  # frames of a segment (and of its reference) whose colours set its transfer
STATS_STRIDE = 4  # every 4th pixel each way is plenty for a mean and a spread
SEAM_DELTA_E_LIMIT = 2.0  # CIEDE2000 about 2: the smallest colour step most viewers notice side by side
CRF = 14  # the matched picture is re-encoded once more before paste-back / delivery


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
        joined = concat(ws, clips, tmp / "joined.mp4")
        if count_video_frames(joined) != total_frames:
            raise MediaError(
                f"stitched picture has {count_video_frames(joined)} frames, the plan has {total_frames}"
            )
        if not match or not clips:
            return Stitched(ws.put_file(joined), None)
        source = VideoFrames(ws.path(reference)) if reference is not None else None
        picture = VideoFrames(joined)
        transfers = [
            segment_transfer(picture, clip, _end(clips, i, total_frames), source)
            for i, clip in enumerate(clips)
        ]
        out, seams = tmp / "picture.mp4", {}
        frames = _matched_frames(picture, clips, transfers, seams)
        if write_timed_video(out, frames, Fraction(1, FPS), crf=CRF) != total_frames:
            raise MediaError("colour matching lost frames")
        return Stitched(ws.put_file(out), colour_report(clips, transfers, seams, source is not None))


def concat(ws: Workspace, clips: list[Clip], out):
    listing = out.with_suffix(".txt")
    listing.write_text("".join(f"file '{ws.path(c.video)}'\n" for c in clips))
    args = ["-f", "concat", "-safe", "0", "-i", str(listing), "-c", "copy", "-an"]
    run_ffmpeg([*args, "-movflags", "+faststart", str(out)], what="stitch")
    return out


def _end(clips: list[Clip], i: int, total_frames: int) -> int:
    return clips[i + 1].start_frame if i + 1 < len(clips) else total_frames


@dataclass(frozen=True)
class Transfer:
    """Lab statistics of a segment and of its reference: (2, 3) mean and std rows."""

    segment: np.ndarray
    reference: np.ndarray | None  # None: the first segment's own (a still's reference)

    def apply(self, frame: np.ndarray, reference: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> the same frame with the segment's Lab mean / std moved onto `reference`'s."""
        import torch

        from engine.multitalk.colour import lab_to_rgb

        lab = rgb_to_lab(frame)
        mean, std = self.segment
        moved = (lab - mean) * (reference[1] / np.maximum(std, 1e-6)) + reference[0]
        rgb = lab_to_rgb(torch.from_numpy(moved).movedim(-1, 0)).movedim(0, -1).numpy()
        return np.rint(rgb * 255).astype(np.uint8)


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


def _matched_frames(picture: VideoFrames, clips: list[Clip], transfers: list[Transfer], seams: dict):
    """(pts, frame) of the matched picture, 25 fps; records each seam's ΔE2000 before and after."""
    starts = [c.start_frame for c in clips]
    first = transfers[0].segment
    previous: tuple[np.ndarray, np.ndarray] | None = None
    segment = 0
    for i, frame in picture.iter_frames():
        while segment + 1 < len(starts) and i >= starts[segment + 1]:
            segment += 1
        transfer = transfers[segment]
        matched = transfer.apply(frame, first if transfer.reference is None else transfer.reference)
        if previous is not None and i in starts:
            seams[i] = (_delta_e(previous[0], frame), _delta_e(previous[1], matched))
        previous = (frame, matched)
        yield i, matched


def _delta_e(a: np.ndarray, b: np.ndarray) -> float:
    return float(delta_e2000(mean_lab(a), mean_lab(b)))


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
