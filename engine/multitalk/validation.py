"""Checks a `RenderJob` once, at the edge, and resolves its defaults (ENGINE.md §1.4).

Every failure is a one-line `JobError` naming the field, the value and the rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from engine.base import Box, JobError, RenderJob
from engine.multitalk.conditioning import box_at
from engine.multitalk.settings import (
    DEFAULT_NEGATIVE_PROMPT,
    MAX_FRAME_NUM,
    MAX_TRAINED_PERSONS,
    default_shift,
    is_4n_plus_1,
)


@dataclass(frozen=True)
class ResolvedJob:
    """A validated job with every default filled in."""

    job: RenderJob
    num_frames: int
    frame_num: int  # frames generated (the clip), >= num_frames
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
        ("mode", job.mode, job.mode == "multitalk", "'multitalk' (infinitetalk is part 2 of the engine)"),
        ("size", job.size, job.size in buckets, f"one of {sorted(buckets)}"),
        ("frame_num", job.frame_num, is_4n_plus_1(job.frame_num), "4n + 1"),
        ("frame_num", job.frame_num, job.frame_num <= max_frame_num, f"<= {max_frame_num} (one clip)"),
        ("steps", job.steps, job.steps >= 1, ">= 1"),
        ("shift", job.shift, job.shift is None or job.shift > 0, "> 0"),
        ("text_scale", job.text_scale, job.text_scale >= 0, ">= 0"),
        ("audio_scale", job.audio_scale, job.audio_scale >= 0, ">= 0"),
        ("guidance", job.guidance, job.guidance in ("cfg", "apg"), "'cfg' or 'apg'"),
        ("seed", job.seed, job.seed >= 0, ">= 0"),
        ("teacache", job.teacache, job.teacache is None, "None (TeaCache is part 2 of the engine)"),
        ("continue_from", job.continue_from, job.continue_from is None, "None (streaming is part 2)"),
    ]
    for name, value, ok, rule in rules:
        if not ok:
            raise JobError(f"{name}: {value!r}; rule: {rule}")


def resolve_job(
    job: RenderJob,
    buckets: dict[int, object],
    max_frame_num: int = MAX_FRAME_NUM,
    max_persons: int = MAX_TRAINED_PERSONS,
) -> ResolvedJob:
    """Validate `job` and fill its defaults; `num_frames` above `frame_num` is refused (long video: part 2)."""
    _check_numbers(job, buckets, max_frame_num)
    _check_audio(job)
    boxes = _check_persons(job, max_persons)
    num_frames = job.resolved_num_frames()
    if not 1 <= num_frames <= job.frame_num:
        raise JobError(
            f"num_frames: {num_frames}; rule: 1 to frame_num={job.frame_num} "
            "(one clip; long video is part 2 of the engine)"
        )
    shift = job.shift if job.shift is not None else default_shift(job.size) if job.size in (480, 720) else 7.0
    if not math.isfinite(shift):
        raise JobError(f"shift: {shift}; rule: finite")
    negative = job.negative_prompt if job.negative_prompt is not None else DEFAULT_NEGATIVE_PROMPT
    return ResolvedJob(job, num_frames, job.frame_num, shift, negative, boxes)
