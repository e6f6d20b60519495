"""Lines mode through `dubflow run`: Piper for real, Kokoro with tiny random weights, per-line caching.

The renders use the fast fake engine in place of `preview` (tests/test_ops_rerun.py does the same): what is
tested here is what the lines become, and which stages a re-run repeats.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from flows.cli import main
from tasks.demo import short_manifest_text
from tasks.tts import backend_problem

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

# (speaker, start, text): ana's first line (2.45-2.67 s with Piper at its natural speed once trimmed, 20 takes: its
# noise is random) is longer than the 2.3 s before ben answers: spoken faster (length_scale shortens the sounds, not
# the pauses), within max_speed 1.4, where every take is 1.98-2.09 s: it always fits (25 simulated fits: 1.19-1.34x)
LINES = [
    ("ana", 0.3, "Did you finish the subtitles for episode three?"),
    ("ben", 2.6, "Almost."),
    ("ana", 4.5, "Then let us dub it tonight."),
    ("ben", 8.0, "Good night."),
]


@pytest.fixture
def fake_engine(monkeypatch):
    monkeypatch.setenv("DUBFLOW_ENGINE_OVERRIDES", "preview=engine.fake:SlowRenderer")
    monkeypatch.setenv("DUBFLOW_FAKE_LOAD_S", "0")


def write_manifest(folder: Path, scene: Path, lines, tts: str, episode: str) -> Path:
    shutil.copy(scene, folder / "scene.png")
    path = folder / f"{episode}.yaml"
    render = "{engine: preview, size: 480, max_segment_s: 2}"
    extra = f"tts: {tts}\noutputs: [mp4, srt, vtt, qc]\n"
    path.write_text(short_manifest_text(episode, render=render, lines=lines, tracks=False, extra=extra))
    return path


def last_run(ws: Path, episode: str) -> dict:
    return json.loads((ws / "episodes" / episode / "runs.jsonl").read_text().splitlines()[-1])


def states(run: dict) -> dict[str, str]:
    return {s["stage"]: s["state"] for s in run["stages"]}


def test_piper_lines_are_fitted_subtitled_and_cached_line_by_line(tmp_path, demo_media, fake_engine, capsys):
    if backend_problem("piper", None):
        pytest.skip("piper-tts with a voice is not installed (tts-offline extra)")
    ws = tmp_path / "work"
    manifest = write_manifest(tmp_path, demo_media["scene"], LINES, "{backend: piper, max_speed: 1.4}", "pip")
    assert main(["run", str(manifest), "--workspace", str(ws)]) == 0
    first = last_run(ws, "pip")
    assert first["state"] == "completed"
    fitted = json.loads(Path(first["outputs"]["lines.json"]).read_text())
    assert fitted["backend"] == "piper" and [ln["line"] for ln in fitted["lines"]] == [0, 1, 2, 3]
    by_line = {ln["line"]: ln for ln in fitted["lines"]}
    assert 1.0 < by_line[0]["speed"] <= 1.4, fitted  # sped up for ben's answer
    assert by_line[0]["end"] <= by_line[1]["start"] + 1e-3  # one conversation: no talking over ben
    assert all(ln["drift_s"] >= 0 and ln["voice"] == "en_US-joe-medium" for ln in fitted["lines"])
    # subtitles from the fitted times, in both formats
    srt = Path(first["outputs"]["pip.srt"]).read_text()
    vtt = Path(first["outputs"]["pip.vtt"]).read_text()
    assert vtt.startswith("WEBVTT") and srt.count(" --> ") == vtt.count(" --> ") == 4
    cue = re.search(r"(\d\d):(\d\d):(\d\d)\.(\d{3}) --> ", vtt.split("\n2\n")[1])
    h, m, s, ms = map(int, cue.groups())
    assert abs(h * 3600 + m * 60 + s + ms / 1000 - by_line[1]["start"]) < 0.002
    qc = json.loads(Path(first["outputs"]["qc.json"]).read_text())
    assert qc["lines"]["lines"] == 4 and qc["lines"]["sped_up"] >= 1 and qc["lines"]["overruns"] == [], fitted
    provenance = json.loads(Path(first["outputs"]["provenance.json"]).read_text())
    assert provenance["backends"]["tts"] == "piper"
    renders_first = {k for k in states(first) if k.startswith("render[")}

    # edit ben's last line: that line alone is spoken again, and only the segments it is in re-render
    edited = [*LINES[:3], ("ben", 8.0, "Sleep well.")]
    write_manifest(tmp_path, demo_media["scene"], edited, "{backend: piper, max_speed: 1.4}", "pip")
    assert main(["run", str(manifest), "--workspace", str(ws)]) == 0
    second = states(last_run(ws, "pip"))
    spoken = {k: v for k, v in second.items() if k.startswith("tts[line")}
    assert {k for k, v in spoken.items() if v == "executed"} == {"tts[line 3]"}
    assert {"tts[line 0]", f"tts[line 0 @{by_line[0]['speed']:g}x]", "tts[line 1]", "tts[line 2]"} <= set(
        spoken
    )
    assert second["tts[ana]"] == "cached" and second["tts[ben]"] == "executed"
    renders = {k: v for k, v in second.items() if k.startswith("render[")}
    assert set(renders) == renders_first
    assert "executed" in renders.values() and "cached" in renders.values()
    capsys.readouterr()
    assert main(["status", str(manifest), "--workspace", str(ws)]) == 0
    shown = capsys.readouterr().out
    assert re.search(r"tts\[line 3\]\s+executed", shown) and re.search(r"tts\[line 2\]\s+cached", shown)


def test_kokoro_speaks_through_dubflow_run_with_tiny_weights(tmp_path, demo_media, fake_engine, monkeypatch):
    pytest.importorskip("kokoro")
    from tests.tts_fixtures import make_tiny_kokoro

    make_tiny_kokoro(tmp_path / "models")
    monkeypatch.setenv("DUBFLOW_MODELS_DIR", str(tmp_path / "models"))
    lines = [("ana", 0.2, "Hello there."), ("ben", 1.5, "Hi.")]
    manifest = write_manifest(tmp_path, demo_media["scene"], lines, "{backend: auto}", "kok")
    assert main(["run", str(manifest), "--workspace", str(tmp_path / "work")]) == 0
    run = last_run(tmp_path / "work", "kok")
    fitted = json.loads(Path(run["outputs"]["lines.json"]).read_text())
    assert fitted["backend"] == "kokoro" and "weights" in fitted["revision"]
    assert [ln["voice"] for ln in fitted["lines"]] == ["af_tiny", "am_tiny"]  # a voice per speaker
    assert all(ln["end"] > ln["start"] for ln in fitted["lines"])
    provenance = json.loads(Path(run["outputs"]["provenance.json"]).read_text())
    assert provenance["backends"]["tts"] == "kokoro"
