"""enhance, backend `spandrel`, face restorers (spandrel purpose "FaceSR": GFPGAN v1.3 / v1.4 "clean",
RestoreFormer, RestoreFormer++): the way GFPGAN's FaceRestoreHelper (facexlib) runs them.

Per frame and per speaker: MTCNN (tasks/faces.py) finds the face and its five landmarks (eyes, nose, mouth
corners); the landmarks, averaged over the last SMOOTH_FRAMES frames of that speaker so the crop does not
jitter, give the similarity transform onto FFHQ's 512 x 512 template; the face is warped there, restored,
warped back with the inverse transform and blended in through a feathered face mask (eroded, then blurred,
as facexlib does) times the speaker's paste-back mask times `weight`. Outside the speakers' regions the
picture stays the source. A frame where a speaker's face is not found keeps its picture; the counts go to
the log and to qc.json.

Model range: spandrel's calling convention is RGB in [0, 1] in and out. Its RestoreFormer wrapper maps to
and from [-1, 1] itself; its GFPGAN wrapper (spandrel 0.4.2) does not, while GFPGAN was trained on [-1, 1]
(GFPGANer normalises with mean 0.5, std 0.5): for GFPGAN the mapping is done here.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from engine.base import Box

FACE_SIZE = 512
# facexlib's face_template for 512: the five points' places in an FFHQ-aligned face
TEMPLATE = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    np.float32,
)
SMOOTH_FRAMES = 5  # landmarks averaged over this many frames of the same speaker
JUMP = 0.5  # ... unless they moved more than this many eye distances in one frame: a cut, start afresh
MARGIN = 0.25  # the detector sees the speaker's region widened by this much of its size on each side
SIGNED_RANGE = ("GFPGAN",)  # architectures whose spandrel wrapper passes [0, 1] straight to a [-1, 1] model
WEIGHT = 0.5  # restored vs original inside the face mask (GFPGAN's --weight default)

log = logging.getLogger("dubflow.enhance")


@dataclass
class FaceCounts:
    """What the face restorer did, for the log and qc.json."""

    frames: int = 0
    speaker_frames: int = 0  # (frame, speaker) pairs with the speaker in view
    restored: int = 0  # ... whose face was found and restored
    missed: int = 0  # ... whose face was not found: left as it was
    missed_frames: list[int] = field(default_factory=list)  # the first few, for the report

    def as_dict(self) -> dict:
        return {
            "frames": self.frames,
            "speaker_frames": self.speaker_frames,
            "faces_restored": self.restored,
            "faces_missed": self.missed,
            "missed_frames": self.missed_frames[:20],
        }


def alignment(points: np.ndarray) -> np.ndarray:
    """The 2 x 3 similarity transform (rotation, uniform scale, shift) taking the five landmarks to TEMPLATE,
    fitted robustly (least median of squares, as facexlib)."""
    import cv2

    matrix, _ = cv2.estimateAffinePartial2D(np.asarray(points, np.float32), TEMPLATE, method=cv2.LMEDS)
    if matrix is None:  # degenerate points (all on one spot): no transform
        raise ValueError("the landmarks do not determine a face alignment")
    return matrix


def warp_face(image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The aligned FACE_SIZE x FACE_SIZE face; past the picture's edge, its reflection."""
    import cv2

    return cv2.warpAffine(
        image, matrix, (FACE_SIZE, FACE_SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )


def unwarp_face(face: np.ndarray, matrix: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The face put back into a picture of `size` = (width, height), and its feathered mask (float32 in
    [0, 1]): the aligned square warped back, eroded by a tenth of the face's width and blurred as wide."""
    import cv2

    inverse = cv2.invertAffineTransform(matrix)
    back = cv2.warpAffine(face, inverse, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    square = np.ones((FACE_SIZE, FACE_SIZE), np.float32)
    mask = cv2.warpAffine(square, inverse, size, flags=cv2.INTER_LINEAR, borderValue=0)
    mask = cv2.erode(mask, np.ones((2, 2), np.uint8))
    edge = int(float(mask.sum()) ** 0.5) // 20  # facexlib: a twentieth of the face's side
    if edge > 0:
        mask = cv2.erode(mask, np.ones((2 * edge, 2 * edge), np.uint8))
        mask = cv2.GaussianBlur(mask, (2 * edge + 1, 2 * edge + 1), 0)
    return back, mask


def run_face_model(model, face: np.ndarray) -> np.ndarray:
    """(512, 512, 3) uint8 aligned face -> the restored face, uint8. GFPGAN's noise inputs are seeded: the
    same frame restores the same way every run (the stage cache relies on it)."""
    import torch

    tensor = torch.from_numpy(np.array(face, np.uint8)).to(model.device).permute(2, 0, 1)[None]  # a copy
    tensor = tensor.to(model.dtype) / 255.0
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(0)
        if model.architecture.id in SIGNED_RANGE:
            out = model.model(tensor * 2 - 1, return_rgb=False)[0]
            out = ((out + 1) / 2).clamp_(0, 1)
        else:
            out = model(tensor)
    return (out[0].permute(1, 2, 0).float() * 255.0).round().byte().cpu().numpy()


class LandmarkSmoother:
    """Per track (a speaker's id), the mean of its last SMOOTH_FRAMES landmark sets. A track starts afresh
    when its face was not found, or when the landmarks jump by more than JUMP eye distances from the last
    frame's (a cut): averaging across the jump would align neither face."""

    def __init__(self, frames: int = SMOOTH_FRAMES):
        self.frames, self.history = frames, {}

    def __call__(self, track: str, points: np.ndarray | None) -> np.ndarray | None:
        if points is None:
            self.history.pop(track, None)
            return None
        points = np.asarray(points, np.float32)
        seen = self.history.setdefault(track, deque(maxlen=self.frames))
        if seen:
            eyes = float(np.linalg.norm(points[1] - points[0])) or 1.0
            if float(np.linalg.norm(points - seen[-1], axis=1).mean()) > JUMP * eyes:
                seen.clear()
        seen.append(points)
        return np.mean(seen, axis=0)


def _overlap(a: Box, b: Box) -> int:
    return max(0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0, min(a.y1, b.y1) - max(a.y0, b.y0))


def assign_faces(faces: list, speakers: list[tuple[str, Box]]) -> dict[str, object]:
    """Each speaker's face: the one with landmarks covering most of the speaker's box, each face used once."""
    taken, out = set(), {}
    for name, box in speakers:
        best = max(
            (
                (_overlap(f.box, box), i)
                for i, f in enumerate(faces)
                if i not in taken and f.landmarks is not None
            ),
            default=(0, None),
        )
        if best[0] > 0:
            taken.add(best[1])
            out[name] = faces[best[1]]
    return out


def restore_faces(
    model,
    frame: np.ndarray,
    region: np.ndarray,
    rect: tuple[int, int, int, int],
    speakers: list[tuple[str, Box]],
    detect: Callable[[np.ndarray], list],
    smoother: LandmarkSmoother,
    counts: FaceCounts,
    weight: float = WEIGHT,
    base: np.ndarray | None = None,
    index: int = 0,
) -> np.ndarray:
    """`frame` with each speaker's face restored inside the blend weights `region` over `rect` = (x0, y0,
    x1, y1); outside the rectangle the result is `base` (the source frame), or `frame` itself."""
    height, width = frame.shape[:2]
    x0, y0, x1, y1 = rect
    mx, my = int((x1 - x0) * MARGIN), int((y1 - y0) * MARGIN)
    px0, py0, px1, py1 = max(0, x0 - mx), max(0, y0 - my), min(width, x1 + mx), min(height, y1 + my)
    seen = frame[py0:py1, px0:px1]
    local = [(name, Box(b.x0 - px0, b.y0 - py0, b.x1 - px0, b.y1 - py0)) for name, b in speakers]
    found = assign_faces(detect(seen), local)
    theirs = frame[y0:y1, x0:x1].astype(np.float32)
    ours = theirs.copy()
    for name, _ in local:
        counts.speaker_frames += 1
        points = smoother(name, None if name not in found else np.asarray(found[name].landmarks))
        if points is None:
            counts.missed += 1
            counts.missed_frames.append(index)
            continue
        matrix = alignment(points)
        restored = run_face_model(model, warp_face(seen, matrix))
        back, mask = unwarp_face(restored, matrix, (px1 - px0, py1 - py0))
        inner = (slice(y0 - py0, y1 - py0), slice(x0 - px0, x1 - px0))
        mask = mask[inner][..., None]
        ours += mask * (back[inner].astype(np.float32) - ours)
        counts.restored += 1
    out = (frame if base is None else base).copy()
    blend = region[..., None] * weight
    out[y0:y1, x0:x1] = np.rint(theirs + blend * (ours - theirs)).astype(np.uint8)
    return out


def face_restored_frames(
    model,
    frames: Iterator[tuple[int, np.ndarray]],
    detect: Callable[[np.ndarray], list],
    counts: FaceCounts,
    region_at: Callable[[int], tuple[np.ndarray | None, tuple[int, int, int, int]]] | None = None,
    speakers_at: Callable[[int], list[tuple[str, Box]]] | None = None,
    bases: Iterator[tuple[int, np.ndarray]] | None = None,
    weight: float = WEIGHT,
    progress: Callable[[int], None] = lambda done: None,
) -> Iterator[tuple[int, np.ndarray]]:
    """(index, frame) -> (index, frame with the speakers' faces restored). With `region_at` (paste-back):
    the speakers `speakers_at(index)` names, inside their blend weights, on `bases` (the source's frames).
    Without: every face the detector finds in the whole frame, each tracked by its place left to right."""
    smoother = LandmarkSmoother()
    for done, (i, frame) in enumerate(frames, 1):
        counts.frames += 1
        base = next(bases)[1] if bases is not None else None
        if region_at is None:
            height, width = frame.shape[:2]
            faces = [f for f in detect(frame) if f.landmarks is not None]
            speakers = [(f"face{n}", f.box) for n, f in enumerate(faces)]
            region, whole = np.ones((height, width), np.float32), (0, 0, width, height)
            found = lambda _picture, faces=faces: faces  # noqa: E731 - the whole frame: already detected
            yield (
                i,
                restore_faces(
                    model, frame, region, whole, speakers, found, smoother, counts, weight, None, i
                ),
            )
        else:
            region, rect = region_at(i)
            if region is None:
                yield i, frame if base is None else base
            else:
                speakers = speakers_at(i)
                yield (
                    i,
                    restore_faces(
                        model, frame, region, rect, speakers, detect, smoother, counts, weight, base, i
                    ),
                )
        progress(done)
    log.info(
        "enhance: %d of %d speaker frames had their face restored (%d not found, left as they were)",
        counts.restored,
        counts.speaker_frames,
        counts.missed,
    )
