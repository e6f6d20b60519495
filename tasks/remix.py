"""remix: dialogue + music-and-effects bed -> the full mix at the manifest's loudness target.

Loudness is normalised to the integrated target (EBU R128 / BS.1770), then a look-ahead
true-peak limiter keeps the 4x-oversampled peak at or under the ceiling; the two steps
are repeated until both hold (speech rarely needs more than a dB of limiting).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from prefect import task
from scipy.ndimage import minimum_filter1d, uniform_filter1d
from scipy.signal import resample_poly

from engine.media import read_audio, write_wav
from tasks.qc import OVERSAMPLE, integrated_loudness, true_peak_dbtp
from tasks.speakers import MIX_RATE, Timeline, fit_length, load_track
from tasks.workspace import Blob, Workspace, stage_cache

LOOKAHEAD_S = 0.005
MAX_ROUNDS = 6
LOUDNESS_TOLERANCE = 0.1  # LU
LIMIT_MARGIN_DB = 0.3  # the limiter aims under the ceiling: its gain curve is smoothed


@dataclass(frozen=True)
class MixTarget:
    loudness_lufs: float
    true_peak_dbtp: float
    bed_gain_db: float


@dataclass(frozen=True)
class Mix:
    mix: Blob
    dialogue: Blob
    bed: Blob | None
    loudness_lufs: float
    true_peak_dbtp: float
    gain_db: float


def remix(
    ws: Workspace, dialogue: list[Blob], bed: Blob | None, timeline: Timeline, target: MixTarget
) -> Mix:
    stem = np.sum([load_track(ws, b) for b in dialogue], axis=0).astype(np.float32)
    bed_audio = None
    if bed is not None:
        bed_audio = fit_length(read_audio(ws.path(bed), MIX_RATE), timeline.total_samples)
        bed_audio *= np.float32(10 ** (target.bed_gain_db / 20))
    mix = stem + bed_audio if bed_audio is not None else stem.copy()
    mixed, gain_db = normalise(mix, MIX_RATE, target.loudness_lufs, target.true_peak_dbtp)
    scale = np.float32(10 ** (gain_db / 20))  # stems get the mix's make-up gain, so stems sum to the mix
    with ws.scratch() as tmp:
        mix_blob = ws.put_file(write_wav(tmp / "mix.wav", mixed, MIX_RATE))
        stem_blob = ws.put_file(write_wav(tmp / "dialogue.wav", stem * scale, MIX_RATE))
        bed_blob = (
            ws.put_file(write_wav(tmp / "me.wav", bed_audio * scale, MIX_RATE))
            if bed_audio is not None
            else None
        )
    return Mix(
        mix_blob, stem_blob, bed_blob, integrated_loudness(mixed, MIX_RATE), true_peak_dbtp(mixed), gain_db
    )


def normalise(
    audio: np.ndarray, rate: int, target_lufs: float, ceiling_dbtp: float
) -> tuple[np.ndarray, float]:
    """Gain to the loudness target and true-peak limiting, alternated until both hold.

    Returns (audio, total make-up gain in dB). Limiting lowers loudness, so gain is re-applied
    and the limiter run again; the limiter always acts last, so the ceiling is never exceeded.
    """
    out, gain_db = audio.astype(np.float32), 0.0
    for _ in range(MAX_ROUNDS):
        loudness = integrated_loudness(out, rate)
        if not np.isfinite(loudness):
            return out, 0.0  # silence stays silence
        step = target_lufs - loudness
        peak_ok = true_peak_dbtp(out) <= ceiling_dbtp
        if abs(step) <= LOUDNESS_TOLERANCE and peak_ok:
            break
        out, gain_db = out * np.float32(10 ** (step / 20)), gain_db + step
        if true_peak_dbtp(out) > ceiling_dbtp:
            out = limit_true_peak(out, ceiling_dbtp - LIMIT_MARGIN_DB, rate)
    if true_peak_dbtp(out) > ceiling_dbtp:
        out = limit_true_peak(out, ceiling_dbtp - 2 * LIMIT_MARGIN_DB, rate)
    return out.astype(np.float32), gain_db


def limit_true_peak(audio: np.ndarray, ceiling_dbtp: float, rate: int) -> np.ndarray:
    """Look-ahead peak limiter on the 4x-oversampled envelope (gain never exceeds what any nearby peak allows)."""
    ceiling = 10 ** (ceiling_dbtp / 20)
    envelope = np.abs(resample_poly(audio.astype(np.float64), OVERSAMPLE, 1))[: len(audio) * OVERSAMPLE]
    envelope = envelope.reshape(-1, OVERSAMPLE).max(axis=1)
    needed = np.minimum(1.0, ceiling / np.maximum(envelope, 1e-12))
    window = max(1, int(LOOKAHEAD_S * rate))
    gain = uniform_filter1d(minimum_filter1d(needed, size=2 * window + 1), size=window)
    return (audio * gain).astype(np.float32)


remix_task = task(
    remix,
    name="remix",
    cache_policy=stage_cache("tasks.remix"),
    persist_result=True,
)
