"""Benchmark of the /metrics server: scrape latency and failures while idle clients pile up.

A child process serves a fixed exposition body with ``MetricsServer`` (plain HTTP, or TLS with
basic auth from a web config). The benchmark scrapes it sequentially, first alone, then while a
flood thread keeps hundreds of connections open (half silent, half with a request cut off
mid-header), opening 500 new ones a second. A scrape fails when it takes more than its 2 s
timeout or errors. Also reported: the server's RSS and CPU per scrape.

    python benchmarks/bench_http.py [--scrapes 300] [--flood 400] [--write docs/performance.md]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import os
import platform
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BODY = ROOT / "tests" / "golden" / "metrics.prom"
sys.path.insert(0, str(ROOT / "tests"))
from flood import Flood  # noqa: E402

SERVER = """
import sys, time
from gputel.telemetry.metrics_http import MetricsServer
body = open(sys.argv[1], "rb").read()
server = MetricsServer("127.0.0.1", 0, metrics=lambda: body, health=lambda: (True, "ok"),
                       web_config=sys.argv[2] or None)
server.start()
print(server.port, flush=True)
sys.stdin.read()
"""


@dataclass
class Result:
    name: str
    scrapes: int
    failures: int
    median_ms: float
    p99_ms: float
    max_ms: float
    cpu_ms: float
    rss_mib: float
    flood_opened: int


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scrape_all(port: int, n: int, tls: ssl.SSLContext | None, auth: str | None) -> list[float]:
    """Latency of each scrape in ms; inf for a failure. A new connection per scrape."""
    out = []
    headers = {"Authorization": auth} if auth else {}
    for _ in range(n):
        started = time.perf_counter()
        try:
            if tls is None:
                conn: http.client.HTTPConnection = http.client.HTTPConnection(
                    "127.0.0.1", port, timeout=2
                )
            else:
                conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=2, context=tls)
            conn.request("GET", "/metrics", headers=headers)
            resp = conn.getresponse()
            resp.read()
            conn.close()
            ok = resp.status == 200
        except OSError:
            ok = False
        out.append((time.perf_counter() - started) * 1000 if ok else float("inf"))
    return out


def bench(name: str, n: int, flood: int, tls_dir: Path | None) -> Result:
    config = ""
    tls = auth = None
    if tls_dir is not None:
        import bcrypt

        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1", "-subj", "/CN=localhost",
             "-keyout", str(tls_dir / "k.pem"), "-out", str(tls_dir / "c.pem"),
             "-addext", "subjectAltName=IP:127.0.0.1"],
            check=True, capture_output=True,
        )  # fmt: skip
        hashed = bcrypt.hashpw(b"pw", bcrypt.gensalt(10)).decode()
        (tls_dir / "web.yml").write_text(
            "tls_server_config: {cert_file: c.pem, key_file: k.pem}\n"
            f"basic_auth_users: {{prom: '{hashed}'}}\n"
        )
        config = str(tls_dir / "web.yml")
        tls = ssl.create_default_context(cafile=str(tls_dir / "c.pem"))
        auth = "Basic " + base64.b64encode(b"prom:pw").decode()
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(BODY), config],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        port = int(proc.stdout.readline())
        scrape_all(port, 5, tls, auth)  # warm-up (and the one bcrypt check)
        flooder = None
        if flood:
            flooder = Flood(port, flood)
            flooder.start()
            while flooder.opened < flood:
                time.sleep(0.05)
        cpu0 = cpu_s(proc.pid)
        times = scrape_all(port, n, tls, auth)
        cpu = cpu_s(proc.pid) - cpu0
        rss = rss_mib(proc.pid)
        opened = 0
        if flooder is not None:
            flooder.stop()
            opened = flooder.opened
    finally:
        proc.kill()
        proc.wait()
    good = sorted(t for t in times if t != float("inf"))
    p99 = good[min(len(good) - 1, int(len(good) * 0.99))] if good else float("nan")
    return Result(
        name,
        n,
        len(times) - len(good),
        statistics.median(good) if good else float("nan"),
        p99,
        max(good) if good else float("nan"),
        cpu * 1000 / n,
        rss,
        opened,
    )


def report(results: list[Result]) -> str:
    cpu = platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    lines = [
        "## /metrics under idle connections",
        "",
        f"Measured by `benchmarks/bench_http.py` on {time.strftime('%Y-%m-%d')}.",
        "",
        f"Machine: {cpu}, {os.cpu_count()} logical CPUs; Linux {platform.release()}; "
        f"Python {platform.python_version()}.",
        "",
        "Sequential scrapes of a 2-GPU exposition (`tests/golden/metrics.prom`, "
        f"{BODY.stat().st_size / 1024:.1f} KiB), a new connection each, 2 s timeout. With a "
        "flood, a thread keeps that many connections open (half silent, half with a request cut "
        "off mid-header), opening 500 new ones a second. CPU is the server process's per scrape "
        "(flood handling included).",
        "",
        "| server | flood | scrapes | failed | latency median | p99 | max | CPU per scrape | RSS |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.flood_opened or 0} opened | {r.scrapes} | {r.failures} | "
            f"{r.median_ms:.2f} ms | {r.p99_ms:.2f} ms | {r.max_ms:.2f} ms | {r.cpu_ms:.2f} ms | "
            f"{r.rss_mib:.1f} MiB |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scrapes", type=int, default=300)
    ap.add_argument("--flood", type=int, default=400)
    ap.add_argument("--write", type=Path, help="replace this section in a markdown file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = [
            bench("HTTP", args.scrapes, 0, None),
            bench("HTTP", args.scrapes, args.flood, None),
            bench("HTTPS + basic auth", args.scrapes, 0, Path(tmp)),
            bench("HTTPS + basic auth", args.scrapes, args.flood, Path(tmp)),
        ]
    text = report(results)
    print(text)
    if args.write:
        doc = args.write.read_text()
        head = "## /metrics under idle connections"
        if head in doc:
            before, _, after = doc.partition(head)
            rest = after.split("\n## ", 1)
            doc = before + text + ("\n## " + rest[1] if len(rest) > 1 else "")
        else:
            doc = doc.rstrip("\n") + "\n\n" + text
        args.write.write_text(doc)


if __name__ == "__main__":
    main()
