"""The render-engine contract shared by every engine (preview, MultiTalk, InfiniteTalk).

Plain dataclasses and a Protocol; no Prefect, no torch. A renderer turns one `RenderJob`
(a picture, one speech track per person, where each person is) into a 25 fps clip with
exactly `num_frames` frames, and returns a small `RenderResult`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from engine.media import FPS  # one frame rate for every layer, defined at the bottom

AUDIO_RATE = 16_000  # every engine takes 16 kHz mono float32 per person

MODELS_DIR_ENV = "DUBFLOW_MODELS_DIR"

ProgressHook = Callable[..., None]  # progress(stage, completed, total, **info)


class JobError(ValueError):
    """A render job breaks a rule; the message names the field, the value and the rule."""


class EngineSetupError(RuntimeError):
    """An engine cannot be built here (missing package, unsupported device)."""


class MissingWeightsError(EngineSetupError):
    """Model weights are not where the engine looks for them."""


class OutOfMemory(RuntimeError):
    """The render ran out of (GPU or host) memory; the planner may split the segment."""

    def __init__(self, message: str, *, frames: int = 0, persons: int = 0, size: int = 0):
        super().__init__(message)
        self.frames, self.persons, self.size = frames, persons, size


@dataclass(frozen=True)
class Box:
    """A half-open pixel rectangle in source coordinates: x0 <= x < x1, y0 <= y < y1."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0


TimedBoxes = tuple[tuple[int, Box], ...]  # ((start_frame, box), ...), sorted by start_frame


def box_at(box: Box | TimedBoxes | None, frame: int) -> Box | None:
    """The box active at `frame`: a plain box, or the last timed box starting at or before it
    (the first one before any has started). The engine binds and paste-back composites by this rule."""
    if box is None or isinstance(box, Box):
        return box
    active = [b for start, b in box if start <= frame]
    return active[-1] if active else box[0][1]


@dataclass(frozen=True)
class PersonInput:
    audio: np.ndarray  # float32 mono at 16 kHz on the job's timeline (sample 0 = frame 0)
    box: Box | TimedBoxes | None = None
    name: str = ""  # shown by the preview renderer; engines ignore it


@dataclass(frozen=True)
class Caption:
    start_frame: int
    end_frame: int
    text: str
    person: int = 0


@dataclass(frozen=True)
class RenderJob:
    source: Path | np.ndarray  # still image (H x W x 3 uint8) or a video path
    persons: tuple[PersonInput, ...]
    prompt: str = ""
    negative_prompt: str | None = None
    mode: Literal["multitalk", "infinitetalk"] = "multitalk"
    num_frames: int | None = None
    source_start_frame: int = 0
    size: int = 480
    steps: int = 40
    shift: float | None = None
    text_scale: float = 5.0
    audio_scale: float = 4.0
    guidance: Literal["cfg", "apg"] = "cfg"
    teacache: float | None = None  # TeaCache threshold (multitalk engines); None: off, 0: off exactly
    teacache_warmup: int = 5  # steps always computed before TeaCache may skip (the reference's 5)
    color_match: float = 1.0
    frame_num: int = 81
    motion_frames: int | None = None
    seed: int = 42
    continue_from: Any = None  # a StreamState (engine.multitalk.streaming) or a path to a saved one
    captions: tuple[Caption, ...] = ()
    output: Path | None = None  # where the clip goes; the engine writes it atomically
    state_output: Path | None = None  # where the final StreamState goes (atomically), to chain segments

    def resolved_num_frames(self) -> int:
        if self.num_frames is not None:
            return self.num_frames
        longest = max((len(p.audio) for p in self.persons), default=0)
        return int(longest / AUDIO_RATE * FPS)


@dataclass
class RenderResult:
    path: Path | None
    num_frames: int
    fps: int
    height: int
    width: int
    seed: int
    crop: tuple[int, int, int, int] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory: dict[str, int] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Renderer(Protocol):
    name: str

    def render(self, job: RenderJob, *, progress: ProgressHook | None = None) -> RenderResult: ...


# name -> "module:factory"; factories take keyword settings and return a Renderer.
_REGISTRY: dict[str, str] = {
    "preview": "engine.preview:PreviewRenderer",
    "multitalk": "engine.multitalk.renderer:MultiTalkRenderer",
    "infinitetalk": "engine.multitalk.renderer:InfiniteTalkRenderer",
}


def models_dir_from_env() -> Path | None:
    """The models folder named by $DUBFLOW_MODELS_DIR (None when unset): searched before the HF and torch
    hub caches by every backend that loads weights. The one place this variable is read."""
    import os

    value = os.environ.get(MODELS_DIR_ENV)
    return Path(value) if value else None


def register_engine(name: str, target: str) -> None:
    """Register a renderer factory as 'module:attribute' (imported lazily on first use)."""
    _REGISTRY[name] = target


def engine_target(name: str) -> str:
    """The "module:factory" registered for engine `name` (EngineSetupError when unknown)."""
    if name not in _REGISTRY:
        raise EngineSetupError(f"unknown engine {name!r}; known engines: {', '.join(engine_names())}")
    return _REGISTRY[name]


def engine_names() -> list[str]:
    return sorted(_REGISTRY)


def create_renderer(name: str, **settings: Any) -> Renderer:
    module_name, attr = engine_target(name).split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EngineSetupError(
            f"engine {name!r} cannot be imported ({exc}); its packages are in dubflow's core: pip install -e ."
        ) from exc
    return getattr(module, attr)(**settings)
