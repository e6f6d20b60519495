"""Checks a `RenderJob` once, at the edge, and resolves its defaults (ENGINE.md §1.4).

Every failure is a one-line `JobError` naming the field, the value and the rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine.base import Box, JobError, RenderJob, box_at
from engine.multitalk.conditioning import is_still
from engine.multitalk.settings import (
    DEFAULT_NEGATIVE_PROMPT,
    MAX_FRAME_NUM,
    MAX_TRAINED_PERSONS,
    MOTION_FRAMES,
    default_shift,
    is_4n_plus_1,
)
from engine.multitalk.teacache import MAX_THRESHOLD


@dataclass(frozen=True)
class ResolvedJob:
    """A validated job with every default filled in."""

    job: RenderJob
    num_frames: int
    frame_num: int  # F: frames per chunk
    motion_frames: int  # M: context frames carried between chunks
    shift: float
    negative_prompt: str
    boxes: tuple[Box, ...]  # boxes at frame 0, empty for one person

    @property
    def persons(self) -> int:
        return len(self.job.persons)


def _check_audio(job: RenderJob) -> None:
    for i, person in enumerate(job.persons):
        audio = person.audio
        if (
            not isinstance(audio, np.ndarray)
            or audio.ndim != 1
            or not np.issubdtype(audio.dtype, np.floating)
        ):
            kind = getattr(audio, "shape", type(audio).__name__)
            raise JobError(f"persons[{i}].audio: {kind}; rule: 1-D float array, mono 16 kHz")
        if not np.all(np.isfinite(audio)):
            raise JobError(f"persons[{i}].audio: contains NaN or inf; rule: finite samples")


def _check_persons(job: RenderJob, max_persons: int) -> tuple[Box, ...]:
    count = len(job.persons)
    if not 1 <= count <= max_persons:
        extra = "" if max_persons > MAX_TRAINED_PERSONS else " (more only with experimental_persons=True)"
        raise JobError(f"persons: {count} entries; rule: 1 to {max_persons}{extra}")
    if count == 1:
        return ()
    boxes = tuple(box_at(p.box, 0) for p in job.persons)
    for i, box in enumerate(boxes):
        if box is None:
            raise JobError(f"persons[{i}].box: None; rule: required when there are {count} persons")
    return boxes  # type: ignore[return-value]


def _check_numbers(job: RenderJob, buckets: dict[int, object], max_frame_num: int) -> None:
    rules = [
        ("mode", job.mode, job.mode in ("multitalk", "infinitetalk"), "'multitalk' or 'infinitetalk'"),
        ("size", job.size, job.size in buckets, f"one of {sorted(buckets)}"),
        ("frame_num", job.frame_num, is_4n_plus_1(job.frame_num), "4n + 1"),
        ("frame_num", job.frame_num, job.frame_num <= max_frame_num, f"<= {max_frame_num} (per chunk)"),
        ("steps", job.steps, job.steps >= 1, ">= 1"),
        ("shift", job.shift, job.shift is None or job.shift > 0, "> 0"),
        ("text_scale", job.text_scale, job.text_scale >= 0, ">= 0"),
        ("audio_scale", job.audio_scale, job.audio_scale >= 0, ">= 0"),
        ("guidance", job.guidance, job.guidance in ("cfg", "apg"), "'cfg' or 'apg'"),
        ("seed", job.seed, job.seed >= 0, ">= 0"),
        ("teacache", job.teacache, _teacache_ok(job.teacache), f"None or 0 to {MAX_THRESHOLD:g}"),
        (
            "teacache_warmup",
            job.teacache_warmup,
            job.teacache_warmup >= 1,
            ">= 1 (step 0 has nothing to reuse)",
        ),
        ("color_match", job.color_match, 0.0 <= job.color_match <= 1.0, "0 to 1"),
        ("source_start_frame", job.source_start_frame, job.source_start_frame >= 0, ">= 0"),
    ]
    for name, value, ok, rule in rules:
        if not ok:
            raise JobError(f"{name}: {value!r}; rule: {rule}")


def _teacache_ok(threshold: float | None) -> bool:
    return threshold is None or (math.isfinite(threshold) and 0 <= threshold <= MAX_THRESHOLD)


def _motion_frames(job: RenderJob, defaults: dict[str, int]) -> int:
    """The job's M, or the mode's default (25 / 9), at most frame_num - 1 for short chunks."""
    motion = (
        job.motion_frames if job.motion_frames is not None else min(defaults[job.mode], job.frame_num - 1)
    )
    if not 1 <= motion < job.frame_num:
        raise JobError(f"motion_frames: {motion}; rule: 1 <= motion_frames < frame_num={job.frame_num}")
    return motion


def _check_source(job: RenderJob) -> None:
    if job.mode == "multitalk" and not is_still(job.source):
        raise JobError(
            f"source: video {str(job.source)!r} with mode 'multitalk'; rule: a still (or mode 'infinitetalk')"
        )


def resolve_job(
    job: RenderJob,
    buckets: dict[int, object],
    max_frame_num: int = MAX_FRAME_NUM,
    max_persons: int = MAX_TRAINED_PERSONS,
    motion_defaults: dict[str, int] = MOTION_FRAMES,
) -> ResolvedJob:
    """Validate `job` and fill its defaults (any length: it is rendered in chunks of `frame_num`)."""
    _check_numbers(job, buckets, max_frame_num)
    _check_source(job)
    _check_audio(job)
    boxes = _check_persons(job, max_persons)
    motion = _motion_frames(job, motion_defaults)
    num_frames = job.resolved_num_frames()
    if num_frames < 1:
        raise JobError(f"num_frames: {num_frames}; rule: >= 1 (or audio of at least one frame, 40 ms)")
    shift = job.shift if job.shift is not None else default_shift(job.size) if job.size in (480, 720) else 7.0
    if not math.isfinite(shift):
        raise JobError(f"shift: {shift}; rule: finite")
    negative = job.negative_prompt if job.negative_prompt is not None else DEFAULT_NEGATIVE_PROMPT
    return ResolvedJob(job, num_frames, job.frame_num, motion, shift, negative, boxes)
