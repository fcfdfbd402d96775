use pgcluster::Cluster;

#[tokio::test]
async fn starts_a_logical_cluster_and_stops_it_on_drop() {
    let cluster = Cluster::start().expect("start cluster");
    let client = cluster.connect("postgres").await.expect("connect");
    let row = client
        .query_one("SHOW wal_level", &[])
        .await
        .expect("query");
    let level: String = row.get(0);
    assert_eq!(level, "logical");
    let data = cluster.data_dir().to_path_buf();
    drop(client);
    drop(cluster);
    assert!(!data.exists(), "data directory removed after drop");
}

/// A port taken between picking it and the server binding it (another
/// test, an outgoing connection) does not fail the start: the cluster moves
/// to another free port and says which.
#[tokio::test]
async fn a_port_taken_before_the_server_binds_it_is_replaced() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let cluster = Cluster::start_with(pgcluster::ClusterOptions {
        port: Some(port),
        ..Default::default()
    })
    .expect("start cluster on another port");
    assert_ne!(cluster.port(), port);
    let client = cluster.connect("postgres").await.expect("connect");
    let row = client.query_one("SHOW port", &[]).await.expect("query");
    let shown: String = row.get(0);
    assert_eq!(shown, cluster.port().to_string());
    drop(taken);
}

/// Ports handed out are never handed out again while their holder lives:
/// not within one process (a test's daemon and its monitoring ports) and not
/// to another process (parallel tests), and they are free to bind.
#[test]
fn free_ports_are_distinct_across_callers_and_processes() {
    let claim = || -> Vec<u16> {
        (0..20)
            .map(|_| pgcluster::free_port().expect("free port"))
            .collect()
    };
    if std::env::var_os("PGCLUSTER_PORT_CHILD").is_some() {
        let ports: Vec<String> = claim().iter().map(u16::to_string).collect();
        println!("ports={}", ports.join(","));
        return;
    }
    let mine = claim();
    let distinct: std::collections::BTreeSet<u16> = mine.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        mine.len(),
        "one process got a port twice: {mine:?}"
    );
    for p in &mine {
        std::net::TcpListener::bind(("127.0.0.1", *p)).expect("a handed-out port binds");
    }
    let out = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "free_ports_are_distinct_across_callers_and_processes",
            "--nocapture",
        ])
        .env("PGCLUSTER_PORT_CHILD", "1")
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let theirs: Vec<u16> = stdout
        .lines()
        .find_map(|l| l.strip_prefix("ports="))
        .expect("child printed its ports")
        .split(',')
        .map(|p| p.parse().expect("port"))
        .collect();
    assert_eq!(theirs.len(), 20);
    assert!(
        theirs.iter().all(|p| !distinct.contains(p)),
        "another process got a port this one holds: {mine:?} / {theirs:?}"
    );
}
