"""Terminal display of a run: a progress bar while it runs, a summary and status tables after."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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
    lines.append("  stages:")
    lines += [f"    {s['stage']:<28} {s['state']}" for s in status["stages"]]
    lines.append("  segments:")
    lines += [
        f"    #{s['segment']:02d} {s['state']:<9} {', '.join(s.get('outputs', []))}"
        for s in status["segments"]
    ]
    if status.get("outputs"):
        lines.append("  outputs:")
        lines += _columns(status["outputs"], indent=4)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the segment plan


def _timecode(frame: int) -> str:
    minutes, seconds = divmod(frame / FPS, 60)
    return f"{int(minutes):02d}:{seconds:05.2f}"


def format_plan_table(plan: SegmentPlan) -> str:
    """The plan as a text table for `dubflow plan FILE`, with totals, makespan and every rule that was bent."""
    header = (
        f"{'seg':>4} {'start':>8} {'end':>8} {'frames':>6} {'speakers':<20} {'end cut':<7} {'GPU GiB':>7} "
    )
    header += f"{'host GiB':>8} {'est s':>7}  flags"
    rows = [header, "-" * len(header)]
    for s in plan.segments:
        speakers = ",".join(s.speakers) + (f" (+{','.join(s.extra_speakers)})" if s.extra_speakers else "")
        rows.append(
            f"{s.index:>4} {_timecode(s.start_frame):>8} {_timecode(s.end_frame):>8} {s.num_frames:>6} "
            f"{speakers or '-':<20} {s.end_cut:<7} {s.gpu_bytes / GiB:>7.1f} {s.host_bytes / GiB:>8.1f} "
            f"{s.est_seconds:>7.0f}  {', '.join(s.flags)}"
        )
    return "\n".join(rows + _plan_summary(plan))


def _plan_summary(plan: SegmentPlan) -> list[str]:
    lengths = [s.num_frames for s in plan.segments]
    lines = [
        "",
        f"{len(plan.segments)} segments, {plan.total_frames} frames ({_timecode(plan.total_frames)}); longest "
        f"{max(lengths)} of max {plan.max_frames} frames, shortest {min(lengths)} (min {plan.min_frames}); cuts: "
        + (", ".join(f"{n} {k}" for k, n in plan.cut_counts().items()) or "none"),
        f"estimated render {plan.total_seconds:.0f} s; makespan on {plan.n_gpus} GPU(s) {plan.makespan_s():.0f} s "
        f"vs ideal {plan.ideal_s():.0f} s ({plan.makespan_s() / max(plan.ideal_s(), 1e-9):.2f}x)",
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
