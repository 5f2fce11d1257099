#!/usr/bin/env bash
# Sets up a fresh machine (scripts/setup-dev.sh) and runs the whole test suite, lint included;
# with no arguments, also the NVML tests under the lowest supported nvidia-ml-py.
set -euo pipefail
cd "$(dirname "$0")/.."
# The tests that drive NVIDIA's binding (over the fake libnvidia-ml.so.1).
NVML_TESTS=(tests/test_fake_driver.py tests/test_nvml_source.py tests/test_nvml_events.py
  tests/test_events_e2e.py tests/test_driver_e2e.py tests/test_gpu_real.py tests/test_gpu_deadline.py
  tests/test_nvml_gpm.py tests/test_gpm_e2e.py tests/test_nvml_processes.py
  tests/test_nvml_binding.py tests/test_gpm_refused.py)
scripts/setup-dev.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# One worker per core, tests that share a resource grouped (xdist_group).
.venv/bin/pytest -q -n auto --dist loadgroup "$@"
if [ $# -eq 0 ]; then
  # The NVML tests again with the lowest nvidia-ml-py pyproject.toml allows.
  echo "test: NVML tests with $(.venv-minnvml/bin/python -c 'import importlib.metadata as m; print("nvidia-ml-py", m.version("nvidia-ml-py"))')"
  .venv-minnvml/bin/pytest -q -p no:cacheprovider "${NVML_TESTS[@]}"
fi
