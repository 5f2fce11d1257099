"""Every setting's bad values, systematically: each is refused at start with one line naming
the setting (exit 2), before anything is created. The decisions are in docs/security.md
("Settings refused at start")."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from gputel.settings import SETTINGS, SettingsError, check_for_start, load_settings

Env = Callable[[Path], dict[str, str]]


def a_file(tmp: Path) -> str:
    path = tmp / "plain-file"
    path.write_text("x")
    return str(path)


def world_readable_web_config(tmp: Path) -> str:
    path = tmp / "web.yml"
    path.write_text("basic_auth_users:\n  prom: $2b$04$" + "a" * 53 + "\n")
    path.chmod(0o644)
    return str(path)


def readonly_parent(tmp: Path) -> str:
    parent = tmp / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    return str(parent / "logs")


def const(value: str) -> Callable[[Path], str]:
    return lambda tmp: value


#: (setting, bad value) for every setting; the value may need the test's directory.
BAD: list[tuple[str, Callable[[Path], str]]] = [
    *[("GPUTEL_BACKEND", const(v)) for v in ("gpu", "1", "sim,nvml", "nvml\x1b[0m")],
    *[
        ("GPUTEL_INTERVAL", const(v))
        for v in ("0", "-1", "abc", "1e-9", "nan", "inf", "1e999", "3601", "1 s s", "0x10")
    ],
    *[
        (name, const(v))
        for name in ("GPUTEL_START_UTIL", "GPUTEL_STOP_UTIL")
        for v in ("-1", "101", "nan", "inf", "x", "50%")
    ],
    *[
        (name, const(v))
        for name in ("GPUTEL_START_SECONDS", "GPUTEL_STOP_SECONDS")
        for v in ("-1", "nan", "8d", "x", "1e999")
    ],
    *[("GPUTEL_GPUS", const(v)) for v in ("-1", "0,0", "a", "1024", "0;1", "0,,1", "0-3")],
    *[
        ("GPUTEL_LOG_DIR", f)
        for f in (
            const("   "),
            a_file,
            lambda tmp: a_file(tmp) + "/sub",
            lambda tmp: str(tmp / "a\nb"),
            lambda tmp: str(tmp / "a\x1b[2Jb"),
            lambda tmp: str(tmp / "tab\there"),
            lambda tmp: str(tmp / ("x" * 300) / "logs"),  # a name longer than NAME_MAX
        )
    ],
    *[
        ("GPUTEL_RUN_DIR", f)
        for f in (
            a_file,
            lambda tmp: a_file(tmp) + "/sub",
            lambda tmp: str(tmp / "run\rdir"),
        )
    ],
    *[("GPUTEL_EXPORTER_ADDR", const(v)) for v in ("example.com", "999.1.1.1", "1.2.3.4:80")],
    *[("GPUTEL_EXPORTER_PORT", const(v)) for v in ("-1", "65536", "http", "9118.5", "1e3")],
    *[
        ("GPUTEL_WEB_CONFIG", f)
        for f in (
            lambda tmp: str(tmp / "missing.yml"),
            world_readable_web_config,
            lambda tmp: str(tmp / "web\n.yml"),
            str,  # the directory itself
        )
    ],
    *[
        (name, f)
        for name in ("GPUTEL_SYSFS_ROOT", "GPUTEL_PROC_ROOT")
        for f in (
            lambda tmp: str(tmp / "missing"),
            a_file,
            lambda tmp: str(tmp / "x\ny"),
            const("   "),
        )
    ],
    *[("GPUTEL_SIM_GPUS", const(v)) for v in ("0", "257", "two", "-1", "1.5")],
    *[("GPUTEL_SIM_PATTERN", const(v)) for v in ("abc", "101:5", "50:0", "50:-1", "50:")],
    *[("GPUTEL_SIM_EVENTS", const(v)) for v in ("x", "5:79@1", "0:79@-1", "0:xid@1")],
    *[("GPUTEL_ACTIVITY", const(v)) for v in ("gpm", "sm,utilization")],
    *[("GPUTEL_EVENT_CAPTURE_SECONDS", const(v)) for v in ("-1", "8d", "x")],
    *[("GPUTEL_KMSG", const(v)) for v in ("/dev/kmsg\n", "/tmp/k\x1bmsg", "/dev/\tkmsg")],
    *[("GPUTEL_POD_LOGS_DIR", const(v)) for v in ("/var/log/pods\n", "/var/\x1blog/pods")],
    *[("GPUTEL_PRETRIGGER_SECONDS", const(v)) for v in ("601", "-1", "x")],
]


def test_every_agent_setting_has_bad_values_in_the_table() -> None:
    covered = {name for name, _ in BAD}
    assert covered == {s.env for s in SETTINGS if s.scope == "agent"}


@pytest.mark.parametrize(("name", "make"), BAD, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD)])
def test_bad_value_is_refused_naming_the_setting(
    tmp_path: Path, name: str, make: Callable[[Path], str]
) -> None:
    env = {"GPUTEL_BACKEND": "sim", name: make(tmp_path)}
    with pytest.raises(SettingsError) as err:
        check_for_start(load_settings(env))
    message = str(err.value)
    assert message.startswith(f"invalid {name}="), message
    assert "\n" not in message and "\r" not in message and "\x1b" not in message


def test_good_paths_are_accepted(tmp_path: Path) -> None:
    env = {
        "GPUTEL_LOG_DIR": str(tmp_path / "new" / "logs"),  # created later: fine
        "GPUTEL_RUN_DIR": str(tmp_path / "run"),
        "GPUTEL_SYSFS_ROOT": str(tmp_path),
        "GPUTEL_PROC_ROOT": "/proc",
    }
    check_for_start(load_settings(env))
    assert not (tmp_path / "new").exists(), "checking creates nothing"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may create anything")
def test_a_log_dir_under_a_read_only_parent_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="GPUTEL_LOG_DIR"):
        check_for_start(load_settings({"GPUTEL_LOG_DIR": readonly_parent(tmp_path)}))


@pytest.mark.parametrize("command", ["agent", "record"])
def test_log_dir_naming_a_file_exits_2_with_one_line(tmp_path: Path, command: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUTEL_", "_GPUTEL_"))}
    env.update(
        GPUTEL_BACKEND="sim",
        GPUTEL_LOG_DIR=a_file(tmp_path),
        GPUTEL_RUN_DIR=str(tmp_path / "run"),
        GPUTEL_EXPORTER_PORT="0",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "gputel", command],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "GPUTEL_LOG_DIR" in proc.stderr
    assert not (tmp_path / "run").exists()
