"""Bind voice tracks to people on screen: the bind stage checks the manifest's pinned boxes against the picture and
the speech and draws a contact sheet; `dubflow bind --propose` proposes boxes for unpinned speakers as a manifest
patch. A speaker's box is that person's region (head, neck and shoulders: tasks/regions.py), not the face.
Shot cuts live in tasks/shots.py, face detectors in tasks/faces.py, faces followed through shots in
tasks/face_tracks.py, proposals in tasks/proposals.py, the sheet in tasks/contact_sheet.py, the records
(TimedBox, timed_boxes, boxes_for_segment, BindingError) in tasks/boxes.py; the names other stages import stay
importable from here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prefect import task

from engine.media import is_still, video_size
from tasks.boxes import (  # the checks live there: manifest validation runs them without Prefect
    BindingError,
    BindingProblem,
    TimedBox,
    boxes_for_segment,
    check_binding,
    geometry_problems,
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
