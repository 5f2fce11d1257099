"""The recorder's GPU reads with a deadline per tick: one hung GPU must not stall the recorder.

An NVML call can block for minutes (a GPU off the bus, a wedged driver) and cannot be cancelled.
Read in one loop, one hung GPU would stop every row: host rows, the healthy GPUs' rows, the
heartbeat (and the agent would then kill the recorder as hung and start a new one into the same
hang). So each GPU gets its own reader thread; each tick hands every idle reader one read and
waits until the tick's deadline. A GPU whose read has not returned by then gives an empty row
marked ``stuck`` (``gputel_gpu_read_stuck`` 1) and is not asked again until that read returns;
its late result is dropped (it belongs to a past tick) and the next tick reads it afresh. A read
that raises costs that GPU's row for that tick only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol, cast

from gputel.formats import error_line
from gputel.schema import GpuReading
from gputel.sources.base import GpuIdentity, GpuSource

log = logging.getLogger("gputel.telemetry.gpu_deadline")


class PerGpuSource(GpuSource, Protocol):
    """A GPU source whose GPUs can be read one at a time, concurrently (NVML)."""

    def read_gpu(self, index: int) -> GpuReading: ...


class _Reader:
    """One GPU's reader thread: at most one read in flight."""

    def __init__(self, index: int, read: Callable[[int], GpuReading]) -> None:
        self.index = index
        self._read = read
        self._cond = threading.Condition()
        self._wanted = False
        self._busy = False
        self._result: GpuReading | None = None
        self._error: BaseException | None = None
        self.started_at: float | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"gputel-gpu{index}-reader", daemon=True
        )
        self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._wanted:
                    self._cond.wait()
                self._wanted = False
            result: GpuReading | None = None
            error: BaseException | None = None
            try:
                result = self._read(self.index)
            except BaseException as exc:
                error = exc
            with self._cond:
                self._result, self._error, self._busy = result, error, False
                self._cond.notify_all()

    @property
    def busy(self) -> bool:
        with self._cond:
            return self._busy

    def start(self, now: float) -> bool:
        """Begin a read; False while the previous one has not returned."""
        with self._cond:
            if self._busy:
                return False
            self._busy, self._wanted = True, True
            self._result = self._error = None
            self.started_at = now
            self._cond.notify_all()
            return True

    def wait(self, timeout: float) -> tuple[GpuReading | None, BaseException | None] | None:
        """The read's (result, error), or None if it is still running after ``timeout``."""
        with self._cond:
            if self._busy and not self._cond.wait_for(lambda: not self._busy, timeout):
                return None
            return self._result, self._error


class DeadlineGpuSource:
    """Wraps a :class:`PerGpuSource` for the recorder; a ``GpuSource`` itself."""

    def __init__(
        self,
        source: PerGpuSource,
        deadline_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.source = source
        self.name = source.name
        self.deadline_s = deadline_s
        self._clock = clock
        self._devices = list(source.devices())
        self._readers = {d.index: _Reader(d.index, source.read_gpu) for d in self._devices}
        self._stuck: set[int] = set()
        self._failing: dict[int, str] = {}
        """GPU index -> the error its last read raised, while its reads fail."""

    def devices(self) -> list[GpuIdentity]:
        return self.source.devices()

    def read_utilization(self) -> dict[int, float | None]:
        return self.source.read_utilization()

    def read_light(self) -> list[GpuReading]:
        return self.source.read_light()

    def read_energy_j(self) -> dict[int, float | None]:
        return self.source.read_energy_j()

    def close(self) -> None:
        # A reader stuck in a driver call cannot be joined; its daemon thread ends with us.
        self.source.close()

    @property
    def stuck(self) -> list[int]:
        return sorted(self._stuck)

    def read(self) -> list[GpuReading]:
        now = self._clock()
        started = {i: r.start(now) for i, r in self._readers.items()}
        end = now + self.deadline_s
        readings: list[GpuReading] = []
        for d in self.source.devices():
            reader = self._readers.get(d.index)
            outcome = None
            if reader is not None and started.get(d.index):
                outcome = reader.wait(max(0.0, end - self._clock()))
            if outcome is None:
                readings.append(self._stuck_reading(d, reader))
                continue
            result, exc = outcome
            if d.index in self._stuck:
                self._stuck.discard(d.index)
                log.warning("GPU %d answers again: its reads resume", d.index)
            if exc is not None:
                self._failed(d, exc)
                result = None
            elif d.index in self._failing:
                del self._failing[d.index]
                log.info("GPU %d reads again after a failed read", d.index)
            readings.append(result if result is not None else GpuReading(d.index, d.uuid, d.name))
        return readings

    def _failed(self, d: GpuIdentity, exc: BaseException) -> None:
        """A read that raised costs that GPU's row this tick, never the other GPUs' rows.

        The source turns every driver answer into values, so an exception here is a bug or a
        binding surprise: logged with its traceback once per distinct error, while it repeats.
        """
        line = error_line(exc)
        if self._failing.get(d.index) != line:
            self._failing[d.index] = line
            log.error(
                "GPU %d (%s): its read failed (%s); its values stay empty while the other GPUs "
                "keep recording",
                d.index,
                d.uuid or "uuid unknown",
                line,
                exc_info=exc,
            )

    def _stuck_reading(self, d: GpuIdentity, reader: _Reader | None) -> GpuReading:
        if d.index not in self._stuck:
            self._stuck.add(d.index)
            log.error(
                "GPU %d (%s): its read did not return within %g s (a hung driver call?); its "
                "values stay empty while the other GPUs and the host keep recording, until the "
                "call returns",
                d.index,
                d.uuid or "uuid unknown",
                self.deadline_s,
            )
        return GpuReading(d.index, d.uuid, d.name, stuck=True)


def with_read_deadline(source: GpuSource, interval_s: float) -> GpuSource:
    """The recorder's view of ``source``: per-GPU deadlines where the source can read one GPU.

    The deadline is half the interval (at least 0.5 s): a tick still fits its interval, and a
    healthy read (milliseconds, plus two 20 ms PCIe samples) never comes near it.
    """
    if getattr(source, "read_gpu", None) is None or not source.devices():
        return source
    deadline = max(0.5, 0.5 * interval_s)
    return DeadlineGpuSource(cast(PerGpuSource, source), deadline)
