"""CPU package and DRAM power from the powercap (RAPL) energy counters.

Zones are found once at start under ``<sysfs_root>/class/powercap``: ``intel-rapl:N`` zones whose
``name`` starts with ``package`` (Intel, and AMD Zen through the same driver), and
``intel-rapl:N:M`` subzones named ``dram``. Zones are chosen by ``name`` rather than by number
because ``intel-rapl:1`` is ``psys`` (the whole platform) on many laptops and would double-count;
``intel-rapl-mmio`` mirrors the package zone and is ignored for the same reason.

Power is the energy delta over the injected monotonic clock between two reads, so the first read
has no power. Counters wrap at ``max_energy_range_uj`` (every few minutes at high power on some
parts) and the wrap is undone (the rule of ``gputel.energy.counter_delta``).
``cpu_package_energy_j`` counts joules since the source started, summed over packages; it is 0.0
at the first successful read, the counter's origin.

Failure policy: no powercap directory (VMs, most ARM hosts) → every field None and the source is
up; ``energy_uj`` unreadable because it is root-only (CVE-2020-8694) → every field None and one
warning naming the fix; any other read error raises, so the sampler marks ``rapl`` down for that
tick. Reads of all zones finish before any state changes, so a failed tick never corrupts the
next delta.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gputel.energy import counter_delta

log = logging.getLogger("gputel.rapl")

PERMISSION_WARNING = (
    "RAPL energy_uj is readable by root only (CVE-2020-8694): install gputel's udev/tmpfiles "
    "rule (install.sh) to grant group gputel read access"
)

_PACKAGE_ZONE = re.compile(r"^intel-rapl:\d+$")
_SUBZONE = re.compile(r"^intel-rapl:\d+:\d+$")
_UJ_PER_J = 1_000_000.0


def _read_int(path: Path) -> int:
    with open(path, "rb") as fh:
        return int(fh.read().strip())


def _read_name(path: Path) -> str | None:
    try:
        with open(path / "name", "rb") as fh:
            return fh.read().decode("ascii", "replace").strip()
    except OSError:
        return None


class _Zone:
    """One energy counter and its last value."""

    __slots__ = ("energy_path", "kind", "last_uj", "max_range_uj")

    def __init__(self, path: Path, kind: str) -> None:
        self.energy_path = path / "energy_uj"
        self.kind = kind
        self.last_uj: int | None = None
        try:
            self.max_range_uj: int | None = _read_int(path / "max_energy_range_uj")
        except (OSError, ValueError):
            self.max_range_uj = None

    def delta_uj(self, value: int) -> float | None:
        """Microjoules since the last value, undoing one wrap; None without a usable baseline."""
        return counter_delta(self.last_uj, value, self.max_range_uj)


def discover_zones(sysfs_root: Path) -> list[_Zone]:
    base = sysfs_root / "class" / "powercap"
    try:
        entries = sorted(p.name for p in base.iterdir())
    except OSError:
        return []
    zones: list[_Zone] = []
    for entry in entries:
        path = base / entry
        name = _read_name(path)
        if name is None:
            continue
        if _PACKAGE_ZONE.match(entry) and name.startswith("package"):
            zones.append(_Zone(path, "package"))
        elif _SUBZONE.match(entry) and name == "dram":
            zones.append(_Zone(path, "dram"))
    return zones


class RaplSource:
    """``cpu_package_power_w``, ``cpu_package_energy_j`` and ``dram_power_w``."""

    name = "rapl"

    def __init__(self, sysfs_root: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._zones = discover_zones(Path(sysfs_root))
        self._has_package = any(z.kind == "package" for z in self._zones)
        self._has_dram = any(z.kind == "dram" for z in self._zones)
        self._last_t: float | None = None
        self._energy_j = 0.0
        self._warned = False

    @property
    def available(self) -> bool:
        """Whether any package zone exists (not whether it is readable)."""
        return self._has_package

    @staticmethod
    def _empty() -> dict[str, Any]:
        return {"cpu_package_power_w": None, "cpu_package_energy_j": None, "dram_power_w": None}

    def read(self) -> dict[str, Any]:
        if not self._zones:
            return self._empty()
        now = self._clock()
        values: list[int] = []
        for zone in self._zones:
            try:
                values.append(_read_int(zone.energy_path))
            except PermissionError:
                if not self._warned:
                    self._warned = True
                    log.warning("%s (cannot read %s)", PERMISSION_WARNING, zone.energy_path)
                return self._empty()
        dt = None if self._last_t is None else now - self._last_t
        package_uj: float | None = 0.0
        dram_uj: float | None = 0.0
        for zone, value in zip(self._zones, values, strict=True):
            delta = zone.delta_uj(value)
            zone.last_uj = value
            if zone.kind == "package":
                package_uj = None if delta is None or package_uj is None else package_uj + delta
            else:
                dram_uj = None if delta is None or dram_uj is None else dram_uj + delta
        self._last_t = now
        if package_uj is not None:
            self._energy_j += package_uj / _UJ_PER_J

        def watts(uj: float | None) -> float | None:
            if uj is None or dt is None or dt <= 0:
                return None
            return uj / _UJ_PER_J / dt

        return {
            "cpu_package_power_w": watts(package_uj) if self._has_package else None,
            "cpu_package_energy_j": self._energy_j if self._has_package else None,
            "dram_power_w": watts(dram_uj) if self._has_dram else None,
        }
