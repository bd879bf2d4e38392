//! The replication side's one error type: what failed, and whose fault it is.
//!
//! Materialize's Postgres source sorts database errors into *definite* (they will not fix
//! themselves: retrying only repeats them) and *transient* (a lost connection, a restart, a
//! timeout), and treats an error as transient until it is shown to be definite. We do the same,
//! with a narrower definite set than Materialize's (SQLSTATE classes 28, 3D, 42): here only
//! errors about *who we are and where we connect* are definite —
//!
//! - class 28 (`invalid_authorization_specification`, `invalid_password`): wrong user or
//!   password, or `pg_hba.conf` rejects us;
//! - `3D000` (`invalid_catalog_name`): the database in `DATABASE_URL` does not exist;
//! - `42501` (`insufficient_privilege`): the role may not log in for replication;
//! - a `DATABASE_URL` that cannot work (bad syntax, unix socket).
//!
//! The rest of class 42 stays transient on purpose: a walsender aborts with `42704` when
//! `supabase_realtime` is dropped mid-stream, and the reader recovers from that when the
//! publication is recreated (tests/postgres_recovery.rs).
//!
//! A definite error stops the retry loop that met it, is logged once with what to fix, and is
//! reported to subscribers; `/healthz` answers 503 until the server is restarted with a fixed
//! configuration.

use std::fmt;

use crate::pgconn::PgError;

/// Whose fault an error is, and so whether retrying can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The configuration or the database's set-up is wrong; retrying repeats the error.
    Definite,
    /// The connection or the server failed for now; retry with backoff.
    Transient,
}

/// A replication-side failure (the reader's stream or the changes core's SQL connection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicationError {
    /// Definite or transient.
    pub fault: Fault,
    /// What the database or the connection said.
    pub detail: String,
    /// SQLSTATE, when the server answered with an error.
    pub sqlstate: Option<String>,
}

impl ReplicationError {
    /// Classifies an error of the blocking wire client.
    pub fn from_pg(error: &PgError) -> ReplicationError {
        match error {
            PgError::Config(message) => ReplicationError { fault: Fault::Definite, detail: message.clone(), sqlstate: None },
            PgError::Server { code, .. } => ReplicationError { fault: fault_of(Some(code)), detail: error.to_string(), sqlstate: Some(code.clone()) },
            PgError::Io(_) | PgError::Protocol(_) => ReplicationError { fault: Fault::Transient, detail: error.to_string(), sqlstate: None },
        }
    }

    /// Classifies an error of tokio-postgres.
    pub fn from_sql(error: &tokio_postgres::Error) -> ReplicationError {
        let code = error.code().map(|c| c.code().to_string());
        let detail = match error.as_db_error() {
            Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
            None => error.to_string(),
        };
        ReplicationError { fault: fault_of(code.as_deref()), detail, sqlstate: code }
    }

    /// Whether retrying cannot help.
    pub fn is_definite(&self) -> bool {
        self.fault == Fault::Definite
    }

    /// What the operator should do, for definite errors.
    pub fn fix(&self) -> Option<&'static str> {
        if self.fault != Fault::Definite {
            return None;
        }
        Some(match self.sqlstate.as_deref() {
            Some(code) if code.starts_with("28") => "check the user and password in DATABASE_URL and that pg_hba.conf admits this user (for replication too), then restart the server",
            Some("3D000") => "the database named in DATABASE_URL does not exist: create it or fix the URL, then restart the server",
            Some("42501") => "the DATABASE_URL user lacks a privilege: it needs LOGIN and REPLICATION (or superuser); grant them, then restart the server",
            _ => "fix DATABASE_URL, then restart the server",
        })
    }
}

fn fault_of(sqlstate: Option<&str>) -> Fault {
    match sqlstate {
        Some(code) if code.starts_with("28") || code == "3D000" || code == "42501" => Fault::Definite,
        _ => Fault::Transient,
    }
}

impl fmt::Display for ReplicationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.fix() {
            Some(fix) => write!(f, "{} — this will not fix itself: {fix}", self.detail),
            None => f.write_str(&self.detail),
        }
    }
}

impl std::error::Error for ReplicationError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str) -> ReplicationError {
        ReplicationError::from_pg(&PgError::Server { code: code.into(), message: "m".into() })
    }

    #[test]
    fn definite_and_transient() {
        for (code, fault) in [
            ("28P01", Fault::Definite),
            ("28000", Fault::Definite),
            ("3D000", Fault::Definite),
            ("42501", Fault::Definite),
            ("42704", Fault::Transient), // a publication dropped mid-stream: recovered from
            ("57P01", Fault::Transient), // admin shutdown
            ("53300", Fault::Transient), // too many connections
            ("08006", Fault::Transient),
        ] {
            assert_eq!(server(code).fault, fault, "{code}");
        }
        let io = ReplicationError::from_pg(&PgError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)));
        assert_eq!((io.fault, io.fix()), (Fault::Transient, None));
        assert!(ReplicationError::from_pg(&PgError::Config("DATABASE_URL is not valid".into())).is_definite());
    }

    #[test]
    fn a_definite_error_says_what_to_fix() {
        assert_eq!(
            server("28P01").to_string(),
            "m (SQLSTATE 28P01) — this will not fix itself: check the user and password in DATABASE_URL and that pg_hba.conf admits this user (for replication too), then restart the server"
        );
        assert_eq!(server("57P01").to_string(), "m (SQLSTATE 57P01)");
    }
}
