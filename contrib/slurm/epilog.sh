#!/bin/sh
# gputel Slurm epilog: close the job's gputel allocation, which appends its summary (duration,
# energy, utilization) to allocations.csv and lets telemetry stop once the node is idle.
#
# slurm.conf:   Epilog=/usr/share/gputel/slurm/epilog.sh
#
# A failing epilog drains the node: this script always exits 0, and the gputel call is cut off
# after GPUTEL_HOOK_TIMEOUT seconds (default 5).
#
# Environment (tests and unusual installs):
#   GPUTEL_DEFAULTS_FILE  settings file to read (default /etc/default/gputel)
#   GPUTEL_BIN            the gputel executable (default: gputel on PATH, then usual places)
#   GPUTEL_HOOK_TIMEOUT   seconds before the gputel call is killed (default 5)

PATH="${PATH:-/usr/bin:/bin}:/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"
export PATH

gputel_log() {
    if command -v logger >/dev/null 2>&1; then
        logger -t gputel-slurm -p daemon.notice -- "$*" 2>/dev/null
    fi
    printf 'gputel-slurm: %s\n' "$*" >&2
}

# Read KEY=value lines for gputel's own settings only; the file is never executed.
gputel_read_defaults() {
    file="${GPUTEL_DEFAULTS_FILE:-/etc/default/gputel}"
    [ -r "$file" ] || return 0
    while IFS= read -r line || [ -n "$line" ]; do
        line="${line#"${line%%[![:space:]]*}"}"
        case "$line" in
            export\ *) line="${line#export }" ;;
        esac
        case "$line" in
            GPUTEL_*=*) ;;
            *) continue ;;
        esac
        key="${line%%=*}"
        value="${line#*=}"
        case "$key" in
            *[!A-Za-z0-9_]*) continue ;;
        esac
        case "$value" in
            \"*\") value="${value#\"}"; value="${value%\"}" ;;
            \'*\') value="${value#\'}"; value="${value%\'}" ;;
        esac
        # Settings already in the environment (a test, an admin override) win.
        if eval "[ -z \"\${$key+x}\" ]"; then
            eval "$key=\$value"
            export "${key?}"
        fi
    done <"$file"
}

gputel_find_bin() {
    if [ -n "${GPUTEL_BIN:-}" ]; then
        printf '%s\n' "$GPUTEL_BIN"
        return 0
    fi
    for candidate in "$(command -v gputel 2>/dev/null)" /usr/local/bin/gputel /usr/bin/gputel \
        /opt/gputel/bin/gputel; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then
            printf '%s\n' "$candidate"
            return 0
        fi
    done
    return 1
}

gputel_run() {
    limit="${GPUTEL_HOOK_TIMEOUT:-5}"
    if command -v timeout >/dev/null 2>&1; then
        timeout -k 1 "$limit" "$@"
    else
        "$@"
    fi
}

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
    if output="$(gputel_run "$bin" hook release "$id" --quiet 2>&1)"; then
        gputel_log "epilog: allocation $id released"
    else
        rc=$?
        gputel_log "epilog: gputel hook release $id failed (exit $rc): $output"
    fi
    return 0
}

gputel_epilog </dev/null
exit 0
