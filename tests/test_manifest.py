"""Manifest validation: every problem located at its line, safe YAML, the schema kept in sync."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.cli import main
from tasks.manifest import SCHEMA_PATH, ManifestError, load_manifest, schema_text
from tests.hostile_corpus import GOOD, write_media


@pytest.fixture()
def media(tmp_path: Path) -> Path:
    """A folder (with a space and non-ASCII letters) holding a 640x360 picture and two short voices."""
    folder = write_media(tmp_path / "épisode un")
    (folder / "empty.wav").write_bytes(b"")
    (folder / "noise.wav").write_bytes(b"RIFF not really a wave file")
    return folder


def write(folder: Path, text: str) -> Path:
    path = folder / "ep.yaml"
    path.write_text(text)
    return path


def test_good_manifest_resolves_paths_relative_to_itself(media):
    loaded = load_manifest(write(media, GOOD))
    assert loaded.manifest.episode == "s01e03"
    assert loaded.manifest.speakers[0].track == media / "ana.wav"
    assert (loaded.source_info.width, loaded.source_info.height) == (640, 360)


# (description, change to GOOD, expected line, expected text in the message)
BAD = [
    ("unknown top-level field", GOOD + "colour: red\n", 13, "unknown field"),
    (
        "unknown speaker field",
        GOOD.replace("    track: ana.wav", "    track: ana.wav\n    mood: happy"),
        7,
        "mood",
    ),
    ("missing episode", GOOD.replace("episode: s01e03\n", ""), 1, "episode: required"),
    ("bad episode name", GOOD.replace("s01e03", "'s01 e03'"), 1, "letters, digits"),
    ("missing source file", GOOD.replace("scene.png", "nope.png"), 2, "file not found"),
    ("source is a sound", GOOD.replace("source: scene.png", "source: ana.wav"), 2, "no picture"),
    ("track missing", GOOD.replace("track: ben.wav", "track: gone.wav"), 9, "file not found"),
    ("track empty", GOOD.replace("track: ben.wav", "track: empty.wav"), 9, "empty"),
    ("track not media", GOOD.replace("track: ben.wav", "track: noise.wav"), 9, "not a readable"),
    ("inverted box", GOOD.replace("[330, 10, 630, 350]", "[630, 10, 330, 350]"), 8, "inverted"),
    ("box outside frame", GOOD.replace("[330, 10, 630, 350]", "[330, 10, 700, 350]"), 8, "outside"),
    ("box of three numbers", GOOD.replace("[330, 10, 630, 350]", "[330, 10, 630]"), 8, "at least 4"),
    ("box too small for the token grid", GOOD.replace("[10, 10, 300, 350]", "[10, 10, 15, 15]"), 5, "token"),
    ("boxes on top of each other", GOOD.replace("[330, 10, 630, 350]", "[20, 20, 290, 340]"), 8, "overlap"),
    ("duplicate speaker id", GOOD.replace("id: ben", "id: ana"), 7, "already used"),
    ("speaker id of a mix stem", GOOD.replace("id: ben", "id: Full_Mix"), 7, "overwrite the full_mix stem"),
    (
        "line of unknown speaker",
        GOOD.replace("{speaker: ana,", "{speaker: zoe,"),
        11,
        "unknown speaker 'zoe'",
    ),
    ("line ends before start", GOOD.replace("start: 0.1,", "start: 2, end: 1,"), 11, "must be after start"),
    ("infinite start", GOOD.replace("start: 0.1", "start: .inf"), 11, "finite"),
    ("negative start", GOOD.replace("start: 0.1", "start: -1"), 11, "greater than or equal to 0"),
    ("unknown engine", GOOD.replace("engine: preview", "engine: wav2lip"), 12, "wav2lip"),
    ("bad render size", GOOD.replace("size: 480", "size: 1080"), 12, "1080"),
    ("speaker without box", GOOD.replace("    box: [330, 10, 630, 350]\n", ""), 7, "has no box"),
    ("only one track", GOOD.replace("    track: ben.wav\n", ""), 7, "every speaker has a track"),
    (
        "timed boxes overlap",
        GOOD.replace(
            "[330, 10, 630, 350]",
            "[{from: 0, to: 5, box: [330, 10, 630, 350]}, {from: 4, to: 9, box: [330, 10, 630, 350]}]",
        ),
        8,
        "overlaps",
    ),
    ("duplicate key", GOOD.replace("render:", "episode: again\nrender:"), 12, "duplicate key"),
    (
        "python tag",
        GOOD.replace("source: scene.png", "source: !!python/object:os.system scene.png"),
        2,
        "tag",
    ),
    ("alias bomb", "a: &a [1, 1]\nb: &b [*a, *a]\nc: [*b, *b]\n", 1, "anchors"),
    ("not YAML", "episode: [unclosed\nsource: x\n", 2, "not valid YAML"),
    ("a list, not a mapping", "- 1\n- 2\n", 1, "YAML mapping"),
]


@pytest.mark.parametrize(("what", "text", "line", "needle"), BAD, ids=[b[0] for b in BAD])
def test_bad_manifest_is_reported_at_its_line(media, what, text, line, needle):
    path = write(media, text)
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    lines = str(info.value).splitlines()
    match = [ln for ln in lines if needle in ln]
    assert match, f"{what}: no problem mentions {needle!r}: {lines}"
    assert match[0].startswith(f"{path}:{line}:"), match[0]


def test_every_problem_is_reported_not_just_the_first(media):
    text = GOOD.replace("[330, 10, 630, 350]", "[630, 10, 330, 350]").replace(
        "{speaker: ana,", "{speaker: zoe,"
    )
    with pytest.raises(ManifestError) as info:
        load_manifest(write(media, text))
    assert len(info.value.problems) == 2


@pytest.mark.parametrize(
    "content", [b"", b"\x00\x01\x02binary\xff", b"\xff\xfe\xfa not utf8", b"just a sentence"]
)
def test_cli_validate_answers_garbage_with_one_line_and_exit_2(tmp_path, capsys, content):
    path = tmp_path / "junk.yaml"
    path.write_bytes(content)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{path}:1:")


def test_cli_validate_a_directory_and_a_missing_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path), str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "is a directory" in err and "file not found" in err and "Traceback" not in err


def test_cli_validate_ok(media, capsys):
    path = write(media, GOOD)
    assert main(["validate", str(path)]) == 0
    assert capsys.readouterr().out.strip() == f"ok {path}"


def test_schema_json_is_up_to_date():
    assert SCHEMA_PATH.exists(), "run `dubflow schema` to generate manifests/schema.json"
    assert SCHEMA_PATH.read_text() == schema_text(), "manifests/schema.json is stale: run `dubflow schema`"
    schema = json.loads(SCHEMA_PATH.read_text())
    assert "speakers" in schema["required"] and "episode" in schema["required"]


def test_demo_manifest_is_valid_against_the_models():
    loaded = load_manifest(Path(__file__).parent.parent / "manifests" / "demo.yaml", check_media=False)
    assert loaded.manifest.speaker_ids() == ["ana", "ben"]
    from tasks.demo import demo_manifest_text

    # `dubflow demo` writes this text where the file is missing: both say the same
    assert loaded.path.read_text() == demo_manifest_text()


VIDEO = GOOD.replace("scene.png", "scene.mp4").replace("engine: preview", "engine: multitalk")


def test_multitalk_with_a_video_source_is_refused_up_front_at_its_line(media, capsys):
    from tests.test_media_video import write_coded_video

    write_coded_video(media / "scene.mp4", [i / 30 for i in range(30)], size=(640, 360))
    path = write(media, VIDEO)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{path}:12:"), err
    assert "render.engine: multitalk animates a still" in err[0] and "infinitetalk" in err[0]
    assert "auto" in err[0] and "Traceback" not in err[0]
    for fixed in ("engine: infinitetalk", "engine: auto"):
        loaded = load_manifest(write(media, VIDEO.replace("engine: multitalk", fixed)))
        assert loaded.source_info.kind == "video" and loaded.manifest.render.composite == "paste_back"


def test_render_composite_is_one_of_two_and_multitalk_still_takes_stills(media):
    loaded = load_manifest(
        write(media, GOOD.replace("engine: preview", "engine: multitalk, composite: full_frame"))
    )
    assert loaded.manifest.render.composite == "full_frame"
    with pytest.raises(ManifestError) as info:
        load_manifest(write(media, GOOD.replace("size: 480", "size: 480, composite: overlay")))
    assert "ep.yaml:12:" in str(info.value) and "overlay" in str(info.value)
