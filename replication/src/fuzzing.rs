//! Fuzz harnesses for the replication side's decoders of untrusted bytes, shared by the
//! cargo-fuzz targets in `fuzz/` and the stable test that replays their corpora
//! (`replication/tests/fuzz_corpus.rs`). A panic is a finding; each harness asserts invariants.

use bytes::{Bytes, BytesMut};

use crate::pgoutput::Message;
use crate::stream::{ReplicationMessage, StandbyStatusUpdate};
use crate::value::{self, oid};

/// pgoutput messages (the walsender's `XLogData` payloads): any bytes decode or fail cleanly.
pub fn pgoutput(data: &[u8]) {
    let _ = Message::try_from(Bytes::copy_from_slice(data));
}

/// The replication sub-protocol: `XLogData`/keepalive messages and standby status updates
/// round-trip through their encoders.
pub fn replication_stream(data: &[u8]) {
    let bytes = Bytes::copy_from_slice(data);
    if let Ok(message) = ReplicationMessage::try_from(bytes.clone()) {
        // Decode → encode → decode is the identity (bytes may differ: any non-zero
        // `reply_requested` byte means true and is written back as 1).
        let mut out = BytesMut::new();
        message.encode(&mut out);
        assert_eq!(ReplicationMessage::try_from(out.freeze()).ok(), Some(message));
    }
    if let Ok(update) = StandbyStatusUpdate::try_from(bytes) {
        let again = crate::stream::standby_status_update(update.written, update.flushed, update.applied, update.now, update.reply_requested);
        assert_eq!(StandbyStatusUpdate::try_from(again).ok(), Some(update));
    }
}

/// Types whose text form the renderer knows (byte 0 of the input picks one).
const TYPES: [u32; 20] = [
    oid::BOOL, oid::BYTEA, oid::INT8, oid::INT2, oid::INT4, oid::TEXT, oid::OID, oid::JSON, oid::BOX, oid::FLOAT4,
    oid::FLOAT8, oid::VARCHAR, oid::DATE, oid::TIMESTAMP, oid::TIMESTAMPTZ, oid::NUMERIC, oid::UUID, oid::JSONB,
    1007, // int4[]
    1009, // text[]
];

/// Column values as the walsender sends them (text format): whatever the bytes, the rendering
/// is valid JSON (PostgreSQL sends well-formed text, but a value must never break the payload).
pub fn value_json(data: &[u8]) {
    let Some((&selector, text)) = data.split_first() else {
        return;
    };
    let type_oid = TYPES[usize::from(selector) % TYPES.len()];
    let mut out = Vec::new();
    value::write_json_value(type_oid, text, &mut out);
    // Syntax only (`IgnoredAny`): a numeric with more digits than an f64 holds is valid JSON
    // (and what `to_jsonb` renders) even though it does not fit a `serde_json::Value`.
    if let Err(error) = serde_json::from_slice::<serde::de::IgnoredAny>(&out) {
        panic!("type {type_oid}: {:?} rendered as {:?}, not JSON: {error}", String::from_utf8_lossy(text), String::from_utf8_lossy(&out));
    }
}

/// The Postgres Changes filter grammar: parsing never panics, and compiling a parsed filter
/// against any column type (and text under a collation the database orders) gives a filter or
/// an error, never a panic, and evaluating it with any order oracle is total; the `system`
/// message rendering (upstream's Elixir list, not a filter string) is total.
pub fn filter(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(filters) = crate::filter::parse(text) else {
        return;
    };
    let rendered = crate::filter::render(&filters);
    assert!(rendered.starts_with('[') && rendered.ends_with(']'), "{rendered}");
    let collated = crate::filter::TextOrder::Database(std::sync::Arc::new(crate::filter::Collation {
        type_sql: "text".into(),
        collation_sql: "pg_catalog.\"und-x-icu\"".into(),
        deterministic: data.len().is_multiple_of(2),
    }));
    for raw in &filters {
        for type_name in ["int4", "int8", "numeric", "text", "bool", "uuid", "timestamptz", "date", "jsonb", "_int4"] {
            let _ = crate::filter::compile(raw, 0, type_name);
        }
        // Under a collation the database orders: the pairs it would ask for, and evaluation
        // with an oracle that knows some of them (unknown pairs fail the comparison).
        if let Ok(filter) = crate::filter::compile_ordered(raw, 0, "text", &collated) {
            for value in [None, Some(None), Some(Some(&data[..data.len() / 2]))] {
                let pairs = filter.database_pairs(value);
                assert!(filter.database_collation().is_some() || pairs.is_empty());
                let _ = filter.matches_with(|_| value, |a, b| (a.len() % 3 != 0).then(|| a.cmp(b).reverse()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_that_are_not_their_type_still_render_as_json() {
        for selector in 0..TYPES.len() as u8 {
            for text in [&b""[..], b"abc", b"1e999999", b"{", b"{1,", b"\"", b"\\x00", b"t", b"NaN", b"-"] {
                let mut data = vec![selector];
                data.extend_from_slice(text);
                value_json(&data);
            }
        }
    }
}
