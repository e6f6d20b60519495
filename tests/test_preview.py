"""The preview renderer: exact frame count, size, highlighting of the talking person."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from PIL import Image

from engine.base import Box, Caption, JobError, PersonInput, Renderer, RenderJob, create_renderer
from engine.preview import COLOURS, PreviewRenderer


def _frames(path, width, height) -> np.ndarray:
    raw = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        capture_output=True,
        check=True,
    ).stdout
    return np.frombuffer(raw, dtype=np.uint8).reshape(-1, height, width, 3)


def test_preview_renders_exact_frames_and_tints_the_talking_box(tmp_path):
    picture = np.full((120, 160, 3), 128, dtype=np.uint8)
    talking = np.zeros(16000, dtype=np.float32)
    talking[:8000] = 0.3 * np.sin(np.arange(8000) * 0.2)  # first half second only
    job = RenderJob(
        source=picture,
        num_frames=21,
        size=120,
        output=tmp_path / "clip.mp4",
        persons=(
            PersonInput(talking, Box(10, 10, 70, 110), "ana"),
            PersonInput(np.zeros(16000, dtype=np.float32), Box(90, 10, 150, 110), "ben"),
        ),
        captions=(Caption(0, 10, "hello", 0),),
    )
    result = create_renderer("preview").render(job)
    assert isinstance(create_renderer("preview"), Renderer)
    assert (result.num_frames, result.width, result.height) == (21, 160, 120)
    video = _frames(result.path, 160, 120)
    assert len(video) == 21
    inside_ana = video[:, 40:80, 25:55].astype(int)  # well inside ana's box, away from labels
    red_shift = inside_ana[..., 0].mean(axis=(1, 2)) - inside_ana[..., 2].mean(axis=(1, 2))
    assert red_shift[2] > 10 and abs(red_shift[18]) < 5  # tinted while she talks (frames 0-12), not after
    assert COLOURS[0][0] > COLOURS[0][2]


def test_preview_reads_a_still_from_disk_and_keeps_aspect(tmp_path):
    Image.new("RGB", (640, 360), "navy").save(tmp_path / "s.png")
    job = RenderJob(
        source=tmp_path / "s.png",
        persons=(PersonInput(np.zeros(3200, dtype=np.float32)),),
        size=180,
        output=tmp_path / "o.mp4",
    )
    result = PreviewRenderer().render(job)
    assert (result.num_frames, result.width, result.height) == (5, 320, 180)


@pytest.mark.parametrize(
    "audio", [np.full(1600, np.nan, dtype=np.float32), np.zeros((2, 100), dtype=np.float32)]
)
def test_preview_refuses_bad_audio(tmp_path, audio):
    job = RenderJob(
        source=np.zeros((64, 64, 3), np.uint8),
        persons=(PersonInput(audio),),
        num_frames=3,
        output=tmp_path / "x.mp4",
    )
    with pytest.raises(JobError, match="finite"):
        PreviewRenderer().render(job)
    assert not (tmp_path / "x.mp4").exists()
