"""The Prefect API going away in the middle of a run: resume, or one clear line.

Every stage reports its state to the Prefect API; when the API stops answering (its server crashed, was
restarted or upgraded, the network dropped), the stage that was reporting fails with an httpx transport
error, and the flow fails with it. The finished stages are in the workspace's cache, so the remedy is
always the same: get an API back and run the flow again. `dubflow run` does that itself:

- the temporary server that Prefect started for this command (no PREFECT_API_URL) is restarted on its
  port, and the run resumes at once;
- an external server (PREFECT_API_URL) is waited for, with backoff, for $DUBFLOW_API_WAIT_S seconds
  (default 120: a server restart takes 7-25 s); when it answers the run resumes, otherwise the command
  ends with one line (`ApiUnreachable`) naming the API, the stage that was running and how to resume.

While the API is away Prefect's log and event workers print their failures on stderr; `quiet_api_noise`
sends those to a log file beside the episode's runs instead (`--debug` keeps them on the terminal).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path

API_WAIT_ENV, DEFAULT_WAIT_S = "DUBFLOW_API_WAIT_S", 120.0
RESUMES = 3  # at most this many resumes per command: an API that keeps dying is a problem to report


class ApiUnreachable(RuntimeError):
    """The Prefect API stopped answering during a run and did not come back; the run is resumable."""

    def __init__(self, url: str, stages: str, waited_s: float, rerun: str):
        self.url, self.stages = url, stages
        super().__init__(
            f"the Prefect API at {url} stopped answering during {stages} and was not back after "
            f"{waited_s:g} s (${API_WAIT_ENV}); finished stages are kept: start the API and run "
            f"`{rerun}` again to resume"
        )


def is_api_gone(exc: BaseException) -> bool:
    """True when `exc` (or what caused it) is a failure to talk to the Prefect API: an httpx transport
    error (refused, reset, timed out) or Prefect's own "Failed to reach API"."""
    try:
        import httpx
    except ImportError:  # pragma: no cover - prefect depends on httpx
        return False
    seen: set[int] = set()
    todo = [exc]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, httpx.TransportError):
            return True
        if isinstance(err, RuntimeError) and str(err).startswith("Failed to reach API"):
            return True
        todo += [err.__cause__, err.__context__, *getattr(err, "exceptions", ())]
    return False


def configured_url() -> str | None:
    """PREFECT_API_URL as Prefect sees it; None in ephemeral mode."""
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def _ephemeral_servers() -> list:
    from prefect.server.api.server import SubprocessASGIServer

    return [s for s in list(SubprocessASGIServer._instances.values()) if s.port is not None]


def current_url() -> str:
    """The API this process talks to: the configured one, else the temporary server's."""
    url = configured_url()
    if url:
        return url
    servers = _ephemeral_servers()
    return servers[0].api_url if servers else "(Prefect's temporary server)"


def healthy(url: str, timeout_s: float = 3.0) -> bool:
    import httpx

    try:
        return httpx.get(f"{url.rstrip('/')}/health", timeout=timeout_s).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(url: str, budget_s: float, *, first_s: float = 1.0, most_s: float = 15.0) -> bool:
    """Poll the API's health with doubling pauses (first_s, 2*first_s, ... at most most_s) for budget_s."""
    deadline, pause = time.monotonic() + budget_s, first_s
    while True:
        if healthy(url):
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(pause, left))
        pause = min(2 * pause, most_s)


def restart_ephemeral() -> str | None:
    """Start Prefect's temporary server again on the port it had (the log and event workers keep their
    clients, which then reconnect); its URL, or None when this process has no temporary server."""
    from prefect.server.api.server import SubprocessASGIServer

    servers = _ephemeral_servers()
    if not servers:
        return None
    port = servers[0].port
    for server in servers:
        server.stop()  # reaps a dead process, or ends one that stopped answering
    server = SubprocessASGIServer()
    server.port = port  # another port is taken if that one is busy now (start() handles exit code 3)
    server.start()
    return server.api_url


def wait_budget() -> float:
    try:
        return max(0.0, float(os.environ.get(API_WAIT_ENV, DEFAULT_WAIT_S)))
    except ValueError:
        return DEFAULT_WAIT_S


def recover(note) -> tuple[bool, str, float]:
    """After a run failed because the API went away: (back?, the API's URL, seconds waited). The temporary
    server is restarted; an external one is waited for. `note(text)` tells the user what is happening."""
    started = time.monotonic()
    if configured_url() is None:
        old = current_url()
        note(f"Prefect's temporary API server at {old} stopped answering; restarting it")
        try:
            url = restart_ephemeral()
        except Exception:  # noqa: BLE001 - it could not start: report the API as gone
            url = None
        return url is not None and healthy(url), url or old, time.monotonic() - started
    url, budget = configured_url(), wait_budget()
    note(f"the Prefect API at {url} stopped answering; waiting up to {budget:g} s for it (${API_WAIT_ENV})")
    back = wait_for(url, budget)
    return back, url, time.monotonic() - started


class StageTracker:
    """A progress listener (flows/progress.py): the stages begun and not finished, to name in an error."""

    def __init__(self) -> None:
        self.open: list[str] = []
        self.last: str | None = None

    def __call__(self, event: str, episode: str, **info) -> None:
        name = info.get("name")
        if event == "begin" and name not in self.open:
            self.open.append(name)
        elif event == "step":
            self.last = name
            if info.get("state") != "failed" and name in self.open:
                self.open.remove(name)

    def describe(self) -> str:
        if self.open:
            return "stage " + ", ".join(self.open)
        return f"the run, after stage {self.last}" if self.last else "the start of the run"


# ---------------------------------------------------------------------------------------------- noise


class _StderrTo:
    """The `sys` module as Prefect's log handler module sees it, with stderr going to a file."""

    def __init__(self, stream) -> None:
        self.stderr = stream

    def __getattr__(self, name: str):
        return getattr(sys, name)


def quiet_api_noise(log_file: Path) -> None:
    """Prefect's "--- Error logging to API ---" lines and its internal services' errors (the events worker)
    go to `log_file` instead of the terminal. Idempotent; the file is opened when first written."""
    import prefect.main  # noqa: F401 - Prefect configures its logging on import: after that, not before
    from prefect.logging import handlers
    from prefect.logging.configuration import ensure_logging_setup

    ensure_logging_setup()
    stream = _LazyFile(log_file)
    handlers.sys = _StderrTo(stream)  # type: ignore[assignment]  (the module reads sys.stderr when it fails)
    internal = logging.getLogger("prefect._internal")
    for handler in list(internal.handlers):  # Prefect's "debug" handler: stderr
        if isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) is not stream:
            internal.removeHandler(handler)
    if not any(isinstance(h, logging.StreamHandler) and h.stream is stream for h in internal.handlers):
        file_handler = logging.StreamHandler(stream)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s - %(message)s"))
        internal.addHandler(file_handler)
    events = logging.getLogger("prefect.events.clients")  # "Unable to connect to ws://..." warnings
    events.propagate = False
    if not any(getattr(h, "stream", None) is stream for h in events.handlers):
        events.addHandler(logging.StreamHandler(stream))


class _LazyFile:
    """A text stream that creates its file on the first write (most runs never write to it)."""

    def __init__(self, path: Path) -> None:
        self.path, self._fh = path, None

    def write(self, text: str) -> int:
        if self._fh is None:
            with contextlib.suppress(OSError):
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fh = open(self.path, "a")  # noqa: SIM115 - lives as long as the process
        if self._fh is None:
            return len(text)
        from tasks.secrets import redact

        n = self._fh.write(redact(text))
        self._fh.flush()
        return n

    def flush(self) -> None:
        if self._fh is not None:
            self._fh.flush()

    def isatty(self) -> bool:
        return False
