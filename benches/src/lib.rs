//! Shared fixtures for the criterion benches: realistic Phoenix frames.

/// A broadcast payload of roughly `bytes` bytes (a chat-like object with a text field).
pub fn user_payload(bytes: usize) -> String {
    let filler = "x".repeat(bytes.saturating_sub(60));
    format!(r#"{{"user_id":"u-42","display_name":"Ann","text":"{filler}","at":1724000000000}}"#)
}

/// A V1 broadcast frame as the product docs' Recipe 3 sends it.
pub fn v1_broadcast(bytes: usize) -> String {
    format!(
        r#"{{"topic":"realtime:chat:room-42","event":"broadcast","payload":{{"type":"broadcast","event":"chat_message","payload":{}}},"ref":"17","join_ref":"1"}}"#,
        user_payload(bytes)
    )
}

/// A V2 text broadcast frame.
pub fn v2_broadcast(bytes: usize) -> String {
    format!(
        r#"["1","17","realtime:chat:room-42","broadcast",{{"type":"broadcast","event":"chat_message","payload":{}}}]"#,
        user_payload(bytes)
    )
}

/// Payload sizes the benches sweep (PROTOCOL.md frames range from ~100 B to tens of KB).
pub const SIZES: [usize; 4] = [100, 1_000, 10_000, 50_000];
pub mod driver;
