//! PostgreSQL connection strings (URL form `postgresql://…` and libpq's
//! `key=value` form), parsed once into a typed, secret-safe value.
//!
//! tokio-postgres rejects `sslmode=verify-ca|verify-full` in its own parser,
//! so we parse here and hand each library a typed config; `verify-*` keeps its
//! full meaning (see `pg::tls`), it is never downgraded.

use std::fmt;
use std::path::PathBuf;

use percent_encoding::percent_decode_str;

use super::secret::SecretString;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "disable" => Self::Disable,
            "allow" => Self::Allow,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Allow => "allow",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

/// A parsed connection string. `Display` masks the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnInfo {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<SecretString>,
    pub dbname: String,
    pub sslmode: SslMode,
    pub sslrootcert: Option<PathBuf>,
    pub sslcert: Option<PathBuf>,
    pub sslkey: Option<PathBuf>,
    pub application_name: Option<String>,
    pub connect_timeout_seconds: Option<u64>,
}

/// Why a connection string was refused (never contains the password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConnInfoError(pub String);

impl ConnInfo {
    /// Parse either form. Unknown parameters are refused so that a typo in
    /// `sslmode` cannot silently turn TLS off.
    pub fn parse(s: &str) -> Result<Self, ConnInfoError> {
        let s = s.trim();
        if s.starts_with("postgresql://") || s.starts_with("postgres://") {
            Self::parse_url(s)
        } else if s.contains('=') {
            Self::parse_keyword_value(s)
        } else {
            Err(ConnInfoError(
                "expected a URL like postgresql://user:password@host:5432/dbname?sslmode=require or key=value pairs like 'host=… dbname=…'".into(),
            ))
        }
    }

    fn empty() -> Self {
        let user = std::env::var("USER").unwrap_or_else(|_| "postgres".into());
        Self {
            host: "localhost".into(),
            port: 5432,
            dbname: user.clone(),
            user,
            password: None,
            sslmode: SslMode::Prefer,
            sslrootcert: None,
            sslcert: None,
            sslkey: None,
            application_name: None,
            connect_timeout_seconds: None,
        }
    }

    fn parse_url(s: &str) -> Result<Self, ConnInfoError> {
        let rest = s
            .split_once("://")
            .map(|(_, r)| r)
            .ok_or_else(|| ConnInfoError("missing scheme".into()))?;
        let (main, query) = match rest.split_once('?') {
            Some((m, q)) => (m, Some(q)),
            None => (rest, None),
        };
        let (authority, path) = match main.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (main, None),
        };
        // An '@' after the host: a password with an unencoded '/' or '?'
        // (whose rest would otherwise become the database name).
        if path.is_some_and(|p| p.contains('@')) || query.is_some_and(|q| q.contains('@')) {
            return Err(ConnInfoError(
                "'@' after the host: a password with '/', '?' or '@' in it must be percent-encoded (%2F, %3F, %40)".into(),
            ));
        }
        let mut info = Self::empty();
        let hostport = match authority.rsplit_once('@') {
            Some((userinfo, hostport)) => {
                match userinfo.split_once(':') {
                    Some((u, p)) => {
                        info.user = decode(u)?;
                        info.password = Some(SecretString::new(decode(p)?));
                    }
                    None => info.user = decode(userinfo)?,
                }
                hostport
            }
            None => authority,
        };
        if !hostport.is_empty() {
            let (host, port) = split_host_port(hostport)?;
            info.host = host;
            if let Some(p) = port {
                info.port = p;
            }
        }
        if let Some(p) = path.filter(|p| !p.is_empty()) {
            info.dbname = decode(p)?;
        } else {
            info.dbname = info.user.clone();
        }
        if let Some(q) = query {
            for pair in q.split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                info.set(&decode(k)?, &decode(v)?)?;
            }
        }
        Ok(info)
    }

    fn parse_keyword_value(s: &str) -> Result<Self, ConnInfoError> {
        let mut info = Self::empty();
        let mut saw_dbname = false;
        let mut chars = s.chars().peekable();
        loop {
            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                chars.next();
            }
            if chars.peek().is_none() {
                break;
            }
            let mut key = String::new();
            while let Some(&c) = chars.peek() {
                if c == '=' || c.is_whitespace() {
                    break;
                }
                key.push(c);
                chars.next();
            }
            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                chars.next();
            }
            if chars.next() != Some('=') {
                return Err(ConnInfoError(format!(
                    "missing '=' after {}: a value with spaces must be quoted, as in password='a b'",
                    shown_key(&key)
                )));
            }
            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                chars.next();
            }
            let mut value = String::new();
            if chars.peek() == Some(&'\'') {
                chars.next();
                let mut closed = false;
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => {
                            if let Some(n) = chars.next() {
                                value.push(n);
                            }
                        }
                        '\'' => {
                            closed = true;
                            break;
                        }
                        _ => value.push(c),
                    }
                }
                if !closed {
                    return Err(ConnInfoError(format!(
                        "unterminated quote in the value of {}",
                        shown_key(&key)
                    )));
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c.is_whitespace() {
                        break;
                    }
                    value.push(c);
                    chars.next();
                }
            }
            if key == "dbname" {
                saw_dbname = true;
            }
            info.set(&key, &value)?;
        }
        if !saw_dbname {
            info.dbname = info.user.clone();
        }
        Ok(info)
    }

    fn set(&mut self, key: &str, value: &str) -> Result<(), ConnInfoError> {
        match key {
            "host" | "hostaddr" => self.host = value.to_string(),
            "port" => {
                self.port = value
                    .parse()
                    .map_err(|_| ConnInfoError("port is not a number from 1 to 65535".into()))?
            }
            "user" => self.user = value.to_string(),
            "password" => self.password = Some(SecretString::new(value)),
            "dbname" => self.dbname = value.to_string(),
            "sslmode" => {
                self.sslmode = SslMode::parse(value).ok_or_else(|| {
                    ConnInfoError(
                    "sslmode is not one of disable, allow, prefer, require, verify-ca, verify-full"
                        .into(),
                )
                })?
            }
            "sslrootcert" => self.sslrootcert = Some(PathBuf::from(value)),
            "sslcert" => self.sslcert = Some(PathBuf::from(value)),
            "sslkey" => self.sslkey = Some(PathBuf::from(value)),
            "application_name" => self.application_name = Some(value.to_string()),
            "connect_timeout" => {
                self.connect_timeout_seconds = Some(value.parse().map_err(|_| {
                    ConnInfoError("connect_timeout is not a number of seconds".into())
                })?)
            }
            other => {
                return Err(ConnInfoError(format!(
                    "unsupported connection parameter {}: supported are {}",
                    shown_key(other),
                    KEYS.join(", ")
                )))
            }
        }
        Ok(())
    }

    /// The URL with the password replaced by `***`.
    pub fn masked(&self) -> String {
        self.to_string()
    }
}

/// The parameters a connection string may set.
const KEYS: [&str; 12] = [
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "dbname",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "application_name",
    "connect_timeout",
];

/// A parameter name for an error message. The text of a malformed
/// connection string may be part of a password (`password=a b` makes `b`
/// a "key"): only a supported name, or a near miss of one (a typo), is
/// shown; anything else is not.
fn shown_key(key: &str) -> String {
    if KEYS.contains(&key) {
        return format!("'{key}'");
    }
    match KEYS
        .iter()
        .find(|k| key.len() >= 4 && edit_distance(k, key) <= 2)
    {
        Some(k) => format!("'{key}' (did you mean {k}?)"),
        None => "(name not shown: it may be part of a password)".into(),
    }
}

/// Levenshtein distance (short strings only).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (prev + usize::from(ca != cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            prev = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

fn decode(s: &str) -> Result<String, ConnInfoError> {
    percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| ConnInfoError("connection string is not valid UTF-8 after %-decoding".into()))
}

fn split_host_port(s: &str) -> Result<(String, Option<u16>), ConnInfoError> {
    let bad_port = |_: &str| {
        ConnInfoError(
            "the port after the host is not a number from 1 to 65535 (a password with '/', '?', '@' or ':' in it must be percent-encoded: %2F, %3F, %40, %3A)".into(),
        )
    };
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest
            .split_once(']')
            .ok_or_else(|| ConnInfoError("unclosed '[' in IPv6 host".into()))?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p.parse().map_err(|_| bad_port(p))?),
            None => None,
        };
        return Ok((host.to_string(), port));
    }
    match s.rsplit_once(':') {
        Some((h, p)) => Ok((decode(h)?, Some(p.parse().map_err(|_| bad_port(p))?))),
        None => Ok((decode(s)?, None)),
    }
}

impl fmt::Display for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "postgresql://{}", self.user)?;
        if self.password.is_some() {
            f.write_str(":***")?;
        }
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        write!(
            f,
            "@{host}:{}/{}?sslmode={}",
            self.port,
            self.dbname,
            self.sslmode.as_str()
        )?;
        for (k, v) in [
            ("sslrootcert", &self.sslrootcert),
            ("sslcert", &self.sslcert),
            ("sslkey", &self.sslkey),
        ] {
            if let Some(p) = v {
                write!(f, "&{k}={}", p.display())?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_form_with_every_tls_parameter() {
        let c = ConnInfo::parse("postgresql://user@host:5432/db?sslmode=verify-full&sslrootcert=/etc/heliosdb/ca-cert.pem&sslcert=/etc/heliosdb/client-cert.pem&sslkey=/etc/heliosdb/client-key.pem").expect("parse");
        assert_eq!(c.host, "host");
        assert_eq!(c.port, 5432);
        assert_eq!(c.user, "user");
        assert_eq!(c.dbname, "db");
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        assert_eq!(
            c.sslkey.as_deref(),
            Some(std::path::Path::new("/etc/heliosdb/client-key.pem"))
        );
        assert!(c.password.is_none());
    }

    #[test]
    fn malformed_strings_never_echo_a_password() {
        for (text, secret) in [
            ("postgresql://canary:Secret/app", "Secret"),
            ("postgresql://canary:Sec/ret@host/app", "ret"),
            ("postgresql://canary:Sec/ret@host/app", "Sec"),
            ("postgresql://canary:Sec?ret@host/app", "ret"),
            ("postgresql://canary:Sec?ret@host/app", "Sec"),
            ("host=h password=abc defgh dbname=x", "defgh"),
            ("host=h password=abc defgh=1 dbname=x", "defgh"),
            ("host=h password='abc", "abc"),
            ("host=h port=hunter2", "hunter2"),
            ("host=h sslmode=hunter2", "hunter2"),
            ("host=h connect_timeout=hunter2", "hunter2"),
        ] {
            let e = ConnInfo::parse(text).expect_err(text).to_string();
            assert!(!e.contains(secret), "{text}: {e}");
        }
        // A typo of a parameter name is still named.
        let e = ConnInfo::parse("host=h sslmdoe=require")
            .expect_err("typo")
            .to_string();
        assert!(e.contains("did you mean sslmode"), "{e}");
    }

    #[test]
    fn password_is_decoded_and_never_displayed() {
        let c = ConnInfo::parse(
            "postgresql://heliosdb_replication:secure%40password_123@localhost:5432/postgres?sslmode=require",
        )
        .expect("parse");
        assert_eq!(
            c.password.as_ref().map(|p| p.expose()),
            Some("secure@password_123")
        );
        let shown = format!("{c} {c:?}");
        assert!(!shown.contains("secure"), "{shown}");
        assert!(shown.contains(":***@localhost:5432/postgres"), "{shown}");
    }

    #[test]
    fn keyword_value_form() {
        let c = ConnInfo::parse(
            "host=db.example port=6432 user=u password='p w' dbname=app sslmode=disable",
        )
        .expect("parse");
        assert_eq!(
            (c.host.as_str(), c.port, c.dbname.as_str()),
            ("db.example", 6432, "app")
        );
        assert_eq!(c.password.as_ref().map(|p| p.expose()), Some("p w"));
        assert_eq!(c.sslmode, SslMode::Disable);
    }

    #[test]
    fn bad_sslmode_and_unknown_parameters_are_refused() {
        let e = ConnInfo::parse("postgresql://u:pw@h/db?sslmode=verify_full").expect_err("bad");
        assert!(e.0.contains("verify-full"), "{e}");
        assert!(ConnInfo::parse("postgresql://u@h/db?sslmod=require").is_err());
        assert!(ConnInfo::parse("not a url").is_err());
        assert!(ConnInfo::parse("postgresql://u@h:99999/db").is_err());
    }
}
