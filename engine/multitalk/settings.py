"""Engine settings and the constant tables of ENGINE.md, kept as data.

`EngineSettings` is frozen load-time configuration; `DiTConfig` / `AdapterConfig` describe the
model shapes (the real 14B ones by default, `tiny.py` provides small ones for tests).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from engine.multitalk.lora import LoraSpec

FPS = 25
AUDIO_RATE = 16_000
TARGET_LUFS = -23.0
TEXT_LEN = 512  # umT5 rows, zero-padded (padding attended, no mask)
MAX_FRAME_NUM = 81  # frames per chunk: the trained length (README: up to 201, weaker prompt following)
MAX_TRAINED_PERSONS = 2

# L-RoPE person binding (ENGINE.md §3.4, §3.10): persons 1/2 on [0, 4] / [20, 24], background 12.
CLASS_RANGE = 24
CLASS_INTERVAL = 4
BACKGROUND_POSITION = 12.0

DEFAULT_NEGATIVE_PROMPT = (
    "bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly "
    "drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy "
    "background, three legs, many people in the background, walking backwards"
)

# Bucket key = h/w; value = [h, w] (ENGINE.md §4.1; MultiTalk: wan/utils/multitalk_utils.py:26-39).
BUCKETS: dict[int, dict[float, tuple[int, int]]] = {
    480: {
        0.26: (320, 1216), 0.38: (384, 1024), 0.50: (448, 896), 0.67: (512, 768), 0.82: (576, 704),
        1.00: (640, 640), 1.22: (704, 576), 1.50: (768, 512), 1.86: (832, 448), 2.00: (896, 448),
        2.50: (960, 384), 2.83: (1088, 384), 3.60: (1152, 320), 3.80: (1216, 320), 4.00: (1280, 320),
    },
    720: {
        0.22: (448, 2048), 0.29: (512, 1792), 0.36: (576, 1600), 0.45: (640, 1408), 0.55: (704, 1280),
        0.63: (768, 1216), 0.76: (832, 1088), 0.88: (896, 1024), 1.00: (960, 960), 1.14: (1024, 896),
        1.31: (1088, 832), 1.50: (1152, 768), 1.58: (1216, 768), 1.82: (1280, 704), 1.91: (1344, 704),
        2.20: (1408, 640), 2.30: (1472, 640), 2.67: (1536, 576), 2.89: (1664, 576), 3.62: (1856, 512),
        3.75: (1920, 512),
    },
}  # fmt: skip
SHIFT_BY_SIZE = {480: 7.0, 720: 11.0}
# Motion (context) frames per chunk by mode (ENGINE.md §5.1): 25 -> 7 latents, 9 -> 3 latents.
MOTION_FRAMES = {"multitalk": 25, "infinitetalk": 9}
UPSTREAM_MAX_FRAMES = 1000  # upstream streaming cap (--max_frame_num), used as max_frames in parity

APG_MOMENTUM = -0.75
APG_NORM_THRESHOLD = 55.0

# CLIP preprocessing (ENGINE.md §4.2): squash to the model's size, then normalise.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Released weights (ENGINE.md §7.1).
BASE_REPO = "Wan-AI/Wan2.1-I2V-14B-480P"
BASE_DIFFUSERS_REPO = "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"
ADAPTER_REPO = "MeiGen-AI/MeiGen-MultiTalk"
ADAPTER_FILE = "multitalk.safetensors"
WAV2VEC_REPO = "TencentGameMate/chinese-wav2vec2-base"
INFINITETALK_REPO = "MeiGen-AI/InfiniteTalk"
# Adapter name -> (repo, file in the repo). One key layout for all three (ENGINE.md §3.7); InfiniteTalk trained
# `single/` for one person and `multi/` for two (§0, §5.3).
ADAPTERS: dict[str, tuple[str, str]] = {
    "multitalk": (ADAPTER_REPO, ADAPTER_FILE),
    "infinitetalk-single": (INFINITETALK_REPO, "single/infinitetalk.safetensors"),
    "infinitetalk-multi": (INFINITETALK_REPO, "multi/infinitetalk.safetensors"),
}
PRODUCT_ADAPTERS = {
    "multitalk": ("multitalk",),
    "infinitetalk": ("infinitetalk-single", "infinitetalk-multi"),
}


@dataclass(frozen=True)
class AdapterConfig:
    """Audio adapter shapes (MultiTalk: wan/modules/multitalk_model.py:366-428, 532-540)."""

    audio_layers: int = 12  # wav2vec2 hidden states stacked
    audio_dim: int = 768  # wav2vec2 width
    window: int = 5  # audio frames around each video frame (offsets -2..+2)
    vae_scale: int = 4  # video frames per later latent frame
    intermediate_dim: int = 512
    context_tokens: int = 32  # audio tokens per person per latent frame
    output_dim: int = 768  # audio token width (kv_linear input)

    @property
    def later_window(self) -> int:
        return self.window + self.vae_scale - 1  # 8: video frames 4j-1 .. 4j+6


@dataclass(frozen=True)
class DiTConfig:
    """Wan 2.1 I2V-14B shape (diffusers' WanTransformer3DModel arguments) plus the adapter."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 36
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int = 1280
    added_kv_proj_dim: int = 5120
    rope_max_seq_len: int = 1024
    adapter: AdapterConfig = field(default_factory=AdapterConfig)

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def diffusers_kwargs(self) -> dict[str, Any]:
        kwargs = asdict(self)
        kwargs.pop("adapter")
        kwargs["patch_size"] = tuple(self.patch_size)
        return kwargs


@dataclass(frozen=True)
class StreamSwitches:
    exact_length: bool
    stop_on_longest: bool
    colour_anchor: Literal["chunk", "first"]


@dataclass(frozen=True)
class EngineSettings:
    """Load-time settings (ENGINE.md §1.2), frozen and written next to every artefact."""

    models_dir: Path | None = None  # searched before the Hugging Face cache
    device: str = "cuda"
    dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    base_layout: Literal["auto", "original", "diffusers"] = "auto"
    cfg_batch: Literal["auto", "on", "off"] = "auto"
    map_chunk: int = 4096  # query tokens per reference-map chunk (bounds map memory)
    experimental_persons: bool = False  # allow > 2 persons (untrained ranges, §3.10)
    normalize_loudness: bool = True
    wav2vec_device: str = "cpu"  # upstream runs wav2vec2 on the CPU in fp32
    # weights: the product's adapter ("auto": InfiniteTalk single/ or multi/ by the job's person count);
    # `dit_file`: one .safetensors DiT (either key layout, config.json beside it) instead of a Wan folder
    product: Literal["multitalk", "infinitetalk"] = "multitalk"
    adapter: Literal["auto", "multitalk", "infinitetalk-single", "infinitetalk-multi"] = "auto"
    dit_file: Path | None = None
    # Streaming (ENGINE.md §5). `parity` reproduces the reference loops (chunk plan, final length, tail
    # padding, colour anchor, RNG draw order) and turns every improvement below off.
    parity: bool = False
    exact_length: bool = True  # exactly num_frames frames (upstream: T - 3 MultiTalk, T InfiniteTalk)
    stop_on_longest: bool = True  # upstream-style termination watches the longest track, not person 1's
    colour_anchor: Literal["chunk", "first"] = "chunk"  # V2V: each chunk's own source frame, or frame 0
    # Speed and memory (speed.py, applied in this order at load): LoRAs merged into the weights (or hooked,
    # unmerged), weight-only quantisation of the blocks' linears, block offload with prefetch, the
    # self-attention kernel, regional torch.compile of the block
    loras: tuple[LoraSpec, ...] = ()
    lora_merge: bool = True
    quantize: Literal["none", "int8", "fp8"] = "none"
    offload: Literal["none", "blocks"] = "none"
    resident_blocks: int = 0  # offload: blocks kept on the device for good (the rest are streamed)
    attention: Literal["auto", "sdpa", "flash", "sage"] = "auto"
    compile: bool = False
    vae_tiling: bool = False  # decode the VAE in spatial tiles (less memory, more time)

    def streaming(self) -> StreamSwitches:
        """The improvement switches in force (all off under `parity`)."""
        if self.parity:
            return StreamSwitches(False, False, "first")
        return StreamSwitches(self.exact_length, self.stop_on_longest, self.colour_anchor)

    def torch_dtype(self) -> Any:
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.dtype]

    def adapter_name(self, persons: int = 1) -> str:
        """The adapter for a job of `persons`: the explicit one, else the product's (InfiniteTalk: `single/`
        up to one person, `multi/` for two or more)."""
        family = PRODUCT_ADAPTERS[self.product]
        if self.adapter != "auto":
            if self.adapter not in family:
                raise ValueError(
                    f"adapter: {self.adapter!r}; rule: one of {family} for product {self.product!r}"
                )
            return self.adapter
        return family[0] if persons <= 1 else family[-1]

    def adapter_names(self) -> tuple[str, ...]:
        """Every adapter these settings may load (both InfiniteTalk files when `adapter` is auto)."""
        return (self.adapter_name(),) if self.adapter != "auto" else PRODUCT_ADAPTERS[self.product]

    def to_json_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["models_dir"] = str(self.models_dir) if self.models_dir else None
        data["dit_file"] = str(self.dit_file) if self.dit_file else None
        data["loras"] = [{**lora, "path": str(lora["path"])} for lora in data["loras"]]
        return data


def default_shift(size: int) -> float:
    return SHIFT_BY_SIZE[size]


def latent_frames(frame_num: int, vae_scale: int = 4) -> int:
    return 1 + (frame_num - 1) // vae_scale


def is_4n_plus_1(frame_num: int) -> bool:
    return frame_num >= 1 and (frame_num - 1) % 4 == 0


def person_ranges(persons: int) -> list[tuple[float, float]]:
    """L-RoPE position range per person: [0, 4], [20, 24], then further ranges 20 apart (experimental)."""
    stride = CLASS_RANGE - CLASS_INTERVAL  # 20
    return [(float(i * stride), float(i * stride + CLASS_INTERVAL)) for i in range(persons)]


def person_centres(persons: int) -> list[float]:
    return [(lo + hi) / 2 for lo, hi in person_ranges(persons)]


def closest_bucket(buckets: dict[float, tuple[int, int]], height: int, width: int) -> tuple[int, int]:
    ratio = height / width
    key = min(buckets, key=lambda k: (abs(k - ratio), k))
    return buckets[key]


def is_unit_scale(scale: float) -> bool:
    return math.isclose(scale, 1.0)


# Guidance passes (ENGINE.md §4.4; guidance.py combines them): text scale 1 drops the negative-prompt passes,
# text and audio scale 1 (the distilled LoRAs' sampler) leave the cond pass alone.
THREE_PASS = ("cond", "drop_text", "uncond")
TWO_PASS = ("cond", "drop_audio")
ONE_PASS = ("cond",)


def guidance_passes(text_scale: float, audio_scale: float | None = None) -> tuple[str, ...]:
    """The model calls per step: 3, 2 with text scale 1, 1 with text and audio scale 1."""
    if not is_unit_scale(text_scale):
        return THREE_PASS
    return ONE_PASS if audio_scale is not None and is_unit_scale(audio_scale) else TWO_PASS
