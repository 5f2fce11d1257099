"""NVIDIA GPUs through NVML: the only module that imports ``pynvml``.

Everything NVML can do wrong is decided here, once, so the rest of gputel sees plain readings:

- initialisation failures become one :class:`GpuSourceError` line that names the likely fix, because
  an operator reading a journal needs "reload the nvidia module", not an error code;
- every field read goes through :meth:`NvmlGpuSource._ask`: a field the hardware or the binding
  does not offer is ``None`` and never asked again (an unsupported call still costs a driver
  round-trip every tick); any other error (``NVML_ERROR_UNKNOWN`` included, which some boards
  answer for their fans every time) costs that field for that tick only and is counted per
  field; a GPU is *lost* when it answers ``NVML_ERROR_GPU_IS_LOST`` or when every read of it in
  one full read fails. A lost GPU is left alone while the other GPUs keep reporting, re-probed
  at most once a minute with a query every GPU answers (MIG or not), so a reset GPU or a driver
  that got over a hiccup is read again without a restart;
- a GPU whose handle NVML refuses (``NO_PERMISSION``: hidden by the cgroup or the container's
  device list) is left out with one notice naming it; the others are read;
- a GPU in MIG mode gives no device utilization: it is not asked; where GPM works its activity
  is its busiest GPU instance's SM activity (``sources/nvml_gpm.py``), elsewhere a notice says
  that activity cannot be measured there;
- ``pynvml`` is imported inside :func:`open_nvml`, never at import time, so ``gputel`` imports on
  machines without the binding and tests can put a fake in ``sys.modules``.

No thread, timeout or retry of a failed call lives here: NVML calls can block in the kernel and
only the caller (the agent's deadline-guarded read, the recorder's per-GPU readers) can decide
what waiting too long means. Reads of one GPU are serialised by that GPU's lock, so a caller that
gave up on a hung read and asks again waits for it instead of piling more calls onto a wedged
GPU, while the other GPUs stay readable (:meth:`NvmlGpuSource.read_gpu`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from gputel.activity import busiest_instance_pct
from gputel.energy import PowerIntegrator
from gputel.formats import one_line
from gputel.schema import MIB, GpuReading
from gputel.sources.base import EventListener, GpuIdentity, GpuSelectionError, GpuSourceError
from gputel.sources.nvml_gpm import GpmReader, GpmState
from gputel.sources.nvml_processes import NvmlProcessReader

log = logging.getLogger("gputel.nvml")

# NVML return codes are part of its C ABI; literals keep classification working with bindings
# (or fakes) that lack a constant.
_NOT_SUPPORTED = 3
_NO_PERMISSION = 4
_DRIVER_NOT_LOADED = 9
_LIBRARY_NOT_FOUND = 12
_FUNCTION_NOT_FOUND = 13
_GPU_IS_LOST = 15
_LIB_RM_VERSION_MISMATCH = 18
_ARGUMENT_VERSION_MISMATCH = 25
_PSTATE_UNKNOWN = 32

_MIG_ENABLED = 1

#: Permanent for this driver and binding: stop asking.
_UNSUPPORTED_CODES = frozenset({_NOT_SUPPORTED, _FUNCTION_NOT_FOUND, _ARGUMENT_VERSION_MISMATCH})
#: The GPU itself stopped answering (Xid 79 and friends): stop reading it, only re-probe it.
#: NVML_ERROR_UNKNOWN is not here: healthy boards answer it for single fields (fans), so it costs
#: that field only; a GPU that answers nothing else is caught by the every-read-failed rule.
_LOST_CODES = frozenset({_GPU_IS_LOST})
#: Seconds between re-probes of a lost GPU: rare enough that a GPU really off the bus costs next to
#: nothing (a call on it can be slow), often enough that a reset GPU is back within a minute.
_REPROBE_S = 60.0

_OR_OTHER_BACKEND = "or use GPUTEL_BACKEND=sim/none"
_LIBRARY_MISSING = (
    "NVIDIA driver library libnvidia-ml.so.1 not found: install the NVIDIA driver, "
    + _OR_OTHER_BACKEND
)
_INIT_FIXES: dict[int, str] = {
    _LIBRARY_NOT_FOUND: _LIBRARY_MISSING,
    _LIB_RM_VERSION_MISMATCH: (
        "NVIDIA driver/library version mismatch (libnvidia-ml.so.1 differs from the loaded "
        "kernel module): reboot or reload the nvidia kernel module after a driver upgrade"
    ),
    _NO_PERMISSION: (
        "no permission to use the NVIDIA devices: give the gputel user read/write access to the "
        "device nodes /dev/nvidia* (check their permissions, or the container's device list)"
    ),
    _DRIVER_NOT_LOADED: (
        "NVIDIA kernel driver is not loaded: load it (modprobe nvidia) or install the NVIDIA "
        "driver, " + _OR_OTHER_BACKEND
    ),
}

#: PCIe throughput comes in KB/s, where NVML's KB is 1024 bytes.
_KIB = 1024

# The values fetched in one nvmlDeviceGetFieldValues call instead of one call each:
# (field key, binding constant name, its value in NVML's ABI).
_BATCH_FIELDS: tuple[tuple[str, str, int | None], ...] = (
    ("ecc_corrected_volatile", "NVML_FI_DEV_ECC_SBE_VOL_TOTAL", 3),
    ("ecc_uncorrected_volatile", "NVML_FI_DEV_ECC_DBE_VOL_TOTAL", 4),
    ("energy_j", "NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION", 83),
    # Asked only where the binding defines it (no default): older drivers have no such field.
    ("recovery_action", "NVML_FI_DEV_GET_GPU_RECOVERY_ACTION", None),
)
# nvmlValue_t members by nvmlValueType_t.
_VALUE_MEMBERS = ("dVal", "uiVal", "ulVal", "ullVal", "sllVal", "siVal", "usVal")


# ------------------------------------------------------------------- process-wide initialisation
_state_lock = threading.Lock()
_initialised: ModuleType | None = None
_users = 0


def _init_error(exc: BaseException) -> GpuSourceError:
    """Classify a failure to start NVML into the one line an operator can act on."""
    if isinstance(exc, OSError):
        return GpuSourceError(_LIBRARY_MISSING)
    value = getattr(exc, "value", None)
    fix = _INIT_FIXES.get(value) if isinstance(value, int) else None
    if fix is not None:
        return GpuSourceError(fix)
    return GpuSourceError(
        f"NVML could not start ({one_line(exc)}): check that nvidia-smi "
        f"works on this node, {_OR_OTHER_BACKEND}"
    )


def _import_pynvml() -> ModuleType:
    try:
        import pynvml
    except Exception as exc:  # ImportError, or a broken binding failing while it loads
        raise GpuSourceError(
            f"cannot import the NVML Python binding pynvml ({one_line(exc)}): install "
            f"nvidia-ml-py, {_OR_OTHER_BACKEND}"
        ) from None
    return pynvml


def _acquire(nv: ModuleType) -> None:
    """Initialise NVML once per process; later sources share it."""
    global _initialised, _users
    with _state_lock:
        if _initialised is not nv:
            try:
                nv.nvmlInit()
            except Exception as exc:
                raise _init_error(exc) from None
            _initialised, _users = nv, 0
        _users += 1


def _release(nv: ModuleType) -> None:
    """Shut NVML down when the last source using it closes."""
    global _initialised, _users
    with _state_lock:
        if _initialised is not nv:
            return
        _users -= 1
        if _users > 0:
            return
        _initialised, _users = None, 0
    try:
        nv.nvmlShutdown()
    except Exception as exc:  # nothing useful to do at shutdown; the driver frees it at exit
        log.debug("nvmlShutdown failed: %s", exc)


def reset_nvml_state() -> None:
    """Forget the process-wide initialisation (for tests that install a fresh fake binding)."""
    global _initialised, _users
    with _state_lock:
        _initialised, _users = None, 0


# ------------------------------------------------------------------------------------ the source
#: ``_ask(..., device=NO_DEVICE)``: a call that takes no device handle (GPM samples, metrics).
NO_DEVICE = object()


class _GpuLost(Exception):
    """Unwinds one GPU's read as soon as it turns out to be lost."""


@dataclass(eq=False)
class _Gpu:
    index: int
    handle: Any
    uuid: str = ""
    name: str = ""
    pci_bus_id: str = ""
    """NVML's ``busId``, read once at open: it names the GPU in the kernel log's Xid lines."""
    lost: bool = False
    mig: bool = False
    """MIG mode is on: NVML has no device utilization for it."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Serialises reads of this GPU only; a hung call here leaves the other GPUs readable."""
    field_errors: dict[str, int] = field(default_factory=dict)
    """Failed reads per field since open (not the unsupported ones): a counter for /metrics."""
    reads: int = 0
    failures: int = 0
    """Calls made and calls failed in the current full read (the every-read-failed rule)."""
    lost_checked: float = 0.0
    """Monotonic seconds of the loss or of the last re-probe, whichever is later."""
    unsupported: set[str] = field(default_factory=set)
    warned: set[str] = field(default_factory=set)
    power_integral: PowerIntegrator = field(default_factory=PowerIntegrator)
    """Integrated joules for :meth:`NvmlGpuSource.read` only, where the driver has no energy
    counter."""
    gpm: GpmState = field(default_factory=GpmState)
    """GPM support, samples and MIG devices (``sources/nvml_gpm.py``)."""


_PCIE_COUNTERS = (
    ("pcie_rx_bytes_per_s", "NVML_PCIE_UTIL_RX_BYTES", 1),
    ("pcie_tx_bytes_per_s", "NVML_PCIE_UTIL_TX_BYTES", 0),
)
"""(reading field, NVML counter constant, its value where the binding lacks the name)."""


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return "" if value is None else str(value)


def _field_value(value: Any) -> Any:
    """The number inside an nvmlFieldValue_t, by its declared type."""
    kind = getattr(value, "valueType", 3)
    member = _VALUE_MEMBERS[kind] if 0 <= kind < len(_VALUE_MEMBERS) else "ullVal"
    return getattr(value.value, member)


class NvmlGpuSource:
    """The selected NVIDIA GPUs; build with :func:`open_nvml`."""

    name = "nvml"

    def __init__(
        self,
        nv: ModuleType,
        gpus: list[_Gpu],
        clock: Callable[[], float],
        notices: list[str] | None = None,
    ) -> None:
        self._nv = nv
        self._gpus = gpus
        self._by_index = {g.index: g for g in gpus}
        self._clock = clock
        self._error: type[BaseException] = getattr(nv, "NVMLError", Exception)
        self._lock = threading.Lock()
        self._closed = False
        self.notices: list[str] = list(notices or [])
        """One line per GPU left out or not fully measurable, for the log and ``gputel status``."""
        self._batch = [
            (key, int(fid))
            for key, const, default in _BATCH_FIELDS
            if (fid := getattr(nv, const, default)) is not None
        ]
        self.gpm = GpmReader(nv, self._ask, self._failed, NO_DEVICE, clock)
        self._processes = NvmlProcessReader(self._ask)

    # ---------------------------------------------------------------- the one way to ask NVML
    def _ask(
        self,
        gpu: _Gpu,
        key: str,
        fn_name: str,
        *args: Any,
        device: Any = None,
        quiet: frozenset[int] = frozenset(),
        **kwargs: Any,
    ) -> Any:
        """Call ``fn_name(handle, *args)`` for ``key``; None when it gives no value.

        ``device``: the handle passed first instead of the GPU's own (one of its MIG devices),
        or ``NO_DEVICE`` for a call about the GPU that takes no handle (GPM samples, metrics).
        ``quiet``: return codes that are an answer ("nothing to report"), not a failure.
        Raises _GpuLost when the GPU is (or just became) lost.
        """
        if gpu.lost:
            raise _GpuLost
        if key in gpu.unsupported:
            return None
        gpu.reads += 1
        fn = getattr(self._nv, fn_name, None)
        if fn is None:
            self._failed(gpu, key, _FUNCTION_NOT_FOUND, f"this pynvml has no {fn_name}")
            return None
        if device is not NO_DEVICE:
            args = (gpu.handle if device is None else device, *args)
        try:
            return fn(*args, **kwargs)
        except self._error as exc:
            code = getattr(exc, "value", None)
            if code in quiet:
                return None
            self._failed(gpu, key, code, one_line(exc))
            return None

    def _failed(self, gpu: _Gpu, key: str, code: int | None, detail: str) -> None:
        """Decide what an NVML failure means; shared by single calls and batched values."""
        if code in _UNSUPPORTED_CODES:
            gpu.unsupported.add(key)
            gpu.reads = max(0, gpu.reads - 1)  # an answer about the field, not a failed read
            log.debug("GPU %d: %s not supported (%s); not asking again", gpu.index, key, detail)
            return
        if code in _LOST_CODES:
            self._lose(gpu, f"{detail} reading {key}")
            raise _GpuLost
        gpu.failures += 1
        gpu.field_errors[key] = gpu.field_errors.get(key, 0) + 1
        if key not in gpu.warned:
            gpu.warned.add(key)
            log.warning(
                "GPU %d: reading %s failed (%s); leaving it empty while it fails (logged once)",
                gpu.index,
                key,
                detail,
            )

    def _lose(self, gpu: _Gpu, why: str) -> None:
        self._mark_lost(gpu)
        log.warning(
            "GPU %d (%s) is lost (%s): reporting it as lost while the other GPUs keep "
            "reporting, re-checking it every %d s; check dmesg for Xid errors, a GPU reset or "
            "reboot may be needed",
            gpu.index,
            gpu.uuid or "uuid unknown",
            why,
            _REPROBE_S,
        )

    def _mark_lost(self, gpu: _Gpu) -> None:
        gpu.lost = True
        gpu.lost_checked = self._clock()
        # The power integral must not bridge the outage with a trapezoid over it.
        gpu.power_integral.gap()

    def _answers(self, gpu: _Gpu) -> bool:
        """Whether ``gpu`` may be read now; a lost GPU is re-probed here, at most once per
        _REPROBE_S, so a wedged GPU is not asked every tick yet a recovered one is not lost for
        good.

        The probe takes a fresh handle (one from before a reset may be stale, and a GPU lost at
        open has none), checks that the index still names the same GPU, then queries its memory,
        because identity may be cached by the driver while a query of the GPU is not, and every
        GPU answers it, MIG mode or not (utilization, which a GPU in MIG mode never gives, would
        keep such a GPU lost for good). It stops at the first failure, which is quiet: the loss
        was logged already.
        """
        if not gpu.lost:
            return True
        now = self._clock()
        if now - gpu.lost_checked < _REPROBE_S:
            return False
        gpu.lost_checked = now
        nv = self._nv
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(gpu.index)
            uuid = _text(nv.nvmlDeviceGetUUID(handle))
            if gpu.uuid and uuid != gpu.uuid:
                log.debug("GPU %d now reports uuid %s, not %s", gpu.index, uuid, gpu.uuid)
                return False
            nv.nvmlDeviceGetMemoryInfo(handle)
        except self._error as exc:
            if getattr(exc, "value", None) not in _UNSUPPORTED_CODES:
                log.debug("GPU %d still lost: %s", gpu.index, one_line(exc))
                return False
        except Exception as exc:  # a garbled answer is no answer
            log.debug("GPU %d still lost: %s", gpu.index, one_line(exc))
            return False
        gpu.handle, gpu.uuid, gpu.lost = handle, uuid, False
        if not gpu.name:
            try:
                gpu.name = _text(self._ask(gpu, "name", "nvmlDeviceGetName"))
            except _GpuLost:
                return False
        log.info("GPU %d (%s) answers again: reading it again", gpu.index, gpu.uuid)
        return True

    def _first(
        self, gpu: _Gpu, options: list[tuple[str, str, tuple[Any, ...], dict[str, Any]]]
    ) -> Any:
        """The first of several ways to read one value; the next is tried only when one is
        unsupported, so a transient failure does not double the calls."""
        for key, fn_name, args, kwargs in options:
            if key in gpu.unsupported:
                continue
            value = self._ask(gpu, key, fn_name, *args, **kwargs)
            if value is not None or key not in gpu.unsupported:
                return value
        return None

    def _const(self, name: str, default: int) -> int:
        return int(getattr(self._nv, name, default))

    # ------------------------------------------------------------------------------- fields
    def _utilization(self, gpu: _Gpu) -> tuple[float | None, float | None]:
        if gpu.mig:
            return None, None  # NVML answers NOT_SUPPORTED in MIG mode; no need to ask
        rates = self._ask(gpu, "utilization", "nvmlDeviceGetUtilizationRates")
        if rates is None:
            return None, None
        return float(rates.gpu), float(rates.memory)

    def _memory(self, gpu: _Gpu) -> tuple[float | None, float | None]:
        # v2 reports "used" without the driver's reserved memory, which is what a job sees.
        options: list[tuple[str, str, tuple[Any, ...], dict[str, Any]]] = []
        v2 = getattr(self._nv, "nvmlMemory_v2", None)
        if v2 is not None:
            options.append(("memory_v2", "nvmlDeviceGetMemoryInfo", (), {"version": v2}))
        options.append(("memory", "nvmlDeviceGetMemoryInfo", (), {}))
        info = self._first(gpu, options)
        if info is None:
            return None, None
        return info.used / MIB, info.total / MIB

    def _temperature(self, gpu: _Gpu) -> float | None:
        sensor = self._const("NVML_TEMPERATURE_GPU", 0)
        value = self._first(
            gpu,
            [
                ("temperature_v", "nvmlDeviceGetTemperatureV", (sensor,), {}),
                ("temperature", "nvmlDeviceGetTemperature", (sensor,), {}),
            ],
        )
        return None if value is None else float(value)

    def _clock_mhz(self, gpu: _Gpu, key: str, clock: str, default: int) -> float | None:
        mhz = self._ask(gpu, key, "nvmlDeviceGetClockInfo", self._const(clock, default))
        return None if mhz is None else float(mhz)

    def _power(self, gpu: _Gpu) -> float | None:
        # nvmlDeviceGetPowerUsage, not the FI_DEV_POWER_INSTANT field: on Ampere and later it is
        # the average over the last second, which suits one sample per second (and the energy
        # integration) better than a single instant.
        mw = self._ask(gpu, "power_w", "nvmlDeviceGetPowerUsage")
        return None if mw is None else mw / 1000.0

    def _batch_values(self, gpu: _Gpu) -> dict[str, Any] | None:
        """ECC counts and the energy counter in one call; None when the caller must ask one by
        one (the binding or driver has no nvmlDeviceGetFieldValues)."""
        if "field_values" in gpu.unsupported:
            return None
        wanted = [(key, fid) for key, fid in self._batch if key not in gpu.unsupported]
        if not wanted:
            return {}
        values = self._ask(gpu, "field_values", "nvmlDeviceGetFieldValues", [f for _, f in wanted])
        if values is None:
            return None if "field_values" in gpu.unsupported else {}
        gpu.reads += len(wanted) - 1  # each value is a read of its own for the lost rule
        out: dict[str, Any] = {}
        for (key, fid), value in zip(wanted, values, strict=False):
            status = getattr(value, "nvmlReturn", 0)
            if status == 0:
                out[key] = _field_value(value)
            else:
                self._failed(gpu, key, status, f"field value {fid} returned {status}")
        return out

    def _ecc(self, gpu: _Gpu, kind: str, batch: dict[str, Any] | None) -> int | None:
        key = f"ecc_{kind}_volatile"
        if batch is not None:
            value = batch.get(key)
        else:
            default = {"corrected": 0, "uncorrected": 1}[kind]
            error_type = self._const(f"NVML_MEMORY_ERROR_TYPE_{kind.upper()}", default)
            value = self._ask(
                gpu,
                key,
                "nvmlDeviceGetTotalEccErrors",
                error_type,
                self._const("NVML_VOLATILE_ECC", 0),
            )
        return None if value is None else int(value)

    def _energy(
        self, gpu: _Gpu, batch: dict[str, Any] | None, power_w: float | None, now: float
    ) -> float | None:
        """Cumulative joules: the driver's counter, else the integral of power since open (the
        rule of ``gputel.energy``: never across a missing power sample)."""
        if "energy_j" not in gpu.unsupported:
            if batch is not None:
                mj = batch.get("energy_j")
            else:
                mj = self._ask(gpu, "energy_j", "nvmlDeviceGetTotalEnergyConsumption")
            if mj is not None:
                return mj / 1000.0
            if "energy_j" not in gpu.unsupported:
                return None
        return gpu.power_integral.add(now, power_w)

    def _energy_counter(self, gpu: _Gpu) -> float | None:
        """The driver's counter or None, never the integral: between two calls minutes apart
        (allocate, release) an integral is a trapezoid from two power samples, an invented
        number where an empty one is the truth."""
        mj = self._ask(gpu, "energy_j", "nvmlDeviceGetTotalEnergyConsumption")
        return None if mj is None else mj / 1000.0

    def _memory_health(self, gpu: _Gpu, r: GpuReading, batch: dict[str, Any] | None) -> None:
        """Remapped rows and the recovery action the driver asks for (Ampere and newer; older
        boards retire pages instead and answer NOT_SUPPORTED, which leaves the cells empty)."""
        rows = self._ask(gpu, "remapped_rows", "nvmlDeviceGetRemappedRows")
        if rows is not None:
            (
                r.remapped_rows_correctable,
                r.remapped_rows_uncorrectable,
                r.remapped_rows_pending,
                r.remapped_rows_failure,
            ) = (int(v) for v in rows)
        action = None if batch is None else batch.get("recovery_action")
        r.recovery_action = None if action is None else int(action)

    def _fill(self, gpu: _Gpu, r: GpuReading) -> None:
        nv = self._nv
        r.utilization_gpu_pct, r.utilization_memory_pct = self._utilization(gpu)
        self.gpm.fill(gpu, r)
        r.memory_used_mib, r.memory_total_mib = self._memory(gpu)
        r.temperature_c = self._temperature(gpu)
        r.power_w = self._power(gpu)
        now = self._clock()
        limit = self._ask(gpu, "power_limit_w", "nvmlDeviceGetEnforcedPowerLimit")
        r.power_limit_w = None if limit is None else limit / 1000.0
        batch = self._batch_values(gpu)
        r.ecc_corrected_volatile = self._ecc(gpu, "corrected", batch)
        r.ecc_uncorrected_volatile = self._ecc(gpu, "uncorrected", batch)
        r.energy_j = self._energy(gpu, batch, r.power_w, now)
        self._memory_health(gpu, r, batch)
        r.sm_clock_mhz = self._clock_mhz(gpu, "sm_clock_mhz", "NVML_CLOCK_SM", 1)
        r.memory_clock_mhz = self._clock_mhz(gpu, "memory_clock_mhz", "NVML_CLOCK_MEM", 2)
        fan = self._ask(gpu, "fan_speed_pct", "nvmlDeviceGetFanSpeed")
        r.fan_speed_pct = None if fan is None else float(fan)
        pstate = self._ask(gpu, "performance_state", "nvmlDeviceGetPerformanceState")
        unknown = getattr(nv, "NVML_PSTATE_UNKNOWN", _PSTATE_UNKNOWN)
        r.performance_state = None if pstate is None or pstate == unknown else int(pstate)
        reasons = self._first(
            gpu,
            [
                ("clock_event_reasons", "nvmlDeviceGetCurrentClocksEventReasons", (), {}),
                ("clock_throttle_reasons", "nvmlDeviceGetCurrentClocksThrottleReasons", (), {}),
            ],
        )
        r.clock_event_reasons = None if reasons is None else int(reasons)
        # Each throughput call samples the bus for ~20 ms inside the driver: GPM's counters
        # replace them where the GPU has them.
        if not self.gpm.gives_pcie(gpu):
            for attr, counter, default in _PCIE_COUNTERS:
                kib = self._ask(
                    gpu, attr, "nvmlDeviceGetPcieThroughput", self._const(counter, default)
                )
                setattr(r, attr, None if kib is None else float(kib) * _KIB)
        r.processes = self._processes.read(gpu)

    # --------------------------------------------------------------------------- GpuSource
    def devices(self) -> list[GpuIdentity]:
        return [GpuIdentity(g.index, g.uuid, g.name, g.pci_bus_id) for g in self._gpus]

    def read_utilization(self) -> dict[int, float | None]:
        """One call per GPU: the agent polls this every tick, busy or idle. A MIG GPU, which
        has no utilization, gives its busiest GPU instance's SM activity where GPM works
        (``gputel.activity``).

        A failed call is this tick's ``None``; only GPU_IS_LOST loses the GPU here (one call is
        too little to apply the every-read-failed rule to).
        """
        out: dict[int, float | None] = {}
        for gpu in self._gpus:
            with gpu.lock:
                try:
                    if not self._answers(gpu):
                        out[gpu.index] = None
                    elif gpu.mig and self.gpm.supported(gpu):
                        instances = self.gpm.mig_readings(gpu, memory=False)
                        out[gpu.index] = busiest_instance_pct(instances)
                    else:
                        out[gpu.index] = self._utilization(gpu)[0]
                except _GpuLost:
                    out[gpu.index] = None
        return out

    def read_light(self) -> list[GpuReading]:
        """Utilization plus the cheap fields (``LIGHT_FIELDS``) for the agent's pre-trigger.

        Six calls per GPU that the driver answers from values it keeps; none of the ~20 ms PCIe
        samples, the per-process walk or the field-value batch of :meth:`read`. Energy is the
        driver's counter only (no power integral between two ticks of another process).
        """
        readings: list[GpuReading] = []
        for gpu in self._gpus:
            with gpu.lock:
                reading = GpuReading(gpu.index, gpu.uuid, gpu.name)
                try:
                    if not self._answers(gpu):
                        raise _GpuLost
                    reading.utilization_gpu_pct = self._utilization(gpu)[0]
                    self.gpm.fill_light(gpu, reading)
                    reading.memory_used_mib = self._memory(gpu)[0]
                    reading.temperature_c = self._temperature(gpu)
                    reading.power_w = self._power(gpu)
                    reading.energy_j = self._energy_counter(gpu)
                    reading.sm_clock_mhz = self._clock_mhz(gpu, "sm_clock_mhz", "NVML_CLOCK_SM", 1)
                except _GpuLost:
                    reading = GpuReading(gpu.index, gpu.uuid, gpu.name, lost=True)
                readings.append(reading)
        return readings

    def read(self) -> list[GpuReading]:
        return [self.read_gpu(gpu.index) for gpu in self._gpus]

    def read_gpu(self, index: int) -> GpuReading:
        """The full read of one GPU; other GPUs' reads may run at the same time."""
        gpu = self._by_index[index]
        with gpu.lock:
            try:
                if not self._answers(gpu):
                    raise _GpuLost
                reading = GpuReading(index=gpu.index, uuid=gpu.uuid, name=gpu.name)
                gpu.reads = gpu.failures = 0
                self._fill(gpu, reading)
                if gpu.reads and gpu.failures == gpu.reads:
                    self._lose(gpu, f"all {gpu.reads} reads of it failed")
                    raise _GpuLost
                reading.field_errors = dict(gpu.field_errors)
            except _GpuLost:
                # Values read before the loss are dropped: they belong to a GPU now gone.
                reading = GpuReading(gpu.index, gpu.uuid, gpu.name, lost=True)
                reading.field_errors = dict(gpu.field_errors)
        return reading

    def read_energy_j(self) -> dict[int, float | None]:
        """The driver's energy counter per GPU; None where it has none or the GPU is lost.

        Unlike :meth:`read`, no power integration stands in for a missing counter: this is read
        only at a few moments (open, allocate, release), and an integral over two samples would
        put an invented number in allocations.csv where an empty cell is promised.
        """
        out: dict[int, float | None] = {}
        for gpu in self._gpus:
            with gpu.lock:
                try:
                    out[gpu.index] = self._energy_counter(gpu) if self._answers(gpu) else None
                except _GpuLost:
                    out[gpu.index] = None
        return out

    # ------------------------------------------------- for the modules beside this one
    @property
    def binding(self) -> ModuleType:
        """The loaded pynvml, for calls that name no GPU (``nvmlEventSetCreate``...)."""
        return self._nv

    def gpu_handles(self) -> dict[int, Any]:
        """Handle per selected GPU that has one (a GPU lost at open has none)."""
        return {g.index: g.handle for g in self._gpus if g.handle is not None}

    def ask(self, index: int, key: str, fn_name: str, *args: Any) -> Any:
        """:meth:`_ask` for GPU ``index`` under its lock: the one rule for every NVML call on a
        GPU. None when there is no value (unsupported, failed this time, or the GPU is lost)."""
        gpu = self._by_index[index]
        with gpu.lock:
            try:
                return self._ask(gpu, key, fn_name, *args)
            except _GpuLost:
                return None

    def unsupported(self, index: int, key: str) -> bool:
        """Whether ``key`` turned out unsupported on GPU ``index`` (asked, never again)."""
        return key in self._by_index[index].unsupported

    def errors(self, index: int, key: str) -> int:
        """Failed calls for ``key`` on GPU ``index`` since open (a call that returns nothing
        tells its failure only here)."""
        return self._by_index[index].field_errors.get(key, 0)

    def event_listener(self) -> EventListener:
        """The NVML event listener over these GPUs (``gputel.sources.nvml_events``)."""
        from gputel.sources.nvml_events import NvmlEventListener

        return NvmlEventListener(self)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for gpu in self._gpus:
            # A read hung in the driver may hold a sample: leave its samples to the process exit.
            if gpu.lock.acquire(blocking=False):
                try:
                    self.gpm.close(gpu)
                finally:
                    gpu.lock.release()
        _release(self._nv)


def open_nvml(
    selected: tuple[int, ...] | None, clock: Callable[[], float] = time.monotonic
) -> NvmlGpuSource:
    """Start NVML (once per process) and open the selected GPUs (all when ``None``).

    Raises GpuSourceError with one line naming the likely fix when NVML cannot start, finds no
    GPU, or a selected index does not exist. A GPU that is already lost is opened as lost, and its
    uuid and name are filled in if it answers a later re-probe.
    """
    nv = _import_pynvml()
    _acquire(nv)
    try:
        return _open(nv, selected, clock)
    except BaseException:
        _release(nv)
        raise


def _open(
    nv: ModuleType, selected: tuple[int, ...] | None, clock: Callable[[], float]
) -> NvmlGpuSource:
    try:
        count = int(nv.nvmlDeviceGetCount())
    except Exception as exc:
        raise _init_error(exc) from None
    if count == 0:
        raise GpuSourceError(
            "NVML found no NVIDIA GPU on this node: check nvidia-smi and that the GPU is seated "
            f"and powered, {_OR_OTHER_BACKEND}"
        )
    indices = list(range(count)) if selected is None else sorted(set(selected))
    missing = [i for i in indices if i >= count]
    if missing:
        names = ", ".join(str(i) for i in missing)
        raise GpuSelectionError(
            f"GPUTEL_GPUS selects GPU {names}, but this node has {count} GPU(s) "
            f"(indices 0-{count - 1}): fix GPUTEL_GPUS, or if the GPU was there before, check "
            "whether it fell off the bus (dmesg | grep -i xid; nvidia-smi)"
        )
    error: type[BaseException] = getattr(nv, "NVMLError", Exception)
    gpus: list[_Gpu] = []
    notices: list[str] = []
    refused: BaseException | None = None
    for index in indices:
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(index)
        except error as exc:
            if getattr(exc, "value", None) not in _LOST_CODES:
                refused = refused or exc
                notices.append(_refused_notice(index, exc))
                continue
            log.warning(
                "GPU %d is lost at start (%s): reporting it as lost, re-checking it every %d s",
                index,
                one_line(exc),
                _REPROBE_S,
            )
            gpus.append(_Gpu(index, None, lost=True, lost_checked=clock()))
            continue
        gpus.append(_Gpu(index, handle))
    if not gpus and refused is not None:
        raise _init_error(refused) from None
    source = NvmlGpuSource(nv, gpus, clock)
    for gpu in gpus:
        try:
            gpu.uuid = _text(source._ask(gpu, "uuid", "nvmlDeviceGetUUID"))
            gpu.name = _text(source._ask(gpu, "name", "nvmlDeviceGetName"))
            pci = source._ask(gpu, "pci", "nvmlDeviceGetPciInfo")
            gpu.pci_bus_id = _text(getattr(pci, "busId", None))
            mode = source._ask(gpu, "mig_mode", "nvmlDeviceGetMigMode")
        except _GpuLost:
            continue
        if mode is not None and int(mode[0]) == _MIG_ENABLED:
            gpu.mig = True
            try:
                if source.gpm.supported(gpu):
                    continue  # activity from its GPU instances' SM activity
            except _GpuLost:
                continue
            notices.append(
                f"GPU {gpu.index} ({gpu.uuid}) is in MIG mode: NVML gives no utilization for it, "
                "so its activity cannot be measured and only allocations and the operator mode "
                "(gputel start) start telemetry for it"
            )
    source.notices = notices
    return source


def _refused_notice(index: int, exc: BaseException) -> str:
    """The one line for a GPU NVML will not open; the cause is nearly always its device node."""
    return (
        f"GPU {index} is unavailable: NVML refused its handle ({one_line(exc)}); it is "
        "probably hidden from this process by the cgroup device list or the container's "
        "device list (its /dev/nvidia* node), recording the other GPUs without it"
    )
