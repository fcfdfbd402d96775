//! `train-dictionary`: a zstd dictionary from the tenant's own rows.
//!
//! Small batches (low `batch_timeout_ms`, quiet tenants) compress poorly on
//! their own: there is little repetition inside a few rows. A dictionary
//! trained on rows shaped like the tenant's gives zstd that repetition up
//! front. Samples are batch bodies exactly as the capture node builds them
//! (inserts of the tenant's current rows), so the dictionary learns the
//! framing too. The dictionary holds fragments of tenant data: it is
//! written with mode 0600, and both nodes must load the same file
//! (`[compression] dictionary_path`).

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use tokio_postgres::{Client, SimpleQueryMessage};

use super::codec::Encoder;
use crate::capture::catalog::SourceTable;
use crate::capture::pgoutput::Value;
use crate::capture::{RowChange, RowOp, TxEvent};
use crate::error::{on_source, ReplicationError, Result};
use crate::lsn::Lsn;
use crate::pg::{quote_ident, quote_literal};

/// Rows per sample (a small batch).
const ROWS_PER_SAMPLE: usize = 50;

/// What training produced.
#[derive(Debug)]
pub struct Trained {
    pub samples: usize,
    pub sample_bytes: usize,
    pub dictionary_bytes: usize,
}

/// Sample batch bodies: up to `rows_per_table` of the tenant's rows of each
/// table, as insert batches of [`ROWS_PER_SAMPLE`] rows.
pub async fn samples(
    source: &Client,
    tables: &[SourceTable],
    tenant_column: &str,
    tenant: &str,
    rows_per_table: usize,
) -> Result<Vec<Bytes>> {
    let mut out = Vec::new();
    for table in tables.iter().filter(|t| t.has_tenant_column) {
        let columns: Vec<String> = table
            .columns
            .iter()
            .map(|(n, _)| format!("{}::text", quote_ident(n)))
            .collect();
        let sql = format!(
            "SELECT {} FROM {} WHERE {} = {} LIMIT {rows_per_table}",
            columns.join(", "),
            table.own_rows(),
            quote_ident(tenant_column),
            quote_literal(tenant)
        );
        let messages = source
            .simple_query(&sql)
            .await
            .map_err(on_source("reading sample rows"))?;
        let relation = table.relation_desc();
        let mut enc = Encoder::new();
        let mut rows = 0;
        for m in messages {
            let SimpleQueryMessage::Row(row) = m else {
                continue;
            };
            if enc.is_empty() {
                enc.relation(&relation, &[]);
                enc.event(&TxEvent::Begin {
                    final_lsn: Lsn::ZERO,
                    commit_time_us: 0,
                    xid: 0,
                });
            }
            let new = (0..row.len())
                .map(|i| match row.get(i) {
                    Some(v) => Value::Text(Bytes::copy_from_slice(v.as_bytes())),
                    None => Value::Null,
                })
                .collect();
            enc.event(&TxEvent::Row(RowChange {
                relation: Arc::clone(&relation),
                op: RowOp::Insert { new },
            }));
            rows += 1;
            if rows % ROWS_PER_SAMPLE == 0 {
                out.push(enc.finish());
                enc = Encoder::new();
            }
        }
        if !enc.is_empty() {
            out.push(enc.finish());
        }
    }
    Ok(out)
}

/// Train a dictionary of at most `max_bytes` from `samples` and write it to
/// `out` (mode 0600, replacing it atomically).
pub fn train(samples: &[Bytes], max_bytes: usize, out: &Path) -> Result<Trained> {
    if samples.len() < 10 {
        return Err(ReplicationError::operator(
            format!(
                "only {} samples of the tenant's rows: too few to train a dictionary",
                samples.len()
            ),
            "train once the tenant has data (a few hundred rows), or go without a dictionary",
        ));
    }
    let dictionary = zstd::dict::from_samples(samples, max_bytes).map_err(|e| {
        ReplicationError::operator(
            format!("training the dictionary failed: {e}"),
            "give more sample rows (--rows-per-table) or a smaller --size",
        )
    })?;
    let tmp = out.with_extension("tmp");
    crate::files::replace(out, &tmp, &dictionary).map_err(|e| {
        ReplicationError::operator(
            format!("writing {}: {e}", out.display()),
            "choose a writable --out path",
        )
    })?;
    Ok(Trained {
        samples: samples.len(),
        sample_bytes: samples.iter().map(|s| s.len()).sum(),
        dictionary_bytes: dictionary.len(),
    })
}
