"""The media layer, at the bottom of the stack: the ffmpeg binary, probing, decoding audio and
video, writing files atomically. Used by engine/ and tasks/ alike; imports nothing from either.

Everything that touches ffmpeg goes through here so that the binary is resolved once
(`$FFMPEG_BINARY` -> `ffmpeg` on PATH -> the imageio-ffmpeg wheel's copy) and every
failure becomes a one-line `MediaError` naming the file. Video frames are read through
PyAV with their own timestamps (`VideoFrames`), so any frame rate, VFR included, maps onto
the engines' 25 fps grid exactly.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}
FPS = 25  # the engines' frame rate (engine.base.FPS; repeated here so the bottom layer imports nothing)


class MediaError(ValueError):
    """A media file is missing, unreadable, or not what it should be."""


@cache
def ffmpeg_exe() -> str:
    named = os.environ.get("FFMPEG_BINARY")
    if named:
        found = shutil.which(named)
        if found is None:
            raise MediaError(f"$FFMPEG_BINARY={named!r} is not an executable; fix it or unset it")
        return found
    found = shutil.which("ffmpeg")
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


def media_arg(path: Path | str) -> str:
    """A file path as ffmpeg/ffprobe must see it: absolute, so that a file named `-version` is not read
    as an option, nor `pipe:0` or `http://...` as a protocol."""
    return os.path.abspath(path)


# a full disk, a file-size limit (RLIMIT_FSIZE) or a quota: the same remedy (free space), whoever writes
DISK_FULL = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


@contextmanager
def naming_full_disk(path: Path) -> Iterator[None]:
    """A write that fails for a full disk names `path` (the output), not a temp file or nothing (PyAV's
    errors name the temp file it was encoding into)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc


def run_ffmpeg(args: list[str], *, what: str) -> bytes:
    """Run ffmpeg quietly; on failure raise MediaError with the last line ffmpeg printed."""
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        last = (proc.stderr.decode(errors="replace").strip().splitlines() or ["unknown error"])[-1]
        _raise_if_disk_full(proc.returncode, last, args[-1])
        raise MediaError(f"{what}: ffmpeg failed: {last}")
    return proc.stdout


def _raise_if_disk_full(returncode: int, message: str, output: str) -> None:
    """ffmpeg stopped by a full disk or the file-size limit (SIGXFSZ) is a disk fault, not a media one:
    an OSError naming the file, which the flow reports with its stage (tasks.workspace.DiskFull)."""
    if returncode == -signal.SIGXFSZ:
        raise OSError(errno.EFBIG, "File too large (the file-size limit)", output)
    if "No space left on device" in message:
        raise OSError(errno.ENOSPC, "No space left on device", output)


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
    if not path.is_file():  # a FIFO would block ffprobe for ever, /dev/zero would feed it for ever
        raise MediaError(f"{path}: not a regular file (a pipe or a device); give a media file")
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
    cmd = [exe, "-v", "error", "-show_streams", "-show_format", "-of", "json", "-i", media_arg(path)]
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        raise MediaError(f"{path}: not a readable media file")
    try:
        data = json.loads(proc.stdout or b"{}")
    except json.JSONDecodeError:
        raise MediaError(f"{path}: ffprobe gave no description of it; not a readable media file") from None
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
        ["-i", media_arg(path), "-vn", "-ac", "1", "-ar", str(sample_rate), "-f", "f32le", "-"],
        what=str(path),
    )
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


def read_whole_audio(path: Path, sample_rate: int) -> np.ndarray:
    """`read_audio`, refusing a file that decodes shorter than it declares (a truncated WAV or mp4 would
    otherwise become silence for the rest of the episode)."""
    path = Path(path)
    check_wav_complete(path)
    audio = read_audio(path, sample_rate)
    declared = probe(path).duration
    decoded = len(audio) / sample_rate
    if declared - decoded > TRUNCATION_TOLERANCE_S:
        raise MediaError(
            f"{path}: declares {declared:.2f} s but only {decoded:.2f} s decode; the file is truncated,"
            " re-export or re-copy it"
        )
    return audio


TRUNCATION_TOLERANCE_S = 0.1  # codec priming and a last partial packet stay well under this


def check_wav_complete(path: Path) -> None:
    """A RIFF/WAVE file whose data chunk claims more bytes than the file holds is truncated (decoders
    stop at the end of the file and say nothing). Other formats pass; `read_whole_audio` checks them."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return
        size, rate, align = path.stat().st_size, 0, 0
        while len(chunk := f.read(8)) == 8:
            name, length = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if name == b"fmt ":
                fmt = f.read(length)
                rate, align = struct.unpack("<I", fmt[4:8])[0], struct.unpack("<H", fmt[12:14])[0]
                length = 0
            elif name == b"data":
                held = size - f.tell()
                if length != 0xFFFFFFFF and length > held and rate and align:
                    raise MediaError(
                        f"{path}: the WAV header declares {length / align / rate:.2f} s of audio but the"
                        f" file holds {held / align / rate:.2f} s; it is truncated, re-export or re-copy it"
                    )
                return
            f.seek(length + (length & 1), os.SEEK_CUR)


def write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> Path:
    """Write (samples,) or (channels, samples) float audio as 32-bit float WAV, atomically and byte-for-byte
    reproducibly (FloatWavWriter: no libsndfile PEAK chunk holding the write time, which would make the same
    samples hash differently on every run and defeat the content-addressed cache)."""
    audio = np.asarray(audio)
    with FloatWavWriter(path, sample_rate, audio.shape[0] if audio.ndim == 2 else 1) as out:
        out.write(audio)
    return Path(path)


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    data, rate = sf.read(str(path), dtype="float32", always_2d=False)
    return data, rate


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temp path beside `final`; rename it into place only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(
        prefix=f".{final.stem}.{owner_tag()}", suffix=f".tmp{final.suffix}", dir=final.parent
    )
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs are for the team to read
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def host_name() -> str:
    """This host's name in leases, temp files and worker names ($DUBFLOW_HOST where hosts share a hostname,
    e.g. containers, or the network namespaces of tests/test_farm_netns.py)."""
    return os.environ.get("DUBFLOW_HOST") or socket.gethostname()


def owner_tag() -> str:
    """Marks a temp file or folder with the process that writes it (`pid123~host~`): once that process is
    gone (killed with -9), the next run knows the file for scratch and removes it (Workspace.sweep)."""
    return f"pid{os.getpid()}~{host_name()}~"


def owner_is_gone(name: str) -> bool:
    """Whether a name carries the owner tag of a process of this host that no longer runs."""
    found = re.search(r"pid(\d+)~([^~/]+)~", name)
    if found is None or found[2] != host_name():
        return False  # not ours to judge: another host's process may be writing it
    try:
        os.kill(int(found[1]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


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
        "-i",
        media_arg(path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise MediaError(f"{path}: cannot count frames")
    return int(proc.stdout.strip().split(",")[0])


def is_still(source: Path | np.ndarray) -> bool:
    """A picture rather than a video: an array, or a file with an image suffix."""
    return isinstance(source, np.ndarray) or Path(source).suffix.lower() in IMAGE_SUFFIXES


def video_size(path: Path) -> tuple[int, int]:
    """(width, height) of a video or still."""
    info = probe(path)
    if info.kind == "audio":
        raise MediaError(f"{path}: has no picture")
    return info.width, info.height


def read_frames(path: Path, width: int, *, colour: bool = False) -> Iterator[np.ndarray]:
    """Frames resampled by ffmpeg to the 25 fps grid and scaled to `width` (even height), for analysis
    (shot cuts, faces, mouth motion): (H, W) gray or (H, W, 3) RGB uint8."""
    source_w, source_h = video_size(path)
    height = max(2, round(source_h * width / source_w / 2) * 2)
    pix_fmt, channels = ("rgb24", 3) if colour else ("gray", 1)
    command = [
        ffmpeg_exe(),
        "-v",
        "error",
        "-nostdin",
        "-i",
        media_arg(path),
        "-vf",
        f"fps={FPS},scale={width}:{height}",
    ]
    command += ["-f", "rawvideo", "-pix_fmt", pix_fmt, "-"]
    size = width * height * channels
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        while len(raw := process.stdout.read(size)) == size:  # type: ignore[union-attr]  (stdout=PIPE)
            frame = np.frombuffer(raw, np.uint8)
            yield frame.reshape(height, width, 3) if colour else frame.reshape(height, width)
    finally:  # the reader may stop early (a contact sheet needs a few frames): end ffmpeg, not just the pipe
        process.kill()
        process.wait()


# the broadcast and cinema frame rates a variable-rate video is conformed to (VideoFrames.nominal_rate)
STANDARD_RATES = tuple(
    Fraction(n, d)
    for n, d in ((24000, 1001), (24, 1), (25, 1), (30000, 1001), (30, 1), (50, 1), (60000, 1001), (60, 1))
)


class VideoFrames:
    """A video's own frames with their exact timestamps, and the map between them and the 25 fps grid.

    Any frame rate works, variable included: frame `i` of the 25 fps grid is the source frame whose
    presentation time is nearest `i / 25` s after the first frame's. Frames decode at source resolution,
    in order, through PyAV; nothing holds more than the frames asked for.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        av = _import_av()
        try:
            with av.open(str(self.path)) as container:
                stream = container.streams.video[0]
                self.width, self.height = stream.codec_context.width, stream.codec_context.height
                self.time_base = stream.time_base
                self.declared_rate = stream.base_rate  # the header's rate (r_frame_rate); None when absent
                declared = stream.frames  # the container's index (mp4: the moov atom); 0 where it has none
                pts = sorted(p.pts for p in container.demux(stream) if p.pts is not None and p.size)
        except (av.error.FFmpegError, IndexError) as exc:  # type: ignore[attr-defined]
            raise MediaError(f"{self.path}: not a readable video ({exc})") from None
        if not pts:
            raise MediaError(f"{self.path}: the video has no frames")
        if declared and len(pts) < declared:  # an mp4 cut after its moov: the index outlives the data
            raise MediaError(
                f"{self.path}: the container lists {declared} frames but only {len(pts)} are in the file;"
                " it is truncated, re-export or re-copy it"
            )
        self.pts = np.asarray(pts, dtype=np.int64)  # source frames in presentation order
        self.times = (self.pts - self.pts[0]) * float(self.time_base)  # seconds from the first frame

    @property
    def count(self) -> int:
        return len(self.pts)

    @property
    def duration(self) -> float:
        """Seconds from the first frame's start to the last frame's end (its duration: the median gap)."""
        gaps = np.diff(self.times)
        return float(self.times[-1] + (np.median(gaps) if len(gaps) else 1 / FPS))

    @property
    def num_frames25(self) -> int:
        return max(1, int(round(self.duration * FPS)))

    @property
    def is_constant_rate(self) -> bool:
        """Every frame the same time after the one before, within the rounding of a millisecond clock (a
        30 fps WebM alternates 33 and 34 ms) and one tick of the time base."""
        gaps = np.diff(self.pts)
        return len(gaps) == 0 or float((gaps.max() - gaps.min()) * self.time_base) <= 0.001 + float(
            self.time_base
        )

    @property
    def nominal_rate(self) -> Fraction:
        """The rate a variable-rate video is meant to play at: its header's, when that is a standard rate not
        far above the average (a rate read off the shortest gap is not), else the standard rate nearest the
        average. A constant-rate video's own rate."""
        average = (self.count - 1) / float(self.times[-1]) if self.count > 1 else float(FPS)
        declared = Fraction(self.declared_rate) if self.declared_rate else None
        if declared in STANDARD_RATES and declared <= 1.5 * average:
            return declared
        if self.is_constant_rate and self.count > 1:
            return Fraction(average).limit_denominator(1001)
        return min(STANDARD_RATES, key=lambda rate: abs(float(rate) - average))

    def source_index(self, frame25: int | np.ndarray) -> np.ndarray | int:
        """The source frame nearest in time to 25 fps frame(s) `frame25` (clamped to the video)."""
        return self.nearest_index(np.asarray(frame25, dtype=np.float64) / FPS)

    def nearest_index(self, seconds: float | np.ndarray) -> np.ndarray | int:
        """The source frame nearest in time to `seconds` after the first frame (clamped to the video)."""
        t = np.asarray(seconds, dtype=np.float64)
        if self.count == 1:
            return 0 if np.ndim(t) == 0 else np.zeros(np.shape(t), np.int64)
        right = np.clip(np.searchsorted(self.times, t), 1, self.count - 1)
        left = right - 1
        nearest = np.where(np.abs(self.times[left] - t) <= np.abs(self.times[right] - t), left, right)
        return int(nearest) if np.ndim(nearest) == 0 else nearest

    def grid25(self, index: int | np.ndarray) -> np.ndarray | int:
        """The 25 fps frame nearest in time to source frame(s) `index`: the inverse map, for paste-back."""
        nearest = np.rint(self.times[np.asarray(index)] * FPS).astype(np.int64)
        return int(nearest) if nearest.ndim == 0 else nearest

    def iter_frames(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(source index, (H, W, 3) uint8) for source frames start..stop-1, in presentation order."""
        for i, frame in self.iter_decoded(start, stop):
            yield i, frame.to_ndarray(format="rgb24")

    def iter_decoded(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, Any]]:
        """(source index, PyAV frame in the file's own pixel format): for a re-timing that must not pass
        through RGB (each RGB round trip resamples the chroma)."""
        stop = self.count if stop is None else min(stop, self.count)
        if start >= stop:
            return
        av = _import_av()
        index_of = {int(p): i for i, p in enumerate(self.pts)}
        with av.open(str(self.path)) as container:
            stream = container.streams.video[0]
            if start > 0:
                container.seek(int(self.pts[start]), stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                i = index_of.get(frame.pts, -1)
                if i < start:
                    continue
                if i >= stop:
                    break
                yield i, frame

    def frames25(self, frames25: list[int] | np.ndarray) -> np.ndarray:
        """(n, H, W, 3) uint8: the source frames shown at 25 fps frames `frames25` (repeats allowed)."""
        wanted = np.atleast_1d(self.source_index(np.asarray(frames25)))
        if len(wanted) == 0:
            return np.zeros((0, self.height, self.width, 3), np.uint8)
        keep = set(wanted.tolist())  # only these are held: a segment's span may be long, its references few
        got = {i: f for i, f in self.iter_frames(int(wanted.min()), int(wanted.max()) + 1) if i in keep}
        missing = sorted(set(wanted.tolist()) - set(got))
        if missing:
            raise MediaError(f"{self.path}: frames {missing[:5]} could not be decoded")
        return np.stack([got[int(i)] for i in wanted])


def stream_starts(path: Path) -> dict[str, float]:
    """Presentation time of the first picture and the first sound in a file, in seconds ({"video": ..,
    "audio": ..}): their difference is the file's A/V offset (edit lists applied, AAC priming skipped)."""
    av = _import_av()
    starts = {}
    with av.open(str(path)) as container:
        for kind in ("video", "audio"):
            streams = getattr(container.streams, kind)
            if streams and streams[0].start_time is not None:
                starts[kind] = float(streams[0].start_time * streams[0].time_base)
    return starts


def write_timed_video(
    path: Path,
    frames: Iterable[tuple[int, np.ndarray]],
    time_base: Fraction,
    *,
    rate: float = FPS,
    crf: int = 17,
    preset: str = "medium",
) -> int:
    """(pts, (H, W, 3) uint8 RGB, or a decoded PyAV frame) pairs -> H.264 mp4 in which every frame keeps its
    own timestamp (pts in `time_base`), so a variable-rate source stays variable-rate. Streamed: one frame in
    memory at a time, encoded into a temp file beside `path` and renamed into place only on success. `rate`
    is the average frame rate, a hint for the encoder's rate control. Returns the number of frames written."""
    av = _import_av()
    count = 0
    with naming_full_disk(path), atomic_path(path) as tmp, av.open(str(tmp), "w", format="mp4") as out:
        stream = None
        for pts, picture in frames:
            decoded = not isinstance(picture, np.ndarray)
            width, height = (
                (picture.width, picture.height) if decoded else (picture.shape[1], picture.shape[0])
            )
            if stream is None:
                stream = _h264_stream(out, width, height, time_base, rate, crf, preset)
            if decoded:  # kept in its pixel format when the encoder's is the same: no chroma resampling
                frame = (
                    picture
                    if picture.format.name == stream.pix_fmt
                    else picture.reformat(format=stream.pix_fmt)
                )
            else:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(picture, np.uint8), format="rgb24")
            frame.pts, frame.time_base = int(pts), time_base
            out.mux(stream.encode(frame))
            count += 1
        if stream is None:
            raise MediaError(f"{path}: no frames to encode")
        out.mux(stream.encode())  # flush the encoder's delayed frames
    return count


def _h264_stream(out, width: int, height: int, time_base: Fraction, rate: float, crf: int, preset: str):
    stream = out.add_stream("libx264", rate=Fraction(rate).limit_denominator(1001))
    stream.width, stream.height = width, height
    # 4:2:0 needs even sides; an odd-sized source keeps its size in 4:4:4 rather than losing a pixel row
    stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
    stream.time_base = stream.codec_context.time_base = time_base
    stream.options = {"crf": str(crf), "preset": preset}
    return stream


def _import_av():
    try:
        import av
    except ImportError:
        raise MediaError("video decoding needs PyAV: pip install av") from None
    return av


# ---------------------------------------------------------------------------------------------- audio files


@contextmanager
def open_audio(path: Path) -> Iterator[sf.SoundFile]:
    """Open any audio file for block reads; what libsndfile cannot read is decoded by ffmpeg first."""
    path = Path(path)
    if not path.is_file():
        raise MediaError(f"{path}: audio file not found")
    if path.stat().st_size == 0:
        raise MediaError(f"{path}: audio file is empty (0 bytes); re-export it")
    try:
        handle = sf.SoundFile(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError):
        with (
            tempfile.TemporaryDirectory() as tmp,
            sf.SoundFile(str(_decode_with_ffmpeg(path, Path(tmp)))) as f,
        ):
            yield _check_opened(f, path)
        return
    with handle:
        yield _check_opened(handle, path)


def _check_opened(handle: sf.SoundFile, path: Path) -> sf.SoundFile:
    if handle.frames == 0:
        raise MediaError(f"{path}: audio file has no samples; re-export it")
    return handle


def read_block(handle: sf.SoundFile, start: int, end: int, path: Path) -> np.ndarray:
    """Samples [start, end) as float32 (channels, n)."""
    handle.seek(start)
    block = handle.read(end - start, dtype="float32", always_2d=True).T
    if not np.all(np.isfinite(block)):
        raise MediaError(f"{path}: audio contains NaN/inf samples; re-export it")
    return np.ascontiguousarray(block)


def read_channels(path: Path) -> tuple[np.ndarray, int]:
    """Read any audio file as float32 (channels, samples); ffmpeg decodes what soundfile cannot."""
    with open_audio(path) as handle:
        return read_block(handle, 0, handle.frames, Path(path)), int(handle.samplerate)


def _decode_with_ffmpeg(path: Path, tmp: Path) -> Path:
    try:
        exe = ffmpeg_exe()
    except MediaError:
        raise MediaError(
            f"{path}: cannot decode this format without ffmpeg; install ffmpeg or convert to WAV"
        ) from None
    wav = tmp / "decoded.wav"
    cmd = [exe, "-nostdin", "-v", "error", "-i", media_arg(path), "-vn", "-c:a", "pcm_f32le", media_arg(wav)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not wav.is_file():
        first = (done.stderr.strip().splitlines() or ["unknown format"])[-1]
        raise MediaError(f"{path}: not a readable audio file ({first}); re-export it as WAV")
    return wav


class FloatWavWriter:
    """32-bit float WAV written block by block to a temp file, renamed into place on success.

    The header is ours, not libsndfile's: libsndfile adds a PEAK chunk with a timestamp to float WAVs,
    so the same samples would not give the same bytes."""

    def __init__(self, path: Path, rate: int, channels: int):
        self.path, self.rate, self.channels, self.frames = Path(path), rate, channels, 0
        self._atomic = atomic_path(self.path)  # the temp file beside `path`, renamed into place on success
        self.tmp = self._atomic.__enter__()
        self.file = open(self.tmp, "wb")  # noqa: SIM115 - closed in __exit__
        self.file.write(self._header())

    def _header(self) -> bytes:
        data = self.frames * self.channels * 4
        fmt = struct.pack(
            "<HHIIHH", 3, self.channels, self.rate, self.rate * self.channels * 4, self.channels * 4, 32
        )
        return (
            b"RIFF"
            + struct.pack("<I", 36 + data)
            + b"WAVEfmt "
            + struct.pack("<I", 16)
            + fmt
            + b"data"
            + struct.pack("<I", data)
        )

    def write(self, block: np.ndarray) -> None:
        """block: (channels, n) or (n,) float."""
        frames = block.T if block.ndim == 2 else block[:, None]
        try:
            self.file.write(np.ascontiguousarray(frames, dtype="<f4").tobytes())
        except OSError as exc:  # a full disk: name the file being written, not only the errno
            raise OSError(exc.errno, exc.strerror, str(self.path)) from exc
        self.frames += frames.shape[0]

    def __enter__(self) -> FloatWavWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.file.seek(0)
            self.file.write(self._header())
        self.file.close()
        self._atomic.__exit__(exc_type, exc, tb)
