"""Helpers for scripts/gpu-check.sh (standard library and gputel; PyTorch only for ``matmul``).

gpu_check.py matmul SECONDS            a CUDA matrix-multiplication load (exit 3: no torch/CUDA)
gpu_check.py cpu SECONDS -- CMD...     run CMD for SECONDS, SIGTERM it, print its CPU seconds
gpu_check.py spawn SECONDS -- CMD...   run CMD once a second for SECONDS, print total CPU
gpu_check.py cycle LOG_DIR             check transitions.csv went idle -> active -> idle
gpu_check.py compare LOG_DIR SMI_CSV   compare gpu-*.csv rows with nvidia-smi samples
gpu_check.py summary OUT_DIR           the timing table from the cpu/spawn results
gpu_check.py gpm                       JSON: this user, the driver's profiling restriction, and
                                       per GPU what gputel finds of GPM (available / refused: …)
gpu_check.py gpm-summary ROOT NOBODY   one line from two ``gpm`` results (a missing one: why)
gpu_check.py pci [SYS_ROOT]            NVML's PCI address of each GPU in the kernel log's format
                                       (NVRM: Xid (PCI:0000:3b:00)), checked against
                                       SYS_ROOT/bus/pci/devices (default /sys); exit 3: none there
"""

from __future__ import annotations

import csv
import json
import resource
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def matmul(seconds: float) -> int:
    try:
        import torch  # type: ignore[import-not-found]
    except ImportError:
        print("SKIP: PyTorch is not installed (pip install torch to run the load step)")
        return 3
    if not torch.cuda.is_available():
        print("SKIP: PyTorch sees no CUDA device")
        return 3
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        for _ in range(20):
            a @ b
        torch.cuda.synchronize()
        n += 20
    print(f"matmul: {n} 8192x8192 fp16 products in {seconds:g} s")
    return 0


def cpu(seconds: float, cmd: list[str]) -> int:
    before = _children_cpu()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(seconds)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    print(json.dumps({"cmd": cmd, "seconds": seconds, "cpu_s": _children_cpu() - before}))
    return 0


def spawn(seconds: float, cmd: list[str]) -> int:
    before = _children_cpu()
    start = time.monotonic()
    runs = 0
    while time.monotonic() - start < seconds:
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        runs += 1
        time.sleep(max(0.0, start + runs - time.monotonic()))
    cpu_s = _children_cpu() - before
    print(json.dumps({"cmd": cmd, "seconds": seconds, "runs": runs, "cpu_s": cpu_s}))
    return 0


def cycle(log_dir: Path) -> int:
    path = log_dir / "transitions.csv"
    if not path.exists():
        print(f"FAIL: no {path}")
        return 1
    with open(path, newline="") as fh:
        steps = [(r["from_state"], r["to_state"]) for r in csv.DictReader(fh)]
    wanted = [
        ("idle", "arming"),
        ("arming", "active"),
        ("telemetry_off", "telemetry_on"),
        ("active", "cooling"),
        ("cooling", "idle"),
        ("telemetry_on", "telemetry_off"),
    ]
    missing = [f"{a}->{b}" for a, b in wanted if (a, b) not in steps]
    rows = 0
    for path in log_dir.glob("gpu-*.csv"):
        with open(path, newline="") as fh:
            rows += sum(1 for _ in csv.DictReader(fh))
    if missing:
        print(f"FAIL: transitions.csv lacks {', '.join(missing)} (has {steps})")
        return 1
    if rows == 0:
        print("FAIL: telemetry was on but no gpu-*.csv row was written")
        return 1
    print(f"ok: idle -> arming -> active -> cooling -> idle; {rows} GPU rows recorded")
    return 0


def _ts(text: str) -> float | None:
    text = text.strip()
    for fmt in ("%Y-%m-%dT%H:%M:%S.%fZ", "%Y/%m/%d %H:%M:%S.%f"):
        try:
            return datetime.strptime(text, fmt).replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            continue
    return None


def _num(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


#: CSV column, nvidia-smi column, allowed difference (absolute), what it is.
_COMPARE = (
    ("utilization_gpu_pct", "utilization.gpu", 30.0, "two samples of a moving counter"),
    ("memory_used_mib", "memory.used", 1024.0, "allocations move between samples"),
    ("temperature_c", "temperature.gpu", 5.0, "°C"),
    ("power_w", "power.draw", 60.0, "W; NVML averages over 1 s"),
)


def compare(log_dir: Path, smi_csv: Path, smi_tz_offset_s: float) -> int:
    """Each CSV row against the nvidia-smi sample of the same GPU nearest in time (≤ 1.5 s).

    nvidia-smi's ``timestamp`` is local time: ``smi_tz_offset_s`` (seconds east of UTC)
    converts it.
    """
    samples: dict[int, list[tuple[float, dict[str, str]]]] = {}
    with open(smi_csv, newline="") as fh:
        names = ["timestamp", "index", *(s for _, s, _, _ in _COMPARE)]
        for row in csv.reader(fh):
            cells = [c.strip() for c in row]
            if len(cells) != len(names) or not cells[1].isdigit():
                continue
            t = _ts(cells[0])
            if t is not None:
                samples.setdefault(int(cells[1]), []).append(
                    (t - smi_tz_offset_s, dict(zip(names, cells, strict=True)))
                )
    pairs = 0
    bad: list[str] = []
    worst: dict[str, float] = {}
    for path in sorted(log_dir.glob("gpu-*.csv")):
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                t = _ts(row["timestamp"])
                mine = samples.get(int(row["gpu"]), [])
                if t is None or not mine:
                    continue
                when, smi = min(mine, key=lambda s: abs(s[0] - t))
                if abs(when - t) > 1.5:
                    continue
                pairs += 1
                for col, smi_col, limit, _ in _COMPARE:
                    a, b = _num(row[col]), _num(smi[smi_col])
                    if a is None or b is None:
                        continue
                    diff = abs(a - b)
                    worst[col] = max(worst.get(col, 0.0), diff)
                    if diff > limit:
                        bad.append(f"{row['timestamp']} GPU {row['gpu']} {col}: {a} vs {b}")
    report = ", ".join(f"{c} max |diff| {worst.get(c, 0.0):.1f}" for c, _, _, _ in _COMPARE)
    if pairs == 0:
        print("FAIL: no CSV row had an nvidia-smi sample within 1.5 s")
        return 1
    # Two tools sampling a changing GPU moments apart disagree where the load starts or stops;
    # a few such pairs are expected, many are a bug.
    if len(bad) > max(2, pairs // 10):
        print(f"FAIL: {len(bad)} of {pairs} pairs differ too much ({report}); first: {bad[0]}")
        return 1
    edges = f", {len(bad)} pairs at load edges differ" if bad else ""
    print(f"ok: {pairs} CSV rows agree with nvidia-smi ({report}{edges})")
    return 0


def summary(out_dir: Path) -> int:
    rows = []
    for name, what in (
        ("timing-record.json", "gputel record (NVML, all fields, CSV + exposition)"),
        ("timing-smi-loop.json", "nvidia-smi --query-gpu=… -l 1 (one process)"),
        ("timing-smi-spawn.json", "nvidia-smi --query-gpu=… spawned once a second"),
    ):
        path = out_dir / name
        if not path.exists():
            continue
        data = json.loads(path.read_text().strip().splitlines()[-1])
        pct = 100.0 * data["cpu_s"] / data["seconds"]
        rows.append(f"| {what} | {data['seconds']:g} s | {data['cpu_s']:.3f} s | {pct:.2f} % |")
    print("| what | wall | CPU | CPU share of a core |")
    print("|---|---:|---:|---:|")
    print("\n".join(rows))
    return 0


def gpm() -> int:
    """What gputel's NVML source finds of GPM for the user running this (exit 3: no NVML)."""
    import os

    from gputel.sources.nvml import open_nvml
    from gputel.sources.nvml_gpm import profiling_admin_only

    try:
        source = open_nvml(None)
    except Exception as exc:  # the line gputel itself would print
        print(json.dumps({"uid": os.geteuid(), "error": str(exc)}))
        return 3
    try:
        gpus = [{"index": d.index, "uuid": d.uuid, "gpm": d.gpm} for d in source.devices()]
    finally:
        source.close()
    doc = {"uid": os.geteuid(), "admin_only": profiling_admin_only(Path("/proc")), "gpus": gpus}
    print(json.dumps(doc))
    return 0


def _gpm_line(path: Path) -> str:
    try:
        doc = json.loads(path.read_text().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        text = path.read_text(errors="replace").strip() if path.exists() else ""
        return f"did not run ({text.splitlines()[-1] if text else 'no output'})"
    if "error" in doc:
        return f"NVML did not open ({doc['error']})"
    return "; ".join(f"GPU {g['index']} {g['gpm']}" for g in doc["gpus"])


def gpm_summary(root: Path, nobody: Path) -> int:
    print(f"as root: {_gpm_line(root)} | as nobody: {_gpm_line(nobody)}")
    return 0


def pci(sys_root: Path) -> int:
    """Each GPU's PCI address as NVML reports it and as the kernel log writes it; whether the
    kernel knows a device there (exit 1: some not, 3: none, as over a fake driver)."""
    from gputel.sources.kernel_xid import pci_key
    from gputel.sources.nvml import open_nvml

    source = open_nvml(None)
    try:
        devices_ = source.devices()
    finally:
        source.close()
    uuids = {d.index: d.uuid for d in devices_}
    addresses = {d.index: a for d in devices_ if (a := pci_key(d.pci_bus_id)) is not None}
    devices = sys_root / "bus" / "pci" / "devices"
    found = 0
    for index, address in sorted(addresses.items()):
        present = (devices / f"{address}.0").exists()
        found += present
        where = "present" if present else "absent"
        print(f"GPU {index} {uuids.get(index, '')} NVRM: Xid (PCI:{address}) — {devices}: {where}")
    if not addresses or found == 0:
        return 3
    return 0 if found == len(addresses) else 1


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    command, args = argv[0], argv[1:]
    rest = args[args.index("--") + 1 :] if "--" in args else []
    if command == "matmul":
        return matmul(float(args[0]))
    if command == "cpu":
        return cpu(float(args[0]), rest)
    if command == "spawn":
        return spawn(float(args[0]), rest)
    if command == "cycle":
        return cycle(Path(args[0]))
    if command == "compare":
        offset = float(args[2]) if len(args) > 2 else 0.0
        return compare(Path(args[0]), Path(args[1]), offset)
    if command == "summary":
        return summary(Path(args[0]))
    if command == "gpm":
        return gpm()
    if command == "gpm-summary":
        return gpm_summary(Path(args[0]), Path(args[1]))
    if command == "pci":
        return pci(Path(args[0]) if args else Path("/sys"))
    print(f"unknown command {command!r}\n{__doc__}")
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
