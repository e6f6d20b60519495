"""Ceilings a studio sets for what one manifest may ask of the machine, checked at validation.

They come from the environment of the host that runs the batch, never from the manifest (a vendor's
manifest must not raise its own limits):

  DUBFLOW_MAX_MANIFEST_BYTES   size of the manifest file                 (default 1 MiB)
  DUBFLOW_MAX_YAML_NODES       scalars, lists and mappings in it          (default 50000)
  DUBFLOW_MAX_EPISODE_S        duration of the source video, seconds      (default 14400: 4 h)
  DUBFLOW_MAX_RESOLUTION       longest side of the source picture, pixels (default 4096)
  DUBFLOW_MAX_SEGMENTS         segments in the plan                       (default 2000)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields


class LimitsError(ValueError):
    """A limit in the environment is not a positive number."""


@dataclass(frozen=True)
class Limits:
    manifest_bytes: int = 1 << 20
    yaml_nodes: int = 50_000
    episode_s: float = 4 * 3600.0
    resolution: int = 4096
    segments: int = 2000

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Limits:
        env = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            name = env_name(f.name)
            if raw := env.get(name, "").strip():
                values[f.name] = _positive(name, raw, float if f.type == "float" else int)
        return cls(**values)


def env_name(field: str) -> str:
    """The environment variable of a limit: segments -> DUBFLOW_MAX_SEGMENTS."""
    return f"DUBFLOW_MAX_{field.upper()}"


def _positive(name: str, raw: str, kind: type) -> int | float:
    try:
        value = kind(raw)
    except ValueError:
        raise LimitsError(f"${name}={raw!r} is not a number; set it to a positive {kind.__name__}") from None
    if not (isinstance(value, int) or math.isfinite(value)) or value <= 0:
        raise LimitsError(f"${name}={raw!r} must be a positive finite number")
    return value
