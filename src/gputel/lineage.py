"""Which agent a recorder child belongs to, and the rules that keep it from outliving it.

A child that remembered ``os.getppid()`` at its start would, if its agent died before that,
remember init and record forever. So the agent names itself explicitly (pid and start time, in
``_GPUTEL_AGENT``), and the child:

1. asks the kernel for ``PR_SET_PDEATHSIG`` (SIGTERM when its parent exits), then
2. checks that its parent is still that agent: an agent that died before step 1 took effect is
   caught here (the kernel only signals deaths after the request), and
3. keeps checking its parent every tick (a cheap ``getppid``) as the last line.

A child started without the variable (by hand, by a test) belongs to whoever started it.

Import-light: the agent and the recorder both load it.
"""

from __future__ import annotations

import ctypes
import os
import signal
from dataclasses import dataclass

from gputel.formats import process_alive, process_start_time

#: Internal environment variable: ``<pid>:<start time>`` of the agent that started the child.
AGENT_ENV = "_GPUTEL_AGENT"
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class Identity:
    """A process as the kernel knows it: pid, and start time (epoch seconds) against pid reuse."""

    pid: int
    start_time: float | None

    def as_env(self) -> str:
        return f"{self.pid}:{'' if self.start_time is None else repr(self.start_time)}"

    @classmethod
    def parse(cls, text: str) -> Identity | None:
        """An identity from :meth:`as_env`; None for anything else."""
        pid_text, _, start_text = text.partition(":")
        if not pid_text.isdigit() or int(pid_text) < 1:
            return None
        try:
            start = float(start_text) if start_text else None
        except ValueError:
            return None
        return cls(int(pid_text), start)


def own_identity() -> Identity:
    """This process, for a child it starts (:data:`AGENT_ENV`)."""
    return Identity(os.getpid(), process_start_time(os.getpid()))


def agent_of_child(environ: dict[str, str] | os._Environ[str] = os.environ) -> Identity:
    """The agent named by :data:`AGENT_ENV`, or the parent when there is none.

    A malformed value names no live process (pid 0 is never a parent), so the child stops.
    """
    text = environ.get(AGENT_ENV)
    if text is None:
        parent = os.getppid()
        return Identity(parent, process_start_time(parent))
    return Identity.parse(text) or Identity(0, None)


def die_with_parent(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send ``sig`` when the parent exits; False where it cannot (not Linux)."""
    try:
        # The running interpreter's own symbols, libc's among them: ``find_library`` would
        # spawn ``ldconfig -p`` at every recorder start to find the same library.
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def parent_is(agent: Identity) -> bool:
    """Whether our parent is still ``agent``, alive, and not a reused pid."""
    return os.getppid() == agent.pid and process_alive(agent.pid, agent.start_time)
