# shellcheck shell=bash
# The container engine for the docker-* scripts: sourced, not run (needs common.sh first).
#
# DOCKER=docker|podman picks the engine; unset, it is podman when `podman` is installed and
# docker has no reachable daemon, else docker. COMPOSE is the matching compose command
# (`docker compose`, or `podman-compose`: podman 4 has no `compose` of its own).
#
# For podman, when CONTAINERS_CONF is unset, engine_setup writes a containers.conf into
# target/ and points CONTAINERS_CONF at it: the runc runtime when runc is installed (crun, the
# default, fails on hosts with hybrid cgroups), and default ulimits that the host accepts
# (podman's defaults exceed its hard limits on some hosts, and no container starts): nofile at
# the host's hard limit, nproc at 4096 or the hard limit if lower (a host has been seen to
# refuse even its own hard limit for nproc). Set CONTAINERS_CONF to a file of your own for
# other figures.

# detect_engine: prints docker or podman (see above).
detect_engine() {
  if command -v podman >/dev/null 2>&1 &&
    ! { command -v docker >/dev/null 2>&1 && timeout 10 docker info >/dev/null 2>&1; }; then
    echo podman
  else
    echo docker
  fi
}

# engine_setup: sets DOCKER, COMPOSE (an array) and, for podman, CONTAINERS_CONF; dies with
# the install hint when the engine or its compose command is missing.
engine_setup() {
  DOCKER=${DOCKER:-$(detect_engine)}
  case "$DOCKER" in
    docker) COMPOSE=(docker compose) ;;
    podman) COMPOSE=(podman-compose) ;;
    *) die "DOCKER must be docker or podman, not '$DOCKER'" ;;
  esac
  command -v "$DOCKER" >/dev/null 2>&1 ||
    die "$DOCKER is not installed (Debian: apt-get install podman runc podman-compose)"
  if [[ "$DOCKER" == podman && -z "${CONTAINERS_CONF:-}" ]]; then
    local conf="$REPO_ROOT/target/containers.conf" nofile nproc
    nofile=$(ulimit -Hn)
    nproc=$(ulimit -Hu)
    if [[ "$nproc" == unlimited ]] || ((nproc > 4096)); then
      nproc=4096
    fi
    mkdir -p "$REPO_ROOT/target"
    {
      echo "# Written by scripts/lib/engine.sh for the docker-* make targets."
      if command -v runc >/dev/null 2>&1; then
        printf '[engine]\nruntime = "runc"\n'
      fi
      echo "[containers]"
      local limits=()
      [[ "$nofile" == unlimited ]] || limits+=("\"nofile=$nofile:$nofile\"")
      limits+=("\"nproc=$nproc:$nproc\"")
      local IFS=,
      echo "default_ulimits = [${limits[*]}]"
    } >"$conf.tmp"
    mv "$conf.tmp" "$conf"
    export CONTAINERS_CONF=$conf
  fi
  export DOCKER
}

# compose_available: true when COMPOSE runs.
compose_available() {
  "${COMPOSE[@]}" version >/dev/null 2>&1
}

# image_size IMAGE: the image's size in bytes, as the engine reports it.
image_size() {
  "$DOCKER" image inspect --format '{{.Size}}' "$1"
}

# human_size BYTES: "6.1 MiB".
human_size() {
  awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'
}

# compose_prepare PROJECT DIR: sets COMPOSE_FILES, the -f arguments for docker/docker-compose.yml
# under project PROJECT, with podman plus an override written into DIR.
#
# Why the override: podman writes into each container's resolv.conf the DNS server of every
# network it joins and the host's servers after them, and musl's resolver (the static binary's)
# asks all of them at once and takes the first answer, "no such name" included. For lclb,
# on the frontend and backend networks, the frontend's server and the host's do not know the
# upstreams' names, so a lookup of web1 failed now and then (about 1 in 7 here), and with it a
# start, a reload or the health check. So the networks are made here (as podman-compose would
# name and make them: keep them in step with the compose file) and lclb gets a resolv.conf
# naming only the backend network's server. Docker's one embedded server (127.0.0.11) knows
# every network of the container: nothing to do there.
compose_prepare() {
  local project=$1 dir=$2 net gw args
  COMPOSE_FILES=(-f "$REPO_ROOT/docker/docker-compose.yml")
  [[ "$DOCKER" == podman ]] || return 0
  for net in frontend backend; do
    if ! podman network exists "${project}_$net"; then
      args=(--label "io.podman.compose.project=$project" --label "com.docker.compose.project=$project")
      [[ "$net" == backend ]] && args+=(--internal)
      podman network create "${args[@]}" "${project}_$net" >/dev/null
    fi
  done
  gw=$(podman network inspect --format '{{(index .Subnets 0).Gateway}}' "${project}_backend")
  [[ -n "$gw" ]] || die "network ${project}_backend has no gateway, so no DNS server"
  mkdir -p "$dir"
  printf 'search dns.podman\nnameserver %s\n' "$gw" >"$dir/resolv.conf"
  chmod 0644 "$dir/resolv.conf"
  cat >"$dir/compose.podman.yml" <<YAML
# Written by scripts/lib/engine.sh (compose_prepare): lclb asks only the backend's DNS server.
services:
  lclb:
    volumes:
      - $dir/resolv.conf:/etc/resolv.conf:ro
YAML
  COMPOSE_FILES+=(-f "$dir/compose.podman.yml")
}
