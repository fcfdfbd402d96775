//! Our replication connection against a real server: SCRAM-SHA-256, a
//! wrong password (named, not shown), a Unix-domain socket, a missing slot.

use std::time::Duration;

use heliosdb_tenant_replication::capture::walsender::{Session, StreamSettings};
use heliosdb_tenant_replication::config::ConnInfo;
use heliosdb_tenant_replication::error::ErrorClass;
use heliosdb_tenant_replication::lsn::Lsn;
use pgcluster::Cluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_a_wrong_password_a_unix_socket_and_a_missing_slot() {
    let cluster = Cluster::start().expect("cluster");
    let su = cluster.connect("postgres").await.expect("connect");
    su.batch_execute("CREATE ROLE repl LOGIN REPLICATION PASSWORD 's3cret-pw'")
        .await
        .expect("role");
    let url = |password: &str| {
        ConnInfo::parse(&format!(
            "postgresql://repl:{password}@127.0.0.1:{}/postgres",
            cluster.port()
        ))
        .expect("conninfo")
    };

    // pg_hba.conf asks this role for scram-sha-256 (the server answers
    // the TLS request with 'N': sslmode=prefer goes on in plain text).
    let mut session = Session::connect(&url("s3cret-pw"), "test")
        .await
        .expect("SCRAM authentication");
    let rows = session
        .simple_query("IDENTIFY_SYSTEM")
        .await
        .expect("IDENTIFY_SYSTEM");
    let expected: String = su
        .query_one(
            "SELECT system_identifier::text FROM pg_control_system()",
            &[],
        )
        .await
        .expect("system id")
        .get(0);
    assert_eq!(rows[0][0].as_deref(), Some(expected.as_str()));

    // A slot that does not exist: the server's error, classified.
    let settings = StreamSettings {
        ack: Lsn::ZERO,
        buffer: 16,
        status_interval: Duration::from_secs(1),
    };
    let Err(e) = session
        .start_replication(
            "no_such_slot",
            Lsn::ZERO,
            "proto_version '2', publication_names '\"p\"'",
            settings,
        )
        .await
    else {
        panic!("START_REPLICATION of a missing slot succeeded")
    };
    assert_eq!(e.code(), Some("42704"), "{e}");
    assert_eq!(e.class(), ErrorClass::OperatorAction);

    let Err(e) = Session::connect(&url("wrong-pw"), "test").await else {
        panic!("a wrong password was accepted")
    };
    let text = e.to_string();
    assert!(text.contains("password authentication failed"), "{text}");
    assert!(!text.contains("wrong-pw"), "the password leaked: {text}");
    assert_eq!(e.class(), ErrorClass::OperatorAction);

    // A socket directory as host, as libpq takes it.
    let hba = cluster.data_dir().join("pg_hba.conf");
    let mut rules = std::fs::read_to_string(&hba).expect("pg_hba.conf");
    rules.insert_str(0, "local replication all trust\n");
    std::fs::write(&hba, rules).expect("pg_hba.conf");
    su.batch_execute("SELECT pg_reload_conf()")
        .await
        .expect("reload");
    let dir = cluster.data_dir().parent().expect("socket directory");
    let socket = ConnInfo::parse(&format!(
        "host={} port={} user=repl dbname=postgres",
        dir.display(),
        cluster.port()
    ))
    .expect("conninfo");
    let rows = Session::connect(&socket, "test")
        .await
        .expect("Unix socket")
        .simple_query("IDENTIFY_SYSTEM")
        .await
        .expect("IDENTIFY_SYSTEM");
    assert_eq!(rows[0][0].as_deref(), Some(expected.as_str()));
}
