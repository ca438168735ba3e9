"""The console's TLS context: the configured certificate, or a self-signed one made on first
start in ``<state_dir>/console/`` with the openssl command (the standard library can use a
certificate but not make one). Its SHA-256 fingerprint is logged so that the first visit can
be checked against it."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import ssl
import subprocess
from pathlib import Path

from flux_edge.errors import FluxError

log = logging.getLogger("flux_edge.console")


def self_signed(directory: Path, host: str) -> tuple[Path, Path]:
    cert, key = directory / "console-cert.pem", directory / "console-key.pem"
    if cert.is_file() and key.is_file():
        return cert, key
    directory.mkdir(parents=True, exist_ok=True, mode=0o750)
    name = socket.gethostname()
    sans = [f"DNS:{name}", "DNS:localhost", "IP:127.0.0.1", "IP:::1"]
    if host not in ("0.0.0.0", "::", "", name, "localhost"):
        sans.append(f"IP:{host}" if host.replace(".", "").isdigit() or ":" in host
                    else f"DNS:{host}")
    cmd = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
           "-nodes", "-days", "3650", "-subj", f"/CN={name}",
           "-addext", "subjectAltName=" + ",".join(dict.fromkeys(sans)),
           "-keyout", str(key), "-out", str(cert)]
    old = os.umask(0o077)
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    except FileNotFoundError as exc:
        raise FluxError("console: TLS needs a certificate: install openssl to have one made, "
                        "or set console.cert_file and console.key_file") from exc
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        err = getattr(exc, "stderr", b"") or b""
        raise FluxError(f"console: making a self-signed certificate failed: "
                        f"{err.decode(errors='replace').strip()[:300]}") from exc
    finally:
        os.umask(old)
    os.chmod(key, 0o600)
    log.info("console: made a self-signed certificate %s", cert)
    return cert, key


def fingerprint(cert: Path) -> str:
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def server_context(cert: Path, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise FluxError(f"console: cannot use the certificate {cert}: {exc}") from exc
    return ctx
