"""Picture conditioning: buckets, cover crop, CLIP input, umT5 padding, the I2V mask and `y`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.multitalk.conditioning import (
    clip_pixels,
    encode_condition,
    encode_prompt,
    first_frame_mask,
    frame_picture,
    plan_framing,
)
from engine.multitalk.renderer import available
from engine.multitalk.settings import BUCKETS, CLIP_MEAN, CLIP_STD
from tests.conftest_multitalk import shared_components

pytestmark = pytest.mark.one_torch_thread  # tiny tensors: one thread is faster


@pytest.mark.parametrize(
    ("size", "src", "bucket"),
    [(480, (1080, 1920), (448, 896)), (720, (1080, 1920), (704, 1280)), (480, (1000, 1000), (640, 640)),
     (480, (1920, 1080), (832, 448)), (720, (1440, 2560), (704, 1280))],
)  # fmt: skip
def test_bucket_choice(size, src, bucket):
    framing = plan_framing(*src, BUCKETS[size])
    assert (framing.height, framing.width) == bucket


def test_cover_scale_and_centre_crop_rectangle():
    framing = plan_framing(1080, 1920, BUCKETS[480])  # scale max(448/1080, 896/1920) = 0.4667 (width binds)
    assert framing.scale == pytest.approx(896 / 1920)
    assert framing.left == 0 and framing.top == round((np.ceil(1080 * 896 / 1920) - 448) / 2)
    x0, y0, x1, y1 = framing.crop_in_source()
    assert (x0, x1) == (0, 1920) and y1 - y0 == pytest.approx(960, abs=2) and y0 == pytest.approx(60, abs=2)


def test_frame_picture_is_centre_crop_in_minus_one_to_one():
    picture = np.zeros((100, 300, 3), np.uint8)
    picture[:, 100:200] = 255  # white centre third
    framing = plan_framing(100, 300, {0.5: (64, 128)})
    x = frame_picture(picture, framing)
    assert x.shape == (1, 3, 1, 64, 128) and x.min() >= -1 and x.max() <= 1
    assert x[0, :, 0, :, 64].min() == 1.0 and x[0, :, 0, :, 0].max() == -1.0


def test_clip_input_squashes_the_whole_frame_and_normalises():
    frame = torch.full((1, 3, 64, 128), 0.5)  # one colour, any aspect
    pixels = clip_pixels(frame, 28)
    expected = (0.75 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert pixels.shape == (1, 3, 28, 28)
    torch.testing.assert_close(pixels[0, :, 5, 20], expected)


def test_prompt_is_trimmed_to_its_length_and_zero_padded_to_512():
    parts = shared_components()
    emb = encode_prompt(parts.text_encoder, parts.tokenizer, "  a person   talks &amp;amp; ", 512)
    length = len(parts.tokenizer("a person talks &").input_ids)
    assert emb.shape == (1, 512, 32)
    assert emb[0, :length].abs().sum(-1).min() > 0 and not emb[0, length:].any()


def test_first_frame_mask_marks_latent_frame_0():
    mask = first_frame_mask(9, 8, 16)
    assert mask.shape == (1, 4, 3, 8, 16)
    assert mask[:, :, 0].all() and not mask[:, :, 1:].any()


def test_condition_y_is_mask_then_normalised_latent():
    vae = shared_components().vae
    picture = torch.rand(1, 3, 1, 64, 128) * 2 - 1
    y = encode_condition(vae, picture, 9)
    assert y.shape == (1, 20, 3, 8, 16)
    video = torch.cat([picture, torch.zeros(1, 3, 8, 64, 128)], dim=2)
    with torch.no_grad():
        mu = vae.encode(video).latent_dist.mode()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    torch.testing.assert_close(y[:, 4:], (mu - mean) / std)


def test_available_needs_cuda_and_weights(tmp_path):
    ok, reason = available(tmp_path)
    assert not ok and ("CUDA" in reason or "not found" in reason)
