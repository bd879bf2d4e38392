//! Process-wide control of a running server: the graceful drain (CONTRACT.md "Shutdown").
//!
//! The binary's signal thread calls [`Control::start_drain`]; every shard learns it at once
//! (a flume channel whose only sender is dropped wakes every waiting receiver), and request
//! handlers read [`Control::is_draining`] (one relaxed load) to answer 503 while draining.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Shared by the binary and every shard.
#[derive(Debug)]
pub struct Control {
    draining: AtomicBool,
    /// Dropped by `start_drain`: that disconnects `wake`, waking every shard.
    trigger: Mutex<Option<flume::Sender<()>>>,
    wake: flume::Receiver<()>,
}

impl Default for Control {
    fn default() -> Control {
        let (trigger, wake) = flume::bounded(1);
        Control { draining: AtomicBool::new(false), trigger: Mutex::new(Some(trigger)), wake }
    }
}

impl Control {
    /// Starts the drain (idempotent).
    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.trigger.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
    }

    /// Whether a drain has started.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Resolves once a drain has started.
    pub(crate) async fn drain_started(&self) {
        // Nothing is ever sent: the only outcome is `Disconnected`, when the sender is dropped.
        let _ = self.wake.recv_async().await;
    }
}
