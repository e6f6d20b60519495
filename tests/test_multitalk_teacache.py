"""TeaCache: the skip rule on a known trajectory, per-pass caches, warm-up, exactness at threshold 0, and the
counts the render result reports."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from engine.multitalk import teacache
from engine.multitalk.teacache import TeaCache
from tests.conftest_multitalk import shared_components, shared_pipeline, two_person_job

pytestmark = pytest.mark.one_torch_thread

IDENTITY = (1.0, 0.0)  # rescale(x) = x: the sums are the plain relative L1 distances


def _run(cache: TeaCache, trajectories: dict[str, list[float]], batched: bool) -> list[int]:
    """Feeds e0 = value * ones per step; returns the steps whose blocks were skipped (per call)."""
    steps = len(next(iter(trajectories.values())))
    names = tuple(trajectories)
    groups = [names] if batched else [(n,) for n in names]
    skipped = []
    for step in range(steps):
        for group in groups:
            e0 = torch.stack([torch.full((6, 4), trajectories[n][step]) for n in group])
            if cache.should_compute(step, group, e0):
                cache.store(group, torch.randn(len(group), 3, 4))
            else:
                assert cache.residual(group).shape == (len(group), 3, 4)
                skipped.append(step)
    return skipped


def test_skips_follow_the_accumulated_relative_distance():
    # relative L1 of 0.1 per step; warm-up 2; threshold 0.25: sums 0.1, 0.2 skip, 0.3 computes and resets
    values = [1.1**k for k in range(8)]
    cache = TeaCache(0.25, warmup=2, coefficients=IDENTITY)
    assert _run(cache, {"cond": values}, batched=False) == [2, 3, 5, 6]
    assert cache.summary()["skipped"] == {"cond": 4} and cache.summary()["computed"] == {"cond": 4}


def test_each_guidance_pass_keeps_its_own_cache():
    slow, fast = [1.1**k for k in range(8)], [1.5**k for k in range(8)]  # relative 0.1 and 0.5 per step
    cache = TeaCache(0.25, warmup=2, coefficients=IDENTITY)
    assert _run(cache, {"cond": slow, "uncond": fast}, batched=False) == [2, 3, 5, 6]  # cond's skips only
    assert cache.summary()["skipped"] == {"cond": 4}
    # batched, the passes share one forward: it is skipped only when both may skip, i.e. never here
    batched = TeaCache(0.25, warmup=2, coefficients=IDENTITY)
    assert _run(batched, {"cond": slow, "uncond": fast}, batched=True) == []
    assert _run(TeaCache(0.25, 2, IDENTITY), {"cond": slow, "drop_text": slow}, batched=True) == [2, 3, 5, 6]


def test_warm_up_steps_are_always_computed():
    still = [1.0] * 6  # no change at all: every step after the warm-up may skip
    assert _run(TeaCache(0.5, warmup=4, coefficients=IDENTITY), {"cond": still}, batched=False) == [4, 5]


def test_threshold_zero_never_skips():
    still = [1.0] * 6
    cache = TeaCache(0.0, warmup=1, coefficients=IDENTITY)
    assert _run(cache, {"cond": still}, batched=False) == []


def _pipeline_with_block_counter():
    from engine.multitalk.pipeline import MultiTalkPipeline

    base = shared_pipeline()
    dit = base.c.transformer
    counter = {"blocks": 0}

    def counting_block(*args):
        counter["blocks"] += 1
        return dit._block(*args)

    pipe = MultiTalkPipeline(dataclasses.replace(base.c), base.settings, base.buckets)
    return pipe, dit, counting_block, counter


def test_threshold_zero_renders_exactly_as_without_caching():
    job = two_person_job(steps=3, num_frames=5)
    plain = shared_pipeline().render(job)
    cached = shared_pipeline().render(dataclasses.replace(job, teacache=0.0, teacache_warmup=1))
    assert torch.equal(plain.frames, cached.frames)
    assert cached.info["teacache"]["skipped_total"] == 0 and "teacache" not in plain.info


def test_skips_are_counted_in_the_render_result_and_logged(monkeypatch, caplog):
    # a constant rescaled distance of 0.05 per step: threshold 0.12 skips two steps of every three
    monkeypatch.setitem(teacache.COEFFICIENTS, 480, (0.0, 0.05))
    pipe, dit, counting_block, counter = _pipeline_with_block_counter()
    monkeypatch.setattr(dit, "block_fn", counting_block)
    layers = len(dit.blocks)
    job = two_person_job(steps=6, num_frames=5, teacache=0.12, teacache_warmup=1)
    with caplog.at_level(logging.INFO, logger="engine.multitalk.teacache"):
        out = pipe.render(job)
    summary = out.info["teacache"]
    passes = len(out.info["passes"])
    # steps 0 (warm-up) and 3 computed; 1, 2, 4, 5 skipped, for each of the 3 passes
    assert summary["skipped"] == {name: 4 for name in out.info["passes"]}
    assert summary["computed"] == {name: 2 for name in out.info["passes"]}
    assert counter["blocks"] == 2 * layers  # passes batched on the CPU: one forward per computed step
    assert len([r for r in caplog.records if "skipped" in r.getMessage()]) == 4
    plain = shared_pipeline().render(dataclasses.replace(job, teacache=None))
    assert not torch.equal(plain.frames, out.frames) and passes == 3


def test_one_guidance_pass_with_unit_scales():
    model = shared_components().transformer
    calls = []
    original = model.forward

    def spy(hidden_states, *args):
        calls.append(hidden_states.shape[0])
        return original(hidden_states, *args)

    model.forward = spy
    try:
        out = shared_pipeline().render(two_person_job(steps=2, num_frames=5, text_scale=1.0, audio_scale=1.0))
    finally:
        del model.forward
    assert out.info["passes"] == ("cond",) and calls == [1, 1]
