//! The replication reader: a task that owns the logical replication connection. It runs on a
//! tokio current-thread runtime next to its changes core — one of the fleet's worker threads
//! ([`crate::fleet`]), which many tenants' readers and cores share; nothing in it blocks the
//! thread.
//!
//! ```text
//!  PostgreSQL walsender ──CopyData(XLogData)──▶ reader ──WalEvent (bounded)──▶ changes core
//!          ▲                                      │
//!          └──────── standby status update ───────┘  (every second and when asked)
//! ```
//!
//! **Slot.** A *permanent* logical slot named [`SlotConfig::name`] (`powa_realtime` by default),
//! owned by the server, so no change is lost across a reconnect (issue 11): when the
//! connection drops (walsender killed, PostgreSQL restarted, failover to a replica promoted
//! with the slot) the reader resumes from the slot's confirmed position and the core gets every
//! transaction committed meanwhile, in commit order, exactly once (transactions whose commit
//! end LSN is at or below the last one handed to the core are skipped). Subscribers get a
//! `system` error when the stream drops and a new "Subscribed to PostgreSQL" when it is back.
//!
//! The risk of a permanent slot is bounded: at the first connection of a process a stale,
//! inactive slot of that name (a crashed server's) is dropped and recreated; on a reconnect the
//! slot is dropped and recreated — and subscribers are told with [`WalEvent::ChangesMissed`]
//! that changes were missed — when its retained WAL exceeds [`SlotConfig::max_retained_bytes`]
//! or the stream has been down longer than [`SlotConfig::max_away`]; while the stream is up,
//! the changes core reads the slot's retained WAL every 10 s on its own connection and, beyond
//! the bound (the server far behind, a long transaction holding the slot back), sets
//! [`ReaderControl::over_bound`]: the reader leaves the stream and does the same at once; a clean stop (drain)
//! drops it ([`ReaderControl::stop`]). If another process holds the slot (two servers on one
//! database), this one falls back to a temporary slot of its own and logs a warning.
//!
//! **Progress.** The reader confirms (write = flush = apply) only what the core has handed to
//! the shards ([`ReaderControl::handed_off`], the end LSN of the last delivered transaction),
//! or everything received when nothing is outstanding, every second and whenever the server
//! asks. When the core cannot keep up, its queue fills and the reader drops whole transactions
//! (counted), never relation metadata; dropped transactions are not replayed.
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
    /// End LSN of the last transaction the core has handed to the shards (set by the core).
    pub handed_off: AtomicU64,
    /// Stop streaming and drop the slot (a clean stop).
    pub stop: std::sync::atomic::AtomicBool,
    /// The reader has stopped after [`ReaderControl::stop`] (slot dropped, or dropping failed).
    pub stopped: std::sync::atomic::AtomicBool,
    /// The permanent slot the stream is reading now (`None` while it is down, or when it reads a
    /// temporary fallback slot): the core watches its retained WAL while it streams.
    pub streaming_slot: std::sync::Mutex<Option<String>>,
    /// [`SlotConfig::max_retained_bytes`], for that watch.
    pub max_retained_bytes: AtomicU64,
    /// Set by the core's watch (the retained bytes it saw, 0 = none): the slot retains more WAL
    /// than allowed while streaming. The reader leaves the stream, drops and recreates the slot
    /// and tells subscribers that changes were missed, as at a reconnect.
    pub over_bound: AtomicU64,
}

impl ReaderControl {
    /// The permanent slot being streamed, if any.
    pub fn streaming_slot(&self) -> Option<String> {
        self.streaming_slot.lock().ok().and_then(|slot| slot.clone())
    }

    fn set_streaming_slot(&self, slot: Option<String>) {
        if let Ok(mut current) = self.streaming_slot.lock() {
            *current = slot;
        }
    }
}

/// The replication slot and its bounds.
#[derive(Debug, Clone)]
pub struct SlotConfig {
    /// Slot name (`[a-z0-9_]`, at most 63 bytes; anything else is replaced by `_`).
    pub name: String,
    /// Beyond this much retained WAL — at a reconnect, or seen by the core's watch while
    /// streaming (every 10 s) — the slot is dropped and recreated.
    pub max_retained_bytes: u64,
    /// Beyond this long down, the slot is dropped and recreated at the reconnect.
    pub max_away: Duration,
    /// Cluster mode: the slot is shared by the nodes (one streams at a time, the fleet's
    /// leader): an inactive slot found at the first connection is adopted (within the bounds)
    /// rather than dropped, it is kept at a clean stop (another node takes over from it), and a
    /// slot still active elsewhere is waited for instead of streaming from a temporary slot.
    pub shared: bool,
}

/// Default slot name.
pub const SLOT_NAME: &str = "powa_realtime";

impl Default for SlotConfig {
    fn default() -> SlotConfig {
        SlotConfig { name: SLOT_NAME.into(), max_retained_bytes: 1024 * 1024 * 1024, max_away: Duration::from_secs(600), shared: false }
    }
}

impl SlotConfig {
    fn slot_name(&self) -> String {
        let name: String = self.name.chars().map(|c| if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' { c } else { '_' }).take(63).collect();
        if name.is_empty() {
            SLOT_NAME.into()
        } else {
            name
        }
    }
}

/// Most row changes one transaction may carry through the queue; the rest are dropped
/// (counted) so a huge transaction cannot exhaust memory.
pub const TXN_CHANGES_MAX: usize = 100_000;

/// Capacity of the reader → core queue, in events.
pub const QUEUE_EVENTS_MAX: usize = 1024;

const STATUS_INTERVAL: Duration = Duration::from_secs(1);
const READ_TICK: Duration = Duration::from_millis(200);
/// A read tick this late means the reader did not run meanwhile.
const FROZEN_AFTER: Duration = Duration::from_secs(1);
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
    /// End LSN of the commit record (what the slot is confirmed up to once it is delivered).
    pub end_lsn: u64,
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
    /// The slot had to be recreated (bounds exceeded, or it vanished): changes committed while
    /// the stream was down are lost. Sent before the `StreamUp` that follows.
    ChangesMissed,
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

/// The reader: streams (reconnecting with backoff) until [`ReaderControl::stop`], a definite
/// error, or the core's queue closing; after a stop it drops the slot and sets
/// [`ReaderControl::stopped`]. Run it as a task on a current-thread runtime (it must share the
/// thread only with tasks that never block).
pub async fn run(params: ConnParams, slot: SlotConfig, events: flume::Sender<WalEvent>, stats: Arc<ReaderStats>, control: Arc<ReaderControl>) {
    control.max_retained_bytes.store(slot.max_retained_bytes, Ordering::Relaxed);
    run_loop(&params, &slot, &events, &stats, &control).await;
    if control.stop.load(Ordering::Relaxed) && !slot.shared {
        drop_slot(&params, &slot.slot_name()).await;
    }
    control.stopped.store(true, Ordering::Relaxed);
}

/// What the reader keeps across reconnects.
#[derive(Debug, Default)]
struct Session {
    /// The stream was up and is reported up.
    up: bool,
    /// A connection of this process already set up the slot.
    connected_before: bool,
    /// When the stream went down: the last message from it (for [`SlotConfig::max_away`]).
    down_since: Option<Instant>,
    /// When the stream last sent anything.
    last_seen: Option<Instant>,
    /// Highest commit end LSN sent to the core (replays at or below it are skipped).
    sent_end: u64,
    /// Highest LSN confirmed to the server.
    confirmed: u64,
    /// The slot cannot be resumed (its pending WAL was written while a requested publication
    /// did not exist, which pgoutput refuses to decode): recreate it at the next connection.
    recreate: bool,
    /// The slot retained this many bytes of WAL while streaming, more than allowed: recreate
    /// it at the next connection.
    over_bound: Option<u64>,
}

/// Drops the slot on a clean stop (waits up to 5 s for the walsender to release it).
async fn drop_slot(params: &ConnParams, slot: &str) {
    let result = async {
        let mut conn = PgConn::connect(params, &[("replication", "database"), ("application_name", "powa-realtime")], Duration::from_secs(5)).await?;
        conn.simple_query(&format!("DROP_REPLICATION_SLOT {slot} WAIT")).await.map(|_| ())
    }
    .await;
    match result {
        Ok(()) => tracing::info!(slot, "replication slot dropped (clean stop)"),
        Err(error) => tracing::warn!(slot, %error, "could not drop the replication slot at stop; the next start drops or adopts it"),
    }
}

async fn run_loop(params: &ConnParams, slot: &SlotConfig, events: &flume::Sender<WalEvent>, stats: &ReaderStats, control: &ReaderControl) {
    let mut backoff = BACKOFF_MIN;
    let mut session = Session::default();
    loop {
        let result = stream_once(params, slot, events, stats, control, &mut session).await;
        control.set_streaming_slot(None);
        if events.is_disconnected() || control.stop.load(Ordering::Relaxed) {
            return;
        }
        let over_bound = control.over_bound.swap(0, Ordering::Relaxed);
        if over_bound > 0 && result.is_ok() {
            // The core's watch saw the slot retain too much WAL while streaming: reconnect at
            // once; the slot is dropped and recreated and subscribers are told changes were
            // missed (no "stream down" notice: the stream comes straight back).
            tracing::warn!(retained_bytes = over_bound, max = slot.max_retained_bytes, "the replication slot retains more WAL than REALTIME_SLOT_MAX_RETAINED_MB allows while streaming: recreating it");
            session.over_bound = Some(over_bound);
            continue;
        }
        if let Err(PgError::Server { code, message }) = &result {
            if code == "42704" && message.contains("publication") {
                session.recreate = true;
            }
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
            let _ = events.send_async(WalEvent::StreamFailed(error)).await;
            return;
        }
        let reason = match &result {
            Ok(()) => "the replication stream ended".to_string(),
            Err(error) => error.to_string(),
        };
        if session.up {
            session.up = false;
            session.down_since = Some(session.last_seen.unwrap_or_else(Instant::now));
            let _ = events.send_async(WalEvent::StreamDown(reason.clone())).await;
            backoff = BACKOFF_MIN;
        }
        tracing::warn!(error = %reason, retry_in_ms = backoff.as_millis() as u64, "replication stream down");
        stats.reconnects.fetch_add(1, Ordering::Relaxed);
        sleep_unless_stopped(backoff, control).await;
        if control.stop.load(Ordering::Relaxed) {
            return;
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Sleeps `duration`, waking early (every 200 ms at most) when a stop is asked.
async fn sleep_unless_stopped(duration: Duration, control: &ReaderControl) {
    let until = Instant::now() + duration;
    while !control.stop.load(Ordering::Relaxed) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left.min(READ_TICK)).await;
    }
}

fn pg_now_micros() -> i64 {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    now.as_micros() as i64 - PG_EPOCH_OFFSET_SECS * 1_000_000
}

/// Sets up the slot on a fresh connection: creates it, adopts it (a reconnect within the
/// bounds), or drops and recreates it (a stale slot at the first connection; bounds exceeded;
/// another plugin or database). Returns the slot to stream from and whether changes were missed.
async fn prepare_slot(conn: &mut PgConn, config: &SlotConfig, session: &Session) -> Result<(String, bool), PgError> {
    let name = config.slot_name();
    let query = format!(
        "SELECT plugin::text, (database = current_database())::text, active::text, \
         coalesce(CASE WHEN pg_is_in_recovery() THEN 0 ELSE pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn) END, 0)::bigint::text \
         FROM pg_replication_slots WHERE slot_name = '{name}'"
    );
    let create = format!("CREATE_REPLICATION_SLOT {name} LOGICAL pgoutput (SNAPSHOT 'nothing')");
    let mut waited = Duration::ZERO;
    loop {
        let rows = conn.simple_query(&query).await?;
        let Some(row) = rows.into_iter().next() else {
            conn.simple_query(&create).await?;
            let missed = session.connected_before;
            if missed {
                tracing::warn!(slot = %name, "the replication slot was gone at the reconnect (dropped, or a failover to a replica without it): recreated; changes committed meanwhile are lost");
            } else {
                tracing::info!(slot = %name, "replication slot created");
            }
            return Ok((name, missed));
        };
        let field = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
        let (plugin, same_database, active, retained) = (field(0), field(1) == "true", field(2) == "true", field(3).parse::<u64>().unwrap_or(0));
        if active {
            // The walsender of a connection that just closed may not have released it yet.
            if waited < Duration::from_secs(5) {
                tokio::time::sleep(Duration::from_millis(200)).await;
                waited += Duration::from_millis(200);
                continue;
            }
            if config.shared {
                // Cluster mode: the previous leader's walsender has not let go yet; retry.
                return Err(PgError::Server { code: "55006".into(), message: format!("replication slot \"{name}\" is still active for the previous leader") });
            }
            let suffix = format!("_{}", std::process::id());
            let temporary = format!("{}{suffix}", &name[..name.len().min(63 - suffix.len())]);
            tracing::warn!(slot = %name, fallback = %temporary, "the replication slot is in use by another process (another server on this database?): streaming from a temporary slot instead; changes committed while this server's stream is down are not delivered");
            conn.simple_query(&format!("CREATE_REPLICATION_SLOT {temporary} TEMPORARY LOGICAL pgoutput (SNAPSHOT 'nothing')")).await?;
            return Ok((temporary, false));
        }
        let away = session.down_since.map(|t| t.elapsed()).unwrap_or_default();
        let reason = if !session.connected_before && !config.shared {
            Some("a stale slot from an earlier run of the server".to_string())
        } else if session.recreate {
            Some("its pending WAL was written while the publication did not exist (pgoutput cannot decode it)".to_string())
        } else if let Some(bytes) = session.over_bound {
            Some(format!("it retained {bytes} bytes of WAL while streaming, more than REALTIME_SLOT_MAX_RETAINED_MB allows"))
        } else if plugin != "pgoutput" || !same_database {
            Some("a slot of another plugin or database".to_string())
        } else if retained > config.max_retained_bytes {
            Some(format!("it retains {retained} bytes of WAL, more than REALTIME_SLOT_MAX_RETAINED_MB allows"))
        } else if away > config.max_away {
            Some(format!("the stream was down for {} s, longer than REALTIME_SLOT_MAX_AWAY_SECS allows", away.as_secs()))
        } else {
            None
        };
        let Some(reason) = reason else {
            tracing::info!(slot = %name, retained_bytes = retained, "resuming from the replication slot");
            return Ok((name, false));
        };
        tracing::warn!(slot = %name, %reason, "dropping and recreating the replication slot");
        conn.simple_query(&format!("DROP_REPLICATION_SLOT {name}")).await?;
        conn.simple_query(&create).await?;
        return Ok((name, session.connected_before));
    }
}

/// Connects, waits for the publication, sets up the slot and streams until an error.
async fn stream_once(params: &ConnParams, slot_config: &SlotConfig, events: &flume::Sender<WalEvent>, stats: &ReaderStats, control: &ReaderControl, session: &mut Session) -> Result<(), PgError> {
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
    let mut conn = PgConn::connect(params, &startup, Duration::from_secs(10)).await?;
    // pgoutput on PostgreSQL 15 aborts the stream when a requested publication is missing, so
    // read only those that exist; wait while neither does.
    let check = format!("SELECT pubname::text FROM pg_publication WHERE pubname IN ('{PUBLICATION}', '{MESSAGES_PUBLICATION}') ORDER BY 1 DESC");
    let mut waited = false;
    let publications = loop {
        let rows = conn.simple_query(&check).await?;
        let names: Vec<String> = rows.into_iter().filter_map(|r| r.into_iter().next().flatten()).collect();
        if !names.is_empty() {
            break names;
        }
        if !waited {
            tracing::info!(publication = PUBLICATION, "waiting for the publication to exist (CREATE PUBLICATION supabase_realtime ...)");
            waited = true;
        }
        if events.is_disconnected() || control.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        sleep_unless_stopped(PUBLICATION_POLL, control).await;
    };
    control.reads_publication.store(publications.iter().any(|p| p == PUBLICATION), Ordering::Relaxed);
    let (slot, missed) = prepare_slot(&mut conn, slot_config, session).await?;
    session.connected_before = true;
    session.recreate = false;
    session.over_bound = None;
    if missed {
        session.sent_end = 0;
        let _ = events.send_async(WalEvent::ChangesMissed).await;
    }
    conn.start_copy_both(&format!(
        "START_REPLICATION SLOT {slot} LOGICAL 0/0 (proto_version '1', publication_names '{}')",
        publications.join(",")
    ))
    .await?;
    tracing::info!(slot, tls = conn.is_tls(), "replication stream started");
    control.set_streaming_slot((slot == slot_config.slot_name()).then(|| slot.clone()));
    session.up = true;
    session.down_since = None;
    if events.send_async(WalEvent::StreamUp).await.is_err() {
        return Ok(());
    }
    let mut last_lsn: u64 = 0;
    let mut last_status = Instant::now();
    let mut txn: Option<Txn> = None;
    let mut txn_overflow = 0u64;
    let mut batch = std::collections::VecDeque::new();
    loop {
        // `read_available` is cancel-safe: a tick that ends a pending read loses no bytes. It
        // returns the stream's error instead of the messages that came with it (the slot sends
        // them again after the reconnect, or its bounds say they are lost).
        if batch.is_empty() {
            let waiting = Instant::now();
            match tokio::time::timeout(READ_TICK, conn.read_available()).await {
                Ok(Ok(messages)) => batch.extend(messages),
                Ok(Err(error)) => return Err(error),
                // A tick that fires far too late: the process (or this thread) did not run for
                // a while — e.g. SIGSTOP, a suspended VM. Read what the server said meanwhile
                // before writing to it (the runtime looks at the socket on its next turn), so
                // a stream that ended while we were frozen counts as away since its last
                // message, not as just seen.
                Err(_) if waiting.elapsed() > FROZEN_AFTER => continue,
                Err(_) => {}
            }
        }
        let mut reply_requested = false;
        if let Some(message) = batch.pop_front() {
            session.last_seen = Some(Instant::now());
            match message.tag {
                b'd' => match ReplicationMessage::try_from(message.body) {
                    Ok(ReplicationMessage::XLogData { wal_start, wal_end, data, .. }) => {
                        last_lsn = last_lsn.max(wal_end);
                        stats.server_wal_end.store(wal_end, Ordering::Relaxed);
                        stats.received_lsn.store(wal_start, Ordering::Relaxed);
                        handle_wal(data, &mut txn, &mut txn_overflow, events, stats, &mut session.sent_end).await?;
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
        if events.is_disconnected() || control.restart.load(Ordering::Relaxed) || control.stop.load(Ordering::Relaxed) || control.over_bound.load(Ordering::Relaxed) > 0 {
            return Ok(());
        }
        if reply_requested || last_status.elapsed() >= STATUS_INTERVAL {
            // Only what the core has handed to the shards; everything received when nothing
            // sent is outstanding and no transaction is half read.
            let handed = control.handed_off.load(Ordering::Relaxed);
            let confirm = if handed >= session.sent_end && txn.is_none() { last_lsn } else { handed.min(last_lsn) };
            session.confirmed = session.confirmed.max(confirm);
            let update = stream::standby_status_update(session.confirmed, session.confirmed, session.confirmed, pg_now_micros(), false);
            conn.send(b'd', &update).await?;
            session.last_seen = Some(Instant::now());
            stats.confirmed_lsn.store(session.confirmed, Ordering::Relaxed);
            last_status = Instant::now();
        }
    }
}

async fn handle_wal(data: Bytes, txn: &mut Option<Txn>, overflow: &mut u64, events: &flume::Sender<WalEvent>, stats: &ReaderStats, sent_end: &mut u64) -> Result<(), PgError> {
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
            *txn = Some(Txn { commit_time: begin.commit_time, commit_lsn: begin.final_lsn, end_lsn: 0, changes: Vec::new() });
            *overflow = 0;
        }
        Message::Commit(commit) => {
            if *overflow > 0 {
                stats.changes_dropped.fetch_add(*overflow, Ordering::Relaxed);
                tracing::warn!(dropped = *overflow, "transaction larger than the change limit: its tail was dropped");
            }
            if let Some(mut done) = txn.take() {
                done.commit_time = commit.commit_time;
                done.end_lsn = commit.end_lsn;
                if commit.end_lsn <= *sent_end {
                    // Replayed after a reconnect, already sent to the core.
                    return Ok(());
                }
                stats.commit_lag_micros.store(pg_now_micros().saturating_sub(commit.commit_time).max(0) as u64, Ordering::Relaxed);
                if !done.changes.is_empty() {
                    tracing::debug!(changes = done.changes.len(), "transaction decoded");
                    let end_lsn = done.end_lsn;
                    match events.try_send(WalEvent::Txn(Arc::new(done))) {
                        Ok(()) => *sent_end = end_lsn,
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
            let _ = events.send_async(WalEvent::Relation(relation)).await;
        }
        Message::Type(type_message) => {
            let _ = events.send_async(WalEvent::Type(type_message)).await;
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
