"""Length mismatches are never silent: dubbed audio longer than a video source, and inputs that decode
shorter than they declare (a truncated WAV, an mp4 cut after its moov), are refused with a located line."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from engine.media import MediaError, VideoFrames, read_whole_audio
from flows.cli import main
from tasks.manifest import ManifestError, load_manifest
from tests.footage_fixtures import write_moving_video

RATE = 16000


def _tone(path: Path, seconds: float) -> Path:
    t = np.arange(int(seconds * RATE)) / RATE
    sf.write(path, 0.1 * np.sin(2 * np.pi * 220 * t), RATE)
    return path


def _truncate(path: Path, keep: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def _manifest(folder: Path, source: str, track: str, extra: str = "") -> Path:
    path = folder / "ep.yaml"
    path.write_text(
        f"episode: ep\nsource: {source}\nspeakers:\n  - id: ana\n    track: {track}\n"
        f"render: {{engine: preview}}\n{extra}"
    )
    return path


@pytest.fixture()
def video(tmp_path: Path) -> Path:
    return write_moving_video(tmp_path / "clip.mp4", [i / 25 for i in range(50)])  # 2 s


def test_dialogue_longer_than_the_video_source_is_refused_at_its_line(tmp_path, video, capsys):
    _tone(tmp_path / "long.wav", 6.0)
    manifest = _manifest(tmp_path, "clip.mp4", "long.wav")
    with pytest.raises(ManifestError) as err:
        load_manifest(manifest)
    message = str(err.value)
    assert message.startswith(f"{manifest}:5:12: speakers[0].track: long.wav lasts 6.00 s")
    assert "video source 2.00 s" in message and "4.00 s would be dropped" in message
    assert main(["validate", str(manifest)]) == 2
    assert "would be dropped" in capsys.readouterr().err


def test_dialogue_as_long_as_the_video_is_accepted(tmp_path, video):
    _tone(tmp_path / "fits.wav", 2.0)
    assert load_manifest(_manifest(tmp_path, "clip.mp4", "fits.wav")).source_info.kind == "video"


def test_a_line_after_the_end_of_the_video_is_refused(tmp_path, video):
    _tone(tmp_path / "fits.wav", 2.0)
    manifest = _manifest(
        tmp_path, "clip.mp4", "fits.wav", "lines:\n  - {speaker: ana, start: 3.5, text: Late}\n"
    )
    with pytest.raises(
        ManifestError,
        match=r"lines\[0\]\.start: starts at 3.5 s, at or after the end of clip.mp4 \(2.000 s\)",
    ):
        load_manifest(manifest)


def test_a_wav_whose_header_claims_more_than_its_data_is_refused(tmp_path):
    wav = _truncate(_tone(tmp_path / "cut.wav", 4.0), 0.5)
    assert sf.info(str(wav)).frames < 2 * RATE  # decoders quietly stop at the end of the data
    with pytest.raises(
        MediaError, match=r"declares 4.00 s of audio but the file holds 2.00 s; it is truncated"
    ):
        read_whole_audio(wav, 48000)
    from PIL import Image

    Image.new("RGB", (64, 64), "gray").save(tmp_path / "still.png")
    with pytest.raises(ManifestError, match=r"speakers\[0\]\.track: .*cut.wav: the WAV header declares"):
        load_manifest(_manifest(tmp_path, "still.png", "cut.wav"))


def _mp4_with_sound(path: Path, seconds: float) -> Path:
    subprocess.run(
        ["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", f"testsrc=s=64x48:r=25:d={seconds}"]
        + ["-f", "lavfi", "-i", f"sine=d={seconds}", "-c:v", "libx264", "-c:a", "aac"]
        + ["-movflags", "+faststart", str(path)],
        check=True,
    )
    return path


def test_an_mp4_cut_after_its_moov_is_refused_as_audio_and_as_a_source(tmp_path):
    mp4 = _truncate(_mp4_with_sound(tmp_path / "cut.mp4", 6.0), 0.5)
    with pytest.raises(MediaError, match=r"declares 6.00 s but only [0-9.]+ s decode; the file is truncated"):
        read_whole_audio(mp4, 48000)
    with pytest.raises(MediaError, match=r"the container lists 150 frames but only \d+ are in the file"):
        VideoFrames(mp4)
    _tone(tmp_path / "fits.wav", 2.0)
    with pytest.raises(ManifestError, match=r"source: .*truncated"):
        load_manifest(_manifest(tmp_path, "cut.mp4", "fits.wav"))


def test_conform_refuses_a_truncated_dialogue_instead_of_padding_it_with_silence(tmp_path):
    from tasks.speakers import Timeline, conform_track
    from tasks.workspace import Workspace

    mp4 = _truncate(_mp4_with_sound(tmp_path / "dialogue.mp4", 6.0), 0.5)
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(MediaError, match="truncated"):
        conform_track(ws, ws.put_file(mp4, move=False), Timeline(150))
    whole = ws.put_file(_mp4_with_sound(tmp_path / "whole.mp4", 6.0), move=False)
    assert sf.info(str(ws.path(conform_track(ws, whole, Timeline(150))))).frames == 6 * 48000
