"""Secrets (gated-hub tokens, keys) never reach what dubflow writes: run records, status, error lines.

The values of environment variables whose names say they are secret (HF_TOKEN, HUGGING_FACE_HUB_TOKEN,
anything with TOKEN, SECRET, PASSWORD or API_KEY in its name) are replaced by `***` in any text that
goes into a run record or onto the terminal. A value shorter than 8 characters is not treated as a
secret (it would blank out ordinary words).
"""

from __future__ import annotations

import os
import re
from typing import Any

_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY", re.IGNORECASE)
MASK = "***"


def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    env = os.environ if environ is None else environ
    values = {v for k, v in env.items() if _SECRET_NAME.search(k) and len(v) >= 8}
    return sorted(values, key=len, reverse=True)  # a secret containing another is masked whole


def redact(value: Any, secrets: list[str] | None = None) -> Any:
    """`value` (text, or dicts and lists of it) with every secret value masked."""
    secrets = secret_values() if secrets is None else secrets
    if not secrets:
        return value
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, MASK)
        return value
    if isinstance(value, dict):
        return {k: redact(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v, secrets) for v in value]
    return value
