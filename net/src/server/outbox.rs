//! A connection's outbound queue, owned by its shard.
//!
//! Bound: [`OUTBOUND_QUEUED_BYTES_MAX`] bytes of queued frames. When a push would exceed it,
//! the queue is cleared and the connection is closed with 1008 "slow consumer": a subscriber
//! that cannot keep up never stalls its shard or grows memory, and the others keep receiving.
//!
//! Writes are batched: the writer task takes every frame queued while its previous write was
//! in flight and sends them in one write (the measured lever for fan-out on this machine).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::task::{Poll, Waker};

use bytes::Bytes;

use engine::client_error::CloseReason;
use engine::limits::OUTBOUND_QUEUED_BYTES_MAX;

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
    pub(crate) fn new() -> Outbox {
        Outbox {
            frames: RefCell::new(VecDeque::new()),
            queued_bytes: Cell::new(0),
            state: Cell::new(OutboxState::Open),
            waker: RefCell::new(None),
        }
    }

    /// Queues a frame. Returns `false` when the frame was not queued (closing or overflow).
    pub(crate) fn push(&self, frame: Bytes) -> bool {
        if self.state.get() != OutboxState::Open {
            return false;
        }
        let queued = self.queued_bytes.get() + frame.len();
        if queued > OUTBOUND_QUEUED_BYTES_MAX {
            self.frames.borrow_mut().clear();
            self.queued_bytes.set(0);
            self.state.set(OutboxState::Closing(CloseReason::SlowConsumer));
            self.wake();
            return false;
        }
        self.queued_bytes.set(queued);
        self.frames.borrow_mut().push_back(frame);
        self.wake();
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
        self.wake();
    }

    /// Bytes queued and not yet handed to the writer.
    pub(crate) fn queued_bytes(&self) -> usize {
        self.queued_bytes.get()
    }

    pub(crate) fn state(&self) -> OutboxState {
        self.state.get()
    }

    fn wake(&self) {
        if let Some(waker) = self.waker.borrow_mut().take() {
            waker.wake();
        }
    }

    /// Waits for work, then moves up to `batch_bytes` worth of frames (at least one) into
    /// `batch` (the writer's reused vector: no allocation per write).
    pub(crate) async fn next(&self, batch_bytes: usize, batch: &mut Vec<Bytes>) -> Next {
        std::future::poll_fn(|cx| {
            let mut frames = self.frames.borrow_mut();
            match self.state.get() {
                OutboxState::Dead => return Poll::Ready(Next::Stop),
                OutboxState::Closing(reason) if frames.is_empty() => return Poll::Ready(Next::Close(reason)),
                _ => {}
            }
            if frames.is_empty() {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
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
            self.queued_bytes.set(self.queued_bytes.get() - bytes);
            Poll::Ready(Next::Write)
        })
        .await
    }
}
