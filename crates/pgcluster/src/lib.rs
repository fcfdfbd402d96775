//! Throw-away PostgreSQL clusters started from the machine's own binaries.
//!
//! Every test that touches PostgreSQL gets real servers from here: a fresh
//! cluster in a temp directory, listening on a free loopback port, with
//! `wal_level = logical`. Nothing depends on a server that was already running.
//!
//! * Binaries come from `pg_config --bindir`, else the newest
//!   `/usr/lib/postgresql/*/bin`, or `PGCLUSTER_BINDIR` when set.
//! * PostgreSQL refuses to run as root, so when this process is root the
//!   server runs as the `postgres` OS user through `runuser` (there is no sudo
//!   on CI machines).
//! * `initdb` runs once per machine into a template directory; each cluster is
//!   a copy of it, which takes a fraction of a second.
//! * A cluster is stopped when its [`Cluster`] is dropped, also when a test
//!   panics. Data directories live under `$TMPDIR/heliosdb-pgtest-*` so that a
//!   CI script can stop leftovers with `pg_ctl -D` after a hard kill.
//!
//! Authentication: the `postgres` superuser connects with `trust` over
//! loopback; every other role needs its password (`scram-sha-256`), so tests of
//! credentials and privileges are real.

pub mod pki;

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What can go wrong while starting or stopping a cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("no PostgreSQL server binaries found: install PostgreSQL (Debian: apt-get install postgresql) or set PGCLUSTER_BINDIR to the directory holding initdb and pg_ctl")]
    NoBinaries,
    #[error("running as root but there is no 'postgres' OS user to run the server as: create one (useradd -r postgres) or run as a normal user")]
    NoPostgresUser,
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("i/o error at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, ClusterError>;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ClusterError + '_ {
    move |source| ClusterError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Settings of a cluster to start.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// `postgresql.conf` lines added after the defaults (later lines win).
    pub settings: Vec<(String, String)>,
    /// Turn durability off (`fsync`, `synchronous_commit`): right for tests,
    /// wrong for benchmarks that compare against PostgreSQL's own replication.
    pub fast_unsafe: bool,
    /// The port to try first (default: a free one). If the server cannot
    /// bind it, the cluster starts on another free port: read
    /// [`Cluster::port`].
    pub port: Option<u16>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            settings: Vec::new(),
            fast_unsafe: true,
            port: None,
        }
    }
}

impl ClusterOptions {
    /// Add one `postgresql.conf` setting.
    pub fn set(mut self, name: &str, value: &str) -> Self {
        self.settings.push((name.to_string(), value.to_string()));
        self
    }
}

/// A running throw-away cluster. Dropping it stops the server and removes its
/// files.
#[derive(Debug)]
pub struct Cluster {
    root: PathBuf,
    data: PathBuf,
    port: u16,
    bindir: PathBuf,
    run_as: Option<OsUser>,
    running: bool,
    /// Leave the server running and its files in place when dropped.
    kept: bool,
}

#[derive(Debug, Clone, Copy)]
struct OsUser {
    uid: u32,
    gid: u32,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Cluster {
    /// Start a cluster with the default options.
    pub fn start() -> Result<Self> {
        Self::start_with(ClusterOptions::default())
    }

    /// Start a cluster with `options`.
    pub fn start_with(options: ClusterOptions) -> Result<Self> {
        let bindir = bindir().ok_or(ClusterError::NoBinaries)?;
        let run_as = if running_as_root() {
            Some(postgres_user().ok_or(ClusterError::NoPostgresUser)?)
        } else {
            None
        };
        let template = ensure_template(&bindir, run_as)?;

        let root = std::env::temp_dir().join(format!(
            "heliosdb-pgtest-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        if root.exists() {
            fs::remove_dir_all(&root).map_err(io_err(&root))?;
        }
        fs::create_dir_all(&root).map_err(io_err(&root))?;
        let data = root.join("data");
        copy_tree(&template, &data)?;
        if let Some(user) = run_as {
            std::os::unix::fs::chown(&root, Some(user.uid), Some(user.gid))
                .map_err(io_err(&root))?;
        }

        let port = match options.port {
            Some(p) => p,
            None => free_port()?,
        };
        let mut conf = String::from("\n# pgcluster\n");
        let mut lines: Vec<(String, String)> = vec![
            ("port".into(), port.to_string()),
            ("listen_addresses".into(), "'127.0.0.1'".into()),
            (
                "unix_socket_directories".into(),
                format!("'{}'", root.display()),
            ),
            ("wal_level".into(), "logical".into()),
            // Commit times of local writes (conflict resolution by time).
            ("track_commit_timestamp".into(), "on".into()),
            ("max_wal_senders".into(), "20".into()),
            ("max_replication_slots".into(), "20".into()),
            ("max_connections".into(), "60".into()),
            ("shared_buffers".into(), "128MB".into()),
            ("logging_collector".into(), "off".into()),
        ];
        if options.fast_unsafe {
            lines.push(("fsync".into(), "off".into()));
            lines.push(("synchronous_commit".into(), "off".into()));
            lines.push(("full_page_writes".into(), "off".into()));
        }
        lines.extend(options.settings);
        for (k, v) in lines {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        let conf_path = data.join("postgresql.conf");
        fs::OpenOptions::new()
            .append(true)
            .open(&conf_path)
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .map_err(io_err(&conf_path))?;

        let mut cluster = Cluster {
            root,
            data,
            port,
            bindir,
            run_as,
            running: false,
            kept: false,
        };
        // The port was free when picked; another process (a parallel test,
        // an outgoing connection) can take it before the server binds it.
        // Then pick another one.
        let mut attempts = 1;
        loop {
            match cluster.start_server() {
                Err(ClusterError::Command { detail, .. })
                    if attempts < 5 && detail.contains("could not bind") =>
                {
                    attempts += 1;
                    cluster.port = free_port()?;
                    fs::OpenOptions::new()
                        .append(true)
                        .open(&conf_path)
                        .and_then(|mut f| writeln!(f, "port = {}", cluster.port))
                        .map_err(io_err(&conf_path))?;
                    // This attempt's log only (the file belongs to the
                    // server's user: truncate it, do not recreate it).
                    let log = cluster.root.join("server.log");
                    fs::OpenOptions::new()
                        .write(true)
                        .truncate(true)
                        .open(&log)
                        .map_err(io_err(&log))?;
                }
                other => return other.map(|()| cluster),
            }
        }
    }

    /// The loopback port the server listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }

    /// The directory holding PostgreSQL's binaries.
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// The server log so far (for failure messages).
    pub fn log(&self) -> String {
        fs::read_to_string(self.root.join("server.log")).unwrap_or_default()
    }

    /// A `postgresql://` URL for `user` (with `password`, if any) and `db`.
    pub fn url(&self, user: &str, password: Option<&str>, db: &str) -> String {
        match password {
            Some(p) => format!(
                "postgresql://{user}:{p}@127.0.0.1:{}/{db}?sslmode=disable",
                self.port
            ),
            None => format!(
                "postgresql://{user}@127.0.0.1:{}/{db}?sslmode=disable",
                self.port
            ),
        }
    }

    /// A URL for the `postgres` superuser (trust authentication).
    pub fn superuser_url(&self, db: &str) -> String {
        self.url("postgres", None, db)
    }

    /// A normal connection as the superuser to `db`.
    pub async fn connect(
        &self,
        db: &str,
    ) -> std::result::Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) = tokio_postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user("postgres")
            .dbname(db)
            .connect(tokio_postgres::NoTls)
            .await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// Create database `name`.
    pub async fn create_database(
        &self,
        name: &str,
    ) -> std::result::Result<(), tokio_postgres::Error> {
        let c = self.connect("postgres").await?;
        c.batch_execute(&format!(
            "CREATE DATABASE \"{}\"",
            name.replace('"', "\"\"")
        ))
        .await
    }

    /// Stop the server (fast shutdown), keeping its files.
    pub fn stop(&mut self) -> Result<()> {
        if !self.running {
            return Ok(());
        }
        self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", "60"], "pg_ctl stop")?;
        self.running = false;
        Ok(())
    }

    /// Crash the server (immediate shutdown: no checkpoint, WAL buffers not
    /// yet written are lost, as when its host fails), keeping its files.
    pub fn crash(&mut self) -> Result<()> {
        if !self.running {
            return Ok(());
        }
        self.pg_ctl(
            &["stop", "-m", "immediate", "-w", "-t", "60"],
            "pg_ctl stop -m immediate",
        )?;
        self.running = false;
        Ok(())
    }

    /// Start the server again after [`stop`](Self::stop), on the same port.
    pub fn start_again(&mut self) -> Result<()> {
        if self.running {
            return Ok(());
        }
        self.start_server()
    }

    /// Keep the server running and its files after this value is dropped
    /// (stop it later with `pg_ctl -D <data_dir> stop`, as its OS user).
    pub fn keep(&mut self) {
        self.kept = true;
    }

    /// Whether the server runs as another OS user (`postgres`, when we are root).
    pub fn runs_as_postgres(&self) -> bool {
        self.run_as.is_some()
    }

    /// Serve TLS with `cert` and `key` (PEM): both are copied into the data
    /// directory (owned by the server's user, key mode 0600) and the server
    /// restarts with `ssl = on`.
    pub fn enable_ssl(&mut self, cert: &Path, key: &Path) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        for (from, name, mode) in [(cert, "server.crt", 0o644), (key, "server.key", 0o600)] {
            let to = self.data.join(name);
            fs::copy(from, &to).map_err(io_err(&to))?;
            fs::set_permissions(&to, fs::Permissions::from_mode(mode)).map_err(io_err(&to))?;
            if let Some(user) = self.run_as {
                std::os::unix::fs::chown(&to, Some(user.uid), Some(user.gid))
                    .map_err(io_err(&to))?;
            }
        }
        self.reconfigure(&[
            ("ssl", "on"),
            ("ssl_cert_file", "'server.crt'"),
            ("ssl_key_file", "'server.key'"),
        ])
    }

    /// Change settings and restart the server.
    pub fn reconfigure(&mut self, settings: &[(&str, &str)]) -> Result<()> {
        let conf_path = self.data.join("postgresql.conf");
        let mut add = String::new();
        for (k, v) in settings {
            add.push_str(&format!("{k} = {v}\n"));
        }
        fs::OpenOptions::new()
            .append(true)
            .open(&conf_path)
            .and_then(|mut f| f.write_all(add.as_bytes()))
            .map_err(io_err(&conf_path))?;
        self.stop()?;
        self.start_server()
    }

    fn start_server(&mut self) -> Result<()> {
        let log = self.root.join("server.log");
        let log_s = log.display().to_string();
        let result = self.pg_ctl(&["start", "-w", "-t", "60", "-l", &log_s], "pg_ctl start");
        if let Err(e) = result {
            return Err(ClusterError::Command {
                what: "pg_ctl start".into(),
                detail: format!("{e}\nserver log:\n{}", self.log()),
            });
        }
        self.running = true;
        Ok(())
    }

    fn pg_ctl(&self, args: &[&str], what: &str) -> Result<()> {
        let data = self.data.display().to_string();
        let mut all = vec!["-D", data.as_str()];
        all.extend_from_slice(args);
        run_pg(&self.bindir.join("pg_ctl"), &all, self.run_as, what)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        if self.running {
            let _ = self.pg_ctl(
                &["stop", "-m", "immediate", "-w", "-t", "30"],
                "pg_ctl stop",
            );
            self.running = false;
        }
        let _ = fs::remove_dir_all(&self.root);
    }
}

/// The directory with `initdb` and `pg_ctl`.
pub fn bindir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("PGCLUSTER_BINDIR") {
        let p = PathBuf::from(dir);
        return p.join("pg_ctl").exists().then_some(p);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if p.join("pg_ctl").exists() && p.join("initdb").exists() {
                return Some(p);
            }
        }
    }
    let mut found: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p)
}

fn running_as_root() -> bool {
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn postgres_user() -> Option<OsUser> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        (f.len() > 3 && f[0] == "postgres").then(|| OsUser {
            uid: f[2].parse().unwrap_or(0),
            gid: f[3].parse().unwrap_or(0),
        })
    })
}

fn run_pg(program: &Path, args: &[&str], run_as: Option<OsUser>, what: &str) -> Result<()> {
    let mut cmd = if run_as.is_some() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    };
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Run from a directory the postgres user can enter.
        .current_dir("/");
    let out = cmd.output().map_err(|e| ClusterError::Command {
        what: what.into(),
        detail: e.to_string(),
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ClusterError::Command {
            what: what.into(),
            detail: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        })
    }
}

/// An initdb'd data directory shared by every cluster of this machine and
/// PostgreSQL version; made once, atomically (build elsewhere, then rename).
fn ensure_template(bindir: &Path, run_as: Option<OsUser>) -> Result<PathBuf> {
    let tag = bindir.display().to_string().replace('/', "_");
    let uid = fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(0);
    let template = std::env::temp_dir().join(format!("heliosdb-pgtemplate-v2-{uid}{tag}"));
    if template.join("PG_VERSION").exists() {
        return Ok(template);
    }
    let building = std::env::temp_dir().join(format!(
        "heliosdb-pgtemplate-build-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    ));
    fs::create_dir_all(&building).map_err(io_err(&building))?;
    if let Some(user) = run_as {
        std::os::unix::fs::chown(&building, Some(user.uid), Some(user.gid))
            .map_err(io_err(&building))?;
    }
    let data = building.join("data");
    let data_s = data.display().to_string();
    run_pg(
        &bindir.join("initdb"),
        &[
            "-D",
            &data_s,
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ],
        run_as,
        "initdb",
    )?;
    let hba = data.join("pg_hba.conf");
    fs::write(
        &hba,
        "local all all trust\n\
         host all postgres 127.0.0.1/32 trust\n\
         host replication postgres 127.0.0.1/32 trust\n\
         host all all 127.0.0.1/32 scram-sha-256\n\
         host replication all 127.0.0.1/32 scram-sha-256\n",
    )
    .map_err(io_err(&hba))?;
    match fs::rename(&data, &template) {
        Ok(()) => {}
        Err(_) if template.join("PG_VERSION").exists() => {}
        Err(e) => return Err(io_err(&template)(e)),
    }
    let _ = fs::remove_dir_all(&building);
    Ok(template)
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let out = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .output()
        .map_err(io_err(to))?;
    if !out.status.success() {
        return Err(ClusterError::Command {
            what: "cp -a template".into(),
            detail: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(())
}

/// A loopback port that is free now and that no other caller of this
/// function, in this process or another, is handed while this process lives.
///
/// Picking a port by binding port 0 and closing it is racy twice over: the
/// kernel hands the same port to the next `bind(0)` of a parallel test, and
/// to outgoing connections. So ports come from below the kernel's ephemeral
/// range (`net.ipv4.ip_local_port_range`), which neither uses, and each is
/// claimed by a lock on a file under `$TMPDIR/heliosdb-ports/` held until the
/// process exits (the kernel drops the lock then, also after a kill).
pub fn free_port() -> Result<u16> {
    static CLAIMS: Mutex<Vec<fs::File>> = Mutex::new(Vec::new());
    let (low, high) = claimable_ports();
    let dir = std::env::temp_dir().join("heliosdb-ports");
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    // Anyone may claim: the directory is shared by root and other users.
    let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o1777));
    let span = u32::from(high - low);
    let seed = std::process::id()
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
    let mut claims = CLAIMS.lock().unwrap_or_else(|e| e.into_inner());
    for i in 0..span {
        let port = low + ((seed.wrapping_add(i)) % span) as u16;
        let path = dir.join(port.to_string());
        // Read access is enough for a lock, so files another user made serve.
        let Ok(file) = fs::File::open(&path).or_else(|_| {
            fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o644)
                .open(&path)
        }) else {
            continue;
        };
        if file.try_lock().is_err() {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            claims.push(file);
            return Ok(port);
        }
    }
    Err(ClusterError::Command {
        what: "finding a free loopback port".into(),
        detail: format!("every port from {low} to {high} is claimed or bound"),
    })
}

/// The ports below the kernel's ephemeral range that `free_port` hands out.
fn claimable_ports() -> (u16, u16) {
    let ephemeral_low = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let high = ephemeral_low.max(12_000);
    (high - 10_000, high)
}

/// Poll `check` until it returns `Some`, or fail after `timeout`.
pub fn wait_for<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
