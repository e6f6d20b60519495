"""prefect.yaml: every deployment points at a real flow with parameters it accepts, the nightly one on a cron."""

from __future__ import annotations

import inspect
from pathlib import Path

import yaml
from prefect.client.schemas.schedules import CronSchedule
from prefect.flows import load_flow_from_entrypoint

REPO = Path(__file__).resolve().parent.parent


def _deployments() -> dict[str, dict]:
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    return {d["name"]: d for d in config["deployments"]}


def test_each_deployment_loads_its_flow_with_parameters_it_accepts():
    deployments = _deployments()
    assert set(deployments) == {"nightly", "rerun-failed", "episode"}
    for name, d in deployments.items():
        flow = load_flow_from_entrypoint(str(REPO / d["entrypoint"]))
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(d.get("parameters") or {}) <= accepted, name
        assert d["work_pool"]["name"] in {"dub-cpu", "dub-gpu"}, name


def test_nightly_batch_is_a_valid_daily_cron_limited_to_one_run_at_a_time():
    nightly = _deployments()["nightly"]
    assert nightly["entrypoint"] == "flows/batch.py:dub_batch"
    (schedule,) = nightly["schedules"]
    CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])  # raises on a bad expression
    assert schedule["cron"].split()[2:] == ["*", "*", "*"] and nightly["concurrency_limit"] == 1
