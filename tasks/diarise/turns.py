"""Turns (who speaks from when to when), RTTM files, and the gated tracks cut from them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.media import atomic_path

RATE = 16_000  # both embedded models work at 16 kHz
FRAME_S = 0.01  # turn resolution
FADE_S = 0.01  # track gate fades


@dataclass(frozen=True)
class Turn:
    start: float
    end: float
    label: str  # cluster label before naming, manifest speaker id after


def to_16k(mono: np.ndarray, rate: int) -> np.ndarray:
    if rate == RATE:
        return mono.astype(np.float32)
    from scipy.signal import resample_poly

    g = np.gcd(rate, RATE)
    return resample_poly(mono, RATE // g, rate // g).astype(np.float32)


def merge_turns(turns: list[Turn], gap_s: float = 0.0) -> list[Turn]:
    """Join a speaker's overlapping or touching turns; different speakers may still overlap."""
    out: list[Turn] = []
    for label in sorted({t.label for t in turns}):
        current = None
        for t in sorted((t for t in turns if t.label == label), key=turn_key):
            if current is not None and t.start <= current.end + gap_s:
                current = Turn(current.start, max(current.end, t.end), label)
                continue
            if current is not None:
                out.append(current)
            current = t
        out.append(current)
    return sorted(out, key=turn_key)


def gate(spans: Sequence[tuple[float, float]], n: int, rate: int, fade_s: float = FADE_S) -> np.ndarray:
    """Gain (n,) that is 1 inside the spans with raised-cosine fades of `fade_s` just outside them."""
    gain = np.zeros(n, dtype=np.float32)
    k = max(1, int(fade_s * rate))
    ramp = (0.5 - 0.5 * np.cos(np.pi * (np.arange(k) + 1) / (k + 1))).astype(np.float32)
    for start, end in spans:
        a, b = max(0, int(round(start * rate))), min(n, int(round(end * rate)))
        gain[a:b] = 1.0
        lo = max(0, a - k)
        gain[lo:a] = np.maximum(gain[lo:a], ramp[k - (a - lo) :])
        hi = min(n, b + k)
        gain[b:hi] = np.maximum(gain[b:hi], ramp[::-1][: hi - b])
    return gain


def write_rttm(path: Path, turns: Sequence[Turn], uri: str) -> Path:
    uri = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in uri) or "audio"
    rows = [
        f"SPEAKER {uri} 1 {t.start:.3f} {t.end - t.start:.3f} <NA> <NA> {t.label} <NA> <NA>\n"
        for t in sorted(turns, key=turn_key)
    ]
    return write_text_atomic(path, "".join(rows))


def read_rttm(path: Path) -> list[Turn]:
    turns = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        fields = line.split()
        if not fields or fields[0] != "SPEAKER":
            continue
        try:
            start, duration = float(fields[3]), float(fields[4])
        except (IndexError, ValueError):
            raise ValueError(f"{path}:{number}: not an RTTM SPEAKER line: {line!r}") from None
        turns.append(Turn(start, start + duration, fields[7]))
    return sorted(turns, key=turn_key)


def write_text_atomic(path: Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def turn_key(t: Turn) -> tuple[float, float, str]:
    return (t.start, t.end, t.label)
