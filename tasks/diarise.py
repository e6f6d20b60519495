"""diarise: who speaks when, one gated track per manifest speaker, with deterministic naming.

Backends:
- ``embedded`` (default when pyannote is unavailable): silero-vad speech regions, resemblyzer
  d-vectors on 1.6 s sliding windows, spectral clustering of a pruned cosine affinity, frame-level
  re-assignment to the cluster centroids. Both models ship inside their PyPI wheels.
- ``pyannote``: pyannote.audio's speaker-diarization pipeline (community-1 or 3.1) from the HF cache or
  a local folder; token from HF_TOKEN, never logged; telemetry off.

Naming: clusters are labelled ``SPK0, SPK1 ...`` by first appearance, then matched to the manifest
speakers by their enrolment clips (cosine similarity, Hungarian assignment); speakers without a clip
follow the manifest order rule (with a warning); ``pinned`` overrides any entry. The result is saved
in ``mapping.json`` next to the RTTM and the tracks.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from prefect import task

from engine.base import EngineSetupError, MissingWeightsError
from tasks.separate import AudioError, check_not_silent, read_audio, write_audio
from tasks.workspace import Blob, Workspace, stage_cache

log = logging.getLogger(__name__)

ProgressHook = Callable[..., None]
BACKENDS = ("auto", "embedded", "pyannote")
ORDERS = ("first-appearance", "most-speech")
RATE = 16_000  # both embedded models work at 16 kHz
FRAME_S = 0.01  # turn resolution
FADE_S = 0.01  # track gate fades
DIARIZE_EXTRA = "pip install -e '.[diarize]'"
VAD_EXTRA = "pip install -e '.[vad]'"
PYANNOTE_PIPELINES = {
    "community-1": "pyannote/speaker-diarization-community-1",
    "3.1": "pyannote/speaker-diarization-3.1",
}


@dataclass(frozen=True)
class SpeakerRef:
    id: str
    voice_sample: Path | None = None


@dataclass(frozen=True)
class Diarisation:
    rttm: Path
    tracks: dict[str, Path]
    mapping: dict[str, str]
    backend: str
    warnings: tuple[str, ...] = ()
    model: str = ""  # e.g. "silero-vad==6.2.3 + resemblyzer==0.1.4", or the pyannote pipeline


@dataclass(frozen=True)
class Turn:
    start: float
    end: float
    label: str  # cluster label before naming, manifest speaker id after


@dataclass(frozen=True)
class EmbeddedSettings:
    """One fixed configuration for every input (see bench/audio.py for how it scores)."""

    vad_threshold: float = (
        0.6  # at 0.5 music cues pass as speech (bench, 6 cues at -12 dB: worst 6.5 % -> 3.1 %)
    )
    window_s: float = 1.6  # resemblyzer's own partial-utterance length
    hop_s: float = 0.2
    min_window_s: float = 0.4
    prune: float = 0.3  # each window keeps its most similar 30 % in the affinity graph
    same_voice_similarity: float = (
        0.95  # centroids closer than this are one voice, whatever the manifest says
    )
    min_cluster_s: float = 1.0  # clusters with less speech are absorbed by their nearest neighbour
    smooth_s: float = 0.5
    max_speakers: int = 8
    max_cluster_windows: int = 1500
    neighbour_overlap: float = 0.5  # windows sharing more than this fraction are not compared
    join_gap_s: float = (
        0.3  # speech regions closer than this are windowed as one (short speakers get more windows)
    )


# --------------------------------------------------------------------------- backend choice


def resolve_diarise_backend(backend: str) -> tuple[str, str]:
    """Return (backend, why): `auto` prefers pyannote when it imports, else the embedded diariser."""
    if backend not in BACKENDS:
        raise ValueError(f"diarise backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend, f"{backend} requested"
    # pyannote's telemetry is on by default: turn it off before the first import
    os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
    try:
        import pyannote.audio  # noqa: F401
    except Exception as exc:  # a broken torchaudio raises OSError, not ImportError
        return "embedded", f"pyannote.audio unavailable ({type(exc).__name__}); using the embedded diariser"
    return "pyannote", "pyannote.audio is installed"


# --------------------------------------------------------------------------- entry point


def diarise(
    vocals: Path,
    speakers: Sequence[SpeakerRef],
    out_dir: Path,
    *,
    backend: str = "auto",
    num_speakers: int | None = None,
    order: str = "first-appearance",
    pinned: dict[str, str] | None = None,
    progress: ProgressHook | None = None,
    pipeline: str = "community-1",
    models_dir: Path | None = None,
    settings: EmbeddedSettings | None = None,
    device: str = "cpu",
) -> Diarisation:
    """Diarise `vocals`, name the clusters after `speakers`, write RTTM, mapping.json and one track each."""
    speakers = check_speakers(speakers, order, pinned, num_speakers)
    chosen, why = resolve_diarise_backend(backend)
    log.info("diarise %s: backend %s (%s)", vocals, chosen, why)
    audio, rate = read_audio(Path(vocals))
    check_not_silent(audio, Path(vocals))
    notes: list[str] = []
    if audio.shape[0] > 1:
        notes.append(f"{Path(vocals).name}: {audio.shape[0]} channels downmixed to mono")
    mono = audio.mean(axis=0)
    wav16 = to_16k(mono, rate)
    if chosen == "pyannote":
        turns = diarise_pyannote(wav16, num_speakers, pipeline=pipeline, models_dir=models_dir, device=device)
        voice = None
    else:
        voice = EmbeddedDiariser(settings or EmbeddedSettings())
        turns = voice.run(wav16, num_speakers=num_speakers, progress=progress)
    if not turns:
        raise AudioError(f"{vocals}: no speech found; check that this is the dialogue track")
    mapping, naming_notes = name_clusters(
        turns, speakers, order=order, pinned=pinned, centroids=voice.centroids if voice else None, wav16=wav16
    )
    notes += naming_notes
    for note in notes:
        log.warning("diarise: %s", note)
    named = sorted(
        (Turn(t.start, t.end, mapping[t.label]) for t in turns), key=lambda t: (t.start, t.end, t.label)
    )
    record = {
        "backend": chosen,
        "model": PYANNOTE_PIPELINES.get(pipeline, pipeline)
        if chosen == "pyannote"
        else embedded_model_name(),
        "settings": asdict(voice.settings) if voice else {"pipeline": pipeline, "num_speakers": num_speakers},
        "mapping": mapping,
        "speakers": [s.id for s in speakers],
        "warnings": notes,
    }
    return write_outputs(named, mono, rate, Path(out_dir), Path(vocals).stem, record)


def embedded_model_name() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def pinned(package: str) -> str:
        try:
            return f"{package}=={version(package)}"
        except PackageNotFoundError:
            return package

    return f"{pinned('silero-vad')} + {pinned('resemblyzer')}"


def use_given_tracks(tracks: dict[str, Path], out_dir: Path) -> Diarisation:
    """The manifest gives one track per speaker: skip diarisation, check the tracks share one timeline,
    and write the RTTM from each track's own speech (for subtitles and QC)."""
    if not tracks:
        raise ValueError("use_given_tracks needs at least one speaker track")
    turns, timeline = [], None
    for speaker, path in sorted(tracks.items()):
        audio, rate = read_audio(Path(path))
        if timeline is not None and timeline != (rate, audio.shape[1]):
            raise AudioError(
                f"{path}: speaker tracks must share one sample rate and length; got {rate} Hz x {audio.shape[1]} "
                f"samples, the first track has {timeline[0]} Hz x {timeline[1]}"
            )
        timeline = (rate, audio.shape[1])
        regions = EmbeddedDiariser(EmbeddedSettings()).speech_regions(to_16k(audio.mean(axis=0), rate))
        turns += [Turn(round(a, 3), round(b, 3), speaker) for a, b in regions]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rttm = write_rttm(out_dir / "diarisation.rttm", merge_turns(turns), "given")
    mapping = {s: s for s in sorted(tracks)}
    silent = tuple(
        f"speaker {s}: its track has no speech" for s in sorted(tracks) if s not in {t.label for t in turns}
    )
    return Diarisation(rttm=rttm, tracks=dict(tracks), mapping=mapping, backend="given", warnings=silent)


def check_speakers(
    speakers: Sequence[SpeakerRef], order: str, pinned: dict[str, str] | None, num_speakers: int | None = None
) -> list[SpeakerRef]:
    ids = [s.id for s in speakers]
    if not ids:
        raise ValueError("diarise needs at least one manifest speaker")
    if len(set(ids)) != len(ids):
        raise ValueError(f"speaker ids must be unique, got {ids}")
    if order not in ORDERS:
        raise ValueError(f"speaker order {order!r} is unknown; use one of {', '.join(ORDERS)}")
    if num_speakers is not None and not 1 <= num_speakers <= EmbeddedSettings().max_speakers:
        raise ValueError(
            f"num_speakers={num_speakers} must be between 1 and {EmbeddedSettings().max_speakers}"
        )
    unknown = sorted(set((pinned or {}).values()) - set(ids))
    if unknown:
        raise ValueError(f"pinned mapping names unknown speakers {unknown}; manifest speakers are {ids}")
    for ref in speakers:
        if ref.voice_sample is not None and not Path(ref.voice_sample).is_file():
            raise AudioError(f"speaker {ref.id}: voice_sample {ref.voice_sample} not found")
    return list(speakers)


def to_16k(mono: np.ndarray, rate: int) -> np.ndarray:
    if rate == RATE:
        return mono.astype(np.float32)
    from scipy.signal import resample_poly

    g = np.gcd(rate, RATE)
    return resample_poly(mono, RATE // g, rate // g).astype(np.float32)


# --------------------------------------------------------------------------- embedded backend


@lru_cache(maxsize=1)
def _silero():
    try:
        from silero_vad import load_silero_vad
    except ImportError as exc:
        raise EngineSetupError(f"silero-vad is not installed; install it with {VAD_EXTRA}") from exc
    return load_silero_vad()


@lru_cache(maxsize=1)
def _voice_encoder():
    try:
        from resemblyzer import VoiceEncoder
    except ImportError as exc:
        raise EngineSetupError(f"resemblyzer is not installed; install it with {VAD_EXTRA}") from exc
    return VoiceEncoder("cpu", verbose=False)


class EmbeddedDiariser:
    """VAD -> window d-vectors -> clustering -> frame re-assignment. Deterministic (no sampling)."""

    def __init__(self, settings: EmbeddedSettings):
        self.settings = settings
        self.centroids: dict[str, np.ndarray] = {}

    def run(
        self, wav16: np.ndarray, *, num_speakers: int | None, progress: ProgressHook | None
    ) -> list[Turn]:
        regions = self.speech_regions(wav16)
        _report(progress, 1, "vad")
        if not regions:
            return []
        spans, emb = self.window_embeddings(wav16, regions)
        _report(progress, 2, "embeddings")
        labels = cluster_windows(emb, spans, num_speakers, self.settings)
        centroids = _centroids(emb, labels)
        frames = self.assign_frames(len(wav16), regions, spans, emb, centroids)
        turns = frames_to_turns(frames)
        order = _first_appearance(turns)
        self.centroids = {f"SPK{order.index(k)}": c for k, c in centroids.items() if k in order}
        _report(progress, 3, "clustering")
        return sorted((Turn(t.start, t.end, f"SPK{order.index(int(t.label))}") for t in turns), key=_turn_key)

    def speech_regions(self, wav16: np.ndarray) -> list[tuple[float, float]]:
        import torch
        from silero_vad import get_speech_timestamps

        stamps = get_speech_timestamps(
            torch.from_numpy(wav16),
            _silero(),
            threshold=self.settings.vad_threshold,
            sampling_rate=RATE,
            min_speech_duration_ms=200,
            min_silence_duration_ms=150,
            speech_pad_ms=30,
        )
        return [(s["start"] / RATE, s["end"] / RATE) for s in stamps]

    def window_embeddings(
        self, wav16: np.ndarray, regions: list[tuple[float, float]]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Windows of `window_s` every `hop_s` inside each region -> spans (n, 2) s, embeddings (n, 256)."""
        s = self.settings
        spans = []
        for start, end in _join_close(regions, s.join_gap_s):
            if end - start < s.min_window_s:
                continue
            if end - start <= s.window_s:
                spans.append((start, end))
                continue
            starts = np.arange(start, end - s.window_s, s.hop_s).tolist() + [end - s.window_s]
            spans += [(a, a + s.window_s) for a in starts]
        if not spans:
            spans = [regions[int(np.argmax([e - b for b, e in regions]))]]
        return np.asarray(spans), embed_segments(wav16, spans)

    def assign_frames(self, n_samples, regions, spans, emb, centroids) -> np.ndarray:
        """Per 10 ms frame: the centroid most similar to the mean of the windows covering it, -1 if silent."""
        from scipy.ndimage import median_filter

        n_frames = int(np.ceil(n_samples / RATE / FRAME_S))
        keys = sorted(centroids)
        cent = np.stack([centroids[k] for k in keys])
        window_scores = emb @ cent.T  # (windows, clusters)
        scores = np.zeros((n_frames, len(keys)))
        counts = np.zeros(n_frames)
        for (a, b), row in zip(spans, window_scores, strict=True):
            lo, hi = int(a / FRAME_S), min(n_frames, int(np.ceil(b / FRAME_S)))
            scores[lo:hi] += row
            counts[lo:hi] += 1
        labels = np.full(n_frames, -1)
        width = max(1, int(self.settings.smooth_s / FRAME_S) | 1)
        for a, b in regions:
            lo, hi = int(a / FRAME_S), min(n_frames, int(np.ceil(b / FRAME_S)))
            region = scores[lo:hi] / np.maximum(counts[lo:hi, None], 1)
            uncovered = np.flatnonzero(counts[lo:hi] == 0)  # too short for a window: the nearest decides
            if uncovered.size:
                times = (lo + uncovered + 0.5) * FRAME_S
                nearest = np.argmin(np.abs(spans.mean(axis=1)[None, :] - times[:, None]), axis=1)
                region[uncovered] = window_scores[nearest]
            best = np.asarray(keys)[np.argmax(region, axis=1)]
            labels[lo:hi] = median_filter(best, size=min(width, max(1, (hi - lo) | 1)), mode="nearest")
        return labels


def _join_close(regions: list[tuple[float, float]], gap_s: float) -> list[tuple[float, float]]:
    joined: list[tuple[float, float]] = []
    for start, end in regions:
        if joined and start - joined[-1][1] < gap_s:
            joined[-1] = (joined[-1][0], end)
        else:
            joined.append((start, end))
    return joined


def embed_segments(wav16: np.ndarray, spans: Sequence[tuple[float, float]]) -> np.ndarray:
    """L2-normalised resemblyzer d-vectors (n, 256) of the given (start, end) spans, batched by length."""
    import torch
    from resemblyzer.audio import wav_to_mel_spectrogram

    encoder = _voice_encoder()
    mel = wav_to_mel_spectrogram(wav16)  # (frames at 10 ms, 40)
    out = np.zeros((len(spans), 256), dtype=np.float32)
    by_len: dict[int, list[int]] = {}
    bounds = []
    for i, (a, b) in enumerate(spans):
        lo = int(round(a * 100))
        hi = min(len(mel), max(lo + 1, int(round(b * 100))))
        bounds.append((lo, hi))
        by_len.setdefault(hi - lo, []).append(i)
    with torch.no_grad():
        for length, idx in sorted(by_len.items()):
            batch = np.stack([mel[bounds[i][0] : bounds[i][0] + length] for i in idx])
            out[idx] = encoder(torch.from_numpy(batch)).numpy()
    return out


def embed_clip(path: Path) -> np.ndarray:
    """One d-vector for a whole enrolment clip (windows over its speech, averaged, normalised)."""
    audio, rate = read_audio(Path(path))
    check_not_silent(audio, Path(path))
    wav16 = to_16k(audio.mean(axis=0), rate)
    diariser = EmbeddedDiariser(EmbeddedSettings())
    regions = diariser.speech_regions(wav16) or [(0.0, len(wav16) / RATE)]
    _, emb = diariser.window_embeddings(wav16, regions)
    mean = emb.mean(axis=0)
    return mean / (np.linalg.norm(mean) + 1e-9)


def cluster_windows(
    emb: np.ndarray, spans: np.ndarray, num_speakers: int | None, s: EmbeddedSettings
) -> np.ndarray:
    """Cluster labels (0..k-1) per window; small clusters are absorbed, near-identical voices merged.

    Long inputs cluster an evenly strided subset (at most `max_cluster_windows`), then every window
    goes to its nearest centroid: the eigen-decomposition stays bounded whatever the duration."""
    if len(emb) < 3:
        return np.zeros(len(emb), dtype=int)
    stride = int(np.ceil(len(emb) / s.max_cluster_windows))
    labels = spectral_labels(emb[::stride], num_speakers, s, spans[::stride])
    if stride > 1:
        cent = _centroids(emb[::stride], labels)
        keys = sorted(cent)
        labels = np.asarray(keys)[np.argmax(emb @ np.stack([cent[k] for k in keys]).T, axis=1)]
    labels = _absorb_small_clusters(emb, labels, s)
    return _merge_same_voices(emb, labels, s.same_voice_similarity)


def spectral_labels(
    emb: np.ndarray, num_speakers: int | None, s: EmbeddedSettings, spans: np.ndarray | None = None
) -> np.ndarray:
    """Spectral clustering on a row-pruned cosine affinity (keep each window's top `prune` fraction);
    the eigengap of the normalised Laplacian gives the count when the manifest does not."""
    from scipy.linalg import eigh
    from sklearn.cluster import KMeans

    n = len(emb)
    affinity = np.clip(emb @ emb.T, 0.0, None)
    if spans is not None:  # windows sharing audio are trivially alike: let only distinct audio vote
        overlap = np.minimum(spans[:, None, 1], spans[None, :, 1]) - np.maximum(
            spans[:, None, 0], spans[None, :, 0]
        )
        affinity[overlap > s.neighbour_overlap * s.window_s] = 0.0
        np.fill_diagonal(affinity, 1.0)
    keep = max(2, int(np.ceil(s.prune * n)))
    nearest = np.argsort(-affinity, axis=1, kind="stable")[:, :keep]
    pruned = np.zeros_like(affinity)
    rows = np.arange(n)[:, None]
    pruned[rows, nearest] = affinity[rows, nearest]
    pruned = (pruned + pruned.T) / 2
    inv_sqrt = 1.0 / np.sqrt(np.maximum(pruned.sum(axis=1), 1e-9))
    laplacian = np.eye(n) - inv_sqrt[:, None] * pruned * inv_sqrt[None, :]
    kmax = min(s.max_speakers, n - 1)
    values, vectors = eigh(laplacian, subset_by_index=[0, kmax])
    k = num_speakers or int(np.argmax(np.diff(values))) + 1
    k = max(1, min(k, n - 1))
    if k == 1:
        return np.zeros(n, dtype=int)
    rows_k = vectors[:, :k] / (np.linalg.norm(vectors[:, :k], axis=1, keepdims=True) + 1e-9)
    return KMeans(n_clusters=k, n_init=10, random_state=0).fit_predict(rows_k)


def _absorb_small_clusters(emb: np.ndarray, labels: np.ndarray, s: EmbeddedSettings) -> np.ndarray:
    """Clusters with under `min_cluster_s` of speech (an outlier, a cough) join their nearest cluster."""
    labels = labels.copy()
    while True:
        keys, counts = np.unique(labels, return_counts=True)
        small = [k for c, k in sorted(zip(counts, keys, strict=True)) if c * s.hop_s < s.min_cluster_s]
        if not small or len(keys) == 1:
            return _relabel(labels)
        cent = _centroids(emb, labels)
        k = small[0]
        nearest = max((j for j in sorted(cent) if j != k), key=lambda j: float(cent[j] @ cent[k]))
        labels[labels == k] = nearest


def _merge_same_voices(emb: np.ndarray, labels: np.ndarray, threshold: float) -> np.ndarray:
    """Merge the most alike pair of clusters while their centroids are closer than `threshold`."""
    labels = labels.copy()
    while (pair := _most_alike(emb, labels)) is not None and pair[0] > threshold:
        labels[labels == pair[2]] = pair[1]
    return _relabel(labels)


def _most_alike(emb: np.ndarray, labels: np.ndarray) -> tuple[float, int, int] | None:
    cent = _centroids(emb, labels)
    keys = sorted(cent)
    pairs = [(float(cent[a] @ cent[b]), a, b) for i, a in enumerate(keys) for b in keys[i + 1 :]]
    return max(pairs, key=lambda p: (p[0], -p[1], -p[2])) if pairs else None


def _relabel(labels: np.ndarray) -> np.ndarray:
    _, inverse = np.unique(labels, return_inverse=True)
    return inverse


def _centroids(emb: np.ndarray, labels: np.ndarray) -> dict[int, np.ndarray]:
    out = {}
    for k in np.unique(labels):
        mean = emb[labels == k].mean(axis=0)
        out[int(k)] = mean / (np.linalg.norm(mean) + 1e-9)
    return out


def frames_to_turns(frames: np.ndarray) -> list[Turn]:
    """Runs of equal labels (>= 0) -> turns with the cluster index as label."""
    turns = []
    change = np.flatnonzero(np.diff(frames)) + 1
    for lo, hi in zip(np.r_[0, change], np.r_[change, len(frames)], strict=True):
        if frames[lo] >= 0:
            turns.append(
                Turn(round(float(lo * FRAME_S), 3), round(float(hi * FRAME_S), 3), str(int(frames[lo])))
            )
    return turns


def _first_appearance(turns: list[Turn]) -> list[int]:
    order: list[int] = []
    for t in sorted(turns, key=_turn_key):
        if int(t.label) not in order:
            order.append(int(t.label))
    return order


def _turn_key(t: Turn) -> tuple[float, float, str]:
    return (t.start, t.end, t.label)


def _report(progress: ProgressHook | None, step: int, name: str) -> None:
    if progress is not None:
        progress("diarise", step, 3, step_name=name)


# --------------------------------------------------------------------------- naming


def name_clusters(
    turns: list[Turn],
    speakers: Sequence[SpeakerRef],
    *,
    order: str,
    pinned: dict[str, str] | None,
    wav16: np.ndarray,
    centroids: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, str], list[str]]:
    """cluster label -> speaker id: pinned entries, then enrolment (Hungarian), then the order rule."""
    from scipy.optimize import linear_sum_assignment

    clusters = _cluster_order(turns, order)
    notes: list[str] = []
    mapping = {c: s for c, s in sorted((pinned or {}).items()) if c in clusters}
    for label in sorted(set(pinned or {}) - set(clusters)):
        notes.append(f"pinned cluster {label} was not found (clusters: {', '.join(clusters)}); ignored")
    free_clusters = [c for c in clusters if c not in mapping]
    free_speakers = [s for s in speakers if s.id not in mapping.values()]
    enrolled = [s for s in free_speakers if s.voice_sample is not None]
    if free_clusters and not set(clusters) <= set(centroids or {}):
        centroids = cluster_centroids(turns, wav16)  # pyannote labels: embed each cluster's own turns
    centroids = centroids or {}
    if enrolled and free_clusters:
        samples = np.stack([embed_clip(Path(s.voice_sample)) for s in enrolled])
        sim = np.stack([centroids[c] for c in free_clusters]) @ samples.T  # (clusters, enrolled)
        rows, cols = linear_sum_assignment(-sim)
        for r, c in zip(rows, cols, strict=True):
            mapping[free_clusters[r]] = enrolled[c].id
            log.info(
                "diarise: %s -> %s by voice sample (cosine %.3f)", free_clusters[r], enrolled[c].id, sim[r, c]
            )
        notes += _overrule_unlike_samples(free_clusters, enrolled, sim, mapping)
    rest_clusters = [c for c in free_clusters if c not in mapping]
    rest_speakers = [s.id for s in free_speakers if s.id not in mapping.values()]
    by_order = list(zip(rest_clusters, rest_speakers, strict=False))
    mapping.update(by_order)
    if by_order:
        named = ", ".join(f"{c}->{s}" for c, s in by_order)
        notes.append(f"named by manifest order ({order}), not by voice: {named}; add voice_sample to be sure")
    notes += _resolve_leftovers(clusters, speakers, mapping, centroids)
    if by_order:
        notes += _alike_clusters(centroids)
    return {c: mapping[c] for c in clusters}, notes


def _overrule_unlike_samples(clusters, enrolled, sim, mapping, margin: float = 0.15) -> list[str]:
    """A one-to-one assignment can force a voice onto the wrong sample (one person split in two clusters,
    or a speaker the manifest lists who never talks): a cluster far closer to another sample goes there."""
    notes = []
    for r, cluster in enumerate(clusters):
        if cluster not in mapping:
            continue
        best = int(np.argmax(sim[r]))
        assigned = [s.id for s in enrolled].index(mapping[cluster])
        if enrolled[best].id != mapping[cluster] and sim[r, best] - sim[r, assigned] > margin:
            notes.append(
                f"{cluster} sounds like {enrolled[best].id} (cosine {sim[r, best]:.2f}), not {mapping[cluster]} "
                f"({sim[r, assigned]:.2f}): named {enrolled[best].id}"
            )
            mapping[cluster] = enrolled[best].id
    return notes


def _alike_clusters(centroids: dict[str, np.ndarray], threshold: float = 0.85) -> list[str]:
    keys = sorted(centroids)
    return [
        f"{a} and {b} sound alike (cosine {float(centroids[a] @ centroids[b]):.2f}): they may be one person"
        for i, a in enumerate(keys)
        for b in keys[i + 1 :]
        if float(centroids[a] @ centroids[b]) > threshold
    ]


def _cluster_order(turns: list[Turn], order: str) -> list[str]:
    first: dict[str, float] = {}
    speech: dict[str, float] = {}
    for t in sorted(turns, key=_turn_key):
        first.setdefault(t.label, t.start)
        speech[t.label] = speech.get(t.label, 0.0) + t.end - t.start
    if order == "most-speech":
        return sorted(first, key=lambda c: (-round(speech[c], 3), first[c], c))
    return sorted(first, key=lambda c: (first[c], c))


def _resolve_leftovers(clusters, speakers, mapping, centroids) -> list[str]:
    """More voices than speakers: extras join the most similar named cluster. Fewer: say who is silent."""
    notes = []
    for c in [c for c in clusters if c not in mapping]:
        named = [n for n in clusters if n in mapping and n in centroids]
        target = max(named, key=lambda n: float(centroids[n] @ centroids[c])) if named else clusters[0]
        mapping[c] = mapping.get(target, speakers[0].id)
        notes.append(
            f"found more voices than manifest speakers: {c} joined {mapping[c]} (most similar voice)"
        )
    for s in speakers:
        if s.id not in mapping.values():
            notes.append(
                f"speaker {s.id}: no voice found for this speaker ({len(clusters)} voice(s) for "
                f"{len(speakers)} manifest speakers); its track is silent"
            )
    return notes


def cluster_centroids(turns: list[Turn], wav16: np.ndarray) -> dict[str, np.ndarray]:
    """A normalised d-vector per cluster from windows over its own turns (works for every backend)."""
    s = EmbeddedSettings()
    diariser = EmbeddedDiariser(s)
    out = {}
    for label in sorted({t.label for t in turns}):
        regions = [(t.start, t.end) for t in turns if t.label == label]
        _, emb = diariser.window_embeddings(wav16, regions)
        mean = emb.mean(axis=0)
        out[label] = mean / (np.linalg.norm(mean) + 1e-9)
    return out


# --------------------------------------------------------------------------- outputs


def write_outputs(
    turns: list[Turn], mono: np.ndarray, rate: int, out_dir: Path, uri: str, record: dict
) -> Diarisation:
    """RTTM, one gated track per speaker in `record["speakers"]`, and `record` itself as mapping.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    merged = merge_turns(turns)
    rttm = write_rttm(out_dir / "diarisation.rttm", merged, uri)
    tracks = {}
    for speaker in record["speakers"]:
        gain = gate([(t.start, t.end) for t in merged if t.label == speaker], len(mono), rate)
        tracks[speaker] = write_audio(out_dir / f"{speaker}.wav", (mono * gain).astype(np.float32), rate)
    _write_text(out_dir / "mapping.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
    return Diarisation(
        rttm=rttm,
        tracks=tracks,
        mapping=record["mapping"],
        backend=record["backend"],
        warnings=tuple(record["warnings"]),
        model=record["model"],
    )


def merge_turns(turns: list[Turn], gap_s: float = 0.0) -> list[Turn]:
    """Join a speaker's overlapping or touching turns; different speakers may still overlap."""
    out: list[Turn] = []
    for label in sorted({t.label for t in turns}):
        current = None
        for t in sorted((t for t in turns if t.label == label), key=_turn_key):
            if current is not None and t.start <= current.end + gap_s:
                current = Turn(current.start, max(current.end, t.end), label)
                continue
            if current is not None:
                out.append(current)
            current = t
        out.append(current)
    return sorted(out, key=_turn_key)


def gate(spans: Sequence[tuple[float, float]], n: int, rate: int, fade_s: float = FADE_S) -> np.ndarray:
    """Gain (n,) that is 1 inside the spans with raised-cosine fades of `fade_s` just outside them."""
    gain = np.zeros(n, dtype=np.float32)
    k = max(1, int(fade_s * rate))
    ramp = (0.5 - 0.5 * np.cos(np.pi * (np.arange(k) + 1) / (k + 1))).astype(np.float32)
    for start, end in spans:
        a, b = max(0, int(round(start * rate))), min(n, int(round(end * rate)))
        gain[a:b] = 1.0
        lo = max(0, a - k)
        gain[lo:a] = np.maximum(gain[lo:a], ramp[k - (a - lo) :])
        hi = min(n, b + k)
        gain[b:hi] = np.maximum(gain[b:hi], ramp[::-1][: hi - b])
    return gain


def write_rttm(path: Path, turns: Sequence[Turn], uri: str) -> Path:
    uri = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in uri) or "audio"
    rows = [
        f"SPEAKER {uri} 1 {t.start:.3f} {t.end - t.start:.3f} <NA> <NA> {t.label} <NA> <NA>\n"
        for t in sorted(turns, key=_turn_key)
    ]
    return _write_text(path, "".join(rows))


def read_rttm(path: Path) -> list[Turn]:
    turns = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        fields = line.split()
        if not fields or fields[0] != "SPEAKER":
            continue
        try:
            start, duration = float(fields[3]), float(fields[4])
        except (IndexError, ValueError):
            raise ValueError(f"{path}:{number}: not an RTTM SPEAKER line: {line!r}") from None
        turns.append(Turn(start, start + duration, fields[7]))
    return sorted(turns, key=_turn_key)


def _write_text(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------- scoring (QC and bench)


def diarisation_error_rate(
    reference: Sequence[Turn], hypothesis: Sequence[Turn], *, collar: float = 0.25, step: float = 0.01
) -> float:
    """DER as md-eval scores it: overlaps scored, `collar` s around reference boundaries not scored,
    optimal one-to-one label mapping (Hungarian on co-occurrence), (miss + false alarm + confusion) / speech."""
    from scipy.optimize import linear_sum_assignment

    end = max([t.end for t in [*reference, *hypothesis]], default=0.0)
    n = int(np.ceil(end / step)) + 1
    ref, ref_labels = _activity(reference, n, step)
    hyp, hyp_labels = _activity(hypothesis, n, step)
    scored = np.ones(n, dtype=bool)
    for t in reference:
        for edge in (t.start, t.end):
            scored[max(0, int(round((edge - collar) / step))) : int(round((edge + collar) / step))] = False
    ref, hyp = ref[:, scored], hyp[:, scored]
    total = ref.sum()
    if total == 0:
        return 0.0 if hyp.sum() == 0 else 1.0
    co = ref.astype(np.int64) @ hyp.T.astype(np.int64) if len(hyp_labels) else np.zeros((len(ref_labels), 0))
    rows, cols = linear_sum_assignment(-co) if co.size else ([], [])
    correct = sum(co[r, c] for r, c in zip(rows, cols, strict=True))
    n_ref, n_hyp = ref.sum(axis=0), hyp.sum(axis=0)
    errors = np.maximum(n_ref, n_hyp).sum() - correct
    return float(errors / total)


def _activity(turns: Sequence[Turn], n: int, step: float) -> tuple[np.ndarray, list[str]]:
    labels = sorted({t.label for t in turns})
    act = np.zeros((len(labels), n), dtype=bool)
    for t in turns:
        act[labels.index(t.label), int(round(t.start / step)) : int(round(t.end / step))] = True
    return act, labels


# --------------------------------------------------------------------------- pyannote backend


def diarise_pyannote(
    wav16: np.ndarray,
    num_speakers: int | None,
    *,
    pipeline: str = "community-1",
    models_dir: Path | None = None,
    device: str = "cpu",
) -> list[Turn]:
    """pyannote.audio's diarization pipeline; cluster labels renamed SPK0.. by first appearance."""
    import torch

    pipe = load_pyannote_pipeline(pipeline, models_dir)
    pipe.to(torch.device(device))
    kwargs = {"num_speakers": num_speakers} if num_speakers else {}
    with torch.inference_mode():
        output = pipe({"waveform": torch.from_numpy(wav16)[None], "sample_rate": RATE}, **kwargs)
    annotation = getattr(output, "speaker_diarization", output)  # 4.x returns a DiarizeOutput
    raw = [
        Turn(round(s.start, 3), round(s.end, 3), str(k))
        for s, _, k in annotation.itertracks(yield_label=True)
    ]
    order: list[str] = []
    for t in sorted(raw, key=_turn_key):
        if t.label not in order:
            order.append(t.label)
    return sorted((Turn(t.start, t.end, f"SPK{order.index(t.label)}") for t in raw), key=_turn_key)


def pyannote_source(pipeline: str, models_dir: Path | None) -> str:
    """A local folder holding config.yaml (models_dir/<name>/ or models_dir itself), else the HF repo id."""
    repo = PYANNOTE_PIPELINES.get(pipeline, pipeline)
    if models_dir is not None:
        for folder in (Path(models_dir) / repo.split("/")[-1], Path(models_dir) / pipeline, Path(models_dir)):
            if (folder / "config.yaml").is_file():
                return str(folder / "config.yaml")
    return repo


def load_pyannote_pipeline(pipeline: str, models_dir: Path | None):
    os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")  # telemetry off, before the import
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from pyannote.audio import Pipeline
    except Exception as exc:  # ImportError, or OSError from a torchaudio built for CUDA
        raise EngineSetupError(
            f"pyannote.audio cannot be imported ({type(exc).__name__}); install it with {DIARIZE_EXTRA} "
            "(it needs the torch 2.14.1 build, see DEPENDENCIES.md) or use backend: embedded"
        ) from None
    source = pyannote_source(pipeline, models_dir)
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    where = f"{models_dir}/<name>/config.yaml" if models_dir else "the HF cache (HF_HOME)"
    try:
        try:
            pipe = Pipeline.from_pretrained(source, token=token)
        except TypeError:  # pyannote.audio 3.x calls it use_auth_token
            pipe = Pipeline.from_pretrained(source, use_auth_token=token)
    except OSError as exc:  # the token never appears in this message
        raise MissingWeightsError(
            f"pyannote pipeline {source!r} not found ({type(exc).__name__}): place its snapshot in {where}; "
            "gated models need their conditions accepted and HF_TOKEN set"
        ) from None
    if pipe is None:
        raise MissingWeightsError(
            f"pyannote pipeline {source!r} could not be loaded: check HF_TOKEN and its access"
        )
    return pipe


# --------------------------------------------------------------------------- the Prefect stage


@dataclass(frozen=True)
class DiarisedTracks:
    tracks: dict[str, Blob]
    rttm: Blob
    mapping: Blob  # mapping.json: cluster label -> speaker id (pin it with diarise.mapping in the manifest)
    backend: str
    warnings: tuple[str, ...]


def diarise_stage(
    ws: Workspace, vocals: Blob, speakers: list[tuple[str, Blob | None]], settings: dict
) -> DiarisedTracks:
    """Workspace form of `diarise`; `settings` holds the resolved backend, order rule and pinned mapping."""
    refs = [SpeakerRef(sid, ws.path(sample) if sample else None) for sid, sample in speakers]
    with ws.scratch() as tmp:
        result = diarise(
            ws.path(vocals),
            refs,
            tmp,
            backend=settings["backend"],
            num_speakers=len(refs),
            order=settings["order"],
            pinned=settings.get("mapping") or None,
        )
        mapping = ws.put_json(result.mapping)
        tracks = {sid: ws.put_file(path) for sid, path in result.tracks.items()}
        return DiarisedTracks(tracks, ws.put_file(result.rttm), mapping, result.backend, result.warnings)


diarise_task = task(
    diarise_stage,
    name="diarise",
    cache_policy=stage_cache("tasks.diarise"),
    persist_result=True,
)
