"""The temporary Prefect API server a `dubflow` command starts dies with that command.

Prefect 3.8 starts its ephemeral server (uvicorn) as a plain child process and stops it from an
`atexit` hook; a CLI killed with -9 runs no hook, and the server lived on as an orphan holding its
port and SQLite file. On Linux the child now asks the kernel for SIGTERM when its parent dies
(prctl PR_SET_PDEATHSIG), set between fork and exec. The kernel sends it when the *thread* that
started the child ends, so the request is made only for a server started from the main thread, which
lives as long as the command. Elsewhere (no prctl) nothing changes.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading

PR_SET_PDEATHSIG = 1
_prctl = None
if sys.platform.startswith("linux"):
    try:
        _prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved now: nothing to load after fork
    except (OSError, AttributeError):
        _prctl = None


def _die_with(parent: int):
    def preexec() -> None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)  # type: ignore[misc]  (checked by the caller)
        if os.getppid() != parent:  # the parent died before the request: nobody will stop this server
            os._exit(1)

    return preexec


class _SubprocessDyingWithParent:
    """The `subprocess` module as Prefect's server module sees it: Popen asks for the parent-death signal."""

    def __getattr__(self, name: str):
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args, **kwargs):  # noqa: N802 - stands in for subprocess.Popen
        if _prctl is not None and threading.current_thread() is threading.main_thread():
            kwargs.setdefault("preexec_fn", _die_with(os.getpid()))
        return subprocess.Popen(*args, **kwargs)


def install() -> bool:
    """Idempotent; False (and nothing changed) where the platform or this Prefect offers no hook."""
    try:
        from prefect.server.api import server
    except ImportError:
        return False
    if _prctl is None or not hasattr(server, "SubprocessASGIServer") or server.subprocess is not subprocess:
        return isinstance(getattr(server, "subprocess", None), _SubprocessDyingWithParent)
    server.subprocess = _SubprocessDyingWithParent()
    return True
