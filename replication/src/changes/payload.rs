//! Payloads of Postgres Changes (PROTOCOL.md §5.5, §5.6) and of broadcasts from SQL (§3.4).
//! Pure: a row change and its table in, bytes out. The `data` object is built once per
//! (change, column visibility); channels that share binding ids share one payload.

use std::sync::Arc;

use ahash::AHashMap;
use bytes::Bytes;
use smallvec::SmallVec;

use engine::client_error::RowError;
use engine::{ChannelSerial, ConnId, ShardId};

use super::row::{Kind, Row};
use super::{ChangeDelivery, ChannelKey};
use crate::reader::Txn;
use crate::sql::TableInfo;
use crate::value;

/// A change whose record JSON is longer than this is cut down (PROTOCOL.md §5.6, rule 7).
pub const RECORD_BYTES_MAX: usize = 1_048_576;
/// In a cut-down record, fields whose JSON is longer than this are dropped.
pub const FIELD_BYTES_MAX_WHEN_CUT: usize = 64;

/// What a channel gets for a change.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Variant {
    /// The row, with these columns (by `attnum` order) visible.
    Row(Arc<Vec<bool>>),
    /// An error entry instead of the row.
    Error(Arc<str>),
}

/// Builds the deliveries of one change: `targets` are (channel, its matching binding ids,
/// what it gets). Returns one [`ChangeDelivery`] per (shard, payload).
pub(crate) fn deliveries(txn: &Txn, index: usize, row: &Row<'_>, table: &TableInfo, targets: Vec<(ChannelKey, SmallVec<[u32; 4]>, Variant)>) -> Vec<(ShardId, ChangeDelivery)> {
    let position = (txn.end_lsn, index as u32);
    let mut groups: AHashMap<(SmallVec<[u32; 4]>, Variant), Vec<ChannelKey>> = AHashMap::new();
    for (key, mut ids, variant) in targets {
        ids.sort_unstable();
        groups.entry((ids, variant)).or_default().push(key);
    }
    let mut out = Vec::new();
    let mut data_cache: AHashMap<Variant, (Bytes, Bytes)> = AHashMap::new();
    for ((ids, variant), keys) in groups {
        let (data_v1, data_v2) = data_cache
            .entry(variant.clone())
            .or_insert_with(|| build_data(txn, row, table, &variant))
            .clone();
        let ids_json = format!("[{}]", ids.iter().map(u32::to_string).collect::<Vec<_>>().join(","));
        let wrap = |data: &Bytes| {
            let mut out = Vec::with_capacity(data.len() + ids_json.len() + 20);
            out.extend_from_slice(b"{\"ids\":");
            out.extend_from_slice(ids_json.as_bytes());
            out.extend_from_slice(b",\"data\":");
            out.extend_from_slice(data);
            out.push(b'}');
            Bytes::from(out)
        };
        let (payload_v1, payload_v2) = (wrap(&data_v1), wrap(&data_v2));
        let mut per_shard: AHashMap<ShardId, Vec<(ConnId, ChannelSerial)>> = AHashMap::new();
        for key in &keys {
            per_shard.entry(key.shard).or_default().push((key.conn, key.channel));
        }
        for (shard, targets) in per_shard {
            out.push((shard, ChangeDelivery { payload_v1: payload_v1.clone(), payload_v2: payload_v2.clone(), targets, position }));
        }
    }
    out
}

/// A row inserted into `realtime.messages` as a broadcast (PROTOCOL.md §3.4): topic, event,
/// `binary_payload` if set else `payload`, metadata `{"id": "<row id>"}`; rows missing any of
/// them (or over the payload limit) are skipped. The topic key carries `tenant`, the tenant whose
/// database the row was written to.
pub(crate) fn database_broadcast(tenant: engine::TenantId, row: &Row<'_>, payload_bytes_max: usize) -> Option<(engine::TopicKey, Arc<engine::Broadcast>)> {
    let cell = |name: &str| -> Option<Option<&[u8]>> { row.new_cell(*row.relation.index.get(name)?) };
    let text = |name: &str| cell(name).flatten().and_then(|b| std::str::from_utf8(b).ok());
    let topic = text("topic")?;
    let event = text("event")?;
    let id = text("id")?;
    let private = match cell("private").flatten()? {
        b"t" => true,
        b"f" => false,
        _ => return None,
    };
    text("inserted_at")?;
    let (encoding, payload) = match (cell("binary_payload").flatten(), cell("payload").flatten()) {
        (Some(hex), _) => {
            let digits = hex.strip_prefix(b"\\x").unwrap_or(hex);
            (engine::broadcast::PayloadEncoding::Binary, Bytes::from(decode_hex(digits)?))
        }
        (None, Some(json)) => (engine::broadcast::PayloadEncoding::Json, Bytes::copy_from_slice(json)),
        (None, None) => return None,
    };
    if payload.len() > payload_bytes_max {
        tracing::warn!(topic, "database broadcast over the payload limit dropped");
        return None;
    }
    let mut metadata = Vec::with_capacity(id.len() + 10);
    metadata.extend_from_slice(b"{\"id\":");
    write_str(&mut metadata, id);
    metadata.push(b'}');
    let message = engine::Broadcast {
        origin: None,
        body: engine::BroadcastBody::User { event: Bytes::copy_from_slice(event.as_bytes()), encoding, payload, metadata: Bytes::from(metadata) },
    };
    Some((engine::TopicKey::new_sub(tenant, topic, private), Arc::new(message)))
}

fn decode_hex(digits: &[u8]) -> Option<Vec<u8>> {
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    digits.chunks(2).map(|pair| Some(nibble(pair[0])? << 4 | nibble(pair[1])?)).collect()
}

pub(crate) fn write_str(out: &mut Vec<u8>, text: &str) {
    serde_json::to_writer(&mut *out, text).expect("writing to a Vec cannot fail");
}

/// Writes `{"col": value, ...}` for the columns `cell` yields, visible ones only; returns
/// whether anything was cut for size.
fn write_record<'a>(out: &mut Vec<u8>, row: &Row<'a>, table: &TableInfo, visible: &[bool], cell: impl Fn(usize) -> Option<Option<&'a [u8]>>, only_key: bool, cut: bool) {
    out.push(b'{');
    let mut first = true;
    for (i, column) in row.relation.relation.columns.iter().enumerate() {
        let table_index = table.columns.iter().position(|c| c.name == column.name);
        if !table_index.is_some_and(|t| visible.get(t).copied().unwrap_or(false)) {
            continue;
        }
        if only_key && !table.primary_key.contains(&column.name) {
            continue;
        }
        let Some(value) = cell(i) else { continue };
        let mut rendered = Vec::new();
        match value {
            None => rendered.extend_from_slice(b"null"),
            Some(text) => value::write_json_value(column.type_oid, text, &mut rendered),
        }
        if cut && rendered.len() > FIELD_BYTES_MAX_WHEN_CUT {
            continue;
        }
        if !first {
            out.push(b',');
        }
        first = false;
        write_str(out, &column.name);
        out.push(b':');
        out.extend_from_slice(&rendered);
    }
    out.push(b'}');
}

/// The `data` object for V1 and V2 (PROTOCOL.md §5.5, §5.6).
pub(crate) fn build_data(txn: &Txn, row: &Row<'_>, table: &TableInfo, variant: &Variant) -> (Bytes, Bytes) {
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"{\"schema\":");
    write_str(&mut head, &table.schema);
    head.extend_from_slice(b",\"table\":");
    write_str(&mut head, &table.table);
    head.extend_from_slice(b",\"type\":");
    write_str(&mut head, row.kind.name());
    let (v2, record, old_record) = match variant {
        Variant::Error(message) => {
            let mut body = head.clone();
            body.extend_from_slice(b",\"columns\":[],\"commit_timestamp\":null");
            let (record, old_record): (Option<&[u8]>, Option<&[u8]>) = match row.kind {
                Kind::Insert => (Some(b"{}"), None),
                Kind::Update => (Some(b"{}"), Some(b"{}")),
                Kind::Delete => (None, Some(b"{}")),
            };
            if let Some(r) = record {
                body.extend_from_slice(b",\"record\":");
                body.extend_from_slice(r);
            }
            if let Some(o) = old_record {
                body.extend_from_slice(b",\"old_record\":");
                body.extend_from_slice(o);
            }
            body.extend_from_slice(b",\"errors\":[");
            write_str(&mut body, message);
            body.push(b']');
            (body, record.map(<[u8]>::to_vec), old_record.map(<[u8]>::to_vec))
        }
        Variant::Row(visible) => {
            let mut body = head.clone();
            body.extend_from_slice(b",\"commit_timestamp\":");
            write_str(&mut body, &value::format_commit_timestamp(txn.commit_time));
            body.extend_from_slice(b",\"columns\":[");
            let mut first = true;
            for (i, column) in table.columns.iter().enumerate() {
                if !visible.get(i).copied().unwrap_or(false) {
                    continue;
                }
                if !first {
                    body.push(b',');
                }
                first = false;
                body.extend_from_slice(b"{\"name\":");
                write_str(&mut body, &column.name);
                body.extend_from_slice(b",\"type\":");
                write_str(&mut body, &column.type_name);
                body.push(b'}');
            }
            body.push(b']');
            let render = |cut: bool| {
                let record = (row.kind != Kind::Delete).then(|| {
                    let mut out = Vec::new();
                    write_record(&mut out, row, table, visible, |i| row.new_cell(i), false, cut);
                    out
                });
                let old_record = (row.kind != Kind::Insert).then(|| {
                    let mut out = Vec::new();
                    let reduce_to_key = row.kind == Kind::Delete && table.rls_enabled;
                    if row.old.is_some() {
                        write_record(&mut out, row, table, visible, |i| row.old_cell(i), reduce_to_key, cut);
                    } else if row.relation.relation.replica_identity == b'n' {
                        out.extend_from_slice(b"{}");
                    } else {
                        // Default identity and an unchanged key: the key, from the new row.
                        write_record(&mut out, row, table, visible, |i| row.new_cell(i), true, cut);
                    }
                    out
                });
                (record, old_record)
            };
            let (mut record, mut old_record) = render(false);
            let size = record.as_ref().map_or(0, Vec::len) + old_record.as_ref().map_or(0, Vec::len);
            let too_big = size > RECORD_BYTES_MAX;
            if too_big {
                (record, old_record) = render(true);
            }
            if let Some(r) = &record {
                body.extend_from_slice(b",\"record\":");
                body.extend_from_slice(r);
            }
            if let Some(o) = &old_record {
                body.extend_from_slice(b",\"old_record\":");
                body.extend_from_slice(o);
            }
            if too_big {
                body.extend_from_slice(b",\"errors\":[");
                write_str(&mut body, RowError::PayloadTooLarge.text());
                body.push(b']');
            } else {
                body.extend_from_slice(b",\"errors\":null");
            }
            (body, record, old_record)
        }
    };
    let mut v1 = v2.clone();
    v1.extend_from_slice(b",\"eventType\":");
    write_str(&mut v1, row.kind.name());
    v1.extend_from_slice(b",\"new\":");
    v1.extend_from_slice(record.as_deref().unwrap_or(b"{}"));
    v1.extend_from_slice(b",\"old\":");
    v1.extend_from_slice(old_record.as_deref().unwrap_or(b"{}"));
    v1.push(b'}');
    let mut v2 = v2;
    v2.push(b'}');
    (Bytes::from(v1), Bytes::from(v2))
}
