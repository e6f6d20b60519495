"""Binding on real footage: head coverage, region size, assignment accuracy, jitter and speed of
`dubflow bind --propose`, against the binder it replaced (Haar face boxes, tasks/proposals.py at BASELINE_COMMIT)
run side by side in the same process.

    python bench/bind.py [--quick] [--footage DIR]

Footage: ../shared/data/footage-dev beside the repository (or --footage / $DUBFLOW_FOOTAGE_DEV), with its
hand-checked head boxes (boxes.json). Its one real two-person scene type is missing (no two-person video), so two
one-person videos are put side by side, each with its own sound as that person's track: "dialogue" (they take
turns of 1.25 s; the listener's picture holds still, the track is silent) and "duet" (both talk all the time over
their own pauses, the hard case). Generated scenes (bench/plan.py's drawn faces, two shots) check shot cuts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from engine.base import AUDIO_RATE, FPS, Box  # noqa: E402
from engine.media import read_audio, read_frames, video_size  # noqa: E402
from engine.video import Mp4Writer  # noqa: E402
from tasks.boxes import TimedBox, intersection, still_image  # noqa: E402
from tasks.face_tracks import ANALYSIS_WIDTH, SAMPLE_EVERY, jitter  # noqa: E402
from tasks.faces import face_detector, haar_face_detector, scale_box  # noqa: E402
from tasks.proposals import LOW_CONFIDENCE, propose_boxes  # noqa: E402
from tasks.regions import head_coverage, person_region  # noqa: E402

BASELINE_COMMIT = "b04da91"  # the binder before person regions: Haar face boxes, one per shot
STILLS = {
    "mt_multi1_car.png": ["mt_multi1_p1.wav", "mt_multi1_p2.wav"],
    "mt_multi2_studio.png": ["mt_multi2_shared.wav", "mt_multi2_shared.wav"],
    "mt_single1_studio.png": ["mt_single1.wav"],
}
VIDEOS = [
    "it_ref_video.mp4",
    "vrt_face1.mp4",
    "vrt_face2.mp4",
    "vrt_face4.mp4",
    "ls_demo1.mp4",
    "ls_demo2.mp4",
]
PAIRS = [
    ("vrt_face2.mp4", "vrt_face4.mp4"),
    ("vrt_face4.mp4", "it_ref_video.mp4"),
    ("it_ref_video.mp4", "vrt_face1.mp4"),
    ("vrt_face1.mp4", "vrt_face2.mp4"),
]
Binder = Callable[[Path, Mapping[str, np.ndarray]], dict[str, list[TimedBox]]]


def footage_dir(given: str | None) -> Path:
    return Path(given or os.environ.get("DUBFLOW_FOOTAGE_DEV") or ROOT.parent / "shared/data/footage-dev")


def baseline_binder() -> Binder | None:
    """tasks/proposals.py as it was at BASELINE_COMMIT, loaded from git (None outside a git checkout)."""
    try:
        code = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{BASELINE_COMMIT}:tasks/proposals.py"],
            capture_output=True,
            check=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    spec = importlib.util.spec_from_loader("baseline_proposals", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    exec(compile(code, "baseline_proposals.py", "exec"), module.__dict__)  # noqa: S102 (our own history)
    return lambda path, tracks: module.propose_boxes(path, tracks, AUDIO_RATE)


def ours() -> Binder:
    detector = face_detector()
    return lambda path, tracks: propose_boxes(path, tracks, AUDIO_RATE, detector=detector)


def _frame_size(path: Path) -> tuple[int, int]:
    return still_image(path).shape[1::-1] if path.suffix == ".png" else video_size(path)


def _on_right_person(box: Box, heads: dict[str, Box], person: str) -> bool:
    """The box holds more of this person's head than of anyone else's."""
    shares = {p: intersection(box, h) / (h.width * h.height) for p, h in heads.items()}
    return shares[person] > 0 and shares[person] == max(shares.values())


def _row(label: str, cells: list) -> str:
    return f"{label:<34}" + "".join(f"{c:>14}" for c in cells)


# ---------------------------------------------------------------------------------------------- real footage


def bench_footage(folder: Path, binders: dict[str, Binder]) -> dict[str, dict]:
    """Per binder: min head coverage, mean region share, right/total assignments, jitter, seconds per minute."""
    heads = json.loads((folder / "boxes.json").read_text())
    stats = {
        name: {
            "coverage": [],
            "share": [],
            "right": 0,
            "total": 0,
            "jitter": [],
            "seconds": 0.0,
            "video_s": 0.0,
        }
        for name in binders
    }
    for name, binder in binders.items():
        s = stats[name]
        for item in [*STILLS, *VIDEOS]:
            path = folder / item
            tracks = _tracks(folder, item)
            started = time.perf_counter()
            proposal = binder(path, tracks)
            elapsed = time.perf_counter() - started
            checked = {h["person"]: Box(*h["box"]) for h in heads[item]}
            width, height = _frame_size(path)
            total = 1 if item in STILLS else len(_activity_length(path))
            for person, head in checked.items():
                boxes = proposal.get(person, [])
                s["total"] += 1
                s["right"] += bool(boxes) and all(_on_right_person(b.box, checked, person) for b in boxes)
                s["coverage"].append(min((head_coverage(head, b.box) for b in boxes), default=0.0))
                s["share"] += [b.box.width * b.box.height / (width * height) for b in boxes]
                if item in VIDEOS:
                    s["jitter"].append(jitter(boxes, total))
            if item in VIDEOS:
                s["seconds"] += elapsed
                s["video_s"] += total / FPS
            print(f"  {name:<9} {item:<22} {elapsed:6.2f} s  " + _describe(proposal, checked), flush=True)
    return stats


def raw_jitter(path: Path, detector, every: int = SAMPLE_EVERY) -> float:
    """Jitter without tracking: the largest face's region re-derived at every sample and held until the next
    (what following the detector frame by frame, unsmoothed, would give)."""
    width, height = video_size(path)
    scale = width / ANALYSIS_WIDTH
    boxes = []
    for t, frame in enumerate(read_frames(path, ANALYSIS_WIDTH, colour=True)):
        if t % every == 0 and (faces := detector(frame)):
            face = max(faces, key=lambda f: f.box.height)
            region = person_region(scale_box(face.box, scale), (width, height))
            boxes.append(TimedBox(t, t + every, region))
    return jitter(boxes, boxes[-1].end_frame if boxes else 0)


def _describe(proposal: dict[str, list[TimedBox]], checked: dict[str, Box]) -> str:
    parts = []
    for person, head in checked.items():
        boxes = proposal.get(person, [])
        cover = min((head_coverage(head, b.box) for b in boxes), default=0.0)
        conf = [b.confidence for b in boxes if getattr(b, "confidence", None) is not None]
        parts.append(
            f"{person}: {len(boxes)} box(es), head {cover:.2f}" + (f", conf {min(conf):.2f}" if conf else "")
        )
    return "; ".join(parts)


def _activity_length(path: Path) -> list:
    return [0] * sum(1 for _ in read_frames(path, 64))


def _tracks(folder: Path, item: str) -> dict[str, np.ndarray]:
    if item in STILLS:
        return {f"p{i + 1}": read_audio(folder / wav, AUDIO_RATE) for i, wav in enumerate(STILLS[item])}
    return {"p1": read_audio(folder / item, AUDIO_RATE)}  # the video's own sound


# ---------------------------------------------------------------------------------------------- two people


def two_person_video(
    left: Path, right: Path, out: Path, *, seconds: float = 5.0, turn_s: float | None = 1.25, side: int = 360
) -> tuple[dict[str, np.ndarray], dict[str, Box]]:
    """Two real one-person videos side by side (each scaled to `side` px square), with each one's own sound as
    its person's track: p1 left, p2 right. `turn_s`: they take turns that long, the listener holding still and
    silent; None: both talk throughout (a duet). Turns last 0.6-1.6 times `turn_s` (seeded), as in a real
    exchange: a strictly periodic one would look the same shifted by two turns. Returns the tracks and where
    each head is (from boxes.json)."""
    frames = int(seconds * FPS)
    turn_of = _turns(frames, turn_s)
    sounds = [read_audio(p, AUDIO_RATE)[: int(seconds * AUDIO_RATE)] for p in (left, right)]
    pictures = [read_frames(p, side, colour=True) for p in (left, right)]
    held: list[np.ndarray | None] = [None, None]
    per_frame = AUDIO_RATE // FPS
    tracks = [np.zeros(int(seconds * AUDIO_RATE), np.float32) for _ in range(2)]
    with Mp4Writer(out, _ffmpeg(), crf=18, preset="veryfast") as writer:
        for t in range(frames):
            row = []
            for k in range(2):
                frame = next(pictures[k])[:side]
                talking = turn_of is None or turn_of[t] == k
                if talking or held[k] is None:
                    held[k] = frame
                    tracks[k][t * per_frame : (t + 1) * per_frame] = sounds[k][
                        t * per_frame : (t + 1) * per_frame
                    ]
                row.append(held[k])
            writer.write(np.concatenate(row, axis=1))
    heads = json.loads((left.parent / "boxes.json").read_text())
    where = {}
    for k, source in enumerate((left, right)):
        scale = side / video_size(source)[0]
        b = Box(*heads[source.name][0]["box"])
        where[f"p{k + 1}"] = Box(
            round(b.x0 * scale) + k * side,
            round(b.y0 * scale),
            round(b.x1 * scale) + k * side,
            round(b.y1 * scale),
        )
    return {"p1": tracks[0], "p2": tracks[1]}, where


def _turns(frames: int, turn_s: float | None, seed: int = 3) -> np.ndarray | None:
    """Per frame, who talks (0 left, 1 right), in turns of 0.6-1.6 x turn_s; None for a duet."""
    if turn_s is None:
        return None
    rng, who, out = np.random.default_rng(seed), [], 0
    while len(who) < frames:
        who += [out] * int(rng.uniform(0.6, 1.6) * turn_s * FPS)
        out = 1 - out
    return np.array(who[:frames])


def _ffmpeg() -> str:
    from engine.media import ffmpeg_exe

    return ffmpeg_exe()


def bench_two_people(folder: Path, binders: dict[str, Binder], pairs: list) -> dict[str, dict]:
    stats = {name: {"right": 0, "total": 0, "low": 0, "conf": []} for name in binders}
    with tempfile.TemporaryDirectory() as tmp:
        for mode, turn in (("dialogue", 1.25), ("duet", None)):
            for a, b in pairs:
                out = Path(tmp) / f"{mode}-{a}-{b}.mp4"
                tracks, heads = two_person_video(folder / a, folder / b, out, turn_s=turn)
                for name, binder in binders.items():
                    proposal = binder(out, tracks)
                    cells = []
                    for person in heads:
                        boxes = proposal.get(person, [])
                        right = bool(boxes) and all(_on_right_person(x.box, heads, person) for x in boxes)
                        conf = min(
                            (x.confidence for x in boxes if getattr(x, "confidence", None) is not None),
                            default=None,
                        )
                        stats[name]["total"] += 1
                        stats[name]["right"] += right
                        if conf is not None:
                            stats[name]["conf"].append(conf)
                            stats[name]["low"] += conf < LOW_CONFIDENCE
                        cells.append(
                            f"{person} {'ok' if right else 'WRONG'}"
                            + (f" {conf:.2f}" if conf is not None else "")
                        )
                    print(f"  {name:<9} {mode:<8} {a[:-4]}|{b[:-4]:<16} " + ", ".join(cells), flush=True)
    return stats


# ---------------------------------------------------------------------------------------------- generated


def _scene(people: int, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], list]:
    """Tracks of a short dialogue and two shots with the people in random places (the second shot reshuffles)."""
    names = ["ana", "ben", "cy"][:people]
    from bench.plan import conversation

    tracks = conversation(names, 8.0, rng, overlap_share=0.2, line_seconds=(0.8, 3.0))
    shots = []
    for start in (0, 100):
        xs = rng.permutation(np.linspace(55, 265, people).round().astype(int))
        size = int(rng.integers(32, 42))
        shots.append(
            (start, {n: (int(x), int(rng.integers(80, 100)), size) for n, x in zip(names, xs, strict=True)})
        )
    return tracks, shots


def bench_generated(binders: dict[str, Binder], scenes: int, seed: int = 11) -> dict[str, dict]:
    """bench/plan.py's drawn two-shot scenes: the right person in every shot (faces are Haar's domain)."""
    from bench.plan import face_box, write_talking_scene
    from tasks.segment import speech_activity

    rng = np.random.default_rng(seed)
    stats = {name: {"right": 0, "total": 0} for name in binders}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(scenes):
            tracks, shots = _scene(2 + i % 2, rng)
            path = Path(tmp) / f"scene{i}.mp4"
            write_talking_scene(path, tracks, shots, seed=i)
            bounds = [s for s, _ in shots] + [200]
            for name, binder in binders.items():
                proposal = binder(path, tracks)
                for person, track in tracks.items():
                    active = speech_activity(track, AUDIO_RATE)
                    for k, (start, layout) in enumerate(shots):
                        if active[start : bounds[k + 1]].sum() < 5:
                            continue
                        heads = {p: face_box(spot) for p, spot in layout.items()}
                        boxes = [b.box for b in proposal.get(person, ()) if b.covers(start)]
                        stats[name]["total"] += 1
                        stats[name]["right"] += bool(boxes) and _on_right_person(boxes[0], heads, person)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two pairs of videos, four generated scenes")
    parser.add_argument("--footage", help="footage-dev folder (default ../shared/data/footage-dev)")
    args = parser.parse_args()
    folder = footage_dir(args.footage)
    if not (folder / "boxes.json").is_file():
        sys.exit(f"bench/bind.py: no footage at {folder}: pass --footage DIR")
    binders = {"proposed": ours()}
    baseline = baseline_binder()
    if baseline is None:
        print(f"baseline: not run (no git history with {BASELINE_COMMIT})")
    else:
        binders["baseline"] = baseline
    print(f"faces: {face_detector().description}; baseline: Haar face boxes at {BASELINE_COMMIT}")
    print("\nreal footage (footage-dev: 3 stills, 6 one-person videos, hand-checked head boxes)")
    real = bench_footage(folder, binders)
    print("\ntwo real people side by side (each with its own sound)")
    pairs = bench_two_people(folder, binders, PAIRS[:2] if args.quick else PAIRS)
    print("\ngenerated drawn scenes (two shots, people swap places)")
    haar = haar_face_detector()
    drawn = bench_generated(
        {**binders, "haar+regions": lambda p, t: propose_boxes(p, t, AUDIO_RATE, detector=haar)},
        4 if args.quick else 8,
    )
    detector = face_detector()
    raw = float(np.mean([raw_jitter(folder / item, detector) for item in VIDEOS]))
    _summary(real, pairs, drawn, raw)


def _summary(real: dict, pairs: dict, drawn: dict, raw_jitter_px: float) -> None:
    names = list(real)
    print("\n" + _row("figure", names + (["ratio"] if len(names) == 2 else [])))
    figures = [
        ("head coverage, worst person", lambda s: min(s["coverage"]), "{:.2f}"),
        ("head coverage, mean", lambda s: float(np.mean(s["coverage"])), "{:.2f}"),
        (
            "region area share of frame, mean",
            lambda s: float(np.mean(s["share"])) if s["share"] else 0.0,
            "{:.2f}",
        ),
        ("assignment, stills + videos", lambda s: s["right"] / max(1, s["total"]), "{:.0%}"),
        ("jitter, px/frame (mean)", lambda s: float(np.mean(s["jitter"])), "{:.3f}"),
        ("seconds per minute of video", lambda s: 60 * s["seconds"] / max(1e-9, s["video_s"]), "{:.1f}"),
    ]
    for label, get, fmt in figures:
        values = [get(real[n]) for n in names]
        ratio = (
            [f"{values[0] / values[1]:.2f}x" if len(values) == 2 and values[1] else "-"]
            if len(names) == 2
            else []
        )
        print(_row(label, [fmt.format(v) for v in values] + ratio))
    for label, stats in (("assignment, two real people", pairs), ("assignment, generated shots", drawn)):
        print(
            _row(label, [f"{stats[n]['right']}/{stats[n]['total']}" for n in stats]) + "  " + " ".join(stats)
        )
    print(
        _row("jitter without tracking, px/frame", [f"{raw_jitter_px:.3f}"])
        + "  regions re-derived every sample"
    )
    low = {n: pairs[n]["low"] for n in pairs}
    print(_row(f"two people: confidence < {LOW_CONFIDENCE}", [str(low[n]) for n in names]))


if __name__ == "__main__":
    main()
