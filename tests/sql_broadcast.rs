//! Broadcasts from SQL (PROTOCOL.md §3.3–3.4, §7.3–7.4) against a real PostgreSQL: rows written
//! by `realtime.send()`, `realtime.send_binary()` and `realtime.broadcast_changes()` reach the
//! subscribers of their topic through logical replication, public rows public channels and
//! private rows private channels, only once committed.
//!
//! Rows arrive in commit order, so a committed "sentinel" row proves that an earlier row that did
//! not arrive never will.

mod pgsupport;
mod privsupport;
mod support;
mod wsclient;

use std::time::Duration;

use serde_json::{json, Value};

use privsupport::*;
use wsclient::anon;

/// The first row read back after the server starts may wait for the replication stream.
const FIRST_ROW: Duration = Duration::from_secs(10);

fn raw_json(msg: &Msg) -> Value {
    serde_json::from_str(&msg.raw).unwrap_or_else(|e| panic!("not JSON ({e}): {}", msg.raw))
}

/// The id of the only `realtime.messages` row with this event.
fn row_id(db: &mut pgsupport::Db, event: &str) -> String {
    db.one(&format!("SELECT id FROM realtime.messages WHERE event = '{event}'"))
}

#[test]
fn realtime_send_reaches_public_and_private_subscribers_and_rolled_back_rows_never_do() {
    let (mut db, server) = start_with_acl();
    const TOPIC: &str = "realtime:sql-room";
    grant(&mut db, USER_A, "sql-room", false);
    grant(&mut db, USER_B, "sql-room", false);
    grant(&mut db, USER_C, "sql-room", true);
    let mut pub_v1 = Conn::open(&server, anon(), Vsn::V1, "public-v1");
    let mut pub_v2 = Conn::open(&server, anon(), Vsn::V2, "public-v2");
    let mut priv_v1 = Conn::open(&server, &user_token(USER_A), Vsn::V1, "member-v1");
    let mut priv_v2 = Conn::open(&server, &user_token(USER_B), Vsn::V2, "member-v2");
    pub_v1.join_ok(TOPIC, config(false, false, false), None);
    pub_v2.join_ok(TOPIC, config(false, false, false), None);
    priv_v1.join_ok(TOPIC, config(true, false, false), None);
    priv_v2.join_ok(TOPIC, config(true, false, false), None);

    // Public row: exact V1 frame; V2 gets kind 4 with metadata {"id": row id}.
    db.exec(r#"SELECT realtime.send('{"n":1}', 'pub-evt', 'sql-room', false)"#);
    let id = row_id(&mut db, "pub-evt");
    let body = json!({"type": "broadcast", "event": "pub-evt", "payload": {"n": 1, "id": id}, "meta": {"id": id}});
    let got = pub_v1.wait("the public row", FIRST_ROW, |m| m.is_broadcast_on(TOPIC));
    assert_eq!(raw_json(&got), json!({"topic": TOPIC, "event": "broadcast", "payload": body, "ref": null}), "{}", pub_v1.dump());
    let got = pub_v2.broadcast_msg(TOPIC, "pub-evt");
    let frame = got.kind4.as_ref().unwrap_or_else(|| panic!("expected kind 4, got {}", got.raw));
    assert_eq!((frame.topic.as_str(), frame.encoding), (TOPIC, 1), "{}", got.raw);
    assert_eq!(serde_json::from_slice::<Value>(&frame.metadata).unwrap(), json!({"id": id}), "{}", got.raw);
    assert_eq!(got.payload, body);

    // Private rows, explicit and by default (the default of `private` is true).
    db.exec(r#"SELECT realtime.send('{"n":2}', 'priv-evt', 'sql-room', true)"#);
    db.exec(r#"SELECT realtime.send('{"n":3}', 'default-evt', 'sql-room')"#);
    for (event, n) in [("priv-evt", 2), ("default-evt", 3)] {
        let id = row_id(&mut db, event);
        let body = json!({"type": "broadcast", "event": event, "payload": {"n": n, "id": id}, "meta": {"id": id}});
        assert_eq!(raw_json(&priv_v1.broadcast_msg(TOPIC, event)), json!({"topic": TOPIC, "event": "broadcast", "payload": body, "ref": null}));
        assert_eq!(priv_v2.broadcast_msg(TOPIC, event).payload, body);
    }

    // A binary row: V2 subscribers get kind 4 with encoding 0; V1 subscribers get nothing.
    db.exec(r#"SELECT realtime.send_binary('\x01ff02'::bytea, 'bin-evt', 'sql-room', false)"#);
    let id = row_id(&mut db, "bin-evt");
    let got = pub_v2.broadcast_msg(TOPIC, "bin-evt");
    let frame = got.kind4.as_ref().unwrap_or_else(|| panic!("expected kind 4, got {}", got.raw));
    assert_eq!((frame.encoding, frame.payload.as_slice()), (0, &[1u8, 0xff, 2][..]), "{}", got.raw);
    assert_eq!(serde_json::from_slice::<Value>(&frame.metadata).unwrap(), json!({"id": id}));

    // Rolled back: never delivered. Committed later: delivered only after the commit.
    db.exec(
        r#"BEGIN;
           SELECT realtime.send('{"n":4}', 'rolled-pub', 'sql-room', false);
           SELECT realtime.send('{"n":5}', 'rolled-priv', 'sql-room', true);
           ROLLBACK;"#,
    );
    db.exec(r#"BEGIN; SELECT realtime.send('{"n":6}', 'in-tx', 'sql-room', false);"#);
    pub_v1.drain(SETTLE);
    pub_v1.assert_no_broadcast(TOPIC, "a row of an open transaction");
    db.exec("COMMIT");
    assert_eq!(pub_v1.broadcast_msg(TOPIC, "in-tx").payload["payload"]["n"], 6);

    // A caller subject to RLS: realtime.send must pass the INSERT policy, else only a warning
    // is raised and the message is lost (§7.3).
    let as_user = |user: &str, event: &str| {
        format!(
            r#"BEGIN;
               SET LOCAL ROLE authenticated;
               SELECT set_config('request.jwt.claims', '{{"role":"authenticated","sub":"{user}"}}', true);
               SELECT realtime.send('{{}}', '{event}', 'sql-room', true);
               COMMIT;"#
        )
    };
    db.exec(&as_user(USER_D, "rls-denied"));
    db.exec(&as_user(USER_C, "rls-granted"));

    // Sentinels on both sides.
    db.exec(r#"SELECT realtime.send('{}', 'end', 'sql-room', false); SELECT realtime.send('{}', 'end', 'sql-room', true);"#);
    // What was not consumed above must be exactly this, in commit order.
    for (conn, expected) in [
        (&mut pub_v1, vec!["end"]),
        (&mut pub_v2, vec!["in-tx", "end"]),
        (&mut priv_v1, vec!["rls-granted", "end"]),
        (&mut priv_v2, vec!["rls-granted", "end"]),
    ] {
        let (before, _) = conn.broadcasts_until(TOPIC, "end");
        conn.drain(SETTLE);
        let after = conn.take_pending(|m| m.is_broadcast_on(TOPIC));
        let mut events: Vec<&str> = before.iter().map(Msg::user_event).collect();
        events.push("end");
        events.extend(after.iter().map(Msg::user_event));
        assert_eq!(events, expected, "{}: the rest of what arrived\n{}", conn.name, conn.dump());
    }
    assert_eq!(db.one("SELECT count(*) FROM realtime.messages WHERE event LIKE 'rolled-%' OR event = 'rls-denied'"), "0");
}

#[test]
fn broadcast_changes_trigger_reaches_the_private_subscriber_and_not_the_public_one() {
    let (mut db, server) = start_with_acl();
    // PROTOCOL.md §7.4's example.
    db.exec(
        "CREATE TABLE public.todos (
           id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
           title text NOT NULL,
           owner_id uuid NOT NULL
         );
         create or replace function public.todos_notify() returns trigger
         language plpgsql security definer as $$
         begin
           perform realtime.broadcast_changes(
             'todos:' || coalesce(new.owner_id, old.owner_id)::text,  -- topic
             tg_op, tg_op, tg_table_name, tg_table_schema, new, old);
           return null;
         end $$;
         create trigger todos_notify after insert or update or delete on public.todos
         for each row execute function public.todos_notify();",
    );
    let topic_a = format!("realtime:todos:{USER_A}");
    let topic_b = format!("realtime:todos:{USER_B}");
    grant(&mut db, USER_A, &format!("todos:{USER_A}"), false);
    grant(&mut db, USER_B, &format!("todos:{USER_B}"), false);
    let mut owner_v1 = Conn::open(&server, &user_token(USER_A), Vsn::V1, "owner-v1");
    let mut owner_v2 = Conn::open(&server, &user_token(USER_A), Vsn::V2, "owner-v2");
    let mut other = Conn::open(&server, &user_token(USER_B), Vsn::V1, "other-user");
    let mut public = Conn::open(&server, anon(), Vsn::V1, "public-same-name");
    owner_v1.join_ok(&topic_a, config(true, false, false), None);
    owner_v2.join_ok(&topic_a, config(true, false, false), None);
    other.join_ok(&topic_b, config(true, false, false), None);
    public.join_ok(&topic_a, config(false, false, false), None);
    // B may not join A's topic.
    assert_eq!(other.join_error(&topic_a, config(true, false, false), None), unauthorized(&format!("todos:{USER_A}")));

    db.exec(&format!("INSERT INTO public.todos (id, title, owner_id) VALUES (1, 'write tests', '{USER_A}')"));
    let inserted = db.row("public.todos", "id = 1");
    db.exec("UPDATE public.todos SET title = 'write more tests' WHERE id = 1");
    let updated = db.row("public.todos", "id = 1");
    db.exec("DELETE FROM public.todos WHERE id = 1");
    let ids: Vec<String> = db.exec("SELECT id FROM realtime.messages WHERE topic LIKE 'todos:%' ORDER BY inserted_at");
    assert_eq!(ids.len(), 3, "{ids:?}");
    let expected = [
        ("INSERT", json!({"operation": "INSERT", "table": "todos", "schema": "public", "record": inserted, "old_record": null})),
        ("UPDATE", json!({"operation": "UPDATE", "table": "todos", "schema": "public", "record": updated, "old_record": inserted})),
        ("DELETE", json!({"operation": "DELETE", "table": "todos", "schema": "public", "record": null, "old_record": updated})),
    ];
    for ((event, change), id) in expected.iter().zip(&ids) {
        let mut payload = change.clone();
        payload["id"] = json!(id);
        let body = json!({"type": "broadcast", "event": event, "payload": payload, "meta": {"id": id}});
        let got = owner_v1.wait(&format!("{event} broadcast"), FIRST_ROW, |m| m.is_broadcast_on(&topic_a));
        assert_eq!(raw_json(&got), json!({"topic": topic_a, "event": "broadcast", "payload": body, "ref": null}), "{}", owner_v1.dump());
        let got = owner_v2.wait(&format!("{event} broadcast"), ARRIVE, |m| m.is_broadcast_on(&topic_a));
        assert_eq!(got.payload, body, "{}", got.raw);
        assert!(got.kind4.is_some(), "V2 gets database broadcasts as kind 4: {}", got.raw);
    }

    // B's own row reaches B (and nobody else); the public channel named like A's topic gets
    // only the public sentinel.
    db.exec(&format!("INSERT INTO public.todos (id, title, owner_id) VALUES (2, 'b''s todo', '{USER_B}')"));
    db.exec(&format!("SELECT realtime.send('{{}}', 'end', 'todos:{USER_A}', false)"));
    db.exec(&format!("SELECT realtime.send('{{}}', 'end', 'todos:{USER_A}', true)"));
    let (before, _) = public.broadcasts_until(&topic_a, "end");
    assert!(before.is_empty(), "the public channel got private rows: {before:?}");
    let got = other.broadcast_msg(&topic_b, "INSERT");
    assert_eq!(got.payload["payload"]["record"]["id"], 2);
    for conn in [&mut owner_v1, &mut owner_v2] {
        let (before, _) = conn.broadcasts_until(&topic_a, "end");
        assert!(before.is_empty(), "{}: {before:?}", conn.name);
    }
    for (conn, topic) in [(&mut owner_v1, &topic_a), (&mut owner_v2, &topic_a), (&mut other, &topic_b), (&mut public, &topic_a)] {
        conn.drain(SETTLE);
        conn.assert_no_broadcast(topic, "after the sentinels");
    }
}

#[test]
fn a_database_broadcast_over_the_configured_payload_limit_is_dropped() {
    // The limit is the server's configured one, not the default (3 MB): a 300-byte payload is
    // over a 256-byte limit.
    let (mut db, server) = start_with_acl_env(&[("REALTIME_MAX_PAYLOAD_BYTES", "256")]);
    const TOPIC: &str = "realtime:sql-limit";
    let mut conn = Conn::open(&server, anon(), Vsn::V1, "public-v1");
    conn.join_ok(TOPIC, config(false, false, false), None);
    db.exec(r#"SELECT realtime.send('{"n":1}', 'small', 'sql-limit', false)"#);
    assert_eq!(conn.wait("the small row", FIRST_ROW, |m| m.is_broadcast_on(TOPIC)).user_event(), "small");
    let big = format!(r#"{{"text":"{}"}}"#, "x".repeat(300));
    db.exec(&format!("SELECT realtime.send('{big}', 'big', 'sql-limit', false)"));
    db.exec(r#"SELECT realtime.send('{}', 'end', 'sql-limit', false)"#);
    let (before, _) = conn.broadcasts_until(TOPIC, "end");
    let events: Vec<&str> = before.iter().map(Msg::user_event).collect();
    assert!(events.is_empty(), "the over-limit row must not arrive: {events:?}\n{}", conn.dump());
}
