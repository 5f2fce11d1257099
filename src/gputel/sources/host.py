"""Host CPU, load, memory, disk and network counters through psutil.

Failure policy: what a host legitimately lacks is ``None`` (no block devices in a container, no
``/proc/diskstats``), and the source stays up; anything else that goes wrong (``/proc`` not
mounted, an unexpected OSError) raises, so the sampler marks the ``host`` source down for that
tick and the failure is visible in ``gputel_source_up`` instead of hiding as empty cells.

CPU utilization is computed from our own ``psutil.cpu_times()`` deltas, with psutil's formula,
rather than ``psutil.cpu_percent(interval=None)``: the latter keeps its previous sample in a
process-global, so any other caller in the same process would silently shorten our interval.
The first read only primes the delta and gives ``None``, never a meaningless ``0.0``.
"""

from __future__ import annotations

import os
from typing import Any

import psutil

from gputel.schema import MIB

LOOPBACK = "lo"


def _busy_and_total(times: Any) -> tuple[float, float]:
    """psutil's accounting: guest time is already in user/nice; iowait is idle."""
    total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
    busy = total - times.idle - getattr(times, "iowait", 0.0)
    return busy, total


class PsutilHostSource:
    """CPU %, load, memory, swap, and cumulative disk and network byte counters."""

    name = "host"

    def __init__(self) -> None:
        self._last_cpu: tuple[float, float] | None = None
        self._disk_supported = True

    def _cpu_util_pct(self) -> float | None:
        busy, total = _busy_and_total(psutil.cpu_times())
        last, self._last_cpu = self._last_cpu, (busy, total)
        if last is None:
            return None
        d_total = total - last[1]
        if d_total <= 0:
            # No tick of CPU time elapsed (reads closer than the kernel's accounting step).
            return None
        d_busy = busy - last[0]
        return round(min(100.0, max(0.0, 100.0 * d_busy / d_total)), 1)

    def _disk(self) -> tuple[int | None, int | None]:
        if not self._disk_supported:
            return None, None
        try:
            counters = psutil.disk_io_counters(perdisk=False)
        except (NotImplementedError, FileNotFoundError):
            # Neither /proc/diskstats nor /sys/block: it will not appear later; stop asking.
            self._disk_supported = False
            return None, None
        if counters is None:
            return None, None
        return int(counters.read_bytes), int(counters.write_bytes)

    @staticmethod
    def _net() -> tuple[int | None, int | None]:
        per_nic = psutil.net_io_counters(pernic=True)
        rx = tx = 0
        seen = False
        for nic, counters in per_nic.items():
            if nic == LOOPBACK:
                continue
            seen = True
            rx += counters.bytes_recv
            tx += counters.bytes_sent
        if not seen:
            return None, None
        return rx, tx

    def read(self) -> dict[str, Any]:
        load1, load5, load15 = os.getloadavg()
        vm = psutil.virtual_memory()
        swap = psutil.swap_memory()
        disk_read, disk_write = self._disk()
        net_rx, net_tx = self._net()
        return {
            "cpu_util_pct": self._cpu_util_pct(),
            "load_1m": load1,
            "load_5m": load5,
            "load_15m": load15,
            # total - available, as free(1) (procps-ng 4) and node dashboards count it, so
            # used + available = total and reclaimable page cache is not counted as used.
            "memory_used_mib": (vm.total - vm.available) / MIB,
            "memory_available_mib": vm.available / MIB,
            "swap_used_mib": swap.used / MIB,
            "disk_read_bytes": disk_read,
            "disk_write_bytes": disk_write,
            "net_rx_bytes": net_rx,
            "net_tx_bytes": net_tx,
        }
