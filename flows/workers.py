"""Render workers: one long-lived process per GPU that keeps its model loaded, behind a Dask scheduler.

`dubflow workers start` launches a local Dask scheduler and one single-threaded worker per
GPU (or `--cpu N` CPU workers), each with a `GPU=1` resource, pinned to its slot and with
the engine preloaded (engine/gpu_state.py). Episode flows then submit their segments to
that scheduler through prefect-dask, largest first; segments of every running episode
share the same queue. Without a scheduler the renders run in the flow's own thread pool.

Where the scheduler is: $DUBFLOW_SCHEDULER (e.g. tls://gpu-head:8786, for a cluster on
other hosts), else the address recorded by `dubflow workers start` in the workspace. A cluster on
the network speaks TLS with mutual certificates (flows/certs.py): $DUBFLOW_TLS_DIR, or the folder
`workers start --tls` recorded, holds this host's certificate; a scheduler never listens beyond
loopback without them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flows.certs import CertsError, role_files
from flows.cluster import ClusterState, count_gpus, read_state, security, state_file, tls_dir
from tasks.lease import host_name, process_alive

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class WorkersError(RuntimeError):
    """The render workers cannot be started, reached or stopped; the message says what to do."""


# ---------------------------------------------------------------------------------------------- which runner


def scheduler_address(workspace: str | Path | None = None) -> str | None:
    if os.environ.get("DUBFLOW_SCHEDULER"):
        return os.environ["DUBFLOW_SCHEDULER"]
    state = read_state(workspace)
    return state.address if state else None


def render_task_runner(workspace: str | Path | None = None):
    """A DaskTaskRunner on the running scheduler, or None (renders stay in the flow's thread pool)."""
    address = scheduler_address(workspace)
    if address is None:
        return None
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError as exc:
        raise WorkersError(f"render workers at {address} need prefect-dask: pip install -e '.[ops]'") from exc
    return DaskTaskRunner(address=address, client_kwargs=_client_kwargs(address, workspace))


def _client_kwargs(address: str, workspace: str | Path | None) -> dict[str, Any]:
    """The client's certificate for a tls:// scheduler; a clear error when this host has none."""
    if not address.startswith("tls://"):
        return {}
    folder = tls_dir(workspace)
    if folder is None:
        raise WorkersError(
            f"the scheduler at {address} requires TLS: set DUBFLOW_TLS_DIR to the folder with ca.pem, "
            "client.pem and client.key (from `dubflow workers certs DIR`)"
        )
    try:
        return {"security": security(folder, "client")}
    except CertsError as exc:
        raise WorkersError(str(exc)) from None


def episode_flow(workspace: str | Path | None = None):
    """dub_episode, sending its segment renders to the render workers when a scheduler is running."""
    from flows.episode import dub_episode

    runner = render_task_runner(workspace)
    return dub_episode if runner is None else dub_episode.with_options(task_runner=runner)


# ---------------------------------------------------------------------------------------------- start, stop, status


def start_workers(
    workspace: str | Path | None = None,
    *,
    cpu_workers: int | None = None,
    engine: str = "preview",
    port: int = 8786,
    host: str = "127.0.0.1",
    tls: str | Path | None = None,
    timeout_s: float = 60.0,
) -> ClusterState:
    """Scheduler + one worker per GPU (or `cpu_workers` CPU workers), detached; recorded in the workspace.

    The scheduler listens on `host` (loopback unless asked); beyond loopback only with `tls`, the folder of
    `dubflow workers certs`, so that only holders of a certificate from that CA can connect."""
    if host not in LOOPBACK and tls is None:
        raise WorkersError(
            f"a scheduler listening on {host} would run code for anyone who reaches it: make certificates "
            "with `dubflow workers certs DIR` and start with --tls DIR"
        )
    tls = _checked_tls(tls)
    if read_state(workspace):
        raise WorkersError(f"render workers are already running ({state_file(workspace)}); stop them first")
    gpus = 0 if cpu_workers else count_gpus()
    n = cpu_workers or gpus
    if n <= 0:
        raise WorkersError("no GPU found; start CPU workers with `dubflow workers start --cpu N`")
    path = state_file(workspace)
    path.parent.mkdir(parents=True, exist_ok=True)
    log = path.with_suffix(".log")
    local = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host  # noqa: S104 - how this host reaches it
    address = f"{'tls' if tls else 'tcp'}://{local}:{port}"
    env = _worker_env(engine, n, "gpu" if gpus else "cpu", path.parent)
    with open(log, "ab") as out:
        scheduler = _spawn(
            [
                "scheduler",
                "--host",
                host,
                "--port",
                str(port),
                "--no-dashboard",
                *_tls_args(tls, "scheduler"),
            ],
            env,
            out,
        )
        worker = _spawn(_worker_args(address, n, tls), env, out)
    state = ClusterState(address, scheduler.pid, worker.pid, n, engine, gpus, str(log), tls)
    try:
        _wait_for_workers(address, n, timeout_s, tls)
    except WorkersError:
        _terminate(state)
        raise
    path.write_text(json.dumps(asdict(state), indent=2))
    return state


def join_workers(
    address: str, *, cpu_workers: int | None = None, engine: str = "preview", tls: str | Path | None = None
) -> int:
    """Render workers on this host for the scheduler at `address` (another host); runs until stopped.

    The worker processes' own exit status is returned (a service manager restarts them)."""
    if address.startswith("tls://") and tls is None:
        raise WorkersError(
            f"the scheduler at {address} requires TLS: give --tls DIR (ca.pem, worker.pem, worker.key)"
        )
    if tls is None and not address.startswith(("tcp://127.0.0.1", "tcp://localhost")):
        raise WorkersError(
            f"joining {address} without TLS would let anyone on the network run code here: "
            "start the scheduler with --tls and join with --tls DIR"
        )
    tls = _checked_tls(tls, "worker")
    gpus = 0 if cpu_workers else count_gpus()
    n = cpu_workers or gpus
    if n <= 0:
        raise WorkersError("no GPU found; join with CPU workers: `dubflow workers join ADDRESS --cpu N`")
    lock_dir = Path(
        os.environ.get("DUBFLOW_GPU_LOCK_DIR") or Path.home() / ".cache" / "dubflow" / "gpu-locks"
    )
    env = _worker_env(engine, n, "gpu" if gpus else "cpu", lock_dir.parent) | {
        "DUBFLOW_GPU_LOCK_DIR": str(lock_dir)  # per host: slots are this host's GPUs, never the shared store
    }
    # named after the host: two hosts' workers must not share a name (the scheduler refuses the second)
    args = [sys.executable, "-m", "dask", *_worker_args(address, n, tls, name=host_name())]
    return subprocess.call(args, env=env, cwd=REPO)


def stop_workers(workspace: str | Path | None = None) -> ClusterState:
    state = read_state(workspace)
    state_file(workspace).unlink(missing_ok=True)
    if state is None:
        raise WorkersError("no render workers are running for this workspace")
    _terminate(state)
    return state


def workers_status(workspace: str | Path | None = None) -> dict[str, Any]:
    """The scheduler's view: each worker with its GPU slot, loaded engines and what it is rendering."""
    address = scheduler_address(workspace)
    if address is None:
        raise WorkersError("no render workers are running; start them with `dubflow workers start`")
    from distributed import Client

    from engine import gpu_state

    kwargs = _client_kwargs(address, workspace)
    try:
        with Client(address, timeout=10, **kwargs) as client:
            info = client.scheduler_info(n_workers=-1)["workers"]
            labels = client.run(gpu_state.worker_label)
            engines = client.run(gpu_state.loaded_engines)
            processing = client.processing()
    except OSError as exc:
        raise WorkersError(f"cannot reach the scheduler at {address}: {exc}") from None
    workers = [
        {
            "address": addr,
            "name": str(w.get("name")),
            "slot": labels.get(addr, "?"),
            "engines": engines.get(addr, []),
            "rendering": len(processing.get(addr, ())),
            "resources": w.get("resources", {}),
        }
        for addr, w in sorted(info.items())
    ]
    return {"address": address, "workers": workers}


def _worker_env(engine: str, slots: int, kind: str, workspace: Path) -> dict[str, str]:
    env = dict(os.environ)
    # the checkout first, so workers run exactly this code (task source is part of every cache key)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env["DUBFLOW_WORKER_ENGINE"] = engine
    env["DUBFLOW_WORKER_GPUS"] = str(slots)  # each worker claims one slot (its GPU) with a file lock
    env["DUBFLOW_WORKER_KIND"] = kind
    env.setdefault("DUBFLOW_GPU_LOCK_DIR", str(workspace / "gpu-locks"))
    env.pop("CUDA_VISIBLE_DEVICES", None)  # each worker pins its own slot (gpu_state.claim_gpu)
    return env


def _checked_tls(tls: str | Path | None, *roles: str) -> str | None:
    """The certificates folder as an absolute path, every file the roles need present (None: plain TCP)."""
    if tls is None:
        return None
    folder = Path(tls).resolve()
    try:
        for role in roles or ("scheduler", "worker", "client"):
            role_files(folder, role)
    except CertsError as exc:
        raise WorkersError(str(exc)) from None
    return str(folder)


def _tls_args(tls: str | None, role: str) -> list[str]:
    if tls is None:
        return []
    ca, cert, key = role_files(tls, role)
    return ["--tls-ca-file", str(ca), "--tls-cert", str(cert), "--tls-key", str(key)]


def _worker_args(address: str, n: int, tls: str | None = None, name: str = "render") -> list[str]:
    return [
        "worker",
        address,
        "--nworkers",
        str(n),
        "--nthreads",
        "1",
        "--resources",
        "GPU=1",
        "--preload",
        "engine.gpu_state",
        "--name",
        name,
        "--no-dashboard",
        *_tls_args(tls, "worker"),
    ]


def _spawn(args: list[str], env: dict[str, str], out) -> subprocess.Popen:
    dask = [sys.executable, "-m", "dask"]
    return subprocess.Popen(
        [*dask, *args], env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO
    )


def _wait_for_workers(address: str, n: int, timeout_s: float, tls: str | None = None) -> None:
    from distributed import Client

    kwargs = {"security": security(tls, "client")} if tls else {}
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with Client(address, timeout=5, **kwargs) as client:
                client.wait_for_workers(n, timeout=max(1.0, deadline - time.monotonic()))
                return
        except (OSError, TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise WorkersError(f"{n} render worker(s) did not come up at {address}: {exc}") from None
            time.sleep(0.5)


def _terminate(state: ClusterState) -> None:
    """SIGTERM the worker's and the scheduler's own process groups (we started them with new sessions)."""
    for pid in (state.worker_pid, state.scheduler_pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(
        process_alive(p) for p in (state.worker_pid, state.scheduler_pid)
    ):
        time.sleep(0.2)
    for pid in (state.worker_pid, state.scheduler_pid):
        if process_alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
