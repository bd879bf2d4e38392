//! One shard's graceful drain (CONTRACT.md "Shutdown"; PROTOCOL.md §1.11).
//!
//! The listener is already closed when this runs. The shard first lets broadcasts accepted
//! before the signal reach their subscribers' queues ([`DRAIN_SETTLE`], and until its own
//! cross-shard overflow queues are empty), then closes its connections spread evenly over the
//! rest of the drain budget: each gets `system` "Server requested disconnect" on every joined
//! channel, behind everything already queued for it, then close 1012. Whatever is still open
//! at the budget's end is dropped. The process's watchdog (the binary) ends everything at the
//! budget + 5 s in any case.

use std::rc::Rc;
use std::time::{Duration, Instant};

use engine::client_error::CloseReason;
use engine::ConnId;

use super::outbox::OutboxState;
use super::shard::{Conn, Shard};

/// Time for broadcasts accepted just before the signal to cross the shards (sender → owner →
/// subscriber's shard, two SPSC hops) before the first connection closes.
pub(crate) const DRAIN_SETTLE: Duration = Duration::from_millis(300);
/// Longest extra wait for this shard's overflow queues to empty before closing anyone.
const DRAIN_OVERFLOW_WAIT: Duration = Duration::from_secs(1);
/// The closes are spread over this share of the budget left after settling; the rest lets the
/// last connections flush their queues.
const DRAIN_SPREAD_PERCENT: u32 = 80;
/// How often the drain looks at its connections.
const DRAIN_TICK: Duration = Duration::from_millis(10);
/// After the budget, how long to wait for the dropped connections' tasks to finish.
const DRAIN_LINGER: Duration = Duration::from_millis(500);

impl Shard {
    /// Drains this shard's WebSocket connections; returns when none is left or the budget
    /// (`REALTIME_DRAIN_SECS`, at least [`DRAIN_SETTLE`] + 1 s) is spent.
    pub(crate) async fn drain(self: Rc<Self>) {
        let start = Instant::now();
        let budget = self.config.drain.max(DRAIN_SETTLE + Duration::from_secs(1));
        let open = self.conns.borrow().len();
        tracing::info!(shard = self.id.0, connections = open, budget_ms = budget.as_millis() as u64, "draining");
        glommio::timer::sleep(DRAIN_SETTLE).await;
        let overflow_deadline = Instant::now() + DRAIN_OVERFLOW_WAIT;
        while self.overflow_pending() && Instant::now() < overflow_deadline {
            glommio::timer::sleep(DRAIN_TICK).await;
        }
        let spread_start = Instant::now();
        let spread = budget.saturating_sub(spread_start - start) * DRAIN_SPREAD_PERCENT / 100;
        let deadline = start + budget;
        let planned = self.conns.borrow().len().max(1);
        let mut closed = 0usize;
        loop {
            if self.conns.borrow().is_empty() {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                self.drop_all();
                break;
            }
            // How many closes are due by now: a straight line from 0 to all over `spread`.
            let due = if spread.is_zero() || now >= spread_start + spread {
                usize::MAX
            } else {
                let elapsed = (now - spread_start).as_micros();
                ((planned as u128 * elapsed).div_ceil(spread.as_micros().max(1))) as usize
            };
            if closed < due {
                for conn in self.open_conns(due - closed) {
                    disconnect(&conn);
                    closed += 1;
                }
            }
            glommio::timer::sleep(DRAIN_TICK).await;
        }
        let linger = Instant::now() + DRAIN_LINGER;
        while !self.conns.borrow().is_empty() && Instant::now() < linger {
            glommio::timer::sleep(DRAIN_TICK).await;
        }
        tracing::info!(shard = self.id.0, left = self.conns.borrow().len(), elapsed_ms = start.elapsed().as_millis() as u64, "drained");
    }

    /// Up to `n` connections not closing yet, oldest first.
    fn open_conns(&self, n: usize) -> Vec<Rc<Conn>> {
        let conns = self.conns.borrow();
        let mut open: Vec<(ConnId, &Rc<Conn>)> = conns.iter().filter(|(_, c)| c.outbox.state() == OutboxState::Open).map(|(id, c)| (*id, c)).collect();
        open.sort_unstable_by_key(|(id, _)| *id);
        open.into_iter().take(n).map(|(_, c)| Rc::clone(c)).collect()
    }

    /// The budget is spent: every connection still here is dropped without more writes.
    fn drop_all(&self) {
        let conns: Vec<Rc<Conn>> = self.conns.borrow().values().cloned().collect();
        tracing::warn!(shard = self.id.0, connections = conns.len(), "drain budget spent: dropping the connections left");
        for conn in conns {
            conn.outbox.kill();
            // SAFETY: a connection is in `conns` only while its task holds the stream, so the
            // descriptor is open and belongs to it; shutting it down ends a write stuck on a
            // peer that stopped reading.
            unsafe { libc::shutdown(conn.fd, libc::SHUT_RDWR) };
        }
    }
}

/// Queues the disconnect notices behind everything already queued, then close 1012.
pub(crate) fn disconnect(conn: &Conn) {
    for frame in conn.session.borrow().disconnect_notices() {
        conn.outbox.push(frame);
    }
    conn.outbox.close(CloseReason::ServiceRestart);
}
