"""What this workspace's render cluster is: the state `dubflow workers start` records, and the GPUs here.

Read by the workers' own commands (flows/workers.py) and by the run's settings (flows/resolve.py); it starts
nothing and imports no flow, so the episode flow can ask it without reaching the code that starts flows.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tasks.lease import process_alive

STATE_NAME = "workers.json"


@dataclass(frozen=True)
class ClusterState:
    address: str
    scheduler_pid: int
    worker_pid: int
    workers: int
    engine: str
    gpus: int
    log: str
    tls: str | None = None  # the certificates folder (flows/certs.py) when the cluster speaks TLS


def state_file(workspace: str | Path | None = None) -> Path:
    from tasks.workspace import DEFAULT_ROOT

    root = Path(workspace or os.environ.get("DUBFLOW_WORKSPACE") or DEFAULT_ROOT).resolve()
    return root / STATE_NAME


def read_state(workspace: str | Path | None = None) -> ClusterState | None:
    path = state_file(workspace)
    if not path.exists():
        return None
    state = ClusterState(**json.loads(path.read_text()))
    return state if process_alive(state.scheduler_pid) else None


def tls_dir(workspace: str | Path | None = None) -> Path | None:
    """Where this host's cluster certificates are: $DUBFLOW_TLS_DIR, else the folder `workers start` used."""
    if os.environ.get("DUBFLOW_TLS_DIR"):
        return Path(os.environ["DUBFLOW_TLS_DIR"])
    state = read_state(workspace)
    return Path(state.tls) if state and state.tls else None


def security(folder: str | Path, role: str = "client"):
    """distributed's Security for `role` with the certificates in `folder`: TLS required, peers verified."""
    from distributed.security import Security

    from flows.certs import role_files

    ca, cert, key = role_files(folder, role)
    return Security(
        require_encryption=True,
        tls_ca_file=str(ca),
        **{f"tls_{role}_cert": str(cert), f"tls_{role}_key": str(key)},
    )


def count_gpus() -> int:
    """GPUs nvidia-smi can see (0 without a driver)."""
    if not shutil.which("nvidia-smi"):
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))
