"""The MultiTalk DiT: diffusers' Wan 2.1 I2V transformer plus the audio adapter (ENGINE.md §3).

Module names follow diffusers for the base (`blocks.N.attn1.to_q`, ...) and upstream MultiTalk for
the adapter (`audio_proj.*`, `blocks.N.audio_cross_attn.*`, `blocks.N.norm_x.*`), so the diffusers
transformer folder and `multitalk.safetensors` load verbatim and the original Wan layout through
the rename table in `weights.py`.

Shapes: B samples (CFG passes), C_in = 36 input channels, T_lat latent frames, (h, w) token grid,
S = h * w tokens per latent frame, L = T_lat * S, d = heads * head_dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import WanTransformer3DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.normalization import FP32LayerNorm
from torch import nn

from engine.multitalk.attention import AudioCrossAttention, person_token_positions, reference_attention_map
from engine.multitalk.audio import regroup_latent_windows
from engine.multitalk.settings import AdapterConfig, DiTConfig
from engine.multitalk.teacache import CacheCall


class AudioProjModel(nn.Module):
    """wav2vec2 windows -> per-latent-frame audio tokens (MultiTalk: multitalk_model.py:366-428)."""

    def __init__(self, cfg: AdapterConfig):
        super().__init__()
        self.cfg = cfg
        self.proj1 = nn.Linear(cfg.window * cfg.audio_layers * cfg.audio_dim, cfg.intermediate_dim)
        self.proj1_vf = nn.Linear(cfg.later_window * cfg.audio_layers * cfg.audio_dim, cfg.intermediate_dim)
        self.proj2 = nn.Linear(cfg.intermediate_dim, cfg.intermediate_dim)
        self.proj3 = nn.Linear(cfg.intermediate_dim, cfg.context_tokens * cfg.output_dim)
        self.norm = nn.LayerNorm(cfg.output_dim, eps=1e-5)

    def forward(self, first: torch.Tensor, later: torch.Tensor) -> torch.Tensor:
        """first: (P, 1, 5, layers, dim); later: (P, n, 8, layers, dim) -> (P, 1 + n, C, out_dim)."""
        h_first = torch.relu(self.proj1(first.flatten(2)))  # (P, 1, inter): flattened (window, layer, ch)
        h_later = torch.relu(self.proj1_vf(later.flatten(2)))  # (P, n, inter)
        h = torch.relu(self.proj2(torch.cat([h_first, h_later], dim=1)))
        tokens = self.proj3(h).unflatten(-1, (self.cfg.context_tokens, self.cfg.output_dim))
        return self.norm(tokens)


def _apply_rope_3d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """diffusers' interleaved 3-D RoPE; x (B, L, H, D), cos/sin (1, L, 1, D) repeat-interleaved."""
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2).type_as(x)


@dataclass
class AudioContext:
    """Per-forward audio conditioning, one entry per sample of the batch.

    tokens[b]: (T_lat, C * P_b, out_dim) with P_b persons (1 for the null-audio passes);
    token_masks: (P + 1, S) 0/1 box masks on the token grid (persons, then background), used by
    the samples with P_b >= 2.
    """

    tokens: list[torch.Tensor]
    context_tokens: int
    token_masks: torch.Tensor | None = None

    @property
    def persons(self) -> list[int]:
        return [t.shape[1] // self.context_tokens for t in self.tokens]


class MultiTalkTransformer3DModel(WanTransformer3DModel):
    """WanTransformer3DModel + AudioProjModel + per-block audio cross-attention and L-RoPE."""

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 36,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = 1280,
        added_kv_proj_dim: int | None = 5120,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        audio_layers: int = 12,
        audio_dim: int = 768,
        audio_window: int = 5,
        vae_scale: int = 4,
        audio_intermediate_dim: int = 512,
        audio_context_tokens: int = 32,
        audio_output_dim: int = 768,
    ) -> None:
        # keywords, not positions: diffusers' argument order may change between releases
        super().__init__(
            patch_size=patch_size, num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim,
            in_channels=in_channels, out_channels=out_channels, text_dim=text_dim, freq_dim=freq_dim,
            ffn_dim=ffn_dim, num_layers=num_layers, cross_attn_norm=cross_attn_norm, qk_norm=qk_norm, eps=eps,
            image_dim=image_dim, added_kv_proj_dim=added_kv_proj_dim, rope_max_seq_len=rope_max_seq_len,
            pos_embed_seq_len=pos_embed_seq_len,
        )  # fmt: skip
        self.adapter_cfg = AdapterConfig(
            audio_layers, audio_dim, audio_window, vae_scale, audio_intermediate_dim, audio_context_tokens,
            audio_output_dim,
        )  # fmt: skip
        self.audio_proj = AudioProjModel(self.adapter_cfg)
        inner = num_attention_heads * attention_head_dim
        for block in self.blocks:
            block.norm_x = FP32LayerNorm(inner, eps, elementwise_affine=True)
            block.audio_cross_attn = AudioCrossAttention(inner, audio_output_dim, num_attention_heads)
        self.map_chunk = 4096
        # speed switches (engine/multitalk/speed.py sets them): the block function (eager or compiled), the
        # block offloader, the self-attention kernel
        self.block_fn = self._block
        self.offloader: Any = None
        self.attention_fn = F.scaled_dot_product_attention

    @classmethod
    def from_dit_config(cls, cfg: DiTConfig) -> MultiTalkTransformer3DModel:
        a = cfg.adapter
        return cls(
            **cfg.diffusers_kwargs(), audio_layers=a.audio_layers, audio_dim=a.audio_dim, audio_window=a.window,
            vae_scale=a.vae_scale, audio_intermediate_dim=a.intermediate_dim,
            audio_context_tokens=a.context_tokens, audio_output_dim=a.output_dim,
        )  # fmt: skip

    # -- audio ---------------------------------------------------------------------------------
    def encode_audio_tokens(self, windows: torch.Tensor) -> torch.Tensor:
        """windows (P, F, 5, layers, dim) -> (T_lat, C * P, out_dim), person 1's tokens first.

        Independent of the timestep, so the pipeline computes it once per clip, not per step.
        """
        first, later = regroup_latent_windows(windows, self.adapter_cfg.vae_scale)
        param = self.audio_proj.proj1.weight
        tokens = self.audio_proj(first.to(param), later.to(param))  # (P, T_lat, C, out)
        return torch.cat(tokens.unbind(0), dim=1)

    # -- one block -----------------------------------------------------------------------------
    def _self_attention(
        self, block: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns the attention output (B, L, d) and q, k after 3-D RoPE, each (B, L, H, D)."""
        attn = block.attn1
        q = attn.norm_q(attn.to_q(x)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(x)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(x).unflatten(2, (attn.heads, -1))
        q, k = _apply_rope_3d(q, *rope), _apply_rope_3d(k, *rope)
        out = self.attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return attn.to_out[0](out.transpose(1, 2).flatten(2).type_as(x)), q, k

    def _audio_attention(
        self,
        block: nn.Module,
        x: torch.Tensor,
        audio: AudioContext,
        q: torch.Tensor,
        k: torch.Tensor,
        grid: tuple[int, int, int],
    ) -> torch.Tensor:
        """Audio cross-attention per person-count group of samples; L-RoPE for groups with P >= 2."""
        normed = block.norm_x(x.float()).type_as(x)
        out = torch.empty_like(x)
        latent_frames, frame_tokens = grid[0], grid[1] * grid[2]
        persons = audio.persons
        for count in sorted(set(persons)):
            idx = [i for i, p in enumerate(persons) if p == count]
            tokens = torch.stack([audio.tokens[i] for i in idx]).to(x)
            positions = None
            if count >= 2:
                positions = torch.stack(
                    [
                        person_token_positions(
                            reference_attention_map(
                                q[i], k[i], audio.token_masks, frame_tokens, self.map_chunk
                            )
                        )
                        for i in idx
                    ]
                )
            out[idx] = block.audio_cross_attn(normed[idx], tokens, latent_frames, positions, count)
        return out

    def _block(
        self,
        block: nn.Module,
        x: torch.Tensor,
        context: torch.Tensor,
        temb: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        audio: AudioContext,
        grid: tuple[int, int, int],
    ) -> torch.Tensor:
        """MultiTalk block (ENGINE.md §3.2): self-attn, text/image cross-attn, audio cross-attn, FFN."""
        shift, scale, gate, c_shift, c_scale, c_gate = (block.scale_shift_table + temb.float()).chunk(
            6, dim=1
        )
        # 1. self-attention, which also yields q/k for the reference map
        h = (block.norm1(x.float()) * (1 + scale) + shift).type_as(x)
        y, q, k = self._self_attention(block, h, rope)
        x = (x.float() + y * gate).type_as(x)
        # 2. text + image cross-attention (first context rows are image tokens)
        x = x + block.attn2(block.norm2(x.float()).type_as(x), context, None, None)
        # 3. audio cross-attention: no modulation, no gate
        x = x + self._audio_attention(block, x, audio, q, k, grid)
        # 4. feed-forward
        h = (block.norm3(x.float()) * (1 + c_scale) + c_shift).type_as(x)
        return (x.float() + block.ffn(h).float() * c_gate).type_as(x)

    def _blocks(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        temb: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        audio: AudioContext,
        grid: tuple[int, int, int],
    ) -> torch.Tensor:
        """The 40 blocks; with an offloader, each block's weights arrive just before it runs."""
        for i, block in enumerate(self.blocks):
            if self.offloader is not None:
                self.offloader.before(i)
            x = self.block_fn(block, x, context, temb, rope, audio, grid)
            if self.offloader is not None:
                self.offloader.after(i)
        return x

    # -- model ---------------------------------------------------------------------------------
    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor,
        audio: AudioContext,
        cache: CacheCall | None = None,
    ) -> torch.Tensor:
        """hidden_states (B, 36, T_lat, H_lat, W_lat); timestep (B,) in [0, 1000];
        encoder_hidden_states (B, 512, text_dim); encoder_hidden_states_image (B, n_img, image_dim);
        cache: TeaCache consulted on the timestep projection (the blocks' modulated input) before the blocks.
        Returns the velocity (B, 16, T_lat, H_lat, W_lat)."""
        batch, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        grid = (frames // p_t, height // p_h, width // p_w)
        # diffusers keeps the RoPE tables in float64; fp32 avoids float64 (B, L, H, D) temporaries
        rope = tuple(table.float() for table in self.rope(hidden_states))  # 2 x (1, L, 1, D)
        x = self.patch_embedding(hidden_states.to(self.patch_embedding.weight)).flatten(2).transpose(1, 2)
        x = x.contiguous()  # (B, L, d)
        temb, timestep_proj, text, image = self.condition_embedder(
            timestep, encoder_hidden_states, encoder_hidden_states_image
        )
        timestep_proj = timestep_proj.unflatten(1, (6, -1))  # (B, 6, d)
        context = torch.cat([image, text], dim=1)  # (B, n_img + 512, d)
        if cache is None or cache.cache.should_compute(cache.step, cache.passes, timestep_proj):
            start = x
            x = self._blocks(x, context, timestep_proj, rope, audio, grid)
            if cache is not None:
                cache.cache.store(cache.passes, x - start)
        else:
            x = x + cache.cache.residual(cache.passes).to(x)
        shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (self.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = self.proj_out(x)  # (B, L, 16 * p_t * p_h * p_w)
        x = x.reshape(batch, *grid, p_t, p_h, p_w, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.flatten(6, 7).flatten(4, 5).flatten(2, 3)
