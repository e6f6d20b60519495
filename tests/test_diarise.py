"""diarise: tracks land on the right manifest speaker, deterministically; bad input; scoring; pyannote errors."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import soundfile as sf

from engine.base import EngineSetupError, MissingWeightsError
from tasks.diarise import (
    AudioError,
    SpeakerRef,
    Turn,
    diarisation_error_rate,
    diarise,
    gate,
    read_rttm,
    resolve_diarise_backend,
)
from tests.audio_fixtures import RATE, conversation, enrolment, have_espeak, mix_at, music, write_wav

pytestmark = pytest.mark.skipif(
    not have_espeak(), reason="espeak-ng is not installed (apt-get install espeak-ng)"
)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Two- and three-voice dialogues (ben talks first, manifest lists ana first) and enrolment clips."""
    root = tmp_path_factory.mktemp("diarise media")
    two, two_turns = conversation([("ben", 0), ("ana", 0), ("ben", 1), ("ana", 1)])
    three, three_turns = conversation(
        [("ana", 0), ("ben", 0), ("cal", 1), ("ana", 1), ("ben", 1)], overlap={3: 1.5}
    )
    three = mix_at(three, music(len(three) / RATE, seed=3), -12.0)
    return {
        "two": write_wav(root / "two voices.wav", two),
        "two_turns": two_turns,
        "three": write_wav(root / "three.wav", three),
        "three_turns": three_turns,
        "refs": {s: SpeakerRef(s, write_wav(root / f"{s}.wav", enrolment(s))) for s in ("ana", "ben", "cal")},
        "root": root,
    }


def assigned_share(rttm, turns) -> dict[str, float]:
    """For each true speaker: the share of their talk time the RTTM gives to the same manifest id."""
    hyp = read_rttm(rttm)
    share = {}
    for who in sorted({t.speaker for t in turns}):
        ref = [Turn(t.start, t.end, who) for t in turns if t.speaker == who]
        mine = [t for t in hyp if t.label == who]
        total = sum(t.end - t.start for t in ref)
        hit = sum(max(0.0, min(r.end, h.end) - max(r.start, h.start)) for r in ref for h in mine)
        share[who] = hit / total
    return share


def test_two_voices_named_by_enrolment_not_by_order(media, tmp_path):
    refs = [media["refs"]["ana"], media["refs"]["ben"]]
    result = diarise(media["two"], refs, tmp_path, backend="embedded", num_speakers=2)
    assert result.mapping == {"SPK0": "ben", "SPK1": "ana"} and result.warnings == ()
    assert min(assigned_share(result.rttm, media["two_turns"]).values()) > 0.85
    ben = media["two_turns"][0]
    audio = {s: sf.read(p, dtype="float32")[0] for s, p in result.tracks.items()}
    mid = slice(int((ben.start + 0.5) * RATE), int((ben.end - 0.5) * RATE))
    assert np.abs(audio["ben"][mid]).max() > 0.1 and np.abs(audio["ana"][mid]).max() == 0.0
    assert all(len(a) == sf.info(media["two"]).frames for a in audio.values())
    saved = json.loads((tmp_path / "mapping.json").read_text())
    assert saved["mapping"] == result.mapping and saved["backend"] == "embedded"


def test_same_input_gives_byte_identical_outputs(media, tmp_path):
    refs = [media["refs"]["ana"], media["refs"]["ben"]]
    a = diarise(media["two"], refs, tmp_path / "a", backend="embedded", num_speakers=2)
    b = diarise(media["two"], refs, tmp_path / "b", backend="embedded", num_speakers=2)
    assert a.mapping == b.mapping
    for name in ("diarisation.rttm", "mapping.json", "ana.wav", "ben.wav"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_without_samples_order_rule_applies_with_a_warning_and_pinning_swaps(media, tmp_path):
    plain = [SpeakerRef("ana"), SpeakerRef("ben")]
    result = diarise(media["two"], plain, tmp_path / "a", backend="embedded", num_speakers=2)
    assert result.mapping == {"SPK0": "ana", "SPK1": "ben"}  # ben talks first: wrong, and said so
    assert any("manifest order" in w for w in result.warnings)
    pinned = diarise(
        media["two"], plain, tmp_path / "b", backend="embedded", num_speakers=2, pinned={"SPK0": "ben"}
    )
    assert pinned.mapping == {"SPK0": "ben", "SPK1": "ana"}
    assert min(assigned_share(pinned.rttm, media["two_turns"]).values()) > 0.85


def test_three_voices_with_overlap_music_and_a_short_speaker(media, tmp_path):
    refs = [media["refs"][s] for s in ("cal", "ana", "ben")]
    result = diarise(media["three"], refs, tmp_path, backend="embedded", num_speakers=3)
    assert sorted(result.mapping.values()) == ["ana", "ben", "cal"]
    share = assigned_share(result.rttm, media["three_turns"])
    assert share["cal"] > 0.7 and share["ana"] > 0.7 and share["ben"] > 0.7, share
    assert list(result.tracks) == ["cal", "ana", "ben"]


def test_one_voice_where_the_manifest_says_two_is_named_correctly_and_logged(media, tmp_path):
    solo, _ = conversation([("ana", 0), ("ana", 1), ("ana", 2)])
    src = write_wav(tmp_path / "solo.wav", solo)
    refs = [media["refs"]["ana"], media["refs"]["ben"]]
    result = diarise(src, refs, tmp_path / "out", backend="embedded", num_speakers=2)
    assert set(result.mapping.values()) == {"ana"}
    assert any("ben" in w and "silent" in w for w in result.warnings)
    assert np.abs(sf.read(result.tracks["ben"])[0]).max() == 0.0


@pytest.mark.parametrize(("rate", "channels"), [(8_000, 1), (96_000, 2)])
def test_other_rates_and_channels_keep_the_input_timeline(media, tmp_path, rate, channels):
    from scipy.signal import resample_poly

    mono = sf.read(media["two"], dtype="float32")[0]
    audio = resample_poly(mono, rate // 1000, RATE // 1000).astype(np.float32)
    src = write_wav(tmp_path / "in.wav", np.stack([audio] * channels), rate)
    refs = [media["refs"]["ana"], media["refs"]["ben"]]
    result = diarise(src, refs, tmp_path / "out", backend="embedded", num_speakers=2)
    assert result.mapping == {"SPK0": "ben", "SPK1": "ana"}
    info = sf.info(result.tracks["ana"])
    assert (info.samplerate, info.channels, info.frames) == (rate, 1, len(audio))
    assert (channels > 1) == any("downmixed" in w for w in result.warnings)


def test_bad_input_gives_clear_errors(media, tmp_path):
    refs = [SpeakerRef("ana"), SpeakerRef("ben")]
    with pytest.raises(AudioError, match="silent"):
        diarise(write_wav(tmp_path / "zero.wav", np.zeros(RATE)), refs, tmp_path / "o", backend="embedded")
    noise = (0.001 * np.random.default_rng(0).standard_normal(2 * RATE)).astype(np.float32)
    with pytest.raises(AudioError, match="no speech"):
        diarise(write_wav(tmp_path / "hiss.wav", noise), refs, tmp_path / "o", backend="embedded")
    (tmp_path / "broken.wav").write_bytes(b"RIFF1234WAVEfmt garbage")
    with pytest.raises(AudioError, match="not a readable audio file"):
        diarise(tmp_path / "broken.wav", refs, tmp_path / "o", backend="embedded")
    with pytest.raises(ValueError, match="unknown speakers"):
        diarise(media["two"], refs, tmp_path / "o", backend="embedded", pinned={"SPK0": "zed"})
    with pytest.raises(AudioError, match="voice_sample"):
        diarise(media["two"], [SpeakerRef("ana", tmp_path / "none.wav")], tmp_path / "o", backend="embedded")


def test_der_scoring_matches_hand_counts():
    ref = [Turn(0.0, 10.0, "a"), Turn(10.0, 20.0, "b")]
    assert diarisation_error_rate(ref, [Turn(0.0, 10.0, "x"), Turn(10.0, 20.0, "y")]) == 0.0
    assert diarisation_error_rate(ref, []) == 1.0
    # 10-15 s of b called a: 4.75 s confusion outside the collars, over 20 s less 1 s of collars (0, 10, 20)
    hyp = [Turn(0.0, 15.0, "x"), Turn(15.0, 20.0, "y")]
    assert diarisation_error_rate(ref, hyp) == pytest.approx(4.75 / 19.0, abs=0.002)
    overlap = [*ref, Turn(4.0, 6.0, "b")]  # overlapped speech counts twice; missing it is a miss
    assert diarisation_error_rate(overlap, ref, collar=0.0) == pytest.approx(2.0 / 22.0, abs=0.01)


def test_gate_has_short_fades_outside_the_turn():
    g = gate([(0.5, 1.0)], 2 * RATE, RATE)
    assert g[int(0.5 * RATE)] == 1.0 and g[int(0.999 * RATE)] == 1.0
    assert 0.0 < g[int(0.495 * RATE)] < 1.0 and g[int(0.48 * RATE)] == 0.0 and g[int(1.02 * RATE)] == 0.0


def test_auto_uses_embedded_here_and_pyannote_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyannote.audio", None)  # as on a CPU-torch machine
    assert resolve_diarise_backend("auto")[0] == "embedded"
    src = write_wav(tmp_path / "a.wav", (0.1 * np.sin(np.arange(RATE) / 5)).astype(np.float32))
    with pytest.raises(EngineSetupError, match=r"pip install -e '\.\[diarize\]'"):
        diarise(src, [SpeakerRef("ana")], tmp_path / "o", backend="pyannote")


def test_pyannote_missing_weights_error_never_shows_the_token(tmp_path, monkeypatch):
    calls = {}

    class Pipeline:
        @staticmethod
        def from_pretrained(source, token=None):
            calls["source"], calls["token"] = source, token
            raise OSError(f"LocalEntryNotFoundError for {source}")

    fake = types.ModuleType("pyannote.audio")
    fake.Pipeline = Pipeline
    monkeypatch.setitem(sys.modules, "pyannote", types.ModuleType("pyannote"))
    monkeypatch.setitem(sys.modules, "pyannote.audio", fake)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    src = write_wav(tmp_path / "a.wav", (0.1 * np.sin(np.arange(RATE) / 5)).astype(np.float32))
    with pytest.raises(MissingWeightsError) as err:
        diarise(src, [SpeakerRef("ana")], tmp_path / "o", backend="pyannote", pipeline="3.1")
    assert calls == {"source": "pyannote/speaker-diarization-3.1", "token": "hf_secret_value"}
    assert "hf_secret_value" not in str(err.value) and "HF_TOKEN" in str(err.value)
    local = tmp_path / "models" / "speaker-diarization-community-1"
    local.mkdir(parents=True)
    (local / "config.yaml").write_text("pipeline: {}\n")
    with pytest.raises(MissingWeightsError):
        diarise(src, [SpeakerRef("ana")], tmp_path / "o", backend="pyannote", models_dir=tmp_path / "models")
    assert calls["source"] == str(local / "config.yaml")
