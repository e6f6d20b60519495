"""The embedded diariser: speech regions from pyannote/segmentation (`segmentation.py`; silero-vad when its
file is absent), resemblyzer d-vectors on 1.6 s sliding windows, enrolment-guided k-means or spectral
clustering of a pruned cosine affinity (then a count-preserving split + merge: a minor voice tied into a big
cluster takes the slot of one voice split in two; a voice split by music on/off merged back), frame-level
re-assignment to the cluster centroids, pauses under 0.5 s bridged, and a second speaker wherever the
segmentation model hears overlapped speech. The models ship inside PyPI wheels (the `vad` extra; whisperx's
for segmentation)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from engine.base import EngineSetupError, ProgressHook, models_dir_from_env
from engine.media import read_channels
from tasks.diarise.segmentation import Activity, Segmenter, binarize, segmenter
from tasks.diarise.turns import FRAME_S, RATE, Turn, merge_turns, to_16k, turn_key
from tasks.separate import check_not_silent

VAD_EXTRA = "pip install -e '.[vad]'"


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
    segmentation: str = "auto"  # pyannote/segmentation when its file is found ("auto"), or "silero" always
    # speech hysteresis for that model. pyannote's VAD uses 0.5 / 0.363; on speech-dev (after bridging) those
    # add word tails and music as speech: false alarm outside collars 3.6 / 1.5 / 1.5 / 4.0 % -> 0 / 1.2 /
    # 0.9 / 1.0 % at 0.8 / 0.6, with no speech missed (pyannote's sample.wav keeps the same regions)
    seg_onset: float = 0.8
    seg_offset: float = 0.6
    seg_step_s: float = 1.0  # sliding-window hop of the 5 s segmentation windows
    overlap_onset: float = 0.5  # second local speaker's activity that makes a frame overlapped speech
    min_overlap_s: float = 0.1
    overlap_context_s: float = 2.0  # the second voice must speak within this distance of the overlap
    bridge_s: float = 0.5  # pauses shorter than this inside one speaker's speech stay in the turn
    split_merge: bool = True  # blind clusters: split + merge when that puts more alike voices together
    music_repair: bool = True  # merge a 'same voice with / without music' pair of blind clusters
    music_share: float = 0.7
    music_pair_similarity: float = 0.7  # one voice split by music: 0.80-0.82; two voices: 0.49-0.66


@lru_cache(maxsize=1)
def _silero():
    try:
        from silero_vad import load_silero_vad
    except ImportError as exc:
        raise EngineSetupError(f"silero-vad is not installed; install it with {VAD_EXTRA}") from exc
    return load_silero_vad()


def silero_model():
    """The shared silero-vad model; ImportError when the vad extra is missing (callers may fall back)."""
    import silero_vad  # noqa: F401

    return _silero()


@lru_cache(maxsize=1)
def _voice_encoder():
    try:
        with quiet_pkg_resources():
            from resemblyzer import VoiceEncoder
    except ImportError as exc:
        raise EngineSetupError(f"resemblyzer is not installed; install it with {VAD_EXTRA}") from exc
    return VoiceEncoder("cpu", verbose=False)


@contextmanager
def quiet_pkg_resources() -> Iterator[None]:
    """resemblyzer imports webrtcvad, which imports the deprecated pkg_resources: keep its warning off the
    user's terminal (nothing they can act on)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="pkg_resources")
        yield


class EmbeddedDiariser:
    """VAD -> window d-vectors -> clustering -> frame re-assignment. Deterministic (no sampling)."""

    def __init__(self, settings: EmbeddedSettings, models_dir: Path | None = None):
        self.settings = settings
        self.models_dir = models_dir
        self.activity: Activity | None = None  # the segmentation model's output for the last input
        self.centroids: dict[str, np.ndarray] = {}
        self.cluster_stats: dict[str, dict[str, float]] = {}  # per SPKn: windows, core share, similarity
        self.guided = False  # the last run's clusters started from enrolment samples

    def run(
        self,
        wav16: np.ndarray,
        *,
        num_speakers: int | None,
        progress: ProgressHook | None,
        anchors: np.ndarray | None = None,
        music: np.ndarray | None = None,
    ) -> list[Turn]:
        """`anchors` (k, 256): one enrolment d-vector per speaker; the clusters then start from them
        (constrained to those k voices) instead of being found blind. `music`: the audio whose music
        envelope the music-split repair reads (the dialogue before separation; default `wav16`)."""
        regions = self.speech_regions(wav16)
        _report(progress, 1, "vad")
        if not regions:
            return []
        spans, emb = self.window_embeddings(wav16, regions)
        _report(progress, 2, "embeddings")
        self.guided = anchors is not None and len(anchors) > 0 and len(emb) >= 3
        if self.guided:
            # a sample that wins no window is a silent speaker (or a distractor): it stays silent. Handing the
            # voices to blind clustering instead (as embedded/2 did) split them by music on speech-dev
            # (enrolment + the aew distractor: dev_three_clean 21.0 % -> 0.8 %, dev_long 4.8 % -> 1.1 %)
            labels = anchored_labels(emb, np.asarray(anchors), self.settings)
        else:
            labels = cluster_windows(emb, spans, num_speakers, self.settings)
            if self.settings.music_repair:
                labels = repair_music_split(
                    emb, spans, labels, wav16 if music is None else music, self.settings
                )
        centroids = _centroids(emb, labels)
        frames, scores = self.assign_frames(len(wav16), regions, spans, emb, centroids)
        frames = bridge_pauses(frames, self.settings.bridge_s)
        turns = frames_to_turns(frames)
        if self.activity is not None:
            turns = merge_turns(
                turns + overlap_turns(frames, scores, sorted(centroids), self.activity, self.settings)
            )
        order = _first_appearance(turns)
        self.centroids = {f"SPK{order.index(k)}": c for k, c in centroids.items() if k in order}
        self.cluster_stats = {
            f"SPK{order.index(k)}": v for k, v in _cluster_stats(emb, labels, centroids).items() if k in order
        }
        _report(progress, 3, "clustering")
        return sorted((Turn(t.start, t.end, f"SPK{order.index(int(t.label))}") for t in turns), key=turn_key)

    def segmenter(self) -> Segmenter | None:
        """The pyannote/segmentation model when its checkpoint is found and the settings allow it."""
        if self.settings.segmentation == "silero":
            return None
        return segmenter(self.models_dir or models_dir_from_env(), self.settings.seg_step_s)

    def speech_regions(self, wav16: np.ndarray) -> list[tuple[float, float]]:
        """Speech regions: the segmentation model's speech activity (robust to music and overlapped voices)
        when its checkpoint is present, else silero-vad."""
        seg = self.segmenter()
        if seg is not None:
            s = self.settings
            self.activity = seg.activity(wav16)
            regions = binarize(
                self.activity.speech, self.activity.step_s, self.activity.start_s, s.seg_onset, s.seg_offset
            )
            return [(a, min(b, len(wav16) / RATE)) for a, b in regions if b - a >= 0.1]
        return self.silero_regions(wav16)

    def silero_regions(self, wav16: np.ndarray) -> list[tuple[float, float]]:
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

    def assign_frames(self, n_samples, regions, spans, emb, centroids) -> tuple[np.ndarray, np.ndarray]:
        """Per 10 ms frame: the centroid most similar to the mean of the windows covering it, -1 if silent;
        and the (frames, clusters) similarity scores that decided it (0 outside speech)."""
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
        frame_scores = np.zeros_like(scores)
        width = max(1, int(self.settings.smooth_s / FRAME_S) | 1)
        for a, b in regions:
            lo, hi = int(a / FRAME_S), min(n_frames, int(np.ceil(b / FRAME_S)))
            region = scores[lo:hi] / np.maximum(counts[lo:hi, None], 1)
            uncovered = np.flatnonzero(counts[lo:hi] == 0)  # too short for a window: the nearest decides
            if uncovered.size:
                times = (lo + uncovered + 0.5) * FRAME_S
                nearest = np.argmin(np.abs(spans.mean(axis=1)[None, :] - times[:, None]), axis=1)
                region[uncovered] = window_scores[nearest]
            frame_scores[lo:hi] = region
            best = np.asarray(keys)[np.argmax(region, axis=1)]
            labels[lo:hi] = median_filter(best, size=min(width, max(1, (hi - lo) | 1)), mode="nearest")
        return labels, frame_scores


def window_music_share(spans: np.ndarray, wav16: np.ndarray) -> np.ndarray:
    """Per window: the share of its frames under music (tasks.separate's music gate)."""
    from tasks.separate import music_presence

    music = music_presence(wav16, RATE)
    cum = np.r_[0.0, np.cumsum(music)]
    lo = np.clip((spans[:, 0] / FRAME_S).astype(int), 0, len(music) - 1)
    hi = np.clip(np.ceil(spans[:, 1] / FRAME_S).astype(int), lo + 1, len(music))
    return (cum[hi] - cum[lo]) / (hi - lo)


def repair_music_split(
    emb: np.ndarray, spans: np.ndarray, labels: np.ndarray, wav16: np.ndarray, s
) -> np.ndarray:
    """Resemblyzer d-vectors move under music, so blind clustering may split one voice into 'with music' and
    'without'. While such a pair exists (one cluster >= `music_share` of its windows under music, the other
    <= 1 - that, centroids at least `music_pair_similarity` alike), merge it, even below the manifest's count:
    a speaker the clusters then lack is reported as silent, not given half of another voice (speech-dev
    dev_long, count given: 23.6 % -> see bench/audio.py)."""
    share = window_music_share(spans, wav16)
    if not (np.any(share > s.music_share) and np.any(share < 1 - s.music_share)):
        return labels
    while len(np.unique(labels)) > 1 and (pair := _music_pair(emb, labels, share, s)):
        labels = _relabel(np.where(labels == pair[1], pair[0], labels))
    return labels


def _music_pair(emb: np.ndarray, labels: np.ndarray, share: np.ndarray, s: EmbeddedSettings):
    cent = _centroids(emb, labels)
    inside = {k: float(share[labels == k].mean()) for k in cent}
    pairs = [
        (float(cent[a] @ cent[b]), a, b)
        for a in cent
        for b in cent
        if inside[a] >= s.music_share and inside[b] <= 1 - s.music_share
    ]
    best = max(pairs, default=None)
    return (best[1], best[2]) if best and best[0] >= s.music_pair_similarity else None


def bridge_pauses(frames: np.ndarray, bridge_s: float) -> np.ndarray:
    """Fill silent runs shorter than `bridge_s` between two frames of the same speaker (a breath inside a
    turn is still the turn: pyannote's min_duration_off, and how reference RTTMs are usually cut)."""
    out = frames.copy()
    d = np.diff(np.r_[0, (frames < 0).astype(int), 0])
    for lo, hi in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1), strict=True):
        if lo > 0 and hi < len(frames) and (hi - lo) * FRAME_S < bridge_s and frames[lo - 1] == frames[hi]:
            out[lo:hi] = frames[hi]
    return out


def overlap_turns(
    frames: np.ndarray, scores: np.ndarray, keys: list[int], activity: Activity, s: EmbeddedSettings
) -> list[Turn]:
    """Overlapped speech: where the segmentation model hears a second local speaker, the region gets two
    speakers, the two clusters most similar to its audio among those that speak within `overlap_context_s`
    (a voice that is not around cannot be the one cutting in). Labels are cluster indices, as in `frames`."""
    out: list[Turn] = []
    context = int(s.overlap_context_s / FRAME_S)
    onset = s.overlap_onset
    for a, b in binarize(
        activity.overlap, activity.step_s, activity.start_s, onset, onset * s.seg_offset / s.seg_onset
    ):
        lo, hi = int(a / FRAME_S), min(len(frames), int(np.ceil(b / FRAME_S)))
        if hi - lo < int(s.min_overlap_s / FRAME_S) or not np.any(frames[lo:hi] >= 0):
            continue
        near = frames[max(0, lo - context) : hi + context]
        candidates = [i for i, k in enumerate(keys) if np.any(near == k)]
        if len(candidates) < 2:
            continue
        speaking = frames[lo:hi] >= 0
        mean = scores[lo:hi][speaking][:, candidates].mean(axis=0)
        for i in np.argsort(-mean, kind="stable")[:2]:
            out.append(Turn(round(lo * FRAME_S, 3), round(hi * FRAME_S, 3), str(keys[candidates[i]])))
    return out


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

    encoder = _voice_encoder()
    with quiet_pkg_resources():
        from resemblyzer.audio import wav_to_mel_spectrogram

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
    audio, rate = read_channels(Path(path))
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
    goes to its nearest centroid: the eigen-decomposition and the split + merge stay bounded whatever the
    duration."""
    if len(emb) < 3:
        return np.zeros(len(emb), dtype=int)
    stride = int(np.ceil(len(emb) / s.max_cluster_windows))
    labels = spectral_labels(emb[::stride], num_speakers, s, spans[::stride])
    if stride > 1:
        labels = _nearest(emb, emb[::stride], labels)
    labels = _absorb_small_clusters(emb, labels, s)
    if s.split_merge:
        min_windows = int(np.ceil(s.min_cluster_s / (s.hop_s * stride)))  # one subset window: `stride`
        sub = split_merge(emb[::stride], labels[::stride], s, min_windows)
        labels = _nearest(emb, emb[::stride], sub) if stride > 1 else sub
    return _merge_same_voices(emb, labels, s.same_voice_similarity)


def _nearest(emb: np.ndarray, sample: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Every window's nearest centroid of the clusters `labels` gives `sample`."""
    cent = _centroids(sample, labels)
    keys = sorted(cent)
    return np.asarray(keys)[np.argmax(emb @ np.stack([cent[k] for k in keys]).T, axis=1)]


def split_merge(
    emb: np.ndarray, labels: np.ndarray, s: EmbeddedSettings, min_windows: int | None = None
) -> np.ndarray:
    """Count-preserving repair of the partition: split a cluster in two and merge another pair when the
    merged pair is more alike than the two halves the split separates (centroid cosines; no threshold).

    Spectral clustering on a pruned graph favours cuts of large clusters: a minor voice (a 3 s turn, fewer
    windows than a row keeps neighbours) is tied into the nearest big one, and the count it should have
    gets spent on one voice split by a condition (music residue after separation: speech-dev dev_three,
    axb + ls3331 under music against ls3331 without; halves 0.69 alike, ls3331's two parts 0.91). A clean
    partition has every pair of clusters less alike than any cluster's halves, so it is left unchanged."""
    labels = labels.copy()
    if min_windows is None:  # each half must hold a cluster's minimum of speech
        min_windows = int(np.ceil(s.min_cluster_s / s.hop_s))
    seen = {labels.tobytes()}
    for _ in range(s.max_speakers):
        move = _best_split_merge(emb, labels, min_windows)
        if move is None:
            break
        labels = move
        if labels.tobytes() in seen:  # a cycle: keep what we have
            break
        seen.add(labels.tobytes())
    return _relabel(labels)


def _best_split_merge(emb: np.ndarray, labels: np.ndarray, min_windows: int) -> np.ndarray | None:
    """The split + merge with the largest gain (merged pair's cosine minus the halves' cosine), or None.
    One cluster has no other pair to merge: nothing to trade (a one-voice input, or all but one absorbed)."""
    if len(np.unique(labels)) < 2:
        return None
    best, best_gain = None, 0.0
    top = int(labels.max()) + 1
    for r in np.unique(labels):
        members = np.flatnonzero(labels == r)
        if len(members) < 2 * min_windows:
            continue
        half = bisect(emb[members], min_windows)
        if not half.any():
            continue
        trial = labels.copy()
        trial[members[half]] = top
        cent = _centroids(emb, trial)
        halves = float(cent[r] @ cent[top])
        keys = sorted(cent)
        pairs = [
            (float(cent[a] @ cent[b]), a, b)
            for i, a in enumerate(keys)
            for b in keys[i + 1 :]
            if {a, b} != {int(r), top}
        ]
        sim, a, b = max(pairs, key=lambda p: (p[0], -p[1], -p[2]))
        if sim - halves > best_gain:
            best_gain = sim - halves
            best = np.where(trial == b, a, trial)
    return best


def bisect(emb: np.ndarray, min_windows: int = 1, seeds: int = 64, iterations: int = 20) -> np.ndarray:
    """The split of unit vectors into two groups of >= `min_windows` whose centroids are least alike:
    spherical 2-means seeded at one window against the mean of the rest, for up to `seeds` windows evenly
    spread (deterministic). A minor voice inside a big cluster is such a group; a seed at the vector least
    like the mean alone finds balanced cuts instead. Returns a bool mask of the split-off group (all False
    when no split has both groups large enough)."""
    best, best_sim = np.zeros(len(emb), dtype=bool), np.inf
    for i in np.unique(np.linspace(0, len(emb) - 1, min(seeds, len(emb))).astype(int)):
        half = (emb @ emb[i]) > (emb @ _unit(emb.sum(axis=0) - emb[i]))
        for _ in range(iterations):
            if half.all() or not half.any():
                break
            new = (emb @ _unit(emb[half].sum(axis=0))) > (emb @ _unit(emb[~half].sum(axis=0)))
            if np.array_equal(new, half):
                break
            half = new
        if min(half.sum(), (~half).sum()) < max(1, min_windows):
            continue
        sim = float(_unit(emb[half].sum(axis=0)) @ _unit(emb[~half].sum(axis=0)))
        if sim < best_sim:
            best, best_sim = half, sim
    return best


def _unit(v: np.ndarray) -> np.ndarray:
    return v / (np.linalg.norm(v) + 1e-9)


def anchored_labels(
    emb: np.ndarray,
    anchors: np.ndarray,
    s: EmbeddedSettings,
    iterations: int = 10,
    anchor_weight: float = 5.0,
) -> np.ndarray:
    """Enrolment-guided clustering: k-means on the windows whose centroids start at the enrolment
    d-vectors and keep them as a prior (`anchor_weight` windows' worth), so a cluster cannot drift to
    'the same voice under music'. Speakers that get no window are dropped; tiny clusters are absorbed."""
    prior = anchors / (np.linalg.norm(anchors, axis=1, keepdims=True) + 1e-9)
    labels = np.argmax(emb @ prior.T, axis=1)
    for _ in range(iterations):
        sums = np.stack([emb[labels == k].sum(axis=0) for k in range(len(prior))]) + anchor_weight * prior
        cent = sums / (np.linalg.norm(sums, axis=1, keepdims=True) + 1e-9)
        new_labels = np.argmax(emb @ cent.T, axis=1)
        if np.array_equal(new_labels, labels):
            break
        labels = new_labels
    return _absorb_small_clusters(emb, labels, s)


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


def _cluster_stats(
    emb: np.ndarray, labels: np.ndarray, centroids: dict[int, np.ndarray], margin: float = 0.1
) -> dict[int, dict[str, float]]:
    """Per cluster: its windows, their mean cosine to the centroid, and the core share: the fraction of
    its windows closer to their own centroid than to any other by `margin` (a confidence figure)."""
    keys = sorted(centroids)
    sims = emb @ np.stack([centroids[k] for k in keys]).T
    out = {}
    for i, k in enumerate(keys):
        rows = sims[labels == k]
        if not len(rows):
            continue
        others = np.delete(rows, i, axis=1)
        gap = rows[:, i] - (others.max(axis=1) if others.shape[1] else 0.0)
        out[k] = {
            "windows": int(len(rows)),
            "mean_similarity": round(float(rows[:, i].mean()), 3),
            "core_share": round(float(np.mean(gap > margin)) if others.shape[1] else 1.0, 3),
        }
    return out


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
    for t in sorted(turns, key=turn_key):
        if int(t.label) not in order:
            order.append(int(t.label))
    return order


def _report(progress: ProgressHook | None, step: int, name: str) -> None:
    if progress is not None:
        progress("diarise", step, 3, step_name=name)
