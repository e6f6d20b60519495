"""The diarise stage: choose a backend, diarise, name the clusters, write the RTTM, mapping.json and one gated
track per manifest speaker; and its Prefect task."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from prefect import task

from engine.base import ProgressHook, models_dir_from_env
from engine.media import MediaError, read_channels, write_wav
from tasks.diarise.embedded import EmbeddedDiariser, EmbeddedSettings, embed_clip
from tasks.diarise.naming import cluster_centroids, name_clusters
from tasks.diarise.pyannote_backend import PYANNOTE_PIPELINES, diarise_pyannote
from tasks.diarise.segmentation import checkpoint_identity
from tasks.diarise.turns import RATE, Turn, gate, merge_turns, to_16k, write_rttm, write_text_atomic
from tasks.separate import check_not_silent
from tasks.workspace import Blob, Workspace, stage_cache

log = logging.getLogger(__name__)

BACKENDS = ("auto", "embedded", "pyannote")
ORDERS = ("first-appearance", "most-speech")


@dataclass(frozen=True)
class SpeakerRef:
    id: str
    voice_sample: Path | None = None


@dataclass(frozen=True)
class Diarisation:
    rttm: Path
    tracks: dict[str, Path]
    mapping: dict[str, str]
    backend: str
    warnings: tuple[str, ...] = ()
    model: str = ""  # e.g. "silero-vad==6.2.3 + resemblyzer==0.1.4", or the pyannote pipeline


def resolve_diarise_backend(backend: str) -> tuple[str, str]:
    """Return (backend, why): `auto` prefers pyannote when it imports, else the embedded diariser."""
    if backend not in BACKENDS:
        raise ValueError(f"diarise backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend, f"{backend} requested"
    # pyannote's telemetry is on by default: turn it off before the first import
    os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
    try:
        import pyannote.audio  # noqa: F401
    except Exception as exc:  # a broken torchaudio raises OSError, not ImportError
        return "embedded", f"pyannote.audio unavailable ({type(exc).__name__}); using the embedded diariser"
    return "pyannote", "pyannote.audio is installed"


def diarise(
    vocals: Path,
    speakers: Sequence[SpeakerRef],
    out_dir: Path,
    *,
    backend: str = "auto",
    num_speakers: int | None = None,
    order: str = "first-appearance",
    pinned: dict[str, str] | None = None,
    progress: ProgressHook | None = None,
    pipeline: str = "community-1",
    models_dir: Path | None = None,
    settings: EmbeddedSettings | None = None,
    device: str = "cpu",
    uri: str | None = None,
    source_name: str | None = None,
    music_source: Path | None = None,
) -> Diarisation:
    """Diarise `vocals`, name the clusters after `speakers`, write RTTM, mapping.json and one track each.

    `uri` is the RTTM recording name (the episode id; default the file's stem); `source_name` is what
    errors call the input (the user's dialogue file, not a blob in the workspace store). `music_source` is
    the dialogue before separation, on the same timeline: where music plays is judged on it (separated
    vocals carry too little music to detect), for the music-split repair and the qc warning."""
    shown = Path(source_name or vocals)
    speakers = check_speakers(speakers, order, pinned, num_speakers)
    chosen, why = resolve_diarise_backend(backend)
    log.info("diarise %s: backend %s (%s)", shown, chosen, why)
    audio, rate = read_channels(Path(vocals))
    check_not_silent(audio, shown)
    notes: list[str] = []
    if audio.shape[0] > 1:
        notes.append(f"{shown.name}: {audio.shape[0]} channels downmixed to mono")
    mono = audio.mean(axis=0)
    wav16 = to_16k(mono, rate)
    music16 = music_audio(music_source, len(wav16)) if music_source is not None else wav16
    samples = {s.id: embed_clip(Path(s.voice_sample)) for s in speakers if s.voice_sample is not None}
    guided = not pinned and len(samples) == len(speakers)  # a partial set would force strangers onto them
    if chosen == "pyannote":
        turns = diarise_pyannote(wav16, num_speakers, pipeline=pipeline, models_dir=models_dir, device=device)
        voice = None
    else:
        voice = EmbeddedDiariser(settings or EmbeddedSettings(), models_dir=models_dir)
        anchors = np.stack([samples[s.id] for s in speakers]) if guided else None
        turns = voice.run(wav16, num_speakers=num_speakers, progress=progress, anchors=anchors, music=music16)
    if not turns:
        raise MediaError(f"{shown}: no speech found; check that this is the dialogue track")
    mapping, naming_notes = name_clusters(
        turns, speakers, order=order, pinned=pinned, centroids=voice.centroids if voice else None, wav16=wav16
    )
    notes += naming_notes
    named = sorted(
        (Turn(t.start, t.end, mapping[t.label]) for t in turns), key=lambda t: (t.start, t.end, t.label)
    )
    confidence = speaker_confidence(named, mapping, voice, speakers, samples, wav16)
    notes += reliability_warnings(named, confidence, speakers, None if voice and voice.guided else music16)
    for note in notes:
        log.warning("diarise: %s", note)
    record = {
        "backend": chosen,
        "model": PYANNOTE_PIPELINES.get(pipeline, pipeline)
        if chosen == "pyannote"
        else embedded_model_name(voice),
        "revision": PYANNOTE_PIPELINES.get(pipeline, pipeline) if chosen == "pyannote" else EMBEDDED_REVISION,
        "settings": {
            **(asdict(voice.settings) if voice else {"pipeline": pipeline}),
            "num_speakers": num_speakers,
            "order": order,
            "pinned": dict(pinned or {}),
            "enrolment_guided": voice is not None and voice.guided,
            "segmentation": segmentation_record(voice),
            "music_judged_on": "the dialogue before separation" if music_source is not None else "the input",
        },
        "mapping": mapping,
        "speakers": [s.id for s in speakers],
        "confidence": confidence,
        "warnings": notes,
    }
    return write_outputs(named, mono, rate, Path(out_dir), uri or Path(vocals).stem, record)


def music_audio(path: Path, length: int) -> np.ndarray:
    """`path` as 16 kHz mono of `length` samples (the vocals' timeline), for the music envelope."""
    audio, rate = read_channels(Path(path))
    wav16 = to_16k(audio.mean(axis=0), rate)[:length]
    return np.pad(wav16, (0, length - len(wav16)))


EMBEDDED_REVISION = (
    "embedded/4: pyannote/segmentation speech + overlapped speech (silero-vad without it), "
    "enrolment-guided k-means, blind spectral clustering + count-preserving split/merge, music-boundary check"
)
LOW_CONFIDENCE = 0.6  # cosine to the enrolment sample, or core share without one (speech-dev calibration)
MIN_SPEECH_S = 2.0


def speaker_confidence(
    named: list[Turn],
    mapping: dict[str, str],
    voice: EmbeddedDiariser | None,
    speakers: Sequence[SpeakerRef],
    samples: dict[str, np.ndarray],
    wav16: np.ndarray,
) -> dict[str, dict[str, float]]:
    """Per speaker: seconds of speech; cosine of the track's voice to its enrolment sample (when given);
    the core share of its clusters' windows (embedded backend); `confidence`, the lower of the two."""
    out: dict[str, dict[str, float]] = {}
    centroids = cluster_centroids([t for t in named if t.label in samples], wav16) if samples else {}
    for ref in speakers:
        speech = sum(t.end - t.start for t in merge_turns([t for t in named if t.label == ref.id]))
        entry: dict[str, float] = {"speech_s": round(speech, 2)}
        figures = []
        if ref.id in samples and ref.id in centroids:
            entry["similarity"] = round(float(centroids[ref.id] @ samples[ref.id]), 3)
            figures.append(entry["similarity"])
        stats = [voice.cluster_stats[c] for c, s in mapping.items() if s == ref.id] if voice else []
        stats = [st for st in stats if st]
        if stats:
            windows = sum(st["windows"] for st in stats)
            entry["core_share"] = round(sum(st["core_share"] * st["windows"] for st in stats) / windows, 3)
            figures.append(entry["core_share"])
        entry["confidence"] = round(min(figures), 3) if figures else 0.0
        out[ref.id] = entry
    return out


def reliability_warnings(
    named: list[Turn],
    confidence: dict[str, dict[str, float]],
    speakers: Sequence[SpeakerRef],
    wav16: np.ndarray,
) -> list[str]:
    """qc.json warnings: low confidence, under `MIN_SPEECH_S` of speech, a split that follows the music."""
    notes = []
    for ref in speakers:
        c = confidence[ref.id]
        if 0 < c["speech_s"] < MIN_SPEECH_S:
            notes.append(f"speaker {ref.id}: only {c['speech_s']:.1f} s of speech; its track is unreliable")
        elif c["speech_s"] and c["confidence"] < LOW_CONFIDENCE:
            notes.append(
                f"speaker {ref.id}: low diarisation confidence {c['confidence']:.2f} (< {LOW_CONFIDENCE}); "
                "check its track or give a voice_sample"
            )
    if wav16 is not None:
        notes += music_boundary_warnings(named, wav16)
    return notes


def music_boundary_warnings(named: list[Turn], wav16: np.ndarray, share: float = 0.7) -> list[str]:
    """Two speakers of whom one talks (almost) only while music plays and the other only without it:
    the clusters may have split one voice by the music rather than by who speaks."""
    from tasks.separate import music_presence

    music = music_presence(wav16, RATE)  # per 10 ms frame
    inside = {}
    for label in sorted({t.label for t in named}):
        frames = np.concatenate(
            [
                np.arange(int(t.start / 0.01), min(len(music), int(t.end / 0.01)))
                for t in named
                if t.label == label
            ]
        )
        if len(frames):
            inside[label] = float(music[frames].mean())
    notes = []
    for a in sorted(inside):
        for b in sorted(inside):
            if inside[a] >= share and inside[b] <= 1 - share:
                notes.append(
                    f"speakers {a} and {b}: {a} speaks {inside[a]:.0%} of the time under music, {b} "
                    f"{inside[b]:.0%}; the split may follow the music, not the voices; give voice samples"
                )
    return notes


def segmentation_record(voice: EmbeddedDiariser | None) -> dict | None:
    """Which speech-activity model decided: the segmentation checkpoint (path, sha256) or silero-vad."""
    if voice is None:
        return None
    seg = voice.segmenter()
    if seg is None:
        return {
            "model": "silero-vad",
            "why": "no pyannote/segmentation checkpoint found"
            if voice.settings.segmentation == "auto"
            else "settings",
        }
    return {
        "model": "pyannote/segmentation",
        "checkpoint": str(seg.ckpt.path),
        "identity": checkpoint_identity(voice.models_dir or models_dir_from_env()),
    }


def embedded_model_name(voice: EmbeddedDiariser | None = None) -> str:
    from importlib.metadata import PackageNotFoundError, version

    def pinned(package: str) -> str:
        try:
            return f"{package}=={version(package)}"
        except PackageNotFoundError:
            return package

    speech = (
        "pyannote/segmentation"
        if voice is not None and voice.segmenter() is not None
        else pinned("silero-vad")
    )
    return f"{speech} + {pinned('resemblyzer')}"


def use_given_tracks(tracks: dict[str, Path], out_dir: Path) -> Diarisation:
    """The manifest gives one track per speaker: skip diarisation, check the tracks share one timeline,
    and write the RTTM from each track's own speech (for subtitles and QC)."""
    if not tracks:
        raise ValueError("use_given_tracks needs at least one speaker track")
    turns, timeline = [], None
    for speaker, path in sorted(tracks.items()):
        audio, rate = read_channels(Path(path))
        if timeline is not None and timeline != (rate, audio.shape[1]):
            raise MediaError(
                f"{path}: speaker tracks must share one sample rate and length; got {rate} Hz x {audio.shape[1]} "
                f"samples, the first track has {timeline[0]} Hz x {timeline[1]}"
            )
        timeline = (rate, audio.shape[1])
        regions = EmbeddedDiariser(EmbeddedSettings()).speech_regions(to_16k(audio.mean(axis=0), rate))
        turns += [Turn(round(a, 3), round(b, 3), speaker) for a, b in regions]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rttm = write_rttm(out_dir / "diarisation.rttm", merge_turns(turns), "given")
    mapping = {s: s for s in sorted(tracks)}
    silent = tuple(
        f"speaker {s}: its track has no speech" for s in sorted(tracks) if s not in {t.label for t in turns}
    )
    return Diarisation(rttm=rttm, tracks=dict(tracks), mapping=mapping, backend="given", warnings=silent)


def check_speakers(
    speakers: Sequence[SpeakerRef], order: str, pinned: dict[str, str] | None, num_speakers: int | None = None
) -> list[SpeakerRef]:
    ids = [s.id for s in speakers]
    if not ids:
        raise ValueError("diarise needs at least one manifest speaker")
    if len(set(ids)) != len(ids):
        raise ValueError(f"speaker ids must be unique, got {ids}")
    if order not in ORDERS:
        raise ValueError(f"speaker order {order!r} is unknown; use one of {', '.join(ORDERS)}")
    if num_speakers is not None and not 1 <= num_speakers <= EmbeddedSettings().max_speakers:
        raise ValueError(
            f"num_speakers={num_speakers} must be between 1 and {EmbeddedSettings().max_speakers}"
        )
    unknown = sorted(set((pinned or {}).values()) - set(ids))
    if unknown:
        raise ValueError(f"pinned mapping names unknown speakers {unknown}; manifest speakers are {ids}")
    for ref in speakers:
        if ref.voice_sample is not None and not Path(ref.voice_sample).is_file():
            raise MediaError(f"speaker {ref.id}: voice_sample {ref.voice_sample} not found")
    return list(speakers)


def write_outputs(
    turns: list[Turn], mono: np.ndarray, rate: int, out_dir: Path, uri: str, record: dict
) -> Diarisation:
    """RTTM, one gated track per speaker in `record["speakers"]`, and `record` itself as mapping.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    merged = merge_turns(turns)
    rttm = write_rttm(out_dir / "diarisation.rttm", merged, uri)
    tracks = {}
    for speaker in record["speakers"]:
        gain = gate([(t.start, t.end) for t in merged if t.label == speaker], len(mono), rate)
        tracks[speaker] = write_wav(out_dir / f"{speaker}.wav", (mono * gain).astype(np.float32), rate)
    write_text_atomic(out_dir / "mapping.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
    return Diarisation(
        rttm=rttm,
        tracks=tracks,
        mapping=record["mapping"],
        backend=record["backend"],
        warnings=tuple(record["warnings"]),
        model=record["model"],
    )


@dataclass(frozen=True)
class DiarisedTracks:
    tracks: dict[str, Blob]
    rttm: Blob
    mapping: (
        Blob  # mapping.json: cluster -> speaker id (pin it with diarise.mapping), scores, backend, settings
    )
    backend: str
    warnings: tuple[str, ...]


def diarise_stage(
    ws: Workspace,
    vocals: Blob,
    speakers: list[tuple[str, Blob | None]],
    settings: dict,
    unseparated: Blob | None = None,
) -> DiarisedTracks:
    """Workspace form of `diarise`; `settings` holds the resolved backend, order rule and pinned mapping;
    `unseparated` is the dialogue before separation (music is judged on it)."""
    refs = [SpeakerRef(sid, ws.path(sample) if sample else None) for sid, sample in speakers]
    with ws.scratch() as tmp:
        result = diarise(
            ws.path(vocals),
            refs,
            tmp,
            backend=settings["backend"],
            num_speakers=len(refs),
            order=settings["order"],
            pinned=settings.get("mapping") or None,
            uri=settings.get("episode"),
            source_name=settings.get("source_name"),
            music_source=ws.path(unseparated) if unseparated is not None else None,
        )
        mapping = ws.put_file(tmp / "mapping.json")
        tracks = {sid: ws.put_file(path) for sid, path in result.tracks.items()}
        return DiarisedTracks(tracks, ws.put_file(result.rttm), mapping, result.backend, result.warnings)


diarise_task = task(
    diarise_stage,
    name="diarise",
    cache_policy=stage_cache("tasks.diarise.stage"),
    persist_result=True,
)
