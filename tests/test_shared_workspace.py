"""A workspace on shared storage, used by several hosts at once: processes started with another $DUBFLOW_HOST
act as other hosts (their pids mean nothing here, so only the lease's renewals tell whether they live)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.lease import LeaseBusy, hold_lease
from tasks.workspace import EpisodeBusy, Workspace, file_sha256

REPO = Path(__file__).resolve().parent.parent

HOLD = """
import sys, time
from tasks.workspace import Workspace
with Workspace(sys.argv[1]).lock("ep1"):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _as_host(host: str, code: str, *args: str, lease_s: float = 1.0) -> subprocess.Popen:
    env = os.environ | {"DUBFLOW_HOST": host, "DUBFLOW_LOCK_LEASE_S": str(lease_s), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE, text=True)


def _wait_line(proc: subprocess.Popen, line: str) -> None:
    assert proc.stdout.readline().strip() == line, proc.poll()


def test_a_lease_held_on_another_host_is_renewed_and_ends_when_that_host_dies(tmp_path, monkeypatch):
    monkeypatch.setenv("DUBFLOW_HOST", "host-a")
    monkeypatch.setenv("DUBFLOW_LOCK_LEASE_S", "1")
    holder = _as_host("host-b", HOLD, str(tmp_path), "60")
    try:
        _wait_line(holder, "held")
        ws = Workspace(tmp_path)
        time.sleep(2.5)  # over two leases: only the renewals keep it held
        with (
            pytest.raises(EpisodeBusy, match=rf"being run by pid {holder.pid} on host-b;.*expires 1 s after"),
            ws.lock("ep1", wait_s=0.5),
        ):
            pass
        holder.send_signal(signal.SIGKILL)  # the host dies: no release, no more renewals
        holder.wait(10)
        started = time.monotonic()
        with ws.lock("ep1", wait_s=10):
            waited = time.monotonic() - started
        assert waited < 5  # the lease ran out about a second after the last renewal
    finally:
        holder.kill()
        holder.wait(10)


def test_a_dead_holder_on_this_host_frees_the_lease_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("DUBFLOW_HOST", "host-a")
    holder = _as_host("host-a", HOLD, str(tmp_path), "60", lease_s=60)
    _wait_line(holder, "held")
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    started = time.monotonic()
    with Workspace(tmp_path).lock("ep1"):  # no wait: the pid is gone, the lease with it
        assert time.monotonic() - started < 1


COUNT = """
import sys, time
from pathlib import Path
from tasks.lease import hold_lease
counter = Path(sys.argv[1]) / "counter"
for _ in range(int(sys.argv[2])):
    with hold_lease(Path(sys.argv[1]) / "lease", wait_s=60):
        n = int(counter.read_text() or 0) if counter.exists() else 0
        time.sleep(0.002)  # a lost update whenever two hold it at once
        counter.write_text(str(n + 1))
"""


def test_holders_on_three_hosts_never_overlap(tmp_path):
    procs = [_as_host(f"host-{i}", COUNT, str(tmp_path), "40", lease_s=5) for i in range(3)]
    for p in procs:
        assert p.wait(120) == 0
    assert (tmp_path / "counter").read_text() == "120"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter"]  # no lease, probe or expired file left


def test_an_expired_lease_is_broken_by_one_waiter_and_a_renewed_one_is_not(tmp_path, monkeypatch):
    monkeypatch.setenv("DUBFLOW_HOST", "host-a")
    lease = tmp_path / "lease"
    lease.write_text('{"host": "host-z", "pid": 1, "token": "old"}')
    os.utime(lease, (time.time() - 120, time.time() - 120))  # last renewed two minutes ago
    with hold_lease(lease, lease_s=30) as mine:
        assert mine["host"] == "host-a"
        with pytest.raises(LeaseBusy, match="on host-a"), hold_lease(lease, lease_s=30):
            pass
    lease.write_text('{"host": "host-z", "pid": 1, "token": "live"}')  # renewed just now
    with pytest.raises(LeaseBusy, match="pid 1 on host-z"), hold_lease(lease, wait_s=0.3, lease_s=30):
        pass
    assert "live" in lease.read_text()


PUBLISH = """
import sys
from pathlib import Path
from tasks.workspace import Workspace
ws = Workspace(sys.argv[1])
src = Path(sys.argv[1]) / f"src-{sys.argv[2]}"
for i in range(30):
    data = bytes([i]) * (256 * 1024)  # the same 30 blobs from every host
    src.write_bytes(data)
    blob = ws.put_file(src, ".bin")
    print(blob.sha256, flush=True)
"""


def test_blobs_published_by_two_hosts_at_once_are_whole_and_seen_by_both(tmp_path):
    """Both hosts store the same contents at the same time; every blob either host published is whole, under
    its hash, with no temp file left; what host B published, host A's workspace has."""
    procs = [_as_host(h, PUBLISH, str(tmp_path), h) for h in ("host-a", "host-b")]
    published = [p.communicate(timeout=120)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert published[0] == published[1] and len(set(published[0])) == 30
    ws = Workspace(tmp_path)
    for sha in published[1]:
        (path,) = (tmp_path / "store" / sha[:2]).glob(f"{sha}.bin")
        assert file_sha256(path) == sha and path.stat().st_size == 256 * 1024
    assert not list((tmp_path / "store").rglob("*.tmp"))
    assert len(list((tmp_path / "store").rglob("*.bin"))) == 30 and ws.root == tmp_path.resolve()
