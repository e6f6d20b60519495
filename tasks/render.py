"""render: one planned segment -> one video clip, through the chosen engine.

The segment's audio is cut per speaker first (`cut_segment_audio`), so a segment's cache
key depends only on the audio inside it: changing one line re-renders only the segments
that line falls in.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from prefect import task

from engine import gpu_state
from engine.base import AUDIO_RATE, Caption, PersonInput, ProgressHook, RenderJob
from engine.media import is_still, write_wav
from tasks.bind import boxes_for_segment, timed_boxes
from tasks.segment import SegmentSpec
from tasks.speakers import MIX_RATE, SAMPLES_PER_FRAME, load_track
from tasks.workspace import Blob, Workspace, artifact_key, stage_cache

CHAIN_PERSONS = 2  # persons the engine binds at once (its trained limit): a chain animates them all


@dataclass(frozen=True)
class PersonSpec:
    id: str
    name: str
    box: list | None  # the manifest's spec: [x0, y0, x1, y1] or [{from, to, box}, ...] (seconds)


@dataclass(frozen=True)
class RenderOptions:
    engine: str  # resolved: "preview" | "multitalk" | "infinitetalk"
    size: int
    steps: int
    seed: int
    prompt: str
    text_scale: float
    audio_scale: float
    chain: bool = False  # continue each segment from the previous one of its shot (render.chain)
    teacache: float | None = None  # TeaCache threshold (render.teacache), None: off
    teacache_warmup: int = 5
    # the engine's load-time switches (LoRAs, quantize, offload, attention, compile) as keyword pairs for its
    # factory; empty for the preview engine
    engine_settings: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True)
class Clip:
    segment: int
    video: Blob
    num_frames: int
    engine: str
    start_frame: int = 0  # on the episode's 25 fps grid
    crop: tuple[int, int, int, int] | None = (
        None  # source pixels the frames cover (x0, y0, x1, y1); None: all
    )
    persons: tuple[str, ...] = ()  # ids of the persons the engine animated (paste-back composites these)
    state: Blob | None = (
        None  # the engine's stream state after the last frame (render.chain: the next continues)
    )
    overlap: int = 0  # frames past the segment's end (num_frames includes them): the stitch crossfades them


def cut_segment_audio(
    ws: Workspace, tracks: dict[str, Blob], segments: list[SegmentSpec]
) -> list[dict[str, Blob]]:
    """Per segment, per speaker: that stretch of the track at the engines' 16 kHz."""
    import librosa

    out: list[dict[str, Blob]] = [{} for _ in segments]
    for speaker, blob in tracks.items():
        track = load_track(ws, blob)
        for i, seg in enumerate(segments):
            end = seg.end_frame + seg.overlap  # the overlap is driven by the next segment's audio
            piece = track[seg.start_frame * SAMPLES_PER_FRAME : end * SAMPLES_PER_FRAME]
            audio16 = librosa.resample(piece, orig_sr=MIX_RATE, target_sr=AUDIO_RATE, res_type="soxr_hq")
            with ws.scratch() as tmp:
                out[i][speaker] = ws.put_file(
                    write_wav(tmp / "seg.wav", audio16.astype(np.float32), AUDIO_RATE)
                )
    return out


def render_segment(
    ws: Workspace,
    segment: SegmentSpec,
    picture: Blob,
    audio: dict[str, Blob],
    persons: tuple[PersonSpec, ...],
    captions: tuple[tuple[float, float, str, int], ...],
    options: RenderOptions,
    previous: Blob | None = None,
) -> Clip:
    """Render one segment with the resolved engine; the clip has exactly segment.rendered_frames frames (its
    own and `segment.overlap` past its end, which the stitch crossfades into the next segment).

    With `options.chain` the engine's stream state is kept, and `previous` (the state of the segment before
    this one in its shot) makes the engine continue from it: the join is seamless, and a re-render of the
    previous segment changes this one's cache key.

    A video source is rendered video-to-video from its own frames: the engine reads the reference frames
    from `source_start_frame` on, through the exact 25 fps time map of engine.media.VideoFrames."""
    import soundfile as sf

    animated = engine_persons(persons, segment, options.engine, chain=options.chain)
    job_persons = tuple(
        PersonInput(
            sf.read(str(ws.path(audio[p.id])), dtype="float32")[0], _job_box(p.box, segment), p.name or p.id
        )
        for p in animated
    )
    with ws.scratch() as tmp:
        job = RenderJob(
            source=ws.path(picture),
            persons=job_persons,
            mode=job_mode(options.engine, ws.path(picture)),
            prompt=options.prompt,
            num_frames=segment.rendered_frames,
            source_start_frame=segment.start_frame,
            size=options.size,
            steps=options.steps,
            seed=options.seed,
            text_scale=options.text_scale,
            audio_scale=options.audio_scale,
            teacache=options.teacache,
            teacache_warmup=options.teacache_warmup,
            captions=_job_captions(captions, segment),
            output=tmp / f"seg{segment.index:04d}.mp4",
            continue_from=ws.path(previous) if previous is not None else None,
            state_output=tmp / "state.safetensors" if options.chain else None,
        )
        with gpu_state.using_renderer(
            options.engine, options.engine_settings
        ) as renderer:  # loaded once per worker (per engine settings), one job at a time
            result = renderer.render(job, progress=render_progress())
        video = ws.put_file(result.path)
        state = ws.put_file(job.state_output) if job.state_output and job.state_output.exists() else None
    crop = tuple(int(v) for v in result.crop) if result.crop is not None else None
    return Clip(
        segment.index,
        video,
        result.num_frames,
        options.engine,
        segment.start_frame,
        crop,
        tuple(p.id for p in animated),
        state,
        segment.overlap,
    )


PROGRESS_INTERVAL_S = 0.5  # each update is an API call
PROGRESS_STAGES = (
    "denoise",
    "render",
)  # the engines' long stage: denoising steps (MultiTalk), frames (preview)


def render_progress(clock=time.monotonic) -> ProgressHook | None:
    """A Prefect progress artifact for this segment's render (minutes on a GPU for a long segment), keyed
    after the task run (render[ep#03] -> render-ep-03) and updated at most twice a second from the engine's
    progress hook. None outside a task run: the engine then reports to nobody."""
    return task_progress("rendering", PROGRESS_STAGES, clock)


def task_progress(
    doing: str, stages: tuple[str, ...] = ("enhance",), clock=time.monotonic
) -> ProgressHook | None:
    """A progress hook for the running task's progress artifact, fed by `progress(stage, completed, total)`
    for the long `stages`; None outside a task run."""
    try:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact
        from prefect.runtime import task_run

        name = task_run.name
        if not name:
            return None
        artifact = create_progress_artifact(
            progress=0.0,
            key=artifact_key(name),
            description=f"{name}: {doing}",
        )
    except Exception:  # noqa: BLE001 - progress is a convenience; the render is the product
        return None
    last = [float("-inf")]  # the first update goes out at once

    def hook(stage: str, completed: int, total: int, **info: object) -> None:
        if stage not in stages or total <= 0:
            return
        now = clock()
        if completed < total and now - last[0] < PROGRESS_INTERVAL_S:
            return
        last[0] = now
        with contextlib.suppress(Exception):  # a lost update must not fail the render
            update_progress_artifact(artifact_id=artifact, progress=round(100 * completed / total, 1))

    return hook


def job_mode(engine: str, source: Path) -> str:
    """`infinitetalk` for a video source (V2V) and for the infinitetalk engine on a still (I2V); `multitalk`
    otherwise (the manifest refuses multitalk with a video before any stage runs)."""
    return "infinitetalk" if engine == "infinitetalk" or not is_still(source) else "multitalk"


def engine_persons(
    persons: tuple[PersonSpec, ...], segment: SegmentSpec, engine: str, *, chain: bool = False
) -> tuple[PersonSpec, ...]:
    """Who the engine animates: the preview shows everyone; MultiTalk binds the segment's speakers (at most
    its person limit, chosen by the planner), or the first person, silent, when nobody speaks. In a chain
    every person is animated in every segment when the engine can bind them all (a silent track is real
    audio), so consecutive segments keep the same persons and can continue one from the other."""
    if engine == "preview" or (chain and len(persons) <= CHAIN_PERSONS):
        return persons
    chosen = tuple(p for p in persons if p.id in segment.speakers)
    return chosen or persons[:1]


def chain_successors(
    segments: tuple[SegmentSpec, ...],
    shot_cuts: tuple[int, ...],
    persons: tuple[PersonSpec, ...],
    engine: str,
) -> dict[int, int]:
    """render.chain: segment index -> the index of the segment that continues from it. A segment continues
    the one that ends where it starts, in the same shot (no cut between: the picture would jump anyway),
    with the same animated persons (the engine's state carries one audio context per person)."""
    ordered = sorted(segments, key=lambda s: s.start_frame)
    cuts = set(shot_cuts)
    links = {}
    for before, after in zip(ordered, ordered[1:], strict=False):
        same_people = [p.id for p in engine_persons(persons, before, engine, chain=True)] == [
            p.id for p in engine_persons(persons, after, engine, chain=True)
        ]
        if before.end_frame == after.start_frame and after.start_frame not in cuts and same_people:
            links[before.index] = after.index
    return links


def _job_box(spec, segment: SegmentSpec):
    """A manifest box spec (seconds on the episode) -> the engine's box for this segment (frames in the segment)."""
    if spec is None:
        return None
    return boxes_for_segment(timed_boxes(spec), segment.start_frame, segment.end_frame)


def _job_captions(captions, segment: SegmentSpec) -> tuple[Caption, ...]:
    out = []
    for start_s, end_s, text, person in captions:
        start, end = (
            int(round(start_s * 25)) - segment.start_frame,
            int(round(end_s * 25)) - segment.start_frame,
        )
        if end > 0 and start < segment.rendered_frames:
            out.append(Caption(max(start, 0), min(end, segment.rendered_frames), text, person))
    return tuple(out)


def engine_roots(inputs: dict) -> tuple[str, ...]:
    """The module of the engine a render asks for (the registry's, or the DUBFLOW_ENGINE_OVERRIDES one):
    its code and everything it imports belong to that render's key, and no other engine's does."""
    from engine.base import engine_target
    from engine.gpu_state import engine_override

    name = inputs["options"].engine
    return ((engine_override(name) or engine_target(name)).partition(":")[0],)


cut_audio_task = task(
    cut_segment_audio, name="cut-audio", cache_policy=stage_cache("tasks.render"), persist_result=True
)
render_task = task(
    render_segment,
    name="render",
    cache_policy=stage_cache("tasks.render", roots_for=engine_roots),
    persist_result=True,
    retries=1,
    retry_delay_seconds=2,
)  # no tags: every tagged task run asks the server for tag concurrency slots, and on SQLite four renders
# starting at once hit "database is locked" (503), each waiting ~2 s to retry; GPUs are shared out by the
# render workers' resources (flows/workers.py), not by tag limits
