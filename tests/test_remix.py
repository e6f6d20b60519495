"""Remix: loudness target and true-peak ceiling, measured independently of the code under test."""

from __future__ import annotations

import numpy as np
import pyloudnorm
from scipy.signal import resample_poly

from tasks.remix import limit_true_peak, normalise

RATE = 48_000


def _speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    syllables = (np.sin(2 * np.pi * 4 * t) > 0.2).astype(float)
    voice = (
        np.sin(2 * np.pi * 150 * t) + 0.5 * np.sin(2 * np.pi * 300 * t) + 0.2 * rng.standard_normal(len(t))
    )
    return (0.05 * voice * syllables).astype(np.float32)


def _true_peak(x: np.ndarray) -> float:
    return 20 * np.log10(np.max(np.abs(resample_poly(x.astype(np.float64), 4, 1))))


def test_normalise_reaches_the_loudness_target():
    out, gain = normalise(_speechlike(6.0), RATE, -23.0, -1.0)
    assert abs(pyloudnorm.Meter(RATE).integrated_loudness(out.astype(np.float64)) + 23.0) < 0.5
    assert gain != 0


def test_peaky_material_is_limited_under_the_true_peak_ceiling():
    audio = _speechlike(6.0)
    audio[RATE : RATE + 50] = 0.9  # clicks far above the speech
    audio[3 * RATE : 3 * RATE + 20] = -0.95
    out, _ = normalise(audio, RATE, -14.0, -1.0)
    assert _true_peak(out) <= -1.0
    assert abs(pyloudnorm.Meter(RATE).integrated_loudness(out.astype(np.float64)) + 14.0) < 1.0


def test_limiter_leaves_quiet_audio_untouched():
    audio = _speechlike(2.0) * 0.1
    assert np.array_equal(limit_true_peak(audio, -1.0, RATE), audio)


def test_silence_stays_silence():
    out, gain = normalise(np.zeros(RATE, dtype=np.float32), RATE, -23.0, -1.0)
    assert gain == 0.0 and not out.any()
