"""Bind voice tracks to people on screen: the bind stage checks the manifest's pinned boxes against the picture and
the speech and draws a contact sheet; `dubflow bind --propose` proposes boxes for unpinned speakers as a manifest
patch. A speaker's box is that person's region (head, neck and shoulders: tasks/regions.py), not the face.
Shot cuts live in tasks/shots.py, face detectors in tasks/faces.py, faces followed through shots in
tasks/face_tracks.py, proposals in tasks/proposals.py, the sheet in tasks/contact_sheet.py, the records
(TimedBox, timed_boxes, boxes_for_segment, BindingError) in tasks/boxes.py; the names other stages import stay
importable from here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task

from engine.base import FPS, Box
from engine.media import is_still, video_size
from tasks.boxes import (
    Binding,
    BindingError,
    BindingProblem,
    TimedBox,
    boxes_for_segment,
    intersection,
    still_image,
    timed_boxes,
)
from tasks.contact_sheet import contact_sheet
from tasks.proposals import manifest_patch, propose_boxes
from tasks.segment import speech_activity
from tasks.shots import detect_shots
from tasks.workspace import Blob, Workspace, stage_cache

__all__ = [  # the stage's own names, and those other modules import from here
    "BindingError",
    "BindingRecord",
    "BindResult",
    "BindingProblem",
    "TimedBox",
    "bind_stage",
    "bind_task",
    "bind_tracks",
    "boxes_for_segment",
    "check_binding",
    "geometry_problems",
    "propose_binding",
    "timed_boxes",
]

# ---------------------------------------------------------------------------------------------- checks


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


# ---------------------------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class BindResult:
    boxes: dict[str, list[TimedBox]]  # pinned boxes only: a proposal reaches them through the manifest
    shot_cuts: tuple[int, ...]
    problems: tuple[BindingProblem, ...]
    contact_sheet: Path

    @property
    def errors(self) -> list[BindingProblem]:
        return [p for p in self.problems if p.severity == "error"]


def bind_tracks(
    source: Path | np.ndarray,
    box_specs: Mapping[str, Any],
    activity: Mapping[str, np.ndarray],
    out_png: Path,
    *,
    size: int = 480,
) -> BindResult:
    """The bind stage: manifest boxes (speaker id -> `speakers[].box` as written) checked against the picture and
    the speech, with a contact sheet to look at before rendering. Speakers without a box are reported; the fix is
    `dubflow bind FILE --propose` (propose_boxes + manifest_patch), never a silent guess."""
    boxes = {name: timed_boxes(box_specs.get(name)) for name in activity}
    shots = tuple(detect_shots(Path(source))) if not is_still(source) else ()
    frame_size = still_image(source).shape[1::-1] if is_still(source) else video_size(Path(source))
    problems = check_binding(boxes, frame_size, activity, shot_cuts=shots, size=size)
    sheet = contact_sheet(source, boxes, activity, out_png, shot_cuts=shots)
    return BindResult(boxes, shots, tuple(problems), sheet)


@dataclass(frozen=True)
class BindingRecord:
    contact_sheet: Blob  # PNG: check the binding before spending GPU time
    shot_cuts: tuple[int, ...]  # frames where the picture cuts (the planner cuts there too)
    warnings: tuple[str, ...]  # QC notes (speech without a box, small or overlapping boxes)


def bind_stage(ws: Workspace, source: Blob, tracks: dict[str, Blob], boxes: dict, size: int) -> BindingRecord:
    """Workspace form of `bind_tracks`: errors stop the run (geometry is checked at validation, so what is
    left is a real binding fault); warnings become QC notes."""
    from tasks.speakers import MIX_RATE, load_track

    activity = {sid: speech_activity(load_track(ws, blob), MIX_RATE) for sid, blob in tracks.items()}
    with ws.scratch() as tmp:
        result = bind_tracks(ws.path(source), boxes, activity, tmp / "contact-sheet.png", size=size)
        errors = [p for p in result.problems if p.severity == "error"]
        if errors:
            raise BindingError("; ".join(f"{p.field}: {p.message}" for p in errors))
        sheet = ws.put_file(result.contact_sheet)
    return BindingRecord(sheet, result.shot_cuts, tuple(p.message for p in result.problems))


def geometry_problems(boxes: dict, frame_size: tuple[int, int], size: int) -> list[BindingProblem]:
    """The checks that need no audio (box size at render scale, overlaps), for manifest validation."""
    binding = {sid: timed_boxes(spec) for sid, spec in boxes.items() if spec is not None}
    return check_binding(binding, frame_size, {}, size=size)


bind_task = task(bind_stage, name="bind", cache_policy=stage_cache("tasks.bind"), persist_result=True)


def propose_binding(
    ws: Workspace, source: Blob, tracks: dict[str, Blob], pinned: dict, out_png: Path, *, faces: str = "auto"
) -> str:
    """`dubflow bind --propose`: person regions for unpinned speakers, as a manifest patch (never applied
    silently), and a contact sheet of the proposal at `out_png`. `faces` names the face detector."""
    from tasks.faces import face_detector
    from tasks.speakers import MIX_RATE, load_track

    audio = {sid: load_track(ws, blob) for sid, blob in tracks.items()}
    fixed = {sid: timed_boxes(spec) for sid, spec in pinned.items() if spec is not None}
    report: list[str] = []
    detector = face_detector(faces)
    proposal = propose_boxes(ws.path(source), audio, MIX_RATE, pinned=fixed, detector=detector, report=report)
    activity = {sid: speech_activity(a, MIX_RATE) for sid, a in audio.items()}
    is_video = not is_still(ws.path(source))
    cuts = detect_shots(ws.path(source)) if is_video else []
    contact_sheet(ws.path(source), proposal, activity, out_png, shot_cuts=cuts)
    return manifest_patch(proposal, report=report)
