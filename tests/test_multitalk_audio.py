"""Audio path: loudness, wav2vec2 features at 25 fps, per-frame windows and latent regrouping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.multitalk.audio import (
    feature_frames,
    frame_windows,
    normalize_loudness,
    null_windows,
    pad_tracks,
    person_windows,
    reflect_pad,
    regroup_latent_windows,
)
from tests.conftest_multitalk import noise, tone

pytestmark = pytest.mark.one_torch_thread  # tiny tensors: one thread is faster


def test_loudness_reaches_minus_23_lufs_and_leaves_silence_alone():
    import pyloudnorm

    out = normalize_loudness(tone(3.0, amp=0.5))
    assert abs(pyloudnorm.Meter(16_000).integrated_loudness(out.astype(np.float64)) + 23.0) < 0.1
    silence = np.zeros(32_000, dtype=np.float32)
    assert np.array_equal(normalize_loudness(silence), silence)


def test_pad_tracks_pads_to_longest_and_to_num_frames():
    a, b = np.ones(1000, np.float32), np.ones(3000, np.float32)
    assert [len(t) for t in pad_tracks([a, b], 1)] == [3000, 3000]
    assert [len(t) for t in pad_tracks([a, b], 9)] == [9 * 640, 9 * 640]


def test_features_shape_is_25_fps(tiny_parts):
    audio = noise(1.3)
    feats = tiny_parts.wav2vec.encode(audio)
    assert feature_frames(len(audio)) == int(len(audio) / 16_000 * 25) == 32
    assert feats.shape == (32, 2, 16) and feats.dtype == torch.float32


def test_features_equal_stock_hidden_states_when_no_resampling(tiny_parts):
    """With T_a = the CNN's natural length the interpolation is the identity."""
    audio = noise(0.8, seed=3)
    model = tiny_parts.wav2vec.model
    values = torch.from_numpy(audio)[None]
    with torch.no_grad():
        natural = model.feature_extractor(values).shape[-1]
        stock = model(values, output_hidden_states=True).hidden_states[1:]
    ours = tiny_parts.wav2vec.encode(audio, num_feature_frames=natural)
    torch.testing.assert_close(ours, torch.stack(stock, dim=2)[0], rtol=1e-5, atol=1e-5)


def _index_features(length: int) -> torch.Tensor:
    """feat[t] = t, shape (T, 1, 1)."""
    return torch.arange(length, dtype=torch.float32).view(length, 1, 1)


def test_frame_windows_are_clamped_offsets_minus_2_to_plus_2():
    win = frame_windows(_index_features(10), start=0, frames=10)[..., 0, 0]
    expected = np.clip(np.arange(10)[:, None] + np.arange(-2, 3)[None], 0, 9)
    assert np.array_equal(win.numpy(), expected)


def test_latent_regrouping_takes_frames_4j_minus_1_to_4j_plus_6():
    frames = 81
    windows = person_windows([_index_features(200)], start=0, frames=frames)  # (1, 81, 5, 1, 1)
    first, later = regroup_latent_windows(windows)
    assert first.shape == (1, 1, 5, 1, 1) and later.shape == (1, 20, 8, 1, 1)
    assert first[0, 0, :, 0, 0].tolist() == [0, 0, 0, 1, 2]
    for j in range(20):
        # chunk-local group j holds video frames 4j+1 .. 4j+4 (1-based groups: 4j-1 .. 4j+6 for j>=1)
        expected = [min(max(f, 0), 199) for f in range(4 * j - 1, 4 * j + 7)]
        assert later[0, j, :, 0, 0].tolist() == expected


def test_reflect_pad_appends_reversed_tail():
    feats = _index_features(10)
    padded = reflect_pad(feats, end=12)  # end - T + 3 = 5 frames, reversed
    assert padded[:, 0, 0].tolist() == list(range(10)) + [9, 8, 7, 6, 5]
    assert reflect_pad(feats, end=5) is feats


def test_null_audio_is_one_zero_person():
    windows = torch.randn(2, 9, 5, 2, 16)
    null = null_windows(windows)
    assert null.shape == (1, 9, 5, 2, 16) and not null.any()


def test_audio_tokens_shape_and_person_order(tiny_parts):
    dit = tiny_parts.transformer
    windows = torch.randn(2, 9, 5, 2, 16)
    with torch.no_grad():
        both = dit.encode_audio_tokens(windows)
        first = dit.encode_audio_tokens(windows[:1])
        second = dit.encode_audio_tokens(windows[1:])
    assert both.shape == (3, 8, 32)  # (T_lat, C * P, out_dim) with C = 4
    torch.testing.assert_close(both[:, :4], first)
    torch.testing.assert_close(both[:, 4:], second)


@pytest.mark.parametrize("seconds", [0.05, 0.39])
def test_short_tracks_are_not_normalised(seconds):
    audio = tone(seconds)
    assert np.array_equal(normalize_loudness(audio), audio)
