# Shared by gputel's Slurm prolog.sh and epilog.sh (sourced, never run on its own): logging,
# reading /etc/default/gputel without executing it, finding the gputel binary, and running it
# with a hard time limit. Every function returns; none exits, so the callers always exit 0.
#
# shellcheck shell=sh

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

# Why a gputel call failed, in words: "timed out after N s talking to the agent at …" for the
# time limit (exit 124, or 137 when it had to be killed), else the exit status and its output.
gputel_why() {
    case "$1" in
        124 | 137)
            printf 'timed out after %s s talking to the agent at %s/control.sock' \
                "${GPUTEL_HOOK_TIMEOUT:-$2}" "${GPUTEL_RUN_DIR:-/run/gputel}"
            ;;
        *) printf 'exit %s: %s' "$1" "$3" ;;
    esac
}

gputel_run() {
    limit="${GPUTEL_HOOK_TIMEOUT:-5}"
    case "$1" in
        --default-timeout=*)
            limit="${GPUTEL_HOOK_TIMEOUT:-${1#--default-timeout=}}"
            shift
            ;;
    esac
    if command -v timeout >/dev/null 2>&1; then
        timeout -k 1 "$limit" "$@"
    else
        "$@"
    fi
}
