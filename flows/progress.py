"""Progress of an episode run: a Prefect progress artifact, and any local listener (the CLI's bar).

Flows report through `EpisodeProgress`; tasks never import a display. Listeners are plain
callables `listener(event, **info)`, registered by whoever runs the flow in-process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from tasks.workspace import artifact_key

Listener = Callable[..., None]
ARTIFACT_INTERVAL_S = (
    0.5  # each update is an API call: a cached re-run would spend more time reporting than working
)
_listeners: list[Listener] = []
_lock = threading.Lock()


def add_listener(listener: Listener) -> None:
    with _lock:
        _listeners.append(listener)


def remove_listener(listener: Listener) -> None:
    with _lock:
        if listener in _listeners:
            _listeners.remove(listener)


class EpisodeProgress:
    def __init__(self, episode: str, total_steps: int):
        self.episode, self.total, self.done = episode, max(total_steps, 1), 0
        self._artifact = None
        self._last_update = 0.0
        self._lock = threading.Lock()
        try:
            from prefect.artifacts import create_progress_artifact

            self._artifact = create_progress_artifact(
                progress=0.0,
                key=artifact_key(episode, "progress"),
                description=f"{episode}: stages and segments done",
            )
        except Exception:  # noqa: BLE001 - outside a flow run there is no artifact, only listeners
            self._artifact = None
        self._emit("start", total=self.total)

    def add_steps(self, n: int) -> None:
        with self._lock:
            self.total += n
        self._emit("total", total=self.total)

    def begin(self, name: str) -> None:
        """A stage starts (listeners learn what was running when a run fails)."""
        self._emit("begin", name=name)

    def step(self, name: str, state: str) -> None:
        with self._lock:
            self.done += 1
            fraction = min(self.done / self.total, 1.0)
        self._emit("step", name=name, state=state, done=self.done, total=self.total)
        self._update_artifact(fraction)  # an API call (it fails when the API is gone): after the listeners

    def finish(self) -> None:
        self._update_artifact(1.0, force=True)

    def _update_artifact(self, fraction: float, force: bool = False) -> None:
        now = time.monotonic()
        if self._artifact is None or (not force and now - self._last_update < ARTIFACT_INTERVAL_S):
            return
        from prefect.artifacts import update_progress_artifact

        self._last_update = now
        update_progress_artifact(artifact_id=self._artifact, progress=round(100 * fraction, 1))

    def _emit(self, event: str, **info) -> None:
        with _lock:
            listeners = list(_listeners)
        for listener in listeners:
            listener(event, episode=self.episode, **info)
