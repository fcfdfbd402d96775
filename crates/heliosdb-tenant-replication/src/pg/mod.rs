//! Ordinary (non-replication) PostgreSQL connections, with libpq's `sslmode`
//! honoured in full.
//!
//! tokio-postgres's own parser refuses `verify-ca` and `verify-full`, so the
//! connection is built from our typed [`ConnInfo`]: TLS is always requested
//! as `require` from tokio-postgres and the *verification* is done by the
//! rustls configuration we hand it, matching libpq:
//!
//! | sslmode | encrypted | chain checked | host name checked |
//! |---|---|---|---|
//! | disable | no | – | – |
//! | allow / prefer | if the server offers it | no | no |
//! | require | yes | only when `sslrootcert` is given (as libpq) | no |
//! | verify-ca | yes | yes | no |
//! | verify-full | yes | yes | yes |

pub(crate) mod tls;

use std::time::Duration;

use tokio_postgres::config::SslMode as PgSslMode;
use tokio_postgres::Client;

use crate::config::{ConnInfo, NetworkConfig, SslMode};
use crate::error::{ReplicationError, Result, Side};

/// Connect to `info`; `application_name` shows in `pg_stat_activity`.
pub async fn connect(
    info: &ConnInfo,
    network: &NetworkConfig,
    side: Side,
    application_name: &str,
) -> Result<Client> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host(&info.host)
        .port(info.port)
        .user(&info.user)
        .dbname(&info.dbname)
        .application_name(info.application_name.as_deref().unwrap_or(application_name))
        .connect_timeout(
            info.connect_timeout_seconds
                .map(Duration::from_secs)
                .unwrap_or(network.connect_timeout),
        )
        .keepalives(true)
        .keepalives_idle(network.tcp_keepalive)
        // Text output the apply side relies on, whatever the server default;
        // on a target, the daemon's writes are not local writes (the version
        // triggers skip them, see apply::tracking).
        .options(if side == Side::Target {
            "-c datestyle=ISO -c intervalstyle=postgres -c extra_float_digits=3 -c client_encoding=UTF8 -c heliosdb.applying=on"
        } else {
            "-c datestyle=ISO -c intervalstyle=postgres -c extra_float_digits=3 -c client_encoding=UTF8"
        });
    if let Some(p) = &info.password {
        cfg.password(p.expose());
    }
    let context = format!("connecting to {}", info.masked());
    let client = match info.sslmode {
        SslMode::Disable => {
            cfg.ssl_mode(PgSslMode::Disable);
            let (client, conn) = cfg
                .connect(tokio_postgres::NoTls)
                .await
                .map_err(|e| ReplicationError::db(side, &context, e))?;
            spawn_connection(conn, side);
            client
        }
        mode => {
            cfg.ssl_mode(match mode {
                SslMode::Allow | SslMode::Prefer => PgSslMode::Prefer,
                _ => PgSslMode::Require,
            });
            let tls = tls::make_connector(info).map_err(|m| {
                ReplicationError::operator(
                    format!("{side}: TLS setup for {}: {m}", info.masked()),
                    "check sslrootcert, sslcert and sslkey in the connection string: the files must exist and hold PEM data",
                )
            })?;
            let (client, conn) = cfg
                .connect(tls)
                .await
                .map_err(|e| ReplicationError::db(side, &context, e))?;
            spawn_connection(conn, side);
            client
        }
    };
    Ok(client)
}

fn spawn_connection<S, T>(conn: tokio_postgres::Connection<S, T>, side: Side)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio_postgres::tls::TlsStream + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%side, error = %e, "database connection closed");
        }
    });
}

/// Columns of `schema.table` (not dropped) in order, with their types as
/// `format_type` spells them (type modifier included); empty if no table.
pub async fn columns(
    client: &impl tokio_postgres::GenericClient,
    schema: &str,
    table: &str,
) -> std::result::Result<Vec<(String, String)>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
               FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
            &[&schema, &table],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// `SET session_replication_role = replica` on a target session, as
/// PostgreSQL's own apply and table sync do: foreign keys and ordinary
/// triggers do not fire for replicated rows (the source checked them; rows
/// arrive in another order than the source wrote them). `Ok(false)`: the
/// role may not (a superuser setting).
pub async fn replica_role(client: &tokio_postgres::Client) -> Result<bool, tokio_postgres::Error> {
    match client
        .batch_execute("SET session_replication_role = replica")
        .await
    {
        Ok(()) => Ok(true),
        Err(e) if e.code().map(|c| c.code()) == Some("42501") => Ok(false),
        Err(e) => Err(e),
    }
}

/// `schema.table`'s own rows on a target, for a DELETE or a read: `ONLY`
/// for a plain table (an inheritance parent must not reach its children's
/// rows), the whole tree of a partitioned table (`ONLY` there silently
/// matches nothing).
pub async fn own_rows(
    client: &impl tokio_postgres::GenericClient,
    schema: &str,
    table: &str,
) -> Result<String, tokio_postgres::Error> {
    let partitioned: Option<bool> = client
        .query_opt(
            "SELECT c.relkind = 'p' FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2",
            &[&schema, &table],
        )
        .await?
        .map(|r| r.get(0));
    let name = qualified(schema, table);
    Ok(match partitioned {
        Some(true) => name,
        _ => format!("ONLY {name}"),
    })
}

/// Quote an identifier as PostgreSQL's `quote_ident` does (always quoting).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quote a string literal (standard_conforming_strings = on).
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// `schema.table`, both quoted.
pub fn qualified(schema: &str, table: &str) -> String {
    format!("{}.{}", quote_ident(schema), quote_ident(table))
}
