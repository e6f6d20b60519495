"""The binding contact sheet: one panel per shot with each speaker's box and a strip of when they talk, to check
the binding before spending GPU time."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from engine.base import FPS
from engine.media import atomic_path, is_still, read_frames, video_size
from tasks.boxes import Binding, TimedBox, still_image

REVIEW = (255, 230, 0)  # label background of a proposal to check by eye (low confidence, or a still's guess)
COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


def _representatives(source: Path | np.ndarray, frames: Sequence[int], width: int) -> dict[int, np.ndarray]:
    if is_still(source):
        image = Image.fromarray(still_image(source))
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
    full_width = (
        Image.fromarray(still_image(source)).width if is_still(source) else video_size(Path(source))[0]
    )
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
            text = name + (f" ? {_doubt(b)}" if b.needs_review else "")
            label = draw.textbbox((x0 + 3, 14 + y0 + 2), text, font=font)
            draw.rectangle(label, fill=REVIEW if b.needs_review else (0, 0, 0))  # readable on any picture
            draw.text((x0 + 3, 14 + y0 + 2), text, fill=COLOURS[s % len(COLOURS)], font=font)
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


def _doubt(box: TimedBox) -> str:
    return "still: left to right" if box.confidence is None else f"low confidence {box.confidence:.2f}"


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
