"""Audio cross-attention, L-RoPE person binding and the reference attention map (ENGINE.md §3.3-3.6).

Shapes: B samples, L = T_lat * S visual tokens, S tokens per latent frame, H heads of D dims,
A = C * P audio tokens per latent frame (C = 32 context tokens per person).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.multitalk.settings import BACKGROUND_POSITION, person_centres, person_ranges

ROPE_THETA = 10000.0


def rope_1d(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair 1-D rotary embedding in fp32 (MultiTalk: wan/utils/multitalk_utils.py:147-191).

    x: (..., N, H, D); positions: (..., N) float, broadcast over heads; fractional positions allowed.
    """
    dim = x.shape[-1]
    theta = ROPE_THETA ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=x.device) / dim)  # (D/2,)
    angles = positions.float()[..., None, None] * theta  # (..., N, 1, D/2)
    cos, sin = angles.cos(), angles.sin()
    pairs = x.float().unflatten(-1, (-1, 2))  # (..., N, H, D/2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
    return rotated.flatten(-2).type_as(x)


def person_token_positions(ref_map: torch.Tensor) -> torch.Tensor:
    """L-RoPE positions of the visual tokens from one sample's map (ENGINE.md §3.4 steps 2-3).

    ref_map: (P + 1, L) rows = persons then background. Returns (L,) float32: the token's person
    range scaled by its normalised map value, or the background position when background wins.
    """
    persons = ref_map.shape[0] - 1
    ref_map = ref_map.float()
    label = ref_map.argmax(dim=0)  # (L,)
    positions = torch.full_like(ref_map[0], BACKGROUND_POSITION)
    for p, (lo, hi) in enumerate(person_ranges(persons)):
        row = ref_map[p]
        scaled = (row - row.min()) / (row.max() - row.min() + 1e-8) * (hi - lo) + lo
        positions = torch.where(label == p, scaled, positions)
    return positions


def audio_token_positions(persons: int, tokens_per_person: int, device: torch.device) -> torch.Tensor:
    """(P * C,) positions: each person's audio tokens sit at the centre of its range (2, 22, ...)."""
    centres = torch.tensor(person_centres(persons), dtype=torch.float32, device=device)
    return centres.repeat_interleave(tokens_per_person)


def reference_attention_map(
    query: torch.Tensor,
    key: torch.Tensor,
    token_masks: torch.Tensor,
    frame_tokens: int,
    chunk: int = 4096,
) -> torch.Tensor:
    """How much each token attends to each person's region of latent frame 0 (ENGINE.md §3.5).

    query, key: (L, H, D) after 3-D RoPE; token_masks: (R, S) 0/1 rows (persons, background).
    map[r, i] = mean_h sum_{j<S} softmax_j(q_i k_j / sqrt D) * mask_r[j] / sum_j mask_r[j].
    Queries are processed in chunks, so memory is chunk * H * S, never L * H * S. Returns (R, L) fp32.
    """
    keys = key[:frame_tokens].transpose(0, 1)  # (H, S, D)
    weights = token_masks.float() / token_masks.float().sum(dim=1, keepdim=True)  # (R, S)
    scale = query.shape[-1] ** -0.5
    rows = []
    for start in range(0, query.shape[0], chunk):
        q = query[start : start + chunk].transpose(0, 1)  # (H, n, D)
        probs = torch.softmax((q @ keys.transpose(1, 2)).float() * scale, dim=-1)  # (H, n, S)
        rows.append((probs @ weights.T.to(probs.device)).mean(dim=0).T)  # (R, n)
    return torch.cat(rows, dim=1)


class AudioCrossAttention(nn.Module):
    """Per-latent-frame attention from visual tokens to that frame's audio tokens.

    Module names match `multitalk.safetensors` (`q_linear`, `kv_linear`, `proj`); qk_norm is off.
    """

    def __init__(self, dim: int, audio_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(audio_dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def _project(
        self,
        x: torch.Tensor,
        audio_tokens: torch.Tensor,
        latent_frames: int,
        query_positions: torch.Tensor | None,
        persons: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B*T_lat, S, H, D), k and v (B*T_lat, A, H, D); L-RoPE applied when positions are given."""
        batch, tokens, _ = x.shape
        frame_tokens = tokens // latent_frames
        q = self.q_linear(x).view(batch * latent_frames, frame_tokens, self.num_heads, self.head_dim)
        kv = self.kv_linear(audio_tokens)  # (B, T_lat, A, 2 * dim): rows [:dim] are K, [dim:] are V
        k, v = kv.view(batch * latent_frames, kv.shape[2], 2, self.num_heads, self.head_dim).unbind(2)
        if query_positions is not None:
            q = rope_1d(q, query_positions.reshape(batch * latent_frames, frame_tokens))
            key_pos = audio_token_positions(persons, k.shape[1] // persons, k.device)
            k = rope_1d(k, key_pos.expand(k.shape[0], -1))
        return q, k, v

    def forward(
        self,
        x: torch.Tensor,
        audio_tokens: torch.Tensor,
        latent_frames: int,
        query_positions: torch.Tensor | None = None,
        persons: int = 1,
    ) -> torch.Tensor:
        """x: (B, L, dim); audio_tokens: (B, T_lat, A, audio_dim); query_positions: (B, L) or None.

        With `query_positions` (P >= 2) q and the audio keys are rotated by the 1-D RoPE (L-RoPE);
        values are not rotated. Latent frame k sees only frame k's audio tokens. Returns (B, L, dim).
        """
        q, k, v = self._project(x, audio_tokens, latent_frames, query_positions, persons)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(x.shape))

    def attention_weights(
        self,
        x: torch.Tensor,
        audio_tokens: torch.Tensor,
        latent_frames: int,
        query_positions: torch.Tensor | None = None,
        persons: int = 1,
    ) -> torch.Tensor:
        """The softmax weights `forward` uses, (B, T_lat, H, S, A): for inspection and routing tests."""
        q, k, _ = self._project(x, audio_tokens, latent_frames, query_positions, persons)
        scores = torch.einsum("bnhd,bahd->bhna", q.float(), k.float()) * self.head_dim**-0.5
        return scores.softmax(dim=-1).unflatten(0, (x.shape[0], latent_frames))
