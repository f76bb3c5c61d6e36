#!/usr/bin/env bash
# Builds the sluice-proxy and sluice-control-plane images as OCI archives, with no
# registry and no base image to pull: a Debian bookworm root filesystem made by
# debootstrap (minbase; plus iptables for the proxy's `init`), the release binaries
# built on this host, and the image config set with buildah. The Dockerfiles in
# proxy/ and control-plane/ stay for people who build with a registry at hand; this
# script gives the same config (images/check.py compares them).
#
#   images/build.sh                 # -> target/images/sluice-{proxy,control-plane}.oci.tar
#   TAG=0.1.0 OUT=/tmp/img images/build.sh
#   PROFILE=dev images/build.sh     # debug binaries: a quick check of the image itself
#   PREBUILT=1 PROFILE=dev images/build.sh   # the debug binaries `cargo test --workspace`
#                                   # already built, as they are (what .ci/run does)
#   PGO=0 images/build.sh           # the proxy without profile guidance: a release image's
#                                   # proxy is otherwise built by examples/bench/pgo.sh (two
#                                   # more release builds and a short training load; about
#                                   # 0.8x the CPU per request of the plain build, BENCHMARKS.md)
#   PGO=1 PROFILE=... images/build.sh   # profile-guided whatever the profile
#
# Needs root (debootstrap, buildah's vfs storage) and Debian's buildah and debootstrap
# packages (installed here when missing). The root filesystems are cached in
# $CACHE (default ~/.cache/sluice-images) and reused; delete it to refresh them.
set -euo pipefail
cd "$(dirname "$0")/.."

TAG="${TAG:-$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)}"
OUT="${OUT:-target/images}"
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
PROFILE="${PROFILE:-release}"
PROFILE_DIR="$PROFILE"
[ "$PROFILE" = dev ] && PROFILE_DIR=debug
CACHE="${CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sluice-images}"
SUITE=bookworm
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
# buildah's default overlay driver needs kernel overlay support inside the sandbox;
# vfs (plain copies) works everywhere.
BUILDAH=(buildah --storage-driver vfs)

missing=()
command -v buildah >/dev/null || missing+=(buildah)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ -n "${PREBUILT:-}" ]; then
  # Building only these two packages would resolve features apart from the workspace
  # test build and compile the control plane again; the test run's binaries will do.
  for bin in sluice-proxy sluice-control-plane; do
    [ -x "$TARGET_DIR/$PROFILE_DIR/$bin" ] || {
      echo "images/build.sh: PREBUILT is set but $TARGET_DIR/$PROFILE_DIR/$bin is not built" >&2
      exit 1
    }
  done
  echo "== $PROFILE binaries already built in $TARGET_DIR/$PROFILE_DIR"
else
  echo "== $PROFILE binaries (host build)"
  cargo build --profile "$PROFILE" --locked -p sluice-proxy --bin sluice-proxy \
    -p sluice-control-plane --bin sluice-control-plane
fi

# Where each image's binary comes from.
declare -A SRC=(
  [sluice-proxy]="$TARGET_DIR/$PROFILE_DIR/sluice-proxy"
  [sluice-control-plane]="$TARGET_DIR/$PROFILE_DIR/sluice-control-plane"
)
# Release images ship the profile-guided proxy, as measured; a quick or prebuilt image
# (PROFILE=dev, PREBUILT=1) does not wait for two more builds.
PGO_DEFAULT=0
[ "$PROFILE" = release ] && [ -z "${PREBUILT:-}" ] && PGO_DEFAULT=1
if [ "${PGO:-$PGO_DEFAULT}" = 1 ]; then
  echo "== sluice-proxy, profile-guided (examples/bench/pgo.sh)"
  SRC[sluice-proxy]="$(CARGO_TARGET_DIR="$TARGET_DIR" examples/bench/pgo.sh | tail -1)"
fi

# rootfs NAME EXTRA-PACKAGES: a cached debootstrap root filesystem.
rootfs() {
  local dir="$CACHE/rootfs-$1"
  if [ ! -f "$dir/.complete" ]; then
    rm -rf "$dir"
    echo "== debootstrap $SUITE ($1${2:+, with $2})" >&2
    debootstrap --variant=minbase ${2:+--include="$2"} "$SUITE" "$dir" "$MIRROR" >&2
    # What an image does not need: package lists and caches.
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/var/cache/apt/archives/*.deb
    touch "$dir/.complete"
  fi
  echo "$dir"
}

# image NAME ROOTFS BINARY CONFIG-ARGS...: one OCI archive from a root filesystem.
image() {
  local name="$1" root="$2" bin="$3"
  shift 3
  local ctr
  ctr="$("${BUILDAH[@]}" from --name "$name-build-$$" scratch)"
  trap '"${BUILDAH[@]}" rm "$ctr" >/dev/null 2>&1 || true' RETURN
  local mnt
  mnt="$("${BUILDAH[@]}" mount "$ctr")"
  cp -a "$root"/. "$mnt"/
  rm -f "$mnt/.complete"
  install -m 0755 "${SRC[$bin]}" "$mnt/usr/local/bin/$bin"
  "${BUILDAH[@]}" umount "$ctr" >/dev/null
  "${BUILDAH[@]}" config "$@" \
    --label org.opencontainers.image.title="$name" \
    --label org.opencontainers.image.version="$TAG" \
    --label org.opencontainers.image.source="https://github.com/sluice-mesh/sluice" \
    "$ctr"
  mkdir -p "$OUT"
  rm -f "$OUT/$name.oci.tar"
  "${BUILDAH[@]}" commit --format oci --rm "$ctr" "oci-archive:$OUT/$name.oci.tar:$name:$TAG" >/dev/null
  echo "== $OUT/$name.oci.tar ($name:$TAG)"
}

proxy_root="$(rootfs proxy iptables)"
cp_root="$(rootfs control-plane "")"

# As proxy/Dockerfile: UID 1337 is what `init`'s iptables rules exempt and what the
# injection webhook runs the sidecar as.
image sluice-proxy "$proxy_root" sluice-proxy \
  --user 1337:1337 \
  --env SLUICE_ADMIN=0.0.0.0:15000 \
  --port 15000/tcp --port 15001/tcp --port 15006/tcp \
  --entrypoint '["sluice-proxy"]' --cmd '["run"]'

# As control-plane/Dockerfile, whose distroless `nonroot` base runs as 65532, the
# UID the chart's securityContext names.
image sluice-control-plane "$cp_root" sluice-control-plane \
  --user 65532:65532 \
  --port 15010/tcp --port 15014/tcp \
  --entrypoint '["/usr/local/bin/sluice-control-plane"]' --cmd '[]'
