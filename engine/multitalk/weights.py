"""Weights: where they are, how their keys map, strict streaming loads, `models check/download` helpers.

Released files (ENGINE.md §7.1), loaded unchanged:
  DiT      Wan-AI/Wan2.1-I2V-14B-480P (original: sharded safetensors + index + config.json)
           or Wan-AI/Wan2.1-I2V-14B-480P-Diffusers transformer/ (diffusers layout)
  adapter  MeiGen-AI/MeiGen-MultiTalk multitalk.safetensors (330 keys, upstream names), or
           MeiGen-AI/InfiniteTalk single/infinitetalk.safetensors (1 person), multi/infinitetalk.safetensors (2)
  encoders Wan-AI/Wan2.1-I2V-14B-480P-Diffusers text_encoder/ tokenizer/ image_encoder/ vae/
  audio    TencentGameMate/chinese-wav2vec2-base (model.safetensors from revision refs/pr/1)
Part 1 reads umT5 / CLIP / VAE from the diffusers layout only (the original .pth encoders need the
open-clip and T5 conversions, not written yet); the DiT loads from either layout, sharded (index json) or as one file, and from a Wan folder whose
index was edited as the MultiTalk README says (adapter keys mapped to a multitalk.safetensors copied in).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from engine.base import EngineSetupError, MissingWeightsError
from engine.multitalk.settings import (
    ADAPTER_FILE,  # noqa: F401 - re-exported: tiny.py and the tests name files through this module
    ADAPTER_REPO,  # noqa: F401
    ADAPTERS,
    BASE_DIFFUSERS_REPO,
    BASE_REPO,
    INFINITETALK_REPO,  # noqa: F401
    PRODUCT_ADAPTERS,
    WAV2VEC_REPO,
    AdapterConfig,
    DiTConfig,
    EngineSettings,
)

WAV2VEC_REVISION = "refs/pr/1"  # the MultiTalk README takes model.safetensors from this revision
ORIGINAL_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_INDEX = "transformer/diffusion_pytorch_model.safetensors.index.json"
SINGLE_FILE = "diffusion_pytorch_model.safetensors"  # an unsharded DiT, in place of the index and its shards
ENCODER_FOLDERS = ("text_encoder", "tokenizer", "image_encoder", "vae")
ADAPTER_PREFIXES = ("audio_proj.",)
ADAPTER_BLOCK_PARTS = ("audio_cross_attn", "norm_x")
KEEP_FP32 = ("rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3", "norm_x")
# What diffusers drops when it loads a Wan transformer (WanTransformer3DModel._keys_to_ignore_on_load_unexpected,
# regex-searched in unexpected keys); read from the installed diffusers, this is the fallback (0.42: the
# Wan2.1-I2V-*-Diffusers checkpoints carry attn2.norm_added_q, which the model does not have).
IGNORED_DIFFUSERS_KEYS = ("norm_added_q",)

# -- key maps (ENGINE.md §7.2): exact names, never substring replacement --------------------------
_TOP_LEVEL = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "head.head": "proj_out",
    "patch_embedding": "patch_embedding",
}
_TOP_LEVEL_PARAMS = {"head.modulation": "scale_shift_table"}
_BLOCK = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "cross_attn.norm_k_img": "attn2.norm_added_k",
    "norm3": "norm2",  # the affine norm before cross-attention (original norm2 has no parameters)
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
_BLOCK_PARAMS = {"modulation": "scale_shift_table"}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def is_adapter_key(key: str) -> bool:
    """The 10 + 8 * layers keys of multitalk.safetensors (`audio_proj.*`, `blocks.N.{audio_cross_attn,norm_x}.*`)."""
    if key.startswith(ADAPTER_PREFIXES):
        return True
    match = _BLOCK_KEY.match(key)
    return bool(match) and match.group(2).split(".")[0] in ADAPTER_BLOCK_PARTS


def _rename(key: str, modules: dict[str, str], params: dict[str, str]) -> str | None:
    if key in params:
        return params[key]
    module, _, leaf = key.rpartition(".")
    return f"{modules[module]}.{leaf}" if module in modules else None


def original_to_diffusers(key: str) -> str | None:
    """Original Wan DiT key -> diffusers key; adapter keys unchanged; None when unknown."""
    if is_adapter_key(key):
        return key
    match = _BLOCK_KEY.match(key)
    if match:
        renamed = _rename(match.group(2), _BLOCK, _BLOCK_PARAMS)
        return f"blocks.{match.group(1)}.{renamed}" if renamed else None
    return _rename(key, _TOP_LEVEL, _TOP_LEVEL_PARAMS)


def diffusers_to_original(key: str) -> str | None:
    """Inverse of `original_to_diffusers` (used to write original-layout test checkpoints)."""
    if is_adapter_key(key):
        return key
    inverse = (
        {v: k for k, v in _BLOCK.items()},
        {v: k for k, v in _BLOCK_PARAMS.items()},
        {v: k for k, v in _TOP_LEVEL.items()},
        {v: k for k, v in _TOP_LEVEL_PARAMS.items()},
    )
    match = _BLOCK_KEY.match(key)
    if match:
        renamed = _rename(match.group(2), inverse[0], inverse[1])
        return f"blocks.{match.group(1)}.{renamed}" if renamed else None
    return _rename(key, inverse[2], inverse[3])


# -- locating files --------------------------------------------------------------------------------
Required = str | tuple[str, ...]  # a file, or alternatives (the first present one counts)


@dataclass(frozen=True)
class WeightSpec:
    """One component: a repo, the files that must be present, the download patterns."""

    component: str
    repo_id: str
    required: tuple[Required, ...]  # an index json present also requires the shards it lists
    allow_patterns: tuple[str, ...]
    revision: str | None = None


def _adapter_spec(name: str) -> WeightSpec:
    repo, file = ADAPTERS[name]
    return WeightSpec(name, repo, (file,), (file, "*.json") if name == "multitalk" else (file,))


WEIGHT_SPECS: dict[str, WeightSpec] = {
    "base": WeightSpec(
        "base",
        BASE_REPO,
        ("config.json", (ORIGINAL_INDEX, SINGLE_FILE)),
        ("config.json", "diffusion_pytorch_model*"),
    ),
    "base-diffusers": WeightSpec(
        "base-diffusers",
        BASE_DIFFUSERS_REPO,
        ("transformer/config.json", (DIFFUSERS_INDEX, f"transformer/{SINGLE_FILE}")),
        ("transformer/*",),
    ),
    "encoders": WeightSpec(
        "encoders",
        BASE_DIFFUSERS_REPO,
        (
            "text_encoder/config.json",
            "tokenizer/tokenizer_config.json",
            "image_encoder/config.json",
            "vae/config.json",
        ),
        ("model_index.json", *(f"{f}/*" for f in ENCODER_FOLDERS)),
    ),
    **{name: _adapter_spec(name) for name in ADAPTERS},
    "wav2vec": WeightSpec(
        "wav2vec",
        WAV2VEC_REPO,
        ("config.json", "preprocessor_config.json", "model.safetensors"),
        ("*.json", "model.safetensors"),
        WAV2VEC_REVISION,
    ),
}
COMPONENT_ALIASES = {"adapter": "multitalk"}  # the MultiTalk adapter's name before InfiniteTalk
# What each engine needs besides the DiT (either layout); `models download --engine` fetches exactly this.
ENGINE_COMPONENTS = {product: ("encoders", *names, "wav2vec") for product, names in PRODUCT_ADAPTERS.items()}
DEFAULT_COMPONENTS = ("base", *ENGINE_COMPONENTS["multitalk"])


def component_names(requested: Iterable[str]) -> list[str]:
    """Component names with aliases resolved; ValueError naming the unknown ones and the known ones."""
    names = [COMPONENT_ALIASES.get(c, c) for c in requested]
    unknown = [c for c in names if c not in WEIGHT_SPECS]
    if unknown:
        raise ValueError(f"unknown component(s) {', '.join(unknown)}; known: {', '.join(WEIGHT_SPECS)}")
    return names


def _hf_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot folder of a repo in the Hugging Face cache, without network access."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except Exception:  # not cached (LocalEntryNotFoundError), or huggingface_hub unusable
        return None


def candidate_dirs(spec: WeightSpec, models_dir: Path | None) -> list[Path]:
    """Where a repo is looked for: models_dir/<owner>/<name>, models_dir/<name>, the HF cache."""
    found = []
    if models_dir is not None:
        found += [Path(models_dir) / spec.repo_id, Path(models_dir) / spec.repo_id.split("/")[-1]]
    snapshot = _hf_snapshot(spec.repo_id, spec.revision)
    if snapshot is not None:
        found.append(snapshot)
    return found


def _pick(entry: Required, folder: Path | None) -> str:
    """The file that stands for `entry` in `folder`: the first alternative present, else all named."""
    if isinstance(entry, str):
        return entry
    present = [name for name in entry if folder is not None and (folder / name).is_file()]
    return present[0] if present else " (or ".join(entry) + ")" * (len(entry) - 1)


def required_files(spec: WeightSpec, folder: Path | None) -> list[str]:
    """The spec's files plus every shard named by an index json present in `folder`."""
    files = [_pick(entry, folder) for entry in spec.required]
    for name in list(files):
        index = folder / name if folder is not None else None
        if name.endswith(".index.json") and index is not None and index.is_file():
            prefix = str(Path(name).parent) + "/" if "/" in name else ""
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            files += [prefix + shard for shard in shards]
    return files


def missing_in(spec: WeightSpec, folder: Path) -> list[str]:
    return [f for f in required_files(spec, folder) if not (folder / f).is_file()]


@dataclass
class Located:
    spec: WeightSpec
    folder: Path | None
    searched: list[Path]
    missing: list[str]  # files missing in the best candidate (all required files when none exists)


def locate(spec: WeightSpec, models_dir: Path | None) -> Located:
    searched = candidate_dirs(spec, models_dir)
    best_missing = required_files(spec, None)
    for folder in searched:
        missing = missing_in(spec, folder)
        if not missing:
            return Located(spec, folder, searched, [])
        if folder.is_dir() and len(missing) < len(best_missing):
            best_missing = missing
    return Located(spec, None, searched, best_missing)


def missing_weights_error(located: list[Located], models_dir: Path | None) -> MissingWeightsError:
    lines = ["model weights not found:"]
    for loc in located:
        where = ", ".join(str(p) for p in loc.searched) or "(no models folder, not in the Hugging Face cache)"
        for name in loc.missing:
            lines.append(f"  {loc.spec.repo_id} : {name}  (searched: {where})")
    components = ",".join(
        dict.fromkeys(loc.spec.component for loc in located if loc.spec.component in WEIGHT_SPECS)
    )
    target = f" --models-dir {models_dir}" if models_dir else ""
    target += f" --components {components}" if components else ""
    lines.append(f"download them with: dubflow models download{target}")
    return MissingWeightsError("\n".join(lines))


@dataclass(frozen=True)
class DiTFiles:
    """The DiT's safetensors files, as a folder's index (or its single file) names them."""

    keys: str  # "original" | "diffusers": how the tensors in the files are named
    shards: tuple[Path, ...]  # base weights
    config: Path | None  # config.json (None: the Wan 2.1 I2V-14B shape, checked by the strict load)
    linked_adapters: tuple[Path, ...] = ()  # files the index maps adapter keys to (MultiTalk README)


def dit_files(path: Path, layout: str) -> DiTFiles:
    """`path`: a Wan folder (`layout` "base" = original keys, "base-diffusers" = transformer/) or one file."""
    path = Path(path)
    if path.is_file():
        return DiTFiles(_key_layout(path), (path,), _existing(path.parent / "config.json"))
    folder, keys = (path / "transformer", "diffusers") if layout == "base-diffusers" else (path, "original")
    index = folder / ORIGINAL_INDEX  # the same file name in both layouts
    if not index.is_file():
        return DiTFiles(keys, (folder / SINGLE_FILE,), _existing(folder / "config.json"))
    by_file: dict[str, list[str]] = {}
    for key, name in json.loads(index.read_text())["weight_map"].items():
        by_file.setdefault(name, []).append(key)
    linked = {name for name, keys_in in by_file.items() if all(map(is_adapter_key, keys_in))}
    shards = tuple(folder / name for name in sorted(set(by_file) - linked))
    return DiTFiles(
        keys, shards, _existing(folder / "config.json"), tuple(folder / n for n in sorted(linked))
    )


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


def _key_layout(path: Path) -> str:
    names = _header_shapes(path)
    return "diffusers" if any(k.startswith("condition_embedder.") for k in names) else "original"


def linked_adapter(dit: Path, layout: str) -> Path | None:
    """The adapter file a Wan folder's edited index links in (MultiTalk README: multitalk.safetensors copied into
    the base folder, its 330 keys added to the index), or None."""
    if Path(dit).is_file():
        return None
    linked = dit_files(dit, layout).linked_adapters
    if len(linked) > 1:
        raise EngineSetupError(
            f"{dit}: the index maps adapter keys to several files: {[p.name for p in linked]}"
        )
    return linked[0] if linked else None


@dataclass(frozen=True)
class WeightPaths:
    """Every file and folder a pipeline loads, resolved once."""

    dit: Path  # a Wan folder or one .safetensors file
    dit_layout: str  # "base" (original keys) | "base-diffusers" | "file"
    adapters: dict[str, Path]  # adapter name -> file (ADAPTERS)
    encoders: Path
    wav2vec: Path


def resolve_weights(settings: EngineSettings) -> WeightPaths:
    """The DiT, every adapter the settings may load, the encoders and wav2vec2.

    A MultiTalk adapter linked into the Wan folder by its index is used as the MultiTalk adapter (the
    MeiGen-MultiTalk repo is then not needed). Raises one MissingWeightsError naming every missing
    repo/file and the places searched."""
    paths, missing = _resolve(settings)
    if paths is None:
        raise missing_weights_error(missing, settings.models_dir)
    return paths


def engine_ready(product: str, models_dir: Path | str | None) -> tuple[bool, str]:
    """Whether every file `product` ("multitalk" | "infinitetalk": both its adapters) needs is present, and a
    one-line reason."""
    settings = EngineSettings(models_dir=Path(models_dir) if models_dir else None, product=product)  # type: ignore[arg-type]
    paths, missing = _resolve(settings)
    if paths is not None:
        return True, f"{product} weights present"
    files = [f"{loc.spec.repo_id}/{name}" for loc in missing for name in loc.missing]
    more = f" and {len(files) - 3} more" if len(files) > 3 else ""
    return (
        False,
        f"{product} weights missing: {', '.join(files[:3])}{more} (dubflow models download --engine {product})",
    )


def _resolve(settings: EngineSettings) -> tuple[WeightPaths | None, list[Located]]:
    missing: list[Located] = []
    dit, layout = _resolve_dit(settings, missing)
    linked = linked_adapter(dit, layout) if dit is not None else None
    adapters = {}
    for name in settings.adapter_names():
        if name == "multitalk" and linked is not None:
            adapters[name] = linked
            continue
        loc = locate(WEIGHT_SPECS[name], settings.models_dir)
        if loc.folder is None:
            missing.append(loc)
        else:
            adapters[name] = loc.folder / ADAPTERS[name][1]
    encoders, wav2vec = (locate(WEIGHT_SPECS[n], settings.models_dir) for n in ("encoders", "wav2vec"))
    missing += [loc for loc in (encoders, wav2vec) if loc.folder is None]
    if missing or dit is None or encoders.folder is None or wav2vec.folder is None:
        return None, missing
    return WeightPaths(dit, layout, adapters, encoders.folder, wav2vec.folder), []


def _resolve_dit(settings: EngineSettings, missing: list[Located]) -> tuple[Path | None, str]:
    if settings.dit_file is not None:
        path = Path(settings.dit_file)
        if path.is_file():
            return path, "file"
        spec = WeightSpec("dit-file", "dit_file", (path.name,), ())
        missing.append(Located(spec, None, [path.parent], [path.name]))
        return None, "file"
    layouts = {"original": ["base"], "diffusers": ["base-diffusers"], "auto": ["base-diffusers", "base"]}
    options = [locate(WEIGHT_SPECS[name], settings.models_dir) for name in layouts[settings.base_layout]]
    base = next((loc for loc in options if loc.folder is not None), options[-1])
    if base.folder is None:
        missing.append(base)
    return base.folder, base.spec.component


def resolve_folders(settings: EngineSettings) -> dict[str, Path]:
    """`resolve_weights` as a dict: the DiT under its layout ('base', 'base-diffusers' or 'file'), 'encoders',
    'wav2vec', and each adapter file under its name. Raises MissingWeightsError."""
    paths = resolve_weights(settings)
    return {
        paths.dit_layout: paths.dit,
        "encoders": paths.encoders,
        "wav2vec": paths.wav2vec,
        **paths.adapters,
    }


# -- strict streaming load ---------------------------------------------------------------------------
class Source(NamedTuple):
    path: Path
    rename: Callable[[str], str | None]  # file key -> model parameter name (None: not the model's)
    ignore: tuple[str, ...] = ()  # regexes of file keys dropped when the model has no parameter for them


@dataclass
class LoadReport:
    assigned: int = 0
    files: int = 0
    adapter_keys: int = 0
    ignored: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        groups = ("unexpected", "duplicated", "mismatched", "missing")
        return [f"{g}: {', '.join(getattr(self, g)[:8])}" for g in groups if getattr(self, g)]


def _target_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if any(part in KEEP_FP32 for part in name.split(".")) else dtype


@functools.cache
def diffusers_ignored_keys() -> tuple[str, ...]:
    """The patterns diffusers itself drops when loading a Wan transformer (same set, same regex search)."""
    try:
        from diffusers.models.transformers.transformer_wan import WanTransformer3DModel
    except ImportError:
        return IGNORED_DIFFUSERS_KEYS
    patterns = getattr(WanTransformer3DModel, "_keys_to_ignore_on_load_unexpected", None)
    return IGNORED_DIFFUSERS_KEYS if patterns is None else tuple(patterns)


def stream_into(
    model: torch.nn.Module,
    sources: Iterable[tuple],
    device: torch.device | str,
    dtype: torch.dtype,
    only: Callable[[str], bool] | None = None,
) -> LoadReport:
    """Assign every tensor of every `Source` to `model` (built on the meta device), one file at a time.

    Strict accounting: every parameter (those `only` selects) assigned exactly once, every file key used or
    explicitly ignored, shapes equal."""
    from safetensors import safe_open

    expected = {name: p.shape for name, p in model.named_parameters() if only is None or only(name)}
    report, assigned = LoadReport(), set()
    for path, rename, ignore in (Source(*source) for source in sources):
        part = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                name = rename(key)
                if name not in expected and any(re.search(pattern, key) for pattern in ignore):
                    report.ignored.append(f"{path.name}:{key}")
                elif name is None or name not in expected:
                    report.unexpected.append(f"{path.name}:{key}")
                elif name in assigned:
                    report.duplicated.append(f"{path.name}:{key}")
                elif tuple(f.get_slice(key).get_shape()) != tuple(expected[name]):
                    report.mismatched.append(
                        f"{key} {f.get_slice(key).get_shape()} vs {list(expected[name])}"
                    )
                else:
                    part[name] = f.get_tensor(key).to(device, _target_dtype(name, dtype))
                    assigned.add(name)
                    report.adapter_keys += is_adapter_key(name)
        model.load_state_dict(part, strict=False, assign=True)
        report.files += 1
    report.assigned = len(assigned)
    report.missing = sorted(set(expected) - assigned)
    return report


def _header_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header, without reading the data."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def adapter_config(adapter_file: Path, audio_layers: int, audio_dim: int) -> AdapterConfig:
    """Adapter shapes from multitalk.safetensors plus the wav2vec2 layer count and width."""
    shapes = _header_shapes(adapter_file)
    inter, first_in = shapes["audio_proj.proj1.weight"]
    later_in = shapes["audio_proj.proj1_vf.weight"][1]
    out_dim = shapes["audio_proj.norm.weight"][0]
    per_frame = audio_layers * audio_dim
    window, later = first_in // per_frame, later_in // per_frame
    context = shapes["audio_proj.proj3.weight"][0] // out_dim
    return AdapterConfig(audio_layers, audio_dim, window, later - window + 1, inter, context, out_dim)


def dit_config(files: DiTFiles, adapter: AdapterConfig) -> DiTConfig:
    """DiTConfig from config.json (diffusers or original keys) and the shards' shapes; the Wan 2.1 I2V-14B
    shape when there is no config.json (a lone .safetensors file), which the strict load then checks."""
    if files.config is None:
        return DiTConfig(adapter=adapter)
    cfg = json.loads(files.config.read_text())
    if "num_attention_heads" in cfg:  # diffusers' WanTransformer3DModel config
        fields = set(DiTConfig.__dataclass_fields__) - {"adapter"}
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in fields}
        return DiTConfig(**kwargs, adapter=adapter)
    shapes = _dit_shapes(files)
    heads = cfg["num_heads"]
    return DiTConfig(
        num_attention_heads=heads, attention_head_dim=cfg["dim"] // heads, in_channels=cfg["in_dim"],
        out_channels=cfg["out_dim"], text_dim=shapes["condition_embedder.text_embedder.linear_1.weight"][1],
        freq_dim=cfg["freq_dim"], ffn_dim=cfg["ffn_dim"], num_layers=cfg["num_layers"], eps=cfg.get("eps", 1e-6),
        image_dim=shapes["condition_embedder.image_embedder.norm1.weight"][0],
        added_kv_proj_dim=shapes["blocks.0.attn2.add_k_proj.weight"][1], adapter=adapter,
    )  # fmt: skip


def _dit_shapes(files: DiTFiles) -> dict[str, list[int]]:
    """Tensor shapes of the base shards under diffusers names, from the headers only."""
    shapes: dict[str, list[int]] = {}
    for shard in files.shards:
        for key, shape in _header_shapes(shard).items():
            name = original_to_diffusers(key) if files.keys == "original" else key
            if name is not None:
                shapes[name] = shape
    return shapes


def load_transformer(
    base: Path,
    layout: str,
    adapter_file: Path,
    audio_layers: int,
    audio_dim: int,
    device: str,
    dtype: torch.dtype,
) -> tuple[Any, LoadReport]:
    """Build the MultiTalk DiT on the meta device and stream the base shards and the adapter into it.

    `base`: a Wan folder (`layout` "base" or "base-diffusers"; sharded or one file) or one .safetensors file.
    An adapter its index links in is loaded only when it is `adapter_file`; otherwise its keys are ignored
    (reported) and `adapter_file` is the adapter."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    from engine.multitalk.transformer import MultiTalkTransformer3DModel

    files = dit_files(Path(base), layout)
    cfg = dit_config(files, adapter_config(adapter_file, audio_layers, audio_dim))
    with torch.device("meta"):
        model = MultiTalkTransformer3DModel.from_dit_config(cfg)
    rename = _non_adapter(original_to_diffusers if files.keys == "original" else _same_name)
    sources = [Source(shard, rename, diffusers_ignored_keys()) for shard in files.shards]
    report = stream_into(model, [*sources, Source(adapter_file, _adapter_only)], device, dtype)
    report.ignored += [
        f"{p.name}: the adapter the index links in ({adapter_file} loaded instead)"
        for p in files.linked_adapters
        if p.resolve() != Path(adapter_file).resolve()
    ]
    _raise_on_problems(report, adapter_file, 10 + 8 * cfg.num_layers)
    model.rope = WanRotaryPosEmbed(cfg.attention_head_dim, cfg.patch_size, cfg.rope_max_seq_len).to(device)
    model.adapter_file = Path(adapter_file)
    return model.eval(), report


def load_adapter(model: Any, adapter_file: Path, device: str, dtype: torch.dtype) -> LoadReport:
    """Replace the adapter of a loaded DiT by another file of the same shapes (InfiniteTalk single/ <-> multi/),
    keeping the 14B base in place. Strict: every adapter parameter once, nothing else."""
    report = stream_into(
        model, [Source(Path(adapter_file), _adapter_only)], device, dtype, only=is_adapter_key
    )
    _raise_on_problems(report, adapter_file, report.assigned + len(report.missing))
    model.adapter_file = Path(adapter_file)
    return report


def use_adapter(model: Any, settings: EngineSettings, persons: int) -> Path:
    """Make `model` carry the adapter a job of `persons` needs (settings.adapter_name); swaps only on change."""
    wanted = resolve_weights(settings).adapters[settings.adapter_name(persons)]
    if getattr(model, "adapter_file", None) != wanted:
        load_adapter(model, wanted, settings.device, settings.torch_dtype())
        if getattr(model, "offloader", None) is not None:
            model.offloader.refresh()  # the new adapter tensors of streamed blocks go back to the host
    return wanted


def _raise_on_problems(report: LoadReport, adapter_file: Path, expected_adapter: int) -> None:
    if report.problems():
        raise EngineSetupError(f"DiT weights do not match the model: {'; '.join(report.problems())}")
    if report.adapter_keys != expected_adapter:
        raise EngineSetupError(
            f"{Path(adapter_file).name}: {report.adapter_keys} adapter keys, expected {expected_adapter}"
        )


def _same_name(key: str) -> str:
    return key


def _non_adapter(rename: Callable[[str], str | None]) -> Callable[[str], str | None]:
    """Base files must not carry adapter keys (an override would go unnoticed otherwise)."""
    return lambda key: None if is_adapter_key(key) else rename(key)


def _adapter_only(key: str) -> str | None:
    return key if is_adapter_key(key) else None


def _checked(
    loaded: tuple[Any, dict[str, list[str]]], what: str, allow_unexpected: tuple[str, ...] = ()
) -> Any:
    """A transformers/diffusers `from_pretrained(..., output_loading_info=True)` result, strictly."""
    model, info = loaded
    missing = list(info.get("missing_keys", []))
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.startswith(allow_unexpected)]
    if missing or unexpected:
        raise EngineSetupError(f"{what}: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}")
    return model.eval()


def load_components(settings: EngineSettings) -> Any:
    """Every component of the pipeline, on `settings.device` (wav2vec2 on `settings.wav2vec_device`)."""
    paths = resolve_weights(settings)
    dtype, device = settings.torch_dtype(), settings.device
    try:
        return _load_all(paths, settings, dtype, device)
    except OSError as exc:  # a config present but its weight files not (partial download)
        where = ", ".join(map(str, (paths.dit, paths.encoders, paths.wav2vec, *paths.adapters.values())))
        raise MissingWeightsError(f"incomplete weights under {where}: {exc}") from exc


def _load_all(paths: WeightPaths, settings: EngineSettings, dtype: torch.dtype, device: str) -> Any:
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, CLIPVisionModel, UMT5EncoderModel

    from engine.multitalk.audio import Wav2VecEncoder
    from engine.multitalk.components import Components

    enc = paths.encoders
    wav2vec = Wav2VecEncoder.from_folder(paths.wav2vec, settings.wav2vec_device)
    adapter = paths.adapters[
        settings.adapter_name()
    ]  # InfiniteTalk: single/ until a 2-person job (use_adapter)
    # offload: the DiT and umT5 stay in host memory (speed.py streams the blocks; prompts encode on the CPU)
    host_side = "cpu" if settings.offload != "none" else device
    transformer, _ = load_transformer(
        paths.dit, paths.dit_layout, adapter, wav2vec.layers, wav2vec.dim, host_side, dtype
    )
    load = {"torch_dtype": dtype, "output_loading_info": True}
    text_encoder = _checked(UMT5EncoderModel.from_pretrained(enc / "text_encoder", **load), "text_encoder")
    image_encoder = _checked(
        CLIPVisionModel.from_pretrained(enc / "image_encoder", **load),
        "image_encoder",
        ("visual_projection",),
    )
    vae = _checked(
        AutoencoderKLWan.from_pretrained(enc / "vae", torch_dtype=torch.float32, output_loading_info=True),
        "vae",
    )
    return Components(
        transformer,
        vae.to(device),
        text_encoder.to(host_side),
        AutoTokenizer.from_pretrained(enc / "tokenizer"),
        image_encoder.to(device),
        wav2vec,
    )


# -- models check / download ----------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightStatus:
    component: str
    repo_id: str
    filename: str
    path: Path | None
    size: int | None
    sha256: str | None = None

    @property
    def present(self) -> bool:
        return self.path is not None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def present_dit(models_dir: Path | None) -> str:
    """The DiT component to check: the diffusers layout when present (the loader prefers it), else the original."""
    return (
        "base-diffusers" if locate(WEIGHT_SPECS["base-diffusers"], models_dir).folder is not None else "base"
    )


def check_weights(
    models_dir: Path | None, components: Iterable[str] | None = None, sha256: bool = False
) -> list[WeightStatus]:
    """Presence and size (optionally sha256) of every required file, per component.

    By default every component: the DiT in the layout that is present (diffusers first, as the loader
    does), else the original layout, the encoders, every adapter (MultiTalk, InfiniteTalk single and
    multi) and wav2vec2."""
    if components is None:
        components = (present_dit(models_dir), "encoders", *ADAPTERS, "wav2vec")
    statuses, linked = [], None
    for name in component_names(components):
        loc = locate(WEIGHT_SPECS[name], models_dir)
        folder = loc.folder or next((p for p in loc.searched if p.is_dir()), None)
        if name in ("base", "base-diffusers") and loc.folder is not None:
            linked = linked_adapter(loc.folder, name)  # MultiTalk README layout: the adapter is in the index
        if name == "multitalk" and loc.folder is None and linked is not None:
            statuses.append(
                WeightStatus(name, "(linked by the DiT index)", linked.name, linked, linked.stat().st_size)
            )
            continue
        for f in required_files(loc.spec, folder):
            path = folder / f if folder and (folder / f).is_file() else None
            size = path.stat().st_size if path else None
            digest = _sha256(path) if path and sha256 else None
            statuses.append(WeightStatus(name, loc.spec.repo_id, f, path, size, digest))
    return statuses


def ready_engines(statuses: list[WeightStatus]) -> dict[str, list[str]]:
    """Engine -> its missing components, for each engine whose components were all checked."""
    checked = {s.component for s in statuses}
    missing = {s.component for s in statuses if not s.present}
    dit = [c for c in ("base-diffusers", "base") if c in checked]
    out = {}
    for engine, parts in ENGINE_COMPONENTS.items():
        if dit and set(parts) <= checked:
            out[engine] = [c for c in (dit[0], *parts) if c in missing]
    return out


def format_weight_report(statuses: list[WeightStatus]) -> str:
    """Human-readable table for `dubflow models check`; the CLI only prints it."""
    lines = []
    for s in statuses:
        mark = "ok     " if s.present else "MISSING"
        size = f"{s.size / 2**30:8.2f} GiB" if s.size is not None else " " * 12
        digest = f"  sha256 {s.sha256}" if s.sha256 else ""
        lines.append(f"{mark} {s.component:19} {s.repo_id}/{s.filename} {size}{digest}")
    missing = sum(not s.present for s in statuses)
    lines.append(f"{len(statuses) - missing} of {len(statuses)} files present")
    for engine, lacking in ready_engines(statuses).items():
        state = "ready" if not lacking else f"needs {', '.join(lacking)}"
        lines.append(f"engine {engine}: {state}")
    return "\n".join(lines)


def download_weights(models_dir: Path, components: Iterable[str] = DEFAULT_COMPONENTS) -> list[Path]:
    """Download components into models_dir/<owner>/<name> with huggingface_hub (resumable, allow-patterns):
    only the files each component needs (InfiniteTalk: single/ or multi/, not its quantised models)."""
    from huggingface_hub import snapshot_download

    folders = []
    for name in component_names(components):
        spec = WEIGHT_SPECS[name]
        target = Path(models_dir) / spec.repo_id
        folders.append(
            Path(
                snapshot_download(
                    spec.repo_id,
                    revision=spec.revision,
                    allow_patterns=list(spec.allow_patterns),
                    local_dir=target,
                )
            )
        )
    return folders
