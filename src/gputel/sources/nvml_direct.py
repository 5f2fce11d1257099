"""A thin layer over ``pynvml`` for the calls a full read makes every tick.

NVIDIA's binding stays the binding: its C function lookup (``_nvmlGetFunctionPointer``), its
structure definitions and its error classes (``NVMLError(code)`` gives the same subclass a
pynvml function raises) are used as they are. What this layer removes is the binding's per-call
Python work, which costs more than the driver call on a healthy GPU:

- the C function is looked up once, when the source opens (pynvml looks it up, under a lock, on
  every call); a symbol the driver lacks becomes a function that raises
  ``NVMLError_FunctionNotFound``, so the asking rule makes that field unsupported as before;
- results come in *plain* ctypes mirrors of pynvml's structures (:func:`plain`): the binding's
  own structures format every field access in Python (``__getattribute__``), which made GPM
  results and process lists the dearest part of a read;
- the process list is read in one call into an array sized from the previous answer (pynvml asks
  for the count first, then again for the entries).

Each fast function has the signature and the result fields of the pynvml function it stands in
for (:data:`FAST`), so callers cannot tell them apart; ``tests/test_nvml_binding.py`` checks
that each binds the C symbol the pynvml function itself calls. A binding without
``_nvmlGetFunctionPointer`` or with a structure of an unexpected size gets no fast function:
pynvml's own is used.
"""

from __future__ import annotations

import ctypes
import logging
import struct
from collections.abc import Callable
from types import ModuleType
from typing import Any, NamedTuple

log = logging.getLogger("gputel.nvml")

_INSUFFICIENT_SIZE = 7
#: The driver's v3 process entry: pid, used memory, GPU and compute instance ids.
_PROCESS_INFO_SIZE = 24
_PLAIN: dict[Any, Any] = {}


def plain(cls: Any) -> Any:
    """A ctypes structure (or union) with ``cls``'s layout and none of its Python hooks."""
    done = _PLAIN.get(cls)
    if done is not None:
        return done
    fields = [(f[0], _plain_type(f[1]), *f[2:]) for f in cls._fields_]
    base: type = ctypes.Union if issubclass(cls, ctypes.Union) else ctypes.Structure
    namespace: dict[str, Any] = {"_fields_": fields}
    if hasattr(cls, "_pack_"):
        namespace["_pack_"] = cls._pack_
    mirror = type(f"{cls.__name__}_plain", (base,), namespace)
    if ctypes.sizeof(mirror) != ctypes.sizeof(cls):
        raise TypeError(f"plain {cls.__name__} differs in size")
    _PLAIN[cls] = mirror
    return mirror


def _plain_type(t: Any) -> Any:
    if isinstance(t, type) and issubclass(t, ctypes.Structure | ctypes.Union):
        return plain(t)
    if isinstance(t, type) and issubclass(t, ctypes.Array):
        inner = t._type_
        if isinstance(inner, type) and issubclass(inner, ctypes.Structure | ctypes.Union):
            return plain(inner) * t._length_
    return t


class Process(NamedTuple):
    """One entry of the process list (the fields gputel reads of pynvml's friendly object)."""

    pid: int
    usedGpuMemory: int | None


class _Binder:
    """Looks up C functions once and wraps them with pynvml's error rule."""

    def __init__(self, nv: ModuleType) -> None:
        self.nv = nv
        self.error: Callable[[int], BaseException] = nv.NVMLError
        self._lookup: Callable[[str], Any] = nv._nvmlGetFunctionPointer

    def c(self, symbol: str) -> Any:
        """The C function, or a stand-in that raises what pynvml raises where it is missing."""
        try:
            return self._lookup(symbol)
        except self.nv.NVMLError as exc:
            value = exc.value

            def missing(*_args: Any) -> int:
                return int(value)

            return missing

    def out(self, symbol: str, out_type: Any) -> Callable[..., Any]:
        """``fn(handle, *args) -> out``: calls ``symbol(handle, *args, &out)``."""
        c, error = self.c(symbol), self.error
        byref = ctypes.byref

        def call(handle: Any, *args: Any) -> Any:
            out = out_type()
            ret = c(handle, *args, byref(out))
            if ret:
                raise error(ret)
            return out

        return call


def _memory(b: _Binder) -> Callable[..., Any]:
    v1 = b.out("nvmlDeviceGetMemoryInfo", plain(b.nv.c_nvmlMemory_t))
    c2, error, v2_type = b.c("nvmlDeviceGetMemoryInfo_v2"), b.error, plain(b.nv.c_nvmlMemory_v2_t)

    def memory(handle: Any, version: Any = None) -> Any:
        if not version:
            return v1(handle)
        out = v2_type()
        out.version = version
        ret = c2(handle, ctypes.byref(out))
        if ret:
            raise error(ret)
        return out

    return memory


def _field_values(b: _Binder) -> Callable[..., Any]:
    c, error, value_type = b.c("nvmlDeviceGetFieldValues"), b.error, plain(b.nv.c_nvmlFieldValue_t)

    def field_values(handle: Any, field_ids: list[int]) -> Any:
        values = (value_type * len(field_ids))()
        for i, fid in enumerate(field_ids):
            values[i].fieldId = fid
        ret = c(handle, ctypes.c_int32(len(field_ids)), values)
        if ret:
            raise error(ret)
        return values

    return field_values


def _gpm_sample(b: _Binder) -> Callable[..., Any]:
    c, error = b.c("nvmlGpmSampleGet"), b.error

    def sample_get(handle: Any, sample: Any) -> Any:
        ret = c(handle, sample)
        if ret:
            raise error(ret)
        return sample

    return sample_get


def _gpm_metrics(b: _Binder) -> Callable[..., Any]:
    c, error = b.c("nvmlGpmMetricsGet"), b.error

    def metrics_get(request: Any) -> Any:
        ret = c(ctypes.byref(request))
        if ret:
            raise error(ret)
        return request

    return metrics_get


class ProcessSample(NamedTuple):
    """One per-process utilization sample (the fields gputel reads of pynvml's structure)."""

    timeStamp: int
    pid: int
    smUtil: int


#: The v3 process entry's pid and used memory (24 bytes; the instance ids are not read).
_PROCESS_ENTRY = struct.Struct("<I4xQ8x")
#: A v1 process utilization sample's time stamp, pid and SM utilization (40 bytes).
_UTILIZATION_SAMPLE = struct.Struct("<QII24x")


class _Buffers:
    """Per GPU handle: the arrays a call fills, allocated once and grown when too small.

    Calls for one GPU never run at the same time (the GPU's lock), so each GPU's buffers are
    its own; the handle object itself is kept to tell a reused ``id`` from the GPU's."""

    def __init__(self, make: Callable[[int], Any]) -> None:
        self._make = make
        self._by_handle: dict[int, tuple[Any, int, Any]] = {}
        self.room = 8
        """Entries the next allocation offers: the largest list seen so far, plus a margin."""

    def get(self, handle: Any) -> Any:
        found = self._by_handle.get(id(handle))
        if found is None or found[0] is not handle or found[1] < self.room:
            found = (handle, self.room, self._make(self.room))
            self._by_handle[id(handle)] = found
        return found[2]


def _processes(b: _Binder) -> Callable[..., Any] | None:
    nv = b.nv
    struct_type = getattr(nv, "c_nvmlProcessInfo_v3_t", None) or nv.c_nvmlProcessInfo_t
    if ctypes.sizeof(struct_type) != _PROCESS_ENTRY.size:
        return None  # not the driver's v3 entry: leave it to pynvml
    entry = plain(struct_type)
    c, error = b.c("nvmlDeviceGetComputeRunningProcesses_v3"), b.error
    not_available = int(
        getattr(nv, "NVML_VALUE_NOT_AVAILABLE_ulonglong", ctypes.c_ulonglong(-1)).value
    )
    buffers = _Buffers(lambda n: (ctypes.c_uint(), (entry * n)()))
    string_at, byref, unpack = ctypes.string_at, ctypes.byref, _PROCESS_ENTRY.iter_unpack

    def processes(handle: Any) -> list[Process]:
        while True:
            count, array = buffers.get(handle)
            size = count.value = len(array)
            ret = c(handle, byref(count), array)
            if ret == _INSUFFICIENT_SIZE:
                buffers.room = max(size * 2, int(count.value) + 8)
                continue
            if ret:
                raise error(ret)
            raw = string_at(array, int(count.value) * _PROCESS_ENTRY.size)
            return [
                Process(pid, None if used == not_available else used) for pid, used in unpack(raw)
            ]

    return processes


def _process_utilization(b: _Binder) -> Callable[..., Any] | None:
    nv = b.nv
    c, error = b.c("nvmlDeviceGetProcessesUtilizationInfo"), b.error
    info_type = plain(nv.c_nvmlProcessesUtilizationInfo_v1_t)
    sample = plain(nv.c_nvmlProcessUtilizationInfo_v1_t)
    if ctypes.sizeof(sample) != _UTILIZATION_SAMPLE.size:
        return None  # another layout: leave it to pynvml
    version = nv.ProcessesUtilizationInfo_v1
    pointer = dict(info_type._fields_)["procUtilArray"]

    def make(n: int) -> tuple[Any, Any]:
        array = (sample * n)()
        info = info_type()
        info.procUtilArray = ctypes.cast(array, pointer)
        return info, array

    buffers = _Buffers(make)
    string_at, byref, unpack = ctypes.string_at, ctypes.byref, _UTILIZATION_SAMPLE.iter_unpack

    def utilization(handle: Any, since: int) -> list[ProcessSample]:
        while True:
            info, array = buffers.get(handle)
            size = len(array)
            info.version = version
            info.processSamplesCount = size
            info.lastSeenTimeStamp = since
            ret = c(handle, byref(info))
            if ret == _INSUFFICIENT_SIZE:
                buffers.room = max(size * 2, int(info.processSamplesCount) + 8)
                continue
            if ret:
                raise error(ret)
            raw = string_at(array, int(info.processSamplesCount) * _UTILIZATION_SAMPLE.size)
            return [ProcessSample(*fields) for fields in unpack(raw)]

    return utilization


#: pynvml function -> (its C symbol(s), the factory of the fast function). The single-value
#: calls of a full read are bound per GPU instead (:func:`bind`); the memory query stays here for
#: the re-probe of a lost GPU and MIG devices' memory.
FAST: dict[str, tuple[tuple[str, ...], Callable[[_Binder], Callable[..., Any] | None]]] = {
    "nvmlDeviceGetMemoryInfo": (
        ("nvmlDeviceGetMemoryInfo", "nvmlDeviceGetMemoryInfo_v2"),
        _memory,
    ),
    "nvmlDeviceGetFieldValues": (("nvmlDeviceGetFieldValues",), _field_values),
    "nvmlDeviceGetProcessesUtilizationInfo": (
        ("nvmlDeviceGetProcessesUtilizationInfo",),
        _process_utilization,
    ),
    "nvmlGpmSampleGet": (("nvmlGpmSampleGet",), _gpm_sample),
    "nvmlGpmMetricsGet": (("nvmlGpmMetricsGet",), _gpm_metrics),
    "nvmlDeviceGetComputeRunningProcesses": (
        ("nvmlDeviceGetComputeRunningProcesses_v3",),
        _processes,
    ),
}


class Bound(NamedTuple):
    """One call of one GPU with its arguments and result buffer bound once: ``c(*args)``
    returns the NVML return code and leaves the result in ``out``; the value pynvml's function
    returns is ``out``'s ``field`` (``value`` of a scalar), the whole ``out`` where None.
    ``inputs``, where given, sets the result structure's input fields first."""

    c: Callable[..., int]
    args: tuple[Any, ...]
    out: Any
    field: str | None
    inputs: Callable[[Any], None] | None


def _versioned(version: str, **fields: Any) -> Callable[[ModuleType], Callable[[Any], None]]:
    """Inputs of a versioned result structure: its ``version`` from the binding, and more."""

    def make(nv: ModuleType) -> Callable[[Any], None]:
        value = getattr(nv, version)

        def inputs(out: Any) -> None:
            out.version = value
            for name, v in fields.items():
                setattr(out, name, v)

        return inputs

    return make


#: The single-result calls of a full read that can be bound per GPU: pynvml function ->
#: (C symbol, result type from the binding, the result's field pynvml returns (None: the whole
#: structure), inputs set in the result).
BOUND: dict[
    str,
    tuple[
        str,
        Callable[[ModuleType], Any],
        str | None,
        Callable[[ModuleType], Callable[[Any], None]] | None,
    ],
] = {
    "nvmlDeviceGetUtilizationRates": (
        "nvmlDeviceGetUtilizationRates",
        lambda nv: plain(nv.c_nvmlUtilization_t),
        None,
        None,
    ),
    "nvmlDeviceGetMemoryInfo": (
        "nvmlDeviceGetMemoryInfo",
        lambda nv: plain(nv.c_nvmlMemory_t),
        None,
        None,
    ),
    "nvmlDeviceGetTemperature": (
        "nvmlDeviceGetTemperature",
        lambda nv: ctypes.c_uint,
        "value",
        None,
    ),
    "nvmlDeviceGetPowerUsage": ("nvmlDeviceGetPowerUsage", lambda nv: ctypes.c_uint, "value", None),
    "nvmlDeviceGetEnforcedPowerLimit": (
        "nvmlDeviceGetEnforcedPowerLimit",
        lambda nv: ctypes.c_uint,
        "value",
        None,
    ),
    "nvmlDeviceGetClockInfo": ("nvmlDeviceGetClockInfo", lambda nv: ctypes.c_uint, "value", None),
    "nvmlDeviceGetPerformanceState": (
        "nvmlDeviceGetPerformanceState",
        lambda nv: ctypes.c_uint,
        "value",
        None,
    ),
    "nvmlDeviceGetCurrentClocksEventReasons": (
        "nvmlDeviceGetCurrentClocksEventReasons",
        lambda nv: ctypes.c_ulonglong,
        "value",
        None,
    ),
    "nvmlDeviceGetCurrentClocksThrottleReasons": (
        "nvmlDeviceGetCurrentClocksThrottleReasons",
        lambda nv: ctypes.c_ulonglong,
        "value",
        None,
    ),
    "nvmlDeviceGetFanSpeed": ("nvmlDeviceGetFanSpeed", lambda nv: ctypes.c_uint, "value", None),
}


def bind(nv: ModuleType, name: str, handle: Any, *args: Any, **kwargs: Any) -> Bound | None:
    """``name(handle, *args, **kwargs)`` bound for one GPU (see :data:`BOUND`); None where this
    binding cannot be bypassed (no function lookup, or a result structure it lacks): then the
    caller goes through pynvml's own function. Two take inputs inside their result, as pynvml's
    functions do: ``nvmlDeviceGetTemperatureV`` its sensor (its one argument) and
    ``nvmlDeviceGetMemoryInfo`` with ``version`` (``_v2``)."""
    if not callable(getattr(nv, "_nvmlGetFunctionPointer", None)):
        return None
    spec: tuple[
        str,
        Callable[[ModuleType], Any],
        str | None,
        Callable[[ModuleType], Callable[[Any], None]] | None,
    ]
    if name == "nvmlDeviceGetTemperatureV":
        (sensor,) = args
        spec = (
            "nvmlDeviceGetTemperatureV",
            lambda m: plain(m.c_nvmlTemperature_v1_t),
            "temperature",
            _versioned("nvmlTemperature_v1", sensorType=sensor),
        )
        args = ()
    elif name == "nvmlDeviceGetMemoryInfo" and kwargs.get("version"):
        spec = (
            "nvmlDeviceGetMemoryInfo_v2",
            lambda m: plain(m.c_nvmlMemory_v2_t),
            None,
            _versioned("nvmlMemory_v2"),
        )
    else:
        spec = BOUND[name]
    symbol, out_type, field, inputs = spec
    try:
        out = out_type(nv)()
        prepare = inputs(nv) if inputs is not None else None
    except (AttributeError, TypeError) as exc:  # a structure or version this binding lacks
        log.debug("no bound %s: %s", name, exc)
        return None
    c = _Binder(nv).c(symbol)
    return Bound(c, (handle, *args, ctypes.byref(out)), out, field, prepare)


def fast_functions(nv: ModuleType, available: set[str]) -> dict[str, Callable[..., Any]]:
    """The fast stand-ins for the pynvml functions in ``available`` (those this binding has);
    empty where the binding lacks what the layer needs."""
    if not callable(getattr(nv, "_nvmlGetFunctionPointer", None)):
        return {}
    binder = _Binder(nv)
    out: dict[str, Callable[..., Any]] = {}
    for name, (_symbols, make) in FAST.items():
        if name not in available:
            continue
        try:
            fn = make(binder)
        except (AttributeError, TypeError) as exc:  # a structure this binding lacks or changed
            log.debug("no fast %s: %s", name, exc)
            continue
        if fn is not None:
            out[name] = fn
    return out
