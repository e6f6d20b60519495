"""The episode manifest: pydantic models, located validation, JSON Schema export.

`load_manifest(path)` parses YAML safely (tasks/yamlmarks.py), validates the models,
then runs the cross-field and media checks. Every problem is collected and reported as
`FILE:LINE:COL: field: message` in one `ManifestError`; no stage runs on an invalid manifest.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from engine.media import MediaError, MediaInfo, VideoFrames, check_wav_complete, probe
from tasks.limits import Limits, LimitsError, env_name
from tasks.yamlmarks import Mark, YamlProblem, load_marked

SLUG = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
MIX_STEMS = ("dialogue", "music_and_effects", "full_mix")  # out/stems/<name>.wav, beside one per speaker
LENGTH_TOLERANCE_S = 0.04  # one frame at 25 fps: an export rounded up to its last frame is not "longer"
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "manifests" / "schema.json"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
BoxList = Annotated[
    list[int],
    Field(
        min_length=4,
        max_length=4,
        description="x0, y0, x1, y1 in source pixels: the person's region (head, neck and shoulders), not the face",
    ),
]
# Seeds reach numpy and torch generators: a whole number in numpy's range, and `seed: yes` is not one
Seed = Annotated[int, Field(ge=0, le=2**32 - 1, strict=True)]
# Guidance scales: finite, and within what the engines were trained for (a scale of 1e6 burns every frame)
Scale = Annotated[float, Field(ge=0, le=50, allow_inf_nan=False)]


class TimedBoxSpec(Strict):
    """A box that holds from `from` to `to` (seconds on the episode timeline)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    start: Seconds = Field(alias="from")
    end: Seconds | None = Field(None, alias="to", description="null: until the end of the episode")
    box: BoxList


class Speaker(Strict):
    id: str = Field(pattern=SLUG, description="name used everywhere for this speaker's track")
    name: str | None = Field(None, description="display name (defaults to id)")
    box: (
        Annotated[
            Annotated[BoxList, Tag("list[int]")] | Annotated[list[TimedBoxSpec], Tag("list[TimedBoxSpec]")],
            Discriminator(lambda v: "list[TimedBoxSpec]" if _is_timed(v) else "list[int]"),
        ]
        | None
    ) = Field(
        None,
        description="this person's region on screen: the whole head with room to move, neck and shoulders"
        " (the engine routes the voice to it, paste-back composites inside it), never another person's face;"
        " one box, or timed boxes [{from, to, box}] that follow a moving person. `dubflow bind --propose`"
        " derives it from the face: centre +-1.3 face heights, 0.6 above, 1.0 below (tasks/regions.py)",
    )
    track: Path | None = Field(None, description="this speaker's own dialogue track (skips diarisation)")
    voice_sample: Path | None = Field(None, description="enrolment clip used to name the diarised track")
    voice: str | None = Field(None, description="TTS voice for lines mode (see `dubflow doctor`)")
    language: str | None = Field(
        None, description="language this speaker's lines are in (default: the episode's)"
    )

    def box_spec(self) -> list | None:
        """The box as plain data: [x0, y0, x1, y1], or [{from, to, box}, ...] in seconds (tasks/bind.py reads it)."""
        if isinstance(self.box, list) and self.box and isinstance(self.box[0], TimedBoxSpec):
            return [{"from": b.start, "to": b.end, "box": list(b.box)} for b in self.box]
        return None if self.box is None else list(self.box)


def _is_timed(value: object) -> bool:
    """A box given as [{from, to, box}, ...] rather than [x0, y0, x1, y1]: one kind of error, not both."""
    if isinstance(value, TimedBoxSpec):
        return True
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict | TimedBoxSpec)


class Line(Strict):
    speaker: str
    start: Seconds
    end: Seconds | None = Field(None, description="end of the line's slot (default: the next line it meets)")
    text: str
    voice: str | None = Field(None, description="TTS voice for this line (default: the speaker's)")
    language: str | None = Field(None, description="language of this line (default: the speaker's)")
    speed: float | None = Field(
        None, ge=0.5, le=2.0, description="natural speed of this line, times tts.speed"
    )


class AudioSpec(Strict):
    dialogue: Path | None = Field(None, description="dubbed dialogue; may still contain music")
    original: Path | None = Field(
        None, description="original-language audio for the M&E bed; default: the source's sound"
    )
    music_and_effects: Path | None = Field(None, description="a ready M&E bed; skips separating the original")
    clean: bool = Field(False, description="the dialogue has no music under it: skip separating it")


class SeparateSettings(Strict):
    backend: Literal["auto", "dsp", "dfn", "demucs", "none"] = "auto"
    model: str = "htdemucs"


class DiariseSettings(Strict):
    backend: Literal["auto", "embedded", "pyannote"] = "auto"
    order: Literal["first-appearance", "most-speech"] = "first-appearance"
    mapping: dict[str, str] = Field(default_factory=dict, description="pin cluster label -> speaker id")


class TtsSettings(Strict):
    backend: Literal["auto", "espeak", "piper", "kokoro"] = Field(
        "auto", description="auto: kokoro, else piper, else espeak, whichever is installed with its weights"
    )
    speed: float = Field(1.0, ge=0.5, le=2.0, description="every voice's natural speed times this")
    max_speed: float = Field(
        1.25, ge=1.0, le=2.0, description="a line longer than its slot is spoken faster, up to this factor"
    )
    conversation: bool = Field(
        True,
        description="the speakers take turns: a line's slot also ends where another speaker's next line starts;"
        " false: only a speaker's own next line ends it",
    )


class SegmentOverride(Strict):
    """Settings for one planned segment, e.g. another seed for a re-render (`dubflow rerun --segments`)."""

    seed: Seed | None = None
    steps: int | None = Field(None, ge=1, le=200)


class LoraSettings(Strict):
    file: Path = Field(description="a .safetensors LoRA for Wan 2.1 I2V-14B (kohya, diffusers or peft keys)")
    scale: float = Field(1.0, ge=-8, le=8, allow_inf_nan=False)


class RenderSettings(Strict):
    engine: Literal["auto", "preview", "multitalk", "infinitetalk"] = Field(
        "auto",
        description="auto: infinitetalk for a video, multitalk for a still (with a GPU and weights), else preview;"
        " multitalk takes stills only",
    )
    composite: Literal["paste_back", "full_frame"] = Field(
        "paste_back",
        description="video sources: paste the speakers' rendered regions back onto the original frames"
        " (paste_back), or deliver the rendered frames scaled to the source size (full_frame)",
    )
    feather_px: int = Field(
        16, ge=0, le=256, description="paste_back: soft edge around each speaker's box, in source pixels"
    )
    mask: Literal["box", "person"] = Field(
        "box",
        description="paste_back: box (the whole region, feathered outward) or person (a head-and-shoulders mask"
        " feathered inward, never past the region: the background around the person stays the source)",
    )
    chain: bool = Field(
        False,
        description="carry the engine's motion frames across consecutive segments of one shot (seamless joins);"
        " the segments of a shot then render one after another instead of side by side",
    )
    overlap_frames: int = Field(
        0,
        ge=0,
        le=50,
        description="each segment but the last also renders this many frames past its end (driven by the next"
        " segment's audio), crossfaded with the next segment's first frames at the stitch; 0: hard cuts",
    )
    size: Literal[480, 720] = 480
    steps: int = Field(8, ge=1, le=200)
    seed: Seed = 7
    max_segment_s: Literal["auto"] | Annotated[float, Field(gt=0.5, le=600, allow_inf_nan=False)] = "auto"
    min_gap_s: float = Field(0.3, ge=0.08, le=5, allow_inf_nan=False)
    prompt: str = "Two people talking, natural expressions, steady camera."
    text_scale: Scale = 5.0
    audio_scale: Scale = 4.0
    overrides: dict[Annotated[int, Field(ge=0)], SegmentOverride] = Field(
        default_factory=dict, description="per-segment settings by segment index, e.g. {7: {seed: 11}}"
    )
    # speed and memory of the multitalk / infinitetalk engines (engine/multitalk/README.md, "Speed")
    teacache: float | None = Field(
        None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="TeaCache threshold: skip DiT steps whose input barely moved; 0.2-0.5 for broadcast work"
        " (colours shift above), 0: off",
    )
    teacache_warmup: int = Field(
        5, ge=1, le=200, description="steps always computed before TeaCache may skip"
    )
    loras: list[LoraSettings] = Field(
        default_factory=list,
        description="LoRAs applied in order, e.g. a few-step distillation (lightx2v, FusionX): then use"
        " steps 4-8, text_scale 1 and the release's audio_scale (1: one guidance pass per step)",
    )
    lora_merge: bool = Field(
        True, description="merge the LoRAs into the weights (false: apply them unmerged)"
    )
    quantize: Literal["none", "int8", "fp8"] = Field(
        "none", description="weight-only quantisation of the DiT blocks; fp8 needs an Ada or Hopper GPU"
    )
    offload: Literal["none", "blocks"] = Field(
        "none", description="blocks: keep the DiT in host memory and stream its blocks (a 24 GB card)"
    )
    resident_blocks: Literal["auto"] | Annotated[int, Field(ge=0, le=40)] = Field(
        "auto",
        description="offload: DiT blocks kept on the GPU for good; auto: as many as the render GPU holds besides"
        " a chunk (engine/memory.py)",
    )
    attention: Literal["auto", "sdpa", "flash", "sage"] = Field(
        "auto", description="self-attention kernel; auto: flash-attention when installed, else PyTorch SDPA"
    )
    compile: bool = Field(False, description="torch.compile the transformer block (first segment compiles)")
    vae_tiling: bool = Field(False, description="decode the VAE in tiles: less GPU memory, slower decode")


class StitchSettings(Strict):
    colour_match: bool = Field(
        True,
        description="match every segment's colour to the source plate (a video) or the first segment (a still);"
        " the seam CIEDE2000 before and after goes to qc.json",
    )
    timestamps: Literal["constant", "keep"] = Field(
        "constant",
        description="constant: a variable-frame-rate video source is conformed to constant frame rate at its"
        " nominal rate first, and QC checks the delivered timestamps are constant; keep: the picture keeps"
        " the source's own frames and timestamps, VFR included",
    )


class EnhanceSettings(Strict):
    backend: Literal["none", "ffmpeg", "spandrel"] = Field(
        "none",
        description="ffmpeg: the filter chain below; spandrel: the upscaler / restorer weights in `model`"
        " (over the speakers' regions with paste-back, else the whole frame)",
    )
    model: Path | None = Field(
        None,
        description="spandrel: a .pth / .safetensors upscaler or restorer (ESRGAN, Real-ESRGAN, SwinIR, HAT, ...)",
    )
    scale: int | None = Field(
        None, ge=1, le=16, description="spandrel: the model's scale (4 for a 4x upscaler), checked against it"
    )
    weight: float | None = Field(
        None,
        ge=0,
        le=1,
        allow_inf_nan=False,
        description="spandrel face restorers (GFPGAN, RestoreFormer): how much of the restored face goes in"
        " (0: none, 1: all of it; default 0.5)",
    )
    denoise: bool = Field(True, description="hqdn3d spatial and temporal denoise")
    sharpen: bool = Field(True, description="unsharp mask")
    deflicker: bool = Field(False, description="even out frame-to-frame brightness (5-frame mean)")
    fps: Literal[25, 50] = Field(25, description="50: interpolate to 50 fps (frame blending)")
    scale_to_source: bool = Field(
        True, description="deliver at the source's resolution (a still rendered at 480p goes out at its size)"
    )


class DuckSettings(Strict):
    """The bed comes down under the dialogue: by `depth_db`, starting `attack_ms` before a line (look-ahead),
    rising back over `release_ms` after it."""

    depth_db: float = Field(10.0, gt=0, le=40, allow_inf_nan=False)
    attack_ms: float = Field(80.0, ge=1, le=2000, allow_inf_nan=False)
    release_ms: float = Field(400.0, ge=1, le=5000, allow_inf_nan=False)


LoudnessSpec = Literal["ebu-r128", "atsc-a85", "streaming-16", "streaming-14", "custom"]


class MixSettings(Strict):
    spec: LoudnessSpec | None = Field(
        None,
        description="delivery loudness spec: ebu-r128 (-23 LUFS, -1 dBTP), atsc-a85 (-24 LKFS, -2 dBTP),"
        " streaming-16 / streaming-14 (-16 / -14 LUFS, -1 dBTP), or custom (loudness_lufs, true_peak_dbtp);"
        " default ebu-r128, or custom when loudness_lufs is given",
    )
    loudness_lufs: float | None = Field(None, ge=-70, le=-5, allow_inf_nan=False)
    true_peak_dbtp: float | None = Field(None, ge=-20, le=0, allow_inf_nan=False)
    bed_gain_db: float = Field(0.0, ge=-60, le=20, allow_inf_nan=False)
    duck: DuckSettings | None = Field(
        None, description="duck the M&E bed under the dialogue (off when absent)"
    )

    @model_validator(mode="after")
    def _one_target(self) -> MixSettings:
        from tasks.qc import LOUDNESS_SPECS

        if self.spec in LOUDNESS_SPECS:
            lufs, peak = LOUDNESS_SPECS[self.spec]
            if self.loudness_lufs not in (None, lufs) or self.true_peak_dbtp not in (None, peak):
                raise ValueError(
                    f"spec {self.spec} is {lufs} LUFS, {peak} dBTP; drop loudness_lufs / true_peak_dbtp,"
                    " or use spec: custom"
                )
        if self.spec == "custom" and self.loudness_lufs is None:
            raise ValueError("spec custom needs loudness_lufs (and optionally true_peak_dbtp, default -1)")
        return self

    def target(self) -> tuple[str, float, float]:
        """(spec name, integrated loudness target in LUFS, true-peak ceiling in dBTP)."""
        from tasks.qc import LOUDNESS_SPECS

        spec = self.spec or ("custom" if self.loudness_lufs is not None else "ebu-r128")
        lufs, peak = LOUDNESS_SPECS.get(spec, (self.loudness_lufs, -1.0))
        return spec, float(lufs), float(peak if self.true_peak_dbtp is None else self.true_peak_dbtp)


class QcSettings(Strict):
    allow_fail: bool = Field(
        False, description="deliver and exit 0 even when a QC check fails (the verdict still says fail)"
    )


Output = Literal["mp4", "prores", "stems", "srt", "vtt", "qc"]


class Manifest(Strict):
    """One episode: what to dub, with which voices, who is where, and how to render and mix."""

    episode: str = Field(pattern=SLUG)
    source: Path = Field(description="video (V2V dubbing) or a still image (I2V)")
    language: str = "en"
    audio: AudioSpec = Field(default_factory=AudioSpec)
    speakers: list[Speaker] = Field(min_length=1)
    lines: list[Line] = Field(default_factory=list)
    separate: SeparateSettings = Field(default_factory=SeparateSettings)
    diarise: DiariseSettings = Field(default_factory=DiariseSettings)
    tts: TtsSettings = Field(default_factory=TtsSettings)
    render: RenderSettings = Field(default_factory=RenderSettings)
    stitch: StitchSettings = Field(default_factory=StitchSettings)
    enhance: EnhanceSettings = Field(default_factory=EnhanceSettings)
    mix: MixSettings = Field(default_factory=MixSettings)
    qc: QcSettings = Field(default_factory=QcSettings)
    outputs: list[Output] = Field(
        default_factory=lambda: ["mp4", "stems", "srt", "vtt", "qc"],
        description="prores adds a ProRes 422 HQ / PCM .mov mezzanine",
    )

    @field_validator("outputs")
    @classmethod
    def _unique_outputs(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("each output may be listed once")
        return value

    def speaker_ids(self) -> list[str]:
        return [s.id for s in self.speakers]

    def is_lines_mode(self) -> bool:
        """The dialogue is synthesised from `lines` (no dialogue audio and no per-speaker tracks)."""
        return bool(self.lines) and self.audio.dialogue is None and not all(s.track for s in self.speakers)

    def line_voice_request(self, index: int) -> tuple[str | None, str, int]:
        """(voice, language, speaker index) that line `index` asks for: its own, else its speaker's, else the
        episode's language (tasks/tts.py `choose_voice` picks the voice from this)."""
        line = self.lines[index]
        who = self.speaker_ids().index(line.speaker)
        speaker = self.speakers[who]
        return line.voice or speaker.voice, line.language or speaker.language or self.language, who


@dataclass(frozen=True)
class Problem:
    line: int
    column: int
    field: str
    message: str

    def format(self, file: Path) -> str:
        where = f"{file}:{self.line}:{self.column}"
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


class ManifestError(ValueError):
    def __init__(self, file: Path, problems: list[Problem]):
        self.file, self.problems = file, problems
        super().__init__("\n".join(p.format(file) for p in problems))


@dataclass(frozen=True)
class LoadedManifest:
    path: Path
    manifest: Manifest
    source_info: MediaInfo

    @property
    def base(self) -> Path:
        return self.path.parent


def load_manifest(
    path: Path | str, *, check_media: bool = True, require_boxes: bool = True, limits: Limits | None = None
) -> LoadedManifest:
    """Parse, validate and cross-check a manifest; `require_boxes=False` for `dubflow bind --propose`.

    Every problem is reported in one pass: the values that fail their types are set aside and the
    cross-field and media checks still run on the rest."""
    path = Path(path)
    limits = limits or _limits(path)
    text = read_manifest_text(path, limits.manifest_bytes)
    try:
        data, builder = load_marked(text, max_nodes=limits.yaml_nodes)
    except YamlProblem as exc:
        raise ManifestError(path, [Problem(exc.line, exc.column, "", str(exc))]) from None
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise ManifestError(
            path, [Problem(1, 1, "", f"a manifest is a YAML mapping (episode:, source:, ...), not {kind}")]
        )
    locate = _Locator(builder.marks, builder.key_marks)
    try:
        manifest, typed, salvage = Manifest.model_validate(data), [], _Salvage({}, [])
    except ValidationError as exc:
        typed = [_from_pydantic(err, locate) for err in exc.errors()]
        salvage = _salvage(data, exc.errors())
        manifest = salvage.manifest
    if manifest is None:  # nothing left to cross-check; missing media are still worth reporting
        if check_media:
            typed += _raw_media_problems(data, path.parent, locate, {(p.line, p.column) for p in typed})
        raise ManifestError(path, sorted(typed, key=lambda p: (p.line, p.column)))
    manifest = _resolve_paths(manifest, path.parent)
    locate.kept, locate.cut = salvage.kept, salvage.cut
    problems, source_info = _cross_check(manifest, locate, check_media, require_boxes, limits)
    problems = sorted(typed + problems, key=lambda p: (p.line, p.column))
    if problems:
        raise ManifestError(path, problems)
    return LoadedManifest(path.resolve(), manifest, source_info)


def _limits(path: Path) -> Limits:
    try:
        return Limits.from_env()
    except LimitsError as exc:
        raise _whole_file(path, f"cannot check this manifest: {exc}") from None


def read_manifest_text(path: Path, max_bytes: int) -> str:
    """The manifest's text, bounded before any parsing: a regular file (not a FIFO, a device or a link to
    one), at most `max_bytes`, no NUL byte, UTF-8. Never blocks and never reads more than max_bytes + 1."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens without waiting for a writer
    except FileNotFoundError:
        raise _whole_file(path, "file not found") from None
    except IsADirectoryError:
        raise _whole_file(path, "is a directory; give the manifest's .yaml file") from None
    except OSError as exc:
        raise _whole_file(path, f"cannot open: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        what = "is a directory" if stat.S_ISDIR(mode) else "not a regular file (a pipe, device or socket)"
        raise _whole_file(path, f"{what}; give the manifest's .yaml file")
    with os.fdopen(fd, "rb") as fh:
        raw = fh.read(max_bytes + 1)
    if len(raw) > max_bytes:
        raise _whole_file(
            path,
            f"larger than {max_bytes} bytes, far above any real manifest; "
            f"raise ${env_name('manifest_bytes')} if it is genuine",
        )
    if (nul := raw.find(b"\x00")) >= 0:
        line, column = raw[:nul].count(b"\n") + 1, nul - (raw.rfind(b"\n", 0, nul) + 1) + 1
        raise _whole_file(path, "NUL byte: binary data, not a YAML text file", line, column)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise _whole_file(path, "not UTF-8 text; save the manifest as UTF-8", line) from None


def _whole_file(path: Path, message: str, line: int = 1, column: int = 1) -> ManifestError:
    return ManifestError(path, [Problem(line, column, "", message)])


# ---------------------------------------------------------------------------------------------- salvage

_DROPPED = object()  # a list item set aside: kept in place so that the other items keep their indices


@dataclass
class _Salvage:
    """What is left of a manifest once the values that failed their types are set aside.

    `kept` maps a list's path (original indices) to the original index of each item left in it;
    `cut` holds the paths (original indices) of what was set aside, whose problems are already reported."""

    kept: dict[tuple, list[int]]
    cut: list[tuple]
    manifest: Manifest | None = None


def _salvage(data: dict, errors: list) -> _Salvage:
    import copy

    work, cut, kept = copy.deepcopy(data), [], {}
    for _ in range(8):  # each round sets aside the failing values, or their parents once those are missing
        for err in errors:
            loc = _set_aside(work, _original(_clean_loc(err["loc"]), kept), missing=err["type"] == "missing")
            if loc is None:
                return _Salvage(kept, cut)
            cut.append(loc)
        pruned, kept = _pruned(work, ())
        try:
            return _Salvage(kept, cut, Manifest.model_validate(pruned))
        except ValidationError as exc:
            errors = exc.errors()
    return _Salvage(kept, cut)


def _set_aside(work: dict, loc: tuple, *, missing: bool) -> tuple | None:
    """Remove the value at `loc` (its parent, when the error is that a required field is missing there);
    None when what fails is required at the top (no source, no speakers): nothing is left to cross-check."""
    if loc == ("episode",):
        work["episode"] = "episode"  # no check reads the name: a placeholder lets the others run
        return loc
    if missing:
        loc = loc[:-1]
    while len(loc) > 1 or (loc and loc[0] not in ("source", "speakers")):
        parent, key = _walk(work, loc[:-1]), loc[-1]
        if isinstance(parent, dict) and (key in parent or str(key) in parent):
            parent.pop(key if key in parent else str(key))
            return loc
        if isinstance(parent, list) and isinstance(key, int) and 0 <= key < len(parent):
            parent[key] = _DROPPED
            return loc
        loc = loc[:-1]
    return None


def _walk(value: object, loc: tuple) -> object:
    for key in loc:
        if isinstance(value, dict):
            value = value.get(key, value.get(str(key)))
        elif isinstance(value, list) and isinstance(key, int) and 0 <= key < len(value):
            value = value[key]
        else:
            return None
    return value


def _pruned(value: object, path: tuple) -> tuple[object, dict[tuple, list[int]]]:
    """A copy without the set-aside items, and the original index of every item left in each list."""
    kept: dict[tuple, list[int]] = {}
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out[k], inner = _pruned(v, (*path, k))
            kept |= inner
        return out, kept
    if isinstance(value, list):
        indices = [i for i, v in enumerate(value) if v is not _DROPPED]
        if len(indices) != len(value):
            kept[path] = indices
        items = []
        for i in indices:
            item, inner = _pruned(value[i], (*path, i))
            items.append(item)
            kept |= inner
        return items, kept
    return value, kept


def _original(loc: tuple, kept: dict[tuple, list[int]]) -> tuple:
    """A path into the pruned manifest -> the same path with the original list indices."""
    out: tuple = ()
    for part in loc:
        if isinstance(part, int) and out in kept and part < len(kept[out]):
            part = kept[out][part]
        out = (*out, part)
    return out


def _clean_loc(loc: tuple) -> tuple:
    """A pydantic error location without its union members and validator names ('list[int]', ...)."""
    return tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))


class _Locator:
    def __init__(self, marks: dict[tuple, Mark], key_marks: dict[tuple, Mark]):
        self.marks, self.key_marks = marks, key_marks
        self.kept: dict[tuple, list[int]] = {}  # a salvaged manifest's lists: original index of each item
        self.cut: list[tuple] = []  # set aside by the salvage: their problems are reported already

    def original(self, loc: tuple) -> tuple:
        return _original(loc, self.kept)

    def reported(self, loc: tuple) -> bool:
        """Whether a problem at `loc` (original indices) is a consequence of a value already reported."""
        return any(loc[: len(c)] == c or c[: len(loc)] == loc for c in self.cut)

    def at(self, loc: tuple) -> Mark:
        """Mark of the deepest existing node on the path (a missing field points at its parent)."""
        loc = tuple(loc)
        for cut in range(len(loc), -1, -1):
            if loc[:cut] in self.marks:
                return self.marks[loc[:cut]]
        return Mark(1, 1)


def _from_pydantic(err: dict, locate: _Locator) -> Problem:
    loc = _clean_loc(err["loc"])
    mark = locate.at(loc)
    field = _field_name(loc)
    message = err["msg"]
    if err["type"] == "extra_forbidden":
        key_mark = locate.key_marks.get(loc, mark)
        return Problem(
            key_mark.line,
            key_mark.column,
            field,
            "unknown field; check the spelling (see manifests/schema.json)",
        )
    if err["type"] == "missing":
        message = "required field is missing; add it"
    elif err["type"] == "literal_error":
        message = f"{message} (got {err.get('input')!r})"
    elif err["type"] == "value_error":
        message = message.removeprefix("Value error, ")
    elif err["type"] == "finite_number":
        message = "must be a finite number (not .nan or .inf)"
    elif err["type"] == "int_type" and isinstance(err.get("input"), bool):
        message = (
            f"must be a whole number, not {str(err['input']).lower()} (YAML reads yes/no/on/off as booleans)"
        )
    elif err["type"] == "string_pattern_mismatch":
        message = (
            f"{err.get('input')!r} must be letters, digits, '_', '.', '-' (starting with a letter or digit)"
        )
    return Problem(mark.line, mark.column, field, message)


def _field_name(loc: tuple) -> str:
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name


def _resolve_paths(m: Manifest, base: Path) -> Manifest:
    def fix(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else (base / p))

    audio = m.audio.model_copy(
        update={k: fix(getattr(m.audio, k)) for k in ("dialogue", "original", "music_and_effects")}
    )
    speakers = [
        s.model_copy(update={"track": fix(s.track), "voice_sample": fix(s.voice_sample)}) for s in m.speakers
    ]
    loras = [lora.model_copy(update={"file": fix(lora.file)}) for lora in m.render.loras]
    render = m.render.model_copy(update={"loras": loras})
    enhance = m.enhance.model_copy(update={"model": fix(m.enhance.model)})
    return m.model_copy(
        update={
            "source": fix(m.source),
            "audio": audio,
            "speakers": speakers,
            "render": render,
            "enhance": enhance,
        }
    )


def _cross_check(
    m: Manifest, locate: _Locator, check_media: bool, require_boxes: bool = True, limits: Limits | None = None
) -> tuple[list[Problem], MediaInfo]:
    problems: list[Problem] = []

    def add(loc: tuple, message: str) -> None:
        loc = locate.original(loc)
        if locate.reported(loc):
            return
        mark = locate.at(loc)
        problems.append(Problem(mark.line, mark.column, _field_name(loc), message))

    source_info = MediaInfo(m.source, "image")
    if check_media:
        source_info = _check_media(m, add)
    _check_speakers(m, add, source_info, require_boxes)
    if not problems and source_info.width:
        _check_render_geometry(m, add, source_info)
    _check_engine(m, add, source_info)
    _check_render_speed(m, add)
    _check_enhance(m, add)
    _check_lines(m, add, source_info)
    _check_audio_plan(m, add)
    _check_limits(m, add, source_info, limits or Limits())
    problems.sort(key=lambda p: (p.line, p.column))
    return problems, source_info


def _check_media(m: Manifest, add) -> MediaInfo:
    source_info, picture_s = MediaInfo(m.source, "image"), None
    try:
        source_info = probe(m.source)
        if source_info.kind == "audio":
            add(("source",), f"{m.source.name} has no picture; give a video or a still image")
        elif source_info.kind == "video":  # every frame's timestamp, read now: a video PyAV cannot read,
            picture_s = VideoFrames(m.source).duration  # or one cut short, fails here
    except MediaError as exc:
        add(("source",), _media_problem(m.source, exc))
    media: list[tuple[tuple, Path | None]] = [
        (("audio", "dialogue"), m.audio.dialogue),
        (("audio", "original"), m.audio.original),
        (("audio", "music_and_effects"), m.audio.music_and_effects),
    ]
    for i, s in enumerate(m.speakers):
        media += [(("speakers", i, "track"), s.track), (("speakers", i, "voice_sample"), s.voice_sample)]
    media = [(loc, p) for loc, p in media if p is not None]
    with ThreadPoolExecutor(max_workers=4) as pool:  # each probe is an ffprobe process: overlap them
        results = list(pool.map(_probe_or_error, [p for _, p in media]))
    for (loc, p), info in zip(media, results, strict=True):
        if isinstance(info, MediaError):
            add(loc, _media_problem(p, info))
        elif not info.has_audio:
            add(loc, f"{p.name} has no sound stream; give an audio file")
        elif truncated := _truncated(p):
            add(loc, truncated)
        elif picture_s is not None and loc[-1] in ("dialogue", "track"):
            _check_fits_picture(loc, p, info.duration, picture_s, add)
    return source_info  # lines past the video's end: _check_lines


def _truncated(path: Path) -> str | None:
    try:
        check_wav_complete(path)
    except MediaError as exc:
        return str(exc)
    return None


def _check_fits_picture(loc: tuple, path: Path, audio_s: float, picture_s: float, add) -> None:
    """Dubbed speech longer than a video source would be cut at the picture's end, unheard: refused."""
    if audio_s > picture_s + LENGTH_TOLERANCE_S:
        add(
            loc,
            f"{path.name} lasts {audio_s:.2f} s but the video source {picture_s:.2f} s; the last"
            f" {audio_s - picture_s:.2f} s would be dropped: trim the audio or give the full-length source",
        )


def _raw_media_problems(data: dict, base: Path, locate: _Locator, taken: set) -> list[Problem]:
    """Missing or unreadable media named in a manifest whose models did not validate."""
    found: list[tuple[tuple, object]] = [(("source",), data.get("source"))]
    audio = data.get("audio") if isinstance(data.get("audio"), dict) else {}
    found += [(("audio", k), audio.get(k)) for k in ("dialogue", "original", "music_and_effects")]
    speakers = data.get("speakers") if isinstance(data.get("speakers"), list) else []
    for i, sp in enumerate(sp for sp in speakers if isinstance(sp, dict)):
        found += [(("speakers", i, k), sp.get(k)) for k in ("track", "voice_sample")]
    problems = []
    for loc, value in found:
        if not isinstance(value, str):
            continue
        info = _probe_or_error(base / value)
        mark = locate.at(loc)
        if isinstance(info, MediaError) and (mark.line, mark.column) not in taken:
            problems.append(
                Problem(mark.line, mark.column, _field_name(loc), _media_problem(base / value, info))
            )
    return problems


def _media_problem(path: Path, error: MediaError) -> str:
    """A missing file is a wrong path; a file that is there but unreadable needs a new export, not a new path."""
    if path.is_file():
        return f"{error}; the file is there but cannot be used: re-export it or give another file"
    return f"{error}; fix the path (relative to the manifest)"


def _check_limits(m: Manifest, add, source: MediaInfo, limits: Limits) -> None:
    """The host's ceilings (tasks/limits.py): a source too long or too large, a plan with too many segments."""
    duration = (
        source.duration if source.kind == "video" else max((ln.end or ln.start for ln in m.lines), default=0)
    )
    if duration > limits.episode_s:
        add(
            ("source",),
            f"{duration:.0f} s long; this host accepts episodes up to {limits.episode_s:.0f} s "
            f"(${env_name('episode_s')}); split the episode",
        )
    if max(source.width, source.height) > limits.resolution:
        add(
            ("source",),
            f"{source.width}x{source.height}; this host accepts sources up to {limits.resolution} pixels "
            f"on the longest side (${env_name('resolution')}); scale it down",
        )
    if isinstance(m.render.max_segment_s, float) and duration / m.render.max_segment_s > limits.segments:
        add(
            ("render", "max_segment_s"),
            f"{duration:.0f} s in segments of at most {m.render.max_segment_s} s is more than "
            f"{limits.segments} segments (${env_name('segments')}); raise max_segment_s",
        )
    for index in m.render.overrides:
        if index >= limits.segments:
            add(
                ("render", "overrides", str(index)),
                f"segment {index} is beyond the {limits.segments} segments a plan may have "
                f"(${env_name('segments')})",
            )


def _probe_or_error(path: Path) -> MediaInfo | MediaError:
    try:
        return probe(path)
    except MediaError as exc:
        return exc


def _check_speakers(m: Manifest, add, source: MediaInfo, require_boxes: bool = True) -> None:
    seen: dict[str, int] = {}
    for i, s in enumerate(m.speakers):
        if s.id in seen:
            add(
                ("speakers", i, "id"),
                f"speaker id {s.id!r} is already used by speakers[{seen[s.id]}]; ids must be unique",
            )
        seen.setdefault(s.id, i)
        if s.id.casefold() in MIX_STEMS:
            add(
                ("speakers", i, "id"),
                f"speaker id {s.id!r} would overwrite the {s.id.casefold()} stem in out/stems/ "
                f"(each speaker's stem is out/stems/<id>.wav); rename the speaker",
            )
        if isinstance(s.box, list) and s.box and isinstance(s.box[0], int):
            _check_box(s.box, ("speakers", i, "box"), add, source)
        elif isinstance(s.box, list):
            _check_timed_boxes(s.box, ("speakers", i, "box"), add, source)
        elif len(m.speakers) > 1 and require_boxes:
            add(
                ("speakers", i),
                f"speaker {s.id!r} has no box; with several speakers each needs one (x0, y0, x1, y1), "
                "or let `dubflow bind FILE --propose` suggest one",
            )


def _check_render_geometry(m: Manifest, add, source: MediaInfo) -> None:
    """Boxes too small for the engine's token grid at the render size, or overlapping so much that the
    engine cannot tell the persons apart (tasks/bind.py owns these rules)."""
    from tasks.boxes import geometry_problems

    boxes = {s.id: s.box_spec() for s in m.speakers}
    for problem in geometry_problems(boxes, (source.width, source.height), m.render.size):
        if problem.severity == "error":
            add(_loc(problem.field), problem.message)


def _check_engine(m: Manifest, add, source: MediaInfo) -> None:
    """A request the engine cannot serve is refused here, not once per segment at render time."""
    if m.render.engine == "multitalk" and source.kind == "video":
        add(
            ("render", "engine"),
            f"multitalk animates a still, and {m.source.name} is a video; "
            "use engine: infinitetalk (video-to-video) or auto",
        )


def _check_render_speed(m: Manifest, add) -> None:
    """The engine's speed switches this machine cannot serve (engine/multitalk/speed.py asks the same)."""
    from engine.multitalk.lora import LoraError, check_lora_file
    from engine.multitalk.speed import ATTENTION_INSTALL, attention_installed, fp8_capable

    r = m.render
    for i, lora in enumerate(r.loras):
        try:
            check_lora_file(lora.file)
        except LoraError as exc:
            add(("render", "loras", i, "file"), f"{exc} (paths are relative to the manifest)")
    if r.quantize == "fp8":
        ok, why = fp8_capable()
        if not ok:
            add(("render", "quantize"), f"{why}; use quantize: int8")
    if r.attention in ATTENTION_INSTALL and attention_installed(r.attention) is None:
        add(
            ("render", "attention"),
            f"{r.attention} is not installed here ({ATTENTION_INSTALL[r.attention]}); use auto",
        )
    if r.overlap_frames and r.chain:
        add(
            ("render", "overlap_frames"),
            "chain already continues each segment from the last (seamless joins); use one: overlap_frames: 0"
            " or chain: false",
        )
    if r.resident_blocks not in ("auto", 0) and r.offload == "none":
        add(("render", "resident_blocks"), "resident_blocks needs offload: blocks; set offload or remove it")


def _check_enhance(m: Manifest, add) -> None:
    """The spandrel backend's weights load, are an upscaler or restorer, and have the scale asked for."""
    from tasks.enhance_model import ModelProblem, check_model

    e = m.enhance
    if e.backend != "spandrel":
        for name in ("model", "scale", "weight"):
            if getattr(e, name) is not None:
                add(("enhance", name), f"used by backend: spandrel only; set it or remove {name}")
        return
    if e.fps != 25:
        add(("enhance", "fps"), "interpolation is the ffmpeg backend's; use fps: 25 with spandrel")
    if e.model is None:
        add(("enhance", "backend"), "spandrel needs model: the weights file (.pth or .safetensors); add it")
        return
    try:
        card = check_model(e.model)
    except ModelProblem as exc:
        add(("enhance", "model"), str(exc))
        return
    try:
        check_model(e.model, e.scale)
    except ModelProblem as exc:
        add(("enhance", "scale"), str(exc))
    if e.weight is not None and card.purpose != "FaceSR":
        add(
            ("enhance", "weight"),
            f"weight blends a face restorer's faces; {Path(e.model).name} is a {card.architecture}"
            f" {card.purpose} model: remove weight",
        )


def _loc(field: str) -> tuple:
    """'speakers[1].box[0]' -> ('speakers', 1, 'box', 0)."""
    parts: list = []
    for name, index in re.findall(r"([A-Za-z_]+)|\[(\d+)\]", field):
        parts.append(name if name else int(index))
    return tuple(parts)


def _check_box(box: list[int], loc: tuple, add, source: MediaInfo) -> None:
    x0, y0, x1, y1 = box
    if x1 <= x0 or y1 <= y0:
        add(loc, f"box {box} is empty or inverted; write it as [x0, y0, x1, y1] with x0 < x1 and y0 < y1")
    elif min(box) < 0 or (source.width and (x1 > source.width or y1 > source.height)):
        add(loc, f"box {box} lies outside the {source.width}x{source.height} source frame; keep it inside")


def _check_timed_boxes(boxes: list[TimedBoxSpec], loc: tuple, add, source: MediaInfo) -> None:
    last_end = -math.inf
    for j, tb in enumerate(boxes):
        end = math.inf if tb.end is None else tb.end
        if end <= tb.start:
            add((*loc, j, "to"), f"'to' ({tb.end}) must be after 'from' ({tb.start})")
        if tb.start < last_end:
            add(
                (*loc, j, "from"),
                f"'from' ({tb.start}) overlaps the previous box, which lasts until {last_end}",
            )
        last_end = max(last_end, end)
        _check_box(tb.box, (*loc, j, "box"), add, source)


def _check_lines(m: Manifest, add, source: MediaInfo) -> None:
    from tasks.tts import text_problems

    ids = set(m.speaker_ids())
    video_end = source.duration if source.kind == "video" and source.duration else None
    for i, line in enumerate(m.lines):
        if line.speaker not in ids:
            add(
                ("lines", i, "speaker"),
                f"unknown speaker {line.speaker!r}; speakers are {', '.join(sorted(ids))}",
            )
        if line.end is not None and line.end <= line.start:
            add(("lines", i, "end"), f"end ({line.end}) must be after start ({line.start})")
        if video_end is not None and line.start >= video_end:
            add(
                ("lines", i, "start"),
                f"starts at {line.start} s, at or after the end of {m.source.name} ({video_end:.3f} s): the line"
                " would be dropped; fix its time or give the full-length source",
            )
        for problem in text_problems(line.text):
            add(("lines", i, "text"), problem)
    _check_own_turns(m, add)
    if m.is_lines_mode() and not any(p for p in m.lines if p.speaker not in ids):
        _check_voices(m, add)


def _check_own_turns(m: Manifest, add) -> None:
    """A speaker never overlaps themself: their lines are in time order, start apart, and an explicit `end`
    comes before their next line."""
    last: dict[str, tuple[int, Line]] = {}
    for i, line in enumerate(m.lines):
        if line.speaker in last:
            j, before = last[line.speaker]
            if line.start < before.start:
                add(
                    ("lines", i, "start"),
                    f"lines of one speaker must be in time order ({line.start} < {before.start})",
                )
            elif line.start == before.start:
                add(
                    ("lines", i, "start"),
                    f"starts together with lines[{j}] of the same speaker ({line.start} s); "
                    "a speaker says one line at a time: merge them or move this one",
                )
            elif before.end is not None and before.end > line.start:
                add(
                    ("lines", j, "end"),
                    f"end ({before.end}) runs into lines[{i}] of the same speaker, which starts at {line.start}; "
                    "a speaker never overlaps themself: end this line earlier or start the next later",
                )
        last[line.speaker] = (i, line)


def _check_voices(m: Manifest, add) -> None:
    """Lines mode: the TTS backend runs here, and every line's voice exists and speaks its language."""
    from engine.base import models_dir_from_env
    from tasks.tts import TtsError, choose_voice, resolve_tts_backend

    models = models_dir_from_env()
    requests = [m.line_voice_request(i) for i in range(len(m.lines))]
    try:
        backend, _ = resolve_tts_backend(m.tts.backend, models, requests)
    except TtsError as exc:
        add(("tts", "backend"), f"{exc}; or choose another tts.backend")
        return
    seen: set[tuple] = set()
    for i in range(len(m.lines)):
        request = m.line_voice_request(i)
        if request in seen:
            continue
        try:
            choose_voice(backend, *request, models)
        except TtsError as exc:
            add(_voice_field(m, i), str(exc))
        seen.add(request)


def _voice_field(m: Manifest, i: int) -> tuple:
    """Where the voice or language of line `i` was set, to point a voice problem at it."""
    line, who = m.lines[i], m.speaker_ids().index(m.lines[i].speaker)
    speaker = m.speakers[who]
    for value, loc in [
        (line.voice, ("lines", i, "voice")),
        (line.language, ("lines", i, "language")),
        (speaker.voice, ("speakers", who, "voice")),
        (speaker.language, ("speakers", who, "language")),
    ]:
        if value is not None:
            return loc
    return ("language",) if "language" in m.model_fields_set else ("lines", i)


def _check_audio_plan(m: Manifest, add) -> None:
    tracks = [s.track is not None for s in m.speakers]
    if any(tracks) and not all(tracks):
        i = tracks.index(False)
        add(("speakers", i), "either every speaker has a track or none does; add a track for this speaker")
    if m.audio.dialogue is None and not all(tracks) and not m.lines:
        add(("audio",), "nothing to dub: give audio.dialogue, a track per speaker, or lines to synthesise")


def write_schema(path: Path = SCHEMA_PATH) -> Path:
    path.write_text(schema_text())
    return path


def schema_text() -> str:
    schema: dict[str, Any] = Manifest.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "dubflow episode manifest"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"
