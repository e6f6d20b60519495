"""Benchmark: the fault suite. Prints one table: kills survived, bad media handled, hostile manifests
rejected (with the worst time and peak memory), faults survived, and secrets found in any output.

  kills     `dubflow run` (fake engine in place of `preview`, the demo episode in 2 s segments) is killed
            with SIGKILL at a random moment, or in the middle of a blob write (DUBFLOW_KILL_AT), then run
            again. Survived when the rerun completes, no stage that the killed run completed is executed
            again, the delivered mp4 has the reference run's bytes, every blob in the store matches its
            hash, status showed the killed run as interrupted, no scratch or temp file is left, and no
            process the killed command started outlives it. Every 10th kill uses Prefect's temporary
            server (the others share one server started here, to keep the suite minutes long).
  media     a manifest naming a broken media file: `dubflow validate` exits 2 with one located line per
            problem, no traceback, within 30 s.
  hostile   tests/hostile_corpus.py through `dubflow validate` in a fresh process each: wall time and
            peak RSS of the whole process; baseline: the same process validating a good manifest.
  faults    a full disk (RLIMIT_FSIZE), the Prefect API going away mid-run (for good, or back 45 s later),
            a render that fails, a render out of memory, missing model weights, a missing ffmpeg: a typed one-line error naming stage or
            file (or a retry / split that completes), and a rerun that completes.
  secrets   HF_TOKEN is set for every run; every file written (workspaces, Prefect's home and database,
            captured output) is searched for it.

Usage: python bench/faults.py [--kills 50] [--seed 0] [--json PATH] [--keep DIR]
CI runs a fast subset through tests/test_faults.py (--kills 3 --quick).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SECRET = "hf_BenchSecretToken0123456789abcdef"
CLI = [sys.executable, "-m", "flows.cli"]


@dataclass
class Tally:
    name: str
    total: int = 0
    passed: int = 0
    failures: list[str] = field(default_factory=list)
    extra: str = ""

    def add(self, ok: bool, what: str) -> None:
        self.total += 1
        self.passed += ok
        if not ok:
            self.failures.append(what)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kills", type=int, default=50, help="random kill points (goal: all of >= 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="fewer faults (the CI subset)")
    parser.add_argument("--parts", default="hostile,media,kills,faults", help="which sections to run")
    parser.add_argument("--faults", default=None, help="only these faults (comma-separated names)")
    parser.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder instead of a temp one")
    args = parser.parse_args()
    root = (args.keep or Path(tempfile.mkdtemp(prefix="dubflow-faults-"))).resolve()
    root.mkdir(parents=True, exist_ok=True)
    env = _environment(root)
    rng = random.Random(args.seed)
    parts = set(args.parts.split(","))
    tallies = [hostile_manifests(root, env)] if "hostile" in parts else []
    tallies += [bad_media(root, env)] if "media" in parts else []
    if parts & {"kills", "faults"}:
        server = _start_server(env)
        try:
            ref = reference_run(root, env)
            tallies += [kills(root, env, ref, args.kills, rng)] if "kills" in parts else []
            tallies += (
                [faults(root, env, ref, quick=args.quick, only=args.faults)] if "faults" in parts else []
            )
        finally:
            server.stop()
    tallies.append(secrets(root))
    _print(tallies)
    if args.json:
        args.json.write_text(json.dumps([t.__dict__ for t in tallies], indent=2))
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


def _environment(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {
        "PYTHONPATH": str(ROOT),
        "PREFECT_HOME": str(root / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DUBFLOW_ENGINE_OVERRIDES": "preview=engine.fake:SlowRenderer",
        "DUBFLOW_FAKE_LOAD_S": "0",
        "DUBFLOW_FAKE_S_PER_FRAME": "0.004",  # a render is a stage worth killing in the middle of
        "HF_TOKEN": SECRET,
        "HUGGING_FACE_HUB_TOKEN": SECRET,
    }
    return env


def _start_server(env: dict[str, str]):
    """One Prefect API for the kills, as a studio's batch host has; the ephemeral kills do without it."""
    os.environ.update({k: env[k] for k in ("PREFECT_HOME", "PREFECT_SERVER_ANALYTICS_ENABLED")})
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start(timeout=180)
    env["PREFECT_API_URL"] = server.api_url
    return server


# ---------------------------------------------------------------------------------------------- hostile manifests


def hostile_manifests(root: Path, env: dict[str, str]) -> Tally:
    from tests.hostile_corpus import GOOD, hostile_cases, write_media

    folder = write_media(root / "hostile")
    (folder / "good.yaml").write_text(GOOD)
    base_s, base_kb = _validate(folder, "good.yaml", env)[1:]
    tally, worst_s, worst_kb = Tally("hostile manifests rejected"), (0.0, ""), (0, "")
    _in_process_seconds(
        folder, folder / "good.yaml"
    )  # the first call pays the imports: not a manifest's cost
    worst_in, base_in = (0.0, ""), _in_process_seconds(folder, folder / "good.yaml")
    for case in hostile_cases():
        path = case.make(folder)
        arg = str(path.relative_to(folder)) if path != folder and path.is_relative_to(folder) else str(path)
        (code, err), seconds, kb = _validate(folder, arg, env)
        lines = err.splitlines()
        if case.needle is None:
            ok = code == 0
        else:
            ok = code == 2 and len(lines) == case.count and case.needle in err and "Traceback" not in err
            ok = ok and (case.line is None or lines[0].startswith(f"{arg}:{case.line}:"))
        tally.add(ok, f"{case.name}: exit {code}: {err.strip()[:200]}")
        checking = _in_process_seconds(folder, path)
        worst_in = max(worst_in, (checking, case.name))
        worst_s, worst_kb = max(worst_s, (seconds, case.name)), max(worst_kb, (kb, case.name))
        if path.is_file() and path.stat().st_size > 1 << 20:
            path.unlink()  # the multi-megabyte documents
    tally.extra = (
        f"worst check {worst_in[0]:.2f} s in process ({worst_in[1]}; {worst_in[0] / base_in:.2f}x a good "
        f"manifest's {base_in:.2f} s); whole command: "
        f"worst {worst_s[0]:.2f} s ({worst_s[1]}; {worst_s[0] / base_s:.2f}x a good manifest's {base_s:.2f} s), "
        f"peak {worst_kb[0] / 1024:.0f} MB ({worst_kb[1]}; {worst_kb[0] / base_kb:.2f}x the good one's "
        f"{base_kb / 1024:.0f} MB); goal < 2 s and < 200 MB"
    )
    return tally


def _in_process_seconds(folder: Path, path: Path) -> float:
    """Seconds `load_manifest` takes here, the interpreter's start-up and imports left out."""
    from tasks.manifest import ManifestError, load_manifest

    cwd = os.getcwd()
    os.chdir(folder)
    started = time.perf_counter()
    try:
        load_manifest(path.relative_to(folder) if path.is_relative_to(folder) and path != folder else path)
    except ManifestError:
        pass
    finally:
        os.chdir(cwd)
    return time.perf_counter() - started


def _validate(folder: Path, arg: str, env: dict[str, str]) -> tuple[tuple[int, str], float, int]:
    """(exit code, stderr), wall seconds, peak RSS in KiB of a fresh `dubflow validate` process."""
    return _measured([*CLI, "validate", arg], folder, env, timeout=60)


def _measured(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float, **popen):
    """Run `cmd`; ((exit code, stderr), wall seconds, peak RSS KiB) from wait4, killed after `timeout`."""
    import threading

    with tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=err, **popen)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        return (proc.returncode, err.read().decode(errors="replace")), seconds, usage.ru_maxrss


_outputs: list[str] = []  # everything the commands printed, searched for the secret at the end


# ---------------------------------------------------------------------------------------------- bad media


def bad_media(root: Path, env: dict[str, str]) -> Tally:
    from tests.hostile_corpus import GOOD, write_media

    folder = write_media(root / "media")
    broken = _broken_media(folder)
    tally = Tally("bad media handled")
    for name, (key, replacement, line) in broken.items():
        old = "source: scene.png" if key == "source" else "track: ana.wav"
        (folder / "ep.yaml").write_text(GOOD.replace(old, f"{key}: '{replacement}'", 1))
        (code, err), seconds, _ = _measured([*CLI, "validate", "ep.yaml"], folder, env, timeout=30)
        _outputs.append(err)
        lines = err.splitlines()
        ok = (
            code == 2
            and len(lines) == 1
            and lines[0].startswith(f"ep.yaml:{line}:")
            and "Traceback" not in err
        )
        tally.add(ok and seconds < 30, f"{name}: exit {code} in {seconds:.1f} s: {err.strip()[:200]}")
    return tally


def _broken_media(folder: Path) -> dict[str, tuple[str, str, int]]:
    """name -> (manifest field, file name, the line the problem must name)."""
    from fractions import Fraction

    import numpy as np

    from engine.media import write_timed_video

    frames = ((i, np.full((64, 64, 3), 8 * i, np.uint8)) for i in range(25))
    write_timed_video(folder / "good.mp4", frames, Fraction(1, 25))
    whole = (folder / "good.mp4").read_bytes()
    (folder / "truncated.mp4").write_bytes(whole[: len(whole) // 3])
    (folder / "headless.mp4").write_bytes(whole[len(whole) // 2 :])
    (folder / "random.mp4").write_bytes(os.urandom(50_000))
    (folder / "empty.wav").write_bytes(b"")
    (folder / "text.png").write_text("not a picture\n")
    (folder / "riff.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + os.urandom(64))
    (folder / "folder.wav").mkdir(exist_ok=True)
    if not (folder / "fifo.wav").exists():
        os.mkfifo(folder / "fifo.wav")
    if not (folder / "zero.mp4").is_symlink():
        (folder / "zero.mp4").symlink_to("/dev/zero")
    return {
        "truncated mp4 as source": ("source", "truncated.mp4", 2),
        "mp4 without its header as source": ("source", "headless.mp4", 2),
        "random bytes as source": ("source", "random.mp4", 2),
        "text named .png as source": ("source", "text.png", 2),
        "a voice as source (no picture)": ("source", "ana.wav", 2),
        "link to /dev/zero as source": ("source", "zero.mp4", 2),
        "empty wav as track": ("track", "empty.wav", 6),
        "broken RIFF header as track": ("track", "riff.wav", 6),
        "a folder named .wav as track": ("track", "folder.wav", 6),
        "a FIFO named .wav as track": ("track", "fifo.wav", 6),
        "a silent video as track": ("track", "good.mp4", 6),
        "corrupt mp4 as track": ("track", "corrupt.mp4", 6),
    }


# ---------------------------------------------------------------------------------------------- kills


@dataclass
class Reference:
    manifest: Path
    seconds: float
    sha: str
    blobs: int
    stages: int


def reference_run(root: Path, env: dict[str, str]) -> Reference:
    manifest = _episode(root / "episode")
    ws = root / "reference"
    started = time.perf_counter()
    code, err = _run(["run", str(manifest), "--workspace", str(ws)], env)
    if code != 0:
        raise SystemExit(f"the reference run failed: {err}")
    run = _runs(ws)[-1]
    blobs = sum(1 for p in (ws / "store").rglob("*") if p.is_file())
    return Reference(manifest, time.perf_counter() - started, _delivered(ws), blobs, len(run["stages"]))


def _episode(folder: Path) -> Path:
    from tasks.demo import make_demo_media, short_manifest_text

    make_demo_media(folder)
    path = folder / "k.yaml"
    path.write_text(short_manifest_text("k", render="{engine: preview, size: 480, max_segment_s: 2}"))
    return path


def kills(root: Path, env: dict[str, str], ref: Reference, n: int, rng: random.Random) -> Tally:
    tally = Tally("kills survived (nothing lost or redone)")
    for i in range(n):
        ephemeral = i % 10 == 9
        mode = "blob write" if i % 3 == 2 else "random moment"
        ok, what = _one_kill(
            root / f"kill-{i:03d}", env, ref, rng, ephemeral=ephemeral, blob=mode == "blob write"
        )
        tally.add(ok, f"kill {i} ({mode}{', ephemeral server' if ephemeral else ''}): {what}")
        print(
            f"  kill {i + 1}/{n} ({mode}{', ephemeral' if ephemeral else ''}): {'ok' if ok else what}",
            flush=True,
        )
    return tally


def _one_kill(ws: Path, env: dict[str, str], ref: Reference, rng, *, ephemeral: bool, blob: bool):
    env = dict(env)
    if ephemeral:
        env.pop("PREFECT_API_URL")
    if blob:
        env["DUBFLOW_KILL_AT"] = f"blob-write:{rng.randint(1, max(1, ref.blobs - 1))}"
    cmd = [*CLI, "run", str(ref.manifest), "--workspace", str(ws)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    at = rng.uniform(0.5, ref.seconds * 0.95 + (15 if ephemeral else 0))
    started, family = time.perf_counter(), set()
    while proc.poll() is None and (blob or time.perf_counter() - started < at):
        family |= _descendants(proc.pid)
        time.sleep(0.05)
    if proc.poll() is None:
        family |= _descendants(proc.pid)
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode == 0:
        return True, "finished before the kill (nothing to check)"
    orphans = _survivors(family)
    status = json.loads(_run(["status", str(ref.manifest), "--workspace", str(ws), "--json"], env)[1] or "{}")
    env.pop("DUBFLOW_KILL_AT", None)
    code, err = _run(["run", str(ref.manifest), "--workspace", str(ws)], env)
    return _verify(ws, ref, code, err, orphans, status.get("state"))


def _verify(ws: Path, ref: Reference, code: int, err: str, orphans: list[int], shown: str | None):
    if code != 0:
        return False, f"the rerun failed: {err.strip()[:200]}"
    runs = _runs(ws)
    killed, rerun = (runs[-2] if len(runs) > 1 else {}), runs[-1]
    done = {s["stage"] for s in killed.get("stages", []) if s["state"] in ("executed", "cached")}
    redone = [s["stage"] for s in rerun["stages"] if s["stage"] in done and s["state"] == "executed"]
    problems = []
    finished = killed.get("state") == "completed"  # killed while exiting, after its record: nothing lost
    if killed and not finished and (shown != "interrupted" or killed.get("state") != "interrupted"):
        problems.append(f"status said {shown!r}, history {killed.get('state')!r}")
    if not killed and shown is not None:  # killed before the flow began: there is no run to show
        problems.append(f"status said {shown!r} of a run that never started")
    if redone:
        problems.append(f"redone: {redone}")
    if _delivered(ws) != ref.sha:
        problems.append("delivered mp4 differs from the reference")
    if bad := _bad_blobs(ws):
        problems.append(f"blobs not matching their hash: {bad[:3]}")
    if left := _leftovers(ws):
        problems.append(f"left over: {left[:3]}")
    if orphans:
        problems.append(f"orphan processes: {orphans}")
    return not problems, "; ".join(problems) or f"ok ({len(done)} stages kept)"


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _survivors(pids: set[int], wait_s: float = 10.0) -> list[int]:
    deadline = time.monotonic() + wait_s
    while True:
        alive = [p for p in pids if _alive(p)]
        if not alive or time.monotonic() > deadline:
            for p in alive:  # do not leave them running for the next check
                os.kill(p, signal.SIGKILL)
            return alive
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _run(args: list[str], env: dict[str, str], timeout: float = 600, **popen) -> tuple[int, str]:
    done = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, **popen)
    _outputs.extend([done.stdout, done.stderr])
    return done.returncode, done.stdout if "--json" in args else done.stderr


def _runs(ws: Path) -> list[dict]:
    return [json.loads(line) for line in (ws / "episodes" / "k" / "runs.jsonl").read_text().splitlines()]


def _delivered(ws: Path) -> str:
    path = ws / "episodes" / "k" / "out" / "k.mp4"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


def _bad_blobs(ws: Path) -> list[str]:
    bad = []
    for path in (ws / "store").glob("*/*"):
        if hashlib.sha256(path.read_bytes()).hexdigest() != path.name.split(".")[0]:
            bad.append(path.name)
    return bad


def _leftovers(ws: Path) -> list[str]:
    scratch = [str(p) for p in (ws / "tmp").iterdir()]
    return scratch + [str(p) for p in ws.rglob("*") if ".tmp" in p.name]


# ---------------------------------------------------------------------------------------------- faults


def faults(root: Path, env: dict[str, str], ref: Reference, *, quick: bool, only: str | None = None) -> Tally:
    tally = Tally("faults survived")
    cases = [
        _two_episodes,
        _full_disk_ingest,
        _full_disk_stage,
        _render_fails,
        _out_of_memory,
        _missing_ffmpeg,
        _missing_weights,
    ]
    if not quick:
        cases += [_api_gone, _api_back]
    if only:
        every = [*cases, *([] if not quick else [_api_gone, _api_back])]
        cases = [c for c in every if c.__name__.strip("_") in only.split(",")]
    for case in cases:
        ok, what = case(root / case.__name__.strip("_"), env, ref)
        tally.add(ok, f"{case.__name__.strip('_').replace('_', ' ')}: {what}")
        print(f"  fault {case.__name__.strip('_')}: {'ok' if ok else what}", flush=True)
    return tally


def _one_line(code: int, err: str, *needles: str) -> bool:
    return code != 0 and err.count("\n") == 1 and "Traceback" not in err and all(n in err for n in needles)


def _two_episodes(ws: Path, env: dict[str, str], ref: Reference):
    """Two episodes of the same media at once in one workspace: both complete, every blob matches its hash."""
    other = ref.manifest.with_name("k2.yaml")
    other.write_text(ref.manifest.read_text().replace("episode: k\n", "episode: k2\n"))
    runs = [
        subprocess.Popen(
            [*CLI, "run", str(m), "--workspace", str(ws)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for m in (ref.manifest, other)
    ]
    codes = [proc.wait(timeout=900) for proc in runs]
    _outputs.extend(proc.stderr.read() for proc in runs)
    second = ws / "episodes" / "k2" / "out" / "k2.mp4"
    same = second.is_file() and hashlib.sha256(second.read_bytes()).hexdigest() == ref.sha
    bad, left = _bad_blobs(ws), _leftovers(ws)
    ok = codes == [0, 0] and _delivered(ws) == ref.sha and same and not bad and not left
    return (
        ok,
        f"exits {codes}, both delivered the reference bytes: {same}, bad blobs {bad[:2]}, left {left[:2]}",
    )


def _full_disk_ingest(ws: Path, env: dict[str, str], ref: Reference):
    """A file-size limit below the inputs' sizes: the copy of the inputs into the store fails."""
    return _full_disk(ws, env, ref, 300_000, "stage ingest")


def _full_disk_stage(ws: Path, env: dict[str, str], ref: Reference):
    """A limit just above the inputs: the first stage writing a larger file fails (a conform, here)."""
    largest_input = max(p.stat().st_size for p in ref.manifest.parent.iterdir() if p.is_file())
    return _full_disk(ws, env, ref, largest_input + 2048, "stage ")


def _full_disk(ws: Path, env: dict[str, str], ref: Reference, limit_bytes: int, stage: str):
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, resource.RLIM_INFINITY))

    code, err = _run(["run", str(ref.manifest), "--workspace", str(ws)], env, preexec_fn=limit)
    first = _one_line(code, err, "DiskFull", stage, str(ws))
    left = _leftovers(ws)
    code2, _ = _run(["run", str(ref.manifest), "--workspace", str(ws)], env)
    ok = first and not left and code2 == 0 and _delivered(ws) == ref.sha
    return ok, f"first: {err.strip()[:200]!r}; left over {left[:2]}; rerun exit {code2}"


def _render_fails(ws: Path, env: dict[str, str], ref: Reference):
    faults_file = ws.parent / "render-faults.json"
    faults_file.write_text(json.dumps({"fail_frames": [30]}))
    env = env | {"DUBFLOW_FAKE_FAULTS": str(faults_file)}
    code, err = _run(["run", str(ref.manifest), "--workspace", str(ws)], env)
    first = _one_line(code, err, "segment(s) failed", "InjectedFault")
    faults_file.write_text("{}")
    code2, err2 = _run(["rerun", str(ref.manifest), "--workspace", str(ws)], env)
    ok = first and code2 == 0 and _delivered(ws) == ref.sha
    return ok, f"first: {err.strip()[:160]!r}; rerun exit {code2}"


def _out_of_memory(ws: Path, env: dict[str, str], ref: Reference):
    faults_file = ws.parent / "oom-faults.json"
    faults_file.write_text(json.dumps({"oom_above_frames": 30}))
    code, err = _run(
        ["run", str(ref.manifest), "--workspace", str(ws)], env | {"DUBFLOW_FAKE_FAULTS": str(faults_file)}
    )
    return code == 0 and _delivered(
        ws
    ) != "missing", f"exit {code} (split and completed): {err.strip()[:160]}"


def _missing_ffmpeg(ws: Path, env: dict[str, str], ref: Reference):
    code, err = _run(
        ["run", str(ref.manifest), "--workspace", str(ws)], env | {"FFMPEG_BINARY": "/nowhere/ffmpeg"}
    )
    first = _one_line(code, err, "FFMPEG_BINARY")
    code2, _ = _run(["run", str(ref.manifest), "--workspace", str(ws)], env)
    return first and code2 == 0 and _delivered(
        ws
    ) == ref.sha, f"first: {err.strip()[:160]!r}; rerun exit {code2}"


def _missing_weights(ws: Path, env: dict[str, str], ref: Reference):
    manifest = ref.manifest.with_name("weights.yaml")
    manifest.write_text(ref.manifest.read_text().replace("engine: preview", "engine: multitalk"))
    empty = ws.parent / "no-models"
    empty.mkdir(parents=True, exist_ok=True)
    env = env | {"DUBFLOW_MODELS_DIR": str(empty), "DUBFLOW_ENGINE_OVERRIDES": ""}
    code, err = _run(["run", str(manifest), "--workspace", str(ws)], env)
    return _one_line(code, err) and ("weights" in err or str(empty) in err or "GPU" in err), err.strip()[:200]


def _api_gone(ws: Path, env: dict[str, str], ref: Reference):
    """The run's Prefect API is stopped once the renders began, for good: `dubflow run` waits for it (15 s
    here), then ends with one line naming the API, the stage and the command that resumes; the rerun on
    another server resumes: the reference bytes, and no stage the first run finished is executed again."""
    return _api_outage(ws, env, ref, back_after_s=None)


def _api_back(ws: Path, env: dict[str, str], ref: Reference):
    """The API is stopped once the renders began and started again 45 s later on its port: the same command
    delivers the reference bytes (bridged by the Prefect client's retries, or resumed by `dubflow run`)."""
    return _api_outage(ws, env, ref, back_after_s=45.0)


def _api_outage(ws: Path, env: dict[str, str], ref: Reference, back_after_s: float | None):
    from prefect.server.api.server import SubprocessASGIServer

    from tests.net import free_port

    second = SubprocessASGIServer(port=free_port())
    second.start(timeout=180)
    cmd = [*CLI, "run", str(ref.manifest), "--workspace", str(ws)]
    main, env = (
        env,
        env
        | {
            "PREFECT_API_URL": second.api_url,
            "DUBFLOW_API_WAIT_S": "15" if back_after_s is None else "120",
        },
    )
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stopped = _stop_when_rendering(proc, ws, second)
    if stopped and back_after_s is not None:
        time.sleep(back_after_s)
        second = SubprocessASGIServer(port=second.port)
        second.start(timeout=180)
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return False, "the run hung after the API went away"
    finally:
        second.stop()
    _outputs.extend([out, err])
    if not stopped:
        return False, f"the run ended before its renders began (exit {proc.returncode})"
    if back_after_s is None:
        first = _one_line(
            proc.returncode, err, "ApiUnreachable", env["PREFECT_API_URL"], "stage ", "dubflow run"
        )
        code2, err2 = _run(["run", str(ref.manifest), "--workspace", str(ws)], main)
    else:
        first, code2, err2 = proc.returncode == 0, 0, ""  # resumed, or bridged by the client's own retries
    runs = _runs(ws)
    done = {s["stage"] for r in runs[:-1] for s in r["stages"] if s["state"] in ("executed", "cached")}
    redone = [s["stage"] for s in runs[-1]["stages"] if s["stage"] in done and s["state"] == "executed"]
    ok = first and code2 == 0 and _delivered(ws) == ref.sha and not redone
    return ok, (
        f"first exit {proc.returncode}: {err.strip()[-200:]!r} {out.strip()[:120]!r}; resumed run exit {code2} "
        f"{err2.strip()[-200:]!r}, "
        f"{len(runs)} runs recorded, redone {redone[:3]}"
    )


def _stop_when_rendering(proc, ws: Path, server) -> bool:
    """Stop `server` once the run's journal shows a finished render; False if the run ended first."""
    running = ws / "episodes" / "k" / "running.json"
    while proc.poll() is None:
        try:
            stages = json.loads(running.read_text())["stages"]
        except (OSError, ValueError, KeyError):
            stages = []
        if any(s["stage"].startswith("render[") for s in stages):
            server.stop()
            return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------------------------------------- secrets


def secrets(root: Path) -> Tally:
    tally = Tally("outputs free of the HF token")
    needle = SECRET.encode()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        try:
            tally.add(needle not in path.read_bytes(), str(path))
        except OSError:
            continue
    for i, text in enumerate(_outputs):
        tally.add(SECRET not in text, f"command output {i}")
    return tally


# ---------------------------------------------------------------------------------------------- table


def _print(tallies: list[Tally]) -> None:
    print(f"\n{'check':<42} {'passed':>8}  notes")
    for t in tallies:
        print(f"{t.name:<42} {t.passed:>4}/{t.total:<4} {t.extra}")
    for t in tallies:
        for failure in t.failures:
            print(f"  FAILED {t.name}: {failure}")


if __name__ == "__main__":
    main()
