//! The streaming replication sub-protocol: the messages carried inside `CopyData` once
//! `START_REPLICATION ... LOGICAL` has switched the connection to COPY BOTH mode (PostgreSQL
//! manual, "Streaming Replication Protocol"). Pure: bytes in, values out, and `now` is passed in.
//!
//! ```text
//!  server ──CopyData('w' XLogData)──► us   data = one pgoutput message (pgoutput::Message)
//!  server ──CopyData('k' keepalive)─► us   reply now if reply_requested
//!  us ─────CopyData('r' status)─────► server   written / flushed / applied LSNs
//! ```
//!
//! Feedback and the slot: for a logical slot the server treats the *flushed* position as
//! `confirmed_flush_lsn`, the point from which a restarted stream resumes and before which WAL
//! may be recycled. What to report there depends on the slot:
//!
//! - **Temporary slot (`reader`'s fallback when another process holds its slot):** the slot is dropped with the connection, so
//!   no stream ever resumes from it and the confirmed position matters only for WAL retention.
//!   The reader therefore confirms the largest `wal_end` it has *received* (from XLogData and
//!   keepalives), even in the middle of a transaction and before the core has handled it:
//!   confirming early loses nothing that a reconnect could have recovered (a reconnect makes a
//!   new slot at the current end of WAL anyway), and it keeps the slot from ever holding WAL
//!   back because subscribers are slow.
//! - **Permanent slot (what `reader` uses, issue 11):** a restarted stream resumes at the confirmed position, so
//!   report only the `end_lsn` of the last transaction whose changes have been handed on, and
//!   nothing past it: confirming too far loses changes after a restart, confirming too little
//!   (or never) makes the server keep WAL until the disk fills. While no transaction is open on
//!   our side (no Begin without its Commit), a keepalive's `wal_end` may be confirmed too: the
//!   server decides what to resend by commit LSN, and a transaction still running on the server
//!   will commit past that point, so it is sent all the same. This keeps an idle slot (or one
//!   whose tables see no changes) from holding WAL back.

use crate::pgoutput::{DecodeError, Reader};
use bytes::{BufMut, Bytes, BytesMut};

/// 2000-01-01 00:00:00 UTC (the PostgreSQL epoch) in Unix seconds.
pub const PG_EPOCH_OFFSET_SECS: i64 = 946_684_800;

/// A server-to-client message inside `CopyData`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationMessage {
    /// `w`: a chunk of WAL; for logical replication, exactly one pgoutput message.
    XLogData {
        /// The WAL position of the start of `data`.
        wal_start: u64,
        /// The current end of WAL on the server.
        wal_end: u64,
        /// The server's clock when it sent this, microseconds since 2000-01-01 UTC.
        send_time: i64,
        /// The payload (a slice of the input).
        data: Bytes,
    },
    /// `k`: the primary keepalive.
    Keepalive {
        /// The current end of WAL on the server.
        wal_end: u64,
        /// The server's clock when it sent this, microseconds since 2000-01-01 UTC.
        send_time: i64,
        /// The server asks for a status update right away (else it may time the client out,
        /// after `wal_sender_timeout`).
        reply_requested: bool,
    },
}

impl TryFrom<Bytes> for ReplicationMessage {
    type Error = DecodeError;

    /// Decodes one `CopyData` payload. Any tag other than `w` and `k` is
    /// [`DecodeError::BadTag`]: the server sends no others in this mode.
    fn try_from(data: Bytes) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(data);
        let message = match reader.u8()? {
            b'w' => ReplicationMessage::XLogData {
                wal_start: reader.u64()?,
                wal_end: reader.u64()?,
                send_time: reader.i64()?,
                data: reader.rest(),
            },
            b'k' => ReplicationMessage::Keepalive {
                wal_end: reader.u64()?,
                send_time: reader.i64()?,
                reply_requested: reader.u8()? != 0,
            },
            other => return Err(DecodeError::BadTag(other)),
        };
        reader.finish()?;
        Ok(message)
    }
}

impl ReplicationMessage {
    /// Appends the `CopyData` payload of this message to `out` (the server's side; for tests
    /// and fake servers). [`ReplicationMessage::try_from`] gives it back.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            ReplicationMessage::XLogData { wal_start, wal_end, send_time, data } => {
                out.put_u8(b'w');
                out.put_u64(*wal_start);
                out.put_u64(*wal_end);
                out.put_i64(*send_time);
                out.put_slice(data);
            }
            ReplicationMessage::Keepalive { wal_end, send_time, reply_requested } => {
                out.put_u8(b'k');
                out.put_u64(*wal_end);
                out.put_i64(*send_time);
                out.put_u8(u8::from(*reply_requested));
            }
        }
    }
}

/// The standby status update (`r`), the client's progress report, decoded (what a fake server
/// in tests reads back from [`standby_status_update`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StandbyStatusUpdate {
    /// The position just past the last WAL byte received and written.
    pub written: u64,
    /// The position just past the last WAL byte durably handled: the slot's confirmed position.
    pub flushed: u64,
    /// The position just past the last WAL byte applied.
    pub applied: u64,
    /// The client's clock, microseconds since 2000-01-01 UTC.
    pub now: i64,
    /// The client asks the server to answer with a keepalive right away.
    pub reply_requested: bool,
}

impl TryFrom<Bytes> for StandbyStatusUpdate {
    type Error = DecodeError;

    fn try_from(data: Bytes) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(data);
        match reader.u8()? {
            b'r' => {}
            other => return Err(DecodeError::BadTag(other)),
        }
        let update = StandbyStatusUpdate {
            written: reader.u64()?,
            flushed: reader.u64()?,
            applied: reader.u64()?,
            now: reader.i64()?,
            reply_requested: reader.u8()? != 0,
        };
        reader.finish()?;
        Ok(update)
    }
}

/// The bytes of a standby status update (`r`), to send as a `CopyData` payload. Each position
/// is "the last WAL byte + 1" in the manual's words, i.e. an end LSN such as
/// [`crate::pgoutput::Commit::end_lsn`] is passed as it is. `now` is microseconds since
/// 2000-01-01 UTC (see [`pg_micros_from_unix_micros`]).
pub fn standby_status_update(written: u64, flushed: u64, applied: u64, now: i64, reply_requested: bool) -> Bytes {
    let mut out = BytesMut::with_capacity(34);
    out.put_u8(b'r');
    out.put_u64(written);
    out.put_u64(flushed);
    out.put_u64(applied);
    out.put_i64(now);
    out.put_u8(u8::from(reply_requested));
    out.freeze()
}

/// Converts microseconds since the Unix epoch to microseconds since the PostgreSQL epoch
/// (saturating at the ends of `i64`).
pub fn pg_micros_from_unix_micros(unix_micros: i64) -> i64 {
    unix_micros.saturating_sub(PG_EPOCH_OFFSET_SECS * 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(text: &str) -> Bytes {
        let digits: Vec<u8> = text.bytes().filter(u8::is_ascii_hexdigit).collect();
        digits
            .chunks(2)
            .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).unwrap(), 16).unwrap())
            .collect::<Vec<u8>>()
            .into()
    }

    #[test]
    fn xlogdata_by_hand() {
        let input = hex("77 0000000001548e60 0000000001549000 0000000000000102 42 0a0b");
        let message = ReplicationMessage::try_from(input).unwrap();
        assert_eq!(
            message,
            ReplicationMessage::XLogData {
                wal_start: 0x1548e60,
                wal_end: 0x1549000,
                send_time: 0x102,
                data: Bytes::from_static(&[0x42, 0x0a, 0x0b]),
            }
        );
    }

    #[test]
    fn xlogdata_with_empty_payload() {
        let input = hex("77 0000000000000001 0000000000000002 0000000000000003");
        let ReplicationMessage::XLogData { data, .. } = ReplicationMessage::try_from(input).unwrap() else {
            panic!("not XLogData")
        };
        assert!(data.is_empty());
    }

    #[test]
    fn keepalive_by_hand() {
        let input = hex("6b 00000000015732b8 0002d5b8a4e0c000 01");
        assert_eq!(
            ReplicationMessage::try_from(input).unwrap(),
            ReplicationMessage::Keepalive {
                wal_end: 0x15732b8,
                send_time: 0x0002_d5b8_a4e0_c000,
                reply_requested: true
            }
        );
        let input = hex("6b 00000000015732b8 0000000000000000 00");
        let ReplicationMessage::Keepalive { reply_requested, .. } = ReplicationMessage::try_from(input).unwrap() else {
            panic!("not a keepalive")
        };
        assert!(!reply_requested);
    }

    #[test]
    fn malformed_messages() {
        assert_eq!(ReplicationMessage::try_from(Bytes::new()), Err(DecodeError::Truncated));
        assert_eq!(ReplicationMessage::try_from(hex("6b 00000000015732b8")), Err(DecodeError::Truncated));
        assert_eq!(ReplicationMessage::try_from(hex("77 00")), Err(DecodeError::Truncated));
        assert_eq!(
            ReplicationMessage::try_from(hex("6b 00000000015732b8 0000000000000000 00 ff")),
            Err(DecodeError::TrailingBytes(1))
        );
        assert_eq!(ReplicationMessage::try_from(hex("72 00")), Err(DecodeError::BadTag(b'r')));
    }

    #[test]
    fn standby_status_update_layout() {
        let bytes = standby_status_update(0x10, 0x20, 0x30, 0x40, true);
        assert_eq!(bytes, hex("72 0000000000000010 0000000000000020 0000000000000030 0000000000000040 01"));
        assert_eq!(
            StandbyStatusUpdate::try_from(bytes).unwrap(),
            StandbyStatusUpdate { written: 0x10, flushed: 0x20, applied: 0x30, now: 0x40, reply_requested: true }
        );
    }

    #[test]
    fn epoch_conversion() {
        // 2000-01-01T00:00:00Z is the PostgreSQL epoch.
        assert_eq!(pg_micros_from_unix_micros(946_684_800_000_000), 0);
        assert_eq!(pg_micros_from_unix_micros(946_684_801_500_000), 1_500_000);
        assert_eq!(pg_micros_from_unix_micros(i64::MIN), i64::MIN);
    }

    fn replication_message() -> impl Strategy<Value = ReplicationMessage> {
        prop_oneof![
            (any::<u64>(), any::<u64>(), any::<i64>(), proptest::collection::vec(any::<u8>(), 0..64)).prop_map(
                |(wal_start, wal_end, send_time, data)| ReplicationMessage::XLogData {
                    wal_start,
                    wal_end,
                    send_time,
                    data: data.into(),
                }
            ),
            (any::<u64>(), any::<i64>(), any::<bool>()).prop_map(|(wal_end, send_time, reply_requested)| {
                ReplicationMessage::Keepalive { wal_end, send_time, reply_requested }
            }),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = ReplicationMessage::try_from(Bytes::from(bytes.clone()));
            let _ = StandbyStatusUpdate::try_from(Bytes::from(bytes));
        }

        #[test]
        fn tagged_bytes_never_panic(tag in prop_oneof![Just(b'w'), Just(b'k'), Just(b'r')],
                                    body in proptest::collection::vec(any::<u8>(), 0..40)) {
            let mut bytes = vec![tag];
            bytes.extend(body);
            let _ = ReplicationMessage::try_from(Bytes::from(bytes.clone()));
            let _ = StandbyStatusUpdate::try_from(Bytes::from(bytes));
        }

        #[test]
        fn encode_decode_round_trip(message in replication_message()) {
            let mut out = BytesMut::new();
            message.encode(&mut out);
            prop_assert_eq!(ReplicationMessage::try_from(out.freeze()).unwrap(), message);
        }

        #[test]
        fn status_update_round_trip(written: u64, flushed: u64, applied: u64, now: i64, reply_requested: bool) {
            let bytes = standby_status_update(written, flushed, applied, now, reply_requested);
            let decoded = StandbyStatusUpdate::try_from(bytes).unwrap();
            prop_assert_eq!(decoded, StandbyStatusUpdate { written, flushed, applied, now, reply_requested });
        }
    }
}
