"""The Prometheus exposition of the latest sample, rendered when the recorder publishes.

A custom collector on a private ``CollectorRegistry`` (the pattern of prometheus_client's own
process collector) turns the latest ``Sample`` into metric families straight from the schema
table: name, HELP, type and scale to base units. The bytes are rendered when the recorder
publishes (every tick, or about once a second at sub-second intervals); a scrape only copies
them, so serving ``/metrics`` never touches NVML. The rendering is the
collector's own ``render()``, byte-for-byte what ``generate_latest`` gives over the registry (see
``Exposition.render_reference``) at a fraction of its cost.

A ``None`` value produces no series at all: an absent series says "unknown", a 0 would lie.
``gputel_telemetry_active`` is not rendered here; whoever serves ``/metrics`` owns it. The text
itself (HELP, labels, values) is written by ``promtext``, the one writer of the format.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample as PromSample

from gputel.schema import (
    CLOCK_EVENT_REASONS,
    GPU_FIELDS,
    HOST_FIELDS,
    HWMON_HELP,
    HWMON_METRIC,
    MIB,
    MIG_FIELDS,
    Field,
    MigReading,
    Sample,
)
from gputel.telemetry.allocation_info import AllocationInfo
from gputel.telemetry.promtext import Family, format_value, label_block


@dataclass(frozen=True, slots=True)
class _Family(Family):
    """A recorder family and where its value comes from in the sample."""

    attr: str | None = None
    scale: float = 1.0


def _family(
    name: str, doc: str, type_: str, attr: str | None = None, scale: float = 1.0
) -> _Family:
    return _Family(name, type_, doc, attr, scale)


def _from_field(f: Field) -> _Family:
    assert f.metric is not None
    return _family(f.metric, f.help, f.metric_type, f.attr, f.scale)


GPU_FAMILIES: tuple[_Family, ...] = tuple(_from_field(f) for f in GPU_FIELDS if f.metric)
HOST_FAMILIES: tuple[_Family, ...] = tuple(_from_field(f) for f in HOST_FIELDS if f.metric)
#: Per MIG device, labelled ``gpu``, ``uuid`` (the GPU's), ``gi``, ``ci`` and ``mig_uuid``.
MIG_FAMILIES: tuple[_Family, ...] = tuple(_from_field(f) for f in MIG_FIELDS if f.metric)
GPU_LOST = _family(
    "gputel_gpu_lost", "Whether the GPU has fallen off the bus or stopped answering (1).", "gauge"
)
GPU_READ_STUCK = _family(
    "gputel_gpu_read_stuck",
    "Whether the GPU's read missed its deadline this tick (1: a hung driver call; values empty).",
    "gauge",
)
GPU_FIELD_ERRORS = _family(
    "gputel_gpu_field_errors_total",
    "Reads of one GPU field that failed (the field is empty for that tick).",
    "counter",
)
CLOCK_REASON = _family(
    "gputel_gpu_clock_event_reason_active",
    "Whether a clock event (throttle) reason is active (1) or not (0), from NVML's bitmask.",
    "gauge",
)
ALLOCATION_MEMORY = _family(
    "gputel_gpu_allocation_memory_used_bytes",
    "GPU memory used by the processes of one allocation (job) on the GPU "
    "(allocation empty: owner unknown).",
    "gauge",
)
ALLOCATION_SM_UTIL = _family(
    "gputel_gpu_allocation_sm_util_ratio",
    "Share of SM time the processes of one allocation (job) used over the driver's last "
    "sample period.",
    "gauge",
)
ALLOCATION_INFO = _family(
    "gputel_allocation_info",
    "One series (1) per open allocation, announced or detected: its kind, user, Kubernetes "
    "namespace and pod, Slurm job (join on allocation).",
    "gauge",
)
HWMON = _family(HWMON_METRIC, HWMON_HELP, "gauge")
SOURCE_UP = _family("gputel_source_up", "Whether the source's last read succeeded (1).", "gauge")
SOURCE_DURATION = _family(
    "gputel_source_duration_seconds", "Time the source's last read took.", "gauge"
)
TICKS_MISSED = _family(
    "gputel_ticks_missed_total",
    "Sampling deadlines skipped because the previous tick overran its interval.",
    "counter",
)
ROWS_FAILED = _family(
    "gputel_csv_rows_failed_total",
    "CSV rows that could not be written (disk full, read-only directory).",
    "counter",
)
TICKS_TOTAL = _family("gputel_recorder_ticks_total", "Ticks sampled by the recorder.", "counter")
LAST_SAMPLE = _family(
    "gputel_recorder_last_sample_timestamp_seconds",
    "Unix time of the latest sample.",
    "gauge",
)

ALL_FAMILIES: tuple[_Family, ...] = (
    *GPU_FAMILIES,
    GPU_LOST,
    GPU_READ_STUCK,
    GPU_FIELD_ERRORS,
    CLOCK_REASON,
    *MIG_FAMILIES,
    ALLOCATION_MEMORY,
    ALLOCATION_SM_UTIL,
    ALLOCATION_INFO,
    *HOST_FAMILIES,
    HWMON,
    SOURCE_UP,
    SOURCE_DURATION,
    TICKS_MISSED,
    ROWS_FAILED,
    TICKS_TOTAL,
    LAST_SAMPLE,
)
"""Every family the recorder may render, with its exact output name (for docs and tests)."""

_HEADERS = {f.name: f.header for f in ALL_FAMILIES}


class _Labels:
    """A label set and its rendered ``{k="v",...}`` block, built once and reused every tick."""

    __slots__ = ("block", "labels", "lines")

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels
        self.lines: dict[str, tuple[float, str]] = {}
        """Per family name: the last value and its rendered line."""
        self.block = label_block(labels)


_NO_LABELS = _Labels({})
_SMALL = {0: "0.0", 1: "1.0"}
"""The 0/1 flags (lost, clock reasons, source up) are most of the lines; skip the float dance."""

Row = tuple[_Labels, float]


class SampleCollector(Collector):
    """Builds the families of the latest sample; ``collect()`` for registries, ``render()`` fast.

    ``render()`` writes the same bytes as ``generate_latest`` over ``collect()`` (a test holds
    them equal) but reuses each label block instead of re-escaping and sorting every label on
    every tick, which is most of the cost of a tick.
    """

    def __init__(self) -> None:
        self.sample: Sample | None = None
        self.ticks_missed = 0
        self.rows_failed = 0
        self.ticks_total = 0
        self._gpu_labels: dict[tuple[int, str, str], tuple[_Labels, list[_Labels]]] = {}
        self._source_labels: dict[str, _Labels] = {}
        self._hwmon_labels: dict[tuple[str, str], _Labels] = {}
        self._error_labels: dict[tuple[int, str, str], _Labels] = {}
        self._mig_labels: dict[tuple[int, str, int, int | None, str], _Labels] = {}
        self._job_labels: dict[tuple[int, str, str], _Labels] = {}
        self.allocations: Sequence[AllocationInfo] = ()
        self._info_labels: dict[AllocationInfo, _Labels] = {}

    def _labels_for(self, index: int, uuid: str, name: str) -> tuple[_Labels, list[_Labels]]:
        key = (index, uuid, name)
        found = self._gpu_labels.get(key)
        if found is None:
            labels = {"gpu": str(index), "uuid": uuid, "name": name}
            reasons = [_Labels({**labels, "reason": reason}) for _, reason in CLOCK_EVENT_REASONS]
            found = (_Labels(labels), reasons)
            self._gpu_labels[key] = found
        return found

    def _field_labels(self, index: int, uuid: str, key: str) -> _Labels:
        found = self._error_labels.get((index, uuid, key))
        if found is None:
            found = _Labels({"gpu": str(index), "uuid": uuid, "field": key})
            self._error_labels[(index, uuid, key)] = found
        return found

    def families(self) -> list[tuple[_Family, list[Row]]]:
        out: list[tuple[_Family, list[Row]]] = []
        sample = self.sample
        if sample is not None:
            self._gpu_families(sample, out)
            self._host_families(sample, out)
        if self.allocations:
            out.append((ALLOCATION_INFO, [(self._info_label(a), 1) for a in self.allocations]))
        out.append((TICKS_MISSED, [(_NO_LABELS, self.ticks_missed)]))
        out.append((ROWS_FAILED, [(_NO_LABELS, self.rows_failed)]))
        out.append((TICKS_TOTAL, [(_NO_LABELS, self.ticks_total)]))
        if sample is not None:
            out.append((LAST_SAMPLE, [(_NO_LABELS, sample.timestamp.timestamp())]))
        return out

    def _gpu_families(self, sample: Sample, out: list[tuple[_Family, list[Row]]]) -> None:
        gpus = [(g, self._labels_for(g.index, g.uuid, g.name)) for g in sample.gpus]
        if not gpus:
            return
        for fam in GPU_FAMILIES:
            attr, scale = fam.attr, fam.scale
            rows: list[Row] = []
            for g, (labels, _) in gpus:
                value = getattr(g, attr)  # type: ignore[arg-type]
                if value is not None:
                    rows.append((labels, value * scale if scale != 1.0 else value))
            if rows:
                out.append((fam, rows))
        out.append((GPU_LOST, [(labels, 1 if g.lost else 0) for g, (labels, _) in gpus]))
        out.append((GPU_READ_STUCK, [(labels, 1 if g.stuck else 0) for g, (labels, _) in gpus]))
        errors: list[Row] = [
            (self._field_labels(g.index, g.uuid, key), count)
            for g in sample.gpus
            for key, count in sorted(g.field_errors.items())
        ]
        if errors:
            out.append((GPU_FIELD_ERRORS, errors))
        rows = []
        for g, (_, reason_labels) in gpus:
            mask = g.clock_event_reasons
            if mask is None:
                continue
            for (bit, _), rl in zip(CLOCK_EVENT_REASONS, reason_labels, strict=True):
                rows.append((rl, 1 if mask & bit else 0))
        if rows:
            out.append((CLOCK_REASON, rows))
        if any(g.mig for g in sample.gpus):
            self._mig_families(sample, out)
        if sample.processes:
            self._job_families(sample, out)

    def _mig_families(self, sample: Sample, out: list[tuple[_Family, list[Row]]]) -> None:
        devices: list[tuple[_Labels, MigReading]] = []
        for g in sample.gpus:
            for m in g.mig:
                key = (g.index, g.uuid, m.gi, m.ci, m.mig_uuid)
                labels = self._mig_labels.get(key)
                if labels is None:
                    ci = "" if m.ci is None else str(m.ci)
                    gi = str(m.gi)
                    labels = _Labels(
                        {
                            "gpu": str(g.index),
                            "uuid": g.uuid,
                            "gi": gi,
                            "ci": ci,
                            "mig_uuid": m.mig_uuid,
                        }
                    )
                    self._mig_labels[key] = labels
                devices.append((labels, m))
        for fam in MIG_FAMILIES:
            rows: list[Row] = []
            for labels, m in devices:
                value = getattr(m, fam.attr)  # type: ignore[arg-type]
                if value is not None:
                    rows.append((labels, value * fam.scale if fam.scale != 1.0 else value))
            if rows:
                out.append((fam, rows))

    def _job_families(self, sample: Sample, out: list[tuple[_Family, list[Row]]]) -> None:
        """Per GPU and job, never per PID: a job's processes add up (bounded cardinality)."""
        uuids = {g.index: g.uuid for g in sample.gpus}
        memory: dict[tuple[int, str], float] = {}
        sm: dict[tuple[int, str], float] = {}
        for p in sample.processes:
            key = (p.gpu, p.job or "")
            if p.memory_used_mib is not None:
                memory[key] = memory.get(key, 0.0) + p.memory_used_mib * MIB
            if p.sm_util_pct is not None:
                sm[key] = sm.get(key, 0.0) + p.sm_util_pct * 0.01
        for fam, values in ((ALLOCATION_MEMORY, memory), (ALLOCATION_SM_UTIL, sm)):
            if values:
                out.append((fam, [(self._job_label(k, uuids), v) for k, v in values.items()]))

    def _job_label(self, key: tuple[int, str], uuids: dict[int, str]) -> _Labels:
        gpu, job = key
        uuid = uuids.get(gpu, "")
        found = self._job_labels.get((gpu, uuid, job))
        if found is None:
            if len(self._job_labels) > 4096:
                self._job_labels.clear()  # jobs come and go; keep the cache bounded
            found = _Labels({"gpu": str(gpu), "uuid": uuid, "allocation": job})
            self._job_labels[(gpu, uuid, job)] = found
        return found

    def _info_label(self, info: AllocationInfo) -> _Labels:
        found = self._info_labels.get(info)
        if found is None:
            if len(self._info_labels) > 4096:
                self._info_labels.clear()  # allocations come and go; keep the cache bounded
            found = self._info_labels[info] = _Labels(info.labels())
        return found

    def _host_families(self, sample: Sample, out: list[tuple[_Family, list[Row]]]) -> None:
        host = sample.host
        for fam in HOST_FAMILIES:
            value = getattr(host, fam.attr)  # type: ignore[arg-type]
            if value is not None:
                out.append((fam, [(_NO_LABELS, value * fam.scale if fam.scale != 1.0 else value)]))
        temps = host.hwmon_temperatures_c
        if temps:
            rows: list[Row] = []
            for key in sorted(temps):
                value = temps[key]
                if value is None:
                    continue
                labels = self._hwmon_labels.get(key)
                if labels is None:
                    labels = _Labels({"chip": key[0], "sensor": key[1]})
                    self._hwmon_labels[key] = labels
                rows.append((labels, value))
            if rows:
                out.append((HWMON, rows))
        if sample.sources:
            up: list[Row] = []
            duration: list[Row] = []
            for st in sample.sources:
                labels = self._source_labels.get(st.name)
                if labels is None:
                    labels = _Labels({"source": st.name})
                    self._source_labels[st.name] = labels
                up.append((labels, 1 if st.up else 0))
                duration.append((labels, st.duration_s))
            out.append((SOURCE_UP, up))
            out.append((SOURCE_DURATION, duration))

    def collect(self) -> Iterator[Metric]:
        for fam, rows in self.families():
            m = Metric(fam.base, fam.help, fam.type)
            m.samples = [PromSample(fam.name, lb.labels, value) for lb, value in rows]
            yield m

    def render(self) -> bytes:
        parts: list[str] = []
        append = parts.append
        small = _SMALL
        for fam, rows in self.families():
            append(_HEADERS[fam.name])
            name = fam.name
            for lb, value in rows:
                cache = lb.lines
                hit = cache.get(name)
                # Most values repeat from tick to tick (limits, clocks, flags): reuse the line.
                # Zero is never reused, so 0.0 and -0.0 cannot be confused.
                if hit is not None and value and hit[0] == value:
                    append(hit[1])
                    continue
                text = small.get(value) if value.__class__ is int else None
                line = f"{name}{lb.block} {text or format_value(value)}\n"
                cache[name] = (value, line)
                append(line)
        return "".join(parts).encode()


class Exposition:
    """Owns the private registry; ``update()`` renders the bytes that every scrape returns."""

    def __init__(self) -> None:
        self.collector = SampleCollector()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.collector)
        self.latest = self.collector.render()

    def update(
        self,
        sample: Sample | None,
        *,
        ticks_missed: int = 0,
        rows_failed: int = 0,
        ticks_total: int = 0,
        allocations: Sequence[AllocationInfo] = (),
    ) -> bytes:
        c = self.collector
        c.sample = sample
        c.allocations = allocations
        c.ticks_missed = ticks_missed
        c.rows_failed = rows_failed
        c.ticks_total = ticks_total
        self.latest = c.render()
        return self.latest

    def render_reference(self) -> bytes:
        """The same exposition through prometheus_client's ``generate_latest`` (for checks)."""
        return generate_latest(self.registry)
