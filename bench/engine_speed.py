#!/usr/bin/env python3
"""Engine speed features against the plain engine, measured side by side in one run.

CPU (`python bench/engine.py --speed`): the tiny config's full render (2 persons, 9 frames, 8 steps) with
each feature alone, interleaved run by run with the plain 3-pass render (the baseline): TeaCache, a LoRA
merged / unmerged, int8 blocks, block offload, one guidance pass (text and audio scale 1), optionally regional
compile (`--with-compile`: inductor needs ~1 min to compile on the CPU), and the distilled setting with
every feature. Prints denoise and total ms, the ratio to the baseline, TeaCache skips, and how far the frames
moved (mean |difference| in uint8 levels).

GPU (`python bench/engine.py --gpu-speed --floor-json $OUT/gpu_floor.json`, bench/engine_gpu.sh): the real
14B DiT shape with random bf16 weights, 448x896, 81 frames (32 928 tokens), two persons. In one process, each
step adding a feature to the last: bf16 3 passes; bf16 1 pass with a rank-32 LoRA merged into every block
linear (the distilled sampler); + TeaCache over an 8-step schedule; + fp8 blocks (torch._scaled_mm); +
regional compile; the whole distilled chunk (8 steps, 1 pass, TeaCache, fp8, compile); then block offload
within 24 GB. s/step, peak GPU memory, model FLOPs, MFU against the measured bf16 matmul and the ratio to
gpu_floor.py's step; the goal (< 15 s per chunk, DiT) and how far a 22-minute episode is from real time on an
8-GPU node. `--check-on-cpu` runs the same code at the tiny shape (fp8 on its dequantising path).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from bench.engine import (
    Geometry,
    bench_conditioning,
    build_model,
    matmul_rate,
    step_flops,
    sync,
    tiny_job,
    wall_times,
)

TEACACHE = {"teacache": 0.3, "teacache_warmup": 2}
DISTILLED = {"text_scale": 1.0, "audio_scale": 1.0}
DISTILLED_STEPS = 8
GOAL_CHUNK_S = 15.0
EPISODE_S = 22 * 60
NEW_FRAMES_PER_CHUNK = 81 - 25  # MultiTalk: 25 motion frames carried
OFFLOAD_CARD_GIB = 24.0
# TeaCache with a zero rescale polynomial: every step after the warm-up is a cache hit. Random weights move the
# timestep projection 30 % a step (the trained model: a few %), so the fitted polynomial never skips on them;
# this setting measures what a skipped step costs, not how often the real model skips.
FORCED = "teacache, hits forced"
ZERO = (0.0,)


@contextlib.contextmanager
def forced_hits(active: bool) -> Iterator[None]:
    from engine.multitalk import teacache

    saved = dict(teacache.COEFFICIENTS)
    if active:
        teacache.COEFFICIENTS.update({size: ZERO for size in saved})
    try:
        yield
    finally:
        teacache.COEFFICIENTS.update(saved)


# -- CPU ------------------------------------------------------------------------------------------------
def cpu_features(lora: Path, with_compile: bool) -> dict[str, tuple[dict, dict]]:
    """feature -> (engine settings, job changes)."""
    from engine.multitalk.lora import LoraSpec

    loras = (LoraSpec(lora, 1.0),)
    features = {
        "plain (3 passes)": ({}, {}),
        "teacache 0.3": ({}, TEACACHE),
        FORCED: ({}, TEACACHE),
        "lora merged": ({"loras": loras}, {}),
        "lora unmerged": ({"loras": loras, "lora_merge": False}, {}),
        "int8 blocks": ({"quantize": "int8"}, {}),
        "block offload": ({"offload": "blocks"}, {}),
        "one pass (scales 1)": ({}, DISTILLED),
        "distilled, all": ({"loras": loras, "quantize": "int8"}, {**DISTILLED, **TEACACHE}),
    }
    if with_compile:
        features["compile"] = ({"compile": True}, {})
    return features


def run_cpu_speed(args) -> dict:
    from engine.multitalk.pipeline import MultiTalkPipeline
    from engine.multitalk.tiny import (
        TINY_MOTION_FRAMES,
        tiny_components,
        tiny_config,
        tiny_settings,
        write_tiny_lora,
    )

    torch.set_num_threads(args.threads)
    parts = tiny_components(0)
    lora = Path(tempfile.mkdtemp()) / "lora.safetensors"
    write_tiny_lora(lora, parts.transformer, "lightx2v")
    base_job = tiny_job(2, DISTILLED_STEPS)
    pipes, jobs = {}, {}
    for name, (settings, changes) in cpu_features(lora, args.with_compile).items():
        own = dataclasses.replace(parts, transformer=copy.deepcopy(parts.transformer))
        pipes[name] = MultiTalkPipeline(
            own, tiny_settings(**settings), tiny_config().buckets, TINY_MOTION_FRAMES
        )
        jobs[name] = dataclasses.replace(base_job, **changes)
    outputs = {}
    for name, pipe in pipes.items():  # warm-up (and compile)
        with forced_hits(name == FORCED):
            outputs[name] = pipe.render(jobs[name])
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in pipes}
    for _ in range(args.repeats):
        for name, pipe in pipes.items():
            with forced_hits(name == FORCED):
                start = time.perf_counter()
                out = pipe.render(jobs[name])
            runs[name].append({**out.timings, "total": time.perf_counter() - start})
    plain_name = next(iter(pipes))
    medians = {
        n: {k: statistics.median(r[k] for r in rs) for k in ("denoise", "total")} for n, rs in runs.items()
    }
    plain, plain_frames = medians[plain_name], outputs[plain_name].frames.float()
    print(f"tiny render, 2 persons, 9 frames 64x128, {DISTILLED_STEPS} steps; median of {args.repeats}, interleaved;"
          f" baseline = {plain_name}")  # fmt: skip
    report = {"device": "cpu", "threads": args.threads, "steps": DISTILLED_STEPS, "features": {}}
    for name, m in medians.items():
        moved = (outputs[name].frames.float() - plain_frames).abs().mean().item()
        skips = outputs[name].info.get("teacache", {}).get("skipped_total")
        report["features"][name] = {**m, "denoise_ratio": m["denoise"] / plain["denoise"],
                                    "total_ratio": m["total"] / plain["total"], "mean_abs_diff": moved,
                                    "teacache_skipped": skips}  # fmt: skip
        extra = f"  TeaCache skipped {skips} forwards" if skips is not None else ""
        print(f"  {name:22} denoise {m['denoise'] * 1e3:7.1f} ms ({m['denoise'] / plain['denoise']:4.2f}x)"
              f"  total {m['total'] * 1e3:7.1f} ms ({m['total'] / plain['total']:4.2f}x)"
              f"  frames moved {moved:5.2f} levels{extra}")  # fmt: skip
    return report


# -- GPU (or its code path on the CPU) -----------------------------------------------------------------
def denoise(pipe, cond, latent, steps: int, passes: tuple[str, ...], cache=None) -> torch.Tensor:
    """The sampler loop of the pipeline (Euler, CFG), for a chunk of `steps` steps."""
    from engine.multitalk.guidance import combine_cfg
    from engine.multitalk.schedule import euler_step, make_schedule

    schedule = make_schedule(steps, 5.0)
    x = latent
    for i in range(steps):
        v, _ = pipe._predict(x, schedule.timestep(i), passes, cond, True, (cache, i))
        scales = (5.0, 4.0) if len(passes) == 3 else (1.0, 1.0)
        x = euler_step(x, combine_cfg(v, *scales), schedule.sigmas[i], schedule.sigmas[i + 1])
    return x


def random_lora(model, rank: int, device: str) -> dict:
    """A random rank-`rank` delta for every linear of the blocks' attention and FFN (a distillation's reach)."""
    from engine.multitalk.lora import LoraDelta

    gen = torch.Generator(device).manual_seed(1)
    deltas = {}
    for name, module in model.named_modules():
        if (
            isinstance(module, torch.nn.Linear)
            and name.startswith("blocks.")
            and "audio_cross_attn" not in name
        ):
            out_f, in_f = module.weight.shape
            down = torch.randn(rank, in_f, device=device, generator=gen) / in_f**0.5
            up = torch.randn(out_f, rank, device=device, generator=gen) * 1e-3
            deltas[name] = (module, LoraDelta(down=down, up=up, alpha=float(rank)))
    return deltas


class GpuSpeedBench:
    def __init__(self, args):
        from engine.multitalk.components import Components
        from engine.multitalk.pipeline import MultiTalkPipeline
        from engine.multitalk.settings import DiTConfig, EngineSettings
        from engine.multitalk.tiny import tiny_config

        self.args, self.start = args, time.perf_counter()
        if args.check_on_cpu:
            self.device, dtype, self.cfg, n_mm = "cpu", torch.float32, tiny_config().dit, 512
            self.geo = Geometry(8, 16, 3, 9, 32, 5, 32)
        else:
            self.device, dtype, self.cfg, n_mm, self.geo = (
                "cuda",
                torch.bfloat16,
                DiTConfig(),
                8192,
                Geometry(),
            )
        self.cuda = self.device == "cuda"
        name = torch.cuda.get_device_name() if self.cuda else "cpu (code-path check, tiny shape)"
        self.rate = matmul_rate(self.device, dtype, n_mm)
        self.report: dict = {
            "device": name,
            "torch": torch.__version__,
            "matmul_tflops": self.rate,
            "settings": {},
        }
        print(f"device {name}; measured matmul {self.rate:.1f} TFLOPS ({n_mm}^3)")
        self.model = build_model(self.cfg, self.device, dtype)
        settings = EngineSettings(device=self.device, dtype="bf16" if dtype == torch.bfloat16 else "fp32")
        self.pipe = MultiTalkPipeline(Components(self.model, None, None, None, None, None), settings)
        self.cond, self.latent = bench_conditioning(self.model, self.geo, self.device)
        self.floor = None
        if args.floor_json and Path(args.floor_json).is_file():
            self.floor = json.loads(Path(args.floor_json).read_text())["extrapolation"]["step_3cfg_best_s"]

    def save(self) -> None:
        """The report so far (a timeout keeps what was measured)."""
        if self.args.out:
            Path(self.args.out).mkdir(parents=True, exist_ok=True)
            Path(self.args.out, "engine_gpu_speed.json").write_text(
                json.dumps(self.report, indent=1, default=str)
            )

    def over_budget(self, what: str) -> bool:
        if time.perf_counter() - self.start > self.args.budget_s:
            print(f"{what}: skipped (time budget)")
            return True
        return False

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None

    def record(self, name: str, seconds: float, passes: int, **extra) -> dict:
        """s/step (`seconds` per step of `passes` passes, effective when steps were skipped), FLOPs, MFU."""
        flops = step_flops(self.cfg, self.geo, passes)
        row = {"s_per_step": seconds, "passes": passes, "pflop_per_step": flops / 1e15,
               "mfu_vs_measured": flops / seconds / (self.rate * 1e12), "peak_gib": self.peak_gib(), **extra}  # fmt: skip
        if self.floor:
            row["ratio_to_floor"] = seconds / (self.floor * passes / 3)  # the floor's step is 3 passes
        self.report["settings"][name] = row
        self.save()
        peak = f"  peak {row['peak_gib']:6.2f} GiB" if row["peak_gib"] is not None else ""
        floor = f"  floor x{row['ratio_to_floor']:.2f}" if "ratio_to_floor" in row else ""
        notes = "  " + ", ".join(f"{k} {v}" for k, v in extra.items()) if extra else ""
        print(
            f"{name:34} {seconds:8.3f} s/step  MFU {100 * row['mfu_vs_measured']:5.1f} %{peak}{floor}{notes}"
        )
        return row

    def one_step(self, passes: tuple[str, ...]) -> float:
        def step():
            return self.pipe._predict(self.latent, 900.0, passes, self.cond, True)

        step()  # warm-up (and compilation)
        return statistics.median(wall_times(step, self.args.repeats, self.device))

    def chunk(
        self, passes: tuple[str, ...], teacache: bool, forced: bool = False
    ) -> tuple[float, dict | None]:
        """Seconds for a DISTILLED_STEPS chunk's denoising (cache fresh per chunk), and the cache counts;
        `forced`: every step after the warm-up a cache hit (the cost of a hit)."""
        from engine.multitalk.teacache import TeaCache, coefficients_for

        coefficients = ZERO if forced else coefficients_for(480)
        cache = (
            TeaCache(TEACACHE["teacache"], TEACACHE["teacache_warmup"], coefficients) if teacache else None
        )
        sync(self.device)
        start = time.perf_counter()
        denoise(self.pipe, self.cond, self.latent, DISTILLED_STEPS, passes, cache)
        sync(self.device)
        return time.perf_counter() - start, cache.summary() if cache else None

    def run(self) -> dict:
        from engine.multitalk.lora import merge_delta
        from engine.multitalk.quantize import quantize_blocks

        three, one = ("cond", "drop_text", "uncond"), ("cond",)
        self.reset_peak()
        self.record("bf16, 3 passes", self.one_step(three), 3)
        start = time.perf_counter()
        for module, delta in random_lora(self.model, 32, self.device).values():
            merge_delta(module, delta, 1.0)
        merge_s = time.perf_counter() - start
        self.reset_peak()
        self.record("distilled LoRA (merged), 1 pass", self.one_step(one), 1, lora_merge_s=round(merge_s, 2))
        if not self.over_budget("TeaCache"):
            seconds, counts = self.chunk(one, teacache=True)
            self.record("+ TeaCache 0.3 (8-step chunk)", seconds / DISTILLED_STEPS, 1,
                        skipped=counts["skipped_total"])  # fmt: skip
            seconds, counts = self.chunk(one, teacache=True, forced=True)
            self.record(f"  {FORCED} (8-step chunk)", seconds / DISTILLED_STEPS, 1,
                        skipped=counts["skipped_total"])  # fmt: skip
        if not self.over_budget("fp8"):
            start = time.perf_counter()
            layers = quantize_blocks(self.model, "fp8", self.device)
            sync(self.device)
            self.reset_peak()
            self.record("+ fp8 blocks, 1 pass", self.one_step(one), 1, layers=layers,
                        quantize_s=round(time.perf_counter() - start, 1))  # fmt: skip
        if not self.over_budget("compile"):
            self.model.block_fn = torch.compile(self.model._block)
            start = time.perf_counter()
            self.pipe._predict(self.latent, 900.0, one, self.cond, True)
            sync(self.device)
            self.record("+ regional compile, 1 pass", self.one_step(one), 1,
                        compile_s=round(time.perf_counter() - start, 1))  # fmt: skip
        if not self.over_budget("distilled chunk"):
            self.all_features(one)
        if not self.over_budget("offload"):
            self.offload(one)
        return self.report

    def all_features(self, one: tuple[str, ...]) -> None:
        seconds, counts = self.chunk(one, teacache=True)
        self.report["distilled_chunk_s"] = seconds
        gpu_s_per_video_s = seconds / (NEW_FRAMES_PER_CHUNK / 25)
        node_factor = gpu_s_per_video_s / 8
        self.report.update(gpu_s_per_video_s=gpu_s_per_video_s, episode_node_factor=node_factor)
        print(f"distilled chunk ({DISTILLED_STEPS} steps, 1 pass, TeaCache, fp8, compile): {seconds:.2f} s of DiT "
              f"(goal < {GOAL_CHUNK_S:g} s: {'met' if seconds < GOAL_CHUNK_S else 'missed'}; "
              f"{counts['skipped_total']} of {DISTILLED_STEPS} forwards skipped)")  # fmt: skip
        print(f"  {gpu_s_per_video_s:.1f} GPU-s per second of video ({NEW_FRAMES_PER_CHUNK} new frames per chunk;"
              f" reference defaults on an A100: > 400); a {EPISODE_S // 60}-minute episode on one 8-GPU node:"
              f" {EPISODE_S * node_factor / 60:.1f} min, {node_factor:.2f}x its running time (DiT only; VAE"
              f" and encoders add ~3.4 s per chunk by engine/memory.py)")  # fmt: skip

    def offload(self, one: tuple[str, ...]) -> None:
        from engine.multitalk.offload import BlockOffloader

        self.model.block_fn = self.model._block  # eager: the streamed tensors change under the blocks
        start = time.perf_counter()
        self.model.offloader = BlockOffloader(self.model.blocks, self.device, resident=0)
        setup_s = time.perf_counter() - start
        if self.cuda:
            torch.cuda.empty_cache()
        self.reset_peak()
        row = self.record("block offload (fp8), 1 pass", self.one_step(one), 1, setup_s=round(setup_s, 1),
                          copies=self.model.offloader.copies)  # fmt: skip
        if row["peak_gib"] is not None:
            fits = row["peak_gib"] + 1.0 < OFFLOAD_CARD_GIB  # + CUDA context
            print(f"  offload peak {row['peak_gib']:.2f} GiB + ~1 GiB context: "
                  f"{'within' if fits else 'over'} {OFFLOAD_CARD_GIB:g} GB")  # fmt: skip
        self.model.offloader = None


def run_gpu_speed(args) -> dict:
    return GpuSpeedBench(args).run()
