//! Read readiness of plain TCP WebSocket connections, outside io_uring.
//!
//! Why: every pending io_uring poll request sits in a list that the kernel walks on each
//! `ASYNC_CANCEL`, and glommio cancels its preemption timer on every pass of its reactor
//! (`io_poll_find`, measured at 68–76 % of an idle shard's CPU with 15,000 connections, one poll
//! pending each). So an idle plain connection has no io_uring request at all: its task reads with
//! a non-blocking `recv` into the shard's scratch buffer and, when the socket is empty, registers
//! the descriptor with the shard's epoll set (one-shot). One thread per shard (pinned like the
//! shard, it inherits its affinity) waits in `epoll_wait` and passes the ready connections' ids
//! to the shard in batches over a bounded channel; the shard wakes those tasks. The io_uring ring
//! keeps only the requests of connections that are writing into a full socket (and TLS ones).
//!
//! Bound: the channel holds [`READY_BATCHES_MAX`] batches; when it is full the thread blocks
//! (the shard is behind; one-shot registration means each connection is reported at most once
//! until its task registers it again, so nothing accumulates).

use std::cell::Cell;
use std::os::fd::RawFd;
use std::rc::Rc;

use engine::ConnId;

use super::shard::{Conn, Shard};

/// Batches of ready connection ids in flight from the epoll thread to its shard.
const READY_BATCHES_MAX: usize = 64;
/// Events taken per `epoll_wait`.
const EVENTS_PER_WAIT: usize = 1024;

thread_local! {
    /// This shard thread's epoll set (-1 until [`start`] ran on it).
    static EPOLL_FD: Cell<RawFd> = const { Cell::new(-1) };
}

/// Creates this shard's epoll set, its thread and the task that wakes ready connections.
pub(crate) fn start(shard: &Rc<Shard>) -> std::io::Result<()> {
    // SAFETY: plain syscall; the descriptor is owned by this shard for the process's life.
    let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epfd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    EPOLL_FD.with(|fd| fd.set(epfd));
    let (tx, rx) = flume::bounded::<Vec<u64>>(READY_BATCHES_MAX);
    std::thread::Builder::new().name(format!("shard{}-epoll", shard.id.0)).spawn(move || wait_loop(epfd, tx))?;
    let shard = Rc::clone(shard);
    glommio::spawn_local(async move {
        while let Ok(batch) = rx.recv_async().await {
            let conns = shard.conns.borrow();
            for id in batch {
                if let Some(conn) = conns.get(&ConnId(id)) {
                    conn.readable();
                }
            }
        }
    })
    .detach();
    Ok(())
}

fn wait_loop(epfd: RawFd, tx: flume::Sender<Vec<u64>>) {
    let mut events: Vec<libc::epoll_event> = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_WAIT];
    loop {
        // SAFETY: `events` has EVENTS_PER_WAIT writable entries; `epfd` stays open.
        let n = unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), EVENTS_PER_WAIT as i32, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(error = %std::io::Error::last_os_error(), "epoll_wait failed: plain connections' reads stop");
            return;
        }
        let batch: Vec<u64> = events[..n as usize].iter().map(|e| e.u64).collect();
        if tx.send(batch).is_err() {
            return;
        }
    }
}

/// Registers `conn`'s socket for one read-readiness report (its task found the socket empty).
/// Returns `false` when the shard has no epoll set (the caller then cannot wait this way).
pub(crate) fn arm(conn: &Conn, id: ConnId) -> bool {
    let epfd = EPOLL_FD.with(|fd| fd.get());
    if epfd < 0 {
        return false;
    }
    let mut event = libc::epoll_event { events: (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLONESHOT) as u32, u64: id.0 };
    let op = if conn.epoll_added.get() { libc::EPOLL_CTL_MOD } else { libc::EPOLL_CTL_ADD };
    // SAFETY: `conn.fd` is open (its task, the caller, holds the socket).
    let rc = unsafe { libc::epoll_ctl(epfd, op, conn.fd, &mut event) };
    if rc == 0 {
        conn.epoll_added.set(true);
        return true;
    }
    false
}

impl Conn {
    /// The epoll thread reported the socket readable: the one-shot registration is spent.
    pub(crate) fn readable(&self) {
        self.read_armed.set(false);
        if let Some(waker) = self.read_waker.borrow_mut().take() {
            waker.wake();
        }
    }
}

/// Reads what the socket of plain connection `conn` holds into `buf` (through the shard's
/// scratch); when it is empty, arms the epoll registration and keeps the task's waker.
pub(crate) fn poll_read(cx: &mut std::task::Context<'_>, conn: &Conn, id: ConnId, scratch: &mut [u8], buf: &mut bytes::BytesMut) -> std::task::Poll<std::io::Result<usize>> {
    use std::task::Poll;
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
                {
                    let mut waker = conn.read_waker.borrow_mut();
                    if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        *waker = Some(cx.waker().clone());
                    }
                }
                if !conn.read_armed.get() {
                    if !arm(conn, id) {
                        return Poll::Ready(Err(std::io::Error::last_os_error()));
                    }
                    conn.read_armed.set(true);
                }
                return Poll::Pending;
            }
            _ => return Poll::Ready(Err(error)),
        }
    }
}
