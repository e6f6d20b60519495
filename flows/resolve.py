"""One resolution of a manifest and the machine into every stage's settings.

The run and `dubflow plan` both call `resolve_run`, so the plan a user previews is the plan a run makes:
the engine `auto` picks and why, the render workers the segments are balanced over, the memory the
segments are sized for, and the render options every segment gets. Machine figures are totals, not what
happens to be free at this moment, so an unchanged episode keeps its cache keys run after run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

from engine.gpu_state import engine_override
from engine.memory import GiB, max_resident_blocks
from engine.multitalk.settings import EngineSettings, guidance_passes
from engine.selection import resolve_render_engine
from flows.cluster import read_state
from tasks.manifest import Manifest
from tasks.render import RenderOptions
from tasks.segment import PlanSettings, _render_cost, max_segment_frames


@dataclass(frozen=True)
class Machine:
    """Where the segments render: how many at once, and the memory of one render worker."""

    render_slots: int  # render workers (one per GPU), or 1 on a machine without workers or GPUs
    gpu_bytes: int  # total memory of one render GPU; 0: rendering on the CPU
    host_bytes: int  # total memory of a render worker's host
    where: str


@dataclass(frozen=True)
class RunSettings:
    engine: str  # resolved: preview | multitalk | infinitetalk
    engine_why: str
    machine: Machine
    plan: PlanSettings
    render: RenderOptions

    def describe(self) -> list[str]:
        """What a run will do, as `dubflow plan` prints it above the segment table."""
        m, p, r = self.machine, self.plan, self.render
        gpu = f"{m.gpu_bytes / GiB:.0f} GiB GPU" if m.gpu_bytes else "no GPU"
        limit = f"{p.max_segment_s:g} s (manifest)" if p.max_segment_s else "from the memory model"
        return [
            f"engine: {self.engine} ({self.engine_why})",
            f"machine: {m.where}: {m.render_slots} render slot(s), {gpu}, {m.host_bytes / GiB:.0f} GiB host",
            f"segments: at {p.size}p, longest {limit}, cut in silences of {p.min_gap_s:g} s or more, "
            f"balanced over {p.n_gpus} slot(s)",
            f"render: {r.steps} steps x {p.cfg_passes} guidance passes, seed {r.seed}, "
            f"text {r.text_scale:g} / audio {r.audio_scale:g}"
            + (", chained within shots" if r.chain else ""),
            *self._speed(),
        ]

    def _speed(self) -> list[str]:
        r = self.render
        switches = [f"{k} {v}" for k, v in r.engine_settings if k != "loras"]
        switches += [
            f"LoRA {Path(lora.path).name} x{lora.scale:g}"
            for k, v in r.engine_settings
            if k == "loras"
            for lora in v
        ]
        if r.teacache is not None:
            switches.append(f"TeaCache {r.teacache:g} after {r.teacache_warmup} steps")
        return [f"speed: {', '.join(switches)}"] if switches else []


def resolve_run(m: Manifest, source_kind: str, machine: Machine, models_dir: Path | None) -> RunSettings:
    """The manifest's choices on this machine, for every stage: engine, plan and render settings."""
    engine, why = resolve_render_engine(m.render.engine, models_dir, source_kind)
    override = engine_override(engine)
    if override:  # another implementation (tests, benches): the real engine's GPU model does not describe it
        why = f"{why}; implemented by {override} (DUBFLOW_ENGINE_OVERRIDES), planned as a CPU renderer"
    passes = len(guidance_passes(m.render.text_scale, m.render.audio_scale))  # 3, 2 or 1 (ENGINE.md §4.4)
    max_s = m.render.max_segment_s
    plan = PlanSettings(
        engine=engine,
        size=m.render.size,
        max_segment_s=None if max_s == "auto" else max_s,
        min_gap_s=m.render.min_gap_s,
        n_gpus=machine.render_slots,
        steps=m.render.steps,
        cfg_passes=passes,
        gpu_bytes=machine.gpu_bytes,
        host_bytes=machine.host_bytes,
        cost_model="preview" if override else engine,
        chain=m.render.chain,
        overlap_frames=m.render.overlap_frames,
        quantize=m.render.quantize,
        offload=m.render.offload,
        resident_blocks=0 if m.render.resident_blocks == "auto" else m.render.resident_blocks,
        compile=m.render.compile,
        vae_tiled=m.render.vae_tiling,
    )
    if m.render.offload == "blocks" and m.render.resident_blocks == "auto":
        plan = replace(plan, resident_blocks=resident_blocks_for(plan))
    render = RenderOptions(
        engine=engine,
        size=m.render.size,
        steps=m.render.steps,
        seed=m.render.seed,
        prompt=m.render.prompt,
        text_scale=m.render.text_scale,
        audio_scale=m.render.audio_scale,
        chain=m.render.chain,
        teacache=m.render.teacache,
        teacache_warmup=m.render.teacache_warmup,
        engine_settings=engine_settings(m, plan.resident_blocks) if engine != "preview" else (),
    )
    max_segment_frames(plan)  # an engine that cannot fit this machine is refused now, before any stage runs
    return RunSettings(engine, why, machine, plan, render)


def resident_blocks_for(plan: PlanSettings) -> int:
    """render.resident_blocks auto: as many blocks as the render GPU keeps besides a chunk (0 without a GPU)."""
    if not plan.gpu_bytes:
        return 0
    return max(0, max_resident_blocks(plan.gpu_bytes, _render_cost(plan)))


def engine_settings(m: Manifest, resident_blocks: int = 0) -> tuple[tuple[str, object], ...]:
    """The manifest's load-time engine switches as keyword pairs for the engine's factory (EngineSettings);
    only those that differ from the defaults, so a plain manifest builds the plain engine."""
    from engine.multitalk.lora import LoraSpec

    r = m.render
    pairs: list[tuple[str, object]] = [
        ("loras", tuple(LoraSpec.stamped(lora.file, lora.scale) for lora in r.loras)),
        ("lora_merge", r.lora_merge), ("quantize", r.quantize), ("offload", r.offload),
        ("resident_blocks", resident_blocks), ("attention", r.attention), ("compile", r.compile),
        ("vae_tiling", r.vae_tiling),
    ]  # fmt: skip
    plain = EngineSettings()
    return tuple((k, v) for k, v in pairs if v != getattr(plain, k))


def detect_machine(workspace: str | Path | None = None) -> Machine:
    """The render workers of this workspace when they run (`dubflow workers start`), else this machine."""
    host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    memories = _gpu_memories()
    gpus, gpu_bytes = len(memories), min(memories, default=0)
    state = read_state(workspace)
    if state is not None:
        return Machine(max(1, state.workers), gpu_bytes, host, f"render workers at {state.address}")
    if os.environ.get("DUBFLOW_SCHEDULER"):  # workers elsewhere: their count is the operator's to give
        slots = int(os.environ.get("DUBFLOW_RENDER_SLOTS", "1"))
        return Machine(max(1, slots), gpu_bytes, host, f"render workers at {os.environ['DUBFLOW_SCHEDULER']}")
    return Machine(max(1, gpus), gpu_bytes, host, "this machine")


def _gpu_memories() -> list[int]:
    """Total memory of each GPU nvidia-smi lists (none without a driver), in one call; no torch import."""
    if not shutil.which("nvidia-smi"):
        return []
    done = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=False,
    )
    return [int(line) * 2**20 for line in done.stdout.split() if line.strip().isdigit()]
