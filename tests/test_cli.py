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
    assert report["stages"]["separate"]["auto"] in {"dsp", "dfn", "demucs"}
    assert report["stages"]["render"]["auto"] in {"preview", "multitalk"}
    assert report["stages"]["render"]["by_source"]["video"]["auto"] in {"preview", "infinitetalk"}
    assert report["gpus"] == []  # CI and development machines have none
    spandrel = report["stages"]["enhance"]["backends"]["spandrel"]
    assert spandrel.startswith("installed, imports with")
    assert spandrel.endswith("face restorers (GFPGAN, RestoreFormer): MTCNN landmarks available")


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


def test_usage_mistakes_exit_2_with_clicks_message_not_a_traceback(capsys):
    assert main([]) == 2  # the help, then exit 2
    assert "Commands" in capsys.readouterr().out
    for argv, words in [
        (["nope"], "No such command 'nope'"),
        (["run"], "Missing argument 'FILE'"),
        (["workers", "bogus"], "'bogus' is not one of"),
        (["validate", "x.yaml", "--bogus"], "No such option: --bogus"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert words.lower() in err.lower() and "Traceback" not in err, (argv, err)


def test_every_command_shares_the_workspace_option(capsys):
    for command in ("run", "rerun", "status", "plan", "bind", "demo", "workers"):
        with_help = main([command, "--help"])
        assert with_help == 0 and "--workspace" in capsys.readouterr().out, command


def test_debug_shows_the_traceback_as_well_as_the_line(tmp_path, capsys, monkeypatch):
    import flows.cli as cli

    def failing_stage(file, workspace, until):  # what _run_until does with a stage that raises
        try:
            raise RuntimeError("stage exploded\nsecond line")
        except RuntimeError as exc:
            return cli._fail_with(exc, f"{until} failed"), None

    monkeypatch.setattr(cli, "_run_until", failing_stage)
    manifest = tmp_path / "m.yaml"
    assert main(["plan", str(manifest)]) == 1
    assert capsys.readouterr().err == "dubflow: plan failed: RuntimeError: stage exploded\n"
    assert main(["--debug", "plan", str(manifest)]) == 1
    loud = capsys.readouterr().err
    assert "Traceback" in loud and "failing_stage" in loud
    assert loud.endswith("dubflow: plan failed: RuntimeError: stage exploded\n")


def test_status_tables_show_stage_labels_as_written():
    from flows.cli import status_record
    from flows.display import format_status

    run = {
        "episode": "ep",
        "state": "completed",
        "planned_segments": [0, 1],
        "stages": [
            {"stage": "conform[ana]", "state": "cached"},  # brackets are not markup
            {"stage": "render[ep#00]", "state": "executed", "outputs": ["store/aa/x.mp4"]},
            {"stage": "render[ep#01]", "state": "cached", "outputs": ["store/bb/y.mp4"]},
        ],
        "outputs": {"ep.mp4": "/w/ep.mp4"},
    }
    text = format_status(status_record(run))
    assert "conform[ana]" in text and "render[" not in text
    rows = [line.split() for line in text.splitlines()]
    assert ["#00", "executed", "store/aa/x.mp4"] in rows and ["#01", "cached", "store/bb/y.mp4"] in rows
