"""Typed errors: which ones the flow retries, and the types the stages raise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.base import EngineSetupError, JobError, MissingWeightsError, OutOfMemory
from engine.media import MediaError, ffmpeg_exe, read_channels
from engine.video import EncodeError, Mp4Writer
from flows.episode import _retry_if_transient
from tasks.bind import BindingError
from tasks.manifest import ManifestError


class _Failed:
    """A Prefect state whose result() raises `exc`, as a failed task run's state does."""

    def __init__(self, exc: BaseException | None):
        self.exc = exc

    def result(self):
        if self.exc is not None:
            raise self.exc


@pytest.mark.parametrize(
    "exc",
    [
        JobError("bad job"),
        MissingWeightsError("no weights"),
        EngineSetupError("pip install -e '.[vad]'"),
        EncodeError("ffmpeg failed to encode"),
        ManifestError(Path("manifest.yaml"), []),
        MediaError("empty file"),
        BindingError("speakers[0].box: outside the frame"),
        OutOfMemory("split it instead"),
    ],
)
def test_errors_that_fail_again_are_not_retried(exc: BaseException) -> None:
    assert _retry_if_transient(None, None, _Failed(exc)) is False


def test_errors_that_crossed_a_process_boundary_are_judged_by_class_name() -> None:
    twin = type("MissingWeightsError", (type("EngineSetupError", (RuntimeError,), {}),), {})
    assert _retry_if_transient(None, None, _Failed(twin("from a Dask worker"))) is False


@pytest.mark.parametrize(
    "exc", [RuntimeError("CUDA error: unspecified launch failure"), ConnectionError("reset")]
)
def test_transient_failures_are_retried(exc: BaseException) -> None:
    assert _retry_if_transient(None, None, _Failed(exc)) is True


def test_an_encode_failure_is_an_encode_error_and_leaves_no_file(tmp_path: Path) -> None:
    """libx264 refuses an odd width in yuv420p: the writer raises EncodeError and writes nothing."""
    target = tmp_path / "clip.mp4"
    with (
        pytest.raises(EncodeError, match="ffmpeg failed to encode clip.mp4") as err,
        Mp4Writer(target, ffmpeg_exe()) as writer,
    ):
        writer.write(np.zeros((4, 33, 33, 3), np.uint8))
    assert isinstance(err.value, EngineSetupError)
    assert list(tmp_path.iterdir()) == []


def test_unusable_audio_is_a_media_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(MediaError, match="empty"):
        read_channels(empty)
