#!/usr/bin/env bash
# Debian packages the project needs beyond CRIU: Redis and Prometheus (with promtool) for the
# tests, iproute2 and util-linux (ip, nsenter, unshare) for the fleet tests' hosts.
# Idempotent: asks apt only for what is missing.
set -euo pipefail
want=("$@")
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "install-system-deps: missing ${missing[*]}; run as root to install them" >&2
  exit 1
fi
echo "install-system-deps: installing ${missing[*]}" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
