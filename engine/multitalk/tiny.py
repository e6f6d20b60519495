"""Tiny random configuration of every component (ENGINE.md §9.1): the whole render path on CPU in seconds.

`tiny_components(seed)` builds the models in memory; `write_tiny_checkpoints(root)` saves them in the
released on-disk layouts (original Wan DiT shards, diffusers folders, `multitalk.safetensors`, the
wav2vec2 folder) so the real loaders in `weights.py` run in tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from engine.multitalk.settings import AdapterConfig, DiTConfig, EngineSettings

TINY_BUCKETS: dict[int, dict[float, tuple[int, int]]] = {
    480: {1.0: (64, 64), 0.5: (64, 128)},
    720: {1.0: (64, 64), 0.5: (64, 128)},
}
TINY_FRAME_NUM = 9  # 3 latent frames x 4 x 4 tokens = 48 tokens at 64 x 64
TINY_WORDS = [
    "a",
    "person",
    "talks",
    "to",
    "the",
    "camera",
    "two",
    "people",
    "speak",
    "in",
    "a",
    "room",
    "bright",
    "tones",
    "overexposed",
    "static",
    "blurred",
    "details",
    "subtitles",
    "style",
    "works",
    "paintings",
    "images",
    "overall",
    "gray",
    "worst",
    "quality",
    "low",
    "quality",
    "jpeg",
    "compression",
    "residue",
    "ugly",
    "incomplete",
    "extra",
    "fingers",
    "poorly",
    "drawn",
    "hands",
    "faces",
    "deformed",
    "disfigured",
    "misshapen",
    "limbs",
    "fused",
    "still",
    "picture",
    "messy",
    "background",
    "three",
    "legs",
    "many",
    "people",
    "in",
    "the",
    "walking",
    "backwards",
    ",",
    ".",
]


@dataclass(frozen=True)
class TinyConfig:
    dit: DiTConfig = field(
        default_factory=lambda: DiTConfig(
            num_attention_heads=4, attention_head_dim=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2,
            image_dim=32, added_kv_proj_dim=64,
            adapter=AdapterConfig(audio_layers=2, audio_dim=16, intermediate_dim=16, context_tokens=4,
                                  output_dim=32),
        )
    )  # fmt: skip
    wav2vec: dict[str, Any] = field(
        default_factory=lambda: dict(
            hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, conv_dim=(16,) * 7,
            num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=2,
        )
    )  # fmt: skip
    clip: dict[str, Any] = field(
        default_factory=lambda: dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28,
            patch_size=14,
        )
    )  # fmt: skip
    umt5: dict[str, Any] = field(
        default_factory=lambda: dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, vocab_size=128)
    )
    vae: dict[str, Any] = field(
        default_factory=lambda: dict(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    )
    frame_num: int = TINY_FRAME_NUM
    buckets: dict[int, dict[float, tuple[int, int]]] = field(default_factory=lambda: TINY_BUCKETS)


def tiny_config() -> TinyConfig:
    return TinyConfig()


def tiny_settings(**overrides: Any) -> EngineSettings:
    return EngineSettings(**{"device": "cpu", "dtype": "fp32", **overrides})


def rerandomize(module: torch.nn.Module, generator: torch.Generator, std: float = 0.2) -> None:
    """Give every parameter random values: zero-initialised biases, modulation tables, affine norms and
    output projections would make comparisons vacuous. Norm weights stay around 1."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            is_norm_weight = name.endswith("weight") and param.ndim == 1
            param.copy_(1.0 + noise if is_norm_weight else noise / max(1, param.shape[-1]) ** 0.5 * 2)


def tiny_tokenizer() -> Any:
    """A word-level tokenizer built in code, with umT5's specials (<pad> 0, </s> 1, <unk> 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in TINY_WORDS:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_components(seed: int = 0, cfg: TinyConfig | None = None) -> Any:
    """All six components with random weights (fixed seed), fp32, on the CPU, in eval mode."""
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
    from engine.multitalk.pipeline import Components
    from engine.multitalk.transformer import MultiTalkTransformer3DModel

    cfg = cfg or tiny_config()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    transformer = MultiTalkTransformer3DModel.from_dit_config(cfg.dit)
    rerandomize(transformer, gen)
    text_encoder = UMT5EncoderModel(UMT5Config(**cfg.umt5))
    image_encoder = CLIPVisionModel(CLIPVisionConfig(**cfg.clip))
    wav2vec = Wav2Vec2Model(Wav2Vec2Config(**cfg.wav2vec))
    vae = AutoencoderKLWan(**cfg.vae)
    models = (transformer, text_encoder, image_encoder, wav2vec, vae)
    for model in models:
        model.eval()
    return Components(
        transformer, vae, text_encoder, tiny_tokenizer(), image_encoder, Wav2VecEncoder(wav2vec)
    )
