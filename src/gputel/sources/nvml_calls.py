"""The one rule for every NVML call on a GPU, and what its failure means.

- A field the hardware, the driver or the binding does not offer (``NOT_SUPPORTED``,
  ``FUNCTION_NOT_FOUND``, ``ARGUMENT_VERSION_MISMATCH``, or a function this binding predates) is
  ``None`` and never asked again: an unsupported call still costs a driver round-trip every tick.
- Any other error (``NVML_ERROR_UNKNOWN`` included, which some boards answer for their fans every
  time) costs that field for that tick only, is counted per field and logged once.
- A GPU is *lost* when it answers ``NVML_ERROR_GPU_IS_LOST`` or when every read of it in one full
  read fails. A lost GPU is left alone while the other GPUs keep reporting, re-probed at most
  once a minute with a query every GPU answers (MIG or not), so a reset GPU or a driver that got
  over a hiccup is read again without a restart.

No thread, timeout or retry lives here: NVML calls can block in the kernel and only the caller
can decide what waiting too long means. Callers hold the GPU's lock.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from gputel.formats import one_line
from gputel.sources import nvml_binding as b
from gputel.sources.nvml_binding import NvmlApi
from gputel.sources.nvml_direct import Bound
from gputel.sources.nvml_gpu import NO_DEVICE, CallRefused, GpuLost, NvmlGpu, text

log = logging.getLogger("gputel.nvml")

#: Permanent for this driver and binding: stop asking.
UNSUPPORTED_CODES = frozenset({b.NOT_SUPPORTED, b.FUNCTION_NOT_FOUND, b.ARGUMENT_VERSION_MISMATCH})
#: The GPU itself stopped answering (Xid 79 and friends): stop reading it, only re-probe it.
#: NVML_ERROR_UNKNOWN is not here: healthy boards answer it for single fields (fans), so it costs
#: that field only; a GPU that answers nothing else is caught by the every-read-failed rule.
LOST_CODES = frozenset({b.GPU_IS_LOST})
#: Seconds between re-probes of a lost GPU: rare enough that a GPU really off the bus costs next to
#: nothing (a call on it can be slow), often enough that a reset GPU is back within a minute.
REPROBE_S = 60.0

#: One way to read a value: (key, function, positional args, keyword args); the function may be
#: a call bound to the GPU (:class:`Bound`, its arguments inside).
Option = tuple[str, "Callable[..., Any] | Bound | None", tuple[Any, ...], dict[str, Any]]


class NvmlCalls:
    """The asking rule over one loaded binding (:class:`NvmlApi`)."""

    def __init__(self, api: NvmlApi, clock: Callable[[], float]) -> None:
        self.api = api
        self._error = api.error
        self._clock = clock

    def ask(
        self,
        gpu: NvmlGpu,
        key: str,
        fn: Callable[..., Any] | None,
        *args: Any,
        device: Any = None,
        quiet: frozenset[int] = frozenset(),
        refused: frozenset[int] = frozenset(),
        **kwargs: Any,
    ) -> Any:
        """Call ``fn(handle, *args)`` for ``key``; None when it gives no value.

        ``fn`` is a function resolved at open (:meth:`NvmlApi.fn`; None: this binding has none).
        ``device``: the handle passed first instead of the GPU's own (one of its MIG devices),
        or ``NO_DEVICE`` for a call about the GPU that takes no handle (GPM samples, metrics).
        ``quiet``: return codes that are an answer ("nothing to report"), not a failure.
        ``refused``: return codes raised to the caller as :class:`CallRefused` (GPM's
        ``NO_PERMISSION``: a standing refusal, neither unsupported nor transient).
        Raises GpuLost when the GPU is (or just became) lost.
        """
        if gpu.lost:
            raise GpuLost
        if key in gpu.unsupported:
            return None
        gpu.reads += 1
        if fn is None:
            self.failed(gpu, key, b.FUNCTION_NOT_FOUND, "this pynvml predates the call")
            return None
        if device is not NO_DEVICE:
            args = (gpu.handle if device is None else device, *args)
        try:
            return fn(*args, **kwargs)
        except self._error as exc:
            code = b.error_code(exc)
            if code in quiet:
                return None
            if code is not None and code in refused:
                gpu.reads = max(0, gpu.reads - 1)  # an answer about the field, not a failure
                raise CallRefused(code, one_line(exc)) from None
            self.failed(gpu, key, code, one_line(exc))
            return None

    def ask_bound(self, gpu: NvmlGpu, key: str, bound: Bound) -> Any:
        """:meth:`ask` for a call bound to the GPU (``nvml_direct.bind``): the same rule, read
        from the return code, with no pynvml call and no exception on the common path."""
        if gpu.lost:
            raise GpuLost
        if key in gpu.unsupported:
            return None
        gpu.reads += 1
        if bound.inputs is not None:
            bound.inputs(bound.out)
        ret = bound.c(*bound.args)
        if ret:
            self.failed(gpu, key, ret, one_line(self._error(ret)))
            return None
        out = bound.out
        return out if bound.field is None else getattr(out, bound.field)

    def first(self, gpu: NvmlGpu, options: list[Option]) -> Any:
        """The first of several ways to read one value; the next is tried only when one is
        unsupported, so a transient failure does not double the calls. A way's function may be
        a :class:`Bound` call (then its arguments are bound too)."""
        for key, fn, args, kwargs in options:
            if key in gpu.unsupported:
                continue
            if isinstance(fn, Bound):
                value = self.ask_bound(gpu, key, fn)
            else:
                value = self.ask(gpu, key, fn, *args, **kwargs)
            if value is not None or key not in gpu.unsupported:
                return value
        return None

    def failed(self, gpu: NvmlGpu, key: str, code: int | None, detail: str) -> None:
        """Decide what an NVML failure means; shared by single calls and batched values."""
        if code in UNSUPPORTED_CODES:
            gpu.unsupported.add(key)
            gpu.reads = max(0, gpu.reads - 1)  # an answer about the field, not a failed read
            log.debug("GPU %d: %s not supported (%s); not asking again", gpu.index, key, detail)
            return
        if code in LOST_CODES:
            self.lose(gpu, f"{detail} reading {key}")
            raise GpuLost
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

    def lose(self, gpu: NvmlGpu, why: str) -> None:
        self.mark_lost(gpu)
        log.warning(
            "GPU %d (%s) is lost (%s): reporting it as lost while the other GPUs keep "
            "reporting, re-checking it every %d s; check dmesg for Xid errors, a GPU reset or "
            "reboot may be needed",
            gpu.index,
            gpu.uuid or "uuid unknown",
            why,
            REPROBE_S,
        )

    def mark_lost(self, gpu: NvmlGpu) -> None:
        gpu.lost = True
        gpu.lost_checked = self._clock()
        # No integral or rate bridges the outage; the slow fields are read again after it.
        gpu.gap()

    def answers(self, gpu: NvmlGpu) -> bool:
        """Whether ``gpu`` may be read now; a lost GPU is re-probed here, at most once per
        REPROBE_S, so a wedged GPU is not asked every tick yet a recovered one is not lost for
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
        if now - gpu.lost_checked < REPROBE_S:
            return False
        gpu.lost_checked = now
        api = self.api
        try:
            handle = api.call("nvmlDeviceGetHandleByIndex", gpu.index)
            uuid = text(api.call("nvmlDeviceGetUUID", handle))
            if gpu.uuid and uuid != gpu.uuid:
                log.debug("GPU %d now reports uuid %s, not %s", gpu.index, uuid, gpu.uuid)
                return False
            api.call("nvmlDeviceGetMemoryInfo", handle)
        except self._error as exc:
            if b.error_code(exc) not in UNSUPPORTED_CODES:
                log.debug("GPU %d still lost: %s", gpu.index, one_line(exc))
                return False
        except Exception as exc:  # a garbled answer is no answer
            log.debug("GPU %d still lost: %s", gpu.index, one_line(exc))
            return False
        gpu.new_handle(handle)
        gpu.uuid, gpu.lost = uuid, False
        if not gpu.name:
            try:
                gpu.name = text(self.ask(gpu, "name", self.api.fn("nvmlDeviceGetName")))
            except GpuLost:
                return False
        log.info("GPU %d (%s) answers again: reading it again", gpu.index, gpu.uuid)
        return True
