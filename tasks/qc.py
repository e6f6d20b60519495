"""qc: measurements carried with every episode (EBU R128 loudness, true peak, durations)."""

from __future__ import annotations

import numpy as np
from scipy.signal import resample_poly

OVERSAMPLE = 4  # BS.1770-4 true peak: 4x oversampling at 48 kHz


def integrated_loudness(audio: np.ndarray, sample_rate: int) -> float:
    """ITU-R BS.1770 integrated loudness in LUFS (-inf for silence)."""
    import pyloudnorm

    meter = pyloudnorm.Meter(sample_rate)
    if len(audio) < int(0.4 * sample_rate):  # shorter than one gating block
        audio = np.pad(audio, (0, int(0.4 * sample_rate) - len(audio)))
    with np.errstate(divide="ignore"):
        return float(meter.integrated_loudness(audio.astype(np.float64)))


def true_peak_dbtp(audio: np.ndarray) -> float:
    peak = (
        float(np.max(np.abs(resample_poly(audio.astype(np.float64), OVERSAMPLE, 1)))) if len(audio) else 0.0
    )
    return 20 * np.log10(max(peak, 1e-12))


def speech_overlap_share(tracks: list[np.ndarray], sample_rate: int, threshold_db: float = -45.0) -> float:
    """Share of speaking time where two or more tracks speak at once (20 ms windows)."""
    hop = sample_rate // 50
    active = []
    for t in tracks:
        n = len(t) // hop
        rms = np.sqrt(np.mean(t[: n * hop].reshape(n, hop) ** 2, axis=1)) if n else np.zeros(0)
        active.append(20 * np.log10(np.maximum(rms, 1e-9)) > threshold_db)
    if not active or not len(active[0]):
        return 0.0
    count = np.sum(active, axis=0)
    speaking = np.count_nonzero(count >= 1)
    return float(np.count_nonzero(count >= 2) / speaking) if speaking else 0.0
