"""The recorder's GPU reads with a deadline per tick: one hung GPU must not stall the recorder.

An NVML call can block for minutes (a GPU off the bus, a wedged driver) and cannot be cancelled.
Read in one loop, one hung GPU would stop every row: host rows, the healthy GPUs' rows, the
heartbeat (and the agent would then kill the recorder as hung and start a new one into the same
hang). So each tick reads the GPUs one after another through :class:`gputel.gpu_readers.
GpuReaders`, each within the deadline. A GPU whose read has not returned by then gives an empty
row marked ``stuck`` (``gputel_gpu_read_stuck`` 1) while the GPUs after it are read, and is not
asked again until that read returns; its late result is dropped (it belongs to a past tick) and
the next tick reads it afresh. A read that raises costs that GPU's row for that tick only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from typing import cast

from gputel.formats import error_line
from gputel.gpu_readers import GpuReaders
from gputel.schema import GpuReading
from gputel.sources.base import GpuIdentity, GpuSource, PerGpuSource

log = logging.getLogger("gputel.telemetry.gpu_deadline")


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
        self._devices = list(source.devices())
        self.readers = GpuReaders(deadline_s, clock=clock, name="gpu")
        """Reads the GPUs in turn; a GPU that overruns ``deadline_s`` is parked there."""
        self._calls = [(d.index, partial(source.read_gpu, d.index)) for d in self._devices]
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
        # A read parked in a driver call cannot be joined; its daemon thread ends with us.
        self.readers.close()
        self.source.close()

    @property
    def stuck(self) -> list[int]:
        return sorted(self._stuck)

    def read(self) -> list[GpuReading]:
        outcomes = self.readers.read(self._calls)
        readings: list[GpuReading] = []
        for d in self._devices:
            status, value = outcomes[d.index]
            if status == "stuck":
                readings.append(self._stuck_reading(d))
                continue
            if d.index in self._stuck:
                self._stuck.discard(d.index)
                log.warning("GPU %d answers again: its reads resume", d.index)
            if status == "error":
                self._failed(d, value)
                readings.append(GpuReading(d.index, d.uuid, d.name))
                continue
            if d.index in self._failing:
                del self._failing[d.index]
                log.info("GPU %d reads again after a failed read", d.index)
            readings.append(value)
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

    def _stuck_reading(self, d: GpuIdentity) -> GpuReading:
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

    The deadline, per GPU, is half the interval (at least 0.5 s): a tick with a newly hung GPU
    still fits about one interval, and a healthy read (milliseconds, plus two 20 ms PCIe
    samples) never comes near it.
    """
    if getattr(source, "read_gpu", None) is None or not source.devices():
        return source
    deadline = max(0.5, 0.5 * interval_s)
    return DeadlineGpuSource(cast(PerGpuSource, source), deadline)
