"""One selected NVIDIA GPU as the NVML modules see it: its handle and what it answered so far.

Plain state, no NVML call: the asking rule (``sources/nvml_calls.py``) updates it, the field,
GPM, process and event readers read it. Everything here is touched only under the GPU's
``lock``, which serialises reads of this GPU alone, so a call hung in the driver for one GPU
leaves the others readable.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from gputel.energy import PowerIntegrator


class GpuLost(Exception):
    """Unwinds one GPU's read as soon as it turns out to be lost."""


class CallRefused(Exception):
    """A call answered a code its caller declared a refusal (``NvmlCalls.ask(refused=...)``):
    the caller decides what the refusal means for the GPU."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(detail)
        self.code = code


#: ``NvmlCalls.ask(..., device=NO_DEVICE)``: a call that takes no device handle (GPM samples,
#: metrics).
NO_DEVICE = object()


@dataclass(eq=False)
class NvmlGpu:
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
    """Integrated joules for the full read only, where the driver has no energy counter."""
    slow_due_in: int = 0
    """Full reads until the slow-changing fields are read again (0: this read)."""
    carried: dict[str, Any] = field(default_factory=dict)
    """The slow-changing fields' last values, put in every reading between their reads."""
    pcie_counts: dict[str, tuple[int, int]] = field(default_factory=dict)
    """PCIe byte counter -> (bytes, driver timestamp µs) of the previous read."""
    bound: dict[Any, Any] = field(default_factory=dict)
    """The field reader's calls bound to ``handle`` and what it asks for in batches
    (``nvml_fields``); cleared with a new handle."""

    def new_handle(self, handle: Any) -> None:
        """A fresh handle (a GPU back after a reset): calls bound to the old one are dropped."""
        self.handle = handle
        self.bound.clear()

    def gap(self) -> None:
        """Forget what spans reads (the GPU was lost): no rate or integral across the gap, and
        the slow fields are read again on the next read."""
        self.power_integral.gap()
        self.pcie_counts.clear()
        self.carried.clear()
        self.slow_due_in = 0


def text(value: Any) -> str:
    """An NVML string (bytes from older bindings, str from newer ones) as text."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return "" if value is None else str(value)
