# shellcheck shell=bash
# Helpers shared by generate_certs.sh and generate_alt_certs.sh. Sourced, not run.
#
# Every certificate is X.509 v3: OpenSSL only writes v3 when it is given extensions, so each
# signing call passes an -extfile section. Keys are written with umask 077 and checked to be
# 0600. Files are written to a temporary name and moved into place, so an interrupted run never
# leaves half a certificate behind.

KEY_TYPE=${KEY_TYPE:-ec}
RSA_BITS=${RSA_BITS:-2048}
DAYS=${DAYS:-825}
FORCE=${FORCE:-0}

# help_if_asked ARGS...: prints the calling script's opening comment (its usage) and exits 0
# if ARGS start with -h or --help, before anything is written.
help_if_asked() {
  case "${1:-}" in
    -h | --help)
      sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
      exit 0
      ;;
  esac
}

die() {
  echo "error: $*" >&2
  exit 1
}

note() {
  echo "$*"
}

check_settings() {
  command -v openssl >/dev/null 2>&1 || die "openssl is not installed (Debian: apt-get install openssl)"
  case "$KEY_TYPE" in
    ec | ecdsa) KEY_TYPE=ec ;;
    rsa) ;;
    *) die "KEY_TYPE must be ec (ECDSA P-256, the default) or rsa, not '$KEY_TYPE'" ;;
  esac
  [[ "$DAYS" =~ ^[1-9][0-9]*$ ]] || die "DAYS must be a positive number of days, not '$DAYS'"
  if ! [[ "$RSA_BITS" =~ ^[1-9][0-9]*$ ]] || ((RSA_BITS < 2048)); then
    die "RSA_BITS must be 2048 or more, not '$RSA_BITS'"
  fi
}

# A random positive 128-bit serial number, as a 0x... literal for -set_serial. The top bit is
# cleared so the DER encoding needs no padding byte: 16 bytes, well under the 20-byte limit.
random_serial() {
  local hex
  hex=$(openssl rand -hex 16)
  printf '0x%x%s' $((0x${hex:0:1} & 7)) "${hex:1}"
}

# new_key PATH: a private key, PKCS#8 PEM, mode 0600.
new_key() {
  local path=$1
  (
    umask 077
    if [[ "$KEY_TYPE" == rsa ]]; then
      openssl genpkey -algorithm RSA -pkeyopt "rsa_keygen_bits:$RSA_BITS" -out "$path" 2>/dev/null
    else
      openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$path" 2>/dev/null
    fi
  ) || die "cannot generate a key into $path"
  chmod 600 "$path"
}

# keyUsage for an end-entity certificate: RSA key exchange in TLS 1.2 also needs
# keyEncipherment; an ECDSA key only signs.
leaf_key_usage() {
  if [[ "$KEY_TYPE" == rsa ]]; then
    echo "critical, digitalSignature, keyEncipherment"
  else
    echo "critical, digitalSignature"
  fi
}

# write_ca_ext FILE: extensions of a self-signed CA.
write_ca_ext() {
  cat >"$1" <<'EOF'
[v3_ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
EOF
}

# write_leaf_ext FILE EKU [SAN]: extensions of a server (EKU serverAuth) or client (clientAuth)
# certificate.
write_leaf_ext() {
  local file=$1 eku=$2 san=${3:-}
  {
    echo "[v3_leaf]"
    echo "basicConstraints = critical, CA:FALSE"
    echo "keyUsage = $(leaf_key_usage)"
    echo "extendedKeyUsage = $eku"
    echo "subjectKeyIdentifier = hash"
    echo "authorityKeyIdentifier = keyid, issuer"
    if [[ -n "$san" ]]; then
      echo "subjectAltName = $san"
    fi
  } >"$file"
}

# make_ca DIR CN: DIR/ca.key and DIR/ca.crt, a self-signed CA valid for DAYS.
make_ca() {
  local dir=$1 cn=$2 tmp
  mkdir -p "$dir"
  tmp=$(mktemp -d "$dir/.tmp.XXXXXX")
  write_ca_ext "$tmp/ext.cnf"
  new_key "$tmp/ca.key"
  openssl req -new -x509 -key "$tmp/ca.key" -subj "/CN=$cn" -days "$DAYS" -sha256 \
    -set_serial "$(random_serial)" -config "$tmp/ext.cnf" -extensions v3_ca \
    -out "$tmp/ca.crt" 2>"$tmp/err" || {
    cat "$tmp/err" >&2
    rm -rf "$tmp"
    die "cannot create the CA $cn in $dir"
  }
  mv -f "$tmp/ca.key" "$dir/ca.key"
  mv -f "$tmp/ca.crt" "$dir/ca.crt"
  rm -rf "$tmp"
  note "created  $dir/ca.crt (CN=$cn) and $dir/ca.key"
}

# make_leaf CA_DIR CRT KEY CN EKU [SAN]: a key and a certificate signed by the CA in CA_DIR,
# valid for DAYS from now, with a random serial. An empty CN gives a subject with no CN at all
# (O=lclb demo), as SPIFFE workload certificates have: their name is in the SAN.
make_leaf() {
  local ca_dir=$1 crt=$2 key=$3 cn=$4 eku=$5 san=${6:-} tmp subj label
  if [[ -n "$cn" ]]; then
    subj="/CN=$cn"
    label="CN=$cn"
  else
    [[ -n "$san" ]] || die "a certificate with no CN needs a SAN ($crt)"
    subj="/O=lclb demo"
    label="no CN, SAN $san"
  fi
  mkdir -p "$(dirname "$crt")" "$(dirname "$key")"
  tmp=$(mktemp -d "$(dirname "$crt")/.tmp.XXXXXX")
  write_leaf_ext "$tmp/ext.cnf" "$eku" "$san"
  new_key "$tmp/key.pem"
  if ! openssl req -new -key "$tmp/key.pem" -subj "$subj" -out "$tmp/req.csr" 2>"$tmp/err" ||
    ! openssl x509 -req -in "$tmp/req.csr" -CA "$ca_dir/ca.crt" -CAkey "$ca_dir/ca.key" \
      -set_serial "$(random_serial)" -days "$DAYS" -sha256 \
      -extfile "$tmp/ext.cnf" -extensions v3_leaf -out "$tmp/crt.pem" 2>"$tmp/err"; then
    cat "$tmp/err" >&2
    rm -rf "$tmp"
    die "cannot create the certificate $label ($crt)"
  fi
  mv -f "$tmp/key.pem" "$key"
  mv -f "$tmp/crt.pem" "$crt"
  rm -rf "$tmp"
  note "created  $crt ($label) and $key"
}

# wanted FILE...: true when these files should be (re)generated. With FORCE=1, always. Else
# only when none of them exists; if some do, say what is skipped.
wanted() {
  local f present=() missing=()
  if [[ "$FORCE" == 1 ]]; then
    return 0
  fi
  for f in "$@"; do
    if [[ -e "$f" ]]; then present+=("$f"); else missing+=("$f"); fi
  done
  if [[ ${#present[@]} -eq 0 ]]; then
    return 0
  fi
  note "skipped  ${present[*]} (exists; FORCE=1 to overwrite)"
  if [[ ${#missing[@]} -gt 0 ]]; then
    echo "warning: ${missing[*]} is missing but ${present[*]} exists; FORCE=1 regenerates the pair" >&2
  fi
  return 1
}

# verify_leaf CA_CRT CRT PURPOSE: warn when an existing certificate no longer chains to the CA
# (for example after the CA alone was regenerated).
verify_leaf() {
  local ca=$1 crt=$2 purpose=$3
  [[ -f "$crt" && -f "$ca" ]] || return 0
  if ! openssl verify -CAfile "$ca" -purpose "$purpose" "$crt" >/dev/null 2>&1; then
    echo "warning: $crt does not verify against $ca ($purpose); FORCE=1 regenerates everything" >&2
    return 1
  fi
}
