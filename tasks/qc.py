"""qc: measurements carried with every episode (EBU R128 loudness, true peak, durations)."""

from __future__ import annotations

import numpy as np

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
    from scipy.signal import resample_poly  # here: validation reads LOUDNESS_SPECS without paying for scipy

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


# Delivery specs: (integrated loudness target, true-peak ceiling). The tolerance is the specs' own (±0.5 LU).
LOUDNESS_SPECS = {
    "ebu-r128": (-23.0, -1.0),  # EBU R 128 (2020), broadcast Europe
    "atsc-a85": (-24.0, -2.0),  # ATSC A/85 (2013), broadcast US
    "streaming-16": (-16.0, -1.0),  # podcasts, Apple Music
    "streaming-14": (-14.0, -1.0),  # Spotify, YouTube
}
LOUDNESS_TOLERANCE_LU = 0.5
BLOCK_S, HOP_S = 0.4, 0.1  # BS.1770 gating blocks: 400 ms, 75 % overlap
ABSOLUTE_GATE, RELATIVE_GATE = -70.0, -10.0


def loudness_range(audio: np.ndarray, sample_rate: int) -> float:
    """EBU Tech 3342 loudness range in LU (NaN for audio too short or too quiet to have one)."""
    import pyloudnorm

    if len(audio) < 3 * sample_rate:
        return float("nan")
    with np.errstate(divide="ignore"):
        return float(pyloudnorm.Meter(sample_rate).loudness_range(audio.astype(np.float64)))


def block_loudness(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Loudness of every 400 ms block (100 ms apart) of the K-weighted signal, in LUFS."""
    import pyloudnorm

    weighted = audio.astype(np.float64)
    for stage in pyloudnorm.Meter(sample_rate)._filters.values():  # the meter's own K-weighting
        weighted = stage.apply_filter(weighted)
    block, hop = int(BLOCK_S * sample_rate), int(HOP_S * sample_rate)
    if len(weighted) < block:
        weighted = np.pad(weighted, (0, block - len(weighted)))
    power = np.concatenate([[0.0], np.cumsum(weighted**2)])
    starts = np.arange(0, len(weighted) - block + 1, hop)
    with np.errstate(divide="ignore"):
        return -0.691 + 10 * np.log10((power[starts + block] - power[starts]) / block)


def gated_loudness(blocks: np.ndarray) -> float:
    """BS.1770 integrated loudness of some blocks: absolute gate at -70 LUFS, relative gate 10 LU down."""
    kept = blocks[blocks > ABSOLUTE_GATE]
    if not len(kept):
        return float("-inf")
    relative = 10 * np.log10(np.mean(10 ** (kept / 10))) + RELATIVE_GATE
    kept = kept[kept > relative]
    return float(10 * np.log10(np.mean(10 ** (kept / 10))))


def dialogue_gated_loudness(mix: np.ndarray, dialogue: np.ndarray, sample_rate: int) -> float:
    """The mix's loudness measured only where the dialogue speaks (the dialogue stem's own blocks above its
    relative gate): what dialogue-gated meters (Dolby Dialogue Intelligence, A/85 anchor) report."""
    speech = block_loudness(dialogue, sample_rate)
    anchor = gated_loudness(speech)
    if not np.isfinite(anchor):
        return float("-inf")
    mix_blocks = block_loudness(mix, sample_rate)
    return gated_loudness(mix_blocks[speech > max(ABSOLUTE_GATE, anchor - 20.0)])


def loudness_report(audio: np.ndarray, sample_rate: int) -> dict:
    """Integrated loudness, true peak and loudness range of one rendering of the mix (WAV or decoded AAC)."""
    return {
        "loudness_lufs": _rounded(integrated_loudness(audio, sample_rate)),
        "true_peak_dbtp": _rounded(true_peak_dbtp(audio)),
        "loudness_range_lu": _rounded(loudness_range(audio, sample_rate)),
    }


def _rounded(value: float) -> float | None:
    """Two decimals; None for -inf / NaN (silence), so qc.json stays strict JSON."""
    return round(float(value), 2) if np.isfinite(value) else None
