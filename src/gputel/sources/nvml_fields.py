"""The device fields of one GPU's reading (utilization, memory, power, clocks, ECC...).

Every call goes through the asking rule (``sources/nvml_calls.py``) with a function resolved once
at open, or bound to the GPU once (``FieldReader._value``). Two cost rules live here:

- slow-changing fields (:data:`SLOW_FIELDS`: power limit, ECC counts, remapped rows, recovery
  action) are read every :data:`SLOW_EVERY` full reads of a GPU, not every read; between their
  reads each reading carries their last value (the CSV has a value in every row; docs/csv.md);
- PCIe throughput, where GPM does not give it, comes from the driver's PCIe byte counters (field
  values 197/198, ``NVML_FI_DEV_PCIE_COUNT_TX_BYTES``/``RX_BYTES``) in the same field-value call
  as the energy counter: a rate over the time between two reads, empty on the first. Only where
  the driver has no such counters do the ~20 ms ``nvmlDeviceGetPcieThroughput`` samples remain,
  taken off the read's path (``sources/nvml_pcie.py``).

The GPM metrics and the process list have modules of their own (``sources/nvml_gpm.py``,
``sources/nvml_processes.py``); :mod:`gputel.sources.nvml` puts the pieces of a reading
together. Callers hold the GPU's lock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gputel.schema import MIB, GpuReading
from gputel.sources import nvml_binding as b
from gputel.sources.nvml_calls import NvmlCalls, Option
from gputel.sources.nvml_direct import bind
from gputel.sources.nvml_gpu import NvmlGpu

# The values fetched in one nvmlDeviceGetFieldValues call instead of one call each:
# (field key, binding constant name, its value in NVML's ABI, read only on slow reads).
_BATCH_FIELDS: tuple[tuple[str, str, int | None, bool], ...] = (
    ("energy_j", "NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION", 83, False),
    ("pcie_tx_count", "NVML_FI_DEV_PCIE_COUNT_TX_BYTES", 197, False),
    ("pcie_rx_count", "NVML_FI_DEV_PCIE_COUNT_RX_BYTES", 198, False),
    ("ecc_corrected_volatile", "NVML_FI_DEV_ECC_SBE_VOL_TOTAL", 3, True),
    ("ecc_uncorrected_volatile", "NVML_FI_DEV_ECC_DBE_VOL_TOTAL", 4, True),
    # Asked only where the binding defines it (no default): older drivers have no such field.
    ("recovery_action", "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION", None, True),
)
#: Byte counter key -> the reading's rate field.
_PCIE_COUNTS = (("pcie_tx_count", "pcie_tx_bytes_per_s"), ("pcie_rx_count", "pcie_rx_bytes_per_s"))
_PCIE_COUNT_KEYS = frozenset(key for key, _attr in _PCIE_COUNTS)

#: Full reads between two reads of the slow-changing fields (10 s at the default 1 s tick).
SLOW_EVERY = 10
#: The reading fields read every SLOW_EVERY full reads and carried over in between: what the
#: driver changes rarely (a limit an operator sets, counters of rare faults, a board's state).
SLOW_FIELDS: tuple[str, ...] = (
    "power_limit_w",
    "ecc_corrected_volatile",
    "ecc_uncorrected_volatile",
    "remapped_rows_correctable",
    "remapped_rows_uncorrectable",
    "remapped_rows_pending",
    "remapped_rows_failure",
    "recovery_action",
)
# nvmlValue_t members by nvmlValueType_t.
_VALUE_MEMBERS = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")


def _milli(value: Any) -> float:
    """Milliwatts (NVML's unit) as watts."""
    return value / 1000.0


def _rates(rates: Any) -> tuple[float, float]:
    return float(rates.gpu), float(rates.memory)


def _memory(info: Any) -> tuple[float, float]:
    return info.used / MIB, info.total / MIB


def _field_value(value: Any) -> Any:
    """The number inside an nvmlFieldValue_t, by its declared type."""
    kind = getattr(value, "valueType", 3)
    member = _VALUE_MEMBERS[kind] if 0 <= kind < len(_VALUE_MEMBERS) else "ullVal"
    return getattr(value.value, member)


@dataclass(frozen=True, slots=True)
class _Way:
    """One way to read a value: the asking rule's key, the pynvml function and its arguments
    after the handle."""

    key: str
    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


class FieldReader:
    """The device fields, over the functions and constants of one loaded binding.

    Each single-value field has its ways to be read (:class:`_Way`; ``NvmlCalls.first`` uses
    the first the GPU supports) and one conversion of what they return (what the pynvml
    function returns). Where the thin layer can, each way is bound to the GPU once
    (``nvml_direct.bind``: C function, arguments and result buffer) and called without
    pynvml's per-call work; failures go to the same asking rule either way.
    """

    def __init__(self, calls: NvmlCalls) -> None:
        self._calls = calls
        self._ask = calls.ask
        api = calls.api
        fn = api.fn
        self._api = api
        sensor = api.const("NVML_TEMPERATURE_GPU", 0)
        pstate_unknown = api.const("NVML_PSTATE_UNKNOWN", b.PSTATE_UNKNOWN)
        memory: list[_Way] = []
        # v2 reports "used" without the driver's reserved memory, which is what a job sees.
        v2 = getattr(api.module, "nvmlMemory_v2", None)
        if v2 is not None:
            memory.append(_Way("memory_v2", "nvmlDeviceGetMemoryInfo", kwargs={"version": v2}))
        memory.append(_Way("memory", "nvmlDeviceGetMemoryInfo"))
        clock = "nvmlDeviceGetClockInfo"
        # Per field: how what the pynvml function returns becomes the value, and its ways.
        self._fields: dict[str, tuple[Callable[[Any], Any], list[_Way]]] = {
            "utilization": (_rates, [_Way("utilization", "nvmlDeviceGetUtilizationRates")]),
            "memory": (_memory, memory),
            "temperature": (
                float,
                [
                    _Way("temperature_v", "nvmlDeviceGetTemperatureV", (sensor,)),
                    _Way("temperature", "nvmlDeviceGetTemperature", (sensor,)),
                ],
            ),
            "sm_clock_mhz": (
                float,
                [_Way("sm_clock_mhz", clock, (api.const("NVML_CLOCK_SM", 1),))],
            ),
            "memory_clock_mhz": (
                float,
                [_Way("memory_clock_mhz", clock, (api.const("NVML_CLOCK_MEM", 2),))],
            ),
            # nvmlDeviceGetPowerUsage, not the FI_DEV_POWER_INSTANT field: on Ampere and later
            # it is the average over the last second, which suits one sample per second (and
            # the energy integration) better than a single instant.
            "power_w": (_milli, [_Way("power_w", "nvmlDeviceGetPowerUsage")]),
            "power_limit_w": (_milli, [_Way("power_limit_w", "nvmlDeviceGetEnforcedPowerLimit")]),
            "fan_speed_pct": (float, [_Way("fan_speed_pct", "nvmlDeviceGetFanSpeed")]),
            "performance_state": (
                lambda v: None if v == pstate_unknown else int(v),
                [_Way("performance_state", "nvmlDeviceGetPerformanceState")],
            ),
            "clock_event_reasons": (
                int,
                [
                    _Way("clock_event_reasons", "nvmlDeviceGetCurrentClocksEventReasons"),
                    _Way("clock_throttle_reasons", "nvmlDeviceGetCurrentClocksThrottleReasons"),
                ],
            ),
        }
        self._energy_fn = fn("nvmlDeviceGetTotalEnergyConsumption")
        self._field_values_fn = fn("nvmlDeviceGetFieldValues")
        self._ecc_fn = fn("nvmlDeviceGetTotalEccErrors")
        self._ecc_types = {
            "corrected": api.const("NVML_MEMORY_ERROR_TYPE_CORRECTED", 0),
            "uncorrected": api.const("NVML_MEMORY_ERROR_TYPE_UNCORRECTED", 1),
        }
        self._volatile_ecc = api.const("NVML_VOLATILE_ECC", 0)
        self._remapped_fn = fn("nvmlDeviceGetRemappedRows")
        self._batch = [
            (key, int(fid), slow)
            for key, const, default, slow in _BATCH_FIELDS
            if (fid := api.optional_const(const) if default is None else api.const(const, default))
            is not None
        ]

    # ------------------------------------------------------------------ single fields
    def _bind(self, gpu: NvmlGpu, field: str) -> list[Option]:
        """The ways to read ``field`` as the asking rule's options, each bound to the GPU
        where the thin layer can, else through the binding's function."""
        options: list[Option] = []
        for w in self._fields[field][1]:
            fn = self._api.fn(w.name)
            bound = None
            if fn is not None:  # a function this binding has
                bound = bind(self._api.module, w.name, gpu.handle, *w.args, **w.kwargs)
            options.append((w.key, bound or fn, w.args, w.kwargs))
        return options

    def _value(self, gpu: NvmlGpu, field: str) -> Any:
        """``field`` by the first way the GPU supports (``NvmlCalls.first``); None when no way
        gives a value now."""
        options = gpu.bound.get(field)
        if options is None:
            options = gpu.bound[field] = self._bind(gpu, field)
        raw = self._calls.first(gpu, options)
        return None if raw is None else self._fields[field][0](raw)

    def utilization(self, gpu: NvmlGpu) -> tuple[float | None, float | None]:
        if gpu.mig:
            return None, None  # NVML answers NOT_SUPPORTED in MIG mode; no need to ask
        return self._value(gpu, "utilization") or (None, None)

    def memory(self, gpu: NvmlGpu) -> tuple[float | None, float | None]:
        return self._value(gpu, "memory") or (None, None)

    def temperature(self, gpu: NvmlGpu) -> float | None:
        return self._value(gpu, "temperature")

    def sm_clock_mhz(self, gpu: NvmlGpu) -> float | None:
        return self._value(gpu, "sm_clock_mhz")

    def memory_clock_mhz(self, gpu: NvmlGpu) -> float | None:
        return self._value(gpu, "memory_clock_mhz")

    def power_w(self, gpu: NvmlGpu) -> float | None:
        return self._value(gpu, "power_w")

    def power_limit_w(self, gpu: NvmlGpu) -> float | None:
        return self._value(gpu, "power_limit_w")

    def fan_speed_pct(self, gpu: NvmlGpu) -> float | None:
        return self._value(gpu, "fan_speed_pct")

    def performance_state(self, gpu: NvmlGpu) -> int | None:
        return self._value(gpu, "performance_state")

    def clock_event_reasons(self, gpu: NvmlGpu) -> int | None:
        return self._value(gpu, "clock_event_reasons")

    # ------------------------------------------------------------------ counters
    def batch_values(self, gpu: NvmlGpu, *, slow: bool, pcie: bool) -> dict[str, Any] | None:
        """The energy counter (and with ``pcie`` the PCIe byte counters, as (bytes, driver
        timestamp µs); with ``slow`` the ECC counts and recovery action) in one call; None when
        the caller must ask one by one (the binding or driver has no nvmlDeviceGetFieldValues)."""
        if "field_values" in gpu.unsupported:
            return None
        # Which values to ask for changes only when one turns out unsupported (the set grows).
        picked = gpu.bound.get(("batch", slow, pcie))
        if picked is None or picked[0] != len(gpu.unsupported):
            wanted = [
                (key, fid)
                for key, fid, slow_field in self._batch
                if key not in gpu.unsupported
                and (slow or not slow_field)
                and (pcie or key not in _PCIE_COUNT_KEYS)
            ]
            picked = gpu.bound[("batch", slow, pcie)] = (
                len(gpu.unsupported),
                wanted,
                [f for _, f in wanted],
            )
        _, wanted, ids = picked
        if not wanted:
            return {}
        values = self._ask(gpu, "field_values", self._field_values_fn, ids)
        if values is None:
            return None if "field_values" in gpu.unsupported else {}
        gpu.reads += len(wanted) - 1  # each value is a read of its own for the lost rule
        out: dict[str, Any] = {}
        for (key, fid), value in zip(wanted, values, strict=False):
            status = getattr(value, "nvmlReturn", 0)
            if status == 0:
                number = _field_value(value)
                out[key] = (number, int(value.timestamp)) if key in _PCIE_COUNT_KEYS else number
            else:
                self._calls.failed(gpu, key, status, f"field value {fid} returned {status}")
        return out

    def slow_fields(self, gpu: NvmlGpu, batch: dict[str, Any] | None) -> dict[str, Any]:
        """The :data:`SLOW_FIELDS` read now (``batch``: a slow :meth:`batch_values`)."""
        out: dict[str, Any] = {"power_limit_w": self.power_limit_w(gpu)}
        out["ecc_corrected_volatile"] = self.ecc(gpu, "corrected", batch)
        out["ecc_uncorrected_volatile"] = self.ecc(gpu, "uncorrected", batch)
        rows = self._ask(gpu, "remapped_rows", self._remapped_fn)
        keys = SLOW_FIELDS[3:7]
        values = (None,) * 4 if rows is None else tuple(int(v) for v in rows)
        out.update(zip(keys, values, strict=True))
        # Ampere and newer; older boards retire pages instead and answer NOT_SUPPORTED, which
        # leaves the cells empty.
        action = None if batch is None else batch.get("recovery_action")
        out["recovery_action"] = None if action is None else int(action)
        return out

    def pcie_counters(
        self, gpu: NvmlGpu, reading: GpuReading, batch: dict[str, Any] | None
    ) -> bool:
        """PCIe rates from the driver's byte counters (``batch``: :meth:`batch_values` with
        ``pcie``); False where the driver has none (the caller uses the throughput calls)."""
        if batch is None or all(key in gpu.unsupported for key in _PCIE_COUNT_KEYS):
            return False
        for key, attr in _PCIE_COUNTS:
            now = batch.get(key)
            before = gpu.pcie_counts.pop(key, None)
            rate = None
            if now is not None:
                gpu.pcie_counts[key] = now
                if before is not None and now[1] > before[1] and now[0] >= before[0]:
                    rate = (now[0] - before[0]) / ((now[1] - before[1]) / 1e6)
            setattr(reading, attr, rate)
        return True

    def ecc(self, gpu: NvmlGpu, kind: str, batch: dict[str, Any] | None) -> int | None:
        key = f"ecc_{kind}_volatile"
        if batch is not None:
            value = batch.get(key)
        else:
            value = self._ask(gpu, key, self._ecc_fn, self._ecc_types[kind], self._volatile_ecc)
        return None if value is None else int(value)

    def energy_j(
        self, gpu: NvmlGpu, batch: dict[str, Any] | None, power_w: float | None, now: float
    ) -> float | None:
        """Cumulative joules: the driver's counter, else the integral of power since open (the
        rule of ``gputel.energy``: never across a missing power sample)."""
        if "energy_j" not in gpu.unsupported:
            mj = batch.get("energy_j") if batch is not None else self._energy_mj(gpu)
            if mj is not None:
                return float(mj) / 1000.0
            if "energy_j" not in gpu.unsupported:
                return None
        return gpu.power_integral.add(now, power_w)

    def energy_counter_j(self, gpu: NvmlGpu) -> float | None:
        """The driver's counter or None, never the integral: between two calls minutes apart
        (allocate, release) an integral is a trapezoid from two power samples, an invented
        number where an empty one is the truth."""
        mj = self._energy_mj(gpu)
        return None if mj is None else float(mj) / 1000.0

    def _energy_mj(self, gpu: NvmlGpu) -> Any:
        return self._ask(gpu, "energy_j", self._energy_fn)
