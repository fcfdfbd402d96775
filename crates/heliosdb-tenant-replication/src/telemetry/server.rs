//! Plain-HTTP listeners: `/metrics` on `[monitoring] prometheus_port`,
//! `/health` and `/ready` on `health_check_port`; and the collector that
//! refreshes time-based gauges every `metrics_interval_seconds`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::health::Health;
use super::{NodeTenants, Telemetry};
use crate::config::{Config, Mode};
use crate::error::{ReplicationError, Result, Side};
use crate::shutdown::Shutdown;

/// Bind both ports (an error names the port) and serve until shutdown.
/// `configs`: the node's tenants (their node sections are the same).
pub async fn start(
    configs: NodeTenants,
    telemetry: Arc<Telemetry>,
    shutdown: Shutdown,
) -> Result<()> {
    let Some(node) = read(&configs).first().cloned() else {
        return Ok(());
    };
    let m = &node.monitoring;
    let bind = |port: u16| async move {
        let addr = SocketAddr::new(m.bind_address, port);
        TcpListener::bind(addr).await.map_err(|e| {
            ReplicationError::operator(
                format!("cannot listen on {addr}: {e}"),
                "choose a free [monitoring] prometheus_port / health_check_port, or stop what uses it",
            )
        })
    };
    let metrics = bind(m.prometheus_port).await?;
    let health = bind(m.health_check_port).await?;
    tracing::info!(
        metrics = %format!("http://{}/metrics", metrics.local_addr().map(|a| a.to_string()).unwrap_or_default()),
        health = %format!("http://{}/health", health.local_addr().map(|a| a.to_string()).unwrap_or_default()),
        "monitoring endpoints"
    );
    let checker = Arc::new(Health::new(configs.clone(), telemetry.clone()));
    tokio::spawn(listen(
        metrics,
        Endpoints::Metrics(telemetry.clone()),
        shutdown.clone(),
    ));
    tokio::spawn(listen(health, Endpoints::Health(checker), shutdown.clone()));
    tokio::spawn(collect(configs, telemetry, shutdown));
    Ok(())
}

/// The tenants served now.
pub(crate) fn read(tenants: &NodeTenants) -> Vec<Arc<Config>> {
    tenants.read().unwrap_or_else(|p| p.into_inner()).clone()
}

#[derive(Clone)]
enum Endpoints {
    Metrics(Arc<Telemetry>),
    Health(Arc<Health>),
}

async fn listen(listener: TcpListener, endpoints: Endpoints, mut shutdown: Shutdown) {
    loop {
        let (tcp, _) = tokio::select! {
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let endpoints = endpoints.clone();
                async move { Ok::<_, Infallible>(route(&endpoints, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

fn response(status: u16, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(Bytes::from(body)));
    *res.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    res.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    res
}

async fn route(endpoints: &Endpoints, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return response(405, "text/plain", "use GET\n".into());
    }
    let json = "application/json";
    match (endpoints, req.uri().path()) {
        (Endpoints::Metrics(t), "/metrics") => response(
            200,
            "text/plain; version=0.0.4; charset=utf-8",
            t.render_metrics(),
        ),
        (Endpoints::Health(h), "/health") => {
            let (status, body) = h.report().await;
            response(status, json, format!("{body:#}\n"))
        }
        (Endpoints::Health(h), "/ready") => {
            let (status, body) = h.ready();
            response(status, json, format!("{body}\n"))
        }
        (Endpoints::Metrics(_), _) => response(404, "text/plain", "see /metrics\n".into()),
        (Endpoints::Health(_), _) => response(404, "text/plain", "see /health or /ready\n".into()),
    }
}

/// Every `metrics_interval_seconds`: throughput per tenant, and each
/// tenant's slot: retained WAL and confirmed position (nodes that reach the
/// source; one connection per source database).
async fn collect(tenants: NodeTenants, telemetry: Arc<Telemetry>, mut shutdown: Shutdown) {
    let Some(interval) = read(&tenants)
        .first()
        .map(|c| c.monitoring.metrics_interval)
    else {
        return;
    };
    let mut sources: std::collections::HashMap<String, tokio_postgres::Client> =
        std::collections::HashMap::new();
    loop {
        tokio::select! {
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
            _ = tokio::time::sleep(interval) => {}
        }
        for t in telemetry.tenants() {
            t.m.update_throughput();
        }
        let configs = read(&tenants);
        for config in &configs {
            let tc = &config.tenant;
            let Some(info) = tc
                .source
                .as_ref()
                .filter(|_| config.transport.mode != Mode::Apply)
            else {
                continue;
            };
            let key = info.masked();
            if !sources.contains_key(&key) {
                let Ok(client) = crate::pg::connect(
                    info,
                    &config.network,
                    Side::Source,
                    "heliosdb-tenant-replication metrics",
                )
                .await
                else {
                    continue;
                };
                sources.insert(key.clone(), client);
            }
            let Some(client) = sources.get(&key) else {
                continue;
            };
            let row = client
                .query_opt(
                    "SELECT (pg_current_wal_lsn() - restart_lsn)::bigint,
                            (confirmed_flush_lsn - '0/0'::pg_lsn)::bigint,
                            (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint
                       FROM pg_replication_slots WHERE slot_name = $1",
                    &[&tc.slot],
                )
                .await;
            match row {
                Ok(Some(r)) => {
                    let retained: Option<i64> = r.get(0);
                    let confirmed = r.get::<_, Option<i64>>(1).unwrap_or(0).max(0) as u64;
                    let current = r.get::<_, Option<i64>>(2).unwrap_or(0).max(0) as u64;
                    let t = telemetry.tenant(&tc.tenant_id);
                    t.m.slot(&tc.slot, retained.unwrap_or(0), confirmed);
                    // A tenant that committed nothing here yet holds the
                    // slot where it is.
                    let held_from = t
                        .acknowledged()
                        .max(t.spool.held())
                        .map_or(confirmed, |l| l.0.max(confirmed));
                    t.m.wal_held.set(current.saturating_sub(held_from) as i64);
                }
                Ok(None) => {}
                Err(_) => {
                    sources.remove(&key);
                }
            }
        }
    }
}
