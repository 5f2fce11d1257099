"""The fake NVIDIA driver for tests: build it, describe its world, run gputel over it.

``tests/fakenvml/fake_nvml.c`` is a ``libnvidia-ml.so.1`` that NVIDIA's real ``pynvml`` loads
like the real driver; its world is a scenario file (format: the top of the C file and
``tests/fakenvml/README.md``) re-read on every call, so a test changes the world mid-run.

Two ways to load it:

- a subprocess (``gputel`` itself): :meth:`FakeDriver.env` puts the library's directory first
  in ``LD_LIBRARY_PATH`` and names the scenario; the binding ``dlopen``s by name at start-up and
  keeps the library for the life of the process, so each scenario of start-up runs in its own
  process;
- this process (fast unit tests through the real binding): :func:`preload` loads the library by
  path before ``pynvml`` does; glibc then answers pynvml's ``dlopen("libnvidia-ml.so.1")`` with
  the already-loaded object of that soname. The scenario variable is read by the library on
  every call, so each test points it at its own file.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest

if TYPE_CHECKING:
    from test_agent_e2e import AgentProc

T = TypeVar("T")

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "fakenvml" / "fake_nvml.c"
#: The folder holding the fake ``nvidia-smi`` (reads the same scenario as the fake library).
SMI_DIR = HERE / "fakenvml"
LIB_NAME = "libnvidia-ml.so.1"
SCENARIO_ENV = "FAKE_NVML_SCENARIO"
REPO = HERE.parent
GPUTEL = Path(sys.executable).with_name("gputel")

# NVML return codes used by tests (nvmlReturn_t).
NOT_SUPPORTED = 3
NO_PERMISSION = 4
DRIVER_NOT_LOADED = 9
GPU_IS_LOST = 15
LIB_RM_VERSION_MISMATCH = 18
UNKNOWN = 999
# nvmlEventType bits.
EVENT_XID = 0x8

MIB = 1024 * 1024
#: The fake's per-call keys (``gpu.I.<key>.error``, ``.sleep_ms``, call counts).
CALL_KEYS = (
    "handle",
    "name",
    "uuid",
    "index",
    "pci",
    "utilization",
    "memory",
    "temperature",
    "power",
    "power_limit",
    "energy",
    "clock",
    "max_clock",
    "clock_reasons",
    "fan_speed",
    "pcie",
    "pstate",
    "ecc",
    "field_values",
    "mig_mode",
    "mig",
    "gpm",
    "processes",
    "graphics_processes",
    "process_utilization",
    "events",
    "supported_events",
    "remapped_rows",
)


class BuildUnavailable(RuntimeError):
    """No C compiler on this machine (scripts/setup-dev.sh installs gcc)."""


def build(cache_dir: Path) -> Path:
    """Compile the fake driver into ``cache_dir`` (once per source version); its directory.

    The library lands in a folder named by the source's hash, so an edited fake_nvml.c is
    rebuilt and a stale build is never loaded.
    """
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise BuildUnavailable("no C compiler (gcc) to build the fake libnvidia-ml.so.1")
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    out_dir = cache_dir / digest
    lib = out_dir / LIB_NAME
    if lib.exists():
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{LIB_NAME}.{os.getpid()}"
    cmd = [
        gcc,
        "-shared",
        "-fPIC",
        "-O1",
        "-Wall",
        "-Wextra",
        "-Werror",
        f"-Wl,-soname,{LIB_NAME}",
        "-o",
        str(tmp),
        str(SOURCE),
        "-lpthread",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"building the fake libnvidia-ml.so.1 failed:\n{result.stderr}")
    os.replace(tmp, lib)
    return out_dir


def exported_symbols(lib: Path) -> set[str]:
    """The NVML functions the library exports (``nm -D``)."""
    out = subprocess.run(
        ["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True
    ).stdout
    return {line.split()[-1] for line in out.splitlines() if line.split()[-1].startswith("nvml")}


_preloaded: ctypes.CDLL | None = None


def loaded_nvml_libraries() -> set[str]:
    """Paths of every libnvidia-ml.so.1 mapped into this process (real or fake).

    A process can hold only one usable libnvidia-ml.so.1: pynvml's ``dlopen`` by name gets the
    first one loaded. Tests that need one kind skip when the other is already in.
    """
    try:
        with open("/proc/self/maps") as fh:
            return {
                line.split(None, 5)[5].strip()
                for line in fh
                if LIB_NAME in line and len(line.split(None, 5)) == 6
            }
    except OSError:
        return set()


def _real_library_loaded(lib_dir: Path) -> bool:
    ours = str((lib_dir / LIB_NAME).resolve())
    return any(os.path.realpath(p) != ours for p in loaded_nvml_libraries())


def preload(lib_dir: Path) -> ctypes.CDLL:
    """Load the fake into this process so the real pynvml finds it (see the module doc)."""
    global _preloaded
    if _preloaded is None:
        lib = ctypes.CDLL(str(lib_dir / LIB_NAME), mode=ctypes.RTLD_GLOBAL)
        lib.fakeNvmlCallCount.restype = ctypes.c_ulong
        lib.fakeNvmlCallCount.argtypes = [ctypes.c_char_p, ctypes.c_int]
        _preloaded = lib
    return _preloaded


def read_until(read: Callable[[], T], done: Callable[[T], bool], timeout: float = 15.0) -> T:
    """``read()`` again until ``done`` holds of its result (a value the source's background
    sampling fills in, such as PCIe throughput without GPM); fails after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value):
            return value
        assert time.monotonic() < deadline, f"not done after {timeout} s: {value!r}"
        time.sleep(0.02)


def gpu(index: int, **overrides: object) -> dict[str, object]:
    """A healthy, idle GPU of a plausible data-centre kind, with every field the fake knows.

    ``overrides`` use the scenario's key after ``gpu.I.`` with ``.`` written as ``__``
    (``utilization__gpu_pct=80``).
    """
    values: dict[str, object] = {
        "name": "NVIDIA H100 80GB HBM3",
        "uuid": f"GPU-fake-{index:04d}-0000-0000-0000-000000000000",
        "pci_bus_id": f"00000000:{index + 0x18:02X}:00.0",
        "utilization.gpu_pct": 0,
        "utilization.memory_pct": 0,
        "memory.total_bytes": 81559 * MIB,
        "memory.used_bytes": 4 * MIB,
        "memory.reserved_bytes": 530 * MIB,
        "temperature_c": 31,
        "power_mw": 69_500,
        "power_limit_mw": 700_000,
        "energy_mj": 1_000_000_000 + index,
        "clock.sm_mhz": 345,
        "clock.mem_mhz": 2619,
        "clock.graphics_mhz": 345,
        "clock.video_mhz": 765,
        "max_clock.sm_mhz": 1980,
        "max_clock.mem_mhz": 2619,
        "clock_reasons": 1,
        "pstate": 0,
        "pcie.tx_kbps": 1000,
        "pcie.rx_kbps": 2000,
        "ecc.corrected": 0,
        "ecc.uncorrected": 0,
        "remapped_rows.correctable": 0,
        "remapped_rows.uncorrectable": 0,
        "remapped_rows.pending": 0,
        "remapped_rows.failure": 0,
        "field.230": 0,  # NVML_FI_DEV_GET_GPU_RECOVERY_ACTION: none
        "mig.mode": 0,
        "gpm.supported": 1,
    }
    for key, value in overrides.items():
        values[key.replace("__", ".")] = value
    return {f"gpu.{index}.{k}": v for k, v in values.items() if v is not None}


def scenario(n_gpus: int = 2, **extra: object) -> dict[str, object]:
    """``n_gpus`` healthy GPUs (H100s have no fan: fan speed is absent, i.e. unsupported)."""
    values: dict[str, object] = {"device_count": n_gpus}
    for i in range(n_gpus):
        values.update(gpu(i))
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return values


class FakeDriver:
    """One test's fake driver: the built library and that test's scenario file."""

    def __init__(self, lib_dir: Path, scenario_path: Path) -> None:
        self.lib_dir = lib_dir
        self.lib = lib_dir / LIB_NAME
        self.path = scenario_path
        self.values: dict[str, object] = {}

    # ------------------------------------------------------------------ the world
    def write(self, values: Mapping[str, object]) -> None:
        """Replace the whole world (atomically: a reader sees the old or the new file)."""
        self.values = dict(values)
        self._flush()

    def set(self, values: Mapping[str, object] | None = None, **more: object) -> None:
        """Change some keys (``**more``: ``.`` written as ``__``); ``None`` removes a key."""
        changes = dict(values or {})
        changes.update({k.replace("__", "."): v for k, v in more.items()})
        for key, value in changes.items():
            if value is None:
                self.values.pop(key, None)
            else:
                self.values[key] = value
        self._flush()

    def _flush(self) -> None:
        lines = [f"{k}={v}" for k, v in self.values.items()]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.path)

    def calls(self, call: str, gpu: int) -> int:
        """Calls of scenario key ``call`` (``utilization``, ``handle``...) that reached GPU
        ``gpu`` in this process (the fake loaded in-process only)."""
        assert _preloaded is not None, "calls are counted only for the in-process fake"
        return int(_preloaded.fakeNvmlCallCount(call.encode(), gpu))

    def gpu_calls(self, gpu: int, *, but: tuple[str, ...] = ()) -> int:
        """Every call that reached GPU ``gpu`` in this process (``but``: leave these keys out,
        e.g. ``pcie``, which the source's own sampling thread calls at its own pace)."""
        return sum(self.calls(call, gpu) for call in CALL_KEYS if call not in but)

    # ------------------------------------------------------------------ processes over it
    def env(
        self,
        base: Mapping[str, str] | None = None,
        *,
        library: bool = True,
        smi: bool = False,
        **extra: str,
    ) -> dict[str, str]:
        """An environment in which a new process's pynvml loads this fake driver (unless
        ``library`` is false: then no libnvidia-ml.so.1 is found) and, with ``smi``, the fake
        ``nvidia-smi`` over the same scenario comes first on PATH."""
        env = dict(os.environ if base is None else base)
        if library:
            old = env.get("LD_LIBRARY_PATH")
            env["LD_LIBRARY_PATH"] = f"{self.lib_dir}:{old}" if old else str(self.lib_dir)
        if smi:
            env["PATH"] = f"{SMI_DIR}:{env.get('PATH', os.defpath)}"
        env[SCENARIO_ENV] = str(self.path)
        env.update(extra)
        return env

    def run_gputel(
        self,
        *args: str,
        timeout: float = 60,
        env: Mapping[str, str] | None = None,
        library: bool = True,
        smi: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """``gputel ARGS`` to completion over this driver (extra settings in ``env``)."""
        return subprocess.run(
            [str(GPUTEL), *args],
            env=self.env(library=library, smi=smi, **dict(env or {})),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def popen_gputel(
        self,
        *args: str,
        env: Mapping[str, str] | None = None,
        library: bool = True,
        smi: bool = False,
        **kwargs: object,
    ) -> subprocess.Popen[str]:
        """``gputel ARGS`` running in the background over this driver; stderr captured."""
        return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
            [str(GPUTEL), *args],
            env=self.env(library=library, smi=smi, **dict(env or {})),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **kwargs,
        )

    def popen_python(self, code: str) -> subprocess.Popen[str]:
        """Python ``code`` running in the background over this driver; stdout/stderr piped."""
        return subprocess.Popen(
            [sys.executable, "-c", code],
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def python(self, code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run Python ``code`` in a fresh interpreter over this driver."""
        return subprocess.run(
            [sys.executable, "-c", code],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="session")
def fake_nvml_lib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The directory holding the built fake ``libnvidia-ml.so.1`` (built once per session)."""
    try:
        return build(tmp_path_factory.getbasetemp() / "fakenvml")
    except BuildUnavailable as exc:
        pytest.skip(f"{exc}; run scripts/setup-dev.sh")


@pytest.fixture
def fake_driver(fake_nvml_lib: Path, tmp_path: Path) -> FakeDriver:
    """A fake driver with two healthy GPUs; change its world with ``write``/``set``."""
    driver = FakeDriver(fake_nvml_lib, tmp_path / "nvml-scenario.txt")
    driver.write(scenario(2))
    return driver


@pytest.fixture
def inproc_driver(fake_driver: FakeDriver, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDriver]:
    """The fake driver loaded into this process under the real pynvml (see :func:`preload`)."""
    if _real_library_loaded(fake_driver.lib_dir):
        pytest.skip("the real libnvidia-ml.so.1 is loaded in this process (run -m gpu apart)")
    preload(fake_driver.lib_dir).fakeNvmlReset()
    monkeypatch.setenv(SCENARIO_ENV, str(fake_driver.path))
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    from gputel.sources import nvml

    nvml.reset_nvml_state()
    yield fake_driver
    nvml.reset_nvml_state()


def real_gpu_present() -> bool:
    """Whether this machine has a working NVIDIA driver and GPU (``nvidia-smi -L`` lists one)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return False
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU " in out.stdout


@pytest.fixture
def gpu_driver(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """For ``-m gpu`` tests: ``"real"`` on a machine with an NVIDIA GPU, else the fake driver
    with two healthy GPUs loaded in this process and the fake nvidia-smi on PATH (``"fake"``)."""
    from gputel.sources import nvml

    nvml.reset_nvml_state()
    if real_gpu_present():
        if _preloaded is not None:
            pytest.skip("the fake libnvidia-ml.so.1 is loaded in this process (run -m gpu apart)")
        yield "real"
    else:
        lib_dir: Path = request.getfixturevalue("fake_nvml_lib")
        driver = FakeDriver(lib_dir, tmp_path / "gpu-scenario.txt")
        driver.write(scenario(2))
        preload(lib_dir).fakeNvmlReset()
        monkeypatch.setenv(SCENARIO_ENV, str(driver.path))
        monkeypatch.setenv("PATH", f"{SMI_DIR}:{os.environ.get('PATH', os.defpath)}")
        monkeypatch.delitem(sys.modules, "pynvml", raising=False)
        yield "fake"
    nvml.reset_nvml_state()


@pytest.fixture
def driver_agents(tmp_path: Path, fake_driver: FakeDriver) -> Iterator[Callable[..., AgentProc]]:
    """``gputel agent`` processes over the fake driver (nvml backend, fast thresholds), each
    killed after the test together with the recorder child it left."""
    from test_agent_e2e import AgentProc, pid_alive

    started: list[AgentProc] = []

    def make(**env: str) -> AgentProc:
        settings = {
            "GPUTEL_BACKEND": "nvml",
            "GPUTEL_INTERVAL": "0.1",
            "GPUTEL_START_UTIL": "20",
            "GPUTEL_START_SECONDS": "0.3",
            "GPUTEL_STOP_UTIL": "10",
            "GPUTEL_STOP_SECONDS": "0.6",
            **env,
        }
        agent = AgentProc(tmp_path / f"a{len(started)}", fake_driver.env({}, **settings))
        started.append(agent)
        return agent

    yield make
    for agent in started:
        hb = None
        with contextlib.suppress(OSError, ValueError):
            hb = json.loads((agent.run_dir / "recorder.json").read_text())
        agent.kill()
        child = hb.get("pid") if isinstance(hb, dict) else None
        if isinstance(child, int) and pid_alive(child):
            os.kill(child, signal.SIGKILL)
