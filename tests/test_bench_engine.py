"""bench/engine.py --gpu-stream: the GPU benchmark's code path, run here at the tiny shape on the CPU.

The real-shape run needs a GPU (bench/engine_gpu.sh); these tests check that the same code path renders two
streamed chunks through the real pipeline and writes the report the GPU run will write, and that every
real-shape component builds on the meta device. Timings are never asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("diffusers")
pytest.importorskip("av")


@pytest.mark.slow
def test_gpu_stream_tiny_cpu_report(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "engine.py"), "--gpu-stream", "--shape", "tiny", "--device", "cpu",
           "--steps", "2", "--threads", "1", "--out", str(tmp_path)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "engine_gpu_stream.json").read_text())

    assert report["shape"] == "tiny" and report["device_type"] == "cpu"
    assert report["chunks"] == 2
    assert report["frames"] == 17  # InfiniteTalk tiny: F 9, M 1 -> 9 + 8
    for key in ("s_per_chunk", "s_per_chunk_steady", "s_per_step", "s_per_chunk_40_steps_extrapolated"):
        assert report[key] > 0, key
    assert "peak_gpu_allocated_gib" in report  # None on the CPU
    assert report["peak_rss_gib"] > 0
    main = report["runs"]["infinitetalk_2chunks"]
    assert main["mode"] == "infinitetalk" and main["num_frames"] == 17 and len(main["chunk_s"]) == 2
    assert len(main["step_s"]) == 2 * 2  # chunks x steps
    assert set(main["stage_s"]) == {"audio", "encode", "denoise", "decode"}
    assert set(main["stage_peak_gpu_allocated_gib"]) == set(main["stage_s"])
    base = report["runs"]["infinitetalk_1chunk_baseline"]
    assert base["chunks"] == 1 and base["frames"] == 9
    assert report["baseline"]["chunk_ratio"] > 0
    multi = report["runs"]["multitalk_2chunks"]
    assert multi["chunks"] == 2 and multi["persons"] == 2 and multi["frames"] == 13  # F 9, M 5 -> 9 + 4
    assert all(v["calls"] > 0 and v["nonfinite"] == 0 for v in report["finite"].values()), report["finite"]


def test_real_shape_components_build_on_meta():
    """Every real-shape component (the GPU run's configs) constructs and materialises on the meta device."""
    import torch

    sys.path.insert(0, str(ROOT))
    from bench.engine import real_components

    parts, built = real_components("meta", torch.bfloat16, "meta")
    gib = {name: b["weights_gib"] for name, b in built.items()}
    assert 35.0 < gib["dit"] < 35.5  # 18.9 B parameters, bf16 (MEMORY.md: 34.59 GiB in the 40 blocks)
    assert 10.4 < gib["umt5"] < 10.8  # umT5-XXL encoder, 5.68 B
    assert 1.1 < gib["clip"] < 1.25  # ViT-H/14, 0.63 B
    assert 0.45 < gib["vae"] < 0.5  # fp32, 126.9 M (MEMORY.md: 0.473 GiB)
    assert 0.3 < gib["wav2vec2"] < 0.4  # fp32, 94 M
    assert parts.image_encoder.config.image_size == 224 and parts.text_encoder.config.vocab_size == 256384
    assert parts.wav2vec.layers == 12 and parts.wav2vec.dim == 768
