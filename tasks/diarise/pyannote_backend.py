"""The pyannote backend: pyannote.audio's speaker-diarization pipeline (community-1 or 3.1) from the HF cache or a
local folder; token from HF_TOKEN, never logged; telemetry off. Imported lazily (the `diarize` extra)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from engine.base import EngineSetupError, MissingWeightsError
from tasks.diarise.turns import RATE, Turn, turn_key

DIARIZE_EXTRA = "pip install -e '.[diarize]'"
PYANNOTE_PIPELINES = {
    "community-1": "pyannote/speaker-diarization-community-1",
    "3.1": "pyannote/speaker-diarization-3.1",
}


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
    for t in sorted(raw, key=turn_key):
        if t.label not in order:
            order.append(t.label)
    return sorted((Turn(t.start, t.end, f"SPK{order.index(t.label)}") for t in raw), key=turn_key)


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
