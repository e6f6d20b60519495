"""Binding: pinned boxes, proposals from faces and mouth motion on generated videos, the checks, the contact sheet.

The generated videos have drawn faces, the Haar cascade's domain (MTCNN learnt photographs; real footage is in
tests/test_bind_footage.py). The cascade ships in opencv-python-headless 4.x only (OpenCV 5 dropped it): the tests
that need it skip with that reason; the active-speaker scoring is also tested on given boxes, without a detector.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from bench.plan import face_box, mouth_openings, speak, write_talking_scene
from engine.base import AUDIO_RATE, FPS, Box, EngineSetupError
from engine.media import MediaError
from tasks.bind import BindingError, TimedBox, bind_tracks, boxes_for_segment, check_binding, timed_boxes
from tasks.boxes import active_sets, intersection
from tasks.contact_sheet import COLOURS, contact_sheet
from tasks.faces import Face, FaceDetector
from tasks.proposals import (
    assign_speakers,
    haar_face_detector,
    manifest_patch,
    mouth_motion,
    propose_boxes,
    speaker_confidence,
    speaker_scores,
)
from tasks.regions import head_coverage, person_regions
from tasks.segment import speech_activity
from tasks.shots import detect_shots


def lines(seconds: float, *spans: tuple[float, float], pitch: float = 150.0) -> np.ndarray:
    """A track speaking in the given (start s, end s) spans."""
    track = np.zeros(int(seconds * AUDIO_RATE), np.float32)
    rng = np.random.default_rng(int(pitch))
    for start, end in spans:
        speak(track, int(start * AUDIO_RATE), int((end - start) * AUDIO_RATE), rng, pitch)
    return track


def haar_or_skip():
    try:
        return haar_face_detector()
    except EngineSetupError as exc:
        pytest.skip(str(exc))


TWO = {
    "ana": lines(8, (0.3, 1.9), (4.3, 5.7), pitch=120),
    "ben": lines(8, (2.2, 3.8), (6.0, 7.7), pitch=190),
}
# Shot 2 (from frame 100 = 4 s) swaps the two people's places.
TWO_SHOTS = [
    (0, {"ana": (80, 90, 42), "ben": (240, 90, 42)}),
    (100, {"ana": (235, 92, 40), "ben": (85, 88, 40)}),
]
THREE = {
    "ana": lines(6, (0.2, 1.6), (4.4, 5.2), pitch=110),
    "ben": lines(6, (1.9, 3.0), (5.2, 5.9), pitch=170),
    "cy": lines(6, (3.2, 4.3), pitch=230),
}
THREE_SHOTS = [(0, {"ana": (55, 90, 36), "ben": (160, 95, 36), "cy": (265, 88, 36)})]


@pytest.fixture(scope="module")
def two_people(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bind") / "two people.mp4"  # a space in the path on purpose
    write_talking_scene(path, TWO, TWO_SHOTS)
    return path


@pytest.fixture(scope="module")
def three_people(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bind") / "three.mp4"
    write_talking_scene(path, THREE, THREE_SHOTS, seed=1)
    return path


def bound_right(proposal: dict[str, list[TimedBox]], shots: list) -> bool:
    """Every proposed region holds the whole face of the right person in its shot, and no other face."""
    for name, boxes in proposal.items():
        for b in boxes:
            k = max(i for i, (start, _) in enumerate(shots) if start <= b.start_frame)
            faces = {n: face_box(spot) for n, spot in shots[k][1].items()}
            if head_coverage(faces[name], b.box) < 0.99:
                return False
            if any(intersection(b.box, f) for n, f in faces.items() if n != name):
                return False
    return True


def test_shot_cuts_are_found_on_the_frame(two_people: Path) -> None:
    assert detect_shots(two_people) == [100]


def test_proposal_binds_each_voice_to_its_face_in_every_shot(two_people: Path) -> None:
    proposal = propose_boxes(two_people, TWO, AUDIO_RATE, detector=haar_or_skip())
    assert bound_right(proposal, TWO_SHOTS)
    assert [(b.start_frame, b.end_frame) for b in proposal["ana"]] == [(0, 100), (100, 200)]
    assert all(b.source == "proposed" and b.score > 0.1 and b.confidence >= 0.9 for b in proposal["ben"])


def test_proposal_binds_three_people(three_people: Path) -> None:
    proposal = propose_boxes(three_people, THREE, AUDIO_RATE, detector=haar_or_skip())
    assert all(len(proposal[name]) == 1 for name in THREE)
    assert bound_right(proposal, THREE_SHOTS)


def test_pinned_boxes_win_and_their_face_is_not_offered_again(two_people: Path) -> None:
    pinned_box = face_box(TWO_SHOTS[0][1]["ben"])  # pinned where ben is in shot 1 (ana's place in shot 2)
    pinned = {"ben": [TimedBox(0, None, pinned_box)]}
    proposal = propose_boxes(two_people, TWO, AUDIO_RATE, pinned=pinned, detector=haar_or_skip())
    assert proposal["ben"] == pinned["ben"]
    assert len(proposal["ana"]) == 1  # shot 2's right face is under the pin: ana is not offered it
    assert intersection(proposal["ana"][0].box, pinned_box) == 0
    assert "ben: pinned in the manifest, kept" in manifest_patch(proposal)


def test_active_speaker_scoring_on_given_boxes() -> None:
    """No detector: frames with two drawn faces, candidates given; the moving mouth goes with the talking track."""
    spots = {"ana": (80, 90, 42), "ben": (240, 90, 42)}
    openings = mouth_openings(TWO)
    from PIL import ImageDraw

    from bench.plan import draw_face

    frames = []
    for t in range(100):
        image = Image.new("L", (320, 180), 90)
        for name, spot in spots.items():
            draw_face(ImageDraw.Draw(image), spot, float(openings[name][t]))
        frames.append(np.asarray(image))
    faces = [face_box(spots["ben"]), face_box(spots["ana"])]  # detector order need not match speaker order
    activity = np.array([speech_activity(TWO[n], AUDIO_RATE)[:100] for n in ("ana", "ben")])
    scores = speaker_scores(mouth_motion(frames, faces), activity)
    assert assign_speakers(scores) == {0: 1, 1: 0}


def test_confidence_is_high_when_the_mouth_follows_the_voice_and_low_when_it_does_not() -> None:
    rng = np.random.default_rng(0)
    talking = np.zeros(250, bool)
    for start in (10, 70, 120, 200):  # irregular turns, as in a dialogue
        talking[start : start + int(rng.integers(20, 35))] = True
    follows = np.where(talking, 1.0, 0.1) + rng.normal(0, 0.05, 250)
    unrelated = rng.uniform(0, 1, 250)
    motion = np.array([unrelated, follows])
    assert speaker_confidence(motion, talking[None], 0, 1) >= 0.95
    assert speaker_confidence(motion, talking[None], 0, 0) < 0.5  # the other face: no better than shifted
    assert speaker_confidence(motion[:, :50], talking[None, :50], 0, 1) == 0.0  # under 3 s: no evidence


def test_one_face_and_one_talking_voice_are_bound_even_on_a_weak_score() -> None:
    assert assign_speakers(np.array([[0.02]])) == {0: 0}  # its confidence, not the score, says how sure
    assert assign_speakers(np.array([[0.02, 0.01]])) == {}  # two faces: a weak score decides nothing


def test_a_silent_track_gets_no_face() -> None:
    motion = np.array([[0.0, 1.0, 0.0, 1.0], [0.0, 0.1, 0.1, 0.0]])
    activity = np.array([[False, True, False, True], [False, False, False, False]])
    assert assign_speakers(speaker_scores(motion, activity)) == {0: 0}


def test_manifest_patch_is_yaml_in_seconds() -> None:
    proposal = {
        "ana": [
            TimedBox(0, 100, Box(10, 20, 110, 140), "proposed", 1.5),
            TimedBox(100, None, Box(1, 2, 3, 4)),
        ],
        "ben": [],
    }
    patch = manifest_patch(proposal)
    data = yaml.safe_load(patch)
    assert data["speakers"] == [{"id": "ana", "box": [{"from": 0.0, "to": 4.0, "box": [10, 20, 110, 140]}]}]
    assert "ben: no face matched this voice" in patch
    assert timed_boxes(data["speakers"][0]["box"]) == [TimedBox(0, 100, Box(10, 20, 110, 140))]


def test_manifest_box_forms_and_segment_boxes() -> None:
    assert timed_boxes([120, 60, 560, 700]) == [TimedBox(0, None, Box(120, 60, 560, 700))]
    moving = timed_boxes(
        [{"from": 0, "to": 2.0, "box": [0, 0, 10, 10]}, {"from": 2.0, "box": [5, 0, 15, 10]}]
    )
    assert boxes_for_segment(moving, 0, 40) == Box(0, 0, 10, 10)
    assert boxes_for_segment(moving, 30, 80) == ((0, Box(0, 0, 10, 10)), (20, Box(5, 0, 15, 10)))
    assert boxes_for_segment([], 0, 10) is None


def test_checks_locate_bad_boxes() -> None:
    activity = {"ana": np.ones(200, bool), "ben": np.zeros(200, bool), "cy": np.zeros(200, bool)}
    binding = {
        "ana": [TimedBox(0, None, Box(1800, 100, 2000, 400))],  # outside a 1920x1080 frame
        "ben": [TimedBox(0, None, Box(100, 100, 130, 130))],  # 13 px at 480: under one token
        "cy": [TimedBox(0, None, Box(500, 500, 620, 620))],  # 53 px: lips lack detail
    }
    problems = check_binding(binding, (1920, 1080), activity)
    found = {(p.severity, p.field) for p in problems}
    assert ("error", "speakers[0].box") in found and ("error", "speakers[1].box") in found
    assert ("warning", "speakers[2].box") in found
    assert "outside the 1920x1080 picture" in problems[0].message


def test_checks_find_overlaps_and_speech_without_a_box() -> None:
    activity = {"ana": np.ones(200, bool), "ben": np.zeros(200, bool)}
    activity["ben"][150:190] = True
    binding = {
        "ana": [TimedBox(0, 100, Box(100, 100, 500, 500))],  # no box for ana in shot 2
        "ben": [TimedBox(0, None, Box(150, 150, 520, 520))],  # mostly on top of ana's
    }
    problems = check_binding(binding, (1920, 1080), activity, shot_cuts=[100])
    assert [(p.severity, p.speaker) for p in problems] == [("error", "ben"), ("warning", "ana")]
    assert "talks for 4.0 s in shot 1" in problems[1].message


def test_active_sets_per_frame() -> None:
    sets = active_sets({"ana": np.array([1, 1, 0], bool), "ben": np.array([0, 1, 1, 1], bool)})
    assert sets == [frozenset({"ana"}), frozenset({"ana", "ben"}), frozenset({"ben"}), frozenset({"ben"})]


def test_contact_sheet_draws_each_speaker_in_its_colour(two_people: Path, tmp_path: Path) -> None:
    binding = {
        name: [
            TimedBox(s, e, face_box(TWO_SHOTS[k][1][name])) for k, (s, e) in enumerate([(0, 100), (100, 200)])
        ]
        for name in TWO
    }
    activity = {n: speech_activity(a, AUDIO_RATE) for n, a in TWO.items()}
    out = contact_sheet(two_people, binding, activity, tmp_path / "sheet.png", shot_cuts=[100])
    sheet = np.asarray(Image.open(out).convert("RGB"))
    assert sheet.shape[1] == 2 * 320  # two shots side by side
    ana = face_box(TWO_SHOTS[0][1]["ana"])
    assert tuple(sheet[14 + (ana.y0 + ana.y1) // 2, ana.x0]) == COLOURS[0]  # left edge of ana's box, shot 1


def test_contact_sheet_of_a_still(tmp_path: Path) -> None:
    image = np.full((90, 160, 3), 128, np.uint8)
    out = contact_sheet(
        image,
        {"ana": [TimedBox(0, None, Box(10, 10, 60, 60))]},
        {"ana": np.ones(FPS, bool)},
        tmp_path / "s.png",
    )
    assert Image.open(out).size[0] == 320


def test_bind_stage_keeps_pinned_boxes_and_reports_the_rest(two_people: Path, tmp_path: Path) -> None:
    activity = {n: speech_activity(a, AUDIO_RATE) for n, a in TWO.items()}
    result = bind_tracks(two_people, {"ana": [20, 40, 140, 140]}, activity, tmp_path / "sheet.png")
    assert result.shot_cuts == (100,) and result.contact_sheet.is_file()
    assert result.boxes == {"ana": [TimedBox(0, None, Box(20, 40, 140, 140))], "ben": []}
    assert not result.errors
    assert {p.speaker for p in result.problems} == {"ben"}  # talks in both shots with no box: QC warnings


def test_a_still_gets_people_left_to_right_for_the_unpinned_speakers_only() -> None:
    # faces in the detector's pixels: the still is analysed at ANALYSIS_WIDTH (480), here half of its 960
    left, middle, right = Box(20, 20, 60, 70), Box(220, 20, 260, 70), Box(420, 20, 460, 70)
    seen = []

    def detect(rgb: np.ndarray) -> list[Face]:
        seen.append(rgb.shape)
        return [Face(right), Face(left), Face(middle)]  # any order

    pinned = {"ben": [TimedBox(0, None, Box(430, 30, 530, 150))]}  # over the middle face
    tracks = {name: np.zeros(AUDIO_RATE, np.float32) for name in ("ana", "ben", "cy")}
    still = np.zeros((270, 960, 3), np.uint8)
    proposal = propose_boxes(still, tracks, AUDIO_RATE, pinned=pinned, detector=FaceDetector("fake", detect))
    assert seen == [(135, 480, 3)]
    faces = [Box(*(2 * v for v in (b.x0, b.y0, b.x1, b.y1))) for b in (left, middle, right)]
    regions = person_regions(faces, (960, 270))
    assert proposal["ben"] == pinned["ben"]
    assert [b.box for b in proposal["ana"]] == [regions[0]] and [b.box for b in proposal["cy"]] == [
        regions[2]
    ]
    assert proposal["cy"][0].confidence is None and proposal["cy"][0].needs_review  # a guess, said so
    assert "LOW CONFIDENCE: a still has no motion" in manifest_patch(proposal)


def test_bad_box_specs_and_media_give_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(BindingError, match=r"\[x0, y0, x1, y1\].*\[1, 2, 3\]"):
        timed_boxes([1, 2, 3])
    with pytest.raises(BindingError, match="got None"):
        timed_boxes([{"from": 0.0, "to": 1.0}])
    with pytest.raises(MediaError, match="missing.mp4: file not found"):
        detect_shots(tmp_path / "missing.mp4")


def test_bind_stage_stops_on_a_binding_error_with_its_type(tmp_path: Path) -> None:
    """An error the manifest must fix (here: a box outside the picture) raises BindingError, which the flow does
    not retry; it is still a ValueError for callers that catch those."""
    import soundfile as sf

    from tasks.bind import bind_stage
    from tasks.speakers import MIX_RATE
    from tasks.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    still = tmp_path / "still.png"
    Image.new("RGB", (320, 180), (90, 90, 90)).save(still)
    wav = tmp_path / "ana.wav"
    sf.write(wav, np.zeros(MIX_RATE, np.float32), MIX_RATE)
    source, track = ws.put_file(still, move=False), ws.put_file(wav, move=False)
    with pytest.raises(BindingError, match=r"speakers\[0\]\.box") as err:
        bind_stage(ws, source, {"ana": track}, {"ana": [300, 100, 900, 900]}, 480)
    assert isinstance(err.value, ValueError)
