"""Tiny random configuration of every component (ENGINE.md §9.1): the whole render path on CPU in seconds.

`tiny_components(seed)` builds the models in memory; `write_tiny_checkpoints(root)` saves them in the
released on-disk layouts (original Wan DiT shards, diffusers folders, `multitalk.safetensors`, InfiniteTalk's
`single/` and `multi/infinitetalk.safetensors`, the wav2vec2 folder) so the real loaders in `weights.py` run
in tests; `link_adapter_in_index` and `write_single_file_dit` give the other layouts the loader accepts.
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
# Motion frames per chunk of F = 9, in the real ratios (25/81, 9/81): MultiTalk 5 (m = 2 latents, Δ = 4),
# InfiniteTalk 1 (m = 1, Δ = 8).
TINY_MOTION_FRAMES = {"multitalk": 5, "infinitetalk": 1}
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
    from engine.multitalk.components import Components
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


def _save_sharded(state: dict[str, torch.Tensor], folder: Any, index_name: str, shards: int = 2) -> None:
    """Split `state` into `shards` safetensors files + an index json, as the released repos do."""
    import json

    from safetensors.torch import save_file

    keys = sorted(state)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i::shards]}
        save_file(part, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))


def write_tiny_checkpoints(root: Any, components: Any, cfg: TinyConfig | None = None) -> Any:
    """Write `components` under root/<owner>/<repo> in the released layouts; returns root (a models_dir)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file
    from transformers import Wav2Vec2FeatureExtractor

    from engine.multitalk import weights as w

    cfg, root = cfg or tiny_config(), Path(root)
    state = {k: v.detach() for k, v in components.transformer.state_dict().items()}
    base = {k: v for k, v in state.items() if not w.is_adapter_key(k)}
    # original Wan layout: renamed keys, shards + index + config.json
    original = root / w.BASE_REPO
    original.mkdir(parents=True, exist_ok=True)
    _save_sharded({w.diffusers_to_original(k): v for k, v in base.items()}, original, w.ORIGINAL_INDEX)
    d = cfg.dit
    original_cfg = dict(
        model_type="i2v", dim=d.inner_dim, ffn_dim=d.ffn_dim, freq_dim=d.freq_dim, in_dim=d.in_channels,
        out_dim=d.out_channels, num_heads=d.num_attention_heads, num_layers=d.num_layers, eps=d.eps, text_len=512,
    )  # fmt: skip
    (original / "config.json").write_text(json.dumps(original_cfg))
    # diffusers layout: transformer/ (stock WanTransformer3DModel config) and the encoder folders
    diffusers = root / w.BASE_DIFFUSERS_REPO
    (diffusers / "transformer").mkdir(parents=True, exist_ok=True)
    _save_sharded(base, diffusers / "transformer", Path(w.DIFFUSERS_INDEX).name)
    transformer_cfg = {"_class_name": "WanTransformer3DModel", **d.diffusers_kwargs()}
    (diffusers / "transformer" / "config.json").write_text(json.dumps(transformer_cfg))
    components.text_encoder.save_pretrained(diffusers / "text_encoder")
    components.tokenizer.save_pretrained(diffusers / "tokenizer")
    components.image_encoder.save_pretrained(diffusers / "image_encoder")
    components.vae.save_pretrained(diffusers / "vae")
    # adapter file with the upstream names, and the wav2vec2 folder
    for name, (repo, file) in w.ADAPTERS.items():  # the three adapters differ (tests tell which one loaded)
        (root / repo / file).parent.mkdir(parents=True, exist_ok=True)
        save_file(tiny_adapter_state(components, name), str(root / repo / file))
    wav = root / w.WAV2VEC_REPO
    components.wav2vec.model.save_pretrained(wav)
    Wav2Vec2FeatureExtractor(do_normalize=components.wav2vec.do_normalize).save_pretrained(wav)
    return root


def tiny_adapter_state(components: Any, name: str) -> dict[str, torch.Tensor]:
    """The adapter tensors written as adapter `name`: the tiny model's own for `multitalk`, perturbed with a
    fixed seed per InfiniteTalk file, so a test can tell which file a model carries."""
    from engine.multitalk import weights as w

    state = {k: v.detach().contiguous() for k, v in components.transformer.state_dict().items()}
    adapter = {k: v for k, v in state.items() if w.is_adapter_key(k)}
    if name == "multitalk":
        return adapter
    gen = torch.Generator().manual_seed(list(w.ADAPTERS).index(name))
    return {
        k: (v + 0.1 * torch.randn(v.shape, generator=gen)).contiguous() for k, v in sorted(adapter.items())
    }


def link_adapter_in_index(wan_folder: Any, adapter_file: Any) -> Any:
    """A Wan folder prepared as the MultiTalk README says: `multitalk.safetensors` copied in and the folder's
    index json edited to map the adapter keys to it. Returns the copied file."""
    import json
    import shutil
    from pathlib import Path

    from safetensors import safe_open

    from engine.multitalk import weights as w

    folder = Path(wan_folder)
    target = Path(shutil.copy(adapter_file, folder / w.ADAPTER_FILE))
    index_path = folder / w.ORIGINAL_INDEX
    index = json.loads(index_path.read_text())
    with safe_open(str(target), framework="pt") as f:
        index["weight_map"].update(dict.fromkeys(f.keys(), target.name))  # noqa: SIM118 - not a mapping
    index_path.write_text(json.dumps(index, indent=1))
    return target


def write_single_file_dit(components: Any, folder: Any, keys: str = "diffusers", config: bool = True) -> Any:
    """The tiny DiT's base weights as one `diffusion_pytorch_model.safetensors` (no index) in `folder`, with
    diffusers or original key names and, if `config`, the matching config.json. Returns the file."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    from engine.multitalk import weights as w

    folder, d = Path(folder), tiny_config().dit
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in components.transformer.state_dict().items()}
    base = {k: v for k, v in state.items() if not w.is_adapter_key(k)}
    if keys == "original":
        base = {w.diffusers_to_original(k): v for k, v in base.items()}
    save_file(base, str(folder / w.SINGLE_FILE))
    if config:
        cfg = {"_class_name": "WanTransformer3DModel", **d.diffusers_kwargs()}
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder / w.SINGLE_FILE


# -- LoRAs in the released layouts ---------------------------------------------------------------
# layout -> (key prefix, module naming, down part, up part): kohya (underscored original names), the
# lightx2v / FusionX "diffusers" files (diffusion_model. + original names), diffusers (transformer. +
# diffusers names) and peft (base_model.model. + diffusers names, alpha in adapter_config.json)
TINY_LORA_LAYOUTS = {
    "kohya": ("lora_unet_", "original", ".lora_down.weight", ".lora_up.weight"),
    "lightx2v": ("diffusion_model.", "original", ".lora_down.weight", ".lora_up.weight"),
    "diffusers": ("transformer.", "diffusers", ".lora_A.weight", ".lora_B.weight"),
    "peft": ("base_model.model.", "diffusers", ".lora_A.weight", ".lora_B.weight"),
}
TINY_LORA_TARGETS = ("blocks.0.attn1.to_q", "blocks.1.ffn.net.0.proj", "blocks.1.attn2.to_k")


def write_tiny_lora(
    path: Any, dit: Any, layout: str, rank: int = 2, alpha: float = 4.0, seed: int = 0, diff: bool = False
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A random LoRA for `dit` in `layout`, written to `path` (.safetensors); returns {diffusers module:
    (down, up)}. `diff`: also a full-weight delta on an RMS norm and a bias delta, as lightx2v ships."""
    from pathlib import Path

    from safetensors.torch import save_file

    from engine.multitalk.weights import diffusers_to_original

    prefix, naming, down_part, up_part = TINY_LORA_LAYOUTS[layout]
    modules = dict(dit.named_modules())
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    truth = {}

    def key_of(module: str) -> str:
        name = (
            diffusers_to_original(f"{module}.weight")[: -len(".weight")] if naming == "original" else module
        )
        return prefix + (name.replace(".", "_") if layout == "kohya" else name)

    for module in TINY_LORA_TARGETS:
        weight = modules[module].weight
        down = 0.3 * torch.randn(rank, weight.shape[1], generator=gen)
        up = 0.3 * torch.randn(weight.shape[0], rank, generator=gen)
        state[key_of(module) + down_part], state[key_of(module) + up_part] = down, up
        if layout != "peft":
            state[key_of(module) + ".alpha"] = torch.tensor(alpha)
        truth[module] = (down, up)
    if diff:
        norm, linear = "blocks.0.attn1.norm_q", "blocks.0.attn1.to_v"
        state[key_of(norm) + ".diff"] = 0.1 * torch.randn(modules[norm].weight.shape, generator=gen)
        state[key_of(linear) + ".diff_b"] = 0.1 * torch.randn(modules[linear].bias.shape, generator=gen)
    path = Path(path)
    save_file(state, str(path))
    if layout == "peft":
        (path.parent / "adapter_config.json").write_text(f'{{"r": {rank}, "lora_alpha": {alpha}}}')
    return truth
