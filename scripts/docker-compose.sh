#!/usr/bin/env bash
# `make docker-compose`: docker/docker-compose.yml (lclb and three demo upstreams) under the
# project name lclb, with the engine's compose (DOCKER=docker|podman, detected when unset).
#
#   scripts/docker-compose.sh              # up in the foreground (Ctrl-C stops)
#   scripts/docker-compose.sh up -d        # any compose arguments
#   scripts/docker-compose.sh down         # with podman, also removes the project's networks
#
# The images must exist (make docker-build); lclb runs as the owner of
# certs/server/server.key.pem (LCLB_USER overrides), with the compose file's other settings
# (LCLB_PORT, LCLB_CONFIG, LCLB_CERTS). With podman, lclb gets a resolv.conf that names only
# the backend network's DNS server (see compose_prepare in scripts/lib/engine.sh).
set -euo pipefail

# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
# shellcheck source=scripts/lib/engine.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/engine.sh"
help_if_asked "$@"

engine_setup
compose_available || die "${COMPOSE[*]} is missing (Debian: apt-get install podman-compose; Docker: the compose plugin)"
cd "$REPO_ROOT"
[[ $# -gt 0 ]] || set -- up --no-build

project=lclb
if [[ "$1" == down ]]; then
  "${COMPOSE[@]}" -p "$project" -f docker/docker-compose.yml "$@"
  if [[ "$DOCKER" == podman ]]; then
    # podman-compose 1.0.3's down leaves the networks.
    mapfile -t nets < <(podman network ls -q --filter "label=com.docker.compose.project=$project")
    ((${#nets[@]} == 0)) || podman network rm "${nets[@]}" >/dev/null
  fi
  exit 0
fi

if [[ -z "${LCLB_USER:-}" ]]; then
  key=${LCLB_CERTS:-$REPO_ROOT/certs}/server/server.key.pem
  [[ -f "$key" ]] || die "no $key: run 'make certs' first (or set LCLB_CERTS)"
  LCLB_USER=$(stat -c %u:%g "$key")
fi
export LCLB_USER
compose_prepare "$project" "$REPO_ROOT/target/compose"
exec "${COMPOSE[@]}" -p "$project" "${COMPOSE_FILES[@]}" "$@"
