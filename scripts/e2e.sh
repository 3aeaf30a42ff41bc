#!/usr/bin/env bash
# `make e2e`: lclb end to end, as a user runs it, in a temporary folder.
#
#   1. builds lclb and the demo upstream (debug by default: what `make unit` already built;
#      E2E_PROFILE=release for the optimized build);
#   2. makes fresh certificates (certs/generate_certs.sh and generate_alt_certs.sh, CERTS_DIR
#      pointing into the temporary folder);
#   3. writes lclb.example.toml there with free ports substituted, and checks that
#      `lclb --check-config` accepts it (exit 0) and refuses it with an unknown key (exit 1);
#      `lclb explain` admits client1 and refuses client3 and the revoked client;
#   4. starts three demo upstreams and lclb, waits until they listen;
#   5. runs scripts/test-mtls.sh, scripts/test-mtls-alt.sh (CRL_ENFORCED=1: the example config
#      names the CRL), scripts/test-identities.sh and a small scripts/load-test.sh (4 x 5)
#      against it, and checks lclb's log for the identities and refusals it should have logged;
#   6. stops lclb with SIGTERM and checks that it exits promptly with status 0.
# Every process it started is stopped on exit, whatever happens. KEEP_TMP=1 keeps the folder.
set -euo pipefail

# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

help_if_asked "$@"

cd "$REPO_ROOT"
E2E_PROFILE=${E2E_PROFILE:-debug}
KEEP_TMP=${KEEP_TMP:-0}
started=$SECONDS

case "$E2E_PROFILE" in
  debug) profile_flag=() ;;
  release) profile_flag=(--release) ;;
  *) die "E2E_PROFILE must be debug or release" ;;
esac
echo "e2e: building lclb and the demo upstream ($E2E_PROFILE)"
cargo build "${profile_flag[@]}" --locked --bin lclb --example upstream
target_dir=${CARGO_TARGET_DIR:-$REPO_ROOT/target}
lclb="$target_dir/$E2E_PROFILE/lclb"
upstream="$target_dir/$E2E_PROFILE/examples/upstream"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/lclb-e2e.XXXXXX")
pids=()
# shellcheck disable=SC2317 # called by the traps
cleanup() {
  local status=$? pid
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    # A process that ignores TERM gets 5 s, then KILL.
    for _ in $(seq 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [[ $status != 0 && -f "$tmp/lclb.log" ]]; then
    echo "--- last lines of lclb's log ($tmp/lclb.log)"
    tail -n 30 "$tmp/lclb.log"
  fi
  if [[ "$KEEP_TMP" == 1 ]]; then
    echo "e2e: kept $tmp"
  else
    rm -rf "$tmp"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

passed=0
failed=0
check() {
  local what=$1
  shift
  if "$@"; then
    passed=$((passed + 1))
    echo "e2e: ok    $what"
  else
    failed=$((failed + 1))
    echo "e2e: FAIL  $what"
  fi
}

echo "e2e: certificates into $tmp/certs"
export CERTS_DIR="$tmp/certs"
bash certs/generate_certs.sh >"$tmp/certs.log" 2>&1 || {
  cat "$tmp/certs.log"
  die "certs/generate_certs.sh failed"
}
bash certs/generate_alt_certs.sh >>"$tmp/certs.log" 2>&1 || {
  cat "$tmp/certs.log"
  die "certs/generate_alt_certs.sh failed"
}

# Four distinct free ports below the usual ephemeral range (32768-60999).
ports=()
pick_ports() {
  local p tries=0
  ports=()
  while ((${#ports[@]} < 4)); do
    ((tries++ < 1000)) || die "cannot find free ports"
    p=$((20000 + RANDOM % 12000))
    if port_listening "$p" || [[ " ${ports[*]} " == *" $p "* ]]; then
      continue
    fi
    ports+=("$p")
  done
}

write_config() {
  sed -e "s/127\.0\.0\.1:9443/127.0.0.1:${ports[0]}/" \
    -e "s/127\.0\.0\.1:9001/127.0.0.1:${ports[1]}/" \
    -e "s/127\.0\.0\.1:9002/127.0.0.1:${ports[2]}/" \
    -e "s/127\.0\.0\.1:9003/127.0.0.1:${ports[3]}/" \
    lclb.example.toml >"$tmp/lclb.toml"
}

# start_all: the upstreams, then lclb; true once all four listen.
start_all() {
  local i
  pids=()
  for i in 1 2 3; do
    "$upstream" --listen "127.0.0.1:${ports[$i]}" --name "web$i" 2>>"$tmp/upstreams.log" &
    pids+=($!)
  done
  for i in 1 2 3; do
    wait_listening "${ports[$i]}" 10 "${pids[$((i - 1))]}" || return 1
  done
  RUST_LOG=info "$lclb" --config "$tmp/lclb.toml" 2>"$tmp/lclb.log" &
  pids+=($!)
  wait_listening "${ports[0]}" 15 "${pids[3]}" || return 1
  # The port listens once bound; the log line follows at once.
  for _ in $(seq 50); do
    grep -q "lclb listening on" "$tmp/lclb.log" && return 0
    sleep 0.1
  done
  return 1
}

stop_all() {
  local pid
  for pid in "${pids[@]}"; do
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  pids=()
}

pick_ports
write_config
lb="127.0.0.1:${ports[0]}"

# --check-config: exit 0 on the good config, 1 with an unknown key.
check_config_ok() {
  "$lclb" --check-config --config "$tmp/lclb.toml" >"$tmp/check.out" 2>&1 || {
    cat "$tmp/check.out"
    return 1
  }
}
check_config_unknown_key() {
  local rc=0
  { echo "bogus_key = 1"; cat "$tmp/lclb.toml"; } >"$tmp/bad.toml"
  "$lclb" --check-config --config "$tmp/bad.toml" >"$tmp/check-bad.out" 2>&1 || rc=$?
  if [[ $rc != 1 ]] || ! grep -q bogus_key "$tmp/check-bad.out"; then
    echo "exit status $rc, output:"
    cat "$tmp/check-bad.out"
    return 1
  fi
}
check "lclb --check-config accepts lclb.example.toml (exit 0)" check_config_ok
check "lclb --check-config refuses an unknown key (exit 1, names it)" check_config_unknown_key

# lclb explain: the verdict and exit status for a client that is admitted, one with no entry,
# and a revoked one (named with its CRL file).
explain_expect() {
  local want_rc=$1 want_text=$2 cert=$3 rc=0
  "$lclb" explain --config "$tmp/lclb.toml" --cert "$CERTS_DIR/$cert" >"$tmp/explain.out" 2>&1 ||
    rc=$?
  if [[ $rc != "$want_rc" ]] || ! grep -qF -- "$want_text" "$tmp/explain.out"; then
    echo "exit status $rc (want $want_rc), want \"$want_text\" in:"
    cat "$tmp/explain.out"
    return 1
  fi
}
check "lclb explain admits client1 (exit 0, by cn)" \
  explain_expect 0 'verdict: admitted as "client1.lb.com"' clients/client1.lb.com.crt
check "lclb explain refuses client3 as unauthorized (exit 1)" \
  explain_expect 1 'verdict: refused (unauthorized)' alt/client3.lb.com.crt
check "lclb explain refuses the revoked client, naming the CRL (exit 1)" \
  explain_expect 1 'revoked by the CRL in' alt/client-revoked.lb.com.crt

# Start; should a port be taken between the check and the bind, try other ports.
for attempt in 1 2 3; do
  echo "e2e: starting 3 upstreams (ports ${ports[*]:1}) and lclb ($lb), attempt $attempt"
  if start_all; then
    break
  fi
  echo "e2e: start failed:"
  tail -n 5 "$tmp/upstreams.log" "$tmp/lclb.log" 2>/dev/null || true
  stop_all
  ((attempt < 3)) || die "lclb and the upstreams did not start"
  pick_ports
  write_config
  lb="127.0.0.1:${ports[0]}"
done

indent() { sed 's/^/    /'; }
run_script() {
  local out rc=0
  out=$("$@" 2>&1) || rc=$?
  indent <<<"$out"
  return $rc
}
check "scripts/test-mtls.sh: both clients served, client2 only in group web" \
  run_script scripts/test-mtls.sh "$lb"
check "scripts/test-mtls-alt.sh: other-CA, expired, unknown-CN, no-cert, revoked clients refused" \
  run_script env CRL_ENFORCED=1 scripts/test-mtls-alt.sh "$lb"
check "scripts/test-identities.sh: SPIFFE, DNS SAN and partner-CA clients where allowed, the others unauthorized" \
  run_script scripts/test-identities.sh "$lb"
check "scripts/load-test.sh -c 4 -n 5: every connection served" \
  run_script scripts/load-test.sh -c 4 -n 5 -a "$lb"

log_has() { grep -qE "$1" "$tmp/lclb.log"; }
not_log_has() { ! grep -qE "$1" "$tmp/lclb.log"; }
check "lclb logged client3.lb.com as unauthorized" \
  log_has 'refused conn=[0-9]+ client=client3\.lb\.com .*reason=unauthorized'
check "lclb logged the TLS refusals (other CA, expired, no certificate, revoked)" \
  test "$(grep -cE 'refused conn=[0-9]+ client=- .*reason=tls' "$tmp/lclb.log")" -ge 4
check "lclb logged the revoked certificate as revoked" \
  log_has 'refused conn=[0-9]+ client=- .*reason=tls.*revoked'
check "lclb let client-revoked.lb.com reach no upstream" \
  not_log_has 'client=client-revoked\.lb\.com .*upstream='

check "lclb logged finished connections of client1 (any upstream)" \
  log_has 'conn=[0-9]+ client=client1\.lb\.com .*upstream=web[123] .*end='
check "lclb logged finished connections of client2 (group web only)" \
  log_has 'conn=[0-9]+ client=client2\.lb\.com .*upstream=web[12] .*end='
check "lclb never sent client2 to web3" \
  not_log_has 'client=client2\.lb\.com .*upstream=web3'
check "lclb logged the SPIFFE workload as payments, with its URI SAN (group api only)" \
  log_has 'event=connection conn=[0-9]+ client=payments .*uri_san=spiffe://lb\.example/ns/demo/sa/payments .*upstream=web3 '
check "lclb logged billing-worker as *.billing.internal, with its CN and DNS SAN (group web only)" \
  log_has 'event=connection conn=[0-9]+ client=\*\.billing\.internal .*cn=billing-worker .*dns_san=api\.billing\.internal .*upstream=web[12] '
check "lclb logged the partner CA's client1.lb.com as partner-client1 (group api only)" \
  log_has 'event=connection conn=[0-9]+ client=partner-client1 .*cn=client1\.lb\.com .*upstream=web3 '
check "lclb never sent payments or partner-client1 to group web, nor *.billing.internal to api" \
  not_log_has 'client=(payments|partner-client1) .*upstream=web[12] |client=\*\.billing\.internal .*upstream=web3 '
check "lclb logged the partner CA's client2.lb.com as unauthorized" \
  log_has 'event=refused conn=[0-9]+ client=client2\.lb\.com .*reason=unauthorized .*partners'
check "lclb logged the too-deep SPIFFE ID as unauthorized" \
  log_has 'event=refused conn=[0-9]+ client=spiffe://lb\.example/ns/demo/extra/sa/payments .*reason=unauthorized'
check "no panic in lclb's log" \
  test "$(grep -c 'panicked' "$tmp/lclb.log")" -eq 0

stops_on_sigterm() {
  local pid=${pids[3]} rc=0
  kill -TERM "$pid"
  for _ in $(seq 100); do
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid" || rc=$?
      if ((rc != 0)); then
        echo "lclb exited with status $rc after SIGTERM"
        return 1
      fi
      return 0
    fi
    sleep 0.1
  done
  echo "lclb still running 10 s after SIGTERM"
  return 1
}
check "lclb stops within 10 s of SIGTERM, exit status 0" stops_on_sigterm

echo "e2e: done in $((SECONDS - started)) s"
echo "e2e: $passed passed, $failed failed"
((failed == 0))
