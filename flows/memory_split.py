"""The out-of-memory path of the render fan-out: a segment that ran out of memory is cut in two at its best
inner cut by the segment planner (tasks/segment.py `split_segment`), and the halves are rendered instead.

The running plan is kept across rounds, so a half that runs out of memory again is split again; a
segment too short to split stays failed with its out-of-memory error.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from tasks.segment import (
    EpisodePlan,
    SegmentPlan,
    SegmentSpec,
    frame_rms,
    segment_specs,
    speech_activity,
    split_segment,
)
from tasks.workspace import Blob, Workspace


def is_out_of_memory(exc: BaseException) -> bool:
    """engine.base.OutOfMemory, also when it crossed a process boundary (compared by class name)."""
    return any(cls.__name__ == "OutOfMemory" for cls in type(exc).__mro__)


class SplitPlanner:
    """Splits segments of one episode's plan; speech activity is computed on the first split only."""

    def __init__(self, ws: Workspace, plan_blob: Blob, tracks: dict[str, Blob], overlap_frames: int = 0):
        self.ws, self.tracks, self.overlap_frames = ws, tracks, overlap_frames
        self.plan = SegmentPlan.from_json(ws.path(plan_blob).read_text())
        self._activity: tuple[dict[str, Any], dict[str, Any]] | None = None

    def split(self, index: int) -> tuple[SegmentSpec, SegmentSpec]:
        """The two halves of segment `index`; ValueError when it cannot be split."""
        activity, energy = self._signals()
        self.plan = split_segment(self.plan, index, activity, energy=energy)
        halves = {s.index for s in self.plan.segments if s.split_from == index}
        return tuple(s for s in segment_specs(self.plan, self.overlap_frames) if s.index in halves)  # type: ignore[return-value]

    def rendered(self, planned: EpisodePlan) -> EpisodePlan:
        """`planned` with the splits recorded: its plan.json rewritten with the halves in place of the
        segments they replaced, so the published plan says what was rendered."""
        blob = self.ws.put_bytes(self.plan.to_json().encode(), ".json")
        segments = segment_specs(self.plan, self.overlap_frames)
        return replace(planned, plan=blob, segments=segments)

    def _signals(self) -> tuple[dict[str, Any], dict[str, Any]]:
        if self._activity is None:
            from tasks.speakers import MIX_RATE, load_track

            audio = {sid: load_track(self.ws, blob) for sid, blob in self.tracks.items()}
            self._activity = (
                {sid: speech_activity(a, MIX_RATE) for sid, a in audio.items()},
                {sid: frame_rms(a, MIX_RATE) for sid, a in audio.items()},
            )
        return self._activity
