"""Host CPU, load, memory, disk and network counters, read straight from procfs.

The recorder reads this source every second for days, so the files are opened once and re-read
with ``os.pread`` at offset 0 (procfs regenerates the text on every read from the start), and
only the handful of numbers we report are parsed. psutil gave the same figures at several times
the cost: it opens every file per call, parses every line into named tuples, reads
``/proc/vmstat`` for swap-in/out counters we never use, and stats ``/sys/block/<name>`` for
every disk on every call.

Failure policy: what a host legitimately lacks is ``None`` (no ``/proc/diskstats``, no block
device, no network interface other than loopback), and the source stays up; anything else that
goes wrong (``/proc`` not mounted, an unexpected OSError or an unparsable file) raises, so the
sampler marks the ``host`` source down for that tick and the failure is visible in
``gputel_source_up`` instead of hiding as empty cells. A file that fails to read is reopened on
the next attempt, so a transient error costs one tick.

Semantics are psutil's (``cpu_times``, ``virtual_memory``, ``swap_memory``,
``net_io_counters(pernic=True)``), with one deliberate difference in which disks count; see
``is_counted_disk``.

CPU utilization is computed from our own deltas of the ``/proc/stat`` ``cpu`` line, with
psutil's formula, rather than a shared "since last call" state: the first read only primes the
delta and gives ``None``, never a meaningless ``0.0``.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any

LOOPBACK = b"lo"

#: /proc/diskstats counts 512-byte sectors whatever the device's real sector size.
SECTOR_BYTES = 512

#: Whole block devices that do not stand for I/O to storage of their own. psutil's
#: ``disk_io_counters(perdisk=False)`` sums every device under /sys/block, so a write through LVM
#: or dm-crypt (dm-N), software RAID (mdN) or a loop-mounted image counts twice (once on the
#: virtual device, once on the disk below), and zram/ram traffic, which is memory, counts as disk
#: I/O. Without them the sum is the bytes that reached real (or, in a VM, virtual-hardware)
#: disks, which is what the field is for.
VIRTUAL_DISK = re.compile(r"(?:loop|ram|zram|dm-|md)\d+$|md_")

_STAT_HEAD = 512  # the "cpu " line is the first, and at most ~230 bytes long


def is_counted_disk(name: str, sysfs_root: Path) -> bool:
    """A whole disk (listed in /sys/block, unlike partitions) that is not a virtual stack."""
    if VIRTUAL_DISK.match(name):
        return False
    # /proc/diskstats spells cciss/c0d0 with a slash, sysfs with a "!".
    return os.access(sysfs_root / "block" / name.replace("/", "!"), os.F_OK)


class _ProcFile:
    """A procfs file kept open and re-read whole (or its head) from offset 0."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        # seq_file hands out about a page per read(2) whatever we ask for, so this is only the
        # most we take per call, not a guess at the file's size.
        self._chunk = 65536

    def _open(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        return self._fd

    def _read(self, head: int | None) -> bytes:
        fd = self._open()
        if head is not None:
            return os.pread(fd, head, 0)
        data = os.pread(fd, self._chunk, 0)
        if not data:
            return data
        parts = [data]
        offset = len(data)
        while chunk := os.pread(fd, self._chunk, offset):
            parts.append(chunk)
            offset += len(chunk)
        return b"".join(parts) if len(parts) > 1 else data

    def read(self, head: int | None = None) -> bytes:
        """The file's text now; ``head`` bytes of it at most if given.

        One reopen on an OSError covers a descriptor gone bad (procfs entries can be torn down
        and recreated); a second failure is real and propagates.
        """
        try:
            return self._read(head)
        except OSError:
            self.close()
            return self._read(head)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def _meminfo_kib(text: bytes, key: bytes) -> int | None:
    """``key`` is b"\\nName:"; MemTotal, the first line, is looked up by the caller."""
    start = text.find(key)
    if start < 0:
        return None
    start += len(key)
    return int(text[start : text.index(b"k", start)])


class _NoWrap:
    """psutil's ``nowrap``: a per-device counter that goes backwards (the device was removed and
    re-added under the same name, or a 32-bit counter wrapped) keeps counting from its last
    value, so one re-created NIC does not make the summed counter fall and read as a reset to
    Prometheus's ``rate()``. The correction is dropped when the device goes away, as psutil's is.
    """

    def __init__(self) -> None:
        self._last: dict[bytes, tuple[int, int]] = {}
        self._carry: dict[bytes, tuple[int, int]] = {}

    def total(self, current: dict[bytes, tuple[int, int]]) -> tuple[int, int] | None:
        if not current:
            self._last = current
            self._carry.clear()
            return None
        last, carry = self._last, self._carry
        a_sum = b_sum = 0
        for key, (a, b) in current.items():
            prev = last.get(key)
            if prev is not None and (a < prev[0] or b < prev[1]):
                ca, cb = carry.get(key, (0, 0))
                carry[key] = (
                    ca + prev[0] if a < prev[0] else ca,
                    cb + prev[1] if b < prev[1] else cb,
                )
            if carry:
                ca, cb = carry.get(key, (0, 0))
                a += ca
                b += cb
            a_sum += a
            b_sum += b
        if carry:
            for key in [k for k in carry if k not in current]:
                del carry[key]
        self._last = current
        return a_sum, b_sum


#: Enough of /proc/loadavg for its three averages ("12345.12 12345.12 12345.12 ...").
_LOADAVG_HEAD = 64


class ProcfsHostSource:
    """CPU %, load, memory, swap, and cumulative disk and network byte counters."""

    name = "host"

    def __init__(self, procfs_root: Path = Path("/proc"), sysfs_root: Path = Path("/sys")) -> None:
        self._sysfs_root = Path(sysfs_root)
        root = Path(procfs_root)
        self._stat = _ProcFile(root / "stat")
        self._meminfo = _ProcFile(root / "meminfo")
        self._diskstats: _ProcFile | None = _ProcFile(root / "diskstats")
        self._netdev = _ProcFile(root / "net" / "dev")
        # Kept open like the others: os.getloadavg() opens and closes /proc/loadavg each call.
        self._loadavg = _ProcFile(root / "loadavg")
        self._last_cpu: tuple[int, int] | None = None
        # Whether a device name is a partition, virtual or a whole disk cannot change while the
        # name exists, so sysfs is asked once per name rather than once per tick.
        self._counted: dict[bytes, bool] = {}
        self._disk_wrap = _NoWrap()
        self._net_wrap = _NoWrap()

    def close(self) -> None:
        for f in (self._stat, self._meminfo, self._diskstats, self._netdev, self._loadavg):
            if f is not None:
                f.close()

    def _cpu_util_pct(self) -> float | None:
        head = self._stat.read(_STAT_HEAD)
        values = [int(v) for v in head[: head.index(b"\n")].split()[1:11]]
        # psutil's accounting: guest time is already in user/nice; iowait is idle.
        total = sum(values) - sum(values[8:10])
        busy = total - values[3] - (values[4] if len(values) > 4 else 0)
        last, self._last_cpu = self._last_cpu, (busy, total)
        if last is None:
            return None
        d_total = total - last[1]
        if d_total <= 0:
            # No tick of CPU time elapsed (reads closer than the kernel's accounting step).
            return None
        d_busy = busy - last[0]
        return round(min(100.0, max(0.0, 100.0 * d_busy / d_total)), 1)

    def _memory(self) -> tuple[float | None, float | None, float | None]:
        """Used and available memory and used swap, in MiB."""
        text = self._meminfo.read()
        if not text.startswith(b"MemTotal:"):
            raise ValueError(f"{self._meminfo.path}: does not start with MemTotal")
        total = int(text[9 : text.index(b"k", 9)])
        available = _meminfo_kib(text, b"\nMemAvailable:")
        swap_total = _meminfo_kib(text, b"\nSwapTotal:")
        swap_free = _meminfo_kib(text, b"\nSwapFree:")
        # MemAvailable exists since Linux 3.14; psutil estimated it on older kernels from
        # /proc/zoneinfo, which is not worth a guess on hosts that cannot run a current GPU driver.
        # total - available, as free(1) (procps-ng 4) and node dashboards count it, so
        # used + available = total and reclaimable page cache is not counted as used.
        used = None if available is None else (total - available) / 1024
        avail = None if available is None else available / 1024
        swap = None if swap_total is None or swap_free is None else (swap_total - swap_free) / 1024
        return used, avail, swap

    def _disk(self) -> tuple[int | None, int | None]:
        if self._diskstats is None:
            return None, None
        try:
            text = self._diskstats.read()
        except FileNotFoundError:
            # No /proc/diskstats (no block layer, or a sandboxed /proc): it will not appear
            # later; stop asking.
            self._diskstats = None
            return None, None
        counted = self._counted
        per_disk: dict[bytes, tuple[int, int]] = {}
        for line in text.splitlines():
            fields = line.split()
            if len(fields) < 10:
                # Partition lines of Linux 2.6 (7 fields); partitions are never counted.
                continue
            name = fields[2]
            ok = counted.get(name)
            if ok is None:
                ok = counted[name] = is_counted_disk(name.decode(), self._sysfs_root)
            if ok:
                per_disk[name] = (int(fields[5]) * SECTOR_BYTES, int(fields[9]) * SECTOR_BYTES)
        totals = self._disk_wrap.total(per_disk)
        return (None, None) if totals is None else totals

    def _net(self) -> tuple[int | None, int | None]:
        text = self._netdev.read()
        per_nic: dict[bytes, tuple[int, int]] = {}
        for line in text.splitlines()[2:]:
            name, _, counters = line.rpartition(b":")
            nic = name.strip()
            if nic == LOOPBACK:
                continue
            fields = counters.split()
            per_nic[nic] = (int(fields[0]), int(fields[8]))
        totals = self._net_wrap.total(per_nic)
        return (None, None) if totals is None else totals

    def _load(self) -> tuple[float, float, float]:
        """The 1, 5 and 15 minute load averages, as ``os.getloadavg()`` gives them."""
        first = self._loadavg.read(_LOADAVG_HEAD).split(None, 3)
        return float(first[0]), float(first[1]), float(first[2])

    def read(self) -> dict[str, Any]:
        load1, load5, load15 = self._load()
        used, available, swap = self._memory()
        disk_read, disk_write = self._disk()
        net_rx, net_tx = self._net()
        return {
            "cpu_util_pct": self._cpu_util_pct(),
            "load_1m": load1,
            "load_5m": load5,
            "load_15m": load15,
            "memory_used_mib": used,
            "memory_available_mib": available,
            "swap_used_mib": swap,
            "disk_read_bytes": disk_read,
            "disk_write_bytes": disk_write,
            "net_rx_bytes": net_rx,
            "net_tx_bytes": net_tx,
        }
