"""The speed and memory switches of `EngineSettings`, checked and applied to a loaded DiT, in this order:
LoRAs merged into the weights -> weight-only quantisation (int8 / fp8) -> unmerged LoRAs (hooks on the
quantised layers) -> block offload with prefetch -> the self-attention kernel -> regional torch.compile.

`speed_problems` names every switch this machine cannot serve (one line each); the pipeline raises them as
an EngineSetupError before any weight is touched, and the manifest check asks the same questions earlier
(`fp8_capable`, `attention_installed`) without importing torch.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path
from typing import Any

from engine.base import EngineSetupError
from engine.multitalk.lora import LoraError, check_lora_file
from engine.multitalk.settings import EngineSettings

# module -> backend; flash-attention 3 (Hopper, `flash_attn_interface`) before 2 (`flash_attn`)
ATTENTION_MODULES = {"flash": ("flash_attn_interface", "flash_attn"), "sage": ("sageattention",)}
ATTENTION_INSTALL = {
    "flash": "pip install flash-attn --no-build-isolation",
    "sage": "pip install sageattention",
}
FP8_CAPABILITY = 8.9


def attention_installed(backend: str) -> str | None:
    """The module that provides `backend` here (None when it is not installed); sdpa is torch's own."""
    if backend == "sdpa":
        return "torch"
    return next((m for m in ATTENTION_MODULES.get(backend, ()) if importlib.util.find_spec(m)), None)


def fp8_capable() -> tuple[bool, str]:
    """Whether every GPU nvidia-smi lists has fp8 tensor cores (compute capability >= 8.9); no torch."""
    if not shutil.which("nvidia-smi"):
        return False, "no NVIDIA GPU on this machine (fp8 needs compute capability >= 8.9: Ada, Hopper)"
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    ).stdout
    gpus = [line.rsplit(",", 1) for line in out.splitlines() if "," in line]
    slow = [f"{name.strip()} ({cap.strip()})" for name, cap in gpus if float(cap) < FP8_CAPABILITY]
    if not gpus or slow:
        return False, f"fp8 needs compute capability >= 8.9; this machine has {', '.join(slow) or 'no GPU'}"
    return True, "fp8 tensor cores"


def speed_problems(settings: EngineSettings) -> list[str]:
    """What this machine cannot do of `settings` (empty when everything can run)."""
    problems = []
    for i, lora in enumerate(settings.loras):
        try:
            check_lora_file(Path(lora.path))
        except LoraError as exc:
            problems.append(f"loras[{i}]: {exc}")
    if settings.quantize == "fp8":
        from engine.multitalk.quantize import fp8_supported

        ok, why = fp8_supported(settings.device)
        if not ok:
            problems.append(f"quantize: 'fp8': {why}; use quantize: int8")
    if settings.attention in ATTENTION_MODULES:
        if attention_installed(settings.attention) is None:
            problems.append(
                f"attention: {settings.attention!r} is not installed ({ATTENTION_INSTALL[settings.attention]})"
            )
        elif not settings.device.startswith("cuda"):
            problems.append(
                f"attention: {settings.attention!r} runs on CUDA only; device is {settings.device}"
            )
    if settings.offload == "none" and settings.resident_blocks:
        problems.append("resident_blocks: set without offload; rule: only with offload 'blocks'")
    return problems


def prepare_transformer(dit: Any, settings: EngineSettings) -> dict[str, Any]:
    """Apply the switches to a loaded DiT (in place); returns what was done, for the render result."""
    from engine.multitalk.lora import apply_loras
    from engine.multitalk.quantize import quantize_blocks

    problems = speed_problems(settings)
    if problems:
        raise EngineSetupError("; ".join(problems))
    key = _weight_switches(settings)
    applied = getattr(dit, "speed_applied", None)
    if applied is not None:  # a second pipeline over the same loaded model: never merge or quantise twice
        if applied != key:
            raise EngineSetupError(f"this DiT already carries {applied}; build fresh components for {key}")
        dit.attention_fn, attention = select_attention(settings.attention, settings.device)
        return {**dit.speed_report, "attention": attention}
    dtype, report = settings.torch_dtype(), {}
    if settings.loras and settings.lora_merge:
        report["loras"] = [r.to_json_dict() for r in apply_loras(dit, settings.loras, True, dtype)]
    if settings.quantize != "none":
        report["quantized_layers"] = quantize_blocks(dit, settings.quantize, settings.device)
    if settings.loras and not settings.lora_merge:
        report["loras"] = [r.to_json_dict() for r in apply_loras(dit, settings.loras, False, dtype)]
    if settings.offload == "blocks":
        report["offload"] = _offload(dit, settings)
    dit.attention_fn, report["attention"] = select_attention(settings.attention, settings.device)
    if settings.compile:
        import torch

        dit.block_fn = torch.compile(dit._block)  # regional: one block's graph, reused by all 40
        report["compile"] = "block"
    if key != _weight_switches(EngineSettings()):  # a plain model stays free for any switches
        dit.speed_applied, dit.speed_report = key, report
    return report


def _weight_switches(settings: EngineSettings) -> dict[str, Any]:
    """The switches that change the model itself (everything but the attention kernel)."""
    names = ("loras", "lora_merge", "quantize", "offload", "resident_blocks", "compile")
    return {name: getattr(settings, name) for name in names}


def _offload(dit: Any, settings: EngineSettings) -> dict[str, Any]:
    """Everything but the streamed blocks to the device; the blocks to the offloader."""
    from engine.multitalk.offload import BlockOffloader

    for name, child in dit.named_children():
        if name != "blocks":
            child.to(settings.device)
    for param in dit._parameters.values():
        if param is not None:
            param.data = param.data.to(settings.device)
    dit.offloader = BlockOffloader(dit.blocks, settings.device, settings.resident_blocks)
    return {"streamed_blocks": len(dit.offloader.streamed), "host_bytes": dit.offloader.host_bytes()}


def select_attention(name: str, device: str) -> tuple[Any, str]:
    """(the self-attention function on (B, H, L, D) tensors, the backend's name). `auto`: flash-attention
    when installed on a CUDA device (exact; FA3 on Hopper), else SDPA. SageAttention (int8 QK, approximate)
    only when asked for."""
    import torch.nn.functional as F

    if name == "auto":
        name = "flash" if device.startswith("cuda") and attention_installed("flash") else "sdpa"
    if name == "sdpa":
        return F.scaled_dot_product_attention, "sdpa"
    module = attention_installed(name)
    if module is None:
        raise EngineSetupError(f"attention: {name!r} is not installed ({ATTENTION_INSTALL[name]})")
    return _kernel(module), f"{name} ({module})"


def _kernel(module: str) -> Any:
    """A (B, H, L, D) -> (B, H, L, D) wrapper around the installed kernel (they take (B, L, H, D) or HND)."""
    lib = importlib.import_module(module)
    if module == "sageattention":

        def sage(q: Any, k: Any, v: Any) -> Any:
            return lib.sageattn(q, k, v, tensor_layout="HND", is_causal=False)

        return sage

    def flash(q: Any, k: Any, v: Any) -> Any:
        out = lib.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out[0] if isinstance(out, tuple) else out  # FA3 returns (out, lse) in some releases
        return out.transpose(1, 2)

    return flash
