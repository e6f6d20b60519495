"""bench/engine.py --gpu-speed at the tiny shape on the CPU: the GPU speed benchmark's code path (every
feature added in turn, the distilled chunk, offload) runs and writes its report. Timings are never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # regional compile on the CPU takes about a minute
def test_gpu_speed_code_path_on_the_cpu(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "engine.py"), "--gpu-speed", "--check-on-cpu", "--repeats", "1",
           "--out", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "engine_gpu_speed.json").read_text())
    names = list(report["settings"])
    assert names == [
        "bf16, 3 passes", "distilled LoRA (merged), 1 pass", "+ TeaCache 0.3 (8-step chunk)",
        "  teacache, hits forced (8-step chunk)",
        "+ fp8 blocks, 1 pass", "+ regional compile, 1 pass", "block offload (fp8), 1 pass",
    ]  # fmt: skip
    assert all(row["s_per_step"] > 0 and row["mfu_vs_measured"] > 0 for row in report["settings"].values())
    assert report["settings"]["+ fp8 blocks, 1 pass"]["layers"] == 24
    assert report["settings"]["  teacache, hits forced (8-step chunk)"]["skipped"] == 6  # 8 steps, warm-up 2
    assert report["distilled_chunk_s"] > 0 and report["episode_node_factor"] > 0
    assert "within 24 GB" not in done.stdout  # no GPU peak on the CPU: nothing claimed
