"""A lock that holds across hosts on shared storage (NFS, SMB, a cluster file system): a lease file.

`flock` is not enough there: NFS may not carry it at all, or drop it when a client loses the server. A lease
file is created with O_EXCL (atomic on NFSv3+ and every local file system) and its holder renews it by
touching it every third of the lease. Whether a lease has expired is judged on the storage's own clock: a
waiter touches a probe file beside it and compares the two modification times, so hosts whose clocks differ
still agree. A lease also ends at once when its holder ran on this host and that process is gone.

The holder's own record (host, pid, token) is in the file, so a waiter can say who holds it, and a holder
releases only a lease that is still its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from engine.media import host_name

DEFAULT_LEASE_S = 30.0


class LeaseBusy(RuntimeError):
    """Another process (on this host or another) holds the lease; the message names it."""


def lease_seconds() -> float:
    return float(os.environ.get("DUBFLOW_LOCK_LEASE_S") or DEFAULT_LEASE_S)


@contextlib.contextmanager
def hold_lease(path: Path, *, wait_s: float = 0.0, lease_s: float | None = None) -> Iterator[dict]:
    """Hold the lease at `path` for the block, renewing it; waits `wait_s` for a live holder, then LeaseBusy."""
    lease_s = lease_s or lease_seconds()
    record = {"host": host_name(), "pid": os.getpid(), "token": uuid.uuid4().hex}
    deadline = time.monotonic() + wait_s
    while not _try_create(path, record):
        other = _read(path)
        if other is not None and _expired(path, other, lease_s):
            _break(path, other)
            continue
        if time.monotonic() >= deadline:
            raise LeaseBusy(holder_text(other)) from None
        time.sleep(min(0.2, lease_s / 10))
    stop = threading.Event()
    beat = threading.Thread(target=_renew, args=(path, record, lease_s / 3, stop), daemon=True, name="lease")
    beat.start()
    try:
        yield record
    finally:
        stop.set()
        beat.join()
        if (_read(path) or {}).get("token") == record["token"]:
            path.unlink(missing_ok=True)


def lease_held(path: Path, lease_s: float | None = None) -> bool:
    """Whether a live holder has the lease: its file exists and has not expired (a holder of this host whose
    process is gone, or no renewal within the lease, does not count)."""
    record = _read(path)
    if record is None:
        return False
    return not _expired(path, record, lease_s or lease_seconds())


def holder_text(record: dict | None) -> str:
    if not record:
        return "another process"
    return f"pid {record.get('pid')} on {record.get('host')}"


def _try_create(path: Path, record: dict) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(record))
        fh.flush()
        os.fsync(fh.fileno())  # other hosts read the holder as soon as they see the file
    return True


def _read(path: Path) -> dict | None:
    """The holder's record; {} for a file still being written (or not ours to parse); None when gone."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return {}


def _expired(path: Path, record: dict, lease_s: float) -> bool:
    if (
        record.get("host") == host_name()
        and isinstance(record.get("pid"), int)
        and not process_alive(record["pid"])
    ):
        return True
    try:
        age = _storage_now(path.parent) - path.stat().st_mtime
    except FileNotFoundError:
        return False  # released meanwhile: the next try creates it
    return age > lease_s


def _storage_now(folder: Path) -> float:
    """The shared storage's current time: the modification time of a file touched there just now."""
    probe = folder / f".now.{host_name()}.{os.getpid()}.{threading.get_ident()}"
    probe.touch()
    os.utime(probe, None)  # NFS: None sets the server's time
    try:
        return probe.stat().st_mtime
    finally:
        probe.unlink(missing_ok=True)


def _break(path: Path, stale: dict) -> None:
    """Remove an expired lease; of several waiters that judged it expired, one removes it, and a lease that
    was renewed or replaced in between is put back."""
    aside = path.with_name(f"{path.name}.expired.{host_name()}.{os.getpid()}.{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    if _read(aside) != stale:  # we moved a newer holder's lease: give it back
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    aside.unlink(missing_ok=True)


def _renew(path: Path, record: dict, every_s: float, stop: threading.Event) -> None:
    while not stop.wait(every_s):
        if (_read(path) or {}).get("token") != record["token"]:
            return  # expired and taken over (this host stalled longer than the lease): nothing left to renew
        with contextlib.suppress(FileNotFoundError):
            os.utime(path, None)


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host is running (a zombie is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return True
