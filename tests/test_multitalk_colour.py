"""Lab colour transfer (ENGINE.md §5.5): formula values, statistics matched, strength 0 = identity."""

from __future__ import annotations

import pytest
import torch

from engine.multitalk.colour import lab_stats, lab_to_rgb, match_colours, rgb_to_lab


@pytest.mark.parametrize(
    ("rgb", "lab"),
    [
        ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),
        ((1.0, 0.0, 0.0), (53.24, 80.09, 67.20)),
        ((0.0, 0.0, 1.0), (32.30, 79.19, -107.86)),
    ],
)
def test_lab_of_reference_colours(rgb, lab):
    got = rgb_to_lab(torch.tensor(rgb, dtype=torch.float64))
    torch.testing.assert_close(got, torch.tensor(lab, dtype=torch.float64), atol=0.02, rtol=0)


def test_lab_round_trip():
    x = torch.rand(3, 2, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(lab_to_rgb(rgb_to_lab(x)), x)


def _video(seed: int, frames: int = 4, scale: float = 0.4, offset: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(3, frames, 16, 16, generator=g) * scale + offset).clamp(-1, 1)


def test_each_frame_matches_the_anchor_statistics():
    video = _video(0, scale=0.6, offset=-0.5)  # darker and flatter than the anchor
    anchor = lab_stats(_video(1, 1, scale=0.8, offset=-0.3)[:, 0])
    out = match_colours(video, anchor, 1.0)
    for t in range(video.shape[1]):
        torch.testing.assert_close(lab_stats(out[:, t]), anchor, atol=1e-3, rtol=0)
        assert not torch.allclose(lab_stats(video[:, t]), anchor, atol=1.0)  # it did move


def test_strength_zero_is_identity_and_half_blends():
    video, anchor = _video(0), lab_stats(_video(1, 1)[:, 0])
    assert match_colours(video, anchor, 0.0) is video
    full = match_colours(video, anchor, 1.0)
    torch.testing.assert_close(match_colours(video, anchor, 0.5), (video + full) / 2, atol=1e-5, rtol=0)


def test_flat_channel_takes_the_anchor_mean():
    flat = torch.zeros(3, 1, 8, 8)  # grey: every Lab channel has std 0
    anchor = lab_stats(_video(1, 1)[:, 0])
    out = match_colours(flat, anchor, 1.0)
    torch.testing.assert_close(lab_stats(out[:, 0])[0], anchor[0], atol=1e-3, rtol=0)
