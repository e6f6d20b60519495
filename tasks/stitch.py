"""stitch: the segment clips, in order, into one picture track with exactly the planned frames."""

from __future__ import annotations

from prefect import task

from engine.media import MediaError, count_video_frames, run_ffmpeg
from tasks.render import Clip
from tasks.workspace import Blob, Workspace, stage_cache


def stitch_clips(ws: Workspace, clips: list[Clip], total_frames: int) -> Blob:
    """Concatenate clips without re-encoding (identical codec settings), then check the frame count."""
    clips = sorted(clips, key=lambda c: c.segment)
    with ws.scratch() as tmp:
        listing = tmp / "clips.txt"
        listing.write_text("".join(f"file '{ws.path(c.video)}'\n" for c in clips))
        out = tmp / "picture.mp4"
        run_ffmpeg(
            [
                "-f",
                "concat",
                "-safe",
                "0",
                "-i",
                str(listing),
                "-c",
                "copy",
                "-an",
                "-movflags",
                "+faststart",
                str(out),
            ],
            what="stitch",
        )
        frames = count_video_frames(out)
        if frames != total_frames:
            raise MediaError(
                f"stitched picture has {frames} frames, the plan has {total_frames}; a clip is wrong"
            )
        return ws.put_file(out)


stitch_task = task(stitch_clips, name="stitch", cache_policy=stage_cache("tasks.stitch"), persist_result=True)
