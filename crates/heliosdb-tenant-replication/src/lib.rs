//! heliosdb-tenant-replication: replicate one tenant of a multi-tenant
//! PostgreSQL database to another PostgreSQL, continuously and exactly once.
//!
//! The modules follow the data flow:
//!
//! ```text
//! config ─► provision (init, start-up checks) ─► snapshot (initial copy)
//!
//! source slot ─► capture ─► apply (chunks of apply::batch) ─► target
//!                  ▲                    │
//!                  └── checkpoint ◄─────┘  (progress committed with the data;
//!                                           slot acknowledged after commit)
//!
//! split deployment (capture node ─► apply node, another region):
//! capture ─► transport::codec ─► seal ─► transport (HTTPS, TLS 1.3, mTLS) ─► open ─► apply
//! ```
//!
//! `pipeline` wires the stages for one tenant; the binary (`main.rs`, `cli`)
//! only parses arguments and starts pipelines. Dependencies between these
//! modules go one way (no cycle; `tests/module_layers.rs` checks it), with
//! shared vocabulary at the bottom: `lsn`, `clock`, `shutdown`, `error`,
//! `files`. See `docs/architecture.md`.

pub mod apply;
pub mod capture;
pub mod checkpoint;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod error;
pub mod files;
pub mod load;
pub mod lsn;
pub mod pg;
pub mod pipeline;
pub mod provision;
pub mod seal;
pub mod shutdown;
pub mod snapshot;
pub mod telemetry;
pub mod transport;
