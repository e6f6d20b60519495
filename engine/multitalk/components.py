"""The loaded models of one pipeline, in a module of their own: the loader (weights.py) builds them and the
pipeline runs them, and neither needs to import the other for the type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.multitalk.audio import Wav2VecEncoder


@dataclass
class Components:
    """The loaded models. `transformer` is a MultiTalkTransformer3DModel."""

    transformer: Any
    vae: Any  # diffusers AutoencoderKLWan
    text_encoder: Any  # transformers UMT5EncoderModel
    tokenizer: Any
    image_encoder: Any  # transformers CLIPVisionModel
    wav2vec: Wav2VecEncoder
