"""Audio front-end benchmark on real recordings: DER, SI-SDR of separation, speed and peak memory.

    HF_HUB_OFFLINE=1 python bench/audio.py [--data DIR] [--quick] [--parts der,separation,speed]

Data: ../shared/data/speech-dev (real LibriSpeech / CMU ARCTIC voices, real music, exact stems, reference
RTTMs, out-of-sample enrolment clips; its README says how they were built). DER is scored the way the
field scores it, by pyannote.metrics: collar 0.25 s each side (pyannote's collar=0.5), overlaps scored,
split into missed detection, false alarm and confusion. Diarisation runs per mix and per speech-activity
model (silero-vad, the baseline, and pyannote/segmentation when its checkpoint is found), each on what the
diarise stage of `dubflow run` receives, the dialogue separated by the backend that `separate.backend: auto`
picks (dfn here): the count given and the count guessed (blind clustering, optimal label mapping), and
`diarise` with every enrolment clip plus the distractor `aew`, scored by identity (names must be right);
then the raw mix, count given and guessed, as a secondary reference. SI-SDR improvement over the mix of the
dsp and dfn (DeepFilterNet3) vocals and of the oracle ideal ratio mask (upper bound of any mask on the dsp
STFT, from the true stems), on the whole file, inside the music cues and outside them, and the speech left
in the M&E bed outside music (goal < -30 dB). Baselines are measured in the same run: the mix itself for
SI-SDR. Speed is x real time on this machine's cores, in a fresh process per backend (peak RSS includes the
interpreter).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")

from engine.base import models_dir_from_env  # noqa: E402
from engine.media import read_channels  # noqa: E402
from tasks.diarise import EmbeddedDiariser, EmbeddedSettings, SpeakerRef, Turn, diarise, read_rttm  # noqa: E402
from tasks.diarise.segmentation import find_checkpoint  # noqa: E402
from tasks.separate import _stft_size, separate_in_memory  # noqa: E402
from tests.audio_fixtures import RATE, si_sdr, write_wav  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "speech-dev"
MIXES = ("dev_two", "dev_three", "dev_three_clean", "dev_long")
DER_GOAL = {"dev_two": 0.04, "dev_long": 0.04, "dev_three": 0.12, "dev_three_clean": 0.12}
DISTRACTOR = "aew"


def annotation(turns: list[Turn], uri: str):
    from pyannote.core import Annotation, Segment

    out = Annotation(uri=uri)
    for k, t in enumerate(turns):
        out[Segment(t.start, t.end), k] = t.label
    return out


def der_parts(reference: list[Turn], hypothesis: list[Turn], named: bool = False) -> dict[str, float]:
    """pyannote.metrics: DER (optimal mapping) or, for named output, the identification error rate
    (labels must match), with missed / false alarm / confusion as fractions of the reference speech."""
    from pyannote.core import Segment, Timeline
    from pyannote.metrics.diarization import DiarizationErrorRate
    from pyannote.metrics.identification import IdentificationErrorRate

    metric = (IdentificationErrorRate if named else DiarizationErrorRate)(collar=0.5, skip_overlap=False)
    end = max(t.end for t in [*reference, *hypothesis])
    uem = Timeline([Segment(0.0, end)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = metric(annotation(reference, "x"), annotation(hypothesis, "x"), detailed=True, uem=uem)
    total = d["total"] or 1.0
    return {
        "der": (d["missed detection"] + d["false alarm"] + d["confusion"]) / total,
        "missed": d["missed detection"] / total,
        "false_alarm": d["false alarm"] / total,
        "confusion": d["confusion"] / total,
    }


def load(name: str, data: Path) -> dict:
    mixes = data / "mixes"
    info = json.loads((mixes / "mixes.json").read_text())[name]
    out = {"mix": read_channels(mixes / f"{name}_mix.wav")[0][0], "ref": read_rttm(mixes / f"{name}.rttm")}
    for stem in ("speech", "music"):
        if (mixes / f"{name}_{stem}.wav").is_file():
            out[stem] = read_channels(mixes / f"{name}_{stem}.wav")[0][0]
    out["cues"] = [(c["mix_start_s"], c["mix_end_s"]) for c in info.get("music_cues", [])]
    return out


def pipeline_vocals(mix: np.ndarray) -> tuple[np.ndarray, str]:
    """What `dubflow run`'s diarise stage receives: the dialogue separated by the backend that
    `separate.backend: auto` resolves to on this machine (flows/episode.py separates, then diarises the
    vocals; tasks.diarise.stage downmixes them to 16 kHz mono)."""
    from tasks.separate import resolve_separate_backend, separate

    backend = resolve_separate_backend("auto", "htdemucs", models_dir_from_env())[0]
    if backend in ("dsp", "dfn"):
        return separate_in_memory(mix[None], RATE, backend=backend)[0], backend
    with tempfile.TemporaryDirectory() as tmp:  # demucs: the file path, as the stage runs it
        sep = separate(write_wav(Path(tmp) / "mix.wav", mix), Path(tmp) / "sep", backend=backend)
        return read_channels(sep.vocals)[0].mean(axis=0), backend


DER_ROWS = ("count given", "count guessed", "enrolment", "raw mix: count given", "raw mix: count guessed")


def der_table(data: Path, names: tuple[str, ...], seg_step_s: float | None = None) -> list[dict]:
    """Per mix and per speech-activity model (silero-vad, the baseline; pyannote/segmentation when its
    checkpoint is found). Main rows on the pipeline's own input (the separated dialogue, `pipeline_vocals`):
    count given (what the stage does without voice samples), count guessed, and `diarise` with every
    enrolment clip plus the distractor `aew` (names must be right). Secondary rows: the raw mix, count given
    and guessed (the reference of earlier rounds)."""
    rows = []
    enrol = data / "mixes" / "enrol"
    vads = ["silero"] + (["segmentation"] if find_checkpoint(models_dir_from_env()) else [])
    if len(vads) == 1:
        print(
            "DER  pyannote/segmentation: not measured (no checkpoint; pip install --no-deps whisperx==3.8.6)"
        )
    base_settings = EmbeddedSettings()
    if seg_step_s is not None:
        base_settings = replace(base_settings, seg_step_s=seg_step_s)
    for name in names:
        case = load(name, data)
        ids = sorted({t.label for t in case["ref"]})
        t0 = time.perf_counter()
        vocals, separator = pipeline_vocals(case["mix"])
        print(
            f"DER  {name}: the stage's input is the {separator}-separated dialogue ({time.perf_counter() - t0:.1f} s)"
        )
        for vad in vads:
            settings = replace(base_settings, segmentation="silero" if vad == "silero" else "auto")
            row: dict = {
                "mix": name,
                "vad": vad,
                "speakers": ids,
                "goal": DER_GOAL[name],
                "separator": separator,
            }
            for label, audio, count in (
                ("count given", vocals, len(ids)),
                ("count guessed", vocals, None),
                ("raw mix: count given", case["mix"], len(ids)),
                ("raw mix: count guessed", case["mix"], None),
            ):
                t0 = time.perf_counter()
                # the stage judges music on the dialogue before separation (`diarise(music_source=...)`)
                turns = EmbeddedDiariser(settings).run(
                    audio, num_speakers=count, progress=None, music=case["mix"]
                )
                row[label] = der_parts(case["ref"], turns) | {"seconds": time.perf_counter() - t0}
            with tempfile.TemporaryDirectory() as tmp:
                path = write_wav(Path(tmp) / f"{name}.wav", vocals)
                refs = [SpeakerRef(s, enrol / f"{s}.wav") for s in [*ids, DISTRACTOR]]
                result = diarise(
                    path,
                    refs,
                    Path(tmp) / "out",
                    backend="embedded",
                    num_speakers=len(refs),
                    settings=settings,
                    music_source=write_wav(Path(tmp) / f"{name}_mix.wav", case["mix"]),
                )
                named = read_rttm(result.rttm)
                record = json.loads((Path(tmp) / "out" / "mapping.json").read_text())
            row["enrolment"] = der_parts(case["ref"], named, named=True) | {
                "aew_assigned": any(t.label == DISTRACTOR for t in named),
                "warnings": record["warnings"],
                "confidence": {s: record["confidence"][s]["confidence"] for s in ids},
            }
            rows.append(row)
            base = next((r for r in rows if r["mix"] == name and r["vad"] == "silero"), row)
            for label in DER_ROWS:
                r = row[label]
                extra = f"  aew assigned: {r['aew_assigned']}" if "aew_assigned" in r else ""
                vs = (
                    f"  x{r['der'] / max(base[label]['der'], 1e-9):4.2f} of silero" if base is not row else ""
                )
                shown = label if label.startswith("raw") else f"{separator}: {label}"
                print(
                    f"DER  {name:16s} {vad:12s} {shown:23s} {r['der']:6.1%} (missed {r['missed']:5.1%}, false "
                    f"alarm {r['false_alarm']:5.1%}, confusion {r['confusion']:5.1%})  goal <= {row['goal']:.0%}  "
                    f"ratio to goal {r['der'] / row['goal']:5.2f}{vs}{extra}",
                    flush=True,
                )
            print(f"     {name:16s} {vad:12s} qc warnings: {row['enrolment']['warnings']}", flush=True)
    return rows


SEPARATORS = ("dsp", "dfn", "oracle-irm")


def separated(estimator: str, mix: np.ndarray, speech: np.ndarray) -> np.ndarray:
    """Dialogue of one estimator. `oracle-irm` is the upper bound of any mask on the dsp STFT: the ideal
    ratio mask from the true stems, everywhere, no gate."""
    if estimator == "oracle-irm":
        import librosa

        n_fft = _stft_size(RATE)
        spec = [librosa.stft(x, n_fft=n_fft, hop_length=n_fft // 4) for x in (mix, speech)]
        power_speech, power_rest = np.abs(spec[1]) ** 2, np.abs(spec[0] - spec[1]) ** 2
        mask = power_speech / (power_speech + power_rest + 1e-20)
        return librosa.istft(spec[0] * mask, hop_length=n_fft // 4, n_fft=n_fft, length=len(mix))
    return separate_in_memory(mix[None], RATE, backend=estimator)[0]


def long_stems(data: Path) -> Path:
    """A corpus folder with dev_long's stems: `data` itself, or a scratch copy where the corpus' own
    tools/build.py --long-stems wrote them (byte-identical each time; not stored, to keep it small)."""
    if (data / "mixes" / "dev_long_speech.wav").is_file():
        return data
    copy = Path(tempfile.mkdtemp()) / "speech-dev"
    shutil.copytree(data, copy)
    for path in copy.rglob("*"):
        path.chmod(path.stat().st_mode | 0o200)
    cmd = [sys.executable, str(copy / "tools" / "build.py"), "--long-stems"]
    subprocess.run(cmd, check=True, capture_output=True, cwd=copy)
    return copy


def separation_table(
    data: Path, names: tuple[str, ...], estimators: tuple[str, ...] = SEPARATORS
) -> list[dict]:
    """SI-SDR of each estimator's dialogue against the clean speech: whole file, inside the music cues,
    outside them (baseline: the mix itself, same span); the speech left in the M&E bed outside music,
    relative to the speech there (goal < -30 dB); and where each estimator acted (changed the input): its
    coverage of the cues and its seconds of sound outside them (for dsp and dfn, where their gate opened)."""
    rows = []
    if "dev_long" in names:
        data = long_stems(data)
    for name in names:
        case = load(name, data)
        mix, speech, music = case["mix"], case["speech"], case["music"]
        inside = np.zeros(len(mix), dtype=bool)
        for a, b in case["cues"] if np.any(music) else []:
            inside[int(a * RATE) : int(b * RATE)] = True
        spans = {"whole": np.ones(len(mix), bool), "in music": inside, "no music": ~inside}
        spans = {k: v for k, v in spans.items() if v.sum() >= RATE and np.any(speech[v])}
        row = {"mix": name, "mix_si_sdr": {k: si_sdr(speech[v], mix[v]) for k, v in spans.items()}}
        for estimator in estimators:
            t0 = time.perf_counter()
            vocals = separated(estimator, mix, speech)
            seconds = time.perf_counter() - t0
            figures = {k: si_sdr(speech[v], vocals[v]) - row["mix_si_sdr"][k] for k, v in spans.items()}
            quiet = ~inside
            leak = (mix - vocals - music)[quiet]
            bed_db = (
                float(10 * np.log10((np.sum(leak**2) + 1e-20) / (np.sum(speech[quiet] ** 2) + 1e-20)))
                if quiet.sum() >= RATE
                else None
            )
            row[estimator] = {"improvement_db": figures, "bed_speech_db_outside_music": bed_db}
            row[estimator]["x_realtime"] = len(mix) / RATE / seconds
            acted = mix != vocals  # where the separator took something out (the gate, for dsp and dfn)
            row[estimator]["acted"] = {
                "cue_coverage": float(acted[inside].mean()) if inside.any() else None,
                "outside_cues_s": float((acted & ~inside & (mix != 0)).sum() / RATE),
            }
            parts = "  ".join(
                f"{k}: {row['mix_si_sdr'][k]:6.2f} -> {row['mix_si_sdr'][k] + d:6.2f} dB ({d:+.2f})"
                for k, d in figures.items()
            )
            bed = "music throughout" if bed_db is None else f"{bed_db:7.1f} dB (goal < -30)"
            acted = row[estimator]["acted"]
            cover = "" if acted["cue_coverage"] is None else f"{acted['cue_coverage']:.0%} of the cues, "
            print(
                f"SI-SDR {name:16s} {estimator:10s} {parts}  bed speech outside music: {bed}  "
                f"[{row[estimator]['x_realtime']:.1f}x rt; acts on {cover}"
                f"{acted['outside_cues_s']:.1f} s of sound outside them]",
                flush=True,
            )
        rows.append(row)
    print("SI-SDR demucs: not measured (no htdemucs weights on this machine)")
    print(
        "goal: >= +5 dB in music at -12 LU, >= 0 dB everywhere; oracle-irm is an upper bound, not a backend"
    )
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
    if backend in ("separate-dsp", "separate-dfn"):
        separate(path, out / "sep", backend=backend.removeprefix("separate-"))
    elif backend == "demucs-htdemucs-random":
        separate(path, out / "sep", backend="demucs", model="htdemucs", models_dir=models)
    elif backend in ("diarise-embedded", "diarise-embedded-silero"):
        settings = EmbeddedSettings(segmentation="silero" if backend.endswith("silero") else "auto")
        refs = [SpeakerRef("a"), SpeakerRef("b")]
        diarise(path, refs, out / "dia", backend="embedded", num_speakers=2, settings=settings)
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


def speed_table(data: Path, quick: bool) -> list[dict]:
    mix = load("dev_long", data)["mix"]
    if quick:
        mix = mix[: 60 * RATE]
    tmp = Path(tempfile.mkdtemp())
    path = write_wav(tmp / "dev_long.wav", mix)
    demucs_path = write_wav(tmp / "demucs30.wav", mix[: 30 * RATE])
    seconds = len(mix) / RATE
    rows = []
    jobs = [
        ("separate-dsp", path, seconds),
        ("separate-dfn", path, seconds),
        ("diarise-embedded-silero", path, seconds),
        ("diarise-embedded", path, seconds),
        ("transcribe-faster-whisper", path, seconds),
        ("demucs-htdemucs-random", demucs_path, 30.0),
    ]
    for backend, audio, length in jobs:
        cmd = [sys.executable, __file__, "--one", backend, str(audio), str(length)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"SPEED {backend}: failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"SPEED {backend:28s} {length:5.0f} s audio in {row['seconds']:6.1f} s: "
            f"{row['x_realtime']:6.1f}x real time, peak RSS {row['peak_rss_mb']:6.0f} MB ({os.cpu_count()} cores)",
            flush=True,
        )
    for separator in ("separate-dsp", "separate-dfn"):
        front = [
            r for r in rows if r["backend"] in (separator, "diarise-embedded", "transcribe-faster-whisper")
        ]
        total = sum(r["seconds"] for r in front)
        if len(front) == 3:
            print(
                f"SPEED embedded front-end ({separator} + embedded diarise + tiny.en) {seconds / total:.1f}x "
                f"real time (goal > 1x on 2 cores)"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DATA, help="the speech-dev corpus")
    parser.add_argument("--mixes", default=",".join(MIXES), help="comma-separated subset of the mixes")
    parser.add_argument("--quick", action="store_true", help="1-minute speed input instead of dev_long's 4.3")
    parser.add_argument(
        "--seg-step", type=float, help="segmentation window hop (EmbeddedSettings.seg_step_s)"
    )
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--parts", default="der,separation,speed", help="comma-separated subset to run")
    parser.add_argument("--one", nargs=3, metavar=("BACKEND", "AUDIO", "SECONDS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_backend(args.one[0], Path(args.one[1]), float(args.one[2]))))
        return
    if not (args.data / "mixes" / "mixes.json").is_file():
        sys.exit(f"{args.data}/mixes/mixes.json not found: point --data at the speech-dev corpus")
    names = tuple(args.mixes.split(","))
    tables = {
        "der": lambda: der_table(args.data, names, args.seg_step),
        "separation": lambda: separation_table(args.data, names),
        "speed": lambda: speed_table(args.data, args.quick),
    }
    figures = {part: tables[part]() for part in args.parts.split(",")}
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
