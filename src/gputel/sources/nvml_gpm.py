"""GPU Performance Monitoring (GPM): what the SMs, tensor cores and DRAM really do.

NVML's utilization is the share of time *any* kernel ran; GPM (Hopper and newer) counts what
the hardware did between two samples: SM activity and occupancy, tensor-core activity, DRAM
bandwidth, FP16/32/64 pipes, PCIe and NVLink bytes. How it is read:

- ``nvmlGpmQueryDeviceSupport`` once per GPU decides; a GPU without GPM has these fields empty
  and costs no further call;
- profiling counters may be restricted to admin users (the driver's default,
  ``RmProfilingAdminOnly: 1`` in ``/proc/driver/nvidia/params``): a sample answered
  ``NO_PERMISSION`` means GPM is *refused* on that GPU for the life of the source (asked again
  when the agent restarts), with one notice naming the fix; the GPU is then read as one without
  GPM (PCIe from the throughput calls, ``GPUTEL_ACTIVITY=sm`` from utilization). The first
  sample is taken when the source opens, so the refusal is known before the first reading;
- two samples per GPU (``nvmlGpmSampleAlloc`` once, freed at close): each read takes ONE new
  sample into the older of the two, then ``nvmlGpmMetricsGet`` computes the metrics over the
  pair (previous sample -> this one), i.e. over the time since the previous read in this process.
  The first read has no pair: every value is empty (never 0). The pair is kept across the
  agent's light reads too, so SM activity is available to the activity decision every tick;
- a MIG GPU is sampled per GPU instance (``nvmlGpmMigSampleGet``), one pair per instance; its
  MIG devices (found through their handles, re-listed once a minute) carry SM activity and
  memory;
- every NVML call goes through the one asking rule (``sources/nvml_calls.py``), and a metric the
  driver answers ``NOT_SUPPORTED`` for is not requested again.

The metrics request is the binding's ``c_nvmlGpmMetricsGet_t``, whose ``metrics`` array length
differs between binding versions (98 entries in 12.535, 477 later): only ``numMetrics`` entries
are filled and read, which both ends and the driver agree on. One request structure per pair is
allocated once and reused (under the GPU's lock), so a read allocates no ctypes memory.
"""

from __future__ import annotations

import ctypes
import logging
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gputel.formats import one_line
from gputel.schema import MIB, GpuReading, MigReading
from gputel.sources import nvml_binding as b
from gputel.sources.nvml_calls import NvmlCalls
from gputel.sources.nvml_direct import plain
from gputel.sources.nvml_gpu import NO_DEVICE, CallRefused, NvmlGpu, text

log = logging.getLogger("gputel.nvml")

#: (reading field, the binding's metric id constant, factor to the field's unit). PCIe and
#: NVLink come in MiB/s.
GPM_METRICS: tuple[tuple[str, str, float], ...] = (
    ("sm_active_pct", "NVML_GPM_METRIC_SM_UTIL", 1.0),
    ("sm_occupancy_pct", "NVML_GPM_METRIC_SM_OCCUPANCY", 1.0),
    ("tensor_active_pct", "NVML_GPM_METRIC_ANY_TENSOR_UTIL", 1.0),
    ("dram_active_pct", "NVML_GPM_METRIC_DRAM_BW_UTIL", 1.0),
    ("fp16_active_pct", "NVML_GPM_METRIC_FP16_UTIL", 1.0),
    ("fp32_active_pct", "NVML_GPM_METRIC_FP32_UTIL", 1.0),
    ("fp64_active_pct", "NVML_GPM_METRIC_FP64_UTIL", 1.0),
    ("pcie_tx_bytes_per_s", "NVML_GPM_METRIC_PCIE_TX_PER_SEC", float(MIB)),
    ("pcie_rx_bytes_per_s", "NVML_GPM_METRIC_PCIE_RX_PER_SEC", float(MIB)),
    ("nvlink_rx_bytes_per_s", "NVML_GPM_METRIC_NVLINK_TOTAL_RX_PER_SEC", float(MIB)),
    ("nvlink_tx_bytes_per_s", "NVML_GPM_METRIC_NVLINK_TOTAL_TX_PER_SEC", float(MIB)),
)
_SM = "sm_active_pct"
_SM_KEY = f"gpm.{_SM}"
_PCIE = ("pcie_rx_bytes_per_s", "pcie_tx_bytes_per_s")
_PCIE_KEYS = frozenset(f"gpm.{attr}" for attr in _PCIE)
#: One nvmlGpmMetric_t: metric id, return code, value (then three name pointers, not read).
_METRIC = struct.Struct("<IId24x")
#: Seconds between re-listings of a MIG GPU's devices (instances are created and destroyed by
#: the operator, rarely; listing costs a few calls).
_MIG_RELIST_S = 60.0
#: Codes of a GPM sample that mean "not for this caller": a standing refusal, not a failure.
_REFUSED = frozenset({b.NO_PERMISSION})
#: What lifts the refusal (docs/hardware.md explains the trade-off of each).
REFUSAL_FIX = (
    "give the service CAP_SYS_ADMIN (install.sh --profiling) or load the nvidia module with "
    "NVreg_RestrictProfilingToAdminUsers=0 (docs/hardware.md: the side-channel trade-off)"
)
#: The driver's module parameters, under GPUTEL_PROC_ROOT.
PARAMS_FILE = Path("driver/nvidia/params")


def _request_type(module: Any) -> Any:
    """The metrics request, as a plain mirror of the binding's structure where it can be (its
    results are read field by field every tick); None without GPM in the binding."""
    struct = getattr(module, "c_nvmlGpmMetricsGet_t", None)
    if struct is None:
        return None
    try:
        return plain(struct)
    except (AttributeError, TypeError):
        return struct


def profiling_admin_only(proc_root: Path) -> bool | None:
    """Whether the driver restricts profiling counters to admin users (``RmProfilingAdminOnly``
    in its params file); None where the file or the line does not exist."""
    try:
        lines = (proc_root / PARAMS_FILE).read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        key, sep, value = line.partition(":")
        if sep and key.strip() == "RmProfilingAdminOnly":
            return value.strip() == "1"
    return None


def refusal_reason(admin_only: bool | None) -> str:
    """Why GPM was refused, in the words ``gputel status`` shows after ``refused: ``."""
    if admin_only:
        return "profiling counters are restricted to admin users (RmProfilingAdminOnly=1)"
    return "the driver answers NO_PERMISSION to profiling counters"


@dataclass(eq=False)
class _Pair:
    """Two samples of one GPU (or one GPU instance) and the request over them."""

    samples: list[Any]
    request: Any
    newest: int = -1
    """Which of ``samples`` holds the latest reading; -1 before the first."""
    metric_ids: tuple[int, ...] = ()
    """The metrics the request asks for now: written into it only when they change."""
    wanted: list[tuple[str, int, float]] | None = None
    """The list ``metric_ids`` was taken from (the full read's, kept per GPU)."""
    results_at: int = 0
    """Where the request's metric results start in memory (``_answers`` reads them in one go;
    the request lives as long as the pair)."""


@dataclass(eq=False)
class _MigDevice:
    handle: Any
    gi: int
    ci: int | None
    uuid: str


@dataclass(eq=False)
class GpmState:
    """One GPU's GPM state, kept by the reader per GPU index."""

    supported: bool | None = None
    """None until asked."""
    pairs: dict[int, _Pair] = field(default_factory=dict)
    """-1: the whole GPU; else a GPU instance id."""
    mig_devices: list[_MigDevice] = field(default_factory=list)
    mig_listed_at: float | None = None
    refused: str | None = None
    """Why the driver refuses GPM to this process (then ``supported`` is False)."""
    wanted: list[tuple[str, int, float]] = field(default_factory=list)
    wanted_for: int = -1
    """The metrics a full read asks for, and the size of the GPU's unsupported set they were
    picked at (it only grows: a new size means a metric may have dropped out)."""


class GpmReader:
    """GPM reads for the GPUs of one source, over its asking rule. Callers hold the GPU's
    lock; each GPU's state is touched only under it."""

    def __init__(
        self, calls: NvmlCalls, clock: Callable[[], float], admin_only: bool | None = None
    ) -> None:
        """``admin_only``: the driver's profiling restriction (:func:`profiling_admin_only`),
        to name the cause of a refusal."""
        self._calls = calls
        self._admin_only = admin_only
        self._ask = calls.ask
        self._clock = clock
        api = calls.api
        self._error = api.error
        self._metrics = [
            (attr, metric, factor)
            for attr, const, factor in GPM_METRICS
            if (metric := api.optional_const(const)) is not None
        ]
        self._request_type = _request_type(api.module)
        metric = getattr(api.module, "c_nvmlGpmMetric_t", None)
        self._metric_layout = metric is not None and ctypes.sizeof(metric) == _METRIC.size
        """Whether a metric result is the driver's 40 bytes (read with :data:`_METRIC`)."""
        self._version = api.const("NVML_GPM_METRICS_GET_VERSION", 1)
        self._support_fn = api.fn("nvmlGpmQueryDeviceSupport")
        self._alloc_fn = api.fn("nvmlGpmSampleAlloc")
        self._free_fn = api.fn("nvmlGpmSampleFree")
        self._sample_fn = api.fn("nvmlGpmSampleGet")
        self._mig_sample_fn = api.fn("nvmlGpmMigSampleGet")
        self._metrics_fn = api.fn("nvmlGpmMetricsGet")
        self._mig_count_fn = api.fn("nvmlDeviceGetMaxMigDeviceCount")
        self._mig_handle_fn = api.fn("nvmlDeviceGetMigDeviceHandleByIndex")
        self._gi_fn = api.fn("nvmlDeviceGetGpuInstanceId")
        self._ci_fn = api.fn("nvmlDeviceGetComputeInstanceId")
        self._uuid_fn = api.fn("nvmlDeviceGetUUID")
        self._memory_fn = api.fn("nvmlDeviceGetMemoryInfo")
        self._states: dict[int, GpmState] = {}

    def _state(self, gpu: NvmlGpu) -> GpmState:
        state = self._states.get(gpu.index)
        if state is None:
            state = self._states[gpu.index] = GpmState()
        return state

    # ------------------------------------------------------------------------ support
    def supported(self, gpu: NvmlGpu, state: GpmState | None = None) -> bool:
        """Whether the driver offers GPM for ``gpu`` (asked once; no binding support: no)."""
        if state is None:
            state = self._state(gpu)
        if state.supported is None:
            if self._request_type is None:
                state.supported = False
            else:
                support = self._ask(gpu, "gpm", self._support_fn)
                state.supported = bool(support is not None and support.isSupportedDevice)
        return state.supported

    def probe(self, gpu: NvmlGpu) -> None:
        """At open: ask for support and take one sample (of the whole GPU, or of a MIG GPU's
        first GPU instance), so a refusal is known (and said) before the first reading. The
        sample is not kept: the first reading still has no pair, as without the probe."""
        if not self.supported(gpu):
            return
        state = self._state(gpu)
        instance = -1
        if gpu.mig:
            self._list_mig(gpu, self._clock())
            if not state.mig_devices:
                return
            instance = state.mig_devices[0].gi
        pair = self._pair(gpu, state, instance)
        if pair is None or pair.newest >= 0:
            return
        try:
            if instance < 0:
                self._ask(gpu, "gpm", self._sample_fn, pair.samples[0], refused=_REFUSED)
            else:
                key = f"gpm.mig.{instance}"
                fn = self._mig_sample_fn
                self._ask(gpu, key, fn, instance, pair.samples[0], refused=_REFUSED)
        except CallRefused:
            self._refuse(gpu, state, announce=False)

    def status(self, gpu: NvmlGpu) -> str | None:
        """``available``, ``not supported`` or ``refused: <why>; <fix>`` (None: not asked)."""
        state = self._state(gpu)
        if state.refused is not None:
            return f"refused: {state.refused}; {REFUSAL_FIX}"
        if state.supported is None:
            return None
        return "available" if state.supported and "gpm" not in gpu.unsupported else "not supported"

    def refused(self, gpu: NvmlGpu) -> bool:
        return self._state(gpu).refused is not None

    def _refuse(self, gpu: NvmlGpu, state: GpmState, *, announce: bool) -> None:
        """GPM refused to this process: stop asking until the source is opened again."""
        state.refused = refusal_reason(self._admin_only)
        state.supported = False
        for pair in state.pairs.values():
            self._free_pair(pair)
        state.pairs.clear()
        if announce:
            log.warning("GPU %d: %s", gpu.index, refusal_notice([gpu.index], state.refused))

    def gives_pcie(self, gpu: NvmlGpu) -> bool:
        """Whether PCIe throughput comes from GPM (so the ~20 ms throughput calls are skipped)."""
        return (
            not gpu.mig
            and self.supported(gpu)
            and "gpm" not in gpu.unsupported
            and gpu.unsupported.isdisjoint(_PCIE_KEYS)
        )

    # ------------------------------------------------------------------------ reads
    def fill(self, gpu: NvmlGpu, reading: GpuReading) -> None:
        """The full read: every metric of the whole GPU, or the MIG devices of a MIG GPU."""
        state = self._state(gpu)
        if not self.supported(gpu, state):
            return
        if gpu.mig:
            reading.mig = self.mig_readings(gpu, memory=True)
            return
        if state.wanted_for != len(gpu.unsupported):  # a metric dropped out: only then
            state.wanted = [m for m in self._metrics if f"gpm.{m[0]}" not in gpu.unsupported]
            state.wanted_for = len(gpu.unsupported)
        for attr, value in self._measure(gpu, state, -1, state.wanted).items():
            setattr(reading, attr, value)
        reading.has_gpm = self._gives_sm(gpu)

    def fill_light(self, gpu: NvmlGpu, reading: GpuReading) -> None:
        """The agent's light read: SM activity only (MIG: per device, without memory)."""
        state = self._state(gpu)
        if not self.supported(gpu, state):
            return
        if gpu.mig:
            reading.mig = self.mig_readings(gpu, memory=False)
            return
        wanted = [m for m in self._metrics if m[0] == _SM and _SM_KEY not in gpu.unsupported]
        reading.sm_active_pct = self._measure(gpu, state, -1, wanted).get(_SM)
        reading.has_gpm = self._gives_sm(gpu)

    @staticmethod
    def _gives_sm(gpu: NvmlGpu) -> bool:
        """Whether the GPU's SM activity is measured (if not this tick, then from the next)."""
        return "gpm" not in gpu.unsupported and _SM_KEY not in gpu.unsupported

    def mig_readings(self, gpu: NvmlGpu, *, memory: bool) -> tuple[MigReading, ...]:
        """One reading per MIG device: its GPU instance's SM activity, with ``memory`` its
        memory (from the MIG device's own handle)."""
        state = self._state(gpu)
        now = self._clock()
        if state.mig_listed_at is None or now - state.mig_listed_at >= _MIG_RELIST_S:
            self._list_mig(gpu, now)
        sm_metric = [m for m in self._metrics if m[0] == _SM]
        by_gi: dict[int, float | None] = {}
        out: list[MigReading] = []
        for dev in state.mig_devices:
            if dev.gi not in by_gi:
                by_gi[dev.gi] = self._measure(gpu, state, dev.gi, sm_metric).get(_SM)
            r = MigReading(dev.gi, dev.ci, dev.uuid, sm_active_pct=by_gi[dev.gi])
            if memory:
                info = self._ask(
                    gpu,
                    f"mig.{dev.gi}.{dev.ci}.memory",
                    self._memory_fn,
                    device=dev.handle,
                )
                if info is not None:
                    r.memory_used_mib = info.used / MIB
                    r.memory_total_mib = info.total / MIB
            out.append(r)
        return tuple(out)

    def _list_mig(self, gpu: NvmlGpu, now: float) -> None:
        """The GPU's MIG devices. Slots without a device answer NOT_FOUND, which is the answer,
        not a failed read; any other failure keeps the previous list for this minute."""
        state = self._state(gpu)
        state.mig_listed_at = now
        count = self._ask(gpu, "mig.count", self._mig_count_fn)
        if count is None:
            return
        devices: list[_MigDevice] = []
        for j in range(int(count)):
            try:
                if self._mig_handle_fn is None:
                    raise self._calls.api.function_not_found("nvmlDeviceGetMigDeviceHandleByIndex")
                handle = self._mig_handle_fn(gpu.handle, j)
            except self._error as exc:
                code = b.error_code(exc)
                if code == b.NOT_FOUND:
                    continue
                self._calls.failed(gpu, "mig.devices", code, one_line(exc))
                return
            gi = self._ask(gpu, "mig.gi", self._gi_fn, device=handle)
            if gi is None:
                continue
            ci = self._ask(gpu, "mig.ci", self._ci_fn, device=handle)
            uuid = text(self._ask(gpu, "mig.uuid", self._uuid_fn, device=handle))
            devices.append(_MigDevice(handle, int(gi), None if ci is None else int(ci), uuid))
        gone = {d.gi for d in state.mig_devices} - {d.gi for d in devices}
        for gi in gone:
            self._free_pair(state.pairs.pop(gi, None))
        state.mig_devices = devices

    def _measure(
        self, gpu: NvmlGpu, state: GpmState, instance: int, wanted: list[tuple[str, int, float]]
    ) -> dict[str, float | None]:
        """Take one sample of the GPU (``instance`` -1) or a GPU instance and compute ``wanted``
        over it and the previous one; empty on the first sample or a failed one. ``state``:
        the GPU's (``_state``)."""
        if not wanted or state.refused is not None:
            return {}
        pair = self._pair(gpu, state, instance)
        if pair is None:
            return {}
        target = 0 if pair.newest < 0 else 1 - pair.newest
        sample = pair.samples[target]
        try:
            if instance < 0:
                got = self._ask(gpu, "gpm", self._sample_fn, sample, refused=_REFUSED)
            else:
                got = self._ask(
                    gpu,
                    f"gpm.mig.{instance}",
                    self._mig_sample_fn,
                    instance,
                    sample,
                    refused=_REFUSED,
                )
        except CallRefused:
            self._refuse(gpu, state, announce=True)
            return {}
        if got is None:
            return {}
        previous = pair.newest
        pair.newest = target
        if previous < 0:
            return {}
        request = pair.request
        if wanted is pair.wanted:  # the full read's list, kept per GPU: the same ids
            ids = pair.metric_ids
        else:
            ids = tuple(metric_id for _attr, metric_id, _factor in wanted)
            pair.wanted = wanted
        if ids != pair.metric_ids:  # built once, rebuilt only when a metric drops out
            request.version = self._version
            request.numMetrics = len(ids)
            for k, metric_id in enumerate(ids):
                request.metrics[k].metricId = metric_id
            pair.metric_ids = ids
        request.sample1 = pair.samples[previous]
        request.sample2 = sample
        result = self._ask(gpu, "gpm.metrics", self._metrics_fn, request, device=NO_DEVICE)
        if result is None:
            return {}
        gpu.reads += len(wanted) - 1  # each metric is a read of its own for the lost rule
        out: dict[str, float | None] = {}
        answers = self._answers(pair, result, len(wanted))
        for (attr, metric_id, factor), (status, value) in zip(wanted, answers, strict=True):
            if status != 0:
                self._calls.failed(
                    gpu, f"gpm.{attr}", status, f"GPM metric {metric_id} returned {status}"
                )
                out[attr] = None
                continue
            out[attr] = value * factor if math.isfinite(value) and value >= 0 else None
        return out

    def _answers(self, pair: _Pair, result: Any, n: int) -> list[tuple[int, float]]:
        """(return code, value) of the first ``n`` metrics of a metrics request: unpacked from
        its memory in one go where the layout is the driver's, else field by field."""
        if self._metric_layout:
            # The driver wrote them into the pair's request, whichever function passed it on.
            raw = ctypes.string_at(pair.results_at, n * _METRIC.size)
            return [(ret, value) for _id, ret, value in _METRIC.iter_unpack(raw)]
        return [(int(m.nvmlReturn), float(m.value)) for m in (result.metrics[k] for k in range(n))]

    def _pair(self, gpu: NvmlGpu, state: GpmState, instance: int) -> _Pair | None:
        pair = state.pairs.get(instance)
        if pair is not None:
            return pair
        samples: list[Any] = []
        for _ in range(2):
            sample = self._ask(gpu, "gpm.alloc", self._alloc_fn, device=NO_DEVICE)
            if sample is None:
                for s in samples:
                    self._free(s)
                return None
            samples.append(sample)
        assert self._request_type is not None
        request = self._request_type()
        pair = _Pair(samples, request)
        if self._metric_layout:
            pair.results_at = ctypes.addressof(request) + type(request).metrics.offset
        state.pairs[instance] = pair
        return pair

    # ------------------------------------------------------------------------ close
    def close(self, gpu: NvmlGpu) -> None:
        """Free the GPU's samples (before NVML shuts down; the caller holds the GPU's lock)."""
        state = self._state(gpu)
        for pair in state.pairs.values():
            self._free_pair(pair)
        state.pairs.clear()

    def _free_pair(self, pair: _Pair | None) -> None:
        if pair is not None:
            for s in pair.samples:
                self._free(s)

    def _free(self, sample: Any) -> None:
        try:
            if self._free_fn is not None:
                self._free_fn(sample)
        except Exception as exc:  # the driver frees it at exit anyway
            log.debug("nvmlGpmSampleFree failed: %s", one_line(exc))


def refusal_notice(indices: list[int], reason: str) -> str:
    """The one line for GPUs whose GPM is refused: the cause, the fix, what stands in."""
    names = ", ".join(str(i) for i in indices)
    return (
        f"GPM (SM, tensor, DRAM activity) is refused on GPU {names}: {reason}; {REFUSAL_FIX}. "
        "Until then those GPM columns stay empty, PCIe comes from the throughput calls and "
        "GPUTEL_ACTIVITY=sm uses utilization there; asked again when the agent restarts"
    )
