"""The Prefect API going away mid-run (flows/api.py): recognised, waited for, resumed, or one clear line.

The whole path (a real server stopped during the renders, for good or back 45 s later) is in
bench/faults.py (`--faults api_gone,api_back`); these are the fast pieces and the CLI's decisions."""

from __future__ import annotations

import http.server
import logging
import sys
import threading
import time

import httpx
import pytest

from flows import api, cli
from flows.display import RunDisplay
from flows.progress import EpisodeProgress
from tests.net import free_port


@pytest.fixture
def health_server():
    """A stand-in API answering /api/health with 200; yields its API URL."""

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the handler's interface
            self.send_response(200 if self.path == "/api/health" else 404)
            self.end_headers()
            self.wfile.write(b"true")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api"
    server.shutdown()
    server.server_close()


def _refused() -> httpx.ConnectError:
    return httpx.ConnectError("[Errno 111] Connection refused")


def test_api_failures_are_recognised_through_causes_and_groups():
    assert api.is_api_gone(_refused())
    assert api.is_api_gone(httpx.ReadTimeout("timed out"))
    assert api.is_api_gone(RuntimeError("Failed to reach API at http://127.0.0.1:4200/api/"))
    try:  # the flow engine's state post fails while the flow's own error is being handled
        try:
            raise ValueError("segments failed")
        except ValueError:
            raise _refused() from None
    except httpx.ConnectError as exc:
        assert api.is_api_gone(exc)
    wrapped = RuntimeError("could not report")
    wrapped.__cause__ = _refused()
    assert api.is_api_gone(wrapped)
    assert api.is_api_gone(ExceptionGroup("several", [ValueError("x"), _refused()]))
    assert not api.is_api_gone(ValueError("a bad segment"))
    assert not api.is_api_gone(RuntimeError("Failed to render"))


def test_stage_tracker_names_what_was_running_or_failed():
    tracker = api.StageTracker()
    assert tracker.describe() == "the start of the run"
    tracker("begin", "ep", name="separate")
    tracker("step", "ep", name="separate", state="executed")
    assert tracker.describe() == "the run, after stage separate"
    for name in ("render[ep#00]", "render[ep#01]", "render[ep#02]"):
        tracker("begin", "ep", name=name)
    tracker("step", "ep", name="render[ep#00]", state="cached")
    tracker("step", "ep", name="render[ep#02]", state="failed")
    assert tracker.describe() == "stage render[ep#01], render[ep#02]"


def test_wait_for_gives_up_within_its_budget_and_sees_a_live_api(health_server):
    dead = f"http://127.0.0.1:{free_port()}/api"
    started = time.monotonic()
    assert not api.wait_for(dead, 0.6, first_s=0.2)
    assert time.monotonic() - started < 5
    assert api.wait_for(health_server, 5)
    assert api.healthy(health_server) and not api.healthy(dead)


def _flaky(failures: int, calls: list):
    """A flow call that loses the API `failures` times during a render, then completes."""

    def call():
        calls.append(1)
        progress = EpisodeProgress("ep", 3)  # outside a flow run: listeners only
        progress.begin("render[ep#01]")
        if len(calls) <= failures:
            raise _refused()
        progress.step("render[ep#01]", "cached")
        return {"episode": "ep"}

    return call


@pytest.fixture
def external_api(monkeypatch):
    """Point the CLI's recovery at a given URL as PREFECT_API_URL would."""

    def use(url: str):
        monkeypatch.setattr(api, "configured_url", lambda: url)

    monkeypatch.setattr(cli, "_debug", False)  # a test of `main(["--debug", ...])` may have left it on

    def no_api(**kwargs):  # outside a flow run an artifact would start a temporary API server
        raise RuntimeError("no flow run")

    monkeypatch.setattr("prefect.artifacts.create_progress_artifact", no_api)
    monkeypatch.setattr(RunDisplay, "summary", lambda self, result: f"episode {result['episode']}: completed")
    return use


def test_run_resumes_when_the_external_api_answers_again(health_server, external_api, capsys):
    external_api(health_server)
    calls: list = []
    code = cli._with_display(_flaky(1, calls), "dubflow run ep.yaml")
    out = capsys.readouterr().out
    assert code == 0 and len(calls) == 2
    assert f"resumed: the Prefect API at {health_server} stopped answering during stage render[ep#01]" in out
    assert "episode ep: completed" in out


def test_api_gone_for_good_is_one_typed_line_naming_stage_api_and_resume(external_api, monkeypatch, capsys):
    dead = f"http://127.0.0.1:{free_port()}/api"
    external_api(dead)
    monkeypatch.setenv(api.API_WAIT_ENV, "0.5")
    calls: list = []
    code = cli._with_display(_flaky(99, calls), "dubflow run ep.yaml")
    err = capsys.readouterr().err
    assert code == cli.EXIT_FAILED and len(calls) == 1
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("dubflow: run failed: ApiUnreachable: the Prefect API at " + dead)
    assert "during stage render[ep#01]" in err and "`dubflow run ep.yaml` again to resume" in err


def test_an_api_that_keeps_dying_is_resumed_a_bounded_number_of_times(health_server, external_api, capsys):
    external_api(health_server)
    calls: list = []
    code = cli._with_display(_flaky(99, calls), "dubflow run ep.yaml")
    assert code == cli.EXIT_FAILED and len(calls) == api.RESUMES + 1
    assert "ApiUnreachable" in capsys.readouterr().err


def test_other_failures_are_not_retried(external_api, capsys):
    external_api("http://127.0.0.1:9/api")
    calls: list = []

    def call():
        calls.append(1)
        raise ValueError("a bad segment")

    assert cli._with_display(call, "dubflow run ep.yaml") == cli.EXIT_FAILED
    assert len(calls) == 1
    assert capsys.readouterr().err == "dubflow: run failed: ValueError: a bad segment\n"


def test_prefect_noise_about_the_api_goes_to_the_log_file(tmp_path, monkeypatch, capsys):
    from prefect.logging import handlers

    internal, events = logging.getLogger("prefect._internal"), logging.getLogger("prefect.events.clients")
    monkeypatch.setattr(handlers, "sys", handlers.sys)  # restored after the test
    monkeypatch.setattr(internal, "handlers", list(internal.handlers))
    monkeypatch.setattr(events, "handlers", list(events.handlers))
    monkeypatch.setattr(events, "propagate", events.propagate)
    monkeypatch.setenv("HF_TOKEN", "hf_TestSecretToken0123456789")
    log = tmp_path / "episodes" / "ep" / "prefect-api.log"
    api.quiet_api_noise(log)
    assert not log.exists()  # nothing written: no file
    handlers.sys.stderr.write("--- Error logging to API ---\nAll connection attempts failed")
    internal.error("Service 'EventsWorker' failed to process item (token hf_TestSecretToken0123456789)")
    events.warning("Unable to connect to 'ws://127.0.0.1:1/api/events/in'")
    assert handlers.sys.argv is sys.argv  # everything but stderr is the real module
    captured = capsys.readouterr()
    assert "Error logging" not in captured.err and "EventsWorker" not in captured.err
    text = log.read_text()
    assert "Error logging to API" in text and "EventsWorker" in text and "Unable to connect" in text
    assert "hf_TestSecretToken0123456789" not in text
