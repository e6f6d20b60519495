"""Seam metrics: CIEDE2000 against its published test data, a planted jump found at its boundary and a smooth
picture left alone, and the flow of a known translation."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.seams import delta_e2000, mean_colour_delta_e, motion_magnitude, rgb_to_lab, seam_report

# Sharma, Wu & Dalal (2005), Table 1: (L, a, b) of each sample and the published ΔE00, to 4 decimals.
# They cover the hue-wrap, neutral-colour, rotation-term and low-lightness branches of the formula.
SHARMA_PAIRS = [
    ((50.0000, 2.6772, -79.7751), (50.0000, 0.0000, -82.7485), 2.0425),
    ((50.0000, 3.1571, -77.2803), (50.0000, 0.0000, -82.7485), 2.8615),
    ((50.0000, 2.8361, -74.0200), (50.0000, 0.0000, -82.7485), 3.4412),
    ((50.0000, -1.3802, -84.2814), (50.0000, 0.0000, -82.7485), 1.0000),
    ((50.0000, -1.1848, -84.8006), (50.0000, 0.0000, -82.7485), 1.0000),
    ((50.0000, -0.9009, -85.5211), (50.0000, 0.0000, -82.7485), 1.0000),
    ((50.0000, 0.0000, 0.0000), (50.0000, -1.0000, 2.0000), 2.3669),
    ((50.0000, -1.0000, 2.0000), (50.0000, 0.0000, 0.0000), 2.3669),
    ((50.0000, 2.4900, -0.0010), (50.0000, -2.4900, 0.0009), 7.1792),
    ((50.0000, 2.4900, -0.0010), (50.0000, -2.4900, 0.0010), 7.1792),
    ((50.0000, 2.4900, -0.0010), (50.0000, -2.4900, 0.0011), 7.2195),
    ((50.0000, 2.4900, -0.0010), (50.0000, -2.4900, 0.0012), 7.2195),
    ((50.0000, -0.0010, 2.4900), (50.0000, 0.0009, -2.4900), 4.8045),
    ((50.0000, -0.0010, 2.4900), (50.0000, 0.0010, -2.4900), 4.8045),
    ((50.0000, -0.0010, 2.4900), (50.0000, 0.0011, -2.4900), 4.7461),
    ((50.0000, 2.5000, 0.0000), (50.0000, 0.0000, -2.5000), 4.3065),
    ((50.0000, 2.5000, 0.0000), (73.0000, 25.0000, -18.0000), 27.1492),
    ((50.0000, 2.5000, 0.0000), (61.0000, -5.0000, 29.0000), 22.8977),
    ((50.0000, 2.5000, 0.0000), (56.0000, -27.0000, -3.0000), 31.9030),
    ((50.0000, 2.5000, 0.0000), (58.0000, 24.0000, 15.0000), 19.4535),
    ((50.0000, 2.5000, 0.0000), (50.0000, 3.1736, 0.5854), 1.0000),
    ((50.0000, 2.5000, 0.0000), (50.0000, 3.2972, 0.0000), 1.0000),
    ((50.0000, 2.5000, 0.0000), (50.0000, 1.8634, 0.5757), 1.0000),
    ((50.0000, 2.5000, 0.0000), (50.0000, 3.2592, 0.3350), 1.0000),
    ((60.2574, -34.0099, 36.2677), (60.4626, -34.1751, 39.4387), 1.2644),
    ((63.0109, -31.0961, -5.8663), (62.8187, -29.7946, -4.0864), 1.2630),
    ((61.2901, 3.7196, -5.3901), (61.4292, 2.2480, -4.9620), 1.8731),
    ((35.0831, -44.1164, 3.7933), (35.0232, -40.0716, 1.5901), 1.8645),
    ((22.7233, 20.0904, -46.6940), (23.0331, 14.9730, -42.5619), 2.0373),
    ((36.4612, 47.8580, 18.3852), (36.2715, 50.5065, 21.2231), 1.4146),
    ((90.8027, -2.0831, 1.4410), (91.1528, -1.6435, 0.0447), 1.4441),
    ((90.9257, -0.5406, -0.9208), (88.6381, -0.8985, -0.7239), 1.5381),
    ((6.7747, -0.2908, -2.4247), (5.8714, -0.0985, -2.2286), 0.6377),
    ((2.0776, 0.0795, -1.1350), (0.9033, -0.0636, -0.5514), 0.9082),
]


def test_ciede2000_matches_the_published_pairs_both_ways():
    first, second, expected = (np.array(column) for column in zip(*SHARMA_PAIRS, strict=True))
    np.testing.assert_allclose(delta_e2000(first, second), expected, atol=1e-4)
    np.testing.assert_allclose(delta_e2000(second, first), expected, atol=1e-4)  # symmetric
    assert delta_e2000(first, first).max() == 0.0


def test_srgb_to_lab_at_white_black_and_a_primary():
    lab = rgb_to_lab(np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0]], np.uint8))
    np.testing.assert_allclose(
        lab[:2], [[100, 0, 0], [0, 0, 0]], atol=0.01
    )  # the matrix of colour.py, to its 6 digits
    np.testing.assert_allclose(lab[2], [53.24, 80.09, 67.20], atol=0.05)  # the usual sRGB red


def texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 smooth random texture: something optical flow can follow."""
    import cv2

    noise = np.random.default_rng(seed).uniform(0, 255, (height, width, 3)).astype(np.float32)
    return np.clip(cv2.GaussianBlur(noise, (0, 0), 2.0) * 3 - 255, 0, 255).astype(np.uint8)


def panning(n: int, step: int = 1, size: tuple[int, int] = (64, 96), jump_at: int | None = None) -> list:
    """n frames of a texture panned `step` px per frame; at `jump_at` it jumps 6 px more and turns redder."""
    h, w = size
    big, frames, x = texture(h + 40, w + 40 + step * n + 40), [], 20
    for i in range(n):
        if i == jump_at:
            x += 6
        frame = big[20 : 20 + h, x : x + w].astype(np.int16)
        if jump_at is not None and i >= jump_at:
            frame[..., 0] += 30
        frames.append(np.clip(frame, 0, 255).astype(np.uint8))
        x += step
    return frames


@pytest.mark.parametrize("shift", [(3, 0), (0, 2), (2, -2)])
def test_the_flow_of_a_known_translation_is_its_length(shift):
    dx, dy = shift
    big = texture(140, 140, seed=1)
    a = big[30:110, 30:110]
    b = big[30 - dy : 110 - dy, 30 - dx : 110 - dx]  # the content moved by (dx, dy)
    assert motion_magnitude(a, b) == pytest.approx(np.hypot(dx, dy), rel=0.1)
    assert motion_magnitude(a, a) < 0.05


def test_a_planted_jump_is_found_at_its_boundary_and_a_smooth_picture_has_no_seam():
    jumped = seam_report(panning(12, jump_at=6), boundaries=[6])
    assert [s["frame"] for s in jumped["seams"]] == [6] and jumped["ordinary_pairs"] == 10
    assert jumped["ratio"]["delta_e"] > 10 and jumped["ratio"]["flow"] > 3
    assert jumped["seams"][0]["delta_e"] > 5 > jumped["ordinary"]["delta_e"]["p90"]

    smooth = seam_report(panning(12), boundaries=[6])
    assert smooth["ratio"]["flow"] == pytest.approx(1.0, abs=0.2)
    assert smooth["seam_max"]["delta_e"] < 1.0 and smooth["ratio"]["delta_e"] < 3


def test_a_region_limits_the_measure_and_boundaries_outside_the_picture_are_ignored():
    frames = panning(5)
    frames[3] = frames[3].copy()
    frames[3][:, :40] = 0  # a change on the left only
    right = (48, 0, 96, 64)
    assert mean_colour_delta_e(frames[2], frames[3], right) < 0.5 < mean_colour_delta_e(frames[2], frames[3])
    report = seam_report(frames, boundaries=[0, 3, 99], region=right)
    assert [s["frame"] for s in report["seams"]] == [3] and report["ordinary_pairs"] == 3
