"""Kernel log Xids end to end: the real ``gputel agent`` over the binding and the fake driver,
with ``GPUTEL_KMSG`` naming a plain file the test appends the driver's lines to.

A line written after the start is a row in ``events.csv``, a counter and a status entry; a line
written before it is none; one Xid that NVML and the kernel log both report is one row, while
genuine repeats still count; a line arrives while NVML is hung; an NVSwitch SXid and an Xid on a
PCI address that is none of the GPUs are rows with an empty ``gpu``; a log that may not be read
is one notice.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from fakedriver import EVENT_XID, FakeDriver
from gputel.supervisor.xid import xid_info
from test_agent_e2e import AgentProc, promtool_ok, wait_for
from test_events_e2e import UUID0, counter, events_csv

#: GPU 0's PCI address as the kernel prints it (the fake driver's busId is 00000000:18:00.0).
PCI0 = "0000:18:00"


def xid_line(xid: int, pci: str = PCI0, words: str = "GPU has fallen off the bus.") -> str:
    """One line as a syslog daemon writes it to kern.log."""
    return (
        f"Dec  7 02:10:01 gpu-node-17 kernel: [6781741.548779] NVRM: Xid (PCI:{pci}): {xid}, "
        f"pid='<unknown>', name=<unknown>, {words}\n"
    )


def append(path: Path, text: str) -> None:
    with open(path, "a") as fh:
        fh.write(text)


@pytest.fixture
def kern_log(tmp_path: Path) -> Path:
    path = tmp_path / "kern.log"
    path.write_text(xid_line(48))  # before the agent starts: never an event
    return path


def test_a_kernel_xid_after_start_is_recorded_and_one_before_is_not(
    driver_agents: Callable[..., AgentProc], kern_log: Path
) -> None:
    agent = driver_agents(GPUTEL_KMSG=str(kern_log), GPUTEL_EVENT_CAPTURE_SECONDS="0")
    assert agent.status()["notice"] is None
    append(kern_log, "Dec  7 02:10:01 gpu-node-17 kernel: unrelated\n" + xid_line(79))

    (row,) = wait_for(lambda: events_csv(agent), 15, "the events.csv row")
    assert (row["gpu"], row["uuid"], row["event"], row["xid"]) == ("0", UUID0, "xid", "79")
    kernel = f"NVRM: Xid (PCI:{PCI0}): 79, pid='<unknown>', name=<unknown>, GPU has fallen"
    assert row["detail"].startswith(xid_info(79).detail + "; source=kmsg; kernel: " + kernel)
    text = agent.metrics()
    assert counter(text, "gputel_gpu_xid_errors_total", gpu="0", uuid=UUID0, xid="79") == 1.0
    assert counter(text, "gputel_gpu_xid_errors_total", xid="48") is None
    (shown,) = agent.status()["events"]
    assert (shown["gpu"], shown["xid"], shown["source"]) == (0, 79, "kmsg")
    assert agent.terminate() == 0


def test_one_xid_on_both_paths_is_one_row_and_repeats_still_count(
    driver_agents: Callable[..., AgentProc], fake_driver: FakeDriver, kern_log: Path
) -> None:
    agent = driver_agents(GPUTEL_KMSG=str(kern_log), GPUTEL_EVENT_CAPTURE_SECONDS="0")
    append(kern_log, xid_line(79))
    wait_for(lambda: events_csv(agent), 15, "the kernel's row")
    # NVML reports the same fault; the Xid 13 after it shows that NVML's 79 has been handled.
    fake_driver.set({"event.1": f"0,{EVENT_XID},79", "event.2": f"0,{EVENT_XID},13"})
    wait_for(lambda: len(events_csv(agent)) >= 2, 15, "NVML's Xid 13")
    rows = events_csv(agent)
    assert [(r["xid"], r["detail"].split("; source=")[1][:4]) for r in rows] == [
        ("79", "kmsg"),
        ("13", "nvml"),
    ]
    text = agent.metrics()
    assert counter(text, "gputel_gpu_xid_errors_total", gpu="0", uuid=UUID0, xid="79") == 1.0
    # A genuine repeat, seen by the kernel log only (NVML's report was paired already): counts.
    append(kern_log, xid_line(79))
    wait_for(lambda: len(events_csv(agent)) == 3, 15, "the repeat's row")
    text = agent.metrics()
    assert counter(text, "gputel_gpu_xid_errors_total", gpu="0", uuid=UUID0, xid="79") == 2.0
    assert counter(text, "gputel_gpu_events_total", gpu="0", uuid=UUID0, event="xid") == 3.0
    assert agent.terminate() == 0


def test_kernel_lines_arrive_while_nvml_hangs_and_off_gpu_faults_have_no_gpu(
    driver_agents: Callable[..., AgentProc], fake_driver: FakeDriver, kern_log: Path
) -> None:
    agent = driver_agents(GPUTEL_KMSG=str(kern_log), GPUTEL_EVENT_CAPTURE_SECONDS="0")
    # Every NVML call and the event wait now block, like a GPU that fell off the bus.
    fake_driver.set({"gpu.0.all.sleep_ms": 600_000, "event_wait.sleep_ms": 600_000})
    append(kern_log, xid_line(79))
    (row,) = wait_for(lambda: events_csv(agent), 15, "the Xid while NVML hangs")
    assert (row["gpu"], row["uuid"], row["xid"]) == ("0", UUID0, "79")
    # An NVSwitch's fatal SXid (its follow-up line is no fault) and an Xid on an address
    # that none of the GPUs had at start.
    append(
        kern_log,
        "kernel: nvidia-nvswitch1: SXid (PCI:0000:06:00.0): 20034, Fatal, Link 48 LTSSM Fault Up\n"
        "kernel: nvidia-nvswitch1: SXid (PCI:0000:06:00.0): 20034, Severity 1 Engine instance 60\n"
        + xid_line(79, pci="0000:91:00"),
    )
    wait_for(lambda: len(events_csv(agent)) == 3, 15, "the SXid and the unknown GPU's Xid")
    sxid, other = events_csv(agent)[1:]
    assert (sxid["gpu"], sxid["uuid"], sxid["event"], sxid["xid"]) == ("", "", "sxid_fatal", "")
    assert "SXid (PCI:0000:06:00.0): 20034, Fatal" in sxid["detail"]
    assert (other["gpu"], other["uuid"], other["event"], other["xid"]) == ("", "", "xid", "79")
    assert "Xid (PCI:0000:91:00): 79" in other["detail"]
    text = agent.metrics()
    assert counter(text, "gputel_gpu_events_total", gpu="", uuid="", event="sxid_fatal") == 1.0
    assert counter(text, "gputel_gpu_xid_errors_total", gpu="", uuid="", xid="79") == 1.0
    promtool_ok(text)
    shown = agent.status()["events"]
    assert [(e["gpu"], e["event"], e["action"]) for e in shown[1:]] == [
        (None, "sxid_fatal", "drain"),
        (None, "xid", "drain"),
    ]
    assert agent.terminate(timeout=15) == 0


def test_a_kernel_log_that_may_not_be_read_is_one_notice(
    driver_agents: Callable[..., AgentProc], fake_driver: FakeDriver, tmp_path: Path
) -> None:
    if os.geteuid() == 0:
        path = Path("/proc/sys/vm/drop_caches")  # write-only, even for root
        if not path.exists():
            pytest.skip("no write-only file to try as root")
    else:
        path = tmp_path / "kmsg"
        path.write_text("")
        path.chmod(0)
    agent = driver_agents(GPUTEL_KMSG=str(path), GPUTEL_EVENT_CAPTURE_SECONDS="0")
    notice = agent.status()["notice"]
    assert notice is not None and f"{path} is not readable" in notice
    assert "CAP_SYSLOG" in notice and "GPUTEL_KMSG=" in notice
    # Everything else works: NVML's events still arrive.
    fake_driver.set({"event.1": f"0,{EVENT_XID},79"})
    wait_for(lambda: events_csv(agent), 15, "NVML's row")
    assert agent.terminate() == 0
    assert agent.stderr_path.read_text().count("is not readable") == 1
