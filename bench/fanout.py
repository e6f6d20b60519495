"""Fan-out, rerun and Prefect overhead, with the fake slow engine (engine/fake.py) on CPU render workers.

    python bench/fanout.py [--workers 4] [--part fanout|rerun|overhead|all]
    python bench/fanout.py --hosts 2    # the farm: 2 simulated hosts x 2 workers, TLS against plain TCP

1. fan-out: 3 episodes x 12 segments of uneven length, submitted by 3 concurrent flow runs to 4
   simulated GPU workers (local Dask cluster, engine preloaded). Model loads (goal 4), makespan vs
   the ideal max(total/4, longest) (goal <= 1.10), scheduler overhead per segment.
2. rerun: 3 demo episodes, 36 segments in all, through dub_batch with 2 injected failures, then `rerun`:
   segments rendered on the rerun (goal 2) and its wall time vs a full episode run.
3. Prefect overhead: flow start-up and per-task cost, ephemeral API vs a running server (PostgreSQL).
4. hosts (--hosts N): N simulated hosts, each a `dubflow workers join` with 2 workers (its own process group
   and $DUBFLOW_HOST) on one scheduler. Per-segment overhead with TLS (mutual certificates) against plain
   TCP, measured in the same run on 1-frame segments; the fan-out above on the TLS cluster (makespan vs
   ideal, model loads = workers); then one host killed mid-segment: recovery time (from the kill to the
   lost segment starting on another host) and makespan against the ideal for the capacity left.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
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


# ---------------------------------------------------------------------------------------------- 4. hosts

PER_HOST = 2


class HostCluster:
    """A scheduler and `hosts` x 2 joined workers on loopback, each host its own process group."""

    def __init__(self, root: Path, hosts: int, port: int, certs: Path | None):
        self.root, self.hosts, self.certs = root, hosts, certs
        self.address = f"{'tls' if certs else 'tcp'}://127.0.0.1:{port}"
        self.procs: dict[str, subprocess.Popen] = {}

    def __enter__(self) -> HostCluster:
        from flows.workers import _tls_args

        tls = _tls_args(str(self.certs), "scheduler") if self.certs else []
        port = self.address.rsplit(":", 1)[1]
        self.procs["scheduler"] = self._spawn(
            ["-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", port, "--no-dashboard", *tls], {}
        )
        for k in range(self.hosts):
            join = ["-m", "flows.cli", "workers", "join", self.address, "--cpu", str(PER_HOST)]
            join += ["--tls", str(self.certs)] if self.certs else []
            self.procs[f"host{k}"] = self._spawn(
                join, {"DUBFLOW_HOST": f"host{k}", "DUBFLOW_GPU_LOCK_DIR": str(self.root / f"locks{k}")}
            )
        with self.client() as client:
            client.wait_for_workers(self.hosts * PER_HOST, timeout=120)
        return self

    def _spawn(self, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.root / "cluster.log", "ab")  # noqa: SIM115 - open for the process's life
        return subprocess.Popen(
            [sys.executable, *args], env=os.environ | env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def security(self) -> dict:
        from flows.cluster import security

        return {"security": security(self.certs, "client")} if self.certs else {}

    def client(self):
        from distributed import Client

        return Client(self.address, timeout=30, **self.security())

    def kill_host(self, name: str) -> float:
        """Every process of the host at once (as when it loses power); the time of the kill."""
        import signal

        os.killpg(self.procs[name].pid, signal.SIGKILL)
        return time.time()

    def __exit__(self, *exc) -> None:
        import signal

        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def episode_flow_for(address: str, client_kwargs: dict):
    """A bench episode: its segments (unique seeds, so the render log tells them apart) largest first."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE
    from prefect.futures import wait
    from prefect_dask import DaskTaskRunner

    from flows.placement import render_slot

    @task(cache_policy=NO_CACHE, task_run_name="render[{episode}#{index:02d}]")
    def render_job(episode: str, index: int, frames: int, seed: int) -> float:
        import numpy as np

        from engine import gpu_state
        from engine.base import PersonInput, RenderJob

        job = RenderJob(
            np.zeros((64, 64, 3), np.uint8),
            (PersonInput(np.zeros(16, np.float32)),),
            num_frames=frames,
            seed=seed,
        )
        started = time.perf_counter()
        gpu_state.resident_renderer("preview").render(job)
        return time.perf_counter() - started

    @flow(name="bench-farm-episode")
    def episode(name: str, frames: list[int], seed0: int) -> list[float]:
        order = sorted(range(len(frames)), key=lambda i: -frames[i])
        futures = []
        for i in order:
            with render_slot(frames[i]):
                futures.append(render_job.submit(name, i, frames[i], seed0 + i))
        wait(futures)
        return [f.result() for f in futures]

    return episode.with_options(task_runner=DaskTaskRunner(address=address, client_kwargs=client_kwargs))


def run_episodes(flow_, episodes: list[list[int]], seed0: int, during=None) -> float:
    """All episodes at once, one flow run each (threads); the makespan. `during()` runs meanwhile."""
    started = time.perf_counter()
    threads = [
        threading.Thread(target=flow_, args=(f"ep{k}", frames, seed0 + 100 * k))
        for k, frames in enumerate(episodes)
    ]
    for t in threads:
        t.start()
    if during is not None:
        during()
    for t in threads:
        t.join()
    return time.perf_counter() - started


def render_log(path: Path) -> list[tuple[str, str, int, float]]:
    """(event, host, seed, unix time) per line of the fake engine's render log."""
    rows = [line.split() for line in path.read_text().splitlines()] if path.exists() else []
    return [(r[0], r[1], int(r[3]), float(r[6])) for r in rows]


def bench_hosts(root: Path, n_hosts: int) -> dict[str, float]:
    from flows.certs import make_certs

    make_certs(root / "certs")
    workers = n_hosts * PER_HOST
    tiny = (
        48  # one-frame segments in one flow run, less a one-segment run: what is left is the per-segment cost
    )
    out: dict[str, float] = {}
    for mode, port in (("tcp", 8793), ("tls", 8794)):
        sub = root / mode
        sub.mkdir()
        os.environ["DUBFLOW_FAKE_LOADS"] = str(sub / "loads.txt")
        with HostCluster(sub, n_hosts, port, root / "certs" if mode == "tls" else None) as cluster:
            flow_ = episode_flow_for(cluster.address, cluster.security())
            flow_("warm-up", [1], 0)  # connect once; not timed
            one = run_episodes(flow_, [[1]], 1000)
            many = run_episodes(flow_, [[1] * (tiny + 1)], 1100)
            out[f"{mode}_per_segment_overhead_ms"] = 1000 * ((many - one) * workers / tiny - S_PER_FRAME)
            if mode == "tls":
                out |= farm_fanout(root, cluster, flow_, workers)
                out["model_loads"] = loads(sub)
    out["workers"] = workers
    out["tls_vs_tcp_overhead_ratio"] = out["tls_per_segment_overhead_ms"] / out["tcp_per_segment_overhead_ms"]
    return out


def farm_fanout(root: Path, cluster: HostCluster, flow_, workers: int) -> dict[str, float]:
    episodes = segment_frames(3, 12)
    work = sum(f * S_PER_FRAME for ep in episodes for f in ep)
    longest = max(f for ep in episodes for f in ep) * S_PER_FRAME
    ideal = max(work / workers, longest)
    makespan = run_episodes(flow_, episodes, 2000)
    log = Path(os.environ["DUBFLOW_FAKE_RENDERS"])
    log.unlink(missing_ok=True)
    killed: dict[str, float] = {}

    def kill_when_busy() -> None:  # host1 dies inside a segment, a third of the way through
        while True:
            rows = render_log(log)
            ends = {s for e, h, s, _ in rows if e == "end"}
            busy = [s for e, h, s, _ in rows if e == "start" and h == "host1" and s not in ends]
            if busy and len(ends) >= 12:
                killed["at"] = cluster.kill_host("host1")
                killed["seeds"] = busy  # type: ignore[assignment]
                return
            if len(ends) == len(episodes) * len(episodes[0]):
                raise RuntimeError("host1 never rendered after the first third: nothing to kill")
            time.sleep(0.02)

    with_kill = run_episodes(flow_, episodes, 3000, during=kill_when_busy)
    rows = render_log(log)
    restarts = [t for e, h, s, t in rows if e == "start" and h != "host1" and s in killed["seeds"]]
    # the ideal with the kill: up to it as it went, then what was not finished (lost segments whole) on the
    # workers left, from the first render's start
    done = [s for e, _, s, t in rows if e == "end" and t <= killed["at"]]
    done_work = sum(_frames_of(episodes, s, 3000) * S_PER_FRAME for s in done)
    ideal_kill = killed["at"] - min(t for *_, t in rows) + (work - done_work) / (workers - PER_HOST)
    ended = Counter(s for e, _, s, _ in rows if e == "end")
    return {
        "segments": sum(len(ep) for ep in episodes),
        "makespan_s": makespan,
        "ideal_s": ideal,
        "makespan_ratio": makespan / ideal,
        "host_removed_after_s": _removed_at(cluster.root / "cluster.log", "host1") - killed["at"],
        "recovery_s": min(restarts) - killed["at"],  # includes waiting for a free worker: it is requeued
        # the bench's tasks are NO_CACHE: a result that died with its host is computed again (the episode
        # flow's render stage is cached in the workspace, so there it comes back Cached)
        "finished_segments_rendered_again": sum(n - 1 for n in ended.values()),
        "lost_segments": len(killed["seeds"]),
        "makespan_with_host_killed_s": with_kill,
        "ideal_with_host_killed_s": ideal_kill,
        "makespan_with_host_killed_ratio": with_kill / ideal_kill,
    }


def _removed_at(log: Path, host: str) -> float:
    """When the scheduler removed the first worker of `host` (its log's local timestamp, as Unix time)."""
    import datetime as dt

    for line in log.read_text().splitlines():
        if "Remove worker" in line and f"name: {host}-" in line:
            return dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return float("nan")


def _frames_of(episodes: list[list[int]], seed: int, seed0: int) -> int:
    k, i = divmod(seed - seed0, 100)
    return episodes[k][i]


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
    parser.add_argument("--hosts", type=int, help="the farm part only: N simulated hosts x 2 workers")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dubflow-bench-"))
    if args.hosts:
        if args.hosts < 2:
            parser.error("--hosts needs at least 2 (one is killed midway)")
        with Server(root) as server:
            os.environ.update(
                clean_env() | {"PREFECT_API_URL": server.url, "PREFECT_HOME": str(root / "home")}
            )
            os.environ.update(
                fake_env(root, DUBFLOW_FAKE_WRITE="0", DUBFLOW_FAKE_RENDERS=str(root / "renders.txt"))
            )
            title = f"farm: {args.hosts} hosts x {PER_HOST} workers, TLS vs plain TCP, one host killed"
            _report(title, bench_hosts(root, args.hosts))
        return
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
