"""A person's region from their face: the box the manifest holds for a speaker (`speakers[].box`).

The engine routes each voice to the video tokens under its person's box, paste-back composites the rendered
person inside it, and the contact sheet shows it: all three need the whole head with room to move, plus neck and
shoulders, never a face fragment. The rule, in face heights H (the detector's brow-to-chin box) around the
face box:

    x: face centre ± SIDE·H      y: from ABOVE·H over the face's top to BELOW·H under its chin

then clipped to the frame, and where two people's regions overlap both are cut at the middle of the gap between
their faces (along the axis where the faces are furthest apart), so no region reaches another person's face.

Measured with MTCNN faces on ../shared/data/footage-dev (3 stills, 6 videos sampled once a second; bench/bind.py
prints the resulting head coverage, 1.00 for every person): the hand-checked head boxes reach at most
0.99 H beside the face centre (a head turned away, hair and headphones behind it), 0.49 H above the face box
and 0.40 H under it. SIDE = 1.3, ABOVE = 0.6 and BELOW = 1.0 (the shoulders) leave a margin over those; a
two-shot's regions then come out close to MultiTalk's own example boxes (person-sized, about a third of the
frame each) and within the 5-95 % halves the engine falls back to without boxes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from functools import lru_cache

import numpy as np

from engine.base import Box

SIDE = 1.3  # face heights either side of the face centre
ABOVE = 0.6  # face heights above the face box (hair, head top)
BELOW = 1.0  # face heights under the chin (neck, shoulders)


def person_region(face: Box, frame_size: tuple[int, int]) -> Box:
    """The head-and-shoulders region of one face, clipped to the (width, height) frame."""
    width, height = frame_size
    h, centre = face.height, (face.x0 + face.x1) / 2
    return Box(
        max(0, round(centre - SIDE * h)),
        max(0, round(face.y0 - ABOVE * h)),
        min(width, round(centre + SIDE * h)),
        min(height, round(face.y1 + BELOW * h)),
    )


def separate(regions: Sequence[Box], faces: Sequence[Box]) -> list[Box]:
    """Regions cut so that none overlaps another person's face: each overlapping pair is cut at the middle of
    the gap between the two faces. Faces that overlap each other leave their regions as they are."""
    out = list(regions)
    for i in range(len(out)):
        for j in range(i + 1, len(out)):
            if _overlap(out[i], out[j]):
                out[i], out[j] = _cut(out[i], out[j], faces[i], faces[j])
    return out


def _overlap(a: Box, b: Box) -> bool:
    return min(a.x1, b.x1) > max(a.x0, b.x0) and min(a.y1, b.y1) > max(a.y0, b.y0)


def _cut(a: Box, b: Box, face_a: Box, face_b: Box) -> tuple[Box, Box]:
    gap_x = max(face_b.x0 - face_a.x1, face_a.x0 - face_b.x1)
    gap_y = max(face_b.y0 - face_a.y1, face_a.y0 - face_b.y1)
    if max(gap_x, gap_y) <= 0:
        return a, b
    if gap_x >= gap_y:
        left_a = face_a.x1 <= face_b.x0
        line = (face_a.x1 + face_b.x0) // 2 if left_a else (face_b.x1 + face_a.x0) // 2
        if left_a:
            return replace(a, x1=min(a.x1, line)), replace(b, x0=max(b.x0, line))
        return replace(a, x0=max(a.x0, line)), replace(b, x1=min(b.x1, line))
    above_a = face_a.y1 <= face_b.y0
    line = (face_a.y1 + face_b.y0) // 2 if above_a else (face_b.y1 + face_a.y0) // 2
    if above_a:
        return replace(a, y1=min(a.y1, line)), replace(b, y0=max(b.y0, line))
    return replace(a, y0=max(a.y0, line)), replace(b, y1=min(b.y1, line))


def person_regions(faces: Sequence[Box], frame_size: tuple[int, int]) -> list[Box]:
    """Every face's region, clipped to the frame and kept off the other faces."""
    return separate([person_region(f, frame_size) for f in faces], faces)


def head_coverage(head: Box, region: Box) -> float:
    """Share of a head box inside a region (1.0: the whole head)."""
    inside = max(0, min(head.x1, region.x1) - max(head.x0, region.x0)) * max(
        0, min(head.y1, region.y1) - max(head.y0, region.y0)
    )
    return inside / max(1, head.width * head.height)


@lru_cache(maxsize=64)
def person_mask(region: Box, frame_size: tuple[int, int], feather: int) -> np.ndarray:
    """(h, w) float32 blend weights over `region`: a head-and-shoulders silhouette (a rectangle whose upper
    corners are rounded off like a head's outline), 1 inside and falling to 0 at the region's edge over
    `feather` pixels. Edges on the frame's border stay hard: nothing lies beyond them to blend with. Unlike the
    box mask (which feathers outward), nothing of it leaves the region, so it never reaches a neighbour."""
    width, height = frame_size
    h, w = region.height, region.width
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    inf = np.float32(1e9)
    left = xs + 0.5 if region.x0 > 0 else inf
    right = w - xs - 0.5 if region.x1 < width else inf
    top = ys + 0.5 if region.y0 > 0 else inf
    bottom = h - ys - 0.5 if region.y1 < height else inf
    distance = np.minimum(np.minimum(left, right), np.minimum(top, bottom))
    radius = 0.35 * min(w, h)  # the rounded upper corners: a head and shoulders, not a card
    for cx in (radius, w - radius):
        in_corner = (ys < radius) & ((xs < radius) if cx == radius else (xs > w - radius))
        if region.y0 > 0 and ((cx == radius and region.x0 > 0) or (cx != radius and region.x1 < width)):
            to_arc = radius - np.hypot(xs - cx, ys - radius)
            distance = np.where(in_corner, np.minimum(distance, to_arc), distance)
    if feather <= 0:
        return (distance > 0).astype(np.float32)
    return np.clip(distance / feather, 0.0, 1.0).astype(np.float32)
