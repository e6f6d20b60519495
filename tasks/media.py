"""Media I/O: the ffmpeg binary, probing, decoding audio, writing files atomically.

Everything that touches ffmpeg goes through here so that the binary is resolved once
(`$FFMPEG_BINARY` -> `ffmpeg` on PATH -> the imageio-ffmpeg wheel's copy) and every
failure becomes a one-line `MediaError` naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class MediaError(ValueError):
    """A media file is missing, unreadable, or not what it should be."""


@cache
def ffmpeg_exe() -> str:
    found = os.environ.get("FFMPEG_BINARY") or shutil.which("ffmpeg")
    if found:
        return found
    try:
        import imageio_ffmpeg
    except ImportError:
        raise MediaError(
            "ffmpeg not found; install it (apt-get install ffmpeg) or pip install imageio-ffmpeg"
        ) from None
    return imageio_ffmpeg.get_ffmpeg_exe()


@cache
def ffprobe_exe() -> str | None:
    return shutil.which("ffprobe")


def run_ffmpeg(args: list[str], *, what: str) -> bytes:
    """Run ffmpeg quietly; on failure raise MediaError with the last line ffmpeg printed."""
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        last = (proc.stderr.decode(errors="replace").strip().splitlines() or ["unknown error"])[-1]
        raise MediaError(f"{what}: ffmpeg failed: {last}")
    return proc.stdout


@dataclass(frozen=True)
class MediaInfo:
    path: Path
    kind: str  # "image" | "video" | "audio"
    width: int = 0
    height: int = 0
    duration: float = 0.0
    fps: float = 0.0
    has_audio: bool = False
    sample_rate: int = 0
    channels: int = 0


def probe(path: Path) -> MediaInfo:
    """What a media file is (image, video, audio), its size and duration; MediaError if unreadable."""
    path = Path(path)
    if not path.exists():
        raise MediaError(f"{path}: file not found")
    if path.is_dir():
        raise MediaError(f"{path}: is a directory, not a media file")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: file is empty")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return _probe_image(path)
    return _probe_av(path)


def _probe_image(path: Path) -> MediaInfo:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.verify()
            width, height = im.size
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise MediaError(f"{path}: not a readable image ({exc})") from None
    return MediaInfo(path, "image", width, height)


def _probe_av(path: Path) -> MediaInfo:
    exe = ffprobe_exe()
    if exe is None:
        return _probe_with_soundfile(path)
    cmd = [exe, "-v", "error", "-show_streams", "-show_format", "-of", "json", str(path)]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        raise MediaError(f"{path}: not a readable media file")
    data = json.loads(proc.stdout or b"{}")
    streams = data.get("streams", [])
    video = next((s for s in streams if s.get("codec_type") == "video" and not _is_cover(s)), None)
    audio = next((s for s in streams if s.get("codec_type") == "audio"), None)
    duration = float(data.get("format", {}).get("duration") or 0.0)
    if video is None and audio is None:
        raise MediaError(f"{path}: has neither a picture nor a sound stream")
    if video is not None:
        num, _, den = (video.get("avg_frame_rate") or "0/1").partition("/")
        fps = float(num) / float(den or 1) if float(den or 1) else 0.0
        return MediaInfo(
            path,
            "video",
            int(video["width"]),
            int(video["height"]),
            duration,
            fps,
            audio is not None,
            int(audio.get("sample_rate", 0)) if audio else 0,
            int(audio.get("channels", 0)) if audio else 0,
        )
    if duration <= 0:
        raise MediaError(f"{path}: audio has no duration")
    return MediaInfo(
        path,
        "audio",
        duration=duration,
        has_audio=True,
        sample_rate=int(audio.get("sample_rate", 0)),
        channels=int(audio.get("channels", 0)),
    )


def _is_cover(stream: dict) -> bool:
    return bool(stream.get("disposition", {}).get("attached_pic"))


def _probe_with_soundfile(path: Path) -> MediaInfo:
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except (RuntimeError, sf.LibsndfileError) as exc:
        raise MediaError(f"{path}: not a readable audio file ({exc})") from None
    return MediaInfo(
        path,
        "audio",
        duration=info.duration,
        has_audio=True,
        sample_rate=info.samplerate,
        channels=info.channels,
    )


def read_audio(path: Path, sample_rate: int) -> np.ndarray:
    """Decode any audio (or a video's sound) to mono float32 at `sample_rate`."""
    raw = run_ffmpeg(
        ["-i", str(path), "-vn", "-ac", "1", "-ar", str(sample_rate), "-f", "f32le", "-"], what=str(path)
    )
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


def write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> Path:
    """Write float audio as 32-bit float WAV, atomically and byte-for-byte reproducibly.

    Not libsndfile: it adds a PEAK chunk holding the write time to float WAVs, so the same
    samples would hash differently on every run and defeat the content-addressed cache.
    """
    from scipy.io import wavfile

    with atomic_path(path) as tmp:
        wavfile.write(tmp, sample_rate, np.ascontiguousarray(audio, dtype=np.float32))
    return path


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    data, rate = sf.read(str(path), dtype="float32", always_2d=False)
    return data, rate


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temp path beside `final`; rename it into place only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=f".tmp{final.suffix}", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs are for the team to read
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def count_video_frames(path: Path) -> int:
    """Exact number of video packets (= frames for our constant-rate H.264 files)."""
    exe = ffprobe_exe()
    if exe is None:
        raise MediaError("ffprobe not found; install ffmpeg (apt-get install ffmpeg)")
    cmd = [
        exe,
        "-v",
        "error",
        "-select_streams",
        "v:0",
        "-count_packets",
        "-show_entries",
        "stream=nb_read_packets",
        "-of",
        "csv=p=0",
        str(path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise MediaError(f"{path}: cannot count frames")
    return int(proc.stdout.strip().split(",")[0])
