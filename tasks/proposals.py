"""Binding proposals: each unpinned speaker's person region (tasks/regions.py), from faces (tasks/faces.py)
followed through each shot (tasks/face_tracks.py), and which voice goes with which person.

Video: per shot, each voice track is given the person whose mouth moves most while that track speaks and least
while it is silent (an assignment over all pairs), with a confidence: how often the real timing beats the same
track shifted in time (CONFIDENCE_SHIFTS circular shifts). Under LOW_CONFIDENCE (0.9: the timing beat fewer than
9 in 10 time-shifted copies of itself) the proposal and the contact sheet say so. A still has no motion: people are given to the speakers left to right in manifest order (MultiTalk's
convention, person 1 = left) with no confidence, and the patch says that too.

A proposal only ever reaches the manifest as a patch the user pastes (`manifest_patch`); pinned boxes win.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from engine.base import FPS, Box
from engine.media import is_still, read_frames, video_size
from tasks.boxes import LOW_CONFIDENCE, Binding, TimedBox, intersection, iou, still_image
from tasks.face_tracks import ANALYSIS_WIDTH, FaceTrack, Shot, find_tracks, track_regions
from tasks.faces import Face, FaceDetector, face_detector, haar_face_detector, mouth_region, scale_box
from tasks.regions import person_regions
from tasks.segment import speech_activity

__all__ = [
    "LOW_CONFIDENCE",
    "assign_speakers",
    "haar_face_detector",
    "manifest_patch",
    "mouth_motion",
    "propose_boxes",
    "speaker_confidence",
    "speaker_scores",
]

CONFIDENCE_SHIFTS = 48  # time shifts of a track, spread over its shot, each at least a second


def mouth_motion(frames: Sequence[np.ndarray], faces: Sequence[Face | Box]) -> np.ndarray:
    """(faces, frames) mean absolute change of each mouth region from the frame before (0 for the first frame)."""
    motion = np.zeros((len(faces), len(frames)))
    for t in range(1, len(frames)):
        motion[:, t] = _motion_now(frames[t - 1], frames[t], faces)
    return motion


def _motion_now(before: np.ndarray, now: np.ndarray, faces: Sequence[Face | Box]) -> np.ndarray:
    out = np.zeros(len(faces))
    for f, face in enumerate(faces):
        m = mouth_region(face if isinstance(face, Face) else Face(face))
        a, b = now[m.y0 : m.y1, m.x0 : m.x1], before[m.y0 : m.y1, m.x0 : m.x1]
        out[f] = np.abs(a.astype(np.int16) - b).mean() if a.size else 0.0
    return out


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
    """Speaker row -> face column, one face per speaker, maximising the total score; weak pairs stay unbound,
    except one talking speaker with one face (nothing to tell apart: bound, its confidence says how sure)."""
    from scipy.optimize import linear_sum_assignment

    usable = np.nan_to_num(scores, nan=-1e3)
    rows, cols = linear_sum_assignment(-usable)
    talking = [r for r in range(len(scores)) if not np.isnan(scores[r]).all()]
    alone = len(talking) == 1 and scores.shape[1] == 1
    return {
        int(r): int(c)
        for r, c in zip(rows, cols, strict=True)
        if usable[r, c] >= min_score or (alone and r == talking[0])
    }


def speaker_confidence(motion: np.ndarray, activity: np.ndarray, speaker: int, face: int) -> float:
    """Share of circular time shifts of the speaker's track (at least a second) under which the pair scores
    worse, by its margin over the other faces, than with the real timing: near 1 when the mouth follows this
    voice, near 0.5 when the timing says nothing."""
    total = activity.shape[1]
    if total < 3 * FPS:
        return 0.0
    shifts = np.linspace(FPS, total - FPS, CONFIDENCE_SHIFTS).astype(int)
    real = _margin(speaker_scores(motion, activity[speaker : speaker + 1])[0], face)
    null = [
        _margin(speaker_scores(motion, np.roll(activity[speaker : speaker + 1], k, axis=1))[0], face)
        for k in shifts
    ]
    return float(np.mean(real > np.array(null)))


def _margin(row: np.ndarray, face: int) -> float:
    others = np.delete(row, face)
    return float(row[face] - (others.max() if len(others) else 0.0))


# ---------------------------------------------------------------------------------------------- video


def _shot_motion(path: Path, shots: Sequence[Shot]) -> list[np.ndarray]:
    """Mouth motion of every track of every shot, (tracks, shot frames), streaming the frames once."""
    motion = [np.zeros((len(s.tracks), s.end - s.start)) for s in shots]
    shot_of = np.concatenate([np.full(s.end - s.start, i) for i, s in enumerate(shots)])
    previous = None
    for t, frame in enumerate(read_frames(path, ANALYSIS_WIDTH)):
        if t >= len(shot_of):
            break
        shot = shots[shot_of[t]]
        if previous is not None and t > shot.start and shot.tracks:
            faces = [k.face_at(t) for k in shot.tracks]
            motion[shot_of[t]][:, t - shot.start] = _motion_now(previous, frame, faces)
        previous = frame
    return motion


def propose_boxes(
    source: Path | np.ndarray,
    tracks: Mapping[str, np.ndarray],
    sample_rate: int,
    *,
    pinned: Binding | None = None,
    detector: FaceDetector | None = None,
    report: list[str] | None = None,
) -> dict[str, list[TimedBox]]:
    """Proposed person regions per speaker (pinned speakers keep theirs; people under pinned boxes are not
    offered). Video: timed regions per shot from mouth motion, with a confidence. Still: left to right.
    `report` receives lines for the patch's header: which detector found the faces."""
    detector = detector or face_detector()
    report = report if report is not None else []
    report.append(f"faces found by: {detector.description}")
    pinned = {k: list(v) for k, v in (pinned or {}).items() if v}
    free = [name for name in tracks if name not in pinned]
    if is_still(source):
        return {**pinned, **_propose_still(still_image(source), free, pinned, detector, report)}
    width, height = video_size(Path(source))
    scale = width / ANALYSIS_WIDTH
    shots, total = find_tracks(Path(source), detector)
    fallback = [str(k) for k, shot in enumerate(shots) if shot.detector != detector.name]
    if fallback:
        report.append(
            f"shots {', '.join(fallback)}: no face for {detector.name}, found by {detector.fallback.name}"
        )
    activity = {n: _padded(speech_activity(tracks[n], sample_rate), total) for n in free}
    proposal: dict[str, list[TimedBox]] = {n: [] for n in free}
    for shot, motion in zip(shots, _shot_motion(Path(source), shots), strict=True):
        regions = track_regions(shot, scale, (width, height))
        offered = [i for i, k in enumerate(shot.tracks) if not _under_pinned(k, scale, pinned)]
        if not offered or not free:
            continue
        talk = np.array([activity[n][shot.start : shot.end] for n in free]).reshape(len(free), -1)
        scores = speaker_scores(motion[offered], talk)
        for s, f in assign_speakers(scores).items():
            confidence = round(speaker_confidence(motion[offered], talk, s, f), 2)
            score = round(float(np.nan_to_num(scores[s, f])), 3)
            for piece in regions[offered[f]]:
                proposal[free[s]].append(
                    TimedBox(piece.start_frame, piece.end_frame, piece.box, "proposed", score, confidence)
                )
    return {**pinned, **{n: _merge_runs(boxes) for n, boxes in proposal.items()}}


def _padded(active: np.ndarray, total: int) -> np.ndarray:
    out = np.zeros(total, bool)
    out[: min(total, len(active))] = active[:total]
    return out


def _under_pinned(track: FaceTrack, scale: float, pinned: Binding) -> bool:
    """A pinned box already holds this face (most of the face inside it, while the box is in effect)."""
    face = scale_box(track.face_at(track.start).box, scale)
    return any(
        _inside_share(face, b.box) > 0.5 and b.covers(track.start) for bs in pinned.values() for b in bs
    )


def _inside_share(face: Box, box: Box) -> float:
    return intersection(face, box) / max(1, face.width * face.height)


def _merge_runs(boxes: list[TimedBox]) -> list[TimedBox]:
    """Join consecutive pieces where the proposed box stayed put (one manifest entry instead of many)."""
    merged: list[TimedBox] = []
    for box in sorted(boxes, key=lambda b: b.start_frame):
        last = merged[-1] if merged else None
        if last and last.end_frame == box.start_frame and iou(last.box, box.box) > 0.9:
            score = min(last.score or 0.0, box.score or 0.0)
            confidence = min(last.confidence or 0.0, box.confidence or 0.0)
            merged[-1] = TimedBox(last.start_frame, box.end_frame, last.box, "proposed", score, confidence)
        else:
            merged.append(box)
    return merged


# ---------------------------------------------------------------------------------------------- still


def _propose_still(
    image: np.ndarray, free: list[str], pinned: Binding, detector: FaceDetector, report: list[str]
) -> dict[str, list[TimedBox]]:
    height, width = image.shape[:2]
    scale = width / ANALYSIS_WIDTH
    small = Image.fromarray(image).resize(
        (ANALYSIS_WIDTH, max(1, round(height / scale))), Image.Resampling.BILINEAR
    )
    found = detector(np.asarray(small))
    if not found and detector.fallback is not None:
        found = detector.fallback(np.asarray(small))
        report.append(f"no face for {detector.name}, found by {detector.fallback.name}")
    faces = [scale_box(f.box, scale) for f in found]
    regions = person_regions(faces, (width, height))
    people = [
        region
        for face, region in zip(faces, regions, strict=True)
        if not any(_inside_share(face, b.box) > 0.5 for bs in pinned.values() for b in bs if b.covers(0))
    ]
    return {name: [TimedBox(0, None, region, "proposed")] for name, region in zip(free, people, strict=False)}


# ---------------------------------------------------------------------------------------------- the patch


def manifest_patch(proposal: Binding, *, report: Sequence[str] = ()) -> str:
    """YAML for `speakers[].box` with the proposed person regions only (pinned ones stay as they are)."""
    lines = [
        "# dubflow bind --propose: review against the contact sheet, then copy into the manifest",
        "# each box is the person's region (head, neck and shoulders), not the face",
        *(f"# {line}" for line in report),
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
            coords = f"[{b.box.x0}, {b.box.y0}, {b.box.x1}, {b.box.y1}]"
            lines.append(
                f"      - {{from: {b.start_frame / FPS:.2f}, to: {end}, box: {coords}}}  # {_evidence(b)}"
            )
    return "\n".join(lines) + "\n"


def _evidence(box: TimedBox) -> str:
    if box.confidence is None:
        return "LOW CONFIDENCE: a still has no motion; people given left to right in speaker order, check it"
    text = f"score {box.score:.2f}, confidence {box.confidence:.2f}"
    return text + (" LOW CONFIDENCE: check the contact sheet" if box.needs_review else "")
