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
