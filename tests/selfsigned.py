"""A self-signed certificate for loopback TLS tests, made with the ``openssl`` CLI."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def make_cert(folder: Path) -> tuple[Path, Path]:
    """``server.crt`` and ``server.key`` in ``folder``, valid for 127.0.0.1 and localhost."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl CLI not installed")
    cert, key = folder / "server.crt", folder / "server.key"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key
