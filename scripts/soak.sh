#!/usr/bin/env bash
# `make soak`: mixed good and bad traffic against one lclb for SOAK_SECONDS (default 600), then
# a check that its memory, file descriptors and threads stayed flat.
#
#   scripts/soak.sh                 # 10 minutes
#   SOAK_SECONDS=60 scripts/soak.sh # a short run
#
# Traffic, all on 127.0.0.1, all bounded in time:
#   - good: scripts/load-test.sh rounds (parallel mTLS clients, each echoing a line);
#   - refused: scripts/test-mtls-alt.sh rounds (other CA, expired, revoked, unknown CN);
#   - hostile: sockets sending random bytes, and silent sockets left to hit the handshake deadline.
# Every round of good and refused traffic must pass (load-test.sh: every connection served;
# test-mtls-alt.sh: every bad client refused), and at least one good round must have run.
# Every 10 s it samples lclb's RSS, fd count and thread count (/proc). The idle figures are
# taken once pooled threads have outlived thread_keep_alive (2 s here) and the thread count is
# steady; after the traffic stops and the same settle, fds and threads must be back to them,
# and RSS must not have grown by more than SOAK_RSS_SLACK_KIB (default 8192) between the end of
# the first fifth of the run and the end. Prints "soak: N passed, N failed" (rounds and flatness
# checks) and exits 1 on any failure, or if lclb died or logged a panic.
set -euo pipefail

# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
help_if_asked "$@"

cd "$REPO_ROOT"
SOAK_SECONDS=${SOAK_SECONDS:-600}
SOAK_RSS_SLACK_KIB=${SOAK_RSS_SLACK_KIB:-8192}

cargo build --release --locked --bin lclb --example upstream
lclb="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/lclb"
upstream="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/examples/upstream"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/lclb-soak.XXXXXX")
pids=()
traffic=()
# shellcheck disable=SC2317 # called by the trap
cleanup() {
  local pid
  for pid in "${traffic[@]}" "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${traffic[@]}" "${pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

export CERTS_DIR="$tmp/certs"
bash certs/generate_certs.sh >"$tmp/certs.log" 2>&1 || die "certs/generate_certs.sh failed"
bash certs/generate_alt_certs.sh >>"$tmp/certs.log" 2>&1 || die "certs/generate_alt_certs.sh failed"

ports=()
while ((${#ports[@]} < 4)); do
  p=$((20000 + RANDOM % 12000))
  port_listening "$p" || [[ " ${ports[*]} " == *" $p "* ]] || ports+=("$p")
done
# All soak traffic, hostile and good, comes from 127.0.0.1, so the per-address handshake cap is
# off: the soak measures the process, not that cap.
sed -e "s/127\.0\.0\.1:9443/127.0.0.1:${ports[0]}/" \
  -e "s/127\.0\.0\.1:9001/127.0.0.1:${ports[1]}/" \
  -e "s/127\.0\.0\.1:9002/127.0.0.1:${ports[2]}/" \
  -e "s/127\.0\.0\.1:9003/127.0.0.1:${ports[3]}/" \
  -e 's/^handshake_timeout = .*/handshake_timeout = "1s"\nthread_keep_alive = "2s"\nper_ip_max_handshakes = 0/' \
  lclb.example.toml >"$tmp/lclb.toml"
grep -q '^handshake_timeout = "1s"' "$tmp/lclb.toml" || die "lclb.example.toml has no handshake_timeout"
"$lclb" --check-config --config "$tmp/lclb.toml" >/dev/null

for i in 1 2 3; do
  "$upstream" --listen "127.0.0.1:${ports[$i]}" --name "web$i" 2>>"$tmp/upstreams.log" &
  pids+=($!)
done
RUST_LOG=warn "$lclb" --config "$tmp/lclb.toml" 2>"$tmp/lclb.log" &
lb_pid=$!
pids+=("$lb_pid")
wait_listening "${ports[0]}" 15 "$lb_pid" || die "lclb did not start"
lb="127.0.0.1:${ports[0]}"

sample() {
  local rss threads fds
  rss=$(awk '/^VmRSS:/ {print $2}' "/proc/$lb_pid/status")
  threads=$(awk '/^Threads:/ {print $2}' "/proc/$lb_pid/status")
  fds=$(find "/proc/$lb_pid/fd" -mindepth 1 -maxdepth 1 | wc -l)
  echo "$rss $threads $fds"
}

# settle: waits until pooled threads have outlived thread_keep_alive (2 s) and the thread count
# has not moved for two samples a second apart (at most 20 s).
settle() {
  local before after i
  sleep 3
  read -r _ before _ < <(sample)
  for ((i = 0; i < 20; i++)); do
    sleep 1
    read -r _ after _ < <(sample)
    ((after == before)) && return 0
    before=$after
  done
}

# thread_names: lclb's threads by name, counted ("3 lclb-conn, 1 lclb-health, ...").
thread_names() {
  cat "/proc/$lb_pid/task"/*/comm 2>/dev/null | sort | uniq -c | awk '{printf "%s%s %s", sep, $1, $2; sep=", "}'
}

# Warm up once with good and refused clients (the refusal logger is a thread lclb starts at
# its first refusal and keeps), then take the idle figures.
scripts/test-mtls.sh "$lb" >/dev/null 2>&1 || die "lclb does not serve the demo clients"
CRL_ENFORCED=1 scripts/test-mtls-alt.sh "$lb" >/dev/null 2>&1 || die "lclb lets a bad client in"
settle
read -r idle_rss idle_threads idle_fds < <(sample)
echo "soak: idle before traffic: rss ${idle_rss} KiB, ${idle_threads} threads, ${idle_fds} fds"
idle_names=$(thread_names)

end=$((SECONDS + SOAK_SECONDS))
# Each round's verdict goes to a file (the loops run in the background): a line "ok" or the
# round's output.
rounds="$tmp/rounds"
mkdir -p "$rounds"
# round NAME COMMAND...: runs one round, records its verdict.
round() {
  local name=$1 out
  shift
  if out=$("$@" 2>&1); then
    echo ok >>"$rounds/$name"
  else
    echo "FAIL" >>"$rounds/$name"
    printf '%s\n' "$out" >>"$rounds/$name.failures"
  fi
}
good() {
  while ((SECONDS < end)); do
    round good env CLIENTS=4 CONNS=10 DEADLINE=60 scripts/load-test.sh -a "$lb"
  done
}
refused() {
  while ((SECONDS < end)); do
    round refused env CRL_ENFORCED=1 scripts/test-mtls-alt.sh "$lb"
  done
}
hostile() {
  local fd
  while ((SECONDS < end)); do
    for _ in 1 2 3 4 5; do
      if exec {fd}<>"/dev/tcp/127.0.0.1/${ports[0]}"; then
        { head -c $((RANDOM % 2048 + 1)) /dev/urandom 1>&"$fd"; } 2>/dev/null || true
        exec {fd}>&-
      fi
    done
    # A silent one: connected, says nothing, closed after the handshake deadline has passed.
    if exec {fd}<>"/dev/tcp/127.0.0.1/${ports[0]}"; then
      sleep 1.5
      exec {fd}>&-
    fi
  done
}
good &
traffic+=($!)
refused &
traffic+=($!)
hostile &
traffic+=($!)

marker_at=$((SOAK_SECONDS / 5))
marker_rss=""
printf 'soak: %6s %10s %8s %6s\n' "t(s)" "rss(KiB)" "threads" "fds"
start=$SECONDS
while ((SECONDS < end)); do
  sleep 10
  kill -0 "$lb_pid" 2>/dev/null || die "lclb died during the soak (see its log)"
  read -r rss threads fds < <(sample)
  printf 'soak: %6d %10d %8d %6d\n' $((SECONDS - start)) "$rss" "$threads" "$fds"
  if [[ -z "$marker_rss" ]] && ((SECONDS - start >= marker_at)); then
    marker_rss=$rss
  fi
done
for pid in "${traffic[@]}"; do
  wait "$pid" 2>/dev/null || true
done
traffic=()
settle
read -r rss threads fds < <(sample)
echo "soak: after traffic: rss ${rss} KiB, ${threads} threads, ${fds} fds"

passed=0
failed=0
verdict() {
  if [[ $1 == ok ]]; then
    passed=$((passed + 1))
    echo "soak: ok    $2"
  else
    failed=$((failed + 1))
    echo "soak: FAIL  $2"
  fi
}
for name in good refused; do
  ok=$(grep -c '^ok$' "$rounds/$name" 2>/dev/null || true)
  bad=$(grep -c '^FAIL$' "$rounds/$name" 2>/dev/null || true)
  if ((bad == 0 && ok > 0)); then
    verdict ok "$name rounds: $ok passed"
  else
    verdict fail "$name rounds: ${ok:-0} passed, ${bad:-0} failed (first failure below)"
    head -n 40 "$rounds/$name.failures" 2>/dev/null | sed 's/^/soak:   /'
  fi
done
((threads <= idle_threads)) && r=ok || r=fail
verdict "$r" "threads ${threads} ($(thread_names)), ${idle_threads} before the traffic (${idle_names})"
((fds <= idle_fds)) && r=ok || r=fail
verdict "$r" "fds ${fds}, ${idle_fds} before the traffic"
marker_rss=${marker_rss:-$idle_rss}
((rss <= marker_rss + SOAK_RSS_SLACK_KIB)) && r=ok || r=fail
verdict "$r" "rss ${rss} KiB, ${marker_rss} at the end of the first fifth (slack ${SOAK_RSS_SLACK_KIB})"
grep -q panicked "$tmp/lclb.log" && r=fail || r=ok
verdict "$r" "no panic in lclb's log"
echo "soak: $passed passed, $failed failed"
((failed == 0))
