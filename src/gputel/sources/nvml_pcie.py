"""PCIe throughput samples off the read's path, for GPUs with neither GPM nor byte counters.

``nvmlDeviceGetPcieThroughput`` samples the bus for about 20 ms inside the driver, so a read that
makes the two calls (receive, transmit) takes 40 ms of wall time: on a path that reads GPUs one
after another, eight such GPUs cost a third of a second per tick. Where GPM's PCIe metrics or
the driver's PCIe byte counters exist the calls are not made at all (``nvml_fields``); for the
GPUs left, one daemon thread of the source samples them in turn, once a second
(:data:`PERIOD_S`), and a read takes the latest sample (:meth:`PcieSampler.latest`): none
before the first sample of that GPU, and none once it is older than :data:`MAX_AGE_S` (the
thread is stuck in a GPU's call, or that GPU is lost), never an invented number.

The thread does not take the GPU's read lock: the reads never wait for a sample, and it keeps
its own record of what each GPU does not support (asked once, as everywhere). It is a daemon
nobody joins: a call hung in the driver costs that thread only — and with it the PCIe cells of
the GPUs it samples, which go empty once their last sample is stale; every other cell and every
read go on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from gputel.formats import one_line
from gputel.sources import nvml_binding as b
from gputel.sources.nvml_binding import NvmlApi
from gputel.sources.nvml_calls import UNSUPPORTED_CODES
from gputel.sources.nvml_gpu import NvmlGpu

log = logging.getLogger("gputel.nvml")

#: Seconds between two samples of the same GPU.
PERIOD_S = 1.0
#: A sample older than this is not used (the thread fell behind or is stuck).
MAX_AGE_S = 3 * PERIOD_S
#: PCIe throughput comes in KB/s, where NVML's KB is 1024 bytes.
_KIB = 1024
_COUNTERS = (
    ("pcie_rx_bytes_per_s", "NVML_PCIE_UTIL_RX_BYTES", 1),
    ("pcie_tx_bytes_per_s", "NVML_PCIE_UTIL_TX_BYTES", 0),
)
"""(reading field, NVML counter constant, its value where the binding lacks the name)."""

Rates = dict[str, float | None]


class PcieSampler:
    """The source's PCIe throughput thread; started by the first GPU that needs it."""

    def __init__(self, api: NvmlApi, clock: Callable[[], float]) -> None:
        self._fn = api.fn("nvmlDeviceGetPcieThroughput")
        self._counters = [(attr, api.const(name, default)) for attr, name, default in _COUNTERS]
        self._error = api.error
        self._clock = clock
        self._lock = threading.Lock()
        self._wanted: dict[int, NvmlGpu] = {}
        self._latest: dict[int, tuple[float, Rates]] = {}
        self._unsupported: dict[int, set[str]] = {}
        self._warned: set[tuple[int, str]] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def latest(self, gpu: NvmlGpu) -> Rates:
        """The GPU's latest rates (empty ones before its first sample or when stale); asks the
        thread to sample it from now on."""
        with self._lock:
            if gpu.index not in self._wanted:
                self._wanted[gpu.index] = gpu
                self._wake.set()
                if self._thread is None and not self._stop.is_set():
                    self._thread = threading.Thread(
                        target=self._run, name="gputel-nvml-pcie", daemon=True
                    )
                    self._thread.start()
            stamped = self._latest.get(gpu.index)
        if stamped is None or self._clock() - stamped[0] > MAX_AGE_S:
            return {attr: None for attr, _counter in self._counters}
        return dict(stamped[1])

    def stop(self) -> None:
        """Ask the thread to end; returns at once (it may be inside a driver call)."""
        self._stop.set()
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                gpus = list(self._wanted.values())
            for gpu in gpus:
                if self._stop.is_set():
                    return
                if gpu.lost or gpu.handle is None:
                    continue
                rates = self._sample(gpu)
                with self._lock:
                    self._latest[gpu.index] = (self._clock(), rates)
            self._wake.wait(PERIOD_S)
            self._wake.clear()

    def _sample(self, gpu: NvmlGpu) -> Rates:
        unsupported = self._unsupported.setdefault(gpu.index, set())
        rates: Rates = {}
        for attr, counter in self._counters:
            rates[attr] = None
            if attr in unsupported:
                continue
            if self._fn is None:
                unsupported.add(attr)
                continue
            try:
                rates[attr] = float(self._fn(gpu.handle, counter)) * _KIB
            except self._error as exc:
                code = b.error_code(exc)
                if code == b.UNINITIALIZED:  # the source closed and NVML shut down under us
                    self._stop.set()
                    return rates
                if code in UNSUPPORTED_CODES:
                    unsupported.add(attr)
                elif (gpu.index, attr) not in self._warned:
                    self._warned.add((gpu.index, attr))
                    log.warning(
                        "GPU %d: sampling %s failed (%s); empty while it fails (logged once)",
                        gpu.index,
                        attr,
                        one_line(exc),
                    )
            except Exception as exc:  # a garbled answer is no answer
                log.debug("GPU %d: sampling %s: %s", gpu.index, attr, one_line(exc))
        return rates
