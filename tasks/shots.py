"""Shot cuts of a video: where the whole picture changes (the planner always cuts there, the proposal re-finds
faces). A gray-histogram and pixel-difference test on small frames."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from engine.media import is_still, read_frames

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
