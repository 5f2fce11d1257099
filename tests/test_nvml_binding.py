"""The NVML modules' one binding: every function gputel calls is declared, resolved once at open,
and present in the installed nvidia-ml-py (scripts/test.sh runs this under the newest and the
lowest supported release), so a misspelt name fails here instead of looking like an old driver.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
from pathlib import Path

import pytest

from fakedriver import FakeDriver
from gputel.sources import nvml, nvml_binding, nvml_direct

SOURCES = Path(nvml_binding.__file__).resolve().parent
NVML_MODULES = sorted(SOURCES.glob("nvml*.py"))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def test_every_declared_function_is_in_the_installed_binding() -> None:
    import pynvml

    installed = _version(importlib.metadata.version("nvidia-ml-py"))
    missing = [
        name
        for name, since in nvml_binding.FUNCTIONS.items()
        if (not since or installed >= _version(since)) and not callable(getattr(pynvml, name, None))
    ]
    assert missing == []


_FUNCTION_NAME = re.compile(
    r"nvml(Init|Shutdown|Device[A-Z]|Gpm[A-Z]|EventSet[A-Z]|System[A-Z])\w*"
)


def _names_asked_for() -> set[str]:
    """Every string in the NVML modules that names an NVML function."""
    names: set[str] = set()
    for path in NVML_MODULES:
        if path.name in ("nvml_binding.py", "nvml_direct.py"):  # declarations, C symbols
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and _FUNCTION_NAME.fullmatch(node.value)
            ):
                names.add(node.value)
    return names


def test_every_function_the_code_asks_for_is_declared() -> None:
    asked = _names_asked_for()
    assert len(asked) > 30
    assert sorted(asked - set(nvml_binding.FUNCTIONS)) == []


def test_no_nvml_function_is_looked_up_by_string_outside_the_binding() -> None:
    """No ``getattr(nv, "nvml…")`` or ``nv.nvml…(`` anywhere but the resolution at open."""
    for path in NVML_MODULES:
        if path.name == "nvml_binding.py":
            continue
        text = path.read_text()
        assert not re.search(r"\bnv\.nvml\w+\(", text), path.name
        assert not re.search(r"getattr\(\w+, \"nvml(Device|Gpm|Event)", text), path.name


def test_an_undeclared_name_is_an_error_not_an_unsupported_field(
    inproc_driver: FakeDriver,
) -> None:
    source = nvml.open_nvml(None)
    try:
        with pytest.raises(KeyError):
            source.calls.api.fn("nvmlDeviceGetUtilisationRates")
    finally:
        source.close()


def test_functions_are_resolved_once_at_open(
    inproc_driver: FakeDriver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The binding's module attributes are not consulted per read: replacing one after open
    changes nothing (the source holds the function object it resolved)."""
    import pynvml

    source = nvml.open_nvml(None)
    try:
        monkeypatch.setattr(pynvml, "nvmlDeviceGetPowerUsage", None)
        assert source.read()[0].power_w == 69.5
    finally:
        source.close()


def test_only_the_binding_module_imports_pynvml_and_only_lazily() -> None:
    for path in sorted(SOURCES.parent.rglob("*.py")):
        tree = ast.parse(path.read_text())
        imports = [
            node
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            and (
                any(a.name.split(".")[0] == "pynvml" for a in node.names)
                if isinstance(node, ast.Import)
                else (node.module or "").split(".")[0] == "pynvml"
            )
        ]
        if path.name == "nvml_binding.py":
            assert imports and all(node not in tree.body for node in imports)
        else:
            assert imports == [], path


def test_no_nvml_module_imports_another_modules_private_names() -> None:
    for path in NVML_MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gputel"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert private == [] or private == ["__version__"], (path, private)


def test_the_nvml_modules_import_no_circle() -> None:
    """Each NVML module imports only modules below it (nvml.py on top, the binding at the
    bottom); TYPE_CHECKING imports count too."""
    graph: dict[str, set[str]] = {}
    for path in NVML_MODULES:
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module.startswith("gputel.sources.nvml"):
                    deps.add(node.module.rsplit(".", 1)[1])
                elif node.module == "gputel.sources":
                    deps.update(a.name for a in node.names if a.name.startswith("nvml"))
        graph[path.stem] = deps

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for dep in graph.get(start, ()):
            if dep == target or (dep not in seen and reaches(dep, target, seen | {dep})):
                return True
        return False

    assert [m for m in graph if reaches(m, m, set())] == []


# ------------------------------------------------------------------ the thin layer over pynvml
def _c_symbols(pynvml: object, name: str) -> set[str]:
    """The C symbols a pynvml function looks up, following the pynvml functions it calls."""
    from test_fake_driver import _c_functions

    return _c_functions(pynvml, name, set())


def test_each_fast_function_calls_the_c_symbols_of_the_pynvml_function_it_replaces() -> None:
    import pynvml

    for name, (symbols, _make) in nvml_direct.FAST.items():
        assert name in nvml_binding.FUNCTIONS, name
        if getattr(pynvml, name, None) is None:
            continue  # newer bindings only (FUNCTIONS says since when): never bound here
        assert set(symbols) == _c_symbols(pynvml, name), name


def test_each_bound_call_calls_the_c_symbol_of_its_pynvml_function() -> None:
    import pynvml

    for name, (symbol, _out, _field, _inputs) in nvml_direct.BOUND.items():
        assert name in nvml_binding.FUNCTIONS, name
        if getattr(pynvml, name, None) is None:
            continue
        assert symbol in _c_symbols(pynvml, name), name
    # The two whose inputs sit in their result (nvml_direct.bind).
    assert "nvmlDeviceGetMemoryInfo_v2" in _c_symbols(pynvml, "nvmlDeviceGetMemoryInfo")
    if getattr(pynvml, "nvmlDeviceGetTemperatureV", None) is not None:
        assert _c_symbols(pynvml, "nvmlDeviceGetTemperatureV") == {"nvmlDeviceGetTemperatureV"}


def _both(source: nvml.NvmlGpuSource, name: str, *args: object, **kwargs: object) -> tuple:
    import pynvml

    handle = source._gpus[0].handle
    fast = source.calls.api.fn(name)
    assert fast is not None and fast is not getattr(pynvml, name), f"{name} is not fast"
    return fast(handle, *args, **kwargs), getattr(pynvml, name)(handle, *args, **kwargs)


def _bound_and_pynvml(
    source: nvml.NvmlGpuSource, name: str, *args: object, **kwargs: object
) -> tuple:
    """What the call bound to GPU 0 (``nvml_direct.bind``) gives, and what pynvml gives."""
    import pynvml

    handle = source._gpus[0].handle
    bound = nvml_direct.bind(source.calls.api.module, name, handle, *args, **kwargs)
    assert bound is not None, f"{name} is not bound"
    if bound.inputs is not None:
        bound.inputs(bound.out)
    assert bound.c(*bound.args) == 0, name
    value = bound.out if bound.field is None else getattr(bound.out, bound.field)
    return value, getattr(pynvml, name)(handle, *args, **kwargs)


def test_fast_and_bound_calls_answer_what_pynvml_answers(inproc_driver: FakeDriver) -> None:
    import pynvml

    inproc_driver.set(
        gpu__0__utilization__gpu_pct=77,
        gpu__0__processes="4242:1048576:40,4243:2097152",
        gpu__0__fan_speed_pct=41,
    )
    source = nvml.open_nvml(None)
    try:
        for name, args in [
            ("nvmlDeviceGetPowerUsage", ()),
            ("nvmlDeviceGetEnforcedPowerLimit", ()),
            ("nvmlDeviceGetClockInfo", (pynvml.NVML_CLOCK_SM,)),
            ("nvmlDeviceGetClockInfo", (pynvml.NVML_CLOCK_MEM,)),
            ("nvmlDeviceGetPerformanceState", ()),
            ("nvmlDeviceGetCurrentClocksEventReasons", ()),
            ("nvmlDeviceGetFanSpeed", ()),
        ]:
            bound, slow = _bound_and_pynvml(source, name, *args)
            assert bound == slow, name
        bound, slow = _bound_and_pynvml(source, "nvmlDeviceGetUtilizationRates")
        assert (bound.gpu, bound.memory) == (slow.gpu, slow.memory) == (77, 0)
        for kwargs in ({}, {"version": pynvml.nvmlMemory_v2}):
            fast, slow = _both(source, "nvmlDeviceGetMemoryInfo", **kwargs)
            assert (fast.used, fast.total) == (slow.used, slow.total)
            bound, slow = _bound_and_pynvml(source, "nvmlDeviceGetMemoryInfo", **kwargs)
            assert (bound.used, bound.total) == (slow.used, slow.total)
        fast, slow = _both(source, "nvmlDeviceGetFieldValues", [83, 3, 4])
        assert [(v.fieldId, v.nvmlReturn, v.value.ullVal) for v in fast] == [
            (v.fieldId, v.nvmlReturn, v.value.ullVal) for v in slow
        ]
        for name in ("nvmlDeviceGetTemperatureV", "nvmlDeviceGetTemperature"):
            if getattr(pynvml, name, None) is not None:  # V: newer bindings only
                bound, slow = _bound_and_pynvml(source, name, pynvml.NVML_TEMPERATURE_GPU)
                assert bound == slow == 31, name
        if getattr(pynvml, "nvmlDeviceGetProcessesUtilizationInfo", None) is not None:
            fast, slow = _both(source, "nvmlDeviceGetProcessesUtilizationInfo", 0)
            # The fake stamps each sample with the time of the call: the two calls differ there.
            assert [(s.pid, s.smUtil) for s in fast] == [(s.pid, s.smUtil) for s in slow]
            pairs = zip(fast, slow, strict=True)  # the fast call came first
            assert all(0 < a.timeStamp <= b.timeStamp for a, b in pairs)
            assert [s.pid for s in fast] == [4242, 4243]
        fast, slow = _both(source, "nvmlDeviceGetComputeRunningProcesses")
        assert (
            [(p.pid, p.usedGpuMemory) for p in fast]
            == [(p.pid, p.usedGpuMemory) for p in slow]
            == [(4242, 1048576), (4243, 2097152)]
        )
    finally:
        source.close()


def test_a_long_process_list_is_read_whole(inproc_driver: FakeDriver) -> None:
    """More processes than the array offered: the layer grows it and asks again."""
    procs = ",".join(f"{500 + i}:{i + 1}" for i in range(40))  # the fake's 512-byte value
    inproc_driver.set(gpu__0__processes=procs)
    source = nvml.open_nvml(None)
    try:
        fast = source.calls.api.fn("nvmlDeviceGetComputeRunningProcesses")
        assert fast is not None
        listed = fast(source._gpus[0].handle)
        assert [p.pid for p in listed] == [500 + i for i in range(40)]
        assert len(source.read_gpu(0).processes or ()) == 40
    finally:
        source.close()


def test_errors_from_the_fast_functions_are_the_bindings_classes(
    inproc_driver: FakeDriver,
) -> None:
    import pynvml

    inproc_driver.set(gpu__0__memory__error=999)
    source = nvml.open_nvml(None)
    try:
        fn = source.calls.api.fn("nvmlDeviceGetMemoryInfo")
        assert fn is not None and fn is not pynvml.nvmlDeviceGetMemoryInfo
        with pytest.raises(pynvml.NVMLError_Unknown):
            fn(source._gpus[0].handle)
        inproc_driver.set(gpu__0__memory__error=pynvml.NVML_ERROR_NOT_SUPPORTED)
        with pytest.raises(pynvml.NVMLError_NotSupported):
            fn(source._gpus[0].handle)
    finally:
        source.close()
