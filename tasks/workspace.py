"""Content-addressed workspace, the stage cache policy, and the per-episode lock.

Layout under the workspace root (default ./dubflow-work or $DUBFLOW_WORKSPACE):
  store/<sha[:2]>/<sha>.<ext>   every artefact, named by the hash of its bytes
  cache/                        Prefect's persisted task results (small records of Blobs)
  episodes/<episode>/           lock, runs.jsonl history, human-readable links to outputs
  tmp/                          scratch space for stages (same filesystem, so renames are atomic)

A stage's cache key = hash(stage name + stage code version + its inputs, where a Blob
counts by content hash and settings by value). Never run ids, paths or mtimes.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy

DEFAULT_ROOT = "dubflow-work"


@dataclass(frozen=True)
class Blob:
    """A file in the store, known by its content hash. Paths are derived, never stored."""

    sha256: str
    size: int
    suffix: str

    @property
    def relpath(self) -> str:
        return f"store/{self.sha256[:2]}/{self.sha256}{self.suffix}"


class EpisodeBusy(RuntimeError):
    """Another process holds this episode's lock."""


class Workspace:
    def __init__(self, root: Path | str | None = None):
        self.root = Path(root or os.environ.get("DUBFLOW_WORKSPACE") or DEFAULT_ROOT).resolve()
        for sub in ("store", "cache", "episodes", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @property
    def results_dir(self) -> Path:
        return self.root / "cache"

    def path(self, blob: Blob) -> Path:
        return self.root / blob.relpath

    def has(self, blob: Blob) -> bool:
        """Present and whole: a missing or truncated blob must be recomputed, never served."""
        p = self.path(blob)
        return p.is_file() and p.stat().st_size == blob.size

    def put_file(self, src: Path, suffix: str | None = None, *, move: bool = True) -> Blob:
        """Move (or copy) a finished file into the store under its content hash."""
        src = Path(src)
        blob = Blob(file_sha256(src), src.stat().st_size, suffix if suffix is not None else src.suffix)
        dest = self.path(blob)
        if self.has(blob):
            if move:
                src.unlink()
            return blob
        dest.parent.mkdir(parents=True, exist_ok=True)
        # per process and thread: two threads storing the same content must not share a temp file
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        if move:
            shutil.move(str(src), tmp)
        else:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
        return blob

    def put_bytes(self, data: bytes, suffix: str) -> Blob:
        with self.scratch() as tmp_dir:
            tmp = tmp_dir / f"data{suffix}"
            tmp.write_bytes(data)
            return self.put_file(tmp, suffix)

    def put_json(self, obj: Any, suffix: str = ".json") -> Blob:
        return self.put_bytes((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), suffix)

    def read_json(self, blob: Blob) -> Any:
        return json.loads(self.path(blob).read_text())

    @contextmanager
    def scratch(self) -> Iterator[Path]:
        """A private temp directory on the store's filesystem, removed afterwards."""
        d = Path(tempfile.mkdtemp(dir=self.root / "tmp"))
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)

    def episode_dir(self, episode: str) -> Path:
        d = self.root / "episodes" / episode
        d.mkdir(parents=True, exist_ok=True)
        return d

    @contextmanager
    def lock(self, episode: str, *, wait_s: float = 0.0) -> Iterator[None]:
        """Hold the episode's lock; a second run of the same episode waits `wait_s`, then fails clearly."""
        path = self.episode_dir(episode) / "lock"
        fh = open(path, "a+")  # noqa: SIM115 - held for the whole block
        deadline = time.monotonic() + wait_s
        try:
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        fh.seek(0)
                        holder = fh.read().strip() or "another process"
                        raise EpisodeBusy(
                            f"episode {episode!r} is being run by {holder}; wait for it to finish "
                            f"(or run with --wait SECONDS)"
                        ) from None
                    time.sleep(0.2)
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()}")
            fh.flush()
            yield
        finally:
            fh.close()

    def append_run(self, episode: str, record: dict) -> None:
        with open(self.episode_dir(episode) / "runs.jsonl", "a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")

    def runs(self, episode: str) -> list[dict]:
        path = self.root / "episodes" / episode / "runs.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def link(self, episode: str, name: str, blob: Blob) -> Path:
        """A readable name for a blob under episodes/<episode>/out/ (a hard link, else a copy)."""
        dest = self.episode_dir(episode) / "out" / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(self.path(blob), tmp)
        except OSError:
            shutil.copyfile(self.path(blob), tmp)
        os.replace(tmp, dest)
        return dest


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:  # streams; never loads the whole file
        return hashlib.file_digest(fh, "sha256").hexdigest()


def blobs_in(value: Any) -> list[Blob]:
    """Every Blob inside a stage record (dataclasses, dicts, lists)."""
    if isinstance(value, Blob):
        return [value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [b for f in dataclasses.fields(value) for b in blobs_in(getattr(value, f.name))]
    if isinstance(value, dict):
        return [b for v in value.values() for b in blobs_in(v)]
    if isinstance(value, list | tuple):
        return [b for v in value for b in blobs_in(v)]
    return []


def canonical(value: Any) -> Any:
    """JSON-able form of a stage input for hashing: Blobs by content, models and dataclasses by value."""
    if isinstance(value, Blob):
        return {"blob": value.sha256}
    if isinstance(value, Workspace):
        return None  # where the store lives does not change what a stage computes
    if hasattr(value, "model_dump"):
        return canonical(value.model_dump(mode="json"))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    if isinstance(value, Path):
        raise TypeError(f"stage inputs must be Blobs, not paths ({value}): a path says nothing about content")
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"cannot hash stage input of type {type(value).__name__}")


@cache
def code_version(*modules: str) -> str:
    """Hash of the source files of the given modules: a stage re-runs when its code changes."""
    digest = hashlib.sha256()
    for name in modules:  # found, not imported: hashing an engine must not load torch into the flow
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ModuleNotFoundError(f"stage code module {name!r} not found")
        digest.update(Path(spec.origin).read_bytes())
    return digest.hexdigest()[:16]


@dataclass
class StageKey(CachePolicy):
    """Cache key of a stage: its name, its code version and its inputs by content."""

    modules: tuple[str, ...] = ()

    def compute_key(
        self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str:
        name = task_ctx.task.name if task_ctx else "?"
        return stage_key(name, code_version(*self.modules), inputs)


def stage_key(name: str, version: str, inputs: dict[str, Any]) -> str:
    payload = json.dumps([name, version, canonical(inputs)], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def stage_cache(*modules: str) -> StageKey:
    """The cache policy of a stage whose code lives in `modules` (the task's own module first)."""
    return StageKey(modules=tuple(modules))
