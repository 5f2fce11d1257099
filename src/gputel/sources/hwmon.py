"""Temperatures from ``<sysfs_root>/class/hwmon``: every sensor, and the hottest CPU package.

The sensor files are found once: a directory scan every second for days would cost more than the
reads. They are looked for again only when a read says the file is gone (a driver reloaded, a
device unplugged), at most every ``REDISCOVER_AFTER_S``.

Failure policy: a sensor that answers with an error for this tick (``ENODATA`` from a sleeping
NVMe or a runtime-suspended GPU, ``EIO``, garbage) is left out of this tick's readings rather
than failing the source; a host without hwmon gives no sensors and ``cpu_temperature_c`` None,
and the source stays up. Nothing here raises on a read.

Chips are keyed by their ``name``; when several share a name (two ``nvme`` drives, two sockets'
``coretemp``), the device they belong to, or their ``hwmonN`` directory, is appended so that the
(chip, sensor) keys stay unique.
"""

from __future__ import annotations

import errno
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CPU_CHIPS = frozenset({"coretemp", "k10temp", "zenpower"})
REDISCOVER_AFTER_S = 30.0

_TEMP_INPUT = re.compile(r"^temp(\d+)_input$")
_GONE = frozenset({errno.ENOENT, errno.ENODEV, errno.ENXIO})


@dataclass(frozen=True, slots=True)
class _Sensor:
    chip: str
    """The chip's unique display name (the key's first half)."""
    driver: str
    """The chip's ``name`` file, which says what kind of sensor it is."""
    label: str
    path: Path


def _read_text(path: Path) -> str | None:
    try:
        with open(path, "rb") as fh:
            return fh.read().decode("utf-8", "replace").strip()
    except OSError:
        return None


def _chip_files_dir(hwmon_dir: Path) -> tuple[str, Path] | None:
    """The chip's name and the directory holding its ``temp*`` files.

    Old drivers keep ``name`` and the attributes in ``hwmonN/device/`` instead of ``hwmonN/``.
    """
    for directory in (hwmon_dir, hwmon_dir / "device"):
        name = _read_text(directory / "name")
        if name:
            return name, directory
    return None


def _device_id(hwmon_dir: Path) -> str | None:
    try:
        return os.path.basename(os.readlink(hwmon_dir / "device"))
    except OSError:
        return None


def discover_sensors(sysfs_root: Path) -> list[_Sensor]:
    base = sysfs_root / "class" / "hwmon"
    try:
        dirs = sorted(
            (p for p in base.iterdir() if p.name.startswith("hwmon")),
            key=lambda p: (len(p.name), p.name),
        )
    except OSError:
        return []
    chips: list[tuple[Path, str, Path]] = []
    for hwmon_dir in dirs:
        found = _chip_files_dir(hwmon_dir)
        if found is not None:
            chips.append((hwmon_dir, found[0], found[1]))
    name_counts: dict[str, int] = {}
    for _hwmon_dir, name, _files in chips:
        name_counts[name] = name_counts.get(name, 0) + 1
    sensors: list[_Sensor] = []
    for hwmon_dir, name, files in chips:
        chip = name
        if name_counts[name] > 1:
            chip = f"{name}-{_device_id(hwmon_dir) or hwmon_dir.name}"
        try:
            entries = os.listdir(files)
        except OSError:
            continue
        numbered = sorted(
            (int(m.group(1)), entry) for entry in entries if (m := _TEMP_INPUT.match(entry))
        )
        labels_seen: set[str] = set()
        for number, entry in numbered:
            label = _read_text(files / f"temp{number}_label") or f"temp{number}"
            if label in labels_seen:
                label = f"{label} (temp{number})"
            labels_seen.add(label)
            sensors.append(_Sensor(chip, name, label, files / entry))
    return sensors


def _is_package_label(driver: str, label: str) -> bool:
    if driver == "coretemp":
        return label.startswith("Package id")
    return label in ("Tdie", "Tctl")


def cpu_temperature(readings: list[tuple[_Sensor, float]]) -> float | None:
    """The hottest CPU package: per chip its package sensors when it has them, else all."""
    per_chip: dict[str, list[tuple[_Sensor, float]]] = {}
    for sensor, value in readings:
        if sensor.driver in CPU_CHIPS:
            per_chip.setdefault(sensor.chip, []).append((sensor, value))
    best: float | None = None
    for chip_readings in per_chip.values():
        labels = {s.label: v for s, v in chip_readings}
        if "Tdie" in labels:
            # Tctl may carry a fan-control offset (+27 °C on first Threadrippers); Tdie does not.
            candidates = [labels["Tdie"]]
        else:
            candidates = [v for s, v in chip_readings if _is_package_label(s.driver, s.label)]
        if not candidates:
            candidates = [v for _s, v in chip_readings]
        hottest = max(candidates)
        best = hottest if best is None else max(best, hottest)
    return best


class HwmonSource:
    """``hwmon_temperatures_c`` {(chip, sensor): °C} and ``cpu_temperature_c``."""

    name = "hwmon"

    def __init__(self, sysfs_root: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self._root = Path(sysfs_root)
        self._clock = clock
        self._sensors = discover_sensors(self._root)
        self._discovered_at = clock()
        self._stale = False

    def _maybe_rediscover(self) -> None:
        now = self._clock()
        if self._stale and now - self._discovered_at >= REDISCOVER_AFTER_S:
            self._sensors = discover_sensors(self._root)
            self._discovered_at = now
            self._stale = False

    def read(self) -> dict[str, Any]:
        self._maybe_rediscover()
        readings: list[tuple[_Sensor, float]] = []
        for sensor in self._sensors:
            try:
                with open(sensor.path, "rb") as fh:
                    millideg = int(fh.read().strip())
            except OSError as exc:
                if exc.errno in _GONE:
                    self._stale = True
                continue
            except ValueError:
                continue
            readings.append((sensor, millideg / 1000.0))
        return {
            "hwmon_temperatures_c": {(s.chip, s.label): v for s, v in readings},
            "cpu_temperature_c": cpu_temperature(readings),
        }
