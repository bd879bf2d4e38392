//! The shard-level halves of a connection's life: the flusher that writes queued frames for
//! every plain TCP connection whose socket has room, and the idle sweep.
//!
//! Flusher: a push onto an idle queue puts the connection on the shard's ready list and wakes
//! the one flusher task; the flusher sends each listed connection's frames with one
//! non-blocking `sendmsg` (no copy: the `iovec`s point into the shared, encode-once frames).
//! A broadcast to N local subscribers therefore wakes one task, not N. When a socket takes
//! less than it was offered, the rest stays queued and the connection's own task takes over
//! (it awaits writability; see `outbox.rs`), so a slow reader never blocks the flusher.
//!
//! Idle sweep: a read completing stamps the connection with the coarse clock; once a second
//! the shard walks its connections and closes (1000, idle timeout) those silent for the idle
//! timeout. No read is armed with a timer, and no read is ever raced against one: the close
//! goes through the outbox, and the connection's task stops reading only after it has handled
//! every read that completed.

use std::rc::Rc;
use std::sync::OnceLock;
use std::task::Poll;
use std::time::Instant;

use engine::client_error::CloseReason;

use super::outbox::OutboxState;
use super::shard::{Conn, Shard};

/// Most `iovec`s per `sendmsg` (frames per write): Linux's `UIO_MAXIOV`. A backlog of small
/// frames still leaves in one call (a lower cap multiplied the syscalls under load).
const IOV_MAX: usize = 1024;
/// Most bytes offered per `sendmsg`.
const FLUSH_BATCH_BYTES: usize = 256 * 1024;

/// Milliseconds since the process's first call: the idle sweep's coarse clock (wraps after
/// 49 days; compared with `wrapping_sub`).
pub(crate) fn clock_ms() -> u32 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u32
}

impl Shard {
    /// Puts `conn` on the ready list (its outbox said it is not listed yet) and wakes the
    /// flusher.
    pub(crate) fn schedule(&self, conn: &Rc<Conn>) {
        self.ready.borrow_mut().push(Rc::clone(conn));
        // Taken first: the borrow ends before `wake`, whatever the waker does.
        let waker = self.flusher.borrow_mut().take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Writes the ready connections' queues, forever.
    pub(crate) async fn flusher(self: Rc<Self>) {
        let mut list: Vec<Rc<Conn>> = Vec::new();
        let mut iovs: Vec<libc::iovec> = Vec::with_capacity(IOV_MAX);
        loop {
            std::future::poll_fn(|cx| {
                if self.ready.borrow().is_empty() {
                    *self.flusher.borrow_mut() = Some(cx.waker().clone());
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
            .await;
            std::mem::swap(&mut list, &mut *self.ready.borrow_mut());
            for conn in list.drain(..) {
                conn.outbox.unscheduled();
                self.flush_one(&conn, &mut iovs);
            }
            if list.capacity() > 4096 {
                list = Vec::new();
            }
            glommio::yield_if_needed().await;
        }
    }

    fn flush_one(&self, conn: &Conn, iovs: &mut Vec<libc::iovec>) {
        let outbox = &conn.outbox;
        loop {
            // The connection's task took the queue over (closing, or socket full), or it is
            // empty: nothing for the flusher. A connection whose task ended is never `Open`,
            // so its descriptor is never written here after it was closed.
            if !outbox.shard_writes() {
                return;
            }
            let offered = outbox.iovecs(iovs, IOV_MAX, FLUSH_BATCH_BYTES);
            if offered == 0 {
                break;
            }
            // SAFETY: `conn.fd` is open (the queue is `Open`, so the task holding the socket is
            // alive); the iovecs point into frames held by the queue, unchanged during the call.
            let sent = unsafe {
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = iovs.as_mut_ptr();
                msg.msg_iovlen = iovs.len() as _;
                libc::sendmsg(conn.fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
            };
            iovs.clear();
            if sent < 0 {
                match std::io::Error::last_os_error().kind() {
                    std::io::ErrorKind::Interrupted => continue,
                    std::io::ErrorKind::WouldBlock => outbox.hand_to_task(),
                    // The peer is gone: the task sees the dead queue and ends.
                    _ => outbox.kill(),
                }
                break;
            }
            outbox.consume(sent as usize);
            if (sent as usize) < offered {
                outbox.hand_to_task();
                break;
            }
        }
        if let Some(read_at) = outbox.written_probe() {
            self.observe_delivery(read_at);
        }
    }

    /// Closes every open connection silent for the idle timeout, drops every plain one whose
    /// write has made no progress for `WRITE_STALL_TIMEOUT`, frees empty queues' buffers, and
    /// returns the connections with a channel whose token expired by `now_secs` (called once a
    /// second).
    pub(crate) fn sweep_idle(&self, now_secs: i64) -> Vec<Rc<Conn>> {
        let mut expired = Vec::new();
        let now = clock_ms();
        let idle_ms = self.config.limits.idle_timeout.as_millis().min(u32::MAX as u128 / 2) as u32;
        let stall_ms = super::conn::WRITE_STALL_TIMEOUT.as_millis() as u32;
        for conn in self.conns.borrow().values() {
            conn.outbox.release_if_empty();
            if now.wrapping_sub(conn.last_read_ms.get()) >= idle_ms && conn.outbox.state() == OutboxState::Open {
                conn.outbox.close(CloseReason::IdleTimeout);
            }
            let stalled = conn.write_stalled_ms.get();
            if stalled != 0 && now.wrapping_sub(stalled) >= stall_ms && conn.outbox.state() != OutboxState::Dead {
                // The peer stopped reading: its task's pending write ends (`TimedOut`) and the
                // connection is dropped without a close frame (there is no room to send one).
                conn.outbox.kill();
                conn.wake_task();
            }
            if conn.session.borrow().next_expiry().is_some_and(|exp| exp <= now_secs) {
                expired.push(Rc::clone(conn));
            }
        }
        super::outbox::trim_if_wanted();
        expired
    }
}
