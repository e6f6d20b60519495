"""lines: script lines fitted to the scene's timing, then placed on one track per speaker (lines mode).

The timing fit, in order:
1. every line is synthesised at its voice's natural speed (times tts.speed and the line's own speed);
2. a line longer than its slot is spoken faster, up to `tts.max_speed` (default 1.25x). The slot ends at the
   line's `end`, else at the next line it must not run into: the next line of the same speaker, or, when the
   scene is one conversation (`tts.conversation`), the next line of anyone (lines the manifest makes start
   together, or overlap on purpose with an explicit `end`, may still overlap);
3. a line that still does not fit borrows the silence after its slot, up to that next line;
4. a line that still does not fit moves the later lines by the minimum, and its overrun is reported.
A speaker never overlaps themself. `lines.json` records where every line really is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from prefect import task

from tasks.workspace import Blob, Workspace, stage_cache

SPEED_STEP = 0.01  # speed factors are rounded up to this: stable cache keys, and the line still fits
EPS_S = 1e-6  # one rule for "fits": the fit, the placement and the report (a 1 ms overrun is an overrun)
# A refinement aims this much more under the slot each time: a take aimed exactly at the end overruns half the
# time when the voice's length is random (Piper: +-4 % between takes at one speed)
REFINE_MARGIN = 0.015
REFINEMENTS = (
    4  # re-syntheses at a refined speed: a backend with random timing (Piper) may still overrun after two
)


@dataclass(frozen=True)
class ScriptLine:
    index: int  # position in the manifest's `lines`
    speaker: str
    start: float
    end: float | None
    text: str


@dataclass(frozen=True)
class FittedLine:
    index: int
    speaker: str
    text: str
    intended_start: float
    slot_end: float | None  # where the line should have ended (None: open-ended, the last line of a still)
    start: float
    end: float
    speed: float  # factor over the natural speed chosen by the fit (1.0: natural)
    borrowed_s: float  # silence after the slot that the line uses
    overrun_s: float  # how far it pushed the next line (or ran past the episode's end)

    @property
    def drift_s(self) -> float:
        return self.start - self.intended_start

    def as_json(self) -> dict:
        return {
            "line": self.index,
            "speaker": self.speaker,
            "text": self.text,
            "intended_start": round(self.intended_start, 3),
            "slot_end": None if self.slot_end is None else round(self.slot_end, 3),
            "start": round(self.start, 3),
            "end": round(self.end, 3),
            "speed": self.speed,
            "drift_s": round(self.drift_s, 3),
            "borrowed_s": round(self.borrowed_s, 3),
            "overrun_s": round(self.overrun_s, 3),
        }


def _order(lines: Sequence[ScriptLine]) -> list[ScriptLine]:
    return sorted(lines, key=lambda ln: (ln.start, ln.index))


def _blocks(earlier: ScriptLine, later: ScriptLine, conversation: bool) -> bool:
    """Must `later` wait until `earlier` has been spoken? Always for one speaker; for two speakers only in
    one conversation, and not when the manifest makes them start together or overlap on purpose."""
    if earlier.speaker == later.speaker:
        return True
    if not conversation or earlier.start == later.start:
        return False
    return not (earlier.end is not None and earlier.end > later.start)


def slot_ends(
    lines: Sequence[ScriptLine], conversation: bool, episode_end: float | None
) -> dict[int, float | None]:
    """Line index -> where its slot ends (intended timing, before any fit)."""
    order = _order(lines)
    out: dict[int, float | None] = {}
    for i, line in enumerate(order):
        nxt = next((b.start for b in order[i + 1 :] if _blocks(line, b, conversation)), None)
        candidates = [t for t in (line.end, nxt, episode_end) if t is not None]
        out[line.index] = min(candidates) if candidates else None
    return out


def _next_blocked_start(order: list[ScriptLine], i: int, conversation: bool, episode_end: float | None):
    line = order[i]
    nxt = next((b.start for b in order[i + 1 :] if _blocks(line, b, conversation)), None)
    candidates = [t for t in (nxt, episode_end) if t is not None]
    return min(candidates) if candidates else None


def choose_speeds(
    lines: Sequence[ScriptLine],
    natural_s: dict[int, float],
    *,
    max_speed: float,
    conversation: bool,
    episode_end: float | None,
) -> dict[int, float]:
    """Line index -> speed factor over the natural speed: just enough to fit the slot, at most `max_speed`."""
    ends = slot_ends(lines, conversation, episode_end)
    speeds = {}
    for line in lines:
        slot = ends[line.index]
        need = 1.0 if slot is None else natural_s[line.index] / max(slot - line.start, 1e-3)
        need = math.ceil(round(need / SPEED_STEP, 6)) * SPEED_STEP
        speeds[line.index] = round(min(max(1.0, need), max_speed), 2)
    return speeds


def refined_speed(
    line: ScriptLine,
    speed: float,
    seconds: float,
    slot_end: float | None,
    max_speed: float,
    margin: float = 0.0,
) -> float | None:
    """A voice sped up by s is not exactly 1/s as long (pauses, trimmed silence): when the line, spoken at
    `speed`, still overruns its slot and the bound allows more, the speed that the measured ratio says fits
    `margin` (a fraction) under the slot's end."""
    if slot_end is None or speed >= max_speed or seconds <= slot_end - line.start + EPS_S:
        return None
    need = speed * seconds / max((slot_end - line.start) * (1.0 - margin), 1e-3)
    better = round(min(math.ceil(round(need / SPEED_STEP, 6)) * SPEED_STEP, max_speed), 2)
    return better if better > speed else round(min(speed + SPEED_STEP, max_speed), 2)


def best_take(tried: Sequence[tuple[float, Any]], room: float | None) -> tuple[float, Any]:
    """Of the takes of one line (speed, audio), the slowest that fits its slot, else the shortest. A voice with
    random timing (Piper) may come out longer at a higher speed than at a lower one: the last take is not
    always the best."""
    fitting = [t for t in tried if room is None or t[1].seconds <= room + EPS_S]
    if fitting:
        return min(fitting, key=lambda t: t[0])
    return min(tried, key=lambda t: (t[1].seconds, t[0]))


def place_lines(
    lines: Sequence[ScriptLine],
    seconds: dict[int, float],
    speeds: dict[int, float],
    *,
    conversation: bool,
    episode_end: float | None,
) -> list[FittedLine]:
    """Where each line is spoken, given its length at its chosen speed; lines in manifest order."""
    order = _order(lines)
    ends = slot_ends(lines, conversation, episode_end)
    placed: list[FittedLine] = []
    for i, line in enumerate(order):
        waits = [
            p.end for p, earlier in zip(placed, order, strict=False) if _blocks(earlier, line, conversation)
        ]
        start = max([line.start, *waits])
        end = start + seconds[line.index]
        slot = ends[line.index]
        limit = _next_blocked_start(
            order, i, conversation, episode_end
        )  # the silence after the slot ends here
        borrowed = max(0.0, min(end, limit if limit is not None else end) - slot) if slot is not None else 0.0
        overrun = max(0.0, end - limit) if limit is not None else 0.0
        placed.append(
            FittedLine(
                line.index,
                line.speaker,
                line.text,
                line.start,
                slot,
                start,
                end,
                speeds[line.index],
                borrowed,
                overrun,
            )  # fmt: skip
        )
    return sorted(placed, key=lambda p: p.index)


def fit_script(
    lines: Sequence[ScriptLine],
    speak: Callable[[int, float], Any],
    *,
    max_speed: float,
    conversation: bool,
    episode_end: float | None,
) -> tuple[list[FittedLine], dict[int, Any]]:
    """The whole fit: `speak(index, speed factor)` gives a line's audio (anything with `.seconds`); returns the
    fitted lines and the audio each one is spoken with. A line is spoken at its natural speed, then at the speed
    its slot needs, then (the measured length may still overrun) at most REFINEMENTS times more at a refined speed."""
    fit = {"conversation": conversation, "episode_end": episode_end}
    natural = {ln.index: speak(ln.index, 1.0) for ln in lines}
    speeds = choose_speeds(lines, {i: a.seconds for i, a in natural.items()}, max_speed=max_speed, **fit)
    spoken = {i: natural[i] if speeds[i] == 1.0 else speak(i, speeds[i]) for i in natural}
    slots = slot_ends(lines, **fit)
    for line in lines:
        i = line.index
        tried = [(speeds[i], spoken[i])]
        for attempt in range(1, REFINEMENTS + 1):
            margin = REFINE_MARGIN * attempt
            better = refined_speed(line, speeds[i], spoken[i].seconds, slots[i], max_speed, margin)
            if better is None:
                break
            speeds[i], spoken[i] = better, speak(i, better)
            tried.append((speeds[i], spoken[i]))
        speeds[i], spoken[i] = best_take(tried, None if slots[i] is None else slots[i] - line.start)
    return place_lines(lines, {i: a.seconds for i, a in spoken.items()}, speeds, **fit), spoken


def fit_report(fitted: Sequence[FittedLine], max_speed: float) -> dict:
    """The fit in qc.json: how many lines fitted as written, sped up, borrowed silence or moved others."""
    overruns = [
        {
            "line": f.index,
            "speaker": f.speaker,
            "overrun_s": round(f.overrun_s, 3),
            "start": round(f.start, 3),
        }
        for f in fitted
        if f.overrun_s > EPS_S
    ]
    return {
        "lines": len(fitted),
        "max_speed": max_speed,
        "natural": sum(
            1 for f in fitted if f.speed == 1.0 and f.borrowed_s <= EPS_S and f.overrun_s <= EPS_S
        ),
        "sped_up": sum(1 for f in fitted if f.speed > 1.0),
        "borrowed": sum(1 for f in fitted if f.borrowed_s > EPS_S),
        "moved": sum(1 for f in fitted if f.drift_s > EPS_S),
        "fit_within_speed_bound": sum(1 for f in fitted if f.borrowed_s <= EPS_S and f.overrun_s <= EPS_S),
        "max_drift_s": round(max((f.drift_s for f in fitted), default=0.0), 3),
        "overruns": overruns,
    }


def assemble_track(
    ws: Workspace, placed: tuple[tuple[float, Blob], ...], sample_rate: int, total_s: float = 0.0
) -> Blob:
    """One speaker's track: each line's audio at its fitted start, silence elsewhere."""
    from engine.media import read_wav, write_wav

    pieces = []
    for start, blob in placed:
        audio, rate = read_wav(ws.path(blob))
        if rate != sample_rate:
            raise ValueError(f"{blob.relpath}: line audio at {rate} Hz, expected {sample_rate} Hz")
        pieces.append((int(round(start * sample_rate)), audio.astype(np.float32)))
    length = max([o + len(a) for o, a in pieces] + [int(round(total_s * sample_rate)), 1])
    track = np.zeros(length, dtype=np.float32)
    for offset, audio in pieces:
        track[offset : offset + len(audio)] += audio
    with ws.scratch() as tmp:
        return ws.put_file(write_wav(tmp / "track.wav", track, sample_rate))


assemble_task = task(
    assemble_track, name="tts-track", cache_policy=stage_cache("tasks.lines"), persist_result=True
)
