//! Frame decode: our codec (serde_json + RawValue payload) against simd-json on the same
//! frames, and reply encoding. See benches/RESULTS.md.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use engine::Format;
use net::frame::{self, Ref};
use powa_benches::{v1_broadcast, v2_broadcast, SIZES};
use simd_json::prelude::*;

/// What the server needs from a frame: topic, event, and the payload's exact bytes. simd-json
/// cannot hand back a raw sub-slice and rewrites its input, so the payload is re-serialised.
fn simd_v1(input: &[u8], scratch: &mut Vec<u8>, buffers: &mut simd_json::Buffers) -> usize {
    scratch.clear();
    scratch.extend_from_slice(input);
    let tape = simd_json::to_tape_with_buffers(scratch, buffers).expect("valid");
    let value = tape.as_value();
    let topic = value.get("topic").and_then(|v| v.as_str().map(str::len)).expect("topic");
    let event = value.get("event").and_then(|v| v.as_str().map(str::len)).expect("event");
    let payload = value.get("payload").expect("payload").encode();
    topic + event + payload.len()
}

fn simd_v2(input: &[u8], scratch: &mut Vec<u8>, buffers: &mut simd_json::Buffers) -> usize {
    scratch.clear();
    scratch.extend_from_slice(input);
    let tape = simd_json::to_tape_with_buffers(scratch, buffers).expect("valid");
    let value = tape.as_value();
    let array = value.as_array().expect("array");
    let topic = array.get(2).and_then(|v| v.as_str().map(str::len)).expect("topic");
    let event = array.get(3).and_then(|v| v.as_str().map(str::len)).expect("event");
    let payload = array.get(4).expect("payload").encode();
    topic + event + payload.len()
}

fn decode(c: &mut Criterion) {
    for (name, format, make) in [("v1", Format::V1, v1_broadcast as fn(usize) -> String), ("v2", Format::V2, v2_broadcast)] {
        let mut group = c.benchmark_group(format!("decode_{name}"));
        for size in SIZES {
            let input = make(size);
            group.throughput(Throughput::Bytes(input.len() as u64));
            group.bench_with_input(BenchmarkId::new("serde_json_rawvalue", size), &input, |b, input| {
                b.iter(|| {
                    let frame = frame::decode_text(format, input.as_bytes()).expect("valid");
                    frame.topic.len() + frame.payload.get().len()
                })
            });
            let mut scratch = Vec::new();
            let mut buffers = simd_json::Buffers::new(input.len());
            group.bench_with_input(BenchmarkId::new("simd_json_tape", size), &input, |b, input| {
                b.iter(|| match format {
                    Format::V1 => simd_v1(input.as_bytes(), &mut scratch, &mut buffers),
                    Format::V2 => simd_v2(input.as_bytes(), &mut scratch, &mut buffers),
                })
            });
        }
        group.finish();
    }
}

fn encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    group.bench_function("reply_v2", |b| {
        b.iter(|| frame::encode_reply(Format::V2, Ref::Json("\"1\""), Ref::Json("\"17\""), "realtime:chat:room-42", "ok", b"{}"))
    });
    group.bench_function("reply_v1", |b| {
        b.iter(|| frame::encode_reply(Format::V1, Ref::Json("\"1\""), Ref::Json("\"17\""), "realtime:chat:room-42", "ok", b"{}"))
    });
    group.finish();
}

/// Untrusted JSON into a `Value` (join payloads, presence metas, REST bodies): serde_json's own
/// `Value` against `auth::plain_json` (the same tree, without the raw-value rule; issue 16).
fn json_value(c: &mut Criterion) {
    let join = r#"{"config":{"broadcast":{"ack":false,"self":true},"presence":{"key":"user-42","enabled":true},"postgres_changes":[{"event":"*","schema":"public","table":"todos","filter":"owner=eq.42"}],"private":false},"access_token":"eyJhbGciOiJIUzI1NiJ9.e30.c2ln"}"#;
    let meta = r#"{"type":"presence","event":"track","payload":{"user":"ann","online_at":"2026-12-02T15:50:00.000Z","cursor":{"x":120,"y":48},"tags":["a","b","c"]}}"#;
    let mut group = c.benchmark_group("json_value");
    for (name, text) in [("join", join), ("presence", meta)] {
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_with_input(BenchmarkId::new("serde_json_value", name), &text, |b, text| b.iter(|| serde_json::from_str::<serde_json::Value>(std::hint::black_box(text)).unwrap()));
        group.bench_with_input(BenchmarkId::new("plain_json", name), &text, |b, text| b.iter(|| auth::plain_json::from_str(std::hint::black_box(text)).unwrap()));
    }
    group.finish();
}

criterion_group!(benches, decode, encode, json_value);
criterion_main!(benches);
