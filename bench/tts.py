"""Benchmark of lines mode (issue 13): TTS speed, the timing fit, and intelligibility.

    python bench/tts.py             # every backend that runs here, a 50-line two-speaker script
    python bench/tts.py --lines 20  # a shorter script

For each backend that runs here (kokoro needs its weights in $DUBFLOW_MODELS_DIR/kokoro or the HF cache):
- synthesis speed on the CPU, as x real time (seconds of speech per second of synthesis; the model load is
  counted apart);
- on a two-speaker script generated here (each line's slot between 0.65x and 1.3x its length at 2.8 words a
  second, one conversation), the share of lines that fit without going past the speed bound (1.25x) and the largest drift
  from the intended start; baseline, in the same run: no fit (every line at its natural speed, pushed after
  the line before it, as lines mode placed them before the fit);
- intelligibility: the word error rate of the backend's lines read back by the embedded ASR (Whisper tiny.en,
  the `asr` extra). The goal: <= 15 % on English for the best backend that runs here.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from engine.base import models_dir_from_env  # noqa: E402
from tasks.lines import ScriptLine, fit_report, fit_script, place_lines  # noqa: E402
from tasks.tts import BACKENDS, backend_problem, choose_voice, speak, trim_silence  # noqa: E402

RATE = 48_000
MAX_SPEED = 1.25
WORDS_PER_S = 2.8
SENTENCES = [
    "Did you finish the subtitles for episode three?",
    "Almost, the last scene still needs a voice.",
    "Then let us dub it tonight.",
    "The director wants the music a little quieter.",
    "I moved the meeting to Thursday morning.",
    "Nobody told me the train was cancelled.",
    "We should check the lighting before we start.",
    "Can you send me the new version of the script?",
    "The coffee machine on the second floor is broken again.",
    "She said the interview went really well.",
    "Turn left at the bridge and follow the river.",
    "My brother is visiting us next weekend.",
    "Please close the window, it is getting cold.",
    "The report is due at the end of the month.",
    "I think we need a bigger boat.",
    "They opened a new bakery across the street.",
    "How long have you been waiting here?",
    "Let me call you back in five minutes.",
    "The children are playing in the garden.",
    "This is the best soup I have ever tasted.",
]


@dataclass(frozen=True)
class Spoken:
    audio: np.ndarray
    seconds: float


def script(n: int, seed: int = 13) -> list[ScriptLine]:
    """n lines, two speakers taking turns (sometimes twice in a row). Each slot (to the next line) is 0.65x-1.3x
    the line's length at 2.8 words a second (a typical English pace), so some lines need the fit and some do not."""
    rng = random.Random(seed)
    lines, t, who = [], 0.5, 0
    for i in range(n):
        text = SENTENCES[i % len(SENTENCES)]
        if rng.random() < 0.75:
            who = 1 - who
        lines.append(ScriptLine(i, ("ana", "ben")[who], round(t, 2), None, text))
        t += len(text.split()) / WORDS_PER_S * rng.uniform(0.65, 1.3)
    return lines


def run_backend(backend: str, lines: list[ScriptLine], models, asr) -> dict:
    voices = {s: choose_voice(backend, None, "en", k, models) for k, s in enumerate(("ana", "ben"))}
    started = time.perf_counter()
    speak("Warm up.", voices["ana"], 1.0, RATE, models)  # the model load, counted apart
    load_s = time.perf_counter() - started
    synth_s, audio_s = 0.0, 0.0

    def say(i: int, speed: float) -> Spoken:
        nonlocal synth_s, audio_s
        t0 = time.perf_counter()
        audio = trim_silence(speak(lines[i].text, voices[lines[i].speaker], speed, RATE, models), RATE)
        synth_s += time.perf_counter() - t0
        audio_s += len(audio) / RATE
        return Spoken(audio, len(audio) / RATE)

    fit = {"conversation": True, "episode_end": None}
    fitted, spoken = fit_script(lines, say, max_speed=MAX_SPEED, **fit)
    report = fit_report(fitted, MAX_SPEED)
    natural = {ln.index: say(ln.index, 1.0) for ln in lines}  # the same lines again: cached nowhere here
    baseline = place_lines(
        lines, {i: a.seconds for i, a in natural.items()}, dict.fromkeys(natural, 1.0), **fit
    )  # no fit: natural speed, pushed after the line before
    base_report = fit_report(baseline, 1.0)
    result = {
        "backend": backend,
        "voices": {s: v.name for s, v in voices.items()},
        "load_s": load_s,
        "xrt": audio_s / synth_s,
        "fit_share": report["fit_within_speed_bound"] / len(lines),
        "max_drift_s": report["max_drift_s"],
        "sped_up": report["sped_up"],
        "base_fit_share": base_report["fit_within_speed_bound"] / len(lines),
        "base_max_drift_s": base_report["max_drift_s"],
    }
    if asr is not None:
        result["wer"] = asr(lines, natural)
    return result


def make_asr():
    """Word error rate of natural-speed lines, each read back by the embedded Whisper tiny.en."""
    try:
        from scipy.signal import resample_poly

        from tasks.transcribe import (
            embedded_model_path,
            transcribe_faster_whisper,
            word_error_rate,
            words_to_text,
        )

        embedded_model_path()  # the asr extra is installed
    except Exception as exc:  # noqa: BLE001 - the bench says why and goes on without the WER
        print(f"  (no WER: {exc})")
        return None

    def wer(lines: list[ScriptLine], spoken: dict[int, Spoken]) -> float:
        ref, hyp = [], []
        for ln in lines:
            wav16 = resample_poly(spoken[ln.index].audio.astype(np.float64), 1, 3).astype(np.float32)
            pad = np.zeros(8000, dtype=np.float32)
            words = transcribe_faster_whisper(np.concatenate([pad, wav16, pad]), language="en", model=None)
            ref.append(ln.text)
            hyp.append(words_to_text(words))
        return word_error_rate(" ".join(ref), " ".join(hyp))

    return wer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=50)
    parser.add_argument("--no-wer", action="store_true", help="skip the ASR read-back")
    args = parser.parse_args()
    models = models_dir_from_env()
    lines = script(args.lines)
    span = lines[-1].start
    print(f"script: {len(lines)} lines, two speakers, {span:.0f} s; speed bound {MAX_SPEED}x; CPU")
    asr = None if args.no_wer else make_asr()
    results = []
    for backend in BACKENDS:
        problem = backend_problem(backend, models)
        if problem:
            print(f"{backend:<7} not run here: {problem}")
            continue
        r = run_backend(backend, lines, models, asr)
        results.append(r)
        wer = f", WER {r['wer'] * 100:.1f} %" if "wer" in r else ""
        print(
            f"{backend:<7} {r['xrt']:.1f}x real time (load {r['load_s']:.1f} s){wer}; voices {r['voices']}\n"
            f"        fit: {r['fit_share'] * 100:.0f} % of lines within {MAX_SPEED}x ({r['sped_up']} sped up), "
            f"largest drift {r['max_drift_s']:.2f} s | baseline (no fit): {r['base_fit_share'] * 100:.0f} %, "
            f"largest drift {r['base_max_drift_s']:.2f} s -> drift ratio "
            f"{r['base_max_drift_s'] / max(r['max_drift_s'], 1e-3):.1f}x smaller"
        )
    scored = [r for r in results if "wer" in r]
    if scored:
        best = min(scored, key=lambda r: r["wer"])
        verdict = "meets" if best["wer"] <= 0.15 else "misses"
        print(
            f"best intelligibility: {best['backend']} WER {best['wer'] * 100:.1f} % ({verdict} the 15 % goal)"
        )


if __name__ == "__main__":
    main()
