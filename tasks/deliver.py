"""deliver: the finished mp4 (H.264 + AAC), stems, subtitles (SRT, WebVTT), qc.json and provenance.json."""

from __future__ import annotations

from dataclasses import dataclass

from prefect import task

from engine.base import FPS
from engine.media import VideoFrames, count_video_frames, probe, read_audio, run_ffmpeg
from tasks.qc import integrated_loudness, true_peak_dbtp
from tasks.remix import Mix
from tasks.speakers import MIX_RATE, Timeline
from tasks.workspace import Blob, Workspace, stage_cache


@dataclass(frozen=True)
class Delivery:
    mp4: Blob | None
    srt: Blob | None
    qc: Blob
    provenance: Blob
    stems: dict[str, Blob]
    verdict: str  # "pass" | "warn"
    vtt: Blob | None = None


def deliver(
    ws: Workspace,
    picture: Blob,
    mix: Mix,
    timeline: Timeline,
    captions: tuple,
    outputs: tuple[str, ...],
    qc_extra: dict,
    provenance: dict,
    target: dict,
    expected_frames: int | None = None,
) -> Delivery:
    """Mux the picture (copied, never re-encoded: a pasted-back video keeps every frame's own time) with
    the mix; `expected_frames`: the picture's planned frame count (default: the 25 fps timeline's)."""
    with ws.scratch() as tmp:
        out = tmp / "episode.mp4"
        # Picture and sound have the same length by construction; never -shortest (it truncates).
        run_ffmpeg(
            [
                "-i",
                str(ws.path(picture)),
                "-i",
                str(ws.path(mix.mix)),
                "-map",
                "0:v:0",
                "-map",
                "1:a:0",
                "-c:v",
                "copy",
                "-c:a",
                "aac",
                "-b:a",
                "192k",
                "-ar",
                str(MIX_RATE),
                "-movflags",
                "+faststart",
                str(out),
            ],
            what="deliver mp4",
        )
        qc = measure(out, timeline.total_frames if expected_frames is None else expected_frames) | qc_extra
        qc["verdict"] = verdict(qc, target)
        mp4 = ws.put_file(out) if "mp4" in outputs else None
    srt = ws.put_bytes(to_srt(captions).encode(), ".srt") if "srt" in outputs and captions else None
    vtt = ws.put_bytes(to_vtt(captions).encode(), ".vtt") if "vtt" in outputs and captions else None
    stems = {"dialogue": mix.dialogue} | ({"music_and_effects": mix.bed} if mix.bed else {})
    return Delivery(
        mp4,
        srt,
        ws.put_json(qc),
        ws.put_json(provenance),
        stems if "stems" in outputs else {},
        qc["verdict"],
        vtt,
    )


def measure(mp4, expected_frames: int) -> dict:
    """What the delivered file really holds: frames and durations (the picture's from its frames' own
    timestamps, at any frame rate), loudness of its decoded AAC audio."""
    info = probe(mp4)
    audio = read_audio(mp4, MIX_RATE)
    frames = count_video_frames(mp4)
    video_seconds = VideoFrames(mp4).duration
    return {
        "frames": frames,
        "expected_frames": expected_frames,
        "video_seconds": round(video_seconds, 4),
        "audio_seconds": len(audio) / MIX_RATE,
        "av_difference_seconds": round(len(audio) / MIX_RATE - video_seconds, 4),
        "container_seconds": info.duration,
        "loudness_lufs": round(integrated_loudness(audio, MIX_RATE), 2),
        "true_peak_dbtp": round(true_peak_dbtp(audio), 2),
    }


def verdict(qc: dict, target: dict) -> str:
    ok = (
        qc["frames"] == qc["expected_frames"]
        and abs(qc["av_difference_seconds"]) <= 1 / FPS
        and abs(qc["loudness_lufs"] - target["loudness_lufs"]) <= 1.0
        and qc["true_peak_dbtp"] <= target["true_peak_dbtp"] + 0.5  # AAC re-encoding may add a little
        and not (qc.get("lines") or {}).get("overruns")  # lines mode: a line that did not fit its slot
    )
    return "pass" if ok else "warn"


def to_srt(captions) -> str:
    """captions: (start_s, end_s, text, speaker_index) in any order -> SubRip text."""
    blocks = []
    for n, (start, end, text) in enumerate(_cues(captions), 1):
        blocks.append(f"{n}\n{_cue_time(start, ',')} --> {_cue_time(end, ',')}\n{text}\n")
    return "\n".join(blocks)


def to_vtt(captions) -> str:
    """captions: (start_s, end_s, text, speaker_index) in any order -> WebVTT text."""
    blocks = ["WEBVTT\n"]
    for n, (start, end, text) in enumerate(_cues(captions), 1):
        blocks.append(
            f"{n}\n{_cue_time(start, '.')} --> {_cue_time(end, '.')}\n{text.replace('-->', '->')}\n"
        )
    return "\n".join(blocks)


def _cues(captions) -> list[tuple[float, float, str]]:
    """Cues in time order; a blank line inside a text would end the cue early, so it is folded away, and
    a cue never ends before it starts."""
    out = []
    for start, end, text, _ in sorted(captions):
        body = "\n".join(row.strip() for row in str(text).strip().splitlines() if row.strip())
        out.append((start, max(end, start + 0.001), body))
    return out


def _cue_time(seconds: float, separator: str) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{separator}{ms:03d}"


deliver_task = task(
    deliver,
    name="deliver",
    cache_policy=stage_cache("tasks.deliver"),
    persist_result=True,
)
