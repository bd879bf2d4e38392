//! A connection's outbound queue, owned by its shard.
//!
//! Bound: [`OUTBOUND_QUEUED_BYTES_MAX`] bytes of queued frames. When a push would exceed it,
//! the queue is cleared and the connection is closed with 1008 "slow consumer": a subscriber
//! that cannot keep up never stalls its shard or grows memory, and the others keep receiving.
//!
//! Who writes the queue ([`Writer`]): on a plain TCP connection whose socket has room, the
//! shard's flusher does (`super::flush`): a push only puts the connection on the shard's ready
//! list, so a broadcast to N local subscribers wakes one task, and the flusher sends each
//! connection's queued frames in one `sendmsg`. When the socket is full (or the connection is
//! closing, or it is TLS) the connection's own task writes, awaiting writability, and hands the
//! queue back to the flusher once it is empty. Either way frames leave in batches: everything
//! queued while the previous write was in flight goes out in one write.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::task::{Poll, Waker};

use bytes::Bytes;

use engine::client_error::CloseReason;
use engine::limits::OUTBOUND_QUEUED_BYTES_MAX;

/// Sweeps (seconds) that return free heap to the system after a queue overflowed.
const TRIM_SWEEPS: u8 = 3;

thread_local! {
    /// Sweeps left that trim the heap (`trim_if_wanted`): set when a queue of this shard
    /// overflowed and was cleared.
    static TRIM_WANTED: Cell<u8> = const { Cell::new(0) };
}

/// After a slow consumer's queue (up to `OUTBOUND_QUEUED_BYTES_MAX`) was cleared: returns free
/// heap to the system (`malloc_trim`) at the next few sweeps (the frames it shared with other
/// subscribers are freed once those have sent them), so a burst to a stalled subscriber does not
/// leave the process's RSS megabytes higher. Called by the once-a-second sweep; a no-op otherwise.
pub(crate) fn trim_if_wanted() {
    let left = TRIM_WANTED.with(Cell::get);
    if left > 0 {
        TRIM_WANTED.with(|wanted| wanted.set(left - 1));
        // SAFETY: glibc's malloc_trim only releases free memory; it is thread-safe.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OutboxState {
    Open,
    /// Write what is queued, then a close frame with this reason, then shut down.
    Closing(CloseReason),
    /// Write nothing more (the peer is gone or the queue overflowed and was cleared).
    Dead,
}

#[derive(Debug)]
pub(crate) struct Outbox {
    frames: RefCell<VecDeque<Bytes>>,
    queued_bytes: Cell<usize>,
    state: Cell<OutboxState>,
    waker: RefCell<Option<Waker>>,
    /// Frames pushed and frames handed to the writer, ever (for the latency probe).
    pushed: Cell<u64>,
    taken: Cell<u64>,
    /// A sampled frame in the queue: (its number in `pushed`, when its message was read).
    probe: Cell<Option<(u64, u64)>>,
    /// The probe's frame is in the writer's current batch: observe it once written.
    probe_taken: Cell<Option<u64>>,
    /// Who writes the queue now.
    writer: Cell<Writer>,
    /// The connection is on its shard's ready list.
    scheduled: Cell<bool>,
    /// The front frame was partly sent by the flusher: its rest must go out before anything
    /// else, even a close frame (else the peer would see a broken frame).
    partial: Cell<bool>,
}

/// Who writes a connection's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Writer {
    /// The shard's flusher, straight to the socket (plain TCP with room in the socket).
    Shard,
    /// The connection's task (TLS, a full socket, or closing).
    Task,
}

/// What the writer should do next.
pub(crate) enum Next {
    /// Write the frames now in the writer's batch.
    Write,
    /// Write a close frame with this reason and stop.
    Close(CloseReason),
    /// Stop.
    Stop,
}

impl Outbox {
    /// A queue written by its connection's task only (`direct` false: TLS) or by the shard's
    /// flusher while the socket has room (`direct` true: plain TCP).
    pub(crate) fn new(direct: bool) -> Outbox {
        Outbox {
            frames: RefCell::new(VecDeque::new()),
            queued_bytes: Cell::new(0),
            state: Cell::new(OutboxState::Open),
            waker: RefCell::new(None),
            pushed: Cell::new(0),
            taken: Cell::new(0),
            probe: Cell::new(None),
            probe_taken: Cell::new(None),
            writer: Cell::new(if direct { Writer::Shard } else { Writer::Task }),
            scheduled: Cell::new(false),
            partial: Cell::new(false),
        }
    }

    /// Whether the shard's flusher writes this queue now (plain TCP, open, socket with room).
    pub(crate) fn shard_writes(&self) -> bool {
        self.writer.get() == Writer::Shard && self.state.get() == OutboxState::Open
    }

    /// After a push: whether the connection must go on the shard's ready list (it is written
    /// by the flusher, has frames and is not listed yet). Marks it listed.
    pub(crate) fn schedule(&self) -> bool {
        if self.scheduled.get() || !self.shard_writes() || self.frames.borrow().is_empty() {
            return false;
        }
        self.scheduled.set(true);
        true
    }

    /// The flusher took the connection off its ready list.
    pub(crate) fn unscheduled(&self) {
        self.scheduled.set(false);
    }

    /// The flusher's batch: up to `iov_max` frames and about `batch_bytes` bytes from the front,
    /// as `iovec`s pointing into the queued frames (valid until the queue changes). Returns
    /// the bytes described.
    pub(crate) fn iovecs(&self, iovs: &mut Vec<libc::iovec>, iov_max: usize, batch_bytes: usize) -> usize {
        iovs.clear();
        let frames = self.frames.borrow();
        let mut bytes = 0;
        for frame in frames.iter() {
            if iovs.len() == iov_max || (!iovs.is_empty() && bytes + frame.len() > batch_bytes) {
                break;
            }
            bytes += frame.len();
            iovs.push(libc::iovec { iov_base: frame.as_ptr() as *mut libc::c_void, iov_len: frame.len() });
        }
        bytes
    }

    /// The flusher wrote `written` bytes from the front: drops the frames sent whole and keeps
    /// the unsent rest of a frame sent in part at the front.
    pub(crate) fn consume(&self, mut written: usize) {
        let mut frames = self.frames.borrow_mut();
        self.queued_bytes.set(self.queued_bytes.get() - written);
        let mut whole = 0u64;
        while written > 0 {
            let Some(front) = frames.front_mut() else { break };
            if front.len() <= written {
                written -= front.len();
                frames.pop_front();
                whole += 1;
            } else {
                let _ = front.split_to(written);
                self.partial.set(true);
                break;
            }
            self.partial.set(false);
        }
        let taken = self.taken.get() + whole;
        self.taken.set(taken);
        if let Some((number, read_at)) = self.probe.get() {
            if number <= taken {
                self.probe.set(None);
                self.probe_taken.set(Some(read_at));
            }
        }
        if frames.capacity() > 4096 && frames.is_empty() {
            *frames = VecDeque::new();
        }
    }

    /// Frees the queue's buffer when it is empty (the idle sweep, once a second): an idle
    /// connection keeps no queue allocation, and a busy one does not reallocate per write.
    pub(crate) fn release_if_empty(&self) {
        let mut frames = self.frames.borrow_mut();
        if frames.is_empty() && frames.capacity() > 0 {
            *frames = VecDeque::new();
        }
    }

    /// The socket is full: the connection's task writes from now on (awaiting writability)
    /// and hands the queue back once it is empty.
    pub(crate) fn hand_to_task(&self) {
        self.writer.set(Writer::Task);
        self.wake();
    }

    /// Queues a frame. Returns `false` when the frame was not queued (closing or overflow).
    pub(crate) fn push(&self, frame: Bytes) -> bool {
        if self.state.get() != OutboxState::Open {
            return false;
        }
        let queued = self.queued_bytes.get() + frame.len();
        if queued > OUTBOUND_QUEUED_BYTES_MAX {
            let mut frames = self.frames.borrow_mut();
            // The rest of a frame already partly on the wire stays: it is sent before the close.
            let rest = if self.partial.get() { frames.pop_front() } else { None };
            frames.clear();
            self.queued_bytes.set(rest.as_ref().map_or(0, Bytes::len));
            frames.extend(rest);
            drop(frames);
            self.probe.set(None);
            self.state.set(OutboxState::Closing(CloseReason::SlowConsumer));
            self.wake();
            // Megabytes just went back to the allocator: the sweep hands them to the system.
            TRIM_WANTED.with(|wanted| wanted.set(TRIM_SWEEPS));
            return false;
        }
        self.queued_bytes.set(queued);
        self.pushed.set(self.pushed.get() + 1);
        self.frames.borrow_mut().push_back(frame);
        if self.writer.get() == Writer::Task {
            self.wake();
        }
        true
    }

    /// Asks the writer to flush and close with `reason` (first reason wins).
    pub(crate) fn close(&self, reason: CloseReason) {
        if self.state.get() == OutboxState::Open {
            self.state.set(OutboxState::Closing(reason));
            self.wake();
        }
    }

    /// The peer is gone: drop everything.
    pub(crate) fn kill(&self) {
        self.state.set(OutboxState::Dead);
        self.frames.borrow_mut().clear();
        self.queued_bytes.set(0);
        self.probe.set(None);
        self.wake();
    }

    /// Marks the frame just pushed as a latency sample (message read at `read_at_micros`);
    /// ignored while another sample is pending.
    pub(crate) fn mark_last(&self, read_at_micros: u64) {
        if self.probe.get().is_none() && self.probe_taken.get().is_none() {
            self.probe.set(Some((self.pushed.get(), read_at_micros)));
        }
    }

    /// After a write: the read time of a sampled frame that this write carried, once.
    pub(crate) fn written_probe(&self) -> Option<u64> {
        self.probe_taken.take()
    }

    /// Bytes queued and not yet handed to the writer.
    pub(crate) fn queued_bytes(&self) -> usize {
        self.queued_bytes.get()
    }

    pub(crate) fn state(&self) -> OutboxState {
        self.state.get()
    }

    fn wake(&self) {
        // Taken first: the borrow ends before `wake`, whatever the waker does.
        let waker = self.waker.borrow_mut().take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Waits for work, then moves up to `batch_bytes` worth of frames (at least one) into
    /// `batch` (the writer's reused vector: no allocation per write).
    #[cfg(test)]
    pub(crate) async fn next(&self, batch_bytes: usize, batch: &mut Vec<Bytes>) -> Next {
        std::future::poll_fn(|cx| self.poll_next(cx, batch_bytes, batch)).await
    }

    /// The connection task's side: `Ready` with work, or `Pending` (waker kept) while the queue
    /// is empty or the shard's flusher writes it. A closing or dead queue is always the task's.
    pub(crate) fn poll_next(&self, cx: &mut std::task::Context<'_>, batch_bytes: usize, batch: &mut Vec<Bytes>) -> Poll<Next> {
        let mut frames = self.frames.borrow_mut();
        match self.state.get() {
            OutboxState::Dead => return Poll::Ready(Next::Stop),
            OutboxState::Closing(reason) if frames.is_empty() => return Poll::Ready(Next::Close(reason)),
            OutboxState::Closing(_) => self.writer.set(Writer::Task),
            OutboxState::Open => {}
        }
        if frames.is_empty() || self.writer.get() == Writer::Shard {
            let mut waker = self.waker.borrow_mut();
            if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *waker = Some(cx.waker().clone());
            }
            return Poll::Pending;
        }
        batch.clear();
        let mut bytes = 0;
        while let Some(frame) = frames.front() {
            if !batch.is_empty() && bytes + frame.len() > batch_bytes {
                break;
            }
            bytes += frame.len();
            batch.push(frames.pop_front().expect("front exists"));
        }
        // The task now holds any partly sent frame and completes it before anything else.
        self.partial.set(false);
        self.queued_bytes.set(self.queued_bytes.get() - bytes);
        let taken = self.taken.get() + batch.len() as u64;
        self.taken.set(taken);
        if let Some((number, read_at)) = self.probe.get() {
            if number <= taken {
                self.probe.set(None);
                self.probe_taken.set(Some(read_at));
            }
        }
        Poll::Ready(Next::Write)
    }

    /// The task wrote everything it took: an open, empty queue of a plain TCP connection goes
    /// back to the shard's flusher.
    pub(crate) fn task_idle(&self, direct: bool) {
        if direct && self.state.get() == OutboxState::Open && self.frames.borrow().is_empty() {
            self.writer.set(Writer::Shard);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u8) -> Bytes {
        Bytes::from(vec![n; 10])
    }

    #[test]
    fn the_latency_probe_is_reported_once_its_frame_was_taken() {
        let outbox = Outbox::new(false);
        let mut batch = Vec::new();
        outbox.push(frame(1));
        outbox.push(frame(2));
        outbox.mark_last(777);
        outbox.push(frame(3));
        // A second mark while one is pending is ignored.
        outbox.mark_last(888);
        assert!(matches!(futures_lite::future::block_on(outbox.next(15, &mut batch)), Next::Write));
        assert_eq!(batch.len(), 1);
        assert_eq!(outbox.written_probe(), None);
        assert!(matches!(futures_lite::future::block_on(outbox.next(1 << 20, &mut batch)), Next::Write));
        assert_eq!(batch.len(), 2);
        assert_eq!(outbox.written_probe(), Some(777));
        assert_eq!(outbox.written_probe(), None);
        // A killed queue drops a pending probe.
        outbox.push(frame(4));
        outbox.mark_last(999);
        outbox.kill();
        assert!(matches!(futures_lite::future::block_on(outbox.next(1 << 20, &mut batch)), Next::Stop));
        assert_eq!(outbox.written_probe(), None);
    }

    #[test]
    fn an_overflow_keeps_the_rest_of_a_partly_sent_frame_before_the_close() {
        let outbox = Outbox::new(true);
        let mut batch = Vec::new();
        assert!(outbox.push(Bytes::from(vec![1u8; 100])));
        // The flusher sent 40 bytes of it, then the socket was full.
        outbox.consume(40);
        outbox.hand_to_task();
        // Overflow: everything else is dropped, not the 60 bytes the peer is waiting for.
        assert!(outbox.push(Bytes::from(vec![2u8; OUTBOUND_QUEUED_BYTES_MAX / 2])));
        assert!(!outbox.push(Bytes::from(vec![3u8; OUTBOUND_QUEUED_BYTES_MAX / 2 + 100])));
        assert_eq!(outbox.state(), OutboxState::Closing(CloseReason::SlowConsumer));
        assert_eq!(outbox.queued_bytes(), 60);
        assert!(matches!(futures_lite::future::block_on(outbox.next(1 << 20, &mut batch)), Next::Write));
        assert_eq!(batch.len(), 1);
        assert_eq!(&batch[0][..], &[1u8; 60][..]);
        assert!(matches!(futures_lite::future::block_on(outbox.next(1 << 20, &mut batch)), Next::Close(CloseReason::SlowConsumer)));
    }
}
