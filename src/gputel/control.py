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
import enum
import errno
import grp
import json
import logging
import math
import os
import selectors
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from typing import Any

from gputel.runtime import CONTROL_SOCKET

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024
"""Longest request or reply line, newline excluded."""
READ_TIMEOUT_S = 2.0
"""Total time a client has to send its whole request line."""
MAX_CONNECTIONS = 32
"""Concurrent connections served; more are answered "busy" at once instead of queueing threads."""
MAX_FOR_S = 366 * 86400.0
"""Longest ``for_s`` of ``set_mode``; beyond a year it is a typo, and datetimes would overflow."""
SOCKET_MODE = 0o660

OPS = ("status", "set_mode", "allocate", "release", "list")
MODES = ("on", "off", "auto")

Handler = Callable[[dict[str, Any]], dict[str, Any]]


# ---------------------------------------------------------------------------------- errors
class ControlError(RuntimeError):
    """The agent could not be asked; ``str()`` is one line for the user."""


class AgentUnavailable(ControlError):
    """No agent answers on the socket: none there, nothing listening, or not allowed to connect.

    ``reason`` is ``"missing"`` (no socket), ``"refused"`` (a stale socket, nothing listening),
    ``"permission"`` (the socket exists but we may not connect) or ``"error"`` (anything else);
    callers start an agent only for the first two.
    """

    def __init__(self, message: str, reason: str = "error", path: Path | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.path = path


class AgentTimeout(ControlError):
    """Connected, but no complete answer within the timeout: an agent is there but stuck or slow."""


class AgentProtocolError(ControlError):
    """The agent answered something that is not one JSON object (a version mismatch or a bug)."""


class RequestError(ValueError):
    """Raised by a handler to refuse a request; ``str()`` becomes the error reply as is."""


class ControlSocketInUse(RuntimeError):
    """Another agent already answers on the socket path."""


# ---------------------------------------------------------------------------------- validation
def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_FIELDS: dict[str, tuple[str, ...]] = {
    "status": (),
    "list": (),
    "set_mode": ("mode", "for_s"),
    "allocate": ("id", "gpus", "pid"),
    "release": ("id",),
}


def validate_request(message: object) -> dict[str, Any]:
    """The request with optional fields filled in, or RequestError naming what is wrong.

    Only JSON types and obvious ranges are checked here; allocation ids and GPU indices are
    checked against their own rules by the allocation store, behind the handler.
    """
    if not isinstance(message, dict):
        raise RequestError("request must be a JSON object")
    op = message.get("op")
    if not isinstance(op, str):
        raise RequestError('request needs "op" (a string)')
    if op not in _FIELDS:
        raise RequestError(f"unknown op {op[:40]!r} (expected one of {', '.join(OPS)})")
    allowed = ("op", *_FIELDS[op])
    for key in message:
        if key not in allowed:
            raise RequestError(f"unknown field {str(key)[:40]!r} for op {op!r}")
    out: dict[str, Any] = {"op": op}
    if op == "set_mode":
        mode = message.get("mode")
        if mode not in MODES:
            raise RequestError(f'set_mode needs "mode": one of {", ".join(MODES)}')
        for_s = message.get("for_s")
        if for_s is not None:
            if not _is_number(for_s) or not math.isfinite(for_s):
                raise RequestError('"for_s" must be a number of seconds or null')
            if for_s <= 0:
                raise RequestError('"for_s" must be > 0')
            if for_s > MAX_FOR_S:
                raise RequestError('"for_s" must be at most 366 days')
            if mode == "auto":
                raise RequestError('"for_s" does not apply to mode auto')
            for_s = float(for_s)
        out.update(mode=mode, for_s=for_s)
    elif op in ("allocate", "release"):
        ident = message.get("id")
        if not isinstance(ident, str):
            raise RequestError(f'{op} needs "id" (a string)')
        out["id"] = ident
        if op == "allocate":
            gpus = message.get("gpus")
            if gpus is not None and (
                not isinstance(gpus, list) or not all(_is_int(g) for g in gpus)
            ):
                raise RequestError('"gpus" must be a list of integers or null')
            pid = message.get("pid")
            if pid is not None and not _is_int(pid):
                raise RequestError('"pid" must be an integer or null')
            out.update(gpus=gpus, pid=pid)
    return out


def _json_default(obj: object) -> Any:
    """Let handlers return the values they naturally hold (paths, enums, datetimes)."""
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (datetime, date)):
        return obj.isoformat()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def encode_line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=_json_default).encode() + b"\n"


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": " ".join(str(message).split()) or "error"}


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
                self._reply_and_close(conn, _error("agent busy: too many control connections"))
                continue
            try:
                threading.Thread(
                    target=self._connection, args=(conn,), name="gputel-control-conn", daemon=True
                ).start()
            except RuntimeError:
                self._slots.release()
                self._reply_and_close(conn, _error("agent busy: cannot start a thread"))

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
                return _error(f"no complete request line within {self.read_timeout:g}s")
            conn.settimeout(remaining)
            try:
                chunk = conn.recv(8192)
            except TimeoutError:
                return _error(f"no complete request line within {self.read_timeout:g}s")
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
        return _error(f"request longer than {MAX_MESSAGE_BYTES} bytes")

    def _answer(self, conn: socket.socket) -> dict[str, Any]:
        line = self._read_line(conn)
        if isinstance(line, dict):
            return line
        if not line.strip():
            return _error("empty request")
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            return _error("request is not valid JSON")
        try:
            request = validate_request(message)
        except RequestError as exc:
            return _error(str(exc))
        if self._stopping.is_set():
            return _error("agent is shutting down")
        try:
            with self._handler_lock:
                result = self.handler(request)
        except RequestError as exc:
            return _error(str(exc))
        except Exception as exc:
            log.exception("control handler failed on op %s", request["op"])
            return _error(f"internal error in op {request['op']}: {type(exc).__name__}: {exc}")
        if not isinstance(result, dict):
            log.error("control handler returned %s for op %s", type(result).__name__, request["op"])
            return _error(f"internal error in op {request['op']}: bad reply")
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
                data = encode_line(_error(f"internal error: reply not serialisable: {exc}"))
            conn.settimeout(READ_TIMEOUT_S)
            conn.sendall(data)
        except OSError:
            pass  # the client went away; nothing to tell it
        finally:
            with contextlib.suppress(OSError):
                conn.close()


# ---------------------------------------------------------------------------------- client
def socket_path(run_dir: Path) -> Path:
    return Path(run_dir) / CONTROL_SOCKET


def _group_hint(path: Path) -> str:
    try:
        return grp.getgrgid(path.stat().st_gid).gr_name
    except (OSError, KeyError):
        return "gputel"


def _unavailable(path: Path, exc: OSError) -> AgentUnavailable:
    if isinstance(exc, FileNotFoundError):
        return AgentUnavailable(f"agent not running: no control socket at {path}", "missing", path)
    if isinstance(exc, ConnectionRefusedError):
        return AgentUnavailable(
            f"agent not running: nothing listens on {path} (stale socket)", "refused", path
        )
    if isinstance(exc, PermissionError):
        return AgentUnavailable(
            f"permission denied on {path}: run as root or join group {_group_hint(path)}",
            "permission",
            path,
        )
    reason = exc.strerror or str(exc)
    return AgentUnavailable(f"cannot reach the agent on {path}: {reason}", "error", path)


def request(run_dir: Path, message: dict[str, Any], timeout: float = 2.0) -> dict[str, Any]:
    """Send one request to the agent in ``run_dir`` and return its reply object.

    The whole exchange (connect, send, receive) is bounded by ``timeout``. A reply with
    ``"ok": false`` is returned, not raised: the caller decides what a refusal means.
    """
    path = socket_path(run_dir)
    data = encode_line(message)
    if len(data) - 1 > MAX_MESSAGE_BYTES:
        raise ValueError(f"request longer than {MAX_MESSAGE_BYTES} bytes")
    deadline = time.monotonic() + timeout

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            while True:
                s.settimeout(remaining())
                try:
                    s.connect(str(path))
                    break
                except BlockingIOError:
                    # A Unix socket with a full backlog refuses at once with EAGAIN instead of
                    # blocking: a live agent that is busy, so keep trying until the deadline.
                    time.sleep(min(0.02, max(0.0, deadline - time.monotonic())))
        except TimeoutError:
            raise AgentTimeout(
                f"the agent did not accept a connection within {timeout:g}s on {path}"
            ) from None
        except OSError as exc:
            raise _unavailable(path, exc) from None
        buf = bytearray()
        try:
            s.settimeout(remaining())
            s.sendall(data)
            while True:
                s.settimeout(remaining())
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if b"\n" in chunk:
                    break
                if len(buf) > 16 * MAX_MESSAGE_BYTES:
                    raise AgentProtocolError(f"the agent's reply on {path} is too long")
        except TimeoutError:
            raise AgentTimeout(f"the agent did not answer within {timeout:g}s on {path}") from None
        except (BrokenPipeError, ConnectionResetError):
            raise AgentUnavailable(
                f"the agent closed the connection on {path} without answering", "error", path
            ) from None
        except OSError as exc:
            raise _unavailable(path, exc) from None
    finally:
        s.close()
    line = bytes(buf).split(b"\n", 1)[0]
    if not line.strip():
        raise AgentUnavailable(
            f"the agent closed the connection on {path} without answering", "error", path
        )
    try:
        reply = json.loads(line)
    except ValueError:
        raise AgentProtocolError(f"the agent on {path} sent a reply that is not JSON") from None
    if not isinstance(reply, dict):
        raise AgentProtocolError(f"the agent on {path} sent a reply that is not an object")
    return reply


def agent_answers(run_dir: Path, timeout: float = 1.0) -> bool:
    """Whether an agent is there: it answers ``status``, or accepted but is slow to answer.

    A slow agent still counts, so nobody starts a second one next to it.
    """
    try:
        request(run_dir, {"op": "status"}, timeout=timeout)
    except AgentTimeout:
        return True
    except ControlError:
        return False
    return True
