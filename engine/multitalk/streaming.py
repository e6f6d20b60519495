"""Streaming long video in chunks (ENGINE.md §5): chunk plans, reference frames, motion rules, StreamState.

Notation: F frames per chunk (`frame_num`), M motion (context) frames, Δ = F − M new frames per chunk,
m = 1 + (M − 1)//4 latent motion frames. Chunk k of a fresh job covers output frames [kΔ, kΔ + F); chunk 0
keeps all F frames, later chunks drop their first M (the context they regenerated). A job that continues
a previous segment (`continue_from`) starts with a continuation chunk covering [−M, Δ).

Two plans: ours (exactly `num_frames` frames) and upstream's (`parity`: stop once a chunk's end reaches
min(max_frames, T of the stop person), reflect-pad the features, MultiTalk keeps T − 3 frames and
InfiniteTalk T of the last person; MultiTalk: wan/multitalk.py:745-797, InfiniteTalk: wan/multitalk.py:791-852).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from engine.base import JobError
from engine.media import atomic_path
from engine.multitalk.audio import reflect_pad

Model = Literal["multitalk", "infinitetalk"]
WINDOW_CONTEXT = 2  # audio frames either side of a video frame (window 5)
STATE_FORMAT = 1


def latent_motion_frames(motion_frames: int) -> int:
    """m = 1 + (M − 1)//4: latent frames holding M pixel frames (the VAE's causal 1 + 4 + 4 … grouping)."""
    return 1 + (motion_frames - 1) // 4


@dataclass(frozen=True)
class Chunk:
    index: int  # chunk index within this job
    start: int  # job frame of the chunk's local frame 0 (−M for a continuation chunk 0)
    keep_from: int  # local frames [keep_from, keep_to) go to the output
    keep_to: int
    context: bool  # conditioned on the previous chunk's last M frames
    last: bool

    @property
    def kept(self) -> range:
        """Output (job) frames this chunk contributes."""
        return range(self.start + self.keep_from, self.start + self.keep_to)


@dataclass(frozen=True)
class ChunkPlan:
    chunks: tuple[Chunk, ...]
    num_frames: int  # frames in the output
    frame_num: int  # F
    motion_frames: int  # M
    generated: int  # job frames covered by the chunks (end of the last one)
    pad_end: int  # features are reflect-padded up to this frame for the last chunk (§2.8)

    @property
    def stride(self) -> int:
        return self.frame_num - self.motion_frames


def chunk_count(num_frames: int, frame_num: int, motion_frames: int, continuing: bool = False) -> int:
    """K = 1 if N ≤ F else 1 + ⌈(N − F)/Δ⌉; a continuation adds Δ new frames per chunk: ⌈N/Δ⌉."""
    stride = frame_num - motion_frames
    if continuing:
        return max(1, math.ceil(num_frames / stride))
    return 1 if num_frames <= frame_num else 1 + math.ceil((num_frames - frame_num) / stride)


def _chunks(count: int, frame_num: int, motion_frames: int, continuing: bool) -> tuple[Chunk, ...]:
    stride, lead = frame_num - motion_frames, motion_frames if continuing else 0
    return tuple(
        Chunk(
            index=k,
            start=k * stride - lead,
            keep_from=motion_frames if (k > 0 or continuing) else 0,
            keep_to=frame_num,
            context=k > 0 or continuing,
            last=k == count - 1,
        )
        for k in range(count)
    )


def _trim(chunks: tuple[Chunk, ...], num_frames: int) -> tuple[Chunk, ...]:
    """Cut the kept ranges at `num_frames` (the last chunk may overshoot)."""
    out = []
    for c in chunks:
        keep_to = max(c.keep_from, min(c.keep_to, num_frames - c.start))
        out.append(Chunk(c.index, c.start, c.keep_from, keep_to, c.context, c.last))
    return tuple(out)


def plan_chunks(
    num_frames: int,
    frame_num: int,
    motion_frames: int,
    audio_frames: Sequence[int],
    parity: bool = False,
    *,
    model: Model = "multitalk",
    continuing: bool = False,
    stop_person: int = 0,
) -> ChunkPlan:
    """Chunk windows, drops and the output length.

    Ours (`parity=False`): exactly `num_frames` frames. Upstream (`parity=True`): `num_frames` is upstream's
    `max_frames`; the loop stops when a chunk's end reaches min(max_frames, T of `stop_person`) (upstream:
    person 1), generating at least two chunks unless max_frames ≤ F ("clip" mode)."""
    if not 1 <= motion_frames < frame_num:
        raise JobError(f"motion_frames: {motion_frames}; rule: 1 <= motion_frames < frame_num={frame_num}")
    stride = frame_num - motion_frames
    if not parity or continuing:
        count = chunk_count(num_frames, frame_num, motion_frames, continuing)
        chunks = _chunks(count, frame_num, motion_frames, continuing)
        end = chunks[-1].start + frame_num
        return ChunkPlan(_trim(chunks, num_frames), num_frames, frame_num, motion_frames, end, end)
    if num_frames <= frame_num:  # upstream "clip": one chunk, truncated to max_frames
        chunks = _chunks(1, frame_num, motion_frames, False)
        return ChunkPlan(
            _trim(chunks, num_frames), num_frames, frame_num, motion_frames, frame_num, frame_num
        )
    stop = min(num_frames, audio_frames[stop_person])
    count = 1 + max(1, math.ceil((stop - frame_num) / stride))
    end = frame_num + (count - 1) * stride
    length = upstream_length(end, num_frames, audio_frames, model, stop_person)
    if length < 1:
        raise JobError(f"num_frames: upstream (parity) would return {length} frames for audio {audio_frames}")
    chunks = _chunks(count, frame_num, motion_frames, False)
    return ChunkPlan(_trim(chunks, length), length, frame_num, motion_frames, end, end)


def upstream_length(
    end: int, max_frames: int, audio_frames: Sequence[int], model: Model, stop_person: int
) -> int:
    """Upstream's final length after generating `end` frames (ENGINE.md §5.4)."""
    length = min(end, max_frames)
    missing = [end - t + 3 if end >= t else 0 for t in audio_frames]
    if sum(missing) == 0:
        return length
    if model == "multitalk":  # drops person 1's padding; `x[:-0]` is empty upstream, kept here
        return length - missing[stop_person] if missing[stop_person] else 0
    return min(length, audio_frames[-1])  # InfiniteTalk: the last-loaded person's original length


# -- audio windows per chunk ---------------------------------------------------------------------------
def chunk_windows(
    features: Sequence[torch.Tensor], chunk: Chunk, plan: ChunkPlan, lead: int = 0, window: int = 5
) -> torch.Tensor:
    """(P, F, window, layers, dim) audio windows of one chunk: frames chunk.start … +F−1 with ±2 context,
    clamped; the last chunk reads reflect-padded features. `lead` = feature frames prepended before job
    frame 0 (a continuation's carried tail), so feature index = job frame + lead."""
    out = []
    for feats in features:
        if chunk.last:
            feats = reflect_pad(feats, plan.pad_end + lead)
        f = torch.arange(chunk.start, chunk.start + plan.frame_num)[:, None] + lead
        w = torch.arange(window)[None, :] - window // 2
        out.append(feats[(f + w).clamp(0, feats.shape[0] - 1)])
    return torch.stack(out)


def audio_tail(features: torch.Tensor, end: int, motion_frames: int, lead: int = 0) -> torch.Tensor:
    """Feature frames end − M − 2 … end − 1 (clamped): what a continuation chunk's windows read before
    the next job's frame 0. features: (T, layers, dim) → (M + 2, layers, dim)."""
    idx = torch.arange(end - motion_frames - WINDOW_CONTEXT, end) + lead
    return features[idx.clamp(0, features.shape[0] - 1)].clone()


# -- reference frames (InfiniteTalk) -------------------------------------------------------------------
def reference_frame(chunk_start: int, source_start: int, num_frames25: int) -> int:
    """25 fps source index of chunk k's reference: min(source_start + kΔ, n − 1) (upstream reads
    `extract_specific_frames(video, audio_start_idx)`, InfiniteTalk: wan/multitalk.py:803-812)."""
    return max(0, min(source_start + chunk_start, num_frames25 - 1))


# -- motion rules --------------------------------------------------------------------------------------
def renoise_motion(
    latent: torch.Tensor, motion: torch.Tensor, noise: torch.Tensor, sigma: float
) -> torch.Tensor:
    """MultiTalk: latent[:, :, :m] = (1 − σ)·motion + σ·noise (before step 0 with σ = 1, after step i with
    σ_{i+1}; after the last step σ = 0 leaves exactly the motion latents). latent: (1, C, T, h, w)."""
    out = latent.clone()
    m = motion.shape[2]
    out[:, :, :m] = ((1.0 - sigma) * motion + sigma * noise).to(latent.dtype)
    return out


def pin_motion(latent: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
    """InfiniteTalk: latent[:, :, :m] = motion, clean, before every model call and after every update."""
    out = latent.clone()
    out[:, :, : motion.shape[2]] = motion.to(latent.dtype)
    return out


def chunk_seed(seed: int, chunk: int) -> int:
    """Our noise comes from a CPU generator seeded by (seed, global chunk index)."""
    return seed * 1_000_003 + chunk


# -- state carried between chunks and segments ---------------------------------------------------------
@dataclass
class StreamState:
    """What the next chunk (or the next segment's render) needs from the previous one (§5.6)."""

    frames: torch.Tensor  # (3, M, H, W) float16 in [−1, 1]: last M decoded frames after colour correction
    anchor: torch.Tensor  # (2, 3) float64 Lab mean/std of the colour anchor
    audio: list[torch.Tensor]  # per person (M + 2, layers, dim) float32 feature frames before frame 0
    framing: dict[str, Any]  # conditioning.Framing as a dict (bucket, scale, crop offsets)
    mode: str
    next_source_frame: int  # 25 fps source frame aligned with the next output frame (V2V)
    chunks_done: int  # global chunk counter: seeds the next chunk's noise
    frames_done: int  # output frames rendered so far, all segments
    seed: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def motion_frames(self) -> int:
        return self.frames.shape[1]

    def save(self, path: Path | str) -> Path:
        """One safetensors file (tensors + JSON metadata), written to a temp file and renamed."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"frames": self.frames.contiguous(), "anchor": self.anchor.contiguous()}
        tensors.update({f"audio.{i}": a.contiguous() for i, a in enumerate(self.audio)})
        meta = {
            "format": STATE_FORMAT, "framing": self.framing, "mode": self.mode, "persons": len(self.audio),
            "next_source_frame": self.next_source_frame, "chunks_done": self.chunks_done,
            "frames_done": self.frames_done, "seed": self.seed, "extra": self.extra,
        }  # fmt: skip
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"stream_state": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: Path | str) -> StreamState:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads(f.metadata()["stream_state"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        except (OSError, KeyError, ValueError) as exc:
            raise JobError(f"continue_from: {str(path)!r}; rule: a StreamState file ({exc})") from None
        return cls(
            frames=tensors["frames"], anchor=tensors["anchor"],
            audio=[tensors[f"audio.{i}"] for i in range(meta["persons"])], framing=meta["framing"],
            mode=meta["mode"], next_source_frame=meta["next_source_frame"], chunks_done=meta["chunks_done"],
            frames_done=meta["frames_done"], seed=meta["seed"], extra=meta.get("extra", {}),
        )  # fmt: skip


def resolve_state(value: StreamState | Path | str | None) -> StreamState | None:
    if value is None or isinstance(value, StreamState):
        return value
    return StreamState.load(value)


def context_frames(video: torch.Tensor, motion_frames: int) -> torch.Tensor:
    """(3, F, H, W) colour-corrected chunk → its last M frames as carried: (3, M, H, W) float16.

    Every chunk's context passes through float16, in one job and across `continue_from`, so a split
    render equals an unsplit one."""
    return video[:, -motion_frames:].to(torch.float16).clone()


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [−1, 1] → (T, H, W, 3) uint8."""
    x = ((video.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()
