"""MultiTalk pipeline: picture + per-person audio + boxes + prompt -> one clip of frames (ENGINE.md §1.3).

Part 1 renders one clip of up to `frame_num` (81) frames; streaming, TeaCache and InfiniteTalk mode
are part 2. Plain torch; no Prefect.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engine.base import AUDIO_RATE, OutOfMemory, ProgressHook, RenderJob
from engine.multitalk.audio import (
    Wav2VecEncoder,
    normalize_loudness,
    null_windows,
    pad_tracks,
    person_windows,
)
from engine.multitalk.conditioning import (
    Framing,
    decode_latent,
    encode_condition,
    encode_image,
    encode_prompt,
    frame_picture,
    load_picture,
    plan_framing,
    token_masks,
)
from engine.multitalk.guidance import APGState, combine_apg, combine_cfg, guidance_passes
from engine.multitalk.schedule import euler_step, make_schedule
from engine.multitalk.settings import BUCKETS, TEXT_LEN, EngineSettings, latent_frames
from engine.multitalk.validation import ResolvedJob, resolve_job

# Transient DiT memory per sample at 480p, 81 frames (MEMORY.md: 4.8 GiB beyond weights for batch 1),
# scaled by tokens; used to decide whether the guidance passes fit in one batch.
TRANSIENT_BYTES_PER_TOKEN = 4.80 * 2**30 / 32_760


@dataclass
class Components:
    """The loaded models. `transformer` is a MultiTalkTransformer3DModel."""

    transformer: Any
    vae: Any  # diffusers AutoencoderKLWan
    text_encoder: Any  # transformers UMT5EncoderModel
    tokenizer: Any
    image_encoder: Any  # transformers CLIPVisionModel
    wav2vec: Wav2VecEncoder


@dataclass
class ClipOutput:
    frames: torch.Tensor  # (num_frames, H, W, 3) uint8
    framing: Framing
    seed: int
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Conditioning:
    """Everything the denoising loop needs, computed once per clip."""

    y: torch.Tensor  # (1, 20, T_lat, h, w)
    text: dict[str, torch.Tensor]  # "prompt" / "negative" -> (1, 512, text_dim)
    image: torch.Tensor  # (1, n_img, image_dim)
    audio_tokens: torch.Tensor  # (T_lat, C * P, out_dim)
    null_tokens: torch.Tensor  # (T_lat, C, out_dim)
    token_masks: torch.Tensor | None  # (P + 1, S)


class MultiTalkPipeline:
    def __init__(
        self,
        components: Components,
        settings: EngineSettings,
        buckets: dict[int, dict[float, tuple[int, int]]] = BUCKETS,
    ):
        self.c = components
        self.settings = settings
        self.buckets = buckets
        self.device = torch.device(settings.device)
        self.dtype = settings.torch_dtype()
        self.c.transformer.map_chunk = settings.map_chunk

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> MultiTalkPipeline:
        """Load every component from the models folder or the Hugging Face cache (MissingWeightsError)."""
        from engine.multitalk.weights import load_components

        return cls(load_components(settings), settings)

    # -- public --------------------------------------------------------------------------------
    def render(self, job: RenderJob, *, progress: ProgressHook | None = None) -> ClipOutput:
        """Validate, encode, denoise, decode. Returns exactly `num_frames` frames."""
        resolved = resolve_job(job, self.buckets, max_persons=self._max_persons())
        try:
            return self._render(resolved, progress or _no_progress)
        except torch.cuda.OutOfMemoryError as exc:
            raise OutOfMemory(
                f"out of GPU memory at size {job.size}, {resolved.num_frames} frames, {resolved.persons} persons",
                frames=resolved.num_frames,
                persons=resolved.persons,
                size=job.size,
            ) from exc

    __call__ = render

    def encode_audio(self, audio: np.ndarray, num_frames: int = 0) -> torch.Tensor:
        """One track -> (T_a, layers, dim) features (cacheable by content hash)."""
        track = normalize_loudness(audio) if self.settings.normalize_loudness else audio
        return self.c.wav2vec.encode(pad_tracks([track], num_frames)[0])

    # -- steps ---------------------------------------------------------------------------------
    def _render(self, r: ResolvedJob, progress: ProgressHook) -> ClipOutput:
        timings: dict[str, float] = {}
        # 1. picture, framing, person masks
        picture = load_picture(r.job.source)
        framing = plan_framing(*picture.shape[:2], self.buckets[r.job.size])
        masks = token_masks(list(r.boxes), picture.shape[:2], framing) if r.persons >= 2 else None
        # 2. audio -> features -> windows
        with _timed(timings, "audio"):
            windows = self._audio_windows(r)
        progress("audio", 1, 1)
        # 3. text, image, first-frame conditioning
        with _timed(timings, "encode"):
            cond = self._conditioning(r, frame_picture(picture, framing), windows, masks)
        progress("encode", 1, 1)
        # 4. denoise
        with _timed(timings, "denoise"):
            latent, info = self._denoise(r, cond, progress)
        # 5. decode and trim to the exact length
        with _timed(timings, "decode"):
            frames = decode_latent(self.c.vae, latent)[: r.num_frames]
        progress("decode", 1, 1)
        info.update(crop=framing.crop_in_source(), color_match="not applied (part 2 of the engine)")
        return ClipOutput(frames.cpu(), framing, r.job.seed, timings, info)

    def _audio_windows(self, r: ResolvedJob) -> torch.Tensor:
        """(P, F, 5, layers, dim) windows of the clip's frames."""
        tracks = [p.audio.astype(np.float32) for p in r.job.persons]
        if self.settings.normalize_loudness:
            tracks = [normalize_loudness(t, AUDIO_RATE) for t in tracks]
        tracks = pad_tracks(tracks, r.num_frames)
        features = [self.c.wav2vec.encode(t) for t in tracks]
        window = self.c.transformer.adapter_cfg.window
        return person_windows(features, 0, r.frame_num, window)

    @torch.no_grad()
    def _conditioning(
        self, r: ResolvedJob, picture: torch.Tensor, windows: torch.Tensor, masks: torch.Tensor | None
    ) -> _Conditioning:
        t5, tok = self.c.text_encoder, self.c.tokenizer
        text = {
            "prompt": encode_prompt(t5, tok, r.job.prompt, TEXT_LEN),
            "negative": encode_prompt(t5, tok, r.negative_prompt, TEXT_LEN),
        }
        image = encode_image(self.c.image_encoder, picture[:, :, 0])
        y = encode_condition(self.c.vae, picture, r.frame_num)
        dit = self.c.transformer
        audio_tokens = dit.encode_audio_tokens(windows.to(self.device))
        null_tokens = dit.encode_audio_tokens(null_windows(windows).to(self.device))
        return _Conditioning(y, text, image, audio_tokens, null_tokens, masks)

    def _noise(self, r: ResolvedJob, shape: tuple[int, ...], chunk: int = 0) -> torch.Tensor:
        """fp32 noise from a CPU generator seeded by (seed, chunk): identical on every device."""
        gen = torch.Generator("cpu").manual_seed(r.job.seed * 1_000_003 + chunk)
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    def _denoise(
        self, r: ResolvedJob, cond: _Conditioning, progress: ProgressHook
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Flow-matching Euler with three-way (or two-way) guidance. Returns (1, 16, T_lat, h, w) fp32."""
        z_dim = cond.y.shape[1] - 4
        shape = (1, z_dim, latent_frames(r.frame_num), *cond.y.shape[-2:])
        latent = self._noise(r, shape).to(self.device)
        schedule = make_schedule(r.job.steps, r.shift)
        passes = guidance_passes(r.job.text_scale)
        batched = self._batch_passes(len(passes), shape)
        apg = APGState() if r.job.guidance == "apg" else None
        forwards = 0
        for i in range(schedule.steps):
            velocities, calls = self._predict(latent, schedule.timestep(i), passes, cond, batched)
            forwards += calls
            if apg is not None:
                v = combine_apg(velocities, r.job.text_scale, r.job.audio_scale, apg)
            else:
                v = combine_cfg(velocities, r.job.text_scale, r.job.audio_scale)
            latent = euler_step(latent, v, schedule.sigmas[i], schedule.sigmas[i + 1])
            progress("denoise", i + 1, schedule.steps, chunk=0)
        info = {"passes": passes, "cfg_batched": batched, "forwards": forwards, "sigmas": schedule.sigmas}
        return latent, info

    def _pass_inputs(self, name: str, cond: _Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        """(text embedding, audio tokens) of one guidance pass (ENGINE.md §4.4)."""
        text = cond.text["negative" if name in ("drop_text", "uncond") else "prompt"]
        audio = cond.null_tokens if name in ("uncond", "drop_audio") else cond.audio_tokens
        return text, audio

    @torch.no_grad()
    def _predict(
        self,
        latent: torch.Tensor,
        timestep: float,
        passes: tuple[str, ...],
        cond: _Conditioning,
        batched: bool,
    ) -> tuple[dict[str, torch.Tensor], int]:
        """Velocity per pass, as one batch or one forward per pass. Returns (velocities, forwards)."""
        from engine.multitalk.transformer import AudioContext

        groups = [passes] if batched else [(p,) for p in passes]
        out: dict[str, torch.Tensor] = {}
        model_input = torch.cat([latent, cond.y.to(latent)], dim=1).to(self.dtype)  # (1, 36, T_lat, h, w)
        for group in groups:
            inputs = [self._pass_inputs(name, cond) for name in group]
            batch = len(group)
            audio = AudioContext(
                tokens=[a for _, a in inputs],
                context_tokens=self.c.transformer.adapter_cfg.context_tokens,
                token_masks=None if cond.token_masks is None else cond.token_masks.to(self.device),
            )
            velocity = self.c.transformer(
                model_input.expand(batch, -1, -1, -1, -1),
                torch.full((batch,), timestep, device=self.device),
                torch.cat([t for t, _ in inputs]).to(self.device, self.dtype),
                cond.image.expand(batch, -1, -1).to(self.device, self.dtype),
                audio,
            )
            out.update({name: velocity[j : j + 1].float() for j, name in enumerate(group)})
        return out, len(groups)

    def _batch_passes(self, passes: int, latent_shape: tuple[int, ...]) -> bool:
        mode = self.settings.cfg_batch
        if mode != "auto":
            return mode == "on"
        if self.device.type != "cuda":
            return True
        tokens = latent_shape[2] * latent_shape[3] * latent_shape[4] // 4
        free, _ = torch.cuda.mem_get_info(self.device)
        return passes * tokens * TRANSIENT_BYTES_PER_TOKEN * 1.2 < free

    def _max_persons(self) -> int:
        return 8 if self.settings.experimental_persons else 2


def _no_progress(stage: str, completed: int, total: int, **info: Any) -> None:
    return None


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    """Adds the block's wall time (after a CUDA sync, when CUDA is in use) to timings[name]."""
    start = time.perf_counter()
    yield
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
