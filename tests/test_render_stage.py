"""The render stage's adaptation of a planned segment into an engine job."""

from __future__ import annotations

from engine.base import Box
from tasks.render import PersonSpec, _job_box, engine_persons
from tasks.segment import SegmentSpec

ANA = PersonSpec("ana", "Ana", [0, 0, 10, 10])
BEN = PersonSpec(
    "ben",
    "Ben",
    [{"from": 0, "to": 2, "box": [20, 0, 30, 10]}, {"from": 2, "to": None, "box": [40, 0, 50, 10]}],
)
EVE = PersonSpec("eve", "Eve", [60, 0, 70, 10])


def test_multitalk_gets_only_the_segment_speakers_and_preview_everyone():
    seg = SegmentSpec(0, 0, 25, ("ben", "eve"))
    assert engine_persons((ANA, BEN, EVE), seg, "multitalk") == (BEN, EVE)
    assert engine_persons((ANA, BEN, EVE), seg, "preview") == (ANA, BEN, EVE)
    silent = SegmentSpec(1, 25, 50, ())
    assert engine_persons((ANA, BEN, EVE), silent, "multitalk") == (ANA,)


def test_timed_boxes_are_moved_onto_the_segment_timeline():
    assert _job_box(ANA.box, SegmentSpec(0, 100, 150, ())) == Box(0, 0, 10, 10)
    # the box changes at 2 s = frame 50, i.e. frame 10 of a segment starting at frame 40
    assert _job_box(BEN.box, SegmentSpec(0, 40, 80, ())) == (
        (0, Box(20, 0, 30, 10)),
        (10, Box(40, 0, 50, 10)),
    )
    assert _job_box(BEN.box, SegmentSpec(0, 60, 80, ())) == Box(40, 0, 50, 10)


def test_render_stage_drives_the_multitalk_engine_with_a_tiny_model(tmp_path):
    """A planned two-speaker segment through render_segment into the real MultiTalk code path (tiny weights)."""
    import numpy as np
    from PIL import Image

    from engine.base import register_engine
    from engine.media import count_video_frames, write_wav
    from tasks.render import RenderOptions, render_segment
    from tasks.workspace import Workspace

    register_engine("multitalk-tiny", "tests.test_render_stage:_tiny_multitalk")
    ws = Workspace(tmp_path / "ws")
    Image.new("RGB", (96, 64), "gray").save(tmp_path / "p.png")
    picture = ws.put_file(tmp_path / "p.png")
    rng = np.random.default_rng(0)
    audio = {
        sid: ws.put_file(write_wav(tmp_path / f"{sid}.wav", 0.1 * rng.standard_normal(14 * 640), 16000))
        for sid in ("ana", "ben")
    }
    persons = (PersonSpec("ana", "Ana", [0, 0, 48, 64]), PersonSpec("ben", "Ben", [48, 0, 96, 64]))
    seg = SegmentSpec(3, 100, 113, ("ana", "ben"))
    options = RenderOptions("multitalk-tiny", 480, 2, 7, "two people", 5.0, 4.0)
    clip = render_segment(ws, seg, picture, audio, persons, (), options)
    assert clip.num_frames == 13 and count_video_frames(ws.path(clip.video)) == 13


def test_a_segment_renders_its_overlap_driven_by_the_next_segments_audio(tmp_path, monkeypatch):
    """overlap 4: the audio cut runs 4 frames past the segment's end, and the engine (the fake one, through
    the shared render path) renders those frames too; the clip says how many of them are overlap."""
    import numpy as np
    from PIL import Image

    from engine.base import register_engine
    from engine.media import count_video_frames, write_wav
    from tasks.render import RenderOptions, cut_segment_audio, render_segment
    from tasks.segment import with_overlaps
    from tasks.speakers import MIX_RATE
    from tasks.workspace import Workspace

    monkeypatch.setenv("DUBFLOW_FAKE_LOAD_S", "0")
    register_engine("fake-overlap", "engine.fake:SlowRenderer")
    ws = Workspace(tmp_path / "ws")
    Image.new("RGB", (64, 64), "gray").save(tmp_path / "p.png")
    track = np.random.default_rng(0).standard_normal(MIX_RATE * 2).astype(np.float32) * 0.1  # 50 frames
    tracks = {"ana": ws.put_file(write_wav(tmp_path / "ana.wav", track, MIX_RATE))}
    segments = list(with_overlaps((SegmentSpec(0, 0, 20, ("ana",)), SegmentSpec(1, 20, 50, ("ana",))), 4))
    slices = cut_segment_audio(ws, tracks, segments)
    import soundfile as sf

    lengths = [sf.info(str(ws.path(s["ana"]))).frames for s in slices]
    assert lengths == [24 * 640, 30 * 640]  # 16 kHz: 640 samples a frame; the first runs 4 frames on
    options = RenderOptions("fake-overlap", 480, 1, 7, "", 5.0, 4.0)
    picture = ws.put_file(tmp_path / "p.png")
    clip = render_segment(ws, segments[0], picture, slices[0], (ANA,), (), options)
    assert (clip.num_frames, clip.overlap) == (24, 4) and count_video_frames(ws.path(clip.video)) == 24
    last = render_segment(ws, segments[1], picture, slices[1], (ANA,), (), options)
    assert (last.num_frames, last.overlap) == (30, 0)


def _tiny_multitalk(**settings):
    from engine.multitalk.renderer import MultiTalkRenderer

    return MultiTalkRenderer(tiny=True, **settings)


def test_render_progress_updates_a_prefect_artifact_at_most_twice_a_second(monkeypatch):
    """Long renders show progress in the UI: the engine's hook drives one progress artifact per segment."""
    import prefect.artifacts as artifacts
    import prefect.runtime.task_run as task_run

    from tasks import render

    calls = []
    monkeypatch.setattr(task_run, "name", "render[ep#03]", raising=False)
    monkeypatch.setattr(
        artifacts, "create_progress_artifact", lambda **kw: calls.append(("create", kw)) or "id-1"
    )
    monkeypatch.setattr(artifacts, "update_progress_artifact", lambda **kw: calls.append(("update", kw)))
    clock = iter([0.0, 0.1, 0.2, 0.7, 0.8, 0.9])
    hook = render.render_progress(clock=lambda: next(clock))
    assert calls[0] == (
        "create",
        {"progress": 0.0, "key": "render-ep-03", "description": "render[ep#03]: rendering"},
    )
    hook("encode", 1, 2)  # not the long stage: ignored
    for done in (1, 2, 3, 4, 5, 6):  # at 0.0, 0.1, 0.2, 0.7, 0.8, 0.9 s: one update per 0.5 s, and the last
        hook("denoise", done, 6, chunk=0)
    updates = [kw["progress"] for what, kw in calls if what == "update"]
    assert updates == [16.7, 66.7, 100.0]
