//! Tables without a key (`REPLICA IDENTITY FULL`, no unique index): each
//! change applied on its own, as PostgreSQL's apply worker does.

use super::chunk::text;
use super::*;

impl Applier {
    /// A change of a table without a key (`REPLICA IDENTITY FULL`, no
    /// unique index on the target), applied as PostgreSQL's apply worker
    /// does: an insert, or the update or delete of one row equal to the old
    /// image. None found stops the tenant (PostgreSQL logs it and goes on).
    pub(super) async fn apply_keyless(&mut self, m: &TableMapping, op: &RowOp) -> Result<()> {
        let (sql, params, what) = match op {
            RowOp::Insert { new } => {
                let values: Vec<Option<&str>> = new.iter().map(text).collect::<Result<_>>()?;
                (sql::insert_row(m), values, "insert")
            }
            RowOp::Update { old: Some(old), new } => {
                let set: Vec<usize> = (0..new.len())
                    .filter(|&i| !matches!(new[i], Value::UnchangedToast))
                    .collect();
                let mut values: Vec<Option<&str>> =
                    set.iter().map(|&i| text(&new[i])).collect::<Result<_>>()?;
                let (image, old_values) = old_image(old)?;
                values.extend(old_values);
                (sql::update_like(m, &set, &image), values, "update")
            }
            RowOp::Update { old: None, .. } => {
                return Err(ReplicationError::operator(
                    format!("an update of {} arrived without the old row, and the table has no key to find it by", m.display),
                    format!("ALTER TABLE {} REPLICA IDENTITY FULL on the source (or give it a primary key)", m.display),
                ))
            }
            RowOp::Delete { old } => {
                let (image, values) = old_image(old)?;
                (sql::delete_like(m, &image), values, "delete")
            }
        };
        let stmt = self.prepared(sql).await?;
        let params: Vec<&(dyn ToSql + Sync)> =
            params.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        let n = self
            .client
            .execute(&stmt, &params)
            .await
            .map_err(target_err(&format!("applying changes to {}", m.display)))?;
        if n == 0 && what != "insert" {
            // PostgreSQL's apply worker logs this and goes on. The target
            // already differs from the source here, and with no key there is
            // no row version to resolve it by: stop rather than go on wrong.
            return Err(ReplicationError::operator(
                format!(
                    "an {what} of {} found no row equal to the source's old row on the target (the table has no key): the target's rows of it differ from the source's",
                    m.display
                ),
                format!(
                    "copy the table again: give it a primary key and run resync --table {}, or drop the slot and run init --resync",
                    m.display
                ),
            ));
        }
        Ok(())
    }
}

/// An old row image to find a row of a table without a key by: per column,
/// compared to a value (`Some(true)`), NULL (`Some(false)`), or not sent
/// (`None`); and the values compared, in column order.
pub(super) type OldImage<'a> = (Vec<Option<bool>>, Vec<Option<&'a str>>);

pub(super) fn old_image(t: &Tuple) -> Result<OldImage<'_>> {
    let mut image = Vec::with_capacity(t.len());
    let mut values = Vec::new();
    for v in t {
        match v {
            Value::UnchangedToast => image.push(None),
            other => {
                let text = text(other)?;
                image.push(Some(text.is_some()));
                values.extend(text.map(Some));
            }
        }
    }
    Ok((image, values))
}
