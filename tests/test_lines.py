"""Lines mode without a flow: the timing fit, text problems, voices and backends, and lines validated at
their manifest line (`dubflow validate`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flows.cli import main
from tasks.deliver import to_srt, to_vtt
from tasks.lines import ScriptLine, fit_report, fit_script, refined_speed, slot_ends
from tasks.manifest import ManifestError, load_manifest
from tasks.tts import (
    TtsError,
    backend_problem,
    choose_voice,
    resolve_tts_backend,
    speak,
    text_problems,
    trim_silence,
)

# ---------------------------------------------------------------------------------------------- the timing fit


@dataclass(frozen=True)
class Spoken:
    seconds: float


def fit(lines, natural, *, conversation=True, episode_end=None, max_speed=1.25):
    """The fit with a voice whose length at speed s is natural / s; returns (speeds, fitted lines)."""
    placed, _ = fit_script(
        lines,
        lambda i, speed: Spoken(natural[i] / speed),
        max_speed=max_speed,
        conversation=conversation,
        episode_end=episode_end,
    )
    return {p.index: p.speed for p in placed}, placed


def test_a_line_that_fits_keeps_its_natural_speed_and_its_start():
    lines = [ScriptLine(0, "ana", 1.0, None, "a"), ScriptLine(1, "ben", 4.0, None, "b")]
    speeds, placed = fit(lines, [2.0, 1.0])
    assert speeds == {0: 1.0, 1: 1.0}
    assert [(p.start, p.end) for p in placed] == [(1.0, 3.0), (4.0, 5.0)]
    assert all(p.drift_s == 0 and p.overrun_s == 0 and p.borrowed_s == 0 for p in placed)


def test_an_overrunning_line_is_sped_up_just_enough_within_the_bound():
    lines = [ScriptLine(0, "ana", 0.0, None, "a"), ScriptLine(1, "ben", 2.0, None, "b")]
    speeds, placed = fit(lines, [2.3, 1.0])  # 2.3 s into a 2 s slot: 1.15x
    assert speeds[0] == pytest.approx(1.15)
    assert placed[0].end <= 2.0 + 1e-9 and placed[1].start == 2.0 and placed[1].drift_s == 0


def test_beyond_the_bound_it_borrows_the_silence_after_its_end():
    lines = [ScriptLine(0, "ana", 0.0, 2.0, "a"), ScriptLine(1, "ben", 4.0, None, "b")]
    speeds, placed = fit(lines, [3.0, 1.0])  # needs 1.5x for its 2 s slot: 1.25x, then 0.4 s borrowed
    assert speeds[0] == 1.25
    assert placed[0].end == pytest.approx(2.4) and placed[0].borrowed_s == pytest.approx(0.4)
    assert placed[0].overrun_s == 0 and placed[1].start == 4.0


def test_still_too_long_it_moves_the_later_lines_by_the_minimum_and_reports_the_overrun():
    lines = [
        ScriptLine(0, "ana", 0.0, None, "a"),
        ScriptLine(1, "ben", 2.0, None, "b"),
        ScriptLine(2, "ana", 5.0, None, "c"),
    ]
    speeds, placed = fit(lines, [5.0, 1.0, 1.0])  # 4 s at 1.25x into 2 s
    assert speeds[0] == 1.25
    assert placed[0].overrun_s == pytest.approx(2.0)
    assert placed[1].start == pytest.approx(4.0) and placed[1].drift_s == pytest.approx(2.0)
    assert placed[2].start == 5.0  # the move is absorbed by the pause before it
    report = fit_report(placed, 1.25)
    assert report["overruns"] == [{"line": 0, "speaker": "ana", "overrun_s": 2.0, "start": 0.0}]
    assert report["max_drift_s"] == pytest.approx(2.0) and report["fit_within_speed_bound"] == 2


def test_a_measured_overrun_at_the_chosen_speed_asks_for_a_little_more():
    line = ScriptLine(0, "ana", 0.3, None, "a")
    assert refined_speed(line, 1.1, 2.2, 2.4, 1.25) == 1.16  # 2.2 s into 2.1 s at 1.1x: 1.1 * 2.2 / 2.1
    assert refined_speed(line, 1.2, 2.2, 2.4, 1.25) == 1.25  # capped at the bound
    assert refined_speed(line, 1.2, 2.0, 2.4, 1.25) is None  # fits
    assert refined_speed(line, 1.25, 3.0, 2.4, 1.25) is None  # at the bound: borrowing takes over
    assert refined_speed(line, 1.1, 2.2, 2.4, 1.25, margin=0.03) == 1.19  # aimed 3 % under: 1.152 / 0.97


def test_a_voice_with_random_timing_keeps_its_best_take_not_its_last():
    """Piper's length at a speed is random: a faster take can come out longer than a slower one."""
    lines = [ScriptLine(0, "ana", 0.0, None, "a"), ScriptLine(1, "ben", 2.0, None, "b")]
    takes = {1.0: 2.3, 1.15: 2.05, 1.2: 1.99, 1.25: 2.1}  # speed -> seconds, not monotone
    asked = []

    def speak(i, speed):
        asked.append((i, speed))
        return Spoken(takes.get(speed, 2.3 / speed) if i == 0 else 1.0)

    placed, spoken = fit_script(lines, speak, max_speed=1.25, conversation=True, episode_end=None)
    # 2.05 s at 1.15x still overran: one refinement, aimed 1.5 % under the slot (1.15 * 2.05 / 1.97 -> 1.2)
    assert [s for i, s in asked if i == 0] == [1.0, 1.15, 1.2]
    assert placed[0].speed == 1.2 and spoken[0].seconds == 1.99 and placed[0].overrun_s == 0

    takes[1.2] = 2.2  # now the refinement is longer, and the bound's take overruns too
    asked.clear()
    placed, spoken = fit_script(lines, speak, max_speed=1.25, conversation=True, episode_end=None)
    assert [s for i, s in asked if i == 0] == [1.0, 1.15, 1.2, 1.25]  # at the bound: no more takes
    assert spoken[0].seconds == 2.05 and placed[0].speed == 1.15  # nothing fits: the shortest take
    assert placed[0].overrun_s == pytest.approx(0.05) and placed[1].start == pytest.approx(2.05)


def test_a_take_a_fraction_of_a_millisecond_over_its_slot_is_refined_not_reported_as_an_overrun():
    """The fit and the report share one rule for "fits" (CI once saw a 1 ms overrun accepted, then reported)."""
    lines = [ScriptLine(0, "ana", 0.0, None, "a"), ScriptLine(1, "ben", 2.0, None, "b")]
    takes = {1.0: 2.3, 1.15: 2.0005, 1.17: 1.98}  # 1.15 * 2.0005 / (2 * 0.985) -> 1.17
    placed, spoken = fit_script(
        lines, lambda i, speed: Spoken(takes[speed] if i == 0 else 1.0), max_speed=1.25, conversation=True,
        episode_end=None,
    )  # fmt: skip
    assert placed[0].speed == 1.17 and spoken[0].seconds == 1.98
    assert fit_report(placed, 1.25)["overruns"] == [] and placed[1].drift_s == 0


def test_a_speaker_never_overlaps_themself_even_outside_one_conversation():
    lines = [
        ScriptLine(0, "ana", 0.0, None, "a"),
        ScriptLine(1, "ben", 0.5, None, "b"),  # ben talks over ana on purpose
        ScriptLine(2, "ana", 1.0, None, "c"),
    ]
    speeds, placed = fit(lines, [3.0, 1.0, 1.0], conversation=False)
    assert speeds[1] == 1.0 and placed[1].start == 0.5  # not ana's line: ben is not moved
    assert placed[2].start >= placed[0].end - 1e-9  # ana's second line waits for her first
    by_speaker = {}
    for p in sorted(placed, key=lambda p: p.start):
        assert p.start >= by_speaker.get(p.speaker, 0.0) - 1e-9
        by_speaker[p.speaker] = p.end


def test_in_one_conversation_lines_that_start_together_or_overlap_on_purpose_still_overlap():
    lines = [
        ScriptLine(0, "ana", 0.0, 3.0, "a"),  # explicit end after ben's start: an intended overlap
        ScriptLine(1, "ben", 2.0, None, "b"),
        ScriptLine(2, "cal", 2.0, None, "c"),  # starts together with ben
    ]
    assert slot_ends(lines, True, None)[0] == 3.0
    _, placed = fit(lines, [3.0, 1.0, 1.0])
    assert [p.start for p in placed] == [0.0, 2.0, 2.0]


def test_the_last_line_of_a_video_cannot_run_past_its_end():
    lines = [ScriptLine(0, "ana", 8.0, None, "a")]
    speeds, placed = fit(lines, [3.0], episode_end=10.0)
    assert speeds[0] == 1.25 and placed[0].overrun_s == pytest.approx(0.4)


def test_subtitles_come_from_the_fitted_times_and_vtt_matches_srt():
    captions = [(4.0, 5.25, "Second", 1), (0.5, 2.0, "First\nrow two", 0)]
    srt, vtt = to_srt(captions), to_vtt(captions)
    assert srt.startswith("1\n00:00:00,500 --> 00:00:02,000\nFirst\nrow two\n")
    assert vtt.startswith("WEBVTT\n\n1\n00:00:00.500 --> 00:00:02.000\nFirst\nrow two\n")
    assert "00:00:04.000 --> 00:00:05.250\nSecond" in vtt
    assert to_srt([(3.0, 2.0, "late", 0)]) == "1\n00:00:03,000 --> 00:00:03,001\nlate\n"  # never backwards


# ---------------------------------------------------------------------------------------------- text, voices


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  ", "text is empty"),
        ("First paragraph.\n\nSecond one.", "blank line"),
        ("x" * 2000, "2000 characters"),
        ("Great news \U0001f600", "U+1F600"),
        ("bell\x07", "U+0007"),
    ],
)
def test_text_problems_say_what_is_wrong_and_how_to_fix_it(text, expected):
    problems = text_problems(text)
    assert len(problems) == 1 and expected in problems[0]


def test_ordinary_text_with_punctuation_accents_and_a_line_break_is_fine():
    assert text_problems("Ça va? «Oui» — it's 5 o'clock…\nSecond row.") == []


def test_a_requested_backend_that_cannot_run_is_an_error_never_espeak(tmp_path):
    assert "no Kokoro-82M weights" in backend_problem("kokoro", tmp_path)
    with pytest.raises(TtsError, match="tts backend 'kokoro' is not available"):
        resolve_tts_backend("kokoro", tmp_path)


def test_auto_gives_every_speaker_a_voice_of_their_own():
    if backend_problem("piper", None):
        pytest.skip("piper-tts with a voice is not installed (tts-offline extra)")
    one = [(None, "en", 0)]
    assert resolve_tts_backend("auto", None, one)[0] == "piper"  # no Kokoro weights here
    two = [(None, "en", 0), (None, "en", 1)]  # one Piper voice for two speakers: espeak
    backend, why = resolve_tts_backend("auto", None, two)
    assert backend == "espeak" and "fewer voices than speakers" in why


def test_a_voice_that_cannot_speak_the_language_is_refused():
    with pytest.raises(TtsError, match="speaks en-us, not 'fr'"):
        choose_voice("espeak", "en-us+m3", "fr", 0, None)
    assert choose_voice("espeak", None, "fr", 1, None).name == "fr+f3"
    if not backend_problem("piper", None):
        with pytest.raises(TtsError, match="no piper voice here speaks 'de'"):
            choose_voice("piper", None, "de", 0, None)


def test_a_faster_speed_gives_a_shorter_line():
    voice = choose_voice("espeak", None, "en", 0, None)
    text = "The last scene still needs a voice."
    natural, fast = (trim_silence(speak(text, voice, s, 48000, None), 48000) for s in (1.0, 1.25))
    assert 0.7 < len(fast) / len(natural) < 0.9
    assert np.max(np.abs(natural)) > 0.05


def test_piper_speaks_with_the_packaged_voice():
    if backend_problem("piper", None):
        pytest.skip("piper-tts with a voice is not installed (tts-offline extra)")
    voice = choose_voice("piper", None, "en-us", 0, None)
    audio = trim_silence(speak("Hello there, this is Joe.", voice, 1.0, 48000, None), 48000)
    assert voice.name == "en_US-joe-medium" and 0.8 < len(audio) / 48000 < 3.0


# ---------------------------------------------------------------------------------------------- validation


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    Image.new("RGB", (640, 360), "gray").save(tmp_path / "scene.png")
    return tmp_path


HEAD = """\
episode: lines
source: {source}
speakers:
  - {{id: ana, box: [10, 10, 300, 350]}}
  - {{id: ben, box: [330, 10, 630, 350]}}
tts: {{backend: espeak}}
lines:
"""


def problems(folder: Path, lines: str, source: str = "scene.png", tts: str = "espeak") -> list[str]:
    path = folder / "ep.yaml"
    path.write_text(HEAD.format(source=source).replace("backend: espeak", f"backend: {tts}") + lines)
    try:
        load_manifest(path)
    except ManifestError as exc:
        return [p.format(path).removeprefix(f"{path}:") for p in exc.problems]
    return []


def test_a_good_script_validates(folder):
    assert problems(folder, '  - {speaker: ana, start: 0.5, end: 2, text: "Hi."}\n') == []


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ('  - {speaker: ana, start: 1, text: "Hi."}\n  - {speaker: ana, start: 1, text: "Yo."}\n',
         "lines[1].start: starts together with lines[0] of the same speaker"),
        ('  - {speaker: ana, start: 1, end: 3, text: "Hi."}\n  - {speaker: ana, start: 2, text: "Yo."}\n',
         "lines[0].end: end (3.0) runs into lines[1] of the same speaker"),
        ('  - {speaker: ana, start: 1, text: ""}\n', "lines[0].text: text is empty"),
        ('  - {speaker: ana, start: 1, text: "One.\\n\\nTwo."}\n', "lines[0].text: text contains a blank line"),
        ('  - {speaker: ana, start: 1, text: "Hi \\U0001F600"}\n', "lines[0].text: text has characters"),
        ('  - {speaker: ana, start: 1, text: "' + "a" * 2000 + '"}\n', "a line holds at most 1000"),
        ('  - {speaker: ana, start: 1, text: "Hi.", voice: "en-us+m3", language: fr}\n',
         "lines[0].voice: espeak voice 'en-us+m3' speaks en-us, not 'fr'"),
    ],
)  # fmt: skip
def test_line_problems_are_located(folder, lines, expected):
    found = problems(folder, lines)
    assert any(expected in p for p in found), found


def test_a_kokoro_request_without_weights_is_refused_at_validation(folder, monkeypatch):
    monkeypatch.setenv("DUBFLOW_MODELS_DIR", str(folder))
    monkeypatch.setenv("HF_HUB_CACHE", str(folder / "hf"))
    found = problems(folder, '  - {speaker: ana, start: 1, text: "Hi."}\n', tts="kokoro")
    assert len(found) == 1 and "tts.backend: tts backend 'kokoro' is not available" in found[0]
    assert "kokoro-v1_0.pth" in found[0]


def test_a_line_after_the_end_of_the_video_is_refused_in_one_line(folder, capsys):
    from tests.test_media_video import write_coded_video

    write_coded_video(folder / "scene.mp4", [i / 15 for i in range(30)], size=(640, 360))  # 2 s
    path = folder / "ep.yaml"
    path.write_text(
        HEAD.format(source="scene.mp4") + '  - {speaker: ana, start: 0.5, text: "Hi."}\n'
        '  - {speaker: ben, start: 3600, end: 30, text: "Too late."}\n'
    )
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any("lines[1].start: starts at 3600.0 s, at or after the end of scene.mp4 (1.9" in e for e in err)
    assert any("lines[1].end: end (30.0) must be after start" in e for e in err)
    assert all(e.startswith(f"{path}:") for e in err) and "Traceback" not in "".join(err)


def test_doctor_lists_each_tts_backend_with_its_voices(tmp_path, monkeypatch):
    from flows.doctor import doctor_report, format_doctor

    monkeypatch.setenv("DUBFLOW_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    tts = doctor_report()["stages"]["tts"]
    assert tts["backends"]["kokoro"].startswith("unavailable: no Kokoro-82M weights")
    assert "en-us+f3 (en-us)" in tts["backends"]["espeak"]
    if not backend_problem("piper", None):
        assert tts["auto"] == "piper" and "en_US-joe-medium (en-us)" in tts["backends"]["piper"]
    assert "kokoro: unavailable" in format_doctor(doctor_report())


def test_an_overrun_line_turns_the_qc_verdict_to_warn():
    from tasks.deliver import verdict

    assert verdict({"lines": {"overruns": []}}, ()) == "pass"
    assert verdict({"lines": {"overruns": [{"line": 0, "overrun_s": 0.4}]}}, ()) == "warn"
    assert verdict({"lines": {"overruns": [{"line": 0, "overrun_s": 0.4}]}}, ("loudness",)) == "fail"
