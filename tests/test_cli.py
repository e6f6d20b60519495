"""CLI behaviour that needs no flow run: one-line errors and exit codes, doctor."""

from __future__ import annotations

import json

from flows.cli import main


def test_run_with_a_bad_manifest_exits_2_with_located_lines(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("episode: x\nsource: missing.png\nspeakers: []\n")
    assert main(["run", str(bad), "--workspace", str(tmp_path / "ws")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2:" in err and f"{bad}:3:" in err and "Traceback" not in err
    assert not (tmp_path / "ws").exists()  # nothing is created for an invalid manifest


def test_status_of_an_episode_never_run(tmp_path, capsys):
    manifest = tmp_path / "m.yaml"
    manifest.write_text("episode: never\nsource: x.png\nspeakers: [{id: a}]\n")
    assert main(["status", str(manifest), "--workspace", str(tmp_path / "ws")]) == 1
    assert "has not been run" in capsys.readouterr().err


def test_doctor_reports_tools_and_auto_choices(capsys):
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tools"]["ffmpeg"]["found"]
    assert report["stages"]["separate"]["auto"] in {"dsp", "demucs"}
    assert report["stages"]["render"]["auto"] in {"preview", "multitalk"}
    assert report["stages"]["render"]["by_source"]["video"]["auto"] in {"preview", "infinitetalk"}
    assert report["gpus"] == []  # CI and development machines have none


def test_status_record_marks_failed_and_pending_segments():
    from flows.cli import status_record

    run = {
        "episode": "ep",
        "state": "failed",
        "planned_segments": [0, 1, 2, 3],
        "failed_segments": [1],
        "stages": [
            {"stage": "plan", "state": "cached"},
            {"stage": "render[ep#00]", "state": "executed", "outputs": ["store/aa/x.mp4"]},
            {"stage": "render[ep#02]", "state": "cached", "outputs": ["store/bb/y.mp4"]},
        ],
    }
    status = status_record(run)
    assert [(s["segment"], s["state"]) for s in status["segments"]] == [
        (0, "executed"),
        (1, "failed"),
        (2, "cached"),
        (3, "pending"),
    ]
    assert [s["stage"] for s in status["stages"]] == ["plan"]
