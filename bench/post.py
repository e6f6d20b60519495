#!/usr/bin/env python3
"""Benchmark: post-production to a delivery spec, on the demo episode and a generated 5-minute episode.

For each episode the stages after rendering run as the flow runs them (tasks/stitch.py, remix.py,
deliver.py, called directly, without Prefect):

- loudness: the remix to each spec (EBU R128, ATSC A/85, streaming -16 and -14), measured on the WAV and
  on the decoded AAC: error against the target in LU and true peak in dBTP;
- seams: the picture is segment clips of the demo scene at 480p (a moving mouth patch) with a colour drift
  planted in each segment (RGB gains drawn around 1, as an engine's drift looks); seam CIEDE2000 before
  and after colour matching to the first segment;
- A/V offset of the delivered mp4 (first sound against first picture, in frames) and its length difference;
- time: stitch (colour-matched) + remix (EBU R128, ducked bed) + deliver (mp4, stems, SRT/VTT, QC) as a
  multiple of real time on this machine, against the baseline of the same stages with the frame-exact
  concat only (no colour matching), measured side by side in the same run;
- crossfades (render.overlap_frames): the same clips rendered K frames past each segment's end; the
  stitch time against the plain concat's, and the largest frame-to-frame CIEDE2000 step at a seam, hard
  cut against crossfaded.

    python bench/post.py [--minutes 5] [--segment-s 5] [--width 854] [--overlap-frames 4] [--out post.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import numpy as np  # noqa: E402

SPECS = ("ebu-r128", "atsc-a85", "streaming-16", "streaming-14")
FPS = 25


def demo_audio(folder: Path, seconds: float | None) -> dict[str, np.ndarray]:
    """The demo's two voices and its music bed at 48 kHz; with `seconds`, the ~10 s conversation repeated
    (2 s apart) to fill that long."""
    from engine.media import read_audio
    from tasks.demo import RATE, make_demo_media, music_bed

    media = make_demo_media(folder)
    voices = {s: read_audio(media[s], RATE) for s in ("ana", "ben")}
    if seconds:
        period = len(voices["ana"]) + 2 * RATE
        reps = int(np.ceil(seconds * RATE / period))
        voices = {
            s: np.tile(np.pad(v, (0, period - len(v))), reps)[: int(seconds * RATE)]
            for s, v in voices.items()
        }
    length = max(len(v) for v in voices.values())
    bed = music_bed(length / RATE, RATE).astype(np.float32)
    speech_rms = np.sqrt(np.mean(np.sum(list(voices.values()), axis=0) ** 2))
    bed *= np.float32(speech_rms / np.sqrt(np.mean(bed**2)) * 10 ** (-12 / 20))
    return voices | {"bed": bed, "scene": media["scene"]}


def write_clips(
    ws, folder: Path, scene: Path, total: int, segment: int, width: int, seed: int = 0, overlap: int = 0
):
    """Segment clips of the scene at `width` (even height) with a mouth patch that moves, each with its own
    planted colour drift (per-channel gains ~ N(1, 0.04)); each but the last `overlap` frames longer."""
    from PIL import Image

    from engine.media import write_timed_video
    from tasks.render import Clip

    image = Image.open(scene).convert("RGB")
    height = round(image.height * width / image.width / 2) * 2
    base = np.asarray(image.resize((width, height)), np.float32)
    rng = np.random.default_rng(seed)
    clips, start = [], 0
    while start < total:
        n = min(segment, total - start)
        extra = min(overlap, total - start - n)
        gains = rng.normal(1.0, 0.04, 3).astype(np.float32)
        frames = (
            (i, np.clip(_mouth(base, start + i) * gains, 0, 255).astype(np.uint8)) for i in range(n + extra)
        )
        path = folder / f"clip{len(clips):03d}.mp4"
        write_timed_video(path, frames, Fraction(1, FPS), crf=18, preset="veryfast")
        clips.append(
            Clip(len(clips), ws.put_file(path), n + extra, "multitalk", start_frame=start, overlap=extra)
        )
        start += n
    return clips


def _mouth(base: np.ndarray, i: int) -> np.ndarray:
    h, w = base.shape[:2]
    frame = base.copy()
    y0, x0 = int(h * 0.55), int(w * 0.25)
    opening = int(h * 0.02 * (1 + np.sin(i / 2)))
    frame[y0 : y0 + opening + 2, x0 : x0 + w // 20] = (90, 30, 40)
    return frame


def run_episode(name: str, seconds: float | None, args) -> dict:
    from engine.media import write_wav
    from tasks.deliver import Expected, deliver
    from tasks.remix import Ducking, MixTarget, remix
    from tasks.speakers import MIX_RATE, Timeline, fit_length
    from tasks.stitch import stitch_clips
    from tasks.workspace import Workspace

    with tempfile.TemporaryDirectory(prefix="bench-post-") as tmp:
        folder = Path(tmp)
        audio = demo_audio(folder / "media", seconds)
        timeline = Timeline(int(len(audio["bed"]) / MIX_RATE * FPS))
        ws = Workspace(folder / "ws")
        tracks = {
            s: ws.put_file(
                write_wav(folder / f"{s}.wav", fit_length(audio[s], timeline.total_samples), MIX_RATE)
            )
            for s in ("ana", "ben")
        }
        bed = ws.put_file(write_wav(folder / "bed.wav", audio["bed"], MIX_RATE))
        clips = write_clips(
            ws, folder, audio["scene"], timeline.total_frames, int(args.segment_s * FPS), args.width
        )
        print(
            f"\n{name}: {timeline.seconds:.1f} s, {timeline.total_frames} frames, {len(clips)} segments at {args.width}px"
        )

        loudness = {}
        for spec in SPECS:
            from tasks.qc import LOUDNESS_SPECS

            lufs, ceiling = LOUDNESS_SPECS[spec]
            mix = remix(ws, list(tracks.values()), bed, timeline, MixTarget(lufs, ceiling, 0.0, spec))
            loudness[spec] = _loudness_row(mix.report, lufs)

        ducked = MixTarget(-23.0, -1.0, 0.0, "ebu-r128", Ducking(10.0, 80.0, 400.0))
        times, results = {}, {}
        for label, match in (("baseline (concat only)", False), ("colour-matched", True)):
            cpu, started = _cpu_seconds(), time.perf_counter()
            stitched = stitch_clips(ws, clips, timeline.total_frames, None, match)
            t_stitch = time.perf_counter() - started
            mix = remix(ws, list(tracks.values()), bed, timeline, ducked, tracks)
            t_remix = time.perf_counter() - started - t_stitch
            expected = Expected(timeline.total_frames, -23.0, -1.0)
            captions = ((0.4, 2.0, "Hello", 0),)
            outputs = ("mp4", "stems", "srt", "vtt", "qc")
            delivery = deliver(ws, name, stitched.picture, mix, timeline, captions, outputs, {}, {}, expected)
            total = time.perf_counter() - started
            times[label] = {
                "stitch": t_stitch,
                "remix": t_remix,
                "deliver": total - t_stitch - t_remix,
                "total": total,
                "cpu": _cpu_seconds() - cpu,
            }
            results[label] = (stitched, ws.read_json(delivery.qc), mix)
        (folder / "overlap").mkdir()
        overlapped = write_clips(
            ws, folder / "overlap", audio["scene"], timeline.total_frames, int(args.segment_s * FPS),
            args.width, overlap=args.overlap_frames,
        )  # fmt: skip
        started = time.perf_counter()
        faded = stitch_clips(ws, overlapped, timeline.total_frames, None, False)
        crossfade = {
            "overlap_frames": args.overlap_frames,
            "stitch_s": time.perf_counter() - started,
            "concat_s": times["baseline (concat only)"]["stitch"],
            "largest_seam_step_delta_e": {
                "hard_cut": _largest_step(ws, results["baseline (concat only)"][0].picture, clips, 0),
                "crossfaded": _largest_step(ws, faded.picture, clips, args.overlap_frames),
            },
        }
    return _report(name, timeline.seconds, loudness, times, results) | {"crossfade": _crossfade(crossfade)}


def _largest_step(ws, picture, clips, overlap: int) -> float:
    """The largest CIEDE2000 between the mean colours of consecutive frames from the frame before each seam
    to the end of its crossfade (one step for a hard cut, K + 1 for a crossfade over K frames)."""
    from engine.media import VideoFrames
    from tasks.seams import delta_e2000, mean_lab

    video, steps = VideoFrames(ws.path(picture)), []
    for clip in clips[1:]:
        frames = video.frames25(np.arange(clip.start_frame - 1, clip.start_frame + overlap + 1))
        labs = [mean_lab(f[::4, ::4]) for f in frames]
        steps += [float(delta_e2000(a, b)) for a, b in zip(labs, labs[1:], strict=False)]
    return round(max(steps), 2)


def _crossfade(figures: dict) -> dict:
    ratio = figures["stitch_s"] / figures["concat_s"]
    step = figures["largest_seam_step_delta_e"]
    print(
        f"  crossfade over {figures['overlap_frames']} overlap frames: stitch {figures['stitch_s']:.1f} s against"
        f" {figures['concat_s']:.1f} s for the plain concat ({ratio:.1f}x); largest frame-to-frame ΔE2000 at a"
        f" seam: hard cut {step['hard_cut']}, crossfaded {step['crossfaded']}"
    )
    return figures | {"stitch_vs_concat": round(ratio, 2)}


def _cpu_seconds() -> float:
    """CPU seconds of this process and the ffmpeg processes it waited for (the machine is shared: wall
    time alone would count the other users' load)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _warm_up() -> None:
    """Import torch and run the Lab conversion once, so neither is timed inside the first stage."""
    import numpy as np

    from tasks.seams import rgb_to_lab

    rgb_to_lab(np.zeros((2, 2, 3), np.uint8))


def _loudness_row(report: dict, target: float) -> dict:
    return {
        kind: {
            "error_lu": round(report[kind]["loudness_lufs"] - target, 2),
            "true_peak_dbtp": report[kind]["true_peak_dbtp"],
            "lra_lu": report[kind]["loudness_range_lu"],
            "dialogue_gated_lufs": report[kind]["dialogue_gated_lufs"],
        }
        for kind in ("wav", "aac")
    }


def _report(name: str, seconds: float, loudness: dict, times: dict, results: dict) -> dict:
    print(
        f"  {'spec':<13} {'WAV error':>9} {'WAV TP':>7} {'AAC error':>9} {'AAC TP':>7} {'LRA':>5} {'dial.':>6}"
    )
    for spec, row in loudness.items():
        w, a = row["wav"], row["aac"]
        print(
            f"  {spec:<13} {w['error_lu']:>+8.2f}  {w['true_peak_dbtp']:>+6.2f} {a['error_lu']:>+8.2f}  "
            f"{a['true_peak_dbtp']:>+6.2f} {a['lra_lu']:>5.1f} {a['dialogue_gated_lufs']:>6.1f}"
        )
    stitched, qc, mix = results["colour-matched"]
    colour = stitched.colour
    before, after = colour["seam_delta_e_before"], colour["seam_delta_e_after"]
    print(
        f"  seam ΔE2000 over {len(colour['seams'])} seams: before mean {before['mean']} max {before['max']}, "
        f"after mean {after['mean']} max {after['max']}"
    )
    print(
        f"  A/V offset {qc['av_offset_frames']} frames, length difference {qc['av_difference_seconds'] * 1000:.1f} ms;"
        f" QC {qc['verdict']}; ducking measured {mix.report['ducking']['measured_depth_db']} dB (asked 10)"
    )
    base, full = times["baseline (concat only)"], times["colour-matched"]
    for label, t in times.items():
        parts = ", ".join(f"{k} {t[k]:.1f} s" for k in ("stitch", "remix", "deliver"))
        print(
            f"  {label:<23} {t['total']:6.1f} s wall = {t['total'] / seconds:.3f} x real time ({parts});"
            f" {t['cpu']:.1f} CPU-s = {t['cpu'] / seconds:.3f} x real time on one core"
        )
    print(
        f"  colour-matched / baseline: {full['total'] / base['total']:.2f}x wall, {full['cpu'] / base['cpu']:.2f}x CPU"
    )
    return {
        "episode": name,
        "seconds": seconds,
        "loudness": loudness,
        "seams": colour,
        "av_offset_frames": qc["av_offset_frames"],
        "av_difference_seconds": qc["av_difference_seconds"],
        "qc_verdict": qc["verdict"],
        "ducking": mix.report["ducking"],
        "times": times,
        "x_real_time_wall": {k: v["total"] / seconds for k, v in times.items()},
        "x_real_time_cpu": {k: v["cpu"] / seconds for k, v in times.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="the generated episode's length")
    parser.add_argument("--segment-s", type=float, default=5.0, help="segment length of the picture")
    parser.add_argument("--width", type=int, default=854, help="picture width (480p: 854)")
    parser.add_argument("--overlap-frames", type=int, default=4, help="frames crossfaded at each seam")
    parser.add_argument("--out", type=Path, help="write the figures as JSON")
    args = parser.parse_args()
    print(f"post-production bench on {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}")
    _warm_up()
    figures = [
        run_episode("demo", None, args),
        run_episode(f"generated-{args.minutes:g}min", args.minutes * 60, args),
    ]
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
