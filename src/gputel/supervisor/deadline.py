"""Run a call on a thread and wait for it with a deadline: the one rule for calls that may hang.

An NVML call can block forever (a GPU off the bus, a wedged driver) and a socket peer can accept
and never answer; neither can be cancelled from Python. So the call runs on a daemon thread and
the caller waits only until its deadline. A call that is late keeps running on its thread: the
caller gets its answer ("not done") at once, and the process can still exit.

Two forms share one :class:`Job`:

* :func:`run_with_deadline` (or :func:`start_job` and a wait) — a one-off call on a fresh
  thread (``gputel status`` without an agent, the hook API);
* :class:`DeadlineRunner` — a long-lived thread running calls one at a time (the agent's GPU
  calls), which refuses new calls at once while one is stuck instead of queueing them behind it.

Only the standard library is imported here: the CLI's fast path uses this module.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

Clock = Callable[[], float]
CallStatus = Literal["ok", "error", "timeout", "stuck"]


class Job:
    """One call and its outcome; ``done`` is set once it returned or raised."""

    __slots__ = ("done", "error", "fn", "started_at", "value")

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None
        self.started_at: float | None = None

    def run(self, clock: Clock, before_done: Callable[[Job], None] | None = None) -> None:
        """Run the call here, keeping its value or exception (never raises).

        ``before_done`` runs after the call and before ``done`` is set, so whoever wakes on
        ``done`` sees its effect.
        """
        self.started_at = clock()
        try:
            self.value = self.fn()
        except BaseException as exc:
            self.error = exc
        if before_done is not None:
            before_done(self)
        self.done.set()

    def outcome(self) -> tuple[CallStatus, Any]:
        """``("ok", value)``, ``("error", exc)`` or ``("timeout", None)`` while still running."""
        if not self.done.is_set():
            return "timeout", None
        if self.error is not None:
            return "error", self.error
        return "ok", self.value


def start_job(
    fn: Callable[[], Any], *, name: str = "gputel-deadline", clock: Clock = time.monotonic
) -> Job:
    """Start ``fn`` on a daemon thread of its own; wait for it with ``job.done.wait(deadline)``."""
    job = Job(fn)
    threading.Thread(target=job.run, args=(clock,), name=name, daemon=True).start()
    return job


def run_with_deadline(
    fn: Callable[[], Any],
    timeout: float,
    *,
    name: str = "gputel-deadline",
    clock: Clock = time.monotonic,
) -> Job:
    """Start ``fn`` on a daemon thread and wait up to ``timeout`` seconds for it.

    The returned job is done or still running (``job.done``); a running one is left to finish
    on its own thread.
    """
    job = start_job(fn, name=name, clock=clock)
    job.done.wait(timeout)
    return job


class DeadlineRunner:
    """Runs calls one at a time on a daemon thread; callers wait with a deadline.

    A call still running after its caller's deadline is *stuck*: further calls are refused at
    once (they would only queue behind it) until it returns.
    """

    def __init__(self, clock: Clock = time.monotonic, name: str = "gputel-gpu") -> None:
        self._clock = clock
        self._queue: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._stuck: Job | None = None
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            self._queue.get().run(self._clock, self._unstick)

    def _unstick(self, job: Job) -> None:
        with self._lock:
            if self._stuck is job:
                self._stuck = None

    @property
    def stuck_for(self) -> float | None:
        """Seconds the stuck call has been running, or None when no call is stuck."""
        with self._lock:
            job = self._stuck
        if job is None or job.started_at is None:
            return None
        return max(0.0, self._clock() - job.started_at)

    def submit(self, fn: Callable[[], Any]) -> Job | None:
        """Queue ``fn``; None (nothing queued) while another call is stuck."""
        with self._lock:
            if self._stuck is not None:
                return None
        job = Job(fn)
        self._queue.put(job)
        return job

    def wait(self, job: Job, timeout: float) -> bool:
        """Whether ``job`` finished within ``timeout``; if not, it is now the stuck call."""
        if job.done.wait(timeout):
            return True
        with self._lock:
            if not job.done.is_set():
                self._stuck = job
        return job.done.is_set()

    def call(self, fn: Callable[[], Any], timeout: float) -> tuple[CallStatus, Any]:
        """``("ok", value)``, ``("error", exc)``, ``("timeout", None)`` or ``("stuck", None)``."""
        job = self.submit(fn)
        if job is None:
            return "stuck", None
        self.wait(job, timeout)
        return job.outcome()
