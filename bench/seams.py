#!/usr/bin/env python3
"""Benchmark: how visible the joins between rendered segments are, with render.chain off and on.

One generated video episode (a moving picture, one speaker box) is dubbed twice through `dubflow run` with
the tiny random-weight InfiniteTalk engine, in separate workspaces: `render.chain: false` (independent
segments, the baseline) and `render.chain: true` (each segment continues from the engine state the one
before it left). For each, the stitched rendered picture (the `stitch` stage's output: the clips at bucket
size, 25 fps) is measured at the segment boundaries of the published plan.json: CIEDE2000 of the mean
colours and the mean Farneback flow between frames b - 1 and b, against the same figures over every other
consecutive pair (tasks/seams.py). The source, taken on the same 25 fps grid, is measured at the same
boundaries as a control (it has no seams: ratios near 1). Figures also go to --out as JSON.

The tiny model has random weights: these figures test the measurement and the mechanism (context carried
across a join or not), not picture quality.

    python bench/seams.py [--seconds 4.8] [--max-segment-s 1.0] [--steps 2] [--out seams.json] [--keep DIR]
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
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

import numpy as np  # noqa: E402

ENGINE = "infinitetalk=tests.footage_fixtures:recording_tiny_infinitetalk"  # the tiny engine, jobs logged
SIZE = (128, 64)  # source (w, h)
BOX = [40, 8, 80, 56]
PAN_PX = 2  # the speaker, inside the engine's centre crop


def panned_texture(n: int) -> list[np.ndarray]:
    """n (H, W, 3) uint8 frames of one smooth random texture panned PAN_PX a frame to the left, slowly
    brightening, without a cut: a single rigid motion, so the control's flow has a known size (PAN_PX per
    source frame). (tests/footage_fixtures.py's picture overlays two motions and wraps its blue channel
    every 80 frames, which the binder takes for a shot cut.)"""
    import cv2

    w, h = SIZE
    noise = np.random.default_rng(0).uniform(0, 255, (h, w + PAN_PX * n, 3)).astype(np.float32)
    big = np.clip(cv2.GaussianBlur(noise, (0, 0), 2.5) * 3 - 255, 0, 215)
    return [(big[:, PAN_PX * i : PAN_PX * i + w] + 0.3 * i).astype(np.uint8) for i in range(n)]


def write_episode(folder: Path, seconds: float, max_segment_s: float, steps: int, chain: bool) -> Path:
    """A 30 fps moving video, one speaker whose speech has pauses, and the manifest that dubs it."""
    import soundfile as sf

    from engine.media import write_timed_video

    folder.mkdir(parents=True, exist_ok=True)
    frames = enumerate(panned_texture(round(seconds * 30)))
    write_timed_video(folder / "clip.mp4", frames, Fraction(1, 30), rate=30, crf=0)
    rate, t = 16_000, np.arange(round(seconds * 16_000)) / 16_000
    envelope = (np.sin(2 * np.pi * 1.3 * t) > -0.2).astype(np.float32)
    noise = np.random.default_rng(3).standard_normal(len(t)).astype(np.float32)
    sf.write(folder / "ana.wav", 0.2 * envelope * noise * np.sin(2 * np.pi * 180 * t), rate, subtype="FLOAT")
    render = (
        f"engine: infinitetalk, steps: {steps}, max_segment_s: {max_segment_s}, chain: {str(chain).lower()}"
    )
    manifest = folder / "episode.yaml"
    manifest.write_text(
        f"episode: seams\nsource: clip.mp4\nspeakers:\n  - {{id: ana, box: {BOX}, track: ana.wav}}\n"
        f"separate: {{backend: dsp}}\nrender: {{{render}}}\noutputs: [mp4, qc]\n"
    )
    return manifest


def dub(folder: Path, chain: bool, args: argparse.Namespace) -> dict:
    """`dubflow run` of the episode: its stitched picture, the boundaries and cuts, the chained starts."""
    from flows.cli import main as dubflow

    manifest = write_episode(folder, args.seconds, args.max_segment_s, args.steps, chain)
    ws, log = folder / "work", folder / "jobs.jsonl"
    os.environ["DUBFLOW_TEST_JOB_LOG"] = str(log)
    start = time.perf_counter()
    code = dubflow(["run", str(manifest), "--workspace", str(ws)])
    seconds = time.perf_counter() - start
    record = json.loads((ws / "episodes" / "seams" / "runs.jsonl").read_text().splitlines()[-1])
    if code != 0:
        raise SystemExit(f"dubflow run failed ({'chain' if chain else 'independent'}): {record.get('error')}")
    plan = json.loads(Path(record["outputs"]["plan.json"]).read_text())
    stitch = next(s for s in record["stages"] if s["stage"] == "stitch")
    jobs = [json.loads(line) for line in log.read_text().splitlines()]
    return {
        "frames": record["frames"],
        "picture": ws / stitch["outputs"][0],
        # a boundary at a shot cut is the source's own cut, not a join of renders
        "boundaries": sorted(s["start_frame"] for s in plan["segments"] if s["start_frame"] > 0),
        "shot_cuts": plan["shot_cuts"],
        "continued": sorted(j["start"] for j in jobs if j["continues"]),
        "run_s": seconds,
    }


def measure(run: dict) -> dict:
    from engine.media import VideoFrames
    from tasks.seams import seam_report

    frames = (frame for _, frame in VideoFrames(run["picture"]).iter_frames())
    report = seam_report(frames, [b for b in run["boundaries"] if b not in run["shot_cuts"]])
    return {**report, **{k: run[k] for k in ("boundaries", "shot_cuts", "continued", "frames", "run_s")}}


def measure_source(source: Path, boundaries: list[int], total: int) -> dict:
    """The source on the 25 fps grid at the same boundaries: a picture without seams, panned 2.4 px a frame
    on average (PAN_PX at 30 fps; the nearest-frame map steps 1 or 2 source frames)."""
    from engine.media import VideoFrames
    from tasks.seams import seam_report

    return {
        **seam_report(iter(VideoFrames(source).frames25(np.arange(total))), boundaries),
        "boundaries": boundaries,
    }


def print_mode(name: str, r: dict) -> None:
    runs = f", {len(r['continued'])} continued, dubflow run {r['run_s']:.0f} s" if "continued" in r else ""
    print(f"{name}: {len(r['seams'])} seams at {r['boundaries']}, {r['ordinary_pairs']} ordinary pairs{runs}")
    for key, label in (("delta_e", "colour ΔE00"), ("flow", "flow px")):
        seam, ordinary = f"{r['seam_mean'][key]:6.2f}  max {r['seam_max'][key]:6.2f}", r["ordinary"][key]
        print(
            f"  {label:11}  seam mean {seam}   ordinary median {ordinary['median']:6.2f}  p90"
            f" {ordinary['p90']:6.2f}   seam/ordinary {r['ratio'][key]:6.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=4.8)
    parser.add_argument("--max-segment-s", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder instead of a temp one")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="dubflow-seams-"))
    os.environ.setdefault("PREFECT_HOME", str(root / "prefect-home"))
    os.environ["DUBFLOW_ENGINE_OVERRIDES"] = ENGINE

    modes = {name: measure(dub(root / name, name == "chain", args)) for name in ("independent", "chain")}
    base, ours = modes["independent"], modes["chain"]
    modes["source"] = measure_source(root / "independent" / "clip.mp4", base["boundaries"], base["frames"])
    print(f"tiny InfiniteTalk V2V, {SIZE[0]}x{SIZE[1]} source, {args.seconds} s, max_segment_s "
          f"{args.max_segment_s}, {args.steps} steps; stitched rendered picture, 25 fps")  # fmt: skip
    for name in ("independent", "chain", "source"):
        print_mode({"source": "source (control, no seams)"}.get(name, name), modes[name])
    chain_vs = {k: ours["seam_mean"][k] / base["seam_mean"][k] for k in ("delta_e", "flow")}
    print(f"chain / independent, seam mean:  colour {chain_vs['delta_e']:.2f}   flow {chain_vs['flow']:.2f}")
    print(
        "note: random weights. These figures test the measurement and the mechanism (context carried across"
    )
    print("a join or not), not picture quality.")
    if args.out:
        args.out.write_text(json.dumps({**modes, "chain_over_independent": chain_vs, **vars(args)}, indent=1,
                                       default=str))  # fmt: skip


if __name__ == "__main__":
    main()
