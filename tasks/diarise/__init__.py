"""diarise: who speaks when, one gated track per manifest speaker, with deterministic naming.

- ``stage``: choose the backend, diarise, name, write RTTM + mapping.json + tracks; the Prefect task;
- ``embedded``: the default backend (pyannote/segmentation or silero-vad for speech and overlap, resemblyzer
  d-vectors, enrolment-guided k-means or spectral clustering; models in their wheels);
- ``segmentation``: pyannote's segmentation model run by our own PyanNet (speech + overlapped speech);
- ``pyannote_backend``: pyannote.audio's pipeline (the `diarize` extra);
- ``naming``: clusters -> manifest speakers (pinned, then enrolment clips, then the manifest order rule);
- ``turns``: the Turn record, RTTM I/O and track gating; ``scoring``: DER.

The names below are the package's interface; import them from ``tasks.diarise``.
"""

from tasks.diarise.embedded import EmbeddedDiariser, EmbeddedSettings, embed_clip
from tasks.diarise.naming import name_clusters
from tasks.diarise.pyannote_backend import PYANNOTE_PIPELINES, diarise_pyannote, load_pyannote_pipeline
from tasks.diarise.scoring import diarisation_error_rate
from tasks.diarise.stage import (
    BACKENDS,
    ORDERS,
    Diarisation,
    DiarisedTracks,
    SpeakerRef,
    diarise,
    diarise_stage,
    diarise_task,
    resolve_diarise_backend,
    use_given_tracks,
)
from tasks.diarise.turns import RATE, Turn, gate, merge_turns, read_rttm, to_16k, write_rttm

__all__ = [
    "BACKENDS",
    "ORDERS",
    "PYANNOTE_PIPELINES",
    "RATE",
    "Diarisation",
    "DiarisedTracks",
    "EmbeddedDiariser",
    "EmbeddedSettings",
    "SpeakerRef",
    "Turn",
    "diarisation_error_rate",
    "diarise",
    "diarise_pyannote",
    "diarise_stage",
    "diarise_task",
    "embed_clip",
    "gate",
    "load_pyannote_pipeline",
    "merge_turns",
    "name_clusters",
    "read_rttm",
    "resolve_diarise_backend",
    "to_16k",
    "use_given_tracks",
    "write_rttm",
]
