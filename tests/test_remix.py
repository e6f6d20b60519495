"""Remix: loudness target and true-peak ceiling, measured independently of the code under test."""

from __future__ import annotations

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf
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


# ------------------------------------------------------------------------ the remix stage: specs, AAC, ducking

SPECS = {"ebu-r128": (-23.0, -1.0), "atsc-a85": (-24.0, -2.0), "streaming-14": (-14.0, -1.0)}


def _decoded(path) -> np.ndarray:
    from engine.media import read_audio

    return read_audio(path, RATE).astype(np.float64)


def _stage_inputs(tmp_path, seconds: float = 8.0, bed_level: float = 0.05):
    """A speech-like dialogue track in bursts (2 s on, 2 s off) over a steady noise bed, as conformed blobs."""
    from engine.media import write_wav
    from tasks.speakers import SAMPLES_PER_FRAME, Timeline
    from tasks.workspace import Workspace

    timeline = Timeline(int(seconds * 25))
    n = timeline.total_samples
    speech = _speechlike(seconds, seed=1)[:n]
    speech[(np.arange(n) // (2 * RATE)) % 2 == 1] = 0.0  # pauses between lines
    speech[: 2 * SAMPLES_PER_FRAME] += 0.6  # a click: the limiter has work at every spec
    bed = (bed_level * np.random.default_rng(3).standard_normal(n)).astype(np.float32)
    ws = Workspace(tmp_path / "ws")
    blobs = [ws.put_file(write_wav(tmp_path / f"{k}.wav", a, RATE)) for k, a in (("d", speech), ("b", bed))]
    return ws, timeline, speech, blobs


@pytest.mark.parametrize("spec", sorted(SPECS))
def test_each_loudness_spec_is_met_on_the_wav_and_on_the_encoded_aac(tmp_path, spec):
    from tasks.remix import MixTarget, remix

    ws, timeline, _, (dialogue, bed) = _stage_inputs(tmp_path)
    lufs, ceiling = SPECS[spec]
    mix = remix(ws, [dialogue], bed, timeline, MixTarget(lufs, ceiling, -6.0, spec))
    meter = pyloudnorm.Meter(RATE)
    for samples in (sf.read(ws.path(mix.mix), dtype="float64")[0], _decoded(ws.path(mix.aac))):
        assert abs(meter.integrated_loudness(samples) - lufs) <= 0.5
        assert _true_peak(samples) <= ceiling + 1e-6
    assert mix.report["spec"] == spec and mix.report["aac"]["true_peak_dbtp"] <= ceiling
    assert mix.report["wav"]["loudness_range_lu"] is not None
    assert mix.report["wav"]["dialogue_gated_lufs"] is not None


def test_ducking_lowers_the_bed_under_dialogue_by_the_requested_depth(tmp_path):
    from tasks.remix import Ducking, MixTarget, remix

    ws, timeline, speech, (dialogue, bed) = _stage_inputs(tmp_path, bed_level=0.02)
    target = MixTarget(-23.0, -1.0, 0.0, "ebu-r128", Ducking(12.0, 50.0, 300.0))
    mix = remix(ws, [dialogue], bed, timeline, target)
    me = sf.read(ws.path(mix.bed), dtype="float64")[0]
    # measured here on the M&E stem, away from the ramps: the middle second of each line and of each pause
    lines = [slice(int((t + 0.5) * RATE), int((t + 1.5) * RATE)) for t in (0, 4)]
    pauses = [slice(int((t + 0.5) * RATE), int((t + 1.5) * RATE)) for t in (2, 6)]
    rms = lambda parts: np.sqrt(np.mean(np.concatenate([me[p] for p in parts]) ** 2))  # noqa: E731
    depth = 20 * np.log10(rms(pauses) / rms(lines))
    assert abs(depth - 12.0) < 1.0
    assert abs(mix.report["ducking"]["measured_depth_db"] - 12.0) < 1.5
    # the bed is already down when a line starts (look-ahead), and back up after the release
    onset = slice(4 * RATE, 4 * RATE + RATE // 50)
    assert 20 * np.log10(rms([pauses[0]]) / np.sqrt(np.mean(me[onset] ** 2))) > 9.0


def test_per_speaker_stems_carry_the_mix_gain(tmp_path):
    from tasks.remix import MixTarget, remix

    ws, timeline, speech, (dialogue, bed) = _stage_inputs(tmp_path)
    mix = remix(ws, [dialogue], bed, timeline, MixTarget(-16.0, -1.0, 0.0, "streaming-16"), {"ana": dialogue})
    ana = sf.read(ws.path(mix.speakers["ana"]), dtype="float32")[0]
    stem = sf.read(ws.path(mix.dialogue), dtype="float32")[0]
    np.testing.assert_allclose(ana, stem, atol=1e-6)
    assert abs(20 * np.log10(np.max(np.abs(ana)) / np.max(np.abs(speech))) - mix.gain_db) < 0.01


def test_gated_block_loudness_agrees_with_pyloudnorm_and_dialogue_gating_ignores_the_pauses():
    from tasks.qc import block_loudness, dialogue_gated_loudness, gated_loudness

    speech = _speechlike(8.0, seed=2)
    pauses = (np.arange(len(speech)) // (2 * RATE)) % 2 == 1
    speech[pauses] = 0.0
    music = np.where(pauses, 0.1, 0.003) * np.random.default_rng(4).standard_normal(len(speech))
    mix = (speech + music).astype(np.float32)
    reference = pyloudnorm.Meter(RATE).integrated_loudness(mix.astype(np.float64))
    assert abs(gated_loudness(block_loudness(mix, RATE)) - reference) < 0.1
    # loud music between the lines drives the integrated figure, not the dialogue-gated one
    speech_only = pyloudnorm.Meter(RATE).integrated_loudness(
        (speech + np.where(pauses, 0, music)).astype(np.float64)
    )
    assert reference - dialogue_gated_loudness(mix, speech, RATE) > 5.0
    gated = dialogue_gated_loudness(mix, speech, RATE)
    assert abs(gated - speech_only) < abs(reference - speech_only) / 2  # (blocks across a line's edge count)
