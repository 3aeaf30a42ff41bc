#!/usr/bin/env bash
# Calls a running lclb with both development clients over mutual TLS and checks where they land.
#
#   scripts/test-mtls.sh                  # lclb at 127.0.0.1:9443 (make run)
#   scripts/test-mtls.sh 127.0.0.1:19443  # or LB_ADDR=...
#
# Each client opens TRIES connections (default 6) with `openssl s_client`; the demo upstream's
# first line names it. Checks, for the example config (lclb.example.toml):
#   - every connection is served and echoes a line back;
#   - client1.lb.com lands only on CLIENT1_UPSTREAMS (default "web1 web2 web3");
#   - client2.lb.com lands only on CLIENT2_UPSTREAMS (default "web1 web2": the "web" group);
#   - with REQUIRE_ALL=1 (the default), each client reaches every upstream it is allowed
#     (sequential connections rotate over equally loaded upstreams).
# Environment: LB_ADDR, CERTS_DIR (default: certs/ of the repository), TRIES, CLIENT1_UPSTREAMS,
# CLIENT2_UPSTREAMS, REQUIRE_ALL, MTLS_TIMEOUT (seconds per connection, default 10).
# Exits 0 when every check passed, 1 otherwise.
set -euo pipefail

# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

help_if_asked "$@"

LB_ADDR=${1:-${LB_ADDR:-127.0.0.1:9443}}
CERTS_DIR=${CERTS_DIR:-$REPO_ROOT/certs}
TRIES=${TRIES:-6}
CLIENT1_UPSTREAMS=${CLIENT1_UPSTREAMS:-web1 web2 web3}
CLIENT2_UPSTREAMS=${CLIENT2_UPSTREAMS:-web1 web2}
REQUIRE_ALL=${REQUIRE_ALL:-1}

split_addr "$LB_ADDR"
ca="$CERTS_DIR/ca/ca.crt"
for f in "$ca" "$CERTS_DIR"/clients/client{1,2}.lb.com.{crt,key.pem}; do
  [[ -r "$f" ]] || die "$f is missing; run 'make certs' (or set CERTS_DIR)"
done
command -v openssl >/dev/null || die "openssl is not installed"

clients=$CERTS_DIR/clients
check_served client1.lb.com "$clients/client1.lb.com.crt" "$clients/client1.lb.com.key.pem" \
  "$CLIENT1_UPSTREAMS"
check_served client2.lb.com "$clients/client2.lb.com.crt" "$clients/client2.lb.com.key.pem" \
  "$CLIENT2_UPSTREAMS"

echo "test-mtls: $passed passed, $failed failed"
((failed == 0))
