"""Faults and kills: scratch of killed processes swept, full disks named, interrupted runs shown and resumed,
secrets masked, the temporary Prefect server dying with its command.

The fast tests drive the pieces directly; the slow one kills `dubflow run` with SIGKILL (at a random
moment and in the middle of a blob write), runs again, and checks nothing was lost, redone or left over.
bench/faults.py runs the same kills at 50+ points.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flows.cli import main
from tasks.secrets import redact
from tasks.workspace import DiskFull, Workspace, WorkspaceError
from tests.hostile_corpus import GOOD, write_media

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_SeCrEtT0kEn1234567890abcdef"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sweep_removes_the_scratch_of_dead_processes_only(tmp_path):
    ws = Workspace(tmp_path / "ws")
    host = socket.gethostname()
    dead = ws.root / "tmp" / f"pid{dead_pid()}~{host}~x1"
    live = ws.root / "tmp" / f"pid{os.getpid()}~{host}~x2"
    foreign = ws.root / "tmp" / f"pid{dead_pid()}~another-host~x3"
    legacy = ws.root / "tmp" / "tmpabc"
    for folder in (dead, live, foreign, legacy):
        folder.mkdir()
        (folder / "part.wav").write_bytes(b"half")
    (ws.root / "store" / "ab").mkdir()
    blob_tmp = ws.root / "store" / "ab" / f".ab12.mp4.pid{dead_pid()}~{host}~77.tmp"
    blob_tmp.write_bytes(b"half a blob")
    out_tmp = ws.episode_dir("e1") / "out" / f".e1.pid{dead_pid()}~{host}~q.tmp.mp4"
    out_tmp.parent.mkdir()
    out_tmp.write_bytes(b"half")
    removed = ws.sweep()
    assert sorted(removed) == sorted([dead, blob_tmp, out_tmp])
    assert live.exists() and foreign.exists() and legacy.exists()


def test_linking_an_output_again_leaves_no_temp_beside_it(tmp_path):
    """rename() is a no-op when both names are links to one file: an unchanged re-run left `.k.mp4.tmp`."""
    ws = Workspace(tmp_path)
    blob = ws.put_bytes(b"picture", ".mp4")
    for _ in range(2):
        assert ws.link("e1", "e1.mp4", blob).read_bytes() == b"picture"
    other = ws.put_bytes(b"another picture", ".mp4")
    assert ws.link("e1", "e1.mp4", other).read_bytes() == b"another picture"
    assert sorted(p.name for p in (ws.root / "episodes" / "e1" / "out").iterdir()) == ["e1.mp4"]


def test_scratch_folders_carry_their_process(tmp_path):
    ws = Workspace(tmp_path)
    with ws.scratch() as folder:
        assert folder.name.startswith(f"pid{os.getpid()}~")
        assert ws.sweep() == []  # alive: kept


def test_a_blob_write_past_the_file_size_limit_leaves_no_temp_and_names_the_blob(tmp_path):
    """RLIMIT_FSIZE in a child process: the copy fails with EFBIG, the temp blob is removed."""
    script = textwrap.dedent(
        f"""
        import resource, sys
        sys.path.insert(0, {str(ROOT)!r})
        from tasks.workspace import Workspace
        ws = Workspace({str(tmp_path / "ws")!r})
        big = ws.root.parent / "big.bin"
        big.write_bytes(b"x" * 300_000)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
        try:
            ws.put_file(big, move=False)
        except OSError as exc:
            print(exc.errno, exc.filename)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    code, name = done.stdout.split()
    assert int(code) == errno.EFBIG and "/store/" in name and name.endswith(".bin"), done.stderr
    left = [p.name for p in (tmp_path / "ws" / "store").rglob("*")]
    assert not [n for n in left if ".tmp" in n], left


def _store_many(root: str, seed: int) -> list[str]:
    """One process of the concurrency test: 40 blobs, half shared with the other processes."""
    import random

    ws = Workspace(root)
    rng = random.Random(seed)
    names = []
    for i in range(40):
        data = f"shared {i}".encode() * 5000 if i % 2 else rng.randbytes(20_000)
        names.append(ws.put_bytes(data, ".bin").relpath)
    return names


def test_processes_storing_at_once_never_leave_two_contents_under_one_hash(tmp_path):
    import hashlib
    from concurrent.futures import ProcessPoolExecutor

    root = str(tmp_path / "ws")
    Workspace(root)
    with ProcessPoolExecutor(4) as pool:
        stored = [n for names in pool.map(_store_many, [root] * 4, range(4)) for n in names]
    for rel in set(stored):
        path = Path(root) / rel
        assert hashlib.sha256(path.read_bytes()).hexdigest() == path.name.split(".")[0]
    assert len(set(stored)) == 4 * 20 + 20  # 20 distinct per process, 20 shared by all
    assert not list((Path(root) / "tmp").iterdir())
    assert not [p for p in Path(root).rglob("*") if ".tmp" in p.name]


def test_disk_full_names_the_stage_and_the_file():
    error = DiskFull(
        "separate[dialogue]", OSError(errno.ENOSPC, "No space left on device", "/ws/store/ab/x.wav")
    )
    assert str(error).startswith(
        "stage separate[dialogue]: No space left on device writing /ws/store/ab/x.wav;"
    )


def test_video_writers_past_the_file_size_limit_name_the_output_and_leave_no_temp(tmp_path):
    """Both mp4 writers (PyAV's timed writer, the renderers' ffmpeg pipe) on a full disk: an OSError with
    the disk-full errno naming the output (the flow turns it into DiskFull with the stage), no temp left."""
    script = textwrap.dedent(
        f"""
        import resource, sys
        from fractions import Fraction
        import numpy as np
        sys.path.insert(0, {str(ROOT)!r})
        from engine.media import ffmpeg_exe, write_timed_video
        from engine.video import Mp4Writer
        out = __import__("pathlib").Path({str(tmp_path)!r})
        rng = np.random.default_rng(0)
        frames = [rng.integers(0, 255, (128, 128, 3), dtype=np.uint8) for _ in range(25)]
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
        try:
            write_timed_video(out / "timed.mp4", enumerate(frames), Fraction(1, 25))
        except OSError as exc:
            print(exc.errno, exc.filename)
        try:
            with Mp4Writer(out / "piped.mp4", ffmpeg_exe(), preset="ultrafast") as writer:
                for frame in frames:
                    writer.write(frame)
        except OSError as exc:
            print(exc.errno, exc.filename)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    lines = [line.split() for line in done.stdout.splitlines()]
    assert len(lines) == 2, done.stdout + done.stderr
    assert [(int(code), Path(name).name) for code, name in lines] == [
        (errno.EFBIG, "timed.mp4"),
        (errno.EFBIG, "piped.mp4"),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_ffmpeg_stopped_by_the_file_size_limit_is_a_disk_fault(tmp_path):
    from engine.media import _raise_if_disk_full

    with pytest.raises(OSError) as caught:
        _raise_if_disk_full(-signal.SIGXFSZ, "", str(tmp_path / "out.wav"))
    assert caught.value.errno == errno.EFBIG and caught.value.filename.endswith("out.wav")


def test_a_workspace_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys):
    ws = Workspace(tmp_path / "ws")
    (ws.root / "tmp").rmdir()
    (ws.root / "tmp").symlink_to("/proc/1")  # not writable, even for root
    with pytest.raises(WorkspaceError, match="is not writable"):
        ws.check_writable()
    write_media(tmp_path / "media")
    manifest = tmp_path / "media" / "ep.yaml"
    manifest.write_text(GOOD)
    assert main(["run", str(manifest), "--workspace", str(ws.root)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not writable" in err and "Traceback" not in err


def test_a_killed_run_is_shown_interrupted_then_filed_by_the_next_run(tmp_path, capsys):
    ws = Workspace(tmp_path / "ws")
    record = {"episode": "e1", "manifest": "m.yaml", "started": "2026-01-01T00:00:00+00:00"}
    stages = [
        {"stage": "separate[dialogue]", "state": "executed"},
        {"stage": "render[e1#00]", "state": "executed"},
    ]
    ws.note_progress("e1", record | {"stages": stages, "planned_segments": [0, 1]})
    assert ws.runs("e1")[-1]["state"] == "interrupted"  # nobody holds the lock: its process is gone
    with ws.lock("e1"):
        assert ws.runs("e1")[-1]["state"] == "running"
    manifest = tmp_path / "m.yaml"
    manifest.write_text("episode: e1\n")
    assert main(["status", str(manifest), "--workspace", str(ws.root), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["state"] == "interrupted"
    assert [(s["segment"], s["state"]) for s in shown["segments"]] == [(0, "executed"), (1, "pending")]
    with ws.lock("e1"):
        assert ws.close_interrupted("e1")["stages"] == stages
    assert [r["state"] for r in ws.runs("e1")] == ["interrupted"]
    assert not (ws.root / "episodes" / "e1" / "running.json").exists()


def test_secrets_are_masked_in_run_records_and_error_lines(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    assert redact({"error": f"401 for token {SECRET}", "n": [SECRET, 3]}) == {
        "error": "401 for token ***",
        "n": ["***", 3],
    }
    ws = Workspace(tmp_path)
    ws.append_run("e1", {"episode": "e1", "error": f"bad {SECRET}"})
    assert SECRET not in (ws.root / "episodes" / "e1" / "runs.jsonl").read_text()
    from flows.cli import _fail

    _fail(f"could not load with {SECRET}")
    assert SECRET not in capsys.readouterr().err


def test_a_child_started_through_the_ephemeral_hook_dies_with_its_parent(tmp_path):
    """What keeps Prefect's temporary server from outliving a `dubflow` killed with -9."""
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from flows.ephemeral import _SubprocessDyingWithParent
        child = _SubprocessDyingWithParent.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(child.pid, flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    for _ in range(50):
        if not _alive(child):
            break
        time.sleep(0.1)
    assert not _alive(child)


def test_ephemeral_hook_installs_on_this_prefect():
    from flows import ephemeral

    assert ephemeral.install() is True
    assert ephemeral.install() is True  # idempotent


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_the_fault_suite_quick_subset_survives_every_kill_and_fault(tmp_path):
    """bench/faults.py --quick: kills (a random moment, a blob write), broken media, hostile manifests, a full
    disk, a failing render, out of memory, missing ffmpeg and weights, and the HF token in no output."""
    report = tmp_path / "faults.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "faults.py"),
        "--kills",
        "3",
        "--quick",
        "--json",
        str(report),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env, cwd=tmp_path)
    assert report.exists(), done.stdout[-2000:] + done.stderr[-2000:]
    tallies = json.loads(report.read_text())
    assert [t["name"] for t in tallies] == [
        "hostile manifests rejected",
        "bad media handled",
        "kills survived (nothing lost or redone)",
        "faults survived",
        "outputs free of the HF token",
    ]
    for tally in tallies:
        assert tally["total"] > 0 and tally["passed"] == tally["total"], (tally["name"], tally["failures"])
