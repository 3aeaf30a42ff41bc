#!/usr/bin/env bash
# `make run`: builds lclb and the demo upstream (release), makes development certificates if
# there are none, starts three demo upstreams and lclb with lclb.example.toml in the foreground,
# and stops them all on Ctrl-C (or when any of them exits).
#
# Environment:
#   CONFIG    config file (default: lclb.example.toml); its listen address is read from it
#   UPSTREAMS the demo upstreams to start, as NAME=ADDR ... (default: web1=127.0.0.1:9001
#             web2=127.0.0.1:9002 web3=127.0.0.1:9003, as in lclb.example.toml)
#   BUILD=0   use the binaries already built
#   RUST_LOG  lclb's log level (default info)
set -euo pipefail

# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

help_if_asked "$@"

cd "$REPO_ROOT"
CONFIG=${CONFIG:-lclb.example.toml}
UPSTREAMS=${UPSTREAMS:-web1=127.0.0.1:9001 web2=127.0.0.1:9002 web3=127.0.0.1:9003}
BUILD=${BUILD:-1}
export RUST_LOG=${RUST_LOG:-info}

[[ -f "$CONFIG" ]] || die "$CONFIG does not exist"
listen=$(sed -n 's/^[[:space:]]*listen[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' "$CONFIG" | head -n1)
listen=${listen:-0.0.0.0:9443}
split_addr "$listen"
lb_port=$ADDR_PORT
connect_host=$ADDR_HOST
if [[ "$connect_host" == 0.0.0.0 ]]; then connect_host=127.0.0.1; fi
if [[ "$connect_host" == *:* ]]; then connect_host="[$connect_host]"; fi

if [[ "$BUILD" == 1 ]]; then
  echo "building lclb and the demo upstream (release)"
  cargo build --release --locked --bin lclb --example upstream
fi
target_dir=${CARGO_TARGET_DIR:-$REPO_ROOT/target}
lclb="$target_dir/release/lclb"
upstream="$target_dir/release/examples/upstream"
[[ -x "$lclb" && -x "$upstream" ]] || die "$lclb or $upstream is missing; run without BUILD=0"

if [[ ! -f certs/ca/ca.crt || ! -f certs/server/server.crt || ! -f certs/clients/client1.lb.com.crt ]]; then
  echo "no development certificates yet: making them (certs/generate_certs.sh)"
  bash certs/generate_certs.sh
fi
# lclb.example.toml names the CRL and the partner CA of certs/alt/ (and test-mtls-alt.sh and
# test-identities.sh use those certificates).
if [[ ! -f certs/alt/ca.crl.pem || ! -f certs/alt/partner-ca/ca.crt ]]; then
  echo "making the CRL, the partner CA and the test certificates (certs/generate_alt_certs.sh)"
  bash certs/generate_alt_certs.sh
fi

# Refuse to start over something already listening: the error would otherwise be buried in logs.
for spec in $UPSTREAMS; do
  split_addr "${spec#*=}"
  if port_listening "$ADDR_PORT"; then
    die "port $ADDR_PORT (${spec%%=*}) is already in use; is another 'make run' going?"
  fi
done
if port_listening "$lb_port"; then
  die "port $lb_port (lclb, from $CONFIG) is already in use; is another 'make run' going?"
fi

pids=()
names=()
stopping=0
# shellcheck disable=SC2317 # called by the traps
stop_all() {
  local i pid deadline
  ((stopping == 0)) || return 0
  stopping=1
  ((${#pids[@]} > 0)) || return 0
  echo
  echo "stopping ${names[*]}"
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  # lclb drains for up to limits.drain_timeout; give everything 10 s, then kill what is left.
  deadline=$((SECONDS + 10))
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "${names[$i]} (pid $pid) did not stop in time: killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  echo "all stopped"
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

for spec in $UPSTREAMS; do
  "$upstream" --listen "${spec#*=}" --name "${spec%%=*}" &
  pids+=($!)
  names+=("${spec%%=*}")
done
"$lclb" --config "$CONFIG" &
pids+=($!)
names+=(lclb)

for i in "${!pids[@]}"; do
  if [[ "${names[$i]}" == lclb ]]; then
    port=$lb_port
  else
    spec=$(tr ' ' '\n' <<<"$UPSTREAMS" | grep "^${names[$i]}=")
    split_addr "${spec#*=}"
    port=$ADDR_PORT
  fi
  wait_listening "$port" 15 "${pids[$i]}" || die "${names[$i]} did not start listening on port $port"
done

cat <<EOF

lclb is listening on $listen, in front of: $UPSTREAMS

Connect as client1.lb.com (type a line, it comes back after the upstream's name):
  openssl s_client -connect $connect_host:$lb_port -cert certs/clients/client1.lb.com.crt -key certs/clients/client1.lb.com.key.pem -CAfile certs/ca/ca.crt -quiet
Check both clients, the refused ones, the SAN and partner-CA identities, and a little load,
from another terminal:
  scripts/test-mtls.sh $connect_host:$lb_port
  scripts/test-mtls-alt.sh $connect_host:$lb_port
  scripts/test-identities.sh $connect_host:$lb_port
  scripts/load-test.sh -a $connect_host:$lb_port

Ctrl-C stops everything.
EOF

# Run until Ctrl-C, or until one of them exits on its own (which stops the others too).
set +e
wait -n
status=$?
set -e
for i in "${!pids[@]}"; do
  if ! kill -0 "${pids[$i]}" 2>/dev/null; then
    echo "${names[$i]} exited (status $status); stopping the rest" >&2
  fi
done
exit 1
