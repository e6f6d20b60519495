"""Hostile and careless manifests, for tests/test_hostile.py and bench/faults.py.

`hostile_cases(folder)` writes the media a manifest refers to (a picture, two voices, a corrupt file) and
returns one `Case` per manifest: how to make it, and what the one located line refusing it must say.
Nothing here is big on disk for long: the multi-megabyte documents are written when asked for.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

GOOD = """\
episode: s01e03
source: scene.png
speakers:
  - id: ana
    box: [10, 10, 300, 350]
    track: ana.wav
  - id: ben
    box: [330, 10, 630, 350]
    track: ben.wav
lines:
  - {speaker: ana, start: 0.1, text: Hello}
render: {engine: preview, size: 480}
"""


# 10 problems: the type errors (lines 1, 5, 13, 14 twice, 15) must not hide the cross-field ones (7, 8, 11, 12)
TEN_DEFECTS = """\
episode: "bad name!"
source: scene.png
speakers:
  - id: ana
    box: [10, .nan, 300, 350]
    track: ana.wav
  - id: ana
    box: [330, 10, 6300, 350]
    track: ben.wav
lines:
  - {speaker: zed, start: 0.1, text: Hello}
  - {speaker: ana, start: 2, end: 1, text: Hi}
  - {speaker: ana, start: -1, text: Hi}
render: {engine: preview, size: 480, seed: yes, text_scale: .inf}
mix: {loudness_lufs: 3}
"""


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[Path], Path]  # writes the manifest into a folder, returns its path
    needle: str | None  # text the refusal must contain; None: the manifest is valid and must be accepted
    line: int | None = None  # the line it must name (None: any)
    count: int = 1  # problems the refusal must list, one line each


def write_media(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (640, 360), "gray").save(folder / "scene.png")
    t = np.arange(16000) / 16000
    sf.write(folder / "ana.wav", 0.1 * np.sin(2 * np.pi * 220 * t), 16000)
    sf.write(folder / "ben.wav", 0.1 * np.sin(2 * np.pi * 330 * t), 16000)
    (folder / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(4000))
    for name in ("-version", "pipe:0"):  # real voices whose names look like an option and a protocol
        (folder / name).write_bytes((folder / "ben.wav").read_bytes())
    return folder


def _text(text: str | bytes, name: str = "ep.yaml") -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(text.encode() if isinstance(text, str) else text)
        return path

    return make


def _edit(old: str, new: str) -> Callable[[Path], Path]:
    assert old in GOOD, old
    return _text(GOOD.replace(old, new, 1))


def _fifo(folder: Path) -> Path:
    path = folder / "fifo.yaml"
    if not path.exists():
        os.mkfifo(path)
    return path


def _link(target: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / f"link-{Path(target).name}.yaml"
        if not path.is_symlink():
            path.symlink_to(target)
        return path

    return make


def _stream(head: str, body: bytes, repeat: int, tail: str = "") -> Callable[[Path], Path]:
    """A big document written in blocks (a 10 MB list), never held whole in the writer's memory."""

    def make(folder: Path) -> Path:
        path = folder / "big.yaml"
        with open(path, "wb") as fh:
            fh.write(head.encode())
            for _ in range(repeat // 10_000):
                fh.write(body * 10_000)
            fh.write(tail.encode())
        return path

    return make


def hostile_cases() -> list[Case]:
    """Each manifest, what its refusal must say and at which line."""
    deep_list = "episode: x\nsource: scene.png\nspeakers: " + "[" * 900 + "]" * 900 + "\n"
    deep_map = "episode: x\nsource: scene.png\nspeakers:\n" + "".join(
        " " * i + f"k{i}:\n" for i in range(1, 1001)
    )
    flow_map = "episode: x\nsource: scene.png\nspeakers: " + "{a: " * 5000 + "1" + "}" * 5000 + "\n"
    return [
        # bounded before parsing
        Case("fifo", _fifo, "not a regular file"),
        Case("/dev/zero", lambda folder: Path("/dev/zero"), "not a regular file"),
        Case("link to /dev/urandom", _link("/dev/urandom"), "not a regular file"),
        Case("directory", lambda folder: folder, "is a directory"),
        Case("missing file", lambda folder: folder / "nope.yaml", "file not found"),
        Case("50 MiB comment", _stream("# ", b"x" * 512, 100_000, "\n"), "larger than"),
        Case(
            "2M-item one-line list",
            _stream("episode: x\nspeakers: [", b"1,", 2_000_000, "1]\n"),
            "larger than",
        ),
        Case("NUL after 8 KiB", _text(GOOD + "#" + "x" * 9000 + "\n\x00\n"), "NUL byte", 14),
        Case("not UTF-8", _text(GOOD.encode() + b"# \xff\xfe\n"), "not UTF-8", 13),
        # bounded while parsing
        Case("900-deep list", _text(deep_list), "nested more than", 3),
        Case("1000 nested block mappings", _text(deep_map), "nested more than", 35),
        Case("5000 nested flow mappings", _text(flow_map), "nested more than", 3),
        Case(
            "200k-item list (under the size cap)",
            _text("episode: x\nspeakers: [" + "1," * 200_000 + "1]\n"),
            "more than 50000 nodes",
            2,
        ),
        Case("alias bomb", _text("a: &a [1, 2]\nb: [*a, *a]\n"), "anchors", 1),
        Case("python tag", _text("episode: !!python/object/apply:os.system [ls]\n"), "not allowed", 1),
        Case("two documents", _text(GOOD + "---\nepisode: y\n"), "one YAML document", 13),
        Case("duplicate key", _text(GOOD + "episode: again\n"), "duplicate key", 13),
        Case("not YAML", _text("episode: [unclosed\n"), "not valid YAML"),
        Case("a list, not a mapping", _text("- 1\n- 2\n"), "YAML mapping", 1),
        # wrong values
        Case("seed: yes", _edit("size: 480}", "size: 480, seed: yes}"), "not true", 12),
        Case(
            "seed 2**128+1", _edit("size: 480}", f"size: 480, seed: {2**128 + 1}}}"), "less than or equal", 12
        ),
        Case("negative seed", _edit("size: 480}", "size: 480, seed: -1}"), "greater than or equal", 12),
        Case("text_scale .inf", _edit("size: 480}", "size: 480, text_scale: .inf}"), "finite", 12),
        Case("audio_scale 1e400", _edit("size: 480}", "size: 480, audio_scale: 1e400}"), "finite", 12),
        Case("absurd scale", _edit("size: 480}", "size: 480, audio_scale: 1e6}"), "less than or equal", 12),
        Case(
            "override keyed -3",
            _edit("size: 480}", "size: 480, overrides: {-3: {seed: 1}}}"),
            "greater than or equal",
            12,
        ),
        Case(
            "override seed: on", _edit("size: 480}", "size: 480, overrides: {3: {seed: on}}}"), "not true", 12
        ),
        Case(
            "NaN in a box", _edit("box: [10, 10, 300, 350]", "box: [10, .nan, 300, 350]"), "finite number", 5
        ),
        Case(
            "box outside the frame",
            _edit("box: [10, 10, 300, 350]", "box: [10, 10, 3000, 350]"),
            "outside",
            5,
        ),
        Case("corrupt media", _edit("track: ana.wav", "track: corrupt.mp4"), "re-export", 6),
        Case("media named -version (valid)", _edit("track: ana.wav", "track: -version"), None),
        Case("media named ./-version (valid)", _edit("track: ana.wav", "track: ./-version"), None),
        Case("media named pipe:0 (valid)", _edit("track: ana.wav", "track: 'pipe:0'"), None),
        Case("missing media named -i", _edit("track: ana.wav", "track: -i"), "fix the path", 6),
        Case("ten defects, types and cross-field", _text(TEN_DEFECTS), "", None, 10),
        Case("unknown field", _edit("render:", "rendr:"), "unknown field", 12),
    ]
