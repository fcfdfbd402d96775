#!/usr/bin/env bash
# Secrets for the development stack's split profile: a CA, the apply node's
# server certificate (for the host names "apply" and "localhost"), the capture node's client
# certificate, and tenant-4's encryption key, in ./secrets (or DIR).
#
#   sudo ./make-certs.sh [DIR] [UID]
#
# The containers run as uid 10001, and the daemon refuses private keys that
# others can read: the key files are made 0400 and owned by UID (default
# 10001), which needs root. Development only: the CA key stays beside the
# certificates, valid 30 days. Production certificates come from your PKI.
set -euo pipefail

dir="${1:-$(dirname "$0")/secrets}"
owner="${2:-10001}"
days=30

if [[ "$(id -u)" != 0 ]]; then
  echo "make-certs.sh: run it as root (sudo): the keys must belong to uid $owner, the containers' user" >&2
  exit 3
fi
command -v openssl >/dev/null || { echo "make-certs.sh: the openssl CLI is needed" >&2; exit 2; }
if [[ -e "$dir/ca.pem" ]]; then
  echo "make-certs.sh: $dir/ca.pem exists; remove $dir to make new secrets" >&2
  exit 3
fi

umask 077
mkdir -p "$dir"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

ec=(-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes)
openssl req -x509 "${ec[@]}" -keyout "$dir/ca.key" -out "$dir/ca.pem" -days "$days" \
  -subj "/CN=heliosdb-compose-ca" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

leaf() { # name, extended key usage, subjectAltName
  printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=%s\n' \
    "$3" "$2" >"$work/$1.ext"
  openssl req "${ec[@]}" -keyout "$dir/$1.key" -out "$work/$1.csr" -subj "/CN=$1" 2>/dev/null
  openssl x509 -req -in "$work/$1.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
    -out "$dir/$1.pem" -days "$days" -extfile "$work/$1.ext" 2>/dev/null
}
leaf apply serverAuth "DNS:apply,DNS:localhost"
leaf capture clientAuth "DNS:capture"
openssl rand -hex 32 >"$dir/tenant-4.key"
rm -f "$dir/ca.srl"

chmod 0444 "$dir"/*.pem
chmod 0400 "$dir"/*.key
chmod 0755 "$dir"
chown "$owner:$owner" "$dir/apply.key" "$dir/capture.key" "$dir/tenant-4.key"
echo "secrets written to $dir (keys owned by uid $owner, mode 0400)"
