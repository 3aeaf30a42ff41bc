#!/usr/bin/env bash
# A small load test of a running lclb: CLIENTS parallel clients, each opening CONNS mTLS
# connections one after the other (`openssl s_client`; each sends a line and reads the echo).
#
#   scripts/load-test.sh                       # 10 x 20 against 127.0.0.1:9443 (make run)
#   scripts/load-test.sh -c 4 -n 5 -a 127.0.0.1:19443
#
# Options (or environment):
#   -c N        parallel clients (CLIENTS, default 10)
#   -n N        connections per client (CONNS, default 20)
#   -a ADDR     balancer address (LB_ADDR, default 127.0.0.1:9443)
#   -i CN       client identity whose certificate to use (CLIENT_CN, default client1.lb.com,
#               which lclb.example.toml gives a rate limit of 200/s, burst 400)
#   -t SECONDS  stop starting new connections after this long (DEADLINE, default 120)
# Also CERTS_DIR (default: certs/ of the repository), MTLS_TIMEOUT (seconds per connection,
# default 10), ALLOW_REFUSAL=1 to accept refusals (rate limit, capacity, authorization) instead
# of counting them as failures.
#
# Prints the successes, refusals (lclb said no: rate limit, capacity, authorization), failures
# (anything else: no connection, timeout, bad echo) and how the successes spread over the
# upstreams. Exits 1 on any failure or refusal (unless ALLOW_REFUSAL=1), on connections left
# unmade at the deadline, or when no connection succeeded; else 0.
set -euo pipefail

# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

usage() {
  script_help "$0"
}

CLIENTS=${CLIENTS:-10}
CONNS=${CONNS:-20}
LB_ADDR=${LB_ADDR:-127.0.0.1:9443}
CLIENT_CN=${CLIENT_CN:-client1.lb.com}
DEADLINE=${DEADLINE:-120}
CERTS_DIR=${CERTS_DIR:-$REPO_ROOT/certs}
ALLOW_REFUSAL=${ALLOW_REFUSAL:-0}

while getopts "c:n:a:i:t:h" opt; do
  case "$opt" in
    c) CLIENTS=$OPTARG ;;
    n) CONNS=$OPTARG ;;
    a) LB_ADDR=$OPTARG ;;
    i) CLIENT_CN=$OPTARG ;;
    t) DEADLINE=$OPTARG ;;
    h)
      usage
      exit 0
      ;;
    *)
      usage >&2
      exit 2
      ;;
  esac
done
shift $((OPTIND - 1))
[[ $# -eq 0 ]] || die "unexpected argument '$1' (see -h)"
[[ "$ALLOW_REFUSAL" == [01] ]] || die "ALLOW_REFUSAL must be 0 or 1"
for v in CLIENTS CONNS DEADLINE; do
  [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive number, not '${!v}'"
done
split_addr "$LB_ADDR"
command -v openssl >/dev/null || die "openssl is not installed"

ca="$CERTS_DIR/ca/ca.crt"
crt="$CERTS_DIR/clients/$CLIENT_CN.crt"
key="$CERTS_DIR/clients/$CLIENT_CN.key.pem"
for f in "$ca" "$crt" "$key"; do
  [[ -r "$f" ]] || die "$f is missing; run 'make certs' (or set CERTS_DIR / CLIENT_CN)"
done

work=$(mktemp -d "${TMPDIR:-/tmp}/lclb-load.XXXXXX")
workers=()
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
  local pid
  for pid in "${workers[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${workers[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

now_ms() { date +%s%3N; }
start=$(now_ms)
stop_at=$((start + DEADLINE * 1000))

# worker N: CONNS connections one after the other, one result line each into $work/N.
worker() {
  local n=$1 j
  # On TERM, end the connection in progress too (mtls_call runs it in the background).
  trap 'kill -TERM "${MTLS_PID:-}" 2>/dev/null; exit 143' TERM
  for ((j = 1; j <= CONNS; j++)); do
    if (($(now_ms) >= stop_at)); then
      break
    fi
    mtls_call "$LB_ADDR" "$crt" "$key" "$ca" "load-$n-$j" >>"$work/$n"
  done
}

echo "load test: $CLIENTS clients x $CONNS connections as $CLIENT_CN -> $LB_ADDR (deadline ${DEADLINE}s)"
for ((i = 1; i <= CLIENTS; i++)); do
  : >"$work/$i"
  worker "$i" &
  workers+=($!)
done
for pid in "${workers[@]}"; do
  wait "$pid" || true
done
workers=()
elapsed=$(($(now_ms) - start))

results=$(cat "$work"/[0-9]*)
count() { grep -c "^$1 " <<<"$results" || true; }
ok=$(count ok)
refused=$(count refused)
failures=$(count failed)
total=$((ok + refused + failures))
unmade=$((CLIENTS * CONNS - total))

echo
echo "connections:  $total made in $((elapsed / 1000)).$(printf '%03d' $((elapsed % 1000)))s ($((total * 1000 / (elapsed > 0 ? elapsed : 1))) per second)"
echo "successes:    $ok"
echo "refusals:     $refused"
echo "failures:     $failures"
if ((unmade > 0)); then
  echo "not made:     $unmade (deadline of ${DEADLINE}s reached)"
fi
if ((ok > 0)); then
  echo "spread over the upstreams:"
  grep '^ok ' <<<"$results" | cut -d' ' -f2- | sort | uniq -c | while read -r n name; do
    printf '  %-16s %6d  (%d%%)\n' "$name" "$n" $((n * 100 / ok))
  done
fi
for kind in refused failed; do
  if grep -q "^$kind " <<<"$results"; then
    echo "$kind, by reason:"
    grep "^$kind " <<<"$results" | cut -d' ' -f2- | sort | uniq -c | sort -rn | head -n 5 |
      while read -r n reason; do
        printf '  %6d  %s\n' "$n" "$reason"
      done
  fi
done

status=0
if ((failures > 0 || unmade > 0)); then
  status=1
fi
counted_refusals=0
if ((refused > 0)) && [[ "$ALLOW_REFUSAL" != 1 ]]; then
  echo "refusals count as failures (ALLOW_REFUSAL=1 accepts them)"
  counted_refusals=$refused
  status=1
fi
if ((ok == 0)); then
  echo "no connection was served"
  status=1
fi
echo "load-test: $ok passed, $((failures + unmade + counted_refusals)) failed"
exit $status
