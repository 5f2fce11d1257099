"""A small HTTP server for ``/metrics`` and ``/healthz``, shared by the recorder and the agent.

It only serves bytes that someone else rendered: ``metrics()`` must return pre-rendered exposition
bytes and ``health()`` a cached verdict, so a scrape can never block on NVML or the disk. Requests
run on daemon threads, so a slow client cannot hold up shutdown. Access logging is off (Prometheus
scrapes every few seconds; the journal is for problems).

Usage::

    server = MetricsServer("0.0.0.0", 9118, metrics=lambda: latest, health=lambda: (True, "ok"))
    server.start()          # binds; raises OSError (e.g. EADDRINUSE) with the address in it
    server.port             # the bound port (useful with port 0 in tests: an ephemeral port)
    server.stop()

Port 0 here means "any free port"; ``GPUTEL_EXPORTER_PORT=0`` (exporter disabled) is the
caller's decision not to build a server at all.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from gputel.telemetry.promtext import CONTENT_TYPE

log = logging.getLogger("gputel.http")


MetricsFn = Callable[[], bytes]
HealthFn = Callable[[], "tuple[bool, str]"]


#: Seconds one request may take from the moment the server waits for it to the end of the
#: response. A scraper needs milliseconds; a client that connects and idles, or drips a byte
#: now and then, must not hold a thread and a file descriptor of the agent for longer.
CLIENT_TIMEOUT_S = 10.0
#: Connections served at once; more are closed straight away (Prometheus needs one).
MAX_CONNECTIONS = 32


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    metrics: MetricsFn
    health: HealthFn

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._refusing = False

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            if not self._refusing:
                self._refusing = True
                log.warning(
                    "more than %d connections to /metrics at once; refusing the excess",
                    MAX_CONNECTIONS,
                )
            self.shutdown_request(request)
            return
        self._refusing = False
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # "::" should also accept IPv4 clients, as node_exporter's does.
            with contextlib.suppress(OSError):
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = CLIENT_TIMEOUT_S
    protocol_version = "HTTP/1.1"
    server_version = "gputel"
    sys_version = ""

    def handle_one_request(self) -> None:
        # The socket timeout bounds each read, not the request: a deadline for the whole of it.
        timer = threading.Timer(self.timeout, self._cut_off)
        timer.daemon = True
        timer.start()
        try:
            super().handle_one_request()
        finally:
            timer.cancel()

    def _cut_off(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def do_GET(self) -> None:
        self._respond(body=True)

    def do_HEAD(self) -> None:
        self._respond(body=False)

    def _respond(self, body: bool) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                status, ctype, data = 200, CONTENT_TYPE, self.server.metrics()
            elif path == "/healthz":
                ok, text = self.server.health()
                status = 200 if ok else 503
                ctype, data = "text/plain; charset=utf-8", (text.rstrip("\n") + "\n").encode()
            elif path == "/":
                status, ctype = 200, "text/html; charset=utf-8"
                data = b'<html><body><a href="/metrics">/metrics</a></body></html>\n'
            else:
                status, ctype, data = 404, "text/plain; charset=utf-8", b"not found\n"
        except Exception as exc:
            log.warning("error serving %s: %s", path, exc)
            status, ctype, data = 500, "text/plain; charset=utf-8", b"internal error\n"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        return


def _family(addr: str) -> socket.AddressFamily:
    if addr == "localhost":
        return socket.AF_INET
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


class MetricsServer:
    """Serves ``metrics()`` on ``/metrics`` and ``health()`` on ``/healthz`` from a thread."""

    def __init__(
        self,
        addr: str,
        port: int,
        metrics: MetricsFn,
        health: HealthFn,
        *,
        poll_interval: float = 0.5,
    ) -> None:
        #: How often the idle server thread wakes to check for stop(); stop() waits up to this.
        self.poll_interval = poll_interval
        self.addr = addr
        self._requested_port = port
        self._metrics = metrics
        self._health = health
        self._server: _Server | None = None
        self._bound_port: int | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port once started (the requested one before)."""
        return self._requested_port if self._bound_port is None else self._bound_port

    def start(self) -> None:
        family = _family(self.addr)
        cls = type("_BoundServer", (_Server,), {"address_family": family})
        try:
            server = cls((self.addr, self._requested_port), _Handler)
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"cannot serve /metrics on {self.addr}:{self._requested_port}: "
                f"{exc.strerror or exc}",
            ) from None
        server.metrics = self._metrics
        server.health = self._health
        self._server = server
        self._bound_port = int(server.server_address[1])
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": self.poll_interval},
            name="metrics-http",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None

    def __enter__(self) -> MetricsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
