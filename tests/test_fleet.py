"""Fleet assets: alert and recording rules, Grafana dashboard, scrape and collector configs,
Kubernetes manifests.

The rules are checked and unit-tested with promtool; every manifest parses; every ``gputel_*``
name they use is one gputel exports; and a real Prometheus on loopback scrapes a running agent on
simulated GPUs, answers every dashboard query and evaluates every rule.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fakeproc import add_kthreadd, add_process
from gputel.schema import CLOCK_EVENT_REASONS, GPU_FIELDS, HOST_FIELDS, HWMON_METRIC
from gputel.sources.sim import SIM_PID_BASE
from gputel.supervisor.events import EVENT_NAMES
from gputel.supervisor.events import METRICS as EVENT_METRICS
from gputel.supervisor.xid import XID_TABLE

ROOT = Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "contrib"
RULES = CONTRIB / "prometheus" / "gputel.rules.yml"
RULES_TEST = CONTRIB / "prometheus" / "gputel.rules.test.yml"
PROM_CONFIG = CONTRIB / "prometheus" / "prometheus.yml"
FILE_SD = CONTRIB / "prometheus" / "targets" / "gputel.yml"
DASHBOARD = CONTRIB / "grafana" / "gputel.json"
COLLECTOR = CONTRIB / "otel" / "collector.yaml"
DAEMONSET = CONTRIB / "kubernetes" / "daemonset.yaml"
PODMONITOR = CONTRIB / "kubernetes" / "podmonitor.yaml"
FLEET_DOC = ROOT / "docs" / "fleet.md"
YAML_FILES = (RULES, RULES_TEST, PROM_CONFIG, FILE_SD, COLLECTOR, DAEMONSET, PODMONITOR)
#: Every file whose gputel_* names must be names gputel exports.
NAME_CHECKED = (*YAML_FILES, DASHBOARD, FLEET_DOC)

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
PORT = 9118

# ---------------------------------------------------------------------------------------------
# What gputel exports besides the field table (GPU_FIELDS / HOST_FIELDS / HWMON_METRIC), and the
# values of their labels. The one list these tests compare the fleet assets against; the live
# test checks it against a real /metrics.
RECORDER_METRICS = frozenset(
    {
        "gputel_gpu_lost",
        "gputel_gpu_read_stuck",
        "gputel_gpu_field_errors_total",
        "gputel_gpu_clock_event_reason_active",
        "gputel_gpu_allocation_memory_used_bytes",
        "gputel_gpu_allocation_sm_util_ratio",
        "gputel_allocation_info",
        "gputel_source_up",
        "gputel_source_duration_seconds",
        "gputel_ticks_missed_total",
        "gputel_csv_rows_failed_total",
        "gputel_recorder_ticks_total",
        "gputel_recorder_last_sample_timestamp_seconds",
    }
)
AGENT_METRICS = frozenset(
    {
        "gputel_telemetry_active",
        "gputel_agent_state",
        "gputel_agent_mode",
        "gputel_agent_transitions_total",
        "gputel_agent_child_restarts_total",
        "gputel_agent_child_restart_seconds_total",
        "gputel_agent_child_up",
        "gputel_agent_allocations_open",
        "gputel_agent_gpu_read_degraded",
        "gputel_agent_gpu_read_stuck",
        "gputel_agent_poll_duration_seconds",
        "gputel_agent_info",
        "gputel_agent_start_time_seconds",
        "gputel_file_rows_failed_total",
        "gputel_file_write_failing",
    }
)
LABEL_VALUES = {
    "reason": frozenset(name for _bit, name in CLOCK_EVENT_REASONS) | {"crash", "hung"},
    "source": frozenset({"nvml", "sim", "none", "host", "rapl", "hwmon"}),
    "state": frozenset({"idle", "arming", "active", "cooling"}),
    "mode": frozenset({"auto", "on", "off"}),
    "backend": frozenset({"nvml", "sim", "none"}),
    "event": frozenset(EVENT_NAMES),
    "xid": frozenset(str(x) for x in XID_TABLE),
}
#: Exported names a running agent on simulated GPUs may legitimately not show.
ABSENT_ON_SIM = {
    "gputel_gpu_fan_speed_ratio": "simulated boards are passively cooled (no fan)",
    "gputel_gpu_field_errors_total": "only once a field read fails (never on simulated GPUs)",
}
# ---------------------------------------------------------------------------------------------


def exported_metrics() -> frozenset[str]:
    table = {f.metric for f in (*GPU_FIELDS, *HOST_FIELDS) if f.metric}
    return frozenset(table | {HWMON_METRIC}) | RECORDER_METRICS | AGENT_METRICS | set(EVENT_METRICS)


def load_rules() -> list[dict[str, Any]]:
    return [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]


def alerts() -> list[dict[str, Any]]:
    return [r for r in load_rules() if "alert" in r]


def recording_rule_names() -> set[str]:
    return {r["record"] for r in load_rules() if "record" in r}


def names_used(text: str) -> tuple[set[str], set[str]]:
    """(gputel_* metric names, level:gputel_*:ops recording rule names) appearing in ``text``."""
    metrics: set[str] = set()
    recorded: set[str] = set()
    for token in re.findall(r"[A-Za-z0-9_:]+", text):
        if re.fullmatch(r"[a-z_]+:gputel_[a-z0-9_]+:[a-z0-9_]+", token):
            recorded.add(token)
        elif token.startswith("gputel_") and not token.endswith("_"):
            metrics.add(token)
    return metrics, recorded


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if not Path(PROMTOOL).exists():
        pytest.skip(
            "promtool not installed (Debian package prometheus; scripts/test.sh installs it)"
        )
    return subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=RULES.parent
    )


# --- promtool ------------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    res = run_promtool("check", "rules", str(RULES))
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_test_rules() -> None:
    res = run_promtool("test", "rules", str(RULES_TEST))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout + res.stderr


def test_promtool_check_example_config() -> None:
    res = run_promtool("check", "config", str(PROM_CONFIG))
    assert res.returncode == 0, res.stdout + res.stderr


# --- parsing and names -------------------------------------------------------------------------


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs


def test_dashboard_json_parses() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["panels"]


@pytest.mark.parametrize("path", NAME_CHECKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_only_exported_metric_names_are_used(path: Path) -> None:
    metrics, recorded = names_used(path.read_text())
    unknown = metrics - exported_metrics()
    assert not unknown, f"{path.name} uses names gputel does not export: {sorted(unknown)}"
    undefined = recorded - recording_rule_names()
    assert not undefined, (
        f"{path.name} uses recording rules that gputel.rules.yml lacks: {undefined}"
    )


def test_recording_rules_are_built_from_exported_metrics() -> None:
    for name in recording_rule_names():
        base = name.split(":")[1]
        assert base in exported_metrics() or f"{base}_total" in exported_metrics(), name


@pytest.mark.parametrize(
    "path", (RULES, DASHBOARD, FLEET_DOC), ids=lambda p: str(p.relative_to(ROOT))
)
def test_label_values_in_matchers_are_ones_gputel_sets(path: Path) -> None:
    text = path.read_text().replace('\\"', '"')
    for label, op, value in re.findall(
        r"\b(reason|source|state|mode|backend|event|xid)\s*(=~|=|!=)\s*\"([^\"]*)\"", text
    ):
        for alternative in value.split("|"):
            assert alternative in LABEL_VALUES[label], f"{path.name}: {label}{op}{value!r}"


# --- alert rules ---------------------------------------------------------------------------


def test_every_alert_has_severity_summary_and_description() -> None:
    names = [a["alert"] for a in alerts()]
    assert len(names) == len(set(names))
    for a in alerts():
        assert a["labels"]["severity"] in {"critical", "warning", "info"}, a["alert"]
        assert a["annotations"]["summary"] and a["annotations"]["description"], a["alert"]


def test_fired_alerts_name_the_node_and_gpu() -> None:
    """promtool checks the rendered annotations in the unit tests; these name node and GPU."""
    for case in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            for exp in check.get("exp_alerts") or []:
                labels, ann = exp["exp_labels"], exp["exp_annotations"]
                for text in (ann["summary"], ann["description"]):
                    if "instance" in labels:
                        assert labels["instance"] in text, (check["alertname"], text)
                    if "gpu" in labels:
                        assert f"GPU {labels['gpu']}" in text, (check["alertname"], text)
                if "uuid" in labels:
                    assert labels["uuid"] in ann["description"], check["alertname"]


def test_issue_alerts_are_present() -> None:
    exprs = {a["alert"]: a["expr"] for a in alerts()}
    wanted = {
        "temperature high": ("gputel_gpu_temperature_celsius", "warning"),
        "temperature critical": ("gputel_gpu_temperature_celsius", "critical"),
        "thermal throttling": ("thermal_slowdown", None),
        "power throttling": ("sw_power_cap", None),
        "GPU lost": ("gputel_gpu_lost", "critical"),
        "ECC corrected": ("gputel_gpu_ecc_corrected_errors_total", None),
        "ECC uncorrected": ("gputel_gpu_ecc_uncorrected_errors_total", "critical"),
        "power near limit": ("gputel_gpu_power_limit_watts", None),
        "RAPL drop": ("gputel_host_cpu_package_power_watts", None),
        "agent down": ('up{job="gputel"} == 0', None),
        "child restarting": ("gputel_agent_child_restarts_total", None),
        "ticks missed": ("gputel_ticks_missed_total", None),
        "CSV rows failing": ("gputel_csv_rows_failed_total", None),
        "GPU source down": ("gputel_source_up", None),
        "Xid needing a drain": ("gputel_gpu_xid_errors_total", "critical"),
        "Xid needing a reset": ("gputel_gpu_xid_errors_total", "warning"),
        "double-bit ECC event": ("ecc_dbe", "critical"),
    }
    severities = {a["alert"]: a["labels"]["severity"] for a in alerts()}
    for what, (needle, severity) in wanted.items():
        matching = [name for name, expr in exprs.items() if needle in expr]
        assert matching, f"no alert for {what}"
        if severity:
            assert severity in {severities[n] for n in matching}, what


def test_no_alert_fires_on_telemetry_off_alone() -> None:
    """Telemetry off is gputel_telemetry_active == 0, never an alert by itself."""
    for a in alerts():
        expr = " ".join(a["expr"].split())
        if "gputel_telemetry_active == 0" in expr:
            assert " and " in expr, a["alert"]


def test_every_alert_has_firing_and_quiet_unit_tests() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names - fired == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested not firing"


# --- dashboard -----------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(dash: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL with variables) for every panel target and query variable."""
    for panel in panels(dash):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
            assert m, query
            yield f"variable {var['name']}", m.group(1)


def test_dashboard_is_importable_with_a_datasource_variable() -> None:
    dash = dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    assert {"instance", "gpu"} <= variables.keys()
    assert variables["instance"]["multi"] and variables["instance"]["includeAll"]
    assert variables["gpu"]["multi"] and variables["gpu"]["includeAll"]
    assert "id" not in dash or dash["id"] is None
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids))
    text = DASHBOARD.read_text()
    for uid in re.findall(r'"uid":\s*"([^"]*)"', text):
        assert uid in {"${datasource}", "-- Grafana --", dash["uid"]}, uid
    for panel in panels(dash):
        assert {"x", "y", "w", "h"} <= panel["gridPos"].keys()
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_dashboard_covers_the_fleet_views() -> None:
    exprs = " ".join(expr for _title, expr in dashboard_queries(dashboard()))
    for needle in (
        "gputel_gpu_utilization_ratio",
        "gputel_gpu_memory_used_bytes",
        "gputel_gpu_power_watts",
        "gputel_gpu_energy_joules_total",
        "gputel_gpu_temperature_celsius",
        "gputel_gpu_sm_clock_hertz",
        "gputel_gpu_clock_event_reason_active",
        "gputel_gpu_pcie_rx_bytes_per_second",
        "gputel_host_cpu_utilization_ratio",
        "gputel_host_cpu_package_power_watts",
        "gputel_telemetry_active",
        "gputel_agent_allocations_open",
        "gputel_agent_child_restarts_total",
        "gputel_gpu_xid_errors_total",
        "gputel_gpu_events_total",
        'up{job=~"$job"',
        'instance=~"$instance"',
        'gpu=~"$gpu"',
    ):
        assert needle in exprs, needle


# --- collector and Kubernetes --------------------------------------------------------------


def test_otel_collector_scrapes_gputel_and_exports_otlp() -> None:
    cfg = yaml.safe_load(COLLECTOR.read_text())
    jobs = cfg["receivers"]["prometheus"]["config"]["scrape_configs"]
    assert [j["job_name"] for j in jobs] == ["gputel"]
    assert all(t.endswith(f":{PORT}") for t in jobs[0]["static_configs"][0]["targets"])
    pipeline = cfg["service"]["pipelines"]["metrics"]
    assert pipeline["receivers"] == ["prometheus"]
    assert any(e.split("/")[0] == "otlp" for e in pipeline["exporters"])
    for name in (*pipeline["processors"], *pipeline["exporters"]):
        assert name in {**cfg["processors"], **cfg["exporters"]}, name


def test_example_scrape_config_uses_job_gputel_and_port() -> None:
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    (job,) = cfg["scrape_configs"]
    assert job["job_name"] == "gputel"
    assert job["static_configs"] and job["file_sd_configs"]
    assert all(t.endswith(f":{PORT}") for t in job["static_configs"][0]["targets"])
    groups = yaml.safe_load(FILE_SD.read_text())
    assert all(t.endswith(f":{PORT}") for g in groups for t in g["targets"])


def test_daemonset_runs_the_agent_in_the_foreground_on_gpu_nodes() -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all(DAEMONSET.read_text())}
    pod = docs["DaemonSet"]["spec"]["template"]
    spec = pod["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert spec["runtimeClassName"] == "nvidia"
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(PORT)
    (container,) = spec["containers"]
    assert container["command"] == ["gputel", "agent"]
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert {"containerPort": PORT, "name": "metrics", "protocol": "TCP"} in container["ports"]
    env = {e["name"]: e["value"] for e in container["env"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    run_mount = mounts[env["GPUTEL_RUN_DIR"]]
    assert "emptyDir" in volumes[run_mount["name"]]
    log_mount = mounts[env["GPUTEL_LOG_DIR"]]
    assert volumes[log_mount["name"]]["hostPath"]["path"] == "/var/log/gputel"
    sys_mount = mounts[env["GPUTEL_SYSFS_ROOT"]]
    assert volumes[sys_mount["name"]]["hostPath"]["path"] == "/sys"
    assert sys_mount["readOnly"] is True
    assert env["GPUTEL_EXPORTER_PORT"] == str(PORT)
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    pods_mount = mounts[env["GPUTEL_POD_LOGS_DIR"]]
    assert volumes[pods_mount["name"]]["hostPath"]["path"] == "/var/log/pods"
    assert pods_mount["readOnly"] is True


def test_namespace_admits_host_mounts_and_the_priority_class_is_its_own() -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all(DAEMONSET.read_text())}
    labels = docs["Namespace"]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"
    spec = docs["DaemonSet"]["spec"]["template"]["spec"]
    # system-node-critical is refused outside kube-system on some clusters.
    assert spec["priorityClassName"] == docs["PriorityClass"]["metadata"]["name"]
    assert not spec["priorityClassName"].startswith("system-")
    assert 0 < docs["PriorityClass"]["value"] <= 1_000_000_000  # user classes' limit


def test_manifests_validate_against_the_kubernetes_schemas() -> None:
    """kubernetes-validate's bundled (offline) schemas, strict: unknown fields are errors."""
    validate = shutil.which("kubernetes-validate") or str(
        Path(sys.executable).with_name("kubernetes-validate")
    )
    if not Path(validate).exists():
        pytest.skip("kubernetes-validate not installed (pip install -e '.[test]')")
    out = subprocess.run(
        [validate, "--strict", "--no-warn", str(DAEMONSET)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    kinds = {d["kind"] for d in yaml.safe_load_all(DAEMONSET.read_text())}
    assert out.stdout.count(" passed for resource ") == len(kinds), out.stdout


def test_image_is_pinned_by_digest_and_the_context_excludes_virtualenvs() -> None:
    dockerfile = (CONTRIB / "kubernetes" / "Dockerfile").read_text()
    (base,) = [line for line in dockerfile.splitlines() if line.startswith("FROM ")]
    assert re.fullmatch(r"FROM python:[0-9.]+-slim@sha256:[0-9a-f]{64}", base), base
    assert "docker buildx imagetools inspect" in dockerfile  # how to bump it
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    for pattern in (".venv*", ".git", "**/__pycache__", ".pytest_cache", ".mypy_cache"):
        assert pattern in ignored


def test_podmonitor_selects_the_daemonset_pods_as_job_gputel() -> None:
    ds = next(d for d in yaml.safe_load_all(DAEMONSET.read_text()) if d["kind"] == "DaemonSet")
    pm = yaml.safe_load(PODMONITOR.read_text())
    assert pm["kind"] == "PodMonitor"
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pm["metadata"]["namespace"] == ds["metadata"]["namespace"]
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    assert {"targetLabel": "job", "replacement": "gputel"} in endpoint["relabelings"]


# --- a real Prometheus scraping a running agent ----------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def fake_sysfs(root: Path) -> None:
    """One RAPL package with a DRAM subzone and one coretemp chip, so host panels have data."""
    zones = {
        "intel-rapl:0": "package-0",
        "intel-rapl:0:0": "dram",
    }
    for zone, name in zones.items():
        d = root / "class" / "powercap" / zone
        d.mkdir(parents=True)
        (d / "name").write_text(f"{name}\n")
        (d / "energy_uj").write_text("123456789\n")
        (d / "max_energy_range_uj").write_text("262143328850\n")
    chip = root / "class" / "hwmon" / "hwmon0"
    chip.mkdir(parents=True)
    (chip / "name").write_text("coretemp\n")
    (chip / "temp1_input").write_text("45000\n")
    (chip / "temp1_label").write_text("Package id 0\n")


def substitute(expr: str, values: dict[str, str]) -> str:
    def repl(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        assert name in values, f"dashboard uses an unknown variable ${name}"
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", repl, expr)


def stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


class Prom:
    def __init__(self, base: str) -> None:
        self.base = base

    def api(self, path: str, **params: str) -> dict[str, Any]:
        url = f"{self.base}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        _status, body = http_get(url, timeout=5)
        return json.loads(body)

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr)

    def value(self, expr: str) -> float | None:
        res = self.query(expr)
        if res.get("status") != "success" or not res["data"]["result"]:
            return None
        return float(res["data"]["result"][0]["value"][1])


#: Panels that may stay empty on a healthy node with simulated GPUs.
EMPTY_PANELS_OK = {
    "Fan speed": "simulated boards are passively cooled (no fan)",
}


@pytest.mark.timeout(90)
def test_prometheus_scrapes_agent_dashboard_queries_and_rules_work(tmp_path: Path) -> None:
    if not Path(PROMETHEUS).exists():
        pytest.skip(
            "prometheus not installed (Debian package prometheus; scripts/test.sh installs it)"
        )

    sysfs = tmp_path / "sys"
    fake_sysfs(sysfs)
    # The simulated GPUs' processes (two per busy GPU) belong to Slurm job 4242 in a fake /proc,
    # so the recorder detects the job and the per-allocation series and info have data.
    proc_root = tmp_path / "proc"
    add_kthreadd(proc_root)
    for n in range(4):
        add_process(
            proc_root,
            SIM_PID_BASE + n,
            cgroup="0::/system.slice/slurmstepd.scope/job_4242/step_0/user/task_0",
            uid=0,
        )
    agent_port, prom_port = free_port(), free_port()
    env = {
        **os.environ,
        "GPUTEL_BACKEND": "sim",
        "GPUTEL_SIM_GPUS": "2",
        "GPUTEL_SIM_PATTERN": "90:600",
        # One Xid 13 (an application fault): the Xid panels must show a GPU's first Xid (its
        # counter is born at 1, where increase() sees nothing), and being of class "app" it
        # raises no alert on this healthy node.
        "GPUTEL_SIM_EVENTS": "0:13@2",
        "GPUTEL_PROC_ROOT": str(proc_root),
        "GPUTEL_START_SECONDS": "0.2",
        "GPUTEL_INTERVAL": "0.2",
        "GPUTEL_LOG_DIR": str(tmp_path / "log"),
        "GPUTEL_RUN_DIR": str(tmp_path / "run"),
        "GPUTEL_SYSFS_ROOT": str(sysfs),
        "GPUTEL_EXPORTER_ADDR": "127.0.0.1",
        "GPUTEL_EXPORTER_PORT": str(agent_port),
    }
    # The example scrape config, pointed at this agent, at 1 s for a short test.
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    cfg["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    cfg["rule_files"] = [str(RULES)]
    (job,) = cfg["scrape_configs"]
    job.update(scrape_interval="1s", scrape_timeout="1s")
    job["static_configs"] = [{"targets": [f"127.0.0.1:{agent_port}"]}]
    job.pop("file_sd_configs")
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(cfg))

    agent_log = (tmp_path / "agent.log").open("wb")
    prom_log = (tmp_path / "prometheus.log").open("wb")
    agent: subprocess.Popen[bytes] | None = None
    prom: subprocess.Popen[bytes] | None = None

    def logs() -> str:
        agent_log.flush()
        prom_log.flush()
        return (
            "\n--- agent log ---\n"
            + (tmp_path / "agent.log").read_text(errors="replace")[-3000:]
            + "\n--- prometheus log ---\n"
            + (tmp_path / "prometheus.log").read_text(errors="replace")[-3000:]
        )

    try:
        agent = subprocess.Popen(
            [sys.executable, "-m", "gputel", "agent"],
            env=env,
            stdout=agent_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        prom = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prom_port}",
                "--log.level=warn",
            ],
            stdout=prom_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        p = Prom(f"http://127.0.0.1:{prom_port}")
        agent_url = f"http://127.0.0.1:{agent_port}/metrics"

        def wait_for(what: str, ok: Any, timeout: float) -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                for proc, name in ((agent, "agent"), (prom, "prometheus")):
                    assert proc is not None
                    if proc.poll() is not None:
                        pytest.fail(f"{name} exited with {proc.returncode} {logs()}")
                try:
                    if ok():
                        return
                except (OSError, ValueError, KeyError):
                    pass
                time.sleep(0.2)
            pytest.fail(f"timed out waiting for {what} {logs()}")

        wait_for(
            "telemetry to become active",
            lambda: b"\ngputel_telemetry_active 1" in http_get(agent_url)[1],
            15,
        )
        wait_for("prometheus to be ready", lambda: http_get(p.base + "/-/ready")[0] == 200, 15)
        wait_for(
            "a few scrapes with GPU series",
            lambda: (p.value("min(count_over_time(gputel_gpu_utilization_ratio[1m]))") or 0) >= 4,
            15,
        )
        wait_for(
            "the recording rules",
            lambda: p.value("count(instance:gputel_gpu_energy_joules:increase1h)") == 1,
            10,
        )

        (target,) = p.api("targets")["data"]["activeTargets"]
        assert target["health"] == "up", target
        instance = target["labels"]["instance"]

        # The exporter and this file's list agree.
        scraped = {n for n in p.api("label/__name__/values")["data"] if n.startswith("gputel_")}
        assert scraped - exported_metrics() == set(), "exported but not in the list above"
        missing = exported_metrics() - scraped - ABSENT_ON_SIM.keys()
        assert missing == set(), "listed but not exported by a running agent"

        # No gputel series has a job label of its own: "job" is only Prometheus's target label
        # (an exposed one would be stored as exported_job).
        assert p.query('count({__name__=~"gputel_.+", exported_job!=""})')["data"]["result"] == []
        assert p.query('count({__name__=~"gputel_.+", job!="gputel"})')["data"]["result"] == []
        # The info series names the detected Slurm job; PromQL joins it to per-allocation data.
        wait_for(
            "the detected Slurm job's info series",
            lambda: p.value('gputel_allocation_info{allocation="slurm-4242"}') == 1,
            15,
        )
        joined = p.query(
            'gputel_gpu_allocation_memory_used_bytes{allocation="slurm-4242"}'
            " * on(instance, allocation) group_left(kind, slurm_job, user) gputel_allocation_info"
        )["data"]["result"]
        assert {(r["metric"]["gpu"], r["metric"]["slurm_job"]) for r in joined} == {
            ("0", "4242"),
            ("1", "4242"),
        }, joined
        assert {(r["metric"]["kind"], r["metric"]["user"]) for r in joined} == {("slurm", "root")}

        # Every dashboard query is valid PromQL; every panel but the noted ones has data.
        values = {
            "job": "gputel",
            "instance": re.escape(instance).replace("\\", "\\\\"),
            "gpu": ".*",
            "datasource": "prometheus",
            "__rate_interval": "30s",
            "__interval": "5s",
            "__interval_ms": "5000",
            "__range": "1m",
        }

        def panels_without_data() -> set[str]:
            has_data: dict[str, bool] = {}
            for title, expr in dashboard_queries(dashboard()):
                query = substitute(expr, values)
                res = p.query(query)
                assert res.get("status") == "success", f"{title}: {query}: {res}"
                has_data[title] = has_data.get(title, False) or bool(res["data"]["result"])
            return {title for title, ok in has_data.items() if not ok} - EMPTY_PANELS_OK.keys()

        # Range panels over young series (a subquery's steps) may need a few more scrapes.
        deadline = time.monotonic() + 20
        while (no_data := panels_without_data()) and time.monotonic() < deadline:
            time.sleep(1)
        assert no_data == set(), "panels without data"

        # The rules load and evaluate without error; their expressions are valid PromQL.
        groups = p.api("rules")["data"]["groups"]
        assert {g["file"] for g in groups} == {str(RULES)}
        evaluated = [r for g in groups for r in g["rules"]]
        assert len(evaluated) == len(load_rules())
        for rule in evaluated:
            assert rule["health"] == "ok" and not rule.get("lastError"), rule
            assert p.query(rule["query"]).get("status") == "success", rule["name"]
        # A healthy busy node raises no alert (missed ticks can happen on a loaded test machine).
        firing = {
            a["labels"]["alertname"]
            for a in p.api("alerts")["data"]["alerts"]
            if a["state"] == "firing"
        }
        assert firing - {"GputelTicksMissed"} == set()

        # Telemetry switched off on purpose: the agent still answers, the GPU series end, and
        # no alert expression matches (the agent is not "down", no GPU alert is left over).
        stopped = subprocess.run(
            [sys.executable, "-m", "gputel", "stop"], env=env, capture_output=True, timeout=30
        )
        assert stopped.returncode == 0, stopped
        wait_for(
            "telemetry off and the GPU series gone",
            lambda: (
                p.value('gputel_telemetry_active{job="gputel"}') == 0
                and p.value("absent(gputel_gpu_utilization_ratio)") == 1
            ),
            15,
        )
        assert p.value('up{job="gputel"}') == 1
        assert p.value('gputel_agent_mode{mode="off"}') == 1
        for rule in alerts():
            if rule["alert"] != "GputelTicksMissed":
                res = p.query(rule["expr"])
                assert res["data"]["result"] == [], (rule["alert"], res)
    finally:
        stop(agent)
        stop(prom)
        agent_log.close()
        prom_log.close()
