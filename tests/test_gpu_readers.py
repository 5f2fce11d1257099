"""GPUs read in turn on one worker: each read within its budget, a hung one parked, slow ones
overlapping, an exception costing only its own GPU."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from gputel.gpu_readers import GpuReaders


def calls(fns: dict[int, Callable[[], Any]]) -> list[tuple[int, Callable[[], Any]]]:
    return list(fns.items())


def wait_for(cond: Callable[[], object], timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_healthy_rounds_run_on_one_worker_in_order() -> None:
    readers = GpuReaders(5.0)
    order: list[tuple[int, str]] = []

    def read(i: int) -> Callable[[], int]:
        return lambda: order.append((i, threading.current_thread().name)) or i * 10

    for _ in range(5):
        order.clear()
        assert readers.read(calls({i: read(i) for i in range(8)})) == {
            i: ("ok", i * 10) for i in range(8)
        }
        assert [i for i, _ in order] == list(range(8))
        assert len({name for _, name in order}) == 1
    assert readers.threads == 1
    readers.close()


def test_an_exception_costs_only_its_gpu() -> None:
    readers = GpuReaders(5.0)
    boom = RuntimeError("driver said no")

    def fail() -> int:
        raise boom

    out = readers.read(calls({0: lambda: 1, 1: fail, 2: lambda: 3}))
    assert out == {0: ("ok", 1), 1: ("error", boom), 2: ("ok", 3)}
    readers.close()


def test_an_overrunning_read_is_parked_and_not_asked_again_until_it_returns() -> None:
    readers = GpuReaders(0.2)
    release = threading.Event()
    asked = {0: 0, 1: 0, 2: 0}

    def read(i: int) -> Callable[[], int]:
        def fn() -> int:
            asked[i] += 1
            if i == 1:
                release.wait(30)
            return i

        return fn

    round_calls = calls({i: read(i) for i in range(3)})
    for _ in range(4):
        assert readers.read(round_calls) == {0: ("ok", 0), 1: ("stuck", None), 2: ("ok", 2)}
    assert asked == {0: 4, 1: 1, 2: 4}  # nothing piled up behind the hung call
    assert readers.stuck == [1]
    stuck_for = readers.stuck_for(1)
    assert stuck_for is not None and stuck_for > 0 and readers.stuck_for(0) is None
    release.set()
    wait_for(lambda: readers.stuck == [])
    assert readers.read(round_calls) == {0: ("ok", 0), 1: ("ok", 1), 2: ("ok", 2)}
    assert asked[1] == 2
    readers.close()


def test_slow_reads_overlap_instead_of_adding_up() -> None:
    """Four reads that each wait in the 'driver' until all four are in flight: read strictly one
    after another they could never meet; the worker moves on after PATIENCE_S."""
    readers = GpuReaders(20.0)
    meet = threading.Barrier(4, timeout=10)

    def slow(i: int) -> Callable[[], int]:
        def fn() -> int:
            meet.wait()
            return i

        return fn

    out = readers.read(calls({i: slow(i) for i in range(4)}))
    assert out == {i: ("ok", i) for i in range(4)}
    readers.close()


def test_a_wedged_driver_parks_every_gpu_in_one_round() -> None:
    readers = GpuReaders(0.2)
    release = threading.Event()
    out = readers.read(calls({i: (lambda: release.wait(30)) for i in range(6)}))
    assert out == {i: ("stuck", None) for i in range(6)}
    assert readers.stuck == list(range(6))
    release.set()
    wait_for(lambda: readers.stuck == [])
    assert readers.read(calls({0: lambda: 7})) == {0: ("ok", 7)}
    readers.close()


def test_two_callers_take_turns() -> None:
    readers = GpuReaders(5.0)
    results: list[dict[int, Any]] = []
    gate = threading.Event()

    def first() -> int:
        gate.wait(10)
        return 1

    t = threading.Thread(target=lambda: results.append(readers.read(calls({0: first}))))
    t.start()
    wait_for(lambda: readers.threads >= 1)
    later = threading.Thread(target=lambda: results.append(readers.read(calls({0: lambda: 2}))))
    later.start()
    gate.set()
    t.join(10)
    later.join(10)
    assert sorted(r[0][1] for r in results) == [1, 2]
    readers.close()
