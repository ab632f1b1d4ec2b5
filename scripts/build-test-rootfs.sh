#!/usr/bin/env bash
# The root filesystem the container tests run in: Debian bookworm (minbase + python3-minimal)
# from the machine's own apt mirror, built once into /var/cache/checkpointer-tests and reused.
# Idempotent: a second run finds it and does nothing. Podman's test image is imported from it.
set -euo pipefail
CACHE=${CHECKPOINTER_TEST_CACHE:-/var/cache/checkpointer-tests}
VERSION=v1
ROOTFS=$CACHE/rootfs-$VERSION
IMAGE=localhost/checkpointer-test:$VERSION
MIRROR=${DEBIAN_MIRROR:-$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

if [ ! -x "$ROOTFS/usr/bin/python3" ]; then
    mkdir -p "$CACHE"
    chmod 0700 "$CACHE"
    tmp=$(mktemp -d "$CACHE/.rootfs-XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
    echo "building the container tests' rootfs (debootstrap, once) into $ROOTFS"
    debootstrap --variant=minbase --include=python3-minimal bookworm "$tmp/rootfs" "$MIRROR" \
        >"$CACHE/debootstrap.log" 2>&1 || { tail -20 "$CACHE/debootstrap.log"; exit 1; }
    # What a test never reads: docs, locales, apt's lists and caches (about 140 MB).
    rm -rf "$tmp"/rootfs/usr/share/{doc,man,info,locale} "$tmp"/rootfs/var/cache/apt/* \
        "$tmp"/rootfs/var/lib/apt/lists/*
    rm -rf "$ROOTFS"
    mv "$tmp/rootfs" "$ROOTFS"
fi

if command -v podman >/dev/null && ! podman image exists "$IMAGE"; then
    echo "importing $IMAGE into podman (once)"
    tar -C "$ROOTFS" -c . | podman import - "$IMAGE" >/dev/null 2>&1
fi
# The image as an archive, for test hosts whose container storage starts empty.
if command -v podman >/dev/null && [ ! -s "$CACHE/image-$VERSION.tar" ]; then
    podman save -o "$CACHE/.image-$VERSION.tar" "$IMAGE" >/dev/null 2>&1
    mv "$CACHE/.image-$VERSION.tar" "$CACHE/image-$VERSION.tar"
fi
