"""The render farm across hosts, on one machine: Linux network namespaces made here stand for the hosts.

head    10.219.19.1  the Prefect server on PostgreSQL (auth string, a password role) and the TLS scheduler
w1, w2  10.219.19.2/3  one CPU render worker each (`dubflow workers join`), the (fake) model resident
client  10.219.19.4  runs a batch of two episodes; first checks that strangers are refused
The namespaces meet on a bridge inside a fifth namespace; nothing is added to the machine's own network, and
each namespace reaches only these addresses. The workspace is the shared storage (one file system).
Midway through a segment on w2, every process of w2 is killed and its namespace removed: the batch must
finish on w1 without rendering again a segment that had finished."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from flows.certs import make_certs
from tests.test_ops_rerun import write_manifest

REPO = Path(__file__).resolve().parent.parent
NET = "10.219.19"
NODES = {"head": 1, "w1": 2, "w2": 3, "client": 4}
HAS_POSTGRES = bool(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl") or shutil.which("pg_ctl"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not HAS_POSTGRES, reason="PostgreSQL is not installed (.ci/run installs it)"),
]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _kill_namespace(ns: str) -> None:
    """Every process in `ns` killed, then the namespace (and its end of the veth pair) removed."""
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.fixture
def farm_net():
    """Namespaces head, w1, w2, client on a bridge in a switch namespace; removed afterwards, whatever happens."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2 (`ip netns`)")
    tag = uuid.uuid4().hex[:6]
    names = {node: f"df19-{tag}-{node}" for node in (*NODES, "sw")}
    made: list[str] = []
    try:
        for ns in names.values():
            try:
                _ip("netns", "add", ns)
            except subprocess.CalledProcessError as exc:
                pytest.skip(f"this machine does not allow network namespaces: {exc.stderr.strip()}")
            made.append(ns)
        sw = names["sw"]
        _ip("-n", sw, "link", "add", "br0", "type", "bridge")
        _ip("-n", sw, "link", "set", "br0", "up")
        for node, last in NODES.items():
            ns = names[node]
            # both ends are made inside namespaces: the machine's own network never sees them
            _ip("-n", sw, "link", "add", f"p{last}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", sw, "link", "set", f"p{last}", "master", "br0", "up")
            _ip("-n", ns, "addr", "add", f"{NET}.{last}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield names
    finally:
        for ns in reversed(made):
            _kill_namespace(ns)


def _in(ns: str, env: dict, *cmd: str, log: Path) -> subprocess.Popen:
    out = open(log, "ab")  # noqa: SIM115 - the child's log for as long as it runs
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, *cmd], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO
    )


CLIENT = r"""
import json, sys, urllib.error, urllib.request
from distributed import Client
api, scheduler, folder, workspace = sys.argv[1:5]
refused = {}
for name, address in (("dask plain tcp", scheduler.replace("tls://", "tcp://")), ("dask tls, no certificate", None)):
    try:
        if address is None:  # TLS trusting the CA, but no certificate of its own: distributed needs one
            import ssl, socket
            host, port = scheduler[6:].rsplit(":", 1)
            ctx = ssl.create_default_context(cafile=sys.argv[5] + "/ca.pem"); ctx.check_hostname = False
            with socket.create_connection((host, int(port)), timeout=5) as raw, ctx.wrap_socket(raw) as s:
                s.recv(1)
        else:
            Client(address, timeout=3).close()
        refused[name] = False
    except Exception as exc:
        refused[name] = type(exc).__name__
try:
    req = urllib.request.Request(api + "/flows/filter", data=b"{}", headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req, timeout=10)
    refused["prefect api, no auth string"] = False
except urllib.error.HTTPError as exc:
    refused["prefect api, no auth string"] = exc.code
print("REFUSED " + json.dumps(refused), flush=True)
from flows.batch import dub_batch
rows = dub_batch(folder=folder, workspace=workspace, parallel=2)
print("ROWS " + json.dumps(rows), flush=True)
"""


def test_two_worker_hosts_share_a_batch_and_one_dies_midway(farm_net, demo_media, tmp_path):
    names = farm_net
    certs = tmp_path / "certs"
    make_certs(certs)
    ws, inbox, logs = tmp_path / "work", tmp_path / "inbox", tmp_path / "logs"
    for d in (inbox, logs):
        d.mkdir()
    for episode, seed in (("farm1", 11), ("farm2", 12)):
        write_manifest(inbox, demo_media, episode, extra_render=f", seed: {seed}")
    renders = tmp_path / "renders.txt"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DUBFLOW_"))}
    base |= {"PYTHONPATH": str(REPO), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    head = f"{NET}.{NODES['head']}"
    api, scheduler = f"http://{head}:4200/api", f"tls://{head}:8786"
    server_dir = tmp_path / "server"
    pgdata = tempfile.mkdtemp(prefix="dubflow-test-pg-")  # under /tmp: the postgres user must reach it
    server_env = base | {
        "DUBFLOW_SERVER_DIR": str(server_dir),
        "DUBFLOW_SERVER_HOST": head,
        "DUBFLOW_PGDATA": pgdata,
        "PYTHON": sys.executable,
    }
    script = str(REPO / "scripts" / "server.sh")
    try:
        started = subprocess.run(
            ["ip", "netns", "exec", names["head"], script, "start"], env=server_env, capture_output=True, text=True,
            timeout=180, cwd=REPO,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr + started.stdout
        auth = (server_dir / "api-auth").read_text().strip()
        tls = ["--tls-ca-file", str(certs / "ca.pem"), "--tls-cert", str(certs / "scheduler.pem")]
        tls += ["--tls-key", str(certs / "scheduler.key")]
        _in(names["head"], base, sys.executable, "-m", "dask", "scheduler", "--host", head, "--port", "8786",
            "--no-dashboard", *tls, log=logs / "scheduler.log")  # fmt: skip
        node_env = base | {
            "PREFECT_API_URL": api,
            "PREFECT_API_AUTH_STRING": auth,
            "DUBFLOW_ENGINE_OVERRIDES": "preview=engine.fake:SlowRenderer",
            "DUBFLOW_FAKE_LOAD_S": "0.5",
            "DUBFLOW_FAKE_S_PER_FRAME": "0.04",  # a 2 s segment renders in 2 s
            "DUBFLOW_FAKE_LOADS": str(tmp_path / "loads.txt"),
            "DUBFLOW_FAKE_RENDERS": str(renders),
        }
        for worker in ("w1", "w2"):
            env = node_env | {
                "DUBFLOW_HOST": worker,
                "PREFECT_HOME": str(tmp_path / f"prefect-{worker}"),
                "DUBFLOW_GPU_LOCK_DIR": str(tmp_path / f"locks-{worker}"),
            }
            _in(names[worker], env, sys.executable, "-m", "flows.cli", "workers", "join", scheduler, "--cpu", "1",
                "--tls", str(certs), log=logs / f"{worker}.log")  # fmt: skip
        client_env = node_env | {
            "DUBFLOW_HOST": "client",
            "PREFECT_HOME": str(tmp_path / "prefect-client"),
            "DUBFLOW_SCHEDULER": scheduler,
            "DUBFLOW_TLS_DIR": str(certs),
        }
        _wait_for(lambda: _lines(tmp_path / "loads.txt") == 2, 90, "both workers to load the model", logs)
        client_log = logs / "client.log"
        client = _in(names["client"], client_env, sys.executable, "-c", CLIENT, api, scheduler, str(inbox), str(ws),
                     str(certs), log=client_log)  # fmt: skip
        # w2 dies inside a segment, after finishing at least one
        _wait_for(lambda: _w2_busy_after_one(renders), 240, "w2 to be inside its second segment", logs)
        _kill_namespace(names["w2"])
        assert client.wait(300) == 0, client_log.read_text()[-4000:]
    finally:
        subprocess.run(["ip", "netns", "exec", names["head"], script, "stop"], env=server_env, capture_output=True,
                       timeout=120, cwd=REPO)  # fmt: skip
        shutil.rmtree(pgdata, ignore_errors=True)
    out = client_log.read_text()
    refused = json.loads(out.split("REFUSED ", 1)[1].splitlines()[0])
    assert refused["dask plain tcp"] and refused["dask tls, no certificate"], refused
    assert refused["prefect api, no auth string"] == 401, refused
    rows = json.loads(out.split("ROWS ", 1)[1].splitlines()[0])
    assert [r["state"] for r in rows] == ["completed", "completed"], rows
    events = [line.split() for line in renders.read_text().splitlines()]
    finished = Counter(tuple(e[3:6]) for e in events if e[0] == "end")
    assert finished and max(finished.values()) == 1, finished  # no finished segment rendered again
    assert {e[1] for e in events if e[0] == "end"} == {"w1", "w2"}  # the segments went to both hosts
    cut = [tuple(e[3:6]) for e in events if e[0] == "start" and e[1] == "w2" and tuple(e[3:6]) not in
           {tuple(f[3:6]) for f in events if f[0] == "end" and f[1] == "w2"}]  # fmt: skip
    assert cut and all(finished[c] == 1 for c in cut)  # the segment w2 died in was finished by w1
    assert _lines(tmp_path / "loads.txt") == 2  # one model load per worker for the whole batch
    for episode in ("farm1", "farm2"):  # stitched on the client from segments rendered on w1 and w2
        assert (ws / "episodes" / episode / "out").is_dir()


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _w2_busy_after_one(renders: Path) -> bool:
    if not renders.exists():
        return False
    w2 = [line.split()[0] for line in renders.read_text().splitlines() if line.split()[1] == "w2"]
    return w2.count("end") >= 1 and w2.count("start") > w2.count("end")


def _wait_for(ready, timeout_s: float, what: str, logs: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            tails = {p.name: p.read_text()[-1500:] for p in logs.iterdir()}
            raise AssertionError(f"waited {timeout_s} s for {what}: {tails}")
        time.sleep(0.1)
