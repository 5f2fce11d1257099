#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU: checks gputel against the real driver and writes
# a summary and the raw files to an output directory (the argument, else $OUT, else
# ./gpu-check-<UTC time>). About 3 minutes with the defaults; at most 8.
#
#   1. installs gputel in a venv (GPU_CHECK_VENV to reuse one that has it);
#   2. runs `pytest -m gpu` on the real driver;
#   3. runs `gputel agent` while a PyTorch matmul load runs ~30 s: idle -> active -> idle in
#      transitions.csv, rows in gpu-*.csv, and those rows compared with `nvidia-smi --query-gpu`
#      sampled at the same moments (GPU_CHECK_LOAD replaces the load with any command; without
#      torch/CUDA and without it the step is skipped with the reason);
#   4. times the CPU of `gputel record` against `nvidia-smi --query-gpu=... -l 1` and against
#      spawning nvidia-smi once a second, for GPU_CHECK_TIMING_SECONDS (30) each;
#   5. GPM as root and as an unprivileged user (runuser -u nobody: the profiling restriction,
#      docs/hardware.md), and the PCI address of each GPU in the kernel log's Xid format,
#      checked against /sys/bus/pci/devices.
#
# Exit status 0 when every check passed (skips are not failures), 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

OUT_DIR=${1:-${OUT:-$REPO/gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
INTERVAL=${GPU_CHECK_INTERVAL:-1}
LOAD_SECONDS=${GPU_CHECK_LOAD_SECONDS:-30}
TIMING_SECONDS=${GPU_CHECK_TIMING_SECONDS:-30}
VENV=${GPU_CHECK_VENV:-$OUT_DIR/venv}
SUMMARY=$OUT_DIR/summary.md
SMI_FIELDS=timestamp,index,utilization.gpu,memory.used,temperature.gpu,power.draw
FAILED=0
: >"$SUMMARY"

say() {
  echo "gpu-check: $*"
  echo "$*" >>"$SUMMARY"
}
result() { # NAME STATUS DETAIL
  say "- **$1**: $2 — $3"
  [ "$2" != FAIL ] || FAILED=1
}

# ---------------------------------------------------------------------------- 0. the machine
if ! nvidia-smi -L >"$OUT_DIR/nvidia-smi-L.txt" 2>&1; then
  say "nvidia-smi -L failed: no usable NVIDIA GPU here ($(head -1 "$OUT_DIR/nvidia-smi-L.txt"))"
  exit 1
fi
nvidia-smi --query-gpu=index,name,uuid,driver_version,memory.total,power.limit \
  --format=csv >"$OUT_DIR/gpus.csv" 2>&1 || true
{
  echo "# gputel GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "host $(hostname), $(uname -r), commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo
  echo '```'
  cat "$OUT_DIR/gpus.csv"
  echo '```'
  echo
} >>"$SUMMARY"

# ---------------------------------------------------------------------------- 1. install
if [ ! -x "$VENV/bin/gputel" ]; then
  say "installing gputel into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >"$OUT_DIR/install.log" 2>&1
  "$VENV/bin/python" -m pip install -q -e "${REPO}[test]" >>"$OUT_DIR/install.log" 2>&1
fi
PY=$VENV/bin/python
GPUTEL=$VENV/bin/gputel
TOOLS=$REPO/scripts/gpu_check.py

# ---------------------------------------------------------------------------- 2. pytest -m gpu
if "$PY" -m pytest -q -p no:cacheprovider -m gpu "$REPO/tests/test_gpu_real.py" \
  >"$OUT_DIR/pytest-gpu.txt" 2>&1; then
  result "pytest -m gpu" PASS "$(tail -1 "$OUT_DIR/pytest-gpu.txt")"
else
  result "pytest -m gpu" FAIL "$(tail -1 "$OUT_DIR/pytest-gpu.txt") (pytest-gpu.txt)"
fi

# ---------------------------------------------------------------------------- 3. agent under load
AGENT_DIR=$OUT_DIR/agent
mkdir -p "$AGENT_DIR/run" "$AGENT_DIR/log"
export GPUTEL_BACKEND=nvml GPUTEL_INTERVAL=$INTERVAL GPUTEL_START_UTIL=20 GPUTEL_START_SECONDS=3 \
  GPUTEL_STOP_UTIL=10 GPUTEL_STOP_SECONDS=5 GPUTEL_RUN_DIR=$AGENT_DIR/run \
  GPUTEL_LOG_DIR=$AGENT_DIR/log GPUTEL_EXPORTER_PORT=0
"$GPUTEL" agent 2>"$AGENT_DIR/agent.stderr" &
AGENT_PID=$!
(
  while kill -0 "$AGENT_PID" 2>/dev/null; do
    nvidia-smi --query-gpu=$SMI_FIELDS --format=csv,noheader,nounits 2>/dev/null || true
    sleep "$INTERVAL"
  done
) >"$AGENT_DIR/nvidia-smi-samples.csv" &
SAMPLER_PID=$!
trap 'kill "$AGENT_PID" "$SAMPLER_PID" 2>/dev/null || true' EXIT

state() {
  "$GPUTEL" status --json 2>/dev/null | "$PY" -c \
    'import json,sys; s=json.load(sys.stdin); print(s.get("state"), s.get("telemetry_active"))' \
    2>/dev/null || echo "unknown unknown"
}
wait_state() { # WANTED SECONDS
  local end=$((SECONDS + $2))
  while [ $SECONDS -lt $end ]; do
    [ "$(state)" = "$1" ] && return 0
    sleep 0.5
  done
  return 1
}

if wait_state "idle False" 30; then
  LOAD_STATUS=0
  if [ -n "${GPU_CHECK_LOAD:-}" ]; then
    say "load: $GPU_CHECK_LOAD"
    bash -c "$GPU_CHECK_LOAD" >"$AGENT_DIR/load.txt" 2>&1 || LOAD_STATUS=$?
  else
    "$PY" "$TOOLS" matmul "$LOAD_SECONDS" >"$AGENT_DIR/load.txt" 2>&1 || LOAD_STATUS=$?
  fi
  if [ "$LOAD_STATUS" -eq 3 ]; then
    result "agent under load" SKIP "$(head -1 "$AGENT_DIR/load.txt")"
  elif [ "$LOAD_STATUS" -ne 0 ]; then
    result "agent under load" FAIL "the load failed: $(tail -1 "$AGENT_DIR/load.txt")"
  elif ! wait_state "idle False" 60; then
    result "agent under load" FAIL "not back to idle 60 s after the load ($(state))"
  elif CYCLE=$("$PY" "$TOOLS" cycle "$AGENT_DIR/log"); then
    result "agent under load" PASS "$CYCLE"
  else
    result "agent under load" FAIL "$CYCLE"
  fi
else
  result "agent under load" FAIL "the agent did not report idle within 30 s (agent/agent.stderr)"
fi
kill -TERM "$AGENT_PID" 2>/dev/null || true
wait "$AGENT_PID" 2>/dev/null || true
wait "$SAMPLER_PID" 2>/dev/null || true
trap - EXIT
unset GPUTEL_BACKEND GPUTEL_INTERVAL GPUTEL_START_UTIL GPUTEL_START_SECONDS GPUTEL_STOP_UTIL \
  GPUTEL_STOP_SECONDS GPUTEL_RUN_DIR GPUTEL_LOG_DIR GPUTEL_EXPORTER_PORT

if compgen -G "$AGENT_DIR/log/gpu-*.csv" >/dev/null; then
  # nvidia-smi's timestamps are local time; the CSV's are UTC.
  TZ_OFFSET=$("$PY" -c 'import time; print(time.localtime().tm_gmtoff)')
  if COMPARE=$("$PY" "$TOOLS" compare "$AGENT_DIR/log" "$AGENT_DIR/nvidia-smi-samples.csv" "$TZ_OFFSET"); then
    result "CSV vs nvidia-smi" PASS "$COMPARE"
  else
    result "CSV vs nvidia-smi" FAIL "$COMPARE"
  fi
else
  result "CSV vs nvidia-smi" SKIP "no gpu-*.csv was recorded (no load ran)"
fi

# ---------------------------------------------------------------------------- 4. CPU cost
TIMING_DIR=$OUT_DIR/timing
mkdir -p "$TIMING_DIR/log"
SMI_ALL=index,utilization.gpu,utilization.memory,memory.used,memory.total,temperature.gpu,power.draw,power.limit,clocks.sm,clocks.mem,fan.speed,pstate,clocks_throttle_reasons.active
GPUTEL_BACKEND=nvml GPUTEL_INTERVAL=1 GPUTEL_LOG_DIR=$TIMING_DIR/log GPUTEL_EXPORTER_PORT=0 \
  "$PY" "$TOOLS" cpu "$TIMING_SECONDS" -- "$GPUTEL" record >"$OUT_DIR/timing-record.json"
"$PY" "$TOOLS" cpu "$TIMING_SECONDS" -- nvidia-smi --query-gpu=$SMI_ALL \
  --format=csv,noheader,nounits -l 1 >"$OUT_DIR/timing-smi-loop.json"
"$PY" "$TOOLS" spawn "$TIMING_SECONDS" -- nvidia-smi --query-gpu=$SMI_ALL \
  --format=csv,noheader,nounits >"$OUT_DIR/timing-smi-spawn.json"
{
  echo
  echo "CPU over ${TIMING_SECONDS} s at one sample a second:"
  echo
  "$PY" "$TOOLS" summary "$OUT_DIR"
} | tee -a "$SUMMARY"
result "timing" PASS "timing-*.json"

# ---------------------------------------------------------------------------- 5. GPM, PCI
GPM_ROOT=$OUT_DIR/gpm-root.json
GPM_NOBODY=$OUT_DIR/gpm-nobody.json
"$PY" "$TOOLS" gpm >"$GPM_ROOT" 2>&1 || true
if [ "$(id -u)" -ne 0 ]; then
  echo "not run: gpu-check runs as uid $(id -u), not root" >"$GPM_NOBODY"
elif ! command -v runuser >/dev/null; then
  echo "not run: no runuser on this machine" >"$GPM_NOBODY"
else
  # nobody must be able to read the venv: GPU_CHECK_VENV in a world-readable place if not.
  runuser -u nobody -- "$PY" "$TOOLS" gpm >"$GPM_NOBODY" 2>&1 || true
fi
if GPM_LINE=$("$PY" "$TOOLS" gpm-summary "$GPM_ROOT" "$GPM_NOBODY"); then
  result "GPM as root and as nobody" PASS "$GPM_LINE"
else
  result "GPM as root and as nobody" FAIL "$GPM_LINE"
fi
PCI_STATUS=0
"$PY" "$TOOLS" pci >"$OUT_DIR/pci.txt" 2>&1 || PCI_STATUS=$?
PCI_LINE=$(paste -sd ';' "$OUT_DIR/pci.txt")
case $PCI_STATUS in
  0) result "PCI addresses (kernel log format)" PASS "$PCI_LINE" ;;
  3) result "PCI addresses (kernel log format)" SKIP "no NVML address under /sys: $PCI_LINE" ;;
  *) result "PCI addresses (kernel log format)" FAIL "$PCI_LINE" ;;
esac

echo
if [ "$FAILED" -eq 0 ]; then
  say "all checks passed; summary and raw files in $OUT_DIR"
else
  say "some checks FAILED; summary and raw files in $OUT_DIR"
fi
exit "$FAILED"
