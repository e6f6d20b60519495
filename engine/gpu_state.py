"""Per-process render state: which GPU this worker owns and the renderers it keeps resident.

A render worker (a Dask worker, a process-pool worker, or the flow process itself) loads
each engine once and keeps it for every segment, episode and flow run it serves. Plain
module state, no Prefect: tasks read it through this module (pickled by reference), so a
worker's loaded model is visible to every task that lands on it (PREFECT.md 7A, trap 1).

Environment:
  DUBFLOW_WORKER_ENGINE     engine to load eagerly when a Dask worker starts (the preload)
  DUBFLOW_WORKER_GPUS       GPU slots on this host; each worker claims one with a file lock
  DUBFLOW_WORKER_KIND       "gpu", or "cpu" for CPU workers that take slots the same way
  DUBFLOW_GPU_LOCK_DIR      where the slot locks live (default: the system temp dir)
  DUBFLOW_ENGINE_OVERRIDES  "name=module:attr,..." builds another factory in place of an engine
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from engine.base import Renderer, create_renderer

_lock = threading.Lock()
_renderers: dict[str, Renderer] = {}
_in_use: dict[str, threading.Lock] = {}  # one job at a time per resident renderer (see `using_renderer`)
_gpu: str | None = None
_gpu_handle: IO[str] | None = None  # held open for the life of the process: the slot is ours


def engine_override(name: str, spec: str | None = None) -> str | None:
    """The "module:attr" that DUBFLOW_ENGINE_OVERRIDES puts in place of engine `name` (tests, benches)."""
    spec = os.environ.get("DUBFLOW_ENGINE_OVERRIDES", "") if spec is None else spec
    for item in filter(None, (part.strip() for part in spec.split(","))):
        key, _, target = item.partition("=")
        if ":" not in target:
            raise ValueError(f"DUBFLOW_ENGINE_OVERRIDES: {item!r} is not name=module:attr")
        if key.strip() == name:
            return target.strip()
    return None


def resident_renderer(name: str, settings: tuple[tuple[str, Any], ...] = ()) -> Renderer:
    """The engine `name` built with `settings` (keyword, value pairs: the manifest's engine switches), once per
    process and kept loaded. Other settings for the same engine replace it (one model per GPU)."""
    target = engine_override(name)
    base = f"{name}={target or ''}"
    key = base + (f"|{settings!r}" if settings else "")
    with _lock:
        if key not in _renderers:
            for stale in [k for k in _renderers if k.split("|")[0] == base]:
                del _renderers[stale]
            _renderers[key] = _build(name, target, dict(settings))
        return _renderers[key]


@contextlib.contextmanager
def using_renderer(name: str, settings: tuple[tuple[str, Any], ...] = ()) -> Iterator[Renderer]:
    """The resident engine `name`, held by this thread for one job.

    The flow's own task runner renders segments on threads, and a resident model is one object: two jobs
    at once would share its per-call state (the Wan VAE keeps its causal-conv cache on the module, so two
    encodes interleave into one latent of the wrong length) and its first lazy load. One loaded model
    serves one job at a time, as one GPU does; other engines' jobs still run side by side.
    """
    renderer = resident_renderer(name, settings)
    key = f"{name}={engine_override(name) or ''}"
    with _lock:
        busy = _in_use.setdefault(key, threading.Lock())
    with busy:
        yield renderer


def _build(name: str, target: str | None, settings: dict[str, Any] | None = None) -> Renderer:
    if target is None:
        return create_renderer(name, **(settings or {}))
    module_name, attr = target.split(":")
    return getattr(importlib.import_module(module_name), attr)(**(settings or {}))


def loaded_engines() -> list[str]:
    with _lock:
        return sorted(_renderers)


def worker_label() -> str:
    """Who renders here: `host/gpuN` on a claimed slot, else `host/pid`."""
    host = socket.gethostname().split(".")[0]
    kind = os.environ.get("DUBFLOW_WORKER_KIND", "gpu")
    return f"{host}/{kind}{_gpu}" if _gpu is not None else f"{host}/pid{os.getpid()}"


def claim_gpu(n_gpus: int, lock_dir: Path | None = None, timeout_s: float = 60.0) -> str:
    """Take the first free of `n_gpus` slots with a non-blocking flock; pin CUDA to it before any CUDA init."""
    global _gpu, _gpu_handle
    if _gpu is not None:
        return _gpu
    lock_dir = Path(lock_dir or os.environ.get("DUBFLOW_GPU_LOCK_DIR") or tempfile.gettempdir())
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    while True:
        for i in range(n_gpus):
            handle = open(lock_dir / f"dubflow-gpu{i}.lock", "a+")  # noqa: SIM115 - kept open on purpose
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            _gpu, _gpu_handle = str(i), handle
            os.environ["CUDA_VISIBLE_DEVICES"] = _gpu
            return _gpu
        if time.monotonic() > deadline:
            raise RuntimeError(f"all {n_gpus} GPU slots in {lock_dir} are taken by other workers")
        time.sleep(0.2)


def dask_setup(worker: Any = None) -> None:
    """Dask preload (`dask worker --preload engine.gpu_state`): claim a GPU slot, load the engine eagerly."""
    n_gpus = int(os.environ.get("DUBFLOW_WORKER_GPUS", "0") or 0)
    if n_gpus > 0:
        claim_gpu(n_gpus)
    engine = os.environ.get("DUBFLOW_WORKER_ENGINE", "")
    if engine:
        resident_renderer(engine)
