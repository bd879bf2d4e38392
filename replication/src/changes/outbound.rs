//! The core's queues to the shards: one bounded flume queue per shard
//! ([`super::SHARD_INBOX_MAX`]) plus, when it is full, an overflow queue per shard drained in
//! order by a flusher task — the same rule as the cross-shard mesh (`net::server::shard`):
//!
//! - control messages (`System`, `Authorized`, `Replayed`) are **never dropped**: a lost
//!   `Authorized` would leave a private join waiting, a lost `System` would leave a subscription
//!   unanswered. They are bounded by the channels the core knows × the answers each can get
//!   (one per binding, per check, per stream transition);
//! - changes and database broadcasts (`Change`, `Publish`) wait in the overflow too, so every
//!   shard sees the core's messages in order, but beyond [`OVERFLOW_MESSAGES_MAX`] queued
//!   messages they are dropped and counted (best effort, PROTOCOL.md §5.9).
//!
//! No RefCell borrow is held across an await; the flusher is a tokio task on the core's thread.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use engine::ShardId;

use super::PgOut;

/// Overflow per shard beyond which droppable messages (changes, database broadcasts) are
/// dropped; control messages are queued whatever the length.
pub(crate) const OVERFLOW_MESSAGES_MAX: usize = 65_536;

/// The core's senders to each shard's inbox, with their overflow queues.
pub(crate) struct Outbound {
    senders: Vec<flume::Sender<PgOut>>,
    /// Cluster mode: where messages for other nodes' channels go (shard ids from
    /// `engine::changes::REMOTE_SHARD_BASE`), bounded by the link; full → dropped and counted.
    remote: Option<flume::Sender<(ShardId, PgOut)>>,
    overflow: RefCell<Vec<VecDeque<PgOut>>>,
    flushing: Vec<Cell<bool>>,
    dropped: Cell<u64>,
}

/// Whether a full queue may drop the message.
fn is_droppable(out: &PgOut) -> bool {
    matches!(out, PgOut::Change(_) | PgOut::Publish { .. })
}

impl Outbound {
    #[cfg(test)]
    pub(crate) fn new(senders: Vec<flume::Sender<PgOut>>) -> Rc<Outbound> {
        Outbound::with_remote(senders, None)
    }

    /// With a sink for other nodes' channels (cluster mode).
    pub(crate) fn with_remote(senders: Vec<flume::Sender<PgOut>>, remote: Option<flume::Sender<(ShardId, PgOut)>>) -> Rc<Outbound> {
        let shards = senders.len();
        Rc::new(Outbound {
            senders,
            remote,
            overflow: RefCell::new((0..shards).map(|_| VecDeque::new()).collect()),
            flushing: (0..shards).map(|_| Cell::new(false)).collect(),
            dropped: Cell::new(0),
        })
    }

    /// Droppable messages dropped so far (`/metrics`).
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    /// Sends without waiting: straight into the inbox when it has room and nothing is queued
    /// before it, else into the overflow (which a flusher drains in order).
    pub(crate) fn send(self: &Rc<Self>, shard: ShardId, out: PgOut) {
        let index = shard.index();
        if shard.0 >= engine::changes::REMOTE_SHARD_BASE {
            if let Some(remote) = &self.remote {
                if remote.try_send((shard, out)).is_err() {
                    self.dropped.set(self.dropped.get() + 1);
                    tracing::warn!("cluster link queue full: a message for another node's channel was dropped");
                }
            }
            return;
        }
        let Some(sender) = self.senders.get(index) else { return };
        if !self.flushing[index].get() {
            let rejected = match sender.try_send(out) {
                Ok(()) => return,
                Err(flume::TrySendError::Full(out)) => out,
                Err(flume::TrySendError::Disconnected(_)) => return, // shutdown
            };
            self.overflow.borrow_mut()[index].push_back(rejected);
            self.flushing[index].set(true);
            let outbound = Rc::clone(self);
            tokio::task::spawn_local(async move { outbound.flush(index).await });
            return;
        }
        let mut overflow = self.overflow.borrow_mut();
        if overflow[index].len() >= OVERFLOW_MESSAGES_MAX && is_droppable(&out) {
            drop(overflow);
            self.dropped.set(self.dropped.get() + 1);
            tracing::warn!(shard = shard.0, "shard inbox and overflow full: a change was dropped");
            return;
        }
        overflow[index].push_back(out);
    }

    async fn flush(self: Rc<Self>, index: usize) {
        loop {
            let next = self.overflow.borrow_mut()[index].pop_front();
            let Some(out) = next else { break };
            if self.senders[index].send_async(out).await.is_err() {
                self.overflow.borrow_mut()[index].clear();
                break;
            }
        }
        self.flushing[index].set(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::{ChannelSerial, ConnId};

    fn system(n: u64) -> PgOut {
        PgOut::System { conn: ConnId(n), channel: ChannelSerial(1), status: "ok", message: String::new() }
    }

    fn change() -> PgOut {
        PgOut::Change(std::sync::Arc::new(super::super::ChangeDelivery { payload_v1: Default::default(), payload_v2: Default::default(), targets: Vec::new(), position: (0, 0) }))
    }

    /// A full inbox: control messages all arrive, in order, once the shard reads; changes
    /// beyond the overflow bound are dropped and counted.
    #[test]
    fn control_messages_survive_a_full_inbox_in_order() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&runtime, async {
            let (sender, inbox) = flume::bounded(2);
            let outbound = Outbound::new(vec![sender]);
            let total = 2 + OVERFLOW_MESSAGES_MAX as u64 + 10;
            for n in 0..total {
                outbound.send(ShardId(0), system(n));
            }
            for _ in 0..5 {
                outbound.send(ShardId(0), change()); // the overflow is over its bound
            }
            assert_eq!(outbound.dropped(), 5);
            let mut next = 0;
            while next < total {
                match inbox.recv_async().await.unwrap() {
                    PgOut::System { conn, .. } => {
                        assert_eq!(conn.0, next, "in order");
                        next += 1;
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            // Drained: a change goes straight through again.
            tokio::task::yield_now().await;
            outbound.send(ShardId(0), change());
            assert!(matches!(inbox.recv_async().await.unwrap(), PgOut::Change(_)));
        });
    }
}
