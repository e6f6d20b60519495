"""Audio path (ENGINE.md §2): loudness, wav2vec2 features at 25 fps, per-frame windows, latent regrouping.

Shapes: T_a feature frames (25 per second), layers x dim = 12 x 768 for chinese-wav2vec2-base,
P persons, F video frames of the clip, window 5 (offsets -2..+2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.multitalk.settings import AUDIO_RATE, FPS, TARGET_LUFS

MIN_LOUDNESS_SECONDS = 0.4  # one BS.1770 gating block; shorter tracks are left as they are


def normalize_loudness(audio: np.ndarray, rate: int = AUDIO_RATE, target: float = TARGET_LUFS) -> np.ndarray:
    """Integrated loudness to `target` LUFS; silence (|loudness| > 100) and very short tracks unchanged."""
    import pyloudnorm

    audio = np.asarray(audio, dtype=np.float32)
    if len(audio) < int(MIN_LOUDNESS_SECONDS * rate):
        return audio
    loudness = pyloudnorm.Meter(rate).integrated_loudness(audio.astype(np.float64))
    if not np.isfinite(loudness) or abs(loudness) > 100:
        return audio
    gain = 10.0 ** ((target - loudness) / 20.0)
    return (audio * gain).astype(np.float32)


def feature_frames(num_samples: int, rate: int = AUDIO_RATE) -> int:
    """T_a = int(len / 16000 * 25) (MultiTalk: generate_multitalk.py:300-323)."""
    return int(num_samples / rate * FPS)


def pad_tracks(tracks: list[np.ndarray], num_frames: int) -> list[np.ndarray]:
    """End-pad every track with silence to the longest track and to at least `num_frames` frames."""
    need = max(max(len(t) for t in tracks), -(-num_frames * AUDIO_RATE // FPS))
    return [np.pad(np.asarray(t, dtype=np.float32), (0, need - len(t))) for t in tracks]


@dataclass
class Wav2VecEncoder:
    """transformers' Wav2Vec2Model run with the 25 fps resampling step of upstream (ENGINE.md §2.3)."""

    model: Any  # transformers.Wav2Vec2Model, eval mode
    do_normalize: bool = False

    @classmethod
    def from_folder(cls, folder: Path, device: str = "cpu") -> Wav2VecEncoder:
        import json

        from transformers import Wav2Vec2Model

        model = Wav2Vec2Model.from_pretrained(folder, attn_implementation="eager").to(device).eval()
        config_path = Path(folder) / "preprocessor_config.json"
        do_normalize = bool(json.loads(config_path.read_text()).get("do_normalize", False))
        return cls(model, do_normalize)

    @property
    def layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def encode(self, audio: np.ndarray, num_feature_frames: int | None = None) -> torch.Tensor:
        """One whole track in one pass -> (T_a, layers, dim) float32 on the CPU."""
        if self.model.config.do_stable_layer_norm:
            raise NotImplementedError("stable-layer-norm wav2vec2 variants are not the released layout")
        frames = feature_frames(len(audio)) if num_feature_frames is None else num_feature_frames
        values = torch.from_numpy(np.asarray(audio, dtype=np.float32))[None]  # (1, samples)
        if self.do_normalize:  # Wav2Vec2FeatureExtractor's zero-mean unit-variance normalisation
            values = (values - values.mean()) / torch.sqrt(values.var(unbiased=False) + 1e-7)
        device = next(self.model.parameters()).device
        cnn = self.model.feature_extractor(values.to(device))  # (1, 512, N): ~50 frames/s
        cnn = F.interpolate(cnn, size=frames, mode="linear", align_corners=True)  # (1, 512, T_a)
        hidden, _ = self.model.feature_projection(cnn.transpose(1, 2))  # (1, T_a, dim)
        return torch.stack(self._layer_outputs(hidden), dim=2)[0].float().cpu()

    def _layer_outputs(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's per-layer outputs = stock `hidden_states[1:]` (eager, no mask)."""
        encoder = self.model.encoder
        hidden = encoder.layer_norm(hidden + encoder.pos_conv_embed(hidden))
        outputs = []
        for layer in encoder.layers:
            out = layer(hidden, attention_mask=None)
            hidden = out[0] if isinstance(out, tuple) else out
            outputs.append(hidden)
        return outputs


def reflect_pad(features: torch.Tensor, end: int) -> torch.Tensor:
    """Upstream end padding (MultiTalk: wan/multitalk.py:774-788): when the generated frames reach past
    the track, append the time-reversed last `end - T + 3` feature frames. features: (T, layers, dim)."""
    length = features.shape[0]
    if end < length:
        return features
    count = min(end - length + 3, length)
    return torch.cat([features, features[-count:].flip(0)], dim=0)


def frame_windows(features: torch.Tensor, start: int, frames: int, window: int = 5) -> torch.Tensor:
    """(T, layers, dim) -> (frames, window, layers, dim): idx[f, w] = clamp(f + w - window//2, 0, T - 1)."""
    f = torch.arange(start, start + frames)[:, None]
    w = torch.arange(window)[None, :] - window // 2
    idx = (f + w).clamp(0, features.shape[0] - 1)
    return features[idx]


def person_windows(features: list[torch.Tensor], start: int, frames: int, window: int = 5) -> torch.Tensor:
    """Stack persons: (P, frames, window, layers, dim), reflect-padded up to the clip end."""
    end = start + frames
    return torch.stack([frame_windows(reflect_pad(f, end), start, frames, window) for f in features])


def null_windows(windows: torch.Tensor) -> torch.Tensor:
    """The 'no audio' condition: a single-person all-zero window (MultiTalk: wan/multitalk.py:624-641)."""
    return torch.zeros_like(windows[-1:])


def regroup_latent_windows(windows: torch.Tensor, vae_scale: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows per video frame -> windows per latent frame (MultiTalk: multitalk_model.py:653-667).

    windows: (P, F, W, layers, dim) with F = 1 + vae_scale * n. Returns latent frame 0's full window
    (P, 1, W, ...) and, for each later group of `vae_scale` frames, the first frame's positions
    0..W//2, the centres of the middle frames and the last frame's positions W//2..W-1:
    (P, n, W + vae_scale - 1, ...), i.e. the contiguous frames 4j-1 .. 4j+6 for W = 5.
    """
    mid = windows.shape[2] // 2
    first = windows[:, :1]
    groups = windows[:, 1:].unflatten(1, (-1, vae_scale))  # (P, n, 4, W, layers, dim)
    later = torch.cat(
        [groups[:, :, 0, : mid + 1], groups[:, :, 1:-1, mid], groups[:, :, -1, mid:]],
        dim=2,
    )
    return first, later
