"""Flow runs end without waiting on Prefect's heartbeat thread.

Prefect 3.8 sends a heartbeat every 180 s from a thread that sleeps in one-second steps, and the
synchronous flow engine joins that thread when the run ends: every flow run (and every episode subflow
of a batch) paid up to a second of idle wait, the whole cost of an unchanged re-run (bench/cache.py).
The asynchronous engine already leaves the thread to stop on its own (`join_on_exit=False`); the loop
checks the stop flag before it emits again, so no heartbeat follows the run's final state. Heartbeats,
and with them the server's detection of crashed runs, are unchanged.
"""

from __future__ import annotations

import inspect

from prefect import flow_engine

_original = getattr(flow_engine, "_send_heartbeats", None)


def _send_heartbeats_without_join(engine, join_on_exit: bool = True):
    return _original(engine, join_on_exit=False)


def install() -> bool:
    """Idempotent; False (and nothing changed) when this Prefect has no such hook."""
    if _original is None or "join_on_exit" not in inspect.signature(_original).parameters:
        return False
    flow_engine._send_heartbeats = _send_heartbeats_without_join
    return True
