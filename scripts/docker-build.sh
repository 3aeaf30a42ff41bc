#!/usr/bin/env bash
# `make docker-build`: the lclb and demo upstream images, FROM scratch, from binaries built on
# this machine, so nothing is pulled and no registry is needed.
#
#   scripts/docker-build.sh                # DOCKER=docker|podman, detected when unset
#   IMAGE=lclb:dev UPSTREAM_IMAGE=up:dev scripts/docker-build.sh
#
# Runs scripts/build-static.sh (static musl lclb and examples/upstream), copies the two binaries
# into docker/stage/ (inside the build context; target/ is not), builds both targets of
# docker/Dockerfile.prebuilt (with podman in the docker image format, which keeps the
# HEALTHCHECK) and prints each image's size. Environment: DOCKER, IMAGE (default lclb:latest),
# UPSTREAM_IMAGE (default lclb-upstream:latest), TARGET (see build-static.sh), BUILD=0 to
# reuse the binaries already built.
set -euo pipefail

# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
# shellcheck source=scripts/lib/engine.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/engine.sh"
help_if_asked "$@"

IMAGE=${IMAGE:-lclb:latest}
UPSTREAM_IMAGE=${UPSTREAM_IMAGE:-lclb-upstream:latest}
TARGET=${TARGET:-$(uname -m)-unknown-linux-musl}
BUILD=${BUILD:-1}
export TARGET

engine_setup
cd "$REPO_ROOT"

if [[ "$BUILD" != 0 ]]; then
  scripts/build-static.sh
fi
release="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/$TARGET/release"
stage=docker/stage
mkdir -p "$stage"
for pair in "lclb:$release/lclb" "upstream:$release/examples/upstream"; do
  name=${pair%%:*}
  bin=${pair#*:}
  [[ -x "$bin" ]] || die "$bin is missing: run make static"
  # A copy, not a link: the build context must hold the file itself.
  cp "$bin" "$stage/$name.tmp"
  mv "$stage/$name.tmp" "$stage/$name"
done

format=()
if [[ "$DOCKER" == podman ]]; then
  format=(--format docker)
fi
for pair in "lclb:$IMAGE" "upstream:$UPSTREAM_IMAGE"; do
  stage_name=${pair%%:*}
  tag=${pair#*:}
  echo "building $tag (docker/Dockerfile.prebuilt, target $stage_name) with $DOCKER"
  "$DOCKER" build "${format[@]}" -f docker/Dockerfile.prebuilt --target "$stage_name" \
    -t "$tag" .
done

for tag in "$IMAGE" "$UPSTREAM_IMAGE"; do
  size=$(image_size "$tag")
  echo "image $tag: $(human_size "$size") ($size bytes)"
done
