"""Long-lived render workers (a local Dask cluster, CPU workers here): models load once per worker, segments
spread over the workers, a worker killed mid-segment hands its segment to another."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from flows.cli import main
from flows.rerun import rendered_segments, segment_stages
from flows.workers import episode_flow, start_workers, stop_workers, workers_status
from tests.net import free_port
from tests.test_ops_rerun import last_run, write_manifest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("prefect_server"),
]  # end-to-end through a Prefect server
FAKE_ENV = {
    "DUBFLOW_ENGINE_OVERRIDES": "preview=engine.fake:SlowRenderer",
    "DUBFLOW_FAKE_LOAD_S": "0.5",
    "DUBFLOW_FAKE_S_PER_FRAME": "0.02",  # a 2 s segment renders in 1 s
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two CPU render workers with the fake engine preloaded; stopped after the module."""
    root = tmp_path_factory.mktemp("cluster")
    env = FAKE_ENV | {
        "DUBFLOW_FAKE_LOADS": str(root / "loads.txt"),
        "DUBFLOW_GPU_LOCK_DIR": str(root / "locks"),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    ws = root / "work"
    state = start_workers(ws, cpu_workers=2, port=free_port())
    yield ws, root / "loads.txt", state
    stop_workers(ws)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _loads(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_status_lists_each_worker_with_its_slot_and_the_preloaded_engine(cluster):
    ws, loads, state = cluster
    status = workers_status(ws)
    assert status["address"] == state.address and len(status["workers"]) == 2
    assert sorted(w["slot"].rsplit("/", 1)[1] for w in status["workers"]) == ["cpu0", "cpu1"]
    assert all(w["engines"] == ["preview=engine.fake:SlowRenderer"] for w in status["workers"])
    assert _loads(loads) == 2


def test_an_episode_fans_out_over_the_workers(cluster, demo_media, tmp_path):
    ws, loads, _ = cluster
    manifest = write_manifest(tmp_path, demo_media, "w1", extra_render=", seed: 20")
    assert main(["run", str(manifest), "--workspace", str(ws)]) == 0
    run = last_run(ws, "w1")
    workers = {s["worker"] for s in segment_stages(run) if s["state"] == "executed"}
    assert workers == {"render-0", "render-1"}, segment_stages(run)
    assert _loads(loads) == 2


def test_a_worker_killed_mid_segment_hands_the_segment_to_another(cluster, demo_media, tmp_path):
    """A second flow run on the same workers: no model is loaded again until a worker is killed."""
    ws, loads, state = cluster
    from distributed import Client

    manifest = write_manifest(tmp_path, demo_media, "wkill", extra_render=", seed: 4")
    with Client(state.address) as client:
        pids = client.run(os.getpid)
        result: dict = {}
        thread = threading.Thread(
            target=lambda: result.update(
                state=episode_flow(ws)(manifest=str(manifest), workspace=str(ws), return_state=True)
            )
        )
        thread.start()
        victim = _first_busy_worker(client, timeout_s=120)
        assert _loads(loads) == 2  # the models loaded for the earlier flow runs serve this one
        os.kill(pids[victim], signal.SIGKILL)
        thread.join(timeout=300)
        client.wait_for_workers(2, timeout=60)
        assert pids[victim] not in client.run(os.getpid).values()  # it died; its nanny started a new one
    assert result["state"].is_completed(), result["state"]
    run = last_run(ws, "wkill")
    assert run["state"] == "completed" and len(rendered_segments(run)) == len(segment_stages(run))


def _first_busy_worker(client, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = [w for w, tasks in client.processing().items() if tasks]
        if busy:
            time.sleep(0.3)  # inside the segment
            return busy[0]
        time.sleep(0.05)
    raise AssertionError("no segment reached a worker")


def test_workers_status_without_workers_is_one_clear_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DUBFLOW_SCHEDULER", raising=False)
    assert main(["workers", "status", "--workspace", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "dubflow: no render workers are running; start them with `dubflow workers start`"
