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
import hashlib
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy

from engine.media import owner_is_gone, owner_tag
from tasks.lease import LeaseBusy, hold_lease, lease_held, lease_seconds
from tasks.secrets import redact

DEFAULT_ROOT = "dubflow-work"
RUNNING = "running.json"  # episodes/<episode>/: the run in progress, stage by stage


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


class WorkspaceError(RuntimeError):
    """The workspace cannot be used: not writable, or its disk is full."""


class DiskFull(WorkspaceError):
    """A stage could not write its output: it names the stage and the file."""

    def __init__(self, stage: str, exc: OSError, workspace: Path | None = None):
        self.stage, self.path = stage, exc.filename or workspace
        where = f" writing {self.path}" if self.path else ""
        super().__init__(
            f"stage {stage}: {exc.strerror or 'no space left'}{where}; free space on that disk (or raise the "
            "file-size limit) and run again: finished stages are kept"
        )


class Workspace:
    def __init__(self, root: Path | str | None = None):
        self.root = Path(root or os.environ.get("DUBFLOW_WORKSPACE") or DEFAULT_ROOT).resolve()
        try:
            for sub in ("store", "cache", "episodes", "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WorkspaceError(
                f"workspace {self.root} cannot be created ({exc.strerror}); give a writable --workspace"
            ) from None

    def check_writable(self) -> None:
        """Fail now, before any work, when a run could not write its results (a read-only mount, a full
        disk, wrong ownership)."""
        for sub in ("store", "cache", "episodes", "tmp"):
            try:
                with tempfile.NamedTemporaryFile(dir=self.root / sub, prefix=".writable-"):
                    pass
            except OSError as exc:
                raise WorkspaceError(
                    f"workspace {self.root} is not writable ({sub}/: {exc.strerror}); "
                    "give a writable --workspace or fix its permissions"
                ) from None

    def sweep(self) -> list[Path]:
        """Remove the scratch that processes killed mid-write left behind (temp folders in tmp/, temp blobs
        in store/, temp files beside outputs); a live process's scratch is never touched."""
        candidates = [*(self.root / "tmp").iterdir(), *(self.root / "store").glob("*/.*.tmp*")]
        candidates += (self.root / "episodes").glob("*/**/.*.tmp*")
        removed = []
        for path in candidates:
            if owner_is_gone(path.name):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(path)
        return removed

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
        # per host, process and thread: writers storing the same content must not share a temp file; the
        # owner tag lets the next run remove it if this process dies (Workspace.sweep)
        tmp = dest.with_name(f".{dest.name}.{owner_tag()}{threading.get_ident()}.tmp")
        try:
            if move:
                shutil.move(str(src), tmp)
            else:
                shutil.copyfile(src, tmp)
            _fsync(tmp)  # whole on the storage before its name appears: another host may read it at once
            kill_point("blob-write")
            os.replace(tmp, dest)  # atomic on one file system, NFS included: no blob or the whole blob
        except OSError as exc:  # a full disk: no half-written blob stays, and the error names the blob
            tmp.unlink(missing_ok=True)
            raise OSError(exc.errno, exc.strerror, str(dest)) from exc
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
        d = Path(tempfile.mkdtemp(prefix=owner_tag(), dir=self.root / "tmp"))
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
        """Hold the episode's lock, on every host sharing this workspace (a lease file, tasks/lease.py); a
        second run of the same episode waits `wait_s`, then fails clearly."""
        try:
            with hold_lease(self.episode_dir(episode) / "lease", wait_s=wait_s):
                yield
        except LeaseBusy as exc:
            raise EpisodeBusy(
                f"episode {episode!r} is being run by {exc}; wait for it to finish (or run with --wait SECONDS); "
                f"a lock left by a host that died expires {lease_seconds():g} s after its last renewal"
            ) from None

    def append_run(self, episode: str, record: dict) -> None:
        with open(self.episode_dir(episode) / "runs.jsonl", "a") as fh:
            fh.write(json.dumps(redact(record), sort_keys=True) + "\n")

    def runs(self, episode: str) -> list[dict]:
        """The episode's finished runs, then the one in progress (state "running") or the one a kill cut
        short (state "interrupted", with the stages it completed)."""
        path = self.root / "episodes" / episode / "runs.jsonl"
        runs = []
        if path.exists():
            runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        current = self.current_run(episode)
        return runs + ([current] if current else [])

    def note_progress(self, episode: str, record: dict) -> None:
        """The run so far, rewritten after every stage: what `status` shows if the run is killed."""
        path = self.episode_dir(episode) / RUNNING
        tmp = path.with_name(f".{RUNNING}.{owner_tag()}{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(redact(record), sort_keys=True))
        os.replace(tmp, path)

    def end_progress(self, episode: str) -> None:
        (self.root / "episodes" / episode / RUNNING).unlink(missing_ok=True)

    def current_run(self, episode: str) -> dict | None:
        path = self.root / "episodes" / episode / RUNNING
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        busy = self._lock_held(episode)
        return record | {"state": "running" if busy else "interrupted"}

    def close_interrupted(self, episode: str) -> dict | None:
        """Under the episode's lock, at the start of a run: a run that was killed goes into the history."""
        current = self.current_run(episode)
        if current is not None:
            self.append_run(episode, current | {"state": "interrupted", "finished": None})
            self.end_progress(episode)
        return current

    def _lock_held(self, episode: str) -> bool:
        return lease_held(self.root / "episodes" / episode / "lease")

    def link(self, episode: str, name: str, blob: Blob) -> Path:
        """A readable name for a blob under episodes/<episode>/out/ (a hard link, else a copy)."""
        dest = self.episode_dir(episode) / "out" / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.is_file() and os.path.samefile(dest, self.path(blob)):
            return dest  # linked already (an unchanged re-run)
        tmp = dest.with_name(f".{dest.name}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(self.path(blob), tmp)
        except OSError:
            shutil.copyfile(self.path(blob), tmp)
        os.replace(tmp, dest)
        tmp.unlink(
            missing_ok=True
        )  # rename does nothing when both names are links to one file: no stray temp
        return dest


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_kill_counts: dict[str, int] = {}
_kill_lock = threading.Lock()


def kill_point(name: str) -> None:
    """Fault injection for the kill suite (tests/test_faults.py, bench/faults.py): with
    DUBFLOW_KILL_AT=name:N this process SIGKILLs itself the N-th time it passes `name` (a blob written
    but not yet renamed into place). Unset, as in production, it is one environment lookup."""
    spec = os.environ.get("DUBFLOW_KILL_AT", "")
    point, _, count = spec.partition(":")
    if point != name:
        return
    with _kill_lock:
        _kill_counts[name] = _kill_counts.get(name, 0) + 1
        if _kill_counts[name] >= int(count or 1):
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


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


PROJECT_PACKAGES = (
    "engine",
    "tasks",
    "flows",
    "tests",
)  # tests: engines swapped in by DUBFLOW_ENGINE_OVERRIDES
_PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Packages whose version cannot change what a stage writes (orchestration, terminal output): upgrading
# them must not re-render a season. Forgetting one here costs a recompute, never a stale artefact.
OUTPUT_NEUTRAL = frozenset({"prefect", "rich"})
# Render tasks compute their keys on several threads at once; CPython 3.11's ast.parse is not safe to run
# concurrently ("AST constructor recursion depth mismatch"), and a key that fails to compute leaves the
# result uncached. One import-graph walk at a time.
_code_lock = threading.RLock()


@cache
def code_version(*roots: str) -> str:
    """Hash of everything a stage's code is: the source of every project module reachable from `roots`
    through imports (lazy ones inside functions included), the versions of the third-party packages
    those modules import, and the ffmpeg build when the media layer is reached. Nothing is imported:
    hashing an engine must not load torch into the flow."""
    with _code_lock:
        project, external = reached_modules(*roots)
    digest = hashlib.sha256()
    for name in project:
        digest.update(f"{name}\0".encode())
        digest.update(_module_file(name).read_bytes())  # type: ignore[union-attr]  (reached: it exists)
    for top in (t for t in external if t not in OUTPUT_NEUTRAL):
        digest.update(f"{top}=={_package_version(top)}\0".encode())
    if "engine.media" in project:
        digest.update(_ffmpeg_version().encode())
    return digest.hexdigest()[:16]


@cache
def reached_modules(*roots: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(project modules, third-party top-level packages) reachable from `roots` by static imports.

    Parent packages count (their __init__ runs on import); `from pkg import name` counts pkg.name when it
    is a module. Standard-library imports are left out."""
    with _code_lock:
        return _walk_imports(roots)


def _walk_imports(roots: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    import sys

    project: set[str] = set()
    external: set[str] = set()
    todo = list(roots)
    for root in roots:
        if _module_file(root) is None:
            raise ModuleNotFoundError(f"stage code module {root!r} not found")
    while todo:
        name = todo.pop()
        if name in project:
            continue
        file = _module_file(name)
        top = name.partition(".")[0]
        if file is None:
            if top not in PROJECT_PACKAGES and top not in sys.stdlib_module_names and top != "__future__":
                external.add(top)
            continue  # a function or class imported from a module, not a module itself
        project.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += _imported_names(file, name)
    return tuple(sorted(project)), tuple(sorted(external))


def _module_file(name: str) -> Path | None:
    if name.partition(".")[0] not in PROJECT_PACKAGES:
        return None
    base = _PROJECT_ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_names(file: Path, name: str) -> list[str]:
    """Every module name an `import` anywhere in `file` may load, relative imports resolved."""
    import ast

    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found: list[str] = []
    for node in ast.walk(ast.parse(file.read_bytes(), filename=str(file))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found += [base, *(f"{base}.{alias.name}" for alias in node.names)]
    return found


def _package_version(top: str) -> str:
    import importlib.metadata as md

    for dist in _distributions().get(top, [top]):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    return "not installed"


@cache
def _distributions() -> dict[str, list[str]]:
    import importlib.metadata as md

    return md.packages_distributions()  # scans every installed distribution: once per process


@cache
def _ffmpeg_version() -> str:
    """First line of `ffmpeg -version`: encoders and filters change between builds."""
    import subprocess

    from engine.media import MediaError, ffmpeg_exe

    try:
        done = subprocess.run([ffmpeg_exe(), "-version"], capture_output=True, text=True, check=False)
    except (MediaError, OSError):
        return "ffmpeg: none"
    return (done.stdout.splitlines() or ["ffmpeg: unknown"])[0]


@dataclass
class StageKey(CachePolicy):
    """Cache key of a stage: its name, its code version and its inputs by content.

    `roots` are the stage's own modules; `roots_for(inputs)` adds modules chosen by the inputs (the render
    stage adds the module of the engine it is asked to use)."""

    modules: tuple[str, ...] = ()
    roots_for: Any = None  # Callable[[dict], tuple[str, ...]] | None

    def compute_key(
        self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any
    ) -> str:
        name = task_ctx.task.name if task_ctx else "?"
        extra = tuple(self.roots_for(inputs)) if self.roots_for else ()
        return stage_key(name, code_version(*self.modules, *extra), inputs)


def stage_key(name: str, version: str, inputs: dict[str, Any]) -> str:
    payload = json.dumps([name, version, canonical(inputs)], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key from readable parts: lowercase letters, digits and dashes only."""
    import re

    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def stage_cache(*modules: str, roots_for: Any = None) -> StageKey:
    """The cache policy of a stage whose code starts in `modules` (usually just the task's own module:
    everything it imports is found by `code_version`)."""
    return StageKey(modules=tuple(modules), roots_for=roots_for)
