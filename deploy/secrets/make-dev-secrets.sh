#!/bin/sh
# Makes the secrets docker compose reads from this folder, for a test or a private deployment:
#
#   grafana-admin-password   Grafana's admin password (docker-compose.yml)
#   api-keys                 one API key, for the server (docker-compose.tls.yml; give it to clients)
#   ca.crt, ca.key           a CA of your own (keep ca.key to issue more certificates)
#   tls.crt, tls.key         the server's certificate, signed by that CA, for the names `server` (the replicas
#                            inside compose), localhost and 127.0.0.1, plus NLPSERVE_TLS_NAMES
#                            (e.g. NLPSERVE_TLS_NAMES="DNS:nlpserve.example.com,IP:10.0.0.5": how clients reach you)
#   client.crt, client.key   a client certificate of that CA, for mTLS (--tls-client-ca ca.crt)
#
# A file that exists is kept; delete it to make a new one. For production, use certificates from your own CA
# (cert-manager, Vault, ...) under the same names. Needs openssl (1.1.1 or later).
#
#   sh deploy/secrets/make-dev-secrets.sh
set -eu
cd "$(dirname "$0")"
# The containers read the files as their own users (the server as uid 10001, Grafana as uid 472) through bind
# mounts, so the files are readable by all; the folder is yours alone, so other users of the host cannot reach
# them (a bind mount does not go through it).
chmod 700 .
umask 022

random() { openssl rand -base64 32 | tr -d '/+=\n' | cut -c1-32; }

[ -s grafana-admin-password ] || { random > grafana-admin-password; echo "made grafana-admin-password"; }
[ -s api-keys ] || { printf '# one API key a line\n%s\n' "$(random)" > api-keys; echo "made api-keys"; }

if [ ! -s ca.crt ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
        -subj "/CN=nlpserve dev CA" -keyout ca.key -out ca.crt 2>/dev/null
    chmod 600 ca.key
    echo "made ca.crt, ca.key"
fi

issue() {  # issue NAME SUBJECT EXTENSIONS
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "$2" -keyout "$1.key" \
        -out "$1.csr" 2>/dev/null
    printf '%s\n' "$3" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 -sha256 \
        -extfile "$1.ext" -out "$1.crt" 2>/dev/null
    rm -f "$1.csr" "$1.ext" ca.srl
    # The server reads its key in the container; the client key stays yours.
    [ "$1" = client ] || chmod 644 "$1.key"
    echo "made $1.crt, $1.key"
}

names="DNS:server,DNS:localhost,IP:127.0.0.1${NLPSERVE_TLS_NAMES:+,$NLPSERVE_TLS_NAMES}"
[ -s tls.crt ] || issue tls "/CN=nlpserve" "subjectAltName=$names
extendedKeyUsage=serverAuth"
[ -s client.crt ] || issue client "/CN=nlpserve client" "extendedKeyUsage=clientAuth"
