//! Helpers of the fleet tests: psql on a named database, the shards' inboxes read with a
//! deadline, and the commands sessions send.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use engine::changes::{AuthzReply, AuthzRequest, ChannelKey, CheckKind, Command, PgOut, Subscription};
use engine::{ChannelSerial, ConnId, ShardId};

/// How long any expected message may take.
pub const WAIT: Duration = Duration::from_secs(30);

/// Runs `sql` with psql as `postgres` on database `db`.
pub fn psql_db(port: u16, db: &str, sql: &str) -> Result<String, String> {
    let psql = powa_replication::cluster::Cluster::bin_dir().map_err(|e| e.to_string())?.join("psql");
    let output = std::process::Command::new(psql)
        .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-h", "127.0.0.1", "-U", "postgres"])
        .arg("-p")
        .arg(port.to_string())
        .arg("-d")
        .arg(db)
        .arg("-c")
        .arg(sql)
        .env_remove("PGPASSWORD")
        .output()
        .map_err(|e| e.to_string())?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim_end().to_string())
}

/// Makes `role` authenticate with its password (SCRAM) on loopback, for SQL and replication.
pub fn require_password(cluster: &powa_replication::cluster::Cluster, role: &str) {
    let hba = cluster.data_dir().join("pg_hba.conf");
    let text = std::fs::read_to_string(&hba).unwrap();
    let lines = format!("host all {role} 127.0.0.1/32 scram-sha-256\nhost replication {role} 127.0.0.1/32 scram-sha-256\n");
    std::fs::write(&hba, format!("{lines}{text}")).unwrap();
    cluster.psql("select pg_reload_conf()").unwrap();
    std::thread::sleep(Duration::from_millis(300));
}

/// A channel key.
pub fn key(shard: u16, conn: u64, channel: u32) -> ChannelKey {
    ChannelKey { shard: ShardId(shard), conn: ConnId(conn), channel: ChannelSerial(channel) }
}

/// A Postgres Changes subscription of every event of `public.<table>`, as `postgres`.
pub fn subscribe(key: ChannelKey, table: &str) -> Command {
    Command::Subscribe(Subscription {
        key,
        role: "postgres".into(),
        claims_json: r#"{"role":"postgres"}"#.into(),
        bindings: vec![format!(r#"{{"event":"*","schema":"public","table":"{table}"}}"#)],
    })
}

/// A read policy check of private `topic` for a channel.
pub fn authorize(key: ChannelKey, topic: &str) -> Command {
    Command::Authorize {
        request: AuthzRequest { role: "authenticated".into(), claims_json: r#"{"role":"authenticated"}"#.into(), sub: None, topic: topic.into(), kind: CheckKind::Read },
        reply: AuthzReply::Channel(key),
    }
}

/// Polls `check` until it holds or `within` passes (then panics).
pub fn wait_until(within: Duration, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < within, "condition not met within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The shards' inboxes, read together. Tenants' cores run concurrently, so each `expect_*`
/// takes the first message of its kind for its channel, whatever arrived before it; the others
/// wait for their own `expect_*`, and [`Inbox::expect_quiet`] checks nothing is left over.
pub struct Inbox {
    inboxes: Vec<flume::Receiver<PgOut>>,
    pending: Vec<PgOut>,
}

impl Inbox {
    /// Reads these inboxes.
    pub fn new(inboxes: Vec<flume::Receiver<PgOut>>) -> Inbox {
        Inbox { inboxes, pending: Vec::new() }
    }

    /// The next message of any inbox, waiting up to `within`.
    fn next(&mut self, within: Duration) -> Option<PgOut> {
        let started = Instant::now();
        loop {
            for inbox in &self.inboxes {
                if let Ok(out) = inbox.try_recv() {
                    return Some(out);
                }
            }
            if started.elapsed() >= within {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The first message (pending or new) that `pick` accepts.
    fn take<T>(&mut self, what: &str, mut pick: impl FnMut(&PgOut) -> Option<T>) -> T {
        if let Some(index) = self.pending.iter().position(|out| pick(out).is_some()) {
            let out = self.pending.remove(index);
            return pick(&out).expect("accepted");
        }
        let started = Instant::now();
        while let Some(out) = self.next(WAIT.saturating_sub(started.elapsed())) {
            if let Some(value) = pick(&out) {
                return value;
            }
            self.pending.push(out);
        }
        panic!("no {what} within {WAIT:?}; other messages: {:?}", self.pending)
    }

    /// A `system` push for (conn, channel), with this status and message.
    pub fn expect_system(&mut self, conn: u64, channel: u32, status: &str, message: &str) {
        let got = self.take("system message", |out| match out {
            PgOut::System { conn: c, channel: ch, status, message } if (c.0, ch.0) == (conn, channel) => Some((*status, message.clone())),
            _ => None,
        });
        assert_eq!((got.0, got.1.as_str()), (status, message));
    }

    /// A change for connection `conn`: its targets (conn, channel) and V2 payload.
    pub fn expect_change(&mut self, conn: u64) -> (Vec<(u64, u32)>, String) {
        self.take("change", |out| match out {
            PgOut::Change(delivery) if delivery.targets.iter().any(|(c, _)| c.0 == conn) => {
                Some((delivery.targets.iter().map(|(c, ch)| (c.0, ch.0)).collect(), String::from_utf8_lossy(&delivery.payload_v2).into_owned()))
            }
            _ => None,
        })
    }

    /// A database broadcast.
    pub fn expect_publish(&mut self) -> (engine::TopicKey, std::sync::Arc<engine::Broadcast>) {
        self.take("database broadcast", |out| match out {
            PgOut::Publish { topic, message } => Some((topic.clone(), std::sync::Arc::clone(message))),
            _ => None,
        })
    }

    /// The answer to a policy check of (conn, channel), which must be a failure; returns its
    /// error.
    pub fn expect_authorized(&mut self, conn: u64, channel: u32) -> String {
        let result = self.take("policy answer", |out| match out {
            PgOut::Authorized { conn: c, channel: ch, result, .. } if (c.0, ch.0) == (conn, channel) => Some(result.clone()),
            _ => None,
        });
        assert!(!result.broadcast && !result.presence, "{result:?}");
        result.error.expect("a failed check carries its error")
    }

    /// Nothing is left over and nothing arrives for `quiet`.
    pub fn expect_quiet(&mut self, quiet: Duration) {
        assert!(self.pending.is_empty(), "unexpected messages {:?}", self.pending);
        if let Some(out) = self.next(quiet) {
            panic!("unexpected message {out:?}");
        }
    }
}
