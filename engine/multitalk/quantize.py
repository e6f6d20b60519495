"""Weight-only quantisation of the DiT's linear layers: int8 (any device) and fp8 e4m3 (Hopper / Ada).

Both keep one scale per output row (symmetric, absmax): W ~ q * s with s_i = max_j |W_ij| / QMAX.
  int8  q in [-127, 127]; the forward dequantises to the activation dtype and runs F.linear. Per element
        |W - q s| <= s_i / 2, so each output moves by at most ||x||_1 * max_j |W_ij| / 254 (tested).
  fp8   q in float8_e4m3fn (3 mantissa bits: relative rounding error <= 2^-4); on a CUDA device of compute
        capability >= 8.9 the forward is torch._scaled_mm with per-token activation scales (fp8 x fp8 tensor
        cores, bf16 out); elsewhere (the CPU tests) it dequantises like int8. The engine refuses fp8 on other
        devices at setup, so a render never silently takes the slow path.
Only the 40 blocks' base linears are quantised (self-attention, text/image cross-attention, FFN: 13.9 of the
16.4 B parameters); the embeddings, the head and the audio adapter (its layers are swapped per job between the
InfiniteTalk single/ and multi/ files, and its audio projection is small) stay in the model dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper fp8 tensor cores


def fp8_supported(device: str | torch.device) -> tuple[bool, str]:
    """Whether `device` has fp8 tensor cores (and this torch has float8 and _scaled_mm)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, f"fp8 needs a CUDA GPU of compute capability >= 8.9 (Ada, Hopper); device is {device}"
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return False, f"torch {torch.__version__} has no float8 matmul; install torch >= 2.4"
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        return (
            False,
            f"fp8 needs compute capability >= 8.9; {torch.cuda.get_device_name(device)} is {capability}",
        )
    return True, "fp8 tensor cores"


class QuantizedLinear(nn.Module):
    """A linear layer holding `qweight` (out, in) int8 or float8 and `scale` (out,) fp32."""

    def __init__(self, linear: nn.Linear, kind: str, scaled_mm: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.kind = linear.in_features, linear.out_features, kind
        weight = linear.weight.detach().float()
        qmax = INT8_MAX if kind == "int8" else FP8_MAX
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / qmax  # (out,)
        scaled = weight / scale[:, None]
        qweight = (
            scaled.round().clamp(-qmax, qmax).to(torch.int8)
            if kind == "int8"
            else scaled.to(torch.float8_e4m3fn)
        )
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.bias = (
            None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        )
        self.scaled_mm = scaled_mm

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return (self.qweight.float() * self.scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scaled_mm and x.is_cuda:
            return self._fp8_matmul(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def _fp8_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """fp8 x fp8 on tensor cores: per-token activation scales (M, 1), per-row weight scales (1, N)."""
        rows = x.reshape(-1, self.in_features)
        x_scale = rows.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
        x8 = (rows.float() / x_scale).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(
            x8,
            self.qweight.t(),
            scale_a=x_scale,
            scale_b=self.scale[None, :],
            bias=self.bias,
            out_dtype=x.dtype,
        )
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.kind}"


def quantize_blocks(model: Any, kind: str, device: str | torch.device = "cpu") -> int:
    """Replaces every nn.Linear inside model.blocks by a QuantizedLinear; returns how many."""
    scaled_mm = kind == "fp8" and fp8_supported(device)[0]
    count = 0
    from engine.multitalk.weights import ADAPTER_BLOCK_PARTS

    for block in model.blocks:
        adapter = {id(m) for part in ADAPTER_BLOCK_PARTS for m in getattr(block, part).modules()}
        for module in [m for m in block.modules() if id(m) not in adapter]:
            for child_name, child in list(module.named_children()):
                if type(child) is nn.Linear:
                    setattr(
                        module, child_name, QuantizedLinear(child, kind, scaled_mm).to(child.weight.device)
                    )
                    count += 1
    return count


def output_bound(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The int8 bound per output element: ||x||_1 * max_j |W_ij| / 254, shaped like linear(x)."""
    row_max = linear.weight.detach().float().abs().amax(dim=1)  # (out,)
    return x.float().abs().sum(dim=-1, keepdim=True) * row_max / (2 * INT8_MAX)
