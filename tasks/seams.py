"""seams: how visible the joins between rendered segments are, against the picture's own change per frame.

A seam is the pair of frames (b - 1, b) where segment b begins. Two figures per pair of frames: the CIEDE2000
colour difference of their mean Lab colours (a jump in colour or exposure) and the mean Farneback optical
flow in pixels (a jump in pose or position). A seam is judged against the ordinary consecutive pairs of
the same picture (not across a boundary): a ratio near 1 means the join moves like any other frame.
Frames are (H, W, 3) uint8 RGB; a region is a box (x0, y0, x1, y1) in pixels. Numpy and OpenCV only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypedDict

import numpy as np
from prefect import task

from tasks.workspace import Blob, Workspace, stage_cache

Box = tuple[int, int, int, int]

# Farneback's parameters, fixed so that figures from different runs compare: pyramid scale, levels,
# window, iterations, polynomial neighbourhood and its sigma (OpenCV's documented example).
_FARNEBACK = (0.5, 3, 15, 3, 5, 1.2, 0)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 sRGB -> (..., 3) float64 CIE Lab, D65 (L in [0, 100]), by the engine's own conversion
    (engine/multitalk/colour.py), so the seams are measured in the space the colour matching works in."""
    import torch

    from engine.multitalk.colour import rgb_to_lab as torch_rgb_to_lab

    channels_first = torch.from_numpy(np.asarray(rgb, np.float64) / 255.0).movedim(-1, 0)
    return torch_rgb_to_lab(channels_first).movedim(0, -1).numpy()


def delta_e2000(lab1: np.ndarray, lab2: np.ndarray) -> np.ndarray:
    """CIEDE2000 colour difference of (..., 3) Lab arrays (kL = kC = kH = 1), as in Sharma, Wu & Dalal
    (2005), "The CIEDE2000 color-difference formula: implementation notes", equations (1)-(22)."""
    lab1, lab2 = np.asarray(lab1, np.float64), np.asarray(lab2, np.float64)
    (l1, a1, b1), (l2, a2, b2) = np.moveaxis(lab1, -1, 0), np.moveaxis(lab2, -1, 0)
    c_bar7 = ((np.hypot(a1, b1) + np.hypot(a2, b2)) / 2) ** 7
    g = 0.5 * (1 - np.sqrt(c_bar7 / (c_bar7 + 25.0**7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p, h2p = np.degrees(np.arctan2(b1, a1p)) % 360, np.degrees(np.arctan2(b2, a2p)) % 360
    chroma = c1p * c2p != 0  # a neutral colour has no hue: its hue difference and mean take the other's
    dh = h2p - h1p
    dh = np.where(chroma, np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh)), 0.0)
    d_hue = 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh / 2))
    h_sum, h_far = h1p + h2p, np.abs(h1p - h2p) > 180
    h_bar = np.where(h_far, np.where(h_sum < 360, h_sum + 360, h_sum - 360), h_sum) / 2
    h_bar = np.where(chroma, h_bar, h_sum)
    t = (
        1
        - 0.17 * np.cos(np.radians(h_bar - 30))
        + 0.24 * np.cos(np.radians(2 * h_bar))
        + 0.32 * np.cos(np.radians(3 * h_bar + 6))
        - 0.20 * np.cos(np.radians(4 * h_bar - 63))
    )
    l_bar50, cp_bar = ((l1 + l2) / 2 - 50) ** 2, (c1p + c2p) / 2
    s_l = 1 + 0.015 * l_bar50 / np.sqrt(20 + l_bar50)
    s_c, s_h = 1 + 0.045 * cp_bar, 1 + 0.015 * cp_bar * t
    r_c = 2 * np.sqrt(cp_bar**7 / (cp_bar**7 + 25.0**7))
    r_t = -np.sin(np.radians(60 * np.exp(-(((h_bar - 275) / 25) ** 2)))) * r_c
    dl, dc, dhh = (l2 - l1) / s_l, (c2p - c1p) / s_c, d_hue / s_h
    return np.sqrt(dl**2 + dc**2 + dhh**2 + r_t * dc * dhh)


def _crop(frame: np.ndarray, region: Box | None) -> np.ndarray:
    if region is None:
        return frame
    x0, y0, x1, y1 = region
    return frame[y0:y1, x0:x1]


def mean_lab(frame: np.ndarray, region: Box | None = None) -> np.ndarray:
    """(3,) the mean Lab colour of a frame (or of its region)."""
    return rgb_to_lab(_crop(frame, region)).reshape(-1, 3).mean(0)


def mean_colour_delta_e(frame_a: np.ndarray, frame_b: np.ndarray, region: Box | None = None) -> float:
    """CIEDE2000 between the two frames' mean Lab colours: a change of overall colour or exposure."""
    return float(delta_e2000(mean_lab(frame_a, region), mean_lab(frame_b, region)))


def motion_magnitude(frame_a: np.ndarray, frame_b: np.ndarray, region: Box | None = None) -> float:
    """Mean optical-flow magnitude from a to b in pixels (Farneback on grey, fixed parameters)."""
    import cv2

    grey_a, grey_b = (cv2.cvtColor(_crop(f, region), cv2.COLOR_RGB2GRAY) for f in (frame_a, frame_b))
    flow = cv2.calcOpticalFlowFarneback(grey_a, grey_b, None, *_FARNEBACK)  # (H, W, 2): dx, dy
    return float(np.mean(np.hypot(flow[..., 0], flow[..., 1])))


class Spread(TypedDict):
    median: float
    p90: float


class Seam(TypedDict):
    frame: int  # the first frame of the new segment
    delta_e: float
    flow: float


class SeamReport(TypedDict):
    seams: list[Seam]
    ordinary_pairs: int
    ordinary: dict[str, Spread]  # "delta_e", "flow"
    seam_mean: dict[str, float]
    seam_max: dict[str, float]
    ratio: dict[str, float]  # mean over the seams / median over the ordinary pairs


def seam_report(
    frames: Iterable[np.ndarray],
    boundaries: Sequence[int],
    region: Box | None = None,
    *,
    near: int | None = None,
) -> SeamReport:
    """Colour and motion at each boundary b (frames b - 1, b) against those of the other consecutive pairs:
    every other pair, or with `near` only the pairs within `near` frames of a boundary (a local baseline
    that keeps the optical flow off the rest of a long episode).

    Boundaries outside the picture (0, or past its end) are ignored; frames are read once, in order."""
    wanted = set(boundaries)
    seams: list[Seam] = []
    ordinary: dict[str, list[float]] = {"delta_e": [], "flow": []}
    previous = None
    for i, frame in enumerate(frames):
        measured = near is None or any(abs(i - b) <= near for b in wanted)
        if previous is not None and measured:
            d_e, flow = (
                mean_colour_delta_e(previous, frame, region),
                motion_magnitude(previous, frame, region),
            )
            if i in wanted:
                seams.append(Seam(frame=i, delta_e=d_e, flow=flow))
            else:
                ordinary["delta_e"].append(d_e)
                ordinary["flow"].append(flow)
        previous = frame
    spread = {
        k: Spread(median=_stat(np.median, v), p90=_stat(np.percentile, v, 90)) for k, v in ordinary.items()
    }
    seam_mean = {k: _stat(np.mean, [s[k] for s in seams]) for k in ordinary}
    return SeamReport(
        seams=seams,
        ordinary_pairs=len(ordinary["flow"]),
        ordinary=spread,
        seam_mean=seam_mean,
        seam_max={k: _stat(np.max, [s[k] for s in seams]) for k in ordinary},
        ratio={k: _ratio(seam_mean[k], spread[k]["median"]) for k in ordinary},
    )


SEAM_NEIGHBOURHOOD = 3  # QC: each seam against the 3 frame steps either side of it


def measure_seams(ws: Workspace, picture: Blob, boundaries: tuple[int, ...]) -> SeamReport:
    """QC of the segment joins of a stitched render (25 fps, the engine's own frames): each join's colour
    step (ΔE2000 of the mean colour) and motion step (mean optical flow) against its neighbours'."""
    from engine.media import VideoFrames

    video = VideoFrames(ws.path(picture))
    frames = (frame for _, frame in video.iter_frames())
    return seam_report(frames, boundaries, near=SEAM_NEIGHBOURHOOD)


def _stat(fn, values: list[float], *args) -> float:
    return float(fn(values, *args)) if values else float("nan")


def _ratio(seam: float, ordinary: float) -> float:
    if ordinary > 0:
        return seam / ordinary
    return float("inf") if seam > 0 else float("nan")


seams_task = task(measure_seams, name="seams", cache_policy=stage_cache("tasks.seams"), persist_result=True)
