#!/usr/bin/env bash
# Development certificates for lclb: a CA, a server certificate and two client certificates.
#
#   certs/generate_certs.sh              # ECDSA P-256, 825 days, into the folder of this script
#   KEY_TYPE=rsa certs/generate_certs.sh # RSA-2048 instead (RSA_BITS=3072 for bigger keys)
#   CERTS_DIR=/tmp/x DAYS=30 FORCE=1 certs/generate_certs.sh
#
# Writes (relative to CERTS_DIR):
#   ca/ca.crt, ca/ca.key                         CN=ca.lb.com, CA:TRUE
#   server/server.crt, server/server.key.pem     CN=server.lb.com, serverAuth,
#                                                SAN DNS:localhost, DNS:server.lb.com, IP:127.0.0.1
#   clients/client1.lb.com.crt, .key.pem         CN=client1.lb.com, clientAuth
#   clients/client2.lb.com.crt, .key.pem         CN=client2.lb.com, clientAuth
#
# All X.509 v3 with random 128-bit serials; private keys are PKCS#8 PEM, mode 0600. Existing
# files are never overwritten unless FORCE=1 (what was skipped is printed). These are for
# development and tests: the CA key sits next to its certificate.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=certs/lib.sh
source "$here/lib.sh"
help_if_asked "$@"

CERTS_DIR=${CERTS_DIR:-$here}
SERVER_SAN=${SERVER_SAN:-DNS:localhost, DNS:server.lb.com, IP:127.0.0.1}

check_settings
mkdir -p "$CERTS_DIR"
CERTS_DIR=$(cd "$CERTS_DIR" && pwd)
ca_dir="$CERTS_DIR/ca"

new_ca=0
if wanted "$ca_dir/ca.crt" "$ca_dir/ca.key"; then
  make_ca "$ca_dir" ca.lb.com
  new_ca=1
fi

# leaf CRT KEY CN EKU PURPOSE [SAN]
leaf() {
  local crt=$1 key=$2 cn=$3 eku=$4 purpose=$5 san=${6:-}
  if wanted "$crt" "$key"; then
    [[ -f "$ca_dir/ca.key" ]] || die "$ca_dir/ca.key is missing, so $cn cannot be signed; FORCE=1 makes a new CA"
    make_leaf "$ca_dir" "$crt" "$key" "$cn" "$eku" "$san"
  elif [[ $new_ca == 1 ]]; then
    verify_leaf "$ca_dir/ca.crt" "$crt" "$purpose" || true
  fi
}

leaf "$CERTS_DIR/server/server.crt" "$CERTS_DIR/server/server.key.pem" \
  server.lb.com serverAuth sslserver "$SERVER_SAN"
for cn in client1.lb.com client2.lb.com; do
  leaf "$CERTS_DIR/clients/$cn.crt" "$CERTS_DIR/clients/$cn.key.pem" \
    "$cn" clientAuth sslclient
done

# Check what is there now: every certificate v3 and chaining to the CA.
status=0
for crt in "$CERTS_DIR/server/server.crt" "$CERTS_DIR"/clients/client{1,2}.lb.com.crt; do
  if [[ ! -f "$crt" ]]; then
    echo "error: $crt is missing" >&2
    status=1
    continue
  fi
  if ! openssl x509 -in "$crt" -noout -text | grep -q 'Version: 3 (0x2)'; then
    echo "error: $crt is not X.509 v3" >&2
    status=1
  fi
  if ! openssl verify -CAfile "$ca_dir/ca.crt" "$crt" >/dev/null 2>&1; then
    echo "error: $crt does not verify against $ca_dir/ca.crt" >&2
    status=1
  fi
done
if [[ $status == 0 ]]; then
  echo "certificates in $CERTS_DIR verify against ca/ca.crt"
fi
exit $status
