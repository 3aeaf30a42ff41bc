#!/usr/bin/env bash
# Certificates that lclb must NOT let through, for scripts/test-mtls-alt.sh (the revoked one
# only when the config names the CRL: `[tls] crls`, as lclb.example.toml does), and clients
# named by something other than the CN of the real CA, for scripts/test-identities.sh. Needs the
# real CA from generate_certs.sh and runs it first if that CA is missing. Same settings:
# CERTS_DIR (default: this folder), KEY_TYPE, RSA_BITS, DAYS, FORCE=1 to overwrite.
#
# Writes (relative to CERTS_DIR/alt):
#   other-ca/ca.crt, other-ca/ca.key           a second CA with the same CN, ca.lb.com
#   client1-other-ca.crt, .key.pem             CN=client1.lb.com signed by that other CA
#   client1-expired.crt, .key.pem              CN=client1.lb.com signed by the real CA, valid
#                                              2020-01-01 to 2021-01-01 only
#   client-revoked.lb.com.crt, .key.pem        signed by the real CA, then revoked
#   ca.crl.pem                                 the real CA's CRL (PEM) listing the revoked one
#   client3.lb.com.crt, .key.pem               signed by the real CA; a CN lclb has no entry for
#   ca-db/                                     the `openssl ca` database behind the CRL
#   spiffe-payments.crt, .key.pem              real CA, no CN (subject O=lclb demo), URI SAN
#                                              spiffe://lb.example/ns/demo/sa/payments: a
#                                              SPIFFE workload, lclb.example.toml's "payments"
#   spiffe-too-deep.crt, .key.pem              real CA, no CN, URI SAN
#                                              spiffe://lb.example/ns/demo/extra/sa/payments:
#                                              one segment more than ns/*/sa/payments allows
#   billing-worker.crt, .key.pem               real CA, CN=billing-worker, DNS SAN
#                                              api.billing.internal: matched by *.billing.internal
#   partner-ca/ca.crt, partner-ca/ca.key       a partner CA, CN=partners.lb.example
#                                              ([[ca]] "partners" in lclb.example.toml)
#   client1-partner-ca.crt, .key.pem           CN=client1.lb.com from the partner CA: the same CN
#                                              as the real client1, another identity
#   client2-partner-ca.crt, .key.pem           CN=client2.lb.com from the partner CA: no entry
#                                              for it with issuer "partners"
#
# The expired certificate is issued with `openssl ca -startdate/-enddate`, which every OpenSSL
# release has (`openssl x509 -not_before/-not_after` exists only from 3.4 on).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=certs/lib.sh
source "$here/lib.sh"
help_if_asked "$@"

CERTS_DIR=${CERTS_DIR:-$here}
CRL_DAYS=${CRL_DAYS:-30}
EXPIRED_START=${EXPIRED_START:-20200101000000Z}
EXPIRED_END=${EXPIRED_END:-20210101000000Z}

check_settings
mkdir -p "$CERTS_DIR"
CERTS_DIR=$(cd "$CERTS_DIR" && pwd)
ca_dir="$CERTS_DIR/ca"
alt="$CERTS_DIR/alt"

if [[ ! -f "$ca_dir/ca.crt" || ! -f "$ca_dir/ca.key" ]]; then
  echo "the real CA is missing; running generate_certs.sh first"
  CERTS_DIR="$CERTS_DIR" bash "$here/generate_certs.sh"
fi
mkdir -p "$alt"

# 1. A second CA with the same subject, and a client1.lb.com certificate from it.
if wanted "$alt/other-ca/ca.crt" "$alt/other-ca/ca.key"; then
  make_ca "$alt/other-ca" ca.lb.com
fi
if wanted "$alt/client1-other-ca.crt" "$alt/client1-other-ca.key.pem"; then
  make_leaf "$alt/other-ca" "$alt/client1-other-ca.crt" "$alt/client1-other-ca.key.pem" \
    client1.lb.com clientAuth
fi

# 2. A client with a name lclb does not know, from the real CA.
if wanted "$alt/client3.lb.com.crt" "$alt/client3.lb.com.key.pem"; then
  make_leaf "$ca_dir" "$alt/client3.lb.com.crt" "$alt/client3.lb.com.key.pem" \
    client3.lb.com clientAuth
fi

# 3. Expired and revoked clients go through `openssl ca`, whose database the CRL is made from.
db="$alt/ca-db"
if [[ "$FORCE" == 1 ]]; then
  rm -rf "$db"
fi
mkdir -p "$db/newcerts"
touch "$db/index.txt"
[[ -f "$db/crlnumber" ]] || echo 1000 >"$db/crlnumber"
cat >"$db/openssl-ca.cnf" <<EOF
# Written by certs/generate_alt_certs.sh: the real CA ($ca_dir) as an \`openssl ca\`.
[ca]
default_ca = lclb_ca

[lclb_ca]
database = $db/index.txt
new_certs_dir = $db/newcerts
certificate = $ca_dir/ca.crt
private_key = $ca_dir/ca.key
crlnumber = $db/crlnumber
rand_serial = yes
unique_subject = no
default_md = sha256
default_days = $DAYS
default_crl_days = $CRL_DAYS
policy = policy_cn
copy_extensions = none

[policy_cn]
commonName = supplied

[crl_ext]
authorityKeyIdentifier = keyid:always
EOF

# ca_leaf CRT KEY CN [openssl ca options...]
ca_leaf() {
  local crt=$1 key=$2 cn=$3 tmp
  shift 3
  tmp=$(mktemp -d "$alt/.tmp.XXXXXX")
  write_leaf_ext "$tmp/ext.cnf" clientAuth
  new_key "$tmp/key.pem"
  if ! openssl req -new -key "$tmp/key.pem" -subj "/CN=$cn" -out "$tmp/req.csr" 2>"$tmp/err" ||
    ! openssl ca -batch -notext -config "$db/openssl-ca.cnf" -in "$tmp/req.csr" \
      -extfile "$tmp/ext.cnf" -extensions v3_leaf -out "$tmp/crt.pem" "$@" >"$tmp/err" 2>&1; then
    cat "$tmp/err" >&2
    rm -rf "$tmp"
    die "cannot create the certificate $cn ($crt)"
  fi
  mv -f "$tmp/key.pem" "$key"
  mv -f "$tmp/crt.pem" "$crt"
  rm -rf "$tmp"
  note "created  $crt (CN=$cn${*:+, $*}) and $key"
}

if wanted "$alt/client1-expired.crt" "$alt/client1-expired.key.pem"; then
  ca_leaf "$alt/client1-expired.crt" "$alt/client1-expired.key.pem" client1.lb.com \
    -startdate "$EXPIRED_START" -enddate "$EXPIRED_END"
fi

new_revoked=0
if wanted "$alt/client-revoked.lb.com.crt" "$alt/client-revoked.lb.com.key.pem"; then
  ca_leaf "$alt/client-revoked.lb.com.crt" "$alt/client-revoked.lb.com.key.pem" \
    client-revoked.lb.com
  new_revoked=1
fi

# The CRL: made again whenever the revoked certificate was, or when it is missing.
if [[ $new_revoked == 1 || ! -f "$alt/ca.crl.pem" || "$FORCE" == 1 ]]; then
  serial=$(openssl x509 -in "$alt/client-revoked.lb.com.crt" -noout -serial | cut -d= -f2)
  if ! grep -q "^R.*"$'\t'"$serial"$'\t' "$db/index.txt"; then
    openssl ca -batch -config "$db/openssl-ca.cnf" -revoke "$alt/client-revoked.lb.com.crt" \
      -crl_reason keyCompromise >"$db/revoke.log" 2>&1 || {
      cat "$db/revoke.log" >&2
      die "cannot revoke $alt/client-revoked.lb.com.crt"
    }
  fi
  openssl ca -batch -config "$db/openssl-ca.cnf" -gencrl -crlexts crl_ext \
    -out "$alt/ca.crl.pem.tmp" >"$db/gencrl.log" 2>&1 || {
    cat "$db/gencrl.log" >&2
    die "cannot make the CRL"
  }
  mv -f "$alt/ca.crl.pem.tmp" "$alt/ca.crl.pem"
  note "created  $alt/ca.crl.pem (revokes serial $serial, valid $CRL_DAYS days)"
else
  note "skipped  $alt/ca.crl.pem (exists; FORCE=1 to overwrite)"
fi

# 4. Clients named by a SAN, from the real CA: a SPIFFE workload with no CN, the same with one
# path segment too many, and a CN whose DNS SAN is what its entry selects on.
if wanted "$alt/spiffe-payments.crt" "$alt/spiffe-payments.key.pem"; then
  make_leaf "$ca_dir" "$alt/spiffe-payments.crt" "$alt/spiffe-payments.key.pem" \
    "" clientAuth "URI:spiffe://lb.example/ns/demo/sa/payments"
fi
if wanted "$alt/spiffe-too-deep.crt" "$alt/spiffe-too-deep.key.pem"; then
  make_leaf "$ca_dir" "$alt/spiffe-too-deep.crt" "$alt/spiffe-too-deep.key.pem" \
    "" clientAuth "URI:spiffe://lb.example/ns/demo/extra/sa/payments"
fi
if wanted "$alt/billing-worker.crt" "$alt/billing-worker.key.pem"; then
  make_leaf "$ca_dir" "$alt/billing-worker.crt" "$alt/billing-worker.key.pem" \
    billing-worker clientAuth "DNS:api.billing.internal"
fi

# 5. A partner CA with a name of its own, and two clients from it whose CNs the real CA's
# clients also have.
if wanted "$alt/partner-ca/ca.crt" "$alt/partner-ca/ca.key"; then
  make_ca "$alt/partner-ca" partners.lb.example
fi
for n in 1 2; do
  if wanted "$alt/client$n-partner-ca.crt" "$alt/client$n-partner-ca.key.pem"; then
    make_leaf "$alt/partner-ca" "$alt/client$n-partner-ca.crt" "$alt/client$n-partner-ca.key.pem" \
      "client$n.lb.com" clientAuth
  fi
done

# Check that each one is bad in exactly the way intended.
status=0
expect() {
  local what=$1
  shift
  if "$@" >/dev/null 2>&1; then
    echo "ok       $what"
  else
    echo "error: not so: $what" >&2
    status=1
  fi
}
# shellcheck disable=SC2317 # called through expect
fails() { ! "$@"; }
real=(-CAfile "$ca_dir/ca.crt")
expect "client1-other-ca.crt does not chain to the real CA" \
  fails openssl verify "${real[@]}" "$alt/client1-other-ca.crt"
expect "client1-other-ca.crt chains to the other CA" \
  openssl verify -CAfile "$alt/other-ca/ca.crt" "$alt/client1-other-ca.crt"
expect "client1-expired.crt is expired" \
  fails openssl verify "${real[@]}" "$alt/client1-expired.crt"
expect "client1-expired.crt chains to the real CA (time aside)" \
  openssl verify -no_check_time "${real[@]}" "$alt/client1-expired.crt"
expect "client-revoked.lb.com.crt chains to the real CA" \
  openssl verify "${real[@]}" "$alt/client-revoked.lb.com.crt"
expect "client-revoked.lb.com.crt is revoked by ca.crl.pem" \
  fails openssl verify -crl_check -CRLfile "$alt/ca.crl.pem" "${real[@]}" "$alt/client-revoked.lb.com.crt"
expect "client3.lb.com.crt chains to the real CA" \
  openssl verify "${real[@]}" "$alt/client3.lb.com.crt"
# subject_has CRT TEXT: the subject (RFC 2253 form) contains TEXT.
# shellcheck disable=SC2317 # called through expect
subject_has() { openssl x509 -in "$1" -noout -subject -nameopt RFC2253 | grep -qF -- "$2"; }
# san_is CRT TEXT: the subjectAltName extension, as openssl prints it, is TEXT (one line).
# shellcheck disable=SC2317 # called through expect
san_is() { [[ "$(openssl x509 -in "$1" -noout -ext subjectAltName | sed -n '2s/^ *//p')" == "$2" ]]; }
for crt in spiffe-payments spiffe-too-deep; do
  expect "$crt.crt chains to the real CA" openssl verify "${real[@]}" "$alt/$crt.crt"
  expect "$crt.crt has no CN" fails subject_has "$alt/$crt.crt" "CN="
done
expect "spiffe-payments.crt has URI SAN spiffe://lb.example/ns/demo/sa/payments" \
  san_is "$alt/spiffe-payments.crt" "URI:spiffe://lb.example/ns/demo/sa/payments"
expect "spiffe-too-deep.crt has URI SAN spiffe://lb.example/ns/demo/extra/sa/payments" \
  san_is "$alt/spiffe-too-deep.crt" "URI:spiffe://lb.example/ns/demo/extra/sa/payments"
expect "billing-worker.crt chains to the real CA" \
  openssl verify "${real[@]}" "$alt/billing-worker.crt"
expect "billing-worker.crt has CN=billing-worker" subject_has "$alt/billing-worker.crt" "CN=billing-worker"
expect "billing-worker.crt has DNS SAN api.billing.internal" \
  san_is "$alt/billing-worker.crt" "DNS:api.billing.internal"
for n in 1 2; do
  expect "client$n-partner-ca.crt chains to the partner CA" \
    openssl verify -CAfile "$alt/partner-ca/ca.crt" "$alt/client$n-partner-ca.crt"
  expect "client$n-partner-ca.crt does not chain to the real CA" \
    fails openssl verify "${real[@]}" "$alt/client$n-partner-ca.crt"
done
if [[ $status != 0 ]]; then
  echo "(if the real CA was made again since, FORCE=1 $0 makes these again)" >&2
fi
exit $status
