"""Weights: where they are, how their keys map, strict streaming loads, `models check/download` helpers.

Released files (ENGINE.md §7.1), loaded unchanged:
  DiT      Wan-AI/Wan2.1-I2V-14B-480P (original: sharded safetensors + index + config.json)
           or Wan-AI/Wan2.1-I2V-14B-480P-Diffusers transformer/ (diffusers layout)
  adapter  MeiGen-AI/MeiGen-MultiTalk multitalk.safetensors (330 keys, upstream names)
  encoders Wan-AI/Wan2.1-I2V-14B-480P-Diffusers text_encoder/ tokenizer/ image_encoder/ vae/
  audio    TencentGameMate/chinese-wav2vec2-base (model.safetensors from revision refs/pr/1)
Part 1 reads umT5 / CLIP / VAE from the diffusers layout only (the original .pth encoders need the
open-clip and T5 conversions, not written yet); the DiT loads from either layout.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.base import EngineSetupError, MissingWeightsError
from engine.multitalk.settings import (
    ADAPTER_FILE,
    ADAPTER_REPO,
    BASE_DIFFUSERS_REPO,
    BASE_REPO,
    WAV2VEC_REPO,
    AdapterConfig,
    DiTConfig,
    EngineSettings,
)

WAV2VEC_REVISION = "refs/pr/1"  # the MultiTalk README takes model.safetensors from this revision
ORIGINAL_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_INDEX = "transformer/diffusion_pytorch_model.safetensors.index.json"
ENCODER_FOLDERS = ("text_encoder", "tokenizer", "image_encoder", "vae")
ADAPTER_PREFIXES = ("audio_proj.",)
ADAPTER_BLOCK_PARTS = ("audio_cross_attn", "norm_x")
KEEP_FP32 = ("rope", "time_embedder", "scale_shift_table", "norm1", "norm2", "norm3", "norm_x")
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
@dataclass(frozen=True)
class WeightSpec:
    """One component: a repo, the files that must be present, the download patterns."""

    component: str
    repo_id: str
    required: tuple[str, ...]  # files; an index json also requires the shards it lists
    allow_patterns: tuple[str, ...]
    revision: str | None = None


WEIGHT_SPECS: dict[str, WeightSpec] = {
    "base": WeightSpec(
        "base", BASE_REPO, ("config.json", ORIGINAL_INDEX), ("config.json", "diffusion_pytorch_model*")
    ),
    "base-diffusers": WeightSpec(
        "base-diffusers",
        BASE_DIFFUSERS_REPO,
        ("transformer/config.json", DIFFUSERS_INDEX),
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
    "adapter": WeightSpec("adapter", ADAPTER_REPO, (ADAPTER_FILE,), (ADAPTER_FILE, "*.json")),
    "wav2vec": WeightSpec(
        "wav2vec",
        WAV2VEC_REPO,
        ("config.json", "preprocessor_config.json", "model.safetensors"),
        ("*.json", "model.safetensors"),
        WAV2VEC_REVISION,
    ),
}
DEFAULT_COMPONENTS = ("base", "encoders", "adapter", "wav2vec")


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


def required_files(spec: WeightSpec, folder: Path) -> list[str]:
    """The spec's files plus every shard named by an index json present in `folder`."""
    files = list(spec.required)
    for name in spec.required:
        index = folder / name
        if name.endswith(".index.json") and index.is_file():
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
    best_missing = list(spec.required)
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
    target = f" --models-dir {models_dir}" if models_dir else ""
    lines.append(f"download them with: dubflow models download{target}")
    return MissingWeightsError("\n".join(lines))


def resolve_folders(settings: EngineSettings) -> dict[str, Path]:
    """Folders of the DiT (key 'base' or 'base-diffusers'), encoders, adapter and wav2vec2.

    Raises one MissingWeightsError naming every missing repo/file and the places searched."""
    layouts = {"original": ["base"], "diffusers": ["base-diffusers"], "auto": ["base-diffusers", "base"]}
    base_options = [locate(WEIGHT_SPECS[name], settings.models_dir) for name in layouts[settings.base_layout]]
    base = next((loc for loc in base_options if loc.folder is not None), base_options[-1])
    others = [locate(WEIGHT_SPECS[name], settings.models_dir) for name in ("encoders", "adapter", "wav2vec")]
    missing = [loc for loc in (base, *others) if loc.folder is None]
    if missing:
        raise missing_weights_error(missing, settings.models_dir)
    return {loc.spec.component: loc.folder for loc in (base, *others)}  # type: ignore[misc]


# -- strict streaming load ---------------------------------------------------------------------------
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


def stream_into(
    model: torch.nn.Module,
    sources: Iterable[tuple[Path, Callable[[str], str | None]]],
    device: torch.device | str,
    dtype: torch.dtype,
) -> LoadReport:
    """Assign every tensor of every file to `model` (built on the meta device), one file at a time.

    Strict accounting: every parameter assigned exactly once, every file key used, shapes equal."""
    from safetensors import safe_open

    expected = {name: p.shape for name, p in model.named_parameters()}
    report, assigned = LoadReport(), set()
    for path, rename in sources:
        part = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                name = rename(key)
                if name is None and any(part in IGNORED_DIFFUSERS_KEYS for part in key.split(".")):
                    report.ignored.append(key)
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


def original_dit_config(folder: Path, adapter: AdapterConfig) -> DiTConfig:
    """DiTConfig from an original-layout config.json (dim, num_heads, ...) and the first shard's shapes."""
    cfg = json.loads((folder / "config.json").read_text())
    index = json.loads((folder / ORIGINAL_INDEX).read_text())["weight_map"]
    shapes: dict[str, list[int]] = {}
    for shard in sorted(set(index.values())):
        shapes.update(_header_shapes(folder / shard))
    heads = cfg["num_heads"]
    return DiTConfig(
        num_attention_heads=heads, attention_head_dim=cfg["dim"] // heads, in_channels=cfg["in_dim"],
        out_channels=cfg["out_dim"], text_dim=shapes["text_embedding.0.weight"][1], freq_dim=cfg["freq_dim"],
        ffn_dim=cfg["ffn_dim"], num_layers=cfg["num_layers"], eps=cfg.get("eps", 1e-6),
        image_dim=shapes["img_emb.proj.0.weight"][0], added_kv_proj_dim=shapes["blocks.0.cross_attn.k_img.weight"][1],
        adapter=adapter,
    )  # fmt: skip


def diffusers_dit_config(folder: Path, adapter: AdapterConfig) -> DiTConfig:
    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    fields = set(DiTConfig.__dataclass_fields__) - {"adapter"}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.items() if k in fields}
    return DiTConfig(**kwargs, adapter=adapter)


def load_transformer(
    base: Path,
    layout: str,
    adapter_file: Path,
    audio_layers: int,
    audio_dim: int,
    device: str,
    dtype: torch.dtype,
) -> tuple[Any, LoadReport]:
    """Build the MultiTalk DiT on the meta device and stream the base shards and the adapter into it."""
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    from engine.multitalk.transformer import MultiTalkTransformer3DModel

    adapter = adapter_config(adapter_file, audio_layers, audio_dim)
    if layout == "base":
        cfg = original_dit_config(base, adapter)
        index, prefix, rename = base / ORIGINAL_INDEX, base, _non_adapter(original_to_diffusers)
    else:
        cfg = diffusers_dit_config(base, adapter)
        index, prefix, rename = base / DIFFUSERS_INDEX, base / "transformer", _non_adapter(lambda k: k)
    with torch.device("meta"):
        model = MultiTalkTransformer3DModel.from_dit_config(cfg)
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    sources = [(prefix / s, rename) for s in shards] + [(adapter_file, _adapter_only)]
    report = stream_into(model, sources, device, dtype)
    if report.problems():
        raise EngineSetupError(f"DiT weights do not match the model: {'; '.join(report.problems())}")
    expected_adapter = 10 + 8 * cfg.num_layers
    if report.adapter_keys != expected_adapter:
        raise EngineSetupError(
            f"{adapter_file.name}: {report.adapter_keys} adapter keys, expected {expected_adapter}"
        )
    model.rope = WanRotaryPosEmbed(cfg.attention_head_dim, cfg.patch_size, cfg.rope_max_seq_len).to(device)
    return model.eval(), report


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
    folders = resolve_folders(settings)
    dtype, device = settings.torch_dtype(), settings.device
    try:
        return _load_all(folders, settings, dtype, device)
    except OSError as exc:  # a config present but its weight files not (partial download)
        raise MissingWeightsError(
            f"incomplete weights under {', '.join(map(str, folders.values()))}: {exc}"
        ) from exc


def _load_all(folders: dict[str, Path], settings: EngineSettings, dtype: torch.dtype, device: str) -> Any:
    from diffusers import AutoencoderKLWan
    from transformers import AutoTokenizer, CLIPVisionModel, UMT5EncoderModel

    from engine.multitalk.audio import Wav2VecEncoder
    from engine.multitalk.pipeline import Components

    enc = folders["encoders"]
    wav2vec = Wav2VecEncoder.from_folder(folders["wav2vec"], settings.wav2vec_device)
    layout = "base" if "base" in folders else "base-diffusers"
    transformer, _ = load_transformer(
        folders[layout], layout, folders["adapter"] / ADAPTER_FILE, wav2vec.layers, wav2vec.dim, device, dtype
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
        text_encoder.to(device),
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


def check_weights(
    models_dir: Path | None, components: Iterable[str] | None = None, sha256: bool = False
) -> list[WeightStatus]:
    """Presence and size (optionally sha256) of every required file, per component.

    By default the DiT is checked in the layout that is present (diffusers first, as the loader does),
    else in the original layout, plus encoders, adapter and wav2vec2."""
    if components is None:
        diffusers_dit = locate(WEIGHT_SPECS["base-diffusers"], models_dir).folder is not None
        components = ("base-diffusers" if diffusers_dit else "base", *DEFAULT_COMPONENTS[1:])
    statuses = []
    for name in components:
        loc = locate(WEIGHT_SPECS[name], models_dir)
        folder = loc.folder or next((p for p in loc.searched if p.is_dir()), None)
        files = required_files(loc.spec, folder) if folder else list(loc.spec.required)
        for f in files:
            path = folder / f if folder and (folder / f).is_file() else None
            size = path.stat().st_size if path else None
            digest = _sha256(path) if path and sha256 else None
            statuses.append(WeightStatus(name, loc.spec.repo_id, f, path, size, digest))
    return statuses


def format_weight_report(statuses: list[WeightStatus]) -> str:
    """Human-readable table for `dubflow models check`; the CLI only prints it."""
    lines = []
    for s in statuses:
        mark = "ok     " if s.present else "MISSING"
        size = f"{s.size / 2**30:8.2f} GiB" if s.size is not None else " " * 12
        digest = f"  sha256 {s.sha256}" if s.sha256 else ""
        lines.append(f"{mark} {s.component:15} {s.repo_id}/{s.filename} {size}{digest}")
    missing = sum(not s.present for s in statuses)
    lines.append(f"{len(statuses) - missing} of {len(statuses)} files present")
    return "\n".join(lines)


def download_weights(models_dir: Path, components: Iterable[str] = DEFAULT_COMPONENTS) -> list[Path]:
    """Download components into models_dir/<owner>/<name> with huggingface_hub (resumable, allow-patterns)."""
    from huggingface_hub import snapshot_download

    folders = []
    for name in components:
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
