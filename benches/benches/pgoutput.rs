//! pgoutput decoding: an Insert of a realistic row, captured from PostgreSQL 15
//! (`replication/tests/fixtures/insert_todos.hex`: int8, text, bool, uuid, timestamptz, jsonb),
//! decoded and turned into the `record` JSON object. Reported in rows per second on one core.
//!
//! Estimate first: the Insert is ~180 bytes, six cells, one refcount bump per cell and no
//! allocation; the JSON object is ~200 bytes of mostly memcpy plus a validation pass over the
//! jsonb text. A few hundred nanoseconds per row, so 2-5 M rows/s; the target is 1 M rows/s.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use replication::pgoutput::{Cell, Message, Relation};
use replication::value;
use std::hint::black_box;

fn hex(text: &str) -> Bytes {
    let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
    let bytes: Vec<u8> = digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).expect("ASCII"), 16).expect("hex"))
        .collect();
    Bytes::from(bytes)
}

/// The fixture's Relation and its first Insert.
fn fixture(name: &str) -> (Relation, Bytes) {
    let path = format!("{}/../replication/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{path}: {error}"));
    let lines: Vec<Bytes> = text.lines().map(hex).collect();
    let relation = lines
        .iter()
        .find_map(|line| match Message::try_from(line.clone()) {
            Ok(Message::Relation(relation)) => Some(relation),
            _ => None,
        })
        .expect("a Relation message");
    let insert = lines.iter().find(|line| line.first() == Some(&b'I')).expect("an Insert message").clone();
    (relation, insert)
}

/// `"name":` for each column, escaped once per Relation (as the server caches it).
fn column_keys(relation: &Relation) -> Vec<Vec<u8>> {
    relation
        .columns
        .iter()
        .map(|column| {
            let mut key = Vec::new();
            value::write_json_string(column.name.as_bytes(), &mut key);
            key.push(b':');
            key
        })
        .collect()
}

/// Decodes one Insert and writes its `record` object into `out`.
fn insert_to_json(relation: &Relation, keys: &[Vec<u8>], input: &Bytes, out: &mut Vec<u8>) {
    let Ok(Message::Insert(insert)) = Message::try_from(input.clone()) else { panic!("not an Insert") };
    out.clear();
    out.push(b'{');
    for (index, cell) in insert.new.0.iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&keys[index]);
        match cell {
            Cell::Text(text) => value::write_json_value(relation.columns[index].type_oid, text, out),
            _ => out.extend_from_slice(b"null"),
        }
    }
    out.push(b'}');
}

fn pgoutput(c: &mut Criterion) {
    let mut group = c.benchmark_group("pgoutput");
    group.throughput(Throughput::Elements(1));
    for (label, fixture_name) in
        [("todos_6_columns", "insert_todos.hex"), ("all_types_31_columns", "insert_all_types.hex")]
    {
        let (relation, insert) = fixture(fixture_name);
        let keys = column_keys(&relation);
        let mut out = Vec::with_capacity(4096);
        insert_to_json(&relation, &keys, &insert, &mut out);
        serde_json::from_slice::<serde_json::Value>(&out).expect("valid JSON");
        group.bench_function(format!("decode_insert/{label}"), |b| {
            b.iter(|| match Message::try_from(black_box(&insert).clone()) {
                Ok(Message::Insert(insert)) => insert.new.0.len(),
                _ => unreachable!(),
            })
        });
        group.bench_function(format!("decode_insert_to_json/{label}"), |b| {
            b.iter(|| {
                insert_to_json(&relation, &keys, black_box(&insert), &mut out);
                out.len()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, pgoutput);
criterion_main!(benches);
