"""What an episode run shows in the Prefect UI besides its progress: the segment table and the QC table.

Artifacts are a convenience: outside a flow run, or when the API is unreachable, they are
skipped and the run goes on (the files and runs.jsonl are the record).
"""

from __future__ import annotations

import json
from typing import Any

from engine.base import FPS
from flows.placement import worker_of
from tasks.workspace import Blob, Workspace, artifact_key


def segment_facts(segment, future) -> dict[str, Any]:
    """Start, end, speakers, worker and seconds of one settled segment, for runs.jsonl and the table."""
    seconds = _run_seconds(future.task_run_id)
    return {
        "start": round(segment.start_frame / FPS, 2),
        "end": round(segment.end_frame / FPS, 2),
        "speakers": list(segment.speakers),
        "worker": worker_of(future),
        "seconds": seconds,
    }


def segment_rows(stages: list[dict]) -> list[dict[str, Any]]:
    rows = [s for s in stages if s["stage"].startswith("render[") and "start" in s]
    return [
        {
            "segment": int(s["stage"].rsplit("#", 1)[1].rstrip("]")),
            "start": s["start"],
            "end": s["end"],
            "speakers": ", ".join(s["speakers"]),
            "worker": s["worker"] if s["state"] == "executed" else "-",
            "seconds": s["seconds"],
            "state": s["state"],
            "error": s.get("error", ""),
        }
        for s in rows
    ]


def publish_segment_table(episode: str, stages: list[dict]) -> None:
    rows = sorted(segment_rows(stages), key=lambda r: r["segment"])
    _table(artifact_key(episode, "segments"), rows, f"{episode}: segments (start/end in seconds)")


def publish_qc_table(episode: str, ws: Workspace, qc: Blob) -> None:
    data = json.loads(ws.path(qc).read_text())
    rows = [
        {"check": k, "value": json.dumps(v) if isinstance(v, dict | list) else v} for k, v in data.items()
    ]
    _table(artifact_key(episode, "qc"), rows, f"{episode}: quality checks (verdict {data.get('verdict')})")


def _table(key: str, rows: list[dict], description: str) -> None:
    try:
        from prefect.artifacts import create_table_artifact

        create_table_artifact(key=key, table=rows, description=description)
    except Exception:  # noqa: BLE001, S110 - an artifact is a convenience, the files are the product
        pass


def _run_seconds(task_run_id) -> float | None:
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            run = client.read_task_run(task_run_id)
        return round(run.total_run_time.total_seconds(), 2)
    except Exception:  # noqa: BLE001 - a figure for a table
        return None
