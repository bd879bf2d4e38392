//! Readiness of plain TCP WebSocket connections, outside io_uring.
//!
//! Why: every pending io_uring poll request sits in a list that the kernel walks on each
//! `ASYNC_CANCEL`, and glommio cancels its preemption timer on every pass of its reactor
//! (`io_poll_find`, measured at 68–76 % of an idle shard's CPU with 15,000 connections, one poll
//! pending each). So a live plain connection has no io_uring request at all: it is a bare
//! descriptor (`conn::PlainSocket`); its task reads with a non-blocking `recv` into the shard's
//! scratch buffer and writes (when the shard's flusher could not) with a non-blocking `send`, and
//! when the socket is empty (or full) waits on one of the shard's two epoll sets, where the
//! descriptor is registered once, edge-triggered for reads and writes (no syscall to re-arm it
//! per read). One thread per shard (pinned like the shard, it
//! inherits its affinity) waits on them and passes the ready connections' ids to the shard in
//! batches over a bounded channel; the shard wakes those tasks.
//!
//! The two sets: a connection whose last two reads were less than [`CHATTY_GAP_MS`] apart, or
//! that waited to write, is registered in the *fast* set, reported as soon as it is ready. Any
//! other (an idle connection whose next read is most likely its heartbeat) goes to the *slow*
//! set, which the thread drains at most once per [`SLOW_TICK`]: the heartbeats of thousands of
//! idle connections then share a wake-up of the thread and of the shard instead of costing two
//! each. The slow set is itself a member of the fast set (one-shot), so a thread with nothing
//! ready sleeps without a timer. Cost: the first message of a connection that was silent for a
//! second or more waits up to one tick.
//!
//! Bound: the channel holds [`READY_BATCHES_MAX`] batches; when it is full the thread blocks
//! (the shard is behind; a connection is reported once per edge, and edges come only from what
//! its peer sends or acknowledges, which the peer's own TCP window bounds).

use std::cell::Cell;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use engine::ConnId;

use super::shard::{Conn, Shard};

/// Batches of ready connection ids in flight from the epoll thread to its shard.
const READY_BATCHES_MAX: usize = 64;
/// Events taken per `epoll_wait`.
const EVENTS_PER_WAIT: usize = 1024;
/// Reads closer together than this make a connection "chatty" (registered in the fast set).
pub(crate) const CHATTY_GAP_MS: u32 = 1_000;
/// The slow set is drained at most once per tick.
const SLOW_TICK: Duration = Duration::from_millis(10);
/// The slow set's own entry in the fast set (never a connection id: ids count up from 0).
const SLOW_SET_TOKEN: u64 = u64::MAX;

/// Which of the shard's epoll sets a connection is registered in (`Conn::epoll_set`).
pub(crate) const SET_NONE: u8 = 0;
const SET_FAST: u8 = 1;
const SET_SLOW: u8 = 2;

thread_local! {
    /// This shard thread's epoll sets, fast and slow (-1 until [`start`] ran on it).
    static EPOLL_FDS: Cell<(RawFd, RawFd)> = const { Cell::new((-1, -1)) };
}

fn epoll_create() -> std::io::Result<RawFd> {
    // SAFETY: plain syscall; the descriptor is owned by this shard for the process's life.
    let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(epfd)
}

/// (Re-)arms the slow set's one-shot entry in the fast set.
fn arm_slow_set(fast: RawFd, slow: RawFd, op: libc::c_int) -> std::io::Result<()> {
    let mut event = libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLONESHOT) as u32, u64: SLOW_SET_TOKEN };
    // SAFETY: both descriptors are this shard's epoll sets, open for the process's life.
    if unsafe { libc::epoll_ctl(fast, op, slow, &mut event) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Creates this shard's epoll sets, their thread and the task that wakes ready connections.
pub(crate) fn start(shard: &Rc<Shard>) -> std::io::Result<()> {
    let fast = epoll_create()?;
    let slow = epoll_create()?;
    arm_slow_set(fast, slow, libc::EPOLL_CTL_ADD)?;
    EPOLL_FDS.with(|fds| fds.set((fast, slow)));
    let (tx, rx) = flume::bounded::<Vec<u64>>(READY_BATCHES_MAX);
    std::thread::Builder::new().name(format!("shard{}-epoll", shard.id.0)).spawn(move || wait_loop(fast, slow, tx))?;
    let shard = Rc::clone(shard);
    glommio::spawn_local(async move {
        while let Ok(batch) = rx.recv_async().await {
            let conns = shard.conns.borrow();
            for id in batch {
                if let Some(conn) = conns.get(&ConnId(id)) {
                    conn.wake_task();
                }
            }
        }
    })
    .detach();
    Ok(())
}

/// `epoll_wait` into `events`, retrying on EINTR; `None` when the set failed.
fn wait(epfd: RawFd, events: &mut [libc::epoll_event], timeout_ms: i32) -> Option<usize> {
    loop {
        // SAFETY: `events` has `events.len()` writable entries; `epfd` stays open.
        let n = unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), events.len() as i32, timeout_ms) };
        if n >= 0 {
            return Some(n as usize);
        }
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            tracing::error!(error = %std::io::Error::last_os_error(), "epoll_wait failed: plain connections' reads stop");
            return None;
        }
    }
}

fn wait_loop(fast: RawFd, slow: RawFd, tx: flume::Sender<Vec<u64>>) {
    let mut events: Vec<libc::epoll_event> = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_WAIT];
    // The slow set has ready members and is due at this instant (`None`: nothing pending).
    let mut slow_due: Option<Instant> = None;
    let mut last_slow_drain = Instant::now() - SLOW_TICK;
    loop {
        let timeout_ms = match slow_due {
            None => -1,
            // Rounded up: a wait of 0 ms for a tick due in under a millisecond would spin.
            Some(due) => due.saturating_duration_since(Instant::now()).as_micros().div_ceil(1000).min(i32::MAX as u128) as i32,
        };
        let Some(n) = wait(fast, &mut events, timeout_ms) else { return };
        let mut batch: Vec<u64> = Vec::with_capacity(n);
        for event in &events[..n] {
            if event.u64 == SLOW_SET_TOKEN {
                slow_due = Some(last_slow_drain + SLOW_TICK);
            } else {
                batch.push(event.u64);
            }
        }
        if slow_due.is_some_and(|due| Instant::now() >= due) {
            let Some(m) = wait(slow, &mut events, 0) else { return };
            batch.extend(events[..m].iter().map(|e| e.u64));
            last_slow_drain = Instant::now();
            slow_due = None;
            // Level-triggered: when more are ready than one wait takes, it is reported again
            // at once and drained at the next tick.
            if let Err(error) = arm_slow_set(fast, slow, libc::EPOLL_CTL_MOD) {
                tracing::error!(%error, "epoll: the slow set could not be re-armed: idle connections' reads stop");
                return;
            }
        }
        if !batch.is_empty() && tx.send(batch).is_err() {
            return;
        }
    }
}

/// Makes sure `conn`'s socket is registered, edge-triggered, for reads and writes in the set it
/// belongs in now: the fast set when it is chatty or `writing`, else the slow set. A socket is
/// registered once and stays registered (no re-arming per read: the task always reads or
/// writes until `EAGAIN` before it waits, so every later arrival is a new edge); it moves
/// between the sets only when its pace changes (a delete and an add). Returns `false` when the
/// shard has no epoll sets or the registration failed (the caller then cannot wait this way).
fn register(conn: &Conn, id: ConnId, writing: bool) -> bool {
    let set = if conn.chatty.get() || writing { SET_FAST } else { SET_SLOW };
    let current = conn.epoll_set.get();
    if current == set {
        return true;
    }
    let (fast, slow) = EPOLL_FDS.with(|fds| fds.get());
    if fast < 0 {
        return false;
    }
    if current != SET_NONE {
        let old = if current == SET_FAST { fast } else { slow };
        // SAFETY: `conn.fd` is open (its task, the caller, holds the socket).
        unsafe { libc::epoll_ctl(old, libc::EPOLL_CTL_DEL, conn.fd, std::ptr::null_mut()) };
        conn.epoll_set.set(SET_NONE);
    }
    let epfd = if set == SET_FAST { fast } else { slow };
    let mut event = libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32, u64: id.0 };
    // SAFETY: `conn.fd` is open (its task, the caller, holds the socket).
    if unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, conn.fd, &mut event) } != 0 {
        return false;
    }
    conn.epoll_set.set(set);
    true
}

impl Conn {
    /// The epoll thread reported the socket (an edge: something arrived, room freed up, or the
    /// peer closed), or the idle sweep gave up on a stalled write: the task polls both
    /// directions again.
    pub(crate) fn wake_task(&self) {
        // Taken first: the borrow ends before `wake`, whatever the waker does.
        let waker = self.epoll_waker.borrow_mut().take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn keep_waker(&self, cx: &std::task::Context<'_>) {
        let mut waker = self.epoll_waker.borrow_mut();
        if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *waker = Some(cx.waker().clone());
        }
    }
}

/// Reads what the socket of plain connection `conn` holds into `buf` (through the shard's
/// scratch); when it is empty, arms the epoll registration and keeps the task's waker.
pub(crate) fn poll_read(cx: &mut std::task::Context<'_>, conn: &Conn, id: ConnId, scratch: &mut [u8], buf: &mut bytes::BytesMut) -> Poll<std::io::Result<usize>> {
    loop {
        // SAFETY: `conn.fd` is open (the calling task holds the socket); `scratch` is writable.
        let n = unsafe { libc::recv(conn.fd, scratch.as_mut_ptr().cast(), scratch.len(), libc::MSG_DONTWAIT) };
        if n >= 0 {
            buf.extend_from_slice(&scratch[..n as usize]);
            return Poll::Ready(Ok(n as usize));
        }
        let error = std::io::Error::last_os_error();
        match error.kind() {
            std::io::ErrorKind::Interrupted => continue,
            std::io::ErrorKind::WouldBlock => {
                conn.keep_waker(cx);
                if !register(conn, id, false) {
                    return Poll::Ready(Err(std::io::Error::last_os_error()));
                }
                return Poll::Pending;
            }
            _ => return Poll::Ready(Err(error)),
        }
    }
}

/// Writes from `bytes` to the socket of plain connection `conn` (the task's slow path: the
/// flusher found the socket full, or the queue is closing). When the socket is full, arms the
/// epoll registration for writability and stamps when the stall began (the idle sweep drops a
/// connection whose write has made no progress for `WRITE_STALL_TIMEOUT`, and then marks its
/// queue dead, which ends this write with `TimedOut`).
pub(crate) fn poll_write(cx: &mut std::task::Context<'_>, conn: &Conn, id: ConnId, bytes: &[u8]) -> Poll<std::io::Result<usize>> {
    loop {
        if conn.outbox.state() == super::outbox::OutboxState::Dead {
            return Poll::Ready(Err(std::io::ErrorKind::TimedOut.into()));
        }
        // SAFETY: `conn.fd` is open (the calling task holds the socket); `bytes` is readable.
        let n = unsafe { libc::send(conn.fd, bytes.as_ptr().cast(), bytes.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if n >= 0 {
            conn.write_stalled_ms.set(0);
            return Poll::Ready(Ok(n as usize));
        }
        let error = std::io::Error::last_os_error();
        match error.kind() {
            std::io::ErrorKind::Interrupted => continue,
            std::io::ErrorKind::WouldBlock => {
                if conn.write_stalled_ms.get() == 0 {
                    // Never 0 while stalled (0 means "not stalled").
                    conn.write_stalled_ms.set(super::flush::clock_ms() | 1);
                }
                conn.keep_waker(cx);
                if !register(conn, id, true) {
                    return Poll::Ready(Err(std::io::Error::last_os_error()));
                }
                return Poll::Pending;
            }
            _ => return Poll::Ready(Err(error)),
        }
    }
}
