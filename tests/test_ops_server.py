"""A real Prefect server on a real PostgreSQL (scripts/server.sh), started here and stopped after: a failing
episode run alerts a webhook, `dubflow rerun` completes it, and the run carries its artifacts and task names;
the flow-run page is loaded in headless Chromium (screenshot kept under artifacts/)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from flows.rerun import rendered_segments
from tests.net import free_port
from tests.test_ops_rerun import write_manifest

REPO = Path(__file__).resolve().parent.parent
ENTRYPOINT = "flows/episode.py:dub_episode"
HAS_POSTGRES = bool(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl") or shutil.which("pg_ctl"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not HAS_POSTGRES, reason="PostgreSQL is not installed (.ci/run installs it)"),
]


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DUBFLOW_"))}


class Hook(BaseHTTPRequestHandler):
    received: list[str] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        Hook.received.append(self.rfile.read(int(self.headers["Content-Length"])).decode())
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):  # quiet
        pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    port = free_port()
    pgdata = tempfile.mkdtemp(prefix="dubflow-test-pg-")  # under /tmp: the postgres user must reach it
    env = _clean_env() | {
        "DUBFLOW_SERVER_DIR": str(root),
        "DUBFLOW_SERVER_PORT": str(port),
        "DUBFLOW_PGPORT": str(free_port()),
        "DUBFLOW_PGDATA": pgdata,
        "PYTHON": sys.executable,
    }
    script = str(REPO / "scripts" / "server.sh")
    started = subprocess.run([script, "start"], env=env, capture_output=True, text=True, timeout=240)
    assert started.returncode == 0, started.stderr + started.stdout
    assert "PostgreSQL" in started.stdout and f"http://127.0.0.1:{port}" in started.stdout
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        subprocess.run([script, "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(pgdata, ignore_errors=True)


def _api(base: str, path: str, body: dict | None = None):
    request = urllib.request.Request(
        f"{base}/api/{path}",
        data=json.dumps(body or {}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def episode_runs(server, tmp_path_factory, demo_media):
    """A failing run (webhook alerted), then `dubflow rerun` to completion, all reported to the server."""
    root = tmp_path_factory.mktemp("server runs")
    hook = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    faults = root / "faults.json"
    faults.write_text(json.dumps({"fail_frames": [100]}))
    env = _clean_env() | {
        "PREFECT_API_URL": f"{server}/api",
        "PREFECT_HOME": str(root / "home"),
        "DUBFLOW_ENGINE_OVERRIDES": "preview=engine.fake:SlowRenderer",
        "DUBFLOW_FAKE_LOAD_S": "0",
        "DUBFLOW_FAKE_FAULTS": str(faults),
    }

    def cli(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "flows.cli", *args]
        return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)

    alerts = subprocess.run(
        [sys.executable, "-m", "flows.alerts", "--webhook", f"http://127.0.0.1:{hook.server_port}/hook"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert alerts.returncode == 0, alerts.stderr
    manifest, ws = write_manifest(root, demo_media, "srv"), root / "work"
    failed = cli("run", str(manifest), "--workspace", str(ws))
    faults.write_text("{}")
    (failed_run,) = _api(server, "flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 1})
    retry = subprocess.run(  # what "Retry" in the UI does, for a run started outside a deployment
        [sys.executable, "-m", "prefect", "flow-run", "retry", failed_run["id"], "--entrypoint", ENTRYPOINT],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    retried = json.loads((ws / "episodes" / "srv" / "runs.jsonl").read_text().splitlines()[-1])
    rerun = cli("rerun", str(manifest), "--workspace", str(ws), "--segments", "0")
    yield {"failed": failed, "retry": retry, "retried": retried, "rerun": rerun, "hook": Hook.received}
    hook.shutdown()


def test_failed_run_reaches_the_webhook_and_the_user_gets_one_line(episode_runs):
    failed = episode_runs["failed"]
    assert failed.returncode == 1
    assert failed.stderr.strip().count("\n") == 0 and "segment(s) failed" in failed.stderr
    deadline = time.monotonic() + 30
    while not episode_runs["hook"] and time.monotonic() < deadline:
        time.sleep(0.5)
    texts = [json.loads(body)["text"] for body in episode_runs["hook"]]
    assert any("dub-episode" in t and "Failed" in t for t in texts), texts


def test_the_runs_logs_reach_the_server_for_the_ui(server, episode_runs):
    """The run's page in the UI shows its logs: the backend choices and the stage logs reach the API at INFO,
    while the user's terminal got one line (the test above)."""
    (run,) = _api(server, "flow_runs/filter", {"sort": "START_TIME_ASC", "limit": 1})
    deadline, messages = time.monotonic() + 30, []
    while time.monotonic() < deadline:  # logs are sent in batches by a background thread
        logs = _api(server, "logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}}, "limit": 200})
        messages = [(entry["level"], entry["message"]) for entry in logs]
        if any("render:" in m for _, m in messages):
            break
        time.sleep(1)
    assert any(level == 20 and m.startswith("render: preview engine") for level, m in messages), messages
    assert any(level == 20 and m.startswith("separate:") for level, m in messages), messages


def test_retrying_the_failed_run_renders_only_its_failed_segment(episode_runs):
    assert episode_runs["retry"].returncode == 0, episode_runs["retry"].stderr[-2000:]
    retried = episode_runs["retried"]
    assert retried["state"] == "completed"
    assert rendered_segments(retried) == [2]  # the segment over frame 100; the others came from the cache


def test_rerun_completes_against_the_server_with_artifacts_and_named_task_runs(server, episode_runs):
    assert episode_runs["rerun"].returncode == 0, episode_runs["rerun"].stderr
    runs = _api(server, "flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 10})
    rerun = next(r for r in runs if r["state_name"] == "Completed" and r["parent_task_run_id"])
    keys = {
        a["key"]
        for a in _api(server, "artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [rerun["id"]]}}})
    }
    assert {"srv-progress", "srv-contact-sheet", "srv-segments", "srv-qc", "srv-output"} <= keys, keys
    assert "render-srv-00" in keys, keys  # the re-rendered segment's own progress (the rest were cached)
    (segment,) = _api(
        server,
        "artifacts/filter",
        {"artifacts": {"key": {"any_": ["render-srv-00"]}}, "sort": "CREATED_DESC", "limit": 1},
    )
    assert segment["type"] == "progress" and float(segment["data"]) == 100.0
    tasks = _api(server, "task_runs/filter", {"flow_runs": {"id": {"any_": [rerun["id"]]}}, "limit": 200})
    names = {t["name"] for t in tasks}
    assert "render[srv#00]" in names and "stitch" in names, names
    table = _api(
        server, "artifacts/filter", {"artifacts": {"key": {"any_": ["srv-segments"]}}, "sort": "CREATED_DESC"}
    )
    rows = json.loads(table[0]["data"])
    assert {"start", "end", "speakers", "worker", "seconds", "state"} <= set(rows[0])
    assert [r["segment"] for r in rows if r["state"] == "executed"] == [0]  # the forced one; the rest cached


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the ops extra")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("chromium and chromium-driver are not installed (.ci/run installs them)")
    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,1000")
    options.binary_location = chromium
    return webdriver.Chrome(service=Service(driver), options=options)


def _wait_for(browser, predicate, timeout_s: float = 40) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate(browser.page_source):
            return True
        time.sleep(0.5)
    return False


def test_flow_run_page_shows_the_artifacts_in_headless_chromium(server, episode_runs):
    from selenium.webdriver.common.by import By

    runs = _api(server, "flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 10})
    episode = next(r for r in runs if r["state_name"] == "Completed" and r["parent_task_run_id"])
    shots = REPO / "artifacts" / "ui"
    shots.mkdir(parents=True, exist_ok=True)
    browser = _browser()
    try:
        browser.get(f"{server}/runs/flow-run/{episode['id']}")
        assert _wait_for(browser, lambda html: "Artifacts" in html and episode["name"] in html)
        tabs = browser.find_elements(By.XPATH, "//*[normalize-space(.)='Artifacts']")
        tabs[-1].click()  # the innermost element that reads "Artifacts": the tab
        found = _wait_for(
            browser, lambda html: all(k in html for k in ("srv-segments", "srv-qc", "srv-progress"))
        )
        browser.save_screenshot(str(shots / "flow-run-artifacts.png"))
    finally:
        browser.quit()
    assert found, "the Artifacts tab does not list srv-segments, srv-qc and srv-progress"
    assert (shots / "flow-run-artifacts.png").stat().st_size > 10_000


def test_deployments_register_and_a_process_worker_runs_the_nightly_batch(server, tmp_path, demo_media):
    """`make deploy` registers prefect.yaml; the server schedules the nightly cron; a `dub-cpu` worker picks up
    a run of the nightly deployment and dubs the inbox."""
    inbox, work = tmp_path / "inbox", tmp_path / "work"
    inbox.mkdir()
    write_manifest(inbox, demo_media, "nightly")
    env = _clean_env() | {
        "PREFECT_API_URL": f"{server}/api",
        "PREFECT_HOME": str(tmp_path / "home"),
        "PYTHON": sys.executable,
        "DUBFLOW_ROOT": str(REPO),
        "DUBFLOW_WORKSPACE": str(work),
        "DUBFLOW_INBOX": str(inbox),
        "DUBFLOW_ENGINE_OVERRIDES": "preview=engine.fake:SlowRenderer",
        "DUBFLOW_FAKE_LOAD_S": "0",
    }

    def run(*command: str, timeout: int = 300) -> subprocess.CompletedProcess:
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        return done

    run(str(REPO / "scripts" / "deploy.sh"))
    (nightly,) = [d for d in _api(server, "deployments/filter") if d["name"] == "nightly"]
    assert nightly["parameters"]["folder"] == str(inbox)  # the deploy-time template was filled in
    scheduled = _wait_for_runs(server, nightly["id"], "SCHEDULED")
    assert scheduled and all(r["expected_start_time"][11:16] == "02:00" for r in scheduled)  # the cron
    run(sys.executable, "-m", "prefect", "deployment", "run", "dub-batch/nightly")
    run(sys.executable, "-m", "prefect", "worker", "start", "--pool", "dub-cpu", "--run-once", timeout=420)
    (done,) = _wait_for_runs(server, nightly["id"], "COMPLETED")
    assert done["work_pool_name"] == "dub-cpu"
    record = json.loads((work / "episodes" / "nightly" / "runs.jsonl").read_text().splitlines()[-1])
    assert (
        record["state"] == "completed" and (work / "episodes" / "nightly" / "out" / "nightly.mp4").is_file()
    )


def _wait_for_runs(server: str, deployment_id: str, state: str, timeout_s: float = 120) -> list[dict]:
    body = {
        "deployments": {"id": {"any_": [deployment_id]}},
        "flow_runs": {"state": {"type": {"any_": [state]}}},
    }
    deadline = time.monotonic() + timeout_s
    while not (runs := _api(server, "flow_runs/filter", body)) and time.monotonic() < deadline:
        time.sleep(2)
    return runs
