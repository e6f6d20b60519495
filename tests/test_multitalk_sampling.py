"""Sampler: shifted flow-matching schedule, Euler, three-way CFG, APG, pass batching, determinism."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from engine.multitalk.guidance import (
    APGState,
    MomentumBuffer,
    combine_apg,
    combine_cfg,
    guidance_passes,
    project_apg,
)
from engine.multitalk.schedule import add_noise, diffusers_sigmas, euler_step, make_schedule
from tests.conftest_multitalk import shared_components, shared_pipeline, two_person_job

pytestmark = pytest.mark.one_torch_thread  # tiny tensors: one thread is faster


def _sigmas_by_hand(steps: int, shift: float) -> list[float]:
    out = []
    for i in range(steps):
        u = 1.0 + (0.001 - 1.0) * i / (steps - 1)
        out.append(shift * u / (1 + (shift - 1) * u))
    return [*out, 0.0]


@pytest.mark.parametrize(("steps", "shift"), [(40, 7.0), (40, 11.0), (8, 2.0), (4, 2.0)])
def test_schedule_matches_independent_formula_and_diffusers(steps, shift):
    schedule = make_schedule(steps, shift)
    expected = _sigmas_by_hand(steps, shift)
    assert schedule.steps == steps
    np.testing.assert_allclose(schedule.sigmas, expected, rtol=1e-12, atol=1e-12)
    assert schedule.sigmas[0] == pytest.approx(1.0) and schedule.sigmas[-1] == 0.0
    assert schedule.timestep(3) == pytest.approx(1000 * expected[3])
    np.testing.assert_allclose(diffusers_sigmas(steps, shift), expected, rtol=1e-6, atol=1e-6)


def test_euler_is_exact_for_constant_velocity():
    x0, v = torch.randn(2, 3), torch.randn(2, 3)
    schedule = make_schedule(5, 7.0)
    x = x0
    for i in range(schedule.steps):
        x = euler_step(x, v, schedule.sigmas[i], schedule.sigmas[i + 1])
    torch.testing.assert_close(x, x0 - v)  # integral of v over sigma from 1 to 0
    torch.testing.assert_close(add_noise(x0, v, 0.25), 0.75 * x0 + 0.25 * v)


def _velocities(names):
    gen = torch.Generator().manual_seed(1)
    return {n: torch.randn(1, 4, 2, 3, 3, generator=gen) for n in names}


def test_three_way_cfg_arithmetic():
    v = _velocities(("cond", "drop_text", "uncond"))
    out = combine_cfg(v, 5.0, 4.0)
    expected = v["uncond"] + 5.0 * (v["cond"] - v["drop_text"]) + 4.0 * (v["drop_text"] - v["uncond"])
    torch.testing.assert_close(out, expected)
    assert guidance_passes(5.0) == ("cond", "drop_text", "uncond")


def test_two_pass_cfg_when_text_scale_is_one():
    v = _velocities(("cond", "drop_audio"))
    torch.testing.assert_close(
        combine_cfg(v, 1.0, 2.0), v["drop_audio"] + 2.0 * (v["cond"] - v["drop_audio"])
    )
    assert guidance_passes(1.0 + 1e-12) == ("cond", "drop_audio")


def test_apg_reduces_to_cfg_without_momentum_clipping_or_projection():
    v = _velocities(("cond", "drop_text", "uncond"))
    state = APGState(MomentumBuffer(0.0), MomentumBuffer(0.0), norm_threshold=float("inf"), eta=1.0)
    torch.testing.assert_close(
        combine_apg(v, 5.0, 4.0, state), combine_cfg(v, 5.0, 4.0), rtol=1e-5, atol=1e-5
    )


def test_apg_output_is_orthogonal_to_cond_and_clipped():
    cond, diff = torch.randn(4, 5), 100 * torch.randn(4, 5)
    out = project_apg(diff, cond, None, norm_threshold=float("inf"), eta=0.0)
    assert abs(float((out.double() * cond.double()).sum())) < 1e-6 * float(out.norm() * cond.norm())
    clipped = project_apg(diff, cond, None, norm_threshold=3.0, eta=1.0)
    assert float(clipped.norm()) <= 3.0 + 1e-5


def test_apg_momentum_recurrence():
    buf = MomentumBuffer(-0.75)
    d1, d2, d3 = torch.ones(3), 2 * torch.ones(3), 3 * torch.ones(3)
    buf.update(d1)
    buf.update(d2)
    r3 = buf.update(d3)
    torch.testing.assert_close(r3, d3 - 0.75 * (d2 - 0.75 * d1))


class _CountingModel(torch.nn.Module):
    """Wraps the tiny DiT and counts forwards and batch rows."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls, self.rows = inner, 0, 0
        self.adapter_cfg, self.map_chunk = inner.adapter_cfg, inner.map_chunk

    def encode_audio_tokens(self, windows):
        return self.inner.encode_audio_tokens(windows)

    def forward(self, hidden_states, *args):
        self.calls += 1
        self.rows += hidden_states.shape[0]
        return self.inner(hidden_states, *args)


def _pipeline(cfg_batch: str, model=None):
    from engine.multitalk.pipeline import MultiTalkPipeline

    base = shared_pipeline()
    parts = dataclasses.replace(base.c, transformer=model or base.c.transformer)
    return MultiTalkPipeline(parts, dataclasses.replace(base.settings, cfg_batch=cfg_batch), base.buckets)


@pytest.mark.parametrize(("text_scale", "passes"), [(5.0, 3), (1.0, 2)])
@pytest.mark.parametrize("cfg_batch", ["on", "off"])
def test_passes_per_step_counted_on_forwards_and_rows(text_scale, passes, cfg_batch):
    model = _CountingModel(shared_components().transformer)
    out = _pipeline(cfg_batch, model).render(two_person_job(steps=2, text_scale=text_scale, num_frames=5))
    assert model.rows == 2 * passes
    assert model.calls == (2 if cfg_batch == "on" else 2 * passes)
    assert out.info["passes"] == guidance_passes(text_scale)


def test_batched_passes_equal_sequential_passes():
    job = two_person_job(steps=2)
    frames = [_pipeline(mode).render(job).frames for mode in ("on", "off")]
    diff = (frames[0].int() - frames[1].int()).abs().max()
    assert diff <= 1  # uint8 frames after fp32 latents within 1e-5
    latents = [_final_latent(mode, job) for mode in ("on", "off")]
    torch.testing.assert_close(latents[0], latents[1], rtol=1e-5, atol=1e-5)


def _final_latent(cfg_batch: str, job):
    pipe = _pipeline(cfg_batch)
    captured = {}
    original = pipe._denoise_chunk

    def spy(*args):
        latent, info = original(*args)
        captured["latent"] = latent
        return latent, info

    pipe._denoise_chunk = spy
    pipe.render(job)
    return captured["latent"]


def test_same_seed_same_frames_different_seed_different_frames():
    pipe = shared_pipeline()
    a = pipe.render(two_person_job(seed=7)).frames
    b = pipe.render(two_person_job(seed=7)).frames
    c = pipe.render(two_person_job(seed=8)).frames
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def _stream(pipe, job):
    from engine.multitalk.pipeline import _Stream

    return _Stream(pipe.resolve(job), None, None, [], 0, {}, None, None, None)


def test_noise_is_drawn_on_the_cpu_from_the_seed_and_chunk():
    from engine.multitalk.streaming import plan_chunks

    pipe = shared_pipeline()
    s = _stream(pipe, two_person_job(seed=3))
    chunk = plan_chunks(9, 9, 5, (25,)).chunks[0]
    g1, g2 = pipe._noise_source(s, chunk), pipe._noise_source(s, chunk)
    assert g1.device.type == "cpu"
    assert torch.equal(torch.randn(4, generator=g1), torch.randn(4, generator=g2))


def test_dit_without_audio_equals_stock_diffusers_wan():
    """With the audio projections zeroed, our block loop reproduces diffusers' WanTransformer3DModel."""
    import copy

    from diffusers import WanTransformer3DModel

    from engine.multitalk.tiny import tiny_config
    from engine.multitalk.transformer import AudioContext
    from engine.multitalk.weights import is_adapter_key

    ours = copy.deepcopy(shared_components().transformer)
    with torch.no_grad():
        for block in ours.blocks:
            block.audio_cross_attn.proj.weight.zero_()
            block.audio_cross_attn.proj.bias.zero_()
    stock = WanTransformer3DModel(**tiny_config().dit.diffusers_kwargs()).eval()
    base = {k: v for k, v in ours.state_dict().items() if not is_adapter_key(k)}
    stock.load_state_dict(base, strict=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 36, 3, 8, 16, generator=gen)
    t = torch.tensor([900.0, 250.0])
    text, image = torch.randn(2, 512, 32, generator=gen), torch.randn(2, 5, 32, generator=gen)
    tokens = [torch.randn(3, 4, 32, generator=gen) for _ in range(2)]
    with torch.no_grad():
        expected = stock(x, t, text, image, return_dict=False)[0]
        got = ours(x, t, text, image, AudioContext(tokens, 4))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert expected.abs().mean() > 1e-3  # not a vacuous comparison


class _PassStub(torch.nn.Module):
    """Velocity = mean of the text rows + 10 x person count: tells which inputs each pass received."""

    def __init__(self):
        super().__init__()
        from engine.multitalk.tiny import tiny_config

        self.adapter_cfg, self.map_chunk = tiny_config().dit.adapter, 4096

    def forward(self, x, t, text, image, audio):
        per_sample = text.float().mean(dim=(1, 2)) + 10.0 * torch.tensor(audio.persons, dtype=torch.float32)
        return per_sample.view(-1, 1, 1, 1, 1).expand(x.shape[0], 16, *x.shape[2:])


@pytest.mark.parametrize("cfg_batch", ["on", "off"])
@pytest.mark.parametrize(("text_scale", "audio_scale", "velocity"), [(5.0, 4.0, 43.0), (1.0, 2.0, 31.0)])
def test_each_pass_gets_its_text_and_audio(cfg_batch, text_scale, audio_scale, velocity):
    """cond = prompt + 2 persons (1 + 20), drop_text = negative + 2 persons (3 + 20), uncond = negative + null
    audio (3 + 10), drop_audio = prompt + null (1 + 10); 3-pass: 13 - 2 s_t + 10 s_a; 2-pass: 11 + 10 s_a."""
    from engine.multitalk.pipeline import _Conditioning
    from engine.multitalk.streaming import chunk_seed, plan_chunks

    pipe = _pipeline(cfg_batch, _PassStub())
    cond = _Conditioning(
        y=torch.zeros(1, 20, 3, 8, 16),
        text={"prompt": torch.ones(1, 512, 32), "negative": 3 * torch.ones(1, 512, 32)},
        image=torch.zeros(1, 5, 32),
        audio_tokens=torch.zeros(3, 8, 32),
        null_tokens=torch.zeros(3, 4, 32),
        token_masks=None,
    )
    job = two_person_job(text_scale=text_scale, audio_scale=audio_scale, steps=3)
    plan = plan_chunks(9, 9, 5, (25, 25))
    latent, _ = pipe._denoise_chunk(_stream(pipe, job), cond, plan.chunks[0], plan, lambda *a, **k: None)
    start = torch.randn((1, 16, 3, 8, 16), generator=torch.Generator().manual_seed(chunk_seed(job.seed, 0)))
    torch.testing.assert_close(latent, start - velocity)  # sigma runs from 1 to 0
