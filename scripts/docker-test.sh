#!/usr/bin/env bash
# `make docker-test`: the container path end to end, in a real engine (DOCKER=docker|podman,
# detected when unset; run as root).
#
#   scripts/docker-test.sh
#   BUILD=0 scripts/docker-test.sh      # images already built by make docker-build
#
# Builds the images (scripts/docker-build.sh), writes fresh certificates into a temporary
# folder (owned by 65534, keys mode 0400), starts docker/docker-compose.yml under a project
# name of its own (lclb and three upstreams on private networks, lclb published on a free
# port of 127.0.0.1 only, running as 65534:65534), waits until the image's health check passes,
# then checks from the host:
#   - scripts/test-mtls.sh, scripts/test-mtls-alt.sh (CRL_ENFORCED=1) and scripts/load-test.sh
#     against the published port;
#   - the health check is the image's `/lclb status --healthz`, and only lclb's port is
#     published (on 127.0.0.1);
#   - lclb runs as uid/gid 65534 (the process's /proc status on the host), on a read-only root
#     filesystem (the engine's ReadonlyRootfs and the mount itself), and the image has no shell
#     (`exec /bin/sh` fails; the exported filesystem holds no sh);
#   - a reload through the engine (`kill --signal HUP`) after client2.lb.com is removed from the
#     mounted config: lclb logs it, the config generation goes up by one, client2 is then
#     refused (close_notify after the handshake) while client1 is still served;
#   - the health check still passes while an upstream's container is stopped;
#   - a stop through the engine (`stop`, SIGTERM): lclb drains, the health check fails while
#     it does, a connection held open is still served, and lclb exits with code 0.
# Everything is torn down whatever happens (compose down, the project's containers and
# networks, the temporary folder). Every wait has a deadline that fails the test.
# Also: both images are under 8 MiB, and lclb's runs as 65534:65534 by default.
# Environment: DOCKER, BUILD (1: build the images first; the compose file uses lclb:latest and
# lclb-upstream:latest),
# HEALTH_TIMEOUT (seconds, default 120), LOAD_CLIENTS, LOAD_CONNS (default 5 x 10),
# KEEP_TMP=1 (keep the temporary folder). Prints "N passed, N failed" last; exits 1 on any
# failure.
set -euo pipefail

# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
# shellcheck source=scripts/lib/engine.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/engine.sh"
help_if_asked "$@"

BUILD=${BUILD:-1}
HEALTH_TIMEOUT=${HEALTH_TIMEOUT:-120}
LOAD_CLIENTS=${LOAD_CLIENTS:-5}
LOAD_CONNS=${LOAD_CONNS:-10}
KEEP_TMP=${KEEP_TMP:-0}
for v in HEALTH_TIMEOUT LOAD_CLIENTS LOAD_CONNS; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive number, not '${!v}'"
done
[[ $(id -u) == 0 ]] || die "run as root: the certificates are chowned to 65534, the image's user"
command -v openssl >/dev/null || die "openssl is not installed"

engine_setup
compose_available || die "${COMPOSE[*]} is missing (Debian: apt-get install podman-compose; Docker: the compose plugin)"
cd "$REPO_ROOT"

if [[ "$BUILD" != 0 ]]; then
  # The names docker/docker-compose.yml runs.
  IMAGE=lclb:latest UPSTREAM_IMAGE=lclb-upstream:latest scripts/docker-build.sh
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/lclb-docker.XXXXXX")
project="lclbtest$$r$RANDOM"
lclb_id=""
hold_pid=""

COMPOSE_FILES=(-f "$REPO_ROOT/docker/docker-compose.yml")
compose() {
  "${COMPOSE[@]}" -p "$project" "${COMPOSE_FILES[@]}" "$@"
}

# The containers and networks of this run, by the label both compose tools set.
project_containers() {
  "$DOCKER" ps -aq --filter "label=com.docker.compose.project=$project"
}
project_networks() {
  "$DOCKER" network ls -q --filter "label=com.docker.compose.project=$project"
}

# shellcheck disable=SC2317 # called by the EXIT trap
teardown() {
  local status=$? ids=()
  trap - EXIT
  set +e
  if [[ -n "$hold_pid" ]]; then
    kill "$hold_pid" 2>/dev/null
    wait "$hold_pid" 2>/dev/null
  fi
  echo "teardown: compose down (project $project)"
  compose down -t 2 >"$work/down.log" 2>&1 || cat "$work/down.log"
  # podman-compose 1.0.3's down leaves the networks, and a failed up can leave containers.
  mapfile -t ids < <(project_containers)
  ((${#ids[@]} == 0)) || "$DOCKER" rm -f "${ids[@]}" >/dev/null
  mapfile -t ids < <(project_networks)
  ((${#ids[@]} == 0)) || "$DOCKER" network rm "${ids[@]}" >/dev/null
  if [[ -n "$(project_containers)" || -n "$(project_networks)" ]]; then
    echo "teardown: containers or networks of $project are left" >&2
    status=1
  fi
  if [[ "$KEEP_TMP" == 1 ]]; then
    echo "kept $work"
  else
    rm -rf "$work"
  fi
  exit "$status"
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# wait_for SECONDS WHAT COMMAND...: runs COMMAND every half second until it succeeds; false
# once SECONDS have passed.
wait_for() {
  local seconds=$1 what=$2 end
  shift 2
  end=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= end)); then
      echo "  (gave up after ${seconds}s waiting for $what)"
      return 1
    fi
    sleep 0.5
  done
}

lclb_logs() {
  "$DOCKER" logs "$lclb_id" 2>&1
}
logs_have() {
  lclb_logs | grep -qF -- "$1"
}
inspect() {
  "$DOCKER" inspect --format "$1" "$lclb_id"
}
running() {
  [[ "$(inspect '{{.State.Running}}')" == true ]]
}
# health_check: the image's health check, run now. podman runs it on demand; Docker runs it on
# its own schedule, so there the check is the status it last recorded.
health_check() {
  if [[ "$DOCKER" == podman ]]; then
    podman healthcheck run "$lclb_id"
  else
    [[ "$(inspect '{{.State.Health.Status}}')" == healthy ]]
  fi
}
# health_now: the health check's verdict now. podman runs the image's check on demand; Docker
# does not, so there the command the check runs is run in the container.
health_now() {
  if [[ "$DOCKER" == podman ]]; then
    podman healthcheck run "$lclb_id"
  else
    docker exec "$lclb_id" /lclb status --healthz --config /etc/lclb/lclb.toml
  fi
}
# health_fails: the health check's verdict now is "unhealthy".
health_fails() {
  if health_now; then
    return 1
  fi
}
# generation: the running config's generation, from lclb's own /status (the binary itself,
# run in the container: there is no shell).
generation() {
  "$DOCKER" exec "$lclb_id" /lclb status --config /etc/lclb/lclb.toml >"$work/status.out" 2>&1 ||
    return 1
  sed -n 's/.*config generation \([0-9][0-9]*\).*/\1/p' "$work/status.out" | head -n1
}
# generation_now: the generation, asked again for up to 15 s if the ask fails; the output of
# the last ask stays in $work/status.out.
generation_now() {
  local end=$((SECONDS + 15)) g
  while ! g=$(generation) || [[ -z "$g" ]]; do
    if ((SECONDS >= end)); then
      return 1
    fi
    echo "  (lclb status: $(tr '\n' ' ' <"$work/status.out" | head -c 200); asking again)" >&2
    sleep 0.5
  done
  echo "$g"
}

# free_port: a TCP port below the ephemeral range that no socket on this machine uses, in
# any state (the engine binds it for the published port).
free_port() {
  local p i hex low
  low=$(awk '{ print $1 }' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
  ((low > 20000 + 1000)) || low=61000
  for ((i = 0; i < 200; i++)); do
    p=$((20000 + RANDOM % (low - 20000)))
    hex=$(printf '%04X' "$p")
    if ! grep -qsE "^ *[0-9]+: [0-9A-F]+:$hex " /proc/net/tcp /proc/net/tcp6; then
      echo "$p"
      return 0
    fi
  done
  return 1
}

fail_fast() {
  fail "$*"
  echo "lclb's log:"
  [[ -z "$lclb_id" ]] || lclb_logs | tail -n 40 | sed 's/^/  | /'
  echo "$passed passed, $failed failed"
  exit 1
}

echo "== images"
for tag in lclb:latest lclb-upstream:latest; do
  size=$(image_size "$tag" 2>/dev/null) || fail_fast "no image $tag: run make docker-build (or BUILD=1)"
  if ((size < 8 * 1024 * 1024)); then
    pass "image $tag: $(human_size "$size") ($size bytes), under 8 MiB"
  else
    fail "image $tag: $(human_size "$size") ($size bytes), 8 MiB or more"
  fi
done
user=$("$DOCKER" image inspect --format '{{.Config.User}}' lclb:latest)
if [[ "$user" == 65534:65534 ]]; then
  pass "image lclb:latest runs as $user by default"
else
  fail "image lclb:latest runs as '$user' by default, not 65534:65534"
fi

echo "== certificates and config (in $work)"
certs=$work/certs
if ! { CERTS_DIR=$certs certs/generate_certs.sh && CERTS_DIR=$certs certs/generate_alt_certs.sh; } \
  >"$work/certs.log" 2>&1; then
  cat "$work/certs.log"
  die "the certificates could not be made"
fi
# The image runs as 65534 (nobody): it must own the files, and the keys are for it alone.
chown -R 65534:65534 "$certs"
find "$certs" -name '*.key.pem' -exec chmod 0400 {} +
config=$work/lclb.toml
cp docker/lclb.docker.toml "$config"
chmod 0644 "$config"

echo "== compose up (project $project, $DOCKER, ${COMPOSE[*]})"
export LCLB_CONFIG=$config LCLB_CERTS=$certs LCLB_USER=65534:65534
compose_prepare "$project" "$work"
# The port is free when chosen, but another program may take it before the engine binds it:
# then again with another.
for attempt in 1 2 3; do
  port=$(free_port) || die "no free port found"
  lb="127.0.0.1:$port"
  export LCLB_PORT=$port
  echo "lclb will be published on $lb"
  if compose up -d --no-build >"$work/up.log" 2>&1 &&
    ! grep -q "address already in use" "$work/up.log"; then
    break
  fi
  if ((attempt < 3)) && grep -q "address already in use" "$work/up.log"; then
    echo "  (port $port was taken meanwhile)"
    compose down -t 2 >/dev/null 2>&1 || true
    continue
  fi
  cat "$work/up.log"
  fail_fast "compose up failed"
done
lclb_id=$("$DOCKER" ps -aq --filter "label=com.docker.compose.project=$project" \
  --filter "label=com.docker.compose.service=lclb")
[[ -n "$lclb_id" ]] || {
  cat "$work/up.log"
  fail_fast "compose started no lclb container"
}
upstream_ids=$("$DOCKER" ps -aq --filter "label=com.docker.compose.project=$project" |
  grep -vx "$lclb_id" || true)
[[ $(wc -w <<<"$upstream_ids") == 3 ]] || fail_fast "expected 3 upstream containers, got: $upstream_ids"

echo "== health check (deadline ${HEALTH_TIMEOUT}s)"
test_cmd=$(inspect '{{json .Config.Healthcheck.Test}}')
if [[ "$test_cmd" == '["CMD","/lclb","status","--healthz","--config","/etc/lclb/lclb.toml"]' ]]; then
  pass "the health check is the image's: $test_cmd"
else
  fail "the health check is not /lclb status --healthz: $test_cmd"
fi
end=$((SECONDS + HEALTH_TIMEOUT))
until health_check >/dev/null 2>&1; do
  if ! running; then
    tail -n 5 "$work/up.log"
    fail_fast "lclb's container is not running (status $(inspect '{{.State.Status}}'), exit code $(inspect '{{.State.ExitCode}}'), error '$(inspect '{{.State.Error}}')')"
  fi
  if ((SECONDS >= end)); then
    fail_fast "the health check did not pass within ${HEALTH_TIMEOUT}s"
  fi
  sleep 1
done
pass "the health check passes: lclb answers /healthz"
if wait_for 30 "lclb's listener line" logs_have "lclb listening on 0.0.0.0:9443"; then
  pass "lclb logged its listener (0.0.0.0:9443 in the container)"
else
  fail "lclb's log has no 'lclb listening on 0.0.0.0:9443'"
fi

echo "== what is published"
ports=$("$DOCKER" port "$lclb_id" | sort -u)
if [[ "$ports" == "9443/tcp -> $lb" ]]; then
  pass "lclb publishes 9443 on $lb only"
else
  fail "lclb's published ports are not just 9443/tcp -> $lb: $ports"
fi
for id in $upstream_ids; do
  name=$("$DOCKER" inspect --format '{{.Name}}' "$id")
  published=$("$DOCKER" port "$id" || true)
  if [[ -z "$published" ]]; then
    pass "upstream $name publishes no port"
  else
    fail "upstream $name publishes $published"
  fi
done

echo "== traffic from the host to $lb"
export LB_ADDR=$lb CERTS_DIR=$certs
if timeout 300 scripts/test-mtls.sh >"$work/mtls.log" 2>&1; then
  pass "scripts/test-mtls.sh: $(tail -n1 "$work/mtls.log")"
else
  sed 's/^/  | /' "$work/mtls.log"
  fail "scripts/test-mtls.sh: $(tail -n1 "$work/mtls.log")"
fi
if CRL_ENFORCED=1 timeout 300 scripts/test-mtls-alt.sh >"$work/alt.log" 2>&1; then
  pass "scripts/test-mtls-alt.sh (CRL_ENFORCED=1): $(tail -n1 "$work/alt.log")"
else
  sed 's/^/  | /' "$work/alt.log"
  fail "scripts/test-mtls-alt.sh: $(tail -n1 "$work/alt.log")"
fi
if timeout 300 scripts/load-test.sh -c "$LOAD_CLIENTS" -n "$LOAD_CONNS" -t 240 >"$work/load.log" 2>&1; then
  pass "scripts/load-test.sh ($LOAD_CLIENTS x $LOAD_CONNS): $(tail -n1 "$work/load.log")"
else
  sed 's/^/  | /' "$work/load.log"
  fail "scripts/load-test.sh: $(tail -n1 "$work/load.log")"
fi

echo "== the container"
pid=$(inspect '{{.State.Pid}}')
if [[ "$pid" =~ ^[1-9][0-9]*$ && -r /proc/$pid/status ]]; then
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline")
  uids=$(awk '/^Uid:/ { print $2, $3, $4, $5 }' "/proc/$pid/status")
  gids=$(awk '/^Gid:/ { print $2, $3, $4, $5 }' "/proc/$pid/status")
  if [[ "$uids" == "65534 65534 65534 65534" && "$gids" == "65534 65534 65534 65534" ]]; then
    pass "lclb (${cmdline% }) runs as uid 65534, gid 65534 (real, effective, saved, fs)"
  else
    fail "lclb runs as uid $uids, gid $gids, not 65534"
  fi
  root_opts=$(awk '$5 == "/" { print $6 }' "/proc/$pid/mountinfo" | tail -n1)
  if [[ "$(inspect '{{.HostConfig.ReadonlyRootfs}}')" == true && ",$root_opts," == *,ro,* ]]; then
    pass "the root filesystem is read-only (ReadonlyRootfs, mounted $root_opts)"
  else
    fail "the root filesystem is not read-only (ReadonlyRootfs $(inspect '{{.HostConfig.ReadonlyRootfs}}'), mounted $root_opts)"
  fi
else
  fail "lclb's process (pid '$pid') is not visible from the host"
fi
if "$DOCKER" exec "$lclb_id" /bin/sh -c true >"$work/exec.log" 2>&1; then
  fail "exec /bin/sh succeeded: the image has a shell"
else
  pass "exec /bin/sh fails: $(head -c 160 "$work/exec.log" | tr '\n' ' ')"
fi
if "$DOCKER" export "$lclb_id" | tar -t >"$work/files" 2>/dev/null; then
  if grep -qxE '(\./)?lclb' "$work/files" && ! grep -qE '(^|/)(sh|bash|ash|dash|busybox)$' "$work/files"; then
    pass "the filesystem holds lclb and no shell ($(wc -l <"$work/files") entries: $(tr '\n' ' ' <"$work/files" | head -c 200))"
  else
    fail "the exported filesystem: $(tr '\n' ' ' <"$work/files" | head -c 400)"
  fi
else
  fail "cannot export the container's filesystem"
fi

echo "== reload: client2.lb.com removed from the mounted config, then SIGHUP through $DOCKER"
before=$(generation_now || true)
reloads_before=$(lclb_logs | grep -cF "config reloaded from /etc/lclb/lclb.toml" || true)
# Rewritten in place: the mount is of the file, so a new inode (rename) would not be seen.
awk '/^\[\[client\]\]/ { block = $0; next }
     block != "" { if ($0 ~ /client2\.lb\.com/) { skip = 1 } else { print block }; block = "" }
     skip && /^$/ { skip = 0; next }
     !skip { print }' "$config" >"$work/lclb.toml.new"
grep -q client2.lb.com "$work/lclb.toml.new" && fail_fast "client2.lb.com is still in the new config"
cat "$work/lclb.toml.new" >"$config"
if [[ "$before" =~ ^[0-9]+$ ]]; then
  "$DOCKER" kill --signal HUP "$lclb_id" >/dev/null
  reloaded() {
    (($(lclb_logs | grep -cF "config reloaded from /etc/lclb/lclb.toml") > reloads_before))
  }
  if wait_for 30 "the reload line" reloaded; then
    pass "lclb logged: config reloaded from /etc/lclb/lclb.toml"
  else
    fail "no reload line in lclb's log after SIGHUP: $(lclb_logs | tail -n 3 | tr '\n' ' ')"
  fi
  after=$(generation_now || true)
  if [[ "$after" == "$((before + 1))" ]]; then
    pass "config generation $before -> $after"
  else
    fail "config generation $before -> '$after', expected $((before + 1))"
  fi
else
  fail "no config generation from lclb status: $(tr '\n' ' ' <"$work/status.out" | head -c 300)"
fi
client=$certs/clients
result=$(mtls_call "$lb" "$client/client2.lb.com.crt" "$client/client2.lb.com.key.pem" "$certs/ca/ca.crt")
if [[ "$result" == "refused close_notify after the handshake, no greeting" ]]; then
  pass "client2.lb.com is refused after the reload ($result)"
else
  fail "client2.lb.com after the reload: $result (expected refused close_notify after the handshake)"
fi
result=$(mtls_call "$lb" "$client/client1.lb.com.crt" "$client/client1.lb.com.key.pem" "$certs/ca/ca.crt")
if [[ "$result" == "ok web"[123] ]]; then
  pass "client1.lb.com is still served ($result)"
else
  fail "client1.lb.com after the reload: $result"
fi

echo "== the health check with an upstream's container stopped"
# Its name goes away with it; lclb serves on with the others, and its health check must say so.
web3_id=$("$DOCKER" ps -aq --filter "label=com.docker.compose.project=$project" \
  --filter "label=com.docker.compose.service=web3")
"$DOCKER" stop -t 2 "$web3_id" >/dev/null 2>&1 || true
if [[ "$("$DOCKER" inspect --format '{{.State.Running}}' "$web3_id")" == false ]]; then
  if health_now >"$work/health.log" 2>&1; then
    pass "the health check passes with web3's container stopped"
  else
    fail "the health check fails with web3's container stopped: $(tr '\n' ' ' <"$work/health.log" | head -c 300)"
  fi
else
  fail "web3's container did not stop"
fi
"$DOCKER" start "$web3_id" >/dev/null 2>&1 || fail "web3's container did not start again"

echo "== stop through $DOCKER (SIGTERM): drain, exit 0"
# A connection held open across the stop: its greeting first, its echo during the drain.
mkfifo "$work/hold.in" "$work/hold.out"
timeout 120 openssl s_client -brief -connect "$lb" -CAfile "$certs/ca/ca.crt" \
  -verify_return_error -verify_ip 127.0.0.1 \
  -cert "$client/client1.lb.com.crt" -key "$client/client1.lb.com.key.pem" \
  <"$work/hold.in" >"$work/hold.out" 2>"$work/hold.err" &
hold_pid=$!
exec {hold_w}>"$work/hold.in" {hold_r}<"$work/hold.out"
greeting=""
IFS= read -r -t 20 greeting <&"$hold_r" || true
if [[ "$greeting" == web[123] ]]; then
  pass "a connection is open before the stop (greeted by $greeting)"
else
  fail "the held connection got no greeting: '$greeting' $(tr '\n' ' ' <"$work/hold.err")"
fi
# Without the held connection's ends: else the stop would keep its input open.
"$DOCKER" stop -t 60 "$lclb_id" >"$work/stop.log" 2>&1 {hold_w}>&- {hold_r}<&- &
stop_pid=$!
if wait_for 30 "the drain line" logs_have "lclb stopping: listener closed, draining 1 connection(s)"; then
  pass "lclb drains on SIGTERM: draining 1 connection(s)"
else
  fail "no 'draining 1 connection(s)' in lclb's log: $(lclb_logs | tail -n 3 | tr '\n' ' ')"
fi
if health_fails >/dev/null 2>&1; then
  pass "the health check fails while lclb drains"
else
  fail "the health check still passes while lclb drains"
fi
echoed=""
{ printf 'during-the-drain\n' >&"$hold_w"; } 2>/dev/null || true
IFS= read -r -t 20 echoed <&"$hold_r" || true
if [[ "$echoed" == during-the-drain ]]; then
  pass "the open connection is still served during the drain (echo came back)"
else
  fail "the open connection got '$echoed' during the drain, not its echo"
fi
# Closing the client's stdin ends the connection; the drain then ends too.
exec {hold_w}>&-
wait "$hold_pid" 2>/dev/null || true
hold_pid=""
exec {hold_r}<&-
stop_done() { ! kill -0 "$stop_pid" 2>/dev/null; }
if wait_for 90 "$DOCKER stop" stop_done; then
  wait "$stop_pid" || fail "$DOCKER stop failed: $(cat "$work/stop.log")"
else
  fail "$DOCKER stop did not return"
fi
if wait_for 30 "the container to exit" eval '! running'; then
  code=$(inspect '{{.State.ExitCode}}')
  if [[ "$code" == 0 ]]; then
    pass "lclb exited with code 0"
  else
    fail "lclb exited with code $code"
  fi
else
  fail "lclb's container is still running after the stop"
fi
if logs_have "lclb stopped"; then
  pass "lclb logged: lclb stopped"
else
  fail "no 'lclb stopped' in lclb's log: $(lclb_logs | tail -n 3 | tr '\n' ' ')"
fi
if lclb_logs | grep -qF "drain timeout"; then
  fail "the drain timed out instead of ending with the held connection"
else
  pass "the drain ended with the held connection (no drain timeout)"
fi

if ((failed > 0)); then
  echo "lclb's log (last 40 lines):"
  lclb_logs | tail -n 40 | sed 's/^/  | /'
fi
echo "$passed passed, $failed failed"
((failed == 0))
