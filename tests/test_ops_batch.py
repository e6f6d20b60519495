"""dub_batch: each manifest its own subflow, a bad one does not stop the others, a summary artifact at the end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.batch import dub_batch, find_manifests
from tests.test_ops_rerun import fake_engine, write_manifest  # noqa: F401 - fixture

pytestmark = [
    pytest.mark.slow,
    pytest.mark.usefixtures("prefect_server"),
]  # end-to-end through a Prefect server


def _artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    return sorted(found, key=lambda a: a.created)[-1]


def _subflows(parent_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id]))
        )
    return sorted(r.name for r in runs)


def test_batch_runs_every_episode_despite_a_bad_one_and_summarises(tmp_path, demo_media, fake_engine):  # noqa: F811
    inbox = tmp_path / "inbox"
    for name in ("b1", "b2"):
        (inbox / name).mkdir(parents=True)
        write_manifest(inbox / name, demo_media, name)
    (inbox / "broken.yaml").write_text("episode: broken\nsource: nowhere.mp4\nspeakers: []\n")
    state = dub_batch(
        folder=str(inbox),
        pattern="**/*.yaml",
        workspace=str(tmp_path / "work"),
        parallel=2,
        return_state=True,
    )
    assert state.is_failed(), state
    assert "1 of 3 episode(s) failed: broken" in state.message

    rows = {r["episode"]: r for r in json.loads(_artifact("batch-summary").data)}
    assert set(rows) == {"b1", "b2", "broken"}
    for name in ("b1", "b2"):
        row = rows[name]
        assert row["state"] == "completed" and row["qc"] == "pass" and row["failed"] == 0
        assert row["rendered"] + row["cached"] >= 3 and Path(row["output"]).exists()
    assert rows["broken"]["state"] == "failed" and "broken.yaml" in rows["broken"]["error"]
    assert _subflows(state.state_details.flow_run_id) == ["episode-b1", "episode-b2", "episode-broken"]


def test_find_manifests_takes_a_folder_or_a_glob(tmp_path):
    for name in ("b.yaml", "a.yaml", "notes.txt"):
        (tmp_path / name).write_text("x")
    assert [p.name for p in find_manifests(str(tmp_path))] == ["a.yaml", "b.yaml"]
    assert [p.name for p in find_manifests(str(tmp_path / "b*.yaml"))] == ["b.yaml"]
    assert find_manifests(str(tmp_path / "missing")) == []
