"""Segment planner: the hard rules as properties (hypothesis), the preferences on small hand-made episodes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import memory
from engine.base import FPS
from engine.memory import (
    GiB,
    RenderCost,
    chunk_count,
    estimate_peak,
    estimate_seconds,
    max_frames_that_fit,
    min_useful_frames,
)
from flows.display import format_plan_table
from tasks.segment import (
    Segment,
    SegmentPlan,
    frame_rms,
    plan_segments,
    speech_activity,
    split_segment,
)

RATE = 16_000


def talk(total: int, *runs: tuple[int, int]) -> np.ndarray:
    """Activity with speech in the given [start, end) frame runs."""
    active = np.zeros(total, bool)
    for start, end in runs:
        active[start:end] = True
    return active


def tone(seconds: float, amplitude: float = 0.3, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


def check_rules(plan: SegmentPlan, activity: dict[str, np.ndarray]) -> None:
    """What every plan must satisfy, whatever its input."""
    segs = plan.segments
    assert segs[0].start_frame == 0 and segs[-1].end_frame == plan.total_frames
    assert all(a.end_frame == b.start_frame for a, b in zip(segs, segs[1:], strict=False))
    assert all(0 < s.num_frames <= plan.max_frames for s in segs)
    assert all(len(s.speakers) <= plan.max_persons for s in segs)
    assert set(plan.shot_cuts) <= {s.end_frame for s in segs}
    active = np.array([a[: plan.total_frames] for a in activity.values()]).reshape(len(activity), -1)
    for s in segs[:-1]:
        c = s.end_frame
        spans = bool((active[:, c - 1] & active[:, c]).any())
        if s.end_cut in ("silence", "pause", "turn"):
            assert not spans, f"cut at {c} is inside a word"
        if s.end_cut == "pause":
            assert not active[:, c - 1 : c + 1].any(), f"pause cut at {c} has speech beside it"
        if s.end_cut == "silence":
            silent = ~active.any(0)
            left = c - np.argmin(silent[:c][::-1]) if not silent[:c].all() else 0
            right = c + np.argmin(silent[c:]) if not silent[c:].all() else plan.total_frames
            assert right - left >= plan.min_gap_frames, f"silence at {c} is shorter than the gap"
        assert s.end_cut in ("silence", "pause", "turn", "forced", "shot")
        assert (s.end_cut == "forced") == ("forced cut" in s.flags)


@st.composite
def episodes(draw: st.DrawFn) -> dict:
    total = draw(st.integers(1, 700))
    names = ["ana", "ben", "cy"][: draw(st.integers(1, 3))]
    activity = {}
    for name in names:
        runs = draw(st.lists(st.tuples(st.integers(0, total), st.integers(1, 120)), max_size=8))
        activity[name] = talk(total, *((s, s + n) for s, n in runs))
    return {
        "activity": activity,
        "total_frames": total,
        "max_frames": draw(st.integers(1, 300)),
        "min_gap_frames": draw(st.integers(1, 12)),
        "shot_cuts": draw(st.lists(st.integers(0, total), max_size=3)),
        "n_gpus": draw(st.integers(1, 4)),
        "max_persons": draw(st.integers(1, 2)),
    }


@settings(max_examples=150, deadline=None)
@given(episodes())
def test_plan_rules_hold_for_any_episode(episode: dict) -> None:
    plan = plan_segments(**episode)
    check_rules(plan, episode["activity"])


@settings(max_examples=100, deadline=None)
@given(episodes())
def test_forced_cuts_are_as_few_as_the_speech_allows(episode: dict) -> None:
    """Between two places where no word is split (or a shot cut) d frames apart, ceil(d / max) - 1 forced cuts."""
    plan = plan_segments(**episode)
    total, limit = episode["total_frames"], episode["max_frames"]
    active = np.array(list(episode["activity"].values()))
    free = [c for c in range(1, total) if not (active[:, c - 1] & active[:, c]).any()]
    bounds = sorted({0, total, *free, *(c for c in episode["shot_cuts"] if 0 < c < total)})
    needed = sum(math.ceil((b - a) / limit) - 1 for a, b in zip(bounds, bounds[1:], strict=False))
    assert plan.cut_counts().get("forced", 0) == needed


FORCED = 10_000  # one forced cut outweighs any number of crowded segments (at most 700 here)


def best_without_short_pieces(episode: dict, shortest: int) -> float:
    """Brute force over every frame: the least FORCED * cuts inside speech + segments with more speakers than
    max_persons, of any plan whose pieces are at most max_frames long and, but for a shot shorter than `shortest`,
    at least `shortest` (inf if there is none)."""
    total, limit, persons = episode["total_frames"], episode["max_frames"], episode["max_persons"]
    active = np.array(list(episode["activity"].values())).reshape(len(episode["activity"]), -1)
    counts = np.concatenate([np.zeros((len(active), 1), int), np.cumsum(active, 1)], 1)
    inside = np.zeros(total + 1)
    inside[1:total] = (active[:, :-1] & active[:, 1:]).any(0)
    bounds = sorted({0, total, *(c for c in episode["shot_cuts"] if 0 < c < total)})
    best = 0.0
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        low = min(shortest, hi - lo)
        cost = np.full(hi - lo + 1, np.inf)
        cost[0] = 0.0
        for x in range(low, hi - lo + 1):
            starts = np.arange(max(0, x - limit), x - low + 1)
            crowded = ((counts[:, lo + x, None] - counts[:, lo + starts]) > 0).sum(0) > persons
            cost[x] = (cost[starts] + crowded).min() + FORCED * (inside[lo + x] if lo + x < hi else 0)
        best += cost[-1]
    return best


def short_pieces(plan: SegmentPlan) -> set[tuple[int, int]]:
    """Segments shorter than the plan's minimum that are not a whole shot (or the whole episode)."""
    bounds = {0, plan.total_frames, *plan.shot_cuts}
    return {
        (s.start_frame, s.end_frame)
        for s in plan.segments
        if s.num_frames < plan.min_frames and not {s.start_frame, s.end_frame} <= bounds
    }


@settings(max_examples=100, deadline=None)
@given(episodes(), st.integers(1, 120))
def test_no_segment_is_shorter_than_a_chunk_unless_the_rules_allow(episode: dict, chunk: int) -> None:
    """A segment shorter than the minimum (one chunk, or half the limit when that is less) is a whole shot or the
    whole episode, or every plan without one takes more forced cuts inside speech or more crowded segments.
    Balancing across GPUs makes no new one (it may crowd more segments, so the count is the one-GPU plan's)."""
    plan = plan_segments(**episode, min_frames=chunk)
    check_rules(plan, episode["activity"])
    assert plan.min_frames == min(chunk, (episode["max_frames"] + 1) // 2)
    one_gpu = plan_segments(**{**episode, "n_gpus": 1}, min_frames=chunk)
    assert short_pieces(plan) <= short_pieces(one_gpu)
    if short_pieces(one_gpu):
        forced = one_gpu.cut_counts().get("forced", 0)
        ours = FORCED * forced + sum(bool(s.extra_speakers) for s in one_gpu.segments)
        assert best_without_short_pieces(episode, plan.min_frames) > ours, short_pieces(one_gpu)


def test_the_default_minimum_is_one_chunk_and_slivers_of_silence_merge() -> None:
    """Two people over a still: speech with short gaps, where a 1-frame piece used to fix the next cut's 4n+1
    length. Every segment is now at least one chunk; the preview engine (time per frame, no overhead) too."""
    total = 2000
    runs = [(s, s + 70 + (s % 7)) for s in range(0, total - 100, 83)]
    activity = {"ana": talk(total, *runs[0::2]), "ben": talk(total, *runs[1::2])}
    for render in (RenderCost(), RenderCost(engine="preview")):
        plan = plan_segments(activity, total, max_frames=997, settings=render)
        check_rules(plan, activity)
        assert plan.min_frames == min_useful_frames(render) == 81
        assert min(s.num_frames for s in plan.segments) >= 81, [s.num_frames for s in plan.segments]


def test_a_shot_shorter_than_a_chunk_is_its_own_segment() -> None:
    total = 400
    activity = {"ana": talk(total, (0, 390))}
    plan = plan_segments(activity, total, max_frames=997, shot_cuts=[100, 130])
    assert [(s.start_frame, s.end_frame) for s in plan.segments] == [(0, 100), (100, 130), (130, 400)]


@settings(max_examples=40, deadline=None)
@given(episodes())
def test_plan_is_deterministic_and_round_trips_json(episode: dict) -> None:
    plan = plan_segments(**episode)
    assert plan_segments(**episode) == plan
    assert SegmentPlan.from_json(plan.to_json()) == plan


@settings(max_examples=60, deadline=None)
@given(episodes())
def test_no_forced_cut_when_speech_has_pauses_within_reach(episode: dict) -> None:
    """Speech in short bursts with silences of the gap between them: a forced cut is never needed."""
    gap, burst = episode["min_gap_frames"], max(1, episode["max_frames"] - episode["min_gap_frames"] - 4)
    total = episode["total_frames"]
    runs = [(s, min(s + burst, total)) for s in range(gap, total, burst + gap)]
    activity = {"ana": talk(total, *runs)}
    plan = plan_segments(activity, total, max_frames=episode["max_frames"], min_gap_frames=gap)
    check_rules(plan, activity)
    assert "forced" not in plan.cut_counts()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 150), st.integers(4, 30)), min_size=1, max_size=8))
def test_a_cut_in_a_gap_of_4_frames_or_more_leaves_a_4n_plus_1_segment(lines: list[tuple[int, int]]) -> None:
    """Two people alternate lines (length, then the gap after it); one person per segment forces a cut in every
    gap, and each gap is wide enough for the cut to land where the segment before it is 4n+1."""
    t = 0
    runs: dict[str, list[tuple[int, int]]] = {"ana": [], "ben": []}
    for k, (length, gap) in enumerate(lines):
        runs[("ana", "ben")[k % 2]].append((t, t + length))
        t += length + gap
    activity = {name: talk(t, *spans) for name, spans in runs.items()}
    # Lines far shorter than a chunk: no minimum length here (it would move cuts off 4n+1 to spare a piece).
    plan = plan_segments(activity, t, max_frames=t + 8, min_gap_frames=4, max_persons=1, min_frames=1)
    check_rules(plan, activity)
    assert all(s.num_frames % 4 == 1 for s in plan.segments[:-1])
    assert not any(s.extra_speakers for s in plan.segments)


def test_cuts_in_the_gap_and_keeps_segments_4n_plus_1() -> None:
    total = 400
    activity = {"ana": talk(total, (0, 90), (180, 260)), "ben": talk(total, (110, 170), (300, 395))}
    # Lines shorter than a chunk, tested without the minimum length (test_no_segment_is_shorter_than_a_chunk...).
    plan = plan_segments(activity, total, max_frames=120, min_gap_frames=8, min_frames=1)
    check_rules(plan, activity)
    assert all(s.num_frames % 4 == 1 for s in plan.segments[:-1])
    assert all(s.end_cut == "silence" for s in plan.segments[:-1])
    assert plan.segments[0].speakers == ("ana",)


def test_continuous_speech_is_cut_at_the_quietest_frame_and_flagged() -> None:
    total = 40 * FPS  # 40 s without a pause
    activity = {"ana": np.ones(total, bool)}
    loudness = np.full(total, 0.5)
    loudness[420] = loudness[421] = 0.01  # a quiet moment: the boundary c = 421 has both neighbours quiet
    plan = plan_segments(activity, total, max_frames=600, energy={"ana": loudness})
    check_rules(plan, activity)
    assert [s.end_frame for s in plan.segments] == [
        421,
        total,
    ]  # one cut is enough; the quiet moment is in reach
    assert plan.segments[0].end_cut == "forced"
    assert "forced cut" in format_plan_table(plan)


def test_shot_cuts_are_always_cut() -> None:
    total = 300
    activity = {"ana": np.ones(total, bool)}
    plan = plan_segments(activity, total, max_frames=500, shot_cuts=[137])
    assert [s.end_frame for s in plan.segments] == [137, 300]
    assert plan.segments[0].end_cut == "shot"


def test_a_third_speaker_is_cut_away_at_a_turn_before_crowding_a_segment() -> None:
    # ana, then ben after a 3-frame pause, then cy the moment ben stops: no silence of the gap anywhere, so the
    # planner cuts in the pause rather than render a three-talk.
    total = 300
    activity = {"ana": talk(total, (0, 60)), "ben": talk(total, (63, 150)), "cy": talk(total, (150, 290))}
    # Without the minimum length: with it, a 61-frame first piece loses to the turn at 150 (a chunk saved).
    plan = plan_segments(activity, total, max_frames=400, min_gap_frames=8, min_frames=1)
    check_rules(plan, activity)
    assert all(len(s.speakers) <= 2 and not s.extra_speakers for s in plan.segments)
    assert plan.cut_counts() == {"pause": 1}
    assert 60 < plan.segments[0].end_frame < 63


def test_three_people_at_once_keeps_the_two_loudest_and_flags_it() -> None:
    total = 200
    activity = {name: np.ones(total, bool) for name in ("ana", "ben", "cy")}
    energy = {"ana": np.full(total, 0.2), "ben": np.full(total, 0.05), "cy": np.full(total, 0.4)}
    plan = plan_segments(activity, total, max_frames=400, energy=energy)
    (segment,) = plan.segments
    assert segment.speakers == ("ana", "cy") and segment.extra_speakers == ("ben",)
    assert "three-talk" in segment.flags
    assert "ben as background" in format_plan_table(plan)


def test_several_gpus_get_balanced_pieces() -> None:
    total = 3000
    # 5.6 s lines, 0.4 s pauses: with cuts allowed anywhere in a pause, 3.6 s lines already give one GPU a
    # plan that four share evenly, and balancing has nothing left to improve
    runs = [(s, s + 140) for s in range(0, total, 150)]
    activity = {"ana": talk(total, *runs)}
    one = plan_segments(activity, total, max_frames=997, n_gpus=1)
    four = plan_segments(activity, total, max_frames=997, n_gpus=4)
    check_rules(four, activity)
    assert four.makespan_s() <= 1.10 * four.ideal_s()
    assert four.makespan_s() < one.makespan_s(4)


def test_segment_audio_and_picture_line_up_to_the_sample() -> None:
    segment = Segment(index=0, start_frame=81, end_frame=162)
    assert segment.start_sample(RATE) == 81 * 640 and segment.end_sample(48_000) == 162 * 1920
    assert segment.start_s == pytest.approx(3.24)


def test_speech_activity_finds_the_bursts_on_the_frame_grid() -> None:
    audio = np.concatenate([silence(1.0), tone(1.0), silence(1.0), tone(0.5), silence(0.52)])
    active = speech_activity(audio, RATE, hangover_frames=0, onset_frames=0)
    assert len(active) == len(audio) * FPS // RATE == 100
    assert active[25:50].all() and active[75:87].all()
    assert not active[:25].any() and not active[50:75].any() and not active[88:].any()
    assert len(frame_rms(audio[:639], RATE)) == 0


def test_speech_activity_hangover_bridges_short_stops() -> None:
    # A 3-frame stop inside a word.
    audio = np.concatenate([tone(0.4), silence(0.12), tone(0.4), silence(1.0)])
    active = speech_activity(audio, RATE)
    assert active[:23].all()
    assert not active[-10:].any()


def test_out_of_memory_splits_only_the_failing_segment() -> None:
    """The flow's split path (flows/memory_split.py): each segment over the fake memory limit is split at its
    best inner cut, the halves again while they still fail; every other segment is left alone."""
    total = 600
    runs = [(s, s + 40) for s in range(0, total, 60)]  # pauses of 20 frames every 60
    activity = {"ana": talk(total, *runs)}
    plan = plan_segments(activity, total, max_frames=400, min_gap_frames=8)
    final = plan
    while failing := [s for s in final.segments if s.num_frames > 150]:  # out of memory above 150 frames
        for segment in failing:
            final = split_segment(final, segment.index, activity)
    check_rules(final, activity)
    assert any(s.split_from is not None for s in final.segments)
    untouched = [s for s in plan.segments if s.num_frames <= 150]
    assert all(s in final.segments for s in untouched)
    assert all(s.end_cut != "forced" for s in final.segments)


def test_split_picks_an_inner_silence_near_the_middle() -> None:
    total = 400
    activity = {"ana": talk(total, (0, 100), (120, 300), (320, 400))}
    plan = plan_segments(activity, total, max_frames=400)
    (only,) = plan.segments
    split = split_segment(plan, only.index, activity)
    first, second = split.segments
    assert 100 <= first.end_frame <= 120 and first.end_cut == "silence"
    assert first.split_from == second.split_from == only.index and "split" in first.flags


def test_a_one_frame_segment_cannot_be_split() -> None:
    plan = plan_segments({"ana": np.ones(1, bool)}, 1, max_frames=1)
    with pytest.raises(ValueError, match="cannot be split"):
        split_segment(plan, plan.segments[0].index, {"ana": np.ones(1, bool)})


def test_estimates_come_from_the_memory_model() -> None:
    reference_like = RenderCost(keep_frames="host_fp32")
    activity = {"ana": np.ones(500, bool)}
    streaming = plan_segments(activity, 500, max_frames=500).segments[0]
    keeping = plan_segments(activity, 500, max_frames=500, settings=reference_like).segments[0]
    assert keeping.host_bytes > streaming.host_bytes + 500 * 4 * 2**20
    assert streaming.gpu_bytes == keeping.gpu_bytes and streaming.est_seconds > 0


def test_a_hand_over_without_a_pause_is_a_turn_cut() -> None:
    total = 300
    activity = {"ana": talk(total, (0, 60)), "ben": talk(total, (61, 150)), "cy": talk(total, (150, 290))}
    plan = plan_segments(activity, total, max_frames=400)
    check_rules(plan, activity)
    assert not any(s.extra_speakers for s in plan.segments)
    assert plan.cut_counts() == {"turn": 1}


def test_no_speakers_at_all_is_one_silent_plan() -> None:
    plan = plan_segments({}, 100, max_frames=60)
    assert [s.speakers for s in plan.segments] == [(), ()]
    assert plan.segments[0].num_frames % 4 == 1


def test_bad_arguments_name_the_rule() -> None:
    with pytest.raises(ValueError, match="max_frames=0"):
        plan_segments({"ana": np.ones(10, bool)}, 10, max_frames=0)


# ---------------------------------------------------------------------------------------------- memory model


def test_worker_memory_reports_this_machine() -> None:
    gpu, host = memory.worker_memory()
    assert gpu >= 0 and host > 0


def test_memory_model_reproduces_the_measured_h100_figures() -> None:
    """MEMORY.md: 480p 81-frame forward 4.22-4.27 s eager; 720p 81-frame DiT 15.95 GiB reserved beyond weights;
    an 80 GB card with everything resident fits the fp32 decode at 480p (35.7 + 12.6 GiB)."""
    one_pass = RenderCost(steps=1, cfg_passes=1, vae_dtype="bf16", vae_tiled=True)
    chunk = estimate_seconds(81, one_pass) - memory.SEGMENT_OVERHEAD_S
    vae = memory.VAE_DECODE_S_PER_LATENT["bf16"] * 21 * memory.VAE_TILED_TIME_FACTOR
    assert chunk - vae - memory.VAE_ENCODE_S_PER_CHUNK["bf16"] == pytest.approx(4.24, rel=0.03)
    dit_720 = RenderCost(size=720, vae_dtype="bf16", vae_tiled=True)
    weights = 40 * memory.BLOCK_WEIGHTS + memory.NON_BLOCK_WEIGHTS
    overhead = memory.CUDA_CONTEXT + weights + memory.VAE_WEIGHTS["bf16"] + memory.CONDITIONING
    assert estimate_peak(81, dit_720).gpu_bytes / GiB - overhead == pytest.approx(15.95, abs=0.05)
    assert estimate_peak(81, RenderCost()).gpu_bytes < 79.2 * GiB


def test_memory_model_explains_the_walkthrough_out_of_memory() -> None:
    """The reference keeps fp32 frames in host RAM: on an 18 GiB host a 17 s piece fits and the 27 s line does not."""
    reference = RenderCost(keep_frames="host_fp32", offload="model")
    limit = max_frames_that_fit(80 * GiB, 18 * GiB, reference)
    assert 17 * FPS <= limit < 27 * FPS and limit % 4 == 1
    assert max_frames_that_fit(80 * GiB, 18 * GiB, RenderCost()) == 997  # streaming: only the ceiling
    assert max_frames_that_fit(40 * GiB, 64 * GiB, RenderCost()) == 0  # 35 GiB of weights + decode: no


def test_memory_model_options_move_the_numbers_the_right_way() -> None:
    base = RenderCost()
    streamed = RenderCost(offload="group", resident_blocks=2)
    assert estimate_peak(81, streamed).gpu_bytes < estimate_peak(81, base).gpu_bytes - 30 * GiB
    assert estimate_peak(81, streamed).host_bytes > estimate_peak(81, base).host_bytes + 30 * GiB
    assert estimate_peak(81, RenderCost(quantize="fp8")).gpu_bytes < estimate_peak(81, base).gpu_bytes
    assert estimate_peak(81, RenderCost(cfg_batch=True)).gpu_bytes > estimate_peak(81, base).gpu_bytes
    assert estimate_seconds(81, RenderCost(compile=True)) < estimate_seconds(81, base)
    assert chunk_count(81, base) == 1 and chunk_count(137, base) == 2 and chunk_count(138, base) == 3
    assert chunk_count(153, RenderCost(engine="infinitetalk")) == 2  # 9 motion frames: 72 new per chunk
    preview = RenderCost(engine="preview")
    assert estimate_peak(10_000, preview).gpu_bytes == 0 and estimate_peak(10_000, preview).host_bytes < GiB
    with pytest.raises(ValueError, match="4n\\+1"):
        RenderCost(frame_num=80)


def test_a_chained_plan_runs_each_shot_serially_and_is_not_split_for_balance() -> None:
    """render.chain: a shot's segments continue one another, so they are one job for the workers."""
    total = 1200
    activity = {"ana": talk(total, *[(s, s + 40) for s in range(0, total, 60)])}
    free = plan_segments(activity, total, max_frames=300, min_gap_frames=8, n_gpus=4, shot_cuts=(600,))
    chained = plan_segments(
        activity, total, max_frames=300, min_gap_frames=8, n_gpus=4, shot_cuts=(600,), chained=True
    )
    unbalanced = plan_segments(activity, total, max_frames=300, min_gap_frames=8, n_gpus=1, shot_cuts=(600,))
    assert [s.end_frame for s in chained.segments] == [s.end_frame for s in unbalanced.segments]
    assert len(free.segments) >= len(chained.segments)
    shots = chained.jobs_seconds()
    assert len(shots) == 2 and abs(sum(shots) - chained.total_seconds) < 1e-6
    assert chained.makespan_s() == max(shots) >= free.makespan_s()
    assert SegmentPlan.from_json(chained.to_json()) == chained  # recorded in plan.json
