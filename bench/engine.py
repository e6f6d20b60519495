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
    python bench/engine.py --stream             # CPU, tiny: per-chunk time and peak RSS, 10/30/60 s

`--stream` renders segments of 10, 30 and 60 seconds with the tiny model, each in a fresh process
(ru_maxrss is per process), streamed chunk by chunk into an mp4; it prints the median time per chunk
and the host peak RSS per length, and the ratio of the longest to the shortest (the baseline, measured
in the same run): a ratio near 1 means memory does not grow with length.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    from engine.multitalk.tiny import TINY_MOTION_FRAMES, tiny_components, tiny_config, tiny_settings

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    parts = tiny_components(0)
    build_s = time.perf_counter() - start
    report = {"device": "cpu", "threads": args.threads, "build_s": build_s, "steps": args.steps}
    for persons in (1, 2):
        job = tiny_job(persons, args.steps)
        pipes = {
            mode: MultiTalkPipeline(
                parts, tiny_settings(cfg_batch=mode), tiny_config().buckets, TINY_MOTION_FRAMES
            )
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


# -- CPU: streaming, memory against length -------------------------------------------------------------
def stream_one(seconds: float, mode: str, steps: int, threads: int) -> dict:
    """One segment of `seconds` in this process, streamed into an mp4; per-chunk times and peak RSS."""
    import resource
    import tempfile

    from engine.base import PersonInput, RenderJob
    from engine.multitalk.pipeline import MultiTalkPipeline
    from engine.multitalk.renderer import find_ffmpeg
    from engine.multitalk.tiny import TINY_MOTION_FRAMES, tiny_components, tiny_config, tiny_settings
    from engine.video import Mp4Writer

    torch.set_num_threads(threads)
    pipe = MultiTalkPipeline(tiny_components(0), tiny_settings(), tiny_config().buckets, TINY_MOTION_FRAMES)
    rng = np.random.default_rng(0)
    audio = (0.05 * rng.standard_normal(int(seconds * 16_000))).astype(np.float32)
    picture = rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)
    job = RenderJob(source=picture, persons=(PersonInput(audio),), prompt="a person talks", mode=mode,
                    frame_num=9, steps=steps)  # fmt: skip
    stamps: list[float] = []

    def progress(stage: str, done: int, total: int, **info) -> None:
        if stage == "decode":
            stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with Mp4Writer(Path(tmp) / "segment.mp4", find_ffmpeg()) as sink:
            out = pipe.render(job, progress=progress, sink=sink.write)
        wall = time.perf_counter() - start
    per_chunk = np.diff(stamps)
    return {
        "seconds": seconds, "frames": out.num_frames, "chunks": len(out.plan.chunks), "wall_s": wall,
        "chunk_median_s": float(np.median(per_chunk)) if len(per_chunk) else wall,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }  # fmt: skip


def run_stream(args: argparse.Namespace) -> dict:
    import subprocess

    report: dict = {
        "device": "cpu",
        "threads": args.threads,
        "steps": args.steps,
        "mode": args.mode,
        "runs": [],
    }
    print(
        f"streamed tiny render ({args.mode}, 1 person, 64x128, {args.steps} steps), one process per length:"
    )
    for seconds in args.seconds:
        cmd = [sys.executable, __file__, "--stream-one", str(seconds), "--mode", args.mode,
               "--steps", str(args.steps), "--threads", str(args.threads)]  # fmt: skip
        run = json.loads(
            subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1]
        )
        report["runs"].append(run)
        print(f"  {seconds:5.0f} s  {run['frames']:5d} frames  {run['chunks']:4d} chunks  "
              f"{run['chunk_median_s'] * 1e3:7.1f} ms/chunk  peak RSS {run['peak_rss_bytes'] / 2**20:7.1f} MiB  "
              f"wall {run['wall_s']:6.1f} s")  # fmt: skip
    base, longest = report["runs"][0], report["runs"][-1]
    report["rss_ratio"] = longest["peak_rss_bytes"] / base["peak_rss_bytes"]
    report["chunk_time_ratio"] = longest["chunk_median_s"] / base["chunk_median_s"]
    print(f"  ratio {longest['seconds']:.0f} s / {base['seconds']:.0f} s (baseline, same run): "
          f"peak RSS {report['rss_ratio']:.3f}, time per chunk {report['chunk_time_ratio']:.3f}")  # fmt: skip
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


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def wall_times(fn, repeats: int, device: str) -> list[float]:
    """Seconds per call; on CUDA between synchronisations (the step ends with host-side work anyway)."""
    out = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - start)
    return out


def matmul_rate(device: str, dtype: torch.dtype, n: int) -> float:
    """TFLOPS of an n^3 matmul, median of 20 (8192^3 bf16 on the GPU)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    return 2 * n**3 / statistics.median(wall_times(lambda: a @ b, 20, device)) / 1e12


@torch.no_grad()
def init_in_place(model: torch.nn.Module) -> None:
    """Random weights that keep activations finite: normal(0, 1/sqrt(fan_in)), norms 1, small modulation;
    the diffusers fp32 modules (and norm_x) kept in fp32 as the loader does."""
    from engine.multitalk.weights import KEEP_FP32

    for name, p in model.named_parameters():
        if any(part in KEEP_FP32 for part in name.split(".")):
            p.data = p.data.float()
        if "scale_shift_table" in name:
            p.normal_(0, 0.02)
        elif p.ndim == 1 and name.endswith("weight"):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.normal_(0, 1 / math.sqrt(p[0].numel()))


def build_model(cfg, device: str, dtype: torch.dtype):
    """The MultiTalk DiT built on meta, materialised on `device` and initialised in place (no host copy)."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    from engine.multitalk.transformer import MultiTalkTransformer3DModel

    with torch.device("meta"):
        model = MultiTalkTransformer3DModel.from_dit_config(cfg)
    for p in model.parameters():  # cast on meta, so the full-size model never exists in fp32
        p.data = p.data.to(dtype)
    model = model.to_empty(device=device)
    init_in_place(model)
    model.rope = WanRotaryPosEmbed(cfg.attention_head_dim, cfg.patch_size, cfg.rope_max_seq_len).to(device)
    return model.eval()


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Latent grid and conditioning sizes of the benchmarked clip."""

    h_lat: int = 448 // 8
    w_lat: int = 896 // 8
    t_lat: int = 21
    frames: int = 81
    text_dim: int = 4096
    image_tokens: int = 257
    image_dim: int = 1280

    @property
    def grid(self) -> tuple[int, int]:
        return self.h_lat // 2, self.w_lat // 2


def bench_conditioning(model, geo: Geometry, device: str):
    """Random conditioning of the right shapes; person 1 = left half of the token grid, person 2 = right half."""
    from engine.multitalk.pipeline import _Conditioning

    gen = torch.Generator(device).manual_seed(0)
    a = model.adapter_cfg
    windows = torch.randn(2, geo.frames, a.window, a.audio_layers, a.audio_dim, device=device, generator=gen)
    gh, gw = geo.grid
    cols = torch.arange(gh * gw, device=device) % gw
    masks = torch.stack(
        [cols < gw // 3, cols >= 2 * gw // 3, (cols >= gw // 3) & (cols < 2 * gw // 3)]
    ).float()
    with torch.no_grad():
        cond = _Conditioning(
            y=torch.randn(1, 20, geo.t_lat, geo.h_lat, geo.w_lat, device=device, generator=gen),
            text={
                k: torch.randn(1, 512, geo.text_dim, device=device, generator=gen)
                for k in ("prompt", "negative")
            },
            image=torch.randn(1, geo.image_tokens, geo.image_dim, device=device, generator=gen),
            audio_tokens=model.encode_audio_tokens(windows),
            null_tokens=model.encode_audio_tokens(torch.zeros_like(windows[:1])),
            token_masks=masks,
        )
    latent = torch.randn(1, 16, geo.t_lat, geo.h_lat, geo.w_lat, device=device, generator=gen)
    return cond, latent


def step_flops(cfg, geo: Geometry, passes: int) -> float:
    """ENGINE.md §6.1 model FLOPs: passes 1-2 carry 2 persons (64 audio tokens, map), pass 3 null audio."""
    frame_tokens = geo.grid[0] * geo.grid[1]
    tokens = geo.t_lat * frame_tokens
    context = 512 + geo.image_tokens
    c = cfg.adapter.context_tokens

    def one(audio_tokens: int, with_map: bool) -> float:
        return dit_flops_per_pass(tokens, frame_tokens, cfg.inner_dim, cfg.ffn_dim, cfg.num_layers, audio_tokens,
                                  context, with_map)  # fmt: skip

    two_person = one(2 * c, True)
    return two_person if passes == 1 else 2 * two_person + one(c, False)


def run_gpu(args: argparse.Namespace) -> dict:
    """The real 14B shape on CUDA in bf16; with --check-on-cpu the same code at the tiny shape on the CPU."""
    from engine.multitalk.pipeline import Components, MultiTalkPipeline
    from engine.multitalk.settings import DiTConfig, EngineSettings
    from engine.multitalk.tiny import tiny_config

    if args.check_on_cpu:
        device, dtype, cfg, n_mm = "cpu", torch.float32, tiny_config().dit, 512
        geo = Geometry(8, 16, 3, 9, 32, 5, 32)
    else:
        device, dtype, cfg, n_mm, geo = "cuda", torch.bfloat16, DiTConfig(), 8192, Geometry()
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (code-path check, tiny shape)"
    report: dict = {
        "device": name,
        "torch": torch.__version__,
        "tokens": geo.t_lat * geo.grid[0] * geo.grid[1],
    }
    report["matmul_tflops"] = rate = matmul_rate(device, dtype, n_mm)
    print(f"device {name}; measured {dtype} matmul {rate:.1f} TFLOPS ({n_mm}^3, median of 20)")
    start = time.perf_counter()
    model = build_model(cfg, device, dtype)
    sync(device)
    report["build_s"] = time.perf_counter() - start
    if device == "cuda":
        report["weights_gib"] = torch.cuda.memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    cond, latent = bench_conditioning(model, geo, device)
    settings = EngineSettings(device=device, dtype="bf16" if dtype == torch.bfloat16 else "fp32")
    pipe = MultiTalkPipeline(Components(model, None, None, None, None, None), settings)
    three, one = ("cond", "drop_text", "uncond"), ("cond",)
    variants = {
        "3pass_batched": (three, True),
        "3pass_sequential": (three, False),
        "1pass": (one, True),
    }
    for variant, (passes, batched) in variants.items():
        if time.perf_counter() - START > args.budget_s:
            print(f"{variant}: skipped (time budget)")
            continue

        def step(passes=passes, batched=batched):
            return pipe._predict(latent, 900.0, passes, cond, batched)

        velocity, _ = step()  # warm-up
        finite = all(torch.isfinite(v).all().item() for v in velocity.values())
        seconds = statistics.median(wall_times(step, args.repeats, device))
        flops = step_flops(cfg, geo, len(passes))
        mfu = flops / seconds / (rate * 1e12)
        report[variant] = {"s_per_step": seconds, "pflop_per_step": flops / 1e15, "mfu_vs_measured": mfu,
                           "mfu_vs_datasheet": flops / seconds / (H100_SXM_BF16_DENSE_TFLOPS * 1e12),
                           "finite": finite}  # fmt: skip
        print(f"{variant:17} {seconds:8.3f} s/step  {flops / 1e15:7.4f} PFLOP  {flops / seconds / 1e12:7.1f} TFLOPS"
              f"  MFU {100 * mfu:5.1f} % of measured matmul  finite={finite}")  # fmt: skip
    if device == "cuda":
        report["peak_allocated_gib"] = peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"peak allocated {peak:.2f} GiB (weights {report['weights_gib']:.2f} GiB); MEMORY.md batch-3 peak "
              f"{MEMORY_MD_BATCH3_PEAK_GIB} GiB for the 40 blocks alone; MFU vs 989 T datasheet in the JSON")  # fmt: skip
    timed = [report[v]["s_per_step"] for v in ("3pass_batched", "3pass_sequential") if v in report]
    if timed and device == "cuda":
        step_s = min(timed)
        print(
            f"3-pass step {step_s:.2f} s; published A100 35 s/step -> {A100_PUBLISHED_S_PER_STEP / step_s:.2f}x; goal <= 12 s"
        )
        if args.floor_json and Path(args.floor_json).is_file():
            floor = json.loads(Path(args.floor_json).read_text())["extrapolation"]["step_3cfg_best_s"]
            report["floor_step_s"], report["ratio_to_floor"] = floor, step_s / floor
            print(
                f"gpu_floor.py extrapolated 3-pass step {floor:.2f} s (480x832 grid); ours / floor = {step_s / floor:.2f}"
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
    parser.add_argument(
        "--check-on-cpu", action="store_true", help="run the --gpu code path at the tiny shape"
    )
    parser.add_argument("--floor-json", default=None, help="gpu_floor.json of the same GPU run")
    parser.add_argument("--budget-s", type=float, default=420.0, help="GPU: skip timings past this wall time")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for engine_bench.json")
    parser.add_argument("--stream", action="store_true", help="CPU: streamed segments, memory vs length")
    parser.add_argument("--seconds", type=float, nargs="+", default=[10.0, 30.0, 60.0])
    parser.add_argument("--mode", default="multitalk", choices=["multitalk", "infinitetalk"])
    parser.add_argument("--stream-one", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stream_one is not None:
        print(json.dumps(stream_one(args.stream_one, args.mode, args.steps, args.threads)))
        return
    if args.stream:
        report = run_stream(args)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            Path(args.out, "engine_stream_bench.json").write_text(json.dumps(report, indent=1))
        return
    if args.gpu and not args.check_on_cpu and not torch.cuda.is_available():
        sys.exit(
            "--gpu needs a CUDA device; none is visible (--check-on-cpu runs the code path at the tiny shape)"
        )
    report = run_gpu(args) if args.gpu or args.check_on_cpu else run_cpu(args)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "engine_bench.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
