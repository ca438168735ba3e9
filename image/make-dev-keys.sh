#!/usr/bin/env bash
# Make a development CA and a bundle signing key for RAUC (image/build.sh does this once, into
# image/keys/, when it is given no --keyring). For a fleet, make and keep your own (see
# image/README.md, "Updates"): whoever holds the signing key can update every gateway that
# trusts the CA.
#
#   image/make-dev-keys.sh DIR [COMMON-NAME]
set -euo pipefail
dir=${1:?usage: make-dev-keys.sh DIR [COMMON-NAME]}
cn=${2:-flux-edge development}
mkdir -p "$dir"
chmod 0700 "$dir"
cd "$dir"
[ ! -e ca.cert.pem ] || { echo "make-dev-keys: $dir/ca.cert.pem exists: left alone" >&2; exit 0; }
cat >openssl.cnf <<CNF
[req]
distinguished_name = dn
prompt = no
[dn]
CN = $cn
[v3_ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[v3_leaf]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
CNF
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
    -config openssl.cnf -extensions v3_ca -subj "/CN=$cn CA" \
    -keyout ca.key.pem -out ca.cert.pem 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -config openssl.cnf \
    -subj "/CN=$cn signing" -keyout signing.key.pem -out signing.csr.pem 2>/dev/null
openssl x509 -req -in signing.csr.pem -CA ca.cert.pem -CAkey ca.key.pem -CAcreateserial \
    -days 3650 -extfile openssl.cnf -extensions v3_leaf -out signing.cert.pem 2>/dev/null
rm -f signing.csr.pem openssl.cnf ca.cert.srl
chmod 0600 ./*.key.pem
echo "make-dev-keys: CA $dir/ca.cert.pem (the image's keyring), signing key and certificate" \
     "$dir/signing.{key,cert}.pem" >&2
