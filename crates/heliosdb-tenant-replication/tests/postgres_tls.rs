//! `sslmode` against a PostgreSQL that serves TLS with test certificates:
//! verify-full checks the CA and the host name, verify-ca only the CA, and a
//! failure says which of the two was wrong.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_needs_the_right_ca_and_host_name_and_says_which_is_wrong() {
    let mut env = Env::new(SCHEMA).await;
    let dir = env.dir.path().to_path_buf();
    let ca = pki::ca(&dir, "db-ca");
    // The certificate names "localhost" only, not 127.0.0.1.
    let server = pki::leaf(&dir, &ca, "db-server", &["DNS:localhost"]);
    env.source
        .enable_ssl(&server.cert, &server.key)
        .expect("ssl on");
    let other_ca = pki::ca(&dir, "other-ca");

    let plain = env.source.superuser_url("app");
    let port = env.source.port();
    let with = |host: &str, mode: &str, ca: &std::path::Path| {
        format!(
            "postgresql://postgres@{host}:{port}/app?sslmode={mode}&sslrootcert={}",
            ca.display()
        )
    };
    let config_with =
        |name: &str, url: &str| env.write_config(name, &env.config_text("").replace(&plain, url));

    // Right CA, right name: provisioning and streaming work over TLS.
    let good = config_with("good.toml", &with("localhost", "verify-full", &ca.cert));
    env.init(&good);
    // A backlog first: its reads are paced, the socket leaving the poller
    // between them, under TLS.
    make_backlog(&env.src().await, 1000, 200).await;
    let daemon = env.start_daemon(&good);
    env.src()
        .await
        .batch_execute("INSERT INTO accounts SELECT 'tenant-123', g, 'n', 'e', g, now() FROM generate_series(1, 500) g")
        .await
        .expect("rows");
    wait_tenant_equal(&env, &TABLES, Duration::from_secs(60), &daemon).await;
    let ssl_used: bool = env
        .src()
        .await
        .query_one(
            "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.application_name LIKE 'heliosdb%'",
            &[],
        )
        .await
        .expect("pg_stat_ssl")
        .get::<_, Option<bool>>(0)
        .unwrap_or(false);
    assert!(
        ssl_used,
        "the daemon's source connections are not encrypted"
    );
    drop(daemon);

    // Wrong CA.
    let bad_ca = config_with(
        "bad-ca.toml",
        &with("localhost", "verify-full", &other_ca.cert),
    );
    let out = run(&bad_ca, &["status"]);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("not signed by the CA in sslrootcert"),
        "{}",
        out.stderr
    );
    assert_eq!(out.status.code(), Some(3), "{}", out.stderr);

    // Right CA, a host name the certificate does not list.
    let bad_name = config_with("bad-name.toml", &with("127.0.0.1", "verify-full", &ca.cert));
    let out = run(&bad_name, &["status"]);
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("does not name the host"),
        "{}",
        out.stderr
    );

    // verify-ca checks only the CA: the same host name is fine, a wrong CA is not.
    let ca_only = config_with("ca-only.toml", &with("127.0.0.1", "verify-ca", &ca.cert));
    let out = run(&ca_only, &["status"]);
    assert!(out.status.success(), "{}{}", out.stdout, out.stderr);
    let ca_only_bad = config_with(
        "ca-only-bad.toml",
        &with("127.0.0.1", "verify-ca", &other_ca.cert),
    );
    assert!(!run(&ca_only_bad, &["status"]).status.success());
}
