"""Fan-out, rerun and Prefect overhead, with the fake slow engine (engine/fake.py) on CPU render workers.

    python bench/fanout.py [--workers 4] [--part fanout|rerun|overhead|all]

1. fan-out: 3 episodes x 12 segments of uneven length, submitted by 3 concurrent flow runs to 4
   simulated GPU workers (local Dask cluster, engine preloaded). Model loads (goal 4), makespan vs
   the ideal max(total/4, longest) (goal <= 1.10), scheduler overhead per segment.
2. rerun: 3 demo episodes, 36 segments in all, through dub_batch with 2 injected failures, then `rerun`:
   segments rendered on the rerun (goal 2) and its wall time vs a full episode run.
3. Prefect overhead: flow start-up and per-task cost, ephemeral API vs a running server (PostgreSQL).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

S_PER_FRAME = float(os.environ.get("BENCH_S_PER_FRAME", "0.1"))  # a 2 s (50-frame) segment "renders" in 5 s
LOAD_S = 2.0


def fake_env(root: Path, **extra: str) -> dict[str, str]:
    return {
        "DUBFLOW_ENGINE_OVERRIDES": "preview=engine.fake:SlowRenderer",
        "DUBFLOW_FAKE_LOAD_S": str(LOAD_S),
        "DUBFLOW_FAKE_S_PER_FRAME": str(S_PER_FRAME),
        "DUBFLOW_FAKE_LOADS": str(root / "loads.txt"),
        "DUBFLOW_GPU_LOCK_DIR": str(root / "locks"),
        **extra,
    }


def loads(root: Path) -> int:
    path = root / "loads.txt"
    return len(path.read_text().splitlines()) if path.exists() else 0


# ---------------------------------------------------------------------------------------------- 1. fan-out


def segment_frames(n_episodes: int, n_segments: int, seed: int = 7) -> list[list[int]]:
    """Uneven segment lengths on the 4n+1 grid, 1.3 to 4.8 s, as the planner makes them."""
    rng = random.Random(seed)
    return [[4 * rng.randint(8, 30) + 1 for _ in range(n_segments)] for _ in range(n_episodes)]


def bench_fanout(root: Path, n_workers: int) -> dict[str, float]:
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.futures import wait

    from flows import heartbeats
    from flows.placement import render_slot
    from flows.workers import render_task_runner, start_workers, stop_workers

    heartbeats.install()  # as the real flows do (flows/episode.py): a flow's end does not wait on it

    @task(cache_policy=NO_CACHE, task_run_name="render[{episode}#{index:02d}]")
    def render_job(episode: str, index: int, frames: int) -> float:
        import numpy as np

        from engine import gpu_state
        from engine.base import PersonInput, RenderJob

        job = RenderJob(
            np.zeros((64, 64, 3), np.uint8), (PersonInput(np.zeros(16, np.float32)),), num_frames=frames
        )
        started = time.perf_counter()
        gpu_state.resident_renderer("preview").render(job)
        return time.perf_counter() - started

    @flow(name="bench-episode")
    def episode(name: str, frames: list[int]) -> list[float]:
        order = sorted(range(len(frames)), key=lambda i: -frames[i])
        futures = []
        for i in order:
            with render_slot(frames[i]):
                futures.append(render_job.submit(name, i, frames[i]))
        wait(futures)
        return [f.result() for f in futures]

    episodes = segment_frames(3, 12)
    ws = root / "work"
    state = start_workers(ws, cpu_workers=n_workers, port=8791)
    try:
        flow_with_workers = episode.with_options(task_runner=render_task_runner(ws))
        flow_with_workers("warm-up", [1])  # connect once; not timed
        times: dict[str, list[float]] = {}
        started = time.perf_counter()
        threads = [
            threading.Thread(target=lambda n=f"ep{k}", f=f: times.__setitem__(n, flow_with_workers(n, f)))
            for k, f in enumerate(episodes)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        makespan = time.perf_counter() - started
    finally:
        stop_workers(ws)
    rendered = [s for ep in times.values() for s in ep]
    work = sum(f * S_PER_FRAME for ep in episodes for f in ep)
    ideal = max(work / n_workers, max(f for ep in episodes for f in ep) * S_PER_FRAME)
    return {
        "workers": state.workers,
        "segments": len(rendered),
        "model_loads": loads(root),
        "makespan_s": makespan,
        "ideal_s": ideal,
        "makespan_ratio": makespan / ideal,
        "in_task_overhead_ms": 1000 * (sum(rendered) - work) / len(rendered),
        "overhead_per_segment_ms": 1000 * (makespan - ideal) * n_workers / len(rendered),
    }


# ---------------------------------------------------------------------------------------------- 2. rerun


def demo_manifests(folder: Path) -> list[Path]:
    """Three demo episodes planned into 14 + 14 + 8 = 36 segments; other seeds, so nothing is shared."""
    from tasks.demo import make_demo_media
    from tests.test_ops_rerun import write_manifest

    media = make_demo_media(folder / "media")
    out = []
    for k, max_s in enumerate((1.1, 1.1, 1.2)):
        (folder / f"r{k}").mkdir(parents=True, exist_ok=True)
        path = write_manifest(folder / f"r{k}", media, f"r{k}", extra_render=f", seed: {k + 1}")
        path.write_text(path.read_text().replace("max_segment_s: 2", f"max_segment_s: {max_s}"))
        out.append(path)
    return out


def bench_rerun(root: Path, n_workers: int) -> dict[str, float]:
    from flows.batch import dub_batch
    from flows.rerun import cached_segments, rendered_segments, segment_stages
    from flows.workers import start_workers, stop_workers
    from tasks.workspace import Workspace

    manifests = demo_manifests(root / "episodes")
    faults = root / "faults.json"
    faults.write_text(json.dumps({"fail_frames": [30, 160], "seeds": [2]}))  # two segments of r1
    os.environ["DUBFLOW_FAKE_FAULTS"] = str(faults)
    ws = root / "work"
    state = start_workers(ws, cpu_workers=n_workers, port=8792)
    try:
        started = time.perf_counter()
        dub_batch(folder=str(root / "episodes"), pattern="r*/*.yaml", workspace=str(ws), return_state=True)
        batch_s = time.perf_counter() - started
        runs = {m.stem: Workspace(ws).runs(m.stem)[-1] for m in manifests}
        faults.write_text("{}")
        rerun_s, code = _cli(["rerun", str(manifests[1]), "--workspace", str(ws)], state.address)
        rerun = Workspace(ws).runs("r1")[-1]
        full_s, _ = _cli(["run", str(manifests[1]), "--workspace", str(root / "fresh")], state.address)
    finally:
        stop_workers(ws)
    return {
        "segments_in_batch": sum(len(segment_stages(r)) for r in runs.values()),
        "failed_in_batch": sum(len(r.get("failed_segments", [])) for r in runs.values()),
        "batch_s": batch_s,
        "rerun_exit": code,
        "rendered_on_rerun": len(rendered_segments(rerun)),
        "cached_on_rerun": len(cached_segments(rerun)),
        "rerun_cli_wall_s": rerun_s,
        "full_run_cli_wall_s": full_s,
        "rerun_time_ratio": rerun_s / full_s,
    }


def _cli(args: list[str], scheduler: str) -> tuple[float, int]:
    """Wall time of one `dubflow` command in a fresh process (as a user runs it), and its exit code."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=REPO,
        env=os.environ | {"DUBFLOW_SCHEDULER": scheduler},
        capture_output=True,
        text=True,
    )
    return time.perf_counter() - started, done.returncode


# ---------------------------------------------------------------------------------------------- 3. overhead

PROBE = """
import time, sys
t0 = time.perf_counter()
from prefect import flow, task
@task
def noop(i): return i
@flow
def probe(n):
    t = time.perf_counter(); [noop(i) for i in range(n)]; return (time.perf_counter() - t) / max(n, 1)
t1 = time.perf_counter(); probe(0); t2 = time.perf_counter()
per_task = probe(50)
print(t1 - t0, t2 - t1, per_task)
"""


def _probe(env: dict[str, str]) -> tuple[float, float, float]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True, cwd=REPO
    )
    return tuple(float(x) for x in out.stdout.split()[-3:])  # type: ignore[return-value]


def clean_env() -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    return base | {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}


def bench_ephemeral(root: Path) -> tuple[float, float, float]:
    home = {"PREFECT_HOME": str(root / "ephemeral-home")}
    _probe(clean_env() | home)  # creates the DB
    return _probe(clean_env() | home)


class Server:
    """The project's own server (scripts/server.sh: PostgreSQL + Prefect) on spare ports, for the bench."""

    def __init__(self, root: Path):
        self.env = clean_env() | {
            "DUBFLOW_SERVER_DIR": str(root / "server"),
            "DUBFLOW_SERVER_PORT": "4291",
            "DUBFLOW_PGPORT": "5491",
            "DUBFLOW_PGDATA": tempfile.mkdtemp(prefix="dubflow-bench-pg-"),
            "PYTHON": sys.executable,
        }
        self.url = "http://127.0.0.1:4291/api"

    def __enter__(self) -> Server:
        started = time.perf_counter()
        subprocess.run(
            [str(REPO / "scripts/server.sh"), "start"], env=self.env, check=True, capture_output=True
        )
        self.start_s = time.perf_counter() - started
        return self

    def __exit__(self, *exc) -> None:
        subprocess.run([str(REPO / "scripts/server.sh"), "stop"], env=self.env, capture_output=True)


def bench_overhead(eph: tuple[float, float, float], server: Server, root: Path) -> dict[str, float]:
    srv = _probe(clean_env() | {"PREFECT_API_URL": server.url, "PREFECT_HOME": str(root / "client-home")})
    return {
        "import_prefect_s": eph[0],
        "ephemeral_first_flow_s": eph[1],
        "ephemeral_per_task_ms": 1000 * eph[2],
        "server_on_postgres_start_s": server.start_s,
        "server_first_flow_s": srv[1],
        "server_per_task_ms": 1000 * srv[2],
        "startup_ratio_ephemeral_vs_server": eph[1] / srv[1],
        "per_task_ratio_ephemeral_vs_server": eph[2] / srv[2],
    }


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--part", choices=["fanout", "rerun", "overhead", "all"], default="all")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dubflow-bench-"))
    parts = ["fanout", "rerun", "overhead"] if args.part == "all" else [args.part]
    eph = bench_ephemeral(root) if "overhead" in parts else None
    with Server(root) as server:
        if eph is not None:
            _report(
                "Prefect overhead: ephemeral API vs a server on PostgreSQL", bench_overhead(eph, server, root)
            )
        # the flows below report to that server, as in production (many threads on one ephemeral API time out)
        os.environ.update(clean_env() | {"PREFECT_API_URL": server.url, "PREFECT_HOME": str(root / "home")})
        for part in [p for p in parts if p != "overhead"]:
            sub = root / part
            sub.mkdir()
            os.environ.update(fake_env(sub, DUBFLOW_FAKE_WRITE="0" if part == "fanout" else "1"))
            if part == "fanout":
                figures = bench_fanout(sub, args.workers)
                _report(f"fan-out: 3 episodes x 12 segments, {args.workers} workers", figures)
            else:
                _report("rerun after 2 injected failures", bench_rerun(sub, args.workers))


def _report(title: str, figures: dict[str, float]) -> None:
    print(f"\n## {title}")
    for key, value in figures.items():
        print(f"  {key:<40} {value:.3f}" if isinstance(value, float) else f"  {key:<40} {value}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
