"""The media layer's video reader: every frame with its own timestamp, mapped exactly onto 25 fps."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from engine.media import MediaError, VideoFrames, write_timed_video

FOOTAGE = Path(__file__).resolve().parents[2] / "shared" / "data" / "footage-dev"


def write_coded_video(path: Path, times_s: list[float], size=(64, 48)) -> Path:
    """Frame i is a flat grey of level 8*i (decoded back within a few levels), shown at times_s[i]."""
    width, height = size
    frames = ((round(t * 1000), np.full((height, width, 3), 8 * i, np.uint8)) for i, t in enumerate(times_s))
    write_timed_video(path, frames, Fraction(1, 1000), crf=0)
    return path


def level(frame: np.ndarray) -> int:
    return int(round(frame.mean() / 8))


def test_a_constant_30_fps_video_maps_to_the_nearest_frame_in_time(tmp_path):
    video = VideoFrames(write_coded_video(tmp_path / "c30.mp4", [i / 30 for i in range(20)]))
    assert video.count == 20 and (video.width, video.height) == (64, 48)
    np.testing.assert_allclose(video.times, np.arange(20) / 30, atol=1e-3)
    expected = [int(np.argmin(np.abs(np.arange(20) / 30 - f / 25))) for f in range(17)]
    assert list(video.source_index(np.arange(17))) == expected
    assert [level(f) for f in video.frames25(range(17))] == expected
    assert video.num_frames25 == round(20 / 30 * 25)


def test_a_variable_rate_video_keeps_each_frames_own_time(tmp_path):
    times = [0.0, 0.03, 0.05, 0.2, 0.21, 0.4, 0.41, 0.42, 0.6, 0.9]
    video = VideoFrames(write_coded_video(tmp_path / "vfr.mp4", times))
    np.testing.assert_allclose(video.times, times, atol=1e-3)
    grid = np.arange(24)
    expected = [int(np.argmin(np.abs(np.asarray(times) - f / 25))) for f in grid]
    assert list(video.source_index(grid)) == expected
    assert [level(f) for f in video.frames25(grid)] == expected  # repeats and skips, in order
    assert list(video.grid25(np.arange(10))) == [round(t * 25) for t in times]


def test_reading_from_the_middle_seeks_and_returns_only_what_was_asked(tmp_path):
    video = VideoFrames(write_coded_video(tmp_path / "long.mp4", [i / 25 for i in range(30)]))
    frames = video.frames25([27, 12, 27])
    assert [level(f) for f in frames] == [27, 12, 27]
    assert [i for i, _ in video.iter_frames(25)] == [25, 26, 27, 28, 29]


def test_not_a_video_is_a_media_error(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(MediaError, match="bad.mp4"):
        VideoFrames(bad)


@pytest.mark.skipif(not FOOTAGE.is_dir(), reason="footage-dev data set not beside the checkout")
def test_the_variable_rate_footage_sample_is_read_whole():
    video = VideoFrames(FOOTAGE / "vrt_face1.mp4")  # VFR: header 30 fps, 135 frames in 6.1 s
    assert video.count == 135 and (video.width, video.height) == (700, 700)
    gaps = np.diff(video.times)
    assert gaps.min() < 0.04 < gaps.max()  # really variable
    assert video.frames25([0, 75, 150]).shape == (3, 700, 700, 3)


def test_the_timed_encoder_keeps_every_frames_own_timestamp(tmp_path):
    from engine.media import write_timed_video

    times = [0.0, 0.03, 0.05, 0.2, 0.21, 0.4, 0.41, 0.42, 0.6, 0.9]  # variable rate
    frames = ((round(t * 1000), np.full((48, 64, 3), 8 * i, np.uint8)) for i, t in enumerate(times))
    out = tmp_path / "timed.mp4"
    assert write_timed_video(out, frames, Fraction(1, 1000), crf=0) == len(times)
    video = VideoFrames(out)
    np.testing.assert_allclose(video.times, times, atol=1e-3)
    assert [level(f) for _, f in video.iter_frames()] == list(range(len(times)))
    assert not list(tmp_path.glob(".*"))  # no temp file left beside it


def test_a_failed_timed_encode_leaves_nothing(tmp_path):
    from engine.media import write_timed_video

    def broken():
        yield 0, np.zeros((48, 64, 3), np.uint8)
        raise RuntimeError("renderer died")

    with pytest.raises(RuntimeError, match="died"):
        write_timed_video(tmp_path / "x.mp4", broken(), Fraction(1, 1000))
    assert list(tmp_path.iterdir()) == []
