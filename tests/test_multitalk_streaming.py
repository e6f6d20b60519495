"""Streaming (ENGINE.md §5, §9.2-9.3): chunk plans, reference frames, motion rules, StreamState, full
tiny renders in both modes, continuation across segments."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.base import JobError, PersonInput
from engine.multitalk.streaming import (
    StreamState,
    chunk_windows,
    latent_motion_frames,
    pin_motion,
    plan_chunks,
    reference_frame,
    renoise_motion,
)
from tests.conftest_multitalk import LEFT, RIGHT, noise, one_person_job, shared_pipeline, tone, two_person_job

pytestmark = pytest.mark.one_torch_thread

SHAPES = [(9, 5), (9, 1), (13, 4), (81, 25), (81, 9)]


# -- chunk plans ---------------------------------------------------------------------------------------
def _check_plan(plan, n: int, f: int, m: int, continuing: bool = False) -> None:
    stride = f - m
    expected = math.ceil(n / stride) if continuing else (1 if n <= f else 1 + math.ceil((n - f) / stride))
    assert len(plan.chunks) == expected
    lead = m if continuing else 0
    position = 0
    for k, c in enumerate(plan.chunks):
        assert c.start == k * stride - lead  # audio window starts at k*Δ (+ the job offset)
        assert c.keep_from == (m if (k or continuing) else 0)
        assert c.context == bool(k or continuing)
        assert c.kept.start == position  # contiguous, non-overlapping
        assert len(c.kept) >= 1
        position = c.kept.stop
    assert position == n == plan.num_frames  # exactly N frames


@pytest.mark.parametrize(("f", "m"), SHAPES)
def test_plans_for_every_length_up_to_400(f, m):
    for n in range(1, 401):
        _check_plan(plan_chunks(n, f, m, (n,)), n, f, m)
        _check_plan(plan_chunks(n, f, m, (n,), continuing=True), n, f, m, continuing=True)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 50), st.data())
def test_plans_property(n4, data):
    f = 4 * data.draw(st.integers(1, 30)) + 1
    m = data.draw(st.integers(1, f - 1))
    n = data.draw(st.integers(1, 3 * f + 10 * n4))
    _check_plan(plan_chunks(n, f, m, (n,)), n, f, m)


def test_chunk_windows_cover_the_chunk_with_two_frames_of_context():
    feats = torch.arange(30, dtype=torch.float32).view(30, 1, 1)
    plan = plan_chunks(23, 9, 5, (30,))
    w = chunk_windows([feats], plan.chunks[1], plan)[0, :, :, 0, 0]  # (F, 5)
    assert w[0].tolist() == [2, 3, 4, 5, 6] and w[-1].tolist() == [10, 11, 12, 13, 14]
    w0 = chunk_windows([feats], plan.chunks[0], plan)[0, :, :, 0, 0]
    assert w0[0].tolist() == [0, 0, 0, 1, 2]  # clamped


def _upstream_loop(max_frames: int, f: int, m: int, lengths: list[int], model: str) -> tuple[int, int]:
    """Upstream's while loop (MultiTalk / InfiniteTalk wan/multitalk.py generate()), lengths only."""
    lengths = list(lengths)
    start, end, chunks, total, first, arrive = 0, f, 0, 0, True, False
    miss = []
    while True:
        chunks += 1
        total += f if first else f - m
        if arrive:
            break
        first = False
        start += f - m
        end = start + f
        if end >= min(max_frames, lengths[0]):
            arrive = True
            miss = [end - t + 3 if end >= t else 0 for t in lengths]
        if max_frames <= f:
            break
    length = min(total, max_frames)
    if max_frames > f and sum(miss) > 0:
        length = (length - miss[0] if miss[0] else 0) if model == "multitalk" else min(length, lengths[-1])
    return chunks, length


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(SHAPES), st.integers(1, 600), st.integers(1, 600), st.integers(1, 1200), st.data())
def test_parity_plan_equals_the_upstream_loop(shape, t1, t2, max_frames, data):
    f, m = shape
    model = data.draw(st.sampled_from(["multitalk", "infinitetalk"]))
    lengths = [t1 + f, t2 + f]  # upstream asserts T > F for every person
    chunks, length = _upstream_loop(max_frames, f, m, lengths, model)
    if length < 1:
        with pytest.raises(JobError):
            plan_chunks(max_frames, f, m, lengths, True, model=model)
        return
    plan = plan_chunks(max_frames, f, m, lengths, True, model=model)
    assert (len(plan.chunks), plan.num_frames) == (chunks, length)


def test_parity_lengths_are_the_upstream_formulas():
    # T_a - 3 (MultiTalk) and T_a (InfiniteTalk) when the audio ends before the 1000-frame cap
    for t in (82, 100, 137, 400):
        assert plan_chunks(1000, 81, 25, (t,), True, model="multitalk").num_frames == t - 3
        assert plan_chunks(1000, 81, 9, (t,), True, model="infinitetalk").num_frames == t


# -- reference frames ------------------------------------------------------------------------------------
def test_reference_frame_is_source_start_plus_chunk_start_clamped():
    plan = plan_chunks(200, 81, 9, (200,))
    assert [reference_frame(c.start, 10, 150) for c in plan.chunks] == [10, 82, 149]


class _FakeVideo:
    """A 30 fps source: frame i shows the value i; 25 fps frame j -> nearest source frame by time."""

    def __init__(self, count: int = 60, fps: float = 30.0):
        self.width, self.height, self.count, self.fps = 128, 64, count, fps
        self.requested: list[int] = []

    @property
    def num_frames25(self) -> int:
        return round(self.count / self.fps * 25)

    def source_index(self, frame25):
        t = np.asarray(frame25, dtype=np.float64) / 25
        return np.clip(np.rint(t * self.fps), 0, self.count - 1).astype(int)

    def frames25(self, indices):
        self.requested += list(indices)
        src = self.source_index(indices)
        return np.stack([np.full((64, 128, 3), int(i) * 4 % 256, np.uint8) for i in np.atleast_1d(src)])


@pytest.fixture
def fake_video(monkeypatch):
    video = _FakeVideo()
    monkeypatch.setattr("engine.multitalk.conditioning.open_video", lambda path: video)
    return video


def test_v2v_reads_one_reference_per_chunk_remapped_from_30_fps(fake_video, tmp_path):
    from engine.multitalk.conditioning import Source

    assert fake_video.num_frames25 == 50
    assert Source(video=fake_video).frame(25)[0, 0, 0] == 30 * 4 % 256  # 1 s in = source frame 30
    fake_video.requested.clear()
    job = one_person_job(
        source=tmp_path / "clip.mp4", mode="infinitetalk", num_frames=23, source_start_frame=3
    )
    out = shared_pipeline().render(job)
    starts = [c.start for c in out.plan.chunks]  # F = 9, M = 1: 0, 8, 16
    assert fake_video.requested == [3] + [3 + s for s in starts]  # colour anchor, then one per chunk
    assert tuple(out.frames.shape) == (23, 64, 128, 3)


def test_multitalk_with_a_video_source_is_a_job_error(tmp_path):
    with pytest.raises(JobError, match="source: video .* mode 'multitalk'"):
        shared_pipeline().render(one_person_job(source=tmp_path / "clip.mp4"))


# -- motion rules ----------------------------------------------------------------------------------------
def test_renoise_and_pin_rules():
    latent, motion, eps = (
        torch.randn(1, 16, 3, 2, 2),
        torch.randn(1, 16, 2, 2, 2),
        torch.randn(1, 16, 2, 2, 2),
    )
    out = renoise_motion(latent, motion, eps, 0.25)
    torch.testing.assert_close(out[:, :, :2], 0.75 * motion + 0.25 * eps)
    assert torch.equal(out[:, :, 2:], latent[:, :, 2:])
    assert torch.equal(renoise_motion(latent, motion, eps, 1.0)[:, :, :2], eps)
    assert torch.equal(renoise_motion(latent, motion, eps, 0.0)[:, :, :2], motion)
    assert torch.equal(pin_motion(latent, motion)[:, :, :2], motion) and latent_motion_frames(25) == 7


class _Recorder(torch.nn.Module):
    """Wraps the tiny DiT and records the noisy-latent channels of every model call."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []
        self.adapter_cfg, self.map_chunk = inner.adapter_cfg, inner.map_chunk

    def encode_audio_tokens(self, windows):
        return self.inner.encode_audio_tokens(windows)

    def forward(self, hidden_states, *args):
        self.seen.append(hidden_states[:, :16].clone())
        return self.inner(hidden_states, *args)


def _spied_pipeline(**settings_changes):
    from engine.multitalk.pipeline import MultiTalkPipeline

    base = shared_pipeline()
    recorder = _Recorder(base.c.transformer)
    parts = dataclasses.replace(base.c, transformer=recorder)
    settings = dataclasses.replace(base.settings, cfg_batch="on", **settings_changes)
    pipe = MultiTalkPipeline(parts, settings, base.buckets, base.motion_defaults)
    chunks = []
    real_cond, real_denoise = pipe._chunk_conditioning, pipe._denoise_chunk

    def cond_spy(*args):
        cond = real_cond(*args)
        chunks.append({"motion": cond.motion, "calls": len(recorder.seen)})
        return cond

    def denoise_spy(*args):
        latent, info = real_denoise(*args)
        chunks[-1]["latent"] = latent
        return latent, info

    pipe._chunk_conditioning, pipe._denoise_chunk = cond_spy, denoise_spy
    return pipe, recorder, chunks


@pytest.mark.parametrize("parity", [False, True])
def test_infinitetalk_every_model_call_sees_the_clean_motion_latents(parity):
    pipe, recorder, chunks = _spied_pipeline(parity=parity)
    pipe.render(two_person_job(mode="infinitetalk", num_frames=23, motion_frames=5, steps=3))
    assert len(chunks) == 5
    bounds = [c["calls"] for c in chunks] + [len(recorder.seen)]
    for k, chunk in enumerate(chunks):
        m = chunk["motion"].shape[2]
        assert m == (1 if k == 0 else 2)  # chunk 0: VAE(reference), later: VAE(last 5 frames)
        for seen in recorder.seen[bounds[k] : bounds[k + 1]]:
            assert torch.equal(seen[:, :, :m], chunk["motion"].expand(seen.shape[0], -1, -1, -1, -1))
        assert torch.equal(chunk["latent"][:, :, :m], chunk["motion"])


def test_multitalk_motion_latents_are_exact_after_the_last_step_and_noisy_before():
    pipe, recorder, chunks = _spied_pipeline()
    pipe.render(two_person_job(num_frames=14, steps=3))  # chunks: 0 (no context), 1, 2
    assert chunks[0]["motion"] is None and len(chunks) == 3
    for k in (1, 2):
        motion, first_call = chunks[k]["motion"], recorder.seen[chunks[k]["calls"]]
        assert motion.shape[2] == 2
        assert torch.equal(chunks[k]["latent"][:, :, :2], motion)  # sigma_steps = 0
        assert not torch.allclose(first_call[:1, :, :2], motion, atol=0.1)  # sigma_0 = 1: pure noise


# -- full renders ----------------------------------------------------------------------------------------
def _job(mode: str, count: int, n: int, **kw):
    if count == 1:
        return one_person_job(**{"mode": mode, "num_frames": n, "persons": (PersonInput(tone(1.0)),), **kw})
    two = (PersonInput(tone(1.0), LEFT), PersonInput(noise(1.0), RIGHT))
    return two_person_job(**{"mode": mode, "num_frames": n, "persons": two, **kw})


@pytest.mark.slow  # several tiny renders, > 3 s on 2 cores
@pytest.mark.parametrize("persons", [1, 2])
@pytest.mark.parametrize("mode", ["multitalk", "infinitetalk"])
def test_full_renders_have_exact_length_and_bucket_size(mode, persons):
    chunks = {"multitalk": [1, 1, 2, 5], "infinitetalk": [1, 1, 2, 3]}[mode]  # F = 9, M = 5 / 1
    for n, k in zip((5, 9, 10, 23), chunks, strict=True):
        out = shared_pipeline().render(_job(mode, persons, n))
        assert tuple(out.frames.shape) == (n, 64, 128, 3) and out.frames.dtype == torch.uint8
        assert out.info["chunks"] == k and out.num_frames == n


@pytest.mark.slow  # several tiny renders, > 3 s on 2 cores
@pytest.mark.parametrize("mode", ["multitalk", "infinitetalk"])
def test_same_seed_same_bytes_different_seed_different(mode):
    pipe = shared_pipeline()
    a, b = (pipe.render(_job(mode, 2, 14, seed=5)).frames for _ in range(2))
    c = pipe.render(_job(mode, 2, 14, seed=6)).frames
    assert torch.equal(a, b) and not torch.equal(a, c)


class _LocalEncoder:
    """A wav2vec2 stand-in whose feature t depends only on samples near t (real wav2vec2 attends over
    the whole track, so a split track's features differ a little everywhere; see the report)."""

    layers, dim = 2, 16

    def encode(self, audio):
        frames = int(len(audio) / 16000 * 25)
        x = torch.from_numpy(np.asarray(audio[: frames * 640], np.float32)).view(frames, 640)
        feats = torch.stack([x[:, i * 20 : (i + 1) * 20].std(1) for i in range(self.layers * self.dim)], 1)
        return feats.view(frames, self.layers, self.dim) * 10


@pytest.mark.slow  # several tiny renders, > 3 s on 2 cores
@pytest.mark.parametrize("mode", ["multitalk", "infinitetalk"])
def test_two_jobs_joined_with_continue_from_equal_one_job(mode, tmp_path):
    from engine.multitalk.pipeline import MultiTalkPipeline

    base = shared_pipeline()
    parts = dataclasses.replace(base.c, wav2vec=_LocalEncoder())
    settings = dataclasses.replace(base.settings, normalize_loudness=False)
    pipe = MultiTalkPipeline(parts, settings, base.buckets, base.motion_defaults)
    audio = [noise(1.2, seed=1, amp=0.3), noise(1.2, seed=2)]
    whole = _job(mode, 2, 25, persons=(PersonInput(audio[0], LEFT), PersonInput(audio[1], RIGHT)))
    n1 = {"multitalk": 13, "infinitetalk": 17}[mode]  # a whole number of chunks: F + jΔ
    one = pipe.render(whole)
    first = pipe.render(dataclasses.replace(whole, num_frames=n1, state_output=tmp_path / "a.state"))
    rest = tuple(PersonInput(a[n1 * 640 :], box) for a, box in zip(audio, (LEFT, RIGHT), strict=True))
    second = pipe.render(
        dataclasses.replace(whole, num_frames=25 - n1, persons=rest, continue_from=tmp_path / "a.state")
    )
    joined = torch.cat([first.frames, second.frames])
    assert joined.shape == one.frames.shape
    assert torch.equal(joined, one.frames)  # bit-identical on CPU
    assert second.state.frames_done == 25 and second.state.chunks_done == one.state.chunks_done


def test_continue_from_checks_mode_and_persons():
    state = shared_pipeline().render(_job("multitalk", 1, 9)).state
    with pytest.raises(JobError, match="continue_from: mode"):
        shared_pipeline().render(_job("infinitetalk", 1, 9, continue_from=state))
    with pytest.raises(JobError, match="continue_from: persons"):
        shared_pipeline().render(_job("multitalk", 2, 9, continue_from=state))


def test_stream_state_round_trip(tmp_path):
    state = shared_pipeline().render(_job("infinitetalk", 2, 10)).state
    loaded = StreamState.load(state.save(tmp_path / "s" / "state.safetensors"))
    assert loaded.frames.dtype == torch.float16 and tuple(loaded.frames.shape) == (3, 1, 64, 128)
    assert torch.equal(loaded.frames, state.frames) and torch.equal(loaded.anchor, state.anchor)
    assert all(torch.equal(a, b) for a, b in zip(loaded.audio, state.audio, strict=True))
    assert (loaded.chunks_done, loaded.frames_done, loaded.framing) == (2, 10, state.framing)
    assert [p.name for p in (tmp_path / "s").iterdir()] == ["state.safetensors"]
    with pytest.raises(JobError, match="continue_from"):
        StreamState.load(tmp_path / "missing.state")


def test_person_2_longer_than_person_1_is_covered():
    persons = (PersonInput(tone(0.4), LEFT), PersonInput(noise(0.8), RIGHT))  # 10 and 20 frames
    job = dataclasses.replace(two_person_job(), persons=persons, num_frames=None)
    out = shared_pipeline().render(job)
    assert out.num_frames == 20 and tuple(out.frames.shape) == (20, 64, 128, 3)
    plan = shared_pipeline().plan(job)
    assert plan.num_frames == 20
    from engine.multitalk.pipeline import MultiTalkPipeline

    base = shared_pipeline()
    upstream = MultiTalkPipeline(
        base.c, dataclasses.replace(base.settings, parity=True), base.buckets, base.motion_defaults
    )
    assert upstream.plan(job).num_frames == 10 - 3  # upstream watches person 1 only: T_1 - 3
