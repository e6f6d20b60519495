"""The demo episode, synthesised locally: a two-person scene, two voices, a music bed.

`make_demo_media(folder)` writes scene.png, ana.wav, ben.wav (each actor's dubbed track),
dialogue.wav (both voices with music under it at about -12 dB) into `folder`. Used by
`dubflow demo`, the tests and the benchmarks; needs espeak-ng and nothing downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from engine.media import write_wav
from tasks.tts import synthesise_track

RATE = 48_000
SIZE = (1280, 720)
BOXES = {"ana": (150, 120, 550, 620), "ben": (730, 120, 1130, 620)}
LINES = [  # (speaker, start s, text, espeak voice)
    ("ana", 0.4, "Did you finish the subtitles for episode three?", "en-us+f3"),
    ("ben", 3.7, "Almost. The last scene still needs a voice.", "en-us+m3"),
    ("ana", 7.0, "Then let us dub it tonight.", "en-us+f3"),
]
MUSIC_DB = -12.0


def make_demo_media(folder: Path, *, lines=LINES, seconds: float | None = None) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"scene": folder / "scene.png"}
    draw_scene(paths["scene"])
    tracks = {}
    for speaker in BOXES:
        own = [(start, text, voice) for who, start, text, voice in lines if who == speaker]
        tracks[speaker], _ = synthesise_track(own, RATE, out_dir=folder)
    length = max(len(t) for t in tracks.values())
    if seconds:
        length = max(length, int(seconds * RATE))
    voices = np.zeros(length, dtype=np.float32)
    for speaker, track in tracks.items():
        track = np.pad(track, (0, length - len(track)))
        paths[speaker] = write_wav(folder / f"{speaker}.wav", track, RATE)
        voices += track
    music = music_bed(length / RATE, RATE)
    music *= _rms(voices) / max(_rms(music), 1e-9) * 10 ** (MUSIC_DB / 20)
    paths["dialogue"] = write_wav(folder / "dialogue.wav", voices + music, RATE)
    return paths


def draw_scene(path: Path) -> Path:
    """Two stylised people side by side on a warm background (deterministic)."""
    h = SIZE[1]
    gradient = np.linspace(0, 1, h)[:, None, None]
    top, bottom = np.array([70, 90, 120]), np.array([190, 150, 110])
    picture = (top * (1 - gradient) + bottom * gradient).repeat(SIZE[0], axis=1).astype(np.uint8)
    image = Image.fromarray(picture)
    draw = ImageDraw.Draw(image)
    for (x0, y0, x1, _), skin, shirt in zip(
        BOXES.values(), [(236, 200, 170), (200, 150, 115)], [(180, 60, 60), (50, 90, 160)], strict=True
    ):
        cx = (x0 + x1) // 2
        draw.rounded_rectangle((cx - 170, y0 + 300, cx + 170, h), radius=60, fill=shirt)
        draw.ellipse((cx - 110, y0 + 40, cx + 110, y0 + 300), fill=skin)
        for dx in (-45, 45):
            draw.ellipse((cx + dx - 14, y0 + 140, cx + dx + 14, y0 + 162), fill=(40, 40, 40))
        draw.arc((cx - 50, y0 + 190, cx + 50, y0 + 250), 20, 160, fill=(120, 40, 40), width=6)
    image.save(path)
    return path


def music_bed(seconds: float, rate: int) -> np.ndarray:
    """A soft chord progression (I-vi-IV-V, two seconds each) with a pulse: music-like, not speech-like."""
    t = np.arange(int(seconds * rate)) / rate
    chords = [(261.6, 329.6, 392.0), (220.0, 261.6, 329.6), (174.6, 220.0, 261.6), (196.0, 246.9, 293.7)]
    out = np.zeros_like(t)
    for i, chord in enumerate(chords * int(np.ceil(seconds / 8) + 1)):
        mask = (t >= 2 * i) & (t < 2 * i + 2)
        local = t[mask] - 2 * i
        envelope = np.minimum(1, local / 0.05) * np.exp(-0.6 * local)
        for f in chord:
            out[mask] += envelope * (np.sin(2 * np.pi * f * t[mask]) + 0.3 * np.sin(4 * np.pi * f * t[mask]))
    pulse = 0.5 + 0.5 * (np.sin(2 * np.pi * 2 * t) > 0)
    return (out * pulse).astype(np.float32)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x)))) if len(x) else 0.0


def short_manifest_text(
    episode: str,
    *,
    render: str,
    lines=None,
    tracks: bool = True,
    separate: str | None = "dsp",
    extra: str = "",
) -> str:
    """A compact demo-like manifest for tests and benchmarks, with the media (scene.png, <speaker>.wav,
    dialogue.wav) beside it. `tracks=False` leaves out the actors' tracks and the dialogue: lines mode, where the
    voices are spoken from `lines` ((speaker, start, text), default the demo's). `extra` is appended as is."""
    script = lines if lines is not None else [(who, start, text) for who, start, text, _ in LINES]
    track = (lambda s: f", track: {s}.wav") if tracks else (lambda s: "")
    speakers = "\n".join(f"  - {{id: {s}, box: {list(b)}{track(s)}}}" for s, b in BOXES.items())
    said = "\n".join(f'  - {{speaker: {w}, start: {s}, text: "{t}"}}' for w, s, t in script)
    return (
        f"episode: {episode}\nsource: scene.png\n"
        + ("audio: {dialogue: dialogue.wav}\n" if tracks else "")
        + f"speakers:\n{speakers}\nlines:\n{said}\n"
        + (f"separate: {{backend: {separate}}}\n" if separate and tracks else "")
        + f"render: {render}\n{extra}"
    )


def demo_manifest_text(media_dir: str = "demo-media") -> str:
    speakers = "\n".join(
        f"  - id: {sid}\n    name: {sid.capitalize()}\n    box: {list(box)}\n    track: {media_dir}/{sid}.wav"
        for sid, box in BOXES.items()
    )
    lines = "\n".join(
        f'  - {{speaker: {who}, start: {start}, text: "{text}"}}' for who, start, text, _ in LINES
    )
    return (
        "# The demo episode: generated locally by `dubflow demo` (media in demo-media/).\n"
        f"episode: demo\nsource: {media_dir}/scene.png\nlanguage: en\n"
        f"audio:\n  dialogue: {media_dir}/dialogue.wav   # both voices with a music bed under it\n"
        f"speakers:\n{speakers}\nlines:\n{lines}\n"
        "separate: {backend: auto}\n"
        "render: {engine: auto, size: 480, seed: 7, max_segment_s: 4}   # short segments show the planner at work\n"
        "mix: {spec: ebu-r128}\noutputs: [mp4, stems, srt, vtt, qc]\n"
    )
