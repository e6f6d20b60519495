"""enhance: optional picture clean-up after stitching (and paste-back).

`none` passes the picture through untouched (the default). `ffmpeg` runs a filter chain built from the
manifest's enhance block: temporal deflicker, denoise (hqdn3d), sharpen (unsharp), scaling to the source's
resolution (a still rendered at the engine's 480p or 720p goes out at the still's own size), and an
optional interpolation to 50 fps (frame blending). Without interpolation every frame keeps its own
time, so a variable-rate picture stays so; with it the picture is constant 50 fps over the same span.
`spandrel` runs the user's upscaler / restorer weights (tasks/enhance_model.py): over the speakers'
regions only when the picture was pasted back (`regions`), else over the whole frame. A face restorer
(GFPGAN, RestoreFormer) runs on each speaker's aligned face there (tasks/face_restore.py); what it did
(faces restored, faces not found) is kept beside the picture for qc.json (`face_report`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from prefect import task

from engine.media import (
    MediaError,
    VideoFrames,
    count_video_frames,
    owner_tag,
    probe,
    run_ffmpeg,
    write_timed_video,
)
from tasks.pasteback import CRF, Regions, resize_frame
from tasks.render import Clip, PersonSpec
from tasks.workspace import Blob, Workspace, file_sha256, stage_cache

BACKENDS = ("none", "ffmpeg", "spandrel")
DENOISE = "hqdn3d=1.5:1.5:6:6"
SHARPEN = "unsharp=5:5:0.6:5:5:0.0"
DEFLICKER = "deflicker=size=5:mode=am"
INTERPOLATED_FPS = 50


@dataclass(frozen=True)
class EnhanceOptions:
    backend: str = "none"
    denoise: bool = True
    sharpen: bool = True
    deflicker: bool = False
    fps: int = 25  # 25: the picture's own frames and times; 50: interpolated
    size: tuple[int, int] | None = None  # scale to (width, height); None: keep the picture's size
    model: str | None = None  # spandrel: the weights file
    model_sha256: str | None = None  # ... and its content hash (part of the cache key)
    weight: float = 0.5  # face restorers: how much of the restored face goes in (0: none, 1: all of it)


@dataclass(frozen=True)
class PasteRegions:
    """Where paste-back composited the speakers (its own arguments): the spandrel backend works there only."""

    source: Blob  # the video paste-back started from: outside the regions the picture is its frames
    clips: tuple[Clip, ...]
    persons: tuple[PersonSpec, ...]
    feather_px: int = 16
    mask: str = "box"


def filter_chain(options: EnhanceOptions, picture_size: tuple[int, int]) -> str:
    """The ffmpeg -vf chain for `options` ("" when it would change nothing)."""
    steps = [DEFLICKER] * options.deflicker + [DENOISE] * options.denoise + [SHARPEN] * options.sharpen
    if options.size is not None and tuple(options.size) != tuple(picture_size):
        steps.append(f"scale={options.size[0]}:{options.size[1]}:flags=lanczos")
    if options.fps == INTERPOLATED_FPS:
        steps.append(f"framerate=fps={INTERPOLATED_FPS}")
    return ",".join(steps)


def expected_frames(options: EnhanceOptions, frames: int, seconds: float) -> int:
    """Frames after enhancing a picture of `frames` frames lasting `seconds`: interpolation (ffmpeg) makes it
    constant 50 fps over the same span."""
    if options.backend != "ffmpeg" or options.fps != INTERPOLATED_FPS:
        return frames
    return round(seconds * INTERPOLATED_FPS)


def enhance_picture(
    ws: Workspace, picture: Blob, options: EnhanceOptions | str, regions: PasteRegions | None = None
) -> Blob:
    if isinstance(options, str):
        options = EnhanceOptions(options)
    if options.backend not in BACKENDS:
        raise ValueError(f"enhance backend {options.backend!r} is unknown; use one of: {', '.join(BACKENDS)}")
    if options.backend == "none":
        return picture
    if options.backend == "spandrel":
        return _enhance_with_model(ws, picture, options, regions)
    path = ws.path(picture)
    info, frames, video = probe(path), count_video_frames(path), VideoFrames(path)
    chain = filter_chain(options, (info.width, info.height))
    if not chain:
        return picture
    width, height = options.size or (info.width, info.height)
    # 4:2:0 needs even sizes; paste-back keeps an odd-sized source's size in 4:4:4, and so does this
    pix_fmt = ["-pix_fmt", "yuv420p"] if width % 2 == 0 and height % 2 == 0 else []
    with ws.scratch() as tmp:
        out = tmp / "enhanced.mp4"
        run_ffmpeg(
            ["-i", str(path), "-vf", chain, "-c:v", "libx264", "-preset", "veryfast", "-crf", "18", *pix_fmt]
            + _timing(options, video.time_base)
            + ["-an", str(out)],
            what="enhance",
        )
        wanted = expected_frames(options, frames, video.duration)
        if count_video_frames(out) != wanted:
            raise MediaError(f"enhance wrote {count_video_frames(out)} frames, expected {wanted}")
        return ws.put_file(out)


def _enhance_with_model(
    ws: Workspace, picture: Blob, options: EnhanceOptions, regions: PasteRegions | None
) -> Blob:
    """The spandrel backend: every frame keeps its time; the regions only, or the whole frame at `size`."""
    import torch

    from tasks.enhance_model import enhanced_frames, load_model

    path = Path(options.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(path, options.model_sha256 or file_sha256(path), device)
    video = VideoFrames(ws.path(picture))
    size = options.size or (video.width * int(model.scale), video.height * int(model.scale))
    region_at, bases = None, None
    if regions is not None:
        paste = Regions(list(regions.clips), regions.persons, (video.width, video.height), regions.feather_px)
        shape, source = regions.mask, VideoFrames(ws.path(regions.source))
        if source.count != video.count:
            raise MediaError(f"the pasted picture has {video.count} frames, its source {source.count}")
        region_at = lambda i: paste.mask_at(int(video.grid25(i)), shape)  # noqa: E731
        bases = source.iter_frames()
    progress = _progress(video.count)
    counts = None
    if model.purpose == "FaceSR":
        from tasks.face_restore import FaceCounts, face_restored_frames
        from tasks.faces import mtcnn_face_detector

        counts, speakers_at = FaceCounts(), None
        if regions is not None:
            speakers_at = lambda i: _speakers(paste, int(video.grid25(i)))  # noqa: E731
        pictures, resized = video.iter_frames(), tuple(size) != (video.width, video.height)
        if regions is None and resized:  # the faces are restored at the size delivered
            pictures = ((i, resize_frame(frame, tuple(size))) for i, frame in pictures)
        frames = face_restored_frames(
            model,
            pictures,
            mtcnn_face_detector(),
            counts,
            region_at,
            speakers_at,
            bases,
            options.weight,
            progress,
        )
    else:
        frames = enhanced_frames(model, video.iter_frames(), size, region_at, bases, progress)
    timed = ((int(video.pts[i] - video.pts[0]), frame) for i, frame in frames)
    with ws.scratch() as tmp:
        out = tmp / "enhanced.mp4"
        written = write_timed_video(out, timed, video.time_base, rate=video.count / video.duration, crf=CRF)
        if written != video.count:
            raise MediaError(f"enhance wrote {written} frames, the picture has {video.count}")
        blob = ws.put_file(out)
    if counts is not None:  # beside the picture, whole or not at all
        report = _face_report_path(ws, blob)
        partial = report.with_name(f".{report.name}.tmp{owner_tag()}")  # swept if we are killed
        partial.write_text(json.dumps(counts.as_dict()))
        os.replace(partial, report)
    return blob


def _speakers(paste: Regions, frame25: int) -> list:
    """The animated persons in view at `frame25` and their boxes: whose faces the face restorer looks for."""
    clip = paste.clip_at(frame25)
    return [(p, box) for p in clip.persons if (box := paste.box_at(p, frame25)) is not None]


def _face_report_path(ws: Workspace, picture: Blob) -> Path:
    path = ws.path(picture)
    return path.with_name(path.name + ".faces.json")


def face_report(ws: Workspace, picture: Blob) -> dict | None:
    """What the face restorer did to make `picture` (None: no face restorer made it)."""
    path = _face_report_path(ws, picture)
    return json.loads(path.read_text()) if path.is_file() else None


def _progress(total: int):
    """Frames done -> the task's progress artifact (at most twice a second) and a log line every 10 %."""
    import logging

    from tasks.render import task_progress

    hook, log, step = task_progress("enhancing"), logging.getLogger("dubflow.enhance"), max(1, total // 10)

    def report(done: int) -> None:
        if hook is not None:
            hook("enhance", done, total)
        if done % step == 0 or done == total:
            log.info("enhance: %d/%d frames", done, total)

    return report


def _timing(options: EnhanceOptions, time_base) -> list[str]:
    if options.fps == INTERPOLATED_FPS:
        return ["-fps_mode", "cfr", "-r", str(INTERPOLATED_FPS)]
    return [
        "-fps_mode",
        "passthrough",  # every frame keeps its own time: a variable-rate picture stays so ...
        "-enc_time_base",
        str(time_base),  # ... in the input's own time base (the encoder's default 1/rate rounds
        "-video_track_timescale",  # the times away, and so would the mp4 track's)
        str(time_base.denominator),
    ]


enhance_task = task(
    enhance_picture,
    name="enhance",
    cache_policy=stage_cache("tasks.enhance"),
    persist_result=True,
)
