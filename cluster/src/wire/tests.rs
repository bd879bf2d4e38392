use proptest::prelude::*;

use super::*;

fn element(key: &str, meta: &[u8], conn: u64) -> Element {
    Element { key: Arc::from(key), meta: Bytes::copy_from_slice(meta), owner: Subscriber { shard: ShardId(1), conn: ConnId(conn), channel: ChannelSerial(2) }, prev: None }
}

fn samples() -> Vec<Wire> {
    let mut state = engine::presence::PresenceState::new(ReplicaId::of(7, 3));
    let owner = Subscriber { shard: ShardId(0), conn: ConnId(9), channel: ChannelSerial(1) };
    state.track(owner, Arc::from("u-1"), Bytes::from_static(br#"{"name":"Ann"}"#));
    state.track(owner, Arc::from("u-1"), Bytes::from_static(br#"{"name":"Bob"}"#));
    let mut delta = Delta::default();
    let dot = Dot { replica: ReplicaId::of(1, 1), counter: 4 };
    delta.elements.insert(dot, element("k", b"{}", 3));
    delta.context.insert(dot);
    vec![
        Wire::Broadcast { private: false, sub: Arc::from("room"), body: BroadcastBody::Json { payload: Bytes::from_static(br#"{"a":1}"#) } },
        Wire::Broadcast {
            private: true,
            sub: Arc::from("r\u{e9}alit\u{e9}"),
            body: BroadcastBody::User { event: Bytes::from_static(b"ev"), encoding: PayloadEncoding::Binary, payload: Bytes::from_static(&[0, 1, 255]), metadata: Bytes::new() },
        },
        Wire::Presence { private: false, sub: Arc::from("room"), delta: state.own_delta() },
        Wire::Presence { private: false, sub: Arc::from("room"), delta },
        Wire::SyncRequest { tenant: "acme".into(), private: true, sub: Arc::from("x") },
        Wire::Snapshot { delta: state.as_delta() },
        Wire::Snapshot { delta: Delta::default() },
        Wire::Heartbeat { incarnation: 0xdead_beef, node: "node-1".into(), counts: vec![], leads: vec![] },
        Wire::Heartbeat {
            incarnation: 1,
            node: "n".into(),
            counts: vec![TenantCounts { tenant: "acme".into(), values: [1, 2, 3, 4, 5, u64::MAX] }, TenantCounts { tenant: String::new(), values: [0; COUNTS] }],
            leads: vec!["acme".into(), String::new()],
        },
        Wire::PgCommand {
            tenant: "acme".into(),
            from: 7,
            command: PgCommand::Subscribe { shard: 1, conn: 99, channel: 3, role: "authenticated".into(), claims: "{}".into(), bindings: vec![r#"{"event":"*"}"#.into()] },
        },
        Wire::PgCommand { tenant: String::new(), from: 7, command: PgCommand::Unsubscribe { shard: 0, conn: 1, channel: 2 } },
        Wire::PgOut {
            items: vec![
                (0, PgOutItem::System { conn: 1, channel: 2, ok: true, message: "Subscribed to PostgreSQL".into() }),
                (1, PgOutItem::Change { position: (0x1234_5678, 3), payload_v1: Bytes::from_static(b"{}"), payload_v2: Bytes::from_static(b"[]"), targets: vec![(1, 2), (3, 4)] }),
            ],
        },
        Wire::Bye { incarnation: 5 },
    ]
}

#[test]
fn every_kind_round_trips() {
    for wire in samples() {
        assert_eq!(decode(&encode(&wire)).as_ref(), Ok(&wire));
    }
}

#[test]
fn every_prefix_and_every_extension_is_refused_without_panicking() {
    for wire in samples() {
        let bytes = encode(&wire);
        for len in 0..bytes.len() {
            assert!(decode(&bytes.slice(..len)).is_err(), "{wire:?} cut at {len}");
        }
        let mut longer = bytes.to_vec();
        longer.push(0);
        assert_eq!(decode(&Bytes::from(longer)), Err(WireError::Invalid("trailing bytes")));
    }
}

#[test]
fn hostile_counts_and_counters_are_refused() {
    // A presence delta claiming 2^32-1 elements in a few bytes.
    let mut bytes = vec![VERSION, KIND_SNAPSHOT];
    bytes.extend_from_slice(&u32::MAX.to_be_bytes());
    assert_eq!(decode(&Bytes::from(bytes)), Err(WireError::Truncated));
    // A context maximum that would overflow `max + 1`.
    let mut bytes = vec![VERSION, KIND_SNAPSHOT];
    bytes.extend_from_slice(&0u32.to_be_bytes());
    bytes.extend_from_slice(&1u32.to_be_bytes());
    bytes.extend_from_slice(&1u64.to_be_bytes());
    bytes.extend_from_slice(&u64::MAX.to_be_bytes());
    bytes.extend_from_slice(&0u32.to_be_bytes());
    assert_eq!(decode(&Bytes::from(bytes)), Err(WireError::Invalid("counter")));
    // An element whose dot its own context does not cover.
    let mut delta = Delta::default();
    delta.elements.insert(Dot { replica: ReplicaId(1), counter: 1 }, element("k", b"{}", 1));
    assert_eq!(decode(&encode(&Wire::Snapshot { delta })), Err(WireError::Invalid("element outside its context")));
}

proptest! {
    #[test]
    fn broadcasts_round_trip(private in any::<bool>(), sub in ".{0,40}", payload in proptest::collection::vec(any::<u8>(), 0..200), event in proptest::collection::vec(any::<u8>(), 0..40), json in any::<bool>()) {
        let body = if json {
            BroadcastBody::Json { payload: Bytes::from(payload) }
        } else {
            BroadcastBody::User { event: Bytes::from(event), encoding: PayloadEncoding::Json, payload: Bytes::from(payload), metadata: Bytes::from_static(b"{}") }
        };
        let wire = Wire::Broadcast { private, sub: Arc::from(sub.as_str()), body };
        prop_assert_eq!(decode(&encode(&wire)), Ok(wire));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode(&Bytes::from(bytes));
    }
}

