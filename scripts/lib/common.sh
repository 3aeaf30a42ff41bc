# shellcheck shell=bash
# Helpers for the scripts in scripts/: sourced, not run. Needs bash, openssl and coreutils only.

# The repository root (the folder above scripts/).
# shellcheck disable=SC2034 # used by the scripts that source this file
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

# Seconds one mTLS call may take in all (connect, handshake, greeting, echo).
MTLS_TIMEOUT=${MTLS_TIMEOUT:-10}

die() {
  echo "error: $*" >&2
  exit 1
}

# script_help SCRIPT: prints SCRIPT's opening comment (line 2 up to `set -euo`), its usage text.
script_help() {
  sed -n '2,/^set -euo/p' "$1" | sed '$d; s/^# \{0,1\}//'
}

# help_if_asked ARGS...: prints the calling script's usage and exits 0 if ARGS start with -h
# or --help.
help_if_asked() {
  case "${1:-}" in
    -h | --help)
      script_help "$0"
      exit 0
      ;;
  esac
}

# A write to a client that has already gone must not kill the script with SIGPIPE.
trap '' PIPE

# split_addr HOST:PORT: sets ADDR_HOST and ADDR_PORT ([::1]:9443 works too).
split_addr() {
  local addr=$1
  ADDR_PORT=${addr##*:}
  ADDR_HOST=${addr%:*}
  ADDR_HOST=${ADDR_HOST#[}
  ADDR_HOST=${ADDR_HOST%]}
  [[ -n "$ADDR_HOST" && "$ADDR_PORT" =~ ^[0-9]+$ ]] ||
    die "'$addr' is not HOST:PORT (such as 127.0.0.1:9443)"
}

# port_listening PORT: true when some socket on this machine listens on TCP PORT. Reads
# /proc/net/tcp{,6} rather than connecting, so the balancer logs no stray connection.
port_listening() {
  local hex
  hex=$(printf '%04X' "$1")
  # Lines read "  sl: LOCAL_IP:PORT REMOTE_IP:PORT ST ..."; LISTEN is state 0A. One grep pass:
  # these files can be long (TIME_WAIT sockets) and are slow to read in small pieces.
  grep -qsE "^ *[0-9]+: [0-9A-F]+:$hex [0-9A-F]+:[0-9A-F]+ 0A " /proc/net/tcp /proc/net/tcp6
}

# wait_listening PORT SECONDS [PID]: waits until PORT listens; fails early if PID has exited.
wait_listening() {
  local port=$1 seconds=$2 pid=${3:-} i
  for ((i = 0; i < seconds * 20; i++)); do
    if port_listening "$port"; then
      return 0
    fi
    if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
      return 1
    fi
    sleep 0.05
  done
  return 1
}

# mtls_call ADDR CERT KEY CA [PAYLOAD]
#
# Opens one mTLS connection through the balancer with `openssl s_client`, sends one line and
# reads the upstream's greeting (its name) and the echo of that line, then closes. Prints one
# line:
#   ok NAME              the upstream NAME answered and echoed the line
#   refused DETAIL       the server turned the client down: a TLS alert during the handshake
#                        ("tls alert N (TEXT)"), or a completed handshake followed by
#                        close_notify and no byte ("close_notify after the handshake, no
#                        greeting": lclb's way of refusing an unauthorized client)
#   failed DETAIL        anything else: no connection, a timeout, a bad server certificate,
#                        a wrong echo, a close after the handshake without close_notify
# The server certificate is checked against CA and against the host (IP or DNS name). CERT
# and KEY may be empty to connect with no client certificate.
mtls_call() {
  local addr=$1 cert=$2 key=$3 ca=$4 payload=${5:-ping-$$-$RANDOM}
  local dir pid w r greeting="" echoed="" rc=0 err msg=""
  split_addr "$addr"
  local args=(-brief -connect "$addr" -CAfile "$ca" -verify_return_error)
  if [[ "$ADDR_HOST" =~ ^[0-9.]+$ || "$ADDR_HOST" == *:* ]]; then
    args+=(-verify_ip "$ADDR_HOST")
  else
    args+=(-verify_hostname "$ADDR_HOST" -servername "$ADDR_HOST")
  fi
  if [[ -n "$cert" ]]; then
    args+=(-cert "$cert" -key "$key")
  fi
  dir=$(mktemp -d "${TMPDIR:-/tmp}/lclb-mtls.XXXXXX")
  mkfifo "$dir/in" "$dir/out"
  # -msgfile records the TLS messages received, so that a close_notify can be told from a
  # connection that simply dropped.
  args+=(-msg -msgfile "$dir/msg")
  timeout "$MTLS_TIMEOUT" openssl s_client "${args[@]}" <"$dir/in" >"$dir/out" 2>"$dir/err" &
  pid=$!
  MTLS_PID=$pid
  # Open our ends in the order the client opens its own (stdin, then stdout): no deadlock.
  exec {w}>"$dir/in" {r}<"$dir/out"
  # The upstream speaks first; the line goes out once its greeting is in. (Sending at once
  # works too in TLS terms, but then it can reach lclb in the same read as the client's
  # handshake Finished; the greeting-first order tests the forwarding path on its own.)
  if IFS= read -r -t "$MTLS_TIMEOUT" greeting <&"$r"; then
    { printf '%s\n' "$payload" >&"$w"; } 2>/dev/null || true
    IFS= read -r -t "$MTLS_TIMEOUT" echoed <&"$r" || echoed=""
  else
    greeting=""
  fi
  # Closing stdin makes s_client send close_notify and exit; the upstream then sees EOF.
  exec {w}>&-
  wait "$pid" || rc=$?
  exec {r}<&-
  err=$(<"$dir/err")
  [[ -f "$dir/msg" ]] && msg=$(<"$dir/msg")
  rm -rf "$dir"

  if [[ -n "$greeting" ]]; then
    if [[ "$echoed" == "$payload" ]]; then
      echo "ok $greeting"
    else
      echo "failed upstream $greeting did not echo the line back (got '${echoed}')"
    fi
    return 0
  fi
  if ((rc == 124)); then
    echo "failed timed out after ${MTLS_TIMEOUT}s"
  elif [[ "$err" == *"verify error"* || "$err" == *"certificate verify failed"* ]]; then
    echo "failed server certificate not accepted: $(grep -m1 -o 'verify error:.*' <<<"$err" || echo "$err" | tail -n1)"
  elif [[ "$err" =~ SSL\ alert\ number\ ([0-9]+) ]]; then
    local alert=${BASH_REMATCH[1]} text
    text=$(grep -m1 -oE '(tlsv1|sslv3|tlsv13) alert [a-z ]+' <<<"$err" || true)
    echo "refused tls alert $alert${text:+ ($text)}"
  elif [[ "$err" == *"CONNECTION ESTABLISHED"* ]]; then
    if grep -qE '^<<< .*Alert.*close_notify' <<<"$msg"; then
      echo "refused close_notify after the handshake, no greeting"
    else
      echo "failed closed after the handshake without close_notify, no greeting"
    fi
  elif [[ "$err" == *"Connection refused"* || "$err" == *"connect:errno"* ]]; then
    echo "failed cannot connect to $addr"
  else
    echo "failed $(grep -v "servername" <<<"$err" | tail -n1)"
  fi
}

# Counters of the checks a test script makes; it ends with
#   echo "NAME: $passed passed, $failed failed"; ((failed == 0))
passed=0
failed=0
pass() {
  passed=$((passed + 1))
  echo "  ok    $*"
}
fail() {
  failed=$((failed + 1))
  echo "  FAIL  $*"
}

# check_served DESCRIPTION CRT KEY "ALLOWED UPSTREAMS": TRIES connections to LB_ADDR (CA file
# $ca), each answered by one of ALLOWED; with REQUIRE_ALL=1, every one of them reached
# (sequential connections rotate over equally loaded upstreams).
check_served() {
  local what=$1 crt=$2 key=$3 allowed=" $4 " i result status detail seen=" " u
  echo "$what (allowed: $4) -> $LB_ADDR"
  for ((i = 1; i <= TRIES; i++)); do
    result=$(mtls_call "$LB_ADDR" "$crt" "$key" "$ca")
    status=${result%% *}
    detail=${result#* }
    if [[ "$status" != ok ]]; then
      fail "#$i $status: $detail"
    elif [[ "$allowed" != *" $detail "* ]]; then
      fail "#$i answered by $detail, which this client is not allowed to reach"
    else
      pass "#$i answered by $detail"
      [[ "$seen" == *" $detail "* ]] || seen+="$detail "
    fi
  done
  if [[ "$REQUIRE_ALL" == 1 ]]; then
    for u in $4; do
      if [[ "$seen" != *" $u "* ]]; then
        fail "never reached $u in $TRIES connections (is it up?)"
      fi
    done
  fi
  echo "  reached:${seen% }"
}
