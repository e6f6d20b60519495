"""The preview renderer: a real CPU renderer that needs no weights.

It does not lip-sync. It draws the source picture with each person's box, highlights a
box while that person talks, shows a level meter per person and the line text when known,
and labels every frame as a preview, so a localisation team can check timing and binding
before any GPU time is spent. Same `Renderer` interface as the MultiTalk engine.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from engine.base import AUDIO_RATE, FPS, Box, JobError, ProgressHook, RenderJob, RenderResult
from engine.media import media_arg
from engine.video import Mp4Writer

SAMPLES_PER_FRAME = AUDIO_RATE // FPS  # 640
COLOURS = [(230, 80, 60), (60, 140, 230), (80, 190, 90), (220, 180, 40), (170, 90, 210), (40, 190, 190)]
TALK_DB = -45.0  # frame RMS above this counts as talking


class PreviewRenderer:
    name = "preview"

    def __init__(self, ffmpeg: str | None = None, **_: object):
        from engine.media import ffmpeg_exe  # media I/O helper; no Prefect

        self.ffmpeg = ffmpeg or ffmpeg_exe()

    def render(self, job: RenderJob, *, progress: ProgressHook | None = None) -> RenderResult:
        started = time.perf_counter()
        frames = job.resolved_num_frames()
        _check_job(job, frames)
        source = _SourceFrames(job, self.ffmpeg, frames)
        width, height = source.size
        levels = [_frame_levels(p.audio, frames) for p in job.persons]
        font = _font(max(12, height // 28))
        output = Path(job.output) if job.output else Path(tempfile.mkstemp(suffix=".mp4")[1])
        with Mp4Writer(output, self.ffmpeg, crf=20, preset="veryfast") as encoder:
            for f in range(frames):
                picture = _draw_frame(source.frame(f), job, f, levels, font, (width, height), source.scale)
                encoder.write(picture)
                if progress and (f % 25 == 0 or f == frames - 1):
                    progress("render", f + 1, frames)
        return RenderResult(
            output,
            frames,
            FPS,
            height,
            width,
            job.seed,
            timings={"total": time.perf_counter() - started},
            info={"engine": "preview"},
        )


def _check_job(job: RenderJob, frames: int) -> None:
    if frames < 1:
        raise JobError(
            f"num_frames={frames}: a clip needs at least one frame (give audio or num_frames >= 1)"
        )
    if not job.persons:
        raise JobError("persons=(): a render job needs at least one person")
    for i, p in enumerate(job.persons):
        audio = np.asarray(p.audio)
        if audio.ndim != 1 or not np.isfinite(audio).all():
            raise JobError(f"persons[{i}].audio must be 1-D finite float samples at {AUDIO_RATE} Hz")


def _frame_levels(audio: np.ndarray, frames: int) -> np.ndarray:
    """RMS level in dBFS of each 40 ms frame window; (frames,)."""
    padded = np.zeros(frames * SAMPLES_PER_FRAME, dtype=np.float32)
    n = min(len(audio), len(padded))
    padded[:n] = audio[:n]
    rms = np.sqrt(np.mean(padded.reshape(frames, SAMPLES_PER_FRAME) ** 2, axis=1))
    return 20 * np.log10(np.maximum(rms, 1e-6))


class _SourceFrames:
    """Frames of the source at the output size: one still, or the video decoded at 25 fps."""

    def __init__(self, job: RenderJob, ffmpeg: str, frames: int):
        if isinstance(job.source, np.ndarray):
            still = Image.fromarray(job.source.astype(np.uint8))
        elif Path(job.source).suffix.lower() in {".png", ".jpg", ".jpeg", ".webp", ".bmp"}:
            still = Image.open(job.source).convert("RGB")
        else:
            still = None
        src_w, src_h = still.size if still is not None else _video_size(ffmpeg, Path(job.source))
        height = job.size if src_h >= job.size else src_h - src_h % 2
        width = int(round(src_w * height / src_h / 2)) * 2
        self.size, self.scale = (width, height), height / src_h
        if still is not None:
            self._still = np.asarray(still.resize((width, height), Image.BILINEAR))
            self._video = None
        else:
            self._still = None
            self._video = _decode_video(
                ffmpeg, Path(job.source), job.source_start_frame, frames, width, height
            )

    def frame(self, f: int) -> np.ndarray:
        if self._still is not None:
            return self._still
        # past the end of a video source: hold its last frame
        return self._video[min(f, len(self._video) - 1)]


def _video_size(ffmpeg: str, path: Path) -> tuple[int, int]:
    from engine.media import probe

    info = probe(path)
    return info.width, info.height


def _decode_video(ffmpeg: str, path: Path, start: int, frames: int, width: int, height: int) -> np.ndarray:
    cmd = [
        ffmpeg,
        "-v",
        "error",
        "-nostdin",
        "-ss",
        f"{start / FPS:.3f}",
        "-i",
        media_arg(path),
        "-vf",
        f"fps={FPS},scale={width}:{height}",
        "-frames:v",
        str(frames),
        "-f",
        "rawvideo",
        "-pix_fmt",
        "rgb24",
        "-",
    ]
    raw = subprocess.run(cmd, capture_output=True, check=True).stdout
    video = np.frombuffer(raw, dtype=np.uint8).reshape(-1, height, width, 3)
    if len(video) == 0:
        raise JobError(f"source={path}: no frames at source_start_frame={start}")
    return video


def _box_at(box, f: int) -> Box | None:
    if box is None or isinstance(box, Box):
        return box
    current = None
    for start, b in box:  # timed boxes, sorted by start frame
        if start <= f:
            current = b
    return current


def _draw_frame(base: np.ndarray, job: RenderJob, f: int, levels, font, size, scale) -> np.ndarray:
    frame = base.copy()
    width, height = size
    talking = [levels[i][f] > TALK_DB for i in range(len(job.persons))]
    boxes = [_scaled(_box_at(p.box, f), scale, size) for p in job.persons]
    for i, box in enumerate(boxes):  # tint the talking person's box (numpy: cheap, no RGBA compositing)
        if box and talking[i]:
            x0, y0, x1, y1 = box
            region = frame[y0:y1, x0:x1].astype(np.float32)
            frame[y0:y1, x0:x1] = (region * 0.75 + np.array(COLOURS[i % len(COLOURS)]) * 0.25).astype(
                np.uint8
            )
    image = Image.fromarray(frame)
    draw = ImageDraw.Draw(image)
    for i, (person, box) in enumerate(zip(job.persons, boxes, strict=True)):
        colour = COLOURS[i % len(COLOURS)]
        if box:
            draw.rectangle(box, outline=colour, width=6 if talking[i] else 2)
            draw.text(
                (box[0] + 6, box[1] + 4),
                person.name or f"person {i + 1}",
                fill=colour,
                font=font,
                stroke_width=2,
                stroke_fill=(0, 0, 0),
            )
        _meter(draw, i, levels[i][f], colour, height)
    _caption(draw, job, f, width, height, font)
    draw.text(
        (10, 8),
        "PREVIEW - not lip-synced",
        fill=(255, 255, 255),
        font=font,
        stroke_width=2,
        stroke_fill=(0, 0, 0),
    )
    draw.text(
        (width - 10, 8),
        _timecode(job.source_start_frame + f),
        fill=(255, 255, 255),
        font=font,
        anchor="ra",
        stroke_width=2,
        stroke_fill=(0, 0, 0),
    )
    return np.asarray(image)


def _scaled(box: Box | None, scale: float, size) -> tuple[int, int, int, int] | None:
    if box is None:
        return None
    w, h = size
    x0, y0 = min(int(box.x0 * scale), w - 1), min(int(box.y0 * scale), h - 1)
    x1, y1 = min(int(box.x1 * scale), w), min(int(box.y1 * scale), h)
    return (x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))


def _meter(draw: ImageDraw.ImageDraw, i: int, level_db: float, colour, height: int) -> None:
    """A vertical level meter per person along the left edge: -60..0 dBFS."""
    x0, bar_h = 10 + i * 18, height // 3
    y1 = height - 60
    fill = int(bar_h * np.clip((level_db + 60) / 60, 0, 1))
    draw.rectangle((x0, y1 - bar_h, x0 + 12, y1), outline=(255, 255, 255), width=1)
    if fill:
        draw.rectangle((x0 + 2, y1 - fill, x0 + 10, y1 - 1), fill=colour)


def _caption(draw: ImageDraw.ImageDraw, job: RenderJob, f: int, width: int, height: int, font) -> None:
    for cap in job.captions:
        if cap.start_frame <= f < cap.end_frame:
            colour = COLOURS[cap.person % len(COLOURS)]
            draw.text(
                (width // 2, height - 16),
                cap.text,
                fill=colour,
                font=font,
                anchor="md",
                stroke_width=3,
                stroke_fill=(0, 0, 0),
            )
            return


def _timecode(frame: int) -> str:
    seconds, ff = divmod(frame, FPS)
    minutes, ss = divmod(seconds, 60)
    return f"{minutes:02d}:{ss:02d}:{ff:02d}"


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()
