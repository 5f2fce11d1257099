"""The control protocol: one JSON request line, one JSON reply line; errors and validation.

Shared by the server (the agent) and the client (CLI, hooks): what a valid request is, how a
line is encoded, and the exceptions a caller sees.
"""

from __future__ import annotations

import enum
import json
import logging
import math
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from typing import Any

from gputel.formats import one_line

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024
"""Longest request or reply line, newline excluded."""
READ_TIMEOUT_S = 1.0
"""Total time a client has from connecting to the end of its request line. The CLI and the
hooks send theirs at once; a client that sends nothing (or drips) is answered an error then."""
REPLY_TIMEOUT_S = 2.0
"""Time a client has to take its reply; one that does not read cannot hold a connection."""
MAX_CONNECTIONS = 256
"""Connections waiting for their request line at once. One more closes the one that has waited
longest (it is answered "busy"): a flood of idle connections only churns itself, and a real
client, which sends its request as it connects, is read before it could be the oldest."""
MAX_PENDING = 64
"""Requests read and waiting for the agent's handler; more are answered "busy" (retryable)."""
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
    ``"permission"`` (the socket exists but we may not connect), ``"closed"`` (the agent closed
    the connection without answering: it is stopping, or ran out of room) or ``"error"``
    (anything else); callers start an agent only for the first two.
    """

    def __init__(self, message: str, reason: str = "error", path: Path | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.path = path

    @property
    def no_agent(self) -> bool:
        """No agent is there at all (no socket, or a stale one): starting one is the fix."""
        return self.reason in ("missing", "refused")


class AgentTimeout(ControlError):
    """Connected, but no complete answer within the timeout: an agent is there but stuck or slow."""


class AgentProtocolError(ControlError):
    """The agent answered something that is not one JSON object (a version mismatch or a bug)."""


class ErrorCode(str, enum.Enum):
    """Why a request was refused, for clients that must act on it (never match the prose).

    ``STARTING`` and ``BUSY`` and ``SHUTTING_DOWN`` are worth asking again shortly: the agent
    is coming up, has too many connections, or is stopping (another may replace it).
    ``INVALID`` is a request to fix, ``INTERNAL`` a bug in the agent.
    """

    STARTING = "starting"
    BUSY = "busy"
    SHUTTING_DOWN = "shutting_down"
    INVALID = "invalid"
    INTERNAL = "internal"


#: Codes after which the same request may succeed a moment later.
RETRYABLE_CODES = frozenset({ErrorCode.STARTING, ErrorCode.BUSY, ErrorCode.SHUTTING_DOWN})


class RequestError(ValueError):
    """Raised by a handler to refuse a request; ``str()`` becomes the error reply as is."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.INVALID) -> None:
        super().__init__(message)
        self.code = code


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


def error_reply(message: str, code: ErrorCode = ErrorCode.INVALID) -> dict[str, Any]:
    """A refusal: ``{"ok": false, "error": <one line>, "code": <ErrorCode>}``."""
    return {"ok": False, "error": one_line(message) or "error", "code": code.value}


def retryable(reply: object) -> bool:
    """Whether ``reply`` is a refusal that the same request may get past a moment later."""
    if not isinstance(reply, dict) or reply.get("ok") is True:
        return False
    return reply.get("code") in {c.value for c in RETRYABLE_CODES}
