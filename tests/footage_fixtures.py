"""Generated footage and a stand-in V2V renderer for the paste-back path (tests only).

`StandInV2V` keeps the real engine's output contract (ENGINE.md §1.1, §4.1, §5.7) without a model: it
reads its frames from the source video through `VideoFrames` at `source_start_frame` on the 25 fps grid,
cover-crops them to a fixed bucket, and returns clips of exactly `num_frames` frames at the bucket size
covering `RenderResult.crop`. Its picture is the source's crop *inverted*, so anything of the render that
leaks outside the persons' regions, or lands on the wrong frame, shows.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np

from engine.base import FPS, JobError, RenderJob, RenderResult
from engine.media import VideoFrames, ffmpeg_exe, is_still, write_timed_video
from engine.video import Mp4Writer

BUCKET = (48, 48)  # (h, w): square, so a wide source is cropped, and smaller, so the crop is scaled back up


def moving_picture(i: int, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 smooth gradients that move and brighten with the frame index (no two alike)."""
    w, h = size
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    red = 60 + 50 * np.sin((x + 4 * i) / 9.0)
    green = 60 + 50 * np.cos((y - 3 * i) / 7.0)
    blue = np.full_like(red, 40 + 60 * (1 - np.cos(i / 25.0)))  # smooth: a wrap would read as a shot cut
    return np.clip(np.stack([red, green, blue], axis=-1), 0, 255).astype(np.uint8)


def write_moving_video(path: Path, times_s: list[float], size=(128, 64)) -> Path:
    """An H.264 video (no sound) whose frame i, `moving_picture(i)`, is shown at times_s[i] (VFR allowed)."""
    frames = ((round(t * 1000), moving_picture(i, size)) for i, t in enumerate(times_s))
    write_timed_video(path, frames, Fraction(1, 1000), crf=0)
    return path


def cover_crop(width: int, height: int, bucket: tuple[int, int] = BUCKET) -> tuple[int, int, int, int]:
    """The centred source rectangle a cover-resize to `bucket` keeps (as the engine's framing does)."""
    scale = max(bucket[0] / height, bucket[1] / width)
    cw, ch = min(width, round(bucket[1] / scale)), min(height, round(bucket[0] / scale))
    x0, y0 = (width - cw) // 2, (height - ch) // 2
    return x0, y0, x0 + cw, y0 + ch


class StandInV2V:
    name = "infinitetalk"

    def __init__(self, invert: bool = True, bucket: tuple[int, int] = BUCKET):
        self.invert, self.bucket = invert, bucket

    def render(self, job: RenderJob, *, progress=None) -> RenderResult:
        from PIL import Image

        if job.mode != "infinitetalk" or is_still(job.source):
            raise JobError(f"mode: {job.mode!r} with source {job.source}; rule: infinitetalk with a video")
        video = VideoFrames(job.source)
        crop = cover_crop(video.width, video.height, self.bucket)
        n = job.resolved_num_frames()
        with Mp4Writer(Path(job.output), ffmpeg_exe(), crf=12, preset="veryfast") as out:
            for start in range(0, n, 25):  # a chunk at a time, like the engine
                grid = np.arange(start, min(n, start + 25)) + job.source_start_frame
                for frame in video.frames25(grid):
                    part = frame[crop[1] : crop[3], crop[0] : crop[2]]
                    small = np.asarray(Image.fromarray(part).resize(self.bucket[::-1], Image.BILINEAR))
                    out.write(255 - small if self.invert else small)
        height, width = self.bucket
        return RenderResult(Path(job.output), n, FPS, height, width, job.seed, crop=crop)


def stand_in_v2v(**_: object) -> StandInV2V:
    return StandInV2V()


def plain_v2v(**_: object) -> StandInV2V:
    """The source's own picture at a 256 px bucket: faces stay faces (a face restorer finds them)."""
    return StandInV2V(invert=False, bucket=(256, 256))


def tiny_infinitetalk(**settings: object):
    """The real engine with tiny random weights in infinitetalk mode (V2V needs the engine branch)."""
    from engine.multitalk import renderer

    factory = getattr(renderer, "InfiniteTalkRenderer", renderer.MultiTalkRenderer)
    return factory(tiny=True, **settings)


def tiny_multitalk(**settings: object):
    from engine.multitalk.renderer import MultiTalkRenderer

    return MultiTalkRenderer(tiny=True, **settings)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


class RecordingRenderer:
    """Wraps an engine and appends each job's chain facts to the JSON-lines file $DUBFLOW_TEST_JOB_LOG."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name

    def render(self, job: RenderJob, *, progress=None) -> RenderResult:
        import json
        import os

        entry = {
            "start": job.source_start_frame,
            "frames": job.num_frames,
            "continues": job.continue_from is not None,
        }
        with open(os.environ["DUBFLOW_TEST_JOB_LOG"], "a") as log:
            log.write(json.dumps(entry) + "\n")
        return self.inner.render(job, progress=progress)


def recording_tiny_infinitetalk(**settings: object) -> RecordingRenderer:
    return RecordingRenderer(tiny_infinitetalk(**settings))
