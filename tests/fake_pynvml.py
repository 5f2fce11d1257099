"""A stand-in for ``pynvml`` driven by a scenario table, so the NVML source runs without a GPU.

It mirrors the parts of NVIDIA's binding that gputel uses: the same function names and signatures,
the same ``NVMLError`` hierarchy (``NVMLError(3)`` is an ``NVMLError_NotSupported``, classes named
as the binding names them) and the same constant values; ``test_nvml_source`` checks this against
the installed ``pynvml`` so the fake cannot drift from the real thing.

A scenario is a list of per-GPU dicts, key -> value, where a value may be an exception (class or
instance) that the call raises. A key that is absent is "not supported by this GPU": the call
raises ``NVMLError_NotSupported``, as a real driver does. Keys:

``uuid``, ``name`` (str or bytes) · ``utilization`` (gpu %, memory %) · ``memory`` (used bytes,
total bytes; ``memory_v2`` overrides it for the v2 call) · ``temperature`` (``temperature_v``
overrides it for nvmlDeviceGetTemperatureV) · ``power_mw`` · ``power_limit_mw`` · ``energy_mj`` ·
``sm_clock_mhz`` · ``mem_clock_mhz`` · ``fan_pct`` · ``pstate`` · ``clock_reasons``
(``clock_event_reasons`` / ``clock_throttle_reasons`` override it per function) ·
``pcie_rx_kbps``, ``pcie_tx_kbps`` · ``ecc_corrected``, ``ecc_uncorrected`` · ``handle`` (an
exception for nvmlDeviceGetHandleByIndex) · ``field_values`` (an exception for the whole batch
call) · ``lost`` (True: every call on this GPU, nvmlDeviceGetHandleByIndex included, raises
``NVMLError_GpuIsLost``; an exception class or instance: they raise that instead, as a driver
answering ``NVML_ERROR_UNKNOWN`` does; ``set(i, lost=False)`` brings the GPU back).

``timeline`` maps a tick to per-GPU overrides that hold from that tick on (``advance()`` moves the
tick), ``init_error`` / ``count_error`` / ``device_count`` shape start-up, and ``missing`` names
attributes the binding does not have (an older nvidia-ml-py). ``calls`` counts calls per function
and ``gpu_calls`` per (function, GPU index), nvmlDeviceGetHandleByIndex counted by its index.
"""

from __future__ import annotations

import string
from collections import Counter
from types import ModuleType, SimpleNamespace
from typing import Any, ClassVar

ERROR_CODES: dict[str, int] = {
    "NVML_ERROR_UNINITIALIZED": 1,
    "NVML_ERROR_INVALID_ARGUMENT": 2,
    "NVML_ERROR_NOT_SUPPORTED": 3,
    "NVML_ERROR_NO_PERMISSION": 4,
    "NVML_ERROR_ALREADY_INITIALIZED": 5,
    "NVML_ERROR_NOT_FOUND": 6,
    "NVML_ERROR_INSUFFICIENT_SIZE": 7,
    "NVML_ERROR_INSUFFICIENT_POWER": 8,
    "NVML_ERROR_DRIVER_NOT_LOADED": 9,
    "NVML_ERROR_TIMEOUT": 10,
    "NVML_ERROR_IRQ_ISSUE": 11,
    "NVML_ERROR_LIBRARY_NOT_FOUND": 12,
    "NVML_ERROR_FUNCTION_NOT_FOUND": 13,
    "NVML_ERROR_CORRUPTED_INFOROM": 14,
    "NVML_ERROR_GPU_IS_LOST": 15,
    "NVML_ERROR_RESET_REQUIRED": 16,
    "NVML_ERROR_OPERATING_SYSTEM": 17,
    "NVML_ERROR_LIB_RM_VERSION_MISMATCH": 18,
    "NVML_ERROR_IN_USE": 19,
    "NVML_ERROR_MEMORY": 20,
    "NVML_ERROR_NO_DATA": 21,
    "NVML_ERROR_ARGUMENT_VERSION_MISMATCH": 25,
    "NVML_ERROR_UNKNOWN": 999,
}

CONSTANTS: dict[str, int] = {
    "NVML_SUCCESS": 0,
    **ERROR_CODES,
    "NVML_TEMPERATURE_GPU": 0,
    "NVML_CLOCK_SM": 1,
    "NVML_CLOCK_MEM": 2,
    "NVML_PCIE_UTIL_TX_BYTES": 0,
    "NVML_PCIE_UTIL_RX_BYTES": 1,
    "NVML_MEMORY_ERROR_TYPE_CORRECTED": 0,
    "NVML_MEMORY_ERROR_TYPE_UNCORRECTED": 1,
    "NVML_VOLATILE_ECC": 0,
    "NVML_AGGREGATE_ECC": 1,
    "NVML_PSTATE_UNKNOWN": 32,
    "NVML_FI_DEV_ECC_SBE_VOL_TOTAL": 3,
    "NVML_FI_DEV_ECC_DBE_VOL_TOTAL": 4,
    "NVML_FI_DEV_TOTAL_ENERGY_CONSUMPTION": 83,
    "NVML_FI_DEV_POWER_INSTANT": 186,
    "NVML_VALUE_TYPE_UNSIGNED_LONG_LONG": 3,
    "nvmlMemory_v2": 0x02000028,
    "nvmlTemperature_v1": 0x100000C,
}

#: Field id -> scenario key for nvmlDeviceGetFieldValues.
FIELD_KEYS: dict[int, str] = {3: "ecc_corrected", 4: "ecc_uncorrected", 83: "energy_mj"}


class NVMLError(Exception):
    """Same trick as the binding: ``NVMLError(code)`` builds the subclass for that code."""

    _valClassMapping: ClassVar[dict[int, type[NVMLError]]] = {}

    def __new__(cls, value: int) -> NVMLError:
        if cls is NVMLError:
            cls = NVMLError._valClassMapping.get(value, cls)
        obj = Exception.__new__(cls)
        obj.value = value  # type: ignore[attr-defined]
        return obj

    def __init__(self, value: int | None = None) -> None:
        super().__init__()

    def __str__(self) -> str:
        return _NAMES.get(self.value, f"NVML Error with code {self.value}")  # type: ignore[attr-defined]


def _class_name(const: str) -> str:
    return "NVMLError_" + string.capwords(const.replace("NVML_ERROR_", ""), "_").replace("_", "")


def _make_error_class(const: str, code: int) -> type[NVMLError]:
    def new(cls: type[NVMLError], *args: Any) -> NVMLError:
        return NVMLError.__new__(cls, code)

    cls = type(_class_name(const), (NVMLError,), {"__new__": new})
    NVMLError._valClassMapping[code] = cls
    return cls


_NAMES = {
    code: const.replace("NVML_ERROR_", "").replace("_", " ").title()
    for const, code in ERROR_CODES.items()
}
ERROR_CLASSES: dict[str, type[NVMLError]] = {
    _class_name(const): _make_error_class(const, code) for const, code in ERROR_CODES.items()
}
globals().update(ERROR_CLASSES)

NVMLError_NotSupported = ERROR_CLASSES["NVMLError_NotSupported"]
NVMLError_GpuIsLost = ERROR_CLASSES["NVMLError_GpuIsLost"]
NVMLError_Unknown = ERROR_CLASSES["NVMLError_Unknown"]
NVMLError_FunctionNotFound = ERROR_CLASSES["NVMLError_FunctionNotFound"]
NVMLError_Timeout = ERROR_CLASSES["NVMLError_Timeout"]
NVMLError_LibraryNotFound = ERROR_CLASSES["NVMLError_LibraryNotFound"]
NVMLError_LibRmVersionMismatch = ERROR_CLASSES["NVMLError_LibRmVersionMismatch"]
NVMLError_NoPermission = ERROR_CLASSES["NVMLError_NoPermission"]
NVMLError_DriverNotLoaded = ERROR_CLASSES["NVMLError_DriverNotLoaded"]
NVMLError_Uninitialized = ERROR_CLASSES["NVMLError_Uninitialized"]
NVMLError_ArgumentVersionMismatch = ERROR_CLASSES["NVMLError_ArgumentVersionMismatch"]

#: Every function the fake offers, named as in the binding.
FUNCTIONS: tuple[str, ...] = (
    "nvmlInit",
    "nvmlShutdown",
    "nvmlDeviceGetCount",
    "nvmlDeviceGetHandleByIndex",
    "nvmlDeviceGetUUID",
    "nvmlDeviceGetName",
    "nvmlDeviceGetUtilizationRates",
    "nvmlDeviceGetMemoryInfo",
    "nvmlDeviceGetTemperature",
    "nvmlDeviceGetTemperatureV",
    "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetEnforcedPowerLimit",
    "nvmlDeviceGetTotalEnergyConsumption",
    "nvmlDeviceGetClockInfo",
    "nvmlDeviceGetFanSpeed",
    "nvmlDeviceGetPerformanceState",
    "nvmlDeviceGetCurrentClocksEventReasons",
    "nvmlDeviceGetCurrentClocksThrottleReasons",
    "nvmlDeviceGetPcieThroughput",
    "nvmlDeviceGetTotalEccErrors",
    "nvmlDeviceGetFieldValues",
)


def gpu_row(index: int, **overrides: Any) -> dict[str, Any]:
    """A GPU that supports everything, with distinct plausible values per index."""
    row: dict[str, Any] = {
        "uuid": f"GPU-0000000{index}-fake-uuid".encode(),
        "name": b"NVIDIA H100 80GB HBM3",
        "utilization": (50 + index, 20 + index),
        "memory": (10 * 1024**3, 80 * 1024**3),
        "temperature": 40 + index,
        "power_mw": 300_000 + 1000 * index,
        "power_limit_mw": 700_000,
        "energy_mj": 5_000_000 + index,
        "sm_clock_mhz": 1980,
        "mem_clock_mhz": 2619,
        "fan_pct": 30,
        "pstate": 0,
        "clock_reasons": 0x4,
        "pcie_rx_kbps": 1000,
        "pcie_tx_kbps": 2000,
        "ecc_corrected": 2,
        "ecc_uncorrected": 0,
    }
    row.update(overrides)
    return row


class _Handle:
    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"<fake nvmlDevice {self.index}>"


def _raise_if_lost(row: dict[str, Any]) -> None:
    lost = row.get("lost")
    if lost is True:
        raise NVMLError_GpuIsLost()
    if lost:
        _raise_if_error(lost)


def _raise_if_error(value: Any) -> Any:
    if isinstance(value, type) and issubclass(value, BaseException):
        raise value()
    if isinstance(value, BaseException):
        raise value
    return value


class FakeNvml(ModuleType):
    """Install with ``monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([...]))``."""

    def __init__(
        self,
        gpus: list[dict[str, Any]],
        *,
        timeline: dict[int, dict[int, dict[str, Any]]] | None = None,
        init_error: BaseException | type[BaseException] | None = None,
        count_error: BaseException | type[BaseException] | None = None,
        device_count: int | None = None,
        missing: tuple[str, ...] = (),
    ) -> None:
        super().__init__("pynvml")
        self.gpus = gpus
        self.timeline = timeline or {}
        self.init_error = init_error
        self.count_error = count_error
        self.device_count = len(gpus) if device_count is None else device_count
        self.tick = 0
        self.calls: Counter[str] = Counter()
        self.gpu_calls: Counter[tuple[str, int]] = Counter()
        self.field_requests: list[tuple[int, tuple[int, ...]]] = []
        self.initialised = 0
        for name, value in CONSTANTS.items():
            setattr(self, name, value)
        for name, cls in ERROR_CLASSES.items():
            setattr(self, name, cls)
        self.NVMLError = NVMLError
        self._missing = frozenset(missing)

    def __getattribute__(self, name: str) -> Any:
        if not name.startswith("_") and name in object.__getattribute__(self, "_missing"):
            raise AttributeError(f"module 'pynvml' has no attribute {name!r}")
        return object.__getattribute__(self, name)

    # ----------------------------------------------------------------------------- scenario
    def advance(self, ticks: int = 1) -> None:
        self.tick += ticks

    def set(self, gpu: int, **values: Any) -> None:
        """Change GPU ``gpu``'s scenario from now on."""
        self.gpus[gpu].update(values)

    def effective(self, gpu: int) -> dict[str, Any]:
        row = dict(self.gpus[gpu])
        for tick in sorted(self.timeline):
            if tick <= self.tick:
                row.update(self.timeline[tick].get(gpu, {}))
        return row

    def _count(self, fn: str, handle: _Handle | None = None) -> None:
        self.calls[fn] += 1
        if handle is not None:
            self.gpu_calls[(fn, handle.index)] += 1

    def _row(self, fn: str, handle: _Handle) -> dict[str, Any]:
        """Count the call and fail it the way a whole call fails on a real driver."""
        self._count(fn, handle)
        if self.initialised <= 0:
            raise NVMLError_Uninitialized()
        row = self.effective(handle.index)
        _raise_if_lost(row)
        return row

    def _value(self, fn: str, handle: _Handle, *keys: str) -> Any:
        row = self._row(fn, handle)
        for key in keys:
            if key in row:
                return _raise_if_error(row[key])
        raise NVMLError_NotSupported()

    # ---------------------------------------------------------------------------- functions
    def nvmlInit(self) -> None:
        self._count("nvmlInit")
        _raise_if_error(self.init_error)
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self._count("nvmlShutdown")
        if self.initialised <= 0:
            raise NVMLError_Uninitialized()
        self.initialised -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._count("nvmlDeviceGetCount")
        _raise_if_error(self.count_error)
        return self.device_count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self.calls["nvmlDeviceGetHandleByIndex"] += 1
        if not 0 <= index < self.device_count:
            raise ERROR_CLASSES["NVMLError_InvalidArgument"]()
        self.gpu_calls[("nvmlDeviceGetHandleByIndex", index)] += 1
        row = self.effective(index)
        _raise_if_error(row.get("handle"))
        _raise_if_lost(row)
        return _Handle(index)

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str | bytes:
        return self._value("nvmlDeviceGetUUID", handle, "uuid")

    def nvmlDeviceGetName(self, handle: _Handle) -> str | bytes:
        return self._value("nvmlDeviceGetName", handle, "name")

    def nvmlDeviceGetUtilizationRates(self, handle: _Handle) -> SimpleNamespace:
        gpu, memory = self._value("nvmlDeviceGetUtilizationRates", handle, "utilization")
        return SimpleNamespace(gpu=gpu, memory=memory)

    def nvmlDeviceGetMemoryInfo(
        self, handle: _Handle, version: int | None = None
    ) -> SimpleNamespace:
        if version is not None and "nvmlMemory_v2" in self._missing:
            raise TypeError(
                "nvmlDeviceGetMemoryInfo() got an unexpected keyword argument 'version'"
            )
        if version:
            used, total = self._value("nvmlDeviceGetMemoryInfo_v2", handle, "memory_v2", "memory")
            return SimpleNamespace(
                version=version, total=total, reserved=0, free=total - used, used=used
            )
        used, total = self._value("nvmlDeviceGetMemoryInfo", handle, "memory")
        return SimpleNamespace(total=total, free=total - used, used=used)

    def nvmlDeviceGetTemperature(self, handle: _Handle, sensor: int) -> int:
        assert sensor == CONSTANTS["NVML_TEMPERATURE_GPU"]
        return self._value("nvmlDeviceGetTemperature", handle, "temperature")

    def nvmlDeviceGetTemperatureV(
        self, handle: _Handle, sensor: int, version: int = 0x100000C
    ) -> int:
        assert sensor == CONSTANTS["NVML_TEMPERATURE_GPU"]
        return self._value("nvmlDeviceGetTemperatureV", handle, "temperature_v", "temperature")

    def nvmlDeviceGetPowerUsage(self, handle: _Handle) -> int:
        return self._value("nvmlDeviceGetPowerUsage", handle, "power_mw")

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: _Handle) -> int:
        return self._value("nvmlDeviceGetEnforcedPowerLimit", handle, "power_limit_mw")

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: _Handle) -> int:
        return self._value("nvmlDeviceGetTotalEnergyConsumption", handle, "energy_mj")

    def nvmlDeviceGetClockInfo(self, handle: _Handle, type: int) -> int:
        key = {1: "sm_clock_mhz", 2: "mem_clock_mhz"}[type]
        return self._value("nvmlDeviceGetClockInfo", handle, key)

    def nvmlDeviceGetFanSpeed(self, handle: _Handle) -> int:
        return self._value("nvmlDeviceGetFanSpeed", handle, "fan_pct")

    def nvmlDeviceGetPerformanceState(self, handle: _Handle) -> int:
        return self._value("nvmlDeviceGetPerformanceState", handle, "pstate")

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: _Handle) -> int:
        return self._value(
            "nvmlDeviceGetCurrentClocksEventReasons", handle, "clock_event_reasons", "clock_reasons"
        )

    def nvmlDeviceGetCurrentClocksThrottleReasons(self, handle: _Handle) -> int:
        return self._value(
            "nvmlDeviceGetCurrentClocksThrottleReasons",
            handle,
            "clock_throttle_reasons",
            "clock_reasons",
        )

    def nvmlDeviceGetPcieThroughput(self, device: _Handle, counter: int) -> int:
        key = {0: "pcie_tx_kbps", 1: "pcie_rx_kbps"}[counter]
        return self._value("nvmlDeviceGetPcieThroughput", device, key)

    def nvmlDeviceGetTotalEccErrors(self, handle: _Handle, errorType: int, counterType: int) -> int:
        assert counterType == CONSTANTS["NVML_VOLATILE_ECC"]
        key = {0: "ecc_corrected", 1: "ecc_uncorrected"}[errorType]
        return self._value("nvmlDeviceGetTotalEccErrors", handle, key)

    def nvmlDeviceGetFieldValues(
        self, handle: _Handle, fieldIds: list[int]
    ) -> list[SimpleNamespace]:
        """Per-value status like the real call: the call succeeds, each value says if it did."""
        row = self._row("nvmlDeviceGetFieldValues", handle)
        _raise_if_error(row.get("field_values"))
        self.field_requests.append((handle.index, tuple(fieldIds)))
        out = []
        for fid in fieldIds:
            status, number = 0, 0
            key = FIELD_KEYS.get(fid)
            value = row.get(key) if key is not None else None
            if value is None:
                status = CONSTANTS["NVML_ERROR_NOT_SUPPORTED"]
            elif isinstance(value, NVMLError) or (
                isinstance(value, type) and issubclass(value, NVMLError)
            ):
                status = (value() if isinstance(value, type) else value).value  # type: ignore[attr-defined]
            else:
                number = int(value)
            out.append(
                SimpleNamespace(
                    fieldId=fid,
                    scopeId=0,
                    timestamp=0,
                    latencyUsec=0,
                    valueType=CONSTANTS["NVML_VALUE_TYPE_UNSIGNED_LONG_LONG"],
                    nvmlReturn=status,
                    value=SimpleNamespace(ullVal=number, uiVal=number, dVal=float(number)),
                )
            )
        return out
