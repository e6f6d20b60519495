"""conform: a variable-frame-rate video source made constant-rate at its nominal rate, before any stage
reads its picture.

A broadcast deliverable has a constant frame rate and constant timestamps, and paste-back keeps every
source frame at its own time: so a VFR source (a phone recording, a screen capture) is conformed first.
The frames are re-timed in their own pixel format (no RGB round trip). Its nominal rate is its header's rate when that is a standard one (VideoFrames.nominal_rate); frame k of
the conformed picture, at k / rate s, is the source frame nearest that instant (a frame repeated where the
source lingered, one dropped where it hurried), the rule engine.media uses for the 25 fps grid. The
source's sound is not touched (the stages that need it read the source file itself).

`stitch.timestamps: keep` skips this: the picture then keeps the source's own timestamps, VFR included.
"""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction

import numpy as np
from prefect import task

from engine.media import MediaError, VideoFrames, write_timed_video
from tasks.workspace import Blob, Workspace, stage_cache

CRF = (
    0  # lossless: paste-back encodes the picture once more, and outside the speakers it must stay the source
)


def conform_picture(ws: Workspace, source: Blob) -> Blob:
    """`source` itself when its frames are already evenly timed, else its picture at constant frame rate."""
    video = VideoFrames(ws.path(source))
    if video.is_constant_rate:
        return source
    rate = video.nominal_rate
    count = max(1, round(video.duration * rate))
    with ws.scratch() as tmp:
        out = tmp / "conformed.mp4"
        frames = constant_rate_frames(video, rate, count, decoded=True)  # never through RGB
        written = write_timed_video(out, frames, 1 / rate, rate=float(rate), crf=CRF, preset="veryfast")
        if written != count:
            raise MediaError(f"conform wrote {written} frames, expected {count}")
        return ws.put_file(out)


def constant_rate_frames(
    video: VideoFrames, rate: Fraction, count: int, *, decoded: bool = False
) -> Iterator[tuple[int, np.ndarray]]:
    """(k, frame) for k in 0..count-1: the source frame nearest k / rate s, decoded forward only (as RGB
    arrays, or with `decoded` as PyAV frames in the file's own pixel format)."""
    wanted = np.atleast_1d(video.nearest_index(np.arange(count) / float(rate)))
    frames = video.iter_decoded() if decoded else video.iter_frames()
    at, current = -1, None
    for k, index in enumerate(wanted):
        while at < index:  # nearest-in-time never goes back
            at, current = next(frames)
        yield k, current


conform_picture_task = task(
    conform_picture, name="conform-picture", cache_policy=stage_cache("tasks.conform"), persist_result=True
)
