"""One resolution of manifest + machine into every stage's settings: what `dubflow plan` shows is what a
run does (engine, render slots, memory, steps), and the planner sees every choice that changes a plan."""

from __future__ import annotations

from dataclasses import replace

import pytest

from engine.memory import GiB, estimate_seconds
from flows.cli import main
from flows.resolve import Machine, resolve_run
from tasks.manifest import load_manifest
from tasks.segment import _render_cost, max_segment_frames
from tests.test_ops_rerun import write_manifest

ONE_H100 = Machine(render_slots=1, gpu_bytes=80 * GiB, host_bytes=256 * GiB, where="test")


@pytest.fixture
def manifest(tmp_path, demo_media):
    def make(render: str = ""):
        folder = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        return load_manifest(write_manifest(folder, demo_media, "ep", render)).manifest

    return make


def test_steps_and_guidance_passes_reach_the_planner(manifest):
    few = resolve_run(manifest(", steps: 8"), "image", ONE_H100, None)
    many = resolve_run(manifest(", steps: 40"), "image", ONE_H100, None)
    two_pass = resolve_run(manifest(", steps: 8, text_scale: 1.0"), "image", ONE_H100, None)
    assert (few.plan.steps, many.plan.steps, two_pass.plan.cfg_passes) == (8, 40, 2)
    assert few.render.steps == few.plan.steps and many.render.steps == 40  # one source for both stages
    runs = [("few", few), ("many", many), ("two", two_pass)]  # timed with the real engine's model:
    cost = {name: _render_cost(replace(r.plan, cost_model="multitalk")) for name, r in runs}
    assert estimate_seconds(400, cost["many"]) > 4 * estimate_seconds(400, cost["few"]) > 0
    assert estimate_seconds(400, cost["two"]) < estimate_seconds(400, cost["few"])


def test_the_machine_sets_balancing_and_memory(manifest):
    m = manifest()
    m = m.model_copy(update={"render": m.render.model_copy(update={"max_segment_s": "auto"})})
    four = Machine(render_slots=4, gpu_bytes=141 * GiB, host_bytes=256 * GiB, where="test")
    small = Machine(render_slots=1, gpu_bytes=80 * GiB, host_bytes=64 * GiB, where="test")
    wide, narrow = resolve_run(m, "image", four, None), resolve_run(m, "image", small, None)
    assert (wide.plan.n_gpus, narrow.plan.n_gpus) == (4, 1)
    assert (wide.plan.gpu_bytes, narrow.plan.host_bytes) == (141 * GiB, 64 * GiB)
    real = [replace(r.plan, engine="infinitetalk", cost_model="infinitetalk") for r in (wide, narrow)]
    assert _render_cost(real[0]).engine == "infinitetalk"  # planned with its own memory model
    assert max_segment_frames(real[0]) >= max_segment_frames(real[1]) > 0  # both workers fit a segment


@pytest.mark.slow  # a flow run up to the plan
def test_plan_prints_what_the_run_will_do(tmp_path, demo_media, capsys):
    path = write_manifest(tmp_path, demo_media, "planned", ", steps: 12, seed: 5, chain: true")
    assert main(["plan", str(path), "--workspace", str(tmp_path / "ws")]) == 0
    out = capsys.readouterr().out
    assert "engine: preview (chosen in the manifest)" in out
    assert "machine: this machine: 1 render slot(s), no GPU" in out
    assert "render: 12 steps x 3 guidance passes, seed 5" in out and "chained within shots" in out
    assert "longest 2 s (manifest)" in out
    assert "chained: 1 shot(s) render serially" in out  # the still is one shot: one serial job


def test_an_engine_that_cannot_fit_the_machine_is_refused_before_any_stage(manifest, monkeypatch):
    import flows.resolve as resolve
    from engine.base import OutOfMemory

    monkeypatch.setattr(resolve, "resolve_render_engine", lambda *a: ("infinitetalk", "test"))
    m = manifest()
    m = m.model_copy(update={"render": m.render.model_copy(update={"max_segment_s": "auto"})})
    with pytest.raises(OutOfMemory, match="infinitetalk engine at 480p does not fit"):
        resolve_run(m, "video", Machine(1, 24 * GiB, 64 * GiB, "a 24 GB card"), None)
    assert resolve_run(m, "video", ONE_H100, None).engine == "infinitetalk"


def test_an_overridden_engine_is_planned_as_what_it_is(manifest, monkeypatch):
    """DUBFLOW_ENGINE_OVERRIDES puts another implementation (a tiny model on the CPU) in place of the engine:
    the real engine's GPU memory model does not describe it, and the plan says so."""
    m = manifest()
    m = m.model_copy(
        update={"render": m.render.model_copy(update={"max_segment_s": "auto", "engine": "infinitetalk"})}
    )
    no_gpu = Machine(1, 0, 24 * GiB, "a CPU machine")
    from engine.base import OutOfMemory

    with pytest.raises(OutOfMemory):
        resolve_run(m, "video", no_gpu, None)
    monkeypatch.setenv("DUBFLOW_ENGINE_OVERRIDES", "infinitetalk=tests.footage_fixtures:tiny_infinitetalk")
    run = resolve_run(m, "video", no_gpu, None)
    assert run.engine == "infinitetalk" and run.plan.cost_model == "preview"
    assert "planned as a CPU renderer" in run.describe()[0]
