//! `load`: a reproducible mixed workload on a multi-tenant source.
//!
//! Several clients, each on its own connection, run transactions of
//! `txn_size` row changes across the tables of [`SCHEMA`] (the reference
//! workload's shapes: about 500 bytes per row, part structured and
//! compressible, part hex): 60% inserts, 30% updates, 10% deletes, spread
//! over `tenants` tenants. Each client owns the keys `id ≡ client (mod
//! clients)`, so clients never contend on a row, and draws everything from
//! its own seeded generator: the same seed, clients and sizes give the same
//! transactions. A target rate is shared among clients (token pacing); 0
//! means as fast as the source goes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::Client;

use crate::error::{on_source, Result};

/// The multi-tenant SaaS schema (the reference workload's tables).
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS accounts(
  tenant_id text, id bigint, name text, email text, balance numeric,
  updated_at timestamptz, PRIMARY KEY(tenant_id, id));
CREATE TABLE IF NOT EXISTS orders(
  tenant_id text, id bigint, account_id bigint, status text, amount numeric,
  payload jsonb, created_at timestamptz, PRIMARY KEY(tenant_id, id));
CREATE TABLE IF NOT EXISTS events(
  tenant_id text, id bigint, kind text, body text,
  created_at timestamptz, PRIMARY KEY(tenant_id, id));
";

/// The tables of [`SCHEMA`].
pub const TABLES: [&str; 3] = ["accounts", "orders", "events"];

/// How to load.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Row changes per second over all clients; 0 = as fast as possible.
    pub rate: u64,
    pub duration: Duration,
    pub clients: usize,
    /// Tenants `tenant-1` … `tenant-N`.
    pub tenants: usize,
    /// Row changes per transaction.
    pub txn_size: usize,
    pub seed: u64,
    /// Stop each client after this many transactions (a fixed workload).
    pub transactions: Option<u64>,
}

/// Counters shared by the clients.
#[derive(Debug, Default)]
pub struct LoadStats {
    pub events: AtomicU64,
    pub transactions: AtomicU64,
    pub failed: AtomicU64,
}

/// Row count and md5 of `tenant`'s rows of `table`, in key order: equal on
/// two databases when the tenant's rows are. (`(t.*)` is the whole row even
/// in a table with a column named `t`.)
pub async fn tenant_digest(
    c: &Client,
    table: &str,
    tenant: &str,
) -> Result<(i64, String), tokio_postgres::Error> {
    let r = c
        .query_one(
            &format!(
                "SELECT count(*), coalesce(md5(string_agg((t.*)::text, '|' ORDER BY t.id)), '') FROM {} t WHERE tenant_id = $1",
                crate::pg::quote_ident(table)
            ),
            &[&tenant],
        )
        .await?;
    Ok((r.get(0), r.get(1)))
}

/// Tenant names the workload uses.
pub fn tenant_names(n: usize) -> Vec<String> {
    (1..=n.max(1)).map(|i| format!("tenant-{i}")).collect()
}

/// Run `spec` with one connection per client (made by `connect`) until the
/// duration passes or `stop` is set.
pub async fn run<F, Fut>(
    spec: &LoadSpec,
    connect: F,
    stats: Arc<LoadStats>,
    stop: Arc<AtomicBool>,
) -> Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<Client>>,
{
    let mut tasks = Vec::new();
    for c in 0..spec.clients.max(1) {
        let client = connect().await?;
        let (spec, stats, stop) = (spec.clone(), stats.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            client_loop(c, &spec, &client, &stats, &stop).await
        }));
    }
    let mut first_error = None;
    for t in tasks {
        if let Ok(Err(e)) = t.await {
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

async fn client_loop(
    c: usize,
    spec: &LoadSpec,
    client: &Client,
    stats: &LoadStats,
    stop: &AtomicBool,
) -> Result<()> {
    let clients = spec.clients.max(1) as i64;
    let tenants = tenant_names(spec.tenants);
    let mut rng = StdRng::seed_from_u64(spec.seed.wrapping_add(c as u64 * 0x9e37_79b9));
    // Next id per (tenant, table) this client inserts (ids ≡ c mod clients).
    let mut next = vec![[0i64; 3]; tenants.len()];
    let per_client_rate = spec.rate as f64 / clients as f64;
    let started = Instant::now();
    let mut done_events = 0u64;
    let mut txns = 0u64;
    while started.elapsed() < spec.duration
        && !stop.load(Ordering::Relaxed)
        && spec.transactions.is_none_or(|n| txns < n)
    {
        txns += 1;
        let mut sql = String::from("BEGIN;");
        let mut events = 0usize;
        while events < spec.txn_size.max(1) {
            let t = rng.random_range(0..tenants.len());
            let table = rng.random_range(0..3);
            let tenant = &tenants[t];
            let n = rng.random_range(1..=(spec.txn_size - events).clamp(1, 20));
            let have = next[t][table];
            let roll = rng.random_range(0..10);
            if roll < 6 || have < n as i64 {
                let ids: Vec<i64> = (0..n as i64)
                    .map(|k| (have + k) * clients + c as i64)
                    .collect();
                next[t][table] += n as i64;
                sql.push_str(&insert(table, tenant, &ids, rng.random()));
            } else {
                let ids: Vec<i64> = (0..n)
                    .map(|_| rng.random_range(0..have) * clients + c as i64)
                    .collect();
                if roll < 9 {
                    sql.push_str(&update(table, tenant, &ids, rng.random()));
                } else {
                    sql.push_str(&delete(table, tenant, &ids));
                }
            }
            events += n;
        }
        sql.push_str("COMMIT;");
        match client.batch_execute(&sql).await {
            Ok(()) => {
                stats.events.fetch_add(events as u64, Ordering::Relaxed);
                stats.transactions.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.as_db_error().is_some() => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                let _ = client.batch_execute("ROLLBACK").await;
            }
            Err(e) => return Err(on_source("running the workload")(e)),
        }
        done_events += events as u64;
        if per_client_rate > 0.0 {
            let due = Duration::from_secs_f64(done_events as f64 / per_client_rate);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait.min(Duration::from_secs(1))).await;
            }
        }
    }
    Ok(())
}

fn id_list(ids: &[i64]) -> String {
    ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
}

fn lit(s: &str) -> String {
    crate::pg::quote_literal(s)
}

/// Rows of about 500 bytes: words and structure (compressible) plus hex.
fn insert(table: usize, tenant: &str, ids: &[i64], salt: u32) -> String {
    let ids = id_list(ids);
    let tenant = lit(tenant);
    match table {
        0 => format!(
            "INSERT INTO accounts SELECT {tenant}, g,
                    'Account ' || g || ' ' || (ARRAY['Berlin','Paris','Madrid','Lisbon','Vienna','Prague'])[1 + (g + {salt}) % 6] || ' GmbH',
                    'user' || g || '@' || {tenant} || '.example.com', ((g * 7919 + {salt}) % 100000) / 100.0, now()
               FROM unnest(ARRAY[{ids}]::bigint[]) g ON CONFLICT DO NOTHING;"
        ),
        1 => format!(
            "INSERT INTO orders SELECT {tenant}, g, g % 997, (ARRAY['new','paid','packed','shipped','delivered'])[1 + (g + {salt}) % 5],
                    ((g * 31 + {salt}) % 50000) / 100.0,
                    jsonb_build_object('sku', 'SKU-' || (g % 500), 'qty', 1 + g % 9, 'currency', 'EUR',
                        'shipping', jsonb_build_object('city', (ARRAY['Berlin','Paris','Madrid','Lisbon'])[1 + g % 4], 'street', 'Main Street ' || g % 200),
                        'note', 'Customer requested an update to the delivery address before dispatch',
                        'trace', md5(g::text || '{salt}') || md5(('x' || g)::text)),
                    now()
               FROM unnest(ARRAY[{ids}]::bigint[]) g ON CONFLICT DO NOTHING;"
        ),
        _ => format!(
            "INSERT INTO events SELECT {tenant}, g, (ARRAY['page_view','click','signup','purchase','login','api_call'])[1 + (g + {salt}) % 6],
                    'GET /api/v1/' || (ARRAY['orders','invoices','customers','reports'])[1 + g % 4] || '/' || g ||
                    ' HTTP/1.1 200 ua=Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0 session=' ||
                    md5(g::text || '{salt}') || md5(g::text) || ' Payment was authorised and captured by the card processor without issues',
                    now()
               FROM unnest(ARRAY[{ids}]::bigint[]) g ON CONFLICT DO NOTHING;"
        ),
    }
}

fn update(table: usize, tenant: &str, ids: &[i64], salt: u32) -> String {
    let (ids, tenant) = (id_list(ids), lit(tenant));
    match table {
        0 => format!("UPDATE accounts SET balance = balance + {}, updated_at = now() WHERE tenant_id = {tenant} AND id = ANY(ARRAY[{ids}]::bigint[]);", salt % 100),
        1 => format!("UPDATE orders SET status = (ARRAY['paid','packed','shipped'])[1 + {} % 3], payload = payload || jsonb_build_object('updated', {salt}) WHERE tenant_id = {tenant} AND id = ANY(ARRAY[{ids}]::bigint[]);", salt),
        _ => format!("UPDATE events SET kind = 'seen', body = body || ' ' || {salt} WHERE tenant_id = {tenant} AND id = ANY(ARRAY[{ids}]::bigint[]);"),
    }
}

fn delete(table: usize, tenant: &str, ids: &[i64]) -> String {
    format!(
        "DELETE FROM {} WHERE tenant_id = {} AND id = ANY(ARRAY[{}]::bigint[]);",
        TABLES[table],
        lit(tenant),
        id_list(ids)
    )
}
