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


def _picture(tmp_path, frames: int = 20, size=(64, 48)):
    from tests.footage_fixtures import write_moving_video

    return write_moving_video(tmp_path / "picture.mp4", [i / 25 for i in range(frames)], size)


def test_interpolation_to_50_fps_doubles_the_frames_over_the_same_span(tmp_path):
    from tasks.enhance import EnhanceOptions

    ws = Workspace(tmp_path / "ws")
    blob = ws.put_file(_picture(tmp_path), move=False)
    out = VideoFrames(ws.path(enhance_picture(ws, blob, EnhanceOptions("ffmpeg", fps=50))))
    assert out.count == 40
    np.testing.assert_allclose(out.times, np.arange(40) / 50, atol=1e-3)  # constant 50 fps


def test_scaling_to_the_source_size_and_deflicker(tmp_path):
    """A flickering picture rendered small goes out at the source's size, with the flicker evened out."""
    from engine.media import write_timed_video
    from tasks.enhance import EnhanceOptions

    base = np.full((48, 64, 3), 120, np.uint8)
    flicker = [
        (i, np.clip(base.astype(int) + (18 if i % 2 else -18), 0, 255).astype(np.uint8)) for i in range(20)
    ]
    write_timed_video(tmp_path / "flicker.mp4", flicker, Fraction(1, 25), crf=4)
    ws = Workspace(tmp_path / "ws")
    blob = ws.put_file(tmp_path / "flicker.mp4", move=False)
    options = EnhanceOptions("ffmpeg", denoise=False, sharpen=False, deflicker=True, size=(128, 96))
    out = VideoFrames(ws.path(enhance_picture(ws, blob, options)))
    assert (out.width, out.height, out.count) == (128, 96, 20)
    means = [float(frame.mean()) for _, frame in out.iter_frames()]
    assert np.std(means[5:]) < 0.5 * np.std([float(f.mean()) for _, f in flicker][5:])


def test_an_unknown_backend_is_refused(tmp_path):
    with pytest.raises(ValueError, match="enhance backend 'magic' is unknown; use one of: none, ffmpeg"):
        enhance_picture(Workspace(tmp_path / "ws"), None, "magic")
