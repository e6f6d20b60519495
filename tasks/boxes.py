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


# ---------------------------------------------------------------------------------------------- binding checks (no Prefect: validation runs them)


def check_binding(
    boxes: Binding,
    frame_size: tuple[int, int],
    activity: Mapping[str, np.ndarray],
    *,
    shot_cuts: Sequence[int] = (),
    size: int = 480,
    min_talk_frames: int = 5,
) -> list[BindingProblem]:
    """Located problems of a binding: box geometry (errors), overlaps, and speech where a speaker has no box."""
    width, height = frame_size
    scale = size / min(width, height)  # the engine's bucket (ENGINE.md §4.1) is within ~7 % of this scale
    problems: list[BindingProblem] = []
    for s, (name, timed) in enumerate(boxes.items()):
        for j, b in enumerate(timed):
            field = f"speakers[{s}].box" + (f"[{j}]" if len(timed) > 1 else "")
            problems += _box_problems(b.box, width, height, scale, field, name)
    problems += _overlap_problems(boxes)
    problems += _unboxed_speech(boxes, activity, shot_cuts, min_talk_frames)
    return problems


def _box_problems(
    box: Box, width: int, height: int, scale: float, field: str, name: str
) -> list[BindingProblem]:
    coords = f"[{box.x0}, {box.y0}, {box.x1}, {box.y1}]"
    if box.x1 <= box.x0 or box.y1 <= box.y0:
        return [
            BindingProblem(
                "error", f"{name}: box {coords} is empty or inverted (x1 > x0 and y1 > y0)", field, name
            )
        ]
    if box.x0 < 0 or box.y0 < 0 or box.x1 > width or box.y1 > height:
        message = f"{name}: box {coords} reaches outside the {width}x{height} picture; clip it to the frame"
        return [BindingProblem("error", message, field, name)]
    side = min(box.width, box.height) * scale
    if side < 16:  # one DiT token is 16x16 render pixels (VAE 8x, patch 2): the mask would cover no token
        message = (
            f"{name}: box {coords} is {side:.0f} px at render size, under one 16-px token: make it larger"
        )
        return [BindingProblem("error", message, field, name)]
    if side < 64:
        message = (
            f"{name}: box {coords} is only {side:.0f} px at render size; lips will lack detail (>= 64 px)"
        )
        return [BindingProblem("warning", message, field, name)]
    return []


def _overlap_problems(boxes: Binding) -> list[BindingProblem]:
    names, problems = list(boxes), []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            worst = max((_overlap(p, q) for p in boxes[a] for q in boxes[b] if _same_time(p, q)), default=0.0)
            if worst > 0.2:
                severity = "error" if worst > 0.5 else "warning"
                message = f"{a} and {b}: boxes overlap by {worst:.0%} of the smaller one; the engine cannot tell them apart"
                problems.append(BindingProblem(severity, message, f"speakers[{names.index(b)}].box", b))
    return problems


def _overlap(p: TimedBox, q: TimedBox) -> float:
    """Shared area as a share of the smaller box: a small face inside a big box is a total overlap."""
    smaller = min(p.box.width * p.box.height, q.box.width * q.box.height)
    return intersection(p.box, q.box) / smaller if smaller > 0 else 0.0


def _same_time(p: TimedBox, q: TimedBox) -> bool:
    p_end = p.end_frame if p.end_frame is not None else np.inf
    q_end = q.end_frame if q.end_frame is not None else np.inf
    return p.start_frame < q_end and q.start_frame < p_end


def _unboxed_speech(
    boxes: Binding, activity: Mapping[str, np.ndarray], shot_cuts: Sequence[int], min_frames: int
) -> list[BindingProblem]:
    problems = []
    for s, (name, active) in enumerate(activity.items()):
        bounds = [0, *sorted(c for c in shot_cuts if 0 < c < len(active)), len(active)]
        covered = np.zeros(len(active), bool)
        for b in boxes.get(name, ()):
            covered[b.start_frame : b.end_frame] = True
        for k, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False)):
            talking = int((active[lo:hi] & ~covered[lo:hi]).sum())
            if talking >= min_frames:
                message = (
                    f"{name} talks for {talking / FPS:.1f} s in shot {k} ({lo / FPS:.2f}-{hi / FPS:.2f} s) "
                    "without a box: off screen, or bind it"
                )
                problems.append(BindingProblem("warning", message, f"speakers[{s}].box", name))
    return problems


def geometry_problems(boxes: dict, frame_size: tuple[int, int], size: int) -> list[BindingProblem]:
    """The checks that need no audio (box size at render scale, overlaps), for manifest validation."""
    binding = {sid: timed_boxes(spec) for sid, spec in boxes.items() if spec is not None}
    return check_binding(binding, frame_size, {}, size=size)
