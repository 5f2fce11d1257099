"""One ``Sample`` per tick from every source, each source timed and failing alone.

A source that raises costs its own values for that tick and shows up as ``gputel_source_up 0``;
the rest of the sample is still written and exported. Errors are logged once per distinct message
(and once on recovery) because a broken RAPL file would otherwise fill the journal every second.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone

from gputel.formats import error_line
from gputel.schema import GpuReading, HostReading, Sample, SourceStatus
from gputel.sources.base import GpuSource, HostSource

log = logging.getLogger("gputel.telemetry.sampler")

_MAX_REMEMBERED_ERRORS = 64


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Sampler:
    """Reads the GPU source and every host source once per call into one ``Sample``."""

    def __init__(
        self,
        gpu_source: GpuSource,
        host_sources: Sequence[HostSource] = (),
        *,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], datetime] = utc_now,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.gpu_source = gpu_source
        self.host_sources = list(host_sources)
        self._clock = clock
        self._wallclock = wallclock
        self._timer = timer
        # Identity of each GPU, so a failed read still yields one (empty) row per GPU per tick.
        self.devices = list(gpu_source.devices())
        self._errors_seen: dict[str, set[str]] = {}
        self._down: set[str] = set()
        self._unknown: set[tuple[str, str]] = set()

    def sample(
        self,
        allocations: tuple[str, ...] = (),
        gpu_allocations: dict[int, tuple[str, ...]] | None = None,
    ) -> Sample:
        timestamp = self._wallclock()
        monotonic = self._clock()
        statuses: list[SourceStatus] = []

        gpu_name = self.gpu_source.name
        start = self._timer()
        try:
            gpus = self.gpu_source.read()
            error = None
        except Exception as exc:
            gpus = [GpuReading(d.index, d.uuid, d.name) for d in self.devices]
            error = error_line(exc)
        statuses.append(self._status(gpu_name, start, error))

        host = HostReading()
        for source in self.host_sources:
            start = self._timer()
            error = None
            try:
                for attr in host.merge(source.read()):
                    if (source.name, attr) not in self._unknown:
                        self._unknown.add((source.name, attr))
                        log.warning(
                            "source %s gave an unknown field %r; ignored", source.name, attr
                        )
            except Exception as exc:
                error = error_line(exc)
            statuses.append(self._status(source.name, start, error))

        return Sample(
            timestamp=timestamp,
            monotonic=monotonic,
            gpus=gpus,
            host=host,
            sources=statuses,
            allocations=allocations,
            gpu_allocations=gpu_allocations if gpu_allocations is not None else {},
        )

    def _status(self, name: str, start: float, error: str | None) -> SourceStatus:
        duration = max(0.0, self._timer() - start)
        if error is None:
            if name in self._down:
                self._down.discard(name)
                log.info("source %s is reading again", name)
            return SourceStatus(name, True, duration)
        self._down.add(name)
        seen = self._errors_seen.setdefault(name, set())
        if error not in seen:
            if len(seen) < _MAX_REMEMBERED_ERRORS:
                seen.add(error)
            log.warning("source %s failed: %s (its values stay empty)", name, error)
        return SourceStatus(name, False, duration, error)
