"""diarise: tracks land on the right manifest speaker, deterministically; bad input; scoring; pyannote errors."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.base import EngineSetupError, MissingWeightsError
from engine.media import MediaError
from tasks.diarise import (
    SpeakerRef,
    Turn,
    diarisation_error_rate,
    diarise,
    gate,
    read_rttm,
    resolve_diarise_backend,
    use_given_tracks,
)
from tasks.diarise.segmentation import find_checkpoint
from tests.audio_fixtures import RATE, conversation, enrolment, have_voices, mix_at, music, write_wav

pytestmark = pytest.mark.skipif(
    not have_voices(), reason="needs apt espeak-ng and pip install -e '.[test]' for the test voices"
)
pytest.importorskip("silero_vad", reason="pip install -e '.[vad]'")
pytest.importorskip("resemblyzer", reason="pip install -e '.[vad]'")


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
    speech = "pyannote/segmentation" if find_checkpoint() else "silero-vad=="
    assert saved["model"] == result.model and result.model.startswith(speech)
    assert saved["settings"]["segmentation"]["model"] == speech.rstrip("=")
    assert saved["settings"]["vad_threshold"] == 0.6


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


def test_one_voice_without_samples_is_never_silently_split(tmp_path):
    solo, _ = conversation([("ana", 0), ("ana", 1), ("ana", 2)])
    src = write_wav(tmp_path / "solo.wav", solo)
    result = diarise(
        src, [SpeakerRef("ana"), SpeakerRef("ben")], tmp_path / "o", backend="embedded", num_speakers=2
    )
    assert any("sound alike" in w or "no voice found" in w for w in result.warnings), result.warnings


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
    with pytest.raises(MediaError, match="silent"):
        diarise(write_wav(tmp_path / "zero.wav", np.zeros(RATE)), refs, tmp_path / "o", backend="embedded")
    noise = (0.001 * np.random.default_rng(0).standard_normal(2 * RATE)).astype(np.float32)
    with pytest.raises(MediaError, match="no speech"):
        diarise(write_wav(tmp_path / "hiss.wav", noise), refs, tmp_path / "o", backend="embedded")
    (tmp_path / "broken.wav").write_bytes(b"RIFF1234WAVEfmt garbage")
    with pytest.raises(MediaError, match="not a readable audio file"):
        diarise(tmp_path / "broken.wav", refs, tmp_path / "o", backend="embedded")
    with pytest.raises(ValueError, match="unknown speakers"):
        diarise(media["two"], refs, tmp_path / "o", backend="embedded", pinned={"SPK0": "zed"})
    with pytest.raises(ValueError, match="num_speakers=0"):
        diarise(media["two"], refs, tmp_path / "o", backend="embedded", num_speakers=0)
    with pytest.raises(MediaError, match="voice_sample"):
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


@settings(deadline=None, max_examples=50)
@given(
    st.lists(st.tuples(st.floats(0, 50), st.floats(0.3, 5), st.sampled_from("abc")), min_size=1, max_size=8)
)
def test_der_is_zero_for_any_relabelling_and_one_for_nothing(rows):
    ref = [Turn(round(a, 2), round(a + d, 2), who) for a, d, who in rows]
    renamed = [Turn(t.start, t.end, {"a": "z", "b": "y", "c": "x"}[t.label]) for t in ref]
    assert diarisation_error_rate(ref, renamed, collar=0.0) == 0.0
    assert diarisation_error_rate(ref, [], collar=0.0) == 1.0


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


def test_given_tracks_skip_diarisation_and_get_an_rttm(media, tmp_path):
    two = sf.read(media["two"], dtype="float32")[0]
    turns = media["two_turns"]
    tracks = {}
    for who in ("ana", "ben"):
        g = gate([(t.start, t.end) for t in turns if t.speaker == who], len(two), RATE)
        tracks[who] = write_wav(tmp_path / f"{who}.wav", two * g)
    result = use_given_tracks(tracks, tmp_path / "out")
    assert result.backend == "given" and result.mapping == {"ana": "ana", "ben": "ben"}
    assert min(assigned_share(result.rttm, turns).values()) > 0.9
    short = write_wav(tmp_path / "short.wav", two[: RATE * 2])
    with pytest.raises(MediaError, match="share one sample rate and length"):
        use_given_tracks({"ana": tracks["ana"], "ben": short}, tmp_path / "out")


def fake_pyannote(monkeypatch, turns, calls):
    """pyannote.audio stand-in with its real call shapes: Pipeline.from_pretrained -> pipeline(file, **kw)."""

    class Segment(types.SimpleNamespace):
        pass

    class Annotation:
        def itertracks(self, yield_label=False):
            for i, (start, end, label) in enumerate(turns):
                yield Segment(start=start, end=end), i, label

    class Pipeline:
        @staticmethod
        def from_pretrained(source, token=None):
            calls["source"] = source
            return Pipeline()

        def to(self, device):
            calls["device"] = str(device)
            return self

        def __call__(self, file, **kwargs):
            calls["kwargs"], calls["sample_rate"] = kwargs, file["sample_rate"]
            return types.SimpleNamespace(speaker_diarization=Annotation())

    fake = types.ModuleType("pyannote.audio")
    fake.Pipeline = Pipeline
    monkeypatch.setitem(sys.modules, "pyannote", types.ModuleType("pyannote"))
    monkeypatch.setitem(sys.modules, "pyannote.audio", fake)


def test_pyannote_turns_are_named_by_enrolment_and_overlaps_reach_both_tracks(media, tmp_path, monkeypatch):
    truth = media["two_turns"]  # ben, ana, ben, ana; pyannote's labels come in its own arbitrary order
    label = {"ben": "SPEAKER_01", "ana": "SPEAKER_00"}
    turns = [(t.start, t.end, label[t.speaker]) for t in truth]
    turns.append((truth[0].end - 0.6, truth[1].start, "SPEAKER_00"))  # ana starts 0.6 s before ben ends
    calls = {}
    fake_pyannote(monkeypatch, turns, calls)
    refs = [media["refs"]["ana"], media["refs"]["ben"]]
    result = diarise(media["two"], refs, tmp_path, backend="pyannote", num_speakers=2, pipeline="3.1")
    assert calls == {
        "source": "pyannote/speaker-diarization-3.1",
        "device": "cpu",
        "kwargs": {"num_speakers": 2},
        "sample_rate": RATE,
    }
    assert result.backend == "pyannote" and result.mapping == {"SPK0": "ben", "SPK1": "ana"}
    overlap = slice(int((truth[0].end - 0.5) * RATE), int((truth[0].end - 0.1) * RATE))
    ana, ben = (sf.read(result.tracks[s], dtype="float32")[0][overlap] for s in ("ana", "ben"))
    np.testing.assert_array_equal(ana, ben)
    assert np.abs(ben).max() > 0.05  # real speech, given to both speakers


def test_enrolment_guided_mapping_json_holds_scores_backend_revision_and_settings(media, tmp_path):
    refs = [media["refs"]["ana"], media["refs"]["ben"]]
    result = diarise(media["two"], refs, tmp_path, backend="embedded", num_speakers=2, uri="ep 07")
    saved = json.loads((tmp_path / "mapping.json").read_text())
    assert saved["settings"]["enrolment_guided"] is True and saved["revision"].startswith("embedded/")
    assert saved["settings"]["num_speakers"] == 2 and saved["settings"]["order"] == "first-appearance"
    for speaker in ("ana", "ben"):
        entry = saved["confidence"][speaker]
        assert entry["speech_s"] > 2.0 and 0.6 < entry["similarity"] <= 1.0
        assert entry["confidence"] == min(entry["similarity"], entry["core_share"])
    rows = [line.split() for line in result.rttm.read_text().splitlines()]
    assert {r[1] for r in rows} == {"ep_07"} and {r[7] for r in rows} == {"ana", "ben"}


def test_errors_name_the_users_file_not_the_stored_blob(tmp_path):
    noise = (0.001 * np.random.default_rng(0).standard_normal(2 * RATE)).astype(np.float32)
    blob = write_wav(tmp_path / "3f9a0c.wav", noise)
    with pytest.raises(MediaError, match=r"^episode 1/dialogue\.wav: no speech found"):
        diarise(
            blob, [SpeakerRef("a")], tmp_path / "o", backend="embedded", source_name="episode 1/dialogue.wav"
        )


def test_reliability_warnings_short_speaker_and_low_confidence():
    from tasks.diarise.stage import reliability_warnings

    turns = [Turn(0.0, 9.0, "ana"), Turn(9.5, 10.8, "ben"), Turn(11.0, 16.0, "cal")]
    confidence = {
        "ana": {"speech_s": 9.0, "confidence": 0.9},
        "ben": {"speech_s": 1.3, "confidence": 0.9},
        "cal": {"speech_s": 5.0, "confidence": 0.41},
    }
    notes = reliability_warnings(turns, confidence, [SpeakerRef(s) for s in confidence], None)
    assert len(notes) == 2
    assert "ben: only 1.3 s of speech" in notes[0] and "cal: low diarisation confidence 0.41" in notes[1]


def test_a_split_that_follows_the_music_is_flagged():
    """One voice under music, another without it: the clusters may be 'music' and 'no music'."""
    from tasks.diarise.stage import music_boundary_warnings

    speech, _ = conversation([("ana", 0), ("ben", 0), ("ana", 1), ("ben", 1)])
    half = len(speech) // 2
    scored = speech.copy()
    scored[half:] = mix_at(speech[half:], music(len(speech[half:]) / RATE, seed=4), -10.0)
    cut = half / RATE
    by_music = [Turn(0.0, cut - 0.2, "A"), Turn(cut + 0.2, len(speech) / RATE, "B")]
    notes = music_boundary_warnings(by_music, scored)
    assert len(notes) == 1 and notes[0].startswith("speakers B and A: B speaks") and "music" in notes[0]
    mixed = [
        Turn(0.0, cut / 2, "A"),
        Turn(cut / 2, cut, "B"),
        Turn(cut, cut * 1.5, "A"),
        Turn(cut * 1.5, cut * 2, "B"),
    ]
    assert music_boundary_warnings(mixed, scored) == []


def test_the_pkg_resources_warning_never_reaches_the_terminal(tmp_path):
    import subprocess

    code = (
        "import numpy as np; from tasks.diarise.embedded import embed_segments;"
        "embed_segments(np.zeros(16000, dtype=np.float32), [(0.0, 1.0)])"
    )
    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert "pkg_resources" not in done.stderr + done.stdout


def test_music_is_judged_on_the_dialogue_before_separation(tmp_path):
    """The stage diarises separated vocals, which carry too little music to detect: the music-split check
    reads the dialogue before separation (music_source), and only then can warn."""
    speech, turns = conversation([("ana", 0), ("ana", 1), ("ben", 0), ("ben", 1)])
    envelope = np.zeros(len(speech), dtype=np.float32)
    envelope[int((turns[2].start - 0.3) * RATE) :] = 1.0  # a music cue under ben's scene, none under ana's
    bed = music(len(speech) / RATE, seed=5)[: len(speech)] * envelope
    vocals = write_wav(tmp_path / "vocals.wav", speech)
    original = write_wav(tmp_path / "dialogue.wav", mix_at(speech, bed, -8.0))
    refs = [SpeakerRef("ana"), SpeakerRef("ben")]
    blind = diarise(vocals, refs, tmp_path / "a", backend="embedded", num_speakers=2)
    judged = diarise(vocals, refs, tmp_path / "b", backend="embedded", num_speakers=2, music_source=original)
    assert read_rttm(blind.rttm) == read_rttm(judged.rttm)  # the voices decide, music only checks
    assert not [w for w in blind.warnings if "music" in w]
    assert [w for w in judged.warnings if "the split may follow the music" in w]
    record = json.loads((tmp_path / "b" / "mapping.json").read_text())
    assert record["settings"]["music_judged_on"] == "the dialogue before separation"
