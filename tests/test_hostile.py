"""Hostile and careless manifests: each refused with located one-line problems, or accepted when valid.

The corpus is tests/hostile_corpus.py (bench/faults.py runs the same one through `dubflow validate` in
fresh processes and reports the worst time and peak memory; timings are never asserted here).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.media import probe
from flows.cli import main
from tasks.limits import Limits, LimitsError
from tasks.manifest import ManifestError, load_manifest
from tests.hostile_corpus import GOOD, TEN_DEFECTS, hostile_cases, write_media

CASES = hostile_cases()


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    return write_media(tmp_path_factory.mktemp("hostile") / "m")


def _relative(path: Path, folder: Path) -> Path:
    """Given as a user types it in the manifest's folder: `dubflow validate ep.yaml`."""
    return path.relative_to(folder) if path != folder and path.is_relative_to(folder) else path


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_manifest_is_refused_at_its_line_or_accepted_when_valid(media, monkeypatch, case):
    monkeypatch.chdir(media)
    path = _relative(case.make(media), media)
    if case.needle is None:
        assert load_manifest(path).manifest.episode == "s01e03"
        return
    with pytest.raises(ManifestError) as caught:
        load_manifest(path)
    lines = str(caught.value).splitlines()
    assert len(lines) == case.count, lines
    assert all(line.startswith(f"{path}:") for line in lines), lines
    assert case.needle in str(caught.value)
    if case.line is not None:
        assert lines[0].startswith(f"{path}:{case.line}:"), lines[0]


def test_cli_refuses_a_fifo_and_a_deep_document_with_one_line_and_exit_2(media, monkeypatch, capsys):
    monkeypatch.chdir(media)
    deep = media / "deep.yaml"
    deep.write_text("episode: x\nspeakers: " + "[" * 900 + "]" * 900 + "\n")
    fifo = next(c for c in CASES if c.name == "fifo").make(media)
    for path in (deep, fifo):
        assert main(["validate", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err


def test_type_errors_do_not_hide_the_cross_field_problems(media, monkeypatch):
    monkeypatch.chdir(media)
    (media / "ten.yaml").write_text(TEN_DEFECTS)
    with pytest.raises(ManifestError) as caught:
        load_manifest("ten.yaml")
    where = [(p.line, p.field) for p in caught.value.problems]
    assert where == [
        (1, "episode"),
        (5, "speakers[0].box[1]"),
        (7, "speakers[1].id"),  # duplicate id: a cross-field check
        (8, "speakers[1].box"),  # outside the frame
        (11, "lines[0].speaker"),  # unknown speaker
        (12, "lines[1].end"),  # end before start
        (13, "lines[2].start"),
        (14, "render.seed"),
        (14, "render.text_scale"),
        (15, "mix.loudness_lufs"),
    ]


def test_a_line_set_aside_keeps_the_indices_of_the_lines_after_it(media, monkeypatch):
    """Line 0 fails its type and is set aside; the cross-field problem of line 2 is still called lines[2]."""
    monkeypatch.chdir(media)
    text = GOOD.replace(
        "  - {speaker: ana, start: 0.1, text: Hello}\n",
        "  - {speaker: ana, start: .nan, text: Hello}\n  - {speaker: ana, start: 1, text: Hi}\n"
        "  - {speaker: ben, start: 3, end: 2, text: Hi}\n",
    )
    (media / "shift.yaml").write_text(text)
    with pytest.raises(ManifestError) as caught:
        load_manifest("shift.yaml")
    assert [(p.line, p.field) for p in caught.value.problems] == [
        (11, "lines[0].start"),
        (13, "lines[2].end"),
    ]


def test_a_box_with_nan_is_one_correct_line(media, monkeypatch):
    monkeypatch.chdir(media)
    (media / "nan.yaml").write_text(GOOD.replace("box: [330, 10, 630, 350]", "box: [330, .nan, 630, 350]"))
    with pytest.raises(ManifestError) as caught:
        load_manifest("nan.yaml")
    assert [p.format(Path("nan.yaml")) for p in caught.value.problems] == [
        "nan.yaml:8:16: speakers[1].box[1]: must be a finite number (not .nan or .inf)"
    ]


def test_a_file_named_like_an_option_is_probed_as_a_file(media, monkeypatch):
    monkeypatch.chdir(media)
    info = probe(Path("-version"))
    assert (info.kind, info.sample_rate) == ("audio", 16000)


def test_limits_come_from_the_environment_and_are_checked_at_validation(media, monkeypatch):
    monkeypatch.chdir(media)
    (media / "ok.yaml").write_text(GOOD)
    monkeypatch.setenv("DUBFLOW_MAX_RESOLUTION", "320")
    with pytest.raises(ManifestError) as caught:
        load_manifest("ok.yaml")
    assert "640x360; this host accepts sources up to 320 pixels" in str(caught.value)
    assert caught.value.problems[0].line == 2  # source:
    monkeypatch.setenv("DUBFLOW_MAX_RESOLUTION", "4096")
    monkeypatch.setenv("DUBFLOW_MAX_MANIFEST_BYTES", "100")
    with pytest.raises(ManifestError, match="larger than 100 bytes"):
        load_manifest("ok.yaml")
    monkeypatch.setenv("DUBFLOW_MAX_MANIFEST_BYTES", "lots")
    with pytest.raises(ManifestError, match=r"\$DUBFLOW_MAX_MANIFEST_BYTES='lots' is not a number"):
        load_manifest("ok.yaml")


def test_segment_limit_refuses_overrides_and_short_segments_beyond_it(media, monkeypatch):
    monkeypatch.chdir(media)
    text = GOOD.replace("size: 480}", "size: 480, max_segment_s: 1, overrides: {9: {seed: 3}}}")
    text = text.replace("start: 0.1, text: Hello}", "start: 0.1, end: 12, text: Hello}")
    (media / "seg.yaml").write_text(text)
    monkeypatch.setenv("DUBFLOW_MAX_SEGMENTS", "5")
    with pytest.raises(ManifestError) as caught:
        load_manifest("seg.yaml")
    fields = [p.field for p in caught.value.problems]
    assert fields == ["render.max_segment_s", "render.overrides.9"], caught.value


def test_limits_refuse_zero_and_garbage():
    assert Limits.from_env({"DUBFLOW_MAX_EPISODE_S": "90.5"}).episode_s == 90.5
    for bad in ("0", "-1", "nan", "inf", "x"):
        with pytest.raises(LimitsError):
            Limits.from_env({"DUBFLOW_MAX_SEGMENTS": bad})
