"""enhance: optional picture clean-up after stitching (and paste-back).

`none` passes the picture through untouched (the default). `ffmpeg` runs a filter chain built from the
manifest's enhance block: temporal deflicker, denoise (hqdn3d), sharpen (unsharp), scaling to the source's
resolution (a still rendered at the engine's 480p or 720p goes out at the still's own size), and an
optional interpolation to 50 fps (frame blending). Without interpolation every frame keeps its own
time, so a variable-rate picture stays so; with it the picture is constant 50 fps over the same span.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefect import task

from engine.media import MediaError, VideoFrames, count_video_frames, probe, run_ffmpeg
from tasks.workspace import Blob, Workspace, stage_cache

BACKENDS = ("none", "ffmpeg")
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


def filter_chain(options: EnhanceOptions, picture_size: tuple[int, int]) -> str:
    """The ffmpeg -vf chain for `options` ("" when it would change nothing)."""
    steps = [DEFLICKER] * options.deflicker + [DENOISE] * options.denoise + [SHARPEN] * options.sharpen
    if options.size is not None and tuple(options.size) != tuple(picture_size):
        steps.append(f"scale={options.size[0]}:{options.size[1]}:flags=lanczos")
    if options.fps == INTERPOLATED_FPS:
        steps.append(f"framerate=fps={INTERPOLATED_FPS}")
    return ",".join(steps)


def expected_frames(options: EnhanceOptions, frames: int, seconds: float) -> int:
    """Frames after enhancing a picture of `frames` frames lasting `seconds`: interpolation makes it
    constant 50 fps over the same span."""
    if options.backend == "none" or options.fps != INTERPOLATED_FPS:
        return frames
    return round(seconds * INTERPOLATED_FPS)


def enhance_picture(ws: Workspace, picture: Blob, options: EnhanceOptions | str) -> Blob:
    if isinstance(options, str):
        options = EnhanceOptions(options)
    if options.backend not in BACKENDS:
        raise ValueError(f"enhance backend {options.backend!r} is unknown; use one of: {', '.join(BACKENDS)}")
    if options.backend == "none":
        return picture
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
