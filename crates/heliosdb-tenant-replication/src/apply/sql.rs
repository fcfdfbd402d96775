//! Statement text for applying rows. Identifiers are quoted; values are
//! always bound as `text[]` parameters (PostgreSQL's own text form) and cast
//! to the target column's type by the server, so numeric, timestamptz,
//! jsonb, bytea, arrays, uuid and enums keep full fidelity.
//!
//! Many rows go in one statement: `unnest($1::text[], $2::text[], …)`.

use super::catalog::TableMapping;
use crate::pg::quote_ident;

/// `$first::text[], …`: `n` array parameters.
pub(super) fn text_arrays(first: usize, n: usize) -> String {
    (first..first + n)
        .map(|i| format!("${i}::text[]"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `k0, k1, …`: the names of `n` key columns in an unnest alias list.
pub(super) fn key_aliases(n: usize) -> String {
    (0..n)
        .map(|k| format!("k{k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn unnest(n: usize, names: impl Fn(usize) -> String) -> String {
    let aliases: Vec<String> = (0..n).map(names).collect();
    format!("unnest({}) AS v({})", text_arrays(1, n), aliases.join(", "))
}

/// `INSERT INTO t AS x (cols) SELECT … FROM unnest(…) ON CONFLICT (key)`:
/// full rows, one array parameter per source column.
fn insert_rows(m: &TableMapping) -> String {
    let n = m.casts.len();
    let cols: Vec<String> = (0..n).map(|i| quote_ident(m.column_name(i))).collect();
    let select: Vec<String> = (0..n).map(|i| format!("v.c{i}::{}", m.casts[i])).collect();
    format!(
        "INSERT INTO {} AS x ({}) SELECT {} FROM {} ON CONFLICT ({})",
        m.target,
        cols.join(", "),
        select.join(", "),
        unnest(n, |i| format!("c{i}")),
        key_columns(m).join(", "),
    )
}

fn key_columns(m: &TableMapping) -> Vec<String> {
    m.key
        .iter()
        .map(|&i| quote_ident(m.column_name(i)))
        .collect()
}

/// Insert full rows, or overwrite the row with the same primary key.
/// Parameters: one array per source column.
pub fn upsert(m: &TableMapping) -> String {
    let updates: Vec<String> = (0..m.casts.len())
        .filter(|i| !m.key.contains(i))
        .map(|i| format!("{c} = EXCLUDED.{c}", c = quote_ident(m.column_name(i))))
        .collect();
    if updates.is_empty() {
        format!("{} DO NOTHING", insert_rows(m))
    } else {
        format!("{} DO UPDATE SET {}", insert_rows(m), updates.join(", "))
    }
}

/// `alias.<key column> = values.k0::<type> AND …`
pub(super) fn key_match(m: &TableMapping, alias: &str, values: &str) -> String {
    m.key
        .iter()
        .enumerate()
        .map(|(k, &i)| {
            format!(
                "{alias}.{} = {values}.k{k}::{}",
                quote_ident(m.column_name(i)),
                m.casts[i]
            )
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// Insert full rows whose key is absent; returns the keys (as text) of the
/// rows it inserted. Parameters: one array per source column.
pub fn insert_new(m: &TableMapping) -> String {
    format!("{} DO NOTHING{}", insert_rows(m), returning_keys(m))
}

/// `RETURNING x.<key>::text, …`: the keys (as text) of the rows a statement
/// touched, for the optimistic apply's presence check.
pub fn returning_keys(m: &TableMapping) -> String {
    let keys: Vec<String> = key_columns(m)
        .iter()
        .map(|k| format!("x.{k}::text"))
        .collect();
    format!(" RETURNING {}", keys.join(", "))
}

/// Delete by primary key. Parameters: one array per key column.
pub fn delete(m: &TableMapping) -> String {
    format!(
        "DELETE FROM {} AS x USING {} WHERE {}",
        m.own_rows,
        unnest(m.key.len(), |k| format!("k{k}")),
        key_match(m, "x", "v"),
    )
}

/// Update only the columns in `set` (source column indices), by primary key.
/// Parameters: key arrays, then one array per column of `set`.
pub fn update_columns(m: &TableMapping, set: &[usize]) -> String {
    let nk = m.key.len();
    let assignments: Vec<String> = set
        .iter()
        .enumerate()
        .map(|(j, &i)| format!("{} = v.c{j}::{}", quote_ident(m.column_name(i)), m.casts[i]))
        .collect();
    format!(
        "UPDATE {} AS x SET {} FROM {} WHERE {}",
        m.own_rows,
        assignments.join(", "),
        unnest(nk + set.len(), |p| if p < nk {
            format!("k{p}")
        } else {
            format!("c{}", p - nk)
        }),
        key_match(m, "x", "v"),
    )
}

/// `"col" = $n::text::<type>, …` for `cols` (source column indices), the
/// parameters numbered from `first`.
fn equals_params(m: &TableMapping, cols: &[usize], first: usize) -> Vec<String> {
    cols.iter()
        .enumerate()
        .map(|(j, &i)| {
            format!(
                "{} = ${}::text::{}",
                quote_ident(m.column_name(i)),
                first + j,
                m.casts[i]
            )
        })
        .collect()
}

/// One row whose primary key changed: update it in place by its old key.
/// Parameters: old key values, then the values of `set`.
pub fn move_row(m: &TableMapping, set: &[usize]) -> String {
    format!(
        "UPDATE {} SET {} WHERE {}",
        m.own_rows,
        equals_params(m, set, m.key.len() + 1).join(", "),
        equals_params(m, &m.key, 1).join(" AND ")
    )
}

/// One full row into a table without a key (`REPLICA IDENTITY FULL`, no
/// unique index): a plain INSERT. Parameters: one text value per column.
pub fn insert_row(m: &TableMapping) -> String {
    let cols: Vec<String> = (0..m.casts.len())
        .map(|i| quote_ident(m.column_name(i)))
        .collect();
    let values: Vec<String> = (0..m.casts.len())
        .map(|i| format!("${}::text::{}", i + 1, m.casts[i]))
        .collect();
    format!(
        "INSERT INTO {} ({}) VALUES ({})",
        m.target,
        cols.join(", "),
        values.join(", ")
    )
}

/// `(tableoid, ctid) = (…)`: one row of a table without a key whose columns
/// equal the old image, as PostgreSQL's apply finds it (any one of equal
/// rows). `image[i]`: column `i` is compared to parameter `$n` (Some) or
/// must be NULL (None); parameters start at `first`. Values are compared as
/// the target renders them (parsed into the column's type, printed back), so
/// types without an equality operator (json, point) compare too.
fn one_row_like(m: &TableMapping, image: &[Option<bool>], first: usize) -> String {
    let mut n = first;
    let cond: Vec<String> = image
        .iter()
        .enumerate()
        .filter_map(|(i, v)| {
            let col = quote_ident(m.column_name(i));
            match v {
                None => None,
                Some(false) => Some(format!("x.{col} IS NULL")),
                Some(true) => {
                    let c = format!("x.{col}::text = (${n}::text::{})::text", m.casts[i]);
                    n += 1;
                    Some(c)
                }
            }
        })
        .collect();
    format!(
        "(tableoid, ctid) = (SELECT x.tableoid, x.ctid FROM {} x WHERE {} LIMIT 1)",
        m.own_rows,
        if cond.is_empty() {
            "true".to_string()
        } else {
            cond.join(" AND ")
        }
    )
}

/// Update one row like `image` (see [`one_row_like`]) in a table without a
/// key. Parameters: the values of `set`, then the image's non-null values.
pub fn update_like(m: &TableMapping, set: &[usize], image: &[Option<bool>]) -> String {
    format!(
        "UPDATE {} SET {} WHERE {}",
        m.own_rows,
        equals_params(m, set, 1).join(", "),
        one_row_like(m, image, set.len() + 1)
    )
}

/// Delete one row like `image` from a table without a key. Parameters: the
/// image's non-null values.
pub fn delete_like(m: &TableMapping, image: &[Option<bool>]) -> String {
    format!(
        "DELETE FROM {} WHERE {}",
        m.own_rows,
        one_row_like(m, image, 1)
    )
}

/// A TRUNCATE of the source, scoped to the tenant on the target (the
/// target table may hold other tenants' rows). Parameter: the tenant id.
pub fn delete_tenant(m: &TableMapping) -> String {
    format!(
        "DELETE FROM {} WHERE {} = $1::text::{}",
        m.own_rows,
        quote_ident(m.column_name(m.tenant)),
        m.casts[m.tenant]
    )
}

/// A value in `COPY`'s text format, appended to `out`.
pub(super) fn copy_text(out: &mut bytes::BytesMut, value: &[u8]) {
    // Most values need no escaping: one pass the compiler vectorizes, one copy.
    let special = value.iter().fold(0u8, |acc, &b| {
        acc | u8::from(b == b'\\')
            | u8::from(b == b'\n')
            | u8::from(b == b'\r')
            | u8::from(b == b'\t')
    });
    if special == 0 {
        out.extend_from_slice(value);
        return;
    }
    let mut start = 0;
    for (i, &b) in value.iter().enumerate() {
        let esc: &[u8] = match b {
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            _ => continue,
        };
        out.extend_from_slice(&value[start..i]);
        out.extend_from_slice(esc);
        start = i + 1;
    }
    out.extend_from_slice(&value[start..]);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::capture::pgoutput::{ColumnDesc, RelationDesc};

    fn m() -> TableMapping {
        let col = |name: &str| ColumnDesc {
            is_key: false,
            name: name.into(),
            type_oid: 0,
            type_modifier: -1,
        };
        TableMapping {
            relation: Arc::new(RelationDesc {
                id: 1,
                namespace: "public".into(),
                name: "we\"ird".into(),
                replica_identity: b'd',
                columns: vec![col("tenant_id"), col("id"), col("Note")],
            }),
            target: "\"public\".\"we\"\"ird\"".into(),
            own_rows: "ONLY \"public\".\"we\"\"ird\"".into(),
            display: "public.we\"ird".into(),
            casts: vec!["text".into(), "bigint".into(), "jsonb".into()],
            binary: None,
            key: vec![0, 1],
            tenant: 0,
        }
    }

    #[test]
    fn statements_quote_identifiers_and_bind_text_arrays() {
        let m = m();
        assert_eq!(
            upsert(&m),
            "INSERT INTO \"public\".\"we\"\"ird\" AS x (\"tenant_id\", \"id\", \"Note\") SELECT v.c0::text, v.c1::bigint, v.c2::jsonb FROM unnest($1::text[], $2::text[], $3::text[]) AS v(c0, c1, c2) ON CONFLICT (\"tenant_id\", \"id\") DO UPDATE SET \"Note\" = EXCLUDED.\"Note\""
        );
        assert_eq!(
            delete(&m),
            "DELETE FROM ONLY \"public\".\"we\"\"ird\" AS x USING unnest($1::text[], $2::text[]) AS v(k0, k1) WHERE x.\"tenant_id\" = v.k0::text AND x.\"id\" = v.k1::bigint"
        );
        assert!(update_columns(&m, &[2]).contains("SET \"Note\" = v.c0::jsonb FROM unnest($1::text[], $2::text[], $3::text[]) AS v(k0, k1, c0)"));
        assert_eq!(
            move_row(&m, &[1, 2]),
            "UPDATE ONLY \"public\".\"we\"\"ird\" SET \"id\" = $3::text::bigint, \"Note\" = $4::text::jsonb WHERE \"tenant_id\" = $1::text::text AND \"id\" = $2::text::bigint"
        );
        assert_eq!(
            delete_tenant(&m),
            "DELETE FROM ONLY \"public\".\"we\"\"ird\" WHERE \"tenant_id\" = $1::text::text"
        );
    }

    #[test]
    fn copy_text_escapes_exactly_the_four_special_bytes() {
        let text = |v: &[u8]| {
            let mut out = bytes::BytesMut::new();
            copy_text(&mut out, v);
            out.to_vec()
        };
        assert_eq!(
            text(b"plain {\"json\": 1} \xc3\xa9"),
            b"plain {\"json\": 1} \xc3\xa9"
        );
        assert_eq!(text(b""), b"");
        assert_eq!(text(b"a\\b\tc\nd\re"), b"a\\\\b\\tc\\nd\\re");
        assert_eq!(text(b"\n"), b"\\n");
        assert_eq!(text(b"\\N"), b"\\\\N", "a literal backslash-N is not NULL");
        // Every byte value, escaped or not, in a value longer than a vector.
        let all: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let expected: Vec<u8> = all
            .iter()
            .flat_map(|&b| match b {
                b'\\' => b"\\\\".to_vec(),
                b'\n' => b"\\n".to_vec(),
                b'\r' => b"\\r".to_vec(),
                b'\t' => b"\\t".to_vec(),
                other => vec![other],
            })
            .collect();
        assert_eq!(text(&all), expected);
    }
}
