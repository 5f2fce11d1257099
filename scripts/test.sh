#!/usr/bin/env bash
# Sets up a fresh machine (scripts/setup-dev.sh) and runs the whole test suite, lint included.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-dev.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/pytest -q "$@"
