"""Tiny end-to-end renders on CPU: frame counts and sizes, the mp4, progress, job validation, import hygiene."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.base import Box, EngineSetupError, JobError, PersonInput, Renderer, create_renderer
from engine.media import ffmpeg_exe
from engine.multitalk.renderer import MultiTalkRenderer, write_mp4
from tests.conftest_multitalk import (
    LEFT,
    RIGHT,
    noise,
    one_person_job,
    shared_pipeline,
    tone,
    two_person_job,
)

pytestmark = pytest.mark.one_torch_thread  # tiny tensors: one thread is faster


@pytest.fixture
def renderer():
    r = MultiTalkRenderer(tiny=True)
    r._pipeline = shared_pipeline()  # reuse the session's tiny models
    return r


def _decoded_frames(path, width, height) -> np.ndarray:
    cmd = [ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    raw = subprocess.run(cmd, capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)


@pytest.mark.parametrize(("job_factory", "num_frames"), [(one_person_job, 5), (two_person_job, 9)])
def test_tiny_render_has_exact_frames_of_the_bucket_size(job_factory, num_frames):
    out = shared_pipeline().render(job_factory(num_frames=num_frames))
    assert tuple(out.frames.shape) == (num_frames, 64, 128, 3)
    assert str(out.frames.dtype) == "torch.uint8"
    assert out.info["crop"] == (0, 0, 128, 64)
    assert set(out.timings) == {"audio", "encode", "denoise", "decode"}


def test_renderer_writes_the_mp4_atomically(renderer, tmp_path):
    target = tmp_path / "out dir é" / "clip.mp4"
    result = renderer.render(two_person_job(num_frames=9, output=target))
    assert result.path == target and target.is_file()
    assert [p.name for p in target.parent.iterdir()] == ["clip.mp4"]  # no temp file left behind
    frames = _decoded_frames(target, 128, 64)
    assert frames.shape == (9, 64, 128, 3)
    assert (result.num_frames, result.fps, result.height, result.width) == (9, 25, 64, 128)
    assert isinstance(renderer, Renderer) and renderer.name == "multitalk"


def test_long_jobs_stream_in_chunks_with_exact_length(renderer):
    job = two_person_job(
        num_frames=23, persons=(PersonInput(tone(1.0), LEFT), PersonInput(noise(1.0), RIGHT))
    )
    result = renderer.render(job)
    assert result.num_frames == 23 and result.info["chunks"] == 5  # F = 9, M = 5: 1 + ceil(14 / 4)
    assert result.info["frames"].shape == (23, 64, 128, 3)
    assert result.info["framing"] == {"height": 64, "width": 128, "scale": 1.0, "left": 0, "top": 0}


def test_long_jobs_stream_every_chunk_into_one_mp4_and_write_the_state(renderer, tmp_path, monkeypatch):
    target, state_path = tmp_path / "long.mp4", tmp_path / "long.state"
    job = two_person_job(
        num_frames=23, output=target, state_output=state_path,
        persons=(PersonInput(tone(1.0), LEFT), PersonInput(noise(1.0), RIGHT)),
    )  # fmt: skip
    writes = []
    real_write = renderer.pipeline.render

    def spy(job, progress=None, sink=None):
        return real_write(job, progress=progress, sink=lambda f: (writes.append(len(f)), sink(f)))

    monkeypatch.setattr(renderer.pipeline, "render", spy)
    result = renderer.render(job)
    assert writes == [9, 4, 4, 4, 2]  # chunk by chunk, never the whole segment at once
    assert result.num_frames == 23 and "frames" not in result.info
    assert _decoded_frames(target, 128, 64).shape == (23, 64, 128, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["long.mp4", "long.state"]  # no temp files
    from engine.multitalk.streaming import StreamState

    state = StreamState.load(state_path)
    assert (state.frames_done, state.chunks_done, tuple(state.frames.shape)) == (23, 5, (3, 5, 64, 128))


def test_a_failed_render_leaves_no_partial_mp4(renderer, tmp_path, monkeypatch):
    target = tmp_path / "clip.mp4"
    target.write_bytes(b"an earlier good render")
    real = renderer.pipeline._decode
    calls = []

    def fail_on_second_chunk(*args):
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("CUDA error: an illegal memory access")
        return real(*args)

    monkeypatch.setattr(renderer.pipeline, "_decode", fail_on_second_chunk)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        renderer.render(two_person_job(num_frames=23, output=target))
    assert target.read_bytes() == b"an earlier good render"  # nothing half-written replaced it
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]


def test_write_mp4_reports_ffmpeg_failure_and_cleans_up(tmp_path):
    with pytest.raises(EngineSetupError, match="ffmpeg failed"):
        write_mp4(np.zeros((2, 63, 127, 3), np.uint8), tmp_path / "odd.mp4")  # yuv420p needs even sizes
    assert list(tmp_path.iterdir()) == []


def test_timed_boxes_are_taken_at_each_chunks_first_frame():
    from engine.multitalk.pipeline import _Stream
    from engine.multitalk.streaming import plan_chunks

    moved = Box(10, 0, 60, 64)
    job = two_person_job(
        num_frames=23,
        persons=(PersonInput(tone(1.0), ((0, LEFT), (8, moved))), PersonInput(noise(1.0), RIGHT)),
    )
    pipe = shared_pipeline()
    r = pipe.resolve(job)
    from engine.multitalk.conditioning import Source, plan_framing, token_masks

    framing = plan_framing(64, 128, pipe.buckets[480])
    stream = _Stream(r, Source(still=job.source), framing, [], 0, {}, None, None, None)
    chunks = plan_chunks(23, 9, 5, (25, 25)).chunks  # starts 0, 4, 8, 12, 16
    masks = [pipe._token_masks(stream, c) for c in chunks]
    first, later = (token_masks([b, RIGHT], (64, 128), framing) for b in (LEFT, moved))
    assert all(torch.equal(m, first) for m in masks[:2]) and all(torch.equal(m, later) for m in masks[2:])


def test_registry_builds_the_tiny_renderer():
    assert isinstance(create_renderer("multitalk", tiny=True), MultiTalkRenderer)


def test_progress_hook_totals_are_consistent():
    events = []
    shared_pipeline().render(two_person_job(steps=3), progress=lambda stage, done, total, **info: events.append(
        (stage, done, total)
    ))  # fmt: skip
    denoise = [e for e in events if e[0] == "denoise"]
    assert [e[1] for e in denoise] == [1, 2, 3] and {e[2] for e in denoise} == {3}
    assert [e[0] for e in events if e[0] != "denoise"] == ["audio", "encode", "decode"]


def test_apg_render_runs():
    out = shared_pipeline().render(two_person_job(guidance="apg", num_frames=5))
    assert tuple(out.frames.shape) == (5, 64, 128, 3)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"frame_num": 8}, "frame_num: 8; rule: 4n"),
        ({"frame_num": 85, "num_frames": 9}, "frame_num: 85; rule: <= 81"),
        ({"steps": 0}, "steps: 0"),
        ({"shift": 0.0}, "shift: 0.0"),
        ({"audio_scale": -1.0}, "audio_scale: -1.0"),
        ({"mode": "talking"}, "mode: 'talking'"),
        ({"motion_frames": 9}, "motion_frames: 9; rule: 1 <= motion_frames < frame_num=9"),
        ({"motion_frames": 0}, "motion_frames: 0"),
        ({"source": Path("clip.mp4")}, "source: video 'clip.mp4' with mode 'multitalk'"),
        ({"color_match": 1.5}, "color_match: 1.5"),
        ({"size": 1080}, "size: 1080"),
        ({"teacache": 1.5}, "teacache: 1.5; rule: None or 0 to 1"),
        ({"teacache": 0.2, "teacache_warmup": 0}, "teacache_warmup: 0"),
        ({"num_frames": 0}, "num_frames: 0"),
        ({"persons": (PersonInput(tone(), LEFT), PersonInput(noise()))}, r"persons\[1\]\.box: None"),
        ({"persons": ()}, "persons: 0 entries"),
        ({"persons": tuple(PersonInput(tone(), LEFT) for _ in range(3))}, "persons: 3 entries"),
        ({"persons": (PersonInput(np.full(16000, np.nan, np.float32)),)}, "NaN"),
        ({"persons": (PersonInput(np.zeros((2, 16000), np.float32)),)}, r"persons\[0\]\.audio"),
        ({"source": np.zeros((8, 8), np.uint8)}, "source: array"),
    ],
)
def test_bad_jobs_raise_one_line_job_errors(changes, message):
    job = dataclasses.replace(two_person_job(), **changes)
    with pytest.raises(JobError, match=message) as err:
        shared_pipeline().render(job)
    assert "\n" not in str(err.value)


def test_import_is_light():
    code = (
        "import sys, engine.multitalk, engine.multitalk.renderer, engine.multitalk.pipeline, engine.multitalk.weights;"
        "heavy = [m for m in ('diffusers', 'transformers', 'flash_attn', 'xformers', 'torchao', 'prefect')"
        " if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_three_persons_only_with_the_experimental_switch():
    from engine.multitalk.pipeline import MultiTalkPipeline

    third = Box(40, 0, 90, 64)
    persons = (
        PersonInput(tone(), Box(0, 0, 40, 64)),
        PersonInput(noise(), third),
        PersonInput(tone(), RIGHT),
    )
    job = two_person_job(persons=persons, num_frames=5)
    with pytest.raises(JobError, match="experimental_persons"):
        shared_pipeline().render(job)
    base = shared_pipeline()
    settings = dataclasses.replace(base.settings, experimental_persons=True)
    out = MultiTalkPipeline(base.c, settings, base.buckets).render(job)
    assert tuple(out.frames.shape) == (5, 64, 128, 3)


def test_cuda_oom_becomes_out_of_memory_with_job_figures(monkeypatch):
    import torch

    from engine.base import OutOfMemory

    pipe = shared_pipeline()

    def boom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(pipe, "_render", boom)
    with pytest.raises(OutOfMemory) as err:
        pipe.render(two_person_job(num_frames=7))
    assert (err.value.frames, err.value.persons, err.value.size) == (7, 2, 480)


def test_renderers_with_equal_settings_share_one_loaded_pipeline():
    from engine.multitalk.renderer import load_pipeline

    load_pipeline.cache_clear()
    first, second = MultiTalkRenderer(tiny=True), MultiTalkRenderer(tiny=True)
    assert first.pipeline is second.pipeline
    assert MultiTalkRenderer(tiny=True, map_chunk=128).pipeline is not first.pipeline
    load_pipeline.cache_clear()
