"""A small HTTP(S) server for ``/metrics`` and ``/healthz``, shared by the recorder and the agent.

It only serves bytes that someone else rendered: ``metrics()`` must return pre-rendered exposition
bytes and ``health()`` a cached verdict, so a scrape can never block on NVML or the disk.

One thread serves every connection from a readiness loop (``selectors``), so a waiting client
costs a file descriptor and a few kilobytes, never a thread or a slot that a scraper needs:

- a new connection has ``REQUEST_TIMEOUT_S`` (2 s) for its TLS handshake, request line and
  headers, however it dribbles them in; then it is closed;
- a keep-alive connection gets ``KEEPALIVE_IDLE_S`` to start its next request, then the same
  2 s to finish it;
- a response must be taken within ``RESPONSE_TIMEOUT_S``;
- at ``MAX_CONNECTIONS`` a new connection closes the one that has waited longest for a request,
  so a flood of idle sockets cannot lock a scraper out, it only churns itself.

Request heads are capped at ``MAX_HEAD_BYTES``; responses reference the rendered bytes (gzip, when
asked for, is computed once per rendering). With a web config (:mod:`gputel.telemetry.webconfig`)
it speaks TLS (the handshake runs non-blocking inside the loop) and asks for basic auth; bcrypt
runs on one helper thread so a password guess cannot stall the loop, and good credentials are
cached (:mod:`gputel.telemetry.basic_auth`). Access logging is off (Prometheus scrapes every few
seconds; the journal is for problems).

Usage::

    server = MetricsServer("0.0.0.0", 9118, metrics=lambda: latest, health=lambda: (True, "ok"))
    server.start()          # binds; raises OSError (e.g. EADDRINUSE) with the address in it
    server.port             # the bound port (useful with port 0 in tests: an ephemeral port)
    server.stop()

Port 0 here means "any free port"; ``GPUTEL_EXPORTER_PORT=0`` (exporter disabled) is the
caller's decision not to build a server at all.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import gzip
import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from gputel.telemetry.basic_auth import BasicAuth, parse_header
from gputel.telemetry.promtext import CONTENT_TYPE
from gputel.telemetry.webconfig import WebConfig, load

log = logging.getLogger("gputel.http")


MetricsFn = Callable[[], bytes]
HealthFn = Callable[[], "tuple[bool, str]"]

#: From accept to the end of the request head (TLS handshake included). A scraper needs
#: milliseconds; anything slower is a stuck or hostile client.
REQUEST_TIMEOUT_S = 2.0
#: How long a keep-alive connection may sit between requests. Prometheus reconnects when it finds
#: the connection closed, so this only trades a reconnect for a descriptor held by nobody.
KEEPALIVE_IDLE_S = 5.0
#: From the first byte of a response to its last: generous for a large body on a slow link.
RESPONSE_TIMEOUT_S = 10.0
#: Request line plus headers; Prometheus sends about 300 bytes.
MAX_HEAD_BYTES = 16384
#: Open connections at once; at the limit the longest-waiting idle one is closed for a new one.
MAX_CONNECTIONS = 512
#: Password checks (bcrypt) queued at once; more get 503 rather than a growing queue.
MAX_PENDING_AUTH = 16
#: Bodies smaller than this are sent uncompressed even when gzip is accepted.
GZIP_MIN_BYTES = 1024
_READ_CHUNK = 16384
_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}
_TEXT = "text/plain; charset=utf-8"


class _Conn:
    """One client connection and where it stands."""

    __slots__ = (
        "deadline",
        "events",
        "handshaking",
        "inbuf",
        "keep_alive",
        "out",
        "sock",
        "state",
        "waiting_since",
        "want",
    )

    def __init__(self, sock: socket.socket, now: float, handshaking: bool) -> None:
        self.sock = sock
        self.handshaking = handshaking
        self.inbuf = bytearray()
        self.out: collections.deque[memoryview] = collections.deque()
        #: "read" (waiting for a request), "auth" (password being checked), "write".
        self.state = "read"
        self.deadline = now + REQUEST_TIMEOUT_S
        self.waiting_since = now
        self.keep_alive = False
        #: The event TLS asked for (a read may need a write and back); None = the state's own.
        self.want: int | None = None
        #: The events the selector watches for it now (0 = not registered).
        self.events = 0


class _Request:
    __slots__ = ("accept_gzip", "headers", "keep_alive", "method", "path", "version")

    def __init__(self, method: str, path: str, version: str, headers: dict[str, str]) -> None:
        self.method = method
        self.path = path
        self.version = version
        self.headers = headers
        connection = {t.strip().lower() for t in headers.get("connection", "").split(",")}
        if version == "HTTP/1.1":
            self.keep_alive = "close" not in connection
        else:
            self.keep_alive = "keep-alive" in connection
        if "content-length" in headers and headers["content-length"].strip() != "0":
            self.keep_alive = False  # a body we do not read would be taken for the next request
        if "transfer-encoding" in headers:
            self.keep_alive = False
        self.accept_gzip = _accepts_gzip(headers.get("accept-encoding", ""))


def _accepts_gzip(value: str) -> bool:
    for item in value.split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() != "gzip":
            continue
        q = params.strip().lower()
        return not (q.startswith("q=") and q[2:].strip() in ("0", "0.0", "0.00", "0.000"))
    return False


def _parse_head(head: bytes) -> _Request | int:
    """The request, or the status code to refuse it with."""
    lines = head.split(b"\n")
    parts = lines[0].rstrip(b"\r").split(b" ")
    if len(parts) != 3:
        return 400
    method, target, version = (p.decode("latin-1") for p in parts)
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        return 505 if version.startswith("HTTP/") else 400
    headers: dict[str, str] = {}
    for raw in lines[1:]:
        line = raw.rstrip(b"\r").decode("latin-1")
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            return 400
        key = name.lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return _Request(method, target.split("?", 1)[0], version, headers)


def _head_end(buf: bytearray) -> tuple[int, int] | None:
    """Where the request head in ``buf`` ends and the length of its blank line, or None."""
    ends = [(i, n) for i, n in ((buf.find(b"\r\n\r\n"), 4), (buf.find(b"\n\n"), 2)) if i >= 0]
    return min(ends) if ends else None


def _has_head(buf: bytearray) -> bool:
    """Whether ``buf`` holds a whole request head (or more than a head may be)."""
    return len(buf) > MAX_HEAD_BYTES or _head_end(buf) is not None


def _family(addr: str) -> socket.AddressFamily:
    if addr == "localhost":
        return socket.AF_INET
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


class MetricsServer:
    """Serves ``metrics()`` on ``/metrics`` and ``health()`` on ``/healthz`` from one thread."""

    def __init__(
        self,
        addr: str,
        port: int,
        metrics: MetricsFn,
        health: HealthFn,
        *,
        web_config: str | Path | WebConfig | None = None,
        poll_interval: float = 0.5,
        max_connections: int = MAX_CONNECTIONS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        #: The longest the loop sleeps without an event; deadlines are met to within this.
        self.poll_interval = poll_interval
        self.addr = addr
        self._requested_port = port
        self._metrics = metrics
        self._health = health
        if isinstance(web_config, (str, Path)):
            web_config = load(web_config) if str(web_config) else None
        self.web_config = web_config
        self._tls = web_config.ssl_context if web_config else None
        self._auth = BasicAuth(web_config.users) if web_config and web_config.users else None
        self._max_connections = max_connections
        self._clock = clock
        self._bound_port: int | None = None
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._conns: dict[int, _Conn] = {}
        self._selector: selectors.BaseSelector | None = None
        self._checker: ThreadPoolExecutor | None = None
        self._checked: collections.deque[tuple[_Conn, _Request, bool]] = collections.deque()
        self._pending_auth = 0
        self._gzip_src: bytes | None = None
        self._gzip_out = b""
        self._at_limit = False

    @property
    def port(self) -> int:
        """The bound port once started (the requested one before)."""
        return self._requested_port if self._bound_port is None else self._bound_port

    @property
    def scheme(self) -> str:
        return "https" if self._tls else "http"

    def start(self) -> None:
        family = _family(self.addr)
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # "::" should also accept IPv4 clients, as node_exporter's does.
                with contextlib.suppress(OSError):
                    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            listener.bind((self.addr, self._requested_port))
            listener.listen(128)
        except OSError as exc:
            listener.close()
            raise OSError(
                exc.errno,
                f"cannot serve /metrics on {self.addr}:{self._requested_port}: "
                f"{exc.strerror or exc}",
            ) from None
        listener.setblocking(False)
        self._listener = listener
        self._bound_port = int(listener.getsockname()[1])
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ, "listen")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        if self._auth is not None:
            self._checker = ThreadPoolExecutor(1, thread_name_prefix="metrics-auth")
        self._stopping.clear()
        self._thread = threading.Thread(target=self._serve, name="metrics-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stopping.set()
        self._wake()
        thread.join(timeout=2)
        if self._checker is not None:
            self._checker.shutdown(wait=False, cancel_futures=True)
            self._checker = None
        for conn in list(self._conns.values()):
            self._close(conn)
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        if self._selector is not None:
            self._selector.close()
        self._listener = self._wake_r = self._wake_w = None
        self._selector = None

    def __enter__(self) -> MetricsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------- the loop
    def _wake(self) -> None:
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")

    def _serve(self) -> None:
        selector = self._selector
        assert selector is not None
        while not self._stopping.is_set():
            now = self._clock()
            timeout = self.poll_interval
            for conn in list(self._conns.values()):
                if conn.deadline <= now:
                    self._close(conn)
                else:
                    timeout = min(timeout, conn.deadline - now)
            try:
                events = selector.select(max(timeout, 0.0))
            except OSError as exc:  # pragma: no cover - a broken selector is not recoverable
                log.error("/metrics server stopped: %s", exc)
                return
            for key, _mask in events:
                try:
                    if key.data == "listen":
                        self._accept()
                    elif key.data == "wake":
                        with contextlib.suppress(OSError):
                            key.fileobj.recv(4096)  # type: ignore[union-attr]
                    else:
                        self._ready(key.data)
                except Exception as exc:
                    log.warning("/metrics connection error: %s", exc)
                    if isinstance(key.data, _Conn):
                        self._close(key.data)
            while self._checked:
                conn, request, ok = self._checked.popleft()
                self._pending_auth -= 1
                if conn.state == "auth":
                    conn.state = "read"
                    self._step(conn, functools.partial(self._authorized, request=request, ok=ok))

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(64):
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: the next loop tries again
                log.warning("/metrics cannot accept: %s", exc)
                return
            now = self._clock()
            if len(self._conns) >= self._max_connections and not self._evict(now):
                sock.close()
                continue
            sock.setblocking(False)
            # Headers and body go out as separate writes (and TLS adds its own records after
            # the handshake): without this, Nagle holds the last one for the client's delayed
            # ACK, 40 ms a scrape. Go's servers do the same.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is not None:
                try:
                    sock = self._tls.wrap_socket(
                        sock, server_side=True, do_handshake_on_connect=False
                    )
                except (OSError, ValueError):
                    sock.close()
                    continue
            conn = _Conn(sock, now, handshaking=self._tls is not None)
            self._conns[sock.fileno()] = conn
            self._listen_for(conn)

    def _evict(self, now: float) -> bool:
        """Make room by closing the connection that has waited longest for a request."""
        waiting = [c for c in self._conns.values() if c.state == "read"]
        if not waiting:
            return False
        if not self._at_limit:
            self._at_limit = True
            log.warning(
                "%d connections to /metrics at once; closing the longest idle ones",
                self._max_connections,
            )
        self._close(min(waiting, key=lambda c: c.waiting_since))
        return True

    def _close(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if fd >= 0 and self._conns.get(fd) is conn:
            del self._conns[fd]
        if conn.events and self._selector is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._selector.unregister(conn.sock)
            conn.events = 0
        conn.state = "closed"
        conn.out.clear()
        with contextlib.suppress(OSError):
            conn.sock.close()
        if len(self._conns) < self._max_connections // 2:
            self._at_limit = False

    def _listen_for(self, conn: _Conn) -> None:
        """Register for the event this connection waits on (none while its password is checked)."""
        if conn.state == "auth":
            events = 0
        elif conn.want is not None:
            events = conn.want
        else:
            events = selectors.EVENT_WRITE if conn.state == "write" else selectors.EVENT_READ
        if events == conn.events:
            return
        assert self._selector is not None
        if conn.events == 0:
            self._selector.register(conn.sock, events, conn)
        elif events == 0:
            self._selector.unregister(conn.sock)
        else:
            self._selector.modify(conn.sock, events, conn)
        conn.events = events

    def _ready(self, conn: _Conn) -> None:
        if conn.state == "write":
            self._step(conn, self._write)
        else:
            self._step(conn, self._read)

    def _step(self, conn: _Conn, action: Callable[[_Conn], None]) -> None:
        """Run one action on a connection, then any requests already buffered (pipelining)."""
        conn.want = None
        try:
            if conn.handshaking:
                assert isinstance(conn.sock, ssl.SSLSocket)
                conn.sock.do_handshake()
                conn.handshaking = False
            action(conn)
            while conn.state == "read" and _has_head(conn.inbuf):
                self._next_request(conn)
        except ssl.SSLWantReadError:
            conn.want = selectors.EVENT_READ
        except ssl.SSLWantWriteError:
            conn.want = selectors.EVENT_WRITE
        except OSError:  # ssl.SSLError included: a failed handshake, a reset
            self._close(conn)
            return
        if conn.state != "closed":
            self._listen_for(conn)

    def _read(self, conn: _Conn) -> None:
        if conn.state != "read":
            return
        while True:
            try:
                chunk = conn.sock.recv(_READ_CHUNK)
            except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                return  # what arrived so far is in inbuf; _step serves a whole head
            if not chunk:
                self._close(conn)
                return
            if not conn.inbuf:
                # The first byte of a request: from now on the request deadline applies.
                conn.deadline = min(conn.deadline, self._clock() + REQUEST_TIMEOUT_S)
            conn.inbuf += chunk
            if len(conn.inbuf) > MAX_HEAD_BYTES:
                return
            if not isinstance(conn.sock, ssl.SSLSocket) or conn.sock.pending() == 0:
                return

    def _next_request(self, conn: _Conn) -> None:
        found = _head_end(conn.inbuf)
        if found is None or found[0] > MAX_HEAD_BYTES:
            if len(conn.inbuf) > MAX_HEAD_BYTES:
                self._respond(conn, None, 431, _TEXT, b"request head too large\n", close=True)
            return
        end, size = found
        head = bytes(conn.inbuf[:end])
        del conn.inbuf[: end + size]
        parsed = _parse_head(head)
        if isinstance(parsed, int):
            self._respond(conn, None, parsed, _TEXT, b"bad request\n", close=True)
            return
        if self._auth is not None:
            creds = parse_header(parsed.headers.get("authorization"))
            if creds is None:
                self._authorized(conn, request=parsed, ok=False)
            elif self._auth.cached(*creds):
                self._authorized(conn, request=parsed, ok=True)
            elif self._pending_auth >= MAX_PENDING_AUTH or self._checker is None:
                self._respond(conn, parsed, 503, _TEXT, b"busy checking passwords\n", close=True)
            else:
                conn.state = "auth"
                self._pending_auth += 1
                future = self._checker.submit(self._auth.check, *creds)
                future.add_done_callback(lambda f: self._check_done(conn, parsed, f))
            return
        self._authorized(conn, request=parsed, ok=True)

    def _check_done(self, conn: _Conn, request: _Request, future: Future[bool]) -> None:
        """On the checker thread: hand the verdict to the loop."""
        ok = (not future.cancelled()) and future.exception() is None and future.result()
        self._checked.append((conn, request, bool(ok)))
        self._wake()

    def _authorized(self, conn: _Conn, *, request: _Request, ok: bool) -> None:
        if not ok:
            self._respond(
                conn,
                request,
                401,
                _TEXT,
                b"Unauthorized\n",
                extra=("WWW-Authenticate: Basic",),
            )
            return
        if request.method not in ("GET", "HEAD"):
            self._respond(
                conn,
                request,
                405,
                _TEXT,
                b"method not allowed\n",
                close=True,
                extra=("Allow: GET, HEAD",),
            )
            return
        self._route(conn, request)

    def _route(self, conn: _Conn, request: _Request) -> None:
        path = request.path
        encoding = None
        try:
            if path == "/metrics":
                status, ctype, data = 200, CONTENT_TYPE, self._metrics()
                if request.accept_gzip and len(data) >= GZIP_MIN_BYTES:
                    data, encoding = self._gzipped(data), "gzip"
            elif path == "/healthz":
                ok, text = self._health()
                status = 200 if ok else 503
                ctype, data = _TEXT, (text.rstrip("\n") + "\n").encode()
            elif path == "/":
                status, ctype = 200, "text/html; charset=utf-8"
                data = b'<html><body><a href="/metrics">/metrics</a></body></html>\n'
            else:
                status, ctype, data = 404, _TEXT, b"not found\n"
        except Exception as exc:
            log.warning("error serving %s: %s", path, exc)
            status, ctype, data = 500, _TEXT, b"internal error\n"
        extra = ("Content-Encoding: gzip", "Vary: Accept-Encoding") if encoding else ()
        self._respond(conn, request, status, ctype, data, extra=extra)

    def _gzipped(self, data: bytes) -> bytes:
        """gzip of the latest rendering, compressed once however many scrapes ask for it."""
        if data is not self._gzip_src:
            self._gzip_out = gzip.compress(data, compresslevel=6, mtime=0)
            self._gzip_src = data
        return self._gzip_out

    def _respond(
        self,
        conn: _Conn,
        request: _Request | None,
        status: int,
        ctype: str,
        body: bytes,
        *,
        close: bool = False,
        extra: tuple[str, ...] = (),
    ) -> None:
        keep_alive = request is not None and request.keep_alive and not close
        lines = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
            "Server: gputel",
            f"Content-Type: {ctype}",
            f"Content-Length: {len(body)}",
            *extra,
        ]
        if not keep_alive:
            lines.append("Connection: close")
        elif request is not None and request.version == "HTTP/1.0":
            lines.append("Connection: keep-alive")
        conn.out.append(memoryview(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")))
        if body and (request is None or request.method != "HEAD"):
            conn.out.append(memoryview(body))
        conn.keep_alive = keep_alive
        conn.state = "write"
        conn.deadline = self._clock() + RESPONSE_TIMEOUT_S
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        while conn.out:
            try:
                sent = conn.sock.send(conn.out[0])
            except (BlockingIOError, InterruptedError):
                return
            if sent < len(conn.out[0]):
                conn.out[0] = conn.out[0][sent:]
                return
            conn.out.popleft()
        if not conn.keep_alive:
            self._close(conn)
            return
        now = self._clock()
        conn.state = "read"
        conn.deadline = now + KEEPALIVE_IDLE_S
        conn.waiting_since = now
        if conn.inbuf:  # a pipelined request is already here: _step serves it
            conn.deadline = now + REQUEST_TIMEOUT_S
