"""Rendered frames -> H.264 mp4 through one ffmpeg pipe, shared by every renderer.

Frames are written as they are made (one frame or a block at a time), so a segment's decoded frames are
never all in host memory; the file is encoded into a temp file beside the target and renamed into place
only when ffmpeg succeeds, so a failed render never replaces an earlier good one.
"""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import numpy as np

from engine.base import FPS, EngineSetupError
from engine.media import _raise_if_disk_full, atomic_path


class EncodeError(EngineSetupError):
    """ffmpeg could not encode the rendered frames (a build without libx264, a full disk, a frame size it refuses).

    An EngineSetupError, not a MediaError: the fault is this machine's encoder or disk, not the user's media, and
    it fails the same way on a retry; handlers of EngineSetupError (the renderers, `dubflow doctor`) still see it.
    """


class Mp4Writer:
    """uint8 RGB frames, (H, W, 3) or (n, H, W, 3) per `write`; ffmpeg starts with the first write (the
    picture size comes with it)."""

    def __init__(self, path: Path, ffmpeg: str, *, fps: int = FPS, crf: int = 17, preset: str = "medium"):
        self.path, self.ffmpeg, self.fps, self.crf, self.preset = Path(path), ffmpeg, fps, crf, preset
        self.proc: subprocess.Popen | None = None
        self.tmp: str | None = None
        self._atomic = contextlib.ExitStack()  # holds the temp file (atomic_path) once encoding starts

    def write(self, frames: np.ndarray) -> None:
        if self.proc is None:
            self._start(width=frames.shape[-2], height=frames.shape[-3])
        try:
            self.proc.stdin.write(np.ascontiguousarray(frames, dtype=np.uint8).tobytes())
        except BrokenPipeError:
            self._finish()  # raises with ffmpeg's own message

    def _start(self, width: int, height: int) -> None:
        self.tmp = str(self._atomic.enter_context(atomic_path(self.path)))  # renamed into place on success
        cmd = [
            self.ffmpeg, "-y", "-nostdin", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
            "-s", f"{width}x{height}", "-r", str(self.fps), "-i", "-", "-an",
            "-c:v", "libx264", "-preset", self.preset, "-crf", str(self.crf), "-pix_fmt", "yuv420p", self.tmp,
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stderr=subprocess.PIPE)

    def _finish(self) -> None:
        self.proc.stdin.close()
        error = self.proc.stderr.read().decode(errors="replace").strip()
        if self.proc.wait() != 0:
            _raise_if_disk_full(self.proc.returncode, error, str(self.path))  # an OSError naming the file
            raise EncodeError(
                f"ffmpeg failed to encode {self.path.name} ({self.proc.returncode}): {error[-500:]}"
            )

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self.proc is not None and exc_type is None:
                self._finish()
            elif self.proc is not None:
                self.proc.kill()
                self.proc.wait()
        except BaseException as error:  # the encode failed: the temp file goes, nothing is renamed
            self._atomic.__exit__(type(error), error, error.__traceback__)
            raise
        finally:
            if self.proc is not None:
                self.proc.stdin.close()
                self.proc.stderr.close()
        self._atomic.__exit__(exc_type, exc, tb)
