//! The capture node's side: one persistent HTTPS connection to the apply node.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::{
    class_of, error, BatchResponse, ErrorBody, SessionRequest, SessionResponse, SESSION_HEADER,
};
use crate::config::TransportConfig;
use crate::error::{ErrorClass, ReplicationError, Result};

/// Talks to one apply node.
pub struct ApplyClient {
    host: String,
    port: u16,
    /// Path prefix of `apply_url` (no trailing slash).
    prefix: String,
    connector: TlsConnector,
    timeout: Duration,
    connect_timeout: Duration,
    sender: Option<SendRequest<Full<Bytes>>>,
}

impl ApplyClient {
    pub fn new(t: &TransportConfig, connect_timeout: Duration) -> Result<Self> {
        let url = t.apply_url.as_deref().ok_or_else(|| {
            ReplicationError::operator(
                "[transport] apply_url is not set",
                "set apply_url = \"https://<apply node>:<port>\"",
            )
        })?;
        let bad = |why: &str| {
            ReplicationError::operator(
                format!("[transport] apply_url '{url}': {why}"),
                "write it as https://host:port",
            )
        };
        let uri: hyper::Uri = url.parse().map_err(|_| bad("not a URL"))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("must use https"));
        }
        let host = uri
            .host()
            .ok_or_else(|| bad("no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        Ok(Self {
            port: uri.port_u16().unwrap_or(443),
            prefix: uri.path().trim_end_matches('/').to_string(),
            host,
            connector: TlsConnector::from(super::tls::client_config(t)?),
            timeout: t.request_timeout,
            connect_timeout,
            sender: None,
        })
    }

    /// Where batches go, for logs.
    pub fn endpoint(&self) -> String {
        format!("https://{}:{}{}", self.host, self.port, self.prefix)
    }

    async fn connect(&mut self) -> Result<SendRequest<Full<Bytes>>> {
        let endpoint = self.endpoint();
        let retry = |what: String| error(ErrorClass::Retry, format!("{endpoint}: {what}"));
        let tcp = tokio::time::timeout(
            self.connect_timeout,
            tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| retry("connection timed out".into()))?
        .map_err(|e| retry(format!("cannot connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.host.clone())
            .map_err(|_| retry(format!("'{}' is not a valid server name", self.host)))?;
        let tls = tokio::time::timeout(self.connect_timeout, self.connector.connect(name, tcp))
            .await
            .map_err(|_| retry("TLS handshake timed out".into()))?
            .map_err(|e| tls_failure(&endpoint, e))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| retry(format!("HTTP handshake: {e}")))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// POST and read the answer; a connection that failed is dropped so the
    /// next call reconnects.
    async fn post(
        &mut self,
        path: &str,
        content_type: &str,
        session: Option<&str>,
        body: Bytes,
    ) -> Result<(StatusCode, Bytes)> {
        let mut sender = match self.sender.take() {
            Some(s) if !s.is_closed() => s,
            _ => self.connect().await?,
        };
        let endpoint = self.endpoint();
        let mut req = Request::post(format!("{}{path}", self.prefix))
            .header(hyper::header::HOST, format!("{}:{}", self.host, self.port))
            .header(hyper::header::CONTENT_TYPE, content_type);
        if let Some(s) = session {
            req = req.header(SESSION_HEADER, s);
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| error(ErrorClass::Fatal, format!("request: {e}")))?;
        let exchange = async {
            sender
                .ready()
                .await
                .map_err(|e| format!("connection lost: {e}"))?;
            let res = sender
                .send_request(req)
                .await
                .map_err(|e| format!("request failed: {e}"))?;
            let status = res.status();
            let body = res
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?
                .to_bytes();
            Ok::<_, String>((status, body))
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(answer)) => {
                self.sender = Some(sender);
                Ok(answer)
            }
            Ok(Err(e)) => Err(error(ErrorClass::Retry, format!("{endpoint}: {e}"))),
            Err(_) => Err(error(
                ErrorClass::Retry,
                format!(
                    "{endpoint}: no answer within {} s ([transport] request_timeout_seconds)",
                    self.timeout.as_secs()
                ),
            )),
        }
    }

    /// Start a session for `tenant`.
    pub async fn session(&mut self, tenant: &str, req: &SessionRequest) -> Result<SessionResponse> {
        let body = serde_json::to_vec(req)
            .map_err(|e| error(ErrorClass::Fatal, e.to_string()))?
            .into();
        let (status, body) = self
            .post(
                &format!("/v1/tenants/{tenant}/sessions"),
                "application/json",
                None,
                body,
            )
            .await?;
        self.answer(status, &body)
    }

    /// Ship one sealed batch; returns once the apply node applied it.
    pub async fn batch(
        &mut self,
        tenant: &str,
        session: &str,
        envelope: Bytes,
    ) -> Result<BatchResponse> {
        let (status, body) = self
            .post(
                &format!("/v1/tenants/{tenant}/batches"),
                "application/octet-stream",
                Some(session),
                envelope,
            )
            .await?;
        self.answer(status, &body)
    }

    fn answer<T: serde::de::DeserializeOwned>(&self, status: StatusCode, body: &[u8]) -> Result<T> {
        let endpoint = self.endpoint();
        if status.is_success() {
            return serde_json::from_slice(body).map_err(|e| {
                error(
                    ErrorClass::Fatal,
                    format!("{endpoint}: unexpected answer: {e}"),
                )
            });
        }
        match serde_json::from_slice::<ErrorBody>(body) {
            Ok(e) => {
                let class = class_of(&e.class);
                let message = format!("apply node {endpoint} refused ({status}): {}", e.error);
                Err(match (class, e.hint) {
                    (ErrorClass::OperatorAction, Some(hint)) => {
                        ReplicationError::operator(message, hint)
                    }
                    _ => error(class, message),
                })
            }
            Err(_) => Err(error(
                ErrorClass::Retry,
                format!("{endpoint}: HTTP {status}"),
            )),
        }
    }
}

/// A TLS failure: certificate problems need a person; others may pass.
fn tls_failure(endpoint: &str, e: std::io::Error) -> ReplicationError {
    let text = e.to_string();
    let cause = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let certificate = cause.is_some_and(|r| {
        matches!(
            r,
            rustls::Error::InvalidCertificate(_)
                | rustls::Error::NoCertificatesPresented
                | rustls::Error::AlertReceived(_)
        )
    });
    let not_tls = cause.is_some_and(|r| matches!(r, rustls::Error::InvalidMessage(_)));
    if certificate {
        ReplicationError::operator(
            format!("{endpoint}: TLS handshake refused: {text}"),
            "the apply node's certificate must be signed by [transport] ca_file and name the host of apply_url; this node's certificate must be signed by the CA the apply node trusts",
        )
    } else if not_tls {
        // Retried: a port can be between owners during a restart.
        error(
            ErrorClass::Retry,
            format!("{endpoint}: TLS handshake: the server does not speak TLS ({text}); apply_url must name the apply node's [transport] listen_address, not a monitoring port or another service"),
        )
    } else {
        error(
            ErrorClass::Retry,
            format!("{endpoint}: TLS handshake: {text}"),
        )
    }
}

pub use crate::config::host_name;
