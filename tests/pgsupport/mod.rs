//! A real PostgreSQL for the Postgres Changes tests: a throwaway cluster (see
//! `replication::cluster`), one long-lived `psql` session to run SQL on it with little latency,
//! and the server started against it.
//!
//! The session runs as the `postgres` superuser with `TimeZone = 'UTC'`, so `to_jsonb` renders
//! `timestamptz` values the way PROTOCOL.md §5.5 wants them on the wire.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use replication::cluster::{Cluster, TempDirGuard};
use serde_json::Value;

use crate::support::Server;

/// How long one SQL statement may take before the test fails.
const SQL_TIMEOUT: Duration = Duration::from_secs(20);

/// The `psql` next to the server binaries, else the one on `PATH`.
pub fn psql_program() -> PathBuf {
    Cluster::bin_dir()
        .ok()
        .map(|dir| dir.join("psql"))
        .filter(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from("psql"))
}

/// One `psql` process reading statements from a pipe. Each `exec` writes the SQL followed by an
/// `\echo` of a unique marker and collects what psql prints up to the marker; a failing
/// statement makes psql exit (`ON_ERROR_STOP`), which fails the test with psql's error text.
pub struct Sql {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    stderr: Arc<Mutex<String>>,
    count: u64,
}

impl Sql {
    pub fn open(port: u16) -> Sql {
        let mut command = Command::new(psql_program());
        command
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-At", "-h", "127.0.0.1"])
            .arg("-p")
            .arg(port.to_string())
            .args(["-U", "postgres", "-d", "postgres"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        for name in ["PGSERVICE", "PGOPTIONS", "PGPASSWORD", "PGSSLMODE", "PGTZ", "PGDATABASE", "PGUSER"] {
            command.env_remove(name);
        }
        let mut child = command.spawn().unwrap_or_else(|e| panic!("could not start psql: {e}"));
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        let mut pipe = child.stderr.take().unwrap();
        thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            loop {
                match pipe.read(&mut buffer) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => sink.lock().unwrap().push_str(&String::from_utf8_lossy(&buffer[..n])),
                }
            }
        });
        let mut sql = Sql { child, stdin, lines, stderr, count: 0 };
        sql.exec("SET TimeZone = 'UTC'");
        sql
    }

    /// Runs `sql` (one or more statements) and returns the lines psql printed (`-At`: one line
    /// per row, columns separated by `|`).
    #[track_caller]
    pub fn exec(&mut self, sql: &str) -> Vec<String> {
        self.count += 1;
        let marker = format!("__powa_sql_done_{}__", self.count);
        let stdin = self.stdin.as_mut().expect("psql stdin");
        let sent = write!(stdin, "{sql}\n;\n\\echo {marker}\n").and_then(|_| stdin.flush());
        let mut out = Vec::new();
        let deadline = Instant::now() + SQL_TIMEOUT;
        loop {
            if sent.is_err() {
                self.fail(sql, "psql stopped reading its input");
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line == marker => return out,
                Ok(line) => out.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) => self.fail(sql, &format!("no answer within {SQL_TIMEOUT:?}")),
                Err(mpsc::RecvTimeoutError::Disconnected) => self.fail(sql, "psql exited"),
            }
        }
    }

    #[track_caller]
    fn fail(&mut self, sql: &str, what: &str) -> ! {
        thread::sleep(Duration::from_millis(100));
        let stderr = self.stderr.lock().unwrap().clone();
        panic!("SQL failed ({what}):\n{sql}\n--- psql stderr ---\n{stderr}");
    }
}

impl Drop for Sql {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A throwaway PostgreSQL cluster plus a superuser SQL session on it.
pub struct Db {
    // Field order is drop order: the session ends before the cluster stops.
    sql: Sql,
    pub cluster: Cluster,
    _guard: TempDirGuard,
}

impl Db {
    /// A fresh cluster (`wal_level = logical`, fsync off).
    pub fn new() -> Db {
        let (cluster, guard) = Cluster::throwaway().unwrap_or_else(|e| panic!("throwaway PostgreSQL cluster: {e}"));
        let sql = Sql::open(cluster.port());
        Db { sql, cluster, _guard: guard }
    }

    pub fn url(&self) -> String {
        self.cluster.url()
    }

    /// Starts `powa-realtime serve` on this database (it installs the `realtime` schema and the
    /// API roles before it listens).
    pub fn server(&self) -> Server {
        Server::start(&[("DATABASE_URL", &self.url())])
    }

    /// Runs SQL; returns the printed lines.
    #[track_caller]
    pub fn exec(&mut self, sql: &str) -> Vec<String> {
        self.sql.exec(sql)
    }

    /// Runs SQL that prints exactly one line; returns it.
    #[track_caller]
    pub fn one(&mut self, sql: &str) -> String {
        let lines = self.sql.exec(sql);
        assert_eq!(lines.len(), 1, "expected one line from {sql:?}, got {lines:?}");
        lines.into_iter().next().unwrap()
    }

    /// Runs SQL that prints one JSON value; returns it parsed.
    #[track_caller]
    pub fn json(&mut self, sql: &str) -> Value {
        let line = self.one(sql);
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{sql:?} printed non-JSON ({e}): {line}"))
    }

    /// `[{"name": attname, "type": typname}, ...]` of a table, in column order (PROTOCOL.md §5.5).
    #[track_caller]
    pub fn columns(&mut self, table: &str) -> Value {
        self.json(&format!(
            "SELECT json_agg(json_build_object('name', a.attname, 'type', t.typname) ORDER BY a.attnum) \
             FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
             WHERE a.attrelid = '{table}'::regclass AND a.attnum > 0 AND NOT a.attisdropped"
        ))
    }

    /// The row as PROTOCOL.md §5.5 says it travels: `to_jsonb(row)` (session in UTC), except that
    /// `bytea` values are the hex digits without `\x`. `Value::Null` when there is no such row.
    #[track_caller]
    pub fn row(&mut self, table: &str, condition: &str) -> Value {
        let columns = self.columns(table);
        let lines = self.exec(&format!("SELECT to_jsonb(r) FROM {table} r WHERE {condition}"));
        assert!(lines.len() <= 1, "{table} WHERE {condition}: more than one row: {lines:?}");
        let Some(line) = lines.first() else { return Value::Null };
        let mut row: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("to_jsonb printed non-JSON ({e}): {line}"));
        for column in columns.as_array().unwrap() {
            if column["type"] == "bytea" {
                let name = column["name"].as_str().unwrap();
                if let Some(text) = row[name].as_str() {
                    let hex = text.strip_prefix("\\x").unwrap_or_else(|| panic!("bytea rendered as {text:?}")).to_string();
                    row[name] = Value::String(hex);
                }
            }
        }
        row
    }
}
