"""Every setting of gputel: one environment name, one flag, one parser, validated up front.

The table ``SETTINGS`` is the single list of names: the CLI builds its flags from it, the shipped
``/etc/default/gputel`` is checked against it, and the docs' configuration table mirrors it. A bad
value raises :class:`SettingsError` naming the setting, which the CLI turns into one line and exit
code 2, before anything starts or any file is touched.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gputel.activity import ACTIVITY_SIGNALS
from gputel.sources.simevents import SimEventsError, parse_sim_events
from gputel.sources.simpattern import PatternError, parse_pattern

AUTOSTART_ENV = "GPU_TELEMETRY_AUTOSTART"
TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"", "0", "false", "no", "off"})
BACKENDS = ("auto", "nvml", "smi", "sim", "none")
#: The shortest tick: below this a typo (1e-9) would be a busy loop writing thousands of rows/s.
MIN_INTERVAL_S = 0.01
#: The pre-trigger window's limits: the agent keeps every tick of it in memory.
MAX_PRETRIGGER_S = 600.0
MAX_PRETRIGGER_TICKS = 3600


class SettingsError(ValueError):
    """An invalid setting. ``str()`` is the one-line message shown to the user."""

    def __init__(self, name: str, value: object, reason: str) -> None:
        self.name = name
        self.value = value
        self.reason = reason
        super().__init__(f"invalid {name}={value!r}: {reason}")


# ---------------------------------------------------------------------------------- parsers
_NUMBER = r"(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)"
_BARE_RE = re.compile(rf"^{_NUMBER}$")
_TERM_RE = re.compile(rf"({_NUMBER})(ms|min|s|m|h|d)")
#: Seconds per unit, largest first: a compound duration names its units in this order.
_UNIT_SECONDS: dict[str, float] = {
    "d": 86400.0,
    "h": 3600.0,
    "m": 60.0,
    "min": 60.0,
    "s": 1.0,
    "ms": 0.001,
}
_UNIT_RANK = {"d": 0, "h": 1, "m": 2, "min": 2, "s": 3, "ms": 4}
DURATION_EXAMPLES = "5, 0.5, 500ms, 90s, 15min, 2h, 1h30m"


def parse_duration(text: str) -> float:
    """Seconds from a duration: a plain number of seconds (``5``, ``0.5``) or one or more
    ``NUMBER UNIT`` terms, largest unit first, each unit once (``500ms``, ``1.5s``, ``15min``,
    ``1h30m``, ``2m30s``, ``1d12h``). Units: ``d``, ``h``, ``m``/``min``, ``s``, ``ms``.

    No sign, no exponent (``1e2``), no spaces inside, no bare number after a unit (``1h30``):
    each of those is more likely a typo than a meaning, and a setting must never guess.
    """
    value = str(text).strip()
    if _BARE_RE.match(value):
        return _finite(float(value))
    total = 0.0
    rank = -1
    pos = 0
    for m in _TERM_RE.finditer(value):
        unit_rank = _UNIT_RANK[m.group(2)]
        if m.start() != pos or unit_rank <= rank:
            break
        total += float(m.group(1)) * _UNIT_SECONDS[m.group(2)]
        rank = unit_rank
        pos = m.end()
    else:
        if pos == len(value) and pos > 0:
            return _finite(total)
    raise ValueError(f"expected a duration such as {DURATION_EXAMPLES}")


def _finite(seconds: float) -> float:
    if not math.isfinite(seconds):
        raise ValueError("duration is too large")
    return seconds


def _interval(text: str) -> float:
    value = parse_duration(text)
    if value < MIN_INTERVAL_S:
        raise ValueError(f"must be at least {MIN_INTERVAL_S:g} seconds")
    if value > 3600:
        raise ValueError("must be at most 3600 seconds")
    return value


def _seconds(text: str) -> float:
    value = parse_duration(text)
    if value > 7 * 86400:
        raise ValueError("must be at most 7 days")
    return value


def _pretrigger(text: str) -> float:
    value = parse_duration(text)
    if value > MAX_PRETRIGGER_S:
        raise ValueError(f"must be at most {MAX_PRETRIGGER_S:g} seconds (0 turns it off)")
    return value


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a percentage 0-100") from None
    if not math.isfinite(value) or not 0 <= value <= 100:
        raise ValueError("expected a percentage 0-100")
    return value


def _activity(text: str) -> str:
    value = text.strip().lower()
    if value not in ACTIVITY_SIGNALS:
        raise ValueError(f"expected one of {', '.join(ACTIVITY_SIGNALS)}")
    return value


def _backend(text: str) -> str:
    value = text.strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"expected one of {', '.join(BACKENDS)}")
    return value


def parse_gpu_list(text: str) -> tuple[int, ...]:
    """``"0,1,3"`` → ``(0, 1, 3)``; refuses negatives, duplicates and junk."""
    out: list[int] = []
    for part in text.split(","):
        p = part.strip()
        if not p.isdigit():
            raise ValueError(f"{p!r} is not a GPU index (expected e.g. 0,1,3)")
        idx = int(p)
        if idx > 1023:
            raise ValueError(f"GPU index {idx} is out of range")
        if idx in out:
            raise ValueError(f"GPU index {idx} is listed twice")
        out.append(idx)
    return tuple(out)


def _gpus(text: str) -> tuple[int, ...] | None:
    value = text.strip().lower()
    if value in ("", "all"):
        return None
    return parse_gpu_list(value)


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _path(text: str) -> Path:
    if not text.strip():
        raise ValueError("must not be empty")
    bad = _CONTROL.search(text)
    if bad is not None:
        # A newline or escape in a path breaks every log line and CSV cell that names it, and
        # is a typo or an attack, never a real directory name.
        raise ValueError(f"must not contain control characters (found {bad.group()!r})")
    return Path(text).expanduser()


def _address(text: str) -> str:
    value = text.strip()
    if value == "localhost":
        return value
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ValueError("expected an IP address such as 0.0.0.0, 127.0.0.1 or ::") from None
    return value


def _whole_number(text: str, low: int, high: int, expected: str) -> int:
    if not text.strip().isdigit() or not low <= int(text) <= high:
        raise ValueError(expected)
    return int(text)


def _port(text: str) -> int:
    return _whole_number(text, 0, 65535, "expected a TCP port 0-65535 (0 disables the exporter)")


def _web_config(text: str) -> str:
    """Checks the whole file now (certificate and key included): a bad one stops the start."""
    if not text.strip():
        return ""
    from gputel.telemetry.webconfig import load

    return str(load(_path(text)).path)


def _kmsg(text: str) -> str:
    """Empty turns the kernel log off; whether the path can be read is found out at start (one
    notice, never a failure: the log needs a privilege the agent may lack)."""
    if not text.strip():
        return ""
    return str(_path(text))


def _sim_gpus(text: str) -> int:
    return _whole_number(text, 1, 256, "expected a whole number of GPUs 1-256")


def _grammar(parse: Callable[[str], object], error: type[Exception]) -> Callable[[str], str]:
    """A setting whose text must parse by its own grammar; the grammar's message names the part."""

    def check(text: str) -> str:
        try:
            parse(text)
        except error as exc:
            raise ValueError(str(exc)) from None
        return text.strip()

    return check


_sim_pattern = _grammar(parse_pattern, PatternError)
_sim_events = _grammar(parse_sim_events, SimEventsError)


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise ValueError("expected 1/true/yes/on or 0/false/no/off")


#: Where the installed service keeps its control socket (the unit's RuntimeDirectory).
SYSTEM_RUN_DIR = Path("/run/gputel")


def default_run_dir(env: Mapping[str, str] | None = None) -> Path:
    """``/run/gputel`` for root, and for anyone while the system agent's socket is there.

    Otherwise a per-user runtime directory. A non-root operator or orchestrator on a node with
    the service installed must reach that agent (or be told it lacks permission), never
    quietly start a private second agent beside it.
    """
    env = os.environ if env is None else env
    if os.geteuid() == 0:
        return SYSTEM_RUN_DIR
    try:
        if stat.S_ISSOCK((SYSTEM_RUN_DIR / "control.sock").lstat().st_mode):
            return SYSTEM_RUN_DIR
    except PermissionError:
        # The service's directory is there but closed to us: point at it, so the caller is
        # told to join group gputel instead of being shown an unrelated private agent.
        return SYSTEM_RUN_DIR
    except OSError:
        pass
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_dir():
        return Path(xdg) / "gputel"
    return Path(f"/tmp/gputel-{os.geteuid()}")


# ---------------------------------------------------------------------------------- the table
#: The kind of value each parser takes, as ``--help`` names it (``--interval SECONDS``).
_KINDS: dict[Callable[[str], Any], str] = {
    _backend: "NAME",
    _activity: "NAME",
    _interval: "SECONDS",
    _seconds: "SECONDS",
    _pretrigger: "SECONDS",
    _percent: "PERCENT",
    _gpus: "LIST",
    _path: "PATH",
    _web_config: "PATH",
    _kmsg: "PATH",
    _address: "ADDRESS",
    _port: "PORT",
    _sim_gpus: "N",
    _sim_pattern: "PATTERN",
    _sim_events: "EVENTS",
    parse_bool: "BOOL",
}


@dataclass(frozen=True)
class SettingSpec:
    """One setting: its environment name, CLI flag, default text and meaning."""

    env: str
    attr: str
    flag: str
    default: str
    help: str
    parse: Callable[[str], Any]
    #: "agent" settings are read by gputel itself; "orchestrator" ones by the caller of the hooks;
    #: "export" ones by gputel-export.service (the command line of its ``gputel export``).
    scope: str = "agent"

    @property
    def metavar(self) -> str:
        """The kind of value the flag takes, for ``--help`` (``SECONDS``, ``PATH``, ``LIST``)."""
        return _KINDS.get(self.parse, "VALUE")


SETTINGS: tuple[SettingSpec, ...] = (
    SettingSpec(
        "GPUTEL_BACKEND",
        "backend",
        "--backend",
        "auto",
        "GPU source: auto (NVML if loadable, else nvidia-smi if it runs, else none), nvml, smi, "
        "sim, none",
        _backend,
    ),
    SettingSpec(
        "GPUTEL_INTERVAL",
        "interval_s",
        "--interval",
        "1",
        "seconds between ticks (agent poll and recorder sample)",
        _interval,
    ),
    SettingSpec(
        "GPUTEL_START_UTIL",
        "start_util_pct",
        "--start-util",
        "20",
        "start telemetry when utilization >= this percentage ...",
        _percent,
    ),
    SettingSpec(
        "GPUTEL_START_SECONDS",
        "start_seconds",
        "--start-seconds",
        "5",
        "... continuously for this many seconds",
        _seconds,
    ),
    SettingSpec(
        "GPUTEL_STOP_UTIL",
        "stop_util_pct",
        "--stop-util",
        "10",
        "stop telemetry when utilization < this percentage ...",
        _percent,
    ),
    SettingSpec(
        "GPUTEL_STOP_SECONDS",
        "stop_seconds",
        "--stop-seconds",
        "15",
        "... continuously for this many seconds",
        _seconds,
    ),
    SettingSpec(
        "GPUTEL_GPUS",
        "gpus",
        "--gpus",
        "all",
        "GPU indices that count for activity and are recorded (e.g. 0,1)",
        _gpus,
    ),
    SettingSpec(
        "GPUTEL_LOG_DIR",
        "log_dir",
        "--log-dir",
        "/var/log/gputel",
        "directory for the CSV files",
        _path,
    ),
    SettingSpec(
        "GPUTEL_RUN_DIR",
        "run_dir",
        "--run-dir",
        "",
        "control socket and runtime state (default /run/gputel as root, "
        "$XDG_RUNTIME_DIR/gputel or /tmp/gputel-UID otherwise)",
        _path,
    ),
    SettingSpec(
        "GPUTEL_EXPORTER_ADDR",
        "exporter_addr",
        "--exporter-addr",
        "0.0.0.0",
        "address that serves Prometheus /metrics",
        _address,
    ),
    SettingSpec(
        "GPUTEL_EXPORTER_PORT",
        "exporter_port",
        "--exporter-port",
        "9118",
        "port that serves Prometheus /metrics (0 disables it)",
        _port,
    ),
    SettingSpec(
        "GPUTEL_WEB_CONFIG",
        "web_config",
        "--web-config",
        "",
        "TLS and basic auth for /metrics: a web config file as node_exporter's "
        "(empty = plain HTTP)",
        _web_config,
    ),
    SettingSpec(
        "GPUTEL_SYSFS_ROOT",
        "sysfs_root",
        "--sysfs-root",
        "/sys",
        "root for powercap (RAPL) and hwmon reads",
        _path,
    ),
    SettingSpec(
        "GPUTEL_PROC_ROOT",
        "proc_root",
        "--proc-root",
        "/proc",
        "root for process -> job attribution reads (the host's procfs)",
        _path,
    ),
    SettingSpec(
        "GPUTEL_POD_LOGS_DIR",
        "pod_logs_dir",
        "--pod-logs-dir",
        "/var/log/pods",
        "kubelet pod log directories (NAMESPACE_POD_UID): names for k8s-<uid> jobs",
        _path,
    ),
    SettingSpec(
        "GPUTEL_SIM_GPUS",
        "sim_gpus",
        "--sim-gpus",
        "2",
        "simulated GPU count (backend sim)",
        _sim_gpus,
    ),
    SettingSpec(
        "GPUTEL_SIM_PATTERN",
        "sim_pattern",
        "--sim-pattern",
        "0:5,80:20,0:30",
        "simulated utilization timeline: UTIL:SECONDS,... ; ';' per GPU",
        _sim_pattern,
    ),
    SettingSpec(
        "GPUTEL_SIM_EVENTS",
        "sim_events",
        "--sim-events",
        "",
        "simulated GPU events GPU:XID@SECONDS,... (e.g. 0:79@12: GPU 0 Xid 79 at 12 s)",
        _sim_events,
    ),
    SettingSpec(
        "GPUTEL_ACTIVITY",
        "activity",
        "--activity",
        "utilization",
        "activity signal: utilization (any kernel running, every GPU), or sm (GPM SM activity "
        "where the GPU has it, else its utilization)",
        _activity,
    ),
    SettingSpec(
        "GPUTEL_EVENT_CAPTURE_SECONDS",
        "event_capture_s",
        "--event-capture-seconds",
        "300",
        "seconds telemetry is forced on after a GPU event (0 = off)",
        _seconds,
    ),
    SettingSpec(
        "GPUTEL_KMSG",
        "kmsg",
        "--kmsg",
        "/dev/kmsg",
        "kernel log read for the driver's Xid and SXid lines (empty = off; a plain file is "
        "followed from its end)",
        _kmsg,
    ),
    SettingSpec(
        "GPUTEL_PRETRIGGER_SECONDS",
        "pretrigger_s",
        "--pretrigger-seconds",
        "30",
        "seconds of readings kept in memory and written at the head of each session (0 = off)",
        _pretrigger,
    ),
    SettingSpec(
        "GPUTEL_EXPORT_DIR",
        "export_dir",
        "",
        "/var/lib/gputel/parquet",
        "for gputel-export.timer: the Parquet dataset the recorded CSVs are exported to",
        _path,
        scope="export",
    ),
    SettingSpec(
        AUTOSTART_ENV,
        "autostart",
        "",
        "",
        "in the orchestrator's environment: 1/true/yes/on enables the hook API",
        parse_bool,
        scope="orchestrator",
    ),
)

SETTINGS_BY_ATTR = {s.attr: s for s in SETTINGS}


DEFAULTS: dict[str, Any] = {
    s.attr: s.parse(s.default) for s in SETTINGS if s.scope == "agent" and s.attr != "run_dir"
}
"""Each setting's default value, parsed from the table: the one home of every default.

The run directory alone has no fixed default: it depends on who runs (``default_run_dir``).
"""


@dataclass(frozen=True)
class Settings:
    """Validated settings; build with :func:`load_settings`."""

    backend: str = DEFAULTS["backend"]
    interval_s: float = DEFAULTS["interval_s"]
    start_util_pct: float = DEFAULTS["start_util_pct"]
    start_seconds: float = DEFAULTS["start_seconds"]
    stop_util_pct: float = DEFAULTS["stop_util_pct"]
    stop_seconds: float = DEFAULTS["stop_seconds"]
    gpus: tuple[int, ...] | None = DEFAULTS["gpus"]
    log_dir: Path = DEFAULTS["log_dir"]
    run_dir: Path = field(default_factory=default_run_dir)
    exporter_addr: str = DEFAULTS["exporter_addr"]
    exporter_port: int = DEFAULTS["exporter_port"]
    web_config: str = DEFAULTS["web_config"]
    sysfs_root: Path = DEFAULTS["sysfs_root"]
    proc_root: Path = DEFAULTS["proc_root"]
    pod_logs_dir: Path = DEFAULTS["pod_logs_dir"]
    sim_gpus: int = DEFAULTS["sim_gpus"]
    sim_pattern: str = DEFAULTS["sim_pattern"]
    sim_events: str = DEFAULTS["sim_events"]
    activity: str = DEFAULTS["activity"]
    event_capture_s: float = DEFAULTS["event_capture_s"]
    kmsg: str = DEFAULTS["kmsg"]
    pretrigger_s: float = DEFAULTS["pretrigger_s"]

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        out: dict[str, str] = {}
        for spec in SETTINGS:
            if spec.scope != "agent":
                continue
            value = getattr(self, spec.attr)
            if value is None:
                text = "all"
            elif isinstance(value, tuple):
                text = ",".join(str(v) for v in value)
            else:
                text = str(value)
            out[spec.env] = text
        return out


def threshold_problem(
    start_util_pct: float, start_seconds: float, stop_util_pct: float, stop_seconds: float
) -> tuple[str, str] | None:
    """The rule between the activity thresholds: ``(setting attr, why)`` when broken, else None.

    Checked here for the settings and by ``states.Thresholds`` for any other source of
    thresholds (``gputel replay --sweep``).
    """
    if stop_util_pct > start_util_pct:
        return (
            "stop_util_pct",
            f"must not exceed GPUTEL_START_UTIL ({start_util_pct:g}): "
            "telemetry would start and stop on the same reading",
        )
    for attr, seconds in (("start_seconds", start_seconds), ("stop_seconds", stop_seconds)):
        if seconds < 0:
            return attr, "must be >= 0"
    return None


def _check_consistency(values: dict[str, Any], sources: dict[str, str]) -> None:
    problem = threshold_problem(
        values["start_util_pct"],
        values["start_seconds"],
        values["stop_util_pct"],
        values["stop_seconds"],
    )
    if problem is not None:
        attr, why = problem
        raise SettingsError(SETTINGS_BY_ATTR[attr].env, sources[attr], why)


def _check_pretrigger(values: dict[str, Any], sources: dict[str, str]) -> None:
    seconds, interval = values["pretrigger_s"], values["interval_s"]
    if seconds > 0 and seconds / interval > MAX_PRETRIGGER_TICKS:
        raise SettingsError(
            SETTINGS_BY_ATTR["pretrigger_s"].env,
            sources["pretrigger_s"],
            f"covers more than {MAX_PRETRIGGER_TICKS} ticks of GPUTEL_INTERVAL={interval:g}; "
            f"use at most {MAX_PRETRIGGER_TICKS * interval:g} seconds or a longer interval",
        )


def _check_sim_events(values: dict[str, Any], sources: dict[str, str]) -> None:
    if values["backend"] != "sim":
        return
    try:
        parse_sim_events(values["sim_events"], gpu_count=values["sim_gpus"])
    except SimEventsError as exc:
        raise SettingsError(
            SETTINGS_BY_ATTR["sim_events"].env, sources["sim_events"], str(exc)
        ) from None


def load_settings(
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, str | None] | None = None,
) -> Settings:
    """Read settings from ``env`` (default ``os.environ``), then apply ``overrides``.

    ``overrides`` maps attribute names (``interval_s``) to the raw flag text; ``None`` means the
    flag was not given. Every value is validated; the first bad one raises SettingsError.
    """
    env = os.environ if env is None else env
    overrides = overrides or {}
    values: dict[str, Any] = {}
    raw: dict[str, str] = {}
    for spec in SETTINGS:
        if spec.scope != "agent":
            continue
        text = overrides.get(spec.attr)
        name = spec.flag if text is not None else spec.env
        if text is None:
            text = env.get(spec.env)
        if text is None or (text == "" and spec.attr != "gpus"):
            if spec.attr == "run_dir":
                values[spec.attr] = default_run_dir(env)
                raw[spec.attr] = str(values[spec.attr])
                continue
            text = spec.default
            name = spec.env
        try:
            values[spec.attr] = spec.parse(text)
        except ValueError as exc:
            label = spec.env if name == spec.env else f"{spec.flag} ({spec.env})"
            raise SettingsError(label, text, str(exc)) from None
        raw[spec.attr] = text
    _check_consistency(values, raw)
    _check_pretrigger(values, raw)
    _check_sim_events(values, raw)
    return Settings(**values)


# ---------------------------------------------------------------------------------- at start
def _missing_dir_problem(path: Path) -> str | None:
    """Why ``path`` (missing) can never be created, or None when it can be."""
    parent = path.parent
    while True:
        try:
            st = parent.stat()
        except FileNotFoundError:
            if parent == parent.parent:
                return None
            parent = parent.parent
            continue
        except NotADirectoryError:
            parent = parent.parent
            continue
        except OSError as exc:
            return f"cannot be created: {parent}: {exc.strerror}"
        if not stat.S_ISDIR(st.st_mode):
            return f"cannot be created: {parent} is not a directory"
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"cannot be created: {parent} is not writable by this user"
        return None


def _dir_problem(path: Path, *, may_create: bool) -> str | None:
    """Why ``path`` can never serve as the directory, or None."""
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        if not may_create:
            return "no such directory"
        return _missing_dir_problem(path)
    except OSError as exc:
        return f"cannot be used: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return "exists and is not a directory"
    return None


def check_for_start(settings: Settings) -> None:
    """Refuse what can never work, before the agent or recorder touches anything (SettingsError,
    exit 2): a log or run directory that is not a directory and cannot be created, and a
    sysfs or proc root that is not an existing directory. Creates nothing.

    An existing directory that is not writable now is accepted: permissions and mounts are
    fixed while the service runs, and rows lost meanwhile are counted (``gputel status``).
    """
    checks = (
        ("log_dir", settings.log_dir, True),
        ("run_dir", settings.run_dir, True),
        ("sysfs_root", settings.sysfs_root, False),
        ("proc_root", settings.proc_root, False),
    )
    for attr, path, may_create in checks:
        problem = _dir_problem(Path(path), may_create=may_create)
        if problem is not None:
            raise SettingsError(SETTINGS_BY_ATTR[attr].env, str(path), problem)


def autostart_enabled(env: Mapping[str, str] | None = None) -> bool:
    """Whether ``GPU_TELEMETRY_AUTOSTART`` is true in the caller's environment (junk is false)."""
    env = os.environ if env is None else env
    return env.get(AUTOSTART_ENV, "").strip().lower() in TRUE_WORDS
