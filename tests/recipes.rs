//! The product docs' "Recipe 3 — Broadcast chat" (shared/product-docs/realtime-subscriptions.txt),
//! driven exactly as the page's raw-WebSocket helper does it: `vsn=1.0.0`, frames
//! `{topic, event, payload, ref}` with no `join_ref`, a bare `chat:room-<id>` topic, and
//! `ref` from a client-side counter.

mod support;
mod wsclient;

use serde_json::{json, Value};
use support::Server;
use wsclient::*;

const CHANNEL: &str = "chat:room-42";

/// The page's `connect(token)` plus its `send(ws, ref, topic, event, payload)` and `nextRef()`.
struct DocsSocket {
    ws: Client,
    next_ref: u64,
}

impl DocsSocket {
    fn connect(server: &Server, token: &str) -> DocsSocket {
        // `${BASE_URL}/realtime/v1/websocket?apikey=${token}&vsn=1.0.0`
        let url = format!("ws://{}/realtime/v1/websocket?apikey={token}&vsn=1.0.0", server.addr);
        DocsSocket { ws: Client::connect(&url), next_ref: 0 }
    }

    fn next_ref(&mut self) -> String {
        self.next_ref += 1;
        self.next_ref.to_string()
    }

    /// `ws.send(JSON.stringify({ topic, event, payload, ref }))`; returns the ref used.
    fn send(&mut self, topic: &str, event: &str, payload: Value) -> String {
        let r = self.next_ref();
        self.ws.send_text(&json!({"topic": topic, "event": event, "payload": payload, "ref": r}).to_string());
        r
    }

    fn join_chat(&mut self, topic: &str) {
        let r = self.send(topic, "phx_join", json!({"config": {"broadcast": {"self": false, "ack": true}}}));
        assert_eq!(
            self.ws.recv_json(WAIT),
            json!({"topic": topic, "event": "phx_reply",
                   "payload": {"status": "ok", "response": {"postgres_changes": []}}, "ref": r}),
            "join reply"
        );
    }

    /// `sendMessage(text)`; returns the ref and the chat payload sent.
    fn send_message(&mut self, topic: &str, user_id: &str, name: &str, text: &str, at: u64) -> (String, Value) {
        let payload = json!({"user_id": user_id, "display_name": name, "text": text, "at": at});
        let r = self.send(
            topic,
            "broadcast",
            json!({"type": "broadcast", "event": "chat_message", "payload": payload.clone()}),
        );
        (r, payload)
    }

    /// The page's message listener: the next frame must be a chat message; returns
    /// `msg.payload.payload`.
    fn receive_chat_message(&mut self) -> Value {
        let msg = self.ws.recv_json(WAIT);
        assert!(
            msg["event"] == "broadcast" && msg["payload"]["event"] == "chat_message",
            "the docs' listener condition must hold: {msg}"
        );
        msg["payload"]["payload"].clone()
    }

    fn heartbeat(&mut self) {
        let r = self.send("phoenix", "heartbeat", json!({}));
        assert_eq!(
            self.ws.recv_json(WAIT),
            json!({"topic": "phoenix", "event": "phx_reply", "payload": {"status": "ok", "response": {}}, "ref": r})
        );
    }
}

fn access_token(user: &str) -> String {
    support::token("authenticated", &["--sub", user, "--exp=3600"])
}

#[test]
fn recipe3_broadcast_chat() {
    let server = Server::start(&[]);
    let alice_id = "6f1c1b2e-0000-4000-8000-00000000a11c";
    let bob_id = "6f1c1b2e-0000-4000-8000-000000000b0b";
    let mut alice = DocsSocket::connect(&server, &access_token(alice_id));
    let mut bob = DocsSocket::connect(&server, &access_token(bob_id));
    alice.join_chat(CHANNEL);
    bob.join_chat(CHANNEL);

    let (r, sent) = alice.send_message(CHANNEL, alice_id, "Alice", "hello room 42", 1_724_000_000_123);
    // ack: true → the sender gets a phx_reply; self: false → and not its own message.
    assert_eq!(
        alice.ws.recv_json(WAIT),
        json!({"topic": CHANNEL, "event": "phx_reply", "payload": {"status": "ok", "response": {}}, "ref": r})
    );
    // The exact frame the other member gets.
    let expected = json!({"topic": CHANNEL, "event": "broadcast",
                          "payload": {"type": "broadcast", "event": "chat_message", "payload": sent.clone()},
                          "ref": null});
    let got = bob.ws.recv_json(WAIT);
    assert_eq!(got, expected);
    assert_eq!(got["payload"]["payload"], sent, "appendMessageToUI(msg.payload.payload)");
    alice.ws.expect_silence(QUIET);
    bob.ws.expect_silence(QUIET);

    // And back the other way, with the listener logic of the page.
    let (r, sent) = bob.send_message(CHANNEL, bob_id, "Bob", "hi Alice ✓", 1_724_000_000_456);
    assert_eq!(
        bob.ws.recv_json(WAIT),
        json!({"topic": CHANNEL, "event": "phx_reply", "payload": {"status": "ok", "response": {}}, "ref": r})
    );
    assert_eq!(alice.receive_chat_message(), sent);
    bob.ws.expect_silence(QUIET);

    alice.heartbeat();
    bob.heartbeat();
}

#[test]
fn recipe3_rooms_are_isolated() {
    let server = Server::start(&[]);
    let mut a = DocsSocket::connect(&server, &access_token("a"));
    let mut b = DocsSocket::connect(&server, &access_token("b"));
    let mut other_room = DocsSocket::connect(&server, &access_token("c"));
    a.join_chat(CHANNEL);
    b.join_chat(CHANNEL);
    other_room.join_chat("chat:room-43");
    let (_r, sent) = a.send_message(CHANNEL, "a", "A", "only 42", 1);
    let _ack = a.ws.recv_json(WAIT);
    assert_eq!(b.receive_chat_message(), sent);
    other_room.ws.expect_silence(QUIET);
}

#[test]
fn recipe3_many_messages_keep_order() {
    let server = Server::start(&[]);
    let mut a = DocsSocket::connect(&server, &access_token("a"));
    let mut b = DocsSocket::connect(&server, &access_token("b"));
    a.join_chat(CHANNEL);
    b.join_chat(CHANNEL);
    let mut sent = Vec::new();
    for i in 0..50 {
        let (r, p) = a.send_message(CHANNEL, "a", "A", &format!("message {i}"), 1_000 + i);
        sent.push((r, p));
    }
    for (r, _) in &sent {
        assert_eq!(
            a.ws.recv_json(WAIT),
            json!({"topic": CHANNEL, "event": "phx_reply", "payload": {"status": "ok", "response": {}}, "ref": r})
        );
    }
    for (_, p) in &sent {
        assert_eq!(&b.receive_chat_message(), p);
    }
}

#[test]
fn recipe3_rest_broadcast_reaches_room_members() {
    // The page's "REST broadcast (sending from a backend)" snippet, as an HTTP request.
    let server = Server::start(&[]);
    let mut v1_member = DocsSocket::connect(&server, &access_token("a"));
    v1_member.join_chat(CHANNEL);
    let mut v2_member = connect_v2(&server);
    join_v2(&mut v2_member, "realtime:chat:room-42", "1", config(false, false));

    let service = support::service_key();
    let bearer = format!("Bearer {service}");
    let body = json!({"messages": [{
        "topic": "chat:room-42",
        "event": "system_announcement",
        "payload": {"text": "Server maintenance in 5 min"},
        "private": false
    }]})
    .to_string();
    let (status, resp_body) = support::http_request(
        server.addr,
        "POST",
        "/realtime/v1/api/broadcast",
        &[("apikey", service.as_str()), ("Authorization", bearer.as_str()), ("Content-Type", "application/json")],
        body.as_bytes(),
    )
    .expect("REST broadcast request");
    assert_eq!(status, 202, "body {:?}", String::from_utf8_lossy(&resp_body));
    assert!(resp_body.is_empty(), "202 body is empty: {:?}", String::from_utf8_lossy(&resp_body));

    let announcement = json!({"type": "broadcast", "event": "system_announcement",
                              "payload": {"text": "Server maintenance in 5 min"}});
    assert_eq!(
        v1_member.ws.recv_json(WAIT),
        json!({"topic": CHANNEL, "event": "broadcast", "payload": announcement.clone(), "ref": null})
    );
    assert_eq!(
        v2_member.recv_json(WAIT),
        json!([null, null, "realtime:chat:room-42", "broadcast", announcement])
    );
}
