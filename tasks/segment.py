"""Plan the render segments of an episode: cut at silences and shot cuts, fit memory, balance across GPUs.

A cut is a frame index c on the 25 fps grid: the segment before it ends with frame c - 1. Kinds of cut, in order
of preference (the planner pays a penalty for each kind below "silence" and never trades a worse kind for speed):

- ``silence``: every speaker is silent for at least ``min_gap_frames`` around c;
- ``shot``: a shot cut (always cut there: the picture changes, so does the engine's reference frame);
- ``pause``: every speaker is silent on both sides of c, but for less than the gap;
- ``turn``: no speaker's speech runs across c, but someone speaks right before or after it (a hand-over);
  pauses and turns are used only to keep a segment within the engine's person limit or to avoid a forced cut;
- ``forced``: inside speech, at the quietest frame, only when nothing else allows a segment under the length limit.

The engine renders clips of 4n+1 frames (ENGINE.md §5.1), so inside a gap the cut is placed where the segment
before it has 4n+1 frames. A segment shorter than one chunk (engine/memory.py min_useful_frames, 81 frames) costs a
whole chunk's call and a seam, so the planner avoids one unless (the rule, in order):

- the episode, or a shot, is shorter than that: it is one segment;
- the length limit is under two chunks: the minimum drops to half the limit (rounded up), the largest minimum that
  still lets every stretch longer than the limit be cut into pieces no shorter than it;
- avoiding it would take a forced cut inside speech, or put more people in a segment than the engine renders:
  the picture of a word is worth more than one chunk's time.

Among the plans that satisfy the rules the planner minimises estimated render time
(engine/memory.py) and, with several GPUs, the makespan of a longest-first schedule.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np
from prefect import task

from engine.base import FPS, OutOfMemory
from engine.memory import (
    DIT_BLOCKS,
    OFFLOAD_IN_FLIGHT,
    GiB,
    RenderCost,
    estimate_peak,
    estimate_seconds,
    max_frames_that_fit,
    min_useful_frames,
    worker_memory,
)
from tasks.workspace import Blob, Workspace, stage_cache

CUT_KINDS = ("end", "silence", "shot", "pause", "turn", "forced")
# Penalties in "seconds of render time": a worse cut kind always loses to any amount of render time.
# A forced cut must outweigh every short segment any episode could have (over 1e5 frames: more than an hour).
_PENALTY = {"end": 0.0, "silence": 0.0, "shot": 0.0, "pause": 1e5, "turn": 2e5, "forced": 1e12}
# A segment shorter than the plan's min_frames (a whole chunk's call for less): worse than a pause or turn cut,
# better than a crowded segment or a forced cut.
_SHORT_PENALTY = 1e6
# A segment with more speakers than the engine binds: worse than a pause or turn cut, better than a forced one.
_CROWD_PENALTY = 1e7
# A forced cut per speaker it splits and for its loudness (_forced_cost): above padding, below a pause.
_QUIET_WEIGHT = 1e4
_PAD_PENALTY = 1e3  # a non-final segment that is not 4n+1 frames (the engine renders extra frames and trims)


# ---------------------------------------------------------------------------------------------- speech activity


def frame_rms(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """RMS amplitude of each 25 fps frame (frame i = samples [i*rate/25, (i+1)*rate/25)); a partial tail is dropped."""
    samples = np.asarray(audio, dtype=np.float64)
    if samples.ndim != 1:
        raise ValueError(f"audio must be 1-D mono, got shape {samples.shape}")
    n_frames = len(samples) * FPS // sample_rate
    if n_frames == 0:
        return np.zeros(0)
    bounds = (np.arange(n_frames + 1) * sample_rate + FPS // 2) // FPS
    power = np.add.reduceat(samples[: bounds[-1]] ** 2, bounds[:-1]) / np.diff(bounds)
    return np.sqrt(power)


def speech_activity(
    audio: np.ndarray,
    sample_rate: int,
    *,
    threshold_db: float = -40.0,
    hangover_frames: int = 5,
    onset_frames: int = 2,
) -> np.ndarray:
    """Bool per 25 fps frame: is this track speaking (frame RMS above `threshold_db` dBFS).

    Active frames are widened by `hangover_frames` after and `onset_frames` before, so word tails and soft onsets
    below the threshold, and the short stops inside a word, count as speech: a cut never lands there.
    """
    loud = 20 * np.log10(frame_rms(audio, sample_rate) + 1e-10) > threshold_db
    counts = np.concatenate([[0], np.cumsum(loud)])
    index = np.arange(len(loud))
    high = np.minimum(len(loud), index + onset_frames + 1)
    low = np.maximum(0, index - hangover_frames)
    return counts[high] - counts[low] > 0


# ---------------------------------------------------------------------------------------------- plan records


def frame_to_sample(frame: int, sample_rate: int) -> int:
    """First audio sample of a frame; exact for every rate that is a multiple of 25 (8k, 16k, 44.1k, 48k)."""
    return (frame * sample_rate + FPS // 2) // FPS


@dataclass(frozen=True)
class Segment:
    index: int  # stable id: a split keeps the other segments' ids and gives the halves new ones
    start_frame: int
    end_frame: int  # half-open
    speakers: tuple[str, ...] = ()  # rendered persons, at most the engine's limit, in track order
    extra_speakers: tuple[str, ...] = ()  # also active but over the limit: rendered as background, flagged
    end_cut: str = "end"  # one of CUT_KINDS, or "split" after an out-of-memory split
    flags: tuple[str, ...] = ()
    gpu_bytes: int = 0
    host_bytes: int = 0
    est_seconds: float = 0.0
    split_from: int | None = None

    @property
    def num_frames(self) -> int:
        return self.end_frame - self.start_frame

    @property
    def start_s(self) -> float:
        return self.start_frame / FPS

    @property
    def end_s(self) -> float:
        return self.end_frame / FPS

    def start_sample(self, sample_rate: int) -> int:
        return frame_to_sample(self.start_frame, sample_rate)

    def end_sample(self, sample_rate: int) -> int:
        return frame_to_sample(self.end_frame, sample_rate)


@dataclass(frozen=True)
class SegmentPlan:
    segments: tuple[Segment, ...]
    total_frames: int
    max_frames: int
    min_gap_frames: int = 8
    max_persons: int = 2
    n_gpus: int = 1
    shot_cuts: tuple[int, ...] = ()
    settings: RenderCost = field(default_factory=RenderCost)
    min_frames: int = 1  # shorter segments only where the rules in the module docstring allow them
    chained: bool = False  # render.chain: the segments of a shot render one after another

    def jobs_seconds(self) -> list[float]:
        """What the render workers run in parallel: each segment, or with `chained` each shot's segments
        in a row (a chain never crosses a shot cut, so a shot is the longest serial run it can make)."""
        if not self.chained:
            return [s.est_seconds for s in self.segments]
        bounds = [0, *self.shot_cuts, self.total_frames]
        return [
            sum(s.est_seconds for s in self.segments if lo <= s.start_frame < hi)
            for lo, hi in zip(bounds, bounds[1:], strict=False)
        ]

    @property
    def total_seconds(self) -> float:
        return sum(s.est_seconds for s in self.segments)

    def makespan_s(self, n_gpus: int | None = None) -> float:
        return makespan(self.jobs_seconds(), n_gpus or self.n_gpus)

    def ideal_s(self, n_gpus: int | None = None) -> float:
        return self.total_seconds / (n_gpus or self.n_gpus)

    def cut_counts(self) -> dict[str, int]:
        kinds = [s.end_cut for s in self.segments if s.end_cut != "end"]
        return {kind: kinds.count(kind) for kind in sorted(set(kinds))}

    def to_json(self) -> str:
        data = asdict(self)
        data["segments"] = [asdict(s) for s in self.segments]
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> SegmentPlan:
        data = json.loads(text)
        segments = tuple(Segment(**_tuples(s)) for s in data.pop("segments"))
        settings = RenderCost(**data.pop("settings"))
        return cls(segments=segments, settings=settings, **_tuples(data))


def _tuples(record: dict[str, Any]) -> dict[str, Any]:
    """JSON turns tuples into lists; the records are frozen and compare by value, so turn them back."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in record.items()}


def makespan(durations: Sequence[float], n_gpus: int) -> float:
    """Finish time of a longest-first (LPT) schedule of independent jobs on `n_gpus` identical workers."""
    loads = [0.0] * max(1, n_gpus)
    for duration in sorted(durations, reverse=True):
        heapq.heapreplace(loads, loads[0] + duration)
    return max(loads)


# ---------------------------------------------------------------------------------------------- tracks on the grid


@dataclass(frozen=True)
class _Tracks:
    names: tuple[str, ...]
    active: np.ndarray  # (speakers, frames) bool
    loudness: np.ndarray  # (speakers, frames) float: frame RMS, or activity as 0/1 when no energy was given
    has_energy: bool

    @cached_property
    def counts(self) -> np.ndarray:
        """(speakers, frames + 1) prefix sums of activity: speech frames of s in [a, b) = counts[s, b] - counts[s, a]."""
        return np.concatenate([np.zeros((len(self.names), 1), np.int64), np.cumsum(self.active, 1)], 1)

    @cached_property
    def combined_loudness(self) -> np.ndarray:
        return self.loudness.sum(0)


def _on_grid(
    series: Mapping[str, np.ndarray], names: Sequence[str], total_frames: int, dtype: type
) -> np.ndarray:
    """(speakers, total_frames): each series cut or zero-padded to the episode's frame count."""
    out = np.zeros((len(names), total_frames), dtype)
    for row, name in enumerate(names):
        values = np.asarray(series[name])[:total_frames]
        out[row, : len(values)] = values
    return out


def _tracks(
    activity: Mapping[str, np.ndarray], total_frames: int, energy: Mapping[str, np.ndarray] | None
) -> _Tracks:
    names = tuple(activity)
    active = _on_grid(activity, names, total_frames, bool)
    if energy is None:
        return _Tracks(names, active, active.astype(float), False)
    return _Tracks(names, active, _on_grid(energy, names, total_frames, float), True)


# ---------------------------------------------------------------------------------------------- cut candidates


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Half-open [start, end) runs of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist(), strict=True))


def _spread(first: int, last: int, window: int) -> list[int]:
    """Cut positions in [first, last]: per window of at most `window` positions, 4 consecutive ones around its
    centre (4 residues mod 4, so a 4n+1 segment can end there whatever its start); all of them for small windows."""
    count = last - first + 1
    if window <= 4:
        return list(range(first, last + 1))
    pieces = max(1, min(math.ceil(count / window), count // 4))  # every piece keeps its 4 residues
    out: list[int] = []
    for k in range(pieces):
        lo, hi = first + k * count // pieces, first + (k + 1) * count // pieces - 1
        start = max(lo, min((lo + hi) // 2 - 1, hi - 3))
        out.extend(range(start, min(hi, start + 3) + 1))
    return out


def _pause_cuts(tracks: _Tracks, lo: int, hi: int, min_gap: int, window: int) -> dict[int, str]:
    """Cuts in [lo, hi)'s interior where no speaker's speech runs across: silences, pauses and turns."""
    active = tracks.active[:, lo:hi]
    silent = ~active.any(0)
    cuts: dict[int, str] = {}
    for g0, g1 in _runs(silent):
        kind, inset = ("silence", 0) if g1 - g0 >= min_gap else ("pause", 1) if g1 - g0 >= 2 else ("turn", 0)
        first, last = max(lo + g0 + inset, lo + 1), min(lo + g1 - inset, hi - 1)  # a pause: silent both sides
        for c in _spread(first, last, window) if first <= last else []:
            cuts[c] = kind
        for c in (lo + g0, lo + g1):  # the run's edges: speech on one side, so at best a turn
            if lo < c < hi:
                cuts.setdefault(c, "turn")
    # Hand-overs: speech on both sides of c, but nobody's run crosses c (one stops as the other starts).
    spans = (active[:, :-1] & active[:, 1:]).any(0)
    talk = active.any(0)
    for c in np.flatnonzero(talk[:-1] & talk[1:] & ~spans).tolist():
        cuts.setdefault(lo + c + 1, "turn")
    return cuts


def _forced_cost(tracks: _Tracks, positions: np.ndarray) -> np.ndarray:
    """How bad a forced cut at each position is: speakers whose speech it splits, plus its loudness in [0, 1)."""
    loud = tracks.combined_loudness
    spanning = (tracks.active[:, positions - 1] & tracks.active[:, positions]).sum(0)
    around = loud[positions - 1] + loud[positions]
    return spanning + around / (2 * loud.max() + 1e-9)


def _forced_cuts(bounds: Sequence[int], max_frames: int) -> dict[int, str]:
    """Every position between consecutive cut positions further apart than `max_frames`: the planner then needs
    the fewest forced cuts and, among those, takes the quietest frames (_forced_cost)."""
    cuts: dict[int, str] = {}
    for x, y in zip(bounds, bounds[1:], strict=False):
        if y - x > max_frames:
            cuts.update(dict.fromkeys(range(x + 1, y), "forced"))
    return cuts


def _candidates(tracks: _Tracks, lo: int, hi: int, min_gap: int, cap: int) -> dict[int, str]:
    # Every position of every silence and pause: sampling them (a group every eighth of the limit) let a
    # stretch just over two minimum pieces long fall between two groups, leaving only a short piece where a
    # plan without one exists (the property test found such episodes about one run in ten). Planning stays
    # in the tens of milliseconds for a 22-minute episode (bench/plan.py).
    cuts = _pause_cuts(tracks, lo, hi, min_gap, window=1)
    cuts.update(_forced_cuts([lo, *sorted(cuts), hi], cap))
    return cuts


# ---------------------------------------------------------------------------------------------- dynamic programme


def _best_cuts(
    tracks: _Tracks,
    lo: int,
    hi: int,
    cuts: Mapping[int, str],
    cap: int,
    seconds: np.ndarray,
    max_persons: int,
    min_frames: int = 1,
) -> list[int]:
    """Cheapest chain of cuts from lo to hi with every piece at most `cap` frames.

    Cost of a piece = estimated render seconds + penalties (worse cut kind, over the person limit, not 4n+1,
    shorter than `min_frames` unless it is all of [lo, hi)).
    """
    shortest = min(min_frames, hi - lo)
    pos = np.array([lo, *sorted(cuts), hi])
    penalty = np.array([0.0] + [_PENALTY[cuts[c]] for c in sorted(cuts)] + [0.0])
    forced = np.flatnonzero(penalty == _PENALTY["forced"])
    penalty[forced] += _QUIET_WEIGHT * _forced_cost(tracks, pos[forced])
    at_nodes = tracks.counts[:, pos]  # (speakers, nodes)
    cost = np.full(len(pos), np.inf)
    cost[0], back = 0.0, np.full(len(pos), -1)
    for j in range(1, len(pos)):
        i0 = int(np.searchsorted(pos, pos[j] - cap))
        length = pos[j] - pos[i0:j]
        persons = ((at_nodes[:, j : j + 1] - at_nodes[:, i0:j]) > 0).sum(0)
        piece = (
            seconds[length] + _CROWD_PENALTY * (persons > max_persons) + _SHORT_PENALTY * (length < shortest)
        )
        if j < len(pos) - 1:
            piece = piece + _PAD_PENALTY * (length % 4 != 1)
        total = cost[i0:j] + piece + penalty[j]
        k = int(np.argmin(total))
        cost[j], back[j] = total[k], i0 + k
    if not np.isfinite(cost[-1]):  # forced cuts make every stretch feasible: this is a planner bug
        raise RuntimeError(f"no chain of cuts under {cap} frames in [{lo}, {hi}); please report this episode")
    chain, j = [], len(pos) - 1
    while j > 0:
        chain.append(int(pos[j]))
        j = back[j]
    return chain[::-1]


# ---------------------------------------------------------------------------------------------- the planner


def _segment(
    index: int, start: int, end: int, end_cut: str, tracks: _Tracks, plan: SegmentPlan, last: bool
) -> Segment:
    talk = tracks.active[:, start:end].sum(1)
    loud = tracks.loudness[:, start:end].sum(1) if tracks.has_energy else talk
    # Loudest first, then track order.
    ranked = sorted(np.flatnonzero(talk).tolist(), key=lambda s: (-loud[s], s))
    keep = sorted(ranked[: plan.max_persons])
    extra = sorted(ranked[plan.max_persons :])
    flags = []
    if extra:
        flags.append({3: "three-talk"}.get(len(ranked), f"{len(ranked)}-talk"))
    if end_cut == "forced":
        flags.append("forced cut")
    if not last and (end - start) % 4 != 1:
        flags.append("padded")
    peak = estimate_peak(end - start, plan.settings)
    return Segment(
        index=index,
        start_frame=start,
        end_frame=end,
        speakers=tuple(tracks.names[s] for s in keep),
        extra_speakers=tuple(tracks.names[s] for s in extra),
        end_cut=end_cut,
        flags=tuple(flags),
        gpu_bytes=peak.gpu_bytes,
        host_bytes=peak.host_bytes,
        est_seconds=estimate_seconds(end - start, plan.settings),
    )


def _plan(tracks: _Tracks, frame: SegmentPlan, seconds: np.ndarray) -> SegmentPlan:
    """`frame` (an empty plan with the settings) filled with the cheapest segments, shot by shot."""
    bounds = [0, *frame.shot_cuts, frame.total_frames]
    ends: list[tuple[int, str]] = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        cuts = _candidates(tracks, lo, hi, frame.min_gap_frames, frame.max_frames)
        chain = _best_cuts(
            tracks, lo, hi, cuts, frame.max_frames, seconds, frame.max_persons, frame.min_frames
        )
        ends += [(c, cuts.get(c, "shot" if c < frame.total_frames else "end")) for c in chain]
    starts = [0] + [end for end, _ in ends[:-1]]
    segments = tuple(
        _segment(i, start, end, kind, tracks, frame, i == len(ends) - 1)
        for i, (start, (end, kind)) in enumerate(zip(starts, ends, strict=True))
    )
    return replace(frame, segments=segments)


def plan_segments(
    activity: Mapping[str, np.ndarray],
    total_frames: int,
    *,
    max_frames: int,
    min_gap_frames: int = 8,
    shot_cuts: Sequence[int] = (),
    max_persons: int = 2,
    n_gpus: int = 1,
    energy: Mapping[str, np.ndarray] | None = None,
    settings: RenderCost | None = None,
    min_frames: int | None = None,
    chained: bool = False,
) -> SegmentPlan:
    """Cut [0, total_frames) into render segments of at most `max_frames` frames, and none shorter than
    `min_frames` (default: one engine chunk, min_useful_frames) but where the module docstring's rules allow.

    `activity` maps speaker id -> bool per frame (speech_activity); `energy` (optional) maps the same ids to frame
    RMS (frame_rms), used to place forced cuts at the quietest frame and to pick the loudest speakers of a crowded
    segment. `settings` drives the memory and time estimates (engine/memory.py; default RenderCost()). With
    `chained` (render.chain) a shot's segments render in a row, so splitting them for balance gains nothing.
    """
    if total_frames < 1 or max_frames < 1 or min_gap_frames < 1 or max_persons < 1 or n_gpus < 1:
        raise ValueError(
            f"total_frames={total_frames}, max_frames={max_frames}, min_gap_frames={min_gap_frames}, "
            f"max_persons={max_persons} and n_gpus={n_gpus} must all be >= 1"
        )
    settings = settings or RenderCost()
    tracks = _tracks(activity, total_frames, energy)
    shots = tuple(sorted({int(c) for c in shot_cuts if 0 < c < total_frames}))
    shortest = min(min_useful_frames(settings) if min_frames is None else min_frames, (max_frames + 1) // 2)
    frame = SegmentPlan(
        (), total_frames, max_frames, min_gap_frames, max_persons, n_gpus, shots, settings, shortest, chained
    )
    seconds = np.array([0.0] + [estimate_seconds(n, settings) for n in range(1, max_frames + 1)])
    plan = _plan(tracks, frame, seconds)
    return _balance(plan, tracks) if n_gpus > 1 and not chained else plan


def _balance(plan: SegmentPlan, tracks: _Tracks) -> SegmentPlan:
    """Split the longest pieces at their middle silence while that shortens the longest-first makespan.

    The least-render-time plan can leave a few long pieces that hold one GPU busy while the others idle; each split
    costs one more segment's overhead and chunk rounding, so keep the best plan seen, not the last.
    """
    best = current = plan
    for _ in range(4 * plan.n_gpus):
        longest = max(current.segments, key=lambda s: (s.est_seconds, -s.start_frame))
        split = _split(current, longest, tracks, kinds=("silence",), min_frames=plan.min_frames)
        if split is None:
            break
        current = split
        if current.makespan_s() < best.makespan_s() - 1e-6:
            best = current
    # A fresh plan numbers its segments in time order; split_from is kept for out-of-memory splits at render time.
    return replace(
        best, segments=tuple(replace(s, index=i, split_from=None) for i, s in enumerate(best.segments))
    )


# ---------------------------------------------------------------------------------------------- out-of-memory splits


def _split(
    plan: SegmentPlan, old: Segment, tracks: _Tracks, kinds: Sequence[str] = CUT_KINDS, min_frames: int = 1
) -> SegmentPlan | None:
    """`plan` with `old` cut in two at its best inner cut of one of `kinds`, both halves at least `min_frames`
    long (None if it has none).

    Best = the best cut kind (silence, pause, turn, then forced), in the middle half of the segment, the quietest
    for a forced cut, keeping the first half 4n+1, nearest the middle. The halves get new ids and
    `split_from=old.index`.
    """
    if old.num_frames < 2:
        return None
    cuts = _candidates(tracks, old.start_frame, old.end_frame, plan.min_gap_frames, old.num_frames - 1)
    lo, hi = old.start_frame + min_frames, old.end_frame - min_frames
    allowed = [c for c in cuts if cuts[c] in kinds and lo <= c <= hi]
    if not allowed:
        return None
    middle, quarter = (old.start_frame + old.end_frame) / 2, old.num_frames / 4
    quiet = dict(zip(allowed, _forced_cost(tracks, np.array(allowed)), strict=True))

    def badness(c: int) -> tuple:
        kind = cuts[c]
        off_middle = abs(c - middle) > quarter  # both halves must shrink for the retry to help
        noise = quiet[c] if kind == "forced" else 0.0
        return _PENALTY[kind], off_middle, noise, (c - old.start_frame) % 4 != 1, abs(c - middle), c

    cut = min(allowed, key=badness)
    next_id = max(s.index for s in plan.segments) + 1
    last = old.end_frame == plan.total_frames
    halves = (
        _segment(next_id, old.start_frame, cut, cuts[cut], tracks, plan, False),
        _segment(next_id + 1, cut, old.end_frame, old.end_cut, tracks, plan, last),
    )
    halves = tuple(replace(h, split_from=old.index) for h in halves)
    position = plan.segments.index(old)
    return replace(plan, segments=plan.segments[:position] + halves + plan.segments[position + 1 :])


def split_segment(
    plan: SegmentPlan,
    index: int,
    activity: Mapping[str, np.ndarray],
    *,
    energy: Mapping[str, np.ndarray] | None = None,
) -> SegmentPlan:
    """Split segment `index` (its id) in two at its best inner cut, after it ran out of memory; every other segment
    is left as it is. The halves are flagged "split" and record `split_from=index`."""
    old = next((s for s in plan.segments if s.index == index), None)
    if old is None:
        raise KeyError(f"no segment with index {index} in the plan")
    split = _split(plan, old, _tracks(activity, plan.total_frames, energy))
    if split is None:
        raise ValueError(f"segment {index} has {old.num_frames} frame(s) and cannot be split")
    flagged = tuple(
        replace(s, flags=(*s.flags, "split")) if s.split_from == index else s for s in split.segments
    )
    return replace(split, segments=flagged)


# ---------------------------------------------------------------------------------------------- the Prefect stage


@dataclass(frozen=True)
class SegmentSpec:
    """What a render needs to know about one segment (small; hashed by value into the render's cache key)."""

    index: int
    start_frame: int
    end_frame: int
    speakers: tuple[str, ...]
    overlap: int = (
        0  # render.overlap_frames: frames rendered past end_frame, crossfaded into the next segment
    )

    @property
    def num_frames(self) -> int:
        return self.end_frame - self.start_frame

    @property
    def rendered_frames(self) -> int:
        """Frames the engine renders: the segment's own and its overlap into the next."""
        return self.num_frames + self.overlap


def with_overlaps(specs, overlap_frames: int) -> tuple[SegmentSpec, ...]:
    """Each segment that another follows directly renders `overlap_frames` past its end (at most the next
    segment's length: the crossfade never reaches past it); the last one, none."""
    ordered = sorted(specs, key=lambda s: s.start_frame)
    following = {
        a.index: b for a, b in zip(ordered, ordered[1:], strict=False) if a.end_frame == b.start_frame
    }
    return tuple(
        replace(
            s,
            overlap=min(overlap_frames, following[s.index].num_frames) if s.index in following else 0,
        )
        for s in specs
    )


@dataclass(frozen=True)
class PlanSettings:
    """What the planner needs of the manifest and the machine (flows/resolve.py builds it, once per run)."""

    engine: str
    size: int
    max_segment_s: float | None  # None: from the memory model and the render worker's memory
    min_gap_s: float
    n_gpus: int = 1  # segments rendered at once: balancing aims at this many workers
    steps: int = 8  # the time model scales with steps and guidance passes
    cfg_passes: int = 3
    gpu_bytes: int | None = None  # a render worker's GPU and host memory; None: this machine's, now
    host_bytes: int | None = None
    cost_model: str | None = None  # whose memory and time model sizes the segments; None: the engine's
    chain: bool = False  # render.chain: a shot's segments render in a row
    overlap_frames: int = 0  # render.overlap_frames: each segment renders this many past its end
    # the engine's memory switches (render.quantize / offload / resident_blocks / compile / vae_tiling)
    quantize: str = "none"
    offload: str = "none"
    resident_blocks: int = 0
    compile: bool = False
    vae_tiled: bool = False


@dataclass(frozen=True)
class EpisodePlan:
    plan: Blob  # plan.json (SegmentPlan.to_json)
    segments: tuple[SegmentSpec, ...]
    captions: tuple[tuple[float, float, str, int], ...]  # (start_s, end_s, text, speaker index)
    forced_cuts: int

    def captions_for(self, seg: SegmentSpec) -> tuple:
        return tuple(c for c in self.captions if c[1] > seg.start_frame / FPS and c[0] < seg.end_frame / FPS)


def plan_episode(
    ws: Workspace,
    tracks: dict[str, Blob],
    timeline,
    settings: PlanSettings,
    lines: tuple,
    shot_cuts: tuple = (),
) -> EpisodePlan:
    """Speech activity of every conformed track -> a segment plan; line end times from the activity."""
    from tasks.speakers import MIX_RATE, load_track

    audio = {sid: load_track(ws, blob) for sid, blob in tracks.items()}
    activity = {sid: speech_activity(a, MIX_RATE) for sid, a in audio.items()}
    energy = {sid: frame_rms(a, MIX_RATE) for sid, a in audio.items()}
    max_frames = max(1, max_segment_frames(settings) - settings.overlap_frames)  # the overlap renders too
    plan = plan_segments(
        activity,
        timeline.total_frames,
        max_frames=max_frames,
        min_gap_frames=max(1, round(settings.min_gap_s * FPS)),
        energy=energy,
        n_gpus=settings.n_gpus,
        shot_cuts=shot_cuts,
        settings=_render_cost(settings),
        chained=settings.chain,
    )
    specs = segment_specs(plan, settings.overlap_frames)
    captions = caption_times(lines, [activity[sid] for sid in tracks], timeline.total_frames)
    return EpisodePlan(
        ws.put_bytes(plan.to_json().encode(), ".json"), specs, captions, plan.cut_counts().get("forced", 0)
    )


def segment_specs(plan: SegmentPlan, overlap_frames: int = 0) -> tuple[SegmentSpec, ...]:
    """The renders' view of a plan's segments, with their overlaps."""
    specs = tuple(SegmentSpec(s.index, s.start_frame, s.end_frame, s.speakers) for s in plan.segments)
    return with_overlaps(specs, overlap_frames)


def caption_times(lines: tuple, activity: list[np.ndarray], total_frames: int) -> tuple:
    """(start, end|None, text, speaker) -> (start, end, text, speaker): a missing end is where that speaker's
    speech after `start` next pauses for half a second (or the next line of the same speaker begins)."""
    out = []
    for i, (start, end, text, who) in enumerate(lines):
        if end is None:
            later = [s for s, _, _, w in lines[i + 1 :] if w == who and s > start]
            limit = min([total_frames / FPS, *later])
            end = _speech_end(activity[who], start, limit)
        out.append((float(start), float(min(end, total_frames / FPS)), text, who))
    return tuple(out)


def _speech_end(active: np.ndarray, start_s: float, limit_s: float, pause_frames: int = 12) -> float:
    first, last = int(start_s * FPS), min(int(limit_s * FPS), len(active))
    spoken = np.flatnonzero(active[first:last])
    if len(spoken) == 0:
        return min(start_s + 2.0, limit_s)
    breaks = np.flatnonzero(np.diff(spoken) > pause_frames)
    end_frame = first + (spoken[breaks[0]] if len(breaks) else spoken[-1]) + 1
    return end_frame / FPS


def _render_cost(settings: PlanSettings) -> RenderCost:
    model = settings.cost_model or settings.engine
    engine = model if model in ("multitalk", "infinitetalk", "preview") else "preview"
    return RenderCost(
        engine=engine, size=settings.size, steps=settings.steps, cfg_passes=settings.cfg_passes,
        quantize=None if settings.quantize == "none" else settings.quantize,  # type: ignore[arg-type]
        offload="group" if settings.offload == "blocks" else "none",
        resident_blocks=settings.resident_blocks + OFFLOAD_IN_FLIGHT if settings.offload == "blocks" else DIT_BLOCKS,
        compile=settings.compile, vae_tiled=settings.vae_tiled,
    )  # fmt: skip


def max_segment_frames(settings: PlanSettings) -> int:
    """The manifest's limit, or the longest segment that fits this worker's GPU and host memory."""
    if settings.max_segment_s is not None:
        return max(1, int(settings.max_segment_s * FPS))
    render = _render_cost(settings)
    gpu, host = (
        worker_memory() if settings.gpu_bytes is None else (settings.gpu_bytes, settings.host_bytes or 0)
    )
    frames = max_frames_that_fit(gpu if render.engine != "preview" else host, host, render)
    if frames < 1:
        raise OutOfMemory(
            f"the {render.engine} engine at {render.size}p does not fit this worker's memory "
            f"({gpu / GiB:.1f} GiB GPU, {host / GiB:.1f} GiB host); lower render.size or add offload",
            size=render.size,
        )
    return frames


plan_task = task(plan_episode, name="plan", cache_policy=stage_cache("tasks.segment"), persist_result=True)
