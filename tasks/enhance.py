"""enhance: optional picture clean-up after stitching.

`none` passes the picture through untouched (the default); `ffmpeg` applies a light
denoise + sharpen (hqdn3d, unsharp), re-encoded at the same frame count.
"""

from __future__ import annotations

from prefect import task

from engine.media import MediaError, VideoFrames, count_video_frames, probe, run_ffmpeg
from tasks.workspace import Blob, Workspace, stage_cache

FILTERS = {"ffmpeg": "hqdn3d=1.5:1.5:6:6,unsharp=5:5:0.6:5:5:0.0"}


def enhance_picture(ws: Workspace, picture: Blob, backend: str) -> Blob:
    if backend == "none":
        return picture
    if backend not in FILTERS:
        raise ValueError(f"enhance backend {backend!r} is unknown; use one of: none, {', '.join(FILTERS)}")
    frames = count_video_frames(ws.path(picture))
    info = probe(ws.path(picture))
    time_base = VideoFrames(ws.path(picture)).time_base
    # 4:2:0 needs even sizes; paste-back keeps an odd-sized source's size in 4:4:4, and so does this
    pix_fmt = ["-pix_fmt", "yuv420p"] if info.width % 2 == 0 and info.height % 2 == 0 else []
    with ws.scratch() as tmp:
        out = tmp / "enhanced.mp4"
        run_ffmpeg(
            [
                "-i",
                str(ws.path(picture)),
                "-vf",
                FILTERS[backend],
                "-c:v",
                "libx264",
                "-preset",
                "veryfast",
                "-crf",
                "18",
                *pix_fmt,
                "-fps_mode",
                "passthrough",  # every frame keeps its own time: a variable-rate picture stays so ...
                "-enc_time_base",
                str(time_base),  # ... in the input's own time base (the encoder's default 1/rate rounds
                "-video_track_timescale",  # the times away, and so would the mp4 track's)
                str(time_base.denominator),
                "-an",
                str(out),
            ],
            what="enhance",
        )
        if count_video_frames(out) != frames:
            raise MediaError("enhance changed the number of frames")
        return ws.put_file(out)


enhance_task = task(
    enhance_picture,
    name="enhance",
    cache_policy=stage_cache("tasks.enhance"),
    persist_result=True,
)
