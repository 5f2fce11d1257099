"""NVML events (Xid, ECC, retirement, GPU unavailable, recovery action) on a thread of their own.

``nvmlEventSetWait_v2`` blocks inside the driver, and a driver in trouble may block there for
good, which is exactly when its events matter most. So the wait runs on a daemon thread that
nobody joins: the agent loop, its watchdog, ``gputel status`` and shutdown never wait for it. The
wait has a timeout (``WAIT_MS``) so a healthy thread sees a stop request within a second.

Every call that names a GPU goes through the one asking rule (``sources/nvml_calls.py``), under
that GPU's lock, taken with a short timeout: a GPU hung in a read is registered later (retried
between waits, said in the notice) and never keeps the others from their events. NOT_SUPPORTED
is "no events of that kind here", a lost GPU is left out. A driver without the event API, or one
whose waits keep failing, costs one notice (log and ``gputel status``); telemetry and everything
else work as before.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from typing import Any

from gputel.formats import one_line
from gputel.sources import nvml_binding as b
from gputel.sources.base import EventSink
from gputel.sources.notice import StandingNotice
from gputel.sources.nvml_calls import NvmlCalls
from gputel.sources.nvml_gpu import GpuLost, NvmlGpu
from gputel.supervisor.events import (
    DRAM_RETIREMENT,
    ECC_DBE,
    ECC_SBE,
    GPU_UNAVAILABLE,
    RECOVERY_ACTION,
    XID,
)

log = logging.getLogger("gputel.nvml.events")

#: Milliseconds one wait may take before the thread looks at its stop flag again.
WAIT_MS = 1000
#: Seconds between attempts while the wait itself fails (the driver may get over it).
RETRY_S = 5.0
#: Seconds registration waits for a GPU's lock: a normal read holds it for milliseconds; one hung
#: in the driver holds it for good, and that GPU is registered later instead.
LOCK_WAIT_S = 0.05

#: (binding constant, its bit where every binding has it, event name). The first three are in
#: NVML's ABI since the event API began; the others only where the binding defines them.
EVENT_TYPES: tuple[tuple[str, int | None, str], ...] = (
    ("nvmlEventTypeXidCriticalError", 0x8, XID),
    ("nvmlEventTypeSingleBitEccError", 0x1, ECC_SBE),
    ("nvmlEventTypeDoubleBitEccError", 0x2, ECC_DBE),
    ("nvmlEventTypeDramRetirementEvent", None, DRAM_RETIREMENT),
    ("nvmlEventTypeGpuUnavailableError", None, GPU_UNAVAILABLE),
    ("nvmlEventTypeGpuRecoveryAction", None, RECOVERY_ACTION),
)


def _address(handle: Any) -> int | None:
    """The pointer value of an NVML device handle, to match an event to its GPU."""
    try:
        return ctypes.cast(handle, ctypes.c_void_p).value
    except (TypeError, ctypes.ArgumentError):
        return None


class NvmlEventListener:
    """Registers every selected GPU for the fault events it supports and waits for them."""

    def __init__(self, calls: NvmlCalls, gpus: list[NvmlGpu], wait_ms: int = WAIT_MS) -> None:
        self._calls = calls
        self._gpus = gpus
        api = calls.api
        self._api = api
        self._error = api.error
        self._supported_fn = api.fn("nvmlDeviceGetSupportedEventTypes")
        self._register_fn = api.fn("nvmlDeviceRegisterEvents")
        self._wait_ms = wait_ms
        self._stop = threading.Event()
        self._notice = StandingNotice(log)
        self._thread: threading.Thread | None = None
        self._types = [
            (int(bit), name)
            for const, default, name in EVENT_TYPES
            if (bit := getattr(api.module, const, default)) is not None
        ]
        self._by_address: dict[int, int] = {}
        self._handles: dict[int, Any] = {}
        self._waiting: list[int] = []
        """GPUs not registered yet because a read held their lock (retried between waits)."""
        self._not_offered: list[int] = []
        self.registered: dict[int, list[str]] = {}
        """Event names registered per GPU index (filled by the thread; for status and tests)."""

    @property
    def notice(self) -> str | None:
        return self._notice.text

    def start(self, deliver: EventSink) -> None:
        self._thread = threading.Thread(
            target=self._run, args=(deliver,), name="gputel-gpu-events", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the thread to end (tests); True when it has."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    # ------------------------------------------------------------------ the thread
    def _run(self, deliver: EventSink) -> None:
        try:
            event_set = self._register()
        except Exception as exc:  # a binding or driver answering garbage must not kill the agent
            self._notice.say(
                f"GPU events are not received: registering for them failed ({one_line(exc)})"
            )
            return
        if event_set is None:
            return
        try:
            self._listen(event_set, deliver)
        except Exception as exc:  # an answer the binding cannot decode: stop, and say so
            self._notice.say(f"GPU events are no longer received: the wait broke ({one_line(exc)})")
        finally:
            if self._stop.is_set():
                try:
                    self._api.call("nvmlEventSetFree", event_set)
                except Exception as exc:  # the process is ending; the driver frees it at exit
                    log.debug("nvmlEventSetFree failed: %s", one_line(exc))

    def _register(self) -> Any:
        """The event set with every GPU that could be registered now; None (and the notice)
        when none could be nor ever will. A GPU whose lock stays held (a read hung in the
        driver) is left for later (:meth:`_register_waiting`), so it never holds up the others."""
        self._handles = {g.index: g.handle for g in self._gpus if g.handle is not None}
        try:
            event_set = self._api.call("nvmlEventSetCreate")
        except self._error as exc:
            self._notice.say(
                "GPU events (Xid, ECC) are not received: this driver or binding has no NVML "
                f"event API ({one_line(exc)}); telemetry works without them"
            )
            return None
        self._waiting = sorted(self._handles)
        self._register_waiting(event_set)
        if not self.registered and not self._waiting:
            self._notice.say(
                "GPU events (Xid, ECC) are not received: the driver offers none on "
                f"{'any selected GPU' if self._handles else 'GPUs it cannot open'}; telemetry "
                "works without them"
            )
            return None
        return event_set

    def _register_waiting(self, event_set: Any) -> None:
        """Register the GPUs not registered yet whose lock is free within LOCK_WAIT_S; the
        others stay waiting for the next round (between two waits)."""
        by_index = {g.index: g for g in self._gpus}
        still: list[int] = []
        added: list[int] = []
        for index in self._waiting:
            gpu = by_index[index]
            if not gpu.lock.acquire(timeout=LOCK_WAIT_S):
                still.append(index)
                continue
            try:
                wanted = self._register_gpu(gpu, event_set)
            finally:
                gpu.lock.release()
            if not wanted:
                self._not_offered.append(index)
                continue
            self.registered[index] = wanted
            added.append(index)
            address = _address(self._handles[index])
            if address is not None:
                self._by_address[address] = index
        self._waiting = still
        if added:
            log.info(
                "listening for GPU events on %s",
                "; ".join(f"GPU {i}: {', '.join(self.registered[i])}" for i in added),
            )
        if self.registered or self._waiting:  # else the caller says that none is received
            self._notice.say(self._registration_notice())

    def _registration_notice(self) -> str | None:
        """What registration has to say: GPUs that offer no events, GPUs still busy."""
        parts: list[str] = []
        if self._not_offered:
            names = ", ".join(str(i) for i in sorted(self._not_offered))
            parts.append(f"GPU events (Xid, ECC) are not received from GPU {names}: not offered")
        if self._waiting:
            names = ", ".join(str(i) for i in self._waiting)
            parts.append(
                f"GPU events are not yet received from GPU {names}: busy in a read that does "
                "not return (registering again every second); the other GPUs' events are"
            )
        return "; ".join(parts) or None

    def _register_gpu(self, gpu: NvmlGpu, event_set: Any) -> list[str]:
        """Register one GPU for the kinds it offers; their names (none: not registered). The
        caller holds the GPU's lock."""
        try:
            supported = self._calls.ask(gpu, "supported_events", self._supported_fn)
            wanted = [(bit, name) for bit, name in self._types if int(supported or 0) & bit]
            mask = 0
            for bit, _name in wanted:
                mask |= bit
            if not mask:
                return []
            # Registering returns nothing: a failure shows as one more error or unsupported.
            errors = gpu.field_errors.get("events", 0)
            self._calls.ask(gpu, "events", self._register_fn, mask, event_set)
            if "events" in gpu.unsupported or gpu.field_errors.get("events", 0) > errors:
                return []
        except GpuLost:
            return []
        return [name for _bit, name in wanted]

    def _listen(self, event_set: Any, deliver: EventSink) -> None:
        failing = False
        while not self._stop.is_set():
            if self._waiting and not failing:
                self._register_waiting(event_set)
            try:
                data = self._api.call("nvmlEventSetWait_v2", event_set, self._wait_ms)
            except self._error as exc:
                code = b.error_code(exc)
                if code == b.TIMEOUT:
                    continue
                if self._stop.is_set() or code == b.UNINITIALIZED:
                    return
                if not failing:
                    failing = True
                    self._notice.say(
                        f"waiting for GPU events fails ({one_line(exc)}); trying again every "
                        f"{RETRY_S:g}s, telemetry works without them"
                    )
                self._stop.wait(RETRY_S)
                continue
            if failing:
                failing = False
                self._notice.say(self._registration_notice())  # what registration says stays true
                log.info("waiting for GPU events works again")
            self._deliver(data, deliver)

    def _deliver(self, data: Any, deliver: EventSink) -> None:
        index = self._by_address.get(_address(data.device) or -1)
        if index is None:
            if len(self.registered) != 1:
                log.warning(
                    "GPU event type 0x%x from a device that is not a selected GPU; dropped",
                    int(data.eventType),
                )
                return
            (index,) = self.registered
        kinds = int(data.eventType)
        for bit, name in self._types:
            if kinds & bit and name in self.registered.get(index, ()):
                xid = int(data.eventData) if name == XID else None
                try:
                    deliver(index, name, xid)
                except Exception:
                    log.exception("recording GPU event %s on GPU %d failed", name, index)
