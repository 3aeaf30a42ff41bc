#!/usr/bin/env bash
# Benchmarks lclb against HAProxy and NGINX (and against the no-hop reference: the bench tool's
# own rustls server answering directly), all on 127.0.0.1, and prints a markdown table of
# medians with lclb's ratio to the better peer. See BENCHMARKS.md.
#
#   scripts/bench.sh                      # defaults: 3 rounds, 5 s timed runs (~9 min)
#   ROUNDS=1 DURATION=2 scripts/bench.sh  # a quick end-to-end check
#
# Knobs (environment):
#   ROUNDS=3          rounds; each runs every figure against every target, interleaved A B C D
#   DURATION=5        seconds per handshakes run
#   THREADS=4         client threads of the handshakes mode
#   BYTES1=256M       bytes per connection, throughput with 1 connection
#   BYTES8=64M        bytes per connection, throughput with 8 connections
#   LAT_COUNT=10000   round trips of the latency mode (after 1000 warm-up)
#   HOLD=2000         connections held by the hold mode (8000 works; see BENCHMARKS.md)
#   LOADED_CONNS=1000 connections open at once in the latency-under-load figure (`loaded`)
#   LOADED_RATE=10000 its echo round trips per second, in total over all those connections (at
#                     20000 every balancer falls behind on 2 shared cores, and the figure would
#                     measure a growing queue, not latency: check the "achieved" row)
#   LOADED_SECS=20    its timed part, seconds (after 2 s of warm-up)
#   LOADED_NICE=-10   the loaded client's nice value, the same for every target: it stands for
#                     clients on other machines, and its one thread must not queue behind the
#                     thousands of threads of a thread-per-connection target (its own delay in
#                     sending is reported as "client send delay")
#   TARGETS="lclb haproxy nginx nohop"   which targets, in run order
#   FIGURES="handshakes handshakes_pq handshakes_resumed up1 up8 down1 down8 latency loaded hold"
#                     handshakes_resumed: clients that resume TLS 1.3 sessions (tickets), each
#                     thread with its own session store, every target with its default ticket
#                     settings (see BENCHMARKS.md); loaded: latency under load, LOADED_CONNS
#                     connections at once doing 64-byte echoes at LOADED_RATE in total, open
#                     loop, from one client thread (see BENCHMARKS.md)
#   WORKERS=$(nproc)  HAProxy threads / NGINX worker processes
#   FIRST_WRITE_DELAY=0  ms the throughput and latency clients wait after the handshake before
#                     their first byte (outside the timed part; see BENCHMARKS.md)
#   UPSTREAM_TLS=0    1: the upstreams speak mTLS (lclb's server configuration, requiring a client
#                     certificate), and every balancer re-encrypts toward them, verifying their
#                     certificate and name (upstream.lb.com) against a second CA and presenting
#                     its own client certificate: lclb `[group.tls]`, HAProxy `server ... ssl
#                     verify required ca-file ... crt ...`, NGINX `proxy_ssl on` with
#                     `proxy_ssl_verify` and `proxy_ssl_certificate`, TLS 1.3, sessions reused.
#                     The no-hop target has no upstream and is unaffected. The handshakes
#                     figures gain a row: the share of the upstreams' handshakes that resumed
#   BASE_PORT=19400   ports BASE_PORT+1 .. BASE_PORT+140 on 127.0.0.1 are used
#   OUT_DIR=target/bench   where results-*.md, raw-*.txt and logs-*/ go
#   SKIP_BUILD=1      do not run cargo build (`make bench-build` builds both binaries)
#   LCLB_BIN=PATH     benchmark this lclb binary instead of target/release/lclb (for example one
#                     built from a clean export of a commit); BENCH_BIN likewise for lclb-bench
#                     (the workspace's bench/ package, target/release/lclb-bench);
#                     LCLB_LABEL=TEXT says in the results where that binary comes from
#   INSTALL=0         do not apt-get install missing haproxy / nginx / libnginx-mod-stream
#   PROFILE=FIGURE    instead of the benchmark: run FIGURE (handshakes, up1, down1, ...) against
#                     lclb under `perf record -g` and write perf-FIGURE.txt (needs linux-perf)
#   PERF_CALLGRAPH=fp  perf's call-graph mode: fp (frame pointers: kernel chains only, since the
#                     release build has none), or dwarf (user-space chains too; larger data)
#   KEEP=1            keep the temporary folder (certificates, configs)
#   CLUSTER=URL       lclb shares its per-client limits through the Redis at URL ([cluster]
#                     redis = URL): every admission costs one Redis round trip
set -euo pipefail

# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
help_if_asked "$@"

cd "$REPO_ROOT"

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
THREADS=${THREADS:-4}
BYTES1=${BYTES1:-256M}
BYTES8=${BYTES8:-64M}
LAT_COUNT=${LAT_COUNT:-10000}
HOLD=${HOLD:-2000}
LOADED_CONNS=${LOADED_CONNS:-1000}
LOADED_RATE=${LOADED_RATE:-10000}
LOADED_SECS=${LOADED_SECS:-20}
LOADED_NICE=${LOADED_NICE:--10}
TARGETS=${TARGETS:-lclb haproxy nginx nohop}
FIGURES=${FIGURES:-handshakes handshakes_pq handshakes_resumed up1 up8 down1 down8 latency loaded hold}
WORKERS=${WORKERS:-$(nproc)}
FIRST_WRITE_DELAY=${FIRST_WRITE_DELAY:-0}
UPSTREAM_TLS=${UPSTREAM_TLS:-0}
BASE_PORT=${BASE_PORT:-19400}
OUT_DIR=${OUT_DIR:-$REPO_ROOT/target/bench}
SKIP_BUILD=${SKIP_BUILD:-0}
INSTALL=${INSTALL:-1}
PROFILE=${PROFILE:-}
PERF_CALLGRAPH=${PERF_CALLGRAPH:-fp}
KEEP=${KEEP:-0}
CLUSTER=${CLUSTER:-}

CN=bench.lb.com
UPSTREAMS=3

say() { echo "bench: $*" >&2; }

for v in ROUNDS DURATION THREADS LAT_COUNT HOLD LOADED_CONNS LOADED_RATE LOADED_SECS WORKERS BASE_PORT; do
  [[ ${!v} =~ ^[0-9]+$ && ${!v} -gt 0 ]] || die "$v must be a positive whole number, not '${!v}'"
done
[[ $FIRST_WRITE_DELAY =~ ^[0-9]+$ ]] || die "FIRST_WRITE_DELAY must be a whole number of ms"
[[ $UPSTREAM_TLS == 0 || $UPSTREAM_TLS == 1 ]] || die "UPSTREAM_TLS must be 0 or 1, not '$UPSTREAM_TLS'"

# ------------------------------------------------------------------------------------------
# Tools: the peers come from Debian.
need=()
command -v openssl >/dev/null || need+=(openssl)
command -v haproxy >/dev/null || need+=(haproxy)
command -v nginx >/dev/null || need+=(nginx)
[[ -f /usr/lib/nginx/modules/ngx_stream_module.so ]] || need+=(libnginx-mod-stream)
if ((${#need[@]})); then
  [[ $INSTALL == 1 ]] || die "missing: ${need[*]} (INSTALL=0 forbids installing them)"
  say "installing ${need[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq "${need[@]}" >/dev/null
  # Debian starts the packaged services; they listen on :80 and are not part of the run.
  if command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
    systemctl stop nginx haproxy 2>/dev/null || true
  fi
fi

if [[ $SKIP_BUILD != 1 && ( -z ${LCLB_BIN:-} || -z ${BENCH_BIN:-} ) ]]; then
  say "building release binaries (lclb, and lclb-bench from bench/)"
  cargo build --release --locked -p lclb -p lclb-bench >&2
fi
target_dir=${CARGO_TARGET_DIR:-$REPO_ROOT/target}
LCLB=${LCLB_BIN:-$target_dir/release/lclb}
BENCH=${BENCH_BIN:-$target_dir/release/lclb-bench}
[[ -x $LCLB && -x $BENCH ]] || die "$LCLB or $BENCH missing (make bench-build)"

# Enough descriptors for HOLD connections, and for LOADED_CONNS: a balancer holds two sockets
# per connection (the limit is inherited by every target and by the client).
hard=$(ulimit -Hn)
[[ $hard == unlimited ]] && hard=1048576
ulimit -n "$hard"
if ((hard < 2 * HOLD + 200)); then
  say "warning: the fd limit ($hard) is below 2*HOLD+200; the hold runs may fail"
fi
if ((hard < 2 * LOADED_CONNS + 200)); then
  say "warning: the fd limit ($hard) is below 2*LOADED_CONNS+200; the loaded runs may fail"
fi
# The most connections any figure holds open at once through one target.
MOST_CONNS=$((HOLD > LOADED_CONNS ? HOLD : LOADED_CONNS))
NOFILE=$hard
pid_max=$(cat /proc/sys/kernel/pid_max)
if ((3 * HOLD + 2000 > pid_max)); then
  say "warning: HOLD=$HOLD needs about $((3 * HOLD)) threads at once (lclb 2 per connection, the greeting upstreams 1); kernel.pid_max is $pid_max"
fi

STAMP=$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT_DIR"
WORK=$(mktemp -d /tmp/lclb-bench.XXXXXX)
LOGS=$OUT_DIR/logs-$STAMP
mkdir -p "$LOGS"
RAW=$OUT_DIR/raw-$STAMP.txt
DATA=$WORK/data.txt
: >"$RAW"
: >"$DATA"

PIDS=()
cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    local alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || break
    sleep 0.2
  done
  for pid in "${PIDS[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  if [[ $KEEP == 1 ]]; then say "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start NAME CMD...: runs CMD in the background, output to the logs folder; sets LAST_PID.
start() {
  local name=$1
  shift
  "$@" >"$LOGS/$name.log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

# stop PID: ends one process started here and waits for it.
stop() {
  local pid=$1
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# must_listen PORT PID: until PORT listens (10 s at most); dies if PID exits first. common.sh
# reads /proc/net/tcp rather than connecting, so no target counts a stray connection.
must_listen() {
  wait_listening "$1" 10 "$2" ||
    die "nothing listens on 127.0.0.1:$1 after 10 s, or its process exited; see $LOGS"
}

# ------------------------------------------------------------------------------------------
# Certificates: ECDSA P-256, X.509 v3, a CA, the server (localhost, 127.0.0.1), the client.
CERTS=$WORK/certs
mkdir -p "$CERTS"
(
  cd "$CERTS"
  umask 077
  key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
  key ca.key
  openssl req -x509 -new -key ca.key -sha256 -days 2 -subj "/CN=bench-ca.lb.com" \
    -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
    -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -addext "subjectKeyIdentifier=hash" -out ca.crt 2>/dev/null
  leaf() { # NAME CN EKU [SAN]
    key "$1.key"
    openssl req -new -key "$1.key" -subj "/CN=$2" -out "$1.csr" 2>/dev/null
    {
      echo "basicConstraints=critical,CA:FALSE"
      echo "keyUsage=critical,digitalSignature"
      echo "extendedKeyUsage=$3"
      echo "subjectKeyIdentifier=hash"
      echo "authorityKeyIdentifier=keyid"
      if [[ -n ${4:-} ]]; then echo "subjectAltName=$4"; fi
    } >"$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -set_serial "0x$(openssl rand -hex 15)" \
      -days 2 -sha256 -extfile "$1.ext" -out "$1.crt" 2>/dev/null
  }
  leaf server localhost serverAuth "DNS:localhost,IP:127.0.0.1"
  leaf client "$CN" clientAuth
  leaf other other.lb.com clientAuth # signed by the same CA, but not on the allow-list
  cat server.crt server.key >server.pem # HAProxy wants both in one file
  openssl verify -CAfile ca.crt server.crt client.crt >/dev/null
) || die "could not mint certificates with openssl"
if [[ $UPSTREAM_TLS == 1 ]]; then
  # A second CA for the upstream side: the upstreams' certificate (upstream.lb.com, the name
  # every balancer verifies and sends as SNI) and the balancers' client certificate.
  (
    cd "$CERTS"
    umask 077
    key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
    key up-ca.key
    openssl req -x509 -new -key up-ca.key -sha256 -days 2 -subj "/CN=bench-upstream-ca.lb.com" \
      -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
      -addext "keyUsage=critical,keyCertSign,cRLSign" \
      -addext "subjectKeyIdentifier=hash" -out up-ca.crt 2>/dev/null
    for leaf in "upstream upstream.lb.com serverAuth DNS:upstream.lb.com" "balancer balancer.lb.com clientAuth"; do
      read -r name cn eku san <<<"$leaf"
      key "$name.key"
      openssl req -new -key "$name.key" -subj "/CN=$cn" -out "$name.csr" 2>/dev/null
      {
        echo "basicConstraints=critical,CA:FALSE"
        echo "keyUsage=critical,digitalSignature"
        echo "extendedKeyUsage=$eku"
        echo "subjectKeyIdentifier=hash"
        echo "authorityKeyIdentifier=keyid"
        if [[ -n $san ]]; then echo "subjectAltName=$san"; fi
      } >"$name.ext"
      openssl x509 -req -in "$name.csr" -CA up-ca.crt -CAkey up-ca.key -set_serial "0x$(openssl rand -hex 15)" \
        -days 2 -sha256 -extfile "$name.ext" -out "$name.crt" 2>/dev/null
    done
    cat balancer.crt balancer.key >balancer.pem # HAProxy's crt: certificate and key in one file
    openssl verify -CAfile up-ca.crt upstream.crt balancer.crt >/dev/null
  ) || die "could not mint the upstream certificates with openssl"
fi
UP_NAME=upstream.lb.com
UP_CA=$CERTS/up-ca.crt
UP_CRT=$CERTS/upstream.crt
UP_KEY=$CERTS/upstream.key
LB_CRT=$CERTS/balancer.crt
LB_KEY=$CERTS/balancer.key
CA=$CERTS/ca.crt
SRV_CRT=$CERTS/server.crt
SRV_KEY=$CERTS/server.key
CLIENT=(--cert "$CERTS/client.crt" --key "$CERTS/client.key" --ca "$CA" --server-name localhost)
OTHER=(--cert "$CERTS/other.crt" --key "$CERTS/other.key" --ca "$CA" --server-name localhost)

# ------------------------------------------------------------------------------------------
# Ports. Upstreams: greeting +1..3, echo +11..13, sink +21..23, source +31..33 (plain TCP, or
# mTLS with UPSTREAM_TLS=1).
# Frontends: lclb +101.., haproxy +111.., nginx +121.., nohop +131..: greeting, echo, sink,
# source, then +5 for the hold mode's own fresh instance.
MODES=(greeting echo sink source)
mode_index() { case $1 in greeting) echo 0 ;; echo) echo 1 ;; sink) echo 2 ;; source) echo 3 ;; esac }
upstream_port() { echo $((BASE_PORT + 10 * $(mode_index "$1") + $2)); }
target_base() { case $1 in lclb) echo $((BASE_PORT + 101)) ;; haproxy) echo $((BASE_PORT + 111)) ;; nginx) echo $((BASE_PORT + 121)) ;; nohop) echo $((BASE_PORT + 131)) ;; esac }
frontend_port() { echo $(($(target_base "$1") + $(mode_index "$2"))); }
hold_port() { echo $(($(target_base "$1") + 5)); }

UP_TLS_ARGS=()
[[ $UPSTREAM_TLS == 1 ]] && UP_TLS_ARGS=(--tls "$UP_CRT" "$UP_KEY" "$UP_CA")
for mode in "${MODES[@]}"; do
  for i in $(seq $UPSTREAMS); do
    port=$(upstream_port "$mode" "$i")
    start "upstream-$mode-$i" "$BENCH" server --mode "$mode" --listen "127.0.0.1:$port" --lifetime 3600 "${UP_TLS_ARGS[@]}"
    must_listen "$port" "$LAST_PID"
  done
done
if [[ $UPSTREAM_TLS == 1 ]]; then
  # Every balancer must present a client certificate to the upstreams: an upstream answers a
  # client without one with an alert, not its greeting (checked here with openssl), so the
  # allow-list check below passes only for a balancer that presents the certificate.
  port=$(upstream_port greeting 1)
  s_client() {
    timeout 10 openssl s_client -connect "127.0.0.1:$port" -servername "$UP_NAME" -verify_hostname "$UP_NAME" \
      -CAfile "$UP_CA" -verify_return_error -quiet "$@" </dev/null 2>/dev/null || true
  }
  [[ $(s_client -cert "$LB_CRT" -key "$LB_KEY") == ok ]] ||
    die "a TLS upstream does not greet a client that has the balancers' certificate; see $LOGS"
  [[ -z $(s_client) ]] || die "a TLS upstream greets a client that has no certificate"
  say "upstreams up: ${UPSTREAMS} each of ${MODES[*]}, mTLS as $UP_NAME, client certificate required"
else
  say "upstreams up: ${UPSTREAMS} each of ${MODES[*]}"
fi

# ------------------------------------------------------------------------------------------
# Configurations. Equivalent on every point a peer can express: mTLS required against the CA,
# TLS 1.3 only with AES-128-GCM preferred, a CN allow-list that picks the upstream group,
# least-connection balancing, a per-CN rate limit far above what the run reaches (NGINX cannot
# express one after TLS), TCP health checks every 2 s (NGINX OSS: passive max_fails only),
# no access logs, half-close carried through.

lclb_config() { # FILE PORT MODE
  {
    echo "listen = \"127.0.0.1:$2\""
    echo "[tls]"
    echo "ca_cert = \"$CA\""
    echo "server_cert = \"$SRV_CRT\""
    echo "server_key = \"$SRV_KEY\""
    echo "[limits]"
    # lclb caps max_connections at what its fd limit allows (two sockets per connection).
    # Above what the hold and loaded figures open at once (the default, 10000, is too).
    echo "max_connections = $(((MOST_CONNS + 1000) < (NOFILE - 64) / 2 ? MOST_CONNS + 1000 : (NOFILE - 64) / 2))"
    # Every benchmark client comes from 127.0.0.1: the per-address handshake cap (on by
    # default, 32) would refuse the load generators' bursts (the loaded client has 64
    # handshakes in progress at once, the handshakes client THREADS).
    echo "per_ip_max_handshakes = 0"
    # Handshakes in progress at once, all addresses: the default (512) is above what any
    # client here has in progress (64 at most), so it is left as it is.
    echo "[rate_limit]"
    echo "rate = 1000000.0"
    echo "burst = 1000000"
    echo "[health_check]"
    echo "interval = \"2s\""
    for i in $(seq $UPSTREAMS); do
      echo "[[upstream]]"
      echo "name = \"$3$i\""
      echo "address = \"127.0.0.1:$(upstream_port "$3" "$i")\""
      echo "group = \"$3\""
    done
    echo "[[client]]"
    echo "cn = \"$CN\""
    echo "groups = [\"$3\"]"
    if [[ $UPSTREAM_TLS == 1 ]]; then
      echo "[[group]]"
      echo "name = \"$3\""
      echo "[group.tls]"
      echo "ca_cert = \"$UP_CA\""
      echo "server_name = \"$UP_NAME\""
      echo "client_cert = \"$LB_CRT\""
      echo "client_key = \"$LB_KEY\""
    fi
    if [[ -n $CLUSTER ]]; then
      echo "[cluster]"
      echo "redis = \"$CLUSTER\""
    fi
  } >"$1"
}

haproxy_config() { # FILE MODE:PORT...
  local file=$1 mp mode port i
  shift
  {
    cat <<EOF
global
    nbthread $WORKERS
    maxconn $(((MOST_CONNS + 2000) < (NOFILE - 100) / 2 ? MOST_CONNS + 2000 : (NOFILE - 100) / 2))
    ssl-default-bind-ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256
    ssl-default-bind-options ssl-min-ver TLSv1.3
EOF
    if [[ $UPSTREAM_TLS == 1 ]]; then
      # Toward the upstreams as toward the clients: TLS 1.3, AES-128-GCM first.
      echo "    ssl-default-server-ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
      echo "    ssl-default-server-options ssl-min-ver TLSv1.3"
    fi
    cat <<EOF

defaults
    mode tcp
    # Each frontend as many as the whole process (the hold and loaded figures hold thousands).
    maxconn $(((MOST_CONNS + 2000) < (NOFILE - 100) / 2 ? MOST_CONNS + 2000 : (NOFILE - 100) / 2))
    timeout connect 2s
    timeout client 600s
    timeout server 600s
    timeout client-fin 30s
    timeout server-fin 30s

# Per-CN rate limit: connections per second of each client identity, limit far above the run.
backend per_cn
    stick-table type string len 64 size 10k expire 60s store conn_rate(1s)
EOF
    for mp in "$@"; do
      mode=${mp%%:*} port=${mp##*:}
      cat <<EOF

frontend fe_$mode
    bind 127.0.0.1:$port ssl crt $CERTS/server.pem ca-file $CA verify required
    tcp-request session track-sc0 ssl_c_s_dn(cn) table per_cn
    tcp-request session reject if { sc0_conn_rate(per_cn) gt 1000000 }
    tcp-request session reject unless { ssl_c_s_dn(cn) -m str $CN }
    use_backend be_$mode if { ssl_c_s_dn(cn) -m str $CN }

backend be_$mode
    balance leastconn
EOF
      if [[ $UPSTREAM_TLS == 1 ]]; then
        # Sessions to each server are reused by default (no "no-ssl-reuse"); checks run over
        # TLS too (implied by "ssl"), with the same certificate, and SNI and name checked.
        echo "    default-server check inter 2s rise 2 fall 3 ssl verify required ca-file $UP_CA crt $CERTS/balancer.pem sni str($UP_NAME) check-sni $UP_NAME verifyhost $UP_NAME"
      else
        echo "    default-server check inter 2s rise 2 fall 3"
      fi
      for i in $(seq $UPSTREAMS); do
        echo "    server $mode$i 127.0.0.1:$(upstream_port "$mode" "$i")"
      done
    done
  } >"$file"
}

nginx_config() { # FILE MODE:PORT...
  local file=$1 mp mode port i
  shift
  {
    cat <<EOF
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes $WORKERS;
worker_rlimit_nofile $NOFILE;
daemon off;
pid $file.pid;
error_log $LOGS/nginx-error.log warn;
# Per worker, client and upstream connections both count, and one worker may take them all:
# twice what the hold or loaded figure opens (1000 loaded connections: 2000), plus room.
events { worker_connections $((2 * MOST_CONNS + 4000)); }
stream {
    ssl_protocols TLSv1.3;
    ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256;
    ssl_prefer_server_ciphers on;
    ssl_certificate $SRV_CRT;
    ssl_certificate_key $SRV_KEY;
    ssl_client_certificate $CA;
    ssl_verify_client on;
    proxy_connect_timeout 2s;
    proxy_timeout 600s;
    proxy_half_close on;
    access_log off;
    # No upstream unless the CN is allowed: "deny" has no usable server. (limit_conn runs
    # before the TLS handshake in the stream module, so no per-CN limit can be expressed.)
    upstream deny { server 127.0.0.1:9 down; }
EOF
    if [[ $UPSTREAM_TLS == 1 ]]; then
      # nginx 1.22's default proxy_ssl_protocols stop at TLSv1.2, and the name it would verify
      # by default is that of the upstream block.
      cat <<EOF
    proxy_ssl on;
    proxy_ssl_protocols TLSv1.3;
    proxy_ssl_conf_command Ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256;
    proxy_ssl_verify on;
    proxy_ssl_trusted_certificate $UP_CA;
    proxy_ssl_name $UP_NAME;
    proxy_ssl_server_name on;
    proxy_ssl_certificate $LB_CRT;
    proxy_ssl_certificate_key $LB_KEY;
    proxy_ssl_session_reuse on;
EOF
    fi
    for mp in "$@"; do
      mode=${mp%%:*} port=${mp##*:}
      cat <<EOF

    map \$ssl_client_s_dn \$pool_$mode {
        "~(^|,)CN=${CN//./\\.}(,|\$)" $mode;
        default deny;
    }
    upstream $mode {
        least_conn;
        zone $mode 64k;
EOF
      for i in $(seq $UPSTREAMS); do
        echo "        server 127.0.0.1:$(upstream_port "$mode" "$i") max_fails=3 fail_timeout=10s;"
      done
      cat <<EOF
    }
    server {
        listen 127.0.0.1:$port ssl;
        proxy_pass \$pool_$mode;
    }
EOF
    done
    echo "}"
  } >"$file"
}

# start_target TARGET NAME PORT MODE...: one instance serving MODE... from PORT on (nohop and
# lclb: one process per mode); sets TARGET_PIDS.
start_target() {
  local target=$1 name=$2 port=$3 mode mps=() p
  shift 3
  TARGET_PIDS=()
  case $target in
    lclb)
      p=$port
      for mode in "$@"; do
        lclb_config "$WORK/$name-$mode.toml" "$p" "$mode"
        RUST_LOG=warn start "$name-$mode" "$LCLB" --config "$WORK/$name-$mode.toml"
        TARGET_PIDS+=("$LAST_PID")
        must_listen "$p" "$LAST_PID"
        p=$((p + 1))
      done
      ;;
    nohop)
      p=$port
      for mode in "$@"; do
        start "$name-$mode" "$BENCH" server --mode "$mode" --listen "127.0.0.1:$p" \
          --tls "$SRV_CRT" "$SRV_KEY" "$CA" --lifetime 3600
        TARGET_PIDS+=("$LAST_PID")
        must_listen "$p" "$LAST_PID"
        p=$((p + 1))
      done
      ;;
    haproxy | nginx)
      p=$port
      for mode in "$@"; do
        mps+=("$mode:$p")
        p=$((p + 1))
      done
      if [[ $target == haproxy ]]; then
        haproxy_config "$WORK/$name.cfg" "${mps[@]}"
        haproxy -c -q -f "$WORK/$name.cfg" >"$LOGS/$name-check.log" 2>&1 ||
          die "haproxy refuses $WORK/$name.cfg: $(cat "$LOGS/$name-check.log")"
        start "$name" haproxy -db -f "$WORK/$name.cfg"
      else
        nginx_config "$WORK/$name.conf" "${mps[@]}"
        nginx -t -q -e "$LOGS/$name-check-e.log" -p "$WORK" -c "$WORK/$name.conf" >"$LOGS/$name-check.log" 2>&1 ||
          die "nginx refuses $WORK/$name.conf: $(cat "$LOGS/$name-check.log")"
        start "$name" nginx -e "$LOGS/$name-error.log" -p "$WORK" -c "$WORK/$name.conf"
      fi
      TARGET_PIDS+=("$LAST_PID")
      for ((p = port; p < port + $#; p++)); do must_listen "$p" "$LAST_PID"; done
      ;;
  esac
}

declare -A MAIN_PID # TARGET:MODE -> pid serving it
for target in $TARGETS; do
  start_target "$target" "$target" "$(target_base "$target")" "${MODES[@]}"
  i=0
  for mode in "${MODES[@]}"; do
    if ((${#TARGET_PIDS[@]} == 1)); then MAIN_PID[$target:$mode]=${TARGET_PIDS[0]}; else MAIN_PID[$target:$mode]=${TARGET_PIDS[$i]}; fi
    i=$((i + 1))
  done
done
say "targets up: $TARGETS"
# Let the first health checks pass (lclb and HAProxy start their upstreams as UP anyway).
sleep 1

# The configurations are equivalent where it matters: each balancer lets the allowed CN
# through and refuses a CN that the CA signed but the allow-list does not name.
for target in $TARGETS; do
  [[ $target == nohop ]] && continue # the no-hop server has no allow-list
  port=$(frontend_port "$target" greeting)
  ok_line=$(timeout 20 "$BENCH" handshakes --target "127.0.0.1:$port" --threads 1 --duration 0.3 "${CLIENT[@]}" | grep '^RESULT' || true)
  no_line=$(timeout 20 "$BENCH" handshakes --target "127.0.0.1:$port" --threads 1 --duration 0.3 --timeout 2 "${OTHER[@]}" | grep '^RESULT' || true)
  ok_v=$(awk '{for (i = 1; i <= NF; i++) if ($i ~ /^value=/) print substr($i, 7)}' <<<"$ok_line")
  no_v=$(awk '{for (i = 1; i <= NF; i++) if ($i ~ /^value=/) print substr($i, 7)}' <<<"$no_line")
  if [[ -z $ok_v || $ok_v == 0.0 ]]; then die "$target does not serve the allowed client $CN: $ok_line"; fi
  if [[ -z $no_v || $no_v != 0.0 ]]; then die "$target serves other.lb.com, which is not on its allow-list: $no_line"; fi
done
say "allow-list check passed: every balancer serves $CN and refuses other.lb.com"

# ------------------------------------------------------------------------------------------
# One run: FIGURE TARGET ROUND. Appends RESULT lines to $RAW and "FIGURE TARGET ROUND VALUE
# FAILURES" lines to $DATA.
record() { echo "$1 $2 $3 $4 $5" >>"$DATA"; }

field() { # LINE KEY
  local w
  for w in $1; do
    if [[ $w == "$2="* ]]; then
      echo "${w#*=}"
      return
    fi
  done
  echo NA
}

# up_tally MODE: "FULL RESUMED", the handshakes the TLS upstreams of MODE have completed so far
# (their latest TLS-TALLY lines, printed each second some completed; full counts those after a
# HelloRetryRequest too).
up_tally() {
  local i f=0 r=0 l
  for i in $(seq $UPSTREAMS); do
    l=$(grep '^TLS-TALLY ' "$LOGS/upstream-$1-$i.log" | tail -1 || true)
    [[ -z $l ]] && continue
    f=$((f + $(field "$l" full) + $(field "$l" hrr)))
    r=$((r + $(field "$l" resumed)))
  done
  echo "$f $r"
}

run_client() { # LIMIT_SECS LOGNAME ARGS...: runs the bench client, prints its RESULT line
  local limit=$1 log=$2
  shift 2
  nice -n "${BENCH_NICE:-0}" timeout -k 5 "$limit" "$BENCH" "$@" >"$log" 2>&1 || true
  grep '^RESULT ' "$log" | tail -1 || true
}

run_figure() {
  local fig=$1 target=$2 round=$3 port line log hold_pid
  log=$LOGS/run-$round-$fig-$target.log
  case $fig in
    handshakes | handshakes_pq | handshakes_resumed)
      if [[ $fig == handshakes_pq && $target != lclb && $target != nohop ]]; then
        record "$fig" "$target" "$round" NA 0 # OpenSSL 3.0 has no ML-KEM
        return
      fi
      local kx=x25519 tally_before=
      local -a resume=()
      [[ $fig == handshakes_pq ]] && kx=x25519mlkem768
      # Each client thread keeps a session store, handshakes once in full before the timed
      # part, then offers a ticket on every connection; the target keeps its default ticket
      # settings (none of the configurations above mentions tickets or session caches).
      [[ $fig == handshakes_resumed ]] && resume=(--resume)
      if [[ $UPSTREAM_TLS == 1 && $target != nohop ]]; then
        sleep 1.2 # the upstreams' last tally line is at most a second old
        tally_before=$(up_tally greeting)
      fi
      line=$(run_client $((DURATION + 30)) "$log" handshakes --target "127.0.0.1:$(frontend_port "$target" greeting)" \
        --pid "${MAIN_PID[$target:greeting]}" --label "$target" --threads "$THREADS" --duration "$DURATION" --kx "$kx" "${resume[@]}" "${CLIENT[@]}")
      if [[ -n $tally_before ]]; then
        # Which share of the upstream handshakes this run caused were resumptions (health
        # checks, a few per second across all targets, are counted in as well).
        sleep 1.2
        local tally_after f0 r0 f1 r1
        tally_after=$(up_tally greeting)
        read -r f0 r0 <<<"$tally_before"
        read -r f1 r1 <<<"$tally_after"
        record "${fig}_upres" "$target" "$round" "$(awk -v f=$((f1 - f0)) -v r=$((r1 - r0)) 'BEGIN{print (f + r) ? 100 * r / (f + r) : "NA"}')" 0
        echo "round=$round figure=$fig target=$target upstream_full=$((f1 - f0)) upstream_resumed=$((r1 - r0))" >>"$RAW"
      fi
      ;;
    up1 | up8 | down1 | down8)
      local dir=${fig%?} conns=${fig: -1} bytes=$BYTES1 mode=sink
      [[ $conns == 8 ]] && bytes=$BYTES8
      [[ $dir == down ]] && mode=source
      line=$(run_client 150 "$log" throughput --target "127.0.0.1:$(frontend_port "$target" "$mode")" \
        --pid "${MAIN_PID[$target:$mode]}" --label "$target" --connections "$conns" --bytes "$bytes" --direction "$dir" --max-secs 120 \
        --first-write-delay "$FIRST_WRITE_DELAY" "${CLIENT[@]}")
      ;;
    latency)
      line=$(run_client 120 "$log" latency --target "127.0.0.1:$(frontend_port "$target" echo)" \
        --label "$target" --count "$LAT_COUNT" --size 64 --first-write-delay "$FIRST_WRITE_DELAY" "${CLIENT[@]}")
      ;;
    loaded)
      # Opening (64 handshakes at a time, 60 s at most), 2 s of warm-up, the timed part, and
      # as long again (10 s at least) for the last echoes of a target that fell behind.
      line=$(BENCH_NICE=$LOADED_NICE run_client $((2 * LOADED_SECS + 100)) "$log" loaded --target "127.0.0.1:$(frontend_port "$target" echo)" \
        --pid "${MAIN_PID[$target:echo]}" --label "$target" --connections "$LOADED_CONNS" --rate "$LOADED_RATE" \
        --duration "$LOADED_SECS" --warmup 2 --size 64 --open-secs 60 "${CLIENT[@]}")
      ;;
    hold)
      # A fresh instance per run, so no run inherits another's allocator state.
      start_target "$target" "hold-$target-$round" "$(hold_port "$target")" greeting
      hold_pid=${TARGET_PIDS[0]}
      line=$(run_client 200 "$log" hold --target "127.0.0.1:$(hold_port "$target")" --label "$target" \
        --connections "$HOLD" --pid "$hold_pid" --threads "$THREADS" --max-secs 150 "${CLIENT[@]}")
      stop "$hold_pid"
      ;;
    *) die "unknown figure $fig" ;;
  esac
  [[ -n $line ]] && echo "round=$round figure=$fig $line" >>"$RAW"
  local v f
  v=$(field "$line" value)
  f=$(field "$line" failures)
  [[ -z $line ]] && f=1
  # A transfer or echo run that failed has no figure (handshakes and hold still count the
  # connections that worked).
  if [[ $fig == up? || $fig == down? || $fig == latency || $fig == loaded ]] && [[ $f != 0 ]]; then v=NA; fi
  case $fig in
    latency)
      record lat_p50 "$target" "$round" "$v" "$f"
      local p99=NA p999=NA
      if [[ $v != NA ]]; then p99=$(field "$line" p99) p999=$(field "$line" p999); fi
      record lat_p99 "$target" "$round" "$p99" "$f"
      record lat_p999 "$target" "$round" "$p999" "$f"
      ;;
    loaded)
      # A run in which a connection failed or closed has no figure (its value is p99).
      local k
      for k in p50 p999 achieved cpu_us_per_rt late_p99; do
        local x=NA
        [[ $v != NA ]] && x=$(field "$line" "$k")
        record "loaded_$k" "$target" "$round" "$x" "$f"
      done
      record loaded_p99 "$target" "$round" "$v" "$f"
      ;;
    hold)
      record hold_rss "$target" "$round" "$v" "$f"
      record hold_kernel "$target" "$round" "$(field "$line" kernel_kib_per_conn)" "$f"
      local ta tb served
      ta=$(field "$line" threads_after) tb=$(field "$line" threads_before) served=$(field "$line" served)
      if [[ $ta != NA && $served != NA && $served -gt 0 ]]; then
        record hold_threads "$target" "$round" "$(awk -v a="$ta" -v b="$tb" -v s="$served" 'BEGIN{printf "%.2f", (a-b)/s}')" "$f"
      else
        record hold_threads "$target" "$round" NA "$f"
      fi
      ;;
    handshakes | handshakes_pq | handshakes_resumed)
      record "$fig" "$target" "$round" "$v" "$f"
      record "${fig}_cpu" "$target" "$round" "$(field "$line" cpu_us_per_conn)" "$f"
      [[ $fig == handshakes_resumed ]] && record "${fig}_pct" "$target" "$round" "$(field "$line" resumed_pct)" "$f"
      ;;
    *)
      record "$fig" "$target" "$round" "$v" "$f"
      local cpu=NA
      if [[ $v != NA ]]; then cpu=$(field "$line" cpu_s_per_gib); fi
      record "${fig}_cpu" "$target" "$round" "$cpu" "$f"
      ;;
  esac
  printf '  %-13s %-8s %s\n' "$fig" "$target" "${line#RESULT }" >&2
}

# ------------------------------------------------------------------------------------------
if [[ -n $PROFILE ]]; then
  command -v perf >/dev/null || die "PROFILE needs perf (apt-get install linux-perf)"
  case $PROFILE in
    handshakes | handshakes_pq | handshakes_resumed) pmode=greeting ;;
    up1 | up8) pmode=sink ;;
    down1 | down8) pmode=source ;;
    latency | loaded) pmode="echo" ;;
    *) die "PROFILE=$PROFILE: expected handshakes, handshakes_pq, handshakes_resumed, up1, up8, down1, down8, latency or loaded" ;;
  esac
  ppid=${MAIN_PID[lclb:$pmode]}
  # System-wide, so that threads lclb creates during the run are all sampled; the reports
  # are then narrowed to lclb's pid (and a third one shows who used the CPU overall).
  data=$OUT_DIR/perf-$PROFILE.data
  perf record -a --call-graph "$PERF_CALLGRAPH" -F 999 -o "$data" >"$LOGS/perf.log" 2>&1 &
  perf_pid=$!
  PIDS+=("$perf_pid")
  sleep 0.5
  run_figure "$PROFILE" lclb profile
  kill -INT "$perf_pid"
  wait "$perf_pid" || true
  report() { perf report -i "$data" --stdio --no-children "$@" 2>/dev/null | grep -v '^#' | grep -v '^$' || true; }
  # lclb's own samples, "SYMBOL (DSO)" one a line. Narrowed with perf script rather than
  # `perf report --pid`, which finds no sample of a pool thread in these system-wide recordings
  # (perf 6.1, cpu-clock in a VM).
  perf script -i "$data" -F pid,ip,sym,dso -G 2>/dev/null |
    awk -v p="$ppid" '$1 == p { $1 = ""; $2 = ""; sub(/^ +/, ""); print }' >"$WORK/lclb-samples.txt"
  shares() { # dso|symbol: share of lclb's samples by library or by symbol, largest first
    awk -v by="$1" '{ k = by == "dso" ? $NF : $0; n[k]++; t++ }
      END { for (k in n) if (100 * n[k] / t >= 0.3) printf "%7.2f%%  %s\n", 100 * n[k] / t, k }' \
      "$WORK/lclb-samples.txt" | sort -rn
  }
  {
    echo "# lclb (pid $ppid) under $PROFILE: $(wc -l <"$WORK/lclb-samples.txt") samples, by library"
    shares dso | head -20
    echo
    echo "# lclb (pid $ppid) under $PROFILE: by symbol (flat)"
    shares symbol | cut -c1-140 | head -80
    echo
    echo "# whole machine during the run: by command"
    report --sort comm -g none | head -25
  } >"$OUT_DIR/perf-$PROFILE.txt"
  # lclb's samples with their call chains (unreliable in user space: no frame pointers). head
  # stops reading early, so awk's failed write is no error of the run.
  perf script -i "$data" -F pid,tid,ip,sym,dso 2>/dev/null |
    awk -v p="$ppid" -v RS= -v ORS='\n\n' '{ split($1, id, "/") } id[1] == p' | head -20000 >"$OUT_DIR/perf-$PROFILE-callgraph.txt" || true
  say "profile of lclb under $PROFILE: $OUT_DIR/perf-$PROFILE.txt, call graphs in $OUT_DIR/perf-$PROFILE-callgraph.txt"
  exit 0
fi

say "running $ROUNDS round(s) of: $FIGURES; targets: $TARGETS"
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
T0=$(date +%s)
for round in $(seq "$ROUNDS"); do
  say "round $round of $ROUNDS"
  for fig in $FIGURES; do
    for target in $TARGETS; do
      run_figure "$fig" "$target" "$round"
    done
  done
done
ELAPSED=$(($(date +%s) - T0))
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ------------------------------------------------------------------------------------------
# The table: median per (figure, target) and lclb's ratio to the better of HAProxy and NGINX.
RESULTS=$OUT_DIR/results-$STAMP.md
version() { "$@" 2>&1 | head -1; }
{
  echo "## lclb benchmark, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "- machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), Linux $(uname -r)"
  if [[ -n ${LCLB_BIN:-} ]]; then
    lclb_desc="lclb binary $LCLB_BIN${LCLB_LABEL:+ ($LCLB_LABEL)}"
  else
    lclb_desc="lclb $(git -C "$REPO_ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
  fi
  echo "- $lclb_desc, $(version rustc --version); $(version haproxy -v); $(version nginx -v); $(version openssl version)"
  echo "- settings: ROUNDS=$ROUNDS DURATION=${DURATION}s THREADS=$THREADS BYTES1=$BYTES1 BYTES8=$BYTES8 LAT_COUNT=$LAT_COUNT LOADED_CONNS=$LOADED_CONNS LOADED_RATE=$LOADED_RATE LOADED_SECS=${LOADED_SECS}s LOADED_NICE=$LOADED_NICE HOLD=$HOLD WORKERS=$WORKERS FIRST_WRITE_DELAY=${FIRST_WRITE_DELAY}ms; $ELAPSED s; load average $LOAD_START at the start, $LOAD_END at the end"
  echo "- client and upstreams (lclb-bench) run on the same cores as the balancer under test"
  if [[ $UPSTREAM_TLS == 1 ]]; then
    echo "- UPSTREAM_TLS=1: the upstreams require mTLS; every balancer re-encrypts toward them (TLS 1.3, verifying $UP_NAME against a second CA, with a client certificate, sessions reused); the no-hop target has no upstream and is unaffected"
    echo "- handshakes seen by the upstreams, by parameters (all targets, whole run): $(for m in "${MODES[@]}"; do for i in $(seq $UPSTREAMS); do grep '^TLS-TALLY ' "$LOGS/upstream-$m-$i.log" | tail -1; done; done | awk '{split(substr($5, 8), P, ","); for (k in P) { split(P[k], kv, ":"); n[kv[1]] += kv[2] } } END { for (k in n) printf "%s%s %d", (c++ ? ", " : ""), k, n[k] }')"
  fi
  if [[ -z ${LCLB_BIN:-} && -n $(git -C "$REPO_ROOT" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]]; then
    echo "- lclb was built from a work tree with uncommitted changes under src/"
  fi
  echo
  echo "| figure | unit | better | lclb | HAProxy | NGINX | no hop | lclb ÷ best peer |"
  echo "|---|---|---|---:|---:|---:|---:|---:|"
  sort -k1,1 -k2,2 -k4,4g "$DATA" | awk -v figs="handshakes handshakes_cpu handshakes_upres handshakes_pq handshakes_pq_cpu handshakes_pq_upres handshakes_resumed handshakes_resumed_cpu handshakes_resumed_pct handshakes_resumed_upres up1 up1_cpu up8 up8_cpu down1 down1_cpu down8 down8_cpu lat_p50 lat_p99 lat_p999 loaded_p50 loaded_p99 loaded_p999 loaded_achieved loaded_cpu_us_per_rt loaded_late_p99 hold_rss hold_kernel hold_threads" \
    -v b1="$BYTES1" -v b8="$BYTES8" -v th="$THREADS" -v hold="$HOLD" -v lc="$LOADED_CONNS" -v lr="$LOADED_RATE" '
    {
      key = $1 SUBSEP $2
      if ($4 != "NA") { n[key]++; v[key, n[key]] = $4 }
      fails[key] += ($5 == "NA" ? 0 : $5)
    }
    function median(k,   c) {
      c = n[k]
      if (c == 0) return "NA"
      if (c % 2) return v[k, (c + 1) / 2]
      return (v[k, c / 2] + v[k, c / 2 + 1]) / 2
    }
    function cell(f, t,   m, k) {
      k = f SUBSEP t
      m = median(k)
      if (m == "NA") return "n/a"
      s = sprintf(m >= 100 ? "%.0f" : (m >= 10 ? "%.1f" : "%.2f"), m)
      if (fails[k] > 0) s = s " (" fails[k] " failed)"
      return s
    }
    BEGIN {
      label["handshakes"] = "handshakes (" th " threads, X25519)"; unit["handshakes"] = "conn/s"; hi["handshakes"] = 1
      label["handshakes_pq"] = "handshakes (X25519MLKEM768)"; unit["handshakes_pq"] = "conn/s"; hi["handshakes_pq"] = 1
      label["handshakes_cpu"] = "handshakes: target CPU per connection"; unit["handshakes_cpu"] = "us"; hi["handshakes_cpu"] = 0
      label["handshakes_pq_cpu"] = "handshakes (X25519MLKEM768): target CPU per connection"; unit["handshakes_pq_cpu"] = "us"; hi["handshakes_pq_cpu"] = 0
      label["handshakes_upres"] = "handshakes: upstream TLS handshakes resumed"; unit["handshakes_upres"] = "%"; hi["handshakes_upres"] = 1; share["handshakes_upres"] = 1
      label["handshakes_resumed"] = "handshakes, resuming (" th " threads, X25519)"; unit["handshakes_resumed"] = "conn/s"; hi["handshakes_resumed"] = 1
      label["handshakes_resumed_cpu"] = "handshakes, resuming: target CPU per connection"; unit["handshakes_resumed_cpu"] = "us"; hi["handshakes_resumed_cpu"] = 0
      label["handshakes_resumed_pct"] = "handshakes, resuming: client handshakes resumed"; unit["handshakes_resumed_pct"] = "%"; hi["handshakes_resumed_pct"] = 1; share["handshakes_resumed_pct"] = 1
      label["handshakes_resumed_upres"] = "handshakes, resuming: upstream TLS handshakes resumed"; unit["handshakes_resumed_upres"] = "%"; hi["handshakes_resumed_upres"] = 1; share["handshakes_resumed_upres"] = 1
      label["handshakes_pq_upres"] = "handshakes (X25519MLKEM768): upstream TLS handshakes resumed"; unit["handshakes_pq_upres"] = "%"; hi["handshakes_pq_upres"] = 1; share["handshakes_pq_upres"] = 1
      split("up1 up8 down1 down8", T, " ")
      for (j = 1; j <= 4; j++) { label[T[j] "_cpu"] = T[j] ": target CPU per GiB"; unit[T[j] "_cpu"] = "CPU s/GiB"; hi[T[j] "_cpu"] = 0 }
      label["up1"] = "throughput up, 1 conn x " b1; unit["up1"] = "Gbit/s"; hi["up1"] = 1
      label["up8"] = "throughput up, 8 conns x " b8; unit["up8"] = "Gbit/s"; hi["up8"] = 1
      label["down1"] = "throughput down, 1 conn x " b1; unit["down1"] = "Gbit/s"; hi["down1"] = 1
      label["down8"] = "throughput down, 8 conns x " b8; unit["down8"] = "Gbit/s"; hi["down8"] = 1
      label["lat_p50"] = "latency p50 (64 B echo)"; unit["lat_p50"] = "us"; hi["lat_p50"] = 0
      label["lat_p99"] = "latency p99"; unit["lat_p99"] = "us"; hi["lat_p99"] = 0
      label["lat_p999"] = "latency p99.9"; unit["lat_p999"] = "us"; hi["lat_p999"] = 0
      split("p50 p99 p999", Q, " "); split("p50 p99 p99.9", QL, " ")
      for (j = 1; j <= 3; j++) { f = "loaded_" Q[j]; label[f] = "latency under load " QL[j] " (" lc " conns, " lr " rt/s)"; unit[f] = "us"; hi[f] = 0 }
      label["loaded_achieved"] = "latency under load: round trips achieved"; unit["loaded_achieved"] = "rt/s"; hi["loaded_achieved"] = 1
      label["loaded_cpu_us_per_rt"] = "latency under load: target CPU per round trip"; unit["loaded_cpu_us_per_rt"] = "us"; hi["loaded_cpu_us_per_rt"] = 0
      label["loaded_late_p99"] = "latency under load: client send delay p99 (instrument check)"; unit["loaded_late_p99"] = "us"; hi["loaded_late_p99"] = 0
      label["hold_rss"] = "hold " hold ": user memory (RSS)"; unit["hold_rss"] = "KiB/conn"; hi["hold_rss"] = 0
      label["hold_kernel"] = "hold " hold ": kernel, est. (PTE + kernel stacks)"; unit["hold_kernel"] = "KiB/conn"; hi["hold_kernel"] = 0
      label["hold_threads"] = "hold " hold ": threads"; unit["hold_threads"] = "per conn"; hi["hold_threads"] = 0
    }
    END {
      nf = split(figs, F, " ")
      for (i = 1; i <= nf; i++) {
        f = F[i]
        if (n[f SUBSEP "lclb"] + n[f SUBSEP "haproxy"] + n[f SUBSEP "nginx"] + n[f SUBSEP "nohop"] == 0) continue
        l = median(f SUBSEP "lclb"); h = median(f SUBSEP "haproxy"); g = median(f SUBSEP "nginx")
        best = "NA"
        if (h != "NA") best = h
        if (g != "NA") {
          if (best == "NA") best = g
          else if (hi[f] && g > best) best = g
          else if (!hi[f] && g < best) best = g
        }
        r = "n/a"
        if (share[f]) {
          r = "n/a"
        } else if (l != "NA" && best != "NA" && best + 0 != 0) {
          q = l / best
          ahead = hi[f] ? (q > 1.05) : (q < 0.95)
          behind = hi[f] ? (q < 0.95) : (q > 1.05)
          r = sprintf("%.2f", q) (ahead ? " (ahead)" : (behind ? " (behind)" : " (par)"))
        } else if (l != "NA" && best != "NA") {
          r = "n/a (peer 0)"
        }
        printf "| %s | %s | %s | %s | %s | %s | %s | %s |\n", label[f], unit[f], (hi[f] ? "higher" : "lower"),
          cell(f, "lclb"), cell(f, "haproxy"), cell(f, "nginx"), cell(f, "nohop"), r
      }
    }'
  echo
  echo "Medians of $ROUNDS round(s). \"lclb ÷ best peer\" divides lclb's median by the better of the"
  echo "HAProxy and NGINX medians (par: within 5%). No hop: the bench tool's own rustls server"
  echo "(lclb's TLS configuration) answering directly, the ceiling for a balancer on this machine."
  echo "Raw RESULT lines: $(basename "$RAW"); per-run logs: $(basename "$LOGS")/."
} >"$RESULTS"
cp "$RESULTS" "$OUT_DIR/results.md"
cat "$RESULTS"
say "results: $RESULTS"
