//! Connecting to the walsender: TCP, TLS per `sslmode`, the startup
//! message (`replication=database`), authentication (trust, password, md5,
//! SCRAM-SHA-256), simple queries, and `START_REPLICATION`.

use super::*;

/// A connection before START_REPLICATION: simple queries only.
pub struct Session {
    pub(super) io: Box<dyn Io>,
    pub(super) buf: BytesMut,
}

impl Session {
    /// Connect as a replication connection to `info`'s database.
    pub async fn connect(info: &ConnInfo, application_name: &str) -> Result<Self> {
        let timeout = Duration::from_secs(info.connect_timeout_seconds.unwrap_or(30).max(1));
        match tokio::time::timeout(timeout, Self::connect_now(info, application_name)).await {
            Ok(r) => r,
            Err(_) => Err(stream_err(
                format!(
                    "connecting to {}:{} timed out after {timeout:?}",
                    info.host, info.port
                ),
                ErrorClass::Retry,
            )),
        }
    }

    async fn connect_now(info: &ConnInfo, application_name: &str) -> Result<Self> {
        let io: Box<dyn Io> = if info.host.starts_with('/') {
            // A Unix-domain socket directory, as libpq: no TLS over it.
            let path = format!("{}/.s.PGSQL.{}", info.host, info.port);
            Box::new(Parkable::new(
                tokio::net::UnixStream::connect(&path).await.map_err(|e| {
                    stream_err(format!("connecting to {path}: {e}"), ErrorClass::Retry)
                })?,
            ))
        } else {
            Self::tcp(info).await?
        };
        Self::start(io, info, application_name).await
    }

    async fn tcp(info: &ConnInfo) -> Result<Box<dyn Io>> {
        let tcp = TcpStream::connect((info.host.as_str(), info.port))
            .await
            .map_err(|e| {
                stream_err(
                    format!("connecting to {}:{}: {e}", info.host, info.port),
                    ErrorClass::Retry,
                )
            })?;
        let _ = tcp.set_nodelay(true);
        negotiate_tls(tcp, info).await
    }

    async fn start(io: Box<dyn Io>, info: &ConnInfo, application_name: &str) -> Result<Self> {
        let mut session = Session {
            io,
            buf: BytesMut::with_capacity(READ_ROOM),
        };
        let mut out = BytesMut::new();
        let params = [
            ("user", info.user.as_str()),
            ("database", info.dbname.as_str()),
            ("replication", "database"),
            ("application_name", application_name),
            ("client_encoding", "UTF8"),
            (
                "options",
                "-c datestyle=ISO -c intervalstyle=postgres -c extra_float_digits=3",
            ),
        ];
        frontend::startup_message(params.iter().copied(), &mut out)
            .map_err(|e| protocol(format!("startup message: {e}")))?;
        session.send(&out).await?;
        session.authenticate(info).await?;
        // ParameterStatus, BackendKeyData, notices … until ReadyForQuery.
        loop {
            let (tag, body) = session.read().await?;
            match tag {
                b'Z' => return Ok(session),
                b'E' => return Err(server_error(&body)),
                b'S' | b'K' | b'N' => {}
                other => return Err(protocol(format!("message '{}' at startup", other as char))),
            }
        }
    }

    async fn authenticate(&mut self, info: &ConnInfo) -> Result<()> {
        let password = || {
            info.password.as_ref().map(|p| p.expose().as_bytes()).ok_or_else(|| {
                stream_err(
                    format!(
                        "the source asks a password for user '{}' and the connection string has none",
                        info.user
                    ),
                    ErrorClass::OperatorAction,
                )
            })
        };
        let mut scram: Option<ScramSha256> = None;
        loop {
            let (tag, body) = self.read().await?;
            match tag {
                b'E' => return Err(server_error(&body)),
                b'R' => {}
                other => {
                    return Err(protocol(format!(
                        "message '{}' during authentication",
                        other as char
                    )))
                }
            }
            let mut b = body;
            if b.remaining() < 4 {
                return Err(protocol("short authentication request"));
            }
            let mut out = BytesMut::new();
            match b.get_i32() {
                0 => return Ok(()),
                3 => {
                    frontend::password_message(password()?, &mut out)
                        .map_err(unencodable)?;
                }
                5 => {
                    if b.remaining() < 4 {
                        return Err(protocol("md5 request without salt"));
                    }
                    let salt = [b[0], b[1], b[2], b[3]];
                    let hashed = postgres_protocol::authentication::md5_hash(
                        info.user.as_bytes(),
                        password()?,
                        salt,
                    );
                    frontend::password_message(hashed.as_bytes(), &mut out)
                        .map_err(unencodable)?;
                }
                10 => {
                    let offered: Vec<&[u8]> = b.chunk().split(|&c| c == 0).collect();
                    if !offered.contains(&SCRAM_SHA_256.as_bytes()) {
                        return Err(stream_err(
                            "the source offers no SASL mechanism this client speaks (SCRAM-SHA-256)",
                            ErrorClass::OperatorAction,
                        ));
                    }
                    // Channel binding is not offered: TLS, when on, already
                    // authenticates the server by certificate.
                    let s = ScramSha256::new(password()?, ChannelBinding::unsupported());
                    frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut out)
                        .map_err(unencodable)?;
                    scram = Some(s);
                }
                11 => {
                    let s = scram.as_mut().ok_or_else(|| protocol("SASL continue without a start"))?;
                    s.update(b.chunk()).map_err(|e| {
                        stream_err(format!("SCRAM: {e}"), ErrorClass::OperatorAction)
                    })?;
                    frontend::sasl_response(s.message(), &mut out)
                        .map_err(unencodable)?;
                }
                12 => {
                    let s = scram.as_mut().ok_or_else(|| protocol("SASL final without a start"))?;
                    s.finish(b.chunk()).map_err(|e| {
                        stream_err(
                            format!("SCRAM: the server's proof does not verify: {e}"),
                            ErrorClass::OperatorAction,
                        )
                    })?;
                    continue;
                }
                other => {
                    return Err(stream_err(
                        format!("the source asks for an authentication method this client does not speak (code {other}); use scram-sha-256, md5, password or trust in pg_hba.conf"),
                        ErrorClass::OperatorAction,
                    ))
                }
            }
            self.send(&out).await?;
        }
    }

    pub(super) async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.io
            .write_all(bytes)
            .await
            .map_err(io_err("writing to the walsender"))?;
        self.io
            .flush()
            .await
            .map_err(io_err("writing to the walsender"))
    }

    /// The next whole frame: its tag and body.
    pub(super) async fn read(&mut self) -> Result<(u8, Bytes)> {
        loop {
            if let Some(frame) = take_frame(&mut self.buf)? {
                return Ok(frame);
            }
            let n = self
                .io
                .read_buf(&mut self.buf)
                .await
                .map_err(io_err("reading from the walsender"))?;
            if n == 0 {
                return Err(stream_err(
                    "the walsender closed the connection",
                    ErrorClass::Retry,
                ));
            }
        }
    }

    /// Run one replication command; its rows as text.
    pub async fn simple_query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>> {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).map_err(unencodable)?;
        self.send(&out).await?;
        let mut rows = Vec::new();
        let mut failed = None;
        loop {
            let (tag, body) = self.read().await?;
            match tag {
                b'D' => rows.push(data_row(body)?),
                b'E' => failed = Some(server_error(&body)),
                b'Z' => {
                    return match failed {
                        Some(e) => Err(e),
                        None => Ok(rows),
                    }
                }
                b'T' | b'C' | b'I' | b'N' | b'S' => {}
                other => {
                    return Err(protocol(format!(
                        "message '{}' answering a query",
                        other as char
                    )))
                }
            }
        }
    }

    /// `START_REPLICATION … LOGICAL` with `options` (already quoted); the
    /// stream's socket task starts reporting `ack` as flushed.
    pub async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        options: &str,
        stream: StreamSettings,
    ) -> Result<WalStream> {
        let sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start} ({options})",
            crate::pg::quote_ident(slot)
        );
        let mut out = BytesMut::new();
        frontend::query(&sql, &mut out).map_err(unencodable)?;
        self.send(&out).await?;
        loop {
            let (tag, body) = self.read().await?;
            match tag {
                b'W' => break,
                b'E' => return Err(server_error(&body)),
                b'N' | b'S' => {}
                other => {
                    return Err(protocol(format!(
                        "message '{}' after START_REPLICATION",
                        other as char
                    )))
                }
            }
        }
        let acked = Arc::new(AtomicU64::new(stream.ack.0));
        let paced = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel(stream.buffer.max(1));
        let (stop_tx, stop_rx) = oneshot::channel();
        let task = tokio::spawn(copy_both(
            self,
            tx,
            Shared {
                acked: acked.clone(),
                paced: paced.clone(),
            },
            stream.status_interval,
            stop_rx,
        ));
        Ok(WalStream {
            rx,
            acked,
            paced,
            stop: Some(stop_tx),
            task: Some(task),
        })
    }
}

/// SSLRequest and the TLS handshake as `sslmode` says (libpq's meanings).
pub(super) async fn negotiate_tls(mut tcp: TcpStream, info: &ConnInfo) -> Result<Box<dyn Io>> {
    if info.sslmode == SslMode::Disable {
        return Ok(Box::new(Parkable::new(tcp)));
    }
    let mut out = BytesMut::new();
    frontend::ssl_request(&mut out);
    tcp.write_all(&out)
        .await
        .map_err(io_err("asking the source for TLS"))?;
    let answer = tcp
        .read_u8()
        .await
        .map_err(io_err("asking the source for TLS"))?;
    let required = !matches!(info.sslmode, SslMode::Allow | SslMode::Prefer);
    match answer {
        b'S' => {}
        b'N' if !required => return Ok(Box::new(Parkable::new(tcp))),
        b'N' => {
            return Err(stream_err(
                format!(
                    "the source does not accept TLS and sslmode={} requires it: turn ssl on in the source's postgresql.conf",
                    info.sslmode.as_str()
                ),
                ErrorClass::OperatorAction,
            ))
        }
        other => return Err(protocol(format!("answer '{}' to SSLRequest", other as char))),
    }
    let config = crate::pg::tls::client_config(info)
        .map_err(|e| stream_err(e, ErrorClass::OperatorAction))?;
    let name = match info.host.parse::<IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => ServerName::try_from(info.host.clone()).map_err(|e| {
            stream_err(
                format!("host '{}' is not a valid TLS server name: {e}", info.host),
                ErrorClass::OperatorAction,
            )
        })?,
    };
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, Parkable::new(tcp))
        .await
        .map_err(|e| {
            let class = if e.kind() == std::io::ErrorKind::InvalidData {
                ErrorClass::OperatorAction
            } else {
                ErrorClass::Retry
            };
            stream_err(format!("TLS with the source: {e}"), class)
        })?;
    Ok(Box::new(tls))
}
