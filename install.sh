#!/usr/bin/env bash
# install.sh: install gputel on a GPU worker as a hardened systemd service.
#
#   sudo ./install.sh [all|service|logrotate] [--prefix DIR] [--profiling] [--uninstall]
#   ./install.sh [all|service|logrotate] --destdir DIR [--prefix DIR] [--profiling] [--uninstall]
#
# Steps (each runs alone; "all" runs both):
#   service    system user and group gputel, the package in its own venv (PREFIX, default
#              /opt/gputel), /usr/local/bin/gputel, the unit, /etc/default/gputel, the RAPL udev
#              rule, /var/log/gputel; then daemon-reload and enable --now when systemd runs.
#              Also gputel-export.service and .timer (Parquet export), installed disabled.
#   logrotate  /etc/logrotate.d/gputel.
# Re-running is safe: unchanged files are left alone, an existing /etc/default/gputel is never
# overwritten (a differing shipped version goes to /etc/default/gputel.new), and the service is
# restarted only when the package or the unit changed.
#
# --destdir DIR  stage every file under DIR and touch nothing else: no user, no venv, no chown,
#                no systemctl, no udevadm, no sysfs (for packaging and tests).
# --profiling    also install the unit drop-in that gives the service CAP_SYS_ADMIN, so GPM
#                profiling counters work on a driver that restricts them to admin users (the
#                default); off unless asked: docs/hardware.md weighs the trade-off. A drop-in
#                installed earlier is kept by later runs without the flag.
# --uninstall    remove what the steps installed; recorded CSVs and an edited
#                /etc/default/gputel stay.
# Environment: PYTHON (interpreter for the venv, default python3); pip honours PIP_INDEX_URL,
# PIP_FIND_LINKS, PIP_NO_INDEX for offline installs. See docs/install.md.
set -euo pipefail
umask 022

PROG=install.sh
SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DEFAULT_PREFIX=/opt/gputel
SERVICE_USER=gputel
UNIT_NAME=gputel.service
EXPORT_TIMER=gputel-export.timer
WRAPPER_MARK="# gputel operator command, written by gputel's install.sh"

say() { printf '%s: %s\n' "$PROG" "$*"; }
die() { printf '%s: %s\n' "$PROG" "$1" >&2; exit "${2:-1}"; }
usage() {
    cat <<EOF
usage: $PROG [all|service|logrotate] [--destdir DIR] [--prefix DIR] [--profiling] [--uninstall]
  all        service + logrotate (default)
  service    user, venv, unit, /etc/default/gputel, RAPL rule, log directory, systemctl
  logrotate  /etc/logrotate.d/gputel
  --destdir DIR  stage the files under DIR only (no user, venv, systemctl)
  --prefix DIR   venv location (default $DEFAULT_PREFIX)
  --profiling    give the service CAP_SYS_ADMIN for GPM profiling counters (docs/hardware.md)
  --uninstall    remove what was installed; keeps CSVs and an edited /etc/default/gputel
EOF
}

# ------------------------------------------------------------------------------ arguments
STEP=all
DESTDIR=
PREFIX=$DEFAULT_PREFIX
UNINSTALL=0
PROFILING=0
while [ $# -gt 0 ]; do
    case $1 in
        all | service | logrotate) STEP=$1 ;;
        --destdir) [ $# -ge 2 ] || die "--destdir needs a directory" 2; DESTDIR=$2; shift ;;
        --destdir=*) DESTDIR=${1#*=} ;;
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory" 2; PREFIX=$2; shift ;;
        --prefix=*) PREFIX=${1#*=} ;;
        --uninstall) UNINSTALL=1 ;;
        --profiling) PROFILING=1 ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown argument: $1 (see $PROG --help)" 2 ;;
    esac
    shift
done

# PREFIX goes into the unit's ExecStart and a sed expression: plain absolute paths only, and
# nowhere ProtectHome=/PrivateTmp= would hide it from the service.
PREFIX=${PREFIX%/}
case $PREFIX in
    /*) ;;
    *) die "--prefix must be an absolute path: $PREFIX" 2 ;;
esac
[[ $PREFIX =~ ^[A-Za-z0-9._/+-]+$ ]] || die "--prefix may only contain letters, digits and ._/+-: $PREFIX" 2
case $PREFIX/ in
    / | /usr/ | /usr/local/ | /bin/* | /sbin/* | /etc/* | /home/* | /root/* | /tmp/* | /var/tmp/* | /run/* | /proc/* | /sys/* | /dev/*)
        die "--prefix $PREFIX is not a place for the gputel venv (e.g. /opt/gputel)" 2 ;;
esac

if [ -n "$DESTDIR" ]; then
    case $DESTDIR in
        /*) ;;
        *) DESTDIR=$PWD/$DESTDIR ;;
    esac
    DESTDIR=${DESTDIR%/}
    [ -n "$DESTDIR" ] || die "--destdir / is the real system: leave --destdir out for a real install" 2
elif [ "$(id -u)" -ne 0 ]; then
    die "must run as root for a real install (sudo $0 ...), or stage files with --destdir DIR"
fi

for f in systemd/gputel.service systemd/gputel-profiling.conf systemd/gputel-export.service systemd/gputel-export.timer etc-default/gputel logrotate/gputel udev/90-gputel-rapl.rules; do
    [ -f "$SRC_DIR/$f" ] || die "missing $SRC_DIR/$f: run install.sh from a gputel checkout"
done

R=$DESTDIR
UNIT_FILE=$R/etc/systemd/system/$UNIT_NAME
EXPORT_SERVICE_FILE=$R/etc/systemd/system/gputel-export.service
EXPORT_TIMER_FILE=$R/etc/systemd/system/$EXPORT_TIMER
DROPIN_DIR=$R/etc/systemd/system/$UNIT_NAME.d
PROFILING_FILE=$DROPIN_DIR/profiling.conf
DEFAULTS_FILE=$R/etc/default/gputel
LOGROTATE_FILE=$R/etc/logrotate.d/gputel
UDEV_FILE=$R/etc/udev/rules.d/90-gputel-rapl.rules
WRAPPER_FILE=$R/usr/local/bin/gputel
SHARE_DIR=$R$PREFIX/share/gputel
PRISTINE_DEFAULTS=$SHARE_DIR/gputel.default
LOG_DIR=$R/var/log/gputel

real() { [ -z "$DESTDIR" ]; }
systemd_running() { real && [ -d /run/systemd/system ]; }

# ------------------------------------------------------------------------------ file helpers
CHANGED=0
TMPFILES=()
cleanup() {
    local f
    for f in "${TMPFILES[@]+"${TMPFILES[@]}"}"; do
        rm -f "$f"
    done
}
trap cleanup EXIT

# new_tmp DIR: set NEW_TMP to a temporary file next to its destination (same file system, so
# the final mv is atomic); removed on exit if still there.
NEW_TMP=
new_tmp() {
    NEW_TMP=$(mktemp "$1/.gputel-install.XXXXXX")
    TMPFILES+=("$NEW_TMP")
}

# put_file SRC DEST MODE: make DEST a copy of SRC with MODE; leaves an identical DEST untouched.
put_file() {
    local src=$1 dest=$2 mode=$3 tmp
    if [ -f "$dest" ] && [ ! -L "$dest" ] && cmp -s "$src" "$dest" &&
        [ "$(stat -c %a "$dest")" = "${mode#0}" ]; then
        return 0
    fi
    mkdir -p "$(dirname "$dest")"
    new_tmp "$(dirname "$dest")"
    tmp=$NEW_TMP
    cat "$src" >"$tmp"
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$dest"
    CHANGED=1
    say "installed $dest"
}

# render SRC DEST MODE: like put_file, with /opt/gputel replaced by PREFIX.
render() {
    local src=$1 dest=$2 mode=$3 tmp
    mkdir -p "$(dirname "$dest")"
    new_tmp "$(dirname "$dest")"
    tmp=$NEW_TMP
    sed "s|$DEFAULT_PREFIX|$PREFIX|g" "$src" >"$tmp"
    put_file "$tmp" "$dest" "$mode"
    rm -f "$tmp"
}

# remove_file PATH: delete PATH if present.
remove_file() {
    if [ -e "$1" ] || [ -L "$1" ]; then
        rm -f "$1"
        say "removed $1"
    fi
}

# prune_dirs DIR STOP: remove DIR and its empty parents, up to (not including) STOP.
prune_dirs() {
    local d=$1 stop=$2
    while [ "$d" != "$stop" ] && [ "$d" != / ] && [ -d "$d" ] && rmdir "$d" 2>/dev/null; do
        d=$(dirname "$d")
    done
}

write_wrapper() {
    # $1: destination. gputel itself finds the system agent's socket in /run/gputel, so the
    # wrapper only puts the venv's command on operators' PATH.
    cat >"$1" <<EOF
#!/bin/sh
$WRAPPER_MARK
# Runs the gputel installed in $PREFIX (operators need group gputel to reach the agent).
exec $PREFIX/bin/gputel "\$@"
EOF
}

# ------------------------------------------------------------------------------ system helpers
nologin_shell() {
    local s
    for s in /usr/sbin/nologin /sbin/nologin /bin/false; do
        [ -x "$s" ] && { echo "$s"; return 0; }
    done
    echo /bin/false
}

ensure_user() {
    real || return 0
    if ! getent group "$SERVICE_USER" >/dev/null; then
        groupadd --system "$SERVICE_USER"
        say "created group $SERVICE_USER"
    fi
    if ! getent passwd "$SERVICE_USER" >/dev/null; then
        useradd --system --gid "$SERVICE_USER" --no-create-home --home-dir /nonexistent \
            --shell "$(nologin_shell)" --comment "gputel GPU telemetry agent" "$SERVICE_USER"
        say "created system user $SERVICE_USER (no login shell, no home)"
    fi
}

venv_fingerprint() {
    # Changes whenever pip installed different gputel files (RECORD lists every file's hash).
    { cat "$PREFIX"/lib/python3*/site-packages/gputel-*.dist-info/RECORD 2>/dev/null || true; } | cksum
}

# prefix_is_foreign: PREFIX holds something other than our share/ but is no venv.
prefix_is_foreign() {
    local e
    for e in "$PREFIX"/* "$PREFIX"/.[!.]*; do
        [ -e "$e" ] || [ -L "$e" ] || continue
        [ "${e##*/}" = share ] || return 0
    done
    return 1
}

install_venv() {
    real || return 0
    local python=${PYTHON:-python3} before after
    command -v "$python" >/dev/null || die "$python not found: install Python >= 3.10 or set PYTHON=/path/to/python3"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
        die "$python is older than 3.10: set PYTHON=/path/to/python3.10+"
    if [ ! -f "$PREFIX/pyvenv.cfg" ]; then
        if prefix_is_foreign; then
            die "$PREFIX exists and is not a Python venv: choose another --prefix"
        fi
        "$python" -m venv "$PREFIX" ||
            die "cannot create a venv in $PREFIX (Debian/Ubuntu: apt-get install python3-venv)"
        say "created venv $PREFIX"
    fi
    before=$(venv_fingerprint)
    "$PREFIX/bin/python" -m pip install --quiet --disable-pip-version-check "$SRC_DIR" ||
        die "pip could not install gputel into $PREFIX (see above; offline: PIP_FIND_LINKS=DIR PIP_NO_INDEX=1)"
    after=$(venv_fingerprint)
    [ -x "$PREFIX/bin/gputel" ] || die "pip did not install $PREFIX/bin/gputel"
    if [ "$before" != "$after" ]; then
        CHANGED=1
        say "installed gputel $("$PREFIX/bin/python" -c 'from importlib.metadata import version; print(version("gputel"))') into $PREFIX"
    fi
}

# RAPL energy counters: the udev rule covers boots and later module loads; apply it now too.
rapl_apply() {
    real || return 0
    local f
    for f in /sys/class/powercap/intel-rapl:*/energy_uj; do
        [ -e "$f" ] || continue
        if [ "$(stat -c %G:%a "$f" 2>/dev/null)" != "$SERVICE_USER:440" ]; then
            { chgrp "$SERVICE_USER" "$f" && chmod 0440 "$f"; } 2>/dev/null ||
                say "warning: cannot make $f readable by group $SERVICE_USER (read-only /sys?)"
        fi
    done
    if command -v udevadm >/dev/null && [ -S /run/udev/control ]; then
        udevadm control --reload-rules || true
    fi
}

rapl_revert() {
    real || return 0
    local f
    for f in /sys/class/powercap/intel-rapl:*/energy_uj; do
        [ -e "$f" ] || continue
        if [ "$(stat -c %G "$f" 2>/dev/null)" = "$SERVICE_USER" ]; then
            { chgrp root "$f" && chmod 0400 "$f"; } 2>/dev/null || true
        fi
    done
    if command -v udevadm >/dev/null && [ -S /run/udev/control ]; then
        udevadm control --reload-rules || true
    fi
}

install_log_dir() {
    if [ ! -d "$LOG_DIR" ]; then
        mkdir -p "$LOG_DIR"
        CHANGED=1
        say "created $LOG_DIR"
    fi
    [ "$(stat -c %a "$LOG_DIR")" = 750 ] || chmod 0750 "$LOG_DIR"
    if real && [ "$(stat -c %U:%G "$LOG_DIR")" != "$SERVICE_USER:$SERVICE_USER" ]; then
        chown "$SERVICE_USER:$SERVICE_USER" "$LOG_DIR"
    fi
}

install_defaults() {
    local shipped=$SRC_DIR/etc-default/gputel
    if [ ! -e "$DEFAULTS_FILE" ]; then
        put_file "$shipped" "$DEFAULTS_FILE" 0644
    elif cmp -s "$shipped" "$DEFAULTS_FILE"; then
        [ ! -e "$DEFAULTS_FILE.new" ] || remove_file "$DEFAULTS_FILE.new"
    else
        # Never overwrite the operator's settings: the shipped version goes beside them.
        if ! cmp -s "$shipped" "$DEFAULTS_FILE.new" 2>/dev/null; then
            say "kept $DEFAULTS_FILE (edited); the shipped version is in $DEFAULTS_FILE.new"
        fi
        put_file "$shipped" "$DEFAULTS_FILE.new" 0644
    fi
    put_file "$shipped" "$PRISTINE_DEFAULTS" 0644
}

remove_defaults() {
    local shipped=$SRC_DIR/etc-default/gputel
    if [ -e "$DEFAULTS_FILE" ]; then
        if cmp -s "$shipped" "$DEFAULTS_FILE" ||
            { [ -f "$PRISTINE_DEFAULTS" ] && cmp -s "$PRISTINE_DEFAULTS" "$DEFAULTS_FILE"; }; then
            remove_file "$DEFAULTS_FILE"
        else
            say "kept $DEFAULTS_FILE: it has local edits"
        fi
    fi
    remove_file "$DEFAULTS_FILE.new"
}

# ------------------------------------------------------------------------------ steps
service_install() {
    ensure_user
    install_venv
    render "$SRC_DIR/systemd/gputel.service" "$UNIT_FILE" 0644
    if [ "$PROFILING" = 1 ]; then
        put_file "$SRC_DIR/systemd/gputel-profiling.conf" "$PROFILING_FILE" 0644
    elif [ -e "$PROFILING_FILE" ]; then
        say "kept $PROFILING_FILE (GPM with CAP_SYS_ADMIN, from an earlier --profiling)"
    fi
    put_file "$SRC_DIR/udev/90-gputel-rapl.rules" "$UDEV_FILE" 0644
    install_defaults
    if [ -f "$SRC_DIR/docs/install.md" ]; then
        put_file "$SRC_DIR/docs/install.md" "$SHARE_DIR/install.md" 0644
    fi
    # Slurm prolog/epilog for clusters that want allocation-driven telemetry (docs/slurm.md).
    put_file "$SRC_DIR/contrib/slurm/prolog.sh" "$SHARE_DIR/slurm/prolog.sh" 0755
    put_file "$SRC_DIR/contrib/slurm/epilog.sh" "$SHARE_DIR/slurm/epilog.sh" 0755
    put_file "$SRC_DIR/contrib/slurm/gputel-slurm.sh" "$SHARE_DIR/slurm/gputel-slurm.sh" 0644
    if [ -e "$WRAPPER_FILE" ] && ! grep -qF "$WRAPPER_MARK" "$WRAPPER_FILE" 2>/dev/null; then
        say "warning: $WRAPPER_FILE exists and is not gputel's: left alone; run $PREFIX/bin/gputel"
    else
        mkdir -p "$(dirname "$WRAPPER_FILE")"
        local tmp
        new_tmp "$(dirname "$WRAPPER_FILE")"
        tmp=$NEW_TMP
        write_wrapper "$tmp"
        put_file "$tmp" "$WRAPPER_FILE" 0755
        rm -f "$tmp"
    fi
    install_log_dir
    rapl_apply
    # The export timer is installed disabled (an operator chooses OUT first, docs/fleet.md);
    # a change to it never restarts the agent.
    local agent_changed=$CHANGED
    render "$SRC_DIR/systemd/gputel-export.service" "$EXPORT_SERVICE_FILE" 0644
    render "$SRC_DIR/systemd/gputel-export.timer" "$EXPORT_TIMER_FILE" 0644
    if systemd_running; then
        local was_active=0
        systemctl is-active --quiet "$UNIT_NAME" && was_active=1
        systemctl daemon-reload
        systemctl enable --now "$UNIT_NAME" ||
            die "$UNIT_NAME did not start: journalctl -u gputel -n 50"
        if [ "$was_active" = 1 ] && [ "$agent_changed" = 1 ]; then
            systemctl restart "$UNIT_NAME" || die "$UNIT_NAME did not restart: journalctl -u gputel -n 50"
            say "restarted $UNIT_NAME"
        fi
        say "$UNIT_NAME is $(systemctl is-active "$UNIT_NAME" || true); check with: gputel status"
    elif real; then
        say "systemd is not running here: start the agent with $PREFIX/bin/gputel agent"
    fi
}

service_uninstall() {
    if systemd_running && [ -f "$EXPORT_TIMER_FILE" ]; then
        systemctl disable --now "$EXPORT_TIMER" || true
    fi
    if systemd_running && [ -f "$UNIT_FILE" ]; then
        systemctl disable --now "$UNIT_NAME" || true
    fi
    remove_file "$EXPORT_TIMER_FILE"
    remove_file "$EXPORT_SERVICE_FILE"
    remove_file "$UNIT_FILE"
    remove_file "$PROFILING_FILE"
    prune_dirs "$DROPIN_DIR" "$R/etc/systemd/system"
    systemd_running && systemctl daemon-reload
    remove_file "$UDEV_FILE"
    rapl_revert
    if [ -e "$WRAPPER_FILE" ] && grep -qF "$WRAPPER_MARK" "$WRAPPER_FILE" 2>/dev/null; then
        remove_file "$WRAPPER_FILE"
    fi
    remove_defaults
    remove_file "$SHARE_DIR/install.md"
    remove_file "$PRISTINE_DEFAULTS"
    remove_file "$SHARE_DIR/slurm/prolog.sh"
    remove_file "$SHARE_DIR/slurm/epilog.sh"
    remove_file "$SHARE_DIR/slurm/gputel-slurm.sh"
    prune_dirs "$SHARE_DIR/slurm" "$R$PREFIX"
    prune_dirs "$SHARE_DIR" "$R$PREFIX"
    if [ -f "$R$PREFIX/pyvenv.cfg" ] && [ -e "$R$PREFIX/bin/gputel" ]; then
        rm -rf -- "${R}${PREFIX:?}"
        say "removed venv $R$PREFIX"
    fi
    if real; then
        prune_dirs "$PREFIX" "$(dirname "$PREFIX")"
    else
        for d in "$R$PREFIX" "$R/etc/systemd/system" "$R/etc/default" "$R/etc/udev/rules.d" \
            "$R/usr/local/bin"; do
            prune_dirs "$d" "$R"
        done
    fi
    if [ -d "$LOG_DIR" ]; then
        if rmdir "$LOG_DIR" 2>/dev/null; then
            say "removed empty $LOG_DIR"
        else
            say "kept $LOG_DIR: it holds recorded CSVs"
        fi
    fi
    real || prune_dirs "$R/var/log" "$R"
    if real && getent passwd "$SERVICE_USER" >/dev/null; then
        if [ -d "$LOG_DIR" ]; then
            say "kept user $SERVICE_USER: it owns the CSVs in $LOG_DIR"
        else
            userdel "$SERVICE_USER" && say "removed user $SERVICE_USER"
            if getent group "$SERVICE_USER" >/dev/null; then
                groupdel "$SERVICE_USER" && say "removed group $SERVICE_USER"
            fi
        fi
    fi
}

logrotate_install() {
    ensure_user   # the policy rotates as user gputel
    put_file "$SRC_DIR/logrotate/gputel" "$LOGROTATE_FILE" 0644
}

logrotate_uninstall() {
    remove_file "$LOGROTATE_FILE"
    real || prune_dirs "$R/etc/logrotate.d" "$R"
}

# ------------------------------------------------------------------------------ main
if [ "$UNINSTALL" = 1 ]; then
    case $STEP in
        all) logrotate_uninstall; service_uninstall ;;
        service) service_uninstall ;;
        logrotate) logrotate_uninstall ;;
    esac
    say "uninstall ($STEP) done"
else
    case $STEP in
        all) service_install; logrotate_install ;;
        service) service_install ;;
        logrotate) logrotate_install ;;
    esac
    if [ "$CHANGED" = 0 ]; then
        say "$STEP: already up to date"
    else
        say "$STEP: done${DESTDIR:+ (staged under $DESTDIR)}"
    fi
fi
