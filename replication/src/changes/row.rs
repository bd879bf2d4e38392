//! A row change ready to match and render: its relation, kind, and cell accessors for the new
//! and old images (unchanged TOAST resolved from the full old row when there is one).

use std::sync::Arc;

use ahash::AHashMap;

use crate::binding::EventFilter;
use crate::pgoutput::{Cell, OldKind, Relation, Tuple};
use crate::reader::RowChange;
use crate::sql::{RowImage, TableInfo};

/// (schema, table).
pub(crate) type TableKey = (Arc<str>, Arc<str>);

/// A relation from the stream, with a column index by name.
pub(crate) struct RelInfo {
    pub(crate) schema: Arc<str>,
    pub(crate) table: Arc<str>,
    pub(crate) relation: Relation,
    pub(crate) index: AHashMap<String, usize>,
}

impl RelInfo {
    /// Indexes a relation message.
    pub(crate) fn new(relation: Relation) -> RelInfo {
        let index = relation.columns.iter().enumerate().map(|(i, c)| (c.name.clone(), i)).collect();
        RelInfo { schema: Arc::from(relation.namespace.as_str()), table: Arc::from(relation.name.as_str()), relation, index }
    }

    /// Its (schema, table).
    pub(crate) fn key(&self) -> TableKey {
        (Arc::clone(&self.schema), Arc::clone(&self.table))
    }
}

/// The kind of a row change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Insert,
    Update,
    Delete,
}

impl Kind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Insert => "INSERT",
            Kind::Update => "UPDATE",
            Kind::Delete => "DELETE",
        }
    }

    pub(crate) fn wanted_by(self, event: EventFilter) -> bool {
        matches!(
            (event, self),
            (EventFilter::All, _) | (EventFilter::Insert, Kind::Insert) | (EventFilter::Update, Kind::Update) | (EventFilter::Delete, Kind::Delete)
        )
    }
}

/// A change ready to match: its rows as cell accessors.
pub(crate) struct Row<'a> {
    pub(crate) kind: Kind,
    pub(crate) relation: &'a RelInfo,
    pub(crate) new: Option<&'a Tuple>,
    pub(crate) old: Option<(OldKind, &'a Tuple)>,
}

impl<'a> Row<'a> {
    pub(crate) fn of(change: &'a RowChange, relations: &'a AHashMap<u32, RelInfo>) -> Option<Row<'a>> {
        Some(match change {
            RowChange::Insert { relation, new } => Row { kind: Kind::Insert, relation: relations.get(relation)?, new: Some(new), old: None },
            RowChange::Update { relation, old, new } => {
                Row { kind: Kind::Update, relation: relations.get(relation)?, new: Some(new), old: old.as_ref().map(|(k, t)| (*k, t)) }
            }
            RowChange::Delete { relation, old } => Row { kind: Kind::Delete, relation: relations.get(relation)?, new: None, old: Some((old.0, &old.1)) },
        })
    }

    /// A cell of the new row (INSERT/UPDATE): `None` = absent (unchanged TOAST without a full
    /// old row), `Some(None)` = NULL.
    pub(crate) fn new_cell(&self, index: usize) -> Option<Option<&'a [u8]>> {
        let new = self.new?;
        match new.0.get(index)? {
            Cell::Null => Some(None),
            Cell::Text(bytes) | Cell::Binary(bytes) => Some(Some(&bytes[..])),
            Cell::UnchangedToast => match self.old {
                Some((OldKind::Full, old)) => match old.0.get(index)? {
                    Cell::Text(bytes) | Cell::Binary(bytes) => Some(Some(&bytes[..])),
                    Cell::Null => Some(None),
                    Cell::UnchangedToast => None,
                },
                _ => None,
            },
        }
    }

    /// A cell of the old row: only replica-identity columns for key-only images.
    pub(crate) fn old_cell(&self, index: usize) -> Option<Option<&'a [u8]>> {
        let (kind, old) = self.old?;
        if kind == OldKind::Key && !self.relation.relation.columns.get(index)?.key {
            return None;
        }
        match old.0.get(index)? {
            Cell::Null => Some(None),
            Cell::Text(bytes) | Cell::Binary(bytes) => Some(Some(&bytes[..])),
            Cell::UnchangedToast => None,
        }
    }

    /// The image filters test: the new row, or the old one for DELETE (PROTOCOL.md §5.2).
    pub(crate) fn filter_cell(&self, index: usize) -> Option<Option<&'a [u8]>> {
        match self.kind {
            Kind::Delete => self.old_cell(index),
            _ => self.new_cell(index),
        }
    }
}

/// The primary-key values of the new row, as text (the RLS check looks rows up by them when
/// the committed image is incomplete).
pub(crate) fn primary_key_values(row: &Row<'_>, table: &TableInfo) -> Option<Vec<String>> {
    table
        .primary_key
        .iter()
        .map(|name| {
            let index = *row.relation.index.get(name)?;
            row.new_cell(index)?.map(|b| String::from_utf8_lossy(b).into_owned())
        })
        .collect()
}

/// The new row as committed, for the RLS check: its key, and every column of `table` as text
/// (`None` = NULL) when all are known — a column the stream did not send (unchanged TOAST
/// without a full old row, a generated column) leaves `cells` empty and the check reads the
/// row by key instead.
pub(crate) fn row_image(row: &Row<'_>, table: &TableInfo) -> Option<RowImage> {
    let key = primary_key_values(row, table)?;
    let cells = table
        .columns
        .iter()
        .map(|column| {
            let index = *row.relation.index.get(&column.name)?;
            row.new_cell(index).map(|cell| cell.map(|b| String::from_utf8_lossy(b).into_owned()))
        })
        .collect();
    Some(RowImage { key, cells })
}

