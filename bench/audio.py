"""Audio front-end benchmark: DER of the embedded diariser, SI-SDR of separation, speed and peak memory.

    HF_HUB_OFFLINE=1 python bench/audio.py [--sample-dir DIR] [--quick]

Real speech: pyannote.audio's sample (30 s, two speakers, reference RTTM), unpacked from its wheel:
    pip download --no-deps pyannote.audio==4.0.7 -d /tmp/x && unzip /tmp/x/*.whl 'pyannote/audio/sample/*' -d /tmp/x
The music is synthesised (tests/audio_fixtures.music: chords, bass, hi-hat); the third voice of the
three-speaker case is the Piper "joe" voice. Every DER is md-eval style: collar 0.25 s, overlaps scored.
Speed and memory are measured in a fresh process per backend (peak RSS includes the interpreter).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")

from engine.media import read_channels  # noqa: E402
from tasks.diarise import EmbeddedDiariser, EmbeddedSettings, Turn, diarisation_error_rate, read_rttm  # noqa: E402
from tasks.separate import separate_dsp  # noqa: E402
from tests.audio_fixtures import RATE, conversation, mix_at, music, say, si_sdr, write_wav  # noqa: E402

DER_GOAL = {"clean": 0.05, "music -12 dB": 0.05, "5-min episode": 0.05, "3 speakers": 0.20}


def load_sample(sample_dir: Path) -> tuple[np.ndarray, list[Turn]]:
    audio, rate = read_channels(sample_dir / "sample.wav")
    assert rate == RATE, rate
    return audio[0], read_rttm(sample_dir / "sample.rttm")


def shift(turns: list[Turn], offset: float, label_map: dict[str, str] | None = None) -> list[Turn]:
    return [Turn(t.start + offset, t.end + offset, (label_map or {}).get(t.label, t.label)) for t in turns]


def episode(sample: np.ndarray, ref: list[Turn], minutes: float = 5.0) -> tuple[np.ndarray, list[Turn]]:
    """The sample repeated with 1-6 s gaps (fixed seed) up to `minutes`."""
    rng = np.random.default_rng(7)
    pieces, turns, cursor = [], [], 0.0
    while cursor < minutes * 60 - len(sample) / RATE:
        pieces.append((cursor, sample))
        turns += shift(ref, cursor)
        cursor += len(sample) / RATE + float(rng.uniform(1.0, 6.0))
    out = np.zeros(int(minutes * 60 * RATE), dtype=np.float32)
    for start, piece in pieces:
        out[int(start * RATE) : int(start * RATE) + len(piece)] += piece
    return out, turns


def three_speakers(sample: np.ndarray) -> tuple[np.ndarray, list[Turn]]:
    """speaker90 / speaker91 single-talker stretches of the sample, a 3 s Piper line, a 1.5 s overlap, music."""
    cut = lambda a, b: sample[int(a * RATE) : int(b * RATE)]  # noqa: E731
    joe = say("ben", "Sorry to interrupt, but the car is waiting outside now.")  # 2.9 s
    plan = [  # (label, audio, starts this many seconds before the previous piece ends)
        ("speaker90", cut(11.03, 14.49), 0.0),
        ("speaker91", cut(14.70, 17.92), 0.0),
        ("joe", joe, 0.0),
        ("speaker91", cut(21.78, 27.85), 0.0),
        ("speaker90", cut(18.59, 21.49), 1.5),
        ("speaker90", cut(8.32, 9.92), 0.0),
    ]
    cursor, placed, turns = 0.5, [], []
    for label, audio, early in plan:
        start = cursor - early if early else cursor + 0.6
        placed.append((start, audio))
        turns.append(Turn(round(start, 3), round(start + len(audio) / RATE, 3), label))
        cursor = start + len(audio) / RATE
    out = np.zeros(int((cursor + 1.0) * RATE), dtype=np.float32)
    for start, audio in placed:
        out[int(start * RATE) : int(start * RATE) + len(audio)] += audio
    cue = slice(int(turns[1].start * RATE), int(turns[4].end * RATE))  # music under the middle
    out[cue] = mix_at(out[cue], music((cue.stop - cue.start) / RATE, seed=5), -12.0)
    return out, turns


def der(audio: np.ndarray, ref: list[Turn], num_speakers: int | None) -> float:
    turns = EmbeddedDiariser(EmbeddedSettings()).run(audio, num_speakers=num_speakers, progress=None)
    return diarisation_error_rate(ref, turns, collar=0.25)


def der_table(sample: np.ndarray, ref: list[Turn]) -> list[dict]:
    with_music = mix_at(sample, music(len(sample) / RATE, seed=1), -12.0)
    ep, ep_ref = episode(sample, ref)
    three, three_ref = three_speakers(sample)
    cases = {
        "clean": (sample, ref, 2),
        "music -12 dB": (with_music, ref, 2),
        "music -12 dB, after dsp separate": (separate_dsp(with_music[None], RATE)[0], ref, 2),
        "5-min episode": (ep, ep_ref, 2),
        "3 speakers": (three, three_ref, 3),
        "3 speakers, after dsp separate": (separate_dsp(three[None], RATE)[0], three_ref, 3),
    }
    rows = []
    for name, (audio, reference, k) in cases.items():
        known, estimated = der(audio, reference, k), der(audio, reference, None)
        goal = DER_GOAL.get(name.split(",")[0], 0.05)
        rows.append({"case": name, "der_known_count": known, "der_estimated_count": estimated, "goal": goal})
        print(
            f"DER  {name:34s} known count {known:6.1%}  estimated count {estimated:6.1%}  "
            f"goal <= {goal:.0%}  ratio to goal {known / goal:5.2f}",
            flush=True,
        )
    rows.append(robustness(sample, ref))
    return rows


def robustness(sample: np.ndarray, ref: list[Turn], seeds: range = range(10, 16)) -> dict:
    """Same configuration, six other music cues (tempo, key, chord order) at two levels, straight into
    the diariser and after the dsp separator (the pipeline's path): the worst case is what users meet."""
    worst = {}
    for db in (-12.0, -6.0):
        mixes = [mix_at(sample, music(len(sample) / RATE, seed=k), db) for k in seeds]
        for path, prepare in (
            ("direct", lambda m: m),
            ("after dsp", lambda m: separate_dsp(m[None], RATE)[0]),
        ):
            ders = [der(prepare(m), ref, 2) for m in mixes]
            name = f"2 speakers + music {db:+.0f} dB, {path}"
            worst[name] = max(ders)
            print(
                f"DER  {name:34s} {len(ders)} cues: mean {np.mean(ders):6.1%}  worst {max(ders):6.1%}",
                flush=True,
            )
    return {"case": "robustness (worst of 6 music cues)", **worst}


def separation_table(sample: np.ndarray) -> list[dict]:
    tts, _ = conversation([("ana", 0), ("ben", 0), ("cal", 1), ("ana", 1)])
    rows = []
    for name, speech in {"pyannote sample (real speech)": sample, "espeak+piper dialogue": tts}.items():
        mix = mix_at(speech, music(len(speech) / RATE, seed=2), -12.0)
        before = si_sdr(speech, mix)
        after = si_sdr(speech, separate_dsp(mix[None], RATE)[0])
        rows.append(
            {"case": name, "si_sdr_mix": before, "si_sdr_dsp": after, "improvement_db": after - before}
        )
        print(
            f"SI-SDR {name:30s} mix {before:6.2f} dB -> dsp vocals {after:6.2f} dB: improvement {after - before:+.2f} dB"
        )
    print("SI-SDR demucs: not measured (no htdemucs weights on this machine)")
    return rows


# --------------------------------------------------------------------------- speed, one process per backend


def run_backend(backend: str, path: Path, seconds: float) -> dict:
    """Runs in its own process: time one backend on `path`, report x real-time and peak RSS."""
    from tasks.diarise import SpeakerRef, diarise
    from tasks.separate import separate
    from tasks.transcribe import transcribe

    out = Path(tempfile.mkdtemp())
    if backend == "demucs-htdemucs-random":
        models = _random_htdemucs(out / "models")
    t0 = time.perf_counter()
    if backend == "separate-dsp":
        separate(path, out / "sep", backend="dsp")
    elif backend == "demucs-htdemucs-random":
        separate(path, out / "sep", backend="demucs", model="htdemucs", models_dir=models)
    elif backend == "diarise-embedded":
        diarise(path, [SpeakerRef("a"), SpeakerRef("b")], out / "dia", backend="embedded", num_speakers=2)
    elif backend == "transcribe-faster-whisper":
        transcribe(path, backend="faster-whisper")
    elapsed = time.perf_counter() - t0
    return {
        "backend": backend,
        "seconds": elapsed,
        "x_realtime": seconds / elapsed,
        "peak_rss_mb": peak_rss_mb(),
    }


def peak_rss_mb() -> float:
    """This process's own peak RSS. Not ru_maxrss: across fork+exec Linux carries the parent's peak into it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _random_htdemucs(repo: Path) -> Path:
    """The real htdemucs architecture (default HTDemucs arguments, 26.9 M parameters) with random weights."""
    import torch
    import yaml
    from demucs.htdemucs import HTDemucs

    torch.manual_seed(0)
    kwargs = {"sources": ["drums", "bass", "other", "vocals"], "samplerate": 44_100, "segment": 7.8}
    net = HTDemucs(**kwargs)
    repo.mkdir(parents=True)
    torch.save(
        {"klass": HTDemucs, "args": (), "kwargs": kwargs, "state": net.state_dict()}, repo / "955717e8.th"
    )
    (repo / "htdemucs.yaml").write_text(yaml.safe_dump({"models": ["955717e8"]}))
    return repo


def speed_table(sample: np.ndarray, ref: list[Turn], quick: bool) -> list[dict]:
    ep, _ = episode(sample, ref, minutes=1.0 if quick else 5.0)
    tmp = Path(tempfile.mkdtemp())
    path = write_wav(tmp / "episode.wav", ep)
    demucs_path = write_wav(tmp / "demucs30.wav", ep[: 30 * RATE])
    rows = []
    jobs = [
        ("separate-dsp", path, len(ep) / RATE),
        ("diarise-embedded", path, len(ep) / RATE),
        ("transcribe-faster-whisper", path, len(ep) / RATE),
        ("demucs-htdemucs-random", demucs_path, 30.0),
    ]
    for backend, audio, seconds in jobs:
        cmd = [sys.executable, __file__, "--one", backend, str(audio), str(seconds)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"SPEED {backend}: failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"SPEED {backend:28s} {seconds:5.0f} s audio in {row['seconds']:6.1f} s: "
            f"{row['x_realtime']:6.1f}x real time, peak RSS {row['peak_rss_mb']:6.0f} MB",
            flush=True,
        )
    front = [
        r for r in rows if r["backend"] in ("separate-dsp", "diarise-embedded", "transcribe-faster-whisper")
    ]
    total = sum(r["seconds"] for r in front)
    print(
        f"SPEED embedded front-end (dsp + embedded diarise + tiny.en) {len(ep) / RATE / total:.1f}x real time "
        f"(goal > 1x on 2 cores)"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sample-dir", type=Path, default=Path("/tmp/pyw/pyannote/audio/sample"))
    parser.add_argument("--quick", action="store_true", help="1-minute speed input instead of 5 minutes")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--parts", default="der,separation,speed", help="comma-separated subset to run")
    parser.add_argument("--one", nargs=3, metavar=("BACKEND", "AUDIO", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_backend(args.one[0], Path(args.one[1]), float(args.one[2]))))
        return
    if not (args.sample_dir / "sample.wav").is_file():
        sys.exit(
            f"{args.sample_dir}/sample.wav not found: unpack the pyannote.audio wheel (see the docstring)"
        )
    sample, ref = load_sample(args.sample_dir)
    tables = {
        "der": lambda: der_table(sample, ref),
        "separation": lambda: separation_table(sample),
        "speed": lambda: speed_table(sample, ref, args.quick),
    }
    figures = {part: tables[part]() for part in args.parts.split(",")}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
