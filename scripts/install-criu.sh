#!/usr/bin/env bash
# Keep a working CRIU >= 4.2 on this machine, idempotently.
#
# Why build from source: Debian bookworm ships CRIU 3.17, which fails `criu check` on the
# kernels these hosts run, and 4.1 cannot dump inet sockets on kernels >= 6.16. 4.2.1 works and
# is the tested floor. We fetch the upstream tarball through apt's source index of Debian `sid`
# (pinned so low that no binary package is ever installed from it), taking the newest CRIU
# >= 4.2.1 that sid offers (sid drops old versions), check the tarball's sha256 against the
# signed index (and, for 4.2.1, against the sha256 known here), and build only `criu`.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export CRIU_FLOOR=4.2.1
# The tested version's tarball, as it was checked when it was tested.
KNOWN_TARBALL=criu_4.2.1.orig.tar.xz
KNOWN_SHA256=29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9
PREFIX=/usr/local
# CRIU probes the kernel at every start (~25-50 ms here) unless its cache of the probes
# (criu.kdat) is on tmpfs, and it looks for that cache in RUNDIR (/run by default). /run is
# not a tmpfs on these machines, so the CRIU built here looks in a folder of its own, which
# this script and the daemon make a root-only tmpfs (checkpointer/criu/kdat_cache.py).
KDAT_DIR=/run/checkpointer-criu
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

kdat_dir() {
  # A root-only tmpfs for the probe cache of the CRIU built here (a reboot empties it, as
  # CRIU wants); nothing to do for another CRIU, or where the folder already is one.
  grep -qa "$KDAT_DIR/criu.kdat" "$PREFIX/sbin/criu" 2>/dev/null || return 0
  [ "$(id -u)" -eq 0 ] || return 0
  if [ -L "$KDAT_DIR" ] || { [ -e "$KDAT_DIR" ] && [ ! -d "$KDAT_DIR" ]; }; then
    log "$KDAT_DIR is not a folder: CRIU runs without its probe cache"; return 0
  fi
  mkdir -p -m 0700 "$KDAT_DIR" || { log "cannot make $KDAT_DIR: CRIU runs without its probe cache"; return 0; }
  if [ "$(stat -c %u:%a "$KDAT_DIR")" != 0:700 ]; then
    log "$KDAT_DIR is not root's with mode 0700: CRIU runs without its probe cache"; return 0
  fi
  if [ "$(stat -f -c %T "$KDAT_DIR")" != tmpfs ]; then
    mount -t tmpfs -o mode=0700,size=1m,nosuid,nodev,noexec checkpointer-criu "$KDAT_DIR" ||
      log "cannot mount a tmpfs on $KDAT_DIR: CRIU runs without its probe cache"
  fi
  return 0
}

built_here() {
  # The CRIU on PATH is one this script built before the probe cache moved (the same bytes
  # as a build here without the folder in it): rebuilt once. Any other CRIU is left alone.
  local b
  [ "$(command -v criu)" = "$PREFIX/sbin/criu" ] || return 1
  for b in "$BUILD_ROOT"/criu-*/criu/criu; do
    if [ -x "$b" ] && cmp -s "$b" "$PREFIX/sbin/criu" && ! grep -qa "$KDAT_DIR/criu.kdat" "$b"; then
      return 0
    fi
  done
  return 1
}

if version_ok && ! built_here; then
  kdat_dir
  log "criu $(criu --version | awk '/^Version:/ {print $2}') works: nothing to do"
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  log "building CRIU needs root (apt-get and install into $PREFIX): run as root"
  exit 1
fi

apt_updated=0
apt_update() { [ "$apt_updated" -eq 1 ] || { apt-get update -qq && apt_updated=1; }; }

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
# A deb-src entry for sid on the mirror this machine already uses; sid is pinned to -1 so that
# no binary package can ever come from it.
src=/etc/apt/sources.list.d/checkpointer-sid-src.sources
if [ ! -f "$src" ]; then
  uri=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '/^deb / {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  if [ -z "$uri" ]; then
    log "cannot find the Debian mirror in /etc/apt/sources.list*: add a deb-src line for sid by hand"
    exit 1
  fi
  printf 'Types: deb-src\nURIs: %s\nSuites: sid\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' "$uri" >"$src"
  printf 'Package: *\nPin: release n=sid\nPin-Priority: -1\n' >/etc/apt/preferences.d/checkpointer-sid-pin
  apt_updated=0
fi
# Fresh lists, so that the version sid offers today is the one fetched; offline, the lists
# already here (and a tarball already downloaded) still do.
apt_update || log "apt-get update failed: using the package lists already on this machine"

# DEBIAN_VERSION UPSTREAM_VERSION ORIG_TARBALL SHA256 (the sha256 from apt's signed index).
pick=$(bash "$HERE/criu-source-version.sh") || { log "no CRIU >= $CRIU_FLOOR to build (see above)"; exit 1; }
read -r deb_version version tarball sha256 <<<"$pick"
if [ "$version" = "$CRIU_FLOOR" ] && { [ "$tarball" != "$KNOWN_TARBALL" ] || [ "$sha256" != "$KNOWN_SHA256" ]; }; then
  log "apt's index lists $tarball with sha256 $sha256, not the tested $KNOWN_TARBALL $KNOWN_SHA256"
  exit 1
fi
[ "$version" = "$CRIU_FLOOR" ] || log "sid offers CRIU $version (newer than the tested $CRIU_FLOOR): building it"

if ! echo "$sha256  $tarball" | sha256sum -c --status 2>/dev/null; then
  rm -f "$tarball"
  log "downloading CRIU $deb_version source through apt"
  # apt checks what it downloads against the signed Sources index. The .dsc or
  # .debian.tar.xz may be missing on the mirror (apt then exits non-zero): only the orig
  # tarball is needed, and it is checked below.
  apt-get source --download-only -qq "criu=${deb_version}" >/dev/null 2>&1 || true
  if ! echo "$sha256  $tarball" | sha256sum -c --status 2>/dev/null; then
    log "could not obtain $tarball with sha256 $sha256 (apt-get source criu=${deb_version})"
    exit 1
  fi
fi

srcdir="$BUILD_ROOT/criu-$version"
if [ ! -x "$srcdir/criu/criu" ] || ! grep -qa "$KDAT_DIR/criu.kdat" "$srcdir/criu/criu"; then
  rm -rf "$srcdir"
  tar -xf "$tarball"
  if [ ! -d "$srcdir" ]; then
    log "$tarball did not unpack into $srcdir"
    exit 1
  fi
  log "building criu $version (about a minute)"
  make -C "$srcdir" -j"$(nproc)" RUNDIR="$KDAT_DIR" criu >"$BUILD_ROOT/build.log" 2>&1 || {
    log "build failed; see $BUILD_ROOT/build.log"; tail -n 20 "$BUILD_ROOT/build.log" >&2; exit 1; }
fi
install -m 0755 "$srcdir/criu/criu" "$PREFIX/sbin/criu"
hash -r
if ! version_ok; then
  log "installed $PREFIX/sbin/criu but it does not pass 'criu check': run 'criu check' to see why"
  exit 1
fi
kdat_dir
log "criu $(criu --version | awk '/^Version:/ {print $2}') installed at $PREFIX/sbin/criu"
