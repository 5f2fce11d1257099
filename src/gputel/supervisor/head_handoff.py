"""Handing the pre-trigger ring to the recorder child when a session starts.

The agent writes the ring's ticks to ``RUN_DIR/pretrigger.json`` just before it starts the child
of a new session (activity, allocation, operator or event capture alike). The child takes the
file once, before its first tick (``telemetry/head.py``). Between the two, the child is still
starting (imports, opening its sources); the agent keeps reading and rewrites the file each tick
while it is still there, with the window from before the session's start kept whole and the
new readings added after it, so the head reaches up to the child's first own row instead of
stopping where the child was spawned. Once the child's heartbeat shows it ticking, whatever file
is left (a rewrite that raced the child's take) is removed and the ring starts over empty: those
readings belong to this session now, and the next session's head must not repeat them.

A crash-restart of the child during a session gets no head (its ticks were recorded by the
child before it), and a head is never written for a session that is not starting.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from gputel import runtime
from gputel.formats import atomic_write_bytes
from gputel.supervisor.pretrigger import PretriggerRing
from gputel.telemetry.head import HeadTick, encode_head

log = logging.getLogger("gputel.supervisor.agent")


class HeadHandoff:
    """The agent's side of the hand-off: when to offer the ring, refresh it, and forget it."""

    def __init__(self, run_dir: Path, ring: PretriggerRing) -> None:
        self.path = run_dir / runtime.PRETRIGGER_FILE
        self.ring = ring
        self.offered = False
        """A head was written for a child that has not ticked yet."""
        self._failing = False
        self._head: list[HeadTick] = []
        """What was offered: the window at the session's start, then the ticks after it."""

    def wants_readings(self, telemetry_wanted: bool) -> bool:
        """Whether this tick's light readings go into the ring: while telemetry is off, and
        while a starting child may still take a fresher head (the recorder has the rest)."""
        return self.ring.enabled and (not telemetry_wanted or self.offered)

    def remove_stale(self) -> None:
        """At agent start: a file left by an agent that died is no head for anyone."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def session_starting(self, now: float) -> None:
        """Write the head for the child about to be started for a new session."""
        if not self.ring.enabled:
            return
        self._head = self.ring.ticks(now)
        self.offered = bool(self._head) and self._write()

    def tick(self, now: float, child_running: bool, child_ticking: bool) -> None:
        """After the loop's read: extend an offered head, or end the offer."""
        if not self.offered:
            return
        if child_ticking or not child_running:
            self.offered = False
            self._head = []
            self.remove_stale()
            if child_ticking:
                self.ring.clear()
            return
        # The window before the session started stays whole; the readings taken while the
        # child starts are added after it.
        newer = self.ring.ticks(after=self._head[-1].monotonic)
        if newer and self.path.exists():
            self._head += newer
            self._write()

    def _write(self) -> bool:
        try:
            atomic_write_bytes(self.path, encode_head(self._head))
        except OSError as exc:
            if not self._failing:
                self._failing = True
                log.error(
                    "cannot write the pre-trigger head %s (%s); this session starts without it",
                    self.path,
                    exc.strerror or exc,
                )
            return False
        self._failing = False
        return True
