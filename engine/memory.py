"""Memory and time model of one render segment: the numbers the segment planner sizes segments with.

Every coefficient below comes from ../shared/MEMORY.md (one H100 80GB run, random bf16 weights of the real
Wan 2.1 I2V-14B + MultiTalk shapes) unless its comment says "estimate"; the section is named next to it.
Nothing here was re-measured on a GPU for dubflow's own engine yet: when one is available, re-run
../shared/bench/gpu_memory.py against engine/multitalk and replace the constants (one place).

The engine streams chunks of F = 4n+1 frames (ENGINE.md §5.1), so its GPU peak is set by the chunk, not by the
segment length; what grows with length is whatever the engine keeps of the decoded frames. The reference
keeps every frame as fp32 in host RAM (4.57 MiB per frame at 480p), which is what ran the walkthrough out of RAM.
No Prefect and no torch at import: plain arithmetic the planner and `dubflow plan` can call anywhere
(worker_memory imports torch lazily to ask the GPU what is free).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Literal

from engine.multitalk.settings import MOTION_FRAMES

GiB = 2**30
MiB = 2**20

# MEMORY.md "Numbers": DiT video tokens per latent frame (patch 2x2 on the VAE's 8x-downsampled latent).
TOKENS_PER_LATENT_FRAME = {480: 1_560, 720: 3_600}
# MEMORY.md "What this means for segments": one decoded RGB frame, fp32 and uint8.
FRAME_BYTES_FP32 = {480: int(4.57 * MiB), 720: int(10.55 * MiB)}
FRAME_BYTES_UINT8 = {480: int(1.14 * MiB), 720: int(2.64 * MiB)}

# MEMORY.md "Proposed memory model", all in GiB.
CUDA_CONTEXT = 1.0  # C0: 0.5 measured in use before the first allocation + an allowance
BLOCK_WEIGHTS = 34.59 / 40  # one DiT block in bf16 ("Full 40-block DiT", weights row)
# Patch/text/time/CLIP embeddings, head, AudioProjModel: computed from their shapes, not measured.
NON_BLOCK_WEIGHTS = 0.6
DIT_BLOCKS = 40
OFFLOAD_IN_FLIGHT = 2  # block offload (engine/multitalk/offload.py): the running block + the one prefetched
VAE_WEIGHTS = {"bf16": 0.24, "fp32": 0.47}  # "Method", VAE paragraph
CONDITIONING = 0.1  # latents and conditioning: "< 0.1"
# Peak beyond the weights per token (B = 1): "Fitted coefficients". Reserved is what decides OOM with the default
# allocator; compiled reserved is an estimate: the compiled allocated figure (1.0e-4) times the measured
# reserved/allocated ratio of eager (2.09/1.45).
DIT_PER_TOKEN = {"eager": 2.09e-4, "compiled": 1.0e-4 * 2.09 / 1.45}
DIT_CONSTANT = 0.16
# VAE decode at 480p, reserved: V0 + v1 * T_lat ("Proposed memory model", V0/v1). 720p: x2.3, extrapolated.
VAE_DECODE = {("bf16", False): (6.7, 0.009), ("fp32", False): (12.6, 0.018), ("bf16", True): (1.5, 0.0)}
VAE_720_FACTOR = 2.3
# fp8/int8 block weights against bf16: engine/multitalk/quantize.py stores the blocks' base linears in one byte
# (16.1 of the blocks' 18.6 B parameters) and keeps the audio adapter's layers (2.5 B, swapped per job) and the
# norms in bf16: (16.1 * 1 + 2.5 * 2) / (18.6 * 2) = 0.57. Non-block weights stay bf16. Counted, not measured.
QUANTIZED_WEIGHT_FACTOR = 0.57
# Host: MEMORY.md "Host RAM" max RSS floor (python, torch, CUDA libraries, diffusers; no host weights).
HOST_FLOOR = 1.87
ENCODERS_ON_HOST = 10.6 + 1.2  # T5-XXL bf16 (ENGINE.md §6.1: 11.4 GB) + CLIP ViT-H (MEMORY.md P): estimates

# Time, H100, seconds. DiT forward (40 blocks, B = 1, eager): t = a*(N/1000) + b*(N/1000)^2 ("Fitted coefficients");
# time is linear in B; compiled is about 0.75x (gpu-floor.md, at 480p).
DIT_SECONDS = (0.077, 0.00154)
COMPILED_TIME_FACTOR = 0.75
VAE_DECODE_S_PER_LATENT = {"bf16": 0.10, "fp32": 0.155}  # "Wan VAE" table
VAE_ENCODE_S_PER_CHUNK = {"bf16": 1.30, "fp32": 2.01}  # re-encode of the conditioning frames, 81 frames
VAE_TILED_TIME_FACTOR = 2.3  # "Tiling cuts the decode transient by 4.7x and costs 2.3x the time"
VAE_720_TIME_FACTOR = 2.31  # pixels ratio; extrapolated
PCIE_BYTES_PER_S = 25e9  # effective PCIe 4.0 x16 for streamed blocks: an estimate, not measured
SEGMENT_OVERHEAD_S = 3.0  # per segment: wav2vec2 + text encoding + job setup: an estimate, not measured

# The engine's chunk F (ENGINE.md §5.1: 81 frames, 3.24 s, the length MultiTalk was trained on). It is also the
# shortest segment worth an engine call: a shorter segment still renders one whole chunk (chunk_count) and adds a
# seam, so the planner merges shorter pieces into their neighbours (min_useful_frames, tasks/segment.py).
CHUNK_FRAMES = 81

# Preview engine (CPU, no weights): an honest small model, not measured on the preview renderer itself.
PREVIEW_HOST_BASE = 0.3  # python + numpy + PIL + an ffmpeg pipe
PREVIEW_FRAMES_IN_FLIGHT = 8  # frames buffered towards the encoder pipe
PREVIEW_SECONDS_PER_FRAME = 0.004  # drawing boxes and labels on a 480p frame, piped to ffmpeg


@dataclass(frozen=True)
class RenderCost:
    """The render choices that decide memory and time (ENGINE.md §1.2 and §6)."""

    engine: Literal["multitalk", "infinitetalk", "preview"] = "multitalk"
    size: Literal[480, 720] = 480
    # 1 or 2: 32 or 64 audio tokens per latent frame, next to ~1,560-3,600 video tokens, so it moves neither
    # number measurably (MEMORY.md measured 2); kept so estimates are recorded with the job they describe.
    persons: int = 2
    steps: int = 8
    cfg_passes: int = 3  # 3-way CFG; 2 when text_scale == 1; 1 with a distilled LoRA
    cfg_batch: bool = False  # batch the CFG passes: one weight read, activations x passes (ENGINE.md §6.4)
    offload: Literal["none", "model", "group"] = "none"
    resident_blocks: int = DIT_BLOCKS  # with offload="group": blocks kept on the GPU (>= 2 for prefetch)
    quantize: Literal["fp8", "int8"] | None = None
    vae_dtype: Literal["bf16", "fp32"] = "fp32"  # the reference decodes in fp32
    vae_tiled: bool = False
    compile: bool = False
    frame_num: int = CHUNK_FRAMES  # chunk length F, 4n+1
    motion_frames: int | None = None  # M; None: the mode's default, 25 (multitalk) or 9 (infinitetalk)
    keep_frames: Literal["stream", "host_fp32", "host_uint8"] = "stream"  # host_fp32 = the reference

    def __post_init__(self) -> None:
        if self.frame_num < 1 or (self.frame_num - 1) % 4:
            raise ValueError(
                f"frame_num={self.frame_num} must be 4n+1 (the VAE maps 1+4n frames to 1+n latents)"
            )
        if not 1 <= self.motion < self.frame_num:
            raise ValueError(f"motion_frames={self.motion} must be in [1, frame_num={self.frame_num})")
        if self.size not in TOKENS_PER_LATENT_FRAME:
            raise ValueError(f"size={self.size} must be one of {sorted(TOKENS_PER_LATENT_FRAME)}")

    @property
    def motion(self) -> int:
        """Context frames carried from one chunk to the next (ENGINE.md §5.1)."""
        if self.motion_frames is not None:
            return self.motion_frames
        return MOTION_FRAMES.get(self.engine, MOTION_FRAMES["multitalk"])


@dataclass(frozen=True)
class MemoryEstimate:
    gpu_bytes: int
    host_bytes: int

    def fits(self, gpu_budget_bytes: int, host_budget_bytes: int) -> bool:
        return self.gpu_bytes <= gpu_budget_bytes and self.host_bytes <= host_budget_bytes


def chunk_count(frames: int, settings: RenderCost) -> int:
    """K chunks of F frames advancing by F - M (ENGINE.md §5.1); a short segment still renders one full chunk."""
    step = settings.frame_num - settings.motion
    return 1 if frames <= settings.frame_num else 1 + math.ceil((frames - settings.frame_num) / step)


def min_useful_frames(settings: RenderCost) -> int:
    """The shortest segment worth its own engine call: one chunk, which a shorter segment costs anyway. The preview
    engine keeps the same figure: its segments have no chunks, but each one is still a job, an encoder and a seam."""
    return settings.frame_num


def _latent_frames(settings: RenderCost) -> int:
    return (settings.frame_num - 1) // 4 + 1


def _weights_gib(settings: RenderCost) -> tuple[float, float]:
    """(resident on the GPU, streamed from pinned host RAM) DiT weights in GiB."""
    block = BLOCK_WEIGHTS * (QUANTIZED_WEIGHT_FACTOR if settings.quantize else 1.0)
    resident = settings.resident_blocks if settings.offload == "group" else DIT_BLOCKS
    resident = max(0, min(DIT_BLOCKS, resident))
    streamed = DIT_BLOCKS - resident
    return resident * block + NON_BLOCK_WEIGHTS, streamed * block


def _vae_decode_gib(settings: RenderCost) -> float:
    dtype = "bf16" if settings.vae_tiled else settings.vae_dtype  # tiled was measured in bf16 only
    base, per_latent = VAE_DECODE[(dtype, settings.vae_tiled)]
    scale = VAE_720_FACTOR if settings.size == 720 and not settings.vae_tiled else 1.0
    return base * scale + per_latent * _latent_frames(settings)


def _kept_frame_bytes(frames: int, settings: RenderCost) -> int:
    """Host bytes held for decoded frames: all of them (reference) or only the motion-frame tail (streaming)."""
    if settings.keep_frames == "host_fp32":
        return 2 * frames * FRAME_BYTES_FP32[settings.size]  # x2: the final torch.cat copies them
    if settings.keep_frames == "host_uint8":
        return frames * FRAME_BYTES_UINT8[settings.size]
    return settings.motion * FRAME_BYTES_FP32[settings.size]


def estimate_peak(frames: int, settings: RenderCost) -> MemoryEstimate:
    """Peak GPU and host bytes of rendering one segment of `frames` frames."""
    if settings.engine == "preview":
        frame = FRAME_BYTES_UINT8[settings.size]
        return MemoryEstimate(0, int(PREVIEW_HOST_BASE * GiB) + PREVIEW_FRAMES_IN_FLIGHT * frame)
    resident, streamed = _weights_gib(settings)
    batch = settings.cfg_passes if settings.cfg_batch else 1
    tokens = _latent_frames(settings) * TOKENS_PER_LATENT_FRAME[settings.size]
    per_token = DIT_PER_TOKEN["compiled" if settings.compile else "eager"]
    dit = DIT_CONSTANT + per_token * batch * tokens
    # The DiT activations are freed before the decode; weights stay (MEMORY.md: two phases that do not overlap).
    other = VAE_WEIGHTS[settings.vae_dtype] + CONDITIONING
    gpu = CUDA_CONTEXT + resident + other + max(dit, _vae_decode_gib(settings))
    host = HOST_FLOOR + streamed + (ENCODERS_ON_HOST if settings.offload != "none" else 0.0)
    return MemoryEstimate(int(gpu * GiB), int(host * GiB) + _kept_frame_bytes(frames, settings))


def _dit_forward_seconds(settings: RenderCost) -> float:
    kilo_tokens = _latent_frames(settings) * TOKENS_PER_LATENT_FRAME[settings.size] / 1000
    a, b = DIT_SECONDS
    seconds = a * kilo_tokens + b * kilo_tokens**2
    return seconds * (COMPILED_TIME_FACTOR if settings.compile else 1.0)


def _chunk_seconds(settings: RenderCost) -> float:
    compute = _dit_forward_seconds(settings) * settings.cfg_passes * settings.steps
    # Streamed blocks are read once per forward, or once per step when the passes are batched; the transfer
    # overlaps compute (prefetch), so the slower of the two sets the pace.
    reads = settings.steps * (1 if settings.cfg_batch else settings.cfg_passes)
    transfer = reads * _weights_gib(settings)[1] * GiB / PCIE_BYTES_PER_S
    size_factor = VAE_720_TIME_FACTOR if settings.size == 720 else 1.0
    tiled = VAE_TILED_TIME_FACTOR if settings.vae_tiled else 1.0
    decode = VAE_DECODE_S_PER_LATENT[settings.vae_dtype] * _latent_frames(settings) * tiled
    vae = (decode + VAE_ENCODE_S_PER_CHUNK[settings.vae_dtype]) * size_factor
    return max(compute, transfer) + vae


def estimate_seconds(frames: int, settings: RenderCost) -> float:
    """Render seconds of one segment on one H100 (eager unless settings.compile), model resident."""
    if settings.engine == "preview":
        return PREVIEW_SECONDS_PER_FRAME * frames
    return SEGMENT_OVERHEAD_S + chunk_count(frames, settings) * _chunk_seconds(settings)


def max_frames_that_fit(
    gpu_budget_bytes: int, host_budget_bytes: int, settings: RenderCost, *, ceiling: int = 1000
) -> int:
    """The longest segment (4n+1 frames, at most `ceiling`) whose estimated peak fits both budgets; 0 if none.

    The ceiling bounds what an engine that streams (no growth with length) would otherwise leave unbounded; 1000
    frames (40 s) is the reference's own streaming cap (ENGINE.md §1.4) and bounds the work an OOM retry redoes.
    """
    if not estimate_peak(1, settings).fits(gpu_budget_bytes, host_budget_bytes):
        return 0
    low, high = 1, max(1, ceiling)  # invariant: low fits; the peak grows monotonically with frames
    while low < high:
        mid = (low + high + 1) // 2
        if estimate_peak(mid, settings).fits(gpu_budget_bytes, host_budget_bytes):
            low = mid
        else:
            high = mid - 1
    return low - (low - 1) % 4  # round down to 4n+1


def max_resident_blocks(gpu_budget_bytes: int, settings: RenderCost, frames: int = CHUNK_FRAMES) -> int:
    """Block offload: the most DiT blocks that can stay on the GPU for good, besides the OFFLOAD_IN_FLIGHT
    streamed ones, while a segment of `frames` still fits `gpu_budget_bytes`; -1 when even streaming every
    block does not fit. Each resident block saves its PCIe transfer on every forward."""

    def fits(resident: int) -> bool:
        cost = replace(settings, offload="group", resident_blocks=resident + OFFLOAD_IN_FLIGHT)
        return estimate_peak(frames, cost).gpu_bytes <= gpu_budget_bytes

    if not fits(0):
        return -1
    return max(r for r in range(DIT_BLOCKS - OFFLOAD_IN_FLIGHT + 1) if fits(r))


def worker_memory() -> tuple[int, int]:
    """(free GPU bytes on cuda:0 or 0, available host bytes) of this machine: the budgets max_frames_that_fit takes."""
    host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        import torch  # lazily: the planner runs without torch
    except ImportError:
        return 0, host
    return (torch.cuda.mem_get_info(0)[0] if torch.cuda.is_available() else 0), host
