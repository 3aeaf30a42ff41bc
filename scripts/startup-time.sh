#!/usr/bin/env bash
# Time from starting lclb to its listener accepting a connection, over RUNS runs (default 10).
#
#   scripts/startup-time.sh BINARY CONFIG PORT
#
# Each run starts BINARY --config CONFIG, polls 127.0.0.1:PORT with bash's /dev/tcp until a
# connect succeeds (for at most 5 s), then kills it. Prints the minimum, median and maximum in
# microseconds. The figure includes the polling loop's own latency, so it is an upper bound.
set -euo pipefail
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
case ${1:-} in -h | --help) usage; exit 0 ;; esac
(($# == 3)) || { usage >&2; exit 2; }
bin=$1 config=$2 port=$3 runs=${RUNS:-10}
"$bin" --check-config --config "$config" >/dev/null
times=()
for ((i = 0; i < runs; i++)); do
  start=$(date +%s%N)
  RUST_LOG=error "$bin" --config "$config" 2>/dev/null &
  pid=$!
  deadline=$((start + 5000000000))
  until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    if (($(date +%s%N) > deadline)) || ! kill -0 "$pid" 2>/dev/null; then
      kill -KILL "$pid" 2>/dev/null || true
      echo "lclb did not accept on port $port within 5 s" >&2
      exit 1
    fi
  done
  end=$(date +%s%N)
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  times+=($(((end - start) / 1000)))
done
sorted=$(printf '%s\n' "${times[@]}" | sort -n)
min=$(head -n1 <<<"$sorted")
max=$(tail -n1 <<<"$sorted")
median=$(sed -n "$(((runs + 1) / 2))p" <<<"$sorted")
echo "start-up to accepting, $runs runs: min ${min} us, median ${median} us, max ${max} us"
