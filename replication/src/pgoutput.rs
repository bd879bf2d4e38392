//! pgoutput, protocol version 1: the logical replication messages PostgreSQL's built-in output
//! plugin writes into each XLogData payload (see `stream`), decoded without IO.
//!
//! ```text
//!  CopyData ──► stream::ReplicationMessage::XLogData { data, .. }
//!                 │
//!                 └──► Message::try_from(data)
//!                        Begin, [Origin], then Type* / Relation* before first use, and
//!                        Insert / Update / Delete / Truncate / LogicalMessage, then Commit;
//!                        row cells are `Bytes` slices of `data`: no copy per row
//! ```
//!
//! The layout of every message follows the PostgreSQL manual, "Logical Replication Message
//! Formats". All integers are big-endian; a `String` is NUL-terminated. We request
//! `proto_version '1'`, so messages never carry the transaction id that version 2 adds inside
//! streamed transactions; a version-2 stream would be misread, which is why the driver pins 1.
//!
//! Decoding is strict: a message must be consumed exactly, so a framing mistake surfaces as a
//! [`DecodeError`] instead of a silently shifted row. Counts and lengths come from the peer and
//! are checked against the bytes actually present before anything is allocated. A tag byte that
//! this module does not know gives [`Message::Unknown`] (version 2 adds stream messages; a
//! future server may add more), so the caller decides whether to skip it.
//!
//! [`Message::encode`] is the inverse, for tests and fake servers.

use bytes::{BufMut, Bytes, BytesMut};
use smallvec::SmallVec;
use std::fmt;

#[cfg(test)]
mod tests;

/// One pgoutput message (protocol version 1), one variant per message in the PostgreSQL manual.
///
/// Row variants are large (an [`Update`] holds two inline [`Tuple`]s, about 1.3 KB): that is
/// the price of decoding a row without touching the allocator, and cheaper than a `Box` per row.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `B`: a transaction starts; its changes follow, then a [`Commit`].
    Begin(Begin),
    /// `C`: the transaction started by the last [`Begin`] committed.
    Commit(Commit),
    /// `O`: the transaction was replicated from another node (replication origins).
    Origin(Origin),
    /// `R`: the description of a table, sent before the first change to it in a session and
    /// again whenever its definition changes. Changes name tables by [`Relation::oid`] only.
    Relation(Relation),
    /// `Y`: the name of a column type that is not built in (enum, domain, composite, array of
    /// those); sent before the [`Relation`] that uses it.
    Type(TypeMessage),
    /// `I`: a row was inserted.
    Insert(Insert),
    /// `U`: a row was updated.
    Update(Update),
    /// `D`: a row was deleted.
    Delete(Delete),
    /// `T`: one or more tables were truncated.
    Truncate(Truncate),
    /// `M`: a message written with `pg_logical_emit_message` (only sent with `messages 'true'`).
    LogicalMessage(LogicalMessage),
    /// A tag this decoder does not know; the rest of the message is not looked at.
    Unknown(u8),
}

/// `B`: the start of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    /// The LSN of the transaction's commit record.
    pub final_lsn: u64,
    /// Commit time, microseconds since 2000-01-01 00:00:00 UTC (the PostgreSQL epoch).
    pub commit_time: i64,
    /// The transaction id.
    pub xid: u32,
}

/// `C`: the end of a transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    /// Unused by the server; currently always 0.
    pub flags: u8,
    /// The LSN of the commit record (equal to the [`Begin::final_lsn`]).
    pub commit_lsn: u64,
    /// The LSN just past the transaction: what to confirm once it has been handled.
    pub end_lsn: u64,
    /// Commit time, microseconds since 2000-01-01 00:00:00 UTC.
    pub commit_time: i64,
}

/// `O`: where a replicated transaction came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The LSN of the commit on the origin server.
    pub lsn: u64,
    /// The replication origin's name.
    pub name: String,
}

/// `R`: a table's identity and columns, as the following changes will carry them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The table's oid; changes refer to it.
    pub oid: u32,
    /// The schema name (empty for `pg_catalog`).
    pub namespace: String,
    /// The table name.
    pub name: String,
    /// `pg_class.relreplident`: `b'd'` default (primary key), `b'n'` nothing, `b'f'` full,
    /// `b'i'` a chosen index.
    pub replica_identity: u8,
    /// The published columns in table order (generated columns are left out by the server).
    pub columns: Vec<RelationColumn>,
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Whether the column is part of the replica identity key (flag bit 1).
    pub key: bool,
    /// The column name.
    pub name: String,
    /// The oid of the column's type (see `value::builtin_type_name`).
    pub type_oid: u32,
    /// `atttypmod` (e.g. `varchar(20)` gives 24), -1 when there is none.
    pub type_modifier: i32,
}

/// `Y`: the name of a non-built-in type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypeMessage {
    /// The type's oid.
    pub oid: u32,
    /// The schema name (empty for `pg_catalog`).
    pub namespace: String,
    /// `pg_type.typname`; array types are named with a leading `_`.
    pub name: String,
}

/// `I`: an inserted row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    /// The [`Relation::oid`] of the table.
    pub relation: u32,
    /// The new row, one cell per [`Relation::columns`] entry.
    pub new: Tuple,
}

/// `U`: an updated row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// The [`Relation::oid`] of the table.
    pub relation: u32,
    /// The old row: the whole row with replica identity FULL ([`OldKind::Full`]), or the key
    /// columns when the update changed the key ([`OldKind::Key`]; other cells are null).
    /// Absent otherwise.
    pub old: Option<(OldKind, Tuple)>,
    /// The new row. Unchanged TOASTed values appear as [`Cell::UnchangedToast`].
    pub new: Tuple,
}

/// `D`: a deleted row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    /// The [`Relation::oid`] of the table.
    pub relation: u32,
    /// The old row: key columns ([`OldKind::Key`], other cells null) or, with replica identity
    /// FULL, the whole row ([`OldKind::Full`]).
    pub old: (OldKind, Tuple),
}

/// Which old tuple an [`Update`] or [`Delete`] carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    /// `K`: the replica identity key columns only.
    Key,
    /// `O`: the whole old row (replica identity FULL).
    Full,
}

/// `T`: truncated tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// Bit 1: `CASCADE`; bit 2: `RESTART IDENTITY`.
    pub options: u8,
    /// The [`Relation::oid`]s of the truncated tables.
    pub relations: Vec<u32>,
}

/// `M`: a logical decoding message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    /// Whether it was emitted as part of a transaction (then it sits between Begin and Commit).
    pub transactional: bool,
    /// The LSN of the message.
    pub lsn: u64,
    /// The prefix given to `pg_logical_emit_message`.
    pub prefix: String,
    /// The content, as given (arbitrary bytes).
    pub content: Bytes,
}

/// A row's cells, in [`Relation::columns`] order. Sixteen cells live inline, so rows of
/// ordinary tables are decoded without a heap allocation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Tuple(pub SmallVec<[Cell; 16]>);

/// One column value of a [`Tuple`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    /// `n`: SQL NULL.
    Null,
    /// `u`: a TOASTed value the update did not change; the value itself is not sent.
    UnchangedToast,
    /// `t`: the value in the type's text output format (see `value::write_json_value`).
    Text(Bytes),
    /// `b`: the value in the type's binary send format (only with the `binary` option).
    Binary(Bytes),
}

/// Why a message could not be decoded. None of these is a bug on our side: they describe the
/// bytes the server sent (or a stream that is not pgoutput version 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeError {
    /// The message ended before a field it announces (including an unterminated string).
    Truncated,
    /// A byte that must be one of a fixed set of tags was not (the byte is given).
    BadTag(u8),
    /// A name was not valid UTF-8.
    BadUtf8,
    /// A count or length was negative.
    BadLength(i32),
    /// Bytes were left after the last field of the message (how many is given).
    TrailingBytes(usize),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => write!(f, "message truncated"),
            DecodeError::BadTag(tag) => write!(f, "unexpected tag byte 0x{tag:02x}"),
            DecodeError::BadUtf8 => write!(f, "name is not valid UTF-8"),
            DecodeError::BadLength(length) => write!(f, "negative count or length {length}"),
            DecodeError::TrailingBytes(count) => write!(f, "{count} unexpected bytes after the message"),
        }
    }
}

impl std::error::Error for DecodeError {}

impl TryFrom<Bytes> for Message {
    type Error = DecodeError;

    /// Decodes one XLogData payload. Cells and logical message contents are slices of `data`.
    fn try_from(data: Bytes) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(data);
        let tag = reader.u8()?;
        let message = match tag {
            b'B' => Message::Begin(Begin { final_lsn: reader.u64()?, commit_time: reader.i64()?, xid: reader.u32()? }),
            b'C' => Message::Commit(Commit {
                flags: reader.u8()?,
                commit_lsn: reader.u64()?,
                end_lsn: reader.u64()?,
                commit_time: reader.i64()?,
            }),
            b'O' => Message::Origin(Origin { lsn: reader.u64()?, name: reader.string()? }),
            b'R' => Message::Relation(relation(&mut reader)?),
            b'Y' => {
                Message::Type(TypeMessage { oid: reader.u32()?, namespace: reader.string()?, name: reader.string()? })
            }
            b'I' => {
                let relation = reader.u32()?;
                reader.expect(b'N')?;
                Message::Insert(Insert { relation, new: tuple(&mut reader)? })
            }
            b'U' => Message::Update(update(&mut reader)?),
            b'D' => {
                let relation = reader.u32()?;
                let kind = old_kind(reader.u8()?)?;
                Message::Delete(Delete { relation, old: (kind, tuple(&mut reader)?) })
            }
            b'T' => Message::Truncate(truncate(&mut reader)?),
            b'M' => Message::LogicalMessage(logical_message(&mut reader)?),
            other => return Ok(Message::Unknown(other)),
        };
        reader.finish()?;
        Ok(message)
    }
}

fn relation(reader: &mut Reader) -> Result<Relation, DecodeError> {
    let oid = reader.u32()?;
    let namespace = reader.string()?;
    let name = reader.string()?;
    let replica_identity = reader.u8()?;
    let count = reader.count16()?;
    // Each column takes at least 10 bytes (flags, NUL, oid, typmod): never reserve more than
    // the message can hold.
    let mut columns = Vec::with_capacity(count.min(reader.remaining() / 10));
    for _ in 0..count {
        let flags = reader.u8()?;
        columns.push(RelationColumn {
            key: flags & 1 != 0,
            name: reader.string()?,
            type_oid: reader.u32()?,
            type_modifier: reader.i32()?,
        });
    }
    Ok(Relation { oid, namespace, name, replica_identity, columns })
}

fn update(reader: &mut Reader) -> Result<Update, DecodeError> {
    let relation = reader.u32()?;
    // 'K' or 'O' and an old tuple come first when present; 'N' and the new tuple always end it.
    let old = match reader.u8()? {
        b'N' => None,
        tag => {
            let kind = old_kind(tag)?;
            let old = tuple(reader)?;
            reader.expect(b'N')?;
            Some((kind, old))
        }
    };
    Ok(Update { relation, old, new: tuple(reader)? })
}

fn old_kind(tag: u8) -> Result<OldKind, DecodeError> {
    match tag {
        b'K' => Ok(OldKind::Key),
        b'O' => Ok(OldKind::Full),
        other => Err(DecodeError::BadTag(other)),
    }
}

#[inline]
fn tuple(reader: &mut Reader) -> Result<Tuple, DecodeError> {
    let count = reader.count16()?;
    // Every cell takes at least its kind byte.
    let mut cells = SmallVec::with_capacity(count.min(reader.remaining()));
    for _ in 0..count {
        let cell = match reader.u8()? {
            b'n' => Cell::Null,
            b'u' => Cell::UnchangedToast,
            b't' => Cell::Text(reader.counted_bytes()?),
            b'b' => Cell::Binary(reader.counted_bytes()?),
            other => return Err(DecodeError::BadTag(other)),
        };
        cells.push(cell);
    }
    Ok(Tuple(cells))
}

fn truncate(reader: &mut Reader) -> Result<Truncate, DecodeError> {
    let count = reader.count32()?;
    let options = reader.u8()?;
    let mut relations = Vec::with_capacity(count.min(reader.remaining() / 4));
    for _ in 0..count {
        relations.push(reader.u32()?);
    }
    Ok(Truncate { options, relations })
}

fn logical_message(reader: &mut Reader) -> Result<LogicalMessage, DecodeError> {
    let flags = reader.u8()?;
    let lsn = reader.u64()?;
    let prefix = reader.string()?;
    let content = reader.counted_bytes()?;
    Ok(LogicalMessage { transactional: flags & 1 != 0, lsn, prefix, content })
}

/// A bounds-checked cursor over one message. Slices share the input's buffer.
pub(crate) struct Reader {
    data: Bytes,
    position: usize,
}

impl Reader {
    pub(crate) fn new(data: Bytes) -> Reader {
        Reader { data, position: 0 }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.data.len() - self.position
    }

    fn take(&mut self, length: usize) -> Result<&[u8], DecodeError> {
        if self.remaining() < length {
            return Err(DecodeError::Truncated);
        }
        let start = self.position;
        self.position += length;
        Ok(&self.data[start..self.position])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut array = [0; N];
        array.copy_from_slice(self.take(N)?);
        Ok(array)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn expect(&mut self, tag: u8) -> Result<(), DecodeError> {
        match self.u8()? {
            byte if byte == tag => Ok(()),
            other => Err(DecodeError::BadTag(other)),
        }
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    pub(crate) fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    /// An Int16 count; negative counts are errors.
    fn count16(&mut self) -> Result<usize, DecodeError> {
        let count = i16::from_be_bytes(self.array()?);
        usize::try_from(count).map_err(|_| DecodeError::BadLength(i32::from(count)))
    }

    /// An Int32 count; negative counts are errors.
    fn count32(&mut self) -> Result<usize, DecodeError> {
        let count = self.i32()?;
        usize::try_from(count).map_err(|_| DecodeError::BadLength(count))
    }

    /// An Int32 length followed by that many bytes, returned as a slice of the input.
    fn counted_bytes(&mut self) -> Result<Bytes, DecodeError> {
        let length = self.count32()?;
        self.take(length)?;
        Ok(self.data.slice(self.position - length..self.position))
    }

    /// The rest of the message, as a slice of the input.
    pub(crate) fn rest(&mut self) -> Bytes {
        let rest = self.data.slice(self.position..);
        self.position = self.data.len();
        rest
    }

    /// A NUL-terminated UTF-8 string.
    fn string(&mut self) -> Result<String, DecodeError> {
        let rest = &self.data[self.position..];
        let length = rest.iter().position(|&byte| byte == 0).ok_or(DecodeError::Truncated)?;
        let text = std::str::from_utf8(&rest[..length]).map_err(|_| DecodeError::BadUtf8)?.to_owned();
        self.position += length + 1;
        Ok(text)
    }

    /// Succeeds only when the whole message has been read.
    pub(crate) fn finish(&self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::TrailingBytes(extra)),
        }
    }
}

impl Message {
    /// Appends the wire form of this message to `out`; [`Message::try_from`] gives it back.
    ///
    /// Panics if a name contains a NUL byte, or a count does not fit its wire field (more than
    /// 32767 columns or cells): such a message cannot exist on the wire, so building one is a
    /// bug in the caller.
    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Message::Begin(begin) => {
                out.put_u8(b'B');
                out.put_u64(begin.final_lsn);
                out.put_i64(begin.commit_time);
                out.put_u32(begin.xid);
            }
            Message::Commit(commit) => {
                out.put_u8(b'C');
                out.put_u8(commit.flags);
                out.put_u64(commit.commit_lsn);
                out.put_u64(commit.end_lsn);
                out.put_i64(commit.commit_time);
            }
            Message::Origin(origin) => {
                out.put_u8(b'O');
                out.put_u64(origin.lsn);
                put_string(out, &origin.name);
            }
            Message::Relation(relation) => encode_relation(relation, out),
            Message::Type(type_message) => {
                out.put_u8(b'Y');
                out.put_u32(type_message.oid);
                put_string(out, &type_message.namespace);
                put_string(out, &type_message.name);
            }
            Message::Insert(insert) => {
                out.put_u8(b'I');
                out.put_u32(insert.relation);
                out.put_u8(b'N');
                encode_tuple(&insert.new, out);
            }
            Message::Update(update) => {
                out.put_u8(b'U');
                out.put_u32(update.relation);
                if let Some((kind, old)) = &update.old {
                    out.put_u8(old_kind_tag(*kind));
                    encode_tuple(old, out);
                }
                out.put_u8(b'N');
                encode_tuple(&update.new, out);
            }
            Message::Delete(delete) => {
                out.put_u8(b'D');
                out.put_u32(delete.relation);
                out.put_u8(old_kind_tag(delete.old.0));
                encode_tuple(&delete.old.1, out);
            }
            Message::Truncate(truncate) => {
                out.put_u8(b'T');
                out.put_i32(i32::try_from(truncate.relations.len()).expect("at most i32::MAX relations"));
                out.put_u8(truncate.options);
                truncate.relations.iter().for_each(|&oid| out.put_u32(oid));
            }
            Message::LogicalMessage(message) => {
                out.put_u8(b'M');
                out.put_u8(u8::from(message.transactional));
                out.put_u64(message.lsn);
                put_string(out, &message.prefix);
                put_counted(out, &message.content);
            }
            Message::Unknown(tag) => out.put_u8(*tag),
        }
    }
}

fn encode_relation(relation: &Relation, out: &mut BytesMut) {
    out.put_u8(b'R');
    out.put_u32(relation.oid);
    put_string(out, &relation.namespace);
    put_string(out, &relation.name);
    out.put_u8(relation.replica_identity);
    out.put_i16(i16::try_from(relation.columns.len()).expect("at most 32767 columns"));
    for column in &relation.columns {
        out.put_u8(u8::from(column.key));
        put_string(out, &column.name);
        out.put_u32(column.type_oid);
        out.put_i32(column.type_modifier);
    }
}

fn encode_tuple(tuple: &Tuple, out: &mut BytesMut) {
    out.put_i16(i16::try_from(tuple.0.len()).expect("at most 32767 cells"));
    for cell in &tuple.0 {
        match cell {
            Cell::Null => out.put_u8(b'n'),
            Cell::UnchangedToast => out.put_u8(b'u'),
            Cell::Text(text) => {
                out.put_u8(b't');
                put_counted(out, text);
            }
            Cell::Binary(binary) => {
                out.put_u8(b'b');
                put_counted(out, binary);
            }
        }
    }
}

fn old_kind_tag(kind: OldKind) -> u8 {
    match kind {
        OldKind::Key => b'K',
        OldKind::Full => b'O',
    }
}

fn put_string(out: &mut BytesMut, text: &str) {
    assert!(!text.as_bytes().contains(&0), "a pgoutput string cannot contain NUL");
    out.put_slice(text.as_bytes());
    out.put_u8(0);
}

fn put_counted(out: &mut BytesMut, bytes: &[u8]) {
    out.put_i32(i32::try_from(bytes.len()).expect("at most i32::MAX bytes"));
    out.put_slice(bytes);
}
