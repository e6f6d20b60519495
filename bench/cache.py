"""Benchmark: cold run vs unchanged re-run of the demo episode (embedded defaults).

Prints the Prefect start-up (measured once, by a trivial flow, and excluded from both runs),
the cold run, the re-run, their ratio, and how many stages the re-run executed.
Goal: 0 executed on the re-run, and the re-run under 10 % of the cold run.
Usage: python bench/cache.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder instead of a temp one")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="dubflow-bench-"))
    os.environ.setdefault("PREFECT_HOME", str(root / "prefect-home"))

    from prefect import flow

    from flows.episode import dub_episode
    from tasks.demo import demo_manifest_text, make_demo_media

    make_demo_media(root / "demo-media")
    manifest = root / "demo.yaml"
    manifest.write_text(demo_manifest_text())

    @flow
    def hello() -> int:
        return 1

    start = time.perf_counter()
    hello()
    startup = time.perf_counter() - start

    flow_overhead = min(_timed(hello) for _ in range(3))  # one flow run's own cost, server warm
    ws = root / "work"
    cold = _timed(lambda: dub_episode(manifest=str(manifest), workspace=str(ws)))
    rerun = _timed(lambda: dub_episode(manifest=str(manifest), workspace=str(ws)))
    last = json.loads((ws / "episodes" / "demo" / "runs.jsonl").read_text().splitlines()[-1])
    executed = sum(1 for s in last["stages"] if s["state"] == "executed")
    print(f"prefect start-up (ephemeral API, excluded): {startup:6.2f} s")
    print(f"cold run:                                   {cold:6.2f} s")
    print(f"unchanged re-run:                           {rerun:6.2f} s")
    print(f"re-run / cold:                              {rerun / cold:6.1%}  (goal < 10 %)")
    print(f"  of which a trivial flow run's own cost:   {flow_overhead:6.2f} s (Prefect's, per run)")
    print(f"re-run without it / cold:                   {(rerun - flow_overhead) / cold:6.1%}")
    print(f"stages executed on the re-run:              {executed:6d}  of {len(last['stages'])} (goal 0)")


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
