#!/usr/bin/env bash
# `make deb`: checkpointer_VERSION_ARCH.deb in OUTDIR (default: this checkout), built with
# dpkg-deb from a staged tree, without network at packaging time beyond what `make install`
# needs (the venv comes from the same cached build, BUILDDIR: see scripts/install.sh).
#
# The package holds what `make install` installs, in Debian's places for a package:
# /opt/checkpointer (the same files), /usr/bin/checkpointer (not /usr/local, which belongs to
# the administrator) and /lib/systemd/system/checkpointer.service. Its maintainer scripts
# (packaging/deb/) write /etc/checkpointer/{config.yaml,env} when absent, compile the
# bytecode, restart a running daemon on upgrade, and on purge keep the key files and the
# state unless CHECKPOINTER_PURGE_ALL=yes.
#
# VERSION: pyproject's version + the commit count, so that a newer checkout's package is an
# upgrade for dpkg (override with DEB_VERSION).
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
OUTDIR=${OUTDIR:-$PWD}
INSTALL_PYTHON=${INSTALL_PYTHON:-/usr/bin/python3}
export INSTALL_PYTHON

base=$(grep -m1 '^version *=' pyproject.toml | sed 's/.*"\(.*\)".*/\1/')
count=$(git rev-list --count HEAD 2>/dev/null || echo 0)
VERSION=${DEB_VERSION:-$base+$count}
ARCH=$(dpkg --print-architecture)

stage=$(mktemp -d "${TMPDIR:-/tmp}/checkpointer-deb-XXXXXX")
chmod 0755 "$stage"
trap 'rm -rf "$stage"' EXIT
DESTDIR=$stage STAGE=1 PREFIX=/opt/checkpointer BINDIR=/usr/bin \
    UNITDIR=/lib/systemd/system SYSCONFDIR=/etc/checkpointer bash scripts/install.sh install

install -d -m 0755 "$stage/DEBIAN"
for f in postinst prerm postrm; do
    install -m 0755 "packaging/deb/$f" "$stage/DEBIAN/$f"
done
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed "s/@VERSION@/$VERSION/; s/@ARCH@/$ARCH/; s/@SIZE@/$size/" packaging/deb/control.in \
    >"$stage/DEBIAN/control"
mkdir -p "$OUTDIR"
out=$OUTDIR/checkpointer_${VERSION}_${ARCH}.deb
# zstd: 2 s for the 170 MB tree and the smallest; xz takes a minute, gzip 20 s. dpkg reads
# zstd since 1.21.18 (Debian 12, Ubuntu 21.10); DEB_COMPRESS=gzip for older ones.
dpkg-deb --root-owner-group "-Z${DEB_COMPRESS:-zstd}" --build "$stage" "$out" >/dev/null
echo "$out"
