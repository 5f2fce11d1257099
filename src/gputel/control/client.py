"""The control client: one request to the running agent, bounded by a deadline."""

from __future__ import annotations

import grp
import json
import socket
import time
from pathlib import Path
from typing import Any

from gputel.control.protocol import (
    MAX_MESSAGE_BYTES,
    AgentProtocolError,
    AgentTimeout,
    AgentUnavailable,
    ControlError,
    encode_line,
)
from gputel.runtime import CONTROL_SOCKET


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
                f"the agent closed the connection on {path} without answering", "closed", path
            ) from None
        except OSError as exc:
            raise _unavailable(path, exc) from None
    finally:
        s.close()
    line = bytes(buf).split(b"\n", 1)[0]
    if not line.strip():
        raise AgentUnavailable(
            f"the agent closed the connection on {path} without answering", "closed", path
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
