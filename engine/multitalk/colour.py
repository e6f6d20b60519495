"""Colour drift control (ENGINE.md §5.5): per-frame CIE Lab mean/std transfer to an anchor, blended.

Upstream (MultiTalk: wan/utils/multitalk_utils.py:361-463) loops over frames with scikit-image; this is the
same transfer vectorised in torch (sRGB D65 <-> Lab by formula), so it runs on the GPU and needs no
scikit-image. Frames are (3, T, H, W) in [-1, 1], as the VAE decodes them.
"""

from __future__ import annotations

import torch

# sRGB (linear) -> XYZ, D65; and the D65 white point (scikit-image's defaults).
_RGB_TO_XYZ = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_WHITE = (0.95047, 1.0, 1.08883)
_EPS = 216 / 24389  # CIE epsilon (0.008856)
_KAPPA = 24389 / 27  # CIE kappa (903.3)


def _matrix(like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(_RGB_TO_XYZ, dtype=like.dtype, device=like.device)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """(3, ...) sRGB in [0, 1] -> (3, ...) Lab (L in [0, 100])."""
    linear = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = torch.einsum("ij,j...->i...", _matrix(rgb), linear)
    xyz = xyz / torch.tensor(_WHITE, dtype=rgb.dtype, device=rgb.device).view(3, *[1] * (rgb.ndim - 1))
    f = torch.where(xyz > _EPS, xyz.clamp(min=_EPS) ** (1 / 3), (_KAPPA * xyz + 16) / 116)
    return torch.stack([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """(3, ...) Lab -> (3, ...) sRGB clipped to [0, 1] (negative Z clamped, as scikit-image does)."""
    fy = (lab[0] + 16) / 116
    f = torch.stack([fy + lab[1] / 500, fy, (fy - lab[2] / 200).clamp(min=0)])
    xyz = torch.where(f > 6 / 29, f**3, (f - 16 / 116) * 3 * (6 / 29) ** 2)
    xyz = xyz * torch.tensor(_WHITE, dtype=lab.dtype, device=lab.device).view(3, *[1] * (lab.ndim - 1))
    linear = torch.einsum("ij,j...->i...", torch.linalg.inv(_matrix(lab)), xyz)
    rgb = torch.where(
        linear > 0.0031308, 1.055 * linear.clamp(min=1e-12) ** (1 / 2.4) - 0.055, 12.92 * linear
    )
    return rgb.clamp(0.0, 1.0)


def lab_stats(frame: torch.Tensor) -> torch.Tensor:
    """(3, H, W) [-1, 1] image -> (2, 3) float64: per-channel Lab mean and (population) std."""
    lab = rgb_to_lab(((frame.double() + 1) / 2).clamp(0, 1)).flatten(1)
    return torch.stack([lab.mean(1), lab.std(1, unbiased=False)])


def match_colours(video: torch.Tensor, anchor: torch.Tensor, strength: float) -> torch.Tensor:
    """Transfer each frame's Lab mean/std to `anchor` ((2, 3) from `lab_stats`), blend with `strength`.

    video: (3, T, H, W) in [-1, 1]. A flat channel (std 0) takes the anchor mean. Strength 0 returns the
    input unchanged; the result is in [-1, 1] in the input's dtype."""
    if strength == 0.0:
        return video
    src = ((video.double() + 1) / 2).clamp(0, 1)  # (3, T, H, W)
    lab = rgb_to_lab(src)
    mean = lab.mean(dim=(2, 3), keepdim=True)  # (3, T, 1, 1)
    std = lab.std(dim=(2, 3), keepdim=True, unbiased=False)
    ref_mean = anchor[0].to(lab).view(3, 1, 1, 1)
    ref_std = anchor[1].to(lab).view(3, 1, 1, 1)
    moved = (lab - mean) * (ref_std / std.clamp(min=1e-12)) + ref_mean
    moved = torch.where(std == 0, ref_mean.expand_as(lab), moved)
    out = (1 - strength) * src + strength * lab_to_rgb(moved)
    return (out * 2 - 1).to(video.dtype)
