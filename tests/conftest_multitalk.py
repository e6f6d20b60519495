"""Shared fixtures and synthetic media for the MultiTalk engine tests (tiny random models, CPU).

Imported by the `test_multitalk_*.py` files (`from tests.conftest_multitalk import ...`); fixtures
imported into a test module are collected by pytest.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

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
    base = dict(source=picture(), persons=persons, prompt="two people speak", frame_num=9, steps=2)
    return RenderJob(**{**base, **kw})


@pytest.fixture(scope="session")
def tiny_parts():
    from engine.multitalk.tiny import tiny_components

    return tiny_components(0)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_parts):
    from engine.multitalk.pipeline import MultiTalkPipeline
    from engine.multitalk.tiny import tiny_config, tiny_settings

    return MultiTalkPipeline(tiny_parts, tiny_settings(), tiny_config().buckets)


@pytest.fixture(scope="session")
def tiny_models_dir(tiny_parts, tmp_path_factory):
    from engine.multitalk.tiny import write_tiny_checkpoints

    return write_tiny_checkpoints(tmp_path_factory.mktemp("models"), tiny_parts)
