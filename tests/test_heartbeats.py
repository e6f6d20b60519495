"""flows.heartbeats: flow runs still send heartbeats, but their end does not wait on the heartbeat thread."""

from __future__ import annotations

import threading
import time

from prefect import flow_engine

from flows import heartbeats


class FakeEngine:
    """What prefect.flow_engine._send_heartbeats reads from a flow run engine."""

    heartbeat_seconds = 30
    flow_run = None

    def __init__(self):
        self.beats: list[float] = []
        self.beat = threading.Event()
        self.logger = __import__("logging").getLogger("test-heartbeats")

    def _build_heartbeat_event_template(self):
        return {}, []

    def _emit_flow_run_heartbeat(self, resource, related):
        self.beats.append(time.monotonic())
        self.beat.set()


def test_installed_on_import_of_the_flows():
    import flows.episode  # noqa: F401 - importing the flow installs it

    assert heartbeats.install() is True
    assert flow_engine._send_heartbeats is heartbeats._send_heartbeats_without_join


def test_heartbeat_sent_then_stopped_without_a_join():
    engine = FakeEngine()
    before = set(threading.enumerate())
    with heartbeats._send_heartbeats_without_join(engine):
        assert engine.beat.wait(10), "the run sent no heartbeat"
        (thread,) = set(threading.enumerate()) - before
    thread.join(10)  # the thread sees the stop flag on its own, at its next one-second step
    assert not thread.is_alive()
    assert len(engine.beats) == 1  # nothing emitted after the run ended
