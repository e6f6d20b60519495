"""remix: dialogue + music-and-effects bed -> the full mix, to a delivery loudness spec, as WAV and AAC.

The bed is optionally ducked under the dialogue (depth, attack, release; the gain starts to fall
`attack` before each line so the bed is down when the first word lands). Loudness is normalised to
the spec's integrated target (BS.1770), then a look-ahead true-peak limiter keeps the 4x-oversampled
peak under the ceiling; the two steps alternate until both hold. The mix is then encoded to AAC and
measured again: AAC adds inter-sample overshoot, so where the decoded AAC peaks over the ceiling the
limiter runs again that much lower and the encode is repeated. Both measurements go to qc.json.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from prefect import task
from scipy.ndimage import minimum_filter1d, uniform_filter1d
from scipy.signal import resample_poly

from engine.media import read_audio, read_whole_audio, run_ffmpeg, write_wav
from tasks.qc import (
    OVERSAMPLE,
    dialogue_gated_loudness,
    integrated_loudness,
    loudness_report,
    true_peak_dbtp,
)
from tasks.speakers import MIX_RATE, Timeline, fit_length, load_track
from tasks.workspace import Blob, Workspace, stage_cache

LOOKAHEAD_S = 0.005
MAX_ROUNDS = 6
LOUDNESS_TOLERANCE = 0.1  # LU: the WAV aims well inside the specs' ±0.5 LU, leaving room for the codec
LIMIT_MARGIN_DB = 0.3  # the limiter aims under the ceiling: its gain curve is smoothed
AAC_BITRATE = "256k"
AAC_ROUNDS = 4
DUCK_HOP_S = 0.01  # the ducker's control rate: 10 ms
DUCK_HOLD_S = 0.3  # the bed stays down this long after a word: the gaps between words do not pump it
SPEECH_GATE_LU = 25.0  # dialogue "speaks" where a 10 ms window is within this of its loudest windows


@dataclass(frozen=True)
class Ducking:
    depth_db: float
    attack_ms: float
    release_ms: float


@dataclass(frozen=True)
class MixTarget:
    loudness_lufs: float
    true_peak_dbtp: float
    bed_gain_db: float = 0.0
    spec: str = "custom"
    ducking: Ducking | None = None


@dataclass(frozen=True)
class Mix:
    mix: Blob  # full mix, 32-bit float WAV
    aac: Blob  # the same mix encoded (m4a), as muxed into the mp4
    dialogue: Blob
    bed: Blob | None
    gain_db: float
    report: dict  # qc.json's "loudness" block: spec, WAV and AAC measurements, ducking
    speakers: dict[str, Blob] = field(default_factory=dict)  # per-speaker stems, same gain as the mix


def remix(
    ws: Workspace,
    dialogue: list[Blob],
    bed: Blob | None,
    timeline: Timeline,
    target: MixTarget,
    speakers: dict[str, Blob] | None = None,
) -> Mix:
    stem = np.sum([load_track(ws, b) for b in dialogue], axis=0).astype(np.float32)
    bed_audio, ducking = None, None
    if bed is not None:
        bed_audio = fit_length(read_whole_audio(ws.path(bed), MIX_RATE), timeline.total_samples)
        bed_audio *= np.float32(10 ** (target.bed_gain_db / 20))
        if target.ducking is not None:
            gain = duck_gain(stem, MIX_RATE, target.ducking)
            ducking = {**vars(target.ducking), "measured_depth_db": measured_depth(bed_audio, gain, stem)}
            bed_audio = bed_audio * gain
    mix = stem + bed_audio if bed_audio is not None else stem.copy()
    with ws.scratch() as tmp:
        mixed, gain_db, aac, decoded = _mix_and_encode(mix, target, tmp)
        scale = np.float32(10 ** (gain_db / 20))  # stems get the mix's make-up gain: stems sum to the mix
        mix_blob = ws.put_file(write_wav(tmp / "mix.wav", mixed, MIX_RATE))
        stem_blob = ws.put_file(write_wav(tmp / "dialogue.wav", stem * scale, MIX_RATE))
        bed_blob = (
            None if bed_audio is None else ws.put_file(write_wav(tmp / "me.wav", bed_audio * scale, MIX_RATE))
        )
        per_speaker = {
            sid: ws.put_file(write_wav(tmp / f"{sid}.wav", load_track(ws, blob) * scale, MIX_RATE))
            for sid, blob in (speakers or {}).items()
        }
        aac_blob = ws.put_file(aac)
    report = {
        "spec": target.spec,
        "target_lufs": target.loudness_lufs,
        "ceiling_dbtp": target.true_peak_dbtp,
        "wav": loudness_report(mixed, MIX_RATE) | {"dialogue_gated_lufs": _gated(mixed, stem * scale)},
        "aac": loudness_report(decoded, MIX_RATE) | {"dialogue_gated_lufs": _gated(decoded, stem * scale)},
        "gain_db": round(gain_db, 2),
        "ducking": ducking,
    }
    return Mix(mix_blob, aac_blob, stem_blob, bed_blob, gain_db, report, per_speaker)


def _gated(mix: np.ndarray, dialogue: np.ndarray) -> float | None:
    n = min(len(mix), len(dialogue))
    value = dialogue_gated_loudness(mix[:n], dialogue[:n], MIX_RATE)
    return round(value, 2) if np.isfinite(value) else None


def _mix_and_encode(mix: np.ndarray, target: MixTarget, tmp):
    """Normalise and limit, encode to AAC, decode and measure; lower the limiter by the codec's overshoot
    until the decoded AAC is at or under the ceiling too. Returns (WAV samples, gain, m4a path, decoded)."""
    ceiling = target.true_peak_dbtp
    for _ in range(AAC_ROUNDS):
        mixed, gain_db = normalise(mix, MIX_RATE, target.loudness_lufs, ceiling)
        aac = encode_aac(write_wav(tmp / "mix-encode.wav", mixed, MIX_RATE), tmp / "mix.m4a")
        decoded = fit_length(read_audio(aac, MIX_RATE), len(mixed))
        overshoot = true_peak_dbtp(decoded) - target.true_peak_dbtp
        if overshoot <= 0 or not np.isfinite(integrated_loudness(decoded, MIX_RATE)):
            break
        ceiling -= overshoot + 0.1
    return mixed, gain_db, aac, decoded


def encode_aac(wav, out):
    """The delivery codec: AAC-LC at 48 kHz (the mp4 takes this stream as it is, so what was measured ships)."""
    run_ffmpeg(
        ["-i", str(wav), "-c:a", "aac", "-b:a", AAC_BITRATE, "-ar", str(MIX_RATE), str(out)],
        what="encode AAC",
    )
    return out


def duck_gain(dialogue: np.ndarray, rate: int, ducking: Ducking) -> np.ndarray:
    """Per-sample gain for the bed: 1 where nobody speaks, 10^(-depth/20) under speech, moving at the
    attack / release rates; the fall starts `attack` early (look-ahead), so no word lands on a loud bed,
    and the release waits DUCK_HOLD_S after the last word, so the bed does not pump between words."""
    hop = int(DUCK_HOP_S * rate)
    active = speech_activity(dialogue, hop)
    ahead = max(1, round(ducking.attack_ms / 1000 / DUCK_HOP_S))
    hold = round(DUCK_HOLD_S / DUCK_HOP_S)
    padded = np.pad(active, (hold, ahead))  # window i covers [i - hold, i + ahead]
    active = np.lib.stride_tricks.sliding_window_view(padded, hold + ahead + 1).max(axis=1)
    reduction = np.zeros(len(active))
    attack = 1 - np.exp(-DUCK_HOP_S / max(ducking.attack_ms / 1000 / 3, 1e-4))  # ~95 % in `attack`
    release = 1 - np.exp(-DUCK_HOP_S / max(ducking.release_ms / 1000 / 3, 1e-4))
    level = 0.0
    for i, speaking in enumerate(active):
        want = ducking.depth_db if speaking else 0.0
        level += (want - level) * (attack if want > level else release)
        reduction[i] = level
    centres = (np.arange(len(reduction)) + 0.5) * hop
    per_sample = np.interp(np.arange(len(dialogue)), centres, reduction)
    return (10 ** (-per_sample / 20)).astype(np.float32)


def speech_activity(dialogue: np.ndarray, hop: int) -> np.ndarray:
    """(windows,) bool: windows of `hop` samples where the dialogue speaks (within SPEECH_GATE_LU of its
    loud windows)."""
    level = speech_windows_db(dialogue, hop)
    if not np.any(level > -90):
        return np.zeros(len(level), bool)
    return level > max(-70.0, np.percentile(level[level > -90], 95) - SPEECH_GATE_LU)


def speech_windows_db(audio: np.ndarray, hop: int) -> np.ndarray:
    """RMS level in dBFS of each window of `hop` samples (the last one partial)."""
    n = len(audio) // hop
    windows = audio[: n * hop].reshape(n, hop).astype(np.float64)
    rms = np.sqrt(np.mean(windows**2, axis=1)) if n else np.zeros(0)
    if len(audio) > n * hop:
        rms = np.append(rms, np.sqrt(np.mean(audio[n * hop :].astype(np.float64) ** 2)))
    return 20 * np.log10(np.maximum(rms, 1e-9))


def measured_depth(bed: np.ndarray, gain: np.ndarray, dialogue: np.ndarray) -> float | None:
    """How far the bed actually came down under the dialogue, in dB (energy-weighted over speech)."""
    hop = int(DUCK_HOP_S * MIX_RATE)
    speaking = np.repeat(speech_activity(dialogue, hop), hop)[: len(bed)]
    before = float(np.sum(bed[: len(speaking)][speaking].astype(np.float64) ** 2))
    after = float(np.sum((bed * gain)[: len(speaking)][speaking].astype(np.float64) ** 2))
    if before <= 0 or after <= 0:
        return None
    return round(-10 * np.log10(after / before), 2)


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
