"""`multitalk` renderer: adapts a `RenderJob` to the pipeline and writes the clip atomically.

Jobs longer than one clip (`num_frames > frame_num`) are rendered, in this part of the engine, as
consecutive independent clips from the same picture (`long_video="naive"`: visible seams every
`frame_num` frames, no motion context) or refused (`long_video="error"`). Streaming with motion
context is part 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from engine.base import (
    AUDIO_RATE,
    FPS,
    EngineSetupError,
    JobError,
    MissingWeightsError,
    PersonInput,
    ProgressHook,
    RenderJob,
    RenderResult,
)
from engine.multitalk.settings import EngineSettings
from engine.video import Mp4Writer

log = logging.getLogger(__name__)
SAMPLES_PER_FRAME = AUDIO_RATE // FPS  # 640


def available(models_dir: Path | str | None = None) -> tuple[bool, str]:
    """Whether this machine can run the real engine: a CUDA device and every weight file."""
    import torch

    from engine.multitalk.weights import resolve_folders

    if not torch.cuda.is_available():
        return False, "no CUDA device (the 14B model needs a GPU with >= 48 GB, or offloading from part 2)"
    try:
        resolve_folders(EngineSettings(models_dir=Path(models_dir) if models_dir else None))
    except MissingWeightsError as exc:
        return False, str(exc)
    return True, "CUDA device and weights present"


def find_ffmpeg() -> str:
    exe = shutil.which("ffmpeg")
    if exe:
        return exe
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError) as exc:
        raise EngineSetupError(
            "ffmpeg not found: install it (apt-get install ffmpeg) or imageio-ffmpeg"
        ) from exc


def write_mp4(frames: np.ndarray, path: Path, fps: int = FPS) -> None:
    """(N, H, W, 3) uint8 -> H.264 mp4, atomically (see engine.video.Mp4Writer)."""
    with Mp4Writer(path, find_ffmpeg(), fps=fps) as out:
        out.write(frames)


def split_job(job: RenderJob, frame_num: int) -> list[RenderJob]:
    """Consecutive clips of at most `frame_num` frames: audio sliced on the timeline, boxes taken at each
    clip's first frame, seed offset per clip."""
    from engine.multitalk.conditioning import box_at

    total = job.resolved_num_frames()
    clips = []
    for k, start in enumerate(range(0, total, frame_num)):
        frames = min(frame_num, total - start)
        lo, hi = start * SAMPLES_PER_FRAME, (start + frame_num + 3) * SAMPLES_PER_FRAME  # +3: window context
        persons = tuple(
            PersonInput(p.audio[lo:hi] if len(p.audio) > lo else p.audio[:0], box_at(p.box, start), p.name)
            for p in job.persons
        )
        clips.append(dataclasses.replace(job, persons=persons, num_frames=frames, seed=job.seed + k))
    return clips


@functools.lru_cache(maxsize=1)
def load_pipeline(settings: EngineSettings, tiny: bool = False) -> Any:
    """The pipeline for these settings, kept loaded: flows build one renderer per segment, and reloading
    38 GB of weights per segment would dominate. One pipeline at a time (GPU memory)."""
    from engine.multitalk.pipeline import MultiTalkPipeline

    if tiny:
        from engine.multitalk.tiny import tiny_components, tiny_config

        return MultiTalkPipeline(tiny_components(0), settings, tiny_config().buckets)
    return MultiTalkPipeline.from_settings(settings)


class MultiTalkRenderer:
    """Renderer protocol implementation; the pipeline is loaded on first use."""

    name = "multitalk"

    def __init__(
        self,
        *,
        models_dir: Path | str | None = None,
        device: str | None = None,
        dtype: Literal["bf16", "fp16", "fp32"] | None = None,
        tiny: bool = False,
        long_video: Literal["naive", "error"] = "naive",
        **settings: Any,
    ):
        import torch

        device = device or ("cuda" if torch.cuda.is_available() and not tiny else "cpu")
        dtype = dtype or ("fp32" if tiny or device == "cpu" else "bf16")
        self.settings = EngineSettings(
            models_dir=Path(models_dir) if models_dir else None, device=device, dtype=dtype, **settings
        )
        self.tiny = tiny
        self.long_video = long_video
        self._pipeline: Any = None

    @property
    def pipeline(self) -> Any:
        if self._pipeline is None:
            self._pipeline = load_pipeline(self.settings, self.tiny)
        return self._pipeline

    def adapt(self, job: RenderJob) -> RenderJob:
        """Tiny mode renders clips of the tiny `frame_num` (9) when the job keeps the default 81."""
        if self.tiny and job.frame_num == 81:
            from engine.multitalk.tiny import TINY_FRAME_NUM

            return dataclasses.replace(job, frame_num=TINY_FRAME_NUM)
        return job

    def render(self, job: RenderJob, *, progress: ProgressHook | None = None) -> RenderResult:
        start = time.perf_counter()
        job = self.adapt(job)
        total = job.resolved_num_frames()
        if total > job.frame_num and self.long_video == "error":
            raise JobError(
                f"num_frames: {total}; rule: <= frame_num={job.frame_num} (long video is part 2 of the engine)"
            )
        clips = split_job(job, job.frame_num) if total > job.frame_num else [job]
        if len(clips) > 1:
            log.warning("rendering %d frames as %d independent clips (naive long video)", total, len(clips))
        sink = Mp4Writer(Path(job.output), find_ffmpeg()) if job.output is not None else None
        kept, timings, first_info, shape, count = [], {}, {}, (0, 0, 0), 0
        with sink or contextlib.nullcontext():
            for clip in clips:  # each clip's frames go to ffmpeg (or the caller) before the next renders
                out = self.pipeline.render(clip, progress=progress)
                frames = out.frames.numpy()  # (n, H, W, 3) uint8
                if sink is not None:
                    sink.write(frames)
                else:
                    kept.append(frames)
                shape, first_info, count = frames.shape[1:], first_info or out.info, count + len(frames)
                timings = {k: timings.get(k, 0.0) + v for k, v in out.timings.items()}
                del out, frames
        timings["total"] = time.perf_counter() - start
        info = {**first_info, "clips": len(clips), "settings": self.settings.to_json_dict()}
        if sink is None:
            info["frames"] = np.concatenate(kept)
        return RenderResult(
            path=Path(job.output) if job.output else None, num_frames=count, fps=FPS,
            height=shape[0], width=shape[1], seed=job.seed, crop=first_info["crop"],
            timings=timings, peak_memory=_peak_memory(), info=info,
        )  # fmt: skip


def _peak_memory() -> dict[str, int]:
    import resource

    import torch

    peak = {"host_max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak["gpu_max_allocated"] = torch.cuda.max_memory_allocated()
    return peak


class InfiniteTalkRenderer(MultiTalkRenderer):
    """`infinitetalk`: the same engine with InfiniteTalk's adapter, `single/` for jobs of one person and
    `multi/` for two, swapped in place when a job needs the other one (the 14B base stays loaded)."""

    name = "infinitetalk"

    def __init__(self, **settings: Any):
        super().__init__(**{"product": "infinitetalk", **settings})

    def adapt(self, job: RenderJob) -> RenderJob:
        job = dataclasses.replace(super().adapt(job), mode="infinitetalk")
        if not self.tiny:  # tiny pipelines are built in memory, without adapter files
            from engine.multitalk.weights import use_adapter

            use_adapter(self.pipeline.c.transformer, self.settings, len(job.persons))
        return job
