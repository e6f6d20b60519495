"""tts: synthesise script lines into one timed track per speaker (lines mode).

Embedded default: espeak-ng (Debian package, no weights), a distinct voice per speaker.
Kokoro / Piper backends plug in here behind the same function.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine.media import MediaError, read_audio

# Distinct, clearly different espeak-ng voices for speakers without a `voice`.
DEFAULT_VOICES = ("en-us+m3", "en-us+f3", "en-gb+m5", "en-gb+f4", "en-us+m7", "en-us+f2")


class TtsError(RuntimeError):
    pass


def espeak_exe() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise TtsError("espeak-ng not found; install it with: apt-get install espeak-ng")
    return exe


def speak(text: str, voice: str, sample_rate: int, *, out_dir: Path, speed_wpm: int = 155) -> np.ndarray:
    """One utterance as mono float32 at `sample_rate`."""
    wav = out_dir / f"utt-{hashlib.sha1(f'{voice}|{text}'.encode()).hexdigest()[:16]}.wav"
    cmd = [espeak_exe(), "-v", voice, "-s", str(speed_wpm), "-w", str(wav), "--", text]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not wav.exists():
        raise TtsError(f"espeak-ng could not speak with voice {voice!r}: {proc.stderr.strip()[-200:]}")
    try:
        return read_audio(wav, sample_rate)
    except MediaError as exc:
        raise TtsError(str(exc)) from None
    finally:
        wav.unlink(missing_ok=True)


def voice_for(speaker_index: int, voice: str | None) -> str:
    return voice or DEFAULT_VOICES[speaker_index % len(DEFAULT_VOICES)]


def synthesise_track(
    lines: Sequence[tuple[float, str, str]], sample_rate: int, *, out_dir: Path, total_s: float | None = None
) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Place each (start_s, text, voice) utterance on one timeline; returns (track, [(start, end)]).

    Utterances never overlap: one that would start inside the previous one is pushed back.
    """
    pieces, spans, cursor = [], [], 0.0
    for start, text, voice in sorted(lines):
        audio = speak(text, voice, sample_rate, out_dir=out_dir)
        begin = max(start, cursor)
        pieces.append((int(round(begin * sample_rate)), audio))
        cursor = begin + len(audio) / sample_rate
        spans.append((begin, cursor))
    length = max([o + len(a) for o, a in pieces] + [int(round((total_s or 0) * sample_rate))])
    track = np.zeros(length, dtype=np.float32)
    for offset, audio in pieces:
        track[offset : offset + len(audio)] += audio
    return track, spans
