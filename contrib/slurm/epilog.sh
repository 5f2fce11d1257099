#!/bin/sh
# gputel Slurm epilog: close the job's gputel allocation, which appends its summary (duration,
# energy, utilization) to allocations.csv and lets telemetry stop once the node is idle.
#
# slurm.conf:   Epilog=/opt/gputel/share/gputel/slurm/epilog.sh
#
# It also stores the summary in the job's AdminComment in Slurm's accounting database (behind a
# "gputel=" marker, keeping the rest of the comment; docs/slurm.md), read back by `sacct` and
# `gputel job`. Where no slurmdbd runs, one log line says why nothing was stored.
#
# A failing epilog drains the node: this script always exits 0, and the gputel call is cut off
# after GPUTEL_HOOK_TIMEOUT seconds (default 8: the release, then at most 4 s for Slurm).
#
# Environment (tests and unusual installs):
#   GPUTEL_DEFAULTS_FILE  settings file to read (default /etc/default/gputel)
#   GPUTEL_BIN            the gputel executable (default: gputel on PATH, then usual places)
#   GPUTEL_HOOK_TIMEOUT   seconds before the gputel call is killed (default 8)

# The shared functions live beside this script; without them there is nothing to do, and a
# prolog/epilog must never fail a job.
# Resolve a symlink (e.g. from a prolog.d/ directory) to find the library beside the real file.
gputel_self="$(readlink -f "$0" 2>/dev/null || printf '%s' "$0")"
gputel_lib="$(dirname "$gputel_self")/gputel-slurm.sh"
if [ ! -r "$gputel_lib" ]; then
    printf 'gputel-slurm: %s is missing; nothing to do\n' "$gputel_lib" >&2
    exit 0
fi
# shellcheck source=gputel-slurm.sh source-path=SCRIPTDIR
. "$gputel_lib" || exit 0

gputel_epilog() {
    job="${SLURM_JOB_ID:-${SLURM_JOBID:-}}"
    case "$job" in
        '' | *[!0-9]*)
            gputel_log "epilog: no usable SLURM_JOB_ID ('$job'); nothing to do"
            return 0
            ;;
    esac
    gputel_read_defaults
    if ! bin="$(gputel_find_bin)"; then
        gputel_log "epilog: gputel not found (set GPUTEL_BIN); nothing to release"
        return 0
    fi
    id="slurm-$job"
    if output="$(gputel_run --default-timeout=8 "$bin" hook release "$id" --quiet \
        --slurm-comment 2>&1)"; then
        gputel_log "epilog: allocation $id released${output:+; $output}"
    else
        rc=$?
        gputel_log "epilog: gputel hook release $id failed ($(gputel_why "$rc" 8 "$output"))"
    fi
    return 0
}

gputel_epilog </dev/null
exit 0
