"""Shared fixtures: an isolated Prefect test server for the session, and generated media."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Before Prefect is imported anywhere: isolated home, no telemetry, offline hubs.
_HOME = Path(tempfile.mkdtemp(prefix="dubflow-prefect-"))
os.environ.setdefault("PREFECT_HOME", str(_HOME))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
os.environ.setdefault("KOKORO_JA_CACHE", str(_HOME / "kokoro"))


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread(request):
    """Modules marked `one_torch_thread` (the tiny MultiTalk models) run torch on one thread."""
    if request.node.get_closest_marker("one_torch_thread") is None:
        yield
        return
    from tests.conftest_multitalk import one_torch_thread

    with one_torch_thread():
        yield


@pytest.fixture
def tiny_parts():
    """The tiny MultiTalk components (built once per session)."""
    from tests.conftest_multitalk import shared_components

    return shared_components()


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect API server (SQLite) for every test that runs a flow (~11 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(_HOME / "results")
    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def demo_media(tmp_path_factory) -> dict[str, Path]:
    """The ~10 s two-voice demo episode media (scene.png, ana.wav, ben.wav, dialogue.wav)."""
    from tasks.demo import make_demo_media

    return make_demo_media(tmp_path_factory.mktemp("demo media"))


@pytest.fixture(scope="session")
def random_gfpgan(tmp_path_factory) -> Path:
    """GFPGAN v1.4-layout weights of random values (~174 MB, fp16), written once per session (~7 s)."""
    from tests.enhance_fixtures import write_random_gfpgan

    return write_random_gfpgan(tmp_path_factory.mktemp("gfpgan") / "GFPGANv1.4.pth")
