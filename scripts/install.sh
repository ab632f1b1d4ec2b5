#!/usr/bin/env bash
# Install (or uninstall) checkpointer from this checkout: what `make install`, `make uninstall`
# and `make deb` run.
#
#   PREFIX/venv                    the daemon and CLI, in a venv of their own (pyproject.toml's
#                                  dependencies, from PyPI, on Debian's /usr/bin/python3)
#   PREFIX/share/                  the example configs, alert rules, Grafana dashboard
#   PREFIX/README.md, docs/        the unit's Documentation= (the README links into docs/)
#   BINDIR/checkpointer            a symlink to PREFIX/venv/bin/checkpointer
#   UNITDIR/checkpointer.service   configs/checkpointer.service, ExecStart under PREFIX
#   SYSCONFDIR/config.yaml, env    from configs/, only when absent: never overwritten, and a
#                                  key file there is never touched
#
# Variables (make passes them through): DESTDIR (a root to install into, e.g. a package's
# staging tree or a test's temporary root), PREFIX, BINDIR, UNITDIR, SYSCONFDIR, STATEDIR,
# INSTALL_PYTHON, BUILDDIR (where built venvs are cached), STAGE=1 (files only, for the Debian
# package: no SYSCONFDIR files, no systemctl, no bytecode: its maintainer scripts do those),
# REBUILD=1 (replace the installed venv even when it is up to date), PURGE (uninstall:
# `config` also removes config.yaml and env; `all` removes SYSCONFDIR, key files included,
# and STATEDIR, checkpoints' local copies included).
#
# Idempotent and fast the second time: the venv is built once per source state (a stamp of
# pyproject.toml, the Python version and every source file) into BUILDDIR and copied from
# there; an install whose stamp matches the installed venv's leaves the venv alone.
# An upgrade swaps the new venv in with two renames (a running daemon never imports from a
# half-written tree), then restarts a running service: the daemon re-adopts every running
# workload by PID and start time and never restores over one (docs/restores.md, "Daemon restart and reboot").
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."

ACTION=${1:-install}
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/opt/checkpointer}
BINDIR=${BINDIR:-/usr/local/bin}
UNITDIR=${UNITDIR:-/usr/local/lib/systemd/system}
SYSCONFDIR=${SYSCONFDIR:-/etc/checkpointer}
STATEDIR=${STATEDIR:-/var/lib/checkpointer}
INSTALL_PYTHON=${INSTALL_PYTHON:-/usr/bin/python3}
BUILDDIR=${BUILDDIR:-${XDG_CACHE_HOME:-$HOME/.cache}/checkpointer-build}
STAGE=${STAGE:-0}
REBUILD=${REBUILD:-0}
PURGE=${PURGE:-}
UNIT=checkpointer.service
ROOT_PREFIX=$DESTDIR$PREFIX

say() { echo "checkpointer install: $*" >&2; }
die() { say "$*"; exit 1; }

cleanup=()
trap 'for p in "${cleanup[@]}"; do rm -rf "$p"; done' EXIT

# systemctl only on the running system (no DESTDIR) and only when systemd runs it.
systemd_running() { [ -z "$DESTDIR" ] && [ "$STAGE" != 1 ] && [ -d /run/systemd/system ]; }

source_files() {
    find pyproject.toml README.md checkpointer storage -type f \
        ! -path '*/__pycache__/*' ! -name '*.pyc' ! -path '*.egg-info/*' -print0 | sort -z
}

# The build's identity: the interpreter the venv runs on and every file that goes into it.
stamp() {
    {
        "$PY" -c 'import sys; print(sys.version)'
        source_files | xargs -0 sha256sum
    } | sha256sum | cut -c1-16
}

# BUILT=BUILDDIR/venv-STAMP, built now if missing. It still names the folder it was built in
# (in .build-path): every install relocates its copy. (Results go in globals, never through
# `$(...)` or `if f`: bash runs those without errexit, so a failed pip would go unnoticed.)
build_venv() {
    local out=$BUILDDIR/venv-$1
    BUILT=$out
    if [ -x "$out/bin/checkpointer" ] && [ -s "$out/.build-path" ]; then
        return
    fi
    mkdir -p "$BUILDDIR"
    local tmp
    tmp=$(mktemp -d "$BUILDDIR/.build-XXXXXX")
    cleanup+=("$tmp")
    mkdir "$tmp/src"
    # A copy of the sources: setuptools builds in the source folder (build/, *.egg-info),
    # which must not appear in the checkout.
    source_files | tar -c --null -T - | tar -x -C "$tmp/src"
    say "building the venv (once per source state) in $BUILDDIR"
    "$PY" -m venv "$tmp/venv"
    "$tmp/venv/bin/pip" install --quiet --no-compile --disable-pip-version-check "$tmp/src" \
        || die "pip could not install the dependencies (PyPI reachable? see above)"
    find "$tmp/venv" -name __pycache__ -prune -exec rm -rf {} +
    "$PY" scripts/relocate_venv.py --clean "$tmp/venv"
    echo "$tmp/venv" >"$tmp/venv/.build-path"
    rm -rf "$out"
    mv "$tmp/venv" "$out"
    # Keep the two newest builds: the previous one is what a downgrade would reuse.
    find "$BUILDDIR" -maxdepth 1 -name 'venv-*' -printf '%T@ %p\n' | sort -rn | tail -n +3 |
        cut -d' ' -f2- | xargs -r rm -rf
}

# CHANGED=1 when the venv was replaced.
install_venv() {
    local stamp_now venv=$ROOT_PREFIX/venv
    stamp_now=$(stamp)
    if [ "$REBUILD" != 1 ] && [ -f "$venv/.checkpointer-stamp" ] &&
        [ "$(cat "$venv/.checkpointer-stamp")" = "$stamp_now" ]; then
        return # up to date
    fi
    local from new=$ROOT_PREFIX/.venv-new old=$ROOT_PREFIX/.venv-old
    build_venv "$stamp_now"
    from=$BUILT
    mkdir -p "$ROOT_PREFIX"
    rm -rf "$new" "$old"
    cleanup+=("$new" "$old")
    cp -a "$from" "$new"
    "$PY" scripts/relocate_venv.py "$new" "$(cat "$from/.build-path")" "$PREFIX/venv"
    rm -f "$new/.build-path"
    if [ "$STAGE" != 1 ]; then
        # Bytecode now, naming the final paths: the daemon's first start after an upgrade
        # does not compile 2,000 modules, and tracebacks name files that exist.
        "$PY" -m compileall -q -j0 -s "$new" -p "$PREFIX/venv" "$new/lib" >/dev/null
    fi
    echo "$stamp_now" >"$new/.checkpointer-stamp"
    if [ -e "$venv" ]; then mv "$venv" "$old"; fi
    mv "$new" "$venv"
    rm -rf "$old"
    CHANGED=1
}

# Copy $1 to $2 (mode $3) unless identical; PUT=1 if it changed.
put() {
    PUT=0
    if [ -f "$2" ] && cmp -s "$1" "$2"; then return; fi
    install -D -m "$3" "$1" "$2"
    PUT=1
}

do_install() {
    [ -x "$PY" ] || die "$INSTALL_PYTHON not found: apt install python3 python3-venv"
    "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "$INSTALL_PYTHON is older than 3.11"
    "$PY" -c 'import ensurepip' 2>/dev/null || die "the venv module is missing: apt install python3-venv"
    local tmp
    CHANGED=0
    install_venv
    for f in checkpointer.yaml s3.yaml demo.yaml checkpointer.env checkpointer.service \
        prometheus-alerts.yaml prometheus.yml; do
        put "configs/$f" "$ROOT_PREFIX/share/configs/$f" 0644
    done
    for f in grafana/checkpointer-dashboard.json grafana/provisioning/*/*; do
        if [ -f "$f" ]; then put "$f" "$ROOT_PREFIX/share/$f" 0644; fi
    done
    put README.md "$ROOT_PREFIX/README.md" 0644
    for f in docs/*.md; do
        put "$f" "$ROOT_PREFIX/$f" 0644
    done

    tmp=$(mktemp)
    cleanup+=("$tmp")
    sed "s|/opt/checkpointer|$PREFIX|g; s|/etc/checkpointer|$SYSCONFDIR|g" \
        configs/checkpointer.service >"$tmp"
    put "$tmp" "$DESTDIR$UNITDIR/$UNIT" 0644
    if [ "$PUT" = 1 ]; then CHANGED=1; fi

    mkdir -p "$DESTDIR$BINDIR"
    local link=$DESTDIR$BINDIR/checkpointer
    if [ -e "$link" ] && [ ! -L "$link" ]; then
        say "$BINDIR/checkpointer exists and is not a symlink: left alone"
    elif [ "$(readlink "$link" 2>/dev/null)" != "$PREFIX/venv/bin/checkpointer" ]; then
        ln -sfn "$PREFIX/venv/bin/checkpointer" "$link"
    fi
    [ "$STAGE" = 1 ] && return 0

    # Config: written once, never over the administrator's. The key file is the daemon's
    # to create (with a new repository) and nobody else's to touch.
    install -d -m 0700 "$DESTDIR$SYSCONFDIR"
    if [ ! -e "$DESTDIR$SYSCONFDIR/config.yaml" ]; then
        install -m 0600 configs/checkpointer.yaml "$DESTDIR$SYSCONFDIR/config.yaml"
        say "wrote $SYSCONFDIR/config.yaml (edit it: workloads, storage)"
    fi
    if [ ! -e "$DESTDIR$SYSCONFDIR/env" ]; then
        install -m 0600 configs/checkpointer.env "$DESTDIR$SYSCONFDIR/env"
    fi

    if systemd_running; then
        systemctl daemon-reload
        if [ "$CHANGED" = 1 ] && systemctl is-active --quiet "$UNIT"; then
            say "restarting the running daemon (it re-adopts its workloads)"
            systemctl restart "$UNIT"
        elif ! systemctl is-enabled --quiet "$UNIT"; then
            say "then: systemctl enable --now checkpointer"
        fi
    fi
    say "installed in $DESTDIR$PREFIX ($BINDIR/checkpointer, $UNITDIR/$UNIT)"
}

do_uninstall() {
    if systemd_running && systemctl cat "$UNIT" >/dev/null 2>&1; then
        # Stops the daemon only (KillMode=process): workloads keep running, unwatched.
        systemctl disable --now --quiet "$UNIT" || true
    fi
    rm -f "$DESTDIR$UNITDIR/$UNIT"
    local link=$DESTDIR$BINDIR/checkpointer
    if [ -L "$link" ] && [ "$(readlink "$link")" = "$PREFIX/venv/bin/checkpointer" ]; then
        rm -f "$link"
    fi
    rm -rf "$ROOT_PREFIX/venv" "$ROOT_PREFIX/.venv-new" "$ROOT_PREFIX/.venv-old" \
        "$ROOT_PREFIX/share" "$ROOT_PREFIX/README.md" "$ROOT_PREFIX/docs"
    rmdir "$ROOT_PREFIX" 2>/dev/null || true
    case "$PURGE" in
        "") say "kept $SYSCONFDIR (config, env, key files) and $STATEDIR" ;;
        config)
            rm -f "$DESTDIR$SYSCONFDIR/config.yaml" "$DESTDIR$SYSCONFDIR/env"
            say "removed config.yaml and env; kept the key files in $SYSCONFDIR and $STATEDIR"
            ;;
        all)
            rm -rf "$DESTDIR$SYSCONFDIR" "$DESTDIR$STATEDIR"
            say "removed $SYSCONFDIR (key files included) and $STATEDIR"
            ;;
        *) die "PURGE=$PURGE: say PURGE=config or PURGE=all" ;;
    esac
    if systemd_running; then systemctl daemon-reload; fi
}

PY=$(readlink -f "$(command -v "$INSTALL_PYTHON" || echo "$INSTALL_PYTHON")")
case "$ACTION" in
    install) do_install ;;
    uninstall) do_uninstall ;;
    *) die "usage: $0 install|uninstall" ;;
esac
