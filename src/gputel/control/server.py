"""The control socket: how the CLI and the hooks talk to the running agent.

One Unix stream socket in the run directory (``control.sock``, mode 0660, group of the run
directory). A client sends one JSON object on one line (at most 64 KiB); the server answers one
JSON object on one line and closes. Every reply has ``"ok"``; a failure has ``"error"`` and
changed nothing. The server validates the shape of every request before the agent's handler sees
it, so the handler only ever gets well-typed requests with optional fields filled in.

Each connection is served on its own short-lived thread with a total read deadline, so a client
that connects and never writes (or drips one byte a second) costs a thread for two seconds and
never delays other clients or the agent's loop. Handler calls are serialised by a lock: the
agent's handler never runs concurrently with itself.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import selectors
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from gputel.control.protocol import (
    MAX_CONNECTIONS,
    MAX_MESSAGE_BYTES,
    READ_TIMEOUT_S,
    SOCKET_MODE,
    ControlSocketInUse,
    ErrorCode,
    Handler,
    RequestError,
    encode_line,
    error_reply,
    validate_request,
)

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
    ) -> None:
        self.socket_path = Path(socket_path)
        self.handler = handler
        self.read_timeout = read_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        self._handler_lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._identity: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._stopping = threading.Event()

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
        self._stopping.clear()
        self._thread = threading.Thread(target=self._serve, name="gputel-control", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        """Stop accepting, remove our socket (never another agent's), wait for the loop."""
        self._stopping.set()
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
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
            sock.listen(64)
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

    # -- serving
    def _serve(self) -> None:
        assert self._sock is not None and self._wake_r is not None
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping.is_set():
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r or self._stopping.is_set():
                        return
                    self._accept_ready()
        except Exception:
            log.exception("control socket loop failed; the control socket is down")
        finally:
            sel.close()

    def _accept_ready(self) -> None:
        assert self._sock is not None
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("control socket: cannot accept: %s", exc.strerror)
                    time.sleep(0.05)
                    return
                raise
            if not self._slots.acquire(blocking=False):
                self._reply_and_close(
                    conn, error_reply("agent busy: too many control connections", ErrorCode.BUSY)
                )
                continue
            try:
                threading.Thread(
                    target=self._connection, args=(conn,), name="gputel-control-conn", daemon=True
                ).start()
            except RuntimeError:
                self._slots.release()
                self._reply_and_close(
                    conn, error_reply("agent busy: cannot start a thread", ErrorCode.BUSY)
                )

    def _connection(self, conn: socket.socket) -> None:
        try:
            reply = self._answer(conn)
            self._reply_and_close(conn, reply)
        except Exception:
            log.exception("control connection failed")
            with contextlib.suppress(OSError):
                conn.close()
        finally:
            self._slots.release()

    def _read_line(self, conn: socket.socket) -> bytes | dict[str, Any]:
        """The request line, or an error reply when it is too long or too slow."""
        deadline = time.monotonic() + self.read_timeout
        buf = bytearray()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return error_reply(f"no complete request line within {self.read_timeout:g}s")
            conn.settimeout(remaining)
            try:
                chunk = conn.recv(8192)
            except TimeoutError:
                return error_reply(f"no complete request line within {self.read_timeout:g}s")
            if not chunk:
                return bytes(buf)
            nl = chunk.find(b"\n")
            if nl >= 0:
                buf += chunk[:nl]
                if len(buf) > MAX_MESSAGE_BYTES:
                    break
                return bytes(buf)
            buf += chunk
            if len(buf) > MAX_MESSAGE_BYTES:
                break
        return error_reply(f"request longer than {MAX_MESSAGE_BYTES} bytes")

    def _answer(self, conn: socket.socket) -> dict[str, Any]:
        line = self._read_line(conn)
        if isinstance(line, dict):
            return line
        if not line.strip():
            return error_reply("empty request")
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            return error_reply("request is not valid JSON")
        try:
            request = validate_request(message)
        except RequestError as exc:
            return error_reply(str(exc))
        if self._stopping.is_set():
            return error_reply("agent is shutting down", ErrorCode.SHUTTING_DOWN)
        try:
            with self._handler_lock:
                result = self.handler(request)
        except RequestError as exc:
            return error_reply(str(exc), exc.code)
        except Exception as exc:
            log.exception("control handler failed on op %s", request["op"])
            return error_reply(
                f"internal error in op {request['op']}: {type(exc).__name__}: {exc}",
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

    @staticmethod
    def _reply_and_close(conn: socket.socket, reply: dict[str, Any]) -> None:
        try:
            try:
                data = encode_line(reply)
            except (TypeError, ValueError) as exc:
                log.error("control reply is not JSON serialisable: %s", exc)
                data = encode_line(
                    error_reply(
                        f"internal error: reply not serialisable: {exc}", ErrorCode.INTERNAL
                    )
                )
            conn.settimeout(READ_TIMEOUT_S)
            conn.sendall(data)
        except OSError:
            pass  # the client went away; nothing to tell it
        finally:
            with contextlib.suppress(OSError):
                conn.close()
