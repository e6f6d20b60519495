"""The pyannote/segmentation backend run by our own PyanNet: safe loading, the key layout, finding the file,
sliding-window inference, overlapped speech getting two speakers, and `dubflow run` with tiny weights."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from engine.base import MissingWeightsError  # noqa: E402
from tasks.diarise import segmentation as seg  # noqa: E402
from tasks.diarise.embedded import EmbeddedSettings, bridge_pauses, overlap_turns  # noqa: E402
from tasks.diarise.turns import FRAME_S, RATE  # noqa: E402


@dataclasses.dataclass
class Specifications:  # stands for pyannote's class in a real checkpoint: the loader must not need it
    duration: float = 5.0
    classes: tuple = ("speaker#1", "speaker#2", "speaker#3")


def tiny_checkpoint(
    path: Path, lstm_layers: int = 2, speech_bias: float | None = None, seed: int = 0
) -> Path:
    """A random-weight PyanNet saved the way pyannote's Lightning checkpoint is: the same state_dict keys
    (sincnet.conv1d.0.filterbank.low_hz_, lstm.weight_ih_l0_reverse, ...), hyper_parameters and a class
    object in the pyannote.audio section. `speech_bias` pushes local speaker 1 on everywhere."""
    torch.manual_seed(seed)
    net = seg.PyanNet(lstm_layers=lstm_layers, classes=3, sinc_stride=10)
    state = net.state_dict()
    hz = np.linspace(30, 7900, 41, dtype=np.float32)
    state["sincnet.conv1d.0.filterbank.low_hz_"] = torch.from_numpy(hz[:-1, None].copy())
    state["sincnet.conv1d.0.filterbank.band_hz_"] = torch.from_numpy(np.diff(hz)[:, None].copy())
    if speech_bias is not None:
        state["classifier.bias"] = torch.tensor([speech_bias, -speech_bias, -speech_bias])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "pytorch-lightning_version": "1.5.4",
            "state_dict": state,
            "hyper_parameters": {"sincnet": {"stride": 10}, "lstm": {"num_layers": lstm_layers}},
            "pyannote.audio": {"specifications": Specifications()},
        },
        path,
    )
    return path


def test_the_key_layout_is_pyannotes_and_loading_is_strict(tmp_path):
    ckpt = seg.load_checkpoint(tiny_checkpoint(tmp_path / "m.bin"))
    assert ckpt.lstm_layers == 2 and ckpt.classes == 3 and ckpt.chunk_s == 5.0
    keys = set(ckpt.state_dict)
    assert {"sincnet.wav_norm1d.weight", "sincnet.conv1d.0.filterbank.n_", "sincnet.norm1d.2.bias"} <= keys
    assert {"lstm.weight_hh_l1_reverse", "linear.1.weight", "classifier.bias"} <= keys
    net = seg.build_pyannet(ckpt)
    with torch.no_grad():
        out = net(torch.zeros(2, 1, 5 * RATE) + 0.01 * torch.randn(2, 1, 5 * RATE))
    assert out.shape == (2, 293, 3) and float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    # pyannote's introspection in the real file: 270 more samples per frame, 1261 for two frames (991 + 270)
    assert net.frame_geometry() == (270, 495)
    broken = dict(ckpt.state_dict)
    broken.pop("linear.0.bias")
    with pytest.raises(MissingWeightsError, match="do not fit PyanNet"):
        seg.build_pyannet(dataclasses.replace(ckpt, state_dict=broken))


def test_the_unpickler_runs_no_code_from_the_file(tmp_path):
    marker = tmp_path / "pwned"

    class Touch:
        def __reduce__(self):
            return (os.system, (f"touch '{marker}'",))

    raw = pickle.dumps({"state_dict": {}, "evil": Touch()})
    loaded = seg._RestrictedUnpickler(io.BytesIO(raw)).load()
    assert not marker.exists() and isinstance(loaded["evil"], seg._Record)
    bad = tmp_path / "evil.bin"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "evil": Touch()}, bad)
    with pytest.raises(MissingWeightsError, match="not a PyanNet segmentation checkpoint"):
        seg.load_checkpoint(bad)
    assert not marker.exists()
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(MissingWeightsError, match=r"junk\.bin: not a readable segmentation checkpoint"):
        seg.load_checkpoint(tmp_path / "junk.bin")


def test_the_checkpoint_is_found_in_models_dir_then_hf_cache_then_the_whisperx_wheel(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hub"))
    wheel = tmp_path / "site" / "whisperx"
    tiny_checkpoint(wheel / "assets" / "pytorch_model.bin")
    (wheel / "__init__.py").write_text("raise RuntimeError('whisperx must never be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert seg.find_checkpoint(None) == wheel / "assets" / "pytorch_model.bin"
    assert "whisperx" not in sys.modules
    snap = tmp_path / "hub" / "models--pyannote--segmentation" / "snapshots" / "abc123"
    tiny_checkpoint(snap / "pytorch_model.bin")
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc123")
    assert seg.find_checkpoint(None) == snap / "pytorch_model.bin"
    models = tmp_path / "models"
    tiny_checkpoint(models / "pyannote-segmentation" / "pytorch_model.bin")
    assert seg.find_checkpoint(models) == models / "pyannote-segmentation" / "pytorch_model.bin"
    assert seg.checkpoint_identity(models).startswith("sha256:")


def test_sliding_windows_cover_every_frame_and_binarize_has_hysteresis(tmp_path):
    segmenter = seg.Segmenter(seg.load_checkpoint(tiny_checkpoint(tmp_path / "m.bin")), step_s=1.0)
    for seconds in (2.0, 12.3):  # shorter than one window, and a tail that is not a whole step
        act = segmenter.activity(
            np.random.default_rng(0).normal(0, 0.1, int(seconds * RATE)).astype(np.float32)
        )
        assert abs(act.start_s + len(act.speech) * act.step_s - max(seconds, 5.0)) < 0.1
        assert np.all(act.overlap <= act.speech + 1e-6)  # the second most active is never above the first
    values = np.array([0.0, 0.6, 0.45, 0.4, 0.3, 0.6, 0.2])
    assert seg.binarize(values, 1.0, 0.0, 0.5, 0.363) == [(1.0, 4.0), (5.0, 6.0)]


def test_bridge_pauses_fills_breaths_of_one_speaker_only():
    frames = np.array([0] * 10 + [-1] * 20 + [0] * 10 + [-1] * 20 + [1] * 10 + [-1] * 80 + [1] * 5)
    out = bridge_pauses(frames, 0.5)
    assert np.all(out[10:30] == 0)  # 0.2 s breath inside speaker 0
    assert np.all(out[40:60] == -1)  # a change of speaker is not bridged
    assert np.all(out[70:150] == -1)  # 0.8 s is a real pause


def test_overlapped_speech_gets_the_two_nearby_voices():
    """Frames 0-3 s speaker 0, 3-6 s speaker 1, speaker 2 far away at 20 s. The model hears two voices at
    2.5-3.5 s: both 0 and 1 are active there, never 2 (even when 2 scores best)."""
    n = 2500
    frames = np.full(n, -1)
    frames[:300], frames[300:600], frames[2000:2100] = 0, 1, 2
    scores = np.zeros((n, 3))
    scores[:, 2] = 0.9  # the distant voice looks most similar everywhere: only proximity rules it out
    scores[:300, 0], scores[300:600, 1] = 0.8, 0.8
    scores[250:350, 0], scores[250:350, 1] = 0.7, 0.7
    step = 0.016875
    t = np.arange(int(n * FRAME_S / step)) * step
    overlap = np.where((t >= 2.5) & (t < 3.5), 0.9, 0.05)
    act = seg.Activity(speech=np.ones_like(t), overlap=overlap, step_s=step, start_s=0.0)
    s = EmbeddedSettings()
    turns = overlap_turns(frames, scores, [0, 1, 2], act, s)
    assert sorted(t.label for t in turns) == ["0", "1"]
    assert all(abs(t.start - 2.5) < 0.03 and abs(t.end - 3.5) < 0.03 for t in turns)
    far = overlap_turns(frames, scores, [0, 1, 2], act, dataclasses.replace(s, overlap_context_s=30.0))
    assert "2" in {t.label for t in far}  # with a wide context, the best-scoring voice comes in


def _real_checkpoint() -> Path | None:
    return seg.find_checkpoint(None)


@pytest.mark.skipif(
    _real_checkpoint() is None, reason="no pyannote/segmentation checkpoint (make setup installs it)"
)
def test_the_real_checkpoint_finds_speech_not_silence_or_music(tmp_path):
    from tests.audio_fixtures import have_voices, music, say

    if not have_voices():
        pytest.skip("needs apt espeak-ng for the test voices")
    ckpt = seg.load_checkpoint(_real_checkpoint())
    assert ckpt.lstm_layers == 4 and ckpt.classes == 3 and ckpt.sinc_stride == 10
    speech = say("ana", "The harbour lights were out, so we walked back along the beach in the dark.")
    bed = 0.05 * music(4.0, seed=1)
    audio = np.concatenate([np.zeros(2 * RATE), speech, np.zeros(RATE), bed, np.zeros(RATE)]).astype(
        np.float32
    )
    act = seg.Segmenter(ckpt, step_s=1.0).activity(audio)
    regions = seg.binarize(act.speech, act.step_s, act.start_s, 0.5, 0.363)
    spoken = (2.0, 2.0 + len(speech) / RATE)
    covered = sum(max(0.0, min(b, spoken[1]) - max(a, spoken[0])) for a, b in regions)
    outside = sum(b - a for a, b in regions) - covered
    assert covered > 0.8 * (spoken[1] - spoken[0]), regions
    assert outside < 0.5, regions  # not the silences, not the music bed


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_dubflow_run_diarises_with_the_segmentation_model_from_the_models_folder(
    tmp_path, demo_media, monkeypatch, capsys
):
    """Tiny weights (local speaker 1 always on) in $DUBFLOW_MODELS_DIR win over any installed file; the run
    completes, and speaker-mapping.json names the checkpoint that decided speech."""
    for name in ("scene", "dialogue"):
        shutil.copy(demo_media[name], tmp_path / demo_media[name].name)
    models = tmp_path / "models"
    ckpt = tiny_checkpoint(models / "pyannote-segmentation" / "pytorch_model.bin", speech_bias=8.0)
    from tasks.demo import BOXES

    speakers = "\n".join(f"  - {{id: {s}, box: {list(b)}}}" for s, b in BOXES.items())
    manifest = tmp_path / "seg.yaml"
    manifest.write_text(
        f"episode: seg\nsource: scene.png\naudio: {{dialogue: dialogue.wav}}\nspeakers:\n{speakers}\n"
        "separate: {backend: dsp}\nrender: {engine: preview, max_segment_s: 5}\noutputs: [mp4, qc]\n"
    )
    monkeypatch.setenv("DUBFLOW_MODELS_DIR", str(models))
    from flows.cli import main

    assert main(["run", str(manifest), "--workspace", str(tmp_path / "w")]) == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "w" / "episodes" / "seg" / "runs.jsonl").read_text().splitlines()[-1])
    mapping = json.loads(Path(record["outputs"]["speaker-mapping.json"]).read_text())
    used = mapping["settings"]["segmentation"]
    assert used["model"] == "pyannote/segmentation" and Path(used["checkpoint"]) == ckpt
    assert mapping["model"].startswith("pyannote/segmentation + resemblyzer")
    rttm = [line.split() for line in Path(record["outputs"]["diarisation.rttm"]).read_text().splitlines()]
    assert rttm and {r[1] for r in rttm} == {"seg"} and {r[7] for r in rttm} <= set(BOXES)


def test_without_a_checkpoint_silero_decides_speech_and_says_so(tmp_path, monkeypatch):
    """No segmentation file anywhere: the diariser still works, with silero-vad, and mapping.json and
    `dubflow doctor` say so (and how to get the file)."""
    from tests.audio_fixtures import conversation, have_voices, write_wav

    if not have_voices():
        pytest.skip("needs apt espeak-ng for the test voices")
    from flows.doctor import _diarise
    from tasks.diarise import SpeakerRef, diarise

    monkeypatch.setattr(seg, "find_checkpoint", lambda models_dir=None: None)
    audio, _ = conversation([("ben", 0), ("ana", 0)])
    src = write_wav(tmp_path / "two.wav", audio)
    result = diarise(
        src, [SpeakerRef("ana"), SpeakerRef("ben")], tmp_path / "o", backend="embedded", num_speakers=2
    )
    mapping = json.loads((tmp_path / "o" / "mapping.json").read_text())
    assert (
        result.model.startswith("silero-vad==")
        and mapping["settings"]["segmentation"]["model"] == "silero-vad"
    )
    assert len({t.split()[7] for t in result.rttm.read_text().splitlines()}) == 2
    assert _diarise(None)["speech"].startswith("silero-vad (no pyannote/segmentation: pip install --no-deps")
