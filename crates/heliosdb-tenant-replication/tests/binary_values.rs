//! The binary values the apply path sends in `COPY … (FORMAT binary)`
//! (`apply::binary`), checked value for value against PostgreSQL's own
//! `*_send` functions on a real server: for every value, the text its
//! output function writes (what `pgoutput` sends, under the walsender's
//! `DateStyle ISO` and `extra_float_digits 3`) must encode to exactly the
//! bytes PostgreSQL itself would send, in several session time zones
//! (timestamptz text carries the zone's offset, down to seconds for local
//! mean times). A value the encoder does not take would only cost speed
//! (the chunk goes as text); none of these may be refused.

use bytes::BytesMut;
use heliosdb_tenant_replication::apply::binary::Encoder;
use pgcluster::Cluster;

/// `(type, oid, SQL yielding a column v of that type)`.
const CASES: &[(&str, u32, &str)] = &[
    ("int2", 21, "SELECT v::int2 FROM unnest(ARRAY[-32768, 32767, 0, -1]) v UNION ALL SELECT (random() * 65535 - 32768)::int2 FROM generate_series(1, 200)"),
    ("int4", 23, "SELECT v FROM unnest(ARRAY[-2147483648, 2147483647, 0]) v UNION ALL SELECT (random() * 4e9 - 2e9)::int4 FROM generate_series(1, 200)"),
    ("int8", 20, "SELECT v FROM unnest(ARRAY[-9223372036854775808, 9223372036854775807, 0]::int8[]) v UNION ALL SELECT (random() * 1.8e19 - 9e18)::int8 FROM generate_series(1, 200)"),
    ("bool", 16, "SELECT v FROM unnest(ARRAY[true, false]) v"),
    ("float8", 701, "SELECT v FROM unnest(ARRAY['NaN', 'Infinity', '-Infinity', '0', '-0', '0.1', '1e-310', '1.7976931348623157e308', '4.9e-324', '123456789.123456789']::float8[]) v
        UNION ALL SELECT ((random() - 0.5) * 10 ^ (random() * 600 - 300))::float8 FROM generate_series(1, 500)
        UNION ALL SELECT (1.0 / g)::float8 FROM generate_series(1, 100) g"),
    ("float4", 700, "SELECT v FROM unnest(ARRAY['NaN', 'Infinity', '-Infinity', '0', '-0', '0.1', '1e-45', '3.4028235e38']::float4[]) v
        UNION ALL SELECT ((random() - 0.5) * 10 ^ (random() * 70 - 35))::float4 FROM generate_series(1, 500)"),
    ("numeric", 1700, "SELECT v FROM unnest(ARRAY['NaN', 'Infinity', '-Infinity', '0', '0.0000', '-0.5', '10000', '0.0001', '9999.9999',
            '123456789012345678901234567890.000000000000000000001', '1e-30', '-1e30', '100000000', '0.00010']::numeric[]) v
        UNION ALL SELECT round(((random() - 0.5) * 10 ^ (random() * 40 - 20))::numeric, (random() * 25)::int) FROM generate_series(1, 500)"),
    ("uuid", 2950, "SELECT gen_random_uuid() FROM generate_series(1, 100)"),
    ("bytea", 17, "SELECT v FROM unnest(ARRAY['\\x'::bytea, '\\x00ff10'::bytea]) v UNION ALL SELECT decode(md5(g::text) || md5((g * 7)::text), 'hex') FROM generate_series(1, 100) g"),
    ("date", 1082, "SELECT v FROM unnest(ARRAY['infinity', '-infinity', '2000-01-01', '1999-12-31', '0001-02-29 BC', '0001-01-01', '4713-11-24 BC', '5874897-12-31', '2024-02-29', '1900-03-01']::date[]) v
        UNION ALL SELECT '2000-01-01'::date + (random() * 4000000 - 2000000)::int FROM generate_series(1, 500)"),
    ("timestamp", 1114, "SELECT v FROM unnest(ARRAY['infinity', '-infinity', '2000-01-01 00:00:00', '0044-03-15 12:00:00.5 BC', '294276-12-31 23:59:59.999999', '1970-01-01 00:00:00.000001']::timestamp[]) v
        UNION ALL SELECT '2000-01-01'::timestamp + (random() * 2e11 - 1e11) * interval '1 second' + (random() * 1e6)::int * interval '1 microsecond' FROM generate_series(1, 500)"),
    ("timestamptz", 1184, "SELECT v FROM unnest(ARRAY['infinity', '-infinity', '2000-01-01 00:00:00+00', '1900-06-01 12:00:00+00', '1850-01-01 00:00:00+00', '0044-03-15 12:00:00 BC', '2026-12-04 18:14:00.123456+00']::timestamptz[]) v
        UNION ALL SELECT to_timestamp(random() * 1e10 - 5e9) FROM generate_series(1, 500)"),
    ("text", 25, "SELECT v FROM unnest(ARRAY['', E'tab\\there', E'new\\nline', 'back\\slash', 'ünïcødé ✓', repeat('x', 3000)]) v"),
    ("jsonb", 3802, "SELECT v FROM unnest(ARRAY['{}', '{\"a\": [1, 2.5, null, true]}', '\"\\\\u00e9\"']::jsonb[]) v"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_value_encodes_to_the_bytes_postgresql_sends() {
    let cluster = Cluster::start().expect("cluster");
    let c = cluster.connect("postgres").await.expect("connect");
    c.batch_execute(
        "SET datestyle = ISO; SET intervalstyle = postgres; SET extra_float_digits = 3",
    )
    .await
    .expect("settings");
    let mut checked = 0;
    for zone in [
        "UTC",
        "Asia/Kolkata",
        "America/St_Johns",
        "Europe/Amsterdam",
        "Pacific/Chatham",
    ] {
        c.batch_execute(&format!("SET timezone = '{zone}'"))
            .await
            .expect("zone");
        for (name, oid, sql) in CASES {
            let encoder =
                Encoder::for_type(*oid).unwrap_or_else(|| panic!("no encoder for {name}"));
            // The simple protocol returns each value as its output function
            // writes it, as pgoutput does (`v::text` is not always that:
            // bool's cast says "true" where boolout says "t").
            let rows: Vec<(String, Vec<u8>)> = c
                .simple_query(&format!(
                    "SELECT v, encode({}(v), 'hex') FROM ({sql}) AS s(v)",
                    send(name)
                ))
                .await
                .unwrap_or_else(|e| panic!("{name}: {e:?}"))
                .into_iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => Some((
                        r.get(0).expect("value").to_string(),
                        hex(r.get(1).expect("sent")),
                    )),
                    _ => None,
                })
                .collect();
            for (text, sent) in rows {
                let mut out = BytesMut::new();
                encoder
                    .field(text.as_bytes(), &mut out)
                    .unwrap_or_else(|| panic!("{name} ({zone}): {text:?} refused"));
                assert_eq!(
                    &out[4..],
                    &sent[..],
                    "{name} ({zone}): {text:?} encoded differently from {name}send"
                );
                assert_eq!(
                    i32::from_be_bytes(out[..4].try_into().expect("length")) as usize,
                    sent.len()
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 10_000, "{checked}");
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

/// The type's send function.
fn send(name: &str) -> String {
    match name {
        "numeric" | "uuid" | "date" | "timestamp" | "timestamptz" | "jsonb" => {
            format!("{name}_send")
        }
        _ => format!("{name}send"),
    }
}
