"""Naming: clusters (``SPK0, SPK1 ...`` by first appearance) become manifest speakers: pinned entries first, then
enrolment clips (cosine similarity, Hungarian assignment), then the manifest order rule (with a warning)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tasks.diarise.embedded import EmbeddedDiariser, EmbeddedSettings, embed_clip
from tasks.diarise.turns import Turn, turn_key

if TYPE_CHECKING:
    from tasks.diarise.stage import SpeakerRef

log = logging.getLogger(__name__)


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
    for t in sorted(turns, key=turn_key):
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
