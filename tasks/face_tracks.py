"""Faces followed through a video: detected sparsely (every SAMPLE_EVERY frames and on each shot's first frame),
linked within each shot into tracks, smoothed, and turned into each person's timed regions ([{from, to, box}]).

A region holds while the person stays inside it: a new timed box starts only when the head has moved far enough
that the union of its regions would grow by more than GROW, so a talking head gets one box per shot and a person
walking across gets a few. Boxes never jitter from frame to frame: they are constant between changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from engine.base import Box
from engine.media import read_frames
from tasks.boxes import TimedBox, iou
from tasks.faces import Face, FaceDetector, coords, scale_box
from tasks.regions import person_region, separate
from tasks.shots import is_shot_cut

ANALYSIS_WIDTH = 480  # faces are found on frames this wide (MTCNN from 20 px: faces >= 1/24 of the width)
SAMPLE_EVERY = (
    12  # frames between detections (0.48 s). 25 gave the same footage-dev figures (its heads barely
)
# move); half a second keeps the mouth box, taken from the nearest sample, on a head that does move
MIN_SHARE = 0.4  # a track must be seen in this share of a shot's samples (drops one-off false hits)
GROW = 0.15  # a timed box is replaced when following the head would grow it by more than this share


@dataclass(frozen=True)
class FaceTrack:
    start: int  # the shot's frames [start, end)
    end: int
    samples: tuple[tuple[int, Face], ...]  # (frame, face in analysis pixels), smoothed, in time order

    def face_at(self, frame: int) -> Face:
        """The sampled face nearest in time."""
        times = np.array([t for t, _ in self.samples])
        return self.samples[int(np.abs(times - frame).argmin())][1]

    @property
    def hull(self) -> Box:
        return _union(*(f.box for _, f in self.samples))


@dataclass(frozen=True)
class Shot:
    start: int
    end: int
    tracks: tuple[FaceTrack, ...]  # left to right
    detector: str = ""  # which detector found them


def find_tracks(path, detector: FaceDetector, *, every: int = SAMPLE_EVERY) -> tuple[list[Shot], int]:
    """Shots of a video with the face tracks in each, and its frame count on the 25 fps grid. A shot where the
    detector finds no face is tried again with its fallback (only that shot's sampled frames are kept)."""
    shots: list[Shot] = []
    start, samples, frames, previous, total = 0, [], [], None, 0
    for t, frame in enumerate(read_frames(path, ANALYSIS_WIDTH, colour=True)):
        small = np.asarray(Image.fromarray(frame).convert("L").resize((64, 36), Image.Resampling.BILINEAR))
        if previous is not None and is_shot_cut(previous, small) and t - start >= 3:
            shots.append(_shot(start, t, samples, frames, detector))
            start, samples, frames = t, [], []
        if (t - start) % every == 0:
            samples.append((t, detector(frame)))
            frames.append(frame)
        previous, total = small, t + 1
    shots.append(_shot(start, total, samples, frames, detector))
    return shots, total


def _shot(start: int, end: int, samples: list, frames: list, detector: FaceDetector) -> Shot:
    name = detector.name
    if detector.fallback is not None and not any(faces for _, faces in samples):
        samples = [(t, detector.fallback(frame)) for (t, _), frame in zip(samples, frames, strict=True)]
        name = detector.fallback.name
    return Shot(start, end, tuple(link_faces(samples, start, end)), name)


def link_faces(samples: Sequence[tuple[int, list[Face]]], start: int, end: int) -> list[FaceTrack]:
    """One shot's detections -> tracks: each face joins the track whose last face it overlaps most."""
    groups: list[list[tuple[int, Face]]] = []
    for t, faces in samples:
        taken: set[int] = set()
        for face in faces:
            scores = [iou(g[-1][1].box, face.box) if i not in taken else 0.0 for i, g in enumerate(groups)]
            best = int(np.argmax(scores)) if scores else -1
            if best >= 0 and scores[best] > 0.3:
                groups[best].append((t, face))
                taken.add(best)
            else:
                groups.append([(t, face)])
                taken.add(len(groups) - 1)
    kept = [g for g in groups if len(g) >= max(1, MIN_SHARE * len(samples))]
    tracks = [FaceTrack(start, end, tuple(_smoothed(g))) for g in kept]
    return sorted(tracks, key=lambda k: (k.hull.x0, k.hull.y0))


def _smoothed(samples: list[tuple[int, Face]], window: int = 3) -> list[tuple[int, Face]]:
    """A running median over `window` samples of the face and mouth boxes: one bad detection does not move it."""
    faces = np.array([coords(f.box) for _, f in samples], float)
    mouths = np.array([coords(f.mouth) if f.mouth else [np.nan] * 4 for _, f in samples], float)
    out = []
    for k, (t, face) in enumerate(samples):
        lo, hi = max(0, k - window // 2), min(len(samples), k + window // 2 + 1)
        box = Box(*(int(round(v)) for v in np.median(faces[lo:hi], axis=0)))
        mouth = None
        if face.mouth is not None:
            mouth = Box(*(int(round(v)) for v in np.nanmedian(mouths[lo:hi], axis=0)))
        out.append((t, Face(box, face.score, mouth)))
    return out


def track_regions(shot: Shot, scale: float, frame_size: tuple[int, int]) -> list[list[TimedBox]]:
    """Per track of the shot, its person's timed regions in source pixels (`scale`: source px per analysis px),
    kept off the other tracks' faces."""
    out = []
    for k, track in enumerate(shot.tracks):
        others = [o for j, o in enumerate(shot.tracks) if j != k]
        pieces = []
        for lo, hi, box in _pieces(track, scale, frame_size):
            faces_now = [_hull_between(o, lo, hi, scale) for o in others]
            own = _hull_between(track, lo, hi, scale)
            for other in faces_now:
                box = separate([box, person_region(other, frame_size)], [own, other])[0]
            pieces.append(TimedBox(lo, hi, box, "proposed"))
        out.append(pieces)
    return out


def _pieces(track: FaceTrack, scale: float, frame_size: tuple[int, int]) -> list[tuple[int, int, Box]]:
    """(start, end, region) runs over which one region holds the person: union of its sampled regions."""
    times = [t for t, _ in track.samples]
    regions = [person_region(_scaled(f.box, scale), frame_size) for _, f in track.samples]
    edges = [track.start] + [(a + b) // 2 for a, b in zip(times, times[1:], strict=False)] + [track.end]
    runs, first, union = [], 0, regions[0]
    for k in range(1, len(regions)):
        grown = _union(union, regions[k])
        if _area(grown) > (1 + GROW) * _area(regions[first]):
            runs.append((edges[first], edges[k], union))
            first, union = k, regions[k]
        else:
            union = grown
    runs.append((edges[first], edges[-1], union))
    return runs


def _hull_between(track: FaceTrack, lo: int, hi: int, scale: float) -> Box:
    """The track's faces sampled in [lo, hi) (or the one nearest lo), as one box in source pixels."""
    boxes = [f.box for t, f in track.samples if lo <= t < hi] or [track.face_at(lo).box]
    return _scaled(_union(*boxes), scale)


def _scaled(box: Box, scale: float) -> Box:
    return scale_box(box, scale)


def _union(*boxes: Box) -> Box:
    return Box(
        min(b.x0 for b in boxes), min(b.y0 for b in boxes), max(b.x1 for b in boxes), max(b.y1 for b in boxes)
    )


def _area(b: Box) -> int:
    return max(0, b.width) * max(0, b.height)


def jitter(boxes: Sequence[TimedBox], total: int) -> float:
    """Mean movement of the box's edges from one frame to the next, in pixels per frame (0: never moves)."""
    per_frame = []
    for t in range(total):
        active = [b for b in boxes if b.covers(t)]
        per_frame.append(coords(active[-1].box) if active else None)
    moves = [
        np.abs(np.subtract(a, b)).mean() for a, b in zip(per_frame, per_frame[1:], strict=False) if a and b
    ]
    return float(np.mean(moves)) if moves else 0.0
