"""Person routing: 1-D RoPE, L-RoPE positions, the reference map, box masks, and audio attention routing."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from engine.base import Box, JobError
from engine.multitalk import attention as attn_mod
from engine.multitalk.attention import (
    AudioCrossAttention,
    person_token_positions,
    reference_attention_map,
    rope_1d,
)
from engine.multitalk.conditioning import plan_framing, token_masks
from engine.multitalk.tiny import TINY_BUCKETS
from engine.multitalk.transformer import AudioContext
from tests.conftest_multitalk import LEFT, RIGHT

pytestmark = pytest.mark.one_torch_thread  # tiny tensors: one thread is faster


def test_rope_1d_matches_the_formula():
    x = torch.randn(3, 2, 8)  # (N, H, D)
    pos = torch.tensor([0.0, 1.5, 22.0])
    out = rope_1d(x, pos)
    for n in range(3):
        for i in range(4):
            a = pos[n].item() * 10000 ** (-2 * i / 8)
            x0, x1 = x[n, :, 2 * i], x[n, :, 2 * i + 1]
            torch.testing.assert_close(out[n, :, 2 * i], x0 * math.cos(a) - x1 * math.sin(a))
            torch.testing.assert_close(out[n, :, 2 * i + 1], x1 * math.cos(a) + x0 * math.sin(a))


def test_rope_scores_depend_only_on_relative_position():
    x, y = torch.randn(1, 1, 16), torch.randn(1, 1, 16)

    def score(p, q):
        return (rope_1d(x, torch.tensor([p])) * rope_1d(y, torch.tensor([q]))).sum()

    torch.testing.assert_close(score(3.0, 1.0), score(22.0, 20.0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(score(0.5, 12.0), score(10.5, 22.0), rtol=1e-4, atol=1e-4)


def test_lrope_positions_from_a_synthetic_map():
    ref = torch.tensor(
        [
            [0.9, 0.5, 0.7, 0.1, 0.1, 0.2],  # person 1 wins tokens 0-2
            [0.0, 0.1, 0.2, 0.8, 0.6, 0.1],  # person 2 wins tokens 3-4
            [0.1, 0.4, 0.1, 0.1, 0.3, 0.7],  # background wins token 5
        ]
    )
    pos = person_token_positions(ref)
    row1, row2 = ref[0], ref[1]
    expected1 = (row1[:3] - row1.min()) / (row1.max() - row1.min()) * 4
    expected2 = (row2[3:5] - row2.min()) / (row2.max() - row2.min()) * 4 + 20
    torch.testing.assert_close(pos[:3], expected1, atol=1e-5, rtol=0)
    torch.testing.assert_close(pos[3:5], expected2, atol=1e-5, rtol=0)
    assert pos[5] == 12.0
    assert pos[0] == pytest.approx(4.0, abs=1e-5) and pos[3] == pytest.approx(24.0, abs=1e-5)
    assert pos[:3].min() >= 0 and pos[:3].max() <= 4 and pos[3:5].min() >= 20 and pos[3:5].max() <= 24


def test_reference_map_equals_naive_computation_for_any_chunk():
    L, S, H, D = 24, 8, 2, 4
    q, k = torch.randn(L, H, D), torch.randn(L, H, D)
    masks = torch.zeros(3, S)
    masks[0, :3], masks[1, 3:6], masks[2, 6:] = 1, 1, 1
    probs = torch.softmax(torch.einsum("lhd,shd->hls", q, k[:S]) / math.sqrt(D), dim=-1)  # (H, L, S)
    naive = torch.stack([(probs * m).sum(-1) / m.sum() for m in masks]).mean(dim=1)  # (3, L)
    for chunk in (5, 24, 100):
        torch.testing.assert_close(reference_attention_map(q, k, masks, S, chunk), naive)


def test_token_masks_follow_boxes():
    framing = plan_framing(64, 128, TINY_BUCKETS[480])  # no scaling: 4 x 8 tokens of 16 px
    masks = token_masks([Box(0, 0, 40, 64), Box(80, 0, 128, 64)], (64, 128), framing).view(3, 4, 8)
    assert masks[0, :, :3].all() and not masks[0, :, 3:].any()  # box x < 40 covers token columns 0-2
    assert masks[1, :, 5:].all() and not masks[1, :, :5].any()
    assert (masks[0] * masks[1]).sum() == 0
    assert torch.equal(masks[2], 1 - ((masks[0] + masks[1]) > 0).float())


@pytest.mark.parametrize(
    "box",
    [Box(10, 10, 10, 20), Box(20, 10, 10, 20), Box(-5, 0, 20, 20), Box(0, 0, 200, 64), Box(70, 70, 80, 90)],
)
def test_bad_boxes_raise_job_error(box):
    framing = plan_framing(64, 128, TINY_BUCKETS[480])
    with pytest.raises(JobError, match=r"persons\[0\]\.box"):
        token_masks([box, RIGHT], (64, 128), framing)


def test_box_covering_no_token_raises():
    framing = plan_framing(64, 128, TINY_BUCKETS[480])  # token centres at 8 + 16k
    with pytest.raises(JobError, match="at least one token"):
        token_masks([Box(1, 1, 3, 3), RIGHT], (64, 128), framing)


def _routing_attention(dim=256, heads=2, audio_dim=32, scale=3.0) -> AudioCrossAttention:
    """q/k depend only on the L-RoPE positions: weights 0, biases one constant vector; V stays random."""
    torch.manual_seed(0)
    layer = AudioCrossAttention(dim, audio_dim, heads)
    const = torch.full((dim,), scale)
    with torch.no_grad():
        layer.q_linear.weight.zero_()
        layer.q_linear.bias.copy_(const)
        layer.kv_linear.weight[:dim].zero_()
        layer.kv_linear.bias[:dim].copy_(const)
    return layer


@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_score_ordering_near_beats_far(head_dim):
    """The premise of L-RoPE routing with position-only q/k. It holds for the real head_dim (128) and 64,
    not for 16 (the tiny model's heads): scores at distance 18-19 exceed distance 2 there."""
    v = torch.full((1, 1, head_dim), 1.0)
    s = [(rope_1d(v, torch.tensor([float(p)])) * v).sum().item() for p in range(25)]
    assert min(s[0:3]) > max(s[18:23])


def test_box_tokens_attend_to_their_own_person(monkeypatch):
    """Two persons, boxes left/right: the injected map makes box-1 tokens argmax person 1."""
    latent_frames, grid_h, grid_w, C = 2, 4, 8, 4
    S = grid_h * grid_w
    masks = token_masks([LEFT, RIGHT], (64, 128), plan_framing(64, 128, TINY_BUCKETS[480]))  # (3, S)
    ref_map = masks.repeat(1, latent_frames) + 0.1 * torch.rand(3, latent_frames * S)
    positions = person_token_positions(ref_map)[None]  # (1, L)
    layer = _routing_attention()  # head_dim 128, as in the real model
    x = torch.randn(1, latent_frames * S, 256)
    audio = torch.randn(1, latent_frames, 2 * C, 32)
    weights = layer.attention_weights(x, audio, latent_frames, positions, persons=2)  # (1, T, H, S, 2C)
    on_p1 = weights[..., :C].sum(-1).mean(dim=(0, 1, 2))  # (S,)
    box1, box2 = masks[0].bool(), masks[1].bool()
    assert (on_p1[box1] > 0.5).all() and (on_p1[box2] < 0.5).all()
    assert on_p1[box1].mean() > 0.9 and on_p1[box2].mean() < 0.1


def test_perturbing_person_1_audio_moves_box_1_tokens_more(tiny_parts, monkeypatch):
    """End to end through the model's audio step: token masks -> map -> positions -> attention."""
    model = tiny_parts.transformer
    block = copy.deepcopy(model.blocks[0])  # the shared model stays untouched
    block.audio_cross_attn = _routing_attention(64, 1, 32)  # one 64-dim head: 16-dim heads do not separate
    masks = token_masks([LEFT, RIGHT], (64, 128), plan_framing(64, 128, TINY_BUCKETS[480]))
    frames, S = 3, 32

    def fake_map(q, k, token_masks, frame_tokens, chunk):
        return token_masks.repeat(1, q.shape[0] // frame_tokens)

    monkeypatch.setattr("engine.multitalk.transformer.reference_attention_map", fake_map)
    x = torch.randn(1, frames * S, 64)
    q = k = torch.zeros(1, frames * S, 4, 16)
    tokens = torch.randn(frames, 8, 32)
    moved = tokens.clone()
    moved[:, :4] += torch.randn(frames, 4, 32)
    with torch.no_grad():
        out = model._audio_attention(block, x, AudioContext([tokens], 4, masks), q, k, (frames, 4, 8))
        out2 = model._audio_attention(block, x, AudioContext([moved], 4, masks), q, k, (frames, 4, 8))
    delta = (out2 - out).norm(dim=-1).view(frames, S)
    assert delta[:, masks[0].bool()].mean() > 5 * delta[:, masks[1].bool()].mean()
    assert attn_mod.person_token_positions is person_token_positions  # the real position code ran


def test_person_ranges_stay_clear_of_the_background_position():
    from engine.multitalk.settings import BACKGROUND_POSITION, person_centres, person_ranges

    assert person_ranges(2) == [(0.0, 4.0), (20.0, 24.0)] and person_centres(2) == [2.0, 22.0]
    ranges = person_ranges(4)  # experimental: [40, 44], [60, 64]
    assert all(not lo <= BACKGROUND_POSITION <= hi for lo, hi in ranges)
    assert all(ranges[i][1] < ranges[i + 1][0] for i in range(3))


def test_single_person_audio_attention_matches_a_per_frame_reference():
    """Frame k attends only to frame k's tokens; kv_linear rows [:dim] are K, [dim:] are V; no RoPE."""
    torch.manual_seed(1)
    dim, heads, audio_dim, frames, S, A = 32, 2, 8, 3, 5, 4
    layer = AudioCrossAttention(dim, audio_dim, heads)
    x, audio = torch.randn(1, frames * S, dim), torch.randn(1, frames, A, audio_dim)
    with torch.no_grad():
        out = layer(x, audio, frames)
        rows = []
        for f in range(frames):
            q = layer.q_linear(x[0, f * S : (f + 1) * S]).view(S, heads, -1)
            kv = layer.kv_linear(audio[0, f])
            k, v = kv[:, :dim].view(A, heads, -1), kv[:, dim:].view(A, heads, -1)
            w = torch.softmax(torch.einsum("shd,ahd->hsa", q, k) / math.sqrt(dim // heads), dim=-1)
            rows.append(torch.einsum("hsa,ahd->shd", w, v).reshape(S, dim))
        expected = layer.proj(torch.cat(rows))[None]
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
