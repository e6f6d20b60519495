"""A resident renderer is one loaded model: the flow's threads take turns on it, one job at a time."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

from engine import gpu_state


class _Recorder:
    """Counts how many jobs are inside `render` at once (a model with per-call state must see one)."""

    name = "recorder"

    def __init__(self):
        self.inside, self.most, self.guard = 0, 0, threading.Lock()

    def render(self, job, *, progress=None):
        with self.guard:
            self.inside += 1
            self.most = max(self.most, self.inside)
        time.sleep(0.05)
        with self.guard:
            self.inside -= 1


def _recorder():
    return _Recorder()


def test_threads_take_turns_on_one_resident_renderer(monkeypatch):
    monkeypatch.setenv("DUBFLOW_ENGINE_OVERRIDES", "recorded=tests.test_resident_renderer:_recorder")

    def render(_):
        with gpu_state.using_renderer("recorded") as renderer:
            renderer.render(None)
            return renderer

    with ThreadPoolExecutor(4) as pool:
        renderers = set(pool.map(render, range(8)))
    assert len(renderers) == 1  # built once, kept
    assert renderers.pop().most == 1
