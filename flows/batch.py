"""dub_batch: every manifest in a folder (or a glob), each episode its own subflow run (the nightly job).

One bad or failing episode never stops the others. At the end a summary table artifact
lists each episode with its state, segments rendered / cached / failed, output and QC
verdict; the batch run itself ends Failed when any episode failed, so alerts fire.
"""

from __future__ import annotations

import contextvars
import glob
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from flows import heartbeats
from flows.rerun import cached_segments, failed_segments, rendered_segments
from tasks.workspace import Workspace, artifact_key

heartbeats.install()  # flow runs end without waiting up to 1 s on the heartbeat thread


class BatchFailed(RuntimeError):
    """Some episodes of a batch failed; the summary artifact and runs.jsonl say which and why."""


def find_manifests(folder: str, pattern: str = "*.yaml") -> list[Path]:
    """`folder` is a directory (matched with `pattern`) or itself a glob; sorted, so batches are repeatable."""
    path = Path(folder)
    hits = sorted(path.glob(pattern)) if path.is_dir() else sorted(Path(p) for p in glob.glob(folder))
    return [p.resolve() for p in hits if p.is_file() and p.name != "schema.json"]


@flow(name="dub-batch", log_prints=True)
def dub_batch(
    folder: str = "manifests/inbox", pattern: str = "*.yaml", workspace: str | None = None, parallel: int = 1
) -> list[dict[str, Any]]:
    """Dub every manifest found; `parallel` episodes at once share the render workers' queue."""
    manifests = find_manifests(folder, pattern)
    log = get_run_logger()
    log.info("batch: %d manifest(s) in %s", len(manifests), folder)
    rows = _run_all(manifests, workspace, max(1, parallel))
    publish_summary(rows)
    failed = [r["episode"] for r in rows if r["state"] != "completed"]
    if failed:
        raise BatchFailed(f"{len(failed)} of {len(rows)} episode(s) failed: {', '.join(failed)}")
    return rows


def _run_all(manifests: list[Path], workspace: str | None, parallel: int) -> list[dict[str, Any]]:
    if parallel == 1:
        return [run_one(m, workspace) for m in manifests]
    with ThreadPoolExecutor(parallel, thread_name_prefix="episode") as pool:
        # each thread runs in a copy of this flow run's context, so every episode stays its subflow
        futures = [pool.submit(contextvars.copy_context().run, run_one, m, workspace) for m in manifests]
        return [f.result() for f in futures]


def run_one(manifest: Path, workspace: str | None) -> dict[str, Any]:
    """One episode as a subflow; whatever happens, a summary row."""
    from flows.workers import episode_flow

    episode = _episode_name(manifest)
    run = episode_flow(workspace).with_options(flow_run_name=f"episode-{episode or manifest.stem}")
    state = run(manifest=str(manifest), workspace=workspace, return_state=True)
    return summary_row(manifest, episode, workspace, state)


def summary_row(manifest: Path, episode: str | None, workspace: str | None, state) -> dict[str, Any]:
    runs = Workspace(workspace).runs(episode) if episode else []
    last = runs[-1] if runs else {}
    error = "" if state.is_completed() else (state.message or state.name).splitlines()[0][:300]
    return {
        "episode": episode or manifest.stem,
        "manifest": str(manifest),
        "state": "completed" if state.is_completed() else "failed",
        "rendered": len(rendered_segments(last)),
        "cached": len(cached_segments(last)),
        "failed": len(failed_segments(last)),
        "output": next((v for k, v in last.get("outputs", {}).items() if k.endswith(".mp4")), ""),
        "qc": last.get("qc_verdict", ""),
        "error": error,
    }


def publish_summary(rows: list[dict[str, Any]]) -> None:
    from prefect.artifacts import create_table_artifact

    done = sum(r["state"] == "completed" for r in rows)
    create_table_artifact(
        key=artifact_key("batch", "summary"),
        table=rows,
        description=f"dub_batch: {done} of {len(rows)} episode(s) completed",
    )


def _episode_name(manifest: Path) -> str | None:
    from tasks.manifest import ManifestError, load_manifest

    try:
        return load_manifest(manifest, check_media=False).manifest.episode
    except ManifestError:
        return None
