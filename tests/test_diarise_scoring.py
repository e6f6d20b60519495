"""diarise scoring: our DER against pyannote.metrics, the reference scorer (a test-only dependency)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.diarise import Turn, diarisation_error_rate, merge_turns


def _annotation(turns):
    from pyannote.core import Annotation, Segment

    out = Annotation()
    for k, t in enumerate(turns):
        out[Segment(t.start, t.end), k] = t.label
    return out


_turns = st.lists(
    st.builds(
        lambda start, length, label: Turn(start / 100, (start + length) / 100, label),
        st.integers(0, 2000),
        st.integers(10, 600),
        st.sampled_from("abc"),
    ),
    min_size=1,
    max_size=8,
).map(merge_turns)  # one speaker twice at once is one speaker (pyannote would count two)


@settings(max_examples=60, deadline=None)
@given(_turns, _turns)
def test_our_der_matches_pyannote_metrics(reference, hypothesis):
    """Our DER (md-eval: a 0.25 s collar each side of a reference boundary) is pyannote.metrics' with its total
    collar of 0.5 s, on turns on the 10 ms grid (overlaps scored, optimal mapping). pyannote.metrics is a test-only
    dependency (the dev extra): production scores QC without pandas and pyannote.database."""
    metrics = pytest.importorskip("pyannote.metrics.diarization", reason="pip install -e '.[dev]'")
    expected = metrics.DiarizationErrorRate(collar=0.5)(_annotation(reference), _annotation(hypothesis))
    assert diarisation_error_rate(reference, hypothesis) == pytest.approx(expected, abs=0.01)
