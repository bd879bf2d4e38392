//! Private channels against a real PostgreSQL (PROTOCOL.md §2.4–2.5, §3.2–3.3, §3.6, §6.5–6.6),
//! over raw V1 and V2 sockets: joins gated by `SELECT` policies on `realtime.messages`, sends
//! gated by `INSERT` policies, the product docs' `only_room_members` policy as written, the
//! separation of private and public channels of one name, tokens that try to get around the
//! policies, and replay.
//!
//! Every test has its own cluster and server. Policies are created before the first join of a
//! given (claims, topic): the server caches check results for 30 s.
//!
//! Asserting that something did NOT arrive: the test first waits for a later message that must
//! arrive on the same socket (a "sentinel"), then reads for a further moment, and only then
//! looks at what was received.

mod pgsupport;
mod privsupport;
mod support;
mod wsclient;

use std::time::Duration;

use serde_json::{json, Value};

use privsupport::*;
use wsclient::{anon, upgrade};

/// A denied send gets no reply at all; we wait this long for one before believing it.
const NO_REPLY: Duration = Duration::from_millis(1500);
/// A reply that must come.
const WAIT_REPLY: Duration = Duration::from_secs(5);

fn service() -> String {
    support::service_key()
}

// ---------------------------------------------------------------------------------------------
// Joins
// ---------------------------------------------------------------------------------------------

#[test]
fn private_join_is_refused_without_a_select_policy_and_allowed_with_one() {
    let (mut db, server) = start_with_acl();
    let token_a = user_token(USER_A);
    let token_b = user_token(USER_B);

    // No policy lets anyone read "locked": anon and a signed-in user are refused, exact frames.
    let mut anon_v1 = Conn::open(&server, anon(), Vsn::V1, "anon-v1");
    let reply = anon_v1.join("realtime:locked", config(true, false, false), None);
    assert_eq!(
        serde_json::from_str::<Value>(&reply.raw).unwrap(),
        json!({"topic": "realtime:locked", "event": "phx_reply", "ref": "1",
               "payload": {"status": "error", "response": {"reason": unauthorized("locked")}}}),
        "anon's private join without a policy"
    );
    let mut a_v2 = Conn::open(&server, anon(), Vsn::V2, "user-a-v2");
    let reply = a_v2.join("realtime:locked", config(true, false, false), Some(&token_a));
    assert_eq!(
        serde_json::from_str::<Value>(&reply.raw).unwrap(),
        json!(["1", "1", "realtime:locked", "phx_reply", {"status": "error", "response": {"reason": unauthorized("locked")}}]),
        "an authenticated private join without a policy"
    );
    // The same user connected with its own token as the connection token: same answer.
    let mut a_own = Conn::open(&server, &token_a, Vsn::V1, "user-a-own-token");
    assert_eq!(a_own.join_error("realtime:locked", config(true, false, false), None), unauthorized("locked"));

    // The public channel of the same name is open to everyone, and both sockets still work.
    anon_v1.join_ok("realtime:locked", config(false, false, false), None);
    a_v2.join_ok("realtime:locked", config(false, false, false), Some(&token_a));
    // service_role bypasses RLS.
    let mut svc = Conn::open(&server, &service(), Vsn::V1, "service");
    svc.join_ok("realtime:locked", config(true, false, false), None);

    // With a policy (A may read "open-room"), A joins; B and anon still cannot.
    grant(&mut db, USER_A, "open-room", false);
    a_v2.join_ok("realtime:open-room", config(true, false, false), Some(&token_a));
    a_own.join_ok("realtime:open-room", config(true, false, false), None);
    let mut b = Conn::open(&server, anon(), Vsn::V1, "user-b");
    assert_eq!(b.join_error("realtime:open-room", config(true, false, false), Some(&token_b)), unauthorized("open-room"));
    assert_eq!(anon_v1.join_error("realtime:open-room", config(true, false, false), None), unauthorized("open-room"));

    // Private joins without the `realtime:` prefix name the same sub-topic.
    assert_eq!(b.join_error("open-room", config(true, false, false), Some(&token_b)), unauthorized("open-room"));

    // A refused join leaves the socket usable.
    for conn in [&mut anon_v1, &mut a_v2, &mut a_own, &mut b, &mut svc] {
        conn.heartbeat();
    }
}

#[test]
fn sending_on_a_private_channel_needs_an_insert_policy() {
    let (mut db, server) = start_with_acl();
    const TOPIC: &str = "realtime:talk";
    grant(&mut db, USER_A, "talk", false); // read only
    grant(&mut db, USER_B, "talk", true); // read and write
    grant(&mut db, USER_C, "talk", false); // read only, V2
    let mut a = Conn::open(&server, &user_token(USER_A), Vsn::V1, "reader-a");
    let mut b = Conn::open(&server, &user_token(USER_B), Vsn::V1, "writer-b");
    let mut c = Conn::open(&server, &user_token(USER_C), Vsn::V2, "reader-c-v2");
    for conn in [&mut a, &mut b, &mut c] {
        conn.join_ok(TOPIC, config(true, true, false), None);
    }

    // A may read but not write: its broadcast gets no reply even with ack, and nobody gets it.
    let r1 = a.broadcast(TOPIC, "from-a", json!({"n": 1}));
    a.assert_no_reply(&r1, NO_REPLY);
    // The denial is cached for the channel: a second send is dropped the same way.
    let r2 = a.broadcast(TOPIC, "from-a", json!({"n": 2}));
    // C sends the way realtime-js does (binary kind 3): dropped too.
    let r3 = c.broadcast_binary(TOPIC, "from-c", json!({"n": 3}));
    a.assert_no_reply(&r2, NO_REPLY);
    c.assert_no_reply(&r3, Duration::from_millis(300));
    // Tracking presence needs the INSERT policy as well (§6.5): an error reply.
    let r4 = a.send(TOPIC, "presence", json!({"type": "presence", "event": "track", "payload": {"who": "a"}}));
    assert_eq!(a.reply(&r4, WAIT_REPLY).payload, json!({"status": "error", "response": {}}), "{}", a.dump());

    // B may write: ok reply, and both readers receive it (V1 JSON as sent; V2 text as sent).
    let r5 = b.broadcast(TOPIC, "from-b", json!({"n": 5}));
    let reply = b.reply(&r5, WAIT_REPLY);
    assert_eq!(serde_json::from_str::<Value>(&reply.raw).unwrap(),
        json!({"topic": TOPIC, "event": "phx_reply", "payload": {"status": "ok", "response": {}}, "ref": r5}));
    let got = a.broadcast_msg(TOPIC, "from-b");
    assert_eq!(serde_json::from_str::<Value>(&got.raw).unwrap(),
        json!({"topic": TOPIC, "event": "broadcast", "payload": {"type": "broadcast", "event": "from-b", "payload": {"n": 5}}, "ref": null}));
    let got = c.broadcast_msg(TOPIC, "from-b");
    assert_eq!(serde_json::from_str::<Value>(&got.raw).unwrap(),
        json!([null, null, TOPIC, "broadcast", {"type": "broadcast", "event": "from-b", "payload": {"n": 5}}]));

    // Nothing of A's or C's denied sends reached anyone.
    for conn in [&mut a, &mut b, &mut c] {
        conn.drain(SETTLE);
        conn.assert_no_broadcast(TOPIC, "after denied sends");
    }
    c.assert_no_reply(&r3, Duration::from_millis(10));
}

#[test]
fn docs_only_room_members_policy_works_as_written() {
    let (mut db, server) = start_with_acl();
    // The docs' table shape: room_id compared as text with the second part of the topic.
    db.exec(&format!(
        "CREATE TABLE public.room_members (user_id uuid NOT NULL, room_id text NOT NULL);
         GRANT SELECT ON public.room_members TO authenticated;
         INSERT INTO public.room_members VALUES ('{USER_A}', 'room-42'), ('{USER_C}', 'room-42'), ('{USER_D}', 'room-42'), ('{USER_B}', 'room-7');"
    ));
    // Verbatim from the product docs (Recipe 3, private variant).
    db.exec(
        "CREATE POLICY only_room_members ON realtime.messages
  FOR SELECT TO authenticated
  USING (
    EXISTS (
      SELECT 1 FROM public.room_members
      WHERE user_id = auth.uid()
        AND room_id::text = (string_to_array(realtime.topic(), ':'))[2]
    )
  );",
    );
    let channel = "chat:room-42";
    // The docs' private join, sent exactly as the recipe's helper does (V1, no join_ref, the
    // user's access token as the connection token).
    let docs_join = json!({"config": {"broadcast": {"self": false, "ack": true}, "private": true}});
    let join = |conn: &mut Conn| {
        let r = conn.next_ref();
        conn.send_text(json!({"topic": channel, "event": "phx_join", "payload": docs_join.clone(), "ref": r}).to_string());
        let reply = conn.reply(&r, WAIT_REPLY);
        serde_json::from_str::<Value>(&reply.raw).unwrap()
    };
    let mut a = Conn::open(&server, &user_token(USER_A), Vsn::V1, "member-a");
    let mut c = Conn::open(&server, &user_token(USER_C), Vsn::V1, "member-c");
    let mut b = Conn::open(&server, &user_token(USER_B), Vsn::V1, "other-room-b");
    let mut anon_conn = Conn::open(&server, anon(), Vsn::V1, "anon");
    let ok = |r: &str| json!({"topic": channel, "event": "phx_reply", "payload": {"status": "ok", "response": {"postgres_changes": []}}, "ref": r});
    let refused = |r: &str| json!({"topic": channel, "event": "phx_reply", "payload": {"status": "error", "response": {"reason": unauthorized(channel)}}, "ref": r});
    assert_eq!(join(&mut a), ok("1"), "a member of room-42");
    assert_eq!(join(&mut c), ok("1"), "another member of room-42");
    assert_eq!(join(&mut b), refused("1"), "a member of another room");
    assert_eq!(join(&mut anon_conn), refused("1"), "anon (the policy is for authenticated)");

    // The docs' policy gates reading only: the recipe's sendMessage (ack: true) gets no ack and
    // reaches nobody until an INSERT policy exists (PROTOCOL.md §3.2).
    let message = |text: &str| json!({"type": "broadcast", "event": "chat_message", "payload": {"user_id": USER_A, "display_name": "A", "text": text, "at": 1}});
    let r = a.next_ref();
    a.send_text(json!({"topic": channel, "event": "broadcast", "payload": message("unheard"), "ref": r}).to_string());
    a.assert_no_reply(&r, NO_REPLY);

    // With the write policy of PROTOCOL.md §6.5 a member that joins now may send; the others get
    // the message in the shape the recipe's handler reads (msg.payload.event / .payload).
    db.exec(
        "CREATE POLICY room_members_write ON realtime.messages FOR INSERT TO authenticated
         WITH CHECK (EXISTS (SELECT 1 FROM public.room_members m
                             WHERE m.user_id = auth.uid()
                               AND m.room_id::text = (string_to_array(realtime.topic(), ':'))[2]));",
    );
    let mut d = Conn::open(&server, &user_token(USER_D), Vsn::V1, "member-d");
    assert_eq!(join(&mut d), ok("1"), "member D");
    let r = d.next_ref();
    d.send_text(json!({"topic": channel, "event": "broadcast", "payload": message("hello room"), "ref": r}).to_string());
    assert_eq!(serde_json::from_str::<Value>(&d.reply(&r, WAIT_REPLY).raw).unwrap(),
        json!({"topic": channel, "event": "phx_reply", "payload": {"status": "ok", "response": {}}, "ref": r}));
    for member in [&mut a, &mut c] {
        let (before, got) = member.broadcasts_until(channel, "chat_message");
        assert!(before.is_empty(), "{}: {before:?}", member.name);
        assert_eq!(got.payload["payload"]["text"], "hello room", "{}", member.dump());
        assert_eq!(serde_json::from_str::<Value>(&got.raw).unwrap(),
            json!({"topic": channel, "event": "broadcast", "payload": message("hello room"), "ref": null}));
        member.drain(SETTLE);
        member.assert_no_broadcast(channel, "only D's message");
    }
}

#[test]
fn private_and_public_channels_of_one_name_never_exchange_messages() {
    let (mut db, server) = start_with_acl();
    const TOPIC: &str = "realtime:twin";
    grant(&mut db, USER_A, "twin", true);
    grant(&mut db, USER_B, "twin", false);
    let mut a = Conn::open(&server, &user_token(USER_A), Vsn::V2, "private-a");
    let mut b = Conn::open(&server, &user_token(USER_B), Vsn::V1, "private-b");
    let mut p = Conn::open(&server, anon(), Vsn::V2, "public-p");
    let mut q = Conn::open(&server, anon(), Vsn::V1, "public-q");
    a.join_ok(TOPIC, config(true, true, false), None);
    b.join_ok(TOPIC, config(true, false, false), None);
    p.join_ok(TOPIC, config(false, true, false), None);
    q.join_ok(TOPIC, config(false, false, false), None);

    // Public → public only.
    let r = p.broadcast_binary(TOPIC, "pub", json!({"from": "p"}));
    assert_eq!(p.reply(&r, WAIT_REPLY).payload["status"], "ok");
    assert_eq!(q.broadcast_msg(TOPIC, "pub").payload["payload"], json!({"from": "p"}));
    // Private → private only.
    let r = a.broadcast_binary(TOPIC, "priv", json!({"from": "a"}));
    assert_eq!(a.reply(&r, WAIT_REPLY).payload["status"], "ok", "{}", a.dump());
    assert_eq!(b.broadcast_msg(TOPIC, "priv").payload["payload"], json!({"from": "a"}));
    // Sentinels on each side, then nothing else.
    let r = p.broadcast_binary(TOPIC, "pub-end", json!({}));
    p.reply(&r, WAIT_REPLY);
    let r = a.broadcast_binary(TOPIC, "priv-end", json!({}));
    a.reply(&r, WAIT_REPLY);
    let (before, _) = q.broadcasts_until(TOPIC, "pub-end");
    assert!(before.is_empty(), "the public subscriber got private messages: {before:?}");
    let (before, _) = b.broadcasts_until(TOPIC, "priv-end");
    assert!(before.is_empty(), "the private member got public messages: {before:?}");
    for conn in [&mut a, &mut b, &mut p, &mut q] {
        conn.drain(SETTLE);
        conn.assert_no_broadcast(TOPIC, "after the sentinels");
    }
}

// ---------------------------------------------------------------------------------------------
// Adversarial tokens
// ---------------------------------------------------------------------------------------------

#[test]
fn tokens_that_try_to_get_around_the_policies_are_refused_and_leak_nothing() {
    let (mut db, server) = start_with_acl();
    const TOPIC: &str = "realtime:vault";
    grant(&mut db, USER_A, "vault", true);
    let mut member = Conn::open(&server, &user_token(USER_A), Vsn::V1, "member");
    member.join_ok(TOPIC, config(true, true, false), None);

    let sig = "JwtSignatureError: Failed to validate JWT signature";
    let exp = now_s() + 3600;
    // `role: service_role` in a token signed with another secret.
    let foreign_service = hs256(b"not-the-server-secret-0123456789abcdef", json!({"role": "service_role", "exp": exp}));
    // A member's claims (right sub) signed with another secret.
    let foreign_member = hs256(b"not-the-server-secret-0123456789abcdef", json!({"role": "authenticated", "sub": USER_A, "exp": exp}));
    // The anon key with its claims swapped for service_role (original signature kept).
    let forged = with_claims(anon(), json!({"role": "service_role", "exp": exp}));

    // At the upgrade (PROTOCOL.md §1.4).
    for (name, token, body) in [
        ("foreign service_role", &foreign_service, "Failed to validate JWT signature"),
        ("foreign member", &foreign_member, "Failed to validate JWT signature"),
        ("forged claims", &forged, "Failed to validate JWT signature"),
    ] {
        let answer = upgrade(server.addr, &format!("/realtime/v1/websocket?apikey={token}&vsn=1.0.0"), &[]);
        assert_eq!((answer.status, answer.body_json()), (401, json!({"error": body})), "upgrade with the {name} token");
    }

    // In the join (the channel token).
    let mut attacker = Conn::open(&server, anon(), Vsn::V1, "attacker");
    for (name, token, reason) in [
        ("foreign service_role", &foreign_service, sig.to_string()),
        ("foreign member", &foreign_member, sig.to_string()),
        ("forged claims", &forged, sig.to_string()),
    ] {
        assert_eq!(attacker.join_error(TOPIC, config(true, true, false), Some(token)), reason, "join with the {name} token");
    }
    // Correctly signed tokens whose claims do not pass the policy.
    let anon_with_member_sub = support::token("anon", &["--sub", USER_A]);
    let unknown_role = support::token("no_such_role", &["--sub", USER_A]);
    let sql_role = support::token("authenticated'; DROP TABLE public.acl; --", &["--sub", USER_A]);
    let bad_sub = support::token("authenticated", &["--sub", "not-a-uuid'); DROP TABLE public.acl; --"]);
    let claimed = support::token("anon", &["--claim", "is_admin=true", "--claim", "app_metadata={\"role\":\"service_role\"}"]);
    for (name, token) in [
        ("the anon key", anon().to_string()),
        ("anon with a member's sub", anon_with_member_sub),
        ("a role that does not exist", unknown_role),
        ("a role with SQL in it", sql_role),
        ("a sub that is not a UUID", bad_sub),
        ("anon with extra claims", claimed),
    ] {
        assert_eq!(attacker.join_error(TOPIC, config(true, true, false), Some(&token)), unauthorized("vault"), "join with {name}");
    }
    // A topic with SQL in it is only a string for the policy.
    assert_eq!(
        attacker.join_error("realtime:vault'); DROP TABLE public.acl; --", config(true, false, false), Some(&user_token(USER_B))),
        unauthorized("vault'); DROP TABLE public.acl; --")
    );
    assert_eq!(db.one("SELECT count(*) FROM public.acl"), "1", "the ACL table is intact");

    // Sends on the topic the attacker never joined reach nobody; the attacker's public channel
    // of the same name does not either.
    let r = attacker.broadcast(TOPIC, "stolen", json!({}));
    let reply = attacker.reply(&r, WAIT_REPLY);
    assert_eq!(reply.payload["status"], "error", "a push on an unjoined topic: {}", reply.raw);
    attacker.join_ok(TOPIC, config(false, true, false), None);
    let r = attacker.broadcast(TOPIC, "stolen", json!({}));
    assert_eq!(attacker.reply(&r, WAIT_REPLY).payload["status"], "ok");

    // The member still works: its own message with self: false goes to nobody; a service_role
    // sender's private message reaches it, and nothing else did.
    let mut svc = Conn::open(&server, &service(), Vsn::V1, "service");
    svc.join_ok(TOPIC, config(true, true, false), None);
    let r = svc.broadcast(TOPIC, "legit", json!({"ok": true}));
    assert_eq!(svc.reply(&r, WAIT_REPLY).payload["status"], "ok");
    let (before, got) = member.broadcasts_until(TOPIC, "legit");
    assert!(before.is_empty(), "leaked to the member: {before:?}");
    assert_eq!(got.payload["payload"], json!({"ok": true}));
    member.drain(SETTLE);
    member.assert_no_broadcast(TOPIC, "after the attacks");
    member.heartbeat();
}

// ---------------------------------------------------------------------------------------------
// Replay (PROTOCOL.md §3.6)
// ---------------------------------------------------------------------------------------------

/// The database clock in Unix ms (the server compares `since` with `inserted_at`).
fn db_now_ms(db: &mut pgsupport::Db) -> i64 {
    db.one("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint").parse().unwrap()
}

/// Rows of `topic`'s private broadcasts, oldest first: (id, payload as JSON).
fn stored(db: &mut pgsupport::Db, topic: &str) -> Vec<(String, Value)> {
    db.exec(&format!(
        "SELECT id, coalesce(payload::text, 'null') FROM realtime.messages
         WHERE topic = '{topic}' AND private AND extension = 'broadcast' ORDER BY inserted_at"
    ))
    .into_iter()
    .map(|line| {
        let (id, payload) = line.split_once('|').unwrap();
        (id.to_string(), serde_json::from_str(payload).unwrap())
    })
    .collect()
}

#[test]
fn replay_pushes_the_newest_stored_messages_oldest_first_after_the_ok_reply() {
    let (mut db, server) = start_with_acl();
    grant(&mut db, USER_A, "replay-room", true);
    grant(&mut db, USER_B, "replay-room", false);
    db.exec("SELECT realtime.send('{\"n\":0}', 'stored', 'replay-room', true)");
    std::thread::sleep(Duration::from_millis(30));
    let since = db_now_ms(&mut db);
    std::thread::sleep(Duration::from_millis(30));
    for n in 1..=4 {
        db.exec(&format!("SELECT realtime.send('{{\"n\":{n}}}', 'stored', 'replay-room', true)"));
    }
    // Not replayed: public rows, rows of another topic.
    db.exec("SELECT realtime.send('{\"n\":100}', 'stored', 'replay-room', false)");
    db.exec("SELECT realtime.send('{\"n\":200}', 'stored', 'other-room', true)");
    let rows = stored(&mut db, "replay-room");
    assert_eq!(rows.len(), 5, "{rows:?}");
    let row = |n: usize| rows[n].clone();

    // V1, limit 2 → rows 3 and 4, in that order, after the ok reply.
    let mut a = Conn::open(&server, &user_token(USER_A), Vsn::V1, "replayer-v1");
    let reply = a.join("realtime:replay-room", replay_config(true, json!({"since": since, "limit": 2})), None);
    assert_eq!(reply.payload, json!({"status": "ok", "response": {"postgres_changes": []}}), "{}", a.dump());
    for n in [3, 4] {
        let (id, payload) = row(n);
        let msg = a.wait("a replayed broadcast", ARRIVE, |m| m.event == "broadcast");
        assert_eq!(
            serde_json::from_str::<Value>(&msg.raw).unwrap(),
            json!({"topic": "realtime:replay-room", "event": "broadcast", "ref": null,
                   "payload": {"type": "broadcast", "event": "stored", "payload": payload, "meta": {"replayed": true, "id": id}}}),
            "replayed row {n} (oldest first)\n{}",
            a.dump()
        );
    }
    // V2, limit absent (25) → rows 1..4 in order, V2 push shape [join_ref, null, ...].
    let mut b = Conn::open(&server, &user_token(USER_B), Vsn::V2, "replayer-v2");
    let reply = b.join("realtime:replay-room", replay_config(true, json!({"since": since})), None);
    assert_eq!(reply.payload["status"], "ok", "{}", b.dump());
    for n in 1..=4 {
        let (id, payload) = row(n);
        let msg = b.wait("a replayed broadcast", ARRIVE, |m| m.event == "broadcast");
        assert_eq!(
            serde_json::from_str::<Value>(&msg.raw).unwrap(),
            json!(["1", null, "realtime:replay-room", "broadcast",
                   {"type": "broadcast", "event": "stored", "payload": payload, "meta": {"replayed": true, "id": id}}]),
            "replayed row {n}\n{}",
            b.dump()
        );
    }
    // Then live traffic flows, and no stored row arrives twice.
    a.broadcast("realtime:replay-room", "live", json!({"n": 5}));
    let (before, live) = b.broadcasts_until("realtime:replay-room", "live");
    assert!(before.is_empty(), "replayed rows delivered again: {before:?}");
    assert_eq!(live.payload["payload"], json!({"n": 5}));
    for conn in [&mut a, &mut b] {
        conn.drain(SETTLE);
        conn.assert_no_broadcast("realtime:replay-room", "after the replay");
    }
}

#[test]
fn replay_limit_is_clamped_to_25() {
    let (mut db, server) = start_with_acl();
    grant(&mut db, USER_A, "many", false);
    let since = db_now_ms(&mut db) - 1000;
    db.exec("SELECT realtime.send(jsonb_build_object('n', i), 'stored', 'many', true) FROM generate_series(1, 30) i");
    // One statement: all rows share inserted_at = now(); order is by inserted_at only, so check
    // the count and the shape, not the order.
    let mut a = Conn::open(&server, &user_token(USER_A), Vsn::V1, "replayer");
    a.join_ok("realtime:many", replay_config(true, json!({"since": since, "limit": 100})), None);
    a.drain(Duration::from_secs(2));
    let replayed = a.take_pending(|m| m.is_broadcast_on("realtime:many"));
    assert_eq!(replayed.len(), 25, "limit 100 is clamped to 25\n{}", a.dump());
    for msg in &replayed {
        assert_eq!(msg.payload["meta"]["replayed"], true, "{}", msg.raw);
    }
}

#[test]
fn replay_errors_public_channel_bad_params_and_unreadable_topic() {
    let (mut db, server) = start_with_acl();
    grant(&mut db, USER_A, "replayable", false);
    let since = now_ms() - 60_000;
    let mut a = Conn::open(&server, &user_token(USER_A), Vsn::V1, "user-a");
    assert_eq!(
        a.join_error("realtime:replayable", replay_config(false, json!({"since": since, "limit": 2})), None),
        "UnableToReplayMessages: Replay is not allowed for public channels"
    );
    for (what, replay) in [
        ("since missing", json!({"limit": 2})),
        ("since a string", json!({"since": "yesterday", "limit": 2})),
        ("since a float", json!({"since": 1.5, "limit": 2})),
        ("limit a string", json!({"since": since, "limit": "two"})),
    ] {
        assert_eq!(
            a.join_error("realtime:replayable", replay_config(true, replay), None),
            "UnableToReplayMessages: Replay params are not valid",
            "{what}"
        );
    }
    // Replay on a topic the user may not read: the read check answers first.
    assert_eq!(
        a.join_error("realtime:not-mine", replay_config(true, json!({"since": since, "limit": 2})), None),
        unauthorized("not-mine")
    );
    // The socket is fine and a correct replay join still works.
    a.join_ok("realtime:replayable", replay_config(true, json!({"since": since, "limit": 2})), None);
    a.heartbeat();
}
