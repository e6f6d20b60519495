"""Re-running failed segments: only they are rendered again, then stitched; forced segments use refresh_cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from flows.cli import main
from flows.rerun import cached_segments, failed_segments, parse_segments, rendered_segments, segment_stages
from tasks.demo import BOXES, LINES

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("prefect_server"),
]  # end-to-end through a Prefect server


def write_manifest(folder: Path, media: dict[str, Path], episode: str, extra_render: str = "") -> Path:
    """The demo episode in `folder`, rendered by `preview` in pieces of at most 2 s."""
    for name in ("scene", "ana", "ben", "dialogue"):
        shutil.copy(media[name], folder / media[name].name)
    speakers = "\n".join(f"  - {{id: {s}, box: {list(b)}, track: {s}.wav}}" for s, b in BOXES.items())
    lines = "\n".join(f'  - {{speaker: {w}, start: {s}, text: "{t}"}}' for w, s, t, _ in LINES)
    path = folder / f"{episode}.yaml"
    path.write_text(
        f"episode: {episode}\nsource: scene.png\naudio: {{dialogue: dialogue.wav}}\n"
        f"speakers:\n{speakers}\nlines:\n{lines}\n"
        f"separate: {{backend: dsp}}\nrender: {{engine: preview, size: 480, max_segment_s: 2{extra_render}}}\n"
    )
    return path


@pytest.fixture
def fake_engine(monkeypatch, tmp_path) -> Path:
    """The fast fake engine in place of `preview`; returns its fault file (frames that fail)."""
    faults = tmp_path / "faults.json"
    monkeypatch.setenv("DUBFLOW_ENGINE_OVERRIDES", "preview=engine.fake:SlowRenderer")
    monkeypatch.setenv("DUBFLOW_FAKE_LOAD_S", "0")
    monkeypatch.setenv("DUBFLOW_FAKE_FAULTS", str(faults))
    return faults


def last_run(ws: Path, episode: str) -> dict:
    return json.loads((ws / "episodes" / episode / "runs.jsonl").read_text().splitlines()[-1])


@pytest.fixture(scope="module")
def media_folder(tmp_path_factory, demo_media) -> tuple[Path, dict[str, Path]]:
    return tmp_path_factory.mktemp("rerun"), demo_media


def test_rerun_renders_only_the_failed_segments_then_restitches(media_folder, fake_engine, capsys):
    folder, media = media_folder
    manifest, ws = write_manifest(folder, media, "rr1"), folder / "work"
    fake_engine.write_text(json.dumps({"fail_frames": [30, 160]}))  # 1.2 s and 6.4 s: two segments
    assert main(["run", str(manifest), "--workspace", str(ws)]) == 1
    first = last_run(ws, "rr1")
    failed = failed_segments(first)
    assert first["state"] == "failed" and len(failed) == 2
    assert "InjectedFault" in " ".join(s.get("error", "") for s in first["stages"])
    assert len(rendered_segments(first)) >= 3  # the other segments went on and finished
    capsys.readouterr()

    fake_engine.write_text("{}")  # the fault is fixed
    assert main(["rerun", str(manifest), "--workspace", str(ws)]) == 0
    second = last_run(ws, "rr1")
    assert second["state"] == "completed"
    assert rendered_segments(second) == failed
    assert cached_segments(second) == rendered_segments(first)
    states = {s["stage"]: s["state"] for s in second["stages"]}
    assert states["stitch"] == "executed" and states["plan"] == "cached"
    assert Path(second["outputs"]["rr1.mp4"]).stat().st_size > 0
    assert f"rendered 2 segment(s) (#{failed[0]:02d}, #{failed[1]:02d})" in capsys.readouterr().out


def test_rerun_chosen_segments_forces_them_even_when_cached(media_folder, fake_engine):
    folder, media = media_folder
    manifest, ws = write_manifest(folder, media, "rr2"), folder / "work"
    assert main(["run", str(manifest), "--workspace", str(ws)]) == 0
    assert main(["rerun", str(manifest), "--workspace", str(ws), "--segments", "1"]) == 0
    run = last_run(ws, "rr2")
    assert rendered_segments(run) == [1]
    assert {s["stage"]: s["state"] for s in run["stages"]}["stitch"] == "cached"  # same clip bytes


def test_segment_override_rerenders_only_that_segment(media_folder, fake_engine):
    folder, media = media_folder
    manifest, ws = write_manifest(folder, media, "rr3"), folder / "work"
    assert main(["run", str(manifest), "--workspace", str(ws)]) == 0
    write_manifest(folder, media, "rr3", extra_render=", overrides: {2: {seed: 11}}")
    assert main(["run", str(manifest), "--workspace", str(ws)]) == 0
    run = last_run(ws, "rr3")
    assert rendered_segments(run) == [2]
    segment = next(s for s in segment_stages(run) if s["stage"] == "render[rr3#02]")
    assert {"start", "end", "speakers", "worker", "seconds"} <= set(segment)


def test_rerun_of_an_episode_never_run_is_one_clear_line(media_folder, fake_engine, capsys):
    folder, media = media_folder
    manifest = write_manifest(folder, media, "never")
    assert main(["rerun", str(manifest), "--workspace", str(folder / "empty")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has not been run" in err and "Traceback" not in err


def test_bad_segment_list_is_rejected_before_any_run(media_folder, capsys):
    folder, media = media_folder
    manifest = write_manifest(folder, media, "badlist")
    assert main(["rerun", str(manifest), "--segments", "3,x"]) == 2
    assert "'x' is not a segment number" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"), [("3,7", [3, 7]), ("2-4, 9", [2, 3, 4, 9]), ("5,5", [5]), (" 0 ", [0])]
)
def test_parse_segments(text, expected):
    assert parse_segments(text) == expected


@pytest.mark.parametrize("text", ["", "a", "4-2", "-1", "1,,x"])
def test_parse_segments_rejects(text):
    with pytest.raises(ValueError, match="--segments"):
        parse_segments(text)


def test_out_of_memory_segments_take_the_planners_split_path(media_folder, fake_engine):
    folder, media = media_folder
    manifest = write_manifest(
        folder, media, "oom", extra_render=", seed: 99"
    )  # nothing from other tests' cache
    ws = folder / "work-oom"
    fake_engine.write_text(json.dumps({"oom_above_frames": 30}))  # segments run up to 49 frames
    assert main(["run", str(manifest), "--workspace", str(ws)]) == 0  # stitch checks every frame is there
    run = last_run(ws, "oom")
    split = [s for s in segment_stages(run) if s["state"] == "split"]
    assert split and all(len(s["split_into"]) == 2 for s in split)
    assert "OutOfMemory" in split[0]["error"]
    assert not failed_segments(run)
    # the published plan records the split: the halves replace their segment, in picture order
    published = json.loads((ws / "episodes" / "oom" / "out" / "plan.json").read_text())
    halves = [s for s in published["segments"] if s["split_from"] is not None]
    split_ids = {int(s["stage"].split("#")[1].rstrip("]")) for s in split}
    assert {h["split_from"] for h in halves} == split_ids
    assert all("split" in h["flags"] for h in halves)
    assert not split_ids & {s["index"] for s in published["segments"]}
    starts = [s["start_frame"] for s in published["segments"]]
    ends = [s["end_frame"] for s in published["segments"]]
    assert starts[0] == 0 and starts[1:] == ends[:-1] and ends[-1] == published["total_frames"]
    assert all(s["end_frame"] - s["start_frame"] <= 30 for s in published["segments"])
    assert main(["run", str(manifest), "--workspace", str(ws)]) == 0
    assert rendered_segments(last_run(ws, "oom")) == []  # split again, the halves come from the cache
