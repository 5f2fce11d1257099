"""The NVML event listener through the real binding over the fake libnvidia-ml.so.1, in process.

Events from the driver reach the sink with the right GPU, name and Xid; kinds a GPU does not
offer are not registered; a driver without events, or whose waits fail, costs one notice; and a
wait that never returns does not hold up whoever stops the listener.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import pytest

from fakedriver import EVENT_XID, UNKNOWN, FakeDriver, scenario
from gputel.sources import nvml
from gputel.sources.nvml_events import NvmlEventListener

EVENT_SBE = 0x1
EVENT_DBE = 0x2
Received = tuple[int, str, "int | None"]


class Sink:
    """Collects delivered events; ``take`` waits for the next one."""

    def __init__(self) -> None:
        self.events: queue.Queue[Received] = queue.Queue()

    def __call__(self, gpu: int, event: str, xid: int | None) -> None:
        self.events.put((gpu, event, xid))

    def take(self, n: int, timeout: float = 10.0) -> list[Received]:
        return [self.events.get(timeout=timeout) for _ in range(n)]

    def none_within(self, seconds: float) -> bool:
        try:
            self.events.get(timeout=seconds)
        except queue.Empty:
            return True
        return False


def _listen(wait_ms: int = 50) -> tuple[nvml.NvmlGpuSource, NvmlEventListener, Sink]:
    source = nvml.open_nvml(None)
    listener = source.event_listener()
    assert isinstance(listener, NvmlEventListener)
    listener._wait_ms = wait_ms
    sink = Sink()
    listener.start(sink)
    return source, listener, sink


def _close(source: nvml.NvmlGpuSource, listener: NvmlEventListener) -> None:
    listener.stop()
    assert listener.join(5.0)
    source.close()


def test_xid_and_ecc_events_reach_the_sink_with_their_gpu(inproc_driver: FakeDriver) -> None:
    source, listener, sink = _listen()
    inproc_driver.set({"event.1": f"0,{EVENT_XID},79", "event.2": f"1,{EVENT_XID},48"})
    assert sorted(sink.take(2)) == [(0, "xid", 79), (1, "xid", 48)]
    # Repeats are events of their own (a new ID), ECC events carry no Xid.
    inproc_driver.set({"event.3": f"0,{EVENT_XID},79", "event.4": f"1,{EVENT_DBE},0"})
    assert sorted(sink.take(2)) == [(0, "xid", 79), (1, "ecc_dbe", None)]
    assert listener.notice is None
    assert listener.registered == {
        0: ["xid", "ecc_sbe", "ecc_dbe"],
        1: ["xid", "ecc_sbe", "ecc_dbe"],
    }
    _close(source, listener)


def test_kinds_a_gpu_does_not_offer_are_not_registered(inproc_driver: FakeDriver) -> None:
    # GPU 1 offers Xid events only; its ECC event never arrives (the driver would refuse it).
    inproc_driver.set({"gpu.1.supported_events": EVENT_XID})
    source, listener, sink = _listen()
    assert sink.none_within(0.3)
    assert listener.registered[1] == ["xid"]
    inproc_driver.set({"event.1": f"1,{EVENT_SBE},0", "event.2": f"1,{EVENT_XID},13"})
    assert sink.take(1) == [(1, "xid", 13)]
    assert sink.none_within(0.3)
    _close(source, listener)


def test_a_driver_without_events_is_one_notice(
    inproc_driver: FakeDriver, caplog: pytest.LogCaptureFixture
) -> None:
    inproc_driver.set({"gpu.0.supported_events": 0, "gpu.1.supported_events": 0})
    caplog.set_level(logging.WARNING, logger="gputel.nvml.events")
    source, listener, _sink = _listen()
    assert listener.join(5.0), "nothing to wait for: the thread ends"
    assert listener.notice is not None and "not received" in listener.notice
    assert len([r for r in caplog.records if "GPU events" in r.getMessage()]) == 1
    # The source reads on as before.
    assert not source.read()[0].lost
    source.close()


def test_failing_waits_are_one_notice_and_recover(
    inproc_driver: FakeDriver, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gputel.sources.nvml_events.RETRY_S", 0.05)
    inproc_driver.set({"event_wait.error": UNKNOWN})
    caplog.set_level(logging.INFO, logger="gputel.nvml.events")
    source, listener, sink = _listen()
    deadline = time.monotonic() + 5
    while listener.notice is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert listener.notice is not None and "fails" in listener.notice
    time.sleep(0.3)  # several more failed waits
    assert len([r for r in caplog.records if "fails" in r.getMessage()]) == 1
    inproc_driver.set({"event_wait.error": None, "event.1": f"0,{EVENT_XID},94"})
    assert sink.take(1) == [(0, "xid", 94)]
    assert any("works again" in r.getMessage() for r in caplog.records)
    assert listener.notice is None
    _close(source, listener)


def test_stop_does_not_wait_for_a_wait_that_never_returns(inproc_driver: FakeDriver) -> None:
    inproc_driver.set({"event_wait.sleep_ms": 600_000})
    source, listener, _sink = _listen()
    time.sleep(0.2)  # the thread is inside the blocked wait now
    listener.stop()  # returns at once: it only raises the flag
    assert not listener.join(0.1), "the wait is still blocked in the driver"
    inproc_driver.set({"event_wait.sleep_ms": None})  # release it so the thread can end
    assert listener.join(5.0)
    source.close()


def test_a_gpu_hung_in_a_read_does_not_keep_the_others_from_their_events(
    inproc_driver: FakeDriver,
) -> None:
    """GPU 1's read blocks in the driver holding its lock: GPU 0 (before it) and GPU 2 (after
    it) still get their events; GPU 1 is registered once its read returns."""
    inproc_driver.write(scenario(3, gpu__1__utilization__sleep_ms=600_000))
    source = nvml.open_nvml(None)
    reader = threading.Thread(target=source.read_gpu, args=(1,), daemon=True)
    reader.start()
    deadline = time.monotonic() + 10
    while inproc_driver.calls("utilization", 1) == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # GPU 1's read is inside the hung call now, holding its lock
    listener = source.event_listener()
    assert isinstance(listener, NvmlEventListener)
    listener._wait_ms = 50
    sink = Sink()
    listener.start(sink)
    inproc_driver.set({"event.1": f"0,{EVENT_XID},79", "event.2": f"2,{EVENT_XID},48"})
    assert sorted(sink.take(2)) == [(0, "xid", 79), (2, "xid", 48)]
    assert set(listener.registered) == {0, 2}
    assert listener.notice is not None and "GPU 1" in listener.notice
    inproc_driver.set({"gpu.1.utilization.sleep_ms": None})  # the hung read returns
    reader.join(10)
    deadline = time.monotonic() + 10
    while 1 not in listener.registered and time.monotonic() < deadline:
        time.sleep(0.02)
    inproc_driver.set({"event.3": f"1,{EVENT_XID},31"})
    assert sink.take(1) == [(1, "xid", 31)]
    assert listener.notice is None
    _close(source, listener)
