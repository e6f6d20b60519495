"""enhance: the ffmpeg clean-up keeps every frame, its time and the picture size, odd sizes included."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from engine.media import VideoFrames, write_timed_video
from tasks.enhance import enhance_picture
from tasks.workspace import Workspace


@pytest.mark.parametrize("size", [(64, 48), (65, 33)], ids=["even", "odd"])
def test_ffmpeg_enhance_keeps_frames_times_and_size(tmp_path, size):
    width, height = size
    times_ms = [0, 30, 70, 100, 180, 200, 260]  # variable rate
    rng = np.random.default_rng(0)
    frames = [(t, rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for t in times_ms]
    source = tmp_path / "picture.mp4"
    write_timed_video(source, frames, Fraction(1, 1000))
    ws = Workspace(tmp_path / "ws")
    out = VideoFrames(ws.path(enhance_picture(ws, ws.put_file(source, move=False), "ffmpeg")))
    assert (out.width, out.height, out.count) == (width, height, len(times_ms))
    np.testing.assert_allclose(out.times, np.asarray(times_ms) / 1000, atol=1e-3)


def _picture(tmp_path, frames: int = 20, size=(64, 48)):
    from tests.footage_fixtures import write_moving_video

    return write_moving_video(tmp_path / "picture.mp4", [i / 25 for i in range(frames)], size)


def test_interpolation_to_50_fps_doubles_the_frames_over_the_same_span(tmp_path):
    from tasks.enhance import EnhanceOptions

    ws = Workspace(tmp_path / "ws")
    blob = ws.put_file(_picture(tmp_path), move=False)
    out = VideoFrames(ws.path(enhance_picture(ws, blob, EnhanceOptions("ffmpeg", fps=50))))
    assert out.count == 40
    np.testing.assert_allclose(out.times, np.arange(40) / 50, atol=1e-3)  # constant 50 fps


def test_scaling_to_the_source_size_and_deflicker(tmp_path):
    """A flickering picture rendered small goes out at the source's size, with the flicker evened out."""
    from engine.media import write_timed_video
    from tasks.enhance import EnhanceOptions

    base = np.full((48, 64, 3), 120, np.uint8)
    flicker = [
        (i, np.clip(base.astype(int) + (18 if i % 2 else -18), 0, 255).astype(np.uint8)) for i in range(20)
    ]
    write_timed_video(tmp_path / "flicker.mp4", flicker, Fraction(1, 25), crf=4)
    ws = Workspace(tmp_path / "ws")
    blob = ws.put_file(tmp_path / "flicker.mp4", move=False)
    options = EnhanceOptions("ffmpeg", denoise=False, sharpen=False, deflicker=True, size=(128, 96))
    out = VideoFrames(ws.path(enhance_picture(ws, blob, options)))
    assert (out.width, out.height, out.count) == (128, 96, 20)
    means = [float(frame.mean()) for _, frame in out.iter_frames()]
    assert np.std(means[5:]) < 0.5 * np.std([float(f.mean()) for _, f in flicker][5:])


def test_an_unknown_backend_is_refused(tmp_path):
    with pytest.raises(ValueError, match="enhance backend 'magic' is unknown; use one of: none, ffmpeg"):
        enhance_picture(Workspace(tmp_path / "ws"), None, "magic")


# ---- spandrel: the user's upscaler weights (tiny random Real-ESRGAN in the release layout) ---------------


@pytest.fixture(scope="module")
def esrgan(tmp_path_factory):
    from tests.enhance_fixtures import write_tiny_realesrgan

    return write_tiny_realesrgan(tmp_path_factory.mktemp("weights") / "RealESRGAN_x4plus.pth")


def test_spandrel_reads_architecture_and_scale_and_leaves_no_torchvision_stand_in(esrgan):
    import sys

    from tasks.enhance_model import check_model

    card = check_model(esrgan)
    assert (card.architecture, card.purpose, card.scale) == ("ESRGAN", "SR", 4)
    assert card.tags == ("8nf", "1nb") and len(card.sha256) == 64
    stand_in = sys.modules.get("torchvision")
    assert stand_in is None or getattr(stand_in, "__file__", None)  # the real package, or nothing


def test_the_torchvision_stand_in_normalizes_like_torchvision():
    import torch

    from tasks.enhance_model import _normalize

    image = torch.rand(1, 3, 4, 5)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    expected = (image - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(_normalize(image, mean, std), expected)


def test_tiles_with_enough_context_give_the_untiled_picture(esrgan):
    from tasks.enhance_model import file_sha256, load_model, restore

    model = load_model(esrgan, file_sha256(esrgan))
    image = np.random.default_rng(1).integers(0, 256, (30, 44, 3), dtype=np.uint8)
    whole = restore(model, image, tile=1000)
    assert whole.shape == (120, 176, 3)
    tiled = restore(model, image, tile=16, overlap=24)  # 9 tiles, each with the network's receptive field
    assert np.abs(whole.astype(int) - tiled).max() <= 1


def _spandrel(esrgan, size=None):
    from tasks.enhance import EnhanceOptions
    from tasks.workspace import file_sha256

    return EnhanceOptions("spandrel", size=size, model=str(esrgan), model_sha256=file_sha256(esrgan))


def test_spandrel_upscales_the_whole_frame_keeping_every_frame_and_time(tmp_path, esrgan):
    times_ms = [0, 40, 100, 120, 200]  # variable rate
    rng = np.random.default_rng(0)
    frames = [(t, rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)) for t in times_ms]
    write_timed_video(tmp_path / "small.mp4", frames, Fraction(1, 1000))
    ws = Workspace(tmp_path / "ws")
    blob = ws.put_file(tmp_path / "small.mp4", move=False)
    out = VideoFrames(ws.path(enhance_picture(ws, blob, _spandrel(esrgan))))
    assert (out.width, out.height, out.count) == (128, 96, 5)  # the model's 4x
    np.testing.assert_allclose(out.times, np.asarray(times_ms) / 1000, atol=1e-3)
    sized = VideoFrames(ws.path(enhance_picture(ws, blob, _spandrel(esrgan, size=(48, 36)))))
    assert (sized.width, sized.height, sized.count) == (48, 36, 5)  # scaled to the source's size


def test_with_paste_back_only_the_speakers_regions_change(tmp_path, esrgan):
    """The regions paste-back composited: the model's picture there, the input untouched elsewhere."""
    from engine.media import count_video_frames
    from tasks.enhance import PasteRegions
    from tasks.pasteback import outside_psnr
    from tasks.render import Clip, PersonSpec
    from tests.footage_fixtures import psnr

    ws = Workspace(tmp_path / "ws")
    source = ws.put_file(_picture(tmp_path, frames=12, size=(96, 64)), move=False)
    persons = (PersonSpec("ana", "Ana", [20, 10, 50, 40]),)
    clips = (Clip(0, source, 12, "stand-in", 0, None, ("ana",)),)
    regions = PasteRegions(source, clips, persons, feather_px=4)
    out = enhance_picture(ws, source, _spandrel(esrgan, size=(96, 64)), regions)
    assert count_video_frames(ws.path(out)) == 12
    report = outside_psnr(ws, source, out, list(clips), persons, feather_px=4)
    assert report["psnr_outside_db"] >= 40
    for (_, a), (_, b) in zip(
        VideoFrames(ws.path(source)).iter_frames(), VideoFrames(ws.path(out)).iter_frames(), strict=True
    ):
        inside = (slice(12, 38), slice(22, 48))
        assert psnr(a[inside], b[inside]) < 20  # the (grey, random-weight) model's picture, not the input


def test_manifest_refuses_missing_unknown_and_wrong_scale_weights_at_their_lines(tmp_path, esrgan):
    import shutil

    import torch

    from tasks.manifest import ManifestError, load_manifest
    from tests.hostile_corpus import GOOD

    torch.save({"encoder.weight": torch.zeros(3, 3)}, tmp_path / "mystery.pth")
    shutil.copy(esrgan, tmp_path / "x4.pth")
    cases = {
        "enhance:\n  backend: spandrel\n  model: nowhere.pth\n": (
            "enhance.model",
            "nowhere.pth: file not found; fix the path",
        ),
        "enhance:\n  backend: spandrel\n  model: mystery.pth\n": (
            "enhance.model",
            "mystery.pth: not an architecture spandrel knows",
        ),
        "enhance:\n  backend: spandrel\n  model: x4.pth\n  scale: 2\n": (
            "enhance.scale",
            "x4.pth upscales 4x (ESRGAN), not 2x; set scale: 4 or give 2x weights",
        ),
        "enhance:\n  backend: spandrel\n": ("enhance.backend", "spandrel needs model"),
        "enhance:\n  backend: ffmpeg\n  model: x4.pth\n": ("enhance.model", "used by backend: spandrel only"),
    }
    for block, (field, message) in cases.items():
        manifest = tmp_path / "ep.yaml"
        manifest.write_text(GOOD + block)
        with pytest.raises(ManifestError) as err:
            load_manifest(manifest, check_media=False)
        key = field.split(".")[1] + ":"
        line = GOOD.count("\n") + 1 + next(i for i, ln in enumerate(block.splitlines()) if key in ln)
        assert len(err.value.problems) == 1, str(err.value)
        assert str(err.value).startswith(f"{manifest}:{line}:") and f" {field}: " in str(err.value)
        assert message in str(err.value), (block, str(err.value))
    manifest.write_text(GOOD + "enhance:\n  backend: spandrel\n  model: x4.pth\n  scale: 4\n")
    assert load_manifest(manifest, check_media=False).manifest.enhance.model == tmp_path / "x4.pth"


def test_a_torchvision_that_fails_to_import_is_replaced_by_the_stand_in_and_dropped(tmp_path, esrgan):
    """The CUDA-only torchvision wheel on a CPU torch raises RuntimeError on import: spandrel still loads
    (through the stand-in), the model still runs, and no torchvision module is left behind."""
    import subprocess
    import sys
    from pathlib import Path

    broken = tmp_path / "site" / "torchvision"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    script = (
        "import sys, numpy as np\n"
        "from tasks.enhance_model import check_model, load_model, restore\n"
        f"card = check_model({str(esrgan)!r})\n"
        f"model = load_model(__import__('pathlib').Path({str(esrgan)!r}), card.sha256)\n"
        "print(card.architecture, restore(model, np.zeros((8, 8, 3), np.uint8)).shape,"
        " [m for m in sys.modules if m.startswith('torchvision')])\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {"PYTHONPATH": f"{tmp_path / 'site'}:{root}", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["ESRGAN", "(32,", "32,", "3)", "[]"]
