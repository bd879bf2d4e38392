//! `ChangesCore` without a database: data-driven `check` tests for matching, RLS batching and
//! payloads, a seeded simulation that reorders metadata answers and RLS answers against
//! WAL events, Subscribes, Unsubscribes and token refreshes, and a second one for the stream's
//! life: a publication that appears later (waiting bindings, the publication poll), stream
//! restarts and loss, slot recreation (changes missed), relation messages (table refresh) and
//! replays.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;
use serde_json::{json, Value};
use smallvec::smallvec;

use super::*;
use crate::changes::{AuthzReply, Command, Subscription};
use crate::policy::{AuthzRequest, AuthzResult};
use crate::binding::parse_binding;
use crate::pgoutput::{Cell, OldKind, Relation, RelationColumn, Tuple};
use crate::reader::RowChange;
use crate::sql::{ColumnInfo, TableInfo};
use engine::{ChannelSerial, ConnId};

const OID: u32 = 16_400;
/// 2024-01-01 00:00:00 UTC in PostgreSQL microseconds.
const COMMIT_TIME: i64 = 757_382_400_000_000;

fn relation() -> Relation {
    let column = |name: &str, type_oid: u32, key: bool| RelationColumn { key, name: name.into(), type_oid, type_modifier: -1 };
    Relation {
        oid: OID,
        namespace: "public".into(),
        name: "todos".into(),
        replica_identity: b'd',
        columns: vec![column("id", 23, true), column("title", 25, false), column("owner", 25, false)],
    }
}

fn table(rls_enabled: bool) -> Arc<TableInfo> {
    let column = |name: &str, type_name: &str| ColumnInfo::plain(name, type_name);
    Arc::new(TableInfo {
        oid: i64::from(OID),
        schema: "public".into(),
        table: "todos".into(),
        columns: vec![column("id", "int4"), column("title", "text"), column("owner", "text")],
        primary_key: vec!["id".into()],
        rls_enabled,
    })
}

fn key(conn: u64) -> ChannelKey {
    ChannelKey { shard: ShardId((conn % 2) as u16), conn: ConnId(conn), channel: ChannelSerial(1) }
}

fn tuple(id: i64, title: &str, owner: &str) -> Tuple {
    Tuple(smallvec![Cell::Text(Bytes::from(id.to_string())), Cell::Text(Bytes::from(title.to_string())), Cell::Text(Bytes::from(owner.to_string()))])
}

fn insert(id: i64, title: &str, owner: &str) -> RowChange {
    RowChange::Insert { relation: OID, new: tuple(id, title, owner) }
}

fn update(id: i64, title: &str, owner: &str) -> RowChange {
    RowChange::Update { relation: OID, old: None, new: tuple(id, title, owner) }
}

fn delete(id: i64) -> RowChange {
    RowChange::Delete { relation: OID, old: (OldKind::Key, Tuple(smallvec![Cell::Text(Bytes::from(id.to_string())), Cell::Null, Cell::Null])) }
}

fn txn(changes: Vec<RowChange>) -> Arc<Txn> {
    Arc::new(Txn { commit_time: COMMIT_TIME, commit_lsn: 1, end_lsn: 2, changes })
}

/// A core with the `todos` relation, the stream up.
fn core() -> ChangesCore {
    let mut core = ChangesCore::new(2, 3_000_000);
    core.relation(relation());
    core.stream_up(true);
    core
}

/// Subscribes `key` with `bindings` (JSON objects) as `role` with claims `{"sub": sub}`;
/// `privileges` = which columns the role may read. Returns the generation.
fn subscribe(core: &mut ChangesCore, key: ChannelKey, bindings: &[Value], sub: &str, bypasses_rls: bool, rls_enabled: bool) -> u64 {
    let generation = core.begin_subscribe(key);
    let outcome = subscription_outcome(bindings, bypasses_rls, rls_enabled);
    core.finish_subscribe(key, generation, "authenticated", &claims(sub), outcome);
    generation
}

fn claims(sub: &str) -> String {
    json!({"role": "authenticated", "sub": sub}).to_string()
}

fn subscription_outcome(bindings: &[Value], bypasses_rls: bool, rls_enabled: bool) -> Result<(bool, Vec<BindingResult>), String> {
    let table = table(rls_enabled);
    let results = bindings
        .iter()
        .map(|raw| {
            let binding = match parse_binding(raw.as_object().expect("object")) {
                Ok(binding) => binding,
                Err(message) => return BindingResult::Failed(message),
            };
            match compile(&binding, &table, &[true, true, true]) {
                Ok(compiled) => {
                    let tables = [((Arc::from("public"), Arc::from("todos")), compiled)].into_iter().collect();
                    BindingResult::Active(Bound { binding, tables }, vec![Arc::clone(&table)])
                }
                Err(message) => BindingResult::Failed(message),
            }
        })
        .collect();
    Ok((bypasses_rls, results))
}

/// What the core sent, readable: `system` messages and change deliveries (V2 payloads).
#[derive(Debug, Default)]
struct Sent {
    system: Vec<(ChannelKey, &'static str, String)>,
    changes: Vec<(ChannelKey, Value)>,
    authorized: Vec<(ChannelKey, AuthzResult)>,
    replayed: Vec<ChannelKey>,
}

fn drain(core: &mut ChangesCore) -> Sent {
    let mut sent = Sent::default();
    while let Some((shard, out)) = core.poll_out() {
        match out {
            PgOut::System { conn, channel, status, message } => sent.system.push((ChannelKey { shard, conn, channel }, status, message)),
            PgOut::Change(delivery) => {
                let payload: Value = serde_json::from_slice(&delivery.payload_v2).expect("payload is JSON");
                for (conn, channel) in &delivery.targets {
                    sent.changes.push((ChannelKey { shard, conn: *conn, channel: *channel }, payload.clone()));
                }
            }
            PgOut::Authorized { conn, channel, result, .. } => sent.authorized.push((ChannelKey { shard, conn, channel }, result)),
            PgOut::Replayed { conn, channel, .. } => sent.replayed.push(ChannelKey { shard, conn, channel }),
            other => panic!("unexpected {other:?}"),
        }
    }
    sent
}

/// Runs a batch with every RLS group answered by `visible(sub in claims, owner of the row)`.
fn run_batch(core: &mut ChangesCore, batch: &[Arc<Txn>], visible: impl Fn(&str, &str) -> bool) -> Vec<RlsQuery> {
    let matched = core.match_batch(batch, &TextOrders::default());
    let queries = core.plan_rls(&matched);
    let mut verdicts = Verdicts::default();
    for query in &queries {
        verdicts.record(query, answer(query, batch, &visible));
    }
    core.deliver(matched, &verdicts);
    queries
}

/// The owner of the row a primary key names, across the batch (the fake database).
fn answer(query: &RlsQuery, batch: &[Arc<Txn>], visible: &impl Fn(&str, &str) -> bool) -> Vec<Result<Vec<bool>, String>> {
    let owner_of = |id: &str| -> String {
        for txn in batch {
            for change in &txn.changes {
                if let RowChange::Insert { new, .. } | RowChange::Update { new, .. } = change {
                    if new.0[0] == Cell::Text(Bytes::from(id.to_string())) {
                        let Cell::Text(owner) = &new.0[2] else { continue };
                        return String::from_utf8_lossy(owner).into_owned();
                    }
                }
            }
        }
        panic!("no row {id}")
    };
    query
        .groups
        .iter()
        .map(|((_, claims), rows)| {
            let claims: Value = serde_json::from_str(claims).unwrap();
            let sub = claims["sub"].as_str().unwrap_or("");
            Ok(rows.iter().map(|(_, image)| visible(sub, &owner_of(&image.key[0]))).collect())
        })
        .collect()
}

// --- matching -------------------------------------------------------------------------------

/// Each case: a binding, a change, and the binding ids the channel gets it with (empty: not
/// delivered).
fn check_matching(cases: &[(Value, RowChange, bool)]) {
    for (binding, change, expected) in cases {
        let mut core = core();
        subscribe(&mut core, key(1), std::slice::from_ref(binding), "u1", true, false);
        drain(&mut core);
        run_batch(&mut core, &[txn(vec![change.clone()])], |_, _| true);
        let got = !drain(&mut core).changes.is_empty();
        assert_eq!(got, *expected, "binding {binding} with {change:?}");
    }
}

#[test]
fn matching_by_event_and_filter() {
    let b = |event: &str, filter: Option<&str>| {
        let mut binding = json!({"event": event, "schema": "public", "table": "todos"});
        if let Some(filter) = filter {
            binding["filter"] = json!(filter);
        }
        binding
    };
    check_matching(&[
        (b("*", None), insert(1, "a", "x"), true),
        (b("INSERT", None), insert(1, "a", "x"), true),
        (b("INSERT", None), update(1, "a", "x"), false),
        (b("UPDATE", None), update(1, "a", "x"), true),
        (b("DELETE", None), delete(1), true),
        (b("DELETE", None), insert(1, "a", "x"), false),
        (b("*", Some("owner=eq.x")), insert(1, "a", "x"), true),
        (b("*", Some("owner=eq.x")), insert(1, "a", "y"), false),
        (b("*", Some("id=gt.9")), insert(10, "a", "y"), true),
        (b("*", Some("id=in.(1,2)")), insert(3, "a", "y"), false),
        (b("*", Some("title=like.%needle%")), insert(3, "a needle b", "y"), true),
        (b("*", Some("id=eq.1")), delete(1), true),
        (b("*", Some("id=eq.2")), delete(1), false),
        (json!({"event": "*", "schema": "public", "table": "other"}), insert(1, "a", "x"), false),
        (json!({"event": "*", "schema": "public", "table": "*"}), insert(1, "a", "x"), true),
    ]);
}

#[test]
fn two_bindings_of_one_channel_give_one_delivery_with_both_ids() {
    let mut core = core();
    let (all, inserts) = (json!({"event": "*", "schema": "public", "table": "todos"}), json!({"event": "INSERT", "schema": "public", "table": "todos"}));
    let ids = [crate::binding::binding_id(all.as_object().unwrap()), crate::binding::binding_id(inserts.as_object().unwrap())];
    subscribe(&mut core, key(1), &[all, inserts], "u1", true, false);
    drain(&mut core);
    run_batch(&mut core, &[txn(vec![insert(1, "a", "x")])], |_, _| true);
    let sent = drain(&mut core);
    assert_eq!(sent.changes.len(), 1);
    let mut expected: Vec<u32> = ids.to_vec();
    expected.sort_unstable();
    assert_eq!(sent.changes[0].1["ids"], json!(expected));
}

/// A `todos` whose `title` is under a collation the database must apply.
fn collated_outcome(bindings: &[Value], deterministic: bool) -> Result<(bool, Vec<BindingResult>), String> {
    let mut info = (*table(false)).clone();
    let collation = crate::filter::Collation { type_sql: "text".into(), collation_sql: "pg_catalog.\"und-x-icu\"".into(), deterministic };
    info.columns[1].order = crate::filter::TextOrder::Database(Arc::new(collation));
    let info = Arc::new(info);
    let results = bindings
        .iter()
        .map(|raw| {
            let binding = parse_binding(raw.as_object().expect("object")).expect("binding");
            let compiled = compile(&binding, &info, &[true, true, true]).expect("compiles");
            let tables = [((Arc::from("public"), Arc::from("todos")), compiled)].into_iter().collect();
            BindingResult::Active(Bound { binding, tables }, vec![Arc::clone(&info)])
        })
        .collect();
    Ok((true, results))
}

/// Text `gt` under a linguistic collation: the core asks the database for the order of the
/// (value, operand) pairs of the changes whose other filters pass — once per distinct pair,
/// one query per collation for the whole batch — and matches with its answers; a failed
/// comparison is an error entry for the channels that needed it. Byte-order filters (`id`)
/// never ask.
#[test]
fn collated_text_filters_are_ordered_by_the_database_once_per_batch() {
    let mut core = core();
    let gt = json!({"event": "*", "schema": "public", "table": "todos", "filter": "title=gt.b"});
    let by_id = json!({"event": "INSERT", "schema": "public", "table": "todos", "filter": "id=gt.1"});
    for (conn, binding) in [(1, &gt), (2, &gt)] {
        let generation = core.begin_subscribe(key(conn));
        core.finish_subscribe(key(conn), generation, "authenticated", &claims("u"), collated_outcome(std::slice::from_ref(binding), true));
    }
    let generation = core.begin_subscribe(key(3));
    core.finish_subscribe(key(3), generation, "authenticated", &claims("u"), collated_outcome(std::slice::from_ref(&by_id), true));
    drain(&mut core);
    let batch = [txn(vec![insert(1, "a", "x"), insert(2, "B", "x"), insert(3, "B", "x"), delete(4)]), txn(vec![update(1, "C", "x")])];
    let queries = core.plan_text_orders(&batch);
    assert_eq!(queries.len(), 1, "one query for the collation");
    let pairs: Vec<(&[u8], &[u8])> = queries[0].pairs.iter().map(|(v, o)| (&**v, &**o)).collect();
    assert_eq!(pairs, vec![(&b"B"[..], &b"b"[..]), (b"C", b"b"), (b"a", b"b")], "distinct pairs; the DELETE's title is absent");
    // The database's answer: case-insensitive, then lower case first ("B" > "b").
    let linguistic = |a: &[u8], b: &[u8]| a.to_ascii_lowercase().cmp(&b.to_ascii_lowercase()).then(b.cmp(a));
    let mut orders = TextOrders::default();
    let answer = pairs.iter().map(|(a, b)| linguistic(a, b)).collect();
    orders.record(queries[0].clone(), Ok(answer));
    let matched = core.match_batch(&batch, &orders);
    core.deliver(matched, &Verdicts::default());
    let sent = drain(&mut core);
    let mut got: Vec<(u64, i64)> = sent.changes.iter().map(|(k, p)| (k.conn.0, p["data"]["record"]["id"].as_i64().unwrap_or(-1))).collect();
    got.sort_unstable();
    assert_eq!(got, vec![(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3), (3, 2), (3, 3)], "'B' > 'b' and 'C' > 'b' linguistically; 'a' is not ('a' < 'b' in bytes too); UPDATE 1 to 'C' passes");
    // The comparison failed: an error entry instead of a guess.
    let batch = [txn(vec![insert(5, "z", "x")])];
    let queries = core.plan_text_orders(&batch);
    let mut orders = TextOrders::default();
    orders.record(queries[0].clone(), Err("Query was cancelled, please try again".into()));
    let matched = core.match_batch(&batch, &orders);
    core.deliver(matched, &Verdicts::default());
    let sent = drain(&mut core);
    assert_eq!(sent.changes.len(), 3);
    for (key, payload) in &sent.changes {
        if key.conn.0 == 3 {
            assert!(payload["data"]["record"].is_object(), "the byte-order filter is unaffected: {payload}");
        } else {
            assert_eq!(payload["data"]["errors"], json!(["Query was cancelled, please try again"]), "{payload}");
        }
    }
}

/// Under a nondeterministic collation equality is the database's too; under a deterministic
/// one `eq` stays a byte comparison (no query).
#[test]
fn nondeterministic_collations_send_equality_to_the_database() {
    for (deterministic, expected) in [(true, 0), (false, 1)] {
        let mut core = core();
        let eq = json!({"event": "*", "schema": "public", "table": "todos", "filter": "title=eq.b"});
        let generation = core.begin_subscribe(key(1));
        core.finish_subscribe(key(1), generation, "authenticated", &claims("u"), collated_outcome(std::slice::from_ref(&eq), deterministic));
        assert_eq!(core.plan_text_orders(&[txn(vec![insert(1, "B", "x")])]).len(), expected);
        core.unsubscribe(key(1));
        assert!(core.is_empty(), "the count of bindings that need the database is back to 0");
    }
}

// --- batching -------------------------------------------------------------------------------

#[test]
fn rls_is_one_round_trip_per_table_per_batch_and_one_group_per_distinct_claims() {
    let mut core = core();
    let binding = json!({"event": "*", "schema": "public", "table": "todos"});
    for (conn, sub) in [(1, "alice"), (2, "alice"), (3, "bob"), (4, "bob"), (5, "carol")] {
        subscribe(&mut core, key(conn), std::slice::from_ref(&binding), sub, false, true);
    }
    subscribe(&mut core, key(6), std::slice::from_ref(&binding), "service", true, true); // bypasses RLS
    drain(&mut core);
    let batch = [txn(vec![insert(1, "a", "alice"), insert(2, "b", "bob")]), txn(vec![update(1, "a2", "alice"), delete(2)])];
    let queries = run_batch(&mut core, &batch, |sub, owner| sub == owner);
    assert_eq!(queries.len(), 1, "one round trip for the table");
    let groups: Vec<(String, usize)> = queries[0].groups.iter().map(|((_, claims), rows)| (claims.to_string(), rows.len())).collect();
    assert_eq!(groups, vec![(claims("alice"), 3), (claims("bob"), 3), (claims("carol"), 3)], "3 INSERT/UPDATE changes per group; DELETE needs no check");
    let sent = drain(&mut core);
    let mut got: BTreeMap<u64, Vec<(String, i64)>> = BTreeMap::new();
    for (key, payload) in &sent.changes {
        let record = if payload["data"]["type"] == "DELETE" { &payload["data"]["old_record"] } else { &payload["data"]["record"] };
        got.entry(key.conn.0).or_default().push((payload["data"]["type"].as_str().unwrap().to_string(), record["id"].as_i64().unwrap()));
    }
    let own = |id: i64| vec![("INSERT".to_string(), id)];
    let mut alice = own(1);
    alice.push(("UPDATE".into(), 1));
    alice.push(("DELETE".into(), 2));
    let mut bob = own(2);
    bob.push(("DELETE".into(), 2));
    let everything = vec![("INSERT".to_string(), 1), ("INSERT".into(), 2), ("UPDATE".into(), 1), ("DELETE".into(), 2)];
    for list in got.values_mut() {
        list.sort();
    }
    let sorted = |mut v: Vec<(String, i64)>| {
        v.sort();
        v
    };
    assert_eq!(got.get(&1), Some(&sorted(alice.clone())));
    assert_eq!(got.get(&2), Some(&sorted(alice)));
    assert_eq!(got.get(&3), Some(&sorted(bob.clone())));
    assert_eq!(got.get(&4), Some(&sorted(bob)));
    assert_eq!(got.get(&5), Some(&vec![("DELETE".to_string(), 2)]), "carol sees only deletes");
    assert_eq!(got.get(&6), Some(&sorted(everything)));
}

#[test]
fn a_failed_rls_check_is_an_error_entry_for_its_claims_group_only() {
    let mut core = core();
    let binding = json!({"event": "INSERT", "schema": "public", "table": "todos"});
    subscribe(&mut core, key(1), std::slice::from_ref(&binding), "alice", false, true);
    subscribe(&mut core, key(2), std::slice::from_ref(&binding), "bob", false, true);
    drain(&mut core);
    let batch = [txn(vec![insert(1, "a", "alice")])];
    let matched = core.match_batch(&batch, &TextOrders::default());
    let queries = core.plan_rls(&matched);
    let mut verdicts = Verdicts::default();
    let results = queries[0].groups.iter().map(|((_, claims), _)| if claims.contains("alice") { Err("policy raised".to_string()) } else { Ok(vec![true]) }).collect();
    verdicts.record(&queries[0], results);
    core.deliver(matched, &verdicts);
    let sent = drain(&mut core);
    let by_conn: BTreeMap<u64, &Value> = sent.changes.iter().map(|(k, p)| (k.conn.0, p)).collect();
    assert_eq!(by_conn[&1]["data"]["errors"], json!(["policy raised"]));
    assert_eq!(by_conn[&1]["data"]["record"], json!({}));
    assert_eq!(by_conn[&2]["data"]["errors"], Value::Null);
    assert_eq!(by_conn[&2]["data"]["record"], json!({"id": 1, "title": "a", "owner": "alice"}));
}

// --- payloads -------------------------------------------------------------------------------

/// Each case: a binding (its `select` matters), a change, the expected V2 `data` object.
fn check_payloads(cases: &[(Value, RowChange, Value)]) {
    for (binding, change, expected) in cases {
        let mut core = core();
        subscribe(&mut core, key(1), std::slice::from_ref(binding), "u1", true, false);
        drain(&mut core);
        run_batch(&mut core, &[txn(vec![change.clone()])], |_, _| true);
        let sent = drain(&mut core);
        assert_eq!(sent.changes.len(), 1, "{binding} {change:?}");
        assert_eq!(&sent.changes[0].1["data"], expected, "{binding} {change:?}");
    }
}

#[test]
fn payloads() {
    let all = json!({"event": "*", "schema": "public", "table": "todos"});
    let columns = json!([{"name": "id", "type": "int4"}, {"name": "title", "type": "text"}, {"name": "owner", "type": "text"}]);
    let ts = "2024-01-01T00:00:00.000Z";
    check_payloads(&[
        (
            all.clone(),
            insert(7, "milk", "x"),
            json!({"schema": "public", "table": "todos", "type": "INSERT", "commit_timestamp": ts, "columns": columns, "record": {"id": 7, "title": "milk", "owner": "x"}, "errors": null}),
        ),
        (
            all.clone(),
            update(7, "eggs", "x"),
            json!({"schema": "public", "table": "todos", "type": "UPDATE", "commit_timestamp": ts, "columns": columns, "record": {"id": 7, "title": "eggs", "owner": "x"}, "old_record": {"id": 7}, "errors": null}),
        ),
        (
            all.clone(),
            delete(7),
            json!({"schema": "public", "table": "todos", "type": "DELETE", "commit_timestamp": ts, "columns": columns, "old_record": {"id": 7}, "errors": null}),
        ),
        (
            json!({"event": "*", "schema": "public", "table": "todos", "select": ["title"]}),
            insert(7, "milk", "x"),
            json!({"schema": "public", "table": "todos", "type": "INSERT", "commit_timestamp": ts, "columns": [{"name": "id", "type": "int4"}, {"name": "title", "type": "text"}], "record": {"id": 7, "title": "milk"}, "errors": null}),
        ),
    ]);
}

#[test]
fn a_record_over_the_limit_keeps_only_short_fields() {
    let long = "x".repeat(payload::RECORD_BYTES_MAX + 1);
    check_payloads(&[(
        json!({"event": "INSERT", "schema": "public", "table": "todos"}),
        insert(7, &long, "x"),
        json!({"schema": "public", "table": "todos", "type": "INSERT", "commit_timestamp": "2024-01-01T00:00:00.000Z",
               "columns": [{"name": "id", "type": "int4"}, {"name": "title", "type": "text"}, {"name": "owner", "type": "text"}],
               "record": {"id": 7, "owner": "x"}, "errors": ["Error 413: Payload Too Large"]}),
    )]);
}

// --- the seeded simulation ------------------------------------------------------------------

/// xorshift64*: deterministic, seedable, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The model's view of one channel's latest subscription.
#[derive(Debug, Clone)]
struct ModelSub {
    generation: u64,
    sub: String,
    /// `owner=eq.<x>` filter, if any.
    owner_filter: Option<String>,
    /// The metadata answer was applied.
    completed: bool,
    /// Answered (ok or error) since it was applied.
    answered: bool,
}

struct InFlight {
    matched: MatchedBatch,
    queries: Vec<RlsQuery>,
    batch: Vec<Arc<Txn>>,
    /// Row id → the channels (and their subscription's generation) expected at match time.
    expected: BTreeMap<i64, BTreeSet<(ChannelKey, u64)>>,
}

const USERS: [&str; 3] = ["alice", "bob", "carol"];

/// Runs one seed; returns (changes delivered, deliveries voided by an Unsubscribe or refresh
/// between match and delivery) so the caller can check the races happened.
fn simulate(seed: u64) -> (usize, usize) {
    let mut rng = Rng(seed.max(1));
    let mut core = ChangesCore::new(2, 3_000_000);
    core.relation(relation());
    let mut stream_up = false;
    let mut model: BTreeMap<ChannelKey, ModelSub> = BTreeMap::new();
    // Metadata answers not yet applied: (key, generation, sub, filter).
    let mut pending: Vec<(ChannelKey, u64, String, Option<String>)> = Vec::new();
    let mut in_flight: Option<InFlight> = None;
    let mut next_id = 1i64;
    let mut delivered: BTreeMap<i64, Vec<ChannelKey>> = BTreeMap::new();
    let mut voided = 0;
    let check_sent = |sent: Sent, model: &mut BTreeMap<ChannelKey, ModelSub>, delivered: &mut BTreeMap<i64, Vec<ChannelKey>>, authorized: &mut BTreeMap<ChannelKey, usize>| {
        for (key, _) in &sent.authorized {
            *authorized.entry(*key).or_insert(0) += 1;
        }
        for (key, _, _) in &sent.system {
            if let Some(sub) = model.get_mut(key) {
                if sub.completed {
                    sub.answered = true;
                }
            }
        }
        for (key, payload) in sent.changes {
            let id = payload["data"]["record"]["id"].as_i64().expect("insert id");
            assert!(model.get(&key).is_some_and(|s| s.completed), "seed {seed}: change {id} reached {key:?}, which is not subscribed");
            delivered.entry(id).or_default().push(key);
        }
    };
    let mut now = std::time::Instant::now();
    let mut policy_pending: Vec<AuthzRequest> = Vec::new();
    let mut authorize_asked: BTreeMap<ChannelKey, usize> = BTreeMap::new();
    let mut authorized: BTreeMap<ChannelKey, usize> = BTreeMap::new();
    for _step in 0..400 {
        match rng.below(13) {
            // Subscribe, or re-subscribe with other claims (a token refresh).
            0 | 1 => {
                let key = key(1 + rng.below(6) as u64);
                let sub = USERS[rng.below(USERS.len())].to_string();
                let owner_filter = (rng.below(2) == 0).then(|| USERS[rng.below(USERS.len())].to_string());
                let subscription = Subscription { key, role: "authenticated".into(), claims_json: claims(&sub), bindings: vec!["{}".into()] };
                core.handle_command(Command::Subscribe(subscription), now);
                let Some(Query::Metadata { generation, .. }) = core.poll_query() else { panic!("seed {seed}: a Subscribe asks for its metadata") };
                model.insert(key, ModelSub { generation, sub: sub.clone(), owner_filter: owner_filter.clone(), completed: false, answered: false });
                pending.push((key, generation, sub, owner_filter));
            }
            // A policy check (join, first write or refresh of a private channel); identical
            // checks in flight share one query.
            10 | 11 => {
                let key = key(1 + rng.below(6) as u64);
                let topic = ["room-1", "room-2"][rng.below(2)];
                let request = AuthzRequest { role: "authenticated".into(), claims_json: claims("alice"), sub: None, topic: topic.into(), kind: crate::policy::CheckKind::Read };
                core.handle_command(Command::Authorize { request, reply: AuthzReply::Channel(key) }, now);
                *authorize_asked.entry(key).or_insert(0) += 1;
                while let Some(query) = core.poll_query() {
                    let Query::Policy(request) = query else { panic!("seed {seed}: unexpected query") };
                    policy_pending.push(request);
                }
            }
            12 if !policy_pending.is_empty() => {
                let request = policy_pending.swap_remove(rng.below(policy_pending.len()));
                let result = AuthzResult { broadcast: request.topic == "room-1", presence: false, error: None };
                // Answers are cached for 30 s: move the clock past that now and then.
                now += std::time::Duration::from_secs(rng.below(40) as u64);
                core.policy_done(&request, result, now);
            }
            2 => {
                let key = key(1 + rng.below(6) as u64);
                core.unsubscribe(key);
                model.remove(&key);
            }
            // A metadata answer, in any order.
            3 | 4 if !pending.is_empty() => {
                let (key, generation, sub, owner_filter) = pending.swap_remove(rng.below(pending.len()));
                let mut binding = json!({"event": "INSERT", "schema": "public", "table": "todos"});
                if let Some(owner) = &owner_filter {
                    binding["filter"] = json!(format!("owner=eq.{owner}"));
                }
                core.finish_subscribe(key, generation, "authenticated", &claims(&sub), subscription_outcome(&[binding], false, true));
                if let Some(m) = model.get_mut(&key).filter(|m| m.generation == generation) {
                    m.completed = true;
                }
            }
            5 => {
                stream_up = !stream_up;
                if stream_up {
                    core.stream_up(true);
                } else {
                    core.stream_down("simulated".into());
                }
            }
            // A committed transaction: matched now, delivered when its RLS answers come.
            6 | 7 if in_flight.is_none() => {
                let changes: Vec<RowChange> = (0..1 + rng.below(3))
                    .map(|_| {
                        let id = next_id;
                        next_id += 1;
                        insert(id, "t", USERS[rng.below(USERS.len())])
                    })
                    .collect();
                let batch = vec![txn(changes)];
                let mut expected = BTreeMap::new();
                for change in &batch[0].changes {
                    let RowChange::Insert { new, .. } = change else { unreachable!() };
                    let id: i64 = std::str::from_utf8(match &new.0[0] { Cell::Text(b) => b, _ => unreachable!() }).unwrap().parse().unwrap();
                    let owner = match &new.0[2] { Cell::Text(b) => String::from_utf8_lossy(b).into_owned(), _ => unreachable!() };
                    let who: BTreeSet<(ChannelKey, u64)> = model
                        .iter()
                        .filter(|(_, m)| m.completed && m.owner_filter.as_ref().is_none_or(|o| *o == owner) && m.sub == owner)
                        .map(|(k, m)| (*k, m.generation))
                        .collect();
                    expected.insert(id, who);
                }
                let matched = core.match_batch(&batch, &TextOrders::default());
                let queries = core.plan_rls(&matched);
                in_flight = Some(InFlight { matched, queries, batch, expected });
            }
            // The batch's RLS answers arrive.
            8 | 9 if in_flight.is_some() => {
                let InFlight { matched, queries, batch, expected } = in_flight.take().expect("checked");
                let mut verdicts = Verdicts::default();
                for query in &queries {
                    verdicts.record(query, answer(query, &batch, &|sub, owner| sub == owner));
                }
                core.deliver(matched, &verdicts);
                let sent = drain(&mut core);
                let before: BTreeMap<i64, Vec<ChannelKey>> = delivered.clone();
                check_sent(sent, &mut model, &mut delivered, &mut authorized);
                for (id, at_match) in expected {
                    // Expected now: matched then, and still the same subscription.
                    let matched_then = at_match.len();
                    let want: BTreeSet<ChannelKey> = at_match.into_iter().filter(|(k, g)| model.get(k).is_some_and(|m| m.generation == *g)).map(|(k, _)| k).collect();
                    voided += matched_then - want.len();
                    let got: Vec<ChannelKey> = delivered.get(&id).cloned().unwrap_or_default();
                    assert!(!before.contains_key(&id), "seed {seed}: change {id} delivered twice");
                    let got_set: BTreeSet<ChannelKey> = got.iter().copied().collect();
                    assert_eq!(got.len(), got_set.len(), "seed {seed}: change {id} reached a channel twice");
                    assert_eq!(got_set, want, "seed {seed}: change {id}: every matching subscriber once, no one else");
                }
            }
            _ => {}
        }
        let sent = drain(&mut core);
        check_sent(sent, &mut model, &mut delivered, &mut authorized);
    }
    // Every Authorize is answered exactly once.
    for request in std::mem::take(&mut policy_pending) {
        core.policy_done(&request, AuthzResult { broadcast: true, presence: false, error: None }, now);
    }
    // Every Subscribe is answered: apply what is pending, bring the stream up.
    for (key, generation, sub, owner_filter) in std::mem::take(&mut pending) {
        let mut binding = json!({"event": "INSERT", "schema": "public", "table": "todos"});
        if let Some(owner) = &owner_filter {
            binding["filter"] = json!(format!("owner=eq.{owner}"));
        }
        core.finish_subscribe(key, generation, "authenticated", &claims(&sub), subscription_outcome(&[binding], false, true));
        if let Some(m) = model.get_mut(&key).filter(|m| m.generation == generation) {
            m.completed = true;
        }
    }
    core.stream_up(true);
    let sent = drain(&mut core);
    check_sent(sent, &mut model, &mut delivered, &mut authorized);
    for (key, m) in &model {
        assert!(m.completed && m.answered, "seed {seed}: {key:?} was never answered");
    }
    assert_eq!(authorized, authorize_asked, "seed {seed}: every Authorize answered exactly once");
    // Every Unsubscribe frees everything.
    for key in model.keys() {
        core.unsubscribe(*key);
    }
    assert!(core.is_empty(), "seed {seed}: something outlived its Unsubscribe");
    (delivered.values().map(Vec::len).sum(), voided)
}

#[test]
fn simulation_many_seeds() {
    let base: u64 = std::env::var("POWA_SIM_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed);
    let (mut deliveries, mut voided) = (0, 0);
    for n in 0..200 {
        let (d, v) = simulate(base.wrapping_add(n));
        deliveries += d;
        voided += v;
    }
    assert!(deliveries > 1000 && voided > 10, "the simulation must exercise deliveries and races: {deliveries} deliveries, {voided} voided");
}

/// One subscription in the lifecycle model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    /// Its table was not published when its metadata came: waiting for the publication poll.
    Waiting,
    /// Active: changes reach it.
    Active,
}

fn todos_binding() -> Binding {
    parse_binding(json!({"event": "*", "schema": "public", "table": "todos"}).as_object().expect("object")).expect("binding")
}

fn active_outcome() -> BindingResult {
    let table = table(false);
    let binding = todos_binding();
    let compiled = compile(&binding, &table, &[true, true, true]).expect("compiles");
    let tables = [((Arc::from("public"), Arc::from("todos")), compiled)].into_iter().collect();
    BindingResult::Active(Bound { binding, tables }, vec![table])
}

/// Runs one seed of the lifecycle simulation; returns (changes delivered, waiting bindings
/// activated by the publication poll, replays answered).
fn simulate_lifecycle(seed: u64) -> (usize, usize, usize) {
    let mut rng = Rng(seed.max(1));
    let mut core = ChangesCore::new(2, 3_000_000);
    core.relation(relation());
    let mut published = false;
    let mut stream_up = false;
    let mut model: BTreeMap<ChannelKey, (u64, Life)> = BTreeMap::new();
    let mut replays_asked: BTreeMap<ChannelKey, usize> = BTreeMap::new();
    let mut replays_pending: Vec<ChannelKey> = Vec::new();
    let mut replays_answered: BTreeMap<ChannelKey, usize> = BTreeMap::new();
    let (mut delivered, mut activated) = (0, 0);
    let mut next_id = 1i64;
    let missed = ChangesNotice::ChangesMissed.text().into_owned();
    let subscribed = ChangesNotice::Subscribed.text().into_owned();
    for _step in 0..300 {
        match rng.below(11) {
            // Subscribe: the metadata says Active when the table is published, else Waiting.
            0 | 1 => {
                let key = key(1 + rng.below(6) as u64);
                let subscription = Subscription { key, role: "authenticated".into(), claims_json: claims("alice"), bindings: vec!["{}".into()] };
                core.handle_command(Command::Subscribe(subscription), std::time::Instant::now());
                let Some(Query::Metadata { generation, .. }) = core.poll_query() else { panic!("seed {seed}: a Subscribe asks for its metadata") };
                let result = if published { active_outcome() } else { BindingResult::Waiting(todos_binding(), "not published yet".into()) };
                let life = if published { Life::Active } else { Life::Waiting };
                core.finish_subscribe(key, generation, "authenticated", &claims("alice"), Ok((true, vec![result])));
                model.insert(key, (generation, life));
            }
            2 => {
                let key = key(1 + rng.below(6) as u64);
                core.unsubscribe(key);
                model.remove(&key);
            }
            // The table gets published; the poll (every 2 s) resolves every waiting binding.
            3 => {
                published = true;
                for (key, generation, _role, binding) in core.waiting_bindings() {
                    core.waiting_resolved(key, generation, &binding, active_outcome());
                    let entry = model.get_mut(&key).expect("waiting only for a live subscription");
                    assert_eq!(entry.0, generation, "seed {seed}: a waiting binding of an old generation was listed");
                    entry.1 = Life::Active;
                    activated += 1;
                }
            }
            // The stream restarts (to read the new publication) or is lost, then comes back.
            4 => {
                if rng.below(2) == 0 {
                    core.stream_restarting();
                } else {
                    core.stream_down("simulated".into());
                }
                stream_up = false;
            }
            5 => {
                core.stream_up(true);
                stream_up = true;
                let sent = drain(&mut core);
                let told: BTreeSet<ChannelKey> = sent.system.iter().filter(|(_, _, m)| *m == subscribed).map(|(k, _, _)| *k).collect();
                let active: BTreeSet<ChannelKey> = model.iter().filter(|(_, (_, l))| *l == Life::Active).map(|(k, _)| *k).collect();
                assert_eq!(told, active, "seed {seed}: stream_up acknowledges exactly the active subscriptions");
            }
            // The slot was recreated: every active subscription, and only those, is told once.
            6 => {
                core.changes_missed();
                let sent = drain(&mut core);
                let told: Vec<ChannelKey> = sent.system.iter().filter(|(_, _, m)| *m == missed).map(|(k, _, _)| *k).collect();
                let active: Vec<ChannelKey> = model.iter().filter(|(_, (_, l))| *l == Life::Active).map(|(k, _)| *k).collect();
                assert_eq!(told, active, "seed {seed}: changes-missed goes to every active subscription once");
            }
            // A relation message for a known table: its metadata is refreshed.
            7 => {
                if let Some(_key) = core.relation(relation()) {
                    core.table_refreshed(table(false));
                }
            }
            // A committed insert (no RLS on the table): reaches exactly the active subscriptions.
            8 if stream_up => {
                let id = next_id;
                next_id += 1;
                let batch = vec![txn(vec![insert(id, "t", "alice")])];
                let matched = core.match_batch(&batch, &TextOrders::default());
                assert!(core.plan_rls(&matched).is_empty(), "seed {seed}: no RLS round trip for a table without RLS");
                core.deliver(matched, &Verdicts::default());
                let sent = drain(&mut core);
                let got: BTreeSet<ChannelKey> = sent.changes.iter().map(|(k, _)| *k).collect();
                assert_eq!(got.len(), sent.changes.len(), "seed {seed}: change {id} reached a channel twice");
                let active: BTreeSet<ChannelKey> = model.iter().filter(|(_, (_, l))| *l == Life::Active).map(|(k, _)| *k).collect();
                assert_eq!(got, active, "seed {seed}: change {id} reaches every active subscription, no waiting one");
                delivered += got.len();
            }
            // A replay request (a private channel's join), answered later in any order.
            9 => {
                let key = key(1 + rng.below(6) as u64);
                core.handle_command(Command::Replay { key, topic: "room".into(), since_ms: 0, limit: 25 }, std::time::Instant::now());
                let Some(Query::Replay { key: asked, limit, .. }) = core.poll_query() else { panic!("seed {seed}: a Replay asks for its rows") };
                assert_eq!((asked, limit), (key, 25));
                *replays_asked.entry(key).or_insert(0) += 1;
                replays_pending.push(key);
            }
            10 if !replays_pending.is_empty() => {
                let key = replays_pending.swap_remove(rng.below(replays_pending.len()));
                core.replay_done(key, Ok(Vec::new()));
            }
            _ => {}
        }
        let sent = drain(&mut core);
        assert!(sent.changes.is_empty(), "seed {seed}: a change outside a WAL event");
        for key in sent.replayed {
            *replays_answered.entry(key).or_insert(0) += 1;
        }
    }
    for key in std::mem::take(&mut replays_pending) {
        core.replay_done(key, Ok(Vec::new()));
    }
    for key in drain(&mut core).replayed {
        *replays_answered.entry(key).or_insert(0) += 1;
    }
    assert_eq!(replays_answered, replays_asked, "seed {seed}: every replay answered exactly once");
    for key in model.keys() {
        core.unsubscribe(*key);
    }
    assert!(core.is_empty(), "seed {seed}: something outlived its Unsubscribe");
    (delivered, activated, replays_answered.values().sum())
}

#[test]
fn lifecycle_simulation_many_seeds() {
    let base: u64 = std::env::var("POWA_SIM_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x11fe);
    let (mut delivered, mut activated, mut replays) = (0, 0, 0);
    for n in 0..200 {
        let (d, a, r) = simulate_lifecycle(base.wrapping_add(n));
        delivered += d;
        activated += a;
        replays += r;
    }
    assert!(delivered > 1000 && activated > 100 && replays > 1000, "the simulation must exercise every path: {delivered} deliveries, {activated} activations, {replays} replays");
}
