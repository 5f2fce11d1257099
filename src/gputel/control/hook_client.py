"""The hook client: one allocation request to the agent, asked again while that may help.

Shared by the Python hook API (``gputel.hooks``) and ``gputel hook`` so both follow one retry
rule, within the caller's deadline:

* a refusal whose ``code`` is retryable (the agent is ``starting``, ``busy`` or
  ``shutting_down``, see :data:`gputel.control.protocol.RETRYABLE_CODES`) is asked again after a
  short pause;
* no agent on the socket (no socket, or a stale one nobody listens on) is handed to ``start``
  once, if given, and then asked again until the started agent answers;
* without ``start``, a stale socket nobody listens on (an agent restarting) and a connection
  the agent closed without answering are asked again until the deadline;
* everything else (an answer, a refusal to fix, an agent that accepts and never answers, a
  permission problem) ends the exchange.

The client never reads the agent's prose: only ``ok`` and ``code``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gputel.control import client
from gputel.control.protocol import AgentUnavailable, retryable

#: Pause between two tries; short, because the hooks' whole budget is two seconds.
RETRY_PAUSE_S = 0.05


@dataclass(frozen=True)
class Exchange:
    """How an exchange ended: the agent's last reply, or no agent answering by the deadline.

    ``reply`` may be a refusal (``"ok": false``), retryable ones included when the deadline came
    first. ``unavailable`` is set when no agent answered at all; ``started`` says how an agent
    was started by this exchange (None when ``start`` was not called).
    """

    reply: dict[str, Any] | None = None
    unavailable: AgentUnavailable | None = None
    started: str | None = None


def exchange(
    run_dir: Path,
    message: dict[str, Any],
    deadline: float,
    *,
    start: Callable[[float], str] | None = None,
) -> Exchange:
    """Ask the agent in ``run_dir`` until it answers for good or ``deadline`` (monotonic) passes.

    ``start(deadline)`` starts an agent and returns a phrase saying how; it is called at most
    once, only when no agent is there. ``AgentTimeout`` (an agent that accepted but did not
    answer), ``AgentUnavailable`` other than "no agent" (see ``AgentUnavailable.no_agent``), other
    ``ControlError`` and whatever ``start`` raises propagate.
    """
    started: str | None = None
    while True:
        left = deadline - time.monotonic()
        try:
            reply = client.request(run_dir, message, timeout=max(0.2, left))
        except AgentUnavailable as exc:
            if exc.reason == "closed" or (exc.reason == "refused" and start is None):
                if time.monotonic() + RETRY_PAUSE_S < deadline:
                    time.sleep(RETRY_PAUSE_S)
                    continue
                if exc.reason == "closed":
                    raise
            if not exc.no_agent:
                raise
            if start is None:
                return Exchange(unavailable=exc)
            if started is None:
                started = start(deadline)
            elif time.monotonic() + RETRY_PAUSE_S >= deadline:
                return Exchange(unavailable=exc, started=started)
            else:
                time.sleep(RETRY_PAUSE_S)
            continue
        if retryable(reply) and time.monotonic() + RETRY_PAUSE_S < deadline:
            time.sleep(RETRY_PAUSE_S)
            continue
        return Exchange(reply=reply, started=started)
