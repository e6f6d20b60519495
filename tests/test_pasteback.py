"""Paste-back's geometry: which box holds at a frame, and a mask that is 1 on it and 0 beyond the feather."""

from __future__ import annotations

import numpy as np
import pytest

from engine.base import Box
from tasks.pasteback import Regions, _mask, paste_back
from tasks.render import Clip, PersonSpec
from tasks.workspace import Blob

MOVING = PersonSpec(
    "ana",
    "Ana",
    [{"from": 0, "to": 2, "box": [10, 10, 30, 30]}, {"from": 2, "to": None, "box": [50, 10, 70, 30]}],
)
STILL = PersonSpec("ben", "Ben", [80, 10, 100, 30])


def _clip(start: int, persons: tuple[str, ...]) -> Clip:
    return Clip(0, Blob("0" * 64, 1, ".mp4"), 25, "infinitetalk", start, (0, 0, 120, 60), persons)


def test_the_box_in_effect_at_each_frame_and_only_the_animated_persons():
    regions = Regions([_clip(25, ("ben",)), _clip(0, ("ana",))], (MOVING, STILL), (120, 60), 4)
    assert regions.box_at("ana", 49) == Box(10, 10, 30, 30) and regions.box_at("ana", 50) == Box(
        50, 10, 70, 30
    )
    assert regions.clip_at(24).persons == ("ana",) and regions.clip_at(25).persons == ("ben",)
    original = np.zeros((60, 120, 3), np.uint8)
    out = regions.blend(original, np.full_like(original, 200), 30)  # ben's segment: ana's face untouched
    assert out[20, 90].tolist() == [200] * 3 and out[20, 20].tolist() == [0] * 3


def test_the_mask_is_one_on_the_box_and_zero_past_the_feather_and_the_crop():
    mask, (x0, y0, x1, y1) = _mask((Box(20, 20, 40, 40),), (0, 0, 100, 50), (100, 60), 5)
    assert (x0, y0, x1, y1) == (15, 15, 45, 45)
    full = np.zeros((60, 100), np.float32)
    full[y0:y1, x0:x1] = mask
    assert full[20:40, 20:40].min() == 1.0 and 0 < full[30, 42] < 1
    assert full[:, :15].max() == 0 and full[:, 45:].max() == 0 and full[45:].max() == 0
    assert _mask((Box(20, 20, 40, 40),), (50, 0, 100, 50), (100, 60), 5)[0] is None  # outside the crop


def test_the_person_mask_stays_inside_each_region_and_keeps_the_frame_edge_hard():
    """mask='person': the feathered person mask of tasks/regions.py, never past the region (a neighbour's face
    may lie just beyond a region cut at the middle of the gap between two people)."""
    left, right = Box(0, 10, 50, 60), Box(50, 10, 100, 60)  # two regions touching at x = 50, frame 100x60
    mask, (x0, y0, x1, y1) = _mask((left, right), (0, 0, 100, 60), (100, 60), 8, "person")
    assert (x0, y0, x1, y1) == (0, 10, 100, 60)  # nothing grown past the regions
    assert mask[25, 25] == 1.0 and mask[25, 75] == 1.0
    assert mask[25, 49] < 0.1 and mask[25, 50] < 0.1  # both feather to 0 at their shared edge
    assert mask[25, 0] == 1.0 and mask[49, 25] == 1.0  # frame edges (left, bottom) stay hard
    box_mask = _mask((left,), (0, 0, 100, 60), (100, 60), 8)[0]
    assert box_mask.shape[1] > 50  # the box mask feathers outward, over the neighbour's side
    with pytest.raises(ValueError, match="mask 'oval' is unknown; use one of: box, person"):
        paste_back(None, None, None, [], (), mask="oval")


def test_outside_the_speakers_regions_the_pasted_picture_stays_the_source(tmp_path):
    """PSNR outside the feathered regions: encoding noise only (>= 40 dB) for paste-back; a whole-frame
    change (what full_frame delivers) is far below."""
    from fractions import Fraction

    from engine.media import write_timed_video
    from tasks.pasteback import outside_psnr, paste_back
    from tasks.workspace import Workspace
    from tests.footage_fixtures import moving_picture

    ws = Workspace(tmp_path / "ws")
    source, render = tmp_path / "source.mp4", tmp_path / "render.mp4"
    write_timed_video(source, ((i, moving_picture(i, (120, 60))) for i in range(20)), Fraction(1, 25), crf=8)
    rng = np.random.default_rng(0)
    write_timed_video(
        render,
        ((i, rng.integers(0, 256, (60, 120, 3), dtype=np.uint8)) for i in range(20)),
        Fraction(1, 25),
    )
    source_blob, render_blob = ws.put_file(source, move=False), ws.put_file(render, move=False)
    clip = Clip(0, render_blob, 20, "infinitetalk", 0, (0, 0, 120, 60), ("ben",))
    figures = {}
    for composite in ("paste_back", "full_frame"):
        pasted = paste_back(ws, source_blob, render_blob, [clip], (STILL,), composite, 4)
        figures[composite] = outside_psnr(ws, source_blob, pasted, [clip], (STILL,), 4)["psnr_outside_db"]
    assert figures["paste_back"] >= 40.0 and figures["full_frame"] < 20.0
