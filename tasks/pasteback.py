"""paste-back: the rendered speakers composited onto the original video, at its own size and frame rate.

The engine renders each segment at its bucket resolution, covering `Clip.crop` of the source (source
pixels) on the 25 fps grid. Here every *source* frame is decoded with its own timestamp, mapped to the
rendered frame nearest in time (`VideoFrames.grid25`), and each animated person's region of that rendered
frame is scaled back into the crop rectangle and blended over the source through a feathered mask around
the person's box (the box in effect at that frame). Outside the persons' regions the picture is the
source, untouched. The result keeps every source frame and its timestamp: a variable-rate source stays
variable-rate, with the same frame count and duration. One source frame and one rendered frame are held
at a time, so host memory stays flat however long the episode.

`full_frame` delivers the rendered frames scaled to the source size instead, at the source's timestamps.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from functools import lru_cache

import numpy as np
from prefect import task

from engine.base import Box, box_at
from engine.media import MediaError, VideoFrames, write_timed_video
from tasks.bind import timed_boxes
from tasks.regions import person_mask
from tasks.render import Clip, PersonSpec
from tasks.workspace import Blob, Workspace, stage_cache

COMPOSITES = ("paste_back", "full_frame")
MASKS = ("box", "person")  # box: 1 on the box, feathered outward; person: tasks.regions.person_mask, inward
CRF = 12  # the delivered picture is the source re-encoded once: keep it visually lossless (>= 40 dB PSNR)


def paste_back(
    ws: Workspace,
    source: Blob,
    picture: Blob,
    clips: list[Clip],
    persons: tuple[PersonSpec, ...],
    composite: str = "paste_back",
    feather_px: int = 16,
    mask: str = "box",
) -> Blob:
    """The stitched 25 fps render (`picture`) back onto the source video's own frames; returns the new
    picture track (H.264, the source's size, frame count and timestamps). `mask`: "box" feathers outward
    around each box; "person" is the feathered person mask inside each person region (tasks/regions.py)."""
    if composite not in COMPOSITES:
        raise ValueError(f"composite {composite!r} is unknown; use one of: {', '.join(COMPOSITES)}")
    if mask not in MASKS:
        raise ValueError(f"mask {mask!r} is unknown; use one of: {', '.join(MASKS)}")
    video, rendered = VideoFrames(ws.path(source)), VideoFrames(ws.path(picture))
    regions = Regions(clips, persons, (video.width, video.height), feather_px, mask)
    frames = _composited(video, rendered, regions, composite == "full_frame")
    with ws.scratch() as tmp:
        out = tmp / "picture.mp4"
        written = write_timed_video(out, frames, video.time_base, rate=video.count / video.duration, crf=CRF)
        if written != video.count:
            raise MediaError(f"paste-back wrote {written} frames, the source has {video.count}")
        return ws.put_file(out)


def _composited(
    video: VideoFrames, rendered: VideoFrames, regions: Regions, full_frame: bool
) -> Iterator[tuple[int, np.ndarray]]:
    """(pts, frame) for every source frame, in order: the rendered picture read forward only."""
    grid = np.clip(video.grid25(np.arange(video.count)), 0, rendered.count - 1)
    frames25 = rendered.iter_frames()
    at, current = -1, None
    for i, original in video.iter_frames():
        while at < grid[i]:  # grid25 never goes back: frames are in presentation order
            at, current = next(frames25)
        if full_frame:
            picture = resize_frame(current, (video.width, video.height))
        else:
            picture = regions.blend(original, current, int(grid[i]))
        yield int(video.pts[i] - video.pts[0]), picture


PSNR_SAMPLES = 24  # source frames, spread over the episode, on which the untouched picture is measured


def outside_psnr(
    ws: Workspace,
    source: Blob,
    pasted: Blob,
    clips: list[Clip],
    persons: tuple[PersonSpec, ...],
    feather_px: int = 16,
    mask: str = "box",
) -> dict:
    """PSNR of the delivered picture against the source outside every animated person's feathered region:
    there the picture must stay the source, within encoding noise. Measured on PSNR_SAMPLES frames."""
    video, delivered = VideoFrames(ws.path(source)), VideoFrames(ws.path(pasted))
    regions = Regions(clips, persons, (video.width, video.height), feather_px, mask)
    grid = video.grid25(np.arange(video.count))
    squared, pixels = 0.0, 0
    sample = np.unique(np.linspace(0, video.count - 1, min(PSNR_SAMPLES, video.count)).round().astype(int))
    for i in sample:
        (_, original), (_, ours) = next(video.iter_frames(i, i + 1)), next(delivered.iter_frames(i, i + 1))
        outside = regions.outside(int(grid[i]))
        diff = original[outside].astype(np.float64) - ours[outside].astype(np.float64)
        squared, pixels = squared + float(np.sum(diff**2)), pixels + diff.size
    mse = squared / max(pixels, 1)
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    return {"psnr_outside_db": round(psnr, 2) if np.isfinite(psnr) else None, "frames": len(sample)}


class Regions:
    """Per 25 fps frame: the crop the rendered frame covers and the feathered mask of its animated persons."""

    def __init__(
        self,
        clips: list[Clip],
        persons: tuple[PersonSpec, ...],
        size: tuple[int, int],
        feather_px: int,
        shape: str = "box",
    ):
        self.clips = sorted(clips, key=lambda c: c.start_frame)
        self.starts = [c.start_frame for c in self.clips]
        self.boxes = {
            p.id: tuple(
                (b.start_frame, b.box) for b in sorted(timed_boxes(p.box), key=lambda b: b.start_frame)
            )
            for p in persons
        }
        self.size, self.feather, self.shape = size, feather_px, shape

    def clip_at(self, frame25: int) -> Clip:
        return self.clips[max(0, bisect.bisect_right(self.starts, frame25) - 1)]

    def box_at(self, person: str, frame25: int) -> Box | None:
        """The person's box in effect at `frame25`, by the engine's rule (engine.base.box_at)."""
        return box_at(self.boxes.get(person) or None, frame25)

    def outside(self, frame25: int) -> np.ndarray:
        """(H, W) bool: the pixels no animated person's feathered region touches at `frame25`."""
        mask, (x0, y0, x1, y1) = self.mask_at(frame25, "box")
        out = np.ones((self.size[1], self.size[0]), bool)
        if mask is not None:
            out[y0:y1, x0:x1] = mask == 0
        return out

    def mask_at(self, frame25: int, shape: str | None = None) -> tuple[np.ndarray | None, tuple]:
        """The blend weights (h, w) of the animated persons at `frame25` over the rectangle (x0, y0, x1, y1)
        that holds them (None: nobody animated in view); `shape` defaults to the paste-back's own."""
        clip = self.clip_at(frame25)
        boxes = tuple(b for p in clip.persons if (b := self.box_at(p, frame25)) is not None)
        return _mask(boxes, clip.crop or (0, 0, *self.size), self.size, self.feather, shape or self.shape)

    def blend(self, original: np.ndarray, rendered: np.ndarray, frame25: int) -> np.ndarray:
        crop = self.clip_at(frame25).crop or (0, 0, *self.size)
        mask, (x0, y0, x1, y1) = self.mask_at(frame25)
        if mask is None:
            return original
        scaled = resize_frame(rendered, (crop[2] - crop[0], crop[3] - crop[1]))
        ours = scaled[y0 - crop[1] : y1 - crop[1], x0 - crop[0] : x1 - crop[0]].astype(np.float32)
        theirs = original[y0:y1, x0:x1].astype(np.float32)
        out = original.copy()
        out[y0:y1, x0:x1] = np.rint(theirs + mask[..., None] * (ours - theirs)).astype(np.uint8)
        return out


@lru_cache(maxsize=64)  # boxes rarely change from frame to frame: one mask per (boxes, crop)
def _mask(
    boxes: tuple[Box, ...],
    crop: tuple[int, int, int, int],
    size: tuple[int, int],
    feather: int,
    shape: str = "box",
) -> tuple[np.ndarray | None, tuple[int, int, int, int]]:
    """The blend weights (h, w) float32 in [0, 1] over the rectangle (x0, y0, x1, y1) that holds them, nothing
    outside the rendered crop. "box": 1 on each box, falling to 0 over `feather` pixels outside it; "person":
    each person region's feathered person mask, all inside the region."""
    width, height = size
    cx0, cy0, cx1, cy1 = max(0, crop[0]), max(0, crop[1]), min(width, crop[2]), min(height, crop[3])
    grow = feather if shape == "box" else 0
    grown = [(b.x0 - grow, b.y0 - grow, b.x1 + grow, b.y1 + grow) for b in boxes]
    x0 = max(cx0, min((g[0] for g in grown), default=cx1))
    y0 = max(cy0, min((g[1] for g in grown), default=cy1))
    x1 = min(cx1, max((g[2] for g in grown), default=cx0))
    y1 = min(cy1, max((g[3] for g in grown), default=cy0))
    if x1 <= x0 or y1 <= y0:
        return None, (0, 0, 0, 0)
    xs, ys = np.arange(x0, x1), np.arange(y0, y1)
    mask = np.zeros((y1 - y0, x1 - x0), np.float32)
    for b in boxes:
        if shape == "person":
            _paste_max(mask, person_mask(b, size, feather), b.x0 - x0, b.y0 - y0)
        else:
            mask = np.maximum(
                mask, _ramp(ys, b.y0, b.y1, feather)[:, None] * _ramp(xs, b.x0, b.x1, feather)[None]
            )
    return mask, (x0, y0, x1, y1)


def _paste_max(canvas: np.ndarray, patch: np.ndarray, left: int, top: int) -> None:
    """canvas = max(canvas, patch placed at (left, top)), clipped to the canvas."""
    h, w = canvas.shape
    y0, x0 = max(0, top), max(0, left)
    y1, x1 = min(h, top + patch.shape[0]), min(w, left + patch.shape[1])
    if y1 > y0 and x1 > x0:
        part = patch[y0 - top : y1 - top, x0 - left : x1 - left]
        canvas[y0:y1, x0:x1] = np.maximum(canvas[y0:y1, x0:x1], part)


def _ramp(coords: np.ndarray, lo: int, hi: int, feather: int) -> np.ndarray:
    """1 inside [lo, hi), then linearly down to 0 at `feather` pixels outside (a hard edge for 0)."""
    outside = np.maximum(np.maximum(lo - coords, coords - (hi - 1)), 0).astype(np.float32)
    return np.clip(1.0 - outside / (feather + 1), 0.0, 1.0) if feather else (outside == 0).astype(np.float32)


def resize_frame(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (size[1], size[0], 3): bilinear, as the engine scaled the source down."""
    if (frame.shape[1], frame.shape[0]) == size:
        return frame
    from PIL import Image

    return np.asarray(Image.fromarray(frame).resize(size, Image.BILINEAR))


outside_psnr_task = task(
    outside_psnr, name="paste-back-psnr", cache_policy=stage_cache("tasks.pasteback"), persist_result=True
)
pasteback_task = task(
    paste_back, name="paste-back", cache_policy=stage_cache("tasks.pasteback"), persist_result=True
)
