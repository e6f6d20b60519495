"""Benchmark of the segment planner and the binding proposal (issue 5's measured goals).

    python bench/plan.py            # 22-minute three-speaker episode + generated talking scenes
    python bench/plan.py --quick    # a shorter run

Planner: planning time, segment count, share of cuts in silences, longest segment vs the memory limit, planned
makespan on 1, 2, 4 and 8 GPUs vs the ideal (total / GPUs). Baseline, run side by side: a greedy planner that cuts
at the last silence before the limit (what the walkthrough did by hand), with the same time model.
Binding: share of speakers bound to the right face on generated videos (two and three people) where the talking
person's mouth opens with their track; baseline: binding speakers to faces left to right.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from engine.base import AUDIO_RATE, FPS, Box  # noqa: E402
from tasks.segment import frame_rms  # noqa: E402

FaceSpot = tuple[int, int, int]  # centre x, centre y, half height of the face ellipse (pixels)


# ---------------------------------------------------------------------------------------------- synthetic media


def conversation(
    names: Sequence[str], seconds: float, rng: np.random.Generator, *, overlap_share: float = 0.1
) -> dict[str, np.ndarray]:
    """16 kHz tracks of people taking turns: lines of 1-12 s at ~3.5 syllables/s, pauses of 0.1-1.5 s, and now and
    then someone starting before the other stops (overlap), as in a real dialogue."""
    total = int(seconds * AUDIO_RATE)
    tracks = {n: np.zeros(total, np.float32) for n in names}
    t, previous = int(rng.integers(0, AUDIO_RATE)), None
    while t < total:
        speaker = rng.choice([n for n in names if n != previous]) if len(names) > 1 else names[0]
        length = int(rng.uniform(1.0, 12.0) * AUDIO_RATE)
        speak(tracks[speaker], t, length, rng, 110 + 60 * list(names).index(speaker))
        previous = speaker
        pause = rng.uniform(-0.8, -0.2) if rng.random() < overlap_share else rng.uniform(0.1, 1.5)
        t += length + int(pause * AUDIO_RATE)
    return tracks


def speak(track: np.ndarray, start: int, length: int, rng: np.random.Generator, pitch: float) -> None:
    """A line: a voiced tone whose loudness rises and falls with syllables (so a mouth that follows it moves)."""
    end = min(len(track), start + length)
    t = np.arange(end - start) / AUDIO_RATE
    syllables = np.abs(np.sin(2 * np.pi * rng.uniform(3.0, 4.0) * t + rng.uniform(0, np.pi)))
    track[start:end] += (0.25 * (0.15 + 0.85 * syllables) * np.sin(2 * np.pi * pitch * t)).astype(np.float32)


def mouth_openings(tracks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per speaker and frame, 0 (closed) to 1 (wide open), following the track's loudness."""
    return {n: frame_rms(a, AUDIO_RATE) / (frame_rms(a, AUDIO_RATE).max() + 1e-9) for n, a in tracks.items()}


def face_box(spot: FaceSpot) -> Box:
    """The drawn face ellipse's bounding box."""
    cx, cy, s = spot
    return Box(round(cx - 0.8 * s), cy - s, round(cx + 0.8 * s), cy + s)


def draw_face(draw: ImageDraw.ImageDraw, spot: FaceSpot, opening: float) -> None:
    """A frontal face simple enough to draw, detailed enough for a Haar cascade: eyes, brows, nose, mouth."""
    cx, cy, s = spot
    draw.ellipse([cx - 0.8 * s, cy - s, cx + 0.8 * s, cy + s], fill=200)
    for side in (-0.32, 0.32):
        ex = cx + side * s
        draw.ellipse([ex - 0.16 * s, cy - 0.38 * s, ex + 0.16 * s, cy - 0.22 * s], fill=40)
        draw.rectangle([ex - 0.2 * s, cy - 0.5 * s, ex + 0.2 * s, cy - 0.44 * s], fill=70)
    draw.polygon([(cx, cy - 0.2 * s), (cx - 0.1 * s, cy + 0.15 * s), (cx + 0.1 * s, cy + 0.15 * s)], fill=170)
    half = (0.04 + 0.25 * opening) * s / 2
    draw.ellipse([cx - 0.28 * s, cy + 0.45 * s - half, cx + 0.28 * s, cy + 0.45 * s + half], fill=50)


def write_talking_scene(
    path: Path,
    tracks: Mapping[str, np.ndarray],
    shots: Sequence[tuple[int, Mapping[str, FaceSpot]]],
    *,
    size: tuple[int, int] = (320, 180),
    seed: int = 0,
) -> None:
    """An H.264 video at 25 fps: per shot (start frame, where each speaker's face is) a new background level and
    face layout; each mouth opens with its own track. Sensor noise moves every pixel a little."""
    openings = mouth_openings(tracks)
    total = min(len(o) for o in openings.values())
    rng = np.random.default_rng(seed)
    command = [
        "ffmpeg",
        "-v",
        "error",
        "-y",
        "-f",
        "rawvideo",
        "-pix_fmt",
        "gray",
        "-s",
        f"{size[0]}x{size[1]}",
    ]
    command += ["-r", str(FPS), "-i", "-", "-c:v", "libx264", "-preset", "veryfast", "-crf", "14"]
    command += ["-pix_fmt", "yuv420p", str(path)]
    with subprocess.Popen(command, stdin=subprocess.PIPE) as encoder:
        assert encoder.stdin is not None  # stdin=PIPE guarantees it
        for t in range(total):
            k = max(i for i, (start, _) in enumerate(shots) if start <= t)
            image = Image.new("L", size, 70 + 60 * (k % 2))
            draw = ImageDraw.Draw(image)
            for name, spot in shots[k][1].items():
                draw_face(draw, spot, float(openings[name][t]))
            noise = rng.normal(0, 2.0, (size[1], size[0]))
            encoder.stdin.write(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8).tobytes())
        encoder.stdin.close()
