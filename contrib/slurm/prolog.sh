#!/bin/sh
# gputel Slurm prolog: open a gputel allocation for the job, so telemetry runs (and every CSV
# row is tagged "slurm-<jobid>") from the job's first second.
#
# slurm.conf:   Prolog=/usr/share/gputel/slurm/prolog.sh
#               PrologFlags=Alloc      (run at allocation time, with SLURM_JOB_GPUS set)
#
# A prolog that fails or hangs drains the node, and telemetry must never cost a job: this script
# always exits 0, and the gputel call is cut off after GPUTEL_HOOK_TIMEOUT seconds (default 5).
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

# "0,1,4-6" -> "0,1,4,5,6"; fails on anything that is not indices and ranges.
gputel_expand_gpus() {
    out=""
    old_ifs=$IFS
    IFS=,
    set -f
    # shellcheck disable=SC2086
    set -- $1
    set +f
    IFS=$old_ifs
    for part in "$@"; do
        case "$part" in
            '') continue ;;
            *[!0-9-]*) return 1 ;;
            *-*)
                lo="${part%-*}"
                hi="${part#*-}"
                case "$lo$hi" in '' | *[!0-9]*) return 1 ;; esac
                [ "$lo" -le "$hi" ] || return 1
                i=$lo
                while [ "$i" -le "$hi" ]; do
                    out="${out:+$out,}$i"
                    i=$((i + 1))
                done
                ;;
            *) out="${out:+$out,}$part" ;;
        esac
    done
    printf '%s\n' "$out"
}

gputel_run() {
    limit="${GPUTEL_HOOK_TIMEOUT:-5}"
    if command -v timeout >/dev/null 2>&1; then
        timeout -k 1 "$limit" "$@"
    else
        "$@"
    fi
}

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
            # Telemetry for every GPU beats none: the rows still carry the job's id.
            gputel_log "prolog: cannot read SLURM_JOB_GPUS='$SLURM_JOB_GPUS'; using all GPUs"
            gpus=""
            set -- hook allocate "$id" --quiet
        fi
    else
        set -- hook allocate "$id" --quiet
    fi
    if output="$(gputel_run "$bin" "$@" 2>&1)"; then
        gputel_log "prolog: allocation $id opened${gpus:+ (GPUs $gpus)}"
    else
        rc=$?
        gputel_log "prolog: gputel hook allocate $id failed (exit $rc): $output"
    fi
    return 0
}

gputel_prolog </dev/null
exit 0
