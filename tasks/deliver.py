"""deliver: the finished package: mp4 (H.264 + AAC, faststart), an optional ProRes mezzanine, WAV stems,
SRT and VTT subtitles, qc.json with a verdict, provenance.json; listed with their hashes in deliverables.json.

The mp4's sound is the remix's AAC stream copied as it is, so the loudness measured there is what ships;
it is measured again here, on the delivered file. The verdict is "fail" when any check fails, "warn" when
lines mode had to move a line past its slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from prefect import task

from engine.base import FPS
from engine.media import VideoFrames, count_video_frames, probe, read_audio, run_ffmpeg, stream_starts
from tasks.manifest import MIX_STEMS
from tasks.qc import LOUDNESS_TOLERANCE_LU, integrated_loudness, true_peak_dbtp
from tasks.remix import Mix
from tasks.speakers import MIX_RATE, Timeline
from tasks.workspace import Blob, Workspace, stage_cache

MIN_OUTSIDE_PSNR_DB = 40.0  # paste-back re-encodes the source once, at CRF 12: visually lossless
SILENT_SPEAKER_DBFS = -60.0  # a speaker's stem never above this (10 ms RMS) has said nothing


@dataclass(frozen=True)
class Delivery:
    files: dict[str, Blob]  # deliverable name (as published under out/) -> blob
    qc: Blob
    verdict: str  # "pass" | "warn" (a note to review: lines mode moved a line past its slot) | "fail"
    failed: tuple[str, ...]  # the checks that failed


@dataclass(frozen=True)
class Expected:
    """What the delivered episode must hold: the picture's frames, the loudness spec, the script's lines."""

    frames: int
    loudness_lufs: float
    true_peak_dbtp: float
    lines: tuple = ()  # (start_s, end_s, text, speaker index) of the script
    input_audio_s: float = 0.0  # the longest dubbed input: none of it may fall past the episode's end
    constant_rate: bool = (
        True  # the picture's timestamps must be constant (stitch.timestamps: keep: a VFR may stay)
    )


def deliver(
    ws: Workspace,
    episode: str,
    picture: Blob,
    mix: Mix,
    timeline: Timeline,
    captions: tuple,
    outputs: tuple[str, ...],
    qc_extra: dict,
    provenance: dict,
    expected: Expected,
) -> Delivery:
    """Mux the picture (copied, never re-encoded: a pasted-back video keeps every frame's own time) with
    the remix's AAC, measure what was written, and gather the package."""
    files: dict[str, Blob] = {}
    with ws.scratch() as tmp:
        mp4 = mux_mp4(ws.path(picture), ws.path(mix.aac), tmp / f"{episode}.mp4")
        qc = measure(mp4) | {"expected_frames": expected.frames} | qc_extra | {"loudness": mix.report}
        if "mp4" in outputs:
            files[f"{episode}.mp4"] = ws.put_file(mp4)
        if "prores" in outputs:
            files[f"{episode}.mov"] = ws.put_file(
                mezzanine(ws.path(picture), ws.path(mix.mix), tmp / "m.mov")
            )
    checks = run_checks(qc, expected, {sid: ws.path(b) for sid, b in mix.speakers.items()}, timeline)
    failed = tuple(name for name, check in checks.items() if not check["pass"])
    qc |= {"checks": checks, "verdict": verdict(qc, failed), "failed_checks": list(failed)}
    if captions and "srt" in outputs:
        files[f"{episode}.srt"] = ws.put_bytes(to_srt(captions).encode(), ".srt")
    if captions and "vtt" in outputs:
        files[f"{episode}.vtt"] = ws.put_bytes(to_vtt(captions).encode(), ".vtt")
    if "stems" in outputs:
        files |= stems(mix)
    qc_blob = ws.put_json(qc)
    files |= {"qc.json": qc_blob, "provenance.json": ws.put_json(provenance)}
    return Delivery(files, qc_blob, qc["verdict"], failed)


def mux_mp4(picture, aac, out):
    """H.264 + AAC, both streams copied, moov first (faststart: plays while it downloads). Never
    -shortest: picture and sound have the same length by construction, and QC measures that they do."""
    args = ["-i", str(picture), "-i", str(aac), "-map", "0:v:0", "-map", "1:a:0", "-c", "copy"]
    run_ffmpeg([*args, "-movflags", "+faststart", str(out)], what="deliver mp4")
    return out


def mezzanine(picture, wav, out):
    """ProRes 422 HQ with 24-bit PCM in a .mov: the edit-suite master, at the picture's own frame times."""
    run_ffmpeg(
        ["-i", str(picture), "-i", str(wav), "-map", "0:v:0", "-map", "1:a:0", "-c:v", "prores_ks"]
        + ["-profile:v", "3", "-pix_fmt", "yuv422p10le", "-fps_mode", "passthrough"]
        + ["-c:a", "pcm_s24le", str(out)],
        what="deliver ProRes mezzanine",
    )
    return out


def stems(mix: Mix) -> dict[str, Blob]:
    """out/stems/: dialogue, full mix, M&E (when there is a bed) and one per speaker, `<speaker id>.wav`
    (validation keeps speaker ids off the mix stems' names)."""
    dialogue, me, full = MIX_STEMS
    named = {f"stems/{dialogue}.wav": mix.dialogue, f"stems/{full}.wav": mix.mix}
    if mix.bed is not None:
        named[f"stems/{me}.wav"] = mix.bed
    return named | {f"stems/{sid}.wav": blob for sid, blob in mix.speakers.items()}


def measure(mp4) -> dict:
    """What the delivered file really holds: frames and durations (the picture's from its frames' own
    timestamps, at any frame rate), loudness of its decoded AAC audio."""
    info = probe(mp4)
    audio = read_audio(mp4, MIX_RATE)
    video = VideoFrames(mp4)
    video_seconds = video.duration
    starts = stream_starts(mp4)
    gaps = np.diff(video.times)
    return {
        "frames": count_video_frames(mp4),
        "video_seconds": round(video_seconds, 4),
        "frame_rate": {
            "constant": video.is_constant_rate,
            "average": round((video.count - 1) / video.times[-1], 3) if video.count > 1 else None,
            "gap_ms": [round(float(gaps.min()) * 1000, 3), round(float(gaps.max()) * 1000, 3)]
            if len(gaps)
            else None,
        },
        "audio_seconds": len(audio) / MIX_RATE,
        # the decoded sound ends within one AAC frame (1024 samples) after the picture: codec padding
        "av_difference_seconds": round(len(audio) / MIX_RATE - video_seconds, 4),
        "av_offset_frames": round((starts.get("audio", 0.0) - starts.get("video", 0.0)) * FPS, 2),
        "container_seconds": info.duration,
        "loudness_lufs": round(integrated_loudness(audio, MIX_RATE), 2),
        "true_peak_dbtp": round(true_peak_dbtp(audio), 2),
    }


def verdict(qc: dict, failed: tuple[str, ...]) -> str:
    """fail: a check failed; warn: all passed, but lines mode moved a line later than its slot (review it)."""
    overruns = (qc.get("lines") or {}).get("overruns")
    return "fail" if failed else "warn" if overruns else "pass"


def run_checks(qc: dict, expected: Expected, speakers: dict, timeline: Timeline) -> dict[str, dict]:
    """Every check with its measured value, its limit and whether it passed."""
    loudness_error = qc["loudness_lufs"] - expected.loudness_lufs
    wav = qc["loudness"]["wav"]
    wav_ok = wav["loudness_lufs"] is not None and abs(wav["loudness_lufs"] - expected.loudness_lufs) <= 0.5
    dropped = [c for c in expected.lines if c[0] >= timeline.seconds]
    silent = sorted(sid for sid, path in speakers.items() if speech_seconds(path) == 0)
    cut = max(0.0, expected.input_audio_s - timeline.seconds)
    return {
        "frame_count": _check(qc["frames"] == expected.frames, qc["frames"], f"== {expected.frames}"),
        "av_offset": _check(qc["av_offset_frames"] == 0, qc["av_offset_frames"], "0 frames"),
        "av_length": _check(
            abs(qc["av_difference_seconds"]) < 1 / FPS, qc["av_difference_seconds"], "< 1 frame (s)"
        ),
        "loudness": _check(
            abs(loudness_error) <= LOUDNESS_TOLERANCE_LU and wav_ok,
            {"aac_lufs": qc["loudness_lufs"], "wav_lufs": wav["loudness_lufs"]},
            f"{expected.loudness_lufs} ± {LOUDNESS_TOLERANCE_LU} LU",
        ),
        "true_peak": _check(
            qc["true_peak_dbtp"] <= expected.true_peak_dbtp
            and wav["true_peak_dbtp"] <= expected.true_peak_dbtp,
            {"aac_dbtp": qc["true_peak_dbtp"], "wav_dbtp": wav["true_peak_dbtp"]},
            f"<= {expected.true_peak_dbtp} dBTP",
        ),
        "silent_speakers": _check(not silent, silent, "none"),
        "lines_dropped": _check(not dropped, [c[2] for c in dropped], "none"),
        "audio_cut_seconds": _check(cut <= 1 / FPS, round(cut, 3), "<= 1 frame"),
    } | _picture_checks(qc, expected)


def _picture_checks(qc: dict, expected: Expected) -> dict[str, dict]:
    """Constant timestamps (unless the manifest keeps a VFR source's own); paste-back: outside the speakers'
    regions the picture is the source, within encoding noise."""
    checks = {}
    if expected.constant_rate:
        rate = qc["frame_rate"]
        checks["constant_timestamps"] = _check(
            rate["constant"], rate["gap_ms"], "every frame gap equal (± 1 ms)"
        )
    psnr = (qc.get("paste_back") or {}).get("psnr_outside_db", "absent")
    if psnr != "absent":
        checks["outside_psnr"] = _check(
            psnr is None or psnr >= MIN_OUTSIDE_PSNR_DB, psnr, f">= {MIN_OUTSIDE_PSNR_DB} dB"
        )
    return checks


def _check(ok: bool, value, limit: str) -> dict:
    return {"pass": bool(ok), "value": value, "limit": limit}


def speech_seconds(path) -> float:
    """Seconds of a stem above SILENT_SPEAKER_DBFS (10 ms windows)."""
    from tasks.remix import speech_windows_db

    level = speech_windows_db(read_audio(path, MIX_RATE), MIX_RATE // 100)
    return float((level > SILENT_SPEAKER_DBFS).sum() / 100)


def deliverables_listing(episode: str, named: dict[str, Blob], verdict: str) -> dict:
    """deliverables.json: every file of the package with its size and SHA-256 (a receiving post house checks
    the package against it)."""
    return {
        "episode": episode,
        "qc_verdict": verdict,
        "files": {name: {"sha256": b.sha256, "bytes": b.size} for name, b in sorted(named.items())},
    }


def to_srt(captions) -> str:
    """captions: (start_s, end_s, text, speaker_index) in any order -> SubRip text."""
    return "\n".join(
        f"{n}\n{_cue_time(s, ',')} --> {_cue_time(e, ',')}\n{text}\n" for n, (s, e, text) in _cues(captions)
    )


def to_vtt(captions) -> str:
    """The same cues as WebVTT (the web players' and the streaming platforms' format)."""
    cues = [
        f"{n}\n{_cue_time(s, '.')} --> {_cue_time(e, '.')}\n{text}\n" for n, (s, e, text) in _cues(captions)
    ]
    return "WEBVTT\n\n" + "\n".join(cues)


def _cues(captions):
    """Numbered (start, end, text) in time order: the one place where captions become cues. A blank line
    inside a text would end the cue early (a fake cue after it), so it is folded away; "-->" would read as
    a cue timing; a cue never ends before it starts."""
    cues = []
    for start, end, text, *_ in sorted(captions):
        body = "\n".join(row.strip() for row in str(text).strip().splitlines() if row.strip())
        cues.append((start, max(end, start + 0.001), body.replace("-->", "->")))
    return enumerate(cues, 1)


def _cue_time(seconds: float, decimal: str) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{decimal}{ms:03d}"


deliver_task = task(
    deliver,
    name="deliver",
    cache_policy=stage_cache("tasks.deliver"),
    persist_result=True,
)
