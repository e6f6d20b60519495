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
    assert report["gpus"] == []  # CI and development machines have none
