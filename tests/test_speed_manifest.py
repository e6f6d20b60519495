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
def test_tiny_multitalk_with_every_switch_through_dubflow_run(tmp_path, monkeypatch, demo_media, caplog):
    """TeaCache, an unmerged LoRA over int8 blocks, block offload and one guidance pass, end to end."""
    from engine import gpu_state
    from tasks.demo import BOXES

    monkeypatch.setenv("DUBFLOW_ENGINE_OVERRIDES", "multitalk=tests.footage_fixtures:tiny_multitalk")
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
    with caplog.at_level(logging.INFO, logger="engine.multitalk"):
        code = main(["run", str(manifest), "--workspace", str(tmp_path / "work")])
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
    summaries = [r.getMessage() for r in caplog.records if "forwards skipped" in r.getMessage()]
    assert len(summaries) == len(renders)  # one TeaCache summary per segment render
    qc = json.loads(Path(record["outputs"]["qc.json"]).read_text())
    assert qc["frames"] == qc["expected_frames"] == record["frames"]
