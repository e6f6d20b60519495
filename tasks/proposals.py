"""Binding proposals for video sources: faces per shot from OpenCV's Haar cascade (ships in the
opencv-python-headless 4.x wheel; no downloaded weights), then per shot each voice track is given the face whose
mouth region moves most while that track speaks and least while it is silent (an assignment over all pairs).
A proposal only ever reaches the manifest as a patch the user pastes (`manifest_patch`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from engine.base import FPS, Box, EngineSetupError
from engine.media import is_still, read_frames, video_size
from tasks.boxes import Binding, TimedBox, iou, still_image
from tasks.segment import speech_activity
from tasks.shots import is_shot_cut

FaceDetector = Callable[[np.ndarray], list[Box]]  # gray (H, W) uint8 -> face boxes in its pixels
ANALYSIS_WIDTH = 320  # faces and mouth motion are measured on frames this wide (Haar finds faces >= 24 px)


def haar_face_detector(*, min_size: int = 24) -> FaceDetector:
    """OpenCV's frontal-face Haar cascade, from the opencv-python-headless wheel (no downloaded weights)."""
    try:
        import cv2
    except ImportError as exc:
        raise EngineSetupError("face detection needs OpenCV: pip install -e '.[bind]'") from exc
    cascade_file = (
        Path(getattr(getattr(cv2, "data", None), "haarcascades", "")) / "haarcascade_frontalface_default.xml"
    )
    if not hasattr(cv2, "CascadeClassifier") or not cascade_file.is_file():
        raise EngineSetupError(
            f"OpenCV {cv2.__version__} has no Haar cascades (OpenCV 5 dropped them): "
            "pip install 'opencv-python-headless>=4.8,<5'"
        )
    cascade = cv2.CascadeClassifier(str(cascade_file))

    def detect(gray: np.ndarray) -> list[Box]:
        found = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_size, min_size))
        return [Box(int(x), int(y), int(x + w), int(y + h)) for x, y, w, h in found]

    return detect


def detect_faces(frame: np.ndarray, *, detector: FaceDetector | None = None) -> list[Box]:
    """Face boxes in one frame (gray or RGB), sorted left to right."""
    gray = frame if frame.ndim == 2 else np.asarray(Image.fromarray(frame).convert("L"))
    return sorted((detector or haar_face_detector())(gray), key=lambda b: (b.x0, b.y0))


def _face_tracks(detections: Sequence[list[Box]], min_share: float = 0.4) -> list[Box]:
    """Faces seen in several sampled frames of a shot, merged by overlap; the median box of each."""
    groups: list[list[Box]] = []
    for boxes in detections:
        for box in boxes:
            group = next((g for g in groups if iou(g[-1], box) > 0.3), None)
            if group is None:
                groups.append([box])
            else:
                group.append(box)
    seen = [g for g in groups if len(g) >= max(1, min_share * len(detections))]
    medians = [np.median([[b.x0, b.y0, b.x1, b.y1] for b in g], axis=0) for g in seen]
    return sorted((Box(*(int(v) for v in m)) for m in medians), key=lambda b: (b.x0, b.y0))


def mouth_region(face: Box) -> Box:
    """The lower-middle part of a face box, where the mouth is for a frontal face (Haar boxes: brow to chin)."""
    return Box(face.x0 + face.width // 4, face.y0 + face.height * 3 // 5, face.x1 - face.width // 4, face.y1)


def mouth_motion(frames: Sequence[np.ndarray], faces: Sequence[Box]) -> np.ndarray:
    """(faces, frames) mean absolute change of each mouth region from the frame before (0 for the first frame)."""
    motion = np.zeros((len(faces), len(frames)))
    for t in range(1, len(frames)):
        for f, face in enumerate(faces):
            m = mouth_region(face)
            now, before = frames[t][m.y0 : m.y1, m.x0 : m.x1], frames[t - 1][m.y0 : m.y1, m.x0 : m.x1]
            motion[f, t] = np.abs(now.astype(np.int16) - before).mean() if now.size else 0.0
    return motion


def speaker_scores(motion: np.ndarray, activity: np.ndarray) -> np.ndarray:
    """(speakers, faces): how much more each mouth moves while each track speaks than while it is silent.

    Motion is scaled by the shot's mean so scores compare across faces. A track that speaks through the whole
    shot is compared with the faces' average instead; one that never speaks scores NaN (no evidence).
    """
    scaled = motion / (motion.mean() + 1e-9)
    scores = np.full((len(activity), len(motion)), np.nan)
    for s, talking in enumerate(activity):
        if not talking.any():
            continue
        during = scaled[:, talking].mean(1)
        after = scaled[:, ~talking].mean(1) if (~talking).any() else np.full(len(motion), during.mean())
        scores[s] = during - after
    return scores


def assign_speakers(scores: np.ndarray, *, min_score: float = 0.1) -> dict[int, int]:
    """Speaker row -> face column, one face per speaker, maximising the total score; weak pairs stay unbound."""
    from scipy.optimize import linear_sum_assignment

    usable = np.nan_to_num(scores, nan=-1e3)
    rows, cols = linear_sum_assignment(-usable)
    return {int(r): int(c) for r, c in zip(rows, cols, strict=True) if usable[r, c] >= min_score}


@dataclass(frozen=True)
class _Shot:
    start: int
    end: int
    faces: tuple[Box, ...]  # analysis pixels


def _shots(path: Path, detector: FaceDetector, sample_every: int = 12) -> tuple[list[_Shot], int]:
    """Pass 1: shot cuts, and faces on every `sample_every`-th frame and on each shot's first frame."""
    cuts, detections, previous, total = [0], [], None, 0
    for t, frame in enumerate(read_frames(path, ANALYSIS_WIDTH)):
        small = np.asarray(Image.fromarray(frame).resize((64, 36), Image.Resampling.BILINEAR))
        new_shot = previous is not None and is_shot_cut(previous, small) and t - cuts[-1] >= 3
        if new_shot:
            cuts.append(t)
        if new_shot or t % sample_every == 0:
            detections.append((t, detect_faces(frame, detector=detector)))
        previous, total = small, t + 1
    bounds = [*cuts, total]
    shots = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        sampled = [faces for t, faces in detections if start <= t < end]
        shots.append(_Shot(start, end, tuple(_face_tracks(sampled))))
    return shots, total


def _shot_motion(path: Path, shots: Sequence[_Shot]) -> list[np.ndarray]:
    """Pass 2: mouth motion of every face of every shot, streaming the frames once."""
    motion = [np.zeros((len(s.faces), s.end - s.start)) for s in shots]
    shot_of = np.concatenate([np.full(s.end - s.start, i) for i, s in enumerate(shots)])
    previous = None
    for t, frame in enumerate(read_frames(path, ANALYSIS_WIDTH)):
        if t >= len(shot_of):
            break
        shot = shots[shot_of[t]]
        if previous is not None and t > shot.start:
            motion[shot_of[t]][:, t - shot.start] = mouth_motion([previous, frame], shot.faces)[:, 1]
        previous = frame
    return motion


def _to_source(box: Box, scale: float) -> Box:
    return Box(*(round(v * scale) for v in (box.x0, box.y0, box.x1, box.y1)))


def propose_boxes(
    source: Path | np.ndarray,
    tracks: Mapping[str, np.ndarray],
    sample_rate: int,
    *,
    pinned: Binding | None = None,
    detector: FaceDetector | None = None,
) -> dict[str, list[TimedBox]]:
    """Proposed boxes per speaker (pinned speakers keep theirs; faces under pinned boxes are not offered).

    Video: per shot, the face whose mouth moves with the track. Still image: no motion to go by, so faces are
    given to unpinned speakers left to right, with no score: check the contact sheet.
    """
    detector = detector or haar_face_detector()
    pinned = {k: list(v) for k, v in (pinned or {}).items() if v}
    free = [name for name in tracks if name not in pinned]
    if is_still(source):
        return {**pinned, **_proposestill_image(still_image(source), free, pinned, detector)}
    scale = video_size(Path(source))[0] / ANALYSIS_WIDTH
    shots, total = _shots(Path(source), detector)
    activity = {n: _padded(speech_activity(tracks[n], sample_rate), total) for n in free}
    proposal: dict[str, list[TimedBox]] = {n: [] for n in free}
    for shot, motion in zip(shots, _shot_motion(Path(source), shots), strict=True):
        faces = [
            i for i, f in enumerate(shot.faces) if not _under_pinned(_to_source(f, scale), pinned, shot.start)
        ]
        if not faces or not free:
            continue
        talk = np.array([activity[n][shot.start : shot.end] for n in free]).reshape(len(free), -1)
        scores = speaker_scores(motion[faces], talk)
        for s, f in assign_speakers(scores).items():
            box = _to_source(shot.faces[faces[f]], scale)
            proposal[free[s]].append(
                TimedBox(shot.start, shot.end, box, "proposed", round(float(scores[s, f]), 3))
            )
    return {**pinned, **{n: _merge_runs(boxes) for n, boxes in proposal.items()}}


def _padded(active: np.ndarray, total: int) -> np.ndarray:
    out = np.zeros(total, bool)
    out[: min(total, len(active))] = active[:total]
    return out


def _under_pinned(face: Box, pinned: Binding, frame: int) -> bool:
    return any(iou(face, b.box) > 0.3 and b.covers(frame) for boxes in pinned.values() for b in boxes)


def _merge_runs(boxes: list[TimedBox]) -> list[TimedBox]:
    """Join consecutive shots where the proposed box stayed put (one manifest entry instead of many)."""
    merged: list[TimedBox] = []
    for box in boxes:
        last = merged[-1] if merged else None
        if last and last.end_frame == box.start_frame and iou(last.box, box.box) > 0.8:
            score = min(last.score or 0.0, box.score or 0.0)
            merged[-1] = TimedBox(last.start_frame, box.end_frame, last.box, "proposed", score)
        else:
            merged.append(box)
    return merged


def _proposestill_image(
    image: np.ndarray, free: list[str], pinned: Binding, detector: FaceDetector
) -> dict[str, list[TimedBox]]:
    faces = [f for f in detect_faces(image, detector=detector) if not _under_pinned(f, pinned, 0)]
    return {name: [TimedBox(0, None, face, "proposed")] for name, face in zip(free, faces, strict=False)}


def manifest_patch(proposal: Binding) -> str:
    """YAML for `speakers[].box` with the proposed boxes only (pinned ones stay as they are in the manifest)."""
    lines = [
        "# dubflow bind --propose: review against the contact sheet, then copy into the manifest",
        "speakers:",
    ]
    for name, boxes in proposal.items():
        proposed = [b for b in boxes if b.source == "proposed"]
        if not proposed:
            note = (
                "pinned in the manifest, kept" if boxes else "no face matched this voice: set its box by hand"
            )
            lines.append(f"  # {name}: {note}")
            continue
        lines += [f"  - id: {name}", "    box:"]
        for b in proposed:
            end = "null" if b.end_frame is None else f"{b.end_frame / FPS:.2f}"
            score = "" if b.score is None else f"  # score {b.score:.2f}"
            coords = f"[{b.box.x0}, {b.box.y0}, {b.box.x1}, {b.box.y1}]"
            lines.append(f"      - {{from: {b.start_frame / FPS:.2f}, to: {end}, box: {coords}}}{score}")
    return "\n".join(lines) + "\n"
