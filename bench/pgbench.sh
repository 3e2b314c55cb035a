#!/usr/bin/env bash
# The plain-Postgres two-wallet debit (bench/pgbench_debit.sql) under pgbench at several
# client counts, on the machine's Postgres; prints each run's TPS and the best.
#
#   bench/pgbench.sh [seconds per run, default 10] [client counts, default "1 2 4 8 16 32 64"]
#
# PGHOST/PGPORT/PGUSER choose the server (default 127.0.0.1:5432, postgres). A database of
# its own is created and dropped. synchronous_commit stays as the server has it (on), so
# each transaction is durable when it returns, as a creditd Topup is.
set -euo pipefail
cd "$(dirname "$0")"
export PGHOST="${PGHOST:-127.0.0.1}" PGPORT="${PGPORT:-5432}" PGUSER="${PGUSER:-postgres}"
SECONDS_PER_RUN="${1:-10}"
COUNTS="${2:-1 2 4 8 16 32 64}"
CLIENTS=10000  # client wallets; 100 agencies of 100 clients each
DB="creditd_pgbench_$$"

createdb "$DB"
trap 'dropdb --if-exists --force "$DB" >/dev/null 2>&1 || true' EXIT
psql -q -v ON_ERROR_STOP=1 -d "$DB" -f plain_postgres.sql
psql -q -v ON_ERROR_STOP=1 -d "$DB" <<SQL
INSERT INTO wallets SELECT g::text, 300000000, 1000000000000 FROM generate_series(1, $CLIENTS) g;
INSERT INTO wallets SELECT (1000000 + g)::text, 300000000, 100000000000000 FROM generate_series(0, $CLIENTS / 100 - 1) g;
VACUUM ANALYZE;
SQL

echo "pgbench: two-wallet row-locking debit, ${SECONDS_PER_RUN}s per run, $(nproc) cores, $(psql -Atc 'SHOW server_version' -d "$DB")"
echo "synchronous_commit=$(psql -Atc 'SHOW synchronous_commit' -d "$DB") fsync=$(psql -Atc 'SHOW fsync' -d "$DB")"
best=0
best_clients=0
for clients in $COUNTS; do
  threads=$(( clients < $(nproc) ? clients : $(nproc) ))
  out=$(pgbench -n -M prepared -c "$clients" -j "$threads" -T "$SECONDS_PER_RUN" -D clients=$CLIENTS \
    -f pgbench_debit.sql "$DB" 2>&1)
  tps=$(printf '%s\n' "$out" | sed -n 's/^tps = \([0-9.]*\).*/\1/p' | head -1)
  latency=$(printf '%s\n' "$out" | sed -n 's/^latency average = \(.*\)$/\1/p' | head -1)
  failed=$(printf '%s\n' "$out" | sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' | head -1)
  printf 'clients %3d  tps %9.1f  latency avg %s  failed %s\n' "$clients" "$tps" "$latency" "${failed:-0}"
  if awk "BEGIN { exit !($tps > $best) }"; then best=$tps; best_clients=$clients; fi
done
echo "best: $best tps at $best_clients clients"
negative=$(psql -Atc 'SELECT count(*) FROM wallets WHERE free_micros < 0 OR purchased_micros < 0' -d "$DB")
echo "wallets below zero: $negative"
