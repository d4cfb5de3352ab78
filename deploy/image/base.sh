#!/bin/bash
# `make image-base`: a local stand-in for python:3.11-slim-bookworm, made from Debian's
# own packages where no registry is reachable (the official image cannot be pulled).
#
#   deploy/image/base.sh [IMAGE]        # default localhost/penaltyd-base:bookworm
#
# debootstrap --variant=minbase (Debian's Essential packages and apt, what
# debian:bookworm-slim is made of) plus Python 3.11 from bookworm (python3, python3-venv,
# python-is-python3 for `python`, ca-certificates so pip reaches PyPI over TLS, netbase,
# tzdata), trimmed like the slim images (no docs, man pages, locales, apt lists), then
# imported with `buildah from scratch` + `buildah add` + `buildah commit`. Runs as root;
# the rootfs lives in a temporary directory that is removed on exit. Reproducible: the
# same mirror snapshot gives the same packages (MIRROR, default the apt source's).
#
# Differences from python:3.11-slim that the Dockerfile copes with: Python is Debian's
# (/usr/bin/python3.11, 3.11.2) and the base has no pip of its own; the builder stage
# makes a throwaway virtualenv for pip on either base.
set -euo pipefail

IMAGE=${1:-localhost/penaltyd-base:bookworm}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
INCLUDE=python3,python3-venv,python-is-python3,ca-certificates,netbase,tzdata

[ "$(id -u)" = 0 ] || { echo "base.sh: run as root (debootstrap, buildah)" >&2; exit 1; }
for tool in debootstrap buildah; do
  command -v "$tool" >/dev/null || { echo "base.sh: $tool is missing (make image-base installs it)" >&2; exit 1; }
done

work=$(mktemp -d /tmp/penaltyd-base.XXXXXX)
ctr=""
cleanup() {
  [ -z "$ctr" ] || buildah rm "$ctr" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

rootfs=$work/rootfs
start=$SECONDS
echo "image-base: debootstrap --variant=minbase $SUITE ($MIRROR) + $INCLUDE"
debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$rootfs" "$MIRROR" \
  > "$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
echo "image-base: debootstrap took $((SECONDS - start)) s"

# What the slim images leave out, and what a chroot build leaves behind.
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
       "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
       "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*.log "$rootfs"/var/log/apt/* \
       "$rootfs"/var/cache/debconf/*-old "$rootfs"/var/lib/dpkg/*-old "$rootfs"/tmp/* \
       "$rootfs"/debootstrap
find "$rootfs"/usr/lib/python3* -name __pycache__ -prune -exec rm -rf {} +
: > "$rootfs"/etc/machine-id

tarball=$work/rootfs.tar
tar --numeric-owner --xattrs -C "$rootfs" -cf "$tarball" .
ctr=$(buildah from scratch)
buildah add --quiet "$ctr" "$tarball" / >/dev/null
buildah config \
  --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  --env LANG=C.UTF-8 \
  --cmd python3 \
  --label org.opencontainers.image.title="penaltyd-base" \
  --label org.opencontainers.image.description="Debian $SUITE minbase + python3 (make image-base)" \
  "$ctr"
buildah commit --quiet --rm "$ctr" "$IMAGE" >/dev/null
ctr=""
echo "image-base: $IMAGE ($(du -sh "$rootfs" | cut -f1) rootfs) in $((SECONDS - start)) s"
