//! The lanes of streamed transactions, opened on connections made from the
//! configuration (the apply stage gets an opener, never the `Config`).

use std::collections::HashMap;
use std::sync::Arc;

use crate::apply::schema::SourceCatalog;
use crate::apply::streams::OpenLane;
use crate::apply::{Applier, ApplyIdentity};
use crate::config::Config;
use crate::error::Side;
use crate::pg;

/// Where a lane's applier reads source table definitions from.
#[derive(Debug, Clone, Copy)]
pub enum LaneCatalog {
    /// A source connection of its own (capture and apply in one process).
    Source,
    /// What the capture node shipped (an apply node; see [`crate::apply::streams::Streams::ship`]).
    Shipped,
}

/// Lanes on connections made from `config`: a target connection each, and a
/// source connection with [`LaneCatalog::Source`].
pub fn lane_opener(config: Arc<Config>, identity: ApplyIdentity, catalog: LaneCatalog) -> OpenLane {
    Box::new(move |lane| {
        let config = config.clone();
        let identity = ApplyIdentity {
            lane: Some(lane),
            ..identity.clone()
        };
        Box::pin(async move {
            let t = &config.tenant;
            let app = format!("heliosdb-tenant-replication/{} stream", identity.tenant);
            let target = pg::connect(t.target()?, &config.network, Side::Target, &app).await?;
            let source = match catalog {
                LaneCatalog::Source => SourceCatalog::Live(
                    pg::connect(t.source()?, &config.network, Side::Source, &app).await?,
                ),
                LaneCatalog::Shipped => SourceCatalog::Shipped(HashMap::new()),
            };
            Applier::new(
                target,
                source,
                t.schema_changes,
                identity,
                config.batch.batch_size,
            )
            .await
        })
    })
}
