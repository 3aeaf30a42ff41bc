#!/usr/bin/env bash
# Checks that a running lclb names clients by more than their CN: by URI SAN (SPIFFE), by DNS
# SAN, and by the CA that issued them.
#
#   scripts/test-identities.sh                  # lclb at 127.0.0.1:9443 (make run)
#   scripts/test-identities.sh 127.0.0.1:19443  # or LB_ADDR=...
#
# Uses the certificates of certs/generate_alt_certs.sh (made here if missing). Each served
# client opens TRIES connections (default 6) with `openssl s_client`; the demo upstream's first
# line names it. Checks, for the example config (lclb.example.toml):
#   - the SPIFFE workload (no CN, URI SAN spiffe://lb.example/ns/demo/sa/payments, entry
#     "payments") lands only on PAYMENTS_UPSTREAMS (default "web3": the "api" group);
#   - billing-worker (DNS SAN api.billing.internal, entry "*.billing.internal") lands only on
#     BILLING_UPSTREAMS (default "web1 web2": the "web" group);
#   - client1.lb.com from the default CA (the control) lands on CLIENT1_UPSTREAMS (default
#     "web1 web2 web3"), while client1.lb.com from the partner CA (entry "partner-client1",
#     issuer "partners") lands only on PARTNER_UPSTREAMS (default "web3"): same CN, two
#     identities;
#   - client2.lb.com from the partner CA (no entry with that issuer) and a SPIFFE ID with one
#     path segment too many (spiffe://lb.example/ns/demo/extra/sa/payments) are refused after
#     the handshake: close_notify, no greeting (lclb's answer to an unauthorized client; its
#     log says reason=unauthorized, which scripts/e2e.sh checks);
#   - with REQUIRE_ALL=1 (the default), each served client reaches every upstream it is
#     allowed (sequential connections rotate over equally loaded upstreams).
# Environment: LB_ADDR, CERTS_DIR (default: certs/ of the repository), TRIES,
# PAYMENTS_UPSTREAMS, BILLING_UPSTREAMS, CLIENT1_UPSTREAMS, PARTNER_UPSTREAMS, REQUIRE_ALL,
# MTLS_TIMEOUT (seconds per connection, default 10).
# Exits 0 when every check passed, 1 otherwise.
set -euo pipefail

# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

help_if_asked "$@"

LB_ADDR=${1:-${LB_ADDR:-127.0.0.1:9443}}
CERTS_DIR=${CERTS_DIR:-$REPO_ROOT/certs}
TRIES=${TRIES:-6}
PAYMENTS_UPSTREAMS=${PAYMENTS_UPSTREAMS:-web3}
BILLING_UPSTREAMS=${BILLING_UPSTREAMS:-web1 web2}
CLIENT1_UPSTREAMS=${CLIENT1_UPSTREAMS:-web1 web2 web3}
PARTNER_UPSTREAMS=${PARTNER_UPSTREAMS:-web3}
REQUIRE_ALL=${REQUIRE_ALL:-1}

split_addr "$LB_ADDR"
command -v openssl >/dev/null || die "openssl is not installed"
ca="$CERTS_DIR/ca/ca.crt"
alt="$CERTS_DIR/alt"
[[ -r "$ca" && -r "$CERTS_DIR/clients/client1.lb.com.crt" ]] ||
  die "$ca or the client certificates are missing; run 'make certs' (or set CERTS_DIR)"
needed=(spiffe-payments spiffe-too-deep billing-worker client1-partner-ca client2-partner-ca)
for f in "${needed[@]}"; do
  if [[ ! -r "$alt/$f.crt" || ! -r "$alt/$f.key.pem" ]]; then
    echo "making the alternative certificates in $alt"
    CERTS_DIR="$CERTS_DIR" bash "$REPO_ROOT/certs/generate_alt_certs.sh" >/dev/null
    break
  fi
done

# must_be_unauthorized DESCRIPTION CRT KEY: the handshake completes, then close_notify and no
# upstream greeting. A TLS alert would mean the chain was refused, which is not what is tested.
must_be_unauthorized() {
  local result status detail want="close_notify after the handshake"
  echo "$1"
  result=$(mtls_call "$LB_ADDR" "$2" "$3" "$ca")
  status=${result%% *}
  detail=${result#* }
  case "$status" in
    refused)
      if [[ "$detail" == "$want"* ]]; then
        pass "refused ($detail)"
      else
        fail "refused, but not as unauthorized: $detail (expected $want)"
      fi
      ;;
    ok) fail "GOT THROUGH: served by $detail" ;;
    *) fail "no verdict from lclb: $status $detail" ;;
  esac
}

check_served "payments: SPIFFE workload, no CN, URI SAN spiffe://lb.example/ns/demo/sa/payments" \
  "$alt/spiffe-payments.crt" "$alt/spiffe-payments.key.pem" "$PAYMENTS_UPSTREAMS"
check_served "*.billing.internal: CN billing-worker, DNS SAN api.billing.internal" \
  "$alt/billing-worker.crt" "$alt/billing-worker.key.pem" "$BILLING_UPSTREAMS"
check_served "control: client1.lb.com from the default CA" \
  "$CERTS_DIR/clients/client1.lb.com.crt" "$CERTS_DIR/clients/client1.lb.com.key.pem" \
  "$CLIENT1_UPSTREAMS"
check_served "partner-client1: client1.lb.com from the partner CA" \
  "$alt/client1-partner-ca.crt" "$alt/client1-partner-ca.key.pem" "$PARTNER_UPSTREAMS"
must_be_unauthorized "client2.lb.com from the partner CA: no entry with issuer \"partners\"" \
  "$alt/client2-partner-ca.crt" "$alt/client2-partner-ca.key.pem"
must_be_unauthorized "spiffe://lb.example/ns/demo/extra/sa/payments: one segment too many" \
  "$alt/spiffe-too-deep.crt" "$alt/spiffe-too-deep.key.pem"

echo "test-identities: $passed passed, $failed failed"
((failed == 0))
