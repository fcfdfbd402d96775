//! A real Prometheus (Debian's package) scraping a daemon, with the shipped
//! alert rules.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use super::http_get;

/// Prometheus from Debian's package, on a loopback port, killed on drop.
pub struct Prometheus {
    child: Child,
    port: u16,
}

impl Prometheus {
    /// Scrape `metrics_port` with the shipped rules, each `(shipped, short)`
    /// replaced (a threshold and `for:` made short for a test).
    pub fn start(dir: &Path, metrics_port: u16, shorter: &[(&str, &str)]) -> Prometheus {
        let mut rules = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../deploy/prometheus/rules/replication-alerts.yml"),
        )
        .expect("shipped rules");
        for (shipped, short) in shorter {
            assert!(
                rules.contains(shipped),
                "the shipped rule changed shape: {shipped}"
            );
            rules = rules.replace(shipped, short);
        }
        let rules = rules.replace("interval: 30s", "interval: 1s");
        std::fs::create_dir_all(dir.join("rules")).expect("mkdir");
        std::fs::write(dir.join("rules/replication-alerts.yml"), rules).expect("rules");
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - 'rules/*.yml'\n\
                 scrape_configs:\n  - job_name: 'heliosdb-replication'\n    static_configs:\n      - targets: ['127.0.0.1:{metrics_port}']\n"
            ),
        )
        .expect("config");
        let port = pgcluster::free_port().expect("port");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log");
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus not found: install Debian's prometheus package");
        Prometheus { child, port }
    }

    pub async fn get(&self, path: &str) -> serde_json::Value {
        match http_get(self.port, path).await {
            Some((200, body)) => serde_json::from_str(&body).unwrap_or_default(),
            _ => serde_json::Value::Null,
        }
    }

    /// Series of an instant query (only `[a-z_]` in the query: no escaping needed).
    pub async fn query(&self, q: &str) -> Vec<serde_json::Value> {
        self.get(&format!("/api/v1/query?query={q}")).await["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub async fn alert_state(&self, name: &str) -> Option<String> {
        self.get("/api/v1/alerts").await["data"]["alerts"]
            .as_array()?
            .iter()
            .find(|a| a["labels"]["alertname"] == name)
            .and_then(|a| a["state"].as_str().map(str::to_string))
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
