"""The `dubflow` command: validate, run, rerun, status, workers, doctor, demo, schema.

Every failure a user can cause ends in one clear line and a non-zero exit (2 for bad
input, 1 for a failed run), never a traceback. Prefect is imported only by the commands
that run flows, after its settings are fixed, so `validate` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EXIT_BAD_INPUT, EXIT_FAILED = 2, 1
REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    _quiet_defaults()
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print("dubflow: interrupted; finished stages are kept and will be reused", file=sys.stderr)
        return 130


def _quiet_defaults() -> None:
    """Offline, no telemetry, and Prefect's console chatter off unless asked for."""
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "PYANNOTE_METRICS_ENABLED": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
    }.items():
        os.environ.setdefault(key, value)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dubflow", description="Declarative batch dubbing with lip-sync.")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("validate", help="check manifests; one located line per problem")
    p.add_argument("files", nargs="+", type=Path)
    p.set_defaults(handler=cmd_validate)
    p = sub.add_parser("run", help="run the episode flow for a manifest")
    p.add_argument("file", type=Path)
    p.add_argument(
        "--workspace", type=Path, default=None, help="default ./dubflow-work or $DUBFLOW_WORKSPACE"
    )
    p.add_argument(
        "--wait", type=float, default=0.0, help="seconds to wait if the episode is already running"
    )
    p.set_defaults(handler=cmd_run)
    p = sub.add_parser("rerun", help="re-render the failed or missing segments of the last run, re-stitch")
    p.add_argument("file", type=Path)
    p.add_argument("--workspace", type=Path, default=None)
    p.add_argument("--segments", default=None, help="re-render these on purpose, e.g. 3,7 or 2-4")
    p.set_defaults(handler=cmd_rerun)
    p = sub.add_parser("workers", help="long-lived render workers, one per GPU (a local Dask cluster)")
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--workspace", type=Path, default=None)
    p.add_argument("--cpu", type=int, default=None, help="start N CPU workers instead of one per GPU")
    p.add_argument("--engine", default="preview", help="engine each worker loads at start (default preview)")
    p.add_argument("--port", type=int, default=8786)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_workers)
    p = sub.add_parser("status", help="the last run of an episode: each stage and segment")
    p.add_argument("file", type=Path)
    p.add_argument("--workspace", type=Path, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_status)
    p = sub.add_parser("doctor", help="what this machine can do, and which backend `auto` picks")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_doctor)
    p = sub.add_parser("demo", help="generate the demo episode locally and run it")
    p.add_argument("--workspace", type=Path, default=None)
    p.add_argument("--no-run", action="store_true", help="only generate the media")
    p.set_defaults(handler=cmd_demo)
    p = sub.add_parser("plan", help="print the segment plan (no rendering)")
    p.add_argument("file", type=Path)
    p.add_argument("--workspace", type=Path, default=None)
    p.set_defaults(handler=cmd_plan)
    p = sub.add_parser(
        "bind", help="check the binding; --propose writes a manifest patch from faces and voices"
    )
    p.add_argument("file", type=Path)
    p.add_argument("--workspace", type=Path, default=None)
    p.add_argument(
        "--propose", action="store_true", help="propose boxes for speakers the manifest leaves unbound"
    )
    p.set_defaults(handler=cmd_bind)
    p = sub.add_parser(
        "models", help="MultiTalk / InfiniteTalk weights: check presence/checksums, or download them"
    )
    p.add_argument("action", choices=["check", "download"])
    p.add_argument(
        "--models-dir", type=Path, default=None, help="default $DUBFLOW_MODELS_DIR; else the HF cache"
    )
    p.add_argument("--sha256", action="store_true", help="check: also hash every file (slow for 70 GB)")
    p.add_argument(
        "--components",
        default=None,
        help="comma-separated: base, base-diffusers, encoders, multitalk, infinitetalk-single, "
        "infinitetalk-multi, wav2vec (default: what --engine needs)",
    )
    p.add_argument(
        "--engine",
        choices=["multitalk", "infinitetalk"],
        default=None,
        help="only this engine's files (download default: multitalk; check default: every component)",
    )
    p.set_defaults(handler=cmd_models)
    p = sub.add_parser("schema", help="write manifests/schema.json from the manifest models")
    p.set_defaults(handler=cmd_schema)
    return parser


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    print(f"dubflow: {message}", file=sys.stderr)
    return code


# ---------------------------------------------------------------------------------------------- validate


def cmd_validate(args) -> int:
    from tasks.manifest import ManifestError, load_manifest

    worst = 0
    for file in args.files:
        try:
            load_manifest(file)
            print(f"ok {file}")
        except ManifestError as exc:
            print(exc, file=sys.stderr)
            worst = EXIT_BAD_INPUT
    return worst


# ---------------------------------------------------------------------------------------------- run


def cmd_run(args) -> int:
    from tasks.manifest import ManifestError, load_manifest

    try:
        loaded = load_manifest(args.file)
    except ManifestError as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_INPUT
    return run_episode(loaded.path, args.workspace, wait_s=args.wait)


def run_episode(manifest: Path, workspace: Path | None, *, wait_s: float = 0.0) -> int:
    def call():
        from flows.workers import episode_flow

        ws = str(workspace) if workspace else None
        return episode_flow(ws)(manifest=str(manifest), workspace=ws, wait_s=wait_s)

    return _with_display(call)


def _quiet_console() -> None:
    """Prefect's console handler prints failed tasks' tracebacks; the user gets one line, the UI keeps the logs."""
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    if "prefect" in sys.modules:  # configured already: apply it again (it reads the environment)
        from prefect.logging.configuration import setup_logging

        setup_logging()


def _with_display(call) -> int:
    from flows.display import RunDisplay
    from flows.progress import add_listener, remove_listener

    display = RunDisplay()
    add_listener(display)
    _quiet_console()
    try:
        from tasks.workspace import EpisodeBusy

        with display:
            result = call()
    except EpisodeBusy as exc:
        return _fail(str(exc))
    except Exception as exc:  # noqa: BLE001 - the run record has the details; the user gets one line
        return _fail(f"run failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    finally:
        remove_listener(display)
    print(display.summary(result))
    return 0


# ---------------------------------------------------------------------------------------------- rerun


def cmd_rerun(args) -> int:
    from flows.rerun import parse_segments
    from tasks.manifest import ManifestError, load_manifest
    from tasks.workspace import Workspace

    try:
        episode = load_manifest(args.file).manifest.episode
        segments = parse_segments(args.segments) if args.segments else None
    except (ManifestError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_INPUT
    ws = Workspace(args.workspace)
    if not ws.runs(episode):
        return _fail(f"episode {episode!r} has not been run in this workspace; run `dubflow run {args.file}`")

    def call():
        from flows.rerun import rerun_failed

        root = str(args.workspace) if args.workspace else None
        return rerun_failed(manifest=str(args.file.resolve()), workspace=root, segments=segments)

    code = _with_display(call)
    print(rerun_summary(ws.runs(episode)[-1]))
    return code


def rerun_summary(run: dict) -> str:
    from flows.rerun import cached_segments, failed_segments, rendered_segments

    rendered, cached, failed = rendered_segments(run), cached_segments(run), failed_segments(run)
    names = ", ".join(f"#{i:02d}" for i in rendered) or "none"
    line = f"rerun {run['episode']}: rendered {len(rendered)} segment(s) ({names}), {len(cached)} cached"
    return line + (f", {len(failed)} still failing: {failed}" if failed else "")


# ---------------------------------------------------------------------------------------------- workers


def cmd_workers(args) -> int:
    from flows.workers import WorkersError, start_workers, stop_workers, workers_status

    try:
        if args.action == "start":
            state = start_workers(args.workspace, cpu_workers=args.cpu, engine=args.engine, port=args.port)
            kind = f"{state.gpus} GPU" if state.gpus else "CPU"
            print(f"{state.workers} {kind} render worker(s) at {state.address} (engine {state.engine})")
            print(f"flows pick them up from the workspace, or set DUBFLOW_SCHEDULER={state.address}")
        elif args.action == "stop":
            state = stop_workers(args.workspace)
            print(f"stopped the render workers at {state.address}")
        else:
            status = workers_status(args.workspace)
            print(json.dumps(status, indent=2) if args.json else _format_workers(status))
    except WorkersError as exc:
        return _fail(str(exc))
    return 0


def _format_workers(status: dict) -> str:
    lines = [f"scheduler {status['address']}: {len(status['workers'])} worker(s)"]
    for w in status["workers"]:
        engines = ", ".join(w["engines"]) or "nothing loaded"
        lines.append(f"  {w['name']:<12} {w['slot']:<20} {engines:<24} rendering {w['rendering']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plan, bind


def _run_until(file: Path, workspace: Path | None, until: str) -> tuple[int, dict | None]:
    from tasks.manifest import ManifestError, load_manifest

    try:
        loaded = load_manifest(file, require_boxes=until != "bind")
    except ManifestError as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_INPUT, None
    from flows.episode import dub_episode

    try:
        result = dub_episode(
            manifest=str(loaded.path), workspace=str(workspace) if workspace else None, until=until
        )
    except Exception as exc:  # noqa: BLE001 - one line for the user
        return _fail(
            f"{until} failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ), None
    return 0, result | {"loaded": loaded}


def cmd_plan(args) -> int:
    code, result = _run_until(args.file, args.workspace, "plan")
    if result is None:
        return code
    from tasks.segment import SegmentPlan, format_plan_table
    from tasks.workspace import Workspace

    plan = SegmentPlan.from_json(Workspace(args.workspace).path(result["plan"].plan).read_text())
    print(f"engine: {result['engine']}")
    print(format_plan_table(plan))
    return 0


def cmd_bind(args) -> int:
    code, result = _run_until(args.file, args.workspace, "bind")
    if result is None:
        return code
    from tasks.bind import propose_binding
    from tasks.workspace import Workspace

    ws, m = Workspace(args.workspace), result["loaded"].manifest
    sheet = ws.episode_dir(m.episode) / "out" / "contact-sheet.png"
    for warning in result["binding"].warnings:
        print(f"warning: {warning}")
    if not args.propose:
        ws.link(m.episode, "contact-sheet.png", result["binding"].contact_sheet)
        print(f"binding ok; contact sheet: {sheet}")
        return 0
    proposed = sheet.with_name("contact-sheet-proposed.png")
    pinned = {s.id: s.box_spec() for s in m.speakers}
    print(propose_binding(ws, result["source"], result["tracks"], pinned, proposed), end="")
    print(f"# contact sheet of this proposal: {proposed}")
    return 0


# ---------------------------------------------------------------------------------------------- status


def cmd_status(args) -> int:
    from tasks.workspace import Workspace

    episode = _episode_name(args.file)
    if episode is None:
        return _fail(
            f"{args.file}: cannot read the episode name; run `dubflow validate {args.file}`", EXIT_BAD_INPUT
        )
    runs = Workspace(args.workspace).runs(episode)
    if not runs:
        return _fail(
            f"episode {episode!r} has not been run in this workspace; start it with `dubflow run {args.file}`"
        )
    last = status_record(runs[-1])
    if args.json:
        print(json.dumps(last, indent=2))
        return 0
    from flows.display import format_status

    print(format_status(last))
    return 0


def status_record(run: dict) -> dict:
    """The last run in the shape `status --json` promises: stages and segments with state and outputs."""
    stages = [s for s in run.get("stages", []) if not s["stage"].startswith("render[")]
    segments = [s for s in run.get("stages", []) if s["stage"].startswith("render[")]
    failed = set(run.get("failed_segments", []))
    for seg in segments:
        seg["segment"] = int(seg["stage"].rsplit("#", 1)[1].rstrip("]"))
    known = {s["segment"] for s in segments}
    segments += [
        {"stage": f"render[{run['episode']}#{i:02d}]", "segment": i, "state": "failed"}
        for i in sorted(failed - known)
    ]
    segments += [  # planned, but the run ended before rendering them
        {"stage": f"render[{run['episode']}#{i:02d}]", "segment": i, "state": "pending"}
        for i in sorted(set(run.get("planned_segments", [])) - known - failed)
    ]
    return {
        "episode": run["episode"],
        "state": run.get("state"),
        "started": run.get("started"),
        "finished": run.get("finished"),
        "error": run.get("error"),
        "stages": stages,
        "segments": sorted(segments, key=lambda s: s["segment"]),
        "outputs": run.get("outputs", {}),
    }


def _episode_name(file: Path) -> str | None:
    """The episode name alone: status must work even when media moved or the manifest no longer validates."""
    from tasks.yamlmarks import YamlProblem, load_marked

    try:
        data, _ = load_marked(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, YamlProblem):
        return None
    episode = data.get("episode") if isinstance(data, dict) else None
    return episode if isinstance(episode, str) and episode and "/" not in episode else None


# ---------------------------------------------------------------------------------------------- doctor, demo, schema


def cmd_doctor(args) -> int:
    from flows.doctor import doctor_report, format_doctor

    report = doctor_report()
    print(json.dumps(report, indent=2) if args.json else format_doctor(report))
    return 0


def cmd_demo(args) -> int:
    from tasks.demo import demo_manifest_text, make_demo_media
    from tasks.tts import TtsError

    manifest = REPO / "manifests" / "demo.yaml"
    media = manifest.parent / "demo-media"
    try:
        if not (media / "dialogue.wav").exists():
            print(f"generating the demo episode in {media} ...")
            make_demo_media(media)
    except TtsError as exc:
        return _fail(str(exc))
    if not manifest.exists():
        manifest.write_text(demo_manifest_text())
    if args.no_run:
        print(f"demo media ready: {manifest}")
        return 0
    return run_episode(manifest, args.workspace)


def cmd_models(args) -> int:
    from engine.multitalk.settings import models_dir_from_env
    from engine.multitalk.weights import (
        DEFAULT_COMPONENTS,
        ENGINE_COMPONENTS,
        check_weights,
        component_names,
        download_weights,
        format_weight_report,
        present_dit,
        ready_engines,
    )

    models_dir = args.models_dir or models_dir_from_env()
    try:
        components = component_names(args.components.split(",")) if args.components else None
    except ValueError as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    if args.action == "download":
        if models_dir is None:
            return _fail("download needs --models-dir or $DUBFLOW_MODELS_DIR", EXIT_BAD_INPUT)
        if components is None:
            components = ("base", *ENGINE_COMPONENTS[args.engine]) if args.engine else DEFAULT_COMPONENTS
        os.environ["HF_HUB_OFFLINE"] = "0"  # the one command that is meant to reach the hub
        try:
            folders = download_weights(models_dir, components)
        except OSError as exc:  # network, disk, auth: one line, the partial download resumes next time
            return _fail(f"download failed (re-run to resume): {exc}")
        print("\n".join(f"downloaded {f}" for f in folders))
        return 0
    if components is None and args.engine:
        components = [present_dit(models_dir), *ENGINE_COMPONENTS[args.engine]]
    statuses = check_weights(models_dir, components, sha256=args.sha256)
    print(format_weight_report(statuses))
    if components is None:  # everything listed: fine when at least one engine has all it needs
        return 0 if any(not lacking for lacking in ready_engines(statuses).values()) else EXIT_FAILED
    return 0 if all(s.present for s in statuses) else EXIT_FAILED


def cmd_schema(args) -> int:
    from tasks.manifest import write_schema

    print(f"wrote {write_schema()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
