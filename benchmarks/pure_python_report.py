"""The pure-Python `gputel report` of earlier versions, kept only as the benchmark's baseline.

Everything is streamed: each row updates fixed-size accumulators (sums, maxima, a 0.1 %-wide
utilization histogram for p95, a small counter of tick spacings for gap detection), so memory does
not grow with the length of the recording.

A *session* is one telemetry run of the recorder. The recorder starts a new file per session and
also rolls files over at a UTC day change or a size cap; a file whose first row follows the
previous file's last row within a few intervals continues that session, anything later starts a
new one. Files of different hosts (the part of the name after the timestamp) never mix.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gputel.schema import CLOCK_EVENT_REASONS
from pure_python_csv import (
    GPU_REQUIRED,
    ReportFilter,
    as_float,
    find_csv_files,
    first_timestamp,
    gpu_rows,
    naming,
    parse_timestamp,
    read_csv,
)

JOULES_PER_KWH = 3.6e6
_HOST_KEY_RE = re.compile(r"^(?:gpu|host)-\d{8}T\d{6}(?:\.\d+)?Z?-?(.*?)\.csv")


def host_key(path: Path) -> str:
    """The host part of a recorder file name (``gpu-20261122T034512Z-node01.csv`` → node01)."""
    m = _HOST_KEY_RE.match(path.name)
    return m.group(1) if m else ""


class UtilHistogram:
    """Utilization percentiles at 0.1 % resolution in constant memory."""

    __slots__ = ("bins", "n")

    def __init__(self) -> None:
        self.bins = [0] * 1001
        self.n = 0

    def add(self, pct: float) -> None:
        self.bins[min(1000, max(0, round(pct * 10)))] += 1
        self.n += 1

    def percentile(self, q: float) -> float | None:
        if not self.n:
            return None
        rank = q / 100 * self.n
        seen = 0
        for i, count in enumerate(self.bins):
            seen += count
            if seen >= rank and count:
                return i / 10
        return 100.0


def _interval_from(spacings: Counter[float]) -> float | None:
    """The recording interval: the most common spacing between ticks."""
    if not spacings:
        return None
    return spacings.most_common(1)[0][0]


def _missing(spacings: Counter[float], interval: float | None) -> int:
    if not interval:
        return 0
    return sum((round(d / interval) - 1) * n for d, n in spacings.items() if d > 1.5 * interval)


@dataclass
class GpuStats:
    """Accumulates GPU rows of one scope (a GPU in a session, or an allocation)."""

    samples: int = 0
    first: float | None = None
    last: float | None = None
    util_sum: float = 0.0
    util_n: int = 0
    util_max: float | None = None
    hist: UtilHistogram = field(default_factory=UtilHistogram)
    memory_peak_mib: float | None = None
    temperature_max_c: float | None = None
    power_sum: float = 0.0
    power_n: int = 0
    power_peak_w: float | None = None
    energy_j: float = 0.0
    energy_known: bool = False
    throttle_samples: Counter[str] = field(default_factory=Counter)
    spacings: Counter[float] = field(default_factory=Counter)
    gpus: set[int] = field(default_factory=set)
    lost_samples: int = 0

    def add(
        self,
        ts: float,
        gpu: int,
        util: float | None,
        mem: float | None,
        temp: float | None,
        power: float | None,
        reasons: int | None,
        energy_delta: float | None,
        spacing: float | None,
        lost: bool,
    ) -> None:
        self.samples += 1
        self.gpus.add(gpu)
        if self.first is None:
            self.first = ts
        self.last = ts
        if spacing is not None:
            self.spacings[round(spacing, 3)] += 1
        if lost:
            self.lost_samples += 1
        if util is not None:
            self.util_sum += util
            self.util_n += 1
            self.hist.add(util)
            self.util_max = util if self.util_max is None else max(self.util_max, util)
        if mem is not None:
            self.memory_peak_mib = (
                mem if self.memory_peak_mib is None else max(self.memory_peak_mib, mem)
            )
        if temp is not None:
            self.temperature_max_c = (
                temp if self.temperature_max_c is None else max(self.temperature_max_c, temp)
            )
        if power is not None:
            self.power_sum += power
            self.power_n += 1
            self.power_peak_w = (
                power if self.power_peak_w is None else max(self.power_peak_w, power)
            )
        if energy_delta is not None:
            self.energy_j += energy_delta
            self.energy_known = True
        if reasons:
            for bit, name in CLOCK_EVENT_REASONS:
                if reasons & bit:
                    self.throttle_samples[name] += 1

    def to_dict(self, interval: float | None) -> dict[str, Any]:
        interval = interval or _interval_from(self.spacings)
        duration = None
        if self.first is not None and self.last is not None:
            duration = self.last - self.first + (interval or 0.0)
        return {
            "samples": self.samples,
            "missing": _missing(self.spacings, interval),
            "lost_samples": self.lost_samples,
            "duration_s": _round(duration),
            "util_mean_pct": _round(self.util_sum / self.util_n if self.util_n else None),
            "util_p95_pct": self.hist.percentile(95),
            "util_max_pct": self.util_max,
            "memory_peak_mib": self.memory_peak_mib,
            "temperature_max_c": self.temperature_max_c,
            "energy_j": _round(self.energy_j if self.energy_known else None),
            "energy_kwh": _round(self.energy_j / JOULES_PER_KWH if self.energy_known else None, 6),
            "power_mean_w": _round(self.power_sum / self.power_n if self.power_n else None),
            "power_peak_w": self.power_peak_w,
            "throttle_s": {
                name: _round(n * interval) if interval else None
                for name, n in sorted(self.throttle_samples.items())
            },
        }


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


@dataclass
class HostStats:
    samples: int = 0
    first: float | None = None
    last: float | None = None
    cpu_sum: float = 0.0
    cpu_n: int = 0
    rapl_energy_j: float = 0.0
    rapl_known: bool = False
    spacings: Counter[float] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        interval = _interval_from(self.spacings)
        return {
            "samples": self.samples,
            "missing": _missing(self.spacings, interval),
            "cpu_util_mean_pct": _round(self.cpu_sum / self.cpu_n if self.cpu_n else None),
            "rapl_energy_j": _round(self.rapl_energy_j if self.rapl_known else None),
        }


@dataclass
class Session:
    host: str
    files: list[str] = field(default_factory=list)
    first: float | None = None
    last: float | None = None
    gpus: dict[int, GpuStats] = field(default_factory=dict)
    identity: dict[int, tuple[str, str]] = field(default_factory=dict)


@dataclass
class _GpuLast:
    ts: float
    energy: float | None
    power: float | None
    file_no: int


def _energy_delta(
    prev: _GpuLast | None,
    ts: float,
    energy: float | None,
    power: float | None,
    file_no: int,
    max_gap: float,
) -> float | None:
    """Joules between two rows of one GPU: the counter delta within a file, else ∫ power dt."""
    if prev is None:
        return None
    if prev.file_no == file_no and energy is not None and prev.energy is not None:
        return max(0.0, energy - prev.energy)
    dt = ts - prev.ts
    if power is not None and prev.power is not None and 0 < dt <= max_gap:
        return (power + prev.power) / 2 * dt
    return None


def _continuation_gap(spacings: Counter[float]) -> float:
    interval = _interval_from(spacings) or 1.0
    return max(2.5 * interval, 2.0)


def _order_files(files: Iterable[Path]) -> dict[str, list[tuple[float, Path]]]:
    by_host: dict[str, list[tuple[float, Path]]] = {}
    for path in files:
        ts = first_timestamp(path)
        if ts is None:
            continue
        by_host.setdefault(host_key(path), []).append((ts, path))
    for entries in by_host.values():
        entries.sort()
    return by_host


def _gpu_sessions(files: list[Path], flt: ReportFilter) -> tuple[list[Session], dict[str, Any]]:
    sessions: list[Session] = []
    allocations: dict[str, GpuStats] = {}
    alloc_bounds: dict[str, list[float]] = {}
    for host, entries in _order_files(files).items():
        session: Session | None = None
        last_ts: dict[int, _GpuLast] = {}
        session_spacing: Counter[float] = Counter()
        prev_tick: float | None = None
        alloc_last: dict[tuple[str, int], float] = {}
        for file_no, (start_ts, path) in enumerate(entries):
            if (
                session is None
                or session.last is None
                or start_ts - session.last > _continuation_gap(session_spacing)
            ):
                session = Session(host=host)
                sessions.append(session)
                last_ts = {}
                session_spacing = Counter()
                prev_tick = None
            session.files.append(str(path))
            max_gap = _continuation_gap(session_spacing)
            with naming(path):
                for f in read_csv(path, required=GPU_REQUIRED):
                    c = f.columns
                    i_util = c["utilization_gpu_pct"]
                    i_mem, i_temp = c.get("memory_used_mib"), c.get("temperature_c")
                    i_pow, i_en = c.get("power_w"), c.get("energy_j")
                    i_rsn, i_alloc = c.get("clock_event_reasons"), c.get("allocations")
                    i_uuid, i_name, i_lost = c.get("uuid"), c.get("name"), c.get("lost")
                    for ts, gpu, row in gpu_rows(f, flt):
                        if prev_tick is not None and ts > prev_tick:
                            session_spacing[round(ts - prev_tick, 3)] += 1
                        if prev_tick is None or ts > prev_tick:
                            prev_tick = ts
                        util = as_float(row[i_util])
                        mem = as_float(row[i_mem]) if i_mem is not None else None
                        temp = as_float(row[i_temp]) if i_temp is not None else None
                        power = as_float(row[i_pow]) if i_pow is not None else None
                        energy = as_float(row[i_en]) if i_en is not None else None
                        reasons_text = row[i_rsn] if i_rsn is not None else ""
                        reasons = int(reasons_text) if reasons_text else None
                        lost = i_lost is not None and row[i_lost] == "1"
                        prev = last_ts.get(gpu)
                        delta = _energy_delta(prev, ts, energy, power, file_no, max_gap)
                        spacing = ts - prev.ts if prev is not None else None
                        last_ts[gpu] = _GpuLast(ts, energy, power, file_no)
                        if session.first is None:
                            session.first = ts
                        session.last = ts
                        if gpu not in session.identity and i_uuid is not None:
                            session.identity[gpu] = (row[i_uuid], row[i_name] if i_name else "")
                        ids = (
                            row[i_alloc].split(";") if i_alloc is not None and row[i_alloc] else []
                        )
                        if flt.allocation is None:
                            session.gpus.setdefault(gpu, GpuStats()).add(
                                ts, gpu, util, mem, temp, power, reasons, delta, spacing, lost
                            )
                        for alloc_id in ids:
                            if flt.allocation is not None and alloc_id != flt.allocation:
                                continue
                            stats = allocations.setdefault(alloc_id, GpuStats())
                            key = (alloc_id, gpu)
                            a_spacing = ts - alloc_last[key] if key in alloc_last else None
                            alloc_last[key] = ts
                            stats.add(
                                ts,
                                gpu,
                                util,
                                mem,
                                temp,
                                power,
                                reasons,
                                delta,
                                a_spacing,
                                lost,
                            )
                            bounds = alloc_bounds.setdefault(alloc_id, [ts, ts])
                            bounds[0] = min(bounds[0], ts)
                            bounds[1] = max(bounds[1], ts)
    alloc_out: dict[str, Any] = {}
    for alloc_id, stats in allocations.items():
        d = stats.to_dict(None)
        d["gpus"] = sorted(stats.gpus)
        d["start"] = alloc_bounds[alloc_id][0]
        d["end"] = alloc_bounds[alloc_id][1]
        alloc_out[alloc_id] = d
    return sessions, alloc_out


def _host_sessions(files: list[Path], flt: ReportFilter) -> list[tuple[str, HostStats]]:
    out: list[tuple[str, HostStats]] = []
    for host, entries in _order_files(files).items():
        stats: HostStats | None = None
        for _, path in entries:
            with naming(path):
                for f in read_csv(path):
                    c = f.columns
                    i_ts, i_cpu = c["timestamp"], c.get("cpu_util_pct")
                    i_pw, i_en = c.get("cpu_package_power_w"), c.get("cpu_package_energy_j")
                    prev_e: float | None = None
                    prev_p: tuple[float, float] | None = None
                    for row in f.rows:
                        ts = parse_timestamp(row[i_ts])
                        if not flt.keeps_time(ts):
                            continue
                        if (
                            stats is None
                            or stats.last is None
                            or ts - stats.last > _continuation_gap(stats.spacings)
                        ):
                            stats = HostStats()
                            out.append((host, stats))
                            prev_e = None
                            prev_p = None
                        if stats.last is not None:
                            stats.spacings[round(ts - stats.last, 3)] += 1
                        stats.samples += 1
                        if stats.first is None:
                            stats.first = ts
                        stats.last = ts
                        cpu = as_float(row[i_cpu]) if i_cpu is not None else None
                        if cpu is not None:
                            stats.cpu_sum += cpu
                            stats.cpu_n += 1
                        energy = as_float(row[i_en]) if i_en is not None else None
                        power = as_float(row[i_pw]) if i_pw is not None else None
                        if energy is not None and prev_e is not None:
                            stats.rapl_energy_j += max(0.0, energy - prev_e)
                            stats.rapl_known = True
                        elif power is not None and prev_p is not None:
                            stats.rapl_energy_j += (power + prev_p[1]) / 2 * (ts - prev_p[0])
                            stats.rapl_known = True
                        prev_e = energy
                        if power is not None:
                            prev_p = (ts, power)
    return out


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    from datetime import datetime, timezone

    return (
        datetime.fromtimestamp(ts, timezone.utc)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z")
    )


def build_report(paths: Iterable[Path], flt: ReportFilter | None = None) -> dict[str, Any]:
    """The whole report as plain data (what ``--json`` prints)."""
    flt = flt or ReportFilter()
    paths = list(paths)
    gpu_files = find_csv_files(paths, "gpu")
    host_files = find_csv_files(paths, "host") if flt.allocation is None else []
    sessions, allocations = _gpu_sessions(gpu_files, flt)
    hosts = _host_sessions(host_files, flt)
    used: set[int] = set()
    out_sessions: list[dict[str, Any]] = []
    if flt.allocation is None:
        for n, s in enumerate(sessions, 1):
            match = None
            best = 0.0
            for i, (h, hs) in enumerate(hosts):
                if h != s.host or i in used or hs.first is None or s.first is None:
                    continue
                overlap = min(hs.last or 0, s.last or 0) - max(hs.first, s.first)
                if overlap >= best:
                    best, match = overlap, i
            host_dict = None
            if match is not None:
                used.add(match)
                host_dict = hosts[match][1].to_dict()
            spacing: Counter[float] = Counter()
            for g in s.gpus.values():
                spacing.update(g.spacings)
            interval = _interval_from(spacing)
            gpus_out = []
            for gpu in sorted(s.gpus):
                d = s.gpus[gpu].to_dict(interval)
                uuid, name = s.identity.get(gpu, ("", ""))
                gpus_out.append({"gpu": gpu, "uuid": uuid, "name": name, **d})
            out_sessions.append(
                {
                    "session": n,
                    "host": s.host,
                    "start": _iso(s.first),
                    "end": _iso(s.last),
                    "duration_s": _round(s.last - s.first + (interval or 0.0))
                    if s.first is not None and s.last is not None
                    else None,
                    "interval_s": interval,
                    "files": s.files,
                    "gpus": gpus_out,
                    "host_stats": host_dict,
                }
            )
        for i, (h, hs) in enumerate(hosts):
            if i not in used:
                out_sessions.append(
                    {
                        "session": len(out_sessions) + 1,
                        "host": h,
                        "start": _iso(hs.first),
                        "end": _iso(hs.last),
                        "duration_s": None,
                        "interval_s": _interval_from(hs.spacings),
                        "files": [],
                        "gpus": [],
                        "host_stats": hs.to_dict(),
                    }
                )
    alloc_list = []
    for alloc_id in sorted(allocations):
        d = allocations[alloc_id]
        d["start"], d["end"] = _iso(d["start"]), _iso(d["end"])
        alloc_list.append({"id": alloc_id, **d})
    return {"sessions": out_sessions, "allocations": alloc_list}


if __name__ == "__main__":
    import json
    import sys

    json.dump(build_report([Path(p) for p in sys.argv[1:]]), sys.stdout)
