"""Terminal display of a run: a progress bar while it runs, a summary and status tables after."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


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
