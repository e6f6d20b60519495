"""A private certificate authority for the render farm's Dask cluster (`dubflow workers certs DIR`).

Dask workers run whatever pickled function a client sends them, so the scheduler, the workers and every
client prove who they are to each other with certificates signed by this CA (mutual TLS: distributed
verifies the peer's certificate on both ends of every connection). The CA's key signs the certificates and
is needed nowhere else: keep `ca.key` on the machine that issued them. Copy to each host:
  head (scheduler):       ca.pem scheduler.pem scheduler.key
  GPU hosts (workers):    ca.pem worker.pem worker.key
  where flows run:        ca.pem client.pem client.key
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

ROLES = ("scheduler", "worker", "client")
CA_FILES = ("ca.pem", "ca.key")


class CertsError(RuntimeError):
    """The cluster's certificates cannot be made or found; the message says what to do."""


def make_certs(folder: str | Path, *, days: int = 825, force: bool = False) -> list[Path]:
    """A CA and one certificate per role in `folder` (keys readable by their owner only); the files written."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(folder)
    existing = [out / n for n in (*CA_FILES, *(f"{r}.pem" for r in ROLES)) if (out / n).exists()]
    if existing and not force:
        raise CertsError(f"{existing[0]} already exists; use another folder, or --force to replace the CA")
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dubflow render farm"),
                          x509.NameAttribute(NameOID.COMMON_NAME, common)])  # fmt: skip

    def builder(subject: x509.Name, issuer: x509.Name, key) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))  # hosts whose clocks lag a little
            .not_valid_after(now + dt.timedelta(days=days))
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("dubflow cluster CA")
    ca = (
        builder(ca_name, ca_name, ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    written = [_write_cert(out / "ca.pem", ca), _write_key(out / "ca.key", ca_key)]
    # each role both serves and connects (a worker listens for peers and dials the scheduler)
    usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    for role in ROLES:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            builder(name(f"dubflow {role}"), ca_name, key)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(usage, critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        written += [_write_cert(out / f"{role}.pem", cert), _write_key(out / f"{role}.key", key)]
    return written


def role_files(folder: str | Path, role: str) -> tuple[Path, Path, Path]:
    """(CA certificate, certificate, key) of `role` in `folder`; a clear error when one is missing."""
    base = Path(folder)
    files = (base / "ca.pem", base / f"{role}.pem", base / f"{role}.key")
    for f in files:
        if not f.is_file():
            raise CertsError(
                f"{f} not found: the {role} needs ca.pem, {role}.pem and {role}.key "
                f"(made by `dubflow workers certs DIR` and copied to this host)"
            )
    return files


def _key_usage(*, cert_sign: bool):
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=not cert_sign, key_cert_sign=cert_sign, crl_sign=cert_sign,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


def _write_cert(path: Path, cert) -> Path:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key) -> Path:
    from cryptography.hazmat.primitives import serialization

    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # never world-readable, not even briefly
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)
    return path
