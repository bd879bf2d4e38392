//! The replication reader: a dedicated thread that owns the logical replication connection.
//!
//! ```text
//!  PostgreSQL walsender ──CopyData(XLogData)──▶ reader ──WalEvent (bounded)──▶ changes core
//!          ▲                                      │
//!          └──────── standby status update ───────┘  (every second and when asked)
//! ```
//!
//! **Slot.** A *temporary* slot (`CREATE_REPLICATION_SLOT … TEMPORARY LOGICAL pgoutput`) with a
//! name unique to this process. It disappears with the connection, so a crashed or stopped
//! server never leaves a slot holding WAL on the user's disk. The price is that changes
//! committed while the connection is down are not delivered (upstream behaves the same and
//! uses a temporary slot too); subscribers are told with a `system` message when the stream drops
//! and again when it is back.
//!
//! **Progress.** Delivery is best effort (PROTOCOL.md §5.9), so the reader confirms everything
//! it has *received* (write = flush = apply = the last WAL end seen), every second and whenever
//! the server asks. The slot therefore never retains WAL because subscribers are slow: when the
//! core cannot keep up, its queue fills and the reader drops whole transactions (counted),
//! never relation metadata.
//!
//! **Failures.** Any error closes the connection. A transient one (lost connection, server
//! restart) makes the loop reconnect with exponential backoff (0.5 s doubling to 10 s); a
//! definite one (wrong password, missing database, no replication privilege: see
//! [`crate::error`]) stops the reader for good: it is logged once with what to fix, sent to the
//! core as [`WalEvent::StreamFailed`] and marked in [`ReaderControl::failed`] (`/healthz` 503). A missing `supabase_realtime` publication is waited for (polled every
//! 2 s) before streaming starts, because pgoutput on PostgreSQL 15 aborts the stream on the first
//! change when a requested publication does not exist.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::error::ReplicationError;
use crate::pgconn::{ConnParams, PgConn, PgError};
use crate::pgoutput::{self, Message, OldKind, Relation, Tuple, TypeMessage};
use crate::stream::{self, ReplicationMessage, PG_EPOCH_OFFSET_SECS};

/// The publication Postgres Changes reads (PROTOCOL.md §5.8); the project owner creates it.
pub const PUBLICATION: &str = "supabase_realtime";

/// The server's own publication of `realtime.messages` inserts (broadcasts from SQL).
pub const MESSAGES_PUBLICATION: &str = "supabase_realtime_messages_publication";

/// Shared between the reader and the core: which publications the stream reads, and a request
/// to restart it (when `supabase_realtime` appears after the stream started without it: the
/// publication list of a pgoutput stream is fixed at `START_REPLICATION`).
#[derive(Debug, Default)]
pub struct ReaderControl {
    /// The stream includes `supabase_realtime`.
    pub reads_publication: std::sync::atomic::AtomicBool,
    /// Restart the stream at the next tick.
    pub restart: std::sync::atomic::AtomicBool,
    /// The reader stopped on a definite error (it does not retry).
    pub failed: std::sync::atomic::AtomicBool,
}

/// Most row changes one transaction may carry through the queue; the rest are dropped
/// (counted) so a huge transaction cannot exhaust memory.
pub const TXN_CHANGES_MAX: usize = 100_000;

/// Capacity of the reader → core queue, in events.
pub const QUEUE_EVENTS_MAX: usize = 1024;

const STATUS_INTERVAL: Duration = Duration::from_secs(1);
const READ_TICK: Duration = Duration::from_millis(200);
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
const PUBLICATION_POLL: Duration = Duration::from_secs(2);

/// One row change. (Rows hold their cells inline — a `SmallVec` of 16 — so no row allocates;
/// the size difference between variants is the price.)
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum RowChange {
    /// INSERT.
    Insert {
        /// Relation oid.
        relation: u32,
        /// New row.
        new: Tuple,
    },
    /// UPDATE.
    Update {
        /// Relation oid.
        relation: u32,
        /// Old row (replica identity columns or full), when sent.
        old: Option<(OldKind, Tuple)>,
        /// New row.
        new: Tuple,
    },
    /// DELETE.
    Delete {
        /// Relation oid.
        relation: u32,
        /// Old row.
        old: (OldKind, Tuple),
    },
}

/// A committed transaction.
#[derive(Debug, Clone)]
pub struct Txn {
    /// Commit time, µs since 2000-01-01 UTC.
    pub commit_time: i64,
    /// Commit LSN.
    pub commit_lsn: u64,
    /// Row changes in WAL order.
    pub changes: Vec<RowChange>,
}

/// What the reader tells the core.
#[derive(Debug, Clone)]
pub enum WalEvent {
    /// Streaming started: every transaction committed from now on will be seen.
    StreamUp,
    /// Streaming stopped (the reason is for logs and `system` messages).
    StreamDown(String),
    /// Streaming stopped for good: a definite error (logged with what to fix). Nothing follows.
    StreamFailed(ReplicationError),
    /// Relation metadata (always delivered, never dropped).
    Relation(Relation),
    /// Type metadata.
    Type(TypeMessage),
    /// A committed transaction with at least one row change.
    Txn(Arc<Txn>),
}

/// Counters the core and `/metrics` read.
#[derive(Debug, Default)]
pub struct ReaderStats {
    /// Transactions dropped because the core's queue was full.
    pub txns_dropped: AtomicU64,
    /// Row changes dropped beyond [`TXN_CHANGES_MAX`].
    pub changes_dropped: AtomicU64,
    /// Row changes decoded.
    pub changes_decoded: AtomicU64,
    /// Reconnections.
    pub reconnects: AtomicU64,
    /// Last LSN confirmed to the server.
    pub confirmed_lsn: AtomicU64,
    /// The server's end of WAL, as of its last message.
    pub server_wal_end: AtomicU64,
    /// The WAL position read so far (the start of the last message, or the end of WAL when
    /// a keepalive says nothing is pending).
    pub received_lsn: AtomicU64,
    /// For the last transaction decoded: its commit time to the moment it was decoded, µs.
    pub commit_lag_micros: AtomicU64,
}

/// Starts the reader thread.
pub fn spawn(params: ConnParams, events: flume::Sender<WalEvent>, stats: Arc<ReaderStats>, control: Arc<ReaderControl>) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("replication".into())
        .spawn(move || run(params, events, stats, control))
        .expect("spawn the replication thread")
}

fn run(params: ConnParams, events: flume::Sender<WalEvent>, stats: Arc<ReaderStats>, control: Arc<ReaderControl>) {
    let mut backoff = BACKOFF_MIN;
    let mut up = false;
    let mut attempt: u64 = 0;
    loop {
        attempt += 1;
        let slot = format!("powa_realtime_{}_{}", std::process::id(), attempt);
        let result = stream_once(&params, &slot, &events, &stats, &control, &mut up);
        if events.is_disconnected() {
            return;
        }
        if control.restart.swap(false, Ordering::Relaxed) && result.is_ok() {
            // A planned restart to read a publication that appeared: no down/up notices (no
            // Postgres Changes binding can be active before its publication exists).
            tracing::info!("restarting the replication stream to read {PUBLICATION}");
            continue;
        }
        if let Some(error) = result.as_ref().err().map(ReplicationError::from_pg).filter(ReplicationError::is_definite) {
            tracing::error!(%error, "replication stopped for good (not retrying)");
            control.failed.store(true, Ordering::Relaxed);
            let _ = events.send(WalEvent::StreamFailed(error));
            return;
        }
        let reason = match &result {
            Ok(()) => "the replication stream ended".to_string(),
            Err(error) => error.to_string(),
        };
        if up {
            up = false;
            let _ = events.send(WalEvent::StreamDown(reason.clone()));
            backoff = BACKOFF_MIN;
        }
        tracing::warn!(error = %reason, retry_in_ms = backoff.as_millis() as u64, "replication stream down");
        stats.reconnects.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn pg_now_micros() -> i64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    now.as_micros() as i64 - PG_EPOCH_OFFSET_SECS * 1_000_000
}

/// Connects, waits for the publication, creates the slot and streams until an error.
fn stream_once(params: &ConnParams, slot: &str, events: &flume::Sender<WalEvent>, stats: &ReaderStats, control: &ReaderControl, up: &mut bool) -> Result<(), PgError> {
    let startup = [
        ("replication", "database"),
        ("application_name", "powa-realtime"),
        ("DateStyle", "ISO, MDY"),
        ("TimeZone", "UTC"),
        ("IntervalStyle", "postgres"),
        ("extra_float_digits", "3"),
        ("bytea_output", "hex"),
        ("client_encoding", "UTF8"),
    ];
    let mut conn = PgConn::connect(params, &startup, Duration::from_secs(10))?;
    // pgoutput on PostgreSQL 15 aborts the stream when a requested publication is missing, so
    // read only those that exist; wait while neither does.
    let check = format!("SELECT pubname::text FROM pg_publication WHERE pubname IN ('{PUBLICATION}', '{MESSAGES_PUBLICATION}') ORDER BY 1 DESC");
    let mut waited = false;
    let publications = loop {
        let rows = conn.simple_query(&check)?;
        let names: Vec<String> = rows.into_iter().filter_map(|r| r.into_iter().next().flatten()).collect();
        if !names.is_empty() {
            break names;
        }
        if !waited {
            tracing::info!(publication = PUBLICATION, "waiting for the publication to exist (CREATE PUBLICATION supabase_realtime ...)");
            waited = true;
        }
        if events.is_disconnected() {
            return Ok(());
        }
        std::thread::sleep(PUBLICATION_POLL);
    };
    control.reads_publication.store(publications.iter().any(|p| p == PUBLICATION), Ordering::Relaxed);
    conn.simple_query(&format!("CREATE_REPLICATION_SLOT {slot} TEMPORARY LOGICAL pgoutput (SNAPSHOT 'nothing')"))?;
    conn.start_copy_both(&format!(
        "START_REPLICATION SLOT {slot} LOGICAL 0/0 (proto_version '1', publication_names '{}')",
        publications.join(",")
    ))?;
    conn.set_read_timeout(READ_TICK)?;
    tracing::info!(slot, tls = conn.is_tls(), "replication stream started");
    *up = true;
    if events.send(WalEvent::StreamUp).is_err() {
        return Ok(());
    }
    let mut last_lsn: u64 = 0;
    let mut last_status = Instant::now();
    let mut txn: Option<Txn> = None;
    let mut txn_overflow = 0u64;
    loop {
        let message = match conn.read_message() {
            Ok(message) => Some(message),
            Err(PgError::Io(error)) if matches!(error.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => None,
            Err(error) => return Err(error),
        };
        let mut reply_requested = false;
        if let Some(message) = message {
            match message.tag {
                b'd' => match ReplicationMessage::try_from(message.body) {
                    Ok(ReplicationMessage::XLogData { wal_start, wal_end, data, .. }) => {
                        last_lsn = last_lsn.max(wal_end);
                        stats.server_wal_end.store(wal_end, Ordering::Relaxed);
                        stats.received_lsn.store(wal_start, Ordering::Relaxed);
                        handle_wal(data, &mut txn, &mut txn_overflow, events, stats)?;
                    }
                    Ok(ReplicationMessage::Keepalive { wal_end, reply_requested: asked, .. }) => {
                        last_lsn = last_lsn.max(wal_end);
                        stats.server_wal_end.store(wal_end, Ordering::Relaxed);
                        stats.received_lsn.store(wal_end, Ordering::Relaxed);
                        reply_requested = asked;
                    }
                    Err(error) => return Err(PgError::Protocol(format!("replication message: {error}"))),
                },
                b'E' => return Err(PgConn::error_of(message.body)),
                b'c' => return Ok(()),
                _ => {}
            }
        }
        if events.is_disconnected() || control.restart.load(Ordering::Relaxed) {
            return Ok(());
        }
        if reply_requested || last_status.elapsed() >= STATUS_INTERVAL {
            let update = stream::standby_status_update(last_lsn, last_lsn, last_lsn, pg_now_micros(), false);
            conn.send(b'd', &update)?;
            stats.confirmed_lsn.store(last_lsn, Ordering::Relaxed);
            last_status = Instant::now();
        }
    }
}

fn handle_wal(data: Bytes, txn: &mut Option<Txn>, overflow: &mut u64, events: &flume::Sender<WalEvent>, stats: &ReaderStats) -> Result<(), PgError> {
    let message = Message::try_from(data).map_err(|e| PgError::Protocol(format!("pgoutput: {e}")))?;
    let mut push = |txn: &mut Option<Txn>, change: RowChange| {
        stats.changes_decoded.fetch_add(1, Ordering::Relaxed);
        match txn {
            Some(t) if t.changes.len() < TXN_CHANGES_MAX => t.changes.push(change),
            _ => *overflow += 1,
        }
    };
    match message {
        Message::Begin(begin) => {
            *txn = Some(Txn { commit_time: begin.commit_time, commit_lsn: begin.final_lsn, changes: Vec::new() });
            *overflow = 0;
        }
        Message::Commit(commit) => {
            if *overflow > 0 {
                stats.changes_dropped.fetch_add(*overflow, Ordering::Relaxed);
                tracing::warn!(dropped = *overflow, "transaction larger than the change limit: its tail was dropped");
            }
            if let Some(mut done) = txn.take() {
                done.commit_time = commit.commit_time;
                stats.commit_lag_micros.store(pg_now_micros().saturating_sub(commit.commit_time).max(0) as u64, Ordering::Relaxed);
                if !done.changes.is_empty() {
                    tracing::debug!(changes = done.changes.len(), "transaction decoded");
                    match events.try_send(WalEvent::Txn(Arc::new(done))) {
                        Ok(()) => {}
                        Err(flume::TrySendError::Full(_)) => {
                            stats.txns_dropped.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!("changes core is behind: transaction dropped (the slot keeps advancing)");
                        }
                        Err(flume::TrySendError::Disconnected(_)) => {}
                    }
                }
            }
        }
        Message::Relation(relation) => {
            let _ = events.send(WalEvent::Relation(relation));
        }
        Message::Type(type_message) => {
            let _ = events.send(WalEvent::Type(type_message));
        }
        Message::Insert(insert) => push(txn, RowChange::Insert { relation: insert.relation, new: insert.new }),
        Message::Update(update) => push(txn, RowChange::Update { relation: update.relation, old: update.old, new: update.new }),
        Message::Delete(delete) => push(txn, RowChange::Delete { relation: delete.relation, old: delete.old }),
        // TRUNCATE is never delivered (PROTOCOL.md §5.5); origins and messages are not used.
        Message::Truncate(_) | Message::Origin(_) | Message::LogicalMessage(_) | Message::Unknown(_) => {}
    }
    let _ = pgoutput::Cell::Null;
    Ok(())
}
