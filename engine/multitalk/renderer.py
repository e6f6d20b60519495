"""`multitalk` renderer: adapts a `RenderJob` to the pipeline, streams its frames into one mp4 (written
atomically) and writes the final StreamState to `job.state_output` for the next segment.

Any length is one streamed render (`streaming.py`): each chunk's frames go to ffmpeg before the next
chunk renders, so host memory stays flat as the segment grows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from engine.base import (
    AUDIO_RATE,
    FPS,
    MissingWeightsError,
    ProgressHook,
    RenderJob,
    RenderResult,
)
from engine.media import ffmpeg_exe
from engine.multitalk.settings import EngineSettings
from engine.video import Mp4Writer

log = logging.getLogger(__name__)
SAMPLES_PER_FRAME = AUDIO_RATE // FPS  # 640


def available(models_dir: Path | str | None = None) -> tuple[bool, str]:
    """Whether this machine can run the real engine: a CUDA device and every weight file."""
    import torch

    from engine.multitalk.weights import resolve_folders

    if not torch.cuda.is_available():
        return (
            False,
            "no CUDA device (the 14B model needs a GPU: >= 48 GB, or 24 GB with render.offload: blocks)",
        )
    try:
        resolve_folders(EngineSettings(models_dir=Path(models_dir) if models_dir else None))
    except MissingWeightsError as exc:
        return False, str(exc)
    return True, "CUDA device and weights present"


def write_mp4(frames: np.ndarray, path: Path, fps: int = FPS) -> None:
    """(N, H, W, 3) uint8 -> H.264 mp4, atomically (see engine.video.Mp4Writer)."""
    with Mp4Writer(path, ffmpeg_exe(), fps=fps) as out:
        out.write(frames)


@functools.lru_cache(maxsize=1)
def load_pipeline(settings: EngineSettings, tiny: bool = False) -> Any:
    """The pipeline for these settings, kept loaded: flows build one renderer per segment, and reloading
    38 GB of weights per segment would dominate. One pipeline at a time (GPU memory)."""
    from engine.multitalk.pipeline import MultiTalkPipeline

    if tiny:
        from engine.multitalk.tiny import TINY_MOTION_FRAMES, tiny_components, tiny_config

        return MultiTalkPipeline(tiny_components(0), settings, tiny_config().buckets, TINY_MOTION_FRAMES)
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
        **settings: Any,
    ):
        import torch

        device = device or ("cuda" if torch.cuda.is_available() and not tiny else "cpu")
        dtype = dtype or ("fp32" if tiny or device == "cpu" else "bf16")
        self.settings = EngineSettings(
            models_dir=Path(models_dir) if models_dir else None, device=device, dtype=dtype, **settings
        )
        self.tiny = tiny
        self._pipeline: Any = None

    @property
    def pipeline(self) -> Any:
        if self._pipeline is None:
            self._pipeline = load_pipeline(self.settings, self.tiny)
        return self._pipeline

    def adapt(self, job: RenderJob) -> RenderJob:
        """Tiny mode renders chunks of the tiny `frame_num` (9) when the job keeps the default 81."""
        if self.tiny and job.frame_num == 81:
            from engine.multitalk.tiny import TINY_FRAME_NUM

            return dataclasses.replace(job, frame_num=TINY_FRAME_NUM)
        return job

    def render(self, job: RenderJob, *, progress: ProgressHook | None = None) -> RenderResult:
        start = time.perf_counter()
        job = self.adapt(job)
        sink = Mp4Writer(Path(job.output), ffmpeg_exe()) if job.output is not None else None
        with sink or contextlib.nullcontext():
            out = self.pipeline.render(job, progress=progress, sink=sink.write if sink is not None else None)
        if job.state_output is not None:
            out.state.save(job.state_output)
        timings = {**out.timings, "total": time.perf_counter() - start}
        info = {**out.info, "settings": self.settings.to_json_dict(), "stream_state": out.state}
        if sink is None:
            info["frames"] = out.frames.numpy()
        return RenderResult(
            path=Path(job.output) if job.output else None, num_frames=out.num_frames, fps=FPS,
            height=out.framing.height, width=out.framing.width, seed=job.seed, crop=out.info["crop"],
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
