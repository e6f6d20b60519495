"""The `dubflow` command: validate, run, rerun, status, workers, doctor, demo, plan, bind, models, schema.

Every failure a user can cause ends in one clear line and a non-zero exit (2 for bad input, 1 for a
failed run), never a traceback; `--debug` shows the traceback too. Prefect is imported only by the
commands that run flows, after its settings are fixed, so `validate` stays fast. Built on typer (click):
options shared by several commands are declared once, below.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated, Literal

import typer

EXIT_BAD_INPUT, EXIT_FAILED = 2, 1
REPO = Path(__file__).resolve().parent.parent

app = typer.Typer(
    name="dubflow",
    help="Declarative batch dubbing with lip-sync.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
_debug = False  # --debug: tracebacks as well as the one-line message

# options shared by several commands
WorkspaceOpt = Annotated[
    Path | None, typer.Option("--workspace", help="default ./dubflow-work or $DUBFLOW_WORKSPACE")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
ManifestArg = Annotated[Path, typer.Argument(help="the episode manifest (YAML)")]


def main(argv: list[str] | None = None) -> int:
    """Entry point (`dubflow`); returns the exit code instead of exiting, for tests and embedding."""
    global _debug
    _quiet_defaults()
    argv = list(sys.argv[1:] if argv is None else argv)
    _debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        result = app(args=argv, prog_name="dubflow", standalone_mode=False)
    except KeyboardInterrupt:
        print("dubflow: interrupted; finished stages are kept and will be reused", file=sys.stderr)
        return 130
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        return 130
    except Exception as exc:
        if not _is_usage_error(exc):
            raise
        if type(exc).__name__ != "NoArgsIsHelpError":  # that one has printed the help already
            exc.show(file=sys.stderr)  # type: ignore[attr-defined]
        return EXIT_BAD_INPUT
    return result if isinstance(result, int) else 0


def _is_usage_error(exc: Exception) -> bool:
    """A command-line mistake (unknown command or option, missing argument, bad value): click's own
    exceptions, which typer may vendor under another module, so they are known by their interface."""
    return callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int)


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", help="show tracebacks, not only the one-line error")
    ] = False,
) -> None:
    """Declarative batch dubbing with lip-sync."""


def _quiet_defaults() -> None:
    """Offline and no telemetry. Prefect logs at INFO for the API (the run's page in the UI shows the
    backend choices and the stage logs); the terminal stays quiet through the console handler alone."""
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "PYANNOTE_METRICS_ENABLED": "false",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING",
        # Prefect waits 20 s for its temporary API server; a loaded host (a render on every core) needs more
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        # each API call retries a lost connection with pauses of 1, 2, 4, 8 s (Prefect's 5 retries spent up
        # to 60 s on every call, 14 minutes for one run to fail); `dubflow run` resumes when the API is back
        "PREFECT_CLIENT_MAX_RETRIES": "3",
    }.items():
        os.environ.setdefault(key, value)


def _fail(message: str, code: int = EXIT_FAILED) -> int:
    from tasks.secrets import redact

    print(f"dubflow: {redact(message)}", file=sys.stderr)
    return code


def _fail_with(exc: BaseException, what: str) -> int:
    """One line for the user (`what failed: Type: first line`); the traceback too under --debug."""
    if _debug:
        from tasks.secrets import redact

        print(redact("".join(traceback.format_exception(exc))), file=sys.stderr, end="")
    first = str(exc).splitlines()[0] if str(exc) else ""
    return _fail(f"{what}: {type(exc).__name__}: {first}")


# ---------------------------------------------------------------------------------------------- validate


@app.command("validate")
def cmd_validate(files: Annotated[list[Path], typer.Argument(help="manifests to check")]) -> int:
    """Check manifests; one located line per problem."""
    from tasks.manifest import ManifestError, load_manifest

    worst = 0
    for file in files:
        try:
            load_manifest(file)
            print(f"ok {file}")
        except ManifestError as exc:
            print(exc, file=sys.stderr)
            worst = EXIT_BAD_INPUT
    return worst


# ---------------------------------------------------------------------------------------------- run


@app.command("run")
def cmd_run(
    file: ManifestArg,
    workspace: WorkspaceOpt = None,
    wait: Annotated[float, typer.Option(help="seconds to wait if the episode is already running")] = 0.0,
) -> int:
    """Run the episode flow for a manifest."""
    from tasks.manifest import ManifestError, load_manifest
    from tasks.workspace import Workspace, WorkspaceError

    try:
        loaded = load_manifest(file)
    except ManifestError as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_INPUT
    try:  # before Prefect starts: a read-only workspace fails now, not after the first stages
        Workspace(workspace).check_writable()
    except WorkspaceError as exc:
        return _fail(str(exc))
    return run_episode(loaded.path, workspace, wait_s=wait)


def run_episode(manifest: Path, workspace: Path | None, *, wait_s: float = 0.0) -> int:
    def call():
        from flows.workers import episode_flow

        ws = str(workspace) if workspace else None
        return episode_flow(ws)(manifest=str(manifest), workspace=ws, wait_s=wait_s)

    return _with_display(call, f"dubflow run {manifest}", _api_log(manifest, workspace))


def _api_log(manifest: Path, workspace: Path | None) -> Path | None:
    """Where Prefect's complaints about an unreachable API go: beside the episode's runs."""
    from tasks.workspace import Workspace, WorkspaceError

    episode = _episode_name(manifest)
    try:
        return Workspace(workspace).root / "episodes" / episode / "prefect-api.log" if episode else None
    except WorkspaceError:
        return None


def _quiet_console() -> None:
    """Prefect's console handler prints failed tasks' tracebacks; the user gets one line, the UI keeps the
    logs (INFO and up reach the API). Under --debug the console shows INFO too."""
    if (
        os.environ.get("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING") == "WARNING"
    ):  # ours, not the user's
        os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "INFO" if _debug else "CRITICAL"
    if "prefect" in sys.modules:  # configured already: apply it again (it reads the environment)
        from prefect.logging.configuration import setup_logging

        setup_logging()
    from flows import ephemeral

    ephemeral.install()  # the temporary Prefect server dies with this command, even one killed with -9


def _with_display(call, resume: str, api_log: Path | None = None) -> int:
    """Run `call` (a flow) under the progress display. When the Prefect API goes away mid-run, the run is
    resumed once the API is back (flows/api.py); `resume` is the command that resumes it by hand."""
    from flows import api
    from flows.display import RunDisplay
    from flows.progress import add_listener, remove_listener
    from tasks.workspace import EpisodeBusy

    _quiet_console()
    if api_log is not None and not _debug:
        api.quiet_api_noise(api_log)
    resumed: list[str] = []

    def note(text: str) -> None:
        if sys.stderr.isatty():  # a log (not a terminal) gets the one line of the outcome only
            print(f"dubflow: {text}", file=sys.stderr)

    for attempt in range(api.RESUMES + 1):
        display, tracker = RunDisplay(), api.StageTracker()
        add_listener(display)
        add_listener(tracker)
        try:
            with display:
                result = call()
            break
        except EpisodeBusy as exc:
            return _fail(str(exc))
        except Exception as exc:  # noqa: BLE001 - the run record has the details; the user gets one line
            if not api.is_api_gone(exc):
                return _fail_with(exc, "run failed")
            stages = tracker.describe()
            back, url, waited = api.recover(note) if attempt < api.RESUMES else (False, api.current_url(), 0)
            if not back:
                return _fail_with(api.ApiUnreachable(url, stages, round(waited), resume), "run failed")
            resumed.append(f"the Prefect API at {url} stopped answering during {stages}")
            note(f"the Prefect API at {url} answers again; resuming (finished stages are reused)")
        finally:
            remove_listener(display)
            remove_listener(tracker)
    for what in resumed:
        print(f"resumed: {what}; the run went on once it answered again")
    print(display.summary(result))
    return 0


# ---------------------------------------------------------------------------------------------- rerun


@app.command("rerun")
def cmd_rerun(
    file: ManifestArg,
    workspace: WorkspaceOpt = None,
    segments: Annotated[str | None, typer.Option(help="re-render these on purpose, e.g. 3,7 or 2-4")] = None,
) -> int:
    """Re-render the failed or missing segments of the last run, re-stitch."""
    from flows.rerun import parse_segments
    from tasks.manifest import ManifestError, load_manifest
    from tasks.workspace import Workspace

    try:
        episode = load_manifest(file).manifest.episode
        chosen = parse_segments(segments) if segments else None
    except (ManifestError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_INPUT
    ws = Workspace(workspace)
    if not ws.runs(episode):
        return _fail(f"episode {episode!r} has not been run in this workspace; run `dubflow run {file}`")

    def call():
        from flows.rerun import rerun_failed

        root = str(workspace) if workspace else None
        return rerun_failed(manifest=str(file.resolve()), workspace=root, segments=chosen)

    code = _with_display(call, f"dubflow rerun {file}", _api_log(file, workspace))
    print(rerun_summary(ws.runs(episode)[-1]))
    return code


def rerun_summary(run: dict) -> str:
    from flows.rerun import cached_segments, failed_segments, rendered_segments

    rendered, cached, failed = rendered_segments(run), cached_segments(run), failed_segments(run)
    names = ", ".join(f"#{i:02d}" for i in rendered) or "none"
    line = f"rerun {run['episode']}: rendered {len(rendered)} segment(s) ({names}), {len(cached)} cached"
    return line + (f", {len(failed)} still failing: {failed}" if failed else "")


# ---------------------------------------------------------------------------------------------- workers


@app.command("workers")
def cmd_workers(
    action: Annotated[
        Literal["start", "stop", "status", "join", "certs"],
        typer.Argument(
            help="start, stop, status, join ADDRESS (workers for another host's scheduler), certs DIR"
        ),
    ],
    target: Annotated[
        str | None, typer.Argument(help="join: the scheduler's address; certs: the folder")
    ] = None,
    workspace: WorkspaceOpt = None,
    cpu: Annotated[int | None, typer.Option(help="start N CPU workers instead of one per GPU")] = None,
    engine: Annotated[str, typer.Option(help="engine each worker loads at start")] = "preview",
    port: Annotated[int, typer.Option(help="scheduler port")] = 8786,
    host: Annotated[str, typer.Option(help="interface the scheduler listens on (beyond loopback: --tls)")] = (
        "127.0.0.1"
    ),
    tls: Annotated[
        Path | None, typer.Option(help="folder of `dubflow workers certs`: TLS, mutual auth")
    ] = None,
    force: Annotated[bool, typer.Option(help="certs: replace an existing CA")] = False,
    as_json: JsonOpt = False,
) -> int:
    """Long-lived render workers, one per GPU (a Dask cluster: local, or secured with TLS across hosts)."""
    from flows.certs import CertsError, make_certs
    from flows.workers import WorkersError, join_workers, start_workers, stop_workers, workers_status

    try:
        if action in ("join", "certs") and not target:
            what = (
                "the scheduler's address (tls://head:8786)"
                if action == "join"
                else "a folder for the certificates"
            )
            return _fail(f"`dubflow workers {action}` needs {what}", EXIT_BAD_INPUT)
        if action == "certs":
            files = make_certs(target, force=force)
            print(
                f"cluster CA and certificates in {Path(target).resolve()}: {', '.join(f.name for f in files)}"
            )
            print(
                "keep ca.key here; copy ca.pem + scheduler.* to the head, worker.* to GPU hosts, client.* to flow hosts"
            )
        elif action == "join":
            return join_workers(target, cpu_workers=cpu, engine=engine, tls=tls)
        elif action == "start":
            state = start_workers(workspace, cpu_workers=cpu, engine=engine, port=port, host=host, tls=tls)
            kind = f"{state.gpus} GPU" if state.gpus else "CPU"
            print(f"{state.workers} {kind} render worker(s) at {state.address} (engine {state.engine})")
            print(f"flows pick them up from the workspace, or set DUBFLOW_SCHEDULER={state.address}")
            if state.tls:
                print(
                    f"clients on other hosts also need DUBFLOW_TLS_DIR (ca.pem, client.pem, client.key of {state.tls})"
                )
        elif action == "stop":
            state = stop_workers(workspace)
            print(f"stopped the render workers at {state.address}")
        else:
            status = workers_status(workspace)
            print(json.dumps(status, indent=2) if as_json else _format_workers(status))
    except (WorkersError, CertsError) as exc:
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

    _quiet_console()
    try:
        result = dub_episode(
            manifest=str(loaded.path), workspace=str(workspace) if workspace else None, until=until
        )
    except Exception as exc:  # noqa: BLE001 - one line for the user
        return _fail_with(exc, f"{until} failed"), None
    return 0, result | {"loaded": loaded}


@app.command("plan")
def cmd_plan(file: ManifestArg, workspace: WorkspaceOpt = None) -> int:
    """Print the segment plan (no rendering)."""
    code, result = _run_until(file, workspace, "plan")
    if result is None:
        return code
    from flows.display import format_plan_table
    from tasks.segment import SegmentPlan
    from tasks.workspace import Workspace

    plan = SegmentPlan.from_json(Workspace(workspace).path(result["plan"].plan).read_text())
    print("\n".join(result["settings"].describe()))  # exactly what a run of this manifest will do
    print(format_plan_table(plan))
    return 0


@app.command("bind")
def cmd_bind(
    file: ManifestArg,
    workspace: WorkspaceOpt = None,
    propose: Annotated[
        bool, typer.Option(help="propose boxes for speakers the manifest leaves unbound")
    ] = False,
    faces: Annotated[
        str,
        typer.Option(help="face detector for --propose: auto (MTCNN, Haar where it finds none), mtcnn, haar"),
    ] = "auto",
) -> int:
    """Check the binding; --propose writes a manifest patch from faces and voices."""
    from tasks.faces import DETECTORS

    if faces not in ("auto", *DETECTORS):
        return _fail(
            f"--faces {faces!r} is unknown; use one of: auto, {', '.join(DETECTORS)}", EXIT_BAD_INPUT
        )
    code, result = _run_until(file, workspace, "bind")
    if result is None:
        return code
    from tasks.bind import propose_binding
    from tasks.workspace import Workspace

    ws, m = Workspace(workspace), result["loaded"].manifest
    sheet = ws.episode_dir(m.episode) / "out" / "contact-sheet.png"
    for warning in result["binding"].warnings:
        print(f"warning: {warning}")
    if not propose:
        ws.link(m.episode, "contact-sheet.png", result["binding"].contact_sheet)
        print(f"binding ok; contact sheet: {sheet}")
        return 0
    proposed = sheet.with_name("contact-sheet-proposed.png")
    pinned = {s.id: s.box_spec() for s in m.speakers}
    print(propose_binding(ws, result["source"], result["tracks"], pinned, proposed, faces=faces), end="")
    print(f"# contact sheet of this proposal: {proposed}")
    return 0


# ---------------------------------------------------------------------------------------------- status


@app.command("status")
def cmd_status(file: ManifestArg, workspace: WorkspaceOpt = None, as_json: JsonOpt = False) -> int:
    """The last run of an episode: each stage and segment."""
    from tasks.workspace import Workspace

    episode = _episode_name(file)
    if episode is None:
        return _fail(f"{file}: cannot read the episode name; run `dubflow validate {file}`", EXIT_BAD_INPUT)
    runs = Workspace(workspace).runs(episode)
    if not runs:
        return _fail(
            f"episode {episode!r} has not been run in this workspace; start it with `dubflow run {file}`"
        )
    last = status_record(runs[-1])
    if as_json:
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
    from tasks.limits import Limits, LimitsError
    from tasks.manifest import ManifestError, read_manifest_text
    from tasks.yamlmarks import YamlProblem, load_marked

    try:
        limits = Limits.from_env()
        data, _ = load_marked(read_manifest_text(file, limits.manifest_bytes), max_nodes=limits.yaml_nodes)
    except (ManifestError, LimitsError, YamlProblem):
        return None
    episode = data.get("episode") if isinstance(data, dict) else None
    return episode if isinstance(episode, str) and episode and "/" not in episode else None


# ---------------------------------------------------------------------------------------------- doctor, demo, schema


@app.command("doctor")
def cmd_doctor(as_json: JsonOpt = False) -> int:
    """What this machine can do, and which backend `auto` picks."""
    from flows.doctor import doctor_report, format_doctor

    report = doctor_report()
    print(json.dumps(report, indent=2) if as_json else format_doctor(report))
    return 0


@app.command("demo")
def cmd_demo(
    workspace: WorkspaceOpt = None,
    no_run: Annotated[bool, typer.Option("--no-run", help="only generate the media")] = False,
) -> int:
    """Generate the demo episode locally and run it."""
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
    if no_run:
        print(f"demo media ready: {manifest}")
        return 0
    return run_episode(manifest, workspace)


@app.command("models")
def cmd_models(
    action: Annotated[Literal["check", "download"], typer.Argument(help="check or download")],
    models_dir: Annotated[
        Path | None, typer.Option(help="default $DUBFLOW_MODELS_DIR; else the HF cache")
    ] = None,
    sha256: Annotated[
        bool, typer.Option("--sha256", help="check: also hash every file (slow for 70 GB)")
    ] = False,
    components: Annotated[
        str | None,
        typer.Option(
            help="comma-separated: base, base-diffusers, encoders, multitalk, infinitetalk-single, "
            "infinitetalk-multi, wav2vec (default: what --engine needs)"
        ),
    ] = None,
    engine: Annotated[
        Literal["multitalk", "infinitetalk"] | None,
        typer.Option(help="only this engine's files (download default: multitalk; check: every component)"),
    ] = None,
) -> int:
    """MultiTalk / InfiniteTalk weights: check presence and checksums, or download them."""
    from engine.base import models_dir_from_env
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

    models_dir = models_dir or models_dir_from_env()
    try:
        components = component_names(components.split(",")) if components else None
    except ValueError as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    if action == "download":
        if models_dir is None:
            return _fail("download needs --models-dir or $DUBFLOW_MODELS_DIR", EXIT_BAD_INPUT)
        if components is None:
            components = ("base", *ENGINE_COMPONENTS[engine]) if engine else DEFAULT_COMPONENTS
        os.environ["HF_HUB_OFFLINE"] = "0"  # the one command that is meant to reach the hub
        try:
            folders = download_weights(models_dir, components)
        except OSError as exc:  # network, disk, auth: one line, the partial download resumes next time
            return _fail(f"download failed (re-run to resume): {exc}")
        print("\n".join(f"downloaded {f}" for f in folders))
        return 0
    if components is None and engine:
        components = [present_dit(models_dir), *ENGINE_COMPONENTS[engine]]
    statuses = check_weights(models_dir, components, sha256=sha256)
    print(format_weight_report(statuses))
    if components is None:  # everything listed: fine when at least one engine has all it needs
        return 0 if any(not lacking for lacking in ready_engines(statuses).values()) else EXIT_FAILED
    return 0 if all(s.present for s in statuses) else EXIT_FAILED


@app.command("schema")
def cmd_schema() -> int:
    """Write manifests/schema.json from the manifest models."""
    from tasks.manifest import write_schema

    print(f"wrote {write_schema()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
