"""Checkpoint loading: released key layouts, strict accounting, missing files, models check/download."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.base import EngineSetupError, MissingWeightsError
from engine.multitalk import weights as w
from engine.multitalk.settings import DiTConfig
from engine.multitalk.tiny import tiny_settings
from tests.conftest_multitalk import shared_components, shared_models_dir

pytestmark = pytest.mark.one_torch_thread  # tiny tensors: one thread is faster


@pytest.mark.parametrize(
    ("original", "diffusers"),
    [
        ("blocks.3.self_attn.q.weight", "blocks.3.attn1.to_q.weight"),
        ("blocks.3.self_attn.o.bias", "blocks.3.attn1.to_out.0.bias"),
        ("blocks.0.cross_attn.k_img.weight", "blocks.0.attn2.add_k_proj.weight"),
        ("blocks.0.cross_attn.norm_k_img.weight", "blocks.0.attn2.norm_added_k.weight"),
        ("blocks.12.norm3.bias", "blocks.12.norm2.bias"),
        ("blocks.1.ffn.2.weight", "blocks.1.ffn.net.2.weight"),
        ("blocks.39.modulation", "blocks.39.scale_shift_table"),
        ("head.modulation", "scale_shift_table"),
        ("head.head.weight", "proj_out.weight"),
        ("img_emb.proj.4.bias", "condition_embedder.image_embedder.norm2.bias"),
        ("time_projection.1.weight", "condition_embedder.time_proj.weight"),
        # adapter keys keep their names: no substring renaming into "audio_attn2"
        ("blocks.7.audio_cross_attn.kv_linear.weight", "blocks.7.audio_cross_attn.kv_linear.weight"),
        ("blocks.7.norm_x.bias", "blocks.7.norm_x.bias"),
        ("audio_proj.proj1_vf.weight", "audio_proj.proj1_vf.weight"),
    ],
)
def test_key_map(original, diffusers):
    assert w.original_to_diffusers(original) == diffusers
    assert w.diffusers_to_original(diffusers) == original


def test_unknown_keys_are_not_guessed():
    assert w.original_to_diffusers("blocks.0.self_attn.qq.weight") is None
    assert w.original_to_diffusers("something.else") is None


def test_real_shape_parameter_counts_on_the_meta_device():
    """The 14B + adapter shape built on meta: 330 adapter keys, 2 487 168 000 adapter parameters."""
    from engine.multitalk.transformer import MultiTalkTransformer3DModel

    with torch.device("meta"):
        model = MultiTalkTransformer3DModel.from_dit_config(DiTConfig())
    params = dict(model.named_parameters())
    adapter = {k: p for k, p in params.items() if w.is_adapter_key(k)}
    assert len(adapter) == 330
    assert sum(p.numel() for p in adapter.values()) == 2_487_168_000
    assert sum(p.numel() for k, p in params.items() if k not in adapter) == 16_394_878_784
    for key in params:  # every diffusers name has an original-layout name and back
        assert w.original_to_diffusers(w.diffusers_to_original(key)) == key


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_both_layouts_load_strictly_and_identically(layout):
    source = shared_components().transformer
    settings = tiny_settings(models_dir=shared_models_dir(), base_layout=layout)
    paths = w.resolve_weights(settings)
    assert paths.dit_layout == ("base" if layout == "original" else "base-diffusers")
    model, report = w.load_transformer(
        paths.dit, paths.dit_layout, paths.adapters["multitalk"], 2, 16, "cpu", torch.float32
    )
    assert report.problems() == []
    assert report.assigned == len(dict(source.named_parameters())) and report.adapter_keys == 26
    assert report.files == 3  # two base shards + the adapter
    expected = source.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_every_file_key_is_used_by_the_loader():
    root = shared_models_dir()
    base = root / w.BASE_REPO
    index = json.loads((base / w.ORIGINAL_INDEX).read_text())["weight_map"]
    model_keys = {w.diffusers_to_original(k) for k, _ in shared_components().transformer.named_parameters()}
    adapter = set(load_file(str(root / w.ADAPTER_REPO / w.ADAPTER_FILE)))
    assert set(index) | adapter == model_keys and not set(index) & adapter


def test_full_pipeline_loads_from_the_models_folder():
    from engine.multitalk.pipeline import MultiTalkPipeline
    from engine.multitalk.tiny import tiny_config
    from tests.conftest_multitalk import one_person_job

    settings = tiny_settings(models_dir=shared_models_dir())
    pipe = MultiTalkPipeline(w.load_components(settings), settings, tiny_config().buckets)
    out = pipe.render(one_person_job(num_frames=5))
    assert tuple(out.frames.shape) == (5, 64, 128, 3)


def _copy_models(tmp_path):
    dst = tmp_path / "models"
    shutil.copytree(shared_models_dir(), dst)
    return dst


def test_missing_adapter_names_repo_file_and_places(tmp_path):
    root = _copy_models(tmp_path)
    (root / w.ADAPTER_REPO / w.ADAPTER_FILE).unlink()
    with pytest.raises(MissingWeightsError) as err:
        w.resolve_folders(tiny_settings(models_dir=root))
    message = str(err.value)
    assert "MeiGen-AI/MeiGen-MultiTalk : multitalk.safetensors" in message
    assert str(root / w.ADAPTER_REPO) in message and "dubflow models download" in message


def test_missing_shard_is_reported(tmp_path):
    root = _copy_models(tmp_path)
    shutil.rmtree(root / w.BASE_DIFFUSERS_REPO / "transformer")
    (root / w.BASE_REPO / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MissingWeightsError, match="diffusion_pytorch_model-00002-of-00002.safetensors"):
        w.resolve_folders(tiny_settings(models_dir=root))


def test_unexpected_or_overriding_keys_are_rejected(tmp_path):
    root = _copy_models(tmp_path)
    adapter_path = root / w.ADAPTER_REPO / w.ADAPTER_FILE
    tensors = load_file(str(adapter_path))
    tensors["blocks.0.self_attn.q.weight"] = torch.zeros(64, 64)  # an adapter overriding a base weight
    save_file(tensors, str(adapter_path))
    folders = w.resolve_folders(tiny_settings(models_dir=root, base_layout="original"))
    with pytest.raises(EngineSetupError, match="unexpected"):
        w.load_transformer(folders["base"], "base", adapter_path, 2, 16, "cpu", torch.float32)


def test_check_weights_and_report(tmp_path):
    root = _copy_models(tmp_path)
    (root / w.WAV2VEC_REPO / "model.safetensors").unlink()
    parts = {"encoders", "multitalk", "infinitetalk-single", "infinitetalk-multi", "wav2vec"}
    assert {s.component for s in w.check_weights(root)} == {"base-diffusers", *parts}
    shutil.rmtree(root / w.BASE_DIFFUSERS_REPO / "transformer")
    statuses = w.check_weights(root, sha256=True)
    assert {s.component for s in statuses} == {"base", *parts}
    missing = [s for s in statuses if not s.present]
    assert [(s.repo_id, s.filename) for s in missing] == [(w.WAV2VEC_REPO, "model.safetensors")]
    adapter = next(s for s in statuses if s.filename == w.ADAPTER_FILE)
    assert (
        adapter.size == (root / w.ADAPTER_REPO / w.ADAPTER_FILE).stat().st_size and len(adapter.sha256) == 64
    )
    report = w.format_weight_report(statuses)
    assert "MISSING wav2vec" in report and f"{len(statuses) - 1} of {len(statuses)} files present" in report


def test_download_uses_allow_patterns_into_the_models_folder(tmp_path, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, local_dir=None):
        calls.append((repo_id, revision, tuple(allow_patterns), local_dir))
        return str(local_dir)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    w.download_weights(tmp_path, ["adapter", "wav2vec"])
    assert calls == [
        (w.ADAPTER_REPO, None, (w.ADAPTER_FILE, "*.json"), tmp_path / w.ADAPTER_REPO),
        (w.WAV2VEC_REPO, "refs/pr/1", ("*.json", "model.safetensors"), tmp_path / w.WAV2VEC_REPO),
    ]


def test_files_are_found_in_the_hugging_face_cache(tmp_path, monkeypatch):
    """A repo in the hub cache layout (models--owner--name/snapshots/<rev>/...) is found offline."""
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--MeiGen-AI--MeiGen-MultiTalk"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    shutil.copy(shared_models_dir() / w.ADAPTER_REPO / w.ADAPTER_FILE, repo / "snapshots" / commit)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    located = w.locate(w.WEIGHT_SPECS["multitalk"], models_dir=tmp_path / "empty")
    assert located.folder == repo / "snapshots" / commit and located.missing == []


def test_bf16_load_keeps_the_fp32_modules_and_renders():
    """The GPU dtype path on the CPU: bf16 weights, fp32 modulation tables and affine norms."""
    from engine.multitalk.pipeline import MultiTalkPipeline
    from engine.multitalk.tiny import tiny_config
    from tests.conftest_multitalk import two_person_job

    settings = tiny_settings(models_dir=shared_models_dir(), dtype="bf16")
    pipe = MultiTalkPipeline(w.load_components(settings), settings, tiny_config().buckets)
    dtypes = {n: p.dtype for n, p in pipe.c.transformer.named_parameters()}
    assert dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert dtypes["blocks.0.audio_cross_attn.kv_linear.weight"] == torch.bfloat16
    for name in (
        "blocks.0.scale_shift_table",
        "blocks.0.norm2.weight",
        "blocks.1.norm_x.bias",
        "scale_shift_table",
    ):
        assert dtypes[name] == torch.float32, name
    frames = pipe.render(two_person_job(num_frames=5)).frames
    assert tuple(frames.shape) == (5, 64, 128, 3) and frames.float().std() > 0
