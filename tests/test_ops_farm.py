"""The render farm's Dask cluster is closed to strangers: TLS with mutual certificates from the cluster's own CA
(`dubflow workers certs`); a client without a certificate, with one from another CA, or speaking plain TCP is
refused, and nothing listens beyond loopback without TLS."""

from __future__ import annotations

import base64
import glob
import os
import shutil
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from flows.certs import make_certs
from flows.cli import main
from flows.cluster import security
from flows.workers import start_workers
from tests.net import free_port


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("certs")
    make_certs(folder)
    return folder


@pytest.fixture(scope="module")
def tls_scheduler(certs, tmp_path_factory):
    """A bare TLS scheduler (no workers: refusing a client needs none) on a free loopback port."""
    port = free_port()
    log = tmp_path_factory.mktemp("sched") / "scheduler.log"
    args = ["--tls-ca-file", certs / "ca.pem", "--tls-cert", certs / "scheduler.pem", "--tls-key"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1", "--port", str(port),
             "--no-dashboard", *map(str, args), str(certs / "scheduler.key")],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    address = f"tls://127.0.0.1:{port}"
    try:
        _wait_listening(port, proc, log)
        yield address
    finally:
        proc.terminate()
        proc.wait(20)


def _wait_listening(port: int, proc: subprocess.Popen, log) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"the scheduler did not listen: {log.read_text()}")


def test_certs_command_writes_a_ca_and_one_certificate_per_role_with_private_keys(tmp_path, capsys):
    assert main(["workers", "certs", str(tmp_path / "farm")]) == 0
    names = sorted(p.name for p in (tmp_path / "farm").iterdir())
    assert names == sorted(
        ["ca.pem", "ca.key"] + [f"{r}.{e}" for r in ("scheduler", "worker", "client") for e in ("pem", "key")]
    )
    for key in (tmp_path / "farm").glob("*.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert "keep ca.key here" in capsys.readouterr().out
    # a second run would replace the CA and orphan every host's certificate: refused unless --force
    assert main(["workers", "certs", str(tmp_path / "farm")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["workers", "certs", str(tmp_path / "farm"), "--force"]) == 0


def test_a_client_with_the_cluster_certificate_is_served(tls_scheduler, certs):
    from distributed import Client

    with Client(tls_scheduler, security=security(certs, "client"), timeout=20) as client:
        assert client.scheduler_info()["address"] == tls_scheduler


@pytest.mark.parametrize("how", ["another CA", "plain tcp"])
def test_an_unauthenticated_client_is_refused(tls_scheduler, tmp_path, how):
    from distributed import Client

    if how == "another CA":  # a certificate, but one the cluster never issued
        make_certs(tmp_path / "rogue")
        kwargs, address = {"security": security(tmp_path / "rogue", "client")}, tls_scheduler
    else:
        kwargs, address = {}, tls_scheduler.replace("tls://", "tcp://")
    with pytest.raises((OSError, TimeoutError)):
        Client(address, timeout=3, **kwargs)


def test_a_tls_client_without_a_certificate_is_cut_off(tls_scheduler, certs):
    """distributed cannot even be configured without a client certificate; a raw TLS socket that trusts the
    cluster's CA but shows none is refused in the handshake, while the same socket with the client
    certificate gets the scheduler's first message (dask's handshake)."""
    host, port = tls_scheduler.removeprefix("tls://").rsplit(":", 1)

    def first_read(with_certificate: bool) -> bytes:
        ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
        ctx.check_hostname = False  # the cluster's certificates name roles, not hosts
        if with_certificate:
            ctx.load_cert_chain(certs / "client.pem", certs / "client.key")
        with socket.create_connection((host, int(port)), timeout=2) as raw, ctx.wrap_socket(raw) as tls:
            return tls.recv(1)  # TLS 1.3: the server's verdict on our certificate arrives with the first read

    with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"):
        first_read(with_certificate=False)
    assert first_read(with_certificate=True)


def test_a_scheduler_beyond_loopback_needs_tls(tmp_path, capsys):
    assert main(["workers", "start", "--cpu", "1", "--host", "0.0.0.0", "--workspace", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert (
        "would run code for anyone" in err and "--tls DIR" in err and not (tmp_path / "workers.json").exists()
    )


def test_tls_needs_every_certificate_of_the_roles_it_starts(tmp_path, certs, capsys):
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("ca.pem", "scheduler.pem", "scheduler.key"):
        (partial / name).write_bytes((certs / name).read_bytes())
    with pytest.raises(Exception, match=r"worker\.pem not found"):
        start_workers(tmp_path / "ws", cpu_workers=1, tls=partial)


def test_flows_need_a_client_certificate_for_a_tls_scheduler(tmp_path, certs, monkeypatch):
    from flows.workers import WorkersError, render_task_runner

    monkeypatch.setenv("DUBFLOW_SCHEDULER", "tls://10.9.9.9:8786")
    monkeypatch.delenv("DUBFLOW_TLS_DIR", raising=False)
    with pytest.raises(WorkersError, match="requires TLS: set DUBFLOW_TLS_DIR"):
        render_task_runner(tmp_path)
    monkeypatch.setenv("DUBFLOW_TLS_DIR", str(certs))
    runner = render_task_runner(tmp_path)
    assert runner.client_kwargs["security"].tls_client_cert == str(certs / "client.pem")


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_an_episode_renders_on_tls_workers(certs, demo_media, tmp_path, monkeypatch):
    """`workers start --tls`: the scheduler and its workers speak TLS; the flow finds the certificate folder in
    the workspace's record and its segments render on the workers."""
    from flows.rerun import segment_stages
    from flows.workers import stop_workers, workers_status
    from tests.test_ops_rerun import last_run, write_manifest

    monkeypatch.delenv("DUBFLOW_TLS_DIR", raising=False)
    monkeypatch.delenv("DUBFLOW_SCHEDULER", raising=False)
    monkeypatch.setenv("DUBFLOW_GPU_LOCK_DIR", str(tmp_path / "locks"))
    ws = tmp_path / "work"
    state = start_workers(ws, cpu_workers=2, port=free_port(), tls=certs)
    try:
        assert state.address.startswith("tls://127.0.0.1:") and state.tls == str(certs.resolve())
        assert len(workers_status(ws)["workers"]) == 2
        manifest = write_manifest(tmp_path, demo_media, "tls1", extra_render=", seed: 3")
        assert main(["run", str(manifest), "--workspace", str(ws)]) == 0
        workers = {s["worker"] for s in segment_stages(last_run(ws, "tls1")) if s["state"] == "executed"}
        assert workers and workers <= {"render-0", "render-1"}
    finally:
        stop_workers(ws)


# ---------------------------------------------------------------------------------------------- the Prefect API

HAS_POSTGRES = bool(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl") or shutil.which("pg_ctl"))
REPO = Path(__file__).resolve().parent.parent


def _http_status(url: str, auth: str | None = None) -> int:
    request = urllib.request.Request(url, data=b"{}", headers={"Content-Type": "application/json"})
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.slow
@pytest.mark.skipif(not HAS_POSTGRES, reason="PostgreSQL is not installed (.ci/run installs it)")
def test_a_server_on_another_interface_requires_its_auth_string_and_a_postgres_password(tmp_path):
    """HOST=127.0.0.2 (not the default loopback address): the API listens there only, refuses requests without
    the auth string server.sh made, and Prefect reaches PostgreSQL as the `prefect` role with a password."""
    port = free_port()
    pgdata = tempfile.mkdtemp(prefix="dubflow-test-pg-")  # under /tmp: the postgres user must reach it
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DUBFLOW_"))} | {
        "DUBFLOW_SERVER_DIR": str(tmp_path),
        "DUBFLOW_SERVER_HOST": "127.0.0.2",
        "DUBFLOW_SERVER_PORT": str(port),
        "DUBFLOW_PGPORT": str(free_port()),
        "DUBFLOW_PGDATA": pgdata,
        "PYTHON": sys.executable,
    }
    script = str(REPO / "scripts" / "server.sh")
    try:
        started = subprocess.run([script, "start"], env=env, capture_output=True, text=True, timeout=240)
        assert started.returncode == 0, started.stderr + started.stdout
        auth = (tmp_path / "api-auth").read_text().strip()
        assert stat.S_IMODE((tmp_path / "api-auth").stat().st_mode) == 0o600
        assert auth not in started.stdout and "PREFECT_API_AUTH_STRING" in started.stdout
        assert "postgresql+asyncpg://prefect:***@" in started.stdout  # the password is never printed
        api = f"http://127.0.0.2:{port}/api"
        assert _http_status(f"{api}/flows/filter") == 401
        assert _http_status(f"{api}/flows/filter", "dubflow:wrong") == 401
        assert _http_status(f"{api}/flows/filter", auth) == 200
        with socket.socket() as s:  # nothing on the default loopback address
            assert s.connect_ex(("127.0.0.1", port)) != 0
        # Prefect's client setting carries the same string
        probe = "import asyncio; from prefect.client.orchestration import get_client\n"
        probe += "async def main():\n    async with get_client() as c: print(len(await c.read_flows()))\n"
        probe += "asyncio.run(main())"
        client_env = env | {"PREFECT_API_URL": api, "PREFECT_API_AUTH_STRING": auth}
        ok = subprocess.run([sys.executable, "-c", probe], env=client_env, capture_output=True, text=True)
        assert ok.returncode == 0 and ok.stdout.strip() == "0", ok.stderr[-2000:]
        refused = subprocess.run(
            [sys.executable, "-c", probe], env=client_env | {"PREFECT_API_AUTH_STRING": "x:y"}, capture_output=True,
            text=True,
        )  # fmt: skip
        assert refused.returncode != 0 and "401" in refused.stderr
        # the database: the role's password is required, and the superuser cannot log in over TCP
        pg = sorted(glob.glob("/usr/lib/postgresql/*/bin/psql"))[-1]
        psql = ["runuser", "-u", "postgres", "--", pg, "-h", "127.0.0.1", "-p", env["DUBFLOW_PGPORT"], "-w"]
        assert subprocess.run(
            [*psql, "-U", "prefect", "prefect", "-c", "select 1"], capture_output=True
        ).returncode
        assert subprocess.run(
            [*psql, "-U", "postgres", "prefect", "-c", "select 1"], capture_output=True
        ).returncode
    finally:
        subprocess.run([script, "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(pgdata, ignore_errors=True)


@pytest.mark.parametrize(
    ("address", "extra", "said"),
    [
        ("tcp://10.0.0.5:8786", [], "without TLS would let anyone on the network run code here"),
        ("tls://10.0.0.5:8786", [], "requires TLS: give --tls DIR"),
    ],
)
def test_joining_a_scheduler_on_another_host_needs_tls(address, extra, said, capsys):
    assert main(["workers", "join", address, "--cpu", "1", *extra]) == 1
    assert said in capsys.readouterr().err


def test_workers_join_and_certs_need_their_argument(capsys):
    assert main(["workers", "join"]) == 2
    assert "needs the scheduler's address" in capsys.readouterr().err
