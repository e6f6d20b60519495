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
    python bench/engine.py --gpu-stream --floor-json $OUT/gpu_floor.json   # CUDA, real 480p shape
    python bench/engine.py --gpu-stream --shape tiny --device cpu          # the same code path, tiny

`--stream` renders segments of 10, 30 and 60 seconds with the tiny model, each in a fresh process
(ru_maxrss is per process), streamed chunk by chunk into an mp4; it prints the median time per chunk
and the host peak RSS per length, and the ratio of the longest to the shortest (the baseline, measured
in the same run): a ratio near 1 means memory does not grow with length.

`--gpu-stream` renders 2 streamed chunks through the real `MultiTalkPipeline.render` loop: InfiniteTalk V2V
(one person, a synthetic 448x896 mpeg4 video written with PyAV), then, as `--budget-s` allows, the same job as
one chunk (the baseline: the stream's context chunk over the single chunk, ~1 means streaming adds no
per-chunk cost) and MultiTalk I2V (two persons, a still). Every component has its real shape (DiT 14B bf16,
umT5-XXL encoder bf16, CLIP ViT-H/14 bf16, Wan VAE fp32, wav2vec2-base fp32 on the CPU as EngineSettings says),
built on meta, `to_empty` on the device and initialised in place; the tokenizer is tiny.py's (umT5 runs all
512 positions whatever the text). It prints s/chunk, s/step (and s/chunk extrapolated to 40 steps, labelled),
time, peak GPU memory (`max_memory_allocated`) and RSS per component, host peak RSS, and the ratio of s/step to
gpu_floor's extrapolated step (`--floor-json`); JSON in engine_gpu_stream.json. `--shape tiny` runs it with
tiny.py's models on any device (tests/test_bench_engine.py).
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
    from engine.media import ffmpeg_exe
    from engine.multitalk.pipeline import MultiTalkPipeline
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
        with Mp4Writer(Path(tmp) / "segment.mp4", ffmpeg_exe()) as sink:
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
def init_in_place(model: torch.nn.Module, keep_fp32: tuple[str, ...] | None = None) -> None:
    """Random weights that keep activations finite: normal(0, 1/sqrt(fan_in)), norms 1 (the VAE's RMS-norm
    `gamma` too), small modulation; modules named in `keep_fp32` (default: the DiT's, as the loader does) in
    fp32."""
    from engine.multitalk.weights import KEEP_FP32

    keep = KEEP_FP32 if keep_fp32 is None else keep_fp32
    for name, p in model.named_parameters():
        if any(part in keep for part in name.split(".")):
            p.data = p.data.float()
        if "scale_shift_table" in name:
            p.normal_(0, 0.02)
        elif (p.ndim == 1 and name.endswith("weight")) or name.endswith("gamma"):
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
    from engine.multitalk.components import Components
    from engine.multitalk.pipeline import MultiTalkPipeline
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


# -- GPU: streamed chunks through the real pipeline (--gpu-stream) ----------------------------------------
# Real encoder shapes (ENGINE.md §6.1, §7.1): umT5-XXL encoder, CLIP ViT-H/14 vision tower, wav2vec2-base;
# the Wan VAE is diffusers' AutoencoderKLWan with its defaults.
UMT5_XXL = dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, vocab_size=256384,
                feed_forward_proj="gated-gelu")  # fmt: skip
CLIP_VIT_H14 = dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120,
                    patch_size=14, image_size=224, hidden_act="gelu", layer_norm_eps=1e-5)  # fmt: skip
WAV2VEC2_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
STREAM_CHUNKS = 2
REFERENCE_STEPS = 40  # the default step count the measured chunk is extrapolated to
TOKENIZER_NOTE = "tiny word-level tokenizer built in code: umT5 always runs 512 positions, text content does not change timing"


@dataclasses.dataclass(frozen=True)
class StreamShape:
    """Picture size, chunk length and plan tables of one benchmark shape."""

    name: str
    height: int
    width: int
    frame_num: int
    buckets: dict
    motion_frames: dict

    def frames(self, mode: str, chunks: int) -> int:
        """Frames that make exactly `chunks` fresh chunks: F + (chunks - 1)(F - M)."""
        return self.frame_num + (chunks - 1) * (self.frame_num - self.motion_frames[mode])


def stream_shape(name: str) -> StreamShape:
    if name == "tiny":
        from engine.multitalk.tiny import TINY_FRAME_NUM, TINY_MOTION_FRAMES, tiny_config

        return StreamShape("tiny", 64, 128, TINY_FRAME_NUM, tiny_config().buckets, TINY_MOTION_FRAMES)
    from engine.multitalk.settings import BUCKETS, MAX_FRAME_NUM, MOTION_FRAMES

    return StreamShape("real", 448, 896, MAX_FRAME_NUM, BUCKETS, MOTION_FRAMES)


def materialise(factory, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """`factory()` built on meta, cast there, `to_empty` on `device`, initialised in place (no host copy of
    a device model). transformers' `_keep_in_fp32_modules_strict` stay fp32 as `from_pretrained` keeps
    them (`_keep_in_fp32_modules` too under fp16); `position_ids` buffers are refilled, any other buffer
    is an error (to_empty leaves it garbage)."""
    with torch.device("meta"):
        model = factory()
    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16:
        keep |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for p in model.parameters():
        p.data = p.data.to(dtype)
    model = model.to_empty(device=device)
    init_in_place(model, tuple(keep))
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if not name.endswith("position_ids"):
                raise RuntimeError(f"{name}: a buffer the meta build cannot restore")
            buf.copy_(torch.arange(buf.shape[-1], device=buf.device).expand_as(buf))
    return model.eval()


def param_gib(model: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30


def real_components(device: str, dtype: torch.dtype, wav2vec_device: str):
    """Every component at its real shape with random weights; per component build seconds and weight GiB.
    The VAE and wav2vec2 are fp32 as `weights.load_components` loads them (wav2vec2 on `wav2vec_device`)."""
    from diffusers import AutoencoderKLWan
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        UMT5Config,
        UMT5EncoderModel,
        Wav2Vec2Config,
        Wav2Vec2Model,
    )

    from engine.multitalk.audio import Wav2VecEncoder
    from engine.multitalk.components import Components
    from engine.multitalk.settings import DiTConfig
    from engine.multitalk.tiny import tiny_tokenizer

    builders = {
        "dit": lambda: build_model(DiTConfig(), device, dtype),
        "umt5": lambda: materialise(lambda: UMT5EncoderModel(UMT5Config(**UMT5_XXL)), device, dtype),
        "clip": lambda: materialise(lambda: CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_H14)), device, dtype),
        "vae": lambda: materialise(AutoencoderKLWan, device, torch.float32),
        "wav2vec2": lambda: materialise(
            lambda: Wav2Vec2Model(Wav2Vec2Config(**WAV2VEC2_BASE)), wav2vec_device, torch.float32
        ),
    }
    models, built = {}, {}
    for name, build in builders.items():
        start = time.perf_counter()
        models[name] = build()
        sync(device)
        built[name] = {"s": time.perf_counter() - start, "weights_gib": param_gib(models[name])}
    parts = Components(models["dit"], models["vae"], models["umt5"], tiny_tokenizer(), models["clip"],
                       Wav2VecEncoder(models["wav2vec2"]))  # fmt: skip
    return parts, built


def tiny_stream_components(device: str):
    """The tiny components (tiny.py), fp32, moved to `device` (wav2vec2 stays on the CPU)."""
    from engine.multitalk.tiny import tiny_components

    start = time.perf_counter()
    parts = tiny_components(0)
    for name in ("transformer", "vae", "text_encoder", "image_encoder"):
        setattr(parts, name, getattr(parts, name).to(device))
    models = {"dit": parts.transformer, "umt5": parts.text_encoder, "clip": parts.image_encoder,
              "vae": parts.vae, "wav2vec2": parts.wav2vec.model}  # fmt: skip
    built = {name: {"weights_gib": param_gib(m)} for name, m in models.items()}
    built["all"] = {"s": time.perf_counter() - start}
    return parts, built


def write_source_video(path: Path, frames: int, height: int, width: int) -> Path:
    """A synthetic panning picture (blocky random colours, 4 px per frame) as an mpeg4 mp4, via PyAV."""
    import av

    rng = np.random.default_rng(0)
    cell = 16 if height >= 256 else 4
    tile = rng.integers(0, 256, (height // cell + 1, width // cell + 1, 3), dtype=np.uint8)
    base = tile.repeat(cell, 0).repeat(cell, 1)[:height, :width]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            picture = np.ascontiguousarray(np.roll(base, 4 * i, axis=1))
            for packet in stream.encode(av.VideoFrame.from_ndarray(picture, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def stream_job(mode: str, shape: StreamShape, frames: int, steps: int, video: Path):
    """InfiniteTalk: V2V from `video`, one person; MultiTalk: I2V from a still, two persons (left, right)."""
    from engine.base import Box, PersonInput, RenderJob

    rng = np.random.default_rng(1)
    samples = int((frames / 25 + 0.5) * 16_000)
    t = np.arange(samples) / 16_000
    voices = [(0.1 * np.sin(2 * np.pi * f * t) + 0.02 * rng.standard_normal(samples)).astype(np.float32)
              for f in (220, 330)]  # fmt: skip
    h, w = shape.height, shape.width
    if mode == "infinitetalk":
        persons, source = (PersonInput(voices[0]),), video
    else:
        boxes = (Box(0, 0, w // 2, h), Box(w // 2, 0, w, h))
        persons = tuple(PersonInput(v, b) for v, b in zip(voices, boxes, strict=True))
        source = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return RenderJob(source=source, persons=persons, prompt="a person talks to the camera", mode=mode,
                     num_frames=frames, frame_num=shape.frame_num, steps=steps, size=480)  # fmt: skip


def _first_tensor(out) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out:
        return _first_tensor(out[0])
    return (
        _first_tensor(getattr(out, "last_hidden_state", None)) if hasattr(out, "last_hidden_state") else None
    )


def finite_watch(parts) -> dict[str, dict[str, int]]:
    """Forward hooks counting calls and calls with a non-finite output per component (random weights must keep
    activations finite, or the timings mean nothing)."""
    modules = {"dit": parts.transformer, "umt5": parts.text_encoder, "clip": parts.image_encoder,
               "vae_encoder": parts.vae.encoder, "vae_decoder": parts.vae.decoder,
               "wav2vec2": parts.wav2vec.model.encoder.layers[-1]}  # fmt: skip
    counts = {name: {"calls": 0, "nonfinite": 0} for name in modules}

    def hook(name):
        def count(module, args, out):
            tensor = _first_tensor(out)
            counts[name]["calls"] += 1
            counts[name]["nonfinite"] += int(tensor is not None and not bool(torch.isfinite(tensor).all()))

        return count

    for name, module in modules.items():
        module.register_forward_hook(hook(name))
    return counts


def rss_gib() -> float | None:
    """Current resident set size (Linux /proc), GiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measured_render(pipe, job, device: str) -> dict:
    """One render through `MultiTalkPipeline.render` with a progress hook that splits the wall time and the
    GPU peak per component (audio, encode, denoise, decode) and per chunk; frames go to a counting sink."""
    cuda = device == "cuda"
    stages = ("audio", "encode", "denoise", "decode")
    stage_s = dict.fromkeys(stages, 0.0)
    stage_peak: dict[str, float | None] = dict.fromkeys(stages, None)
    stage_rss: dict[str, float | None] = dict.fromkeys(stages, None)
    chunk_s: dict[int, float] = {}
    step_s: list[float] = []
    emitted = [0]
    last = [time.perf_counter()]

    def progress(stage: str, done: int, total: int, **info) -> None:
        sync(device)  # attribute GPU work to the stage that queued it
        now = time.perf_counter()
        dt, last[0] = now - last[0], now
        stage_s[stage] += dt
        if stage == "denoise":
            step_s.append(dt)
        if stage != "audio":
            chunk = info.get("chunk", done - 1)
            chunk_s[chunk] = chunk_s.get(chunk, 0.0) + dt
        if cuda:
            peak = torch.cuda.max_memory_allocated() / 2**30
            stage_peak[stage] = max(stage_peak[stage] or 0.0, peak)
            torch.cuda.reset_peak_memory_stats()
        stage_rss[stage] = max(stage_rss[stage] or 0.0, rss_gib() or 0.0)
        if stage != "audio":  # live, so a run cut short by `timeout` still shows how far it got
            print(f"    {stage:8} {done}/{total}  {dt:8.3f} s", flush=True)

    def sink(frames: np.ndarray) -> None:
        emitted[0] += len(frames)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = pipe.render(job, progress=progress, sink=sink)
    sync(device)
    wall = time.perf_counter() - start
    chunks = [chunk_s[k] for k in sorted(chunk_s)]
    peaks = [p for p in stage_peak.values() if p is not None]
    return {
        "mode": job.mode, "persons": len(job.persons), "frames": emitted[0], "num_frames": out.num_frames,
        "chunks": len(out.plan.chunks), "steps": job.steps, "wall_s": wall,
        "s_per_chunk": wall / len(out.plan.chunks), "chunk_s": chunks,
        "s_per_step": statistics.median(step_s), "step_s": step_s,
        "stage_s": stage_s, "pipeline_timings": out.timings,
        "peak_gpu_allocated_gib": max(peaks) if peaks else None, "stage_peak_gpu_allocated_gib": stage_peak,
        "stage_rss_gib": stage_rss,
        "cfg_batched": out.info.get("cfg_batched"), "passes": list(out.info.get("passes", ())),
        "forwards_last_chunk": out.info.get("forwards"), "size": [out.framing.height, out.framing.width],
    }  # fmt: skip


def extrapolate_chunk(run: dict, steps: int = REFERENCE_STEPS) -> float:
    """The last (steady, context-conditioned) chunk with `steps` denoising steps instead of the measured
    ones: chunk time + (steps - measured steps) x median step time. An extrapolation, not a measurement."""
    return run["chunk_s"][-1] + (steps - run["steps"]) * run["s_per_step"]


def print_run(label: str, run: dict) -> None:
    print(f"{label}: {run['mode']} {run['size'][0]}x{run['size'][1]}, {run['persons']} person(s), {run['frames']} "
          f"frames, {run['chunks']} chunk(s) x {run['steps']} steps, passes {run['passes']} "
          f"(batched={run['cfg_batched']}): wall {run['wall_s']:.2f} s")  # fmt: skip
    chunks = ", ".join(f"{s:.2f}" for s in run["chunk_s"])
    print(f"  {run['s_per_chunk']:.3f} s/chunk (wall / chunks; per chunk {chunks} s), "
          f"{run['s_per_step']:.3f} s/step (median of {len(run['step_s'])})")  # fmt: skip
    print(f"  extrapolated (not measured) to {REFERENCE_STEPS} steps: {extrapolate_chunk(run):.2f} s/chunk "
          f"(last chunk + {REFERENCE_STEPS - run['steps']} x s/step)")  # fmt: skip
    for stage in ("audio", "encode", "denoise", "decode"):
        peak = run["stage_peak_gpu_allocated_gib"][stage]
        peak_text = f"peak GPU {peak:7.2f} GiB" if peak is not None else "peak GPU    n/a"
        print(
            f"  {stage:8} {run['stage_s'][stage]:8.3f} s   {peak_text}   RSS {run['stage_rss_gib'][stage] or 0:6.2f} GiB"
        )


def run_gpu_stream(args: argparse.Namespace, save=lambda report: None) -> dict:
    """2 streamed chunks through `MultiTalkPipeline.render` (InfiniteTalk V2V, then the 1-chunk baseline and
    MultiTalk I2V as the budget allows): at the real 480p shape with random weights on CUDA, or `--shape
    tiny` (tiny.py) on any device to check the same code path. `save(report)` runs after the build and after
    every render, so a run stopped by its `timeout` leaves what it measured."""
    import tempfile

    from engine.multitalk.pipeline import MultiTalkPipeline
    from engine.multitalk.settings import EngineSettings

    device = args.device or ("cuda" if args.shape == "real" else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit(
            "--gpu-stream on cuda needs a CUDA device; none is visible (--shape tiny --device cpu runs the path)"
        )
    if device == "cpu":
        torch.set_num_threads(args.threads)
    shape = stream_shape(args.shape)
    real = shape.name == "real"
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    report: dict = {"device": name, "device_type": device, "shape": shape.name, "steps": args.steps,
                    "chunks_requested": STREAM_CHUNKS, "versions": versions(), "tokenizer": TOKENIZER_NOTE,
                    "weights": "random (meta build, to_empty, init in place)" if real else "tiny random (tiny.py)",
                    "sink": "frames counted, not encoded"}  # fmt: skip
    start = time.perf_counter()
    if real:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        parts, built = real_components(device, dtype, args.wav2vec_device)
        settings = EngineSettings(device=device, dtype="bf16" if dtype == torch.bfloat16 else "fp32",
                                  wav2vec_device=args.wav2vec_device)  # fmt: skip
    else:
        parts, built = tiny_stream_components(device)
        settings = EngineSettings(device=device, dtype="fp32")
    report["build"] = {"s": time.perf_counter() - start, "components": built, "rss_gib": rss_gib()}
    report["runs"] = runs = {}
    if device == "cuda":
        report["build"]["gpu_allocated_gib"] = torch.cuda.memory_allocated() / 2**30
    print(f"device {name}; {shape.name} shape; built in {report['build']['s']:.1f} s: "
          + ", ".join(f"{k} {v['weights_gib'] * 1024:.1f} MiB" for k, v in built.items() if "weights_gib" in v))  # fmt: skip
    report["finite"] = finite_watch(parts)  # filled in as the renders run
    save(report)
    pipe = MultiTalkPipeline(parts, settings, shape.buckets, shape.motion_frames)
    with tempfile.TemporaryDirectory() as tmp:
        main_mode, *others = args.modes
        longest = max(shape.frames(m, STREAM_CHUNKS) for m in args.modes)
        start = time.perf_counter()
        video = write_source_video(Path(tmp) / "source.mp4", longest + 8, shape.height, shape.width)
        report["source"] = {"video": [shape.height, shape.width, longest + 8], "codec": "mpeg4",
                            "s": time.perf_counter() - start}  # fmt: skip
        plan = [(f"{main_mode}_{STREAM_CHUNKS}chunks", main_mode, STREAM_CHUNKS),
                (f"{main_mode}_1chunk_baseline", main_mode, 1),
                *((f"{m}_{STREAM_CHUNKS}chunks", m, STREAM_CHUNKS) for m in others)]  # fmt: skip
        for label, mode, chunks in plan:
            left = args.budget_s - (time.perf_counter() - START)
            if runs and left < 1.2 * chunks * runs[plan[0][0]]["chunk_s"][-1]:
                print(f"{label}: skipped (time budget: {left:.0f} s left)")
                runs[label] = {"skipped": f"time budget ({left:.0f} s left)"}
                continue
            job = stream_job(mode, shape, shape.frames(mode, chunks), args.steps, video)
            try:
                runs[label] = run = measured_render(pipe, job, device)
            except Exception as exc:  # report what broke, keep what was measured
                runs[label] = {"error": f"{type(exc).__name__}: {exc}"}
                print(f"{label}: FAILED {type(exc).__name__}: {exc}")
                if label == plan[0][0]:
                    break
                continue
            print_run(label, run)
            save(report)
    report["peak_rss_gib"] = peak_rss_gib()
    main = runs.get(plan[0][0], {})
    if "error" not in main:
        report.update(
            chunks=main["chunks"], frames=main["frames"], s_per_chunk=main["s_per_chunk"],
            s_per_chunk_steady=main["chunk_s"][-1], s_per_step=main["s_per_step"],
            s_per_chunk_40_steps_extrapolated=extrapolate_chunk(main),
            peak_gpu_allocated_gib=main["peak_gpu_allocated_gib"],
        )  # fmt: skip
        base = runs.get(plan[1][0], {})
        if "chunk_s" in base:
            report["baseline"] = {
                "what": "the same job as one chunk: ratio of the stream's last (context) chunk to it; ~1 means "
                "streaming adds no per-chunk cost",
                "chunk_ratio": main["chunk_s"][-1] / base["chunk_s"][0],
                "step_ratio": main["s_per_step"] / base["s_per_step"],
            }  # fmt: skip
            print(f"baseline (same run, 1-chunk render): stream chunk / 1-chunk = {report['baseline']['chunk_ratio']:.3f}, "
                  f"s/step ratio {report['baseline']['step_ratio']:.3f}")  # fmt: skip
        if args.floor_json and Path(args.floor_json).is_file():
            floor = json.loads(Path(args.floor_json).read_text())["extrapolation"]["step_3cfg_best_s"]
            report["floor_step_s"], report["ratio_step_to_floor"] = floor, main["s_per_step"] / floor
            print(f"gpu_floor.py extrapolated 3-pass step {floor:.2f} s (480x832, 2 persons + map); "
                  f"this s/step / floor = {report['ratio_step_to_floor']:.2f}")  # fmt: skip
    bad = {k: v for k, v in report["finite"].items() if v["nonfinite"]}
    print(f"host peak RSS {report['peak_rss_gib']:.2f} GiB; non-finite outputs: {bad or 'none'}")
    return report


def versions() -> dict[str, str]:
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "tokenizers", "av", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "missing"
    return out


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
    parser.add_argument(
        "--gpu-stream",
        action="store_true",
        help="2 streamed chunks through the real pipeline (real 480p shape, random weights)",
    )
    parser.add_argument(
        "--shape", default="real", choices=["real", "tiny"], help="--gpu-stream: model shapes"
    )
    parser.add_argument("--device", default=None, help="--gpu-stream: cuda (real) / cpu (tiny) by default")
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["infinitetalk", "multitalk"],
        choices=["infinitetalk", "multitalk"],
        help="--gpu-stream: first is measured, rest if time",
    )
    parser.add_argument("--wav2vec-device", default="cpu", help="--gpu-stream: as EngineSettings (cpu, fp32)")
    parser.add_argument(
        "--speed", action="store_true", help="CPU: each speed feature against the plain render"
    )
    parser.add_argument("--with-compile", action="store_true", help="--speed: also regional compile (slow)")
    parser.add_argument(
        "--gpu-speed",
        action="store_true",
        help="real 14B shape: bf16 -> LoRA 1 pass -> TeaCache -> fp8 -> compile",
    )
    args = parser.parse_args()
    if args.speed or args.gpu_speed:
        from bench.engine_speed import run_cpu_speed, run_gpu_speed

        if args.gpu_speed and not args.check_on_cpu and not torch.cuda.is_available():
            sys.exit("--gpu-speed needs a CUDA device (--check-on-cpu runs the code path at the tiny shape)")
        report = run_gpu_speed(args) if args.gpu_speed else run_cpu_speed(args)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            name = "engine_gpu_speed.json" if args.gpu_speed else "engine_speed.json"
            Path(args.out, name).write_text(json.dumps(report, indent=1, default=str))
        return
    if args.stream_one is not None:
        print(json.dumps(stream_one(args.stream_one, args.mode, args.steps, args.threads)))
        return
    if args.gpu_stream:

        def save(report: dict) -> None:
            if args.out:
                Path(args.out).mkdir(parents=True, exist_ok=True)
                Path(args.out, "engine_gpu_stream.json").write_text(json.dumps(report, indent=1, default=str))

        report = run_gpu_stream(args, save)
        save(report)
        if "s_per_chunk" not in report:
            sys.exit("--gpu-stream: the streamed render failed (see the report)")
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
