"""The common NVIDIA Xid codes: what each usually means and what an operator should do.

An Xid number alone tells an operator on call nothing; the row in ``events.csv``, the status
output and ``docs/events.md`` carry the meaning and the action from this one table, so they can
never disagree. The meanings follow NVIDIA's Xid catalog (docs.nvidia.com/deploy/xid-errors) for
data-centre GPUs, condensed to one line each.

Each Xid has an action class, the decision a fleet operator has to make:

- ``app``: the application faulted (bad kernel, illegal address, killed context); the GPU is
  fine and the node needs nothing. Tell the job's owner; act only if it repeats across jobs.
- ``watch``: the hardware corrected or absorbed the fault; nothing is needed now, but a rising
  count predicts a failure: plan a maintenance window.
- ``reset``: the GPU must be reset (``nvidia-smi -r`` or a reboot) once its work is drained,
  before it is trusted again.
- ``drain``: take the node out of service now; reset or reboot, and if it comes back, RMA the
  board.

An Xid missing from the table is class ``unknown``: it is still recorded and counted, and its
detail points to the catalog.
"""

from __future__ import annotations

from dataclasses import dataclass

APP = "app"
WATCH = "watch"
RESET = "reset"
DRAIN = "drain"
UNKNOWN = "unknown"
#: Action classes from least to most urgent (``unknown`` last: it needs a human to look).
ACTIONS = (APP, WATCH, RESET, DRAIN, UNKNOWN)
#: Classes that mean the node, not the job, needs an operator; the alert rules cover these.
NODE_ACTIONS = frozenset({RESET, DRAIN})

CATALOG_URL = "https://docs.nvidia.com/deploy/xid-errors/"


@dataclass(frozen=True, slots=True)
class XidInfo:
    xid: int
    meaning: str
    """What the driver reports, in a few words."""
    todo: str
    """What to do about it, in one sentence."""
    action: str
    """The action class: ``app``, ``watch``, ``reset`` or ``drain``."""

    @property
    def detail(self) -> str:
        """The one-line text of the ``detail`` column in ``events.csv``."""
        return f"{self.meaning}; {self.action}: {self.todo}"


def _x(xid: int, meaning: str, todo: str, action: str) -> XidInfo:
    return XidInfo(xid, meaning, todo, action)


_NVLINK_TODO = "reset the GPU; if it repeats, check the NVLink/NVSwitch cabling and trays"

XIDS: tuple[XidInfo, ...] = (
    _x(
        13,
        "graphics engine exception (an illegal instruction or access in a kernel)",
        "the job's code faulted; act on the node only if different jobs hit it",
        APP,
    ),
    _x(
        31,
        "GPU memory page fault (the application accessed an invalid address)",
        "usually an application bug; if different jobs hit it on this GPU, run diagnostics",
        APP,
    ),
    _x(
        32,
        "invalid or corrupted push buffer stream (data from the host arrived damaged)",
        "restart the job; if it repeats, check the PCIe link, riser and host memory",
        WATCH,
    ),
    _x(
        38,
        "driver firmware error",
        "reset the GPU; if it repeats, update the driver and contact support",
        RESET,
    ),
    _x(
        43,
        "GPU stopped processing a channel (the application faulted and was stopped)",
        "the job's code faulted; the GPU is fine and keeps serving other jobs",
        APP,
    ),
    _x(
        45,
        "preemptive cleanup of a channel after an earlier error or a killed process",
        "look at the Xid just before it on this GPU; alone it needs nothing",
        APP,
    ),
    _x(
        46,
        "GPU stopped processing (the driver could not recover the engine)",
        "drain the node and reset the GPU; if it repeats, service the board",
        DRAIN,
    ),
    _x(
        48,
        "double-bit ECC error (uncorrectable memory error)",
        "results on this GPU may be wrong: drain and reset the GPU; RMA if it recurs",
        DRAIN,
    ),
    _x(
        61,
        "internal micro-controller breakpoint or warning",
        "reset the GPU; if it repeats, update the driver and contact support",
        RESET,
    ),
    _x(
        62,
        "internal micro-controller halt",
        "reset the GPU; if it repeats, update the driver and contact support",
        RESET,
    ),
    _x(
        63,
        "ECC page retirement or row remapping recorded",
        "a spare memory row is pending: reset the GPU when its work is drained to apply it",
        RESET,
    ),
    _x(
        64,
        "ECC page retirement or row remapping failed (no spare rows left or recording failed)",
        "drain the node and reset the GPU; RMA the board if it recurs",
        DRAIN,
    ),
    _x(
        68,
        "video decoder (NVDEC) exception",
        "restart the job; if it repeats across jobs, reset the GPU",
        APP,
    ),
    _x(
        69,
        "graphics engine class error",
        "restart the job; if it repeats across jobs, reset the GPU",
        APP,
    ),
    _x(74, "NVLink error", _NVLINK_TODO, RESET),
    _x(
        79,
        "GPU has fallen off the bus (it no longer answers on PCIe)",
        "drain the node and reboot it; check power, seating and PCIe; RMA if it recurs",
        DRAIN,
    ),
    _x(
        92,
        "high single-bit ECC error rate (errors are being corrected)",
        "nothing now; watch the ECC counters and plan a reset or RMA if the rate keeps rising",
        WATCH,
    ),
    _x(
        94,
        "contained ECC error (only the application using that memory was stopped)",
        "restart the job elsewhere; reset the GPU when drained so the row is remapped",
        RESET,
    ),
    _x(
        95,
        "uncontained ECC error (every application on the GPU is affected)",
        "drain the node and reset the GPU now; RMA if it recurs",
        DRAIN,
    ),
    _x(
        109,
        "context switch timeout",
        "usually the job's kernel hung; restart it, reset the GPU if different jobs hit it",
        APP,
    ),
    _x(
        119,
        "GSP RPC timeout (the GPU's system processor did not answer the driver)",
        "drain the node and reset the GPU; if it repeats, update the driver or disable GSP",
        RESET,
    ),
    _x(
        120,
        "GSP error (the GPU's system processor reported a fault)",
        "drain the node and reset the GPU; if it repeats, update the driver and contact support",
        RESET,
    ),
    _x(
        121,
        "C2C link corrected error (chip-to-chip link of a Grace superchip)",
        "nothing now; reset the GPU at the next window if the count keeps rising",
        WATCH,
    ),
    _x(
        140,
        "unrecovered ECC error (the driver could not contain it)",
        "drain the node and reset the GPU; RMA if it recurs",
        DRAIN,
    ),
    _x(
        143,
        "GPU initialization failure",
        "drain the node and reboot it; RMA the board if it fails again",
        DRAIN,
    ),
    _x(144, "NVLink SAW error", _NVLINK_TODO, RESET),
    _x(145, "NVLink RLW error", _NVLINK_TODO, RESET),
    _x(146, "NVLink TLW error", _NVLINK_TODO, RESET),
    _x(147, "NVLink TREX error", _NVLINK_TODO, RESET),
    _x(148, "NVLink NVLPW control error", _NVLINK_TODO, RESET),
    _x(149, "NVLink NETIR error", _NVLINK_TODO, RESET),
    _x(150, "NVLink MSE error", _NVLINK_TODO, RESET),
    _x(
        154,
        "the driver changed the GPU's recovery action",
        "read 'GPU Recovery Action' in nvidia-smi -q and do what it says (reset or reboot)",
        DRAIN,
    ),
)

XID_TABLE: dict[int, XidInfo] = {info.xid: info for info in XIDS}


def xid_info(xid: int) -> XidInfo:
    """The table's row for ``xid``, or an ``unknown`` row that points to NVIDIA's catalog."""
    info = XID_TABLE.get(xid)
    if info is not None:
        return info
    return XidInfo(
        xid,
        f"Xid {xid} is not in gputel's table",
        f"look it up in NVIDIA's Xid catalog ({CATALOG_URL})",
        UNKNOWN,
    )


def xids_with_action(*actions: str) -> tuple[int, ...]:
    """The Xids of the given action classes, in numeric order (for alert rules and docs)."""
    return tuple(info.xid for info in XIDS if info.action in actions)
