"""speakers: one track per manifest speaker, on the episode's common timeline.

Tracks come from the manifest (`speakers[].track`), from diarising the dialogue
(tasks/diarise.py) or from synthesising the script lines (tasks/tts.py, tasks/lines.py). Whatever the
origin, each track is conformed here to mono float at MIX_RATE and to exactly
`total_frames` frames of 25 fps, so every later stage can slice it by frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from prefect import task

from engine.base import FPS
from engine.media import VideoFrames, probe, read_whole_audio, write_wav
from tasks.workspace import Blob, Workspace, stage_cache

MIX_RATE = 48_000
SAMPLES_PER_FRAME = MIX_RATE // FPS  # 1920


@dataclass(frozen=True)
class Timeline:
    total_frames: int  # the engines' 25 fps grid over the episode
    source_frames: int | None = None  # a video source's own frames (any rate, VFR included); None: a still

    @property
    def total_samples(self) -> int:
        return self.total_frames * SAMPLES_PER_FRAME

    @property
    def seconds(self) -> float:
        return self.total_frames / FPS


def episode_timeline(
    ws: Workspace, source: Blob, source_kind: str, audio: list[Blob], extra_s: float = 0.0
) -> Timeline:
    """Episode length in 25 fps frames: the video's own duration (its frames' timestamps, any frame rate),
    else the longest audio (or last line)."""
    if source_kind == "video":
        video = VideoFrames(ws.path(source))
        return Timeline(video.num_frames25, video.count)
    longest = max([probe(ws.path(b)).duration for b in audio] + [extra_s])
    return Timeline(max(1, math.ceil(longest * FPS - 1e-6)))


def conform_track(ws: Workspace, audio: Blob, timeline: Timeline) -> Blob:
    """Decode to mono MIX_RATE float (refusing a truncated file), pad with silence or trim to the timeline."""
    samples = read_whole_audio(ws.path(audio), MIX_RATE)
    return _store_wav(ws, fit_length(samples, timeline.total_samples))


def fit_length(samples: np.ndarray, length: int) -> np.ndarray:
    out = np.zeros(length, dtype=np.float32)
    n = min(length, len(samples))
    out[:n] = samples[:n]
    return out


def _store_wav(ws: Workspace, samples: np.ndarray) -> Blob:
    with ws.scratch() as tmp:
        return ws.put_file(write_wav(tmp / "track.wav", samples, MIX_RATE))


def load_track(ws: Workspace, blob: Blob) -> np.ndarray:
    import soundfile as sf

    data, rate = sf.read(str(ws.path(blob)), dtype="float32")
    if rate != MIX_RATE:
        raise ValueError(f"{blob.relpath}: expected a conformed {MIX_RATE} Hz track, got {rate} Hz")
    return data


timeline_task = task(
    episode_timeline, name="timeline", cache_policy=stage_cache("tasks.speakers"), persist_result=True
)
conform_task = task(
    conform_track, name="conform", cache_policy=stage_cache("tasks.speakers"), persist_result=True
)
