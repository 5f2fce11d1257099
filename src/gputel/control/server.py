"""The control socket: how the CLI and the hooks talk to the running agent.

One Unix stream socket in the run directory (``control.sock``, mode 0660, group of the run
directory). A client sends one JSON object on one line (at most 64 KiB); the server answers one
JSON object on one line and closes. Every reply has ``"ok"``; a failure has ``"error"`` and
changed nothing. The server validates the shape of every request before the agent's handler sees
it, so the handler only ever gets well-typed requests with optional fields filled in.

One thread serves every connection from a readiness loop (``selectors``): a connection waiting
for its request costs a file descriptor and a buffer, not a thread, and has ``READ_TIMEOUT_S``
(1 s) from connecting to the end of its request line. Any number of clients may connect and send
nothing: beyond ``MAX_CONNECTIONS`` waiting ones, the one that has waited longest is closed, so
idle connections only push each other out while a real client (which sends its request as it
connects) is read at once. Complete requests go to one handler thread, in order: the agent's
handler never runs concurrently with itself and never blocks the reading of other requests;
when ``MAX_PENDING`` requests already wait for it, more are answered ``busy`` (the hook client
asks again within its budget). Replies are written without blocking, within
``REPLY_TIMEOUT_S``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import queue
import selectors
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gputel.control.protocol import (
    MAX_CONNECTIONS,
    MAX_MESSAGE_BYTES,
    MAX_PENDING,
    READ_TIMEOUT_S,
    REPLY_TIMEOUT_S,
    SOCKET_MODE,
    ControlSocketInUse,
    ErrorCode,
    Handler,
    RequestError,
    encode_line,
    error_reply,
    validate_request,
)
from gputel.formats import error_line

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- server
def _probe(path: Path, timeout: float = 0.5) -> bool:
    """Whether something accepts connections on ``path`` (used before replacing a stale socket)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
    except OSError as exc:
        if isinstance(exc, (ConnectionRefusedError, FileNotFoundError)):
            return False
        if isinstance(exc, (TimeoutError, BlockingIOError)):
            return True  # a backlog that is full belongs to a live listener
        raise
    else:
        return True
    finally:
        s.close()


@dataclass(eq=False)
class _Conn:
    """One client connection: what it sent so far, or what is left of its reply."""

    sock: socket.socket
    deadline: float
    """Monotonic time by which the request line (reading) or the reply (writing) must be done."""
    buf: bytearray = field(default_factory=bytearray)
    out: memoryview | None = None


class ControlServer:
    """Serves the control socket on background threads until :meth:`stop`.

    ``handler`` receives a validated request (see :func:`validate_request`) and returns the
    reply object; ``"ok": true`` is added when it does not say. It may raise :class:`RequestError`
    to refuse with a message; any other exception becomes an "internal error" reply and is logged,
    and the server keeps serving.
    """

    def __init__(
        self,
        socket_path: Path,
        handler: Handler,
        *,
        read_timeout: float = READ_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
        max_pending: int = MAX_PENDING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.handler = handler
        self.read_timeout = read_timeout
        self.max_connections = max(1, max_connections)
        self.max_pending = max(1, max_pending)
        self._clock = clock
        self._sock: socket.socket | None = None
        self._identity: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._worker: threading.Thread | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._stopping = threading.Event()
        # Owned by the serving thread:
        self._sel: selectors.BaseSelector | None = None
        self._reading: dict[int, _Conn] = {}
        """Connections waiting for their request line, oldest first."""
        self._writing: dict[int, _Conn] = {}
        self._pending = 0
        # Shared with the handler thread:
        self._requests: queue.SimpleQueue[tuple[_Conn, dict[str, Any]] | None] = queue.SimpleQueue()
        self._done: queue.SimpleQueue[tuple[_Conn, dict[str, Any]]] = queue.SimpleQueue()

    # -- lifecycle
    def start(self) -> None:
        """Bind and listen, then serve on a daemon thread.

        Raises ControlSocketInUse when another agent answers on the path, and OSError (with a
        message naming the path) when the socket cannot be created.
        """
        if self._thread is not None:
            raise RuntimeError("control server already started")
        self._sock = self._bind()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stopping.clear()
        self._worker = threading.Thread(
            target=self._handle_requests, name="gputel-control-handler", daemon=True
        )
        self._worker.start()
        self._thread = threading.Thread(target=self._serve, name="gputel-control", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop accepting, remove our socket (never another agent's), wait for the loop."""
        self._stopping.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._worker is not None:
            self._requests.put(None)
            self._worker.join(timeout)
            self._worker = None
        while True:  # answers the serving thread did not get to send
            try:
                conn, _ = self._done.get_nowait()
            except queue.Empty:
                break
            with contextlib.suppress(OSError):
                conn.sock.close()
        for s in (self._sock, self._wake_r, self._wake_w):
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()
        self._sock = self._wake_r = self._wake_w = None
        self._unlink_own()

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- socket creation
    def _bind(self) -> socket.socket:
        path = self.socket_path
        parent = path.parent
        if len(os.fsencode(str(path))) > 107:
            raise OSError(
                errno.ENAMETOOLONG,
                f"control socket path {path} is longer than 107 bytes; use a shorter "
                "GPUTEL_RUN_DIR",
            )
        try:
            return self._bind_at(path, parent)
        except (ControlSocketInUse, RuntimeError):
            raise
        except OSError as exc:
            if exc.filename is None and str(path) not in str(exc):
                raise OSError(
                    exc.errno, f"cannot create control socket {path}: {exc.strerror or exc}"
                ) from None
            raise

    def _bind_at(self, path: Path, parent: Path) -> socket.socket:
        self._remove_stale(path)
        # Bind inside a fresh 0700 directory, set mode and group there, then rename into place:
        # nobody can connect before the socket is 0660, and the process-wide umask is left alone
        # (changing it would race with other threads creating files).
        private = Path(tempfile.mkdtemp(prefix=".c", dir=parent))
        tmp = private / "s"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(tmp))
            os.chmod(tmp, SOCKET_MODE)
            gid = parent.stat().st_gid
            if os.stat(tmp).st_gid != gid:
                try:
                    os.chown(tmp, -1, gid)
                except PermissionError:
                    log.warning(
                        "cannot give control socket %s the group of its directory (gid %d); "
                        "only our own group can connect",
                        path,
                        gid,
                    )
            sock.listen(512)  # bursts of connections wait here, not in EAGAIN
            os.rename(tmp, path)
            st = os.stat(path)
            self._identity = (st.st_dev, st.st_ino)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        finally:
            with contextlib.suppress(OSError):
                private.rmdir()
        sock.setblocking(False)
        return sock

    @staticmethod
    def _remove_stale(path: Path) -> None:
        try:
            st = path.lstat()
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(
                errno.EEXIST,
                f"{path} exists and is not a socket; refusing to replace it (remove it by hand)",
            )
        if _probe(path):
            raise ControlSocketInUse(f"another gputel agent answers on {path}")
        log.info("removing stale control socket %s", path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()

    def _unlink_own(self) -> None:
        if self._identity is None:
            return
        try:
            st = os.stat(self.socket_path)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.socket_path)
        except OSError:
            pass
        self._identity = None

    # -- serving (the serving thread)
    def _serve(self) -> None:
        assert self._sock is not None and self._wake_r is not None
        sel = self._sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping.is_set():
                for key, mask in sel.select(self._select_timeout()):
                    if key.fileobj is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                    elif key.fileobj is self._sock:
                        self._accept_ready()
                    elif mask & selectors.EVENT_READ:
                        self._read(key.data)
                    else:
                        self._write(key.data)
                    if self._stopping.is_set():
                        return
                self._take_replies()
                self._expire(self._clock())
        except Exception:
            log.exception("control socket loop failed; the control socket is down")
        finally:
            for conn in [*self._reading.values(), *self._writing.values()]:
                with contextlib.suppress(OSError):
                    conn.sock.close()
            self._reading.clear()
            self._writing.clear()
            self._sel = None
            sel.close()

    def _select_timeout(self) -> float | None:
        deadlines = [c.deadline for c in self._reading.values()]
        deadlines += [c.deadline for c in self._writing.values()]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - self._clock())

    def _accept_ready(self) -> None:
        assert self._sock is not None and self._sel is not None
        while True:
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    if self._reading:
                        self._evict_oldest()
                        continue
                    log.warning("control socket: cannot accept: %s", exc.strerror)
                    time.sleep(0.05)
                    return
                raise
            sock.setblocking(False)
            if len(self._reading) >= self.max_connections:
                self._evict_oldest()
            conn = _Conn(sock, self._clock() + self.read_timeout)
            self._reading[sock.fileno()] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)
            self._read(conn)  # a real client's request is usually there already

    def _evict_oldest(self) -> None:
        fd = next(iter(self._reading))
        conn = self._reading.pop(fd)
        assert self._sel is not None
        self._sel.unregister(conn.sock)
        with contextlib.suppress(OSError):
            conn.sock.send(
                encode_line(
                    error_reply(
                        "agent busy: too many control connections waiting for a request",
                        ErrorCode.BUSY,
                    )
                )
            )
        with contextlib.suppress(OSError):
            conn.sock.close()

    def _read(self, conn: _Conn) -> None:
        eof = False
        while True:
            try:
                chunk = conn.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._drop(conn)
                return
            if not chunk:
                eof = True
                break
            nl = chunk.find(b"\n")
            if nl >= 0:
                conn.buf += chunk[:nl]
                eof = True
                break
            conn.buf += chunk
            if len(conn.buf) > MAX_MESSAGE_BYTES:
                break
        if len(conn.buf) > MAX_MESSAGE_BYTES:
            self._reply(conn, error_reply(f"request longer than {MAX_MESSAGE_BYTES} bytes"))
        elif eof:
            self._dispatch(conn, bytes(conn.buf))

    def _dispatch(self, conn: _Conn, line: bytes) -> None:
        """A complete request line: refuse it here, or queue it for the handler thread."""
        reply = self._refusal(line)
        if isinstance(reply, dict):
            self._reply(conn, reply)
            return
        if self._pending >= self.max_pending:
            self._reply(conn, error_reply("agent busy: too many requests waiting", ErrorCode.BUSY))
            return
        self._forget(conn)
        self._pending += 1
        self._requests.put((conn, reply[0]))

    @staticmethod
    def _refusal(line: bytes) -> dict[str, Any] | tuple[dict[str, Any]]:
        """An error reply for a malformed request, or the validated request (in a tuple)."""
        if not line.strip():
            return error_reply("empty request")
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            return error_reply("request is not valid JSON")
        try:
            return (validate_request(message),)
        except RequestError as exc:
            return error_reply(str(exc))

    def _take_replies(self) -> None:
        while True:
            try:
                conn, reply = self._done.get_nowait()
            except queue.Empty:
                return
            self._pending -= 1
            self._reply(conn, reply)

    def _reply(self, conn: _Conn, reply: dict[str, Any]) -> None:
        """Start sending ``reply``; the rest goes out when the socket is writable."""
        try:
            data = encode_line(reply)
        except (TypeError, ValueError) as exc:
            log.error("control reply is not JSON serialisable: %s", exc)
            data = encode_line(
                error_reply(f"internal error: reply not serialisable: {exc}", ErrorCode.INTERNAL)
            )
        self._forget(conn)
        conn.out = memoryview(data)
        conn.deadline = self._clock() + REPLY_TIMEOUT_S
        self._write(conn)
        if conn.out is not None:
            assert self._sel is not None
            self._writing[conn.sock.fileno()] = conn
            self._sel.register(conn.sock, selectors.EVENT_WRITE, conn)

    def _write(self, conn: _Conn) -> None:
        if conn.out is None:  # already answered and closed earlier in this round
            return
        try:
            while conn.out:
                conn.out = conn.out[conn.sock.send(conn.out) :]
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass  # the client went away; nothing to tell it
        conn.out = None
        self._drop(conn)

    def _expire(self, now: float) -> None:
        for conn in [c for c in self._reading.values() if c.deadline <= now]:
            self._reply(
                conn, error_reply(f"no complete request line within {self.read_timeout:g}s")
            )
        for conn in [c for c in self._writing.values() if c.deadline <= now]:
            self._drop(conn)

    def _forget(self, conn: _Conn) -> None:
        """Stop watching ``conn`` (it is being handled, or about to be answered or closed)."""
        try:
            fd = conn.sock.fileno()
        except OSError:
            return
        if self._reading.pop(fd, None) is not None or self._writing.pop(fd, None) is not None:
            assert self._sel is not None
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(conn.sock)

    def _drop(self, conn: _Conn) -> None:
        self._forget(conn)
        with contextlib.suppress(OSError):
            conn.sock.close()

    def _wake(self) -> None:
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")

    # -- the handler thread
    def _handle_requests(self) -> None:
        while True:
            item = self._requests.get()
            if item is None:
                return
            conn, request = item
            self._done.put((conn, self._answer(request)))
            self._wake()

    def _answer(self, request: dict[str, Any]) -> dict[str, Any]:
        if self._stopping.is_set():
            return error_reply("agent is shutting down", ErrorCode.SHUTTING_DOWN)
        try:
            result = self.handler(request)
        except RequestError as exc:
            return error_reply(str(exc), exc.code)
        except Exception as exc:
            log.exception("control handler failed on op %s", request["op"])
            return error_reply(
                f"internal error in op {request['op']}: {error_line(exc)}",
                ErrorCode.INTERNAL,
            )
        if not isinstance(result, dict):
            log.error("control handler returned %s for op %s", type(result).__name__, request["op"])
            return error_reply(
                f"internal error in op {request['op']}: bad reply", ErrorCode.INTERNAL
            )
        if "ok" not in result:
            result = {"ok": True, **result}
        return result
