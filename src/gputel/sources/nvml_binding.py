"""NVIDIA's ``pynvml`` binding, owned here: the only module of gputel that imports it.

Three jobs, all about the binding rather than any GPU:

- importing ``pynvml`` (lazily, inside :func:`load`, so ``gputel`` imports on machines without
  it) and starting NVML once per process for every source that uses it;
- turning a failure to start into one :class:`GpuSourceError` line that names the likely fix,
  because an operator reading a journal needs "reload the nvidia module", not an error code;
- resolving, once when a source opens, every NVML function gputel calls (:data:`FUNCTIONS`) into
  the binding's function object (:class:`NvmlApi`). Code asks for a function by a declared name
  only, so a misspelt name fails loudly (``KeyError``) in the tests instead of looking like an
  old driver; ``tests/test_nvml_binding.py`` checks every declared name against the installed
  ``nvidia-ml-py`` (run under the newest and the lowest supported one). A name a *driver* lacks
  is a different thing: the binding raises ``NVMLError_FunctionNotFound`` when it is called, and
  the asking rule (``sources/nvml_calls.py``) makes that field unsupported.

The NVML return codes are part of NVML's C ABI: literals keep classification working with a
binding that lacks a constant.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

from gputel.formats import one_line
from gputel.sources.base import GpuSourceError

log = logging.getLogger("gputel.nvml")

SUCCESS = 0
UNINITIALIZED = 1
NOT_SUPPORTED = 3
NO_PERMISSION = 4
NOT_FOUND = 6
DRIVER_NOT_LOADED = 9
TIMEOUT = 10
LIBRARY_NOT_FOUND = 12
FUNCTION_NOT_FOUND = 13
GPU_IS_LOST = 15
LIB_RM_VERSION_MISMATCH = 18
ARGUMENT_VERSION_MISMATCH = 25
PSTATE_UNKNOWN = 32

#: Every pynvml function gputel calls -> the first nvidia-ml-py release known to have it ("" for
#: every release ``pyproject.toml`` allows). A function missing from an older binding is
#: resolved to None and treated as unsupported; a name missing from a binding that should have
#: it is a bug, caught by ``tests/test_nvml_binding.py``.
FUNCTIONS: dict[str, str] = {
    "nvmlInit": "",
    "nvmlShutdown": "",
    "nvmlDeviceGetCount": "",
    "nvmlDeviceGetHandleByIndex": "",
    "nvmlDeviceGetUUID": "",
    "nvmlDeviceGetName": "",
    "nvmlDeviceGetPciInfo": "",
    "nvmlDeviceGetMigMode": "",
    "nvmlDeviceGetUtilizationRates": "",
    "nvmlDeviceGetMemoryInfo": "",
    "nvmlDeviceGetTemperatureV": "13.615.71",
    "nvmlDeviceGetTemperature": "",
    "nvmlDeviceGetPowerUsage": "",
    "nvmlDeviceGetEnforcedPowerLimit": "",
    "nvmlDeviceGetTotalEnergyConsumption": "",
    "nvmlDeviceGetFieldValues": "",
    "nvmlDeviceGetTotalEccErrors": "",
    "nvmlDeviceGetRemappedRows": "",
    "nvmlDeviceGetClockInfo": "",
    "nvmlDeviceGetFanSpeed": "",
    "nvmlDeviceGetPerformanceState": "",
    "nvmlDeviceGetCurrentClocksEventReasons": "",
    "nvmlDeviceGetCurrentClocksThrottleReasons": "",
    "nvmlDeviceGetPcieThroughput": "",
    "nvmlDeviceGetComputeRunningProcesses": "",
    "nvmlDeviceGetProcessesUtilizationInfo": "13.615.71",
    "nvmlDeviceGetProcessUtilization": "",
    "nvmlDeviceGetMaxMigDeviceCount": "",
    "nvmlDeviceGetMigDeviceHandleByIndex": "",
    "nvmlDeviceGetGpuInstanceId": "",
    "nvmlDeviceGetComputeInstanceId": "",
    "nvmlGpmQueryDeviceSupport": "",
    "nvmlGpmSampleAlloc": "",
    "nvmlGpmSampleFree": "",
    "nvmlGpmSampleGet": "",
    "nvmlGpmMigSampleGet": "",
    "nvmlGpmMetricsGet": "",
    "nvmlEventSetCreate": "",
    "nvmlEventSetFree": "",
    "nvmlEventSetWait_v2": "",
    "nvmlDeviceGetSupportedEventTypes": "",
    "nvmlDeviceRegisterEvents": "",
}

_OR_OTHER_BACKEND = "or use GPUTEL_BACKEND=sim/none"
_LIBRARY_MISSING = (
    "NVIDIA driver library libnvidia-ml.so.1 not found: install the NVIDIA driver, "
    + _OR_OTHER_BACKEND
)
_INIT_FIXES: dict[int, str] = {
    LIBRARY_NOT_FOUND: _LIBRARY_MISSING,
    LIB_RM_VERSION_MISMATCH: (
        "NVIDIA driver/library version mismatch (libnvidia-ml.so.1 differs from the loaded "
        "kernel module): reboot or reload the nvidia kernel module after a driver upgrade"
    ),
    NO_PERMISSION: (
        "no permission to use the NVIDIA devices: give the gputel user read/write access to the "
        "device nodes /dev/nvidia* (check their permissions, or the container's device list)"
    ),
    DRIVER_NOT_LOADED: (
        "NVIDIA kernel driver is not loaded: load it (modprobe nvidia) or install the NVIDIA "
        "driver, " + _OR_OTHER_BACKEND
    ),
}


def error_code(exc: BaseException) -> int | None:
    """The nvmlReturn_t an ``NVMLError`` carries (None for anything else)."""
    value = getattr(exc, "value", None)
    return value if isinstance(value, int) else None


def init_error(exc: BaseException) -> GpuSourceError:
    """Classify a failure to start NVML into the one line an operator can act on."""
    if isinstance(exc, OSError):
        return GpuSourceError(_LIBRARY_MISSING)
    code = error_code(exc)
    fix = _INIT_FIXES.get(code) if code is not None else None
    if fix is not None:
        return GpuSourceError(fix)
    return GpuSourceError(
        f"NVML could not start ({one_line(exc)}): check that nvidia-smi "
        f"works on this node, {_OR_OTHER_BACKEND}"
    )


def no_gpu_error() -> GpuSourceError:
    return GpuSourceError(
        "NVML found no NVIDIA GPU on this node: check nvidia-smi and that the GPU is seated "
        f"and powered, {_OR_OTHER_BACKEND}"
    )


class NvmlApi:
    """The loaded binding with the functions gputel calls resolved once.

    ``fn(name)`` is the binding's function object (None where this binding predates it);
    ``const(name, default)`` an NVML constant with its ABI value where the binding lacks it.
    """

    def __init__(self, module: ModuleType) -> None:
        self.module = module
        self.error: type[BaseException] = getattr(module, "NVMLError", Exception)
        self._functions: dict[str, Callable[..., Any] | None] = {
            name: getattr(module, name, None) for name in FUNCTIONS
        }

    def fn(self, name: str) -> Callable[..., Any] | None:
        """The resolved function; a name not in :data:`FUNCTIONS` raises KeyError (a bug)."""
        return self._functions[name]

    def call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call a function every supported binding has (start-up, probes, events); raises the
        binding's errors, and ``NVMLError_FunctionNotFound`` where this binding lacks it."""
        fn = self._functions[name]
        if fn is None:
            raise self.function_not_found(name)
        return fn(*args, **kwargs)

    def function_not_found(self, name: str) -> BaseException:
        cls = getattr(self.module, "NVMLError_FunctionNotFound", None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            return cls()
        return self.error(f"this pynvml has no {name}")

    def const(self, name: str, default: int) -> int:
        return int(getattr(self.module, name, default))

    def optional_const(self, name: str) -> int | None:
        value = getattr(self.module, name, None)
        return None if value is None else int(value)


# ------------------------------------------------------------------- process-wide initialisation
_state_lock = threading.Lock()
_initialised: ModuleType | None = None
_users = 0


def import_pynvml() -> ModuleType:
    try:
        import pynvml
    except Exception as exc:  # ImportError, or a broken binding failing while it loads
        raise GpuSourceError(
            f"cannot import the NVML Python binding pynvml ({one_line(exc)}): install "
            f"nvidia-ml-py, {_OR_OTHER_BACKEND}"
        ) from None
    return pynvml


def acquire() -> NvmlApi:
    """Import the binding and initialise NVML once per process; later sources share it."""
    global _initialised, _users
    nv = import_pynvml()
    with _state_lock:
        if _initialised is not nv:
            try:
                nv.nvmlInit()
            except Exception as exc:
                raise init_error(exc) from None
            _initialised, _users = nv, 0
        _users += 1
    return NvmlApi(nv)


def release(api: NvmlApi) -> None:
    """Shut NVML down when the last source using it closes."""
    global _initialised, _users
    nv = api.module
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
        log.debug("nvmlShutdown failed: %s", one_line(exc))


def reset_nvml_state() -> None:
    """Forget the process-wide initialisation (for tests that install a fresh fake binding)."""
    global _initialised, _users
    with _state_lock:
        _initialised, _users = None, 0
