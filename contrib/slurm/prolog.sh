#!/bin/sh
# gputel Slurm prolog: open a gputel allocation for the job, so telemetry runs (and every CSV
# row is tagged "slurm-<jobid>") from the job's first second.
#
# slurm.conf:   Prolog=/opt/gputel/share/gputel/slurm/prolog.sh
#               PrologFlags=Alloc      (run at allocation time, with SLURM_JOB_GPUS set)
#
# A prolog that fails or hangs drains the node, and telemetry must never cost a job: this script
# always exits 0, and the gputel call is cut off after GPUTEL_HOOK_TIMEOUT seconds (default 5).
#
# Environment (tests and unusual installs):
#   GPUTEL_DEFAULTS_FILE  settings file to read (default /etc/default/gputel)
#   GPUTEL_BIN            the gputel executable (default: gputel on PATH, then usual places)
#   GPUTEL_HOOK_TIMEOUT   seconds before the gputel call is killed (default 5)

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

gputel_prolog() {
    job="${SLURM_JOB_ID:-${SLURM_JOBID:-}}"
    case "$job" in
        '' | *[!0-9]*)
            gputel_log "prolog: no usable SLURM_JOB_ID ('$job'); nothing to do"
            return 0
            ;;
    esac
    gputel_read_defaults
    if ! bin="$(gputel_find_bin)"; then
        gputel_log "prolog: gputel not found (set GPUTEL_BIN); job $job runs without telemetry"
        return 0
    fi
    id="slurm-$job"
    if [ -n "${SLURM_JOB_GPUS:-}" ]; then
        if gpus="$(gputel_expand_gpus "$SLURM_JOB_GPUS")" && [ -n "$gpus" ]; then
            set -- hook allocate "$id" --gpus "$gpus" --quiet
        else
            # Never all GPUs instead: the job's rows would claim GPUs that are not its own.
            gputel_log "prolog: cannot read SLURM_JOB_GPUS='$SLURM_JOB_GPUS' (expected indices \
such as 0,2-3); no allocation opened for job $job"
            return 0
        fi
    else
        set -- hook allocate "$id" --quiet
    fi
    if output="$(gputel_run "$bin" "$@" 2>&1)"; then
        gputel_log "prolog: allocation $id opened${gpus:+ (GPUs $gpus)}"
    else
        rc=$?
        gputel_log "prolog: gputel hook allocate $id failed ($(gputel_why "$rc" 5 "$output"))"
    fi
    return 0
}

gputel_prolog </dev/null
exit 0
