"""Picture conditioning (ENGINE.md §3.5, §4.1, §4.2): bucket, cover crop, person masks, CLIP input, `y`.

Pixel tensors are in [-1, 1]; th x tw is the bucket size; the VAE maps (F, th, tw) pixels to
(T_lat, th/8, tw/8) latents; tokens sit on a (th/16, tw/16) grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from engine.base import Box, JobError
from engine.multitalk.settings import CLIP_MEAN, CLIP_STD, closest_bucket

VAE_SPATIAL = 8
VAE_TEMPORAL = 4
PATCH = 2  # DiT patch (1, 2, 2) on the latent grid


@dataclass(frozen=True)
class Framing:
    """Where the bucket-sized picture comes from: scale, then a centre crop of the scaled picture."""

    height: int  # bucket h
    width: int  # bucket w
    scale: float
    left: int  # crop offset in scaled pixels
    top: int

    def crop_in_source(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the source pixels the output covers (for paste-back)."""
        return (
            round(self.left / self.scale),
            round(self.top / self.scale),
            round((self.left + self.width) / self.scale),
            round((self.top + self.height) / self.scale),
        )

    @property
    def token_grid(self) -> tuple[int, int]:
        return self.height // (VAE_SPATIAL * PATCH), self.width // (VAE_SPATIAL * PATCH)


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def is_still(source: Path | np.ndarray) -> bool:
    """A picture (an array or an image file) rather than a video."""
    return isinstance(source, np.ndarray) or Path(source).suffix.lower() in IMAGE_SUFFIXES


def load_picture(source: Path | np.ndarray) -> np.ndarray:
    """A still as (H, W, 3) uint8."""
    if isinstance(source, np.ndarray):
        if source.ndim != 3 or source.shape[2] != 3 or source.dtype != np.uint8:
            raise JobError(
                f"source: array of shape {source.shape} dtype {source.dtype}; rule: H x W x 3 uint8"
            )
        return source
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(source) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, FileNotFoundError, IsADirectoryError) as exc:
        raise JobError(f"source: {str(source)!r}; rule: an existing still image") from exc


def open_video(path: Path) -> Any:
    """The media layer's frame reader (`engine.media.VideoFrames`): .width, .height, .num_frames25,
    .source_index(frame25), .frames25(indices) -> (n, H, W, 3) uint8 at source resolution."""
    from engine.media import MediaError, VideoFrames

    try:
        return VideoFrames(Path(path))
    except MediaError as exc:
        raise JobError(f"source: {str(path)!r}; rule: a readable video ({exc})") from None


@dataclass
class Source:
    """The picture side of a job: a still, or a video whose 25 fps frames are read on demand."""

    still: np.ndarray | None = None
    video: Any = None  # VideoFrames

    @property
    def shape(self) -> tuple[int, int]:
        return self.still.shape[:2] if self.still is not None else (self.video.height, self.video.width)

    def frame(self, frame25: int) -> np.ndarray:
        """(H, W, 3) uint8: the still, or the source frame shown at 25 fps frame `frame25` (clamped)."""
        if self.still is not None:
            return self.still
        index = max(0, min(frame25, self.video.num_frames25 - 1))
        return self.video.frames25([index])[0]


def open_source(source: Path | np.ndarray, mode: str) -> Source:
    """Still or video; `multitalk` takes a still only."""
    if is_still(source):
        return Source(still=load_picture(source))
    if mode != "infinitetalk":
        raise JobError(
            f"source: video {str(source)!r} with mode {mode!r}; rule: mode 'infinitetalk' for video"
        )
    return Source(video=open_video(Path(source)))


def plan_framing(src_h: int, src_w: int, buckets: dict[float, tuple[int, int]]) -> Framing:
    """Closest bucket by h/w, cover scale with ceil, centre crop (MultiTalk: wan/multitalk.py:51-89)."""
    th, tw = closest_bucket(buckets, src_h, src_w)
    scale = max(th / src_h, tw / src_w)
    new_h, new_w = math.ceil(src_h * scale), math.ceil(src_w * scale)
    top, left = int(round((new_h - th) / 2.0)), int(round((new_w - tw) / 2.0))
    return Framing(th, tw, scale, left, top)


def frame_picture(picture: np.ndarray, framing: Framing) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, 1, th, tw) float32 in [-1, 1]: PIL bilinear cover resize + centre crop."""
    from PIL import Image

    h, w = picture.shape[:2]
    size = (math.ceil(w * framing.scale), math.ceil(h * framing.scale))
    resized = np.asarray(Image.fromarray(picture).resize(size, Image.BILINEAR))
    crop = resized[framing.top : framing.top + framing.height, framing.left : framing.left + framing.width]
    x = torch.from_numpy(crop.copy()).permute(2, 0, 1).float() / 255.0
    return ((x - 0.5) * 2.0)[None, :, None]


def _frame_mask(mask: np.ndarray, framing: Framing) -> torch.Tensor:
    """Source-pixel mask (H, W) -> nearest cover resize + crop -> latent grid -> token grid, (S,) 0/1."""
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    h, w = mask.shape
    scaled = F.interpolate(
        t, size=(math.ceil(h * framing.scale), math.ceil(w * framing.scale)), mode="nearest"
    )
    crop = scaled[
        ..., framing.top : framing.top + framing.height, framing.left : framing.left + framing.width
    ]
    latent = F.interpolate(
        crop, size=(framing.height // VAE_SPATIAL, framing.width // VAE_SPATIAL), mode="nearest"
    )
    tokens = F.interpolate((latent > 0).float(), size=framing.token_grid, mode="nearest")
    return (tokens > 0).float().flatten()


def token_masks(boxes: list[Box], src_shape: tuple[int, int], framing: Framing) -> torch.Tensor:
    """(P + 1, S) token masks: one row per person's box, then the background (complement of the union).

    Raises JobError when a box is empty, outside the picture or covers no token of the grid (an empty
    row would divide by zero in the reference map)."""
    h, w = src_shape
    rows = []
    union = np.zeros((h, w), dtype=bool)
    for i, box in enumerate(boxes):
        if box.x1 <= box.x0 or box.y1 <= box.y0 or box.x0 < 0 or box.y0 < 0 or box.x1 > w or box.y1 > h:
            raise JobError(f"persons[{i}].box: {box}; rule: non-empty, inside the {w}x{h} picture")
        mask = np.zeros((h, w), dtype=bool)
        mask[box.y0 : box.y1, box.x0 : box.x1] = True
        union |= mask
        rows.append(_frame_mask(mask, framing))
    rows.append(_frame_mask(~union, framing))
    masks = torch.stack(rows)
    for i, row in enumerate(masks[:-1]):
        if row.sum() == 0:
            raise JobError(
                f"persons[{i}].box: {boxes[i]}; rule: must cover at least one token inside the crop"
            )
    return masks


def clip_pixels(frame: torch.Tensor, image_size: int) -> torch.Tensor:
    """(1, 3, th, tw) in [-1, 1] -> (1, 3, size, size): bicubic squash (aspect not kept), CLIP normalisation.

    Not CLIPImageProcessor (shortest-side resize + crop): upstream squashes the whole frame."""
    x = F.interpolate(frame.float(), size=(image_size, image_size), mode="bicubic", align_corners=False)
    x = x * 0.5 + 0.5
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def first_frame_mask(frame_num: int, latent_h: int, latent_w: int, known_frames: int = 1) -> torch.Tensor:
    """(1, 4, T_lat, h, w) I2V mask: ones on the first `known_frames` pixel frames, frame 0 repeated 4x."""
    mask = torch.zeros(1, frame_num, latent_h, latent_w)
    mask[:, :known_frames] = 1
    mask = torch.cat([mask[:, :1].repeat(1, VAE_TEMPORAL, 1, 1), mask[:, 1:]], dim=1)  # (1, F + 3, h, w)
    return mask.view(1, -1, VAE_TEMPORAL, latent_h, latent_w).transpose(1, 2)


def latent_stats(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's per-channel latents mean/std as (1, z, 1, 1, 1)."""
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(like)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(like)
    return mean, std


@torch.no_grad()
def encode_video(vae: Any, video: torch.Tensor) -> torch.Tensor:
    """(1, 3, n, th, tw) in [-1, 1] -> normalised VAE latent (1, z, 1 + (n-1)//4, h, w) float32."""
    param = next(vae.parameters())
    latent = vae.encode(video.to(param)).latent_dist.mode()
    mean, std = latent_stats(vae, latent)
    return ((latent - mean) / std).float()


@torch.no_grad()
def encode_condition(vae: Any, frames: torch.Tensor, frame_num: int) -> torch.Tensor:
    """y = [mask 4, normalised VAE latent 16] of [n known frames, F - n zero frames]: (1, 20, T_lat, h, w).

    frames: (1, 3, n, th, tw); the mask marks the n known pixel frames (ENGINE.md §4.2)."""
    known = frames.shape[2]
    video = torch.cat([frames, frames.new_zeros(1, 3, frame_num - known, *frames.shape[-2:])], dim=2)
    latent = encode_video(vae, video)
    mask = first_frame_mask(frame_num, latent.shape[-2], latent.shape[-1], known).to(latent)
    return torch.cat([mask, latent], dim=1)


@torch.no_grad()
def decode_video(vae: Any, latent: torch.Tensor) -> torch.Tensor:
    """(1, 16, T_lat, h, w) normalised latent -> (3, F, H, W) float32 in [-1, 1]."""
    param = next(vae.parameters())
    mean, std = latent_stats(vae, latent.to(param))
    return vae.decode(latent.to(param) * std + mean).sample[0].float().clamp(-1, 1)


def decode_latent(vae: Any, latent: torch.Tensor) -> torch.Tensor:
    """(1, 16, T_lat, h, w) normalised latent -> (F, H, W, 3) uint8."""
    video = decode_video(vae, latent)
    return ((video.permute(1, 2, 3, 0) + 1.0) * 127.5).round().to(torch.uint8)


def clean_prompt(text: str) -> str:
    """diffusers' `prompt_clean`: ftfy (when installed) + double HTML unescape + whitespace collapse."""
    import html
    import re

    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # ftfy only repairs mojibake; the rest of the cleaning still applies
        pass
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


@torch.no_grad()
def encode_prompt(text_encoder: Any, tokenizer: Any, prompt: str, text_len: int) -> torch.Tensor:
    """umT5 encoding trimmed to the true length and zero-padded to `text_len` rows: (1, text_len, d)."""
    inputs = tokenizer(
        [clean_prompt(prompt)], padding="max_length", max_length=text_len, truncation=True,
        add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
    )  # fmt: skip
    device = next(text_encoder.parameters()).device
    ids, mask = inputs.input_ids.to(device), inputs.attention_mask.to(device)
    hidden = text_encoder(ids, mask).last_hidden_state[0]  # (text_len, d)
    length = int(mask.sum())
    out = hidden.new_zeros(text_len, hidden.shape[-1])
    out[:length] = hidden[:length]
    return out[None].float()


@torch.no_grad()
def encode_image(image_encoder: Any, frame: torch.Tensor) -> torch.Tensor:
    """CLIP ViT tokens before the last block (hidden_states[-2], no post-norm): (1, n_img, width)."""
    size = image_encoder.config.image_size
    param = next(image_encoder.parameters())
    pixels = clip_pixels(frame, size).to(param)
    return image_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2].float()
