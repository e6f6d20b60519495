"""dub_episode: one manifest -> one dubbed episode, stage by stage (orchestration only).

Every stage is a cached Prefect task (tasks/*); this flow decides which stages apply,
runs them in order, fans the segment renders out, and records what was executed, what
came from the cache and what failed in the workspace's runs.jsonl.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import as_completed

from engine.base import FPS, engine_target, models_dir_from_env
from engine.media import DISK_FULL, MediaError, probe
from flows import heartbeats
from flows.api import is_api_gone
from flows.artifacts import publish_qc_table, publish_segment_table, segment_facts
from flows.memory_split import SplitPlanner, is_out_of_memory
from flows.placement import render_slot
from flows.progress import EpisodeProgress
from flows.resolve import detect_machine, resolve_run
from tasks.bind import bind_task
from tasks.conform import conform_picture_task
from tasks.deliver import Expected, deliver_task, deliverables_listing
from tasks.enhance import EnhanceOptions, PasteRegions, enhance_task, expected_frames, face_report
from tasks.manifest import LoadedManifest, Manifest, load_manifest
from tasks.pasteback import outside_psnr_task, pasteback_task
from tasks.remix import Ducking, MixTarget, remix_task
from tasks.render import PersonSpec, RenderOptions, chain_successors, cut_audio_task, render_task
from tasks.seams import seams_task
from tasks.segment import EpisodePlan, plan_task
from tasks.separate import resolve_separate_backend, separate_task, separation_settings, weights_revision
from tasks.speakers import MIX_RATE, conform_task, timeline_task
from tasks.stitch import stitch_task
from tasks.workspace import (
    Blob,
    DiskFull,
    Workspace,
    artifact_key,
    blobs_in,
    code_version,
    file_sha256,
)

heartbeats.install()  # flow runs end without waiting up to 1 s on the heartbeat thread


class SegmentsFailed(RuntimeError):
    def __init__(self, episode: str, failed: dict[int, str]):
        self.failed = failed
        listing = "; ".join(f"#{i}: {err}" for i, err in sorted(failed.items()))
        super().__init__(
            f"{episode}: {len(failed)} segment(s) failed ({listing}); fix and run `dubflow rerun`"
        )


class QcFailed(RuntimeError):
    """The episode was delivered, and a QC check failed (the manifest's qc.allow_fail lets it pass)."""

    def __init__(self, episode: str, failed: tuple[str, ...], qc_path: str, summary: dict):
        self.summary = summary
        super().__init__(
            f"{episode}: QC failed ({', '.join(failed)}); the package is delivered for inspection, see"
            f" {qc_path} (set qc: {{allow_fail: true}} in the manifest to accept it)"
        )


@dataclass
class StageRunner:
    """Runs cached stage tasks against one workspace and keeps the run's record."""

    ws: Workspace
    episode: str
    progress: EpisodeProgress
    stages: list[dict] = field(default_factory=list)
    extra_outputs: dict[str, Blob] = field(default_factory=dict)  # published beside the deliverables
    notes: list[str] = field(default_factory=list)  # warnings carried into qc.json
    planned: list[int] = field(default_factory=list)  # segment indices of the plan (status: pending ones)
    force_segments: frozenset[int] = frozenset()  # re-render these even when cached (`rerun --segments`)
    tts_backend: str | None = None  # lines mode: the backend that spoke the lines
    fitted: list = field(default_factory=list)  # lines mode: tasks.lines.FittedLine of every line
    journal: dict | None = None  # the run's record: rewritten after each stage, for `status` after a kill
    disk_full: DiskFull | None = None  # a segment render found the disk full (raised once the round settled)

    def bind(self, tsk, name: str | None = None):
        options: dict[str, Any] = {"result_storage": self.ws.results_dir}
        if name:
            options["task_run_name"] = name
        return tsk.with_options(**options)

    def run(self, tsk, label: str, *args: Any) -> Any:
        self.progress.begin(label)
        state = self.bind(tsk, label)(self.ws, *args, return_state=True)
        return self.settle(tsk, label, args, state)

    def settle(self, tsk, label: str, args: tuple, state) -> Any:
        """A state's result; a cached record whose blobs are gone or truncated is recomputed, never served."""
        if state.is_failed() or state.is_crashed():
            self.record(label, "failed", error=_error_text(state))
            try:
                state.result()  # raises the stage's own error
            except OSError as exc:
                if exc.errno in DISK_FULL:
                    raise DiskFull(label, exc, self.ws.root) from exc
                raise
        result = state.result()
        executed = state.name != "Cached"
        if not executed and not all(self.ws.has(b) for b in blobs_in(result)):
            result = self.bind(tsk, label).with_options(refresh_cache=True)(self.ws, *args)
            executed = True
        self.record(
            label, "executed" if executed else "cached", outputs=[b.relpath for b in blobs_in(result)]
        )
        return result

    def record(self, label: str, state: str, **info: Any) -> None:
        self.stages.append({"stage": label, "state": state, **info})
        if self.journal is not None:
            progress = {"stages": self.stages, "planned_segments": self.planned}
            self.ws.note_progress(self.episode, self.journal | progress)
        self.progress.step(label, state)  # last: its artifact update fails when the Prefect API is gone


@flow(name="dub-episode", log_prints=True)
def dub_episode(
    manifest: str,
    workspace: str | None = None,
    wait_s: float = 0.0,
    until: str | None = None,
    force_segments: list[int] | None = None,
) -> dict:
    """Dub one episode. `until="bind"` or `"plan"` stops after that stage (for `dubflow bind` / `dubflow plan`);
    `force_segments` re-renders those segments even when cached (`dubflow rerun --segments`)."""
    loaded = load_manifest(manifest, require_boxes=until != "bind")
    ws = Workspace(workspace)
    ws.check_writable()
    with ws.lock(loaded.manifest.episode, wait_s=wait_s):
        return _run_episode(loaded, ws, until, frozenset(force_segments or ()))


def _run_episode(
    loaded: LoadedManifest, ws: Workspace, until: str | None = None, force: frozenset[int] = frozenset()
) -> dict:
    m, log = loaded.manifest, get_run_logger()
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    progress = EpisodeProgress(m.episode, total_steps=8 + 2 * len(m.speakers))
    runner = StageRunner(ws, m.episode, progress, force_segments=force)
    record: dict[str, Any] = {"episode": m.episode, "manifest": str(loaded.path), "started": started}
    if until:  # a look ahead (`dubflow plan`, `dubflow bind`): not a run of the episode, so no record
        return _stages(loaded, ws, runner, log, until)
    for path in ws.sweep():
        log.info(f"removed scratch left by a killed run: {path}")
    if interrupted := ws.close_interrupted(m.episode):
        log.warning(
            f"the run started {interrupted.get('started')} was interrupted; its finished stages are reused"
        )
    runner.journal = record | {"pid": os.getpid()}
    ws.note_progress(m.episode, runner.journal | {"stages": [], "planned_segments": []})
    try:
        summary = _stages(loaded, ws, runner, log, until)
        runner.progress.finish()
        record |= {"state": "completed", **summary}
        return record
    except Exception as exc:
        error = exc
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:  # the flow's own writes: the inputs' ingest
            error = DiskFull("ingest (inputs into the store)", exc, ws.root)
        record |= {"state": "failed", "error": f"{type(error).__name__}: {error}"}
        if isinstance(exc, SegmentsFailed):
            record["failed_segments"] = sorted(exc.failed)
        if isinstance(exc, QcFailed):
            record |= exc.summary
        if error is not exc:
            raise error from exc
        raise
    finally:
        record |= {
            "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "stages": runner.stages,
            "planned_segments": runner.planned,
        }
        ws.append_run(m.episode, record)
        ws.end_progress(m.episode)


def _stages(loaded: LoadedManifest, ws: Workspace, runner: StageRunner, log, until: str | None) -> dict:
    m = loaded.manifest
    # 0. the manifest's choices on this machine, for every stage (refused here when they cannot run)
    run = resolve_run(m, loaded.source_info.kind, detect_machine(ws.root), models_dir_from_env())
    # 1. inputs into the store (content-addressed: a moved or touched file stays cached)
    original = source = ws.put_file(m.source, move=False)
    if loaded.source_info.kind == "video" and m.stitch.timestamps == "constant":
        source = runner.run(conform_picture_task, "conform-picture", source)  # VFR -> CFR; else itself
    dialogue = ws.put_file(m.audio.dialogue, move=False) if m.audio.dialogue else None
    # 2. separate: clean the dialogue, and get the music-and-effects bed
    backend, why = (
        ("none", "disabled in the manifest")
        if m.separate.backend == "none"
        else resolve_separate_backend(m.separate.backend, m.separate.model, models_dir_from_env())
    )
    log.info("separate: %s (%s)", backend, why)
    vocals, dub_instrumental = dialogue, None
    if dialogue is not None and not m.audio.clean and backend != "none":
        revision = weights_revision(backend, m.separate.model, models_dir_from_env())
        with _named_as(ws, dialogue, m.audio.dialogue):
            sep = runner.run(
                separate_task, "separate[dialogue]", dialogue, backend, m.separate.model, revision
            )
        vocals, dub_instrumental = sep.vocals, sep.instrumental
    bed = _bed(m, loaded, ws, runner, backend, dub_instrumental)
    # 3. speakers: one raw track per speaker (given, synthesised, or the single voice)
    raw = _raw_tracks(m, loaded, ws, runner, vocals, dialogue)
    timeline = runner.run(timeline_task, "timeline", source, loaded.source_info.kind, [*raw.values()])
    tracks = {sid: runner.run(conform_task, f"conform[{sid}]", blob, timeline) for sid, blob in raw.items()}
    # 4. bind: boxes checked against picture and voices, shot cuts, the contact sheet
    binding = runner.run(
        bind_task,
        "bind",
        source,
        tracks,
        {s.id: s.box_spec() for s in m.speakers},
        m.render.size,
    )
    _publish_contact_sheet(ws, runner, m.episode, binding)
    if until == "bind":
        return {"tracks": tracks, "source": source, "binding": binding}
    # 5. segment: a plan cut in common silences, at shot cuts, within the engine's memory
    engine, engine_why = run.engine, run.engine_why
    plan = runner.run(
        plan_task, "plan", tracks, timeline, run.plan, _line_specs(m, runner), binding.shot_cuts
    )
    if until == "plan":
        return {"plan": plan, "engine": engine, "settings": run}
    runner.progress.add_steps(len(plan.segments))
    runner.planned = [seg.index for seg in plan.segments]
    slices = runner.run(cut_audio_task, "cut-audio", tracks, list(plan.segments))
    # 6. render every segment (fanned out), 7. stitch, 8. enhance
    log.info("render: %s engine (%s), %d segments", engine, engine_why, len(plan.segments))
    clips, plan = _render_all(m, ws, runner, plan, slices, source, run.render, tracks, binding.shot_cuts)
    # colour-matched to the source plate (a video) or the first segment (a still); not the preview's overlays
    video = loaded.source_info.kind == "video"
    reference = source if video else None
    match = m.stitch.colour_match and engine != "preview"
    stitched = runner.run(stitch_task, "stitch", clips, timeline.total_frames, reference, match)
    picture = stitched.picture
    seams = _seam_qc(runner, engine, picture, clips)
    # 7b. a video source: the speakers pasted back onto its own frames, at its size and frame rate
    pasted, paste_qc = video and engine != "preview", None
    if pasted:
        runner.progress.add_steps(2)
        args = (source, picture, clips, _persons(m), m.render.composite, m.render.feather_px, m.render.mask)
        picture = runner.run(pasteback_task, "paste-back", *args)
    # 8. enhance: the spandrel backend works on the pasted regions only, and the outside PSNR is measured
    # after it; ffmpeg's filters cover the whole frame, so there it is measured on the paste-back itself
    enhance = enhance_options(m, loaded)
    pasted_back = pasted and m.render.composite == "paste_back"
    regions = (
        PasteRegions(source, tuple(clips), _persons(m), m.render.feather_px, m.render.mask)
        if pasted_back
        else None
    )
    enhanced = runner.run(enhance_task, "enhance", picture, enhance, regions)
    if pasted_back:
        measured = enhanced if enhance.backend == "spandrel" else picture
        psnr_args = (source, measured, clips, _persons(m), m.render.feather_px, m.render.mask)
        paste_qc = runner.run(outside_psnr_task, "paste-back-psnr", *psnr_args)
    picture = enhanced
    # 9. remix, 10. deliver. Diarised tracks share overlapped speech, so their sum would double it:
    # the dialogue stem is then the separated vocals themselves.
    diarised = vocals is not None and len(m.speakers) > 1 and not all(s.track for s in m.speakers)
    dialogue_stems = (
        [runner.run(conform_task, "conform[dialogue]", vocals, timeline)] if diarised else [*tracks.values()]
    )
    target = mix_target(m)
    mix = runner.run(remix_task, "remix", dialogue_stems, bed, timeline, target, tracks)
    transcript = _transcript(m, runner, mix.dialogue, log)
    captions = plan.captions or (transcript.captions if transcript else ())
    inputs = {"source": original, "dialogue": dialogue, "music_and_effects": bed, **raw}
    provenance = _provenance(
        m, loaded, run, inputs, {"separate": backend, "render": engine, "tts": runner.tts_backend}, plan
    )
    expected = Expected(
        expected_frames(
            enhance, timeline.source_frames if pasted else timeline.total_frames, timeline.seconds
        ),
        target.loudness_lufs,
        target.true_peak_dbtp,
        _line_specs(m, runner),
        max(probe(ws.path(b)).duration for b in [*raw.values(), *([dialogue] if dialogue else [])]),
        constant_rate=m.stitch.timestamps == "constant" or loaded.source_info.kind != "video",
    )
    if (faces := face_report(ws, enhanced)) is not None:  # what the face restorer did, beside its weights
        provenance["models"]["enhance"]["faces"] = {k: v for k, v in faces.items() if k != "missed_frames"}
    if faces is not None and faces["faces_missed"]:
        runner.notes.append(
            f"face restorer: no face found in {faces['faces_missed']} of {faces['speaker_frames']} speaker"
            " frames (left as they were; qc.json face_restore.missed_frames)"
        )
    qc_extra = {
        "segments": len(plan.segments),
        "forced_cuts": plan.forced_cuts,
        "engine": engine,
        "word_error_rate": transcript.wer if transcript else None,
        "seams": seams,
        "stitch_colour": stitched.colour,
        "paste_back": paste_qc,
        "notes": runner.notes,
    }
    if faces is not None:  # a face restorer: faces restored, faces not found
        qc_extra["face_restore"] = faces
    if runner.fitted:
        from tasks.lines import fit_report

        qc_extra["lines"] = fit_report(runner.fitted, m.tts.max_speed)
    args = (m.episode, picture, mix, timeline, captions, tuple(m.outputs), qc_extra, provenance, expected)
    delivery = runner.run(deliver_task, "deliver", *args)
    outputs = _publish(ws, m.episode, delivery, plan, runner.extra_outputs)
    publish_qc_table(m.episode, ws, delivery.qc)
    summary = {
        "outputs": outputs,
        "qc_verdict": delivery.verdict,
        "engine": engine,
        "frames": timeline.total_frames,
        "seconds": timeline.total_frames / FPS,
    }
    if delivery.verdict == "fail" and not m.qc.allow_fail:
        raise QcFailed(m.episode, delivery.failed, outputs["qc.json"], summary)
    return summary


def enhance_options(m: Manifest, loaded: LoadedManifest) -> EnhanceOptions:
    """The manifest's enhance block, with the source's size to scale to when asked."""
    e, info = m.enhance, loaded.source_info
    size = (info.width, info.height) if e.scale_to_source and info.width else None
    model = str(e.model) if e.backend == "spandrel" and e.model else None
    digest = file_sha256(Path(model)) if model else None
    weight = 0.5 if e.weight is None else e.weight
    return EnhanceOptions(e.backend, e.denoise, e.sharpen, e.deflicker, e.fps, size, model, digest, weight)


def mix_target(m: Manifest) -> MixTarget:
    """The manifest's mix block as the remix's target (the spec resolved to its figures)."""
    spec, lufs, peak = m.mix.target()
    duck = m.mix.duck
    ducking = Ducking(duck.depth_db, duck.attack_ms, duck.release_ms) if duck else None
    return MixTarget(lufs, peak, m.mix.bed_gain_db, spec, ducking)


def _seam_qc(runner: StageRunner, engine: str, picture: Blob, clips: list) -> dict | None:
    """How visible the joins of a lip-synced render are (tasks/seams.py), for qc.json; the preview's
    overlays have no seams worth measuring."""
    boundaries = tuple(sorted(clip.start_frame for clip in clips if clip.start_frame > 0))
    if engine == "preview" or not boundaries:
        return None
    try:
        import cv2  # noqa: F401 - the motion figure needs OpenCV (the bind extra)
    except ImportError:
        runner.notes.append("seams not measured: pip install -e '.[bind]' (OpenCV)")
        return None
    runner.progress.add_steps(1)
    report = runner.run(seams_task, "seams", picture, boundaries)
    return _json_safe(
        {
            "seams": len(report["seams"]),
            "colour_delta_e": {"mean": report["seam_mean"]["delta_e"], "max": report["seam_max"]["delta_e"]},
            "motion_px": {"mean": report["seam_mean"]["flow"], "max": report["seam_max"]["flow"]},
            "ratio_to_neighbours": report["ratio"],
            "per_seam": report["seams"],
        }
    )


def _json_safe(value):
    """NaN and infinity (a ratio over a still neighbourhood) as null: qc.json stays strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _transcript(m: Manifest, runner: StageRunner, dialogue: Blob, log):
    """Word-timed transcript for subtitles (no script lines) and the QC word error rate (script lines)."""
    if "srt" not in m.outputs and "vtt" not in m.outputs and not m.lines:
        return None
    from tasks.transcribe import embedded_model_path, resolve_transcribe_backend, transcribe_task

    backend, why = resolve_transcribe_backend("auto")
    try:
        if backend == "faster-whisper":
            embedded_model_path()  # raises when the asr extra is missing
    except Exception as exc:  # noqa: BLE001 - transcription is optional: say why and go on
        runner.notes.append(f"no transcript: {exc}")
        log.warning("transcribe skipped: %s", exc)
        return None
    log.info("transcribe: %s (%s)", backend, why)
    script = " ".join(line.text for line in m.lines)
    return runner.run(transcribe_task, "transcribe", dialogue, m.language, backend, script)


def _bed(m: Manifest, loaded: LoadedManifest, ws: Workspace, runner: StageRunner, backend: str, dub_instr):
    if m.audio.music_and_effects:
        return ws.put_file(m.audio.music_and_effects, move=False)
    original = m.audio.original or (m.source if loaded.source_info.has_audio else None)
    if original is not None and backend != "none":
        revision = weights_revision(backend, m.separate.model, models_dir_from_env())
        sep = runner.run(
            separate_task,
            "separate[original]",
            ws.put_file(original, move=False),
            backend,
            m.separate.model,
            revision,
        )
        return sep.instrumental
    return dub_instr


def _raw_tracks(
    m: Manifest,
    loaded: LoadedManifest,
    ws: Workspace,
    runner: StageRunner,
    vocals: Blob | None,
    dialogue: Blob | None = None,
) -> dict[str, Blob]:
    if all(s.track for s in m.speakers):
        return {s.id: ws.put_file(s.track, move=False) for s in m.speakers}
    if vocals is None:  # lines mode: synthesise every line, fit them to the scene, one track per speaker
        return _spoken_lines(m, loaded, ws, runner)
    if len(m.speakers) == 1:
        return {m.speakers[0].id: vocals}
    return _diarised(m, ws, runner, vocals, dialogue)


def _diarised(
    m: Manifest, ws: Workspace, runner: StageRunner, vocals: Blob, dialogue: Blob | None = None
) -> dict[str, Blob]:
    """Diarise the separated vocals; music is judged on the dialogue before separation (the vocals have
    too little of it left for the music-split repair and warning to see)."""
    from engine.base import models_dir_from_env
    from tasks.diarise import diarise_task, resolve_diarise_backend
    from tasks.diarise.segmentation import checkpoint_identity

    backend, why = resolve_diarise_backend(m.diarise.backend)
    get_run_logger().info("diarise: %s (%s)", backend, why)
    settings = m.diarise.model_dump() | {"backend": backend, "episode": m.episode}
    settings["segmentation"] = checkpoint_identity(models_dir_from_env())  # a new checkpoint re-runs it
    with _named_as(ws, vocals, m.audio.dialogue):
        unseparated = dialogue if dialogue is not None and dialogue != vocals else None
        result = runner.run(diarise_task, "diarise", vocals, _speaker_refs(m, ws), settings, unseparated)
    runner.extra_outputs |= {"diarisation.rttm": result.rttm, "speaker-mapping.json": result.mapping}
    runner.notes += list(result.warnings)
    return result.tracks


@contextlib.contextmanager
def _named_as(ws: Workspace, blob: Blob, user_file: Path | None):
    """A media error about a stored blob names the user's own file instead (the store's hashed path
    means nothing to them)."""
    try:
        yield
    except MediaError as exc:
        if user_file is None or str(ws.path(blob)) not in str(exc):
            raise
        raise MediaError(str(exc).replace(str(ws.path(blob)), str(user_file))) from None


def _speaker_refs(m: Manifest, ws: Workspace) -> list[tuple[str, Blob | None]]:
    return [(s.id, ws.put_file(s.voice_sample, move=False) if s.voice_sample else None) for s in m.speakers]


def _spoken_lines(m: Manifest, loaded: LoadedManifest, ws: Workspace, runner: StageRunner) -> dict[str, Blob]:
    """Every line is its own cached stage (text, voice, speed, backend revision): editing one line speaks that
    line again and nothing else. Then the timing fit (tasks/lines.py), lines.json, and one track per speaker."""
    from tasks.lines import ScriptLine, assemble_task, fit_script
    from tasks.tts import backend_revision, choose_voice, line_revision, resolve_tts_backend, tts_line_task

    models = models_dir_from_env()
    requests = [m.line_voice_request(i) for i in range(len(m.lines))]
    backend, why = resolve_tts_backend(m.tts.backend, models, requests)
    get_run_logger().info("tts: %s (%s), %d lines", backend, why, len(m.lines))
    revision = backend_revision(backend, models)
    episode_end = loaded.source_info.duration if loaded.source_info.kind == "video" else None
    script = [ScriptLine(i, ln.speaker, ln.start, ln.end, ln.text) for i, ln in enumerate(m.lines)]
    voices = {i: choose_voice(backend, *m.line_voice_request(i), models) for i in range(len(m.lines))}
    runner.progress.add_steps(len(m.lines))

    def speak(i: int, factor: float):
        label = f"tts[line {i}]" if factor == 1.0 else f"tts[line {i} @{factor:g}x]"
        speed = round(m.tts.speed * (m.lines[i].speed or 1.0) * factor, 4)
        args = (m.lines[i].text, voices[i], speed, line_revision(revision, voices[i]), MIX_RATE)
        return runner.run(tts_line_task, label, *args, str(models) if models else None)

    fitted, spoken = fit_script(
        script, speak, max_speed=m.tts.max_speed, conversation=m.tts.conversation, episode_end=episode_end
    )
    runner.tts_backend, runner.fitted = backend, fitted
    for f in fitted:
        if f.overrun_s > 1e-6:
            runner.notes.append(
                f"line {f.index} ({f.speaker}) does not fit at {m.tts.max_speed:g}x: it runs {f.overrun_s:.2f} s "
                + (
                    "past the end of the video"
                    if episode_end and f.end > episode_end
                    else "into the next line"
                )
            )
    record = {
        "backend": backend,
        "revision": revision,
        "lines": [f.as_json() | {"voice": voices[f.index].name} for f in fitted],
    }
    runner.extra_outputs["lines.json"] = ws.put_json(record)
    return {
        s.id: runner.run(
            assemble_task,
            f"tts[{s.id}]",
            tuple((f.start, spoken[f.index].audio) for f in fitted if f.speaker == s.id),
            MIX_RATE,
        )
        for s in m.speakers
    }


def _line_specs(m: Manifest, runner: StageRunner) -> tuple:
    """Subtitle lines (start, end|None, text, speaker index): where lines mode really spoke them, else as written."""
    order = {s.id: i for i, s in enumerate(m.speakers)}
    if runner.fitted:
        return tuple((f.start, f.end, f.text, order[f.speaker]) for f in runner.fitted)
    return tuple((ln.start, ln.end, ln.text, order[ln.speaker]) for ln in m.lines)


def _publish_contact_sheet(ws: Workspace, runner: StageRunner, episode: str, binding) -> None:
    """The contact sheet beside the outputs and as a Prefect image artifact (a data: URI renders in the UI)."""
    import base64

    runner.extra_outputs["contact-sheet.png"] = binding.contact_sheet
    runner.notes += list(binding.warnings)
    try:
        from prefect.artifacts import create_image_artifact

        data = base64.b64encode(ws.path(binding.contact_sheet).read_bytes()).decode()
        create_image_artifact(
            image_url=f"data:image/png;base64,{data}",
            key=artifact_key(episode, "contact-sheet"),
            description=f"{episode}: who is bound where, and when each voice speaks",
        )
    except Exception as exc:  # noqa: BLE001 - the PNG is on disk either way
        get_run_logger().warning("contact sheet artifact not published: %s", exc)


def _persons(m: Manifest) -> tuple[PersonSpec, ...]:
    return tuple(PersonSpec(s.id, s.name or s.id, s.box_spec()) for s in m.speakers)


def _render_all(
    m,
    ws: Workspace,
    runner: StageRunner,
    plan,
    slices,
    source: Blob,
    base: RenderOptions,
    tracks,
    shot_cuts=(),
) -> tuple[list, EpisodePlan]:
    """Render every segment on the render workers; one that runs out of memory is split and its halves
    rendered instead (as many rounds as it takes). Clips come back in picture order, with the plan as
    rendered: after a split, its segments carry `split_from` and the "split" flag. With render.chain the
    segments of a shot render in order, each continuing from the one before (halves of a split do not)."""
    jobs, clips, failed = list(zip(plan.segments, slices, strict=True)), {}, {}
    links = chain_successors(plan.segments, tuple(shot_cuts), _persons(m), base.engine) if base.chain else {}
    splitter: SplitPlanner | None = None
    while jobs:
        out_of_memory = _render_round(m, ws, runner, plan, jobs, source, base, clips, failed, links)
        if out_of_memory and splitter is None:
            splitter = SplitPlanner(ws, plan.plan, tracks, m.render.overlap_frames)
        jobs = _split_round(runner, splitter, out_of_memory, tracks, failed) if out_of_memory else []
        links = {}
    publish_segment_table(m.episode, runner.stages)
    if runner.disk_full is not None:  # not the segments' fault: free space and `dubflow run` again
        raise runner.disk_full
    if failed:
        raise SegmentsFailed(m.episode, failed)
    ordered = [clips[start] for start in sorted(clips)]
    if splitter is not None:
        plan = splitter.rendered(plan)
    return [dataclasses.replace(clip, segment=i) for i, clip in enumerate(ordered)], plan  # stitch order


def _render_round(
    m, ws, runner: StageRunner, plan, jobs, source, base, clips: dict, failed: dict, links: dict[int, int]
) -> list:
    """Submit `jobs` largest first, settle each as it finishes; returns the segments that ran out of memory.
    A segment that continues another (`links`: index -> next index) is submitted when that one is done."""
    persons, calls, out_of_memory = _persons(m), {}, []  # calls: id(future) -> (future, label, args)
    waiting = set(links.values())  # chained segments wait for their predecessor
    by_index = {seg.index: (seg, audio) for seg, audio in jobs}

    def submit(seg, audio, previous: Blob | None) -> None:
        label = f"render[{m.episode}#{seg.index:02d}]"
        options = _segment_options(base, m, seg.index)
        args = (seg, source, audio, persons, plan.captions_for(seg), options, previous)
        tsk = runner.bind(render_task, label).with_options(retry_condition_fn=_retry_if_transient)
        if seg.index in runner.force_segments:
            tsk = tsk.with_options(refresh_cache=True)
        runner.progress.begin(label)
        with render_slot(seg.rendered_frames):
            future = tsk.submit(ws, *args)
        calls[id(future)] = (future, label, args)

    for seg, audio in sorted(jobs, key=lambda job: -job[0].num_frames):
        if seg.index not in waiting:
            submit(seg, audio, None)
    while calls:
        future = next(iter(as_completed([f for f, _, _ in calls.values()])))
        _, label, args = calls.pop(id(future))
        seg = args[0]
        future.wait()  # done, but its final state is only fetched by wait()
        clip = None
        try:
            clip = runner.settle(render_task, label, args, future.state)
            clips[seg.start_frame] = clip
        except Exception as exc:  # noqa: BLE001 - one bad segment must not hide the others' results
            if is_api_gone(exc):  # not the segment's fault: the run stops, `dubflow run` resumes it
                raise
            if isinstance(exc, DiskFull):  # the others are settled first; then the run fails with it
                runner.disk_full = runner.disk_full or exc
            if is_out_of_memory(exc):
                out_of_memory.append((seg, exc))
            else:
                failed[seg.index] = f"{type(exc).__name__}: {exc}"
        runner.stages[-1] |= segment_facts(seg, future)
        if seg.index in links:
            _continue_chain(links, seg.index, clip, by_index, submit, failed)
    return out_of_memory


def _continue_chain(links: dict[int, int], index: int, clip, by_index: dict, submit, failed: dict) -> None:
    """Submit the segment that continues `index`; when `index` produced no clip, the rest of its chain
    renders from scratch (an out-of-memory split is rendered in halves, unchained) or fails with it."""
    after = links[index]
    if clip is not None:
        submit(*by_index[after], clip.state)
    elif index in failed:
        while after is not None:
            failed[after] = f"not rendered: segment #{index} before it in its chain failed"
            after = links.get(after)
    else:
        submit(*by_index[after], None)


def _split_round(runner: StageRunner, splitter, out_of_memory: list, tracks, failed: dict) -> list:
    """The planner's split path: each out-of-memory segment cut in two; returns the halves to render."""
    halves = []
    for seg, exc in sorted(out_of_memory, key=lambda item: item[0].index):  # same ids every run: cacheable
        try:
            halves += splitter.split(seg.index)
        except ValueError as why:
            failed[seg.index] = f"{type(exc).__name__}: {exc} ({why})"
            continue
        record = next(s for s in reversed(runner.stages) if s["stage"].endswith(f"#{seg.index:02d}]"))
        record |= {"state": "split", "split_into": [h.index for h in halves[-2:]]}
    if not halves:
        return []
    label = "cut-audio[" + ",".join(str(h.index) for h in halves) + "]"
    slices = runner.run(cut_audio_task, label, tracks, halves)
    return list(zip(halves, slices, strict=True))


def _retry_if_transient(task, task_run, state) -> bool:
    """A transient failure is retried on the spot. Not retried: out of memory (the split path takes it), and what
    fails the same way again: bad input (ValueError: JobError, ManifestError, MediaError, BindingError) and a
    machine without what the engine needs (EngineSetupError: MissingWeightsError, EncodeError)."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - deciding on the error is the point
        fails_again = {cls.__name__ for cls in type(exc).__mro__} & {"ValueError", "EngineSetupError"}
        return (
            not is_out_of_memory(exc) and not fails_again
        )  # by name: it may have crossed a process boundary
    return True


def _segment_options(base: RenderOptions, m: Manifest, index: int) -> RenderOptions:
    """The manifest's per-segment overrides (render.overrides: {7: {seed: 11}}) on top of its render settings."""
    override = m.render.overrides.get(index)
    if override is None:
        return base
    return dataclasses.replace(base, **override.model_dump(exclude_none=True))


def _provenance(m: Manifest, loaded: LoadedManifest, run, inputs: dict, backends: dict, plan) -> dict:
    """Everything needed to reproduce the delivery: input hashes, the settings as given and as resolved on
    this machine, backends and model revisions, seeds, and the software that ran."""
    models = models_dir_from_env()
    return {
        "episode": m.episode,
        "manifest": {"path": str(loaded.path), "sha256": file_sha256(loaded.path)},
        "settings": m.model_dump(mode="json"),
        "resolved": _json_safe(json.loads(json.dumps(dataclasses.asdict(run), default=str))),
        "mix_target": dataclasses.asdict(mix_target(m)),
        "backends": {
            **backends,
            "diarise": _diarise_backend(m),
            "enhance": m.enhance.backend,
        },
        "models": {
            "models_dir": str(models) if models else None,
            "enhance": _enhance_model(m),
            "render": engine_weights(run.engine, models),
            "separate": weights_revision(backends["separate"], m.separate.model, models)
            if backends["separate"] != "none"
            else None,
            "separate_settings": separation_settings(backends["separate"]),
        },
        "seeds": {
            "render": m.render.seed,
            "segments": {str(i): o.seed for i, o in m.render.overrides.items() if o.seed is not None},
        },
        "inputs": {name: blob.sha256 for name, blob in inputs.items() if blob is not None},
        "plan": plan.plan.sha256,
        "code": {
            **{
                name: code_version(name)
                for name in ("tasks.render", "tasks.pasteback", "tasks.remix", "tasks.deliver")
            },
            f"engine:{run.engine}": code_version(engine_target(run.engine).partition(":")[0]),
        },
        "software": software_versions(),
    }


def _enhance_model(m: Manifest) -> dict | None:
    """The spandrel backend's weights: file, content hash, architecture, purpose and scale."""
    if m.enhance.backend != "spandrel" or m.enhance.model is None:
        return None
    from tasks.enhance_model import check_model

    return dataclasses.asdict(check_model(m.enhance.model))


def engine_weights(engine: str, models: Path | None) -> dict | str:
    """The files the engine loaded (a Hugging Face snapshot path names its revision), or why there are none."""
    if engine not in ("multitalk", "infinitetalk"):
        return f"{engine}: no weights"
    from engine.multitalk.settings import EngineSettings
    from engine.multitalk.weights import resolve_weights

    try:
        paths = resolve_weights(EngineSettings(models_dir=models, product=engine))
    except Exception as exc:  # noqa: BLE001 - a tiny test engine or missing weights: say which
        return f"{engine}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return _json_safe(json.loads(json.dumps(dataclasses.asdict(paths), default=str)))


def software_versions() -> dict[str, str | None]:
    """Python, the packages that shape the picture and the sound, and the ffmpeg binary."""
    import importlib.metadata
    import platform
    import subprocess

    from engine.media import ffmpeg_exe

    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("dubflow", "numpy", "scipy", "torch", "av", "pyloudnorm", "prefect", "soundfile"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    first = subprocess.run([ffmpeg_exe(), "-version"], capture_output=True, text=True).stdout.splitlines()
    versions["ffmpeg"] = first[0] if first else None
    return versions


def _diarise_backend(m: Manifest) -> str:
    """What made the speaker tracks: the diarise backend only when the dialogue was diarised."""
    if all(s.track for s in m.speakers):
        return "given tracks"
    if not m.audio.dialogue or len(m.speakers) == 1:
        return "none"
    from tasks.diarise import resolve_diarise_backend

    return resolve_diarise_backend(m.diarise.backend)[0]


def _publish(ws: Workspace, episode: str, delivery, plan, extra: dict[str, Blob]) -> dict[str, str]:
    """Readable links under episodes/<episode>/out/, deliverables.json listing them with their hashes (also
    a Prefect artifact), and a link artifact to the finished mp4."""
    named = {**delivery.files, "plan.json": plan.plan, **extra}
    listing = deliverables_listing(episode, named, delivery.verdict)
    named["deliverables.json"] = ws.put_json(listing)
    outputs = {name: str(ws.link(episode, name, blob)) for name, blob in named.items()}
    try:
        from prefect.artifacts import create_link_artifact, create_table_artifact

        create_table_artifact(
            key=artifact_key(episode, "deliverables"),
            table=[{"file": k, **v} for k, v in listing["files"].items()],
            description=f"{episode}: the delivered package (QC {delivery.verdict}), deliverables.json",
        )
        if f"{episode}.mp4" in outputs:
            create_link_artifact(
                key=artifact_key(episode, "output"),
                link=Path(outputs[f"{episode}.mp4"]).as_uri(),
                link_text=f"{episode}.mp4",
            )
    except Exception:  # noqa: BLE001, S110 - an artifact is a convenience, the files are the product
        pass
    return outputs


def _error_text(state) -> str:
    return (state.message or state.name or "failed").strip()[:500]
