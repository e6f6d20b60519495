"""Workspace: content addressing, atomic writes, verification of blobs, stage keys, the episode lock."""

from __future__ import annotations

import multiprocessing as mp
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks.workspace import Blob, EpisodeBusy, Workspace, blobs_in, canonical, stage_key


def test_put_file_names_blobs_by_content(tmp_path):
    ws = Workspace(tmp_path / "ws")
    a = tmp_path / "a.txt"
    a.write_text("hello")
    blob = ws.put_file(a, move=False)
    assert ws.path(blob).read_text() == "hello" and a.exists()
    b = tmp_path / "b.txt"
    b.write_text("hello")
    assert ws.put_file(b) == blob and not b.exists()  # same bytes, same blob; the moved source is gone
    assert blob.sha256 in str(ws.path(blob)) and blob.size == 5


def test_missing_or_truncated_blob_is_not_present(tmp_path):
    ws = Workspace(tmp_path)
    blob = ws.put_bytes(b"0123456789", ".bin")
    assert ws.has(blob)
    ws.path(blob).write_bytes(b"01234")
    assert not ws.has(blob)
    ws.path(blob).unlink()
    assert not ws.has(blob)


def test_stage_key_depends_on_content_not_on_paths(tmp_path):
    one = Blob("a" * 64, 10, ".wav")
    other = Blob("b" * 64, 10, ".wav")
    base = stage_key("remix", "v1", {"ws": Workspace(tmp_path / "x"), "dialogue": [one], "gain": -23.0})
    moved = stage_key("remix", "v1", {"ws": Workspace(tmp_path / "y"), "dialogue": [one], "gain": -23.0})
    assert base == moved
    assert base != stage_key("remix", "v1", {"dialogue": [other], "gain": -23.0})
    assert base != stage_key("remix", "v1", {"dialogue": [one], "gain": -24.0})
    assert base != stage_key("remix", "v2", {"dialogue": [one], "gain": -23.0})
    assert base != stage_key("stitch", "v1", {"dialogue": [one], "gain": -23.0})


def test_paths_are_refused_as_stage_inputs():
    with pytest.raises(TypeError, match="Blobs, not paths"):
        canonical({"audio": Path("/tmp/x.wav")})


@dataclass(frozen=True)
class _Record:
    a: Blob
    more: dict


def test_blobs_in_finds_nested_blobs():
    one, two = Blob("1" * 64, 1, ".a"), Blob("2" * 64, 2, ".b")
    assert blobs_in(_Record(one, {"x": [two], "n": 3})) == [one, two]


def _hold_lock(root: str, ready, release) -> None:
    with Workspace(root).lock("ep1"):
        ready.set()
        release.wait(10)


def test_a_second_run_of_the_same_episode_fails_clearly(tmp_path):
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(20)
        ws = Workspace(tmp_path)
        with pytest.raises(EpisodeBusy, match="is being run by pid"), ws.lock("ep1", wait_s=0.3):
            pass
        with ws.lock("ep2"):  # other episodes run side by side
            pass
    finally:
        release.set()
        holder.join(10)
    with Workspace(tmp_path).lock("ep1"):  # released when the holder ends
        pass
