"""Diarisation error rate (QC and bench). Our own md-eval-style implementation: pyannote.metrics (the reference
scorer) would bring pandas and pyannote.database into the production install for one number, so it is a test-only
cross-check (tests/test_diarise.py)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tasks.diarise.turns import Turn


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
