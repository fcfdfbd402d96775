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
