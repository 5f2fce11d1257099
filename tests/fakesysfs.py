"""Fake sysfs trees for the RAPL and hwmon sources, built under a test's ``tmp_path``.

The layout mirrors the kernel's: ``class/powercap/intel-rapl:N[:M]/{name,energy_uj,
max_energy_range_uj}`` and ``class/hwmon/hwmonN/{name,tempK_input,tempK_label}``. Values are
written as the kernel writes them: decimal text with a trailing newline.

Unreadable files: since CVE-2020-8694 ``energy_uj`` is 0400 root. Tests here may run as root,
which reads a 0400 (or 0000) file anyway, so :func:`deny_reads` both removes every permission
bit (a real EACCES for a non-root user) and wraps ``open`` in the source module so the named
paths raise PermissionError whoever runs the test.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

DEFAULT_MAX_RANGE_UJ = 262_143_328_850


def _write(path: Path, value: object) -> None:
    path.write_text(f"{value}\n")


def add_rapl_zone(
    root: Path,
    zone: str,
    name: str,
    energy_uj: int = 0,
    max_range_uj: int | None = DEFAULT_MAX_RANGE_UJ,
) -> Path:
    """``class/powercap/<zone>`` (e.g. ``intel-rapl:0``, ``intel-rapl:0:2``) with its files."""
    path = root / "class" / "powercap" / zone
    path.mkdir(parents=True, exist_ok=True)
    _write(path / "name", name)
    _write(path / "energy_uj", energy_uj)
    if max_range_uj is not None:
        _write(path / "max_energy_range_uj", max_range_uj)
    return path


def set_energy(zone_path: Path, energy_uj: int) -> None:
    _write(zone_path / "energy_uj", energy_uj)


def add_hwmon_chip(
    root: Path,
    hwmon: str,
    name: str,
    temps: dict[int, tuple[int | str, str | None]],
    device: str | None = None,
) -> Path:
    """``class/hwmon/<hwmon>`` with ``name`` and ``temp<N>_input`` (millidegrees) and labels.

    ``temps`` maps N to (input text or millidegrees, label or None). ``device`` makes a
    ``device`` symlink whose target ends in that name, as the kernel's points at the PCI device.
    """
    path = root / "class" / "hwmon" / hwmon
    path.mkdir(parents=True, exist_ok=True)
    _write(path / "name", name)
    for number, (value, label) in temps.items():
        _write(path / f"temp{number}_input", value)
        if label is not None:
            _write(path / f"temp{number}_label", label)
    if device is not None:
        target = root / "devices" / device
        target.mkdir(parents=True, exist_ok=True)
        os.symlink(target, path / "device")
    return path


def deny_reads(monkeypatch: pytest.MonkeyPatch, module: ModuleType, paths: Iterable[Path]) -> None:
    """Make ``paths`` unreadable for ``module``'s ``open``, as a 0400 root file is for others."""
    denied = {str(p) for p in paths}
    for p in denied:
        os.chmod(p, 0)
    real_open = builtins.open

    def guarded_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file) in denied:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(module, "open", guarded_open, raising=False)
