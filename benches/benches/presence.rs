//! Presence: CRDT track/untrack/merge costs, and a churn run (1,000 members joining one topic
//! and tracking) comparing frames delivered with and without the coalescing window.

use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use engine::presence::{PresenceState, ReplicaId};
use engine::shard::LocalEffect;
use engine::{BroadcastBody, ChannelSerial, ConnId, Format, LocalSub, PresenceCoalescing, ShardId, ShardMsg, ShardState, Subscriber, TopicKey};

const MEMBERS: u64 = 1_000;

fn owner(i: u64) -> Subscriber {
    Subscriber { shard: ShardId(0), conn: ConnId(i), channel: ChannelSerial(1) }
}

fn meta(i: u64) -> Bytes {
    Bytes::from(format!(r#"{{"name":"user {i}","online_at":"2026-11-22T10:00:00Z"}}"#))
}

fn crdt(c: &mut Criterion) {
    let mut group = c.benchmark_group("presence_crdt");
    group.throughput(Throughput::Elements(MEMBERS));
    group.bench_function("track_1k", |b| {
        b.iter(|| {
            let mut state = PresenceState::new(ReplicaId(0));
            for i in 0..MEMBERS {
                state.track(owner(i), Arc::from(format!("u{i}")), meta(i));
            }
            state.len()
        })
    });
    let mut full = PresenceState::new(ReplicaId(1));
    for i in 0..MEMBERS {
        full.track(owner(i), Arc::from(format!("u{i}")), meta(i));
    }
    group.bench_function("untrack_1k", |b| {
        b.iter_batched(|| full.clone(), |mut state| {
            for i in 0..MEMBERS {
                state.untrack(owner(i));
            }
            state.len()
        }, criterion::BatchSize::SmallInput)
    });
    let delta = full.as_delta();
    group.bench_function("merge_1k_into_empty", |b| {
        b.iter(|| {
            let mut state = PresenceState::new(ReplicaId(2));
            state.merge(&delta).joins.len()
        })
    });
    group.finish();
}

/// 1,000 members join one topic on one shard and track, arriving `per_window` per coalescing
/// window (`None`: no coalescing). Returns (presence_diff frames delivered, diff messages).
fn churn(per_window: Option<u64>) -> (u64, u64) {
    let coalescing = if per_window.is_some() { PresenceCoalescing::Window } else { PresenceCoalescing::Immediate };
    let mut shard = ShardState::new(ShardId(0), 1).with_coalescing(coalescing);
    let topic = TopicKey::new(engine::TenantId::SINGLE, "realtime:doc", false);
    let (mut frames, mut diffs) = (0u64, 0u64);
    let mut pending_flush = false;
    let mut run = |shard: &mut ShardState, msgs: Vec<(ShardId, ShardMsg)>, pending_flush: &mut bool| {
        let mut queue = std::collections::VecDeque::from(msgs);
        while let Some((_, msg)) = queue.pop_front() {
            let mut out = Vec::new();
            match shard.handle(msg, &mut out) {
                Some(LocalEffect::Deliver { topic, message }) => {
                    if let BroadcastBody::PresenceDiff(_) = message.body {
                        diffs += 1;
                        frames += shard.local_subscribers(&topic).len() as u64;
                    }
                }
                Some(LocalEffect::SchedulePresenceFlush { .. }) => *pending_flush = true,
                _ => {}
            }
            queue.extend(out);
        }
    };
    for i in 0..MEMBERS {
        let sub = LocalSub { conn: ConnId(i), channel: ChannelSerial(1), format: Format::V2, prefixed: true, receive_own: false, receive_broadcasts: true, receive_presence: true };
        let join = shard.local_join(topic.clone(), sub, true);
        let track = (ShardId(0), ShardMsg::Track { topic: topic.clone(), subscriber: owner(i), key: Arc::from(format!("u{i}")), meta: meta(i) });
        run(&mut shard, vec![join, track], &mut pending_flush);
        if let Some(n) = per_window {
            if (i + 1) % n == 0 && pending_flush {
                let mut out = Vec::new();
                shard.flush_presence(&topic, &mut out);
                pending_flush = false;
                run(&mut shard, out, &mut pending_flush);
            }
        }
    }
    if pending_flush {
        let mut out = Vec::new();
        shard.flush_presence(&topic, &mut out);
        run(&mut shard, out, &mut pending_flush);
    }
    (frames, diffs)
}

fn churn_bench(c: &mut Criterion) {
    for (name, per_window) in [("immediate", None), ("window_50_joins", Some(50)), ("window_10_joins", Some(10))] {
        let (frames, diffs) = churn(per_window);
        println!("presence_churn/{name}: {diffs} diffs, {frames} presence_diff frames delivered for {MEMBERS} members");
    }
    let mut group = c.benchmark_group("presence_churn_1k");
    group.sample_size(10);
    group.bench_function("immediate", |b| b.iter(|| churn(None)));
    group.bench_function("window_50_joins", |b| b.iter(|| churn(Some(50))));
    group.finish();
}

criterion_group!(benches, crdt, churn_bench);
criterion_main!(benches);
