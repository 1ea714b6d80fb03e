#!/usr/bin/env bash
# Install (Debian package) and start PostgreSQL on loopback, with role/db msplora/msplora.
# Idempotent: safe to run or `source` again. Prints the SQLAlchemy URL on its last line and
# exports MSPLORA_PG_URL when sourced. Needs root (CI containers) or sudo.
set -euo pipefail
_pg_url="postgresql+psycopg2://msplora:msplora@127.0.0.1:5432/msplora"
_sudo=""; [ "$(id -u)" -eq 0 ] || _sudo="sudo"

if ! command -v pg_ctlcluster >/dev/null 2>&1 || ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  $_sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $_sudo apt-get install -y -qq postgresql >/dev/null
fi
_ver=$(ls /usr/lib/postgresql | sort -V | tail -n1)
# A cluster exists after the package's postinst; create one if a minimal image skipped it.
if ! pg_lsclusters -h 2>/dev/null | awk '{print $1" "$2}' | grep -q "^$_ver main$"; then
  $_sudo pg_createcluster "$_ver" main >/dev/null
fi
# Loopback only, port 5432.
$_sudo pg_conftool "$_ver" main remove listen_addresses >/dev/null 2>&1 || true
echo "listen_addresses = '127.0.0.1'" | $_sudo tee "/etc/postgresql/$_ver/main/conf.d/msplora.conf" >/dev/null
if ! pg_lsclusters -h | awk -v v="$_ver" '$1==v && $2=="main" {print $4}' | grep -q online; then
  $_sudo pg_ctlcluster "$_ver" main start
fi
for _ in $(seq 1 30); do
  pg_isready -q -h 127.0.0.1 -p 5432 && break
  sleep 1
done
pg_isready -q -h 127.0.0.1 -p 5432 || { echo "postgres.sh: server on 127.0.0.1:5432 did not come up" >&2; exit 1; }
_psql() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- psql -v ON_ERROR_STOP=1 -qtA "$@"
  else sudo -u postgres psql -v ON_ERROR_STOP=1 -qtA "$@"; fi
}
if [ "$(_psql -c "SELECT 1 FROM pg_roles WHERE rolname='msplora'")" != "1" ]; then
  _psql -c "CREATE ROLE msplora LOGIN PASSWORD 'msplora'"
fi
if [ "$(_psql -c "SELECT 1 FROM pg_database WHERE datname='msplora'")" != "1" ]; then
  _psql -c "CREATE DATABASE msplora OWNER msplora"
fi
export MSPLORA_PG_URL="$_pg_url"
echo "$_pg_url"
