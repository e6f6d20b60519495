"""A fake slow engine for fan-out tests and benches: no weights, a known cost, injectable faults.

Loading "the model" sleeps DUBFLOW_FAKE_LOAD_S and appends a line to DUBFLOW_FAKE_LOADS
(so a bench can count loads across processes). Rendering sleeps DUBFLOW_FAKE_S_PER_FRAME
per frame and writes a tiny black clip of exactly the job's frames (so stitch works).
DUBFLOW_FAKE_FAULTS names a JSON file {"fail_frames": [F, ...], "oom_frames": [...],
"oom_above_frames": N, "seeds": [S, ...]}: a job whose frame span covers F (and whose seed
is in `seeds`, when given) raises a plain error (or OutOfMemory, as does a job longer than
N frames); edit the file to clear the fault. Register it as the `preview` engine with
DUBFLOW_ENGINE_OVERRIDES=preview=engine.fake:SlowRenderer. DUBFLOW_FAKE_RENDERS names a file that
gets a line as each render starts and ends (`start|end HOST PID SEED FIRST_FRAME FRAMES UNIX_TIME`), so a
test can tell which segment ran where, and whether a finished one ran again.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from engine.base import FPS, OutOfMemory, RenderJob, RenderResult


class InjectedFault(RuntimeError):
    """A render failure injected through DUBFLOW_FAKE_FAULTS (non-transient until the file changes)."""


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, "") or default)


class SlowRenderer:
    name = "fake"

    def __init__(self, **_: object):
        time.sleep(_env_float("DUBFLOW_FAKE_LOAD_S", 0.5))
        loads = os.environ.get("DUBFLOW_FAKE_LOADS")
        if loads:
            with open(loads, "a") as fh:
                fh.write(f"{os.getpid()}\n")

    def render(self, job: RenderJob, *, progress=None) -> RenderResult:
        started = time.perf_counter()
        frames = job.resolved_num_frames()
        _check_faults(job.source_start_frame, frames, job.seed)
        _note("start", job, frames)
        for done in range(1, frames + 1):  # reports like an engine: the long stage, step by step
            time.sleep(_env_float("DUBFLOW_FAKE_S_PER_FRAME", 0.0))
            if progress is not None and (done % 25 == 0 or done == frames):
                progress("render", done, frames)
        output = Path(job.output) if job.output else Path(tempfile.mkstemp(suffix=".mp4")[1])
        if os.environ.get("DUBFLOW_FAKE_WRITE", "1") != "0":
            _black_clip(output, frames)
        _note("end", job, frames)
        return RenderResult(
            output, frames, FPS, 64, 64, job.seed, timings={"total": time.perf_counter() - started}
        )


def _note(event: str, job: RenderJob, frames: int) -> None:
    log = os.environ.get("DUBFLOW_FAKE_RENDERS")
    if log:
        host = os.environ.get("DUBFLOW_HOST") or os.uname().nodename
        with open(log, "a") as fh:  # one short append per line: whole lines even from several hosts
            fh.write(
                f"{event} {host} {os.getpid()} {job.seed} {job.source_start_frame} {frames} {time.time():.3f}\n"
            )


def _check_faults(start: int, frames: int, seed: int) -> None:
    path = os.environ.get("DUBFLOW_FAKE_FAULTS")
    if not path or not Path(path).exists():
        return
    faults = json.loads(Path(path).read_text() or "{}")
    if "seeds" in faults and seed not in faults["seeds"]:
        return
    covered = range(start, start + frames)
    too_long = frames > faults.get("oom_above_frames", frames)
    if too_long or any(f in covered for f in faults.get("oom_frames", [])):
        raise OutOfMemory(f"injected out-of-memory at frames {start}..{start + frames}", frames=frames)
    if any(f in covered for f in faults.get("fail_frames", [])):
        raise InjectedFault(f"injected failure at frames {start}..{start + frames}")


def _black_clip(output: Path, frames: int) -> None:
    from engine.media import ffmpeg_exe  # media I/O helper; no Prefect

    output.parent.mkdir(parents=True, exist_ok=True)
    cmd = [ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi", "-i", f"color=c=black:s=64x64:r={FPS}"]
    cmd += ["-frames:v", str(frames), "-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "ultrafast"]
    subprocess.run([*cmd, str(output)], check=True, capture_output=True)
