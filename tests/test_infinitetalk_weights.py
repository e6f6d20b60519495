"""InfiniteTalk weights and engine selection (issue 11 §2), and the DiT layouts the loader accepts.

Every layout is written with the tiny random weights in its real key layout and must load strictly
(every parameter once, every file key used or explicitly ignored) into exactly the reference model.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.base import EngineSetupError, MissingWeightsError, create_renderer, engine_names
from engine.multitalk import weights as w
from engine.multitalk.settings import EngineSettings
from engine.multitalk.tiny import (
    link_adapter_in_index,
    tiny_adapter_state,
    tiny_settings,
    write_single_file_dit,
)
from tests.conftest_multitalk import shared_components, shared_models_dir

pytestmark = pytest.mark.one_torch_thread  # tiny tensors: one thread is faster

SINGLE, MULTI = w.ADAPTERS["infinitetalk-single"][1], w.ADAPTERS["infinitetalk-multi"][1]


def _copy_models(tmp_path):
    dst = tmp_path / "models"
    shutil.copytree(shared_models_dir(), dst)
    return dst


def _reference(adapter: str = "multitalk") -> dict[str, torch.Tensor]:
    """The tiny model's state with adapter `adapter`'s tensors (what every layout must load into)."""
    state = dict(shared_components().transformer.state_dict())
    return {**state, **tiny_adapter_state(shared_components(), adapter)}


def _assert_same(model, adapter: str = "multitalk") -> None:
    expected = _reference(adapter)
    loaded = model.state_dict()
    assert set(loaded) == set(expected)
    for key, value in loaded.items():
        assert torch.equal(value, expected[key]), key


def _load(paths: w.WeightPaths, adapter: str = "multitalk"):
    return w.load_transformer(
        paths.dit, paths.dit_layout, paths.adapters[adapter], 2, 16, "cpu", torch.float32
    )


def _render(models_dir, **settings):
    """A 5-frame one-person tiny render through the full loader."""
    from engine.multitalk.pipeline import MultiTalkPipeline
    from engine.multitalk.tiny import tiny_config
    from tests.conftest_multitalk import one_person_job

    settings = tiny_settings(models_dir=models_dir, **settings)
    pipe = MultiTalkPipeline(w.load_components(settings), settings, tiny_config().buckets)
    return pipe.render(one_person_job(num_frames=5)).frames


# -- settings: which adapter ----------------------------------------------------------------------------
def test_adapter_follows_product_and_person_count():
    assert EngineSettings().adapter_name(2) == "multitalk"
    infinitetalk = EngineSettings(product="infinitetalk")
    assert [infinitetalk.adapter_name(p) for p in (0, 1, 2)] == [
        "infinitetalk-single",
        "infinitetalk-single",
        "infinitetalk-multi",
    ]
    assert infinitetalk.adapter_names() == ("infinitetalk-single", "infinitetalk-multi")
    pinned = EngineSettings(product="infinitetalk", adapter="infinitetalk-multi")
    assert pinned.adapter_name(1) == "infinitetalk-multi" and pinned.adapter_names() == (
        "infinitetalk-multi",
    )
    with pytest.raises(ValueError, match="adapter: 'multitalk'"):
        EngineSettings(product="infinitetalk", adapter="multitalk").adapter_name(1)


def test_infinitetalk_files_resolve_per_person_count():
    paths = w.resolve_weights(tiny_settings(models_dir=shared_models_dir(), product="infinitetalk"))
    root = shared_models_dir() / w.INFINITETALK_REPO
    assert paths.adapters == {"infinitetalk-single": root / SINGLE, "infinitetalk-multi": root / MULTI}
    for name in paths.adapters:
        model, report = _load(paths, name)
        assert report.problems() == [] and report.adapter_keys == 26
        _assert_same(model, name)


def test_adapter_swap_changes_only_the_adapter():
    settings = tiny_settings(models_dir=shared_models_dir(), product="infinitetalk")
    paths = w.resolve_weights(settings)
    model, _ = _load(paths, "infinitetalk-single")
    base = {k: v for k, v in model.state_dict().items() if not w.is_adapter_key(k)}
    assert w.use_adapter(model, settings, persons=2) == paths.adapters["infinitetalk-multi"]
    _assert_same(model, "infinitetalk-multi")
    assert all(v is model.state_dict()[k] or torch.equal(v, model.state_dict()[k]) for k, v in base.items())
    w.use_adapter(model, settings, persons=1)
    _assert_same(model, "infinitetalk-single")


def test_missing_infinitetalk_file_names_repo_and_file(tmp_path):
    root = _copy_models(tmp_path)
    (root / w.INFINITETALK_REPO / MULTI).unlink()
    settings = tiny_settings(models_dir=root, product="infinitetalk")
    with pytest.raises(MissingWeightsError) as err:
        w.resolve_weights(settings)
    message = str(err.value)
    assert f"MeiGen-AI/InfiniteTalk : {MULTI}" in message and "single/" not in message.split("download")[0]
    assert "--components infinitetalk-multi" in message
    # a studio that only renders one person pins the single adapter and needs nothing more
    w.resolve_weights(tiny_settings(models_dir=root, product="infinitetalk", adapter="infinitetalk-single"))
    ready, why = w.engine_ready("infinitetalk", root)
    assert not ready and f"{w.INFINITETALK_REPO}/{MULTI}" in why and "--engine infinitetalk" in why


# -- loader layouts -----------------------------------------------------------------------------------
def test_ignored_keys_are_diffusers_own():
    from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

    assert w.diffusers_ignored_keys() == tuple(WanTransformer3DModel._keys_to_ignore_on_load_unexpected)
    assert "norm_added_q" in w.diffusers_ignored_keys()


def test_diffusers_layout_skips_the_keys_diffusers_ignores(tmp_path):
    """The released -Diffusers transformer carries attn2.norm_added_q, which the model has no parameter for."""
    root = _copy_models(tmp_path)
    folder = root / w.BASE_DIFFUSERS_REPO / "transformer"
    index_path = folder / w.ORIGINAL_INDEX
    index = json.loads(index_path.read_text())
    shard = folder / sorted(set(index["weight_map"].values()))[0]
    tensors = load_file(str(shard))
    extra = {f"blocks.{i}.attn2.norm_added_q.weight": torch.ones(64) for i in range(2)}
    save_file({**tensors, **extra}, str(shard))
    index["weight_map"].update(dict.fromkeys(extra, shard.name))
    index_path.write_text(json.dumps(index))
    model, report = _load(w.resolve_weights(tiny_settings(models_dir=root, base_layout="diffusers")))
    assert report.problems() == [] and sorted(report.ignored) == sorted(f"{shard.name}:{k}" for k in extra)
    _assert_same(model)


def test_ignored_pattern_does_not_hide_other_unexpected_keys(tmp_path):
    root = _copy_models(tmp_path)
    folder = root / w.BASE_DIFFUSERS_REPO / "transformer"
    shard = next(folder.glob("*-00001-of-00002.safetensors"))
    save_file({**load_file(str(shard)), "blocks.0.attn2.norm_added_x.weight": torch.ones(64)}, str(shard))
    with pytest.raises(EngineSetupError, match="unexpected: .*norm_added_x"):
        _load(w.resolve_weights(tiny_settings(models_dir=root, base_layout="diffusers")))


def test_wan_folder_with_the_adapter_linked_by_its_index(tmp_path):
    """MultiTalk README: multitalk.safetensors copied into the Wan folder, its 330 keys added to the index."""
    root = _copy_models(tmp_path)
    wan = root / w.BASE_REPO
    linked = link_adapter_in_index(wan, root / w.ADAPTER_REPO / w.ADAPTER_FILE)
    shutil.rmtree(root / w.ADAPTER_REPO)  # the MultiTalk repo is then not needed
    settings = tiny_settings(models_dir=root, base_layout="original")
    paths = w.resolve_weights(settings)
    assert paths.adapters == {"multitalk": linked}
    model, report = _load(paths)
    assert report.problems() == [] and report.files == 3 and report.adapter_keys == 26  # loaded once
    _assert_same(model)
    statuses = w.check_weights(root, ["base", "encoders", "multitalk", "wav2vec"])
    assert all(s.present for s in statuses) and w.ready_engines(statuses) == {"multitalk": []}
    assert [s.path for s in statuses if s.component == "multitalk"] == [linked]
    assert torch.equal(_render(root, base_layout="original"), _render(shared_models_dir()))


def test_linked_adapter_is_ignored_when_infinitetalk_is_wanted(tmp_path):
    root = _copy_models(tmp_path)
    link_adapter_in_index(root / w.BASE_REPO, root / w.ADAPTER_REPO / w.ADAPTER_FILE)
    paths = w.resolve_weights(tiny_settings(models_dir=root, base_layout="original", product="infinitetalk"))
    model, report = _load(paths, "infinitetalk-multi")
    assert report.problems() == [] and report.files == 3
    assert len(report.ignored) == 1 and report.ignored[0].startswith(
        f"{w.ADAPTER_FILE}: the adapter the index"
    )
    _assert_same(model, "infinitetalk-multi")


def test_unsharded_diffusers_transformer(tmp_path):
    root = _copy_models(tmp_path)
    folder = root / w.BASE_DIFFUSERS_REPO / "transformer"
    shutil.rmtree(folder)
    write_single_file_dit(shared_components(), folder)
    paths = w.resolve_weights(tiny_settings(models_dir=root, base_layout="diffusers"))
    assert paths.dit_layout == "base-diffusers"
    model, report = _load(paths)
    assert report.problems() == [] and report.files == 2
    _assert_same(model)
    assert torch.equal(_render(root, base_layout="diffusers"), _render(shared_models_dir()))


@pytest.mark.parametrize("keys", ["diffusers", "original"])
def test_single_safetensors_file(tmp_path, keys):
    path = write_single_file_dit(shared_components(), tmp_path / "my dit", keys=keys)
    settings = tiny_settings(models_dir=shared_models_dir(), dit_file=path)
    paths = w.resolve_weights(settings)
    assert (paths.dit, paths.dit_layout) == (path, "file")
    model, report = _load(paths)
    assert report.problems() == [] and report.files == 2
    _assert_same(model)


def test_single_file_without_config_is_checked_against_the_14b_shape(tmp_path):
    path = write_single_file_dit(shared_components(), tmp_path, config=False)
    with pytest.raises(EngineSetupError, match="mismatched"):
        _load(w.resolve_weights(tiny_settings(models_dir=shared_models_dir(), dit_file=path)))


def test_missing_single_file_is_named(tmp_path):
    with pytest.raises(MissingWeightsError, match="dit_file : nope.safetensors"):
        w.resolve_weights(
            tiny_settings(models_dir=shared_models_dir(), dit_file=tmp_path / "nope.safetensors")
        )


# -- models check / download ------------------------------------------------------------------------------
def test_models_check_lists_infinitetalk_files(tmp_path, capsys):
    from flows.cli import main

    root = _copy_models(tmp_path)
    (root / w.INFINITETALK_REPO / MULTI).unlink()
    assert main(["models", "check", "--models-dir", str(root)]) == 0  # multitalk is complete
    out = capsys.readouterr().out
    assert f"ok      infinitetalk-single {w.INFINITETALK_REPO}/{SINGLE}" in out
    assert f"MISSING infinitetalk-multi  {w.INFINITETALK_REPO}/{MULTI}" in out
    assert "engine multitalk: ready" in out and "engine infinitetalk: needs infinitetalk-multi" in out
    assert main(["models", "check", "--models-dir", str(root), "--engine", "infinitetalk"]) == 1
    assert "multitalk.safetensors" not in capsys.readouterr().out
    assert (
        main(["models", "check", "--models-dir", str(root), "--components", "adapter,infinitetalk-single"])
        == 0
    )
    assert main(["models", "check", "--models-dir", str(root), "--components", "nope"]) == 2


def test_download_fetches_only_the_infinitetalk_files_asked_for(tmp_path, monkeypatch):
    from flows.cli import main

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, local_dir=None):
        calls.append((repo_id, tuple(allow_patterns)))
        return str(local_dir)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    args = ["models", "download", "--models-dir", str(tmp_path)]
    assert main([*args, "--components", "infinitetalk-single"]) == 0
    assert calls == [(w.INFINITETALK_REPO, (SINGLE,))]
    calls.clear()
    assert main([*args, "--engine", "infinitetalk"]) == 0
    assert [c[0] for c in calls] == [
        w.BASE_REPO,
        w.BASE_DIFFUSERS_REPO,
        w.INFINITETALK_REPO,
        w.INFINITETALK_REPO,
        w.WAV2VEC_REPO,
    ]
    assert (w.INFINITETALK_REPO, (MULTI,)) in calls


# -- engine selection ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cuda", "remove", "kind", "engine"),
    [
        (True, None, "video", "infinitetalk"),
        (True, None, "image", "multitalk"),
        (True, MULTI, "video", "preview"),  # auto never picks an engine that could fail on a 2-person segment
        (True, MULTI, "image", "multitalk"),
        (False, None, "video", "preview"),
        (False, None, "image", "preview"),
    ],
)
def test_auto_picks_per_source_kind(tmp_path, monkeypatch, cuda, remove, kind, engine):
    from engine.selection import resolve_render_engine

    root = _copy_models(tmp_path)
    if remove:
        (root / w.INFINITETALK_REPO / remove).unlink()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    chosen, why = resolve_render_engine("auto", root, kind)
    assert chosen == engine, why
    if engine == "preview" and cuda:
        assert remove in why
    assert resolve_render_engine("infinitetalk", root, "image") == ("infinitetalk", "chosen in the manifest")


def test_doctor_says_what_auto_picks_for_stills_and_videos(tmp_path, monkeypatch):
    from flows.doctor import _render, format_doctor

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    info = _render(_copy_models(tmp_path))
    assert info["auto"] == "multitalk" and info["by_source"]["video"]["auto"] == "infinitetalk"
    report = {"tools": {}, "gpus": [], "models_dir": None, "stages": {"render": info}}
    text = format_doctor(report)
    assert "render (image)    -> multitalk" in text and "render (video)    -> infinitetalk" in text


def test_infinitetalk_engine_is_registered():
    assert "infinitetalk" in engine_names()
    renderer = create_renderer("infinitetalk", tiny=True)
    assert renderer.name == "infinitetalk" and renderer.settings.product == "infinitetalk"
    assert renderer.settings.adapter_name(2) == "infinitetalk-multi"


def test_models_dir_is_read_from_the_environment_in_one_place(monkeypatch, tmp_path):
    from engine.base import models_dir_from_env

    monkeypatch.delenv("DUBFLOW_MODELS_DIR", raising=False)
    assert models_dir_from_env() is None
    monkeypatch.setenv("DUBFLOW_MODELS_DIR", str(tmp_path))
    assert models_dir_from_env() == tmp_path
