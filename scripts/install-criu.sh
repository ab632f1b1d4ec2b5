#!/usr/bin/env bash
# Keep a working CRIU >= 4.2 on this machine, idempotently.
#
# Why build from source: Debian bookworm ships CRIU 3.17, which fails `criu check` on the
# kernels these hosts run, and 4.1 cannot dump inet sockets on kernels >= 6.16. 4.2.1 works.
# We fetch the upstream tarball through apt's source index of Debian `sid` (pinned so low that
# no binary package is ever installed from it), verify its sha256, and build only `criu`.
set -euo pipefail

WANT_VERSION=4.2.1
TARBALL=criu_${WANT_VERSION}.orig.tar.xz
SHA256=29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9
PREFIX=/usr/local
BUILD_ROOT=${CRIU_BUILD_ROOT:-/var/cache/checkpointer/criu-build}
BUILD_DEPS=(build-essential libprotobuf-c-dev protobuf-c-compiler protobuf-compiler
  libprotobuf-dev python3-protobuf libnl-3-dev libnet1-dev libcap-dev pkg-config libbsd-dev libnftables-dev
  libgnutls28-dev uuid-dev xz-utils iproute2 iptables)

log() { printf 'install-criu: %s\n' "$*" >&2; }

version_ok() {
  # Prints nothing; succeeds when `criu` on PATH is >= 4.2 and `criu check` passes.
  command -v criu >/dev/null 2>&1 || return 1
  local v
  v=$(criu --version 2>/dev/null | awk '/^Version:/ {print $2}')
  [ -n "$v" ] || return 1
  local major minor
  major=${v%%.*}; minor=${v#*.}; minor=${minor%%.*}
  if [ "$major" -lt 4 ] || { [ "$major" -eq 4 ] && [ "$minor" -lt 2 ]; }; then
    log "criu $v on PATH is older than 4.2"
    return 1
  fi
  criu check >/dev/null 2>&1 || { log "criu $v on PATH fails 'criu check'"; return 1; }
  return 0
}

if version_ok; then
  log "criu $(criu --version | awk '/^Version:/ {print $2}') works: nothing to do"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  log "building CRIU needs root (apt-get and install into $PREFIX): run as root"
  exit 1
fi

apt_updated=0
apt_update() { [ "$apt_updated" -eq 1 ] || { apt-get update -qq; apt_updated=1; }; }

missing=()
for p in "${BUILD_DEPS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing build dependencies: ${missing[*]}"
  apt_update
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

mkdir -p "$BUILD_ROOT"
cd "$BUILD_ROOT"
if ! echo "$SHA256  $TARBALL" | sha256sum -c --status 2>/dev/null; then
  # A deb-src entry for sid on the mirror this machine already uses; sid is pinned to -1 so that
  # no binary package can ever come from it.
  uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  if [ -z "$uri" ]; then
    log "cannot find the Debian mirror in /etc/apt/sources.list*: add a deb-src line for sid by hand"
    exit 1
  fi
  src=/etc/apt/sources.list.d/checkpointer-sid-src.sources
  if [ ! -f "$src" ]; then
    printf 'Types: deb-src\nURIs: %s\nSuites: sid\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" >"$src"
    printf 'Package: *\nPin: release n=sid\nPin-Priority: -1\n' >/etc/apt/preferences.d/checkpointer-sid-pin
    apt_updated=0
  fi
  apt_update
  log "downloading CRIU $WANT_VERSION source through apt"
  # The .dsc or .debian.tar.xz may be missing on the mirror; only the orig tarball is needed.
  apt-get source --download-only -qq "criu=${WANT_VERSION}-1" >/dev/null 2>&1 || true
  if ! echo "$SHA256  $TARBALL" | sha256sum -c --status; then
    log "could not obtain $TARBALL with sha256 $SHA256 (apt-get source criu=${WANT_VERSION}-1)"
    exit 1
  fi
fi

srcdir="$BUILD_ROOT/criu-$WANT_VERSION"
if [ ! -x "$srcdir/criu/criu" ]; then
  rm -rf "$srcdir"
  tar -xf "$TARBALL"
  log "building criu (about a minute)"
  make -C "$srcdir" -j"$(nproc)" criu >"$BUILD_ROOT/build.log" 2>&1 || {
    log "build failed; see $BUILD_ROOT/build.log"; tail -n 20 "$BUILD_ROOT/build.log" >&2; exit 1; }
fi
install -m 0755 "$srcdir/criu/criu" "$PREFIX/sbin/criu"
hash -r
if ! version_ok; then
  log "installed $PREFIX/sbin/criu but it does not pass 'criu check': run 'criu check' to see why"
  exit 1
fi
log "criu $(criu --version | awk '/^Version:/ {print $2}') installed at $PREFIX/sbin/criu"
