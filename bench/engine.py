#!/usr/bin/env python3
"""MultiTalk engine benchmark.

CPU (default): the tiny config's full render, split per component (audio, encode, denoise, decode),
against a named baseline measured in the same process: the same render with the guidance passes run
sequentially (upstream's order, `cfg_batch="off"`).

GPU (`--gpu`, needs CUDA + torch + diffusers): the real Wan 2.1 I2V-14B + MultiTalk DiT shape with
random bf16 weights, 448x896, 81 frames (32 928 tokens), two persons, one denoising step with three
guidance passes (batched and sequential) and one pass; prints s/step, model FLOPs/step, the measured
bf16 matmul rate, MFU and peak memory, and the ratio to `gpu_floor.py`'s extrapolated step
(`--floor-json`). Writes a JSON report to $OUT (or --out).

    python bench/engine.py                      # CPU, tiny
    python bench/engine.py --gpu --floor-json $OUT/gpu_floor.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

H100_SXM_BF16_DENSE_TFLOPS = 989.0
A100_PUBLISHED_S_PER_STEP = 35.0  # MultiTalk README, 480P, one A100 (ENGINE.md §6.2)
MEMORY_MD_BATCH3_PEAK_GIB = 49.00  # MEMORY.md: 40 blocks only (34.59 GiB weights), batch 3, 480p


# -- CPU: tiny render ----------------------------------------------------------------------------------
def tiny_job(persons: int, steps: int):
    from engine.base import Box, PersonInput, RenderJob

    rng = np.random.default_rng(0)
    t = np.arange(16_000) / 16_000
    audio = [
        (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32),
        (0.05 * rng.standard_normal(16_000)).astype(np.float32),
    ]
    boxes = [Box(0, 0, 64, 64), Box(64, 0, 128, 64)]
    people = tuple(PersonInput(audio[i], boxes[i] if persons > 1 else None) for i in range(persons))
    picture = rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)
    return RenderJob(
        source=picture, persons=people, prompt="two people speak", frame_num=9, num_frames=9, steps=steps
    )


def timed_render(pipe, job) -> dict[str, float]:
    start = time.perf_counter()
    out = pipe.render(job)
    return {**out.timings, "total": time.perf_counter() - start}


def interleaved_medians(pipes: dict[str, object], job, repeats: int) -> dict[str, dict[str, float]]:
    """Alternate the pipelines run by run (machine load drifts), then take medians per component."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in pipes}
    for pipe in pipes.values():
        pipe.render(job)  # warm-up
    for _ in range(repeats):
        for name, pipe in pipes.items():
            runs[name].append(timed_render(pipe, job))
    return {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}


def run_cpu(args: argparse.Namespace) -> dict:
    from engine.multitalk.pipeline import MultiTalkPipeline
    from engine.multitalk.tiny import tiny_components, tiny_config, tiny_settings

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    parts = tiny_components(0)
    build_s = time.perf_counter() - start
    report = {"device": "cpu", "threads": args.threads, "build_s": build_s, "steps": args.steps}
    for persons in (1, 2):
        job = tiny_job(persons, args.steps)
        pipes = {
            mode: MultiTalkPipeline(parts, tiny_settings(cfg_batch=mode), tiny_config().buckets)
            for mode in ("on", "off")
        }
        results = interleaved_medians(pipes, job, args.repeats)
        report[f"{persons}_person"] = results
        ours, base = results["on"], results["off"]
        print(f"tiny render, {persons} person(s), 9 frames 64x128, {args.steps} steps, 3 guidance passes:")
        for name in ("audio", "encode", "denoise", "decode", "total"):
            print(f"  {name:8} {ours[name] * 1e3:8.1f} ms   baseline (sequential passes) {base[name] * 1e3:8.1f} ms"
                  f"   ratio {ours[name] / base[name]:5.2f}")  # fmt: skip
    print(f"model build (imports + random init): {build_s:.2f} s; torch threads {args.threads}")
    return report


# -- GPU: real 14B shape ---------------------------------------------------------------------------------
def dit_flops_per_pass(tokens: int, frame_tokens: int, dim: int, ffn: int, layers: int, audio_tokens: int,
                       context: int = 769, with_map: bool = True) -> float:  # fmt: skip
    """ENGINE.md §6.1 per pass: 16 L d^2 + 4 L d ffn + 4 L^2 d + 4 L d (ctx + A) + 2 L S d (map), x layers."""
    per_block = (
        16 * tokens * dim**2 + 4 * tokens * dim * ffn + 4 * tokens**2 * dim
        + 4 * tokens * dim * (context + audio_tokens) + (2 * tokens * frame_tokens * dim if with_map else 0)
    )  # fmt: skip
    return layers * per_block


def matmul_rate(n: int = 8192, iters: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12


@torch.no_grad()
def init_in_place(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Random weights that keep activations finite: normal(0, 1/sqrt(fan_in)), norms 1, small modulation."""
    from engine.multitalk.weights import KEEP_FP32

    for name, p in model.named_parameters():
        keep = any(part in KEEP_FP32 for part in name.split("."))
        if keep and p.dtype != torch.float32:
            p.data = p.data.float()
        if "scale_shift_table" in name:
            p.normal_(0, 0.02)
        elif p.ndim == 1 and name.endswith("weight"):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0, 1 / math.sqrt(p[0].numel()))


def build_real_model(dtype: torch.dtype):
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    from engine.multitalk.settings import DiTConfig
    from engine.multitalk.transformer import MultiTalkTransformer3DModel

    cfg = DiTConfig()
    with torch.device("meta"):
        model = MultiTalkTransformer3DModel.from_dit_config(cfg)
    model = model.to(dtype).to_empty(device="cuda")
    init_in_place(model, dtype)
    model.rope = WanRotaryPosEmbed(cfg.attention_head_dim, cfg.patch_size, cfg.rope_max_seq_len).to("cuda")
    return model.eval(), cfg


def cuda_time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        out.append(s.elapsed_time(e) / 1e3)
    return out


def run_gpu(args: argparse.Namespace) -> dict:
    from engine.multitalk.pipeline import Components, MultiTalkPipeline, _Conditioning
    from engine.multitalk.settings import EngineSettings

    dtype = torch.bfloat16
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    report["matmul_bf16_tflops"] = rate = matmul_rate()
    print(f"device {report['device']}; measured bf16 matmul {rate:.0f} TFLOPS (8192^3, median of 20)")
    start = time.perf_counter()
    model, cfg = build_real_model(dtype)
    torch.cuda.synchronize()
    report["build_s"] = time.perf_counter() - start
    report["weights_gib"] = torch.cuda.memory_allocated() / 2**30
    h_lat, w_lat, t_lat = 448 // 8, 896 // 8, 21
    frame_tokens = (h_lat // 2) * (w_lat // 2)
    tokens = t_lat * frame_tokens
    gen = torch.Generator("cuda").manual_seed(0)
    audio_windows = torch.randn(2, 81, 5, 12, 768, device="cuda", generator=gen)
    masks = torch.zeros(3, frame_tokens, device="cuda")
    grid_w = w_lat // 2
    cols = torch.arange(frame_tokens, device="cuda") % grid_w
    masks[0, cols < grid_w // 2], masks[1, cols >= grid_w // 2] = 1, 1
    masks[2] = 1 - masks[0] - masks[1]
    masks[2, :grid_w] = 1  # a background row so the complement is not empty
    cond = _Conditioning(
        y=torch.randn(1, 20, t_lat, h_lat, w_lat, device="cuda", generator=gen),
        text={k: torch.randn(1, 512, 4096, device="cuda", generator=gen) for k in ("prompt", "negative")},
        image=torch.randn(1, 257, 1280, device="cuda", generator=gen),
        audio_tokens=model.encode_audio_tokens(audio_windows),
        null_tokens=model.encode_audio_tokens(torch.zeros_like(audio_windows[:1])),
        token_masks=masks,
    )
    latent = torch.randn(1, 16, t_lat, h_lat, w_lat, device="cuda", generator=gen)
    pipe = MultiTalkPipeline(
        Components(model, None, None, None, None, None), EngineSettings(device="cuda", dtype="bf16")
    )
    passes3, passes1 = ("cond", "drop_text", "uncond"), ("cond",)
    steps = {
        "3pass_batched": lambda: pipe._predict(latent, 900.0, passes3, cond, True),
        "3pass_sequential": lambda: pipe._predict(latent, 900.0, passes3, cond, False),
        "1pass": lambda: pipe._predict(latent, 900.0, passes1, cond, True),
    }
    flops_p2 = dit_flops_per_pass(tokens, frame_tokens, cfg.inner_dim, cfg.ffn_dim, cfg.num_layers, 64)
    flops_null = dit_flops_per_pass(
        tokens, frame_tokens, cfg.inner_dim, cfg.ffn_dim, cfg.num_layers, 32, with_map=False
    )
    flops = {
        "3pass_batched": 2 * flops_p2 + flops_null,
        "3pass_sequential": 2 * flops_p2 + flops_null,
        "1pass": flops_p2,
    }
    torch.cuda.reset_peak_memory_stats()
    for name, fn in steps.items():
        if time.perf_counter() - START > args.budget_s:
            print(f"{name}: skipped (time budget)")
            continue
        fn()  # warm-up
        times = cuda_time(fn, args.repeats)
        velocity, _ = fn()
        finite = all(torch.isfinite(v).all().item() for v in velocity.values())
        s = statistics.median(times)
        mfu = flops[name] / s / (rate * 1e12)
        report[name] = {"s_per_step": s, "times": times, "pflop_per_step": flops[name] / 1e15, "mfu_measured": mfu,
                        "mfu_datasheet": flops[name] / s / (H100_SXM_BF16_DENSE_TFLOPS * 1e12), "finite": finite}  # fmt: skip
        print(f"{name:17} {s:7.2f} s/step  {flops[name] / 1e15:5.2f} PFLOP  {flops[name] / s / 1e12:6.0f} TFLOPS"
              f"  MFU {100 * mfu:5.1f} % of measured, {100 * report[name]['mfu_datasheet']:5.1f} % of 989 T"
              f"  finite={finite}")  # fmt: skip
    peak = torch.cuda.max_memory_allocated() / 2**30
    report["peak_allocated_gib"] = peak
    print(f"peak allocated {peak:.2f} GiB (weights {report['weights_gib']:.2f} GiB); MEMORY.md batch-3 figure "
          f"{MEMORY_MD_BATCH3_PEAK_GIB} GiB for the 40 blocks alone")  # fmt: skip
    if "3pass_batched" in report:
        step = min(report["3pass_batched"]["s_per_step"], report["3pass_sequential"]["s_per_step"])
        print(
            f"vs published A100 35 s/step: {A100_PUBLISHED_S_PER_STEP / step:.2f}x faster; goal <= 12 s/step"
        )
        if args.floor_json and Path(args.floor_json).is_file():
            floor = json.loads(Path(args.floor_json).read_text())["extrapolation"]["step_3cfg_best_s"]
            report["floor_step_s"], report["ratio_to_floor"] = floor, step / floor
            print(
                f"gpu_floor.py extrapolated step {floor:.2f} s (480x832); ours / floor = {step / floor:.2f}"
            )
    return report


START = time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpu", action="store_true", help="real 14B shape on CUDA (random bf16 weights)")
    parser.add_argument("--steps", type=int, default=4, help="CPU: denoising steps of the tiny render")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads")
    parser.add_argument("--floor-json", default=None, help="gpu_floor.json of the same GPU run")
    parser.add_argument("--budget-s", type=float, default=420.0, help="GPU: skip timings past this wall time")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for engine_bench.json")
    args = parser.parse_args()
    if args.gpu and not torch.cuda.is_available():
        sys.exit("--gpu needs a CUDA device; none is visible")
    report = run_gpu(args) if args.gpu else run_cpu(args)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "engine_bench.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
