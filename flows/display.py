"""Terminal display of a run: a progress bar while it runs, a summary and status tables after."""

from __future__ import annotations

import io
import sys
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from engine.base import FPS
from engine.memory import GiB

if TYPE_CHECKING:
    from tasks.segment import SegmentPlan


class RunDisplay:
    """A progress listener (flows/progress.py) that drives a rich bar on stderr."""

    def __init__(self) -> None:
        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[last]}"),
            TimeElapsedColumn(),
            console=self.console,
            disable=not sys.stderr.isatty(),
        )
        self.task = None
        self.counts = {"executed": 0, "cached": 0, "failed": 0}

    def __enter__(self) -> RunDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def __call__(self, event: str, episode: str, **info) -> None:
        if event == "start":
            self.task = self.progress.add_task(episode, total=info["total"], last="starting")
        elif event == "total" and self.task is not None:
            self.progress.update(self.task, total=info["total"])
        elif event == "step" and self.task is not None:
            self.counts[info["state"]] = self.counts.get(info["state"], 0) + 1
            self.progress.update(self.task, completed=info["done"], last=f"{info['name']}: {info['state']}")
            if not sys.stderr.isatty():
                print(f"  [{info['done']}/{info['total']}] {info['name']}: {info['state']}", file=sys.stderr)

    def summary(self, result: dict) -> str:
        lines = [
            f"episode {result['episode']}: {result['state']} - {self.counts['executed']} stages executed, "
            f"{self.counts['cached']} cached ({result['seconds']:.2f} s, {result['frames']} frames, "
            f"engine {result['engine']}, QC {result['qc_verdict']})"
        ]
        lines += _columns(result["outputs"], indent=2)
        return "\n".join(lines)


def _columns(named: dict[str, str], indent: int) -> list[str]:
    """name  value, the values aligned after the longest name."""
    width = max(map(len, named), default=0)
    return [f"{' ' * indent}{name:<{width}}  {value}" for name, value in named.items()]


def format_status(status: dict) -> str:
    lines = [
        f"episode {status['episode']}: {status['state']} (started {status['started']}, "
        f"finished {status['finished']})"
    ]
    if status.get("error"):
        lines.append(f"  error: {status['error']}")
    if status["state"] == "interrupted":
        lines.append(
            "  the run was killed before it finished; `dubflow run` resumes it (finished stages are reused)"
        )
    stages = Table("stage", "state", box=box.SIMPLE_HEAD, pad_edge=False)
    for stage in status["stages"]:
        _add_row(stages, stage["stage"], stage["state"])
    segments = Table("segment", "state", "outputs", box=box.SIMPLE_HEAD, pad_edge=False)
    for seg in status["segments"]:
        _add_row(segments, f"#{seg['segment']:02d}", seg["state"], ", ".join(seg.get("outputs", [])))
    lines += [_render(stages), _render(segments)]
    if status.get("outputs"):
        lines.append("  outputs:")
        lines += _columns(status["outputs"], indent=4)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the segment plan


def _timecode(frame: int) -> str:
    minutes, seconds = divmod(frame / FPS, 60)
    return f"{int(minutes):02d}:{seconds:05.2f}"


def format_plan_table(plan: SegmentPlan) -> str:
    """The plan as a table for `dubflow plan FILE`, with totals, makespan and every rule that was bent."""
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for name, justify in [("seg", "right"), ("start", "right"), ("end", "right"), ("frames", "right"),
                          ("speakers", "left"), ("end cut", "left"), ("GPU GiB", "right"),
                          ("host GiB", "right"), ("est s", "right"), ("flags", "left")]:  # fmt: skip
        table.add_column(name, justify=justify, no_wrap=True)
    for s in plan.segments:
        speakers = ",".join(s.speakers) + (f" (+{','.join(s.extra_speakers)})" if s.extra_speakers else "")
        _add_row(
            table,
            str(s.index), _timecode(s.start_frame), _timecode(s.end_frame), str(s.num_frames), speakers or "-",
            s.end_cut, f"{s.gpu_bytes / GiB:.1f}", f"{s.host_bytes / GiB:.1f}", f"{s.est_seconds:.0f}",
            ", ".join(s.flags),
        )  # fmt: skip
    return "\n".join([_render(table), *_plan_summary(plan)])


def _add_row(table: Table, *cells: str) -> None:
    """Cells as plain text: stage labels like conform[ana] are not rich markup."""
    table.add_row(*(Text(cell) for cell in cells))


def _render(table: Table) -> str:
    """A rich table as plain text (no colour codes: it goes to terminals, logs and pipes alike)."""
    console = Console(file=io.StringIO(), width=200, color_system=None, force_terminal=False)
    console.print(table)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines()).strip("\n")


def _plan_summary(plan: SegmentPlan) -> list[str]:
    lengths = [s.num_frames for s in plan.segments]
    lines = [
        "",
        f"{len(plan.segments)} segments, {plan.total_frames} frames ({_timecode(plan.total_frames)}); longest "
        f"{max(lengths)} of max {plan.max_frames} frames, shortest {min(lengths)} (min {plan.min_frames}); cuts: "
        + (", ".join(f"{n} {k}" for k, n in plan.cut_counts().items()) or "none"),
        f"estimated render {plan.total_seconds:.0f} s; makespan on {plan.n_gpus} GPU(s) {plan.makespan_s():.0f} s "
        f"vs ideal {plan.ideal_s():.0f} s ({plan.makespan_s() / max(plan.ideal_s(), 1e-9):.2f}x)"
        + (f"; chained: {len(plan.jobs_seconds())} shot(s) render serially" if plan.chained else ""),
    ]
    for s in plan.segments:
        if s.end_cut == "forced":
            lines.append(
                f"WARNING segment {s.index} ends in a forced cut inside speech at {_timecode(s.end_frame)}: no "
                f"silence, pause or turn between speakers within the {plan.max_frames}-frame limit"
            )
        if s.extra_speakers:
            lines.append(
                f"WARNING segment {s.index}: {len(s.speakers) + len(s.extra_speakers)} people talk; rendered with "
                f"the loudest {','.join(s.speakers)}, {','.join(s.extra_speakers)} as background"
            )
    return lines
