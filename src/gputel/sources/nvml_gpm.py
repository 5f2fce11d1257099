"""GPU Performance Monitoring (GPM): what the SMs, tensor cores and DRAM really do.

NVML's utilization is the share of time *any* kernel ran; GPM (Hopper and newer) counts what
the hardware did between two samples: SM activity and occupancy, tensor-core activity, DRAM
bandwidth, FP16/32/64 pipes, PCIe and NVLink bytes. How it is read:

- ``nvmlGpmQueryDeviceSupport`` once per GPU decides; a GPU without GPM has these fields empty
  and costs no further call;
- two samples per GPU (``nvmlGpmSampleAlloc`` once, freed at close): each read takes ONE new
  sample into the older of the two, then ``nvmlGpmMetricsGet`` computes the metrics over the
  pair (previous sample -> this one), i.e. over the time since the previous read in this process.
  The first read has no pair: every value is empty (never 0). The pair is kept across the
  agent's light reads too, so SM activity is available to the activity decision every tick;
- a MIG GPU is sampled per GPU instance (``nvmlGpmMigSampleGet``), one pair per instance; its
  MIG devices (found through their handles, re-listed once a minute) carry SM activity and
  memory;
- every NVML call goes through the source's one asking rule (``NvmlGpuSource._ask``), and a
  metric the driver answers ``NOT_SUPPORTED`` for is not requested again.

The metrics request is the binding's ``c_nvmlGpmMetricsGet_t``, whose ``metrics`` array length
differs between binding versions (98 entries in 12.535, 477 later): only ``numMetrics`` entries
are filled and read, which both ends and the driver agree on. One request structure per pair is
allocated once and reused (under the GPU's lock), so a read allocates no ctypes memory.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Protocol

from gputel.schema import MIB, GpuReading, MigReading

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
_PCIE = ("pcie_rx_bytes_per_s", "pcie_tx_bytes_per_s")
#: Seconds between re-listings of a MIG GPU's devices (instances are created and destroyed by
#: the operator, rarely; listing costs a few calls).
_MIG_RELIST_S = 60.0
_NOT_FOUND = 6


class Ask(Protocol):
    """``NvmlGpuSource._ask``: one NVML call for one field, None when it gives no value."""

    def __call__(
        self, gpu: Any, key: str, fn_name: str, *args: Any, device: Any = ..., **kwargs: Any
    ) -> Any: ...


#: ``NvmlGpuSource._failed``: what a per-metric return code means (same rule as a call's).
Failed = Callable[[Any, str, "int | None", str], None]


@dataclass(eq=False)
class _Pair:
    """Two samples of one GPU (or one GPU instance) and the request over them."""

    samples: list[Any]
    request: Any
    newest: int = -1
    """Which of ``samples`` holds the latest reading; -1 before the first."""


@dataclass(eq=False)
class _MigDevice:
    handle: Any
    gi: int
    ci: int | None
    uuid: str


@dataclass(eq=False)
class GpmState:
    """One GPU's GPM state, kept in the source's per-GPU record (``_Gpu.gpm``)."""

    supported: bool | None = None
    """None until asked."""
    pairs: dict[int, _Pair] = field(default_factory=dict)
    """-1: the whole GPU; else a GPU instance id."""
    mig_devices: list[_MigDevice] = field(default_factory=list)
    mig_listed_at: float | None = None


class GpmReader:
    """GPM reads for the GPUs of one :class:`~gputel.sources.nvml.NvmlGpuSource`.

    ``nv`` is the loaded binding; ``ask`` and ``failed`` are the source's asking rule. Callers
    hold the GPU's lock.
    """

    def __init__(
        self,
        nv: ModuleType,
        ask: Ask,
        failed: Failed,
        no_device: object,
        clock: Callable[[], float],
    ) -> None:
        self._nv = nv
        self._ask = ask
        self._failed = failed
        self._no_device = no_device
        self._clock = clock
        self._metrics = [
            (attr, int(getattr(nv, const)), factor)
            for attr, const, factor in GPM_METRICS
            if hasattr(nv, const)
        ]
        self._request_type = getattr(nv, "c_nvmlGpmMetricsGet_t", None)
        self._version = int(getattr(nv, "NVML_GPM_METRICS_GET_VERSION", 1))

    # ------------------------------------------------------------------------ support
    def supported(self, gpu: Any) -> bool:
        """Whether the driver offers GPM for ``gpu`` (asked once; no binding support: no)."""
        state: GpmState = gpu.gpm
        if state.supported is None:
            if self._request_type is None:
                state.supported = False
            else:
                support = self._ask(gpu, "gpm", "nvmlGpmQueryDeviceSupport")
                state.supported = bool(support is not None and support.isSupportedDevice)
        return state.supported

    def gives_pcie(self, gpu: Any) -> bool:
        """Whether PCIe throughput comes from GPM (so the ~20 ms throughput calls are skipped)."""
        return (
            not gpu.mig
            and self.supported(gpu)
            and "gpm" not in gpu.unsupported
            and not any(f"gpm.{attr}" in gpu.unsupported for attr in _PCIE)
        )

    # ------------------------------------------------------------------------ reads
    def fill(self, gpu: Any, reading: GpuReading) -> None:
        """The full read: every metric of the whole GPU, or the MIG devices of a MIG GPU."""
        if not self.supported(gpu):
            return
        if gpu.mig:
            reading.mig = self.mig_readings(gpu, memory=True)
            return
        wanted = [m for m in self._metrics if f"gpm.{m[0]}" not in gpu.unsupported]
        for attr, value in self._measure(gpu, -1, wanted).items():
            setattr(reading, attr, value)
        reading.has_gpm = self._gives_sm(gpu)

    def fill_light(self, gpu: Any, reading: GpuReading) -> None:
        """The agent's light read: SM activity only (MIG: per device, without memory)."""
        if not self.supported(gpu):
            return
        if gpu.mig:
            reading.mig = self.mig_readings(gpu, memory=False)
            return
        wanted = [m for m in self._metrics if m[0] == _SM and f"gpm.{_SM}" not in gpu.unsupported]
        reading.sm_active_pct = self._measure(gpu, -1, wanted).get(_SM)
        reading.has_gpm = self._gives_sm(gpu)

    @staticmethod
    def _gives_sm(gpu: Any) -> bool:
        """Whether the GPU's SM activity is measured (if not this tick, then from the next)."""
        return "gpm" not in gpu.unsupported and f"gpm.{_SM}" not in gpu.unsupported

    def mig_readings(self, gpu: Any, *, memory: bool) -> tuple[MigReading, ...]:
        """One reading per MIG device: its GPU instance's SM activity, with ``memory`` its
        memory (from the MIG device's own handle)."""
        state: GpmState = gpu.gpm
        now = self._clock()
        if state.mig_listed_at is None or now - state.mig_listed_at >= _MIG_RELIST_S:
            self._list_mig(gpu, now)
        sm_metric = [m for m in self._metrics if m[0] == _SM]
        by_gi: dict[int, float | None] = {}
        out: list[MigReading] = []
        for dev in state.mig_devices:
            if dev.gi not in by_gi:
                by_gi[dev.gi] = self._measure(gpu, dev.gi, sm_metric).get(_SM)
            r = MigReading(dev.gi, dev.ci, dev.uuid, sm_active_pct=by_gi[dev.gi])
            if memory:
                info = self._ask(
                    gpu,
                    f"mig.{dev.gi}.{dev.ci}.memory",
                    "nvmlDeviceGetMemoryInfo",
                    device=dev.handle,
                )
                if info is not None:
                    r.memory_used_mib = info.used / MIB
                    r.memory_total_mib = info.total / MIB
            out.append(r)
        return tuple(out)

    def _list_mig(self, gpu: Any, now: float) -> None:
        """The GPU's MIG devices. Slots without a device answer NOT_FOUND, which is the answer,
        not a failed read; any other failure keeps the previous list for this minute."""
        state: GpmState = gpu.gpm
        state.mig_listed_at = now
        count = self._ask(gpu, "mig.count", "nvmlDeviceGetMaxMigDeviceCount")
        if count is None:
            return
        nv = self._nv
        error: type[BaseException] = getattr(nv, "NVMLError", Exception)
        devices: list[_MigDevice] = []
        for j in range(int(count)):
            try:
                handle = nv.nvmlDeviceGetMigDeviceHandleByIndex(gpu.handle, j)
            except error as exc:
                if getattr(exc, "value", None) == _NOT_FOUND:
                    continue
                self._failed(gpu, "mig.devices", getattr(exc, "value", None), str(exc))
                return
            gi = self._ask(gpu, "mig.gi", "nvmlDeviceGetGpuInstanceId", device=handle)
            if gi is None:
                continue
            ci = self._ask(gpu, "mig.ci", "nvmlDeviceGetComputeInstanceId", device=handle)
            uuid = self._ask(gpu, "mig.uuid", "nvmlDeviceGetUUID", device=handle)
            text = uuid.decode() if isinstance(uuid, bytes) else str(uuid or "")
            devices.append(_MigDevice(handle, int(gi), None if ci is None else int(ci), text))
        gone = {d.gi for d in state.mig_devices} - {d.gi for d in devices}
        for gi in gone:
            self._free_pair(state.pairs.pop(gi, None))
        state.mig_devices = devices

    def _measure(
        self, gpu: Any, instance: int, wanted: list[tuple[str, int, float]]
    ) -> dict[str, float | None]:
        """Take one sample of the GPU (``instance`` -1) or a GPU instance and compute ``wanted``
        over it and the previous one; empty on the first sample or a failed one."""
        if not wanted:
            return {}
        pair = self._pair(gpu, instance)
        if pair is None:
            return {}
        target = 0 if pair.newest < 0 else 1 - pair.newest
        sample = pair.samples[target]
        if instance < 0:
            got = self._ask(gpu, "gpm", "nvmlGpmSampleGet", sample)
        else:
            got = self._ask(gpu, f"gpm.mig.{instance}", "nvmlGpmMigSampleGet", instance, sample)
        if got is None:
            return {}
        previous = pair.newest
        pair.newest = target
        if previous < 0:
            return {}
        request = pair.request
        request.version = self._version
        request.numMetrics = len(wanted)
        request.sample1 = pair.samples[previous]
        request.sample2 = sample
        for k, (_attr, metric_id, _factor) in enumerate(wanted):
            request.metrics[k].metricId = metric_id
        result = self._ask(gpu, "gpm.metrics", "nvmlGpmMetricsGet", request, device=self._no_device)
        if result is None:
            return {}
        gpu.reads += len(wanted) - 1  # each metric is a read of its own for the lost rule
        out: dict[str, float | None] = {}
        for k, (attr, metric_id, factor) in enumerate(wanted):
            m = result.metrics[k]
            status = int(m.nvmlReturn)
            if status != 0:
                self._failed(
                    gpu, f"gpm.{attr}", status, f"GPM metric {metric_id} returned {status}"
                )
                out[attr] = None
                continue
            value = float(m.value)
            out[attr] = value * factor if math.isfinite(value) and value >= 0 else None
        return out

    def _pair(self, gpu: Any, instance: int) -> _Pair | None:
        state: GpmState = gpu.gpm
        pair = state.pairs.get(instance)
        if pair is not None:
            return pair
        samples: list[Any] = []
        for _ in range(2):
            sample = self._ask(gpu, "gpm.alloc", "nvmlGpmSampleAlloc", device=self._no_device)
            if sample is None:
                for s in samples:
                    self._free(s)
                return None
            samples.append(sample)
        assert self._request_type is not None
        pair = _Pair(samples, self._request_type())
        state.pairs[instance] = pair
        return pair

    # ------------------------------------------------------------------------ close
    def close(self, gpu: Any) -> None:
        """Free the GPU's samples (before NVML shuts down; the caller holds the GPU's lock)."""
        state: GpmState = gpu.gpm
        for pair in state.pairs.values():
            self._free_pair(pair)
        state.pairs.clear()

    def _free_pair(self, pair: _Pair | None) -> None:
        if pair is not None:
            for s in pair.samples:
                self._free(s)

    def _free(self, sample: Any) -> None:
        nv = self._nv
        try:
            nv.nvmlGpmSampleFree(sample)
        except Exception as exc:  # the driver frees it at exit anyway
            log.debug("nvmlGpmSampleFree failed: %s", exc)
