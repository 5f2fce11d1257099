"""Test doubles for the agent: an injected clock, a fake GPU source, a fake recorder child, and
a real agent served on its real control socket without its loop.

Only the hardware, the child process and time are faked; the control server, the control API
and the allocation store are the real ones, so clients tested against :class:`ServedAgent` talk
to the same dispatcher as in production.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gputel.schema import GpuReading
from gputel.settings import load_settings
from gputel.sources.base import GpuIdentity
from gputel.supervisor.agent import Agent


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class FakeSource:
    """Two GPUs whose utilization the test sets; a read can fail or block until released."""

    name = "fake"

    def __init__(self, gpus: list[int] | None = None) -> None:
        self.gpus = [0, 1] if gpus is None else gpus
        self.energy: dict[int, float | None] = {g: 100.0 * (g + 1) for g in self.gpus}
        self.util: float | None = 0.0
        self.fail: Exception | None = None
        self.block = threading.Event()
        self.block.set()
        self.reads = 0

    def devices(self) -> list[GpuIdentity]:
        return [GpuIdentity(g, f"GPU-{g}", "Fake") for g in self.gpus]

    def read_utilization(self) -> dict[int, float | None]:
        self.reads += 1
        self.block.wait(30)
        if self.fail is not None:
            raise self.fail
        rest = 0.0 if self.util is not None else None
        return {g: self.util if g == self.gpus[0] else rest for g in self.gpus}

    def read_light(self) -> list[GpuReading]:
        """The pre-trigger's read: the same utilization, plus the energy counter and a power."""
        utils = self.read_utilization()
        return [
            GpuReading(
                g,
                f"GPU-{g}",
                "Fake",
                utilization_gpu_pct=utils[g],
                energy_j=self.energy[g],
                power_w=None if utils[g] is None else 100.0 + utils[g],
            )
            for g in self.gpus
        ]

    def read_energy_j(self) -> dict[int, float | None]:
        return dict(self.energy)

    def close(self) -> None:
        pass


class FakeProc:
    """A recorder child that exits when signalled, or when the test says it crashed."""

    next_pid = 50000

    def __init__(self) -> None:
        FakeProc.next_pid += 1
        self.pid = FakeProc.next_pid
        self.code: int | None = None
        self.signals: list[int] = []

    def poll(self) -> int | None:
        return self.code

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)
        if sig in (signal.SIGTERM, signal.SIGKILL):
            self.code = -sig


class ServedAgent:
    """A real :class:`Agent` on a fake source: control socket and dispatcher, no loop.

    ``requests`` lists what reached the control API; ``energy`` is what the GPUs report.
    """

    def __init__(self, run_dir: Path, log_dir: Path, gpus: list[int] | None = None) -> None:
        self.run_dir = run_dir
        self.source = FakeSource(gpus)
        self.requests: list[dict[str, Any]] = []
        settings = load_settings(
            {
                "GPUTEL_RUN_DIR": str(run_dir),
                "GPUTEL_LOG_DIR": str(log_dir),
                "GPUTEL_EXPORTER_PORT": "0",
                "GPUTEL_KMSG": "",  # the machine's kernel log is no test's business
            }
        )
        self.agent = Agent(
            settings,
            time.monotonic,
            env={},
            spawn=lambda argv, env: FakeProc(),
            install_signals=False,
            source=self.source,
        )
        handle: Callable[[dict[str, Any]], dict[str, Any]] = self.agent.api.handle

        def recording(request: dict[str, Any]) -> dict[str, Any]:
            self.requests.append(request)
            return handle(request)

        self.agent.api.handle = recording  # type: ignore[method-assign]

    @property
    def store(self) -> Any:
        return self.agent.store

    @property
    def energy(self) -> dict[int, float | None]:
        return self.source.energy

    @energy.setter
    def energy(self, value: dict[int, float | None]) -> None:
        self.source.energy = dict(value)

    def start(self) -> None:
        self.agent._setup()

    def stop(self) -> None:
        self.agent._teardown()

    def __enter__(self) -> ServedAgent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
