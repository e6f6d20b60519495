#!/usr/bin/env python3
"""Benchmark: the spandrel face restorer (tasks/face_restore.py) on real footage (footage-dev it_ref_video.mp4).

- jitter: over --track-frames frames, MTCNN's landmarks give the FFHQ alignment; the figure is the mean
  frame-to-frame motion of the aligned crop's corners (pixels of the source) with the landmarks smoothed
  as the backend does, against the baseline of the raw per-frame landmarks, measured on the same frames;
- time: seconds per frame of the whole face path (detect, align, warp, model, unwarp, blend) on --frames
  frames, against the baseline of the model call alone on the same aligned faces, in the same run: the
  ratio is what the face path adds around the model.

The model is --model (your GFPGAN / RestoreFormer weights), else GFPGAN v1.4-layout weights of random
values (the real architecture's cost; the picture it makes means nothing).

    python bench/face_restore.py [--model weights/GFPGANv1.4.pth] [--frames 3] [--track-frames 60]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

FOOTAGE = Path(__file__).resolve().parents[2] / "shared" / "data" / "footage-dev"


def _corners(matrix: np.ndarray) -> np.ndarray:
    """Where the aligned crop's four corners fall in the source."""
    import cv2

    from tasks.face_restore import FACE_SIZE

    inverse = cv2.invertAffineTransform(matrix)
    square = np.array([[0, 0], [FACE_SIZE, 0], [0, FACE_SIZE], [FACE_SIZE, FACE_SIZE]], np.float32)
    return square @ inverse[:, :2].T + inverse[:, 2]


def jitter(frames: list[np.ndarray], box) -> dict:
    from tasks.face_restore import LandmarkSmoother, alignment, assign_faces
    from tasks.faces import mtcnn_face_detector

    detect, smooth = mtcnn_face_detector(), LandmarkSmoother()
    raw, smoothed = [], []
    for frame in frames:
        found = assign_faces(detect(frame), [("p1", box)])
        if "p1" not in found:
            smooth("p1", None)
            raw.append(None), smoothed.append(None)
            continue
        points = np.asarray(found["p1"].landmarks, np.float32)
        raw.append(_corners(alignment(points)))
        smoothed.append(_corners(alignment(smooth("p1", points))))

    def motion(corners: list) -> float:
        steps = [
            np.linalg.norm(b - a, axis=1).mean()
            for a, b in zip(corners, corners[1:], strict=False)
            if a is not None and b is not None
        ]
        return float(np.mean(steps))

    return {
        "frames": len(frames),
        "faces_found": sum(c is not None for c in raw),
        "crop_motion_px_raw": motion(raw),
        "crop_motion_px_smoothed": motion(smoothed),
        "ratio": motion(smoothed) / motion(raw),
    }


def timing(model, frames: list[np.ndarray], box) -> dict:
    from tasks.face_restore import (
        FaceCounts,
        LandmarkSmoother,
        alignment,
        assign_faces,
        restore_faces,
        run_face_model,
        warp_face,
    )
    from tasks.faces import mtcnn_face_detector

    detect, counts, smooth = mtcnn_face_detector(), FaceCounts(), LandmarkSmoother()
    height, width = frames[0].shape[:2]
    region, rect = np.ones((height, width), np.float32), (0, 0, width, height)
    speakers = [("p1", box)]
    run_face_model(model, np.zeros((512, 512, 3), np.uint8))  # warm-up
    start = time.perf_counter()
    for i, frame in enumerate(frames):
        restore_faces(model, frame, region, rect, speakers, detect, smooth, counts, 1.0, None, i)
    whole = (time.perf_counter() - start) / len(frames)
    faces = []
    for frame in frames:
        found = assign_faces(detect(frame), [("p1", box)])
        faces.append(warp_face(frame, alignment(np.asarray(found["p1"].landmarks, np.float32))))
    start = time.perf_counter()
    for face in faces:
        run_face_model(model, face)
    alone = (time.perf_counter() - start) / len(faces)
    return {
        "frames": len(frames),
        "faces_restored": counts.restored,
        "seconds_per_frame": whole,
        "model_alone_seconds_per_face": alone,
        "ratio": whole / alone,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model", type=Path, help="face restorer weights (default: random GFPGAN v1.4 layout)"
    )
    parser.add_argument("--frames", type=int, default=3, help="frames timed through the model")
    parser.add_argument("--track-frames", type=int, default=60, help="frames for the jitter figure")
    parser.add_argument("--out", type=Path, help="write the figures as JSON")
    args = parser.parse_args()

    import torch

    from engine.media import VideoFrames
    from tasks.enhance_model import check_model, load_model

    source = FOOTAGE / "it_ref_video.mp4"
    from engine.base import Box

    box = Box(*next(b["box"] for b in json.loads((FOOTAGE / "boxes.json").read_text())["it_ref_video.mp4"]))
    frames = [
        f for _, (_, f) in zip(range(args.track_frames), VideoFrames(source).iter_frames(), strict=False)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        weights = args.model
        if weights is None:
            from tests.enhance_fixtures import write_random_gfpgan

            weights = write_random_gfpgan(Path(tmp) / "GFPGANv1.4.pth")
        card = check_model(weights)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_model(Path(weights), card.sha256, device)
        figures = {
            "model": {"architecture": card.architecture, "purpose": card.purpose, "device": device},
            "threads": torch.get_num_threads(),
            "jitter": jitter(frames, box),
            "time": timing(model, frames[: args.frames], box),
        }
    j, t = figures["jitter"], figures["time"]
    print(
        f"jitter: aligned crop moves {j['crop_motion_px_smoothed']:.2f} px/frame smoothed vs"
        f" {j['crop_motion_px_raw']:.2f} raw (baseline) -> ratio {j['ratio']:.2f}"
        f" ({j['faces_found']}/{j['frames']} frames with the face)"
    )
    print(
        f"time: {t['seconds_per_frame']:.2f} s/frame for the face path vs {t['model_alone_seconds_per_face']:.2f}"
        f" s for the {card.architecture} call alone (baseline) on {device} -> ratio {t['ratio']:.2f}"
    )
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
