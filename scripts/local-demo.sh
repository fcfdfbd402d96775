#!/usr/bin/env bash
# Run the real daemon between two throw-away local PostgreSQL clusters.
#
#   scripts/local-demo.sh          # build, replicate, kill -9 + restart, compare, clean up
#   scripts/local-demo.sh --keep   # leave clusters and daemon running, print how to connect
#
# Needs PostgreSQL >= 15 server binaries (Debian: apt-get install postgresql).
# Works as a normal user and as root (the servers then run as the 'postgres' user).
set -euo pipefail

KEEP=0
[[ "${1:-}" == "--keep" ]] && KEEP=1
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && { sed -n '2,8p' "$0"; exit 0; }

cd "$(dirname "$0")/.."
BINDIR="${PGCLUSTER_BINDIR:-$(pg_config --bindir 2>/dev/null || true)}"
[[ -x "$BINDIR/initdb" ]] || BINDIR="$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -type d -name bin 2>/dev/null | sort -V | tail -n1)"
[[ -x "$BINDIR/initdb" ]] || { echo "error: no PostgreSQL server binaries found; install PostgreSQL 15+ (apt-get install postgresql)" >&2; exit 1; }

AS=()
if [[ "$(id -u)" == 0 ]]; then AS=(runuser -u postgres --); fi
WORK="$(mktemp -d /tmp/heliosdb-demo-XXXXXX)"
[[ ${#AS[@]} -gt 0 ]] && chown postgres "$WORK"
DAEMON_PID=""

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
psql_() { "$BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -U postgres "$@"; }

cleanup() {
  [[ $KEEP == 1 ]] && return
  if [[ -n "$DAEMON_PID" ]] && kill "$DAEMON_PID" 2>/dev/null; then
    wait "$DAEMON_PID" 2>/dev/null || true
  fi
  for c in source target; do
    if [[ -d "$WORK/$c" ]]; then
      "${AS[@]}" "$BINDIR/pg_ctl" -D "$WORK/$c" stop -m fast -w >/dev/null 2>&1 || true
    fi
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

start_cluster() { # name port
  "${AS[@]}" "$BINDIR/initdb" -D "$WORK/$1" -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
  "${AS[@]}" "$BINDIR/pg_ctl" -D "$WORK/$1" -l "$WORK/$1.log" -w start \
    -o "-p $2 -c listen_addresses=127.0.0.1 -c unix_socket_directories=$WORK -c wal_level=logical" >/dev/null
}

echo "==> building (release)"
cargo build --release -q -p heliosdb-tenant-replication
BIN=target/release/heliosdb-tenant-replication

SRC_PORT=$(free_port); start_cluster source "$SRC_PORT"
DST_PORT=$(free_port); start_cluster target "$DST_PORT"
echo "==> source on 127.0.0.1:$SRC_PORT, target on 127.0.0.1:$DST_PORT ($WORK)"

SCHEMA="
CREATE TABLE accounts(tenant_id text, id bigint, name text, email text, balance numeric, updated_at timestamptz, PRIMARY KEY (tenant_id, id));
CREATE TABLE orders(tenant_id text, id bigint, account_id bigint, status text, amount numeric, payload jsonb, created_at timestamptz, PRIMARY KEY (tenant_id, id));
CREATE TABLE events(tenant_id text, id bigint, kind text, body text, created_at timestamptz, PRIMARY KEY (tenant_id, id));"
for p in "$SRC_PORT" "$DST_PORT"; do psql_ -p "$p" -d postgres -c "$SCHEMA"; done

cat > "$WORK/replication.toml" <<EOF
[replication]
tenant_id = "tenant-123"
source_connection = "postgresql://postgres@127.0.0.1:$SRC_PORT/postgres?sslmode=disable"
target_connection = "postgresql://postgres@127.0.0.1:$DST_PORT/postgres?sslmode=disable"

[cdc]
replication_slot = "tenant_123_slot"
publication_name = "tenant_123_pub"
batch_size = 1000
checkpoint_interval = 1000
checkpoint_dir = "$WORK/checkpoints"

[performance]
batch_timeout_ms = 50
EOF

echo "==> init"
$BIN --config "$WORK/replication.toml" init
echo "==> start"
$BIN --config "$WORK/replication.toml" start >"$WORK/daemon.log" 2>&1 &
DAEMON_PID=$!

count_target() { psql_ -p "$DST_PORT" -d postgres -At -c "SELECT count(*) FROM orders WHERE tenant_id = 'tenant-123'"; }
digest() { # port
  psql_ -p "$1" -d postgres -At -c "SELECT string_agg(t || ':' || n || ':' || h, ' ') FROM (
    SELECT 'accounts' t, count(*) n, md5(coalesce(string_agg(a::text, '|' ORDER BY id), '')) h FROM accounts a WHERE tenant_id = 'tenant-123'
    UNION ALL SELECT 'orders', count(*), md5(coalesce(string_agg(o::text, '|' ORDER BY id), '')) FROM orders o WHERE tenant_id = 'tenant-123'
    UNION ALL SELECT 'events', count(*), md5(coalesce(string_agg(e::text, '|' ORDER BY id), '')) FROM events e WHERE tenant_id = 'tenant-123') s"
}
wait_equal() {
  for _ in $(seq 1 600); do [[ "$(digest "$SRC_PORT")" == "$(digest "$DST_PORT")" ]] && return 0; sleep 0.1; done
  echo "source and target differ:"; digest "$SRC_PORT"; digest "$DST_PORT"; tail -20 "$WORK/daemon.log"; return 1
}

sleep 1
echo "==> one order for tenant-123 and one for tenant-456 on the source"
T0=$(date +%s%N)
psql_ -p "$SRC_PORT" -d postgres -c "INSERT INTO orders VALUES ('tenant-123', 1, 1, 'new', 9.99, '{\"sku\": \"A-1\"}', now()), ('tenant-456', 1, 1, 'new', 5, '{}', now())"
until [[ "$(count_target)" == 1 ]]; do sleep 0.01; done
echo "    arrived on the target after $(( ($(date +%s%N) - T0) / 1000000 )) ms"
echo "    tenant-456 rows on the target: $(psql_ -p "$DST_PORT" -d postgres -At -c "SELECT count(*) FROM orders WHERE tenant_id <> 'tenant-123'")"

echo "==> a workload of 200 transactions; kill -9 of the daemon in the middle; restart"
(
  for i in $(seq 1 200); do
    psql_ -p "$SRC_PORT" -d postgres -c "BEGIN;
      INSERT INTO orders SELECT t, $i * 100 + g, g, 'new', g, jsonb_build_object('i', $i), now() FROM generate_series(1, 20) g, (VALUES ('tenant-123'), ('tenant-456')) v(t) ON CONFLICT DO NOTHING;
      UPDATE orders SET status = 'paid' WHERE id % 7 = $i % 7;
      DELETE FROM orders WHERE id % 50 = $i % 50 AND id < $i * 100; COMMIT;"
  done
) &
LOAD=$!
sleep 1.5
kill -9 "$DAEMON_PID"; wait "$DAEMON_PID" 2>/dev/null || true
echo "    daemon killed with SIGKILL"
$BIN --config "$WORK/replication.toml" start >>"$WORK/daemon.log" 2>&1 &
DAEMON_PID=$!
wait "$LOAD"
wait_equal
echo "    source and target equal for tenant-123: $(digest "$DST_PORT")"
echo "    checkpoint file: $(cat "$WORK/checkpoints/tenant-123.checkpoint" 2>/dev/null || echo '(written every 1000 events)')"

if [[ $KEEP == 1 ]]; then
  echo "==> left running (daemon pid $DAEMON_PID, log $WORK/daemon.log):"
  echo "    psql -h 127.0.0.1 -p $SRC_PORT -U postgres postgres   # source"
  echo "    psql -h 127.0.0.1 -p $DST_PORT -U postgres postgres   # target"
  echo "    stop: kill $DAEMON_PID; ${AS[*]} $BINDIR/pg_ctl -D $WORK/source stop; ${AS[*]} $BINDIR/pg_ctl -D $WORK/target stop"
fi
echo "==> done"
