"""The kernel log's Xid and SXid lines: the parser on the driver's real formats, and the reader
following a real file (appends, a partial line, truncation, rotation, a file that appears late,
one that may not be read) and the real ``/dev/kmsg`` where this machine lets it be read."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gputel.sources.kernel_xid import KernelFault, parse_line, pci_key, record_message
from gputel.sources.kmsg import KmsgReader
from gputel.supervisor.events import SameFault

XID79 = (
    "NVRM: Xid (PCI:0000:3b:00): 79, pid='<unknown>', name=<unknown>, GPU has fallen off the bus."
)
#: Seen on real nodes (NVIDIA's Xid catalog and public reports of them), one per format.
XID109 = (
    "NVRM: Xid (PCI:0000:cb:00): 109, pid=1797828, name=pt_main_thread, Ch 00000008, "
    "errorString CTX SWITCH TIMEOUT, Info 0x58005"
)
XID79_BARE = "NVRM: Xid (PCI:0000:01:00): 79, GPU has fallen off the bus."
XID14_OLD = "NVRM: Xid (0000:03:00): 14, Channel 00000001"
SXID_FATAL = "nvidia-nvswitch1: SXid (PCI:0000:06:00.0): 20034, Fatal, Link 48 LTSSM Fault Up"
SXID_NONFATAL = (
    "nvidia-nvswitch3: SXid (PCI:0000:05:00.0): 12028, Non-fatal, Link 32 egress non-posted "
    "PRIV error (First)"
)
SXID_MORE = (
    "nvidia-nvswitch2: SXid (PCI:0000:07:00.0): 20034, Severity 1 Engine instance 60 "
    "Sub-engine instance 00",
    "nvidia-nvswitch0: SXid (PCI:0000:05:00.0): 20034, Data {0x10000000, 0x10000000, 0x00000000}",
)


# ---------------------------------------------------------------------------------- parser
def test_xid_lines_in_every_known_format() -> None:
    f = parse_line(XID79)
    assert f == KernelFault("xid", "0000:3b:00", 79, None, XID79)
    f = parse_line(XID109)
    assert f is not None and (f.kind, f.pci, f.number) == ("xid", "0000:cb:00", 109)
    assert "name=pt_main_thread" in f.line
    f = parse_line(XID79_BARE)
    assert f is not None and (f.pci, f.number) == ("0000:01:00", 79)
    f = parse_line(XID14_OLD)
    assert f is not None and (f.pci, f.number) == ("0000:03:00", 14)


def test_xid_found_anywhere_in_a_syslog_or_dmesg_line() -> None:
    for prefix in (
        "Dec  7 02:10:01 gpu-node-17 kernel: [6781741.548779] ",
        "[Fri Aug 30 11:43:09 2024] ",
        "2026-12-07T02:10:01.123456+00:00 gpu-node-17 kernel: ",
    ):
        f = parse_line(prefix + XID79)
        assert f is not None and (f.pci, f.number) == ("0000:3b:00", 79)
        assert f.line == XID79  # from NVRM: on, the prefix is not the driver's words


def test_sxid_first_lines_are_faults_and_their_follow_ups_are_not() -> None:
    f = parse_line(SXID_FATAL)
    assert f == KernelFault("sxid", "0000:06:00", 20034, True, SXID_FATAL)
    f = parse_line(SXID_NONFATAL)
    assert f is not None and (f.kind, f.number, f.fatal) == ("sxid", 12028, False)
    for line in SXID_MORE:
        assert parse_line(line) is None


def test_lines_that_are_not_faults() -> None:
    for line in (
        "NVRM: GPU at PCI:0000:91:00: GPU-b6c3b2be-c55b-d076-fa0e-d464e4c7e08b",
        "NVRM: GPU 0000:91:00.0: GPU has fallen off the bus.",
        "NVRM: Xid (PCI:0000:3b:00): seventy-nine, nothing",
        "nvidia-peermem nv_get_p2p_free_callback:127 ERROR detected invalid context",
        "",
    ):
        assert parse_line(line) is None


def test_a_long_line_is_cut_and_control_characters_flattened() -> None:
    f = parse_line(XID79 + " x" * 400 + "\ttail\r")
    assert f is not None and len(f.line) == 240 and f.line.endswith("…")
    assert "\t" not in f.line and "\r" not in f.line


def test_kmsg_record_framing() -> None:
    record = (
        b"3,1234,56789012,-;" + XID79.encode() + b"\n SUBSYSTEM=pci\n DEVICE=+pci:0000:3b:00.0\n"
    )
    assert record_message(record) == XID79
    f = parse_line(record_message(record))
    assert f is not None and f.number == 79
    # Newer kernels add fields after the flags; a caller id too.
    assert record_message(b"4,99,1000,c,caller=T1;" + XID14_OLD.encode() + b"\n") == XID14_OLD
    # Not a record: taken as it is.
    assert record_message(XID79.encode()) == XID79


def test_pci_key_brings_nvml_and_kernel_forms_together() -> None:
    assert pci_key("00000000:3B:00.0") == "0000:3b:00"
    assert pci_key("0000:3b:00") == "0000:3b:00"
    assert pci_key("PCI:0000:06:00.0") == "0000:06:00"
    assert pci_key("00000001:0A:1F.3") == "0001:0a:1f"
    for bad in ("", "GPU-1234", "0000:3b", "zz:00:00.0"):
        assert pci_key(bad) is None


# ---------------------------------------------------------------------------------- same fault
def test_one_fault_from_both_sources_is_one_and_repeats_still_count() -> None:
    same = SameFault(window_s=5.0)
    assert not same.seen(0, "xid", 79, "nvml", 100.0)
    assert same.seen(0, "xid", 79, "kmsg", 100.3)  # the kernel's line of the same fault
    # Three Xid 13s reported by both: three pairs, three events.
    firsts = [same.seen(1, "xid", 13, "kmsg", 200.0 + i / 10) for i in range(3)]
    seconds = [same.seen(1, "xid", 13, "nvml", 200.5 + i / 10) for i in range(3)]
    assert firsts == [False, False, False] and seconds == [True, True, True]
    # A repeat from the same source is a new fault; one from the other source after the
    # window is one too.
    assert not same.seen(0, "xid", 79, "nvml", 300.0)
    assert not same.seen(0, "xid", 79, "nvml", 300.1)
    assert not same.seen(0, "xid", 79, "kmsg", 306.0)
    # Other GPU, other Xid: never the same fault; no GPU: never paired.
    assert not same.seen(1, "xid", 79, "nvml", 306.1)
    assert not same.seen(0, "xid", 48, "nvml", 306.2)
    assert not same.seen(None, "sxid_fatal", None, "kmsg", 306.3)
    assert not same.seen(None, "sxid_fatal", None, "nvml", 306.4)


# ---------------------------------------------------------------------------------- reader
class Faults:
    def __init__(self) -> None:
        self.got: list[KernelFault] = []
        self.lock = threading.Lock()

    def __call__(self, fault: KernelFault) -> None:
        with self.lock:
            self.got.append(fault)

    def numbers(self) -> list[int]:
        with self.lock:
            return [f.number for f in self.got]


def wait_until(cond: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def xid(n: int, pci: str = "0000:3b:00") -> str:
    return f"Dec  7 02:10:01 node kernel: NVRM: Xid (PCI:{pci}): {n}, pid=42, name=python, x\n"


def append(path: Path, text: str) -> None:
    with open(path, "a") as fh:
        fh.write(text)


@pytest.fixture
def follow(tmp_path: Path) -> Callable[..., tuple[KmsgReader, Faults]]:
    readers: list[KmsgReader] = []

    def make(path: Path) -> tuple[KmsgReader, Faults]:
        reader = KmsgReader(str(path), poll_s=0.02)
        faults = Faults()
        reader.start(faults)
        readers.append(reader)
        return reader, faults

    yield make
    for r in readers:
        r.stop()
        assert r.join(5), "the reader thread ends soon after stop()"


def test_a_file_is_read_from_its_end_and_followed(tmp_path: Path, follow: Callable) -> None:
    log = tmp_path / "kern.log"
    log.write_text(xid(13) + "unrelated line\n")
    reader, faults = follow(log)
    append(log, "noise\n" + xid(79))
    wait_until(lambda: faults.numbers() == [79], "the appended Xid")
    # A line arrives in pieces: nothing until its newline.
    append(log, xid(48)[:30])
    time.sleep(0.2)
    assert faults.numbers() == [79]
    append(log, xid(48)[30:])
    wait_until(lambda: faults.numbers() == [79, 48], "the finished line")
    assert reader.notice is None


def test_a_truncated_file_is_read_again_from_its_start(tmp_path: Path, follow: Callable) -> None:
    log = tmp_path / "kern.log"
    log.write_text("old\n" * 100)
    _reader, faults = follow(log)
    log.write_text(xid(94))  # truncate and write (copytruncate rotation)
    wait_until(lambda: faults.numbers() == [94], "the Xid after truncation")


def test_a_rotated_file_is_finished_then_the_new_one_read(tmp_path: Path, follow: Callable) -> None:
    log = tmp_path / "kern.log"
    log.write_text("")
    _reader, faults = follow(log)
    append(log, xid(31))
    wait_until(lambda: faults.numbers() == [31], "the first Xid")
    with open(log, "a") as old:
        os.rename(log, tmp_path / "kern.log.1")
        old.write(xid(43))  # the daemon writes its last line to the old file
    log.write_text(xid(45))
    wait_until(lambda: sorted(faults.numbers()) == [31, 43, 45], "both files' lines")


def test_a_file_that_appears_later_is_read_from_its_start(tmp_path: Path, follow: Callable) -> None:
    log = tmp_path / "later.log"
    reader, faults = follow(log)
    assert reader.notice is not None and "does not exist" in reader.notice
    log.write_text(xid(79) + xid(79))
    wait_until(lambda: faults.numbers() == [79, 79], "both Xids of the new file")
    assert reader.notice is None


def test_a_log_that_may_not_be_read_is_one_notice(tmp_path: Path, follow: Callable) -> None:
    if os.geteuid() == 0:
        path = Path("/proc/sys/vm/drop_caches")  # write-only, even for root
        if not path.exists():
            pytest.skip("no write-only file to try as root")
    else:
        path = tmp_path / "secret.log"
        path.write_text("")
        path.chmod(0)
    reader, faults = follow(path)
    assert reader.join(5)
    assert reader.notice is not None
    assert "not readable" in reader.notice and "CAP_SYSLOG" in reader.notice
    assert "GPUTEL_KMSG=" in reader.notice
    assert faults.numbers() == []


def test_dev_kmsg_is_read_from_its_end(follow: Callable) -> None:
    """The real device: open, SEEK_END, a non-blocking read answered EAGAIN, poll, stop. Nothing
    is written to the machine's kernel log."""
    try:
        os.close(os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK))
    except OSError as exc:
        pytest.skip(f"/dev/kmsg cannot be read here ({exc.strerror})")
    reader, faults = follow(Path("/dev/kmsg"))
    time.sleep(0.2)
    assert reader.notice is None
    assert all(f.kind in ("xid", "sxid") for f in faults.got)
