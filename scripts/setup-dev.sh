#!/usr/bin/env bash
# Prepares a fresh Debian/Ubuntu machine for gputel's test suite: the system packages the tests
# drive for real (Prometheus, logrotate, Slurm + munge, systemd-analyze) and a virtualenv in
# .venv with gputel and its test extras. Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBIAN_PACKAGES=(
  logrotate                 # rotation tests run the real logrotate
  prometheus                # promtool check/test rules, a real scraping server
  prometheus-node-exporter  # reference exporter for the benchmarks
  slurm-wlm munge           # single-node Slurm for the prolog/epilog test
  slurmdbd mariadb-server   # Slurm accounting: the epilog's AdminComment test
  systemd                   # systemd-analyze verify/security for the unit
  util-linux                # mount (tmpfs disk-full test), flock
  procps                    # ps/pkill used by tests
  shellcheck                # lint of install.sh and the Slurm scripts
  gcc libc6-dev             # builds the fake libnvidia-ml.so.1 the NVML tests load
  tmux                      # drives gputel demo in a real terminal
  default-jre-headless      # Java for Apache Spark, which reads the Parquet export in a test
  chromium                  # renders gputel job --html headless (self-contained page test)
)

if command -v apt-get >/dev/null 2>&1; then
  missing=()
  for pkg in "${DEBIAN_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ]; then
      echo "setup: installing Debian packages: ${missing[*]}"
      apt-get update -qq
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
      echo "setup: missing Debian packages (tests that need them will skip): ${missing[*]}" >&2
      echo "setup: install them with: sudo apt-get install ${missing[*]}" >&2
    fi
  fi
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[test]'

# A second, small venv with the lowest nvidia-ml-py that pyproject.toml allows: scripts/test.sh
# runs the NVML tests (NVIDIA's binding over the fake driver) in it too, so both ends of the
# supported binding range are tested. Its own packages only, never the system's.
MIN_NVML=$(sed -n 's/.*"nvidia-ml-py>=\([0-9.]*\)".*/\1/p' pyproject.toml)
[ -x .venv-minnvml/bin/python ] || "$PYTHON" -m venv .venv-minnvml
.venv-minnvml/bin/python -m pip install -q --upgrade pip >/dev/null
.venv-minnvml/bin/python -m pip install -q -e . "nvidia-ml-py==${MIN_NVML}" pytest pytest-timeout psutil
echo "setup: ready (.venv/bin/gputel; .venv-minnvml with nvidia-ml-py ${MIN_NVML})"
