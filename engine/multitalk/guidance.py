"""Three-way classifier-free guidance and APG (ENGINE.md §4.4, §4.5).

Passes (MultiTalk: wan/multitalk.py:604-641, 664-713):
  cond        prompt,   real audio (P persons)
  drop_text   negative, real audio
  uncond      negative, null audio (1 person)
  drop_audio  prompt,   null audio  (only when text_scale == 1)
With text_scale == audio_scale == 1 (the distilled LoRAs' sampler) the guided velocity is the cond pass
itself, so only that pass runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from engine.multitalk.settings import (  # noqa: F401 - the pass rule lives with the settings (no torch)
    APG_MOMENTUM,
    APG_NORM_THRESHOLD,
    ONE_PASS,
    THREE_PASS,
    TWO_PASS,
    guidance_passes,
    is_unit_scale,
)


def combine_cfg(v: dict[str, torch.Tensor], text_scale: float, audio_scale: float) -> torch.Tensor:
    """Classifier-free guidance over the passes of `guidance_passes(text_scale, audio_scale)`, in fp32."""
    if "drop_audio" not in v and "drop_text" not in v:  # one pass: both scales are 1
        return v["cond"].float()
    if is_unit_scale(text_scale):
        base = v["drop_audio"].float()
        return base + audio_scale * (v["cond"].float() - base)
    cond, drop_text, uncond = v["cond"].float(), v["drop_text"].float(), v["uncond"].float()
    return uncond + text_scale * (cond - drop_text) + audio_scale * (drop_text - uncond)


@dataclass
class MomentumBuffer:
    """R <- D + m * R (m = -0.75 upstream); fresh per chunk."""

    momentum: float = APG_MOMENTUM
    running: torch.Tensor | None = field(default=None, repr=False)

    def update(self, diff: torch.Tensor) -> torch.Tensor:
        self.running = diff if self.running is None else diff + self.momentum * self.running
        return self.running


def project_apg(
    diff: torch.Tensor,
    cond: torch.Tensor,
    buffer: MomentumBuffer | None,
    norm_threshold: float = APG_NORM_THRESHOLD,
    eta: float = 0.0,
) -> torch.Tensor:
    """Adaptive projected guidance of one difference (norms over the whole tensor, per sample)."""
    if buffer is not None:
        diff = buffer.update(diff)
    norm = diff.flatten().norm()
    if 0 < norm_threshold < math.inf:
        diff = diff * torch.clamp(norm_threshold / norm, max=1.0)
    diff64, cond64 = diff.double(), cond.double()
    unit = cond64 / cond64.flatten().norm()
    parallel = (diff64 * unit).sum() * unit
    orthogonal = diff64 - parallel
    return (orthogonal + eta * parallel).to(diff.dtype)


@dataclass
class APGState:
    """The two momentum buffers of one chunk (text and audio differences)."""

    text: MomentumBuffer = field(default_factory=MomentumBuffer)
    audio: MomentumBuffer = field(default_factory=MomentumBuffer)
    norm_threshold: float = APG_NORM_THRESHOLD
    eta: float = 0.0


def combine_apg(
    v: dict[str, torch.Tensor], text_scale: float, audio_scale: float, state: APGState
) -> torch.Tensor:
    """v = v_cond + (s - 1) * APG(diff) per guided difference (ENGINE.md §4.5)."""
    cond = v["cond"].float()
    if "drop_audio" not in v and "drop_text" not in v:  # one pass: both scales are 1, nothing to guide
        return cond

    def apg(diff: torch.Tensor, buf: MomentumBuffer) -> torch.Tensor:
        return project_apg(diff, cond, buf, state.norm_threshold, state.eta)

    if is_unit_scale(text_scale):
        return cond + (audio_scale - 1.0) * apg(cond - v["drop_audio"].float(), state.audio)
    drop_text, uncond = v["drop_text"].float(), v["uncond"].float()
    return (
        cond
        + (text_scale - 1.0) * apg(cond - drop_text, state.text)
        + (audio_scale - 1.0) * apg(drop_text - uncond, state.audio)
    )
