//! Encode-once fan-out of one broadcast to 10,000 local subscribers, against a baseline that
//! encodes the frame for every subscriber (what the design forbids). The writes go to
//! in-memory queues, so this measures the CPU side of a delivery only.

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use engine::{Broadcast, BroadcastBody, ChannelSerial, ConnId, Format, LocalSub, ShardId, TopicKey};
use net::{fanout, frame};
use powa_benches::user_payload;

const SUBSCRIBERS: usize = 10_000;

fn subscribers() -> Vec<LocalSub> {
    (0..SUBSCRIBERS)
        .map(|i| LocalSub {
            conn: ConnId(i as u64),
            channel: ChannelSerial(1),
            // A realistic mix: most realtime-js (V2) with the prefix, some V1 raw sockets.
            format: if i % 10 == 0 { Format::V1 } else { Format::V2 },
            prefixed: i % 20 != 0,
            receive_own: false,
            receive_broadcasts: true,
            receive_presence: true,
        })
        .collect()
}

fn fanout_bench(c: &mut Criterion) {
    let subs = subscribers();
    let topic = TopicKey::new(engine::TenantId::SINGLE, "realtime:chat:room-42", false);
    let mut group = c.benchmark_group("fanout_10k");
    group.throughput(Throughput::Elements(SUBSCRIBERS as u64));
    for size in [100usize, 1_000] {
        let payload = format!(r#"{{"type":"broadcast","event":"m","payload":{}}}"#, user_payload(size));
        let message = Arc::new(Broadcast { origin: None, body: BroadcastBody::Json { payload: Bytes::from(payload) } });
        let mut queues: Vec<VecDeque<Bytes>> = (0..SUBSCRIBERS).map(|_| VecDeque::with_capacity(4)).collect();
        group.bench_with_input(BenchmarkId::new("encode_once", size), &message, |b, message| {
            b.iter(|| {
                let n = fanout::deliver(ShardId(0), &subs, &topic, message, |conn, _, bytes| {
                    queues[conn.0 as usize].push_back(bytes.clone());
                    true
                });
                for queue in &mut queues {
                    queue.clear();
                }
                n
            })
        });
        group.bench_with_input(BenchmarkId::new("encode_per_subscriber_baseline", size), &message, |b, message| {
            b.iter(|| {
                for sub in &subs {
                    let spelled = if sub.prefixed { "realtime:chat:room-42" } else { "chat:room-42" };
                    if let Some(bytes) = frame::encode_broadcast(sub.format, spelled, message) {
                        queues[sub.conn.0 as usize].push_back(bytes);
                    }
                }
                for queue in &mut queues {
                    queue.clear();
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, fanout_bench);
criterion_main!(benches);
