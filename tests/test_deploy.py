"""Deployment assets: install.sh staging, the systemd unit, /etc/default/gputel, logrotate policy.

Everything runs against a temporary root (``install.sh --destdir``); nothing on the machine is
touched. The unit goes through the real ``systemd-analyze verify`` and ``security``, the logrotate
policy through the real ``logrotate``; each of those tests is skipped when the binary is missing.

Two rewrites make the real tools usable on a staged tree (the files as shipped are what install.sh
installs; only these copies are changed):

- ``systemd-analyze verify`` insists that ``ExecStart=`` exists. The staged tree has no venv
  (``--destdir`` never builds one), so the test copy points ``ExecStart=`` at a stub executable.
- logrotate runs against a test directory instead of ``/var/log/gputel``, with ``su``/``create``
  naming the user running the tests instead of ``gputel`` (which need not exist here), and the
  ``postrotate`` reload replaced by a marker file.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gputel.settings import SETTINGS

REPO = Path(__file__).resolve().parents[1]
INSTALL = REPO / "install.sh"
UNIT = REPO / "systemd" / "gputel.service"
EXPORT_SERVICE = REPO / "systemd" / "gputel-export.service"
EXPORT_TIMER = REPO / "systemd" / "gputel-export.timer"
DEFAULTS = REPO / "etc-default" / "gputel"
LOGROTATE_POLICY = REPO / "logrotate" / "gputel"
UDEV_RULE = REPO / "udev" / "90-gputel-rapl.rules"

SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
LOGROTATE = shutil.which("logrotate") or (
    "/usr/sbin/logrotate" if os.access("/usr/sbin/logrotate", os.X_OK) else None
)
MAX_EXPOSURE = 3.5

#: Every file a full staged install creates, with its mode.
EXPECTED_FILES = {
    "etc/systemd/system/gputel.service": 0o644,
    "etc/systemd/system/gputel-export.service": 0o644,
    "etc/systemd/system/gputel-export.timer": 0o644,
    "etc/default/gputel": 0o644,
    "etc/logrotate.d/gputel": 0o644,
    "etc/udev/rules.d/90-gputel-rapl.rules": 0o644,
    "usr/local/bin/gputel": 0o755,
    "opt/gputel/share/gputel/gputel.default": 0o644,
    "opt/gputel/share/gputel/install.md": 0o644,
    "opt/gputel/share/gputel/slurm/prolog.sh": 0o755,
    "opt/gputel/share/gputel/slurm/epilog.sh": 0o755,
    "opt/gputel/share/gputel/slurm/gputel-slurm.sh": 0o644,
}
LOGROTATE_ONLY = {"etc/logrotate.d/gputel"}


def run_install(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(INSTALL), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def stage(root: Path, *args: str) -> subprocess.CompletedProcess:
    proc = run_install(*args, "--destdir", str(root))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return proc


def tree_state(root: Path) -> dict[str, tuple]:
    """Path → (kind, mode, content hash, mtime_ns) for everything under root."""
    out: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        rel = str(path.relative_to(root))
        if stat.S_ISREG(st.st_mode):
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[rel] = ("file", stat.S_IMODE(st.st_mode), digest, st.st_mtime_ns)
        elif stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", stat.S_IMODE(st.st_mode), None, None)
        else:
            out[rel] = ("other", stat.S_IMODE(st.st_mode), os.readlink(path), None)
    return out


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()}


# ---------------------------------------------------------------------------- install.sh
def test_install_script_is_valid_bash() -> None:
    proc = subprocess.run(["bash", "-n", str(INSTALL)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert INSTALL.read_text().splitlines()[0] == "#!/usr/bin/env bash"
    assert "set -euo pipefail" in INSTALL.read_text()
    assert os.access(INSTALL, os.X_OK), "install.sh must be executable"


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_install_script_is_shellcheck_clean() -> None:
    proc = subprocess.run(["shellcheck", str(INSTALL)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_destdir_stages_every_file(tmp_path: Path) -> None:
    root = tmp_path / "root"
    stage(root)
    assert files_under(root) == set(EXPECTED_FILES)
    for rel, mode in EXPECTED_FILES.items():
        assert stat.S_IMODE((root / rel).stat().st_mode) == mode, rel
    log_dir = root / "var/log/gputel"
    assert log_dir.is_dir()
    assert stat.S_IMODE(log_dir.stat().st_mode) == 0o750
    # The shipped files, byte for byte (the unit and wrapper with the default prefix).
    assert (root / "etc/systemd/system/gputel.service").read_bytes() == UNIT.read_bytes()
    for unit in (EXPORT_SERVICE, EXPORT_TIMER):
        assert (root / "etc/systemd/system" / unit.name).read_bytes() == unit.read_bytes()
    assert (root / "etc/default/gputel").read_bytes() == DEFAULTS.read_bytes()
    assert (root / "etc/logrotate.d/gputel").read_bytes() == LOGROTATE_POLICY.read_bytes()
    assert (root / "etc/udev/rules.d/90-gputel-rapl.rules").read_bytes() == UDEV_RULE.read_bytes()
    assert (root / "opt/gputel/share/gputel/gputel.default").read_bytes() == DEFAULTS.read_bytes()
    wrapper = (root / "usr/local/bin/gputel").read_text()
    assert wrapper.startswith("#!/bin/sh\n")
    assert 'exec /opt/gputel/bin/gputel "$@"' in wrapper
    # --destdir never builds the venv and leaves no temporary files behind.
    assert not (root / "opt/gputel/bin").exists()
    assert not [p for p in root.rglob(".gputel-*")]


def test_wrapper_runs_the_venv_command(tmp_path: Path) -> None:
    root = tmp_path / "root"
    stage(root)
    fake = tmp_path / "venv/bin/gputel"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/bin/sh\necho "run-dir=${GPUTEL_RUN_DIR:-unset} args=$*"\n')
    fake.chmod(0o755)
    # The staged wrapper runs /opt/gputel/bin/gputel; this copy runs the fake venv command.
    wrapper = tmp_path / "gputel"
    staged = (root / "usr/local/bin/gputel").read_text()
    wrapper.write_text(staged.replace("/opt/gputel/bin/gputel", str(fake)))
    wrapper.chmod(0o755)
    proc = subprocess.run(
        [str(wrapper), "status", "--json"],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin", "GPUTEL_RUN_DIR": "/somewhere"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "run-dir=/somewhere args=status --json"


def test_destdir_with_prefix_rewrites_paths(tmp_path: Path) -> None:
    root = tmp_path / "root"
    stage(root, "--prefix", "/srv/gputel")
    unit = (root / "etc/systemd/system/gputel.service").read_text()
    assert "ExecStart=/srv/gputel/bin/gputel agent" in unit
    assert "/opt/gputel" not in unit
    assert 'exec /srv/gputel/bin/gputel "$@"' in (root / "usr/local/bin/gputel").read_text()
    assert (root / "srv/gputel/share/gputel/gputel.default").is_file()
    assert not (root / "opt").exists()


def test_second_run_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    stage(root)
    before = tree_state(root)
    time.sleep(0.02)  # a rewrite would show up as a new mtime
    proc = stage(root)
    assert tree_state(root) == before
    assert "installed" not in proc.stdout
    assert "already up to date" in proc.stdout


def test_steps_run_alone(tmp_path: Path) -> None:
    only_logrotate = tmp_path / "a"
    stage(only_logrotate, "logrotate")
    assert files_under(only_logrotate) == LOGROTATE_ONLY

    only_service = tmp_path / "b"
    stage(only_service, "service")
    assert files_under(only_service) == set(EXPECTED_FILES) - LOGROTATE_ONLY

    # Then the other step completes the tree; uninstalling one step leaves the other alone.
    stage(only_service, "logrotate")
    assert files_under(only_service) == set(EXPECTED_FILES)
    stage(only_service, "logrotate", "--uninstall")
    assert files_under(only_service) == set(EXPECTED_FILES) - LOGROTATE_ONLY


def test_existing_defaults_file_is_never_overwritten(tmp_path: Path) -> None:
    root = tmp_path / "root"
    defaults = root / "etc/default/gputel"
    defaults.parent.mkdir(parents=True)
    edited = "GPUTEL_INTERVAL=0.5\nGPUTEL_EXPORTER_ADDR=127.0.0.1\n"
    defaults.write_text(edited)
    proc = stage(root)
    assert defaults.read_text() == edited
    assert (root / "etc/default/gputel.new").read_bytes() == DEFAULTS.read_bytes()
    assert "gputel.new" in proc.stdout
    before = tree_state(root)
    stage(root)
    assert tree_state(root) == before
    # Once the operator's file matches the shipped one again, the stale .new goes away.
    shutil.copyfile(DEFAULTS, defaults)
    stage(root)
    assert not (root / "etc/default/gputel.new").exists()


def test_uninstall_removes_everything_it_installed(tmp_path: Path) -> None:
    root = tmp_path / "root"
    stage(root)
    proc = stage(root, "--uninstall")
    assert list(root.iterdir()) == [], proc.stdout


def test_profiling_dropin_only_when_asked_kept_on_rerun_removed_on_uninstall(
    tmp_path: Path,
) -> None:
    """``--profiling``: the drop-in that gives the service CAP_SYS_ADMIN for GPM (never by
    default: docs/hardware.md)."""
    root = tmp_path / "root"
    dropin = root / "etc/systemd/system/gputel.service.d/profiling.conf"
    stage(root, "service")
    assert not dropin.exists()
    stage(root, "service", "--profiling")
    assert dropin.read_bytes() == (REPO / "systemd/gputel-profiling.conf").read_bytes()
    assert stat.S_IMODE(dropin.stat().st_mode) == 0o644
    directives = unit_directives(dropin.read_text())
    assert directives[("Service", "AmbientCapabilities")] == ["CAP_SYS_ADMIN"]
    assert directives[("Service", "CapabilityBoundingSet")] == ["CAP_SYS_ADMIN"]
    proc = stage(root, "service")
    assert dropin.exists() and "kept" in proc.stdout
    stage(root, "--uninstall")
    assert list(root.iterdir()) == []


def test_uninstall_keeps_csvs_and_edited_defaults(tmp_path: Path) -> None:
    root = tmp_path / "root"
    stage(root)
    csv = root / "var/log/gputel/gpu-20261122T000000Z-s1.csv"
    csv.write_text("timestamp,gpu\n2026-11-22T00:00:00.000Z,0\n")
    defaults = root / "etc/default/gputel"
    defaults.write_text(defaults.read_text() + "GPUTEL_INTERVAL=2\n")
    proc = stage(root, "--uninstall")
    assert files_under(root) == {
        "etc/default/gputel",
        "var/log/gputel/gpu-20261122T000000Z-s1.csv",
    }
    assert defaults.read_text().endswith("GPUTEL_INTERVAL=2\n")
    assert "kept" in proc.stdout
    # Uninstalling again is harmless.
    stage(root, "--uninstall")
    assert csv.exists()


def test_real_install_needs_root(tmp_path: Path) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    fake_id = fake_bin / "id"
    fake_id.write_text("#!/bin/sh\necho 1000\n")
    fake_id.chmod(0o755)
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin"}
    proc = run_install("all", env=env)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "root" in lines[0] and "--destdir" in lines[0]
    assert proc.stdout == ""


@pytest.mark.parametrize(
    "args",
    [("bogus",), ("--prefix", "relative/path"), ("--prefix", "/home/me/gputel"), ("--destdir",)],
)
def test_bad_arguments_exit_2(args: tuple[str, ...], tmp_path: Path) -> None:
    extra = () if args == ("--destdir",) else ("--destdir", str(tmp_path / "root"))
    proc = run_install(*extra, *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("install.sh: ")
    assert not proc.stderr.rstrip().endswith(" 2")
    assert not (tmp_path / "root").exists()


# ---------------------------------------------------------------------------- systemd unit
def unit_directives(text: str) -> dict[tuple[str, str], list[str]]:
    """(section, key) → values, in order (systemd keys may repeat)."""
    out: dict[tuple[str, str], list[str]] = {}
    section = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault((section, key.strip()), []).append(value.strip())
    return out


def test_unit_has_the_required_directives() -> None:
    d = unit_directives(UNIT.read_text())

    def one(section: str, key: str) -> str:
        values = d.get((section, key))
        assert values, f"[{section}] {key}= missing"
        return values[-1]

    assert one("Service", "Type") == "notify"
    assert one("Service", "NotifyAccess") == "main"
    assert one("Service", "ExecStart") == "/opt/gputel/bin/gputel agent"
    assert one("Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("Service", "Restart") == "on-failure"
    assert one("Service", "RestartPreventExitStatus") == "2"  # bad setting: no restart loop
    assert one("Service", "WatchdogSec")
    assert one("Unit", "StartLimitIntervalSec") and one("Unit", "StartLimitBurst")
    assert "nvidia-persistenced.service" in one("Unit", "After").split()
    assert ("Unit", "Requires") not in d and ("Unit", "Wants") not in d
    assert one("Service", "EnvironmentFile") == "-/etc/default/gputel"
    assert one("Service", "User") == "gputel"
    assert one("Service", "RuntimeDirectory") == "gputel"
    assert one("Service", "RuntimeDirectoryMode") == "0750"
    assert one("Service", "LogsDirectory") == "gputel"
    assert "GPUTEL_RUN_DIR=/run/gputel" in d[("Service", "Environment")]
    assert one("Service", "KillMode") == "mixed"
    assert one("Service", "TimeoutStopSec")
    assert one("Service", "UMask") == "0027"
    assert one("Service", "ProtectSystem") == "strict"
    assert one("Service", "ProtectHome") == "yes"
    assert one("Service", "PrivateTmp") == "yes"
    assert one("Service", "NoNewPrivileges") == "yes"
    # The one capability: reading the driver's Xid lines in /dev/kmsg (GPUTEL_KMSG).
    assert one("Service", "CapabilityBoundingSet") == "CAP_SYSLOG"
    assert one("Service", "AmbientCapabilities") == "CAP_SYSLOG"
    assert one("Service", "ProtectKernelLogs") == "no"
    assert "/dev/kmsg r" in d[("Service", "DeviceAllow")]
    assert one("Service", "DevicePolicy") == "closed"
    allowed = {v.split()[0] for v in d[("Service", "DeviceAllow")]}
    nvidia = {"char-nvidiactl", "char-nvidia-frontend", "char-nvidia-uvm", "char-nvidia-caps"}
    assert nvidia <= allowed
    assert ("Service", "PrivateDevices") not in d, "PrivateDevices= hides /dev/nvidia*"
    families = one("Service", "RestrictAddressFamilies").split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families)
    assert "@system-service" in d[("Service", "SystemCallFilter")]
    assert one("Service", "SystemCallArchitectures") == "native"
    assert one("Install", "WantedBy") == "multi-user.target"


def verifiable_unit(tmp_path: Path) -> Path:
    """The staged unit, with ExecStart= pointing at a stub that exists (see module docstring)."""
    root = tmp_path / "root"
    stage(root, "service")
    stub = tmp_path / "stub" / "gputel"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    staged = (root / "etc/systemd/system/gputel.service").read_text()
    assert "ExecStart=/opt/gputel/bin/gputel agent" in staged
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    unit = unit_dir / "gputel.service"
    unit.write_text(staged.replace("ExecStart=/opt/gputel/bin/gputel", f"ExecStart={stub}"))
    return unit


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    if not os.access("/bin/kill", os.X_OK):
        pytest.skip("/bin/kill (ExecReload=) missing on this machine")
    unit = verifiable_unit(tmp_path)
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=unit.parent,
        check=False,
    )
    relevant = [ln for ln in proc.stderr.splitlines() if "gputel" in ln]
    assert proc.returncode == 0, proc.stderr
    assert relevant == []


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed")
def test_cap_syslog_cannot_clear_the_kernel_log() -> None:
    """CAP_SYSLOG reads /dev/kmsg; the syslog(2) call it would also allow (clearing the log) is
    not in the unit's allowed system calls."""
    assert "@system-service" in unit_directives(UNIT.read_text())[("Service", "SystemCallFilter")]
    proc = subprocess.run(
        [str(SYSTEMD_ANALYZE), "syscall-filter"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    groups: dict[str, list[str]] = {}
    members: list[str] = []
    for line in proc.stdout.splitlines():
        if line.startswith("@"):
            members = groups.setdefault(line.split()[0], [])
        elif line.strip() and not line.strip().startswith("#"):
            members.append(line.strip())

    def calls(group: str) -> set[str]:
        out: set[str] = set()
        for m in groups.get(group, []):
            out |= calls(m) if m.startswith("@") else {m}
        return out

    allowed = calls("@system-service")
    assert "read" in allowed and "syslog" not in allowed


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed")
def test_unit_security_exposure_is_low(tmp_path: Path) -> None:
    unit = verifiable_unit(tmp_path)
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=unit.parent,
        check=False,
    )
    if "--offline" in proc.stderr and "unrecognized" in proc.stderr:
        pytest.skip("systemd-analyze is older than 252 (no --offline)")
    m = re.search(r"Overall exposure level for gputel\.service:\s*([0-9.]+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, proc.stdout


# ---------------------------------------------------------------------------- export timer
def test_export_units_run_an_incremental_export_and_stay_off_until_enabled() -> None:
    d = unit_directives(EXPORT_SERVICE.read_text())
    assert d[("Service", "Type")] == ["oneshot"]
    assert d[("Service", "ExecStart")] == [
        "/opt/gputel/bin/gputel export --parquet ${GPUTEL_EXPORT_DIR} --incremental "
        "${GPUTEL_LOG_DIR}"
    ]
    assert d[("Service", "EnvironmentFile")] == ["-/etc/default/gputel"]
    default = next(s.default for s in SETTINGS if s.env == "GPUTEL_EXPORT_DIR")
    assert f"GPUTEL_EXPORT_DIR={default}" in d[("Service", "Environment")]
    # The default OUT is the unit's StateDirectory=, the one place it may write besides /tmp.
    assert default == "/var/lib/gputel/parquet" and d[("Service", "StateDirectory")] == ["gputel"]
    assert d[("Service", "User")] == ["gputel"] and d[("Service", "ProtectSystem")] == ["strict"]
    assert ("Install", "WantedBy") not in d  # started by the timer only
    t = unit_directives(EXPORT_TIMER.read_text())
    assert t[("Timer", "OnUnitInactiveSec")] and t[("Install", "WantedBy")] == ["timers.target"]
    # install.sh enables the agent only: the timer waits for an operator to choose OUT.
    enabled = re.findall(r"systemctl enable[^\n]*", INSTALL.read_text())
    assert enabled and all("UNIT_NAME" in line for line in enabled), enabled


def test_export_unit_command_line_exports_and_reruns(tmp_path: Path) -> None:
    """The unit's ExecStart=, with its variables as systemd fills them in, on a log directory."""
    log = tmp_path / "log"
    log.mkdir()
    (log / "transitions.csv").write_text(
        "timestamp,from_state,to_state,reason\n2026-11-22T10:00:00.000Z,idle,arming,util\n"
    )
    env = {"GPUTEL_LOG_DIR": str(log), "GPUTEL_EXPORT_DIR": str(tmp_path / "parquet")}
    (line,) = unit_directives(EXPORT_SERVICE.read_text())[("Service", "ExecStart")]
    argv = [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], w) for w in line.split()]
    assert argv[0] == "/opt/gputel/bin/gputel"
    for expect in ("wrote", "nothing new"):
        proc = subprocess.run(
            [sys.executable, "-m", "gputel", *argv[1:]],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0 and expect in proc.stdout, proc.stderr
    assert list((tmp_path / "parquet" / "transitions").rglob("*.parquet"))


def verifiable_export_units(tmp_path: Path) -> Path:
    """The staged export service and timer, ExecStart= on a stub (see module docstring)."""
    root = tmp_path / "root"
    stage(root, "service")
    stub = tmp_path / "stub" / "gputel"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    for name in (EXPORT_SERVICE.name, EXPORT_TIMER.name):
        staged = (root / "etc/systemd/system" / name).read_text()
        (unit_dir / name).write_text(staged.replace("/opt/gputel/bin/gputel", str(stub)))
    return unit_dir


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze not installed")
def test_export_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    unit_dir = verifiable_export_units(tmp_path)
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit_dir / EXPORT_TIMER.name)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=unit_dir,
        check=False,
    )
    relevant = [ln for ln in proc.stderr.splitlines() if "gputel" in ln]
    assert proc.returncode == 0, proc.stderr
    assert relevant == []
    proc = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", EXPORT_SERVICE.name],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=unit_dir,
        check=False,
    )
    if "--offline" in proc.stderr and "unrecognized" in proc.stderr:
        return
    m = re.search(r"Overall exposure level for gputel-export\.service:\s*([0-9.]+)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, proc.stdout


# ---------------------------------------------------------------------------- defaults file
_SETTING_LINE = re.compile(r"^#?([A-Z][A-Z0-9_]*)=(.*)$")


def defaults_entries() -> list[tuple[str, str, str]]:
    """(name, value, comment line above) for each setting line of etc-default/gputel."""
    lines = DEFAULTS.read_text().splitlines()
    out = []
    for i, line in enumerate(lines):
        m = _SETTING_LINE.match(line)
        if m:
            out.append((m.group(1), m.group(2), lines[i - 1] if i else ""))
    return out


def test_defaults_file_names_match_the_settings_table() -> None:
    assert {s.scope for s in SETTINGS} <= {"agent", "orchestrator", "export"}
    expected = [s.env for s in SETTINGS]
    names = [name for name, _, _ in defaults_entries()]
    assert sorted(names) == sorted(expected)
    assert len(names) == len(set(names))
    assert "GPU_TELEMETRY_AUTOSTART" in names


def test_defaults_file_shows_each_default_with_a_comment() -> None:
    by_env = {s.env: s for s in SETTINGS}
    for name, value, comment in defaults_entries():
        spec = by_env[name]
        assert comment.startswith("# ") and len(comment) > 10, f"{name} has no comment above it"
        if name == "GPUTEL_RUN_DIR":
            # The computed default depends on the user; the unit pins the system agent's.
            assert value == "/run/gputel"
            assert "Environment=GPUTEL_RUN_DIR=/run/gputel" in UNIT.read_text()
            continue
        assert spec.parse(value) == spec.parse(spec.default), name


def test_defaults_file_lines_are_valid_shell_when_uncommented(tmp_path: Path) -> None:
    active = tmp_path / "gputel"
    active.write_text(
        "\n".join(
            line[1:] if _SETTING_LINE.match(line) else line
            for line in DEFAULTS.read_text().splitlines()
        )
        + "\n"
    )
    proc = subprocess.run(
        ["sh", "-c", f'set -a; . "{active}"; env'],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    env = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    for name, value, _ in defaults_entries():
        assert env[name] == value


# ---------------------------------------------------------------------------- logrotate
def policy_directives(text: str) -> list[str]:
    """First words of the policy's lines outside scripts (the directives)."""
    out, in_script = [], False
    for raw in text.splitlines():
        words = raw.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] in ("postrotate", "prerotate", "firstaction", "lastaction", "preremove"):
            in_script = True
        elif words[0] == "endscript":
            in_script = False
        elif not in_script:
            out.append(words[0])
    return out


def test_policy_never_copytruncates() -> None:
    for path in (LOGROTATE_POLICY, INSTALL, UNIT):
        for raw in path.read_text().splitlines():
            words = raw.split()
            assert not (words and words[0] == "copytruncate"), f"{path}: {raw}"
    directives = policy_directives(LOGROTATE_POLICY.read_text())
    assert "copytruncate" not in directives
    needed = {"su", "compress", "delaycompress", "missingok", "notifempty", "create", "rotate"}
    assert needed <= set(directives)


def test_policy_rotates_as_the_service_user() -> None:
    text = LOGROTATE_POLICY.read_text()
    su = [ln.split() for ln in text.splitlines() if ln.split()[:1] == ["su"]]
    assert su and all(words == ["su", "gputel", "gputel"] for words in su)
    creates = [ln.split() for ln in text.splitlines() if ln.split()[:1] == ["create"]]
    assert creates and all(words[2:] == ["gputel", "gputel"] for words in creates)


def test_policy_scripts_cover_the_reload_and_expiry() -> None:
    text = LOGROTATE_POLICY.read_text()
    assert "systemctl reload gputel.service" in text
    assert re.search(r"find /var/log/gputel .*-mtime \+30 -delete", text)


class LogrotateRig:
    """The shipped policy pointed at a test directory (see module docstring)."""

    def __init__(self, tmp_path: Path) -> None:
        import grp
        import pwd

        self.dir = tmp_path / "log"
        self.dir.mkdir(mode=0o750)
        self.state = tmp_path / "logrotate.state"
        self.marker = tmp_path / "reloaded"
        user = pwd.getpwuid(os.geteuid()).pw_name
        group = grp.getgrgid(os.getegid()).gr_name
        text = LOGROTATE_POLICY.read_text()
        assert "systemctl reload gputel.service" in text
        text = text.replace("/var/log/gputel", str(self.dir))
        text = text.replace("su gputel gputel", f"su {user} {group}")
        text = text.replace("create 0640 gputel gputel", f"create 0640 {user} {group}")
        text = text.replace(
            "systemctl reload gputel.service", f"echo reload >> {self.marker} && false"
        )
        self.policy = tmp_path / "gputel.logrotate"
        self.policy.write_text(text)

    def run(self, *args: str) -> subprocess.CompletedProcess:
        assert LOGROTATE is not None
        proc = subprocess.run(
            [LOGROTATE, *args, "-s", str(self.state), str(self.policy)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "error:" not in proc.stderr, proc.stderr
        return proc

    def write(self, name: str, text: str, age_days: float = 0) -> Path:
        path = self.dir / name
        path.write_bytes(text.encode())
        if age_days:
            when = time.time() - age_days * 86400
            os.utime(path, (when, when))
        return path

    def write_gz(self, name: str, text: str, age_days: float) -> Path:
        path = self.dir / name
        path.write_bytes(gzip.compress(text.encode()))
        when = time.time() - age_days * 86400
        os.utime(path, (when, when))
        return path

    def seed_state(self, names: list[str], days_ago: int) -> None:
        """Pretend logrotate last looked at these files days ago (so `daily` is due)."""
        t = time.gmtime(time.time() - days_ago * 86400)
        stamp = f"{t.tm_year}-{t.tm_mon}-{t.tm_mday}-{t.tm_hour}:0:0"
        lines = ["logrotate state -- version 2"]
        lines += [f'"{self.dir / n}" {stamp}' for n in names]
        self.state.write_text("\n".join(lines) + "\n")


needs_logrotate = pytest.mark.skipif(LOGROTATE is None, reason="logrotate not installed")

GPU_ROWS = "timestamp,gpu,power_w\n2026-11-20T10:00:00.000Z,0,312.5\n"


@needs_logrotate
def test_logrotate_debug_run_accepts_the_policy(tmp_path: Path) -> None:
    rig = LogrotateRig(tmp_path)
    rig.write("gpu-a.csv", GPU_ROWS, age_days=2)
    rig.write("transitions.csv", "timestamp,from_state,to_state,reason\n")
    proc = rig.run("-d")
    assert "rotating pattern" in proc.stderr + proc.stdout
    assert (rig.dir / "gpu-a.csv").exists()  # -d changes nothing


@needs_logrotate
def test_daily_run_compresses_finished_files_and_leaves_live_ones(tmp_path: Path) -> None:
    rig = LogrotateRig(tmp_path)
    rig.write("gpu-finished.csv", GPU_ROWS, age_days=2)
    rig.write("host-finished.csv", "timestamp,cpu_util_pct\n", age_days=2)
    live = rig.write("gpu-live.csv", GPU_ROWS)
    expired = rig.write_gz("gpu-ancient.csv.1.gz", GPU_ROWS, age_days=40)
    recent = rig.write_gz("gpu-recent.csv.1.gz", GPU_ROWS, age_days=10)
    rig.seed_state(["gpu-finished.csv", "host-finished.csv", "gpu-live.csv"], days_ago=2)

    rig.run()

    done = rig.dir / "gpu-finished.csv.1.gz"
    assert gzip.decompress(done.read_bytes()).decode() == GPU_ROWS
    assert (rig.dir / "host-finished.csv.1.gz").exists()
    assert not (rig.dir / "gpu-finished.csv").exists()
    assert live.read_text() == GPU_ROWS, "a file written today is never touched"
    assert not (rig.dir / "gpu-live.csv.1.gz").exists()
    assert not expired.exists(), "a session file 40 days old is expired"
    assert recent.exists()


@needs_logrotate
def test_forced_runs_rotate_compress_and_expire(tmp_path: Path) -> None:
    rig = LogrotateRig(tmp_path)
    header = "timestamp,from_state,to_state,reason\n"
    rig.write("transitions.csv", header + "2026-11-20T10:00:00.000Z,idle,arming,busy\n")
    rig.write("allocations.csv", "id,gpus,start,end,duration_s,energy_j\n")
    events = "timestamp,gpu,uuid,event,xid,detail,allocations\n"
    rig.write("events.csv", events + "2026-11-20T10:00:01.000Z,0,GPU-x,xid,79,off the bus,\n")
    too_old = rig.write_gz("transitions.csv.4.gz", header, age_days=500)
    beyond_count = rig.write_gz("transitions.csv.12.gz", header, age_days=20)
    rig.write("gpu-live.csv", GPU_ROWS)

    rig.run("-f")
    first = rig.dir / "transitions.csv.1"
    assert first.read_text().startswith(header), "delaycompress: newest rotated file stays plain"
    new = rig.dir / "transitions.csv"
    assert new.exists() and new.stat().st_size == 0, "create: an empty file for the next row"
    assert stat.S_IMODE(new.stat().st_mode) == 0o640
    assert (rig.dir / "events.csv.1").read_text().startswith(events)
    # A forced run overrides minage: the live session file is renamed, so the recorder is
    # told to start new files (the reload marker) before it is compressed.
    assert (rig.dir / "gpu-live.csv.1.gz").exists()
    assert rig.marker.read_text().strip() == "reload"
    assert not too_old.exists(), "maxage expires rotated files older than 400 days"
    assert not beyond_count.exists() and not (rig.dir / "transitions.csv.13.gz").exists()

    new.write_text(header + "2026-11-21T10:00:00.000Z,arming,active,busy\n")
    rig.run("-f")
    second = rig.dir / "transitions.csv.2.gz"
    assert gzip.decompress(second.read_bytes()).decode().startswith(header)
    assert "arming,active" in (rig.dir / "transitions.csv.1").read_text()
    assert not (rig.dir / "transitions.csv.1.gz").exists()


# ---------------------------------------------------------------------------- RAPL rule
def test_rapl_rule_grants_the_group_and_never_the_world() -> None:
    rules = [
        ln for ln in UDEV_RULE.read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    assert len(rules) == 1
    rule = rules[0]
    assert 'SUBSYSTEM=="powercap"' in rule and 'KERNEL=="intel-rapl:*"' in rule
    assert 'ACTION!="remove"' in rule
    assert 'RUN+="/bin/chgrp gputel /sys%p/energy_uj"' in rule
    assert 'RUN+="/bin/chmod 0440 /sys%p/energy_uj"' in rule
    modes = re.findall(r"chmod (\S+)", rule)
    assert modes == ["0440"], "energy_uj must never become world-readable"


# ---------------------------------------------------------------------------- docs
def test_install_docs_cover_the_operator_tasks() -> None:
    text = (REPO / "docs" / "install.md").read_text()
    for needed in (
        "## Install",
        "## Upgrade",
        "## Uninstall",
        "## Where files go",
        "systemctl status gputel",
        "gputel status",
        "curl -s localhost:9118/metrics",
        "NVML",
        "Driver/library version mismatch",
        "RAPL",
        "Watchdog",
        "Disk full",
        "## Hardening",
        "--destdir",
    ):
        assert needed in text, needed


@needs_logrotate
def test_forced_run_compresses_files_moved_aside_by_an_upgrade(tmp_path: Path) -> None:
    rig = LogrotateRig(tmp_path)
    old = "timestamp,gpu,uuid,event,xid,detail\n2026-11-20T10:00:01.000Z,0,GPU-x,xid,79,bus\n"
    rig.write("events-pre-20261120T100000Z.csv", old)
    expired = rig.write_gz("allocations-pre-20250101T000000Z.csv.1.gz", "id\n", age_days=500)
    rig.run("-f")
    done = rig.dir / "events-pre-20261120T100000Z.csv.1.gz"
    assert gzip.decompress(done.read_bytes()).decode() == old
    assert not (rig.dir / "events-pre-20261120T100000Z.csv").exists(), "nocreate"
    assert not expired.exists()
