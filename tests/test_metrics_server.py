"""The /metrics server under idle, slow and hostile clients, over plain HTTP and TLS + basic auth.

A real Prometheus scrapes it while hundreds of connections sit idle or half-sent, and over TLS
with basic auth it scrapes the real agent with a good password and is refused with a wrong one.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml

from flood import Flood
from gputel.telemetry import basic_auth
from gputel.telemetry.metrics_http import CONTENT_TYPE, MetricsServer
from selfsigned import make_cert

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
BODY = b"# TYPE up_test gauge\nup_test 1\n" + b"".join(
    b'gputel_test_series{n="%d"} %d\n' % (i, i) for i in range(200)
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(what: str, ok: Callable[[], Any], timeout: float, logs: Callable[[], str]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError, KeyError):
            value = ok()
            if value:
                return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}\n{logs()}")


class Prometheus:
    """A real Prometheus on loopback with the given scrape jobs (1 s interval)."""

    def __init__(self, tmp_path: Path, jobs: list[dict[str, Any]]) -> None:
        if not Path(PROMETHEUS).exists():
            pytest.skip(
                "prometheus not installed (Debian package prometheus; setup-dev installs it)"
            )
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / "prometheus.log"
        config = tmp_path / "prometheus.yml"
        for job in jobs:
            job.setdefault("scrape_interval", "1s")
            job.setdefault("scrape_timeout", "1s")
        config.write_text(
            yaml.safe_dump({"global": {"scrape_interval": "1s"}, "scrape_configs": jobs})
        )
        self.proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def logs(self) -> str:
        return "--- prometheus log ---\n" + self.log_path.read_text(errors="replace")[-3000:]

    def api(self, path: str, **params: str) -> dict[str, Any]:
        url = f"{self.base}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as resp:
            return dict(json.loads(resp.read()))

    def targets(self) -> dict[str, dict[str, Any]]:
        """Active targets by job name."""
        found = self.api("targets")["data"]["activeTargets"]
        return {t["labels"]["job"]: t for t in found}

    def value(self, expr: str) -> float | None:
        result = self.api("query", query=expr)["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def prometheus(tmp_path: Path, jobs: list[dict[str, Any]]) -> Iterator[Prometheus]:
    prom = Prometheus(tmp_path, jobs)
    try:
        wait_for("prometheus to be ready", lambda: prom.api("status/buildinfo"), 20, prom.logs)
        yield prom
    finally:
        prom.close()


@contextlib.contextmanager
def serving(**kwargs: Any) -> Iterator[MetricsServer]:
    server = MetricsServer(
        "127.0.0.1", 0, metrics=lambda: BODY, health=lambda: (True, "ok"), **kwargs
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def raw(port: int, data: bytes, timeout: float = 5) -> bytes:
    """Send ``data`` and read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def closed_within(sock: socket.socket, limit: float) -> float | None:
    """Seconds until the server closed ``sock`` (EOF or reset); None if still open at ``limit``."""
    started = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - started


# ------------------------------------------------------------------------------- plain HTTP
def test_get_head_http10_404_405_and_pipelining() -> None:
    with serving() as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        for _ in range(3):  # keep-alive: one connection, three scrapes
            conn.request("GET", "/metrics")
            resp = conn.getresponse()
            assert (resp.status, resp.getheader("Content-Type"), resp.read()) == (
                200,
                CONTENT_TYPE,
                BODY,
            )
        conn.request("HEAD", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.getheader("Content-Length") == str(len(BODY))
        assert resp.read() == b""
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() == b"ok\n"
        conn.request("GET", "/nope")
        assert conn.getresponse().status == 404
        conn.close()

        reply = raw(server.port, b"GET /metrics HTTP/1.0\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(BODY)
        assert b"Connection: close" in reply

        reply = raw(server.port, b"POST /metrics HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi")
        assert reply.startswith(b"HTTP/1.1 405 ") and b"Allow: GET, HEAD" in reply

        assert raw(server.port, b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        assert raw(server.port, b"GET / HTTP/2.0\r\n\r\n").startswith(b"HTTP/1.1 505 ")
        huge = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n"
        assert raw(server.port, huge).startswith(b"HTTP/1.1 431 ")

        # Two requests in one packet: two answers, in order, on one connection.
        two = b"GET /healthz HTTP/1.1\r\n\r\nGET /nope HTTP/1.1\r\nConnection: close\r\n\r\n"
        reply = raw(server.port, two)
        assert reply.count(b"HTTP/1.1 ") == 2
        assert reply.index(b"200 OK") < reply.index(b"404 Not Found")


def test_gzip_when_asked() -> None:
    with serving() as server:
        reply = raw(
            server.port,
            b"GET /metrics HTTP/1.1\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n",
        )
        head, _, body = reply.partition(b"\r\n\r\n")
        assert b"Content-Encoding: gzip" in head
        assert gzip.decompress(body) == BODY
        plain = raw(server.port, b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert b"Content-Encoding" not in plain and plain.endswith(BODY)


def test_silent_dripping_and_idle_keepalive_clients_are_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gputel.telemetry import metrics_http

    monkeypatch.setattr(metrics_http, "REQUEST_TIMEOUT_S", 0.5)
    monkeypatch.setattr(metrics_http, "KEEPALIVE_IDLE_S", 0.8)
    with serving(poll_interval=0.05) as server:
        silent = socket.create_connection(("127.0.0.1", server.port))
        assert closed_within(silent, 5) is not None
        silent.close()

        # A byte every 0.1 s keeps every read short but the request never ends: the deadline
        # is for the whole head, not per read.
        drip = socket.create_connection(("127.0.0.1", server.port))
        started = time.monotonic()
        cut = False
        for byte in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"z" * 100:
            try:
                drip.sendall(bytes([byte]))
            except OSError:
                cut = True
                break
            if closed_within(drip, 0.1) is not None:
                cut = True
                break
        assert cut, "the server kept a drip-feeding client"
        assert time.monotonic() - started < 5
        drip.close()

        keep = socket.create_connection(("127.0.0.1", server.port))
        keep.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
        reply = keep.recv(4096)
        assert reply.startswith(b"HTTP/1.1 200 ") and b"Connection: close" not in reply
        assert closed_within(keep, 5) is not None  # then it goes quiet and is closed
        keep.close()


def test_at_the_connection_limit_a_scraper_still_gets_in() -> None:
    with serving(max_connections=8) as server:
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(40)]
        try:
            for _ in range(5):
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{server.port}/metrics", timeout=2
                ) as r:
                    assert r.read() == BODY
        finally:
            for s in idle:
                s.close()


def test_hundreds_of_idle_connections_cost_no_scrape(tmp_path: Path) -> None:
    """Before: 32 thread slots, each held up to 10 s, and 27 of 30 scrapes failed."""
    with serving() as server, Flood(server.port) as flood:
        target = f"127.0.0.1:{server.port}"
        with prometheus(
            tmp_path, [{"job_name": "gputel", "static_configs": [{"targets": [target]}]}]
        ) as prom:
            wait_for("the flood to build up", lambda: flood.opened >= 400, 20, prom.logs)
            for _ in range(30):
                with urllib.request.urlopen(f"http://{target}/metrics", timeout=2) as r:
                    assert r.read() == BODY
            wait_for(
                "five scrapes by Prometheus during the flood",
                lambda: (prom.value('count_over_time(up{job="gputel"}[1m])') or 0) >= 5,
                30,
                prom.logs,
            )
            assert prom.value('min_over_time(up{job="gputel"}[1m])') == 1, prom.targets()
            assert prom.value('count(up_test{job="gputel"})') == 1
        assert flood.opened >= 400


# ---------------------------------------------------------------------------- TLS and auth
@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    return make_cert(tmp_path)


def web_config(tmp_path: Path, users: dict[str, str]) -> Path:
    """A web config with paths relative to itself, as operators write them."""
    path = tmp_path / "web-config.yml"
    hashed = {
        u: bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4)).decode() for u, p in users.items()
    }
    path.write_text(
        yaml.safe_dump(
            {
                "tls_server_config": {"cert_file": "server.crt", "key_file": "server.key"},
                "basic_auth_users": hashed,
            }
        )
    )
    path.chmod(0o640)
    return path


def https_get(
    port: int, cert: Path, auth: tuple[str, str] | None
) -> tuple[int, dict[str, str], bytes]:
    context = ssl.create_default_context(cafile=str(cert))
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=context)
    headers = {}
    if auth is not None:
        import base64

        headers["Authorization"] = "Basic " + base64.b64encode(":".join(auth).encode()).decode()
    try:
        conn.request("GET", "/metrics", headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_tls_basic_auth_and_the_bcrypt_cache(
    tmp_path: Path, tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, _key = tls_files
    calls = []
    real = bcrypt.checkpw
    monkeypatch.setattr(bcrypt, "checkpw", lambda pw, h: calls.append(1) or real(pw, h))
    with serving(web_config=web_config(tmp_path, {"prom": "s3cret"})) as server:
        assert server.scheme == "https"
        for _ in range(5):
            assert https_get(server.port, cert, ("prom", "s3cret"))[::2] == (200, BODY)
        assert len(calls) == 1, "good credentials were checked with bcrypt more than once"

        status, headers, _ = https_get(server.port, cert, ("prom", "wrong"))
        assert status == 401 and headers["www-authenticate"] == "Basic"
        assert https_get(server.port, cert, None)[0] == 401
        assert https_get(server.port, cert, ("nobody", "s3cret"))[0] == 401

        # Plain HTTP to the TLS port gets nowhere; a client that never starts its handshake is
        # closed after the request deadline, like a silent plain-HTTP client.
        plain = http.client.HTTPConnection("127.0.0.1", server.port, timeout=3)
        with pytest.raises((http.client.HTTPException, OSError)):
            plain.request("GET", "/metrics")
            plain.getresponse()
        plain.close()
        silent = socket.create_connection(("127.0.0.1", server.port))
        assert closed_within(silent, 5) is not None
        silent.close()


def test_cache_keys_hold_no_password() -> None:
    auth = basic_auth.BasicAuth({"u": bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4))})
    assert auth.check("u", "pw") and auth.cached("u", "pw")
    assert not auth.cached("u", "other") and not auth.check("u", "other")
    assert all(b"pw" not in key for key in auth._ok)
    assert basic_auth.parse_header("Basic dTpwdw==") == ("u", "pw")
    assert basic_auth.parse_header("Bearer x") is None
    assert basic_auth.parse_header("Basic !!!") is None


def test_prometheus_scrapes_the_agent_over_tls_with_basic_auth(
    tmp_path: Path, tls_files: tuple[Path, Path]
) -> None:
    """The real agent with GPUTEL_WEB_CONFIG; Prometheus with the right and a wrong password."""
    cert, _key = tls_files
    config = web_config(tmp_path, {"prometheus": "right-password"})
    port = free_port()
    env = {
        **os.environ,
        "GPUTEL_BACKEND": "sim",
        "GPUTEL_SIM_GPUS": "1",
        "GPUTEL_LOG_DIR": str(tmp_path / "log"),
        "GPUTEL_RUN_DIR": str(tmp_path / "run"),
        "GPUTEL_EXPORTER_ADDR": "127.0.0.1",
        "GPUTEL_EXPORTER_PORT": str(port),
        "GPUTEL_WEB_CONFIG": str(config),
    }
    agent_log = tmp_path / "agent.log"
    agent = subprocess.Popen(
        [sys.executable, "-m", "gputel", "agent"],
        env=env,
        stdout=agent_log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    tls = {"ca_file": str(cert)}

    def job(name: str, password: str) -> dict[str, Any]:
        return {
            "job_name": name,
            "scheme": "https",
            "tls_config": tls,
            "basic_auth": {"username": "prometheus", "password": password},
            "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
        }

    try:
        with prometheus(tmp_path, [job("good", "right-password"), job("bad", "wrong")]) as prom:

            def logs() -> str:
                return prom.logs() + "\n--- agent log ---\n" + agent_log.read_text()[-3000:]

            wait_for(
                "both targets scraped",
                lambda: (
                    all(t["lastScrape"][:4] != "0001" for t in prom.targets().values())
                    and len(prom.targets()) == 2
                ),
                30,
                logs,
            )
            wait_for("the good job up", lambda: prom.targets()["good"]["health"] == "up", 15, logs)
            targets = prom.targets()
            assert targets["bad"]["health"] == "down"
            assert "401" in targets["bad"]["lastError"], targets["bad"]
            assert prom.value('up{job="good"}') == 1
            assert prom.value('up{job="bad"}') == 0
            assert prom.value('gputel_telemetry_active{job="good"}') is not None
    finally:
        agent.terminate()
        try:
            agent.wait(15)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
