"""Bind voice tracks to people on screen: pinned manifest boxes, proposals from faces and mouth motion, checks.

A binding is, per speaker, a list of `TimedBox`es on the 25 fps grid. Boxes pinned in the manifest always win; a
proposal (`propose_boxes`) only ever reaches the manifest as a patch the user pastes (`manifest_patch`).

Proposal, for video sources: shot cuts (`detect_shots`), faces per shot from OpenCV's Haar cascade (ships in the
opencv-python-headless 4.x wheel; no downloaded weights), then per shot each voice track is given the face whose
mouth region moves most while that track speaks and least while it is silent (an assignment over all pairs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from prefect import task

from engine.base import FPS, Box, EngineSetupError, TimedBoxes
from engine.media import atomic_path, is_still, read_frames, video_size
from tasks.segment import speech_activity
from tasks.workspace import Blob, Workspace, stage_cache

FaceDetector = Callable[[np.ndarray], list[Box]]  # gray (H, W) uint8 -> face boxes in its pixels
ANALYSIS_WIDTH = 320  # faces and mouth motion are measured on frames this wide (Haar finds faces >= 24 px)
COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


@dataclass(frozen=True)
class TimedBox:
    start_frame: int
    end_frame: int | None  # half-open; None: to the end of the episode
    box: Box
    source: Literal["pinned", "proposed"] = "pinned"
    score: float | None = None  # proposals: how much more the mouth moves while the track speaks

    def covers(self, frame: int) -> bool:
        return self.start_frame <= frame and (self.end_frame is None or frame < self.end_frame)


@dataclass(frozen=True)
class Problem:
    severity: Literal["error", "warning"]  # error: the manifest must change; warning: a QC note
    message: str
    field: str = ""  # manifest path, e.g. "speakers[1].box[0]", for the loader to turn into FILE:LINE:COL
    speaker: str | None = None


Binding = Mapping[str, Sequence[TimedBox]]


def timed_boxes(spec: Any) -> list[TimedBox]:
    """A manifest box spec -> TimedBoxes: `[x0, y0, x1, y1]`, a Box, or a list of {from, to, box} in seconds."""
    if spec is None:
        return []
    if isinstance(spec, Box) or all(isinstance(v, int | float) for v in spec):
        return [TimedBox(0, None, _box(spec))]
    out = []
    for item in spec:
        end = item.get("to")
        box = _box(item.get("box"))
        out.append(TimedBox(round(item.get("from", 0) * FPS), None if end is None else round(end * FPS), box))
    return out


def _box(values: Any) -> Box:
    if isinstance(values, Box):
        return values
    if not isinstance(values, Sequence) or len(values) != 4:
        raise ValueError(f"a box is [x0, y0, x1, y1] in source pixels, got {values!r}")
    return Box(*(int(v) for v in values))


def boxes_for_segment(boxes: Sequence[TimedBox], start: int, end: int) -> Box | TimedBoxes | None:
    """The engine's box for one segment [start, end): one Box, or ((frame in the segment, Box), ...)."""
    inside = [b for b in boxes if b.start_frame < end and (b.end_frame is None or b.end_frame > start)]
    if len(inside) <= 1:
        return inside[0].box if inside else None
    return tuple((max(0, b.start_frame - start), b.box) for b in sorted(inside, key=lambda b: b.start_frame))


def active_sets(activity: Mapping[str, np.ndarray]) -> list[frozenset[str]]:
    """Per frame, the speakers talking in it: the planner cuts where this set changes."""
    names = list(activity)
    total = max((len(a) for a in activity.values()), default=0)
    grid = np.zeros((len(names), total), bool)
    for row, name in enumerate(names):
        grid[row, : len(activity[name])] = activity[name]
    return [frozenset(names[r] for r in np.flatnonzero(column)) for column in grid.T]


# ---------------------------------------------------------------------------------------------- reading media


def _still(source: Path | np.ndarray) -> np.ndarray:
    if isinstance(source, np.ndarray):
        return source
    with Image.open(source) as image:
        return np.asarray(image.convert("RGB"))


# ---------------------------------------------------------------------------------------------- shots


SHOT_THRESHOLD = 0.3


def is_shot_cut(before: np.ndarray, after: np.ndarray, threshold: float = SHOT_THRESHOLD) -> bool:
    """A new shot changes the whole picture: its gray histogram (total variation) or most of its pixels."""
    hist_before = np.histogram(before, bins=32, range=(0, 256))[0] / before.size
    hist_after = np.histogram(after, bins=32, range=(0, 256))[0] / after.size
    change = 0.5 * np.abs(hist_after - hist_before).sum()
    pixels = np.abs(after.astype(np.int16) - before).mean() / 255
    return max(change, 2 * pixels) > threshold


def shot_cuts_from_frames(frames: Iterable[np.ndarray], *, threshold: float = SHOT_THRESHOLD) -> list[int]:
    """Frame indices that start a new shot (at least 3 frames apart, so a flash is not two cuts)."""
    cuts: list[int] = []
    previous = None
    for i, frame in enumerate(frames):
        if (
            previous is not None
            and is_shot_cut(previous, frame, threshold)
            and (not cuts or i - cuts[-1] >= 3)
        ):
            cuts.append(i)
        previous = frame
    return cuts


def detect_shots(video_path: Path, *, threshold: float = SHOT_THRESHOLD) -> list[int]:
    """Shot cuts of a video, as the 25 fps frame index where each new shot starts (a still has none)."""
    if is_still(video_path):
        return []
    return shot_cuts_from_frames(read_frames(video_path, 64), threshold=threshold)


# ---------------------------------------------------------------------------------------------- faces


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


def _intersection(a: Box, b: Box) -> int:
    return max(0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0, min(a.y1, b.y1) - max(a.y0, b.y0))


def iou(a: Box, b: Box) -> float:
    shared = _intersection(a, b)
    union = a.width * a.height + b.width * b.height - shared
    return shared / union if union > 0 else 0.0


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


# ---------------------------------------------------------------------------------------------- active speaker


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


# ---------------------------------------------------------------------------------------------- proposal


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
        return {**pinned, **_propose_still(_still(source), free, pinned, detector)}
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


def _propose_still(
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


# ---------------------------------------------------------------------------------------------- checks


def check_binding(
    boxes: Binding,
    frame_size: tuple[int, int],
    activity: Mapping[str, np.ndarray],
    *,
    shot_cuts: Sequence[int] = (),
    size: int = 480,
    min_talk_frames: int = 5,
) -> list[Problem]:
    """Located problems of a binding: box geometry (errors), overlaps, and speech where a speaker has no box."""
    width, height = frame_size
    scale = size / min(width, height)  # the engine's bucket (ENGINE.md §4.1) is within ~7 % of this scale
    problems: list[Problem] = []
    for s, (name, timed) in enumerate(boxes.items()):
        for j, b in enumerate(timed):
            field = f"speakers[{s}].box" + (f"[{j}]" if len(timed) > 1 else "")
            problems += _box_problems(b.box, width, height, scale, field, name)
    problems += _overlap_problems(boxes)
    problems += _unboxed_speech(boxes, activity, shot_cuts, min_talk_frames)
    return problems


def _box_problems(box: Box, width: int, height: int, scale: float, field: str, name: str) -> list[Problem]:
    coords = f"[{box.x0}, {box.y0}, {box.x1}, {box.y1}]"
    if box.x1 <= box.x0 or box.y1 <= box.y0:
        return [
            Problem("error", f"{name}: box {coords} is empty or inverted (x1 > x0 and y1 > y0)", field, name)
        ]
    if box.x0 < 0 or box.y0 < 0 or box.x1 > width or box.y1 > height:
        message = f"{name}: box {coords} reaches outside the {width}x{height} picture; clip it to the frame"
        return [Problem("error", message, field, name)]
    side = min(box.width, box.height) * scale
    if side < 16:  # one DiT token is 16x16 render pixels (VAE 8x, patch 2): the mask would cover no token
        message = (
            f"{name}: box {coords} is {side:.0f} px at render size, under one 16-px token: make it larger"
        )
        return [Problem("error", message, field, name)]
    if side < 64:
        message = (
            f"{name}: box {coords} is only {side:.0f} px at render size; lips will lack detail (>= 64 px)"
        )
        return [Problem("warning", message, field, name)]
    return []


def _overlap_problems(boxes: Binding) -> list[Problem]:
    names, problems = list(boxes), []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            worst = max((_overlap(p, q) for p in boxes[a] for q in boxes[b] if _same_time(p, q)), default=0.0)
            if worst > 0.2:
                severity = "error" if worst > 0.5 else "warning"
                message = f"{a} and {b}: boxes overlap by {worst:.0%} of the smaller one; the engine cannot tell them apart"
                problems.append(Problem(severity, message, f"speakers[{names.index(b)}].box", b))
    return problems


def _overlap(p: TimedBox, q: TimedBox) -> float:
    """Shared area as a share of the smaller box: a small face inside a big box is a total overlap."""
    smaller = min(p.box.width * p.box.height, q.box.width * q.box.height)
    return _intersection(p.box, q.box) / smaller if smaller > 0 else 0.0


def _same_time(p: TimedBox, q: TimedBox) -> bool:
    p_end = p.end_frame if p.end_frame is not None else np.inf
    q_end = q.end_frame if q.end_frame is not None else np.inf
    return p.start_frame < q_end and q.start_frame < p_end


def _unboxed_speech(
    boxes: Binding, activity: Mapping[str, np.ndarray], shot_cuts: Sequence[int], min_frames: int
) -> list[Problem]:
    problems = []
    for s, (name, active) in enumerate(activity.items()):
        bounds = [0, *sorted(c for c in shot_cuts if 0 < c < len(active)), len(active)]
        covered = np.zeros(len(active), bool)
        for b in boxes.get(name, ()):
            covered[b.start_frame : b.end_frame] = True
        for k, (lo, hi) in enumerate(zip(bounds, bounds[1:], strict=False)):
            talking = int((active[lo:hi] & ~covered[lo:hi]).sum())
            if talking >= min_frames:
                message = (
                    f"{name} talks for {talking / FPS:.1f} s in shot {k} ({lo / FPS:.2f}-{hi / FPS:.2f} s) "
                    "without a box: off screen, or bind it"
                )
                problems.append(Problem("warning", message, f"speakers[{s}].box", name))
    return problems


# ---------------------------------------------------------------------------------------------- contact sheet


def _representatives(source: Path | np.ndarray, frames: Sequence[int], width: int) -> dict[int, np.ndarray]:
    if is_still(source):
        image = Image.fromarray(_still(source))
        small = image.resize((width, max(1, round(image.height * width / image.width))))
        return dict.fromkeys(frames, np.asarray(small))
    wanted, found = set(frames), {}
    for t, frame in enumerate(read_frames(Path(source), width, colour=True)):
        if t in wanted:
            found[t] = frame
        if len(found) == len(wanted):
            break
    return found


def contact_sheet(
    source: Path | np.ndarray,
    boxes: Binding,
    activity: Mapping[str, np.ndarray],
    out_png: Path,
    *,
    shot_cuts: Sequence[int] = (),
    thumb_width: int = 320,
    columns: int = 3,
) -> Path:
    """One panel per shot: its middle frame with each speaker's box in that speaker's colour and name, and under
    it one strip per track showing when it speaks in the shot. Written atomically as PNG."""
    total = max((len(a) for a in activity.values()), default=1)
    bounds = [0, *sorted(c for c in shot_cuts if 0 < c < total), total]
    shots = list(zip(bounds, bounds[1:], strict=False))
    pictures = _representatives(source, [(a + b) // 2 for a, b in shots], thumb_width)
    full_width = Image.fromarray(_still(source)).width if is_still(source) else video_size(Path(source))[0]
    panels = [
        _panel(k, lo, hi, pictures.get((lo + hi) // 2), boxes, activity, thumb_width / full_width)
        for k, (lo, hi) in enumerate(shots)
    ]
    sheet = _grid(panels, columns)
    with atomic_path(Path(out_png)) as tmp:
        sheet.save(tmp, format="PNG")
    return Path(out_png)


def _panel(
    k: int,
    lo: int,
    hi: int,
    picture: np.ndarray | None,
    boxes: Binding,
    activity: Mapping[str, np.ndarray],
    scale: float,
) -> Image.Image:
    font = ImageFont.load_default()
    thumb = Image.fromarray(picture) if picture is not None else Image.new("RGB", (320, 180), (40, 40, 40))
    strip_h, names = 10, list(activity)
    panel = Image.new("RGB", (thumb.width, 14 + thumb.height + strip_h * len(names) + 4), (20, 20, 20))
    panel.paste(thumb, (0, 14))
    draw = ImageDraw.Draw(panel)
    draw.text((2, 1), f"shot {k}  {lo / FPS:.2f}-{hi / FPS:.2f} s", fill=(255, 255, 255), font=font)
    middle = (lo + hi) // 2
    for s, name in enumerate(boxes):
        for b in (b for b in boxes[name] if b.covers(middle)):
            x0, y0, x1, y1 = (round(v * scale) for v in (b.box.x0, b.box.y0, b.box.x1, b.box.y1))
            draw.rectangle([x0, 14 + y0, x1 - 1, 14 + y1 - 1], outline=COLOURS[s % len(COLOURS)], width=2)
            label = draw.textbbox((x0 + 3, 14 + y0 + 2), name, font=font)
            draw.rectangle(label, fill=(0, 0, 0))  # readable on light and dark pictures
            draw.text((x0 + 3, 14 + y0 + 2), name, fill=COLOURS[s % len(COLOURS)], font=font)
    for s, name in enumerate(names):
        _strip(
            draw,
            activity[name][lo:hi],
            14 + thumb.height + 2 + s * strip_h,
            thumb.width,
            COLOURS[s % len(COLOURS)],
        )
        draw.text((2, 14 + thumb.height + 1 + s * strip_h), name, fill=(200, 200, 200), font=font)
    return panel


def _strip(draw: ImageDraw.ImageDraw, active: np.ndarray, top: int, width: int, colour: tuple) -> None:
    """Speech activity over the shot, one column per pixel: the track's colour where it speaks."""
    draw.rectangle([40, top, width - 1, top + 7], fill=(60, 60, 60))
    if len(active) == 0:
        return
    columns = np.array_split(np.asarray(active, bool), min(len(active), width - 40))
    step = (width - 40) / len(columns)
    for i, column in enumerate(columns):
        if column.any():
            draw.rectangle([40 + int(i * step), top, 40 + int((i + 1) * step), top + 7], fill=colour)


def _grid(panels: Sequence[Image.Image], columns: int) -> Image.Image:
    cell_w, cell_h = max(p.width for p in panels), max(p.height for p in panels)
    rows = -(-len(panels) // columns)
    sheet = Image.new("RGB", (min(columns, len(panels)) * cell_w, rows * cell_h), (0, 0, 0))
    for i, panel in enumerate(panels):
        sheet.paste(panel, ((i % columns) * cell_w, (i // columns) * cell_h))
    return sheet


# ---------------------------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class BindResult:
    boxes: dict[str, list[TimedBox]]  # pinned boxes only: a proposal reaches them through the manifest
    shot_cuts: tuple[int, ...]
    problems: tuple[Problem, ...]
    contact_sheet: Path

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]


def bind_tracks(
    source: Path | np.ndarray,
    box_specs: Mapping[str, Any],
    activity: Mapping[str, np.ndarray],
    out_png: Path,
    *,
    size: int = 480,
) -> BindResult:
    """The bind stage: manifest boxes (speaker id -> `speakers[].box` as written) checked against the picture and
    the speech, with a contact sheet to look at before rendering. Speakers without a box are reported; the fix is
    `dubflow bind FILE --propose` (propose_boxes + manifest_patch), never a silent guess."""
    boxes = {name: timed_boxes(box_specs.get(name)) for name in activity}
    shots = tuple(detect_shots(Path(source))) if not is_still(source) else ()
    frame_size = _still(source).shape[1::-1] if is_still(source) else video_size(Path(source))
    problems = check_binding(boxes, frame_size, activity, shot_cuts=shots, size=size)
    sheet = contact_sheet(source, boxes, activity, out_png, shot_cuts=shots)
    return BindResult(boxes, shots, tuple(problems), sheet)


# ---------------------------------------------------------------------------------------------- the Prefect stage


@dataclass(frozen=True)
class BindingRecord:
    contact_sheet: Blob  # PNG: check the binding before spending GPU time
    shot_cuts: tuple[int, ...]  # frames where the picture cuts (the planner cuts there too)
    warnings: tuple[str, ...]  # QC notes (speech without a box, small or overlapping boxes)


def bind_stage(ws: Workspace, source: Blob, tracks: dict[str, Blob], boxes: dict, size: int) -> BindingRecord:
    """Workspace form of `bind_tracks`: errors stop the run (geometry is checked at validation, so what is
    left is a real binding fault); warnings become QC notes."""
    from tasks.speakers import MIX_RATE, load_track

    activity = {sid: speech_activity(load_track(ws, blob), MIX_RATE) for sid, blob in tracks.items()}
    with ws.scratch() as tmp:
        result = bind_tracks(ws.path(source), boxes, activity, tmp / "contact-sheet.png", size=size)
        errors = [p for p in result.problems if p.severity == "error"]
        if errors:
            raise ValueError("; ".join(f"{p.field}: {p.message}" for p in errors))
        sheet = ws.put_file(result.contact_sheet)
    return BindingRecord(sheet, result.shot_cuts, tuple(p.message for p in result.problems))


def geometry_problems(boxes: dict, frame_size: tuple[int, int], size: int) -> list[Problem]:
    """The checks that need no audio (box size at render scale, overlaps), for manifest validation."""
    binding = {sid: timed_boxes(spec) for sid, spec in boxes.items() if spec is not None}
    return check_binding(binding, frame_size, {}, size=size)


bind_task = task(bind_stage, name="bind", cache_policy=stage_cache("tasks.bind"), persist_result=True)


def propose_binding(ws: Workspace, source: Blob, tracks: dict[str, Blob], pinned: dict, out_png: Path) -> str:
    """`dubflow bind --propose`: boxes for unpinned speakers, as a manifest patch (never applied silently),
    and a contact sheet of the proposal at `out_png`."""
    from tasks.speakers import MIX_RATE, load_track

    audio = {sid: load_track(ws, blob) for sid, blob in tracks.items()}
    fixed = {sid: timed_boxes(spec) for sid, spec in pinned.items() if spec is not None}
    proposal = propose_boxes(ws.path(source), audio, MIX_RATE, pinned=fixed)
    activity = {sid: speech_activity(a, MIX_RATE) for sid, a in audio.items()}
    is_video = not is_still(ws.path(source))
    cuts = detect_shots(ws.path(source)) if is_video else []
    contact_sheet(ws.path(source), proposal, activity, out_png, shot_cuts=cuts)
    return manifest_patch(proposal)
