"""The fake libnvidia-ml.so.1 agrees with NVIDIA's binding: symbols, struct layouts, behaviour.

Every NVML C function that the binding reaches from a pynvml function gputel calls must be
exported, and every struct size pinned in fake_nvml.c must equal the installed binding's ctypes
structure, so a new nvidia-ml-py that changes either fails here first.
"""

from __future__ import annotations

import ast
import ctypes
import inspect
import json
import re
import textwrap
from pathlib import Path

import pytest

import gputel.sources.nvml as nvml_module
from fakedriver import (
    EVENT_XID,
    GPU_IS_LOST,
    NO_PERMISSION,
    SOURCE,
    UNKNOWN,
    FakeDriver,
    exported_symbols,
    scenario,
)
from gputel.sources import nvml_binding

SRC = Path(nvml_module.__file__).resolve().parents[1]


def _pynvml_calls_in_gputel() -> set[str]:
    """Names of pynvml functions called anywhere in gputel (``nv.nvmlX`` or "nvmlX" strings)."""
    names: set[str] = set()
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        names.update(re.findall(r"\bnv\.(nvml\w+)\(", text))
        names.update(re.findall(r"[\"'](nvml(?:Device|System|Gpm|Event)\w+)[\"']", text))
    names.update(nvml_binding.FUNCTIONS)
    names.update({"nvmlErrorString"})
    return names


def _c_functions(pynvml: object, name: str, seen: set[str]) -> set[str]:
    """The C symbols a pynvml function looks up, following the pynvml functions it calls."""
    if name in seen:
        return set()
    seen.add(name)
    fn = getattr(pynvml, name, None)
    if fn is None or not callable(fn):
        return set()
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return set()
    symbols = set(re.findall(r"_nvmlGetFunctionPointer\(\s*\"(\w+)\"", source))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            callee = node.func.id
            if callee.startswith("nvml") and callee != name:
                symbols |= _c_functions(pynvml, callee, seen)
    return symbols


def test_every_nvml_function_gputel_calls_is_exported(fake_nvml_lib: Path) -> None:
    import pynvml

    exported = exported_symbols(fake_nvml_lib / "libnvidia-ml.so.1")
    wanted: set[str] = set()
    for name in _pynvml_calls_in_gputel():
        wanted |= _c_functions(pynvml, name, set())
    assert "nvmlDeviceGetHandleByIndex_v2" in wanted and "nvmlInitWithFlags" in wanted
    # MemoryInfo: gputel asks the v2 struct first; the binding picks the symbol by argument.
    wanted |= {"nvmlDeviceGetMemoryInfo_v2"}
    assert sorted(wanted - exported) == []


def test_the_event_gpm_process_and_mig_apis_are_exported(fake_nvml_lib: Path) -> None:
    exported = exported_symbols(fake_nvml_lib / "libnvidia-ml.so.1")
    names = (
        "nvmlEventSetCreate nvmlDeviceGetSupportedEventTypes nvmlDeviceRegisterEvents "
        "nvmlEventSetWait_v2 nvmlEventSetFree nvmlGpmQueryDeviceSupport nvmlGpmSampleAlloc "
        "nvmlGpmSampleFree nvmlGpmSampleGet nvmlGpmMigSampleGet nvmlGpmMetricsGet "
        "nvmlDeviceGetComputeRunningProcesses_v3 nvmlDeviceGetComputeRunningProcesses_v2 "
        "nvmlDeviceGetGraphicsRunningProcesses_v3 nvmlDeviceGetProcessesUtilizationInfo "
        "nvmlDeviceGetProcessUtilization nvmlDeviceGetMigMode nvmlDeviceGetMaxMigDeviceCount "
        "nvmlDeviceGetMigDeviceHandleByIndex nvmlDeviceGetGpuInstanceId "
        "nvmlDeviceGetComputeInstanceId nvmlDeviceGetDeviceHandleFromMigDeviceHandle"
    )
    for name in names.split():
        assert name in exported, name


def test_struct_layouts_match_the_binding() -> None:
    import pynvml

    pin = re.compile(r"_Static_assert\(sizeof\((\w+)\) == (\d+), \"([^\"]+)\"\)")
    pins = pin.findall(SOURCE.read_text())
    checked = 0
    for _c_name, size, py_names in pins:
        for py_name in py_names.split(" / "):
            py_name = py_name.strip()
            if py_name == "_v3_t":
                py_name = "c_nvmlProcessInfo_v3_t"
            if py_name == "c_nvmlGpmMetricsGet_t header":
                # The metrics array's length differs between binding versions; its offset not.
                assert pynvml.c_nvmlGpmMetricsGet_t.metrics.offset == int(size)
                checked += 1
                continue
            struct = getattr(pynvml, py_name, None)
            if struct is None:
                continue  # an older binding without this API
            assert ctypes.sizeof(struct) == int(size), py_name
            checked += 1
    assert checked >= 10


def test_the_process_list_struct_is_the_drivers() -> None:
    """The array the binding hands to nvmlDeviceGetComputeRunningProcesses_v3 must have the
    driver's 24-byte entries (nvidia-ml-py 12.535.77 used 32 and read garbage: pyproject's
    floor is 12.535.108 for this)."""
    import pynvml

    source = inspect.getsource(pynvml.nvmlDeviceGetComputeRunningProcesses_v3)
    match = re.search(r"proc_array = (\w+) \*", source)
    assert match is not None
    assert ctypes.sizeof(getattr(pynvml, match.group(1))) == 24


# ------------------------------------------------------------------------ behaviour, in a child
_PROBE = """
import json, pynvml as nv
out = {}
nv.nvmlInit()
h = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(nv.nvmlDeviceGetCount())]
out["name"] = nv.nvmlDeviceGetName(h[0])
out["uuid"] = nv.nvmlDeviceGetUUID(h[0])
out["driver"] = nv.nvmlSystemGetDriverVersion()
u = nv.nvmlDeviceGetUtilizationRates(h[0])
out["util"] = [u.gpu, u.memory]
m = nv.nvmlDeviceGetMemoryInfo(h[0], version=nv.nvmlMemory_v2)
out["mem_v2"] = [m.total, m.used, m.reserved]
out["power"] = nv.nvmlDeviceGetPowerUsage(h[0])
out["energy"] = nv.nvmlDeviceGetTotalEnergyConsumption(h[0])
vals = nv.nvmlDeviceGetFieldValues(h[0], [83, 3])
out["fields"] = [[v.nvmlReturn, v.value.ullVal] for v in vals]
out["pci"] = nv.nvmlDeviceGetPciInfo(h[0]).busId
out["mig"] = nv.nvmlDeviceGetMigMode(h[1])
out["procs"] = [[p.pid, p.usedGpuMemory] for p in nv.nvmlDeviceGetComputeRunningProcesses(h[0])]
try:
    nv.nvmlDeviceGetFanSpeed(h[0])
except nv.NVMLError as e:
    out["fan"] = e.value
try:
    nv.nvmlDeviceGetFanSpeed(h[1])
except nv.NVMLError as e:
    out["fan1"] = e.value
es = nv.nvmlEventSetCreate()
nv.nvmlDeviceRegisterEvents(h[0], nv.nvmlEventTypeXidCriticalError, es)
ev = nv.nvmlEventSetWait_v2(es, 1000)
out["event"] = [ev.eventType, ev.eventData]
try:
    nv.nvmlEventSetWait_v2(es, 50)
except nv.NVMLError as e:
    out["event_again"] = e.value
nv.nvmlEventSetFree(es)
s1, s2 = nv.nvmlGpmSampleAlloc(), nv.nvmlGpmSampleAlloc()
nv.nvmlGpmSampleGet(h[0], s1); nv.nvmlGpmSampleGet(h[0], s2)
g = nv.c_nvmlGpmMetricsGet_t()
g.version = nv.NVML_GPM_METRICS_GET_VERSION
g.numMetrics = 2
g.sample1, g.sample2 = s1, s2
g.metrics[0].metricId = 2
g.metrics[1].metricId = 3
nv.nvmlGpmMetricsGet(g)
out["gpm"] = [[g.metrics[i].nvmlReturn, g.metrics[i].value] for i in range(2)]
nv.nvmlShutdown()
try:
    nv.nvmlDeviceGetCount()
except nv.NVMLError as e:
    out["after_shutdown"] = e.value
print(json.dumps(out))
"""


def test_the_binding_reads_the_scenario(fake_driver: FakeDriver) -> None:
    fake_driver.write(
        scenario(
            2,
            gpu__0__utilization__gpu_pct=77,
            gpu__0__utilization__memory_pct=12,
            gpu__0__processes="4242:1048576:40,4343:2097152",
            gpu__1__fan_speed__error=UNKNOWN,
            gpu__1__fan_speed_pct=30,
            gpu__1__mig__mode=1,
            gpu__0__gpm__2=55.5,
            **{"event.1": f"0,{EVENT_XID},79"},
        )
    )
    result = fake_driver.python(_PROBE)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["name"] == "NVIDIA H100 80GB HBM3"
    assert out["uuid"].startswith("GPU-fake-0000")
    assert out["driver"] == "535.104.05"
    assert out["util"] == [77, 12]
    assert out["mem_v2"] == [81559 * 2**20, 4 * 2**20, 530 * 2**20]
    assert out["power"] == 69_500
    assert out["energy"] == 1_000_000_000
    assert out["fields"] == [[0, 1_000_000_000], [0, 0]]
    assert out["pci"] == "00000000:18:00.0"
    assert out["mig"] == [1, 1]
    assert out["procs"] == [[4242, 1048576], [4343, 2097152]]
    assert out["fan"] == 3  # not in the scenario: not supported
    assert out["fan1"] == UNKNOWN
    assert out["event"] == [EVENT_XID, 79]
    assert out["event_again"] == 10  # delivered once; then the wait times out
    assert out["gpm"] == [[0, 55.5], [3, 0.0]]
    assert out["after_shutdown"] == 1  # uninitialised


def test_handle_and_init_errors(fake_driver: FakeDriver) -> None:
    fake_driver.set(gpu__0__handle__error=NO_PERMISSION, gpu__1__all__error=GPU_IS_LOST)
    code = (
        "import pynvml as nv\n"
        "nv.nvmlInit()\n"
        "for i in range(2):\n"
        "    try:\n"
        "        nv.nvmlDeviceGetHandleByIndex(i)\n"
        "    except nv.NVMLError as e:\n"
        "        print(type(e).__name__)\n"
    )
    result = fake_driver.python(code)
    assert result.stdout.split() == ["NVMLError_NoPermission", "NVMLError_GpuIsLost"]
    fake_driver.set(init__error=18)
    result = fake_driver.python("import pynvml as nv\nnv.nvmlInit()")
    assert "NVMLError_LibRmVersionMismatch" in result.stderr


def test_a_blocked_call_is_released_by_the_scenario(fake_driver: FakeDriver) -> None:
    """A hang lasts while the scenario says so: tests release it instead of waiting it out."""
    fake_driver.set(gpu__0__utilization__sleep_ms=60_000)
    code = (
        "import pynvml as nv, sys, time, threading, os\n"
        "nv.nvmlInit(); h = nv.nvmlDeviceGetHandleByIndex(0)\n"
        "t = time.monotonic()\n"
        "print('calling', flush=True)\n"
        "nv.nvmlDeviceGetUtilizationRates(h)\n"
        "print(round(time.monotonic() - t, 1), flush=True)\n"
    )
    proc = fake_driver.popen_python(code)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "calling"
    fake_driver.set(gpu__0__utilization__sleep_ms=None)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert float(out) < 30


_COUNT = "import pynvml as nv\nnv.nvmlInit()\nprint(nv.nvmlDeviceGetCount())"


def test_without_a_scenario_there_is_no_gpu(fake_driver: FakeDriver) -> None:
    fake_driver.path.unlink()
    result = fake_driver.python(_COUNT)
    assert result.stdout.strip() == "0"


@pytest.mark.parametrize("n", [1, 3])
def test_device_count_follows_the_scenario(fake_driver: FakeDriver, n: int) -> None:
    fake_driver.write(scenario(n))
    result = fake_driver.python(_COUNT)
    assert result.stdout.strip() == str(n)


def test_gpm_restricted_to_admins_refuses_a_non_admin_caller(fake_driver: FakeDriver) -> None:
    """``gpu.I.gpm.admin_only=1``: the support query answers, samples answer NO_PERMISSION (4)
    unless the caller is an admin, as a driver with RmProfilingAdminOnly=1 does."""
    code = (
        "import pynvml as nv\n"
        "nv.nvmlInit()\n"
        "h = nv.nvmlDeviceGetHandleByIndex(0)\n"
        "print(nv.nvmlGpmQueryDeviceSupport(h).isSupportedDevice)\n"
        "s = nv.nvmlGpmSampleAlloc()\n"
        "try:\n"
        "    nv.nvmlGpmSampleGet(h, s)\n"
        "    print('sampled')\n"
        "except nv.NVMLError as e:\n"
        "    print(e.value)\n"
    )
    fake_driver.set(gpu__0__gpm__admin_only=1, caller__admin=0)
    assert fake_driver.python(code).stdout.split() == ["1", str(NO_PERMISSION)]
    fake_driver.set(caller__admin=1)
    assert fake_driver.python(code).stdout.split() == ["1", "sampled"]
