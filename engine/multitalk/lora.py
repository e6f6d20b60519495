"""LoRAs for the DiT: the released few-step distillations (lightx2v, FusionX) and any other LoRA in the kohya,
diffusers / ComfyUI or peft key layouts, merged into the weights or applied unmerged, several at once.

Layouts (after the prefix, the module in the original Wan or the diffusers naming, then the part):
  kohya      lora_unet_blocks_0_self_attn_q.lora_down.weight / .lora_up.weight / .alpha
  diffusers  [transformer.|diffusion_model.]blocks.0.attn1.to_q.lora_A.weight / .lora_B.weight [/ .alpha]
             (lightx2v / FusionX also ship .diff (full weight delta) and .diff_b (bias delta) for some layers)
  peft       base_model.model.blocks.0.attn1.to_q.lora_A[.default].weight, rank/alpha in adapter_config.json
Merged: W += s * (alpha / rank) * up @ down (fp32, then the weight's dtype). Unmerged: a forward hook adds
s * (alpha / rank) * up(down(x)) to the layer's output, so the base weights stay untouched (and can be int8 or
fp8). Deltas on layers that are not linear (norms) are always merged. Every key must name a module of the DiT:
a LoRA for another model is refused, not half-applied.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.base import EngineSetupError

PREFIXES = ("base_model.model.", "diffusion_model.", "transformer.", "model.")
KOHYA_PREFIX = "lora_unet_"
PARTS = {
    ".lora_down.weight": "down",
    ".lora_A.weight": "down",
    ".lora_A.default.weight": "down",
    ".lora_up.weight": "up",
    ".lora_B.weight": "up",
    ".lora_B.default.weight": "up",
    ".alpha": "alpha",
    ".diff": "diff",
    ".diff_b": "diff_b",
}
_PART = re.compile("(" + "|".join(re.escape(p) for p in sorted(PARTS, key=len, reverse=True)) + ")$")


class LoraError(EngineSetupError):
    """A LoRA file that cannot be applied to this DiT (missing, unreadable, or keys of another model)."""


@dataclass(frozen=True)
class LoraSpec:
    path: Path
    scale: float = 1.0
    stamp: str = ""  # size and mtime of the file when the run was resolved: a replaced file is a new render

    @classmethod
    def stamped(cls, path: Path, scale: float = 1.0) -> LoraSpec:
        stat = Path(path).stat()
        return cls(Path(path), scale, f"{stat.st_size}:{stat.st_mtime_ns}")


@dataclass
class LoraDelta:
    """One layer's delta: up @ down (times alpha / rank), and/or a full weight and bias difference."""

    down: Any = None  # (rank, in)
    up: Any = None  # (out, rank)
    alpha: float | None = None
    diff: Any = None  # same shape as the weight
    diff_b: Any = None  # same shape as the bias

    @property
    def rank_scale(self) -> float:
        rank = self.down.shape[0]
        return 1.0 if self.alpha is None else self.alpha / rank


@dataclass
class LoraReport:
    """What one LoRA changed: layers merged / hooked, the layout it was read in."""

    path: str
    layout: str
    scale: float
    merged: list[str] = field(default_factory=list)
    hooked: list[str] = field(default_factory=list)

    def to_json_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "layout": self.layout, "scale": self.scale,
            "merged": len(self.merged), "hooked": len(self.hooked),
        }  # fmt: skip


# -- reading ---------------------------------------------------------------------------------------
def header_keys(path: Path) -> list[str]:
    """Tensor names from a safetensors header, without torch (the manifest checks files with it)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise LoraError(
            f"{path}: not a readable .safetensors file ({exc}); give a LoRA in safetensors"
        ) from exc
    if not isinstance(header, dict):
        raise LoraError(f"{path}: not a safetensors header; give a LoRA in safetensors")
    return [k for k in header if k != "__metadata__"]


def lora_layout(keys: list[str]) -> str:
    """'kohya', 'peft', 'diffusers' (diffusers / ComfyUI / lightx2v names) or '' when no key is a LoRA part."""
    parts = [k for k in keys if _PART.search(k)]
    if not parts:
        return ""
    if all(k.startswith(KOHYA_PREFIX) for k in parts):
        return "kohya"
    if all(k.startswith("base_model.model.") for k in parts):
        return "peft"
    return "diffusers"


def check_lora_file(path: Path) -> str:
    """The file's layout; LoraError (one line, naming the file) when it is missing or holds no LoRA."""
    if not path.is_file():
        raise LoraError(f"{path}: no such file; give the path of a .safetensors LoRA")
    keys = header_keys(path)
    layout = lora_layout(keys)
    if not layout:
        sample = ", ".join(keys[:3]) or "no tensors"
        raise LoraError(
            f"{path}: no LoRA keys (lora_down/lora_up, lora_A/lora_B, diff) among {sample}; give a LoRA file"
        )
    return layout


def _peft_alpha(path: Path) -> float | None:
    """peft keeps lora_alpha in adapter_config.json beside the weights (rank from the tensors)."""
    config = path.parent / "adapter_config.json"
    if not config.is_file():
        return None
    return float(json.loads(config.read_text()).get("lora_alpha", 0)) or None


def _module_names(model: Any) -> dict[str, str]:
    """Every name a layout may give a DiT module -> its name in our model (diffusers naming): diffusers and
    original Wan names, and both with dots as underscores (kohya)."""
    from engine.multitalk.weights import diffusers_to_original

    names: dict[str, str] = {}
    for name, _ in model.named_modules():
        if not name:
            continue
        original = diffusers_to_original(f"{name}.weight")
        for alias in {name, original[: -len(".weight")] if original else name}:
            names[alias] = name
            names[alias.replace(".", "_")] = name
    return names


def _target(key: str, names: dict[str, str]) -> str | None:
    stem = key
    for prefix in (KOHYA_PREFIX, *PREFIXES):
        if stem.startswith(prefix):
            stem = stem[len(prefix) :]
            break
    return names.get(stem)


def read_lora(path: Path, model: Any) -> tuple[str, dict[str, LoraDelta]]:
    """(layout, {our module name: delta}). LoraError for a key that names no module of this DiT."""
    import torch
    from safetensors.torch import load_file

    layout = check_lora_file(path)
    names = _module_names(model)
    deltas: dict[str, LoraDelta] = {}
    for key, tensor in load_file(str(path)).items():
        part = _PART.search(key)
        if part is None:
            raise LoraError(f"{path}: key {key!r} is not a LoRA part ({', '.join(PARTS)}); rule: a LoRA file")
        module = _target(key[: part.start()], names)
        if module is None:
            raise LoraError(
                f"{path}: key {key!r} names no layer of the MultiTalk DiT; rule: a LoRA for Wan 2.1 I2V-14B"
            )
        delta = deltas.setdefault(module, LoraDelta())
        kind = PARTS[part.group(1)]
        value: Any = float(tensor.float().item()) if kind == "alpha" else tensor.to(torch.float32)
        setattr(delta, kind, value)
    if layout == "peft":
        alpha = _peft_alpha(path)
        for delta in deltas.values():
            delta.alpha = delta.alpha if delta.alpha is not None else alpha
    for module, delta in deltas.items():
        if (delta.down is None) != (delta.up is None):
            raise LoraError(f"{path}: {module} has only one of its down/up matrices; rule: both")
    return layout, deltas


# -- applying --------------------------------------------------------------------------------------
def low_rank(delta: LoraDelta) -> Any:
    """up @ down * alpha / rank, shaped as (out, in) (fp32)."""
    return (delta.up.flatten(1) @ delta.down.flatten(1)) * delta.rank_scale


def merge_delta(module: Any, delta: LoraDelta, scale: float) -> None:
    """W += s * (up @ down * alpha / rank + diff); b += s * diff_b, in fp32, stored in the weight's dtype."""
    import torch

    with torch.no_grad():
        weight = module.weight
        change = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        if delta.down is not None:
            change += low_rank(delta).reshape(weight.shape).to(weight.device)
        if delta.diff is not None:
            change += delta.diff.reshape(weight.shape).to(weight.device)
        weight.copy_((weight.float() + scale * change).to(weight.dtype))
        if delta.diff_b is not None:
            module.bias.copy_(
                (module.bias.float() + scale * delta.diff_b.to(module.bias.device)).to(module.bias.dtype)
            )


def hook_delta(module: Any, delta: LoraDelta, scale: float, dtype: Any) -> Any:
    """Adds s * (up(down(x)) * alpha / rank + x @ diff^T + diff_b) to the layer's output; returns the handle.
    The small LoRA tensors follow the input's device (an offloaded layer's weights move, its LoRA stays put)."""
    import torch
    import torch.nn.functional as F

    parts = {
        "down": None if delta.down is None else (delta.down * delta.rank_scale * scale).to(dtype),
        "up": None if delta.up is None else delta.up.to(dtype),
        "diff": None if delta.diff is None else (delta.diff * scale).to(dtype),
        "diff_b": None if delta.diff_b is None else (delta.diff_b * scale).to(dtype),
    }

    def add_delta(_module: Any, inputs: tuple, output: Any) -> Any:
        x = inputs[0].to(dtype)
        if any(t is not None and t.device != x.device for t in parts.values()):
            parts.update({k: None if t is None else t.to(x.device) for k, t in parts.items()})
        down, up, diff, diff_b = parts["down"], parts["up"], parts["diff"], parts["diff_b"]
        extra = F.linear(F.linear(x, down), up) if down is not None else torch.zeros_like(output, dtype=dtype)
        if diff is not None:
            extra = extra + F.linear(x, diff, diff_b)
        elif diff_b is not None:
            extra = extra + diff_b
        return output + extra.to(output.dtype)

    return module.register_forward_hook(add_delta)


def is_linear(module: Any) -> bool:
    """nn.Linear, or a quantised one (quantize.QuantizedLinear): what a hook can add a delta to."""
    return hasattr(module, "in_features") and hasattr(module, "out_features")


def apply_loras(model: Any, specs: tuple[LoraSpec, ...], merge: bool, dtype: Any) -> list[LoraReport]:
    """Applies each LoRA in order (merged, or hooked on the linear layers); returns what each changed."""
    modules = dict(model.named_modules())
    reports = []
    for spec in specs:
        layout, deltas = read_lora(Path(spec.path), model)
        report = LoraReport(str(spec.path), layout, spec.scale)
        for name, delta in deltas.items():
            module = modules[name]
            if merge or not is_linear(module):
                merge_delta(module, delta, spec.scale)
                report.merged.append(name)
            else:
                hook_delta(module, delta, spec.scale, dtype)
                report.hooked.append(name)
        reports.append(report)
    return reports
