//! The apply node's HTTPS server: TLS 1.3 with client certificates, routes
//! to [`ApplyNode`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::{class_name, ErrorBody, SessionRequest, MAX_BODY, SESSION_HEADER};
use crate::error::{ErrorClass, ReplicationError};
use crate::pipeline::apply_node::ApplyNode;
use crate::pipeline::Shutdown;

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

/// Accept capture nodes until shutdown.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    node: Arc<ApplyNode>,
    mut shutdown: Shutdown,
) {
    let acceptor = TlsAcceptor::from(tls);
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
        let _ = tcp.set_nodelay(true);
        let (acceptor, node, mut stop) = (acceptor.clone(), node.clone(), shutdown.clone());
        tokio::spawn(async move {
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
                let node = node.clone();
                async move { Ok::<_, Infallible>(route(&node, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
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

async fn route(node: &ApplyNode, req: Request<Incoming>) -> Response<Full<Bytes>> {
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
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return refused(Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "transport_request",
                format!("request body: {e}"),
            ))
        }
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
