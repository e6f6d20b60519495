"""enhance: the ffmpeg clean-up keeps every frame, its time and the picture size, odd sizes included."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from engine.media import VideoFrames, write_timed_video
from tasks.enhance import enhance_picture
from tasks.workspace import Workspace


@pytest.mark.parametrize("size", [(64, 48), (65, 33)], ids=["even", "odd"])
def test_ffmpeg_enhance_keeps_frames_times_and_size(tmp_path, size):
    width, height = size
    times_ms = [0, 30, 70, 100, 180, 200, 260]  # variable rate
    rng = np.random.default_rng(0)
    frames = [(t, rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for t in times_ms]
    source = tmp_path / "picture.mp4"
    write_timed_video(source, frames, Fraction(1, 1000))
    ws = Workspace(tmp_path / "ws")
    out = VideoFrames(ws.path(enhance_picture(ws, ws.put_file(source, move=False), "ffmpeg")))
    assert (out.width, out.height, out.count) == (width, height, len(times_ms))
    np.testing.assert_allclose(out.times, np.asarray(times_ms) / 1000, atol=1e-3)
