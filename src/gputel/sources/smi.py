"""NVIDIA GPUs through ``nvidia-smi --query-gpu`` (``GPUTEL_BACKEND=smi``, and ``auto``'s fallback).

For nodes where the Python binding cannot load NVML (``libnvidia-ml.so.1`` outside the loader's
path, a container that ships ``nvidia-smi`` but not the library where pynvml looks) while
``nvidia-smi`` works. One spawn per read: the full read queries every field in one process,
the agent's light read only utilization. It costs a process start per tick (measured in
``docs/performance.md``); NVML is the better source wherever it loads.

nvidia-smi writes ``[N/A]``, ``[Not Supported]``, ``[Unknown Error]`` (and other bracketed
words) where a value is missing: each is an empty value. Fields nvidia-smi does not offer
(PCIe throughput, the energy counter) are always empty; a field this nvidia-smi does not know
(an older driver) is dropped from the query once, at open. A selected GPU missing from the
output (nvidia-smi could not get its handle, it fell off the bus) is reported lost for that
read.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gputel.schema import GpuReading
from gputel.sources.base import GpuIdentity, GpuSelectionError, GpuSourceError

log = logging.getLogger("gputel.smi")

#: A process that has not answered by then is a hung driver, not a slow one.
DEFAULT_TIMEOUT_S = 10.0
_FORMAT = "--format=csv,noheader,nounits"
_INVALID_FIELD = re.compile(r'Field "([^"]+)" is not a valid field to query')


def _number(text: str) -> float | None:
    """A value cell, or None for nvidia-smi's placeholders (``[N/A]``, ``N/A``, ``[...]``)."""
    text = text.strip()
    if not text or text.startswith("[") or text.upper() == "N/A":
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _pstate(text: str) -> float | None:
    text = text.strip()
    if len(text) >= 2 and text[0] in "Pp" and text[1:].isdigit():
        value = int(text[1:])
        return float(value) if value <= 15 else None  # P32 is "unknown"
    return None


def _bitmask(text: str) -> float | None:
    text = text.strip()
    try:
        return float(int(text, 16 if text.lower().startswith("0x") else 10))
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class _Column:
    attr: str
    names: tuple[str, ...]
    """nvidia-smi field names, newest first (the next is tried if this one is unknown)."""
    parse: Callable[[str], float | None] = _number
    integer: bool = False


#: The GpuReading fields nvidia-smi offers, in the units it prints them with ``nounits``.
_COLUMNS: tuple[_Column, ...] = (
    _Column("utilization_gpu_pct", ("utilization.gpu",)),
    _Column("utilization_memory_pct", ("utilization.memory",)),
    _Column("memory_used_mib", ("memory.used",)),
    _Column("memory_total_mib", ("memory.total",)),
    _Column("temperature_c", ("temperature.gpu",)),
    _Column("power_w", ("power.draw.average", "power.draw")),
    _Column("power_limit_w", ("enforced.power.limit", "power.limit")),
    _Column("sm_clock_mhz", ("clocks.sm",)),
    _Column("memory_clock_mhz", ("clocks.mem",)),
    _Column("fan_speed_pct", ("fan.speed",)),
    _Column("performance_state", ("pstate",), _pstate, integer=True),
    _Column(
        "clock_event_reasons",
        ("clocks_event_reasons.active", "clocks_throttle_reasons.active"),
        _bitmask,
        integer=True,
    ),
    _Column("ecc_corrected_volatile", ("ecc.errors.corrected.volatile.total",), integer=True),
    _Column("ecc_uncorrected_volatile", ("ecc.errors.uncorrected.volatile.total",), integer=True),
)


class _Smi:
    """Runs ``nvidia-smi`` with a deadline; one line of output per GPU, split into cells."""

    def __init__(self, exe: str, timeout_s: float) -> None:
        self.exe = exe
        self.timeout_s = timeout_s

    def query(self, fields: Sequence[str]) -> tuple[list[list[str]], str]:
        """(rows of cells, stderr). Raises GpuSourceError when nvidia-smi fails or hangs."""
        cmd = [self.exe, f"--query-gpu={','.join(fields)}", _FORMAT]
        try:
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace"
            )
        except OSError as exc:
            raise GpuSourceError(f"cannot run {self.exe}: {exc.strerror or exc}") from None
        try:
            out, err = proc.communicate(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()  # a process stuck in the driver may not die; never wait for it
            raise GpuSourceError(
                f"nvidia-smi did not answer within {self.timeout_s:g}s (a hung driver?)"
            ) from None
        if proc.returncode != 0:
            text = " ".join((err or out).split()) or f"exit status {proc.returncode}"
            raise GpuSourceError(f"nvidia-smi failed: {text}")
        rows = [[c.strip() for c in line.split(",")] for line in out.splitlines() if line.strip()]
        return [r for r in rows if len(r) == len(fields)], err


class SmiGpuSource:
    """The selected NVIDIA GPUs through nvidia-smi; build with :func:`open_smi`."""

    name = "smi"

    def __init__(
        self,
        smi: _Smi,
        devices: list[GpuIdentity],
        columns: list[tuple[_Column, str]],
        notices: list[str],
    ) -> None:
        self._smi = smi
        self._devices = devices
        self._columns = columns
        self.notices = notices

    def devices(self) -> list[GpuIdentity]:
        return list(self._devices)

    def _rows(self, fields: list[str]) -> dict[int, list[str]]:
        rows, _ = self._smi.query(["index", *fields])
        out: dict[int, list[str]] = {}
        for cells in rows:
            if cells[0].isdigit():
                out[int(cells[0])] = cells[1:]
        return out

    def read_utilization(self) -> dict[int, float | None]:
        rows = self._rows(["utilization.gpu"])
        return {
            d.index: _number(rows[d.index][0]) if d.index in rows else None for d in self._devices
        }

    def read_light(self) -> list[GpuReading]:
        """The full read: one ``nvidia-smi`` spawn costs the same whatever it is asked."""
        return self.read()

    def read(self) -> list[GpuReading]:
        rows = self._rows([name for _, name in self._columns])
        readings: list[GpuReading] = []
        for d in self._devices:
            cells = rows.get(d.index)
            if cells is None:
                readings.append(GpuReading(d.index, d.uuid, d.name, lost=True))
                continue
            reading = GpuReading(d.index, d.uuid, d.name)
            for (column, _), cell in zip(self._columns, cells, strict=True):
                value = column.parse(cell)
                if value is not None and column.integer:
                    setattr(reading, column.attr, int(value))
                else:
                    setattr(reading, column.attr, value)
            readings.append(reading)
        return readings

    def read_energy_j(self) -> dict[int, float | None]:
        """nvidia-smi has no energy counter: empty, never an estimate (see NvmlGpuSource)."""
        return {d.index: None for d in self._devices}

    def close(self) -> None:
        return None


def find_smi() -> str | None:
    """The nvidia-smi on PATH, if any."""
    return shutil.which("nvidia-smi")


def open_smi(
    selected: tuple[int, ...] | None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> SmiGpuSource:
    """List the GPUs and settle which fields this nvidia-smi knows.

    Raises GpuSourceError with one line when nvidia-smi is missing, fails, or lists no GPU, and
    GpuSelectionError for a selected index that does not exist.
    """
    exe = find_smi()
    if exe is None:
        raise GpuSourceError(
            "nvidia-smi not found on PATH: install the NVIDIA driver utilities, or use "
            "GPUTEL_BACKEND=sim/none"
        )
    smi = _Smi(exe, timeout_s)
    rows, _ = smi.query(["index", "uuid", "name", "mig.mode.current"])
    listed = {int(r[0]): r for r in rows if r[0].isdigit()}
    if not listed:
        raise GpuSourceError("nvidia-smi lists no NVIDIA GPU on this node")
    indices = sorted(listed) if selected is None else sorted(set(selected))
    missing = [i for i in indices if i not in listed]
    if missing:
        raise GpuSelectionError(
            f"GPUTEL_GPUS selects GPU {', '.join(map(str, missing))}, but nvidia-smi lists "
            f"{', '.join(map(str, sorted(listed)))}: fix GPUTEL_GPUS"
        )
    devices = [GpuIdentity(i, listed[i][1], listed[i][2]) for i in indices]
    notices = [
        f"GPU {i} ({listed[i][1]}) is in MIG mode: nvidia-smi gives no utilization for it, so "
        "its activity cannot be measured and only allocations and the operator mode (gputel "
        "start) start telemetry for it"
        for i in indices
        if listed[i][3].strip().lower() == "enabled"
    ]
    return SmiGpuSource(smi, devices, _known_columns(smi), notices)


def _known_columns(smi: _Smi) -> list[tuple[_Column, str]]:
    """Each column with the first of its field names this nvidia-smi accepts."""
    choice = {c.attr: 0 for c in _COLUMNS}
    for _ in range(2 * len(_COLUMNS)):
        columns = [(c, c.names[choice[c.attr]]) for c in _COLUMNS if choice[c.attr] < len(c.names)]
        try:
            smi.query(["index", *(name for _, name in columns)])
            return columns
        except GpuSourceError as exc:
            match = _INVALID_FIELD.search(str(exc))
            unknown = match.group(1) if match else None
            bad = next((c for c, name in columns if name == unknown), None)
            if bad is None:
                raise
            log.info("nvidia-smi does not know %s; trying without it", unknown)
            choice[bad.attr] += 1
    raise GpuSourceError("nvidia-smi refused every field list")
