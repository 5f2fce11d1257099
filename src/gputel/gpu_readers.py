"""GPUs read one after another on one thread, each within a budget: how the recorder and the
agent read GPUs that may hang.

An NVML call can block for minutes (a GPU off the bus, a wedged driver) and cannot be cancelled,
so a GPU must never be read on a thread someone waits for without a deadline. A thread per GPU
isolates a hung GPU, but eight threads woken at once every tick fight for the GIL and the CPUs:
2.3 times the CPU of the reads themselves with 8 GPUs, 2.9 times with 64 (docs/performance.md). So
a round of reads runs on ONE worker thread, GPU after GPU, while the caller sleeps until the
round is done:

- a read that takes longer than ``PATIENCE_S`` (a driver sleeping in a call) lets another
  worker go on with the GPUs after it, so slow GPUs overlap instead of adding up, and a wedged
  driver costs one budget per round (plus ``PATIENCE_S`` per GPU), not one budget per GPU;
- a read that takes longer than ``budget_s`` is *stuck*: the round ends without it, its call
  stays parked on its worker, and that GPU is not asked again until the call returns (its late
  value belongs to a past round and is dropped);
- a read that raises costs that GPU's answer only.

Workers are kept for the next round; a new one starts only when a read is slow or parked. Only
the standard library is used: the CLI's fast path may import this module.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

Clock = Callable[[], float]
ReadStatus = Literal["ok", "error", "stuck"]
Outcome = tuple[ReadStatus, Any]
"""``("ok", value)``, ``("error", exception)`` or ``("stuck", None)``."""

#: A read still running after this long lets another worker carry on with the next GPUs. A
#: healthy read of one GPU takes well under a millisecond of CPU (docs/performance.md), yet on a
#: busy machine a worker may wait several milliseconds for a core: shorter would start second
#: workers for nothing. GPUs whose reads all sleep in the driver start 20 ms apart.
PATIENCE_S = 0.02
#: Idle workers kept for later rounds; more exit once their read returns.
MAX_IDLE = 4

STUCK: Outcome = ("stuck", None)


class _Wakeup:
    """Wakes one waiting thread; a bare lock, cheaper than ``threading.Event`` per hand-off."""

    __slots__ = ("_gate", "_mu", "_set")

    def __init__(self) -> None:
        self._gate = threading.Lock()
        self._gate.acquire()
        self._mu = threading.Lock()
        self._set = False

    def set(self) -> None:
        with self._mu:
            if not self._set:
                self._set = True
                self._gate.release()

    def wait(self, timeout: float = -1) -> bool:
        """Whether ``set`` was called (and is now consumed); False after ``timeout`` seconds."""
        got = self._gate.acquire(timeout=timeout if timeout < 0 else max(timeout, 0.0))
        with self._mu:
            if not got:
                if not self._set:
                    return False
                self._gate.acquire()  # set() released it just after the timeout
            self._set = False
            return True


class _Round:
    __slots__ = ("budget", "calls", "done", "next", "pending", "results", "workers")

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.calls: list[tuple[int, Callable[[], Any]]] = []
        self.next = 0
        self.results: dict[int, Outcome] = {}
        self.pending = 0
        self.done = _Wakeup()
        self.workers: list[_Worker] = []


class _Worker:
    __slots__ = ("key", "round", "slow", "started", "started_at", "wake")

    def __init__(self) -> None:
        self.wake = _Wakeup()
        self.round: _Round | None = None
        self.key: int | None = None
        self.started = 0.0
        """``time.monotonic()`` when the current read began: budgets are real time."""
        self.started_at = 0.0
        """The same moment on the reader's clock (an injected one in tests): ``stuck_for``."""
        self.slow = False


class GpuReaders:
    """Rounds of per-GPU reads (keyed by GPU index) on as few threads as the GPUs allow.

    One round at a time: a second caller waits for the first round to end, which takes at most
    about ``budget_s`` plus ``PATIENCE_S`` per GPU.
    """

    def __init__(
        self, budget_s: float, *, clock: Clock = time.monotonic, name: str = "gpu"
    ) -> None:
        self.budget_s = budget_s
        self._clock = clock
        self._name = name
        self._mu = threading.Lock()
        self._round_lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._parked: dict[int, tuple[_Worker, float]] = {}
        self._workers = 0
        self._closed = False

    # ------------------------------------------------------------------ the caller's side
    def read(
        self, calls: Sequence[tuple[int, Callable[[], Any]]], budget_s: float | None = None
    ) -> dict[int, Outcome]:
        """Each call's outcome by its key; a key whose earlier call is still parked is
        ``stuck`` without being called. ``budget_s``: this round's budget per read, instead of
        the reader's."""
        with self._round_lock:
            rnd = _Round(self.budget_s if budget_s is None else budget_s)
            with self._mu:
                for key, fn in calls:
                    if key in self._parked:
                        rnd.results[key] = STUCK
                    else:
                        rnd.calls.append((key, fn))
                rnd.pending = len(rnd.calls)
                if rnd.pending:
                    self._dispatch(rnd)
            while rnd.pending:
                rnd.done.wait(self._watch(rnd))
            return rnd.results

    def _watch(self, rnd: _Round) -> float:
        """Mark overrunning reads stuck, let another worker past slow ones; the seconds until
        the next reason to look again."""
        budget = rnd.budget
        with self._mu:
            if not rnd.pending:
                return 0.0
            now = time.monotonic()
            wake_at = now + PATIENCE_S
            more = not rnd.workers
            for w in list(rnd.workers):
                key = w.key
                if key is None:
                    continue  # between two reads
                if now - w.started >= budget:
                    rnd.results[key] = STUCK
                    rnd.pending -= 1
                    self._parked[key] = (w, w.started_at)
                    w.round = None
                    rnd.workers.remove(w)
                    more = True
                    continue
                if not w.slow and now - w.started >= PATIENCE_S:
                    w.slow = True
                    more = True
                wake_at = min(wake_at, w.started + (budget if w.slow else PATIENCE_S))
            if more and rnd.next < len(rnd.calls):
                self._dispatch(rnd)
            if not rnd.pending:
                return 0.0
            return max(wake_at - now, 0.0005)

    def _dispatch(self, rnd: _Round) -> None:
        """One more worker on ``rnd`` (the caller holds ``_mu``)."""
        if self._idle:
            w = self._idle.pop()
        else:
            w = _Worker()
            self._workers += 1
            threading.Thread(
                target=self._work, args=(w,), name=f"gputel-{self._name}-reader", daemon=True
            ).start()
        w.round = rnd
        rnd.workers.append(w)
        w.wake.set()

    # ------------------------------------------------------------------ the workers' side
    def _work(self, w: _Worker) -> None:
        while True:
            w.wake.wait()
            if w.round is None:  # closed
                with self._mu:
                    self._workers -= 1
                return
            if not self._serve(w):
                with self._mu:
                    self._workers -= 1
                return

    def _serve(self, w: _Worker) -> bool:
        """Read the round's next GPUs until none is left or this worker is parked; whether the
        worker is kept for a later round."""
        rnd = w.round
        assert rnd is not None
        while True:
            with self._mu:
                if w.round is not rnd or rnd.next >= len(rnd.calls):
                    return self._retire(w, rnd)
                key, fn = rnd.calls[rnd.next]
                rnd.next += 1
                w.key, w.started, w.started_at = key, time.monotonic(), self._clock()
                w.slow = False
            outcome: Outcome
            try:
                outcome = ("ok", fn())
            except BaseException as exc:
                outcome = ("error", exc)
            with self._mu:
                w.key = None
                parked = self._parked.get(key)
                if parked is not None and parked[0] is w:
                    # The round gave up on this read: its value is dropped, the GPU is free.
                    del self._parked[key]
                    return self._retire(w, None)
                rnd.results[key] = outcome
                rnd.pending -= 1
                if not rnd.pending:
                    rnd.done.set()

    def _retire(self, w: _Worker, rnd: _Round | None) -> bool:
        """The worker leaves its round (the caller holds ``_mu``); kept idle unless enough are."""
        if rnd is not None and w in rnd.workers:
            rnd.workers.remove(w)
        w.round = None
        if self._closed or len(self._idle) >= MAX_IDLE:
            return False
        self._idle.append(w)
        return True

    # ------------------------------------------------------------------ views
    @property
    def stuck(self) -> list[int]:
        """Keys whose read is parked now (not returned since its round gave up on it)."""
        with self._mu:
            return sorted(self._parked)

    def stuck_for(self, key: int) -> float | None:
        """Seconds the parked read of ``key`` has been running; None when it is not parked."""
        with self._mu:
            parked = self._parked.get(key)
        return None if parked is None else max(0.0, self._clock() - parked[1])

    @property
    def threads(self) -> int:
        """Worker threads alive (idle, reading or parked)."""
        with self._mu:
            return self._workers

    def close(self) -> None:
        """Let the idle workers end; a parked one ends when its call returns."""
        with self._mu:
            self._closed = True
            idle, self._idle = self._idle, []
        for w in idle:
            w.wake.set()
