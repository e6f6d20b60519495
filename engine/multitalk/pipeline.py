"""MultiTalk / InfiniteTalk pipeline: picture or video + per-person audio + boxes + prompt -> a stream of
frames (ENGINE.md §1.3, §5).

Any length is rendered in chunks of `frame_num` frames (`streaming.py` plans them); each chunk is
conditioned on the previous chunk's last M frames, denoised, decoded, colour-matched and handed to the
sink before the next one starts, so host memory does not grow with length. Plain torch; no Prefect.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from engine.base import AUDIO_RATE, JobError, OutOfMemory, ProgressHook, RenderJob, box_at
from engine.multitalk.audio import normalize_loudness, null_windows, pad_tracks
from engine.multitalk.colour import lab_stats, match_colours
from engine.multitalk.components import Components
from engine.multitalk.conditioning import (
    Framing,
    Source,
    decode_video,
    encode_condition,
    encode_image,
    encode_prompt,
    encode_video,
    frame_picture,
    open_source,
    plan_framing,
    token_masks,
)
from engine.multitalk.guidance import APGState, combine_apg, combine_cfg, guidance_passes
from engine.multitalk.schedule import euler_step, make_schedule
from engine.multitalk.settings import (
    BUCKETS,
    MOTION_FRAMES,
    TEXT_LEN,
    UPSTREAM_MAX_FRAMES,
    EngineSettings,
    latent_frames,
)
from engine.multitalk.speed import prepare_transformer
from engine.multitalk.streaming import (
    WINDOW_CONTEXT,
    Chunk,
    ChunkPlan,
    StreamState,
    audio_tail,
    chunk_seed,
    chunk_windows,
    context_frames,
    latent_motion_frames,
    pin_motion,
    plan_chunks,
    reference_frame,
    renoise_motion,
    resolve_state,
    to_uint8,
)
from engine.multitalk.teacache import CacheCall, TeaCache, coefficients_for, merge_summaries
from engine.multitalk.validation import ResolvedJob, resolve_job

log = logging.getLogger(__name__)

# Transient DiT memory per sample at 480p, 81 frames (MEMORY.md: 4.8 GiB beyond weights for batch 1),
# scaled by tokens; used to decide whether the guidance passes fit in one batch.
TRANSIENT_BYTES_PER_TOKEN = 4.80 * 2**30 / 32_760

FrameSink = Callable[[np.ndarray], None]  # receives (t, H, W, 3) uint8 frames, chunk by chunk


@dataclass
class StreamOutput:
    frames: torch.Tensor | None  # (num_frames, H, W, 3) uint8 when no sink was given
    num_frames: int
    framing: Framing
    seed: int
    plan: ChunkPlan
    state: StreamState  # after the last chunk: continue from it
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Conditioning:
    """What one chunk's denoising needs."""

    y: torch.Tensor  # (1, 20, T_lat, h, w)
    text: dict[str, torch.Tensor]  # "prompt" / "negative" -> (1, 512, text_dim)
    image: torch.Tensor  # (1, n_img, image_dim)
    audio_tokens: torch.Tensor  # (T_lat, C * P, out_dim)
    null_tokens: torch.Tensor  # (T_lat, C, out_dim)
    token_masks: torch.Tensor | None  # (P + 1, S)
    motion: torch.Tensor | None = None  # (1, 16, m, h, w) latent motion frames, None: no context
    motion_rule: str = "none"  # "renoise" (MultiTalk), "pin" (InfiniteTalk) or "none"


@dataclass
class _Stream:
    """The job-wide inputs of the chunk loop, computed once."""

    r: ResolvedJob
    source: Source
    framing: Framing
    features: list[torch.Tensor]  # per person (lead + T, layers, dim)
    lead: int  # feature frames carried before job frame 0 (continuation)
    text: dict[str, torch.Tensor]
    anchor: torch.Tensor  # (2, 3) Lab stats of the job's colour anchor
    state: StreamState | None  # the previous chunk's (or segment's) state
    generator: torch.Generator | None  # parity: one job-wide generator (upstream draw order)
    reference: tuple[int, torch.Tensor] | None = None  # the current chunk's reference, read once


class MultiTalkPipeline:
    def __init__(
        self,
        components: Components,
        settings: EngineSettings,
        buckets: dict[int, dict[float, tuple[int, int]]] = BUCKETS,
        motion_frames: dict[str, int] = MOTION_FRAMES,
    ):
        self.c = components
        self.settings = settings
        self.buckets = buckets
        self.motion_defaults = motion_frames
        self.device = torch.device(settings.device)
        self.dtype = settings.torch_dtype()
        self.c.transformer.map_chunk = settings.map_chunk
        # LoRAs, quantisation, offload, attention kernel, compile (EngineSetupError when this machine cannot)
        self.speed = prepare_transformer(self.c.transformer, settings)
        if settings.vae_tiling:
            self.c.vae.enable_tiling()
            self.speed["vae_tiling"] = True

    @classmethod
    def from_settings(cls, settings: EngineSettings) -> MultiTalkPipeline:
        """Load every component from the models folder or the Hugging Face cache (MissingWeightsError)."""
        from engine.multitalk.weights import load_components

        return cls(load_components(settings), settings)

    # -- public --------------------------------------------------------------------------------
    def resolve(self, job: RenderJob) -> ResolvedJob:
        return resolve_job(
            job, self.buckets, max_persons=self._max_persons(), motion_defaults=self.motion_defaults
        )

    def render(
        self, job: RenderJob, *, progress: ProgressHook | None = None, sink: FrameSink | None = None
    ) -> StreamOutput:
        """Validate, then stream the job chunk by chunk to `sink` (or collect the frames)."""
        resolved = self.resolve(job)
        try:
            return self._render(resolved, progress or _no_progress, sink)
        except torch.cuda.OutOfMemoryError as exc:
            raise OutOfMemory(
                f"out of GPU memory at size {job.size}, {resolved.num_frames} frames, {resolved.persons} persons",
                frames=resolved.num_frames,
                persons=resolved.persons,
                size=job.size,
            ) from exc

    __call__ = render

    def plan(self, job: RenderJob, audio_frames: tuple[int, ...] | None = None) -> ChunkPlan:
        """The chunk plan of a job (pure and cheap; `audio_frames` = T per person, from the tracks)."""
        r = self.resolve(job)
        if audio_frames is None:
            audio_frames = tuple(int(len(p.audio) / AUDIO_RATE * 25) for p in job.persons)
        return self._plan(r, audio_frames, continuing=job.continue_from is not None)

    def encode_audio(self, audio: np.ndarray, num_frames: int = 0) -> torch.Tensor:
        """One track -> (T_a, layers, dim) features (cacheable by content hash)."""
        track = normalize_loudness(audio) if self.settings.normalize_loudness else audio
        return self.c.wav2vec.encode(pad_tracks([track], num_frames)[0])

    # -- the stream ----------------------------------------------------------------------------
    def _render(self, r: ResolvedJob, progress: ProgressHook, sink: FrameSink | None) -> StreamOutput:
        timings: dict[str, float] = {}
        kept: list[np.ndarray] = []
        emit = sink or kept.append
        # 1. source (still or video), framing, the state continued from
        state = resolve_state(r.job.continue_from)
        source = open_source(r.job.source, r.job.mode)
        framing = plan_framing(*source.shape, self.buckets[r.job.size])
        _check_continuation(r, state, framing)
        # 2. audio -> features (whole tracks, one pass each), the carried tail in front
        with _timed(timings, "audio"):
            features, lead = self._features(r, state)
        progress("audio", 1, 1)
        # 3. chunk plan
        plan = self._plan(r, tuple(f.shape[0] - lead for f in features), continuing=state is not None)
        # 4. text embeddings (once), colour anchor, RNG
        with _timed(timings, "encode"):
            text = self._text(r)
        anchor = state.anchor if state is not None else self._first_anchor(r, source, framing)
        generator = torch.Generator("cpu").manual_seed(r.job.seed) if self.settings.parity else None
        stream = _Stream(r, source, framing, features, lead, text, anchor, state, generator)
        # 5. chunk by chunk: condition, denoise, decode, colour-match, emit, carry the tail
        info: dict[str, Any] = {}
        cached: list[dict[str, Any]] = []  # TeaCache counts per chunk
        for chunk in plan.chunks:
            with _timed(timings, "encode"):
                cond = self._chunk_conditioning(stream, chunk, plan)
            progress("encode", chunk.index + 1, len(plan.chunks))
            with _timed(timings, "denoise"):
                latent, info = self._denoise_chunk(stream, cond, chunk, plan, progress)
            cached += [info.pop("teacache")] if "teacache" in info else []
            with _timed(timings, "decode"):
                video = self._decode(stream, chunk, plan, latent)  # (3, F, H, W) in [-1, 1]
                emit(to_uint8(video[:, chunk.keep_from : chunk.keep_to]))
                stream.state = self._next_state(stream, chunk, plan, video)
            progress("decode", chunk.index + 1, len(plan.chunks))
            if r.job.state_output is not None:
                stream.state.save(r.job.state_output)  # long renders can resume after a crash
            del video, latent, cond
        info.update(
            crop=framing.crop_in_source(), framing=dataclasses.asdict(framing), chunks=len(plan.chunks),
            generated=plan.generated, motion_frames=plan.motion_frames, switches=self._switches(),
            speed=self.speed,
        )  # fmt: skip
        if cached:
            info["teacache"] = merge_summaries(cached)
            log.info(
                "teacache: %(skipped_total)d forwards skipped, %(computed_total)d computed", info["teacache"]
            )
        frames = torch.from_numpy(np.concatenate(kept)) if sink is None else None
        return StreamOutput(frames, plan.num_frames, framing, r.job.seed, plan, stream.state, timings, info)

    def _plan(self, r: ResolvedJob, audio_frames: tuple[int, ...], continuing: bool) -> ChunkPlan:
        switches = self.settings.streaming()
        upstream = not switches.exact_length
        stop = int(np.argmax(audio_frames)) if switches.stop_on_longest else 0
        max_frames = r.num_frames
        if upstream and r.job.num_frames is None:
            max_frames = UPSTREAM_MAX_FRAMES  # upstream's cap; its loop stops on the audio instead
        return plan_chunks(
            max_frames, r.frame_num, r.motion_frames, audio_frames, upstream,
            model=r.job.mode, continuing=continuing, stop_person=stop,
        )  # fmt: skip

    def _switches(self) -> dict[str, Any]:
        return {"parity": self.settings.parity, **dataclasses.asdict(self.settings.streaming())}

    def _features(self, r: ResolvedJob, state: StreamState | None) -> tuple[list[torch.Tensor], int]:
        """Per person (lead + T, layers, dim). Ours: tracks end-padded with silence to the longest and to
        num_frames; parity: each track as given (upstream clamps, then reflect-pads at the end)."""
        tracks = [p.audio.astype(np.float32) for p in r.job.persons]
        if self.settings.normalize_loudness:
            tracks = [normalize_loudness(t, AUDIO_RATE) for t in tracks]
        if self.settings.streaming().exact_length:
            tracks = pad_tracks(tracks, r.num_frames)
        features = [self.c.wav2vec.encode(t) for t in tracks]
        if state is None:
            return features, 0
        lead = state.motion_frames + WINDOW_CONTEXT
        return [torch.cat([tail.float(), f]) for tail, f in zip(state.audio, features, strict=True)], lead

    @torch.no_grad()
    def _text(self, r: ResolvedJob) -> dict[str, torch.Tensor]:
        t5, tok = self.c.text_encoder, self.c.tokenizer
        return {
            "prompt": encode_prompt(t5, tok, r.job.prompt, TEXT_LEN),
            "negative": encode_prompt(t5, tok, r.negative_prompt, TEXT_LEN),
        }

    def _reference(self, s: _Stream, chunk: Chunk) -> torch.Tensor:
        """(1, 3, 1, th, tw): the still, or (V2V) the source frame at the chunk's first output frame."""
        if s.source.still is not None:
            return frame_picture(s.source.still, s.framing)
        index = reference_frame(chunk.start, s.r.job.source_start_frame, s.source.video.num_frames25)
        if s.reference is None or s.reference[0] != index:
            s.reference = (index, frame_picture(s.source.frame(index), s.framing))
        return s.reference[1]

    def _first_anchor(self, r: ResolvedJob, source: Source, framing: Framing) -> torch.Tensor:
        """Parity anchor: the first conditioning image (the still, or the source frame at output frame 0)."""
        frame = source.still if source.still is not None else source.frame(r.job.source_start_frame)
        return lab_stats(frame_picture(frame, framing)[0, :, 0])

    @torch.no_grad()
    def _chunk_conditioning(self, s: _Stream, chunk: Chunk, plan: ChunkPlan) -> _Conditioning:
        """CLIP, y, motion latents, audio tokens and token masks of one chunk (ENGINE.md §4.2, §5.2, §5.3)."""
        vae, m = self.c.vae, latent_motion_frames(plan.motion_frames)
        carried = (
            None if s.state is None or not chunk.context else s.state.frames.float()[None]
        )  # (1, 3, M, ..)
        if s.r.job.mode == "multitalk":
            frames = carried if carried is not None else self._reference(s, chunk)  # (1, 3, n, th, tw)
            y = encode_condition(vae, frames, plan.frame_num)
            motion = y[:, 4:, :m].clone() if carried is not None else None  # VAE re-encode of the context
            rule = "renoise" if carried is not None else "none"
        else:
            frames = self._reference(s, chunk)
            y = encode_condition(vae, frames, plan.frame_num)
            motion = encode_video(vae, carried if carried is not None else frames)  # (1, 16, m or 1, h, w)
            rule = "pin"
        image = encode_image(self.c.image_encoder, frames[:, :, -1])
        windows = chunk_windows(s.features, chunk, plan, s.lead, self.c.transformer.adapter_cfg.window)
        dit = self.c.transformer
        audio_tokens = dit.encode_audio_tokens(windows.to(self.device))
        null_tokens = dit.encode_audio_tokens(null_windows(windows).to(self.device))
        masks = self._token_masks(s, chunk)
        return _Conditioning(y, s.text, image, audio_tokens, null_tokens, masks, motion, rule)

    def _token_masks(self, s: _Stream, chunk: Chunk) -> torch.Tensor | None:
        if s.r.persons < 2:
            return None
        boxes = [box_at(p.box, max(0, chunk.start)) for p in s.r.job.persons]
        return token_masks(boxes, s.source.shape, s.framing)

    def _noise_source(self, s: _Stream, chunk: Chunk) -> torch.Generator:
        """Ours: a CPU generator per (seed, global chunk); parity: the job-wide one, in upstream order."""
        if s.generator is not None:
            return s.generator
        done = s.state.chunks_done if s.state is not None else 0
        return torch.Generator("cpu").manual_seed(chunk_seed(s.r.job.seed, done))

    def _denoise_chunk(
        self, s: _Stream, cond: _Conditioning, chunk: Chunk, plan: ChunkPlan, progress: ProgressHook
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """One chunk: flow-matching Euler with guidance and the motion rule. Returns (1, 16, T_lat, h, w)."""
        r, schedule = s.r, make_schedule(s.r.job.steps, s.r.shift)
        gen = self._noise_source(s, chunk)
        z_dim = cond.y.shape[1] - 4
        shape = (1, z_dim, latent_frames(r.frame_num), *cond.y.shape[-2:])
        # 1. initial noise, and the motion latents before step 0 (MultiTalk: sigma = 1, pure noise)
        latent = torch.randn(shape, generator=gen, dtype=torch.float32).to(self.device)
        latent = self._apply_motion(latent, cond, schedule.sigmas[0], gen, chunk)
        passes = guidance_passes(r.job.text_scale, r.job.audio_scale)
        batched = self._batch_passes(len(passes), shape)
        apg = APGState() if r.job.guidance == "apg" else None
        cache = self._step_cache(r)
        forwards, total = 0, len(plan.chunks) * schedule.steps
        for i in range(schedule.steps):
            # 2. InfiniteTalk: clean context before every model call
            if cond.motion_rule == "pin":
                latent = pin_motion(latent, cond.motion)
            # 3. guided velocity (TeaCache may answer a pass from its cached residual)
            velocities, calls = self._predict(latent, schedule.timestep(i), passes, cond, batched, (cache, i))
            forwards += calls
            if apg is not None:
                v = combine_apg(velocities, r.job.text_scale, r.job.audio_scale, apg)
            else:
                v = combine_cfg(velocities, r.job.text_scale, r.job.audio_scale)
            # 4. Euler update, then the motion rule (re-noise to sigma_{i+1}, or pin)
            latent = euler_step(latent, v, schedule.sigmas[i], schedule.sigmas[i + 1])
            latent = self._apply_motion(latent, cond, schedule.sigmas[i + 1], gen, chunk)
            progress("denoise", chunk.index * schedule.steps + i + 1, total, chunk=chunk.index)
        info = {"passes": passes, "cfg_batched": batched, "forwards": forwards, "sigmas": schedule.sigmas}
        if cache is not None:
            info["teacache"] = cache.summary()
        return latent, info

    def _step_cache(self, r: ResolvedJob) -> TeaCache | None:
        """A fresh TeaCache for one chunk (new noise, new trajectory), or None without `teacache`."""
        if r.job.teacache is None:
            return None
        return TeaCache(r.job.teacache, r.job.teacache_warmup, coefficients_for(r.job.size))

    def _apply_motion(
        self, latent: torch.Tensor, cond: _Conditioning, sigma: float, gen: torch.Generator, chunk: Chunk
    ) -> torch.Tensor:
        """MultiTalk chunks with context: re-noise the motion latents to `sigma`; InfiniteTalk: pin them
        (parity also draws the re-noise that upstream overwrites, to keep its RNG order)."""
        if cond.motion is None:
            return latent
        if cond.motion_rule == "renoise":
            noise = torch.randn(cond.motion.shape, generator=gen, dtype=torch.float32).to(self.device)
            return renoise_motion(latent, cond.motion, noise, sigma)
        if self.settings.parity and chunk.context:
            torch.randn(cond.motion.shape, generator=gen)  # upstream's overwritten injection
        return pin_motion(latent, cond.motion)

    def _decode(self, s: _Stream, chunk: Chunk, plan: ChunkPlan, latent: torch.Tensor) -> torch.Tensor:
        """VAE decode, then the colour transfer to this chunk's anchor (before its tail is carried)."""
        video = decode_video(self.c.vae, latent).cpu()  # (3, F, H, W)
        anchor = s.anchor
        per_chunk = self.settings.streaming().colour_anchor == "chunk"
        if per_chunk and s.source.video is not None:
            anchor = lab_stats(self._reference(s, chunk)[0, :, 0])
        return match_colours(video, anchor, s.r.job.color_match)

    def _next_state(self, s: _Stream, chunk: Chunk, plan: ChunkPlan, video: torch.Tensor) -> StreamState:
        """The last M frames up to the chunk's last kept frame, and the audio features just before them."""
        m_frames = plan.motion_frames
        end_local = max(chunk.keep_to, m_frames)  # a segment shorter than M carries its first M frames
        end = chunk.start + end_local  # job frame after the carried frames
        previous = s.state
        done = previous.chunks_done if previous is not None else 0
        frames_done = previous.frames_done if previous is not None else 0
        return StreamState(
            frames=context_frames(video[:, :end_local], m_frames),
            anchor=s.anchor,
            audio=[audio_tail(f, end, m_frames, s.lead) for f in s.features],
            framing=dataclasses.asdict(s.framing),
            mode=s.r.job.mode,
            next_source_frame=s.r.job.source_start_frame + chunk.start + chunk.keep_to,
            chunks_done=done + 1,
            frames_done=frames_done + len(chunk.kept),
            seed=s.r.job.seed,
        )

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
        step_cache: tuple[TeaCache | None, int] = (None, 0),
    ) -> tuple[dict[str, torch.Tensor], int]:
        """Velocity per pass, as one batch or one forward per pass. Returns (velocities, forwards)."""
        from engine.multitalk.transformer import AudioContext

        cache, step = step_cache
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
                **({} if cache is None else {"cache": CacheCall(cache, step, group)}),
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


def _check_continuation(r: ResolvedJob, state: StreamState | None, framing: Framing) -> None:
    """A continued segment must match the state: same mode, persons, motion frames and framing."""
    if state is None:
        return
    rules = [
        ("mode", r.job.mode, state.mode),
        ("persons", r.persons, len(state.audio)),
        ("motion_frames", r.motion_frames, state.motion_frames),
        ("framing", dataclasses.asdict(framing), state.framing),
    ]
    for name, value, expected in rules:
        if value != expected:
            raise JobError(
                f"continue_from: {name} {value!r} differs from the state's {expected!r}; rule: equal"
            )
