"""Where a segment render runs: a GPU slot on a render worker (flows/workers.py) when the flow runs on Dask,
else the flow's own threads; and which worker ran it, for the segment table.

Kept apart from flows/workers.py, which starts episode flows (flows.episode) and so must not be imported by them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def render_slot(frames: int) -> Iterator[None]:
    """Submissions inside take one GPU of a worker and queue largest first (a no-op without Dask)."""
    if not _on_dask():
        yield
        return
    import dask

    with dask.annotate(resources={"GPU": 1}, priority=int(frames)):
        yield


def worker_of(future: Any) -> str:
    """Which render worker ran a submitted segment ('flow' when it ran in the flow's own threads)."""
    wrapped = getattr(future, "wrapped_future", None)
    if wrapped is None or not hasattr(wrapped, "client"):
        return "flow"
    try:
        holders = wrapped.client.who_has([wrapped]).get(wrapped.key, ())
        workers = wrapped.client.scheduler_info(n_workers=-1)["workers"]
    except Exception:  # noqa: BLE001 - a label for a table; never worth failing a render over
        return "?"
    return ",".join(str(workers.get(h, {}).get("name", h)) for h in holders) or "?"


def _on_dask() -> bool:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return ctx is not None and type(ctx.task_runner).__name__ == "DaskTaskRunner"
