//! The apply node's HTTPS server: TLS 1.3 with client certificates, routes
//! to a [`BatchService`] (the apply node implements it).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use super::{
    class_name, BatchResponse, ErrorBody, SessionRequest, SessionResponse, MAX_BODY, SESSION_HEADER,
};
use crate::error::{ErrorClass, ReplicationError};
use crate::shutdown::Shutdown;

/// A refusal: HTTP status and JSON body.
#[derive(Debug)]
pub struct Refusal {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl Refusal {
    pub fn new(status: StatusCode, error_type: &str, error: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody {
                error: error.into(),
                hint: None,
                class: "operator".into(),
                error_type: error_type.into(),
            },
        }
    }

    /// The capture node should start over (new session) and retry.
    pub fn retry(mut self) -> Self {
        self.body.class = "retry".into();
        self
    }

    /// The target (or a check) failed: the class tells the capture node
    /// whether to retry.
    pub fn from_error(e: &ReplicationError) -> Self {
        let (error, hint) = match e {
            ReplicationError::Operator { message, hint } => (message.clone(), Some(hint.clone())),
            other => (other.to_string(), None),
        };
        Self {
            status: if e.class() == ErrorClass::Retry {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            },
            body: ErrorBody {
                error,
                hint,
                class: class_name(e.class()).into(),
                error_type: "apply".into(),
            },
        }
    }
}

/// What the server serves: a capture node's sessions and batches.
pub trait BatchService: Send + Sync + 'static {
    /// Start (or replace) a tenant's session.
    fn open_session(
        &self,
        tenant: &str,
        req: SessionRequest,
    ) -> impl std::future::Future<Output = Result<SessionResponse, Refusal>> + Send;
    /// Open, decode and apply one batch; answer after the target committed.
    fn apply_batch(
        &self,
        tenant: &str,
        session: &str,
        envelope: Bytes,
    ) -> impl std::future::Future<Output = Result<BatchResponse, Refusal>> + Send;
    /// A connection was refused before any request (TLS, limits).
    fn refused_connection(&self, peer: &str, reason: &str);
    /// How long a request body may take to arrive.
    fn request_timeout(&self) -> Duration;
}

/// Connections served at once (a capture node keeps a few per tenant);
/// more are closed right after they are accepted.
pub const MAX_CONNECTIONS: usize = 256;
/// Request bodies held at once, in bytes: two of the largest batch.
pub const BODY_BUDGET: usize = 2 * MAX_BODY;
/// How long a request waits for room in [`BODY_BUDGET`] before it is
/// refused (503, retried by the capture node).
pub const BODY_WAIT: Duration = Duration::from_secs(1);
/// A connection with no request for this long is closed (a capture node
/// reconnects when it has a batch again).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// What bounds the server's memory whatever its clients send.
struct Limits {
    connections: Arc<Semaphore>,
    /// Permits of 1 KiB of request body.
    bodies: Arc<Semaphore>,
}

/// Accept capture nodes until shutdown.
pub async fn serve<S: BatchService>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    node: Arc<S>,
    mut shutdown: Shutdown,
) {
    let acceptor = TlsAcceptor::from(tls);
    let limits = Arc::new(Limits {
        connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        bodies: Arc::new(Semaphore::new(BODY_BUDGET / 1024)),
    });
    loop {
        let (tcp, peer) = tokio::select! {
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = limits.connections.clone().try_acquire_owned() else {
            node.refused_connection(
                &peer.to_string(),
                &format!("{MAX_CONNECTIONS} connections are open already"),
            );
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, node, mut stop) = (acceptor.clone(), node.clone(), shutdown.clone());
        let limits = limits.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        // Plaintext, no or a foreign client certificate, TLS < 1.3.
                        node.refused_connection(&peer.to_string(), &e.to_string());
                        return;
                    }
                    Err(_) => {
                        node.refused_connection(&peer.to_string(), "TLS handshake timed out");
                        return;
                    }
                };
            let service = hyper::service::service_fn(move |req| {
                let (node, limits) = (node.clone(), limits.clone());
                async move { Ok::<_, Infallible>(route(node.as_ref(), &limits, req).await) }
            });
            // The header timer also runs while a kept-alive connection waits
            // for its next request: an idle connection is closed.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(IDLE_TIMEOUT)
                .serve_connection(TokioIo::new(tls), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = &mut conn => {}
                _ = async { let _ = stop.wait_for(|s| *s).await; } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

fn json(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut res = Response::new(Full::new(Bytes::from(bytes)));
    *res.status_mut() = status;
    res.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    res
}

fn refused(r: Refusal) -> Response<Full<Bytes>> {
    json(r.status, &r.body)
}

async fn route<S: BatchService>(
    node: &S,
    limits: &Limits,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (tenant, action) = match parts.as_slice() {
        ["v1", "tenants", tenant, action] => (tenant.to_string(), action.to_string()),
        _ => {
            return refused(Refusal::new(
                StatusCode::NOT_FOUND,
                "transport_request",
                format!("no such endpoint: {path}"),
            ))
        }
    };
    if req.method() != Method::POST {
        return refused(Refusal::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "transport_request",
            "use POST",
        ));
    }
    let session = req
        .headers()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    // The body's size is known before it is read: too large is refused
    // unread, and what is read fits the server's budget for bodies.
    let length = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let Some(length) = length else {
        return refused(Refusal::new(
            StatusCode::LENGTH_REQUIRED,
            "transport_request",
            "a Content-Length is required",
        ));
    };
    if length > MAX_BODY {
        return refused(Refusal::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "transport_request",
            format!("request body of {length} bytes: at most {MAX_BODY}"),
        ));
    }
    let permits = u32::try_from(length.div_ceil(1024)).unwrap_or(u32::MAX);
    let _budget = match tokio::time::timeout(BODY_WAIT, limits.bodies.acquire_many(permits)).await {
        Ok(Ok(permit)) => permit,
        _ => {
            return refused(
                Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "transport_request",
                    "the apply node is busy with other requests' bodies",
                )
                .retry(),
            )
        }
    };
    let read = Limited::new(req.into_body(), length).collect();
    let body =
        match tokio::time::timeout(node.request_timeout(), read).await {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) => {
                return refused(Refusal::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "transport_request",
                    format!("request body: {e}"),
                ))
            }
            Err(_) => return refused(
                Refusal::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "transport_request",
                    "the request body did not arrive within [transport] request_timeout_seconds",
                )
                .retry(),
            ),
        };
    let result = match action.as_str() {
        "sessions" => match serde_json::from_slice::<SessionRequest>(&body) {
            Ok(r) => node
                .open_session(&tenant, r)
                .await
                .map(|ok| json(StatusCode::OK, &ok)),
            Err(e) => Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "transport_request",
                format!("session request: {e}"),
            )),
        },
        "batches" => match session {
            Some(s) => node
                .apply_batch(&tenant, &s, body)
                .await
                .map(|ok| json(StatusCode::OK, &ok)),
            None => Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "transport_request",
                format!("missing header {SESSION_HEADER}"),
            )),
        },
        other => Err(Refusal::new(
            StatusCode::NOT_FOUND,
            "transport_request",
            format!("no such endpoint: {other}"),
        )),
    };
    result.unwrap_or_else(refused)
}
