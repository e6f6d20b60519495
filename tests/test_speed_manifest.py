"""The engine's speed switches in the manifest's render block: located errors for what cannot run here, and a
tiny render through `dubflow run` with the switches on."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from flows.cli import main
from tasks.manifest import ManifestError, load_manifest
from tests.test_manifest import GOOD, media, write  # noqa: F401 - the media fixture

SPEED = """\
render:
  engine: preview
  teacache: 0.3
  loras:
    - {file: lightx2v.safetensors, scale: 1.0}
  quantize: int8
  offload: blocks
  resident_blocks: 4
"""


def _with_render(render: str) -> str:
    return GOOD.replace("render: {engine: preview, size: 480}\n", render)


def _lora(folder: Path) -> Path:
    from engine.multitalk.tiny import write_tiny_lora
    from tests.conftest_multitalk import shared_components

    path = folder / "lightx2v.safetensors"
    write_tiny_lora(path, shared_components().transformer, "lightx2v")
    return path


def test_speed_switches_load_and_resolve_relative_to_the_manifest(media):  # noqa: F811
    _lora(media)
    render = load_manifest(write(media, _with_render(SPEED))).manifest.render
    assert render.loras[0].file == media / "lightx2v.safetensors" and render.quantize == "int8"


@pytest.mark.parametrize(
    ("old", "new", "line", "message"),
    [
        ("teacache: 0.3", "teacache: 1.5", 14, "render.teacache: .*less than or equal to 1"),
        ("lightx2v.safetensors", "missing.safetensors", 16, r"render\.loras\[0\]\.file: .*no such file"),
        ("quantize: int8", "quantize: fp8", 17, "render.quantize: .*fp8 needs compute capability >= 8.9"),
        ("offload: blocks", "attention: flash", 19, "render.resident_blocks: resident_blocks needs offload"),
        ("offload: blocks", "attention: sage", 18, "render.attention: sage is not installed here"),
    ],
)
def test_bad_switches_are_located(media, old, new, line, message):  # noqa: F811
    import re

    _lora(media)
    with pytest.raises(ManifestError) as err:
        load_manifest(write(media, _with_render(SPEED.replace(old, new))))
    lines = str(err.value).splitlines()
    assert any(f":{line}:" in entry and re.search(message, entry) for entry in lines), lines


@pytest.mark.slow
def test_tiny_multitalk_with_every_switch_through_dubflow_run(tmp_path, monkeypatch, demo_media):
    """TeaCache, an unmerged LoRA over int8 blocks, block offload and one guidance pass, end to end."""
    from engine import gpu_state
    from tasks.demo import BOXES

    monkeypatch.setenv("DUBFLOW_ENGINE_OVERRIDES", "multitalk=tests.footage_fixtures:tiny_multitalk")
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # a loaded 2-core machine
    for name in ("scene", "ana", "ben"):
        shutil.copy(demo_media[name], tmp_path / demo_media[name].name)
    _lora(tmp_path)
    speakers = "\n".join(f"  - {{id: {s}, box: {list(b)}, track: {s}.wav}}" for s, b in BOXES.items())
    render = (
        "render: {engine: multitalk, steps: 3, max_segment_s: 6, text_scale: 1, audio_scale: 1, teacache: 0.2,"
        " teacache_warmup: 1, loras: [{file: lightx2v.safetensors, scale: 0.5}], lora_merge: false,"
        " quantize: int8, offload: blocks}"
    )
    manifest = tmp_path / "still.yaml"
    manifest.write_text(
        f"episode: fast\nsource: scene.png\nspeakers:\n{speakers}\n{render}\noutputs: [mp4, qc]\n"
    )
    messages: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("engine.multitalk.pipeline")  # its own handler: the run configures logging
    level, logger.level = logger.level, logging.INFO
    logger.addHandler(handler)
    try:
        code = main(["run", str(manifest), "--workspace", str(tmp_path / "work")])
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    record = json.loads(
        next((tmp_path / "work" / "episodes").glob("*/runs.jsonl")).read_text().splitlines()[-1]
    )
    assert code == 0, record.get("error")
    renders = [s for s in record["stages"] if s["stage"].startswith("render[")]
    assert len(renders) >= 2 and {s["state"] for s in renders} == {"executed"}
    engines = [k for k in gpu_state.loaded_engines() if k.startswith("multitalk=") and "quantize" in k]
    pipeline = gpu_state._renderers[engines[0]].pipeline
    assert pipeline.speed["quantized_layers"] == 24 and pipeline.speed["offload"]["streamed_blocks"] == 2
    assert pipeline.speed["loras"][0]["hooked"] == 3
    summaries = [m for m in messages if "forwards skipped" in m]
    assert len(summaries) == len(renders)  # one TeaCache summary per segment render
    qc = json.loads(Path(record["outputs"]["qc.json"]).read_text())
    assert qc["frames"] == qc["expected_frames"] == record["frames"]


# -- memory: a 24 GB card --------------------------------------------------------------------------------
def test_a_480p_two_person_chunk_fits_24_gib_only_with_block_offload():
    from engine.memory import GiB, RenderCost, estimate_peak, max_resident_blocks

    card = 24 * GiB
    plain = RenderCost(engine="multitalk", persons=2)
    assert estimate_peak(81, plain).gpu_bytes > card  # 35 GiB of bf16 weights
    assert estimate_peak(81, RenderCost(quantize="int8")).gpu_bytes > card  # still 20 GiB of weights + decode
    resident = max_resident_blocks(card, plain)
    assert 0 <= resident < 40  # the rest is streamed
    streamed = RenderCost(offload="group", resident_blocks=resident + 2)
    assert (
        estimate_peak(81, streamed).gpu_bytes
        <= card
        < estimate_peak(81, RenderCost(offload="group", resident_blocks=resident + 3)).gpu_bytes
    )
    # tiling and int8 leave room for more resident blocks (fewer transfers)
    assert max_resident_blocks(card, RenderCost(quantize="int8", vae_tiled=True)) > resident
    assert max_resident_blocks(8 * GiB, plain) == -1  # not even one block and a chunk


def test_the_planner_sizes_a_24_gib_worker_with_offload(tmp_path, demo_media):
    from dataclasses import replace

    from engine.base import OutOfMemory
    from engine.memory import GiB
    from flows.resolve import Machine, resolve_run
    from tasks.segment import max_segment_frames
    from tests.test_ops_rerun import write_manifest

    card = Machine(render_slots=1, gpu_bytes=24 * GiB, host_bytes=128 * GiB, where="test")

    def resolved(render: str):
        folder = tmp_path / f"m{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        m = load_manifest(write_manifest(folder, demo_media, "ep", render)).manifest
        m = m.model_copy(
            update={"render": m.render.model_copy(update={"engine": "multitalk", "max_segment_s": "auto"})}
        )
        return m

    with pytest.raises(OutOfMemory, match="add offload"):
        resolve_run(resolved(""), "image", card, None)
    run = resolve_run(resolved(", offload: blocks, quantize: int8"), "image", card, None)
    settings = dict(run.render.engine_settings)
    assert settings["offload"] == "blocks" and settings["resident_blocks"] == run.plan.resident_blocks > 0
    assert max_segment_frames(replace(run.plan, max_segment_s=None)) > 81
    assert any(line.startswith("speed: ") and "offload blocks" in line for line in run.describe())


def test_doctor_reports_the_attention_kernel(capsys):
    import torch

    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["engine_speed"]
    assert report["kernels"]["sdpa"].startswith("built in")
    if not torch.cuda.is_available():
        assert report["attention"] == "sdpa" and report["fp8"].startswith("no: ")
