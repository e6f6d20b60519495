"""The binding's records: which box each speaker has, when (TimedBox on the 25 fps grid), and its problems."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image

from engine.base import FPS, Box, TimedBoxes

LOW_CONFIDENCE = 0.9  # proposals under this are marked for review in the patch and on the contact sheet


class BindingError(ValueError):
    """A binding that cannot be rendered: a malformed box, or boxes and speech that do not fit the picture. The
    message names the manifest field; it fails again on retry until the manifest changes."""


@dataclass(frozen=True)
class TimedBox:
    start_frame: int
    end_frame: int | None  # half-open; None: to the end of the episode
    box: Box
    source: Literal["pinned", "proposed"] = "pinned"
    score: float | None = None  # proposals: how much more the mouth moves while the track speaks
    confidence: float | None = None  # proposals: 0-1, how sure the voice is this person's (None: no evidence)

    def covers(self, frame: int) -> bool:
        return self.start_frame <= frame and (self.end_frame is None or frame < self.end_frame)

    @property
    def needs_review(self) -> bool:
        """A proposal without evidence (a still) or with a confidence under LOW_CONFIDENCE."""
        return self.source == "proposed" and (self.confidence is None or self.confidence < LOW_CONFIDENCE)


@dataclass(frozen=True)
class BindingProblem:
    severity: Literal["error", "warning"]  # error: the manifest must change; warning: a QC note
    message: str
    field: str = ""  # manifest path, e.g. "speakers[1].box[0]", for the loader to turn into FILE:LINE:COL
    speaker: str | None = None


Binding = Mapping[str, Sequence[TimedBox]]


def timed_boxes(spec: Any) -> list[TimedBox]:
    """A manifest box spec -> TimedBoxes: `[x0, y0, x1, y1]`, a Box, or a list of {from, to, box} in seconds."""
    if spec is None:
        return []
    if isinstance(spec, Box) or all(isinstance(v, int | float) for v in spec):
        return [TimedBox(0, None, _box(spec))]
    out = []
    for item in spec:
        end = item.get("to")
        box = _box(item.get("box"))
        out.append(TimedBox(round(item.get("from", 0) * FPS), None if end is None else round(end * FPS), box))
    return out


def _box(values: Any) -> Box:
    if isinstance(values, Box):
        return values
    if not isinstance(values, Sequence) or len(values) != 4:
        raise BindingError(f"a box is [x0, y0, x1, y1] in source pixels, got {values!r}")
    return Box(*(int(v) for v in values))


def boxes_for_segment(boxes: Sequence[TimedBox], start: int, end: int) -> Box | TimedBoxes | None:
    """The engine's box for one segment [start, end): one Box, or ((frame in the segment, Box), ...)."""
    inside = [b for b in boxes if b.start_frame < end and (b.end_frame is None or b.end_frame > start)]
    if len(inside) <= 1:
        return inside[0].box if inside else None
    return tuple((max(0, b.start_frame - start), b.box) for b in sorted(inside, key=lambda b: b.start_frame))


def active_sets(activity: Mapping[str, np.ndarray]) -> list[frozenset[str]]:
    """Per frame, the speakers talking in it: the planner cuts where this set changes."""
    names = list(activity)
    total = max((len(a) for a in activity.values()), default=0)
    grid = np.zeros((len(names), total), bool)
    for row, name in enumerate(names):
        grid[row, : len(activity[name])] = activity[name]
    return [frozenset(names[r] for r in np.flatnonzero(column)) for column in grid.T]


def still_image(source: Path | np.ndarray) -> np.ndarray:
    if isinstance(source, np.ndarray):
        return source
    with Image.open(source) as image:
        return np.asarray(image.convert("RGB"))


def intersection(a: Box, b: Box) -> int:
    return max(0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0, min(a.y1, b.y1) - max(a.y0, b.y0))


def iou(a: Box, b: Box) -> float:
    shared = intersection(a, b)
    union = a.width * a.height + b.width * b.height - shared
    return shared / union if union > 0 else 0.0
