"""Shared fixtures and synthetic media for the MultiTalk engine tests (tiny random models, CPU).

Plain helpers imported by the `test_multitalk_*.py` files; the builders are cached so the tiny
models are built once per session whichever test module asks first.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from engine.base import Box, PersonInput, RenderJob

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PICTURE_SHAPE = (64, 128, 3)  # h/w = 0.5 -> the tiny (64, 128) bucket, token grid 4 x 8
LEFT, RIGHT = Box(0, 0, 64, 64), Box(64, 0, 128, 64)


def tone(seconds: float = 1.0, freq: float = 220.0, amp: float = 0.1) -> np.ndarray:
    t = np.arange(int(seconds * 16_000)) / 16_000
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def noise(seconds: float = 1.0, seed: int = 0, amp: float = 0.05) -> np.ndarray:
    return (amp * np.random.default_rng(seed).standard_normal(int(seconds * 16_000))).astype(np.float32)


def picture(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, PICTURE_SHAPE, dtype=np.uint8)


def one_person_job(**kw) -> RenderJob:
    base = dict(
        source=picture(), persons=(PersonInput(tone()),), prompt="a person talks", frame_num=9, steps=2
    )
    return RenderJob(**{**base, **kw})


def two_person_job(**kw) -> RenderJob:
    persons = (PersonInput(tone(), LEFT), PersonInput(noise(), RIGHT))
    base = dict(
        source=picture(), persons=persons, prompt="two people speak", frame_num=9, num_frames=9, steps=2
    )
    return RenderJob(**{**base, **kw})


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: one thread is ~10x faster than two on a shared 2-core machine (measured 0.4 s vs
    4.8 s per tiny render under load). Restores the previous count for the rest of the session."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@functools.cache
def shared_components():
    """The tiny random components, built once per test session (seed 0)."""
    from engine.multitalk.tiny import tiny_components

    return tiny_components(0)


@functools.cache
def shared_pipeline():
    from engine.multitalk.pipeline import MultiTalkPipeline
    from engine.multitalk.tiny import TINY_MOTION_FRAMES, tiny_config, tiny_settings

    return MultiTalkPipeline(shared_components(), tiny_settings(), tiny_config().buckets, TINY_MOTION_FRAMES)


@functools.cache
def shared_models_dir() -> Path:
    """The tiny components written once in the released on-disk layouts (removed at exit)."""
    from engine.multitalk.tiny import write_tiny_checkpoints

    root = Path(tempfile.mkdtemp(prefix="multitalk models "))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return write_tiny_checkpoints(root, shared_components())
