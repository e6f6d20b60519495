"""Benchmark of the segment planner (issue 5's measured goals; binding moved to bench/bind.py).

    python bench/plan.py            # 22-minute three-speaker episode
    python bench/plan.py --quick    # a shorter run

Planner: planning time, segment count, share of cuts in silences, longest segment vs the memory limit, shortest
segment and the count under one chunk (81 frames: each costs a whole chunk's call), planned makespan on 1, 2, 4 and
8 GPUs vs the ideal (total / GPUs); on the three-speaker episode and on a two-speaker dialogue over a still rendered
by the preview engine (time per frame, no per-call overhead: where one-frame slivers showed up). Baseline, run side
by side: a greedy planner that cuts at the last silence before the limit (what the walkthrough did by hand), with the
same time model.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from engine.base import AUDIO_RATE, FPS, Box  # noqa: E402
from engine.media import ffmpeg_exe  # noqa: E402
from engine.memory import (  # noqa: E402
    CHUNK_FRAMES,
    GiB,
    RenderCost,
    estimate_seconds,
    max_frames_that_fit,
)
from tasks.segment import SegmentPlan, frame_rms, makespan, plan_segments, speech_activity  # noqa: E402

FaceSpot = tuple[int, int, int]  # centre x, centre y, half height of the face ellipse (pixels)


# ---------------------------------------------------------------------------------------------- synthetic media


def conversation(
    names: Sequence[str],
    seconds: float,
    rng: np.random.Generator,
    *,
    overlap_share: float = 0.1,
    line_seconds: tuple[float, float] = (1.0, 12.0),
) -> dict[str, np.ndarray]:
    """16 kHz tracks of people taking turns: lines of 1-12 s at ~3.5 syllables/s, pauses of 0.1-1.5 s, and now and
    then someone starting before the other stops (overlap), as in a real dialogue."""
    total = int(seconds * AUDIO_RATE)
    tracks = {n: np.zeros(total, np.float32) for n in names}
    t, previous = int(rng.integers(0, AUDIO_RATE)), None
    while t < total:
        speaker = rng.choice([n for n in names if n != previous]) if len(names) > 1 else names[0]
        length = int(rng.uniform(*line_seconds) * AUDIO_RATE)
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
    width, height = size
    command = [ffmpeg_exe(), "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "gray"]
    command += [
        "-s",
        f"{width}x{height}",
        "-r",
        str(FPS),
        "-i",
        "-",
        "-c:v",
        "libx264",
        "-preset",
        "veryfast",
    ]
    command += ["-crf", "14", "-pix_fmt", "yuv420p", str(path)]
    with subprocess.Popen(command, stdin=subprocess.PIPE) as encoder:
        assert encoder.stdin is not None  # stdin=PIPE guarantees it
        for t in range(total):
            k = max(i for i, (start, _) in enumerate(shots) if start <= t)
            image = Image.new("L", size, 70 + 60 * (k % 2))
            draw = ImageDraw.Draw(image)
            for name, spot in shots[k][1].items():
                draw_face(draw, spot, float(openings[name][t]))
            noise = rng.normal(0, 2.0, (height, width))
            encoder.stdin.write(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8).tobytes())
        encoder.stdin.close()


# ---------------------------------------------------------------------------------------------- planner bench


def greedy_plan(activity: Mapping[str, np.ndarray], total: int, max_frames: int, min_gap: int) -> list[int]:
    """Baseline: segment lengths from cutting at the middle of the last silence before the limit (as the
    walkthrough did by hand), or at the limit when there is none."""
    silent = ~np.any([a[:total] for a in activity.values()], axis=0)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], silent.astype(np.int8), [0]])))
    middles = [(a + b) // 2 for a, b in zip(edges[0::2], edges[1::2], strict=True) if b - a >= min_gap]
    lengths, start = [], 0
    while total - start > max_frames:
        reachable = [m for m in middles if start < m <= start + max_frames]
        cut = reachable[-1] if reachable else start + max_frames
        lengths.append(cut - start)
        start = cut
    return [*lengths, total - start]


def _share_quiet(cuts: Sequence[int], quiet: np.ndarray) -> float:
    """Share of cuts with every track quiet (frame RMS under -40 dBFS) on both sides: acoustically in silence."""
    return sum(bool(quiet[c - 1] and quiet[c]) for c in cuts) / max(1, len(cuts))


def _plan_row(plan: SegmentPlan, quiet: np.ndarray, greedy: list[float], gpus: int, plan_ms: float) -> str:
    cuts = [s.end_frame for s in plan.segments[:-1]]
    lengths = [s.num_frames for s in plan.segments]
    short = sum(n < CHUNK_FRAMES for n in lengths)
    return (
        f"{gpus:>4} {plan_ms:>8.0f} {len(plan.segments):>5} {_share_quiet(cuts, quiet):>10.0%} "
        f"{plan.cut_counts().get('forced', 0):>6} {max(lengths):>4}/{plan.max_frames:<4} {min(lengths):>8} {short:>6} "
        f"{plan.total_seconds / 3600:>8.2f} "
        f"{plan.makespan_s() / plan.ideal_s():>14.3f} {len(greedy):>5} {sum(greedy) / 3600:>8.2f} "
        f"{makespan(greedy, gpus) / (sum(greedy) / gpus):>14.3f}"
    )


def bench_planner(minutes: float, names: Sequence[str] = ("ana", "ben", "cy"), seed: int = 5) -> None:
    rng = np.random.default_rng(seed)
    tracks = conversation(names, minutes * 60, rng)
    started = time.perf_counter()
    activity = {n: speech_activity(a, AUDIO_RATE) for n, a in tracks.items()}
    energy = {n: frame_rms(a, AUDIO_RATE) for n, a in tracks.items()}
    vad_s = time.perf_counter() - started
    total = min(len(a) for a in activity.values())
    quiet = np.all([20 * np.log10(e[:total] + 1e-10) <= -40 for e in energy.values()], axis=0)
    n = len(names)
    print(f"\nepisode: {minutes:g} min, {n} speakers, {total} frames; VAD {vad_s:.2f} s for {n} tracks")
    workers = {
        "streaming engine (keeps the motion frames only), H100 80 GB, 64 GiB host": (RenderCost(), 64),
        # 18 GiB: the walkthrough's machine as this model sees it: a 17 s piece fits, the 27 s line does not.
        "reference-like engine (every frame kept as fp32 in host RAM), H100 80 GB, 18 GiB host": (
            RenderCost(keep_frames="host_fp32", offload="model"),
            18,
        ),
        "preview engine (CPU, no weights; a still as the source), 64 GiB host": (
            RenderCost(engine="preview"),
            64,
        ),
    }
    for label, (settings, host_gib) in workers.items():
        limit = max_frames_that_fit(80 * GiB, host_gib * GiB, settings)
        print(f"\n{label}: memory limit {limit} frames ({limit / FPS:.1f} s)")
        print(
            f"{'GPUs':>4} {'plan ms':>8} {'segs':>5} {'in silence':>10} {'forced':>6} {'longest':>9} "
            f"{'shortest':>8} {'<chunk':>6} "
            f"{'render h':>8} {'makespan/ideal':>14} | greedy: {'segs':>5} {'render h':>8} {'makespan/ideal':>14}"
        )
        greedy = [estimate_seconds(n, settings) for n in greedy_plan(activity, total, limit, 8)]
        for gpus in (1, 2, 4, 8):
            started = time.perf_counter()
            plan = plan_segments(
                activity, total, max_frames=limit, n_gpus=gpus, energy=energy, settings=settings
            )
            print(_plan_row(plan, quiet, greedy, gpus, 1000 * (time.perf_counter() - started)))
        crowded = sum(1 for s in plan.segments if s.extra_speakers)
        print(f"cut kinds (8 GPUs): {plan.cut_counts()}; segments with 3 speakers (flagged): {crowded}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 5-minute episode and 2 scenes per size")
    args = parser.parse_args()
    bench_planner(5 if args.quick else 22)
    bench_planner(5, names=("ana", "ben"))


if __name__ == "__main__":
    main()
