"""The exported dataset read by Apache Spark (local mode) and by the DuckDB query of
docs/analysis.md: the same rows as the CSVs, the same per-node energy and busy GPU-hours as
``gputel report --json``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest

from exportcheck import csv_rows
from test_export_e2e import export, finish, gputel, record_session

# PySpark checks the pandas version on import; the test uses no pandas API of it.
pytestmark = pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas")

DOCS = Path(__file__).resolve().parent.parent / "docs" / "analysis.md"


def doc_query(name: str) -> str:
    """The code block after ``<!-- query: NAME -->`` in docs/analysis.md."""
    m = re.search(rf"<!-- query: {name} -->\n```\w+\n(.*?)```", DOCS.read_text(), re.DOTALL)
    assert m, name
    return m.group(1)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two nodes' logs collected into one tree, each a real agent session (an allocation, an
    Xid, processes) at a different load; the recorder names files after the machine, so each
    log is filed under a node name as a collecting rsync would."""
    root = tmp_path_factory.mktemp("fleet")
    for node, pattern in (("node-a", "90:600"), ("node-b", "40:600")):
        tmp = root / f"rec-{node}"
        agent = record_session(tmp, f"job-{node}", GPUTEL_SIM_PATTERN=pattern)
        finish(agent, f"job-{node}")
        dest = root / "logs" / node
        dest.mkdir(parents=True)
        for f in agent.log_dir.iterdir():
            dest.joinpath(re.sub(r"Z-[^.]+\.csv$", f"Z-{node}.csv", f.name)).write_bytes(
                f.read_bytes()
            )
        shutil.rmtree(tmp)
    return root / "logs"


@pytest.fixture(scope="module")
def dataset(fleet: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "parquet"
    export(None, out, fleet)
    return out


@pytest.fixture(scope="module")
def report(fleet: Path) -> dict[str, Any]:
    res = gputel(None, "report", "--json", str(fleet))
    assert res.returncode == 0, res.stderr
    return dict(json.loads(res.stdout))


def per_node_reference(report: dict[str, Any]) -> dict[str, tuple[float, float]]:
    return {n["node"]: (n["energy_kwh"], n["gpu_hours_busy"]) for n in report["nodes"]}


def close(got: dict[str, tuple[float, float]], want: dict[str, tuple[float, float]]) -> None:
    assert got.keys() == want.keys()
    for node, (kwh, busy) in want.items():
        assert got[node][0] == pytest.approx(kwh, abs=2e-6), node
        # The report estimates the interval from fewer spacings; hours are rounded to 0.001.
        assert got[node][1] == pytest.approx(busy, abs=1.5e-3), node


def test_docs_duckdb_query_gives_the_report_per_node_figures(
    dataset: Path, report: dict[str, Any]
) -> None:
    con = duckdb.connect()
    rows = con.execute(doc_query("duckdb-node-energy").replace("'OUT/", f"'{dataset}/")).fetchall()
    close({r[0]: (r[1], r[2]) for r in rows}, per_node_reference(report))
    assert all(r[1] > 0 for r in rows)


@pytest.fixture(scope="module")
def spark() -> Iterator[Any]:
    if shutil.which("java") is None:
        pytest.skip("no Java runtime (scripts/setup-dev.sh installs default-jre-headless)")
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[1]")
        .appName("gputel-test")
        .config("spark.driver.memory", "512m")
        .config("spark.ui.enabled", "false")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", "2")
        .getOrCreate()
    )
    try:
        yield session
    finally:
        session.stop()
        _stop_jvm()


def _stop_jvm() -> None:
    """End the JVM now rather than when this (pytest worker) process exits: no Java process
    outlives the test."""
    from pyspark import SparkContext

    gateway = SparkContext._gateway
    if gateway is None:
        return
    proc = getattr(gateway, "proc", None)
    gateway.shutdown()
    SparkContext._gateway = None
    SparkContext._jvm = None
    if proc is not None:
        # The JVM's gateway server exits when its standard input closes.
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(300)
def test_spark_reads_every_row_and_the_report_per_node_energy(
    spark: Any, fleet: Path, dataset: Path, report: dict[str, Any]
) -> None:
    expected = csv_rows([fleet])
    for kind, (_, rows) in expected.items():
        if not rows:
            continue
        df = spark.read.option("mergeSchema", "true").parquet(str(dataset / kind))
        assert df.count() == sum(rows.values()), kind
        if kind == "gpu":
            fields = {f.name: f.dataType.simpleString() for f in df.schema.fields}
            assert fields["timestamp"] == "timestamp" and fields["session"] == "string"
            assert fields["clock_event_reasons"] == "bigint" and fields["energy_j"] == "double"
    # GPU rows and events per node as the report counts them.
    gpu = spark.read.parquet(str(dataset / "gpu"))
    rows_per_node = {r["node"]: r["count"] for r in gpu.groupBy("node").count().collect()}
    samples = {}
    for s in report["sessions"]:
        samples[s["host"]] = samples.get(s["host"], 0) + sum(g["samples"] for g in s["gpus"])
    assert rows_per_node == samples
    events = spark.read.parquet(str(dataset / "events"))
    assert {r["node"]: r["count"] for r in events.groupBy("node").count().collect()} == {
        n["node"]: n["events"] for n in report["nodes"]
    }
    # The docs' PySpark program, as written, on this dataset.
    scope: dict[str, Any] = {}
    exec(doc_query("pyspark-node-energy").replace('"OUT/', f'"{dataset}/'), scope)
    got = {r["node"]: (r["energy_kwh"], r["busy_gpu_hours"]) for r in scope["per_node"].collect()}
    close(got, per_node_reference(report))
