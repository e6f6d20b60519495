"""rerun_failed: re-render only the failed or missing segments of an episode's last run, then re-stitch.

Built on the render cache: every segment that succeeded comes back `Cached`, so running the
episode again executes exactly the segments that failed (or whose clip is gone) and the
stages after them. `segments=[3, 7]` re-renders chosen segments on purpose (refresh_cache),
e.g. after giving them another seed in the manifest's `render.overrides`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from flows import heartbeats
from tasks.manifest import load_manifest
from tasks.workspace import Workspace

heartbeats.install()  # flow runs end without waiting up to 1 s on the heartbeat thread


class NothingToRerun(RuntimeError):
    """The episode has never run in this workspace."""


@flow(name="rerun-failed", log_prints=True)
def rerun_failed(manifest: str, workspace: str | None = None, segments: list[int] | None = None) -> dict:
    from flows.workers import episode_flow

    episode = load_manifest(manifest).manifest.episode
    runs = Workspace(workspace).runs(episode)
    if not runs:
        raise NothingToRerun(f"episode {episode!r} has not been run in this workspace; use `dubflow run`")
    before = failed_segments(runs[-1])
    get_run_logger().info(
        "rerun %s: last run %s; failed segments %s; forced %s",
        episode,
        runs[-1].get("state"),
        before or "none",
        segments or "none",
    )
    try:
        return episode_flow(workspace)(manifest=manifest, workspace=workspace, force_segments=segments)
    finally:
        after = Workspace(workspace).runs(episode)[-1]
        get_run_logger().info("rerun %s: rendered segments %s", episode, rendered_segments(after) or "none")


def segment_stages(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's render records (one per settled segment), in settling order."""
    return [s for s in run.get("stages", []) if _is_render(s)]


def failed_segments(run: dict[str, Any]) -> list[int]:
    """Segments the run recorded as failed (from its error summary and its per-segment records)."""
    failed = set(run.get("failed_segments", []))
    failed |= {_index(s) for s in run.get("stages", []) if _is_render(s) and s["state"] == "failed"}
    return sorted(failed)


def rendered_segments(run: dict[str, Any]) -> list[int]:
    """Segments the run actually rendered (not served from the cache)."""
    return sorted(_index(s) for s in run.get("stages", []) if _is_render(s) and s["state"] == "executed")


def cached_segments(run: dict[str, Any]) -> list[int]:
    return sorted(_index(s) for s in run.get("stages", []) if _is_render(s) and s["state"] == "cached")


def parse_segments(text: str) -> list[int]:
    """'3,7' or '3-5,9' -> [3, 4, 5, 9]; a bad item raises ValueError naming it."""
    out: set[int] = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        lo, sep, hi = item.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"--segments: {item!r} is not a segment number or range like 3-5") from None
        if first < 0 or last < first:
            raise ValueError(f"--segments: {item!r} is not a valid range")
        out.update(range(first, last + 1))
    if not out:
        raise ValueError("--segments: give segment numbers, e.g. 3,7")
    return sorted(out)


def _is_render(stage: dict) -> bool:
    return stage["stage"].startswith("render[")


def _index(stage: dict) -> int:
    return int(stage["stage"].rsplit("#", 1)[1].rstrip("]"))
