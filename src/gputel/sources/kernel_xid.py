"""The NVIDIA driver's fault lines in the kernel log: Xid (GPU) and SXid (NVSwitch).

The driver prints every Xid to the kernel log, also when NVML cannot deliver it (a wedged
driver, a GPU that fell off the bus), so these lines are the second, independent source of
GPU faults. The formats, as printed by the driver since the 300 series:

    NVRM: Xid (PCI:0000:3b:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus.
    NVRM: Xid (PCI:0000:cb:00): 109, pid=1797828, name=pt_main_thread, Ch 00000008, errorString …
    NVRM: Xid (PCI:0000:01:00): 79, GPU has fallen off the bus.
    NVRM: Xid (0000:03:00): 14, Channel 00000001                              (older drivers)
    nvidia-nvswitch3: SXid (PCI:0000:05:00.0): 12028, Non-fatal, Link 32 egress non-posted …
    nvidia-nvswitch0: SXid (PCI:0000:05:00.0): 20034, Fatal, Link 63 LTSSM Fault Up

One SXid report spans several lines: the first says ``Fatal`` or ``Non-fatal``, the ones after
it (``Severity 1 Engine instance …``, ``Data {…}``) add detail to the same fault and are not
faults of their own. A line is matched anywhere in its text, so a ``/dev/kmsg`` record, a
syslog line (``… kernel: [12.3] NVRM: Xid …``) or a ``dmesg`` line all parse.

The PCI address is the one rule that ties a line to a GPU: the kernel prints
``domain:bus:device`` in lower-case hex (``0000:3b:00``), NVML's ``busId`` is
``00000000:3B:00.0``; :func:`pci_key` brings both to the kernel's form.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

XID = "xid"
SXID = "sxid"
#: The most of a kernel line kept for the ``detail`` cell: enough for the driver's own words.
MAX_TEXT = 240

_HEX = "[0-9a-fA-F]"
_PCI = rf"(?P<pci>{_HEX}{{1,8}}:{_HEX}{{1,2}}:{_HEX}{{1,2}}(?:\.[0-7])?)"
_XID_RE = re.compile(rf"NVRM: Xid \((?:PCI:)?{_PCI}\): (?P<num>\d+),\s*(?P<text>.*)")
_SXID_RE = re.compile(
    rf"(?P<dev>nvidia-nvswitch\d*): SXid \((?:PCI:)?{_PCI}\): (?P<num>\d+), "
    r"(?P<sev>Fatal|Non-fatal)\b,?\s*(?P<text>.*)",
    re.IGNORECASE,
)
_PCI_RE = re.compile(rf"^(?:PCI:)?({_HEX}{{1,8}}):({_HEX}{{1,2}}):({_HEX}{{1,2}})(?:\.[0-7])?$")


@dataclass(frozen=True, slots=True)
class KernelFault:
    """One Xid or SXid line."""

    kind: str
    """``xid`` or ``sxid``."""
    pci: str
    """The device's PCI address in the kernel's form (``0000:3b:00``, :func:`pci_key`)."""
    number: int
    """The Xid or SXid number."""
    fatal: bool | None
    """For an SXid, whether the switch called it fatal; None for an Xid."""
    line: str
    """The line from ``NVRM:`` or ``nvidia-nvswitchN:`` on, cut to :data:`MAX_TEXT`."""


def pci_key(bus_id: str) -> str | None:
    """``domain:bus:device`` as the kernel prints it (``0000:3b:00``), from NVML's ``busId``
    (``00000000:3B:00.0``), the kernel's own form, or either with ``PCI:`` before it; None for
    anything else. The function number is dropped: the kernel's Xid line has none."""
    m = _PCI_RE.match(bus_id.strip())
    if not m:
        return None
    domain, bus, device = (int(part, 16) for part in m.groups())
    return f"{domain:04x}:{bus:02x}:{device:02x}"


def parse_line(text: str) -> KernelFault | None:
    """The fault in one kernel log line, or None when the line is not one (an SXid's follow-up
    lines included)."""
    m = _XID_RE.search(text)
    kind = XID
    if m is None:
        m = _SXID_RE.search(text)
        kind = SXID
        if m is None:
            return None
    pci = pci_key(m.group("pci"))
    if pci is None:
        return None
    fatal = m.group("sev").lower() == "fatal" if kind == SXID else None
    line = _printable(text[m.start() :])
    if len(line) > MAX_TEXT:
        line = line[: MAX_TEXT - 1] + "…"
    return KernelFault(kind, pci, int(m.group("num")), fatal, line)


def record_message(record: bytes) -> str:
    """The message of one ``/dev/kmsg`` record, ``prio,seq,usec,flags[,…];message\\n`` followed
    by optional `` KEY=value`` lines; a record without the prefix is taken as it is."""
    text = record.decode("utf-8", errors="replace")
    first = text.split("\n", 1)[0]
    head, sep, message = first.partition(";")
    if sep and re.fullmatch(r"\d+,\d+,\d+,[^;]*", head):
        return message
    return first


def _printable(text: str) -> str:
    """One line: the kernel escapes unprintable bytes as ``\\xNN`` already; a file may not."""
    return " ".join(text.replace("\x00", " ").split())
