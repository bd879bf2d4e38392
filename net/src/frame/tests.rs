use super::*;
use proptest::prelude::*;

/// Strips the WebSocket header of a server frame (unmasked, FIN set).
fn ws_payload(frame: &[u8]) -> &[u8] {
    match frame[1] & 0x7F {
        126 => &frame[4..],
        127 => &frame[10..],
        _ => &frame[2..],
    }
}

fn text(frame: &Bytes) -> &str {
    std::str::from_utf8(ws_payload(frame)).unwrap()
}

#[test]
fn decodes_v1_and_requires_ref() {
    let frame = decode_text(Format::V1, br#"{"topic":"realtime:r","event":"phx_join","payload":{"a":1},"ref":"1","join_ref":"1"}"#).unwrap();
    assert_eq!(frame.topic, "realtime:r");
    assert_eq!(frame.event, Event::Join);
    assert_eq!(frame.payload.get(), r#"{"a":1}"#);
    assert_eq!(frame.ref_, Ref::Json("\"1\""));
    assert_eq!(frame.join_ref, Ref::Json("\"1\""));
    // Python heartbeat: ref null.
    let frame = decode_text(Format::V1, br#"{"topic":"phoenix","event":"heartbeat","payload":{},"ref":null}"#).unwrap();
    assert_eq!(frame.ref_, Ref::NULL);
    assert_eq!(frame.join_ref, Ref::NULL);
    // Missing ref: dropped.
    assert_eq!(decode_text(Format::V1, br#"{"topic":"t","event":"e","payload":{}}"#).unwrap_err(), FrameError::Malformed);
    // Missing payload: dropped.
    assert!(decode_text(Format::V1, br#"{"topic":"t","event":"e","ref":"1"}"#).is_err());
}

#[test]
fn decodes_v2_arrays_with_extra_elements() {
    let frame = decode_text(Format::V2, br#"["1","5","realtime:room1","broadcast",{"type":"broadcast","event":"c","payload":{"x":1}},"extra"]"#).unwrap();
    assert_eq!(frame.event, Event::Broadcast);
    assert_eq!(frame.payload.get(), r#"{"type":"broadcast","event":"c","payload":{"x":1}}"#);
    assert!(decode_text(Format::V2, br#"["1","5","t","e"]"#).is_err());
    assert!(decode_text(Format::V2, br#"{"topic":"t"}"#).is_err());
    assert!(decode_text(Format::V2, b"garbage").is_err());
    let escaped = decode_text(Format::V2, br#"[null,"1","room\"x","phx_join",{}]"#).unwrap();
    assert_eq!(escaped.topic, "room\"x");
}

#[test]
fn decodes_kind_3_binary_frames() {
    let bytes = encode_user_broadcast_push("1", "5", "realtime:room1", "cursor", true, br#"{"x":1,"y":2}"#);
    assert_eq!(&bytes[..7], &[3, 1, 1, 14, 6, 0, 1]);
    let frame = decode_binary(&bytes).unwrap();
    assert_eq!(frame.topic, "realtime:room1");
    assert_eq!(frame.event, "cursor");
    assert_eq!(frame.encoding, PayloadEncoding::Json);
    assert_eq!(frame.payload, br#"{"x":1,"y":2}"#);
    assert_eq!(decode_binary(&[0, 1, 1]).unwrap_err(), FrameError::UnknownKind(0));
    assert_eq!(decode_binary(&[3, 9, 9, 9, 9, 0, 1, b'x']).unwrap_err(), FrameError::Truncated);
    assert_eq!(decode_binary(&[]).unwrap_err(), FrameError::Truncated);
}

#[test]
fn golden_replies() {
    let check = |frame: Bytes, want: &str| assert_eq!(text(&frame), want);
    check(
        encode_reply(Format::V2, Ref::NULL, Ref::Json("\"7\""), "phoenix", "ok", b"{}"),
        r#"[null,"7","phoenix","phx_reply",{"status":"ok","response":{}}]"#,
    );
    check(
        encode_reply(Format::V1, Ref::Json("\"1\""), Ref::Json("\"7\""), "phoenix", "ok", b"{}"),
        r#"{"topic":"phoenix","event":"phx_reply","payload":{"status":"ok","response":{}},"ref":"7"}"#,
    );
    check(
        encode_close(Format::V2, Ref::Json("\"1\""), "realtime:room1", "phx_close"),
        r#"["1","1","realtime:room1","phx_close",{}]"#,
    );
    check(
        encode_error_reason(Format::V2, Ref::Json("\"3\""), Ref::Json("\"3\""), "realtime:secret", "unmatched topic"),
        r#"["3","3","realtime:secret","phx_reply",{"status":"error","response":{"reason":"unmatched topic"}}]"#,
    );
    check(
        encode_system(Format::V2, Ref::Json("\"1\""), "realtime:room1", "system", "error", "Token has expired 2 seconds ago"),
        r#"["1",null,"realtime:room1","system",{"extension":"system","status":"error","message":"Token has expired 2 seconds ago","channel":"room1"}]"#,
    );
}

#[test]
fn broadcasts_per_format() {
    let json = Broadcast { origin: None, body: BroadcastBody::Json { payload: Bytes::from_static(br#"{"type":"broadcast","event":"e","payload":1}"#) } };
    assert_eq!(
        text(&encode_broadcast(Format::V2, "realtime:r", &json).unwrap()),
        r#"[null,null,"realtime:r","broadcast",{"type":"broadcast","event":"e","payload":1}]"#
    );
    assert_eq!(
        text(&encode_broadcast(Format::V1, "r", &json).unwrap()),
        r#"{"topic":"r","event":"broadcast","payload":{"type":"broadcast","event":"e","payload":1},"ref":null}"#
    );
    let user = Broadcast {
        origin: None,
        body: BroadcastBody::User {
            event: Bytes::from_static(b"cursor"),
            encoding: PayloadEncoding::Json,
            payload: Bytes::from_static(br#"{"x":1}"#),
            metadata: Bytes::new(),
        },
    };
    let v2 = encode_broadcast(Format::V2, "realtime:room1", &user).unwrap();
    let body = ws_payload(&v2);
    assert_eq!(&body[..5], &[4, 14, 6, 0, 1]);
    assert_eq!(&body[5..], b"realtime:room1cursor{\"x\":1}");
    assert_eq!(
        text(&encode_broadcast(Format::V1, "realtime:room1", &user).unwrap()),
        r#"{"topic":"realtime:room1","event":"broadcast","payload":{"type":"broadcast","event":"cursor","payload":{"x":1}},"ref":null}"#
    );
    let binary = Broadcast {
        origin: None,
        body: BroadcastBody::User { event: Bytes::from_static(b"b"), encoding: PayloadEncoding::Binary, payload: Bytes::from_static(&[0, 1, 2]), metadata: Bytes::new() },
    };
    assert!(encode_broadcast(Format::V1, "r", &binary).is_none());
    assert_eq!(ws_payload(&encode_broadcast(Format::V2, "r", &binary).unwrap())[4], 0);
}

proptest! {
    #[test]
    fn v2_round_trip(topic in "\\PC{0,40}", event in "[a-z_]{1,20}", n in any::<i64>()) {
        let payload = format!("{{\"n\":{n}}}");
        let frame = encode_message(Format::V2, Ref::Json("\"1\""), Ref::Json("\"2\""), &topic, &event, payload.as_bytes());
        let decoded = decode_text(Format::V2, ws_payload(&frame)).unwrap();
        prop_assert_eq!(&*decoded.topic, topic.as_str());
        prop_assert_eq!(decoded.payload.get(), payload.as_str());
        prop_assert_eq!(decoded.ref_, Ref::Json("\"2\""));
    }

    #[test]
    fn v1_round_trip(topic in "\\PC{0,40}", event in "[a-z_]{1,20}") {
        let frame = encode_message(Format::V1, Ref::NULL, Ref::Json("\"9\""), &topic, &event, b"[1,2]");
        let decoded = decode_text(Format::V1, ws_payload(&frame)).unwrap();
        prop_assert_eq!(&*decoded.topic, topic.as_str());
        prop_assert_eq!(decoded.payload.get(), "[1,2]");
    }

    #[test]
    fn binary_round_trip(topic in "[a-z:]{0,255}", event in "[a-z]{0,255}", payload in proptest::collection::vec(any::<u8>(), 0..300)) {
        let bytes = encode_user_broadcast_push("1", "2", &topic, &event, false, &payload);
        let frame = decode_binary(&bytes).unwrap();
        prop_assert_eq!(frame.topic, topic.as_str());
        prop_assert_eq!(frame.event, event.as_str());
        prop_assert_eq!(frame.payload, &payload[..]);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode_text(Format::V1, &bytes);
        let _ = decode_text(Format::V2, &bytes);
        let _ = decode_binary(&bytes);
    }
}
