#!/usr/bin/env bash
# Checks that a running lclb turns away the clients it must not serve.
#
#   scripts/test-mtls-alt.sh                  # lclb at 127.0.0.1:9443 (make run)
#   scripts/test-mtls-alt.sh 127.0.0.1:19443  # or LB_ADDR=...
#
# Uses the certificates of certs/generate_alt_certs.sh (made here if missing). Each of these
# must be refused the way the README promises, and no upstream greeting may arrive:
#   - client1.lb.com signed by another CA that has the same name (ca.lb.com): TLS alert 51
#     (decrypt error) in the handshake: the issuer name matches the real CA, so rustls finds
#     the issuer and reports the signature that does not verify, not an unknown CA (48);
#   - client1.lb.com with an expired certificate: alert 45 (certificate expired);
#   - client3.lb.com, signed by the real CA but with no [[client]] entry: the handshake
#     completes, then close_notify and no greeting;
#   - a client with no certificate at all: alert 116 (certificate required).
# A control call with the valid client1.lb.com must get through first, so that "refused" means
# refused and not "lclb is down".
# client-revoked.lb.com (revoked in certs/alt/ca.crl.pem) is reported on its own: lclb refuses
# it only when its config names that CRL (`[tls] crls`, as lclb.example.toml does). With
# CRL_ENFORCED=1 it must get alert 44 (certificate revoked); anything else fails the run.
# Environment: LB_ADDR, CERTS_DIR (default: certs/ of the repository), CRL_ENFORCED,
# MTLS_TIMEOUT (seconds per connection, default 10). Exits 1 if any client got through that
# must not (or the control call failed), else 0.
set -euo pipefail

# shellcheck source=scripts/lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

help_if_asked "$@"

LB_ADDR=${1:-${LB_ADDR:-127.0.0.1:9443}}
CERTS_DIR=${CERTS_DIR:-$REPO_ROOT/certs}
CRL_ENFORCED=${CRL_ENFORCED:-0}

split_addr "$LB_ADDR"
command -v openssl >/dev/null || die "openssl is not installed"
ca="$CERTS_DIR/ca/ca.crt"
alt="$CERTS_DIR/alt"
[[ -r "$ca" && -r "$CERTS_DIR/clients/client1.lb.com.crt" ]] ||
  die "$ca or the client certificates are missing; run 'make certs' (or set CERTS_DIR)"
if [[ ! -r "$alt/ca.crl.pem" || ! -r "$alt/client3.lb.com.crt" ]]; then
  echo "making the alternative certificates in $alt"
  CERTS_DIR="$CERTS_DIR" bash "$REPO_ROOT/certs/generate_alt_certs.sh" >/dev/null
fi

# call NAME CRT KEY: sets RESULT_STATUS and RESULT_DETAIL.
call() {
  local result
  result=$(mtls_call "$LB_ADDR" "$2" "$3" "$ca")
  RESULT_STATUS=${result%% *}
  RESULT_DETAIL=${result#* }
}

echo "control: client1.lb.com with its valid certificate -> $LB_ADDR"
call control "$CERTS_DIR/clients/client1.lb.com.crt" "$CERTS_DIR/clients/client1.lb.com.key.pem"
if [[ "$RESULT_STATUS" == ok ]]; then
  pass "served by $RESULT_DETAIL"
else
  fail "the valid client was not served ($RESULT_STATUS: $RESULT_DETAIL); the checks below would prove nothing"
  echo "test-mtls-alt: $passed passed, $failed failed"
  exit 1
fi

# must_refuse DESCRIPTION EXPECTED CRT KEY: EXPECTED is the start of the refusal detail
# mtls_call must print ("tls alert 45", "close_notify after the handshake").
must_refuse() {
  echo "$1"
  call "$1" "$3" "$4"
  case "$RESULT_STATUS" in
    refused)
      if [[ "$RESULT_DETAIL" == "$2"* ]]; then
        pass "refused ($RESULT_DETAIL)"
      else
        fail "refused, but not as promised: $RESULT_DETAIL (expected $2)"
      fi
      ;;
    ok) fail "GOT THROUGH: served by $RESULT_DETAIL" ;;
    *) fail "no verdict from lclb: $RESULT_DETAIL" ;;
  esac
}

must_refuse "client1.lb.com signed by another CA named ca.lb.com" "tls alert 51" \
  "$alt/client1-other-ca.crt" "$alt/client1-other-ca.key.pem"
must_refuse "client1.lb.com with an expired certificate" "tls alert 45" \
  "$alt/client1-expired.crt" "$alt/client1-expired.key.pem"
must_refuse "client3.lb.com: valid certificate, no [[client]] entry" \
  "close_notify after the handshake" \
  "$alt/client3.lb.com.crt" "$alt/client3.lb.com.key.pem"
must_refuse "no client certificate" "tls alert 116" "" ""

echo "client-revoked.lb.com: valid certificate listed in $alt/ca.crl.pem"
call revoked "$alt/client-revoked.lb.com.crt" "$alt/client-revoked.lb.com.key.pem"
case "$RESULT_STATUS" in
  refused)
    if [[ "$RESULT_DETAIL" == "tls alert 44"* ]]; then
      pass "refused ($RESULT_DETAIL): revocation is enforced"
    elif [[ "$CRL_ENFORCED" == 1 ]]; then
      fail "refused, but not with alert 44 (certificate revoked): $RESULT_DETAIL (CRL_ENFORCED=1)"
    else
      echo "  note  refused ($RESULT_DETAIL), not as revoked: the config names no CRL ([tls] crls)"
    fi
    ;;
  ok)
    if [[ "$CRL_ENFORCED" == 1 ]]; then
      fail "GOT THROUGH although revoked: served by $RESULT_DETAIL (CRL_ENFORCED=1)"
    else
      echo "  note  got through (served by $RESULT_DETAIL): the config names no CRL ([tls] crls); CRL_ENFORCED=1 makes this a failure"
    fi
    ;;
  *) fail "no verdict from lclb: $RESULT_DETAIL" ;;
esac

echo "test-mtls-alt: $passed passed, $failed failed"
((failed == 0))
