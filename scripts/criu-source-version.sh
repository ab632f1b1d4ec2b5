#!/usr/bin/env bash
# Pick the CRIU source to build: the newest `criu` source package >= the tested floor that
# apt's source index offers, and its orig tarball with the sha256 from the signed index.
#
# Usage: criu-source-version.sh [SHOWSRC_FILE]
#   Reads `apt-cache showsrc criu` output from SHOWSRC_FILE (the tests give fake outputs),
#   else from $CRIU_SHOWSRC_FILE, else runs `apt-cache showsrc criu`.
# Prints one line: DEBIAN_VERSION UPSTREAM_VERSION ORIG_TARBALL SHA256
# Exits 1 with a message on stderr when no acceptable version is offered.
set -euo pipefail

CRIU_FLOOR=${CRIU_FLOOR:-4.2.1}

criu_pick_source() {
  # $1: file holding `apt-cache showsrc criu` output.
  local showsrc=$1 candidates best="" ver up tarball sha seen=""
  # One line per `criu` stanza: VERSION TARBALL SHA256 (tarball and sha "-" when not listed).
  candidates=$(awk '
    function flush() {
      if (pkg == "criu" && ver != "") print ver, (tb == "" ? "-" : tb), (sha == "" ? "-" : sha)
      pkg = ""; ver = ""; tb = ""; sha = ""; insha = 0
    }
    /^$/ { flush(); next }
    /^[^ \t]/ {
      insha = ($1 == "Checksums-Sha256:")
      if ($1 == "Package:") pkg = $2
      if ($1 == "Version:") ver = $2
      next
    }
    insha && NF == 3 && $3 ~ /^criu_[^_\/]+\.orig\.tar\.(xz|gz|bz2)$/ { tb = $3; sha = $1 }
    END { flush() }
  ' "$showsrc")
  while read -r ver tarball sha; do
    [ -n "$ver" ] || continue
    seen="$seen $ver"
    dpkg --compare-versions "$ver" ge "$CRIU_FLOOR" || continue
    if [ -z "$best" ] || dpkg --compare-versions "$ver" gt "${best%% *}"; then
      best="$ver $tarball $sha"
    fi
  done <<<"$candidates"
  if [ -z "$seen" ]; then
    echo "criu-source-version: apt offers no criu source package (is the deb-src entry for sid" \
      "in /etc/apt/sources.list.d/ and has 'apt-get update' run?)" >&2
    return 1
  fi
  if [ -z "$best" ]; then
    echo "criu-source-version: apt offers criu${seen}, older than the tested $CRIU_FLOOR;" \
      "need a source index (Debian sid) with criu >= $CRIU_FLOOR" >&2
    return 1
  fi
  read -r ver tarball sha <<<"$best"
  up=${ver#*:}  # no epoch
  up=${up%-*}   # no Debian revision
  if ! [[ $up =~ ^[0-9][A-Za-z0-9.+~]*$ ]]; then
    echo "criu-source-version: unexpected upstream version '$up' (from $ver)" >&2
    return 1
  fi
  if [ "$tarball" = "-" ] || [ "${tarball%.orig.tar.*}" != "criu_$up" ] ||
    ! [[ $sha =~ ^[0-9a-f]{64}$ ]]; then
    echo "criu-source-version: criu $ver in apt's index lists no Checksums-Sha256 for" \
      "criu_$up.orig.tar.*" >&2
    return 1
  fi
  printf '%s %s %s %s\n' "$ver" "$up" "$tarball" "$sha"
}

main() {
  local file=${1:-${CRIU_SHOWSRC_FILE:-}} tmp rc=0
  if [ -n "$file" ]; then
    criu_pick_source "$file"
    return
  fi
  tmp=$(mktemp)
  # apt-cache exits non-zero when it knows no criu source: that is reported as "offers none".
  apt-cache showsrc criu >"$tmp" 2>/dev/null || true
  criu_pick_source "$tmp" || rc=$?
  rm -f "$tmp"
  return "$rc"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
