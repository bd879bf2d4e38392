//! Postgres Changes row filters (PROTOCOL.md §5.2): parsing, validation against the table's
//! column types, and evaluation in Rust on the decoded row.
//!
//! Filter values never reach SQL: they are parsed into typed values once, at subscribe time,
//! and compared with each change's column text. Comparison follows the column's type: integers
//! and floats numerically, `numeric` exactly and date/time types by value (`ordered`), booleans
//! by truth value, `uuid` case-insensitively, text by bytes when its collation orders by bytes
//! (`C`, `POSIX`, `C.UTF-8`), everything else by bytes.
//!
//! Text under any other collation (a linguistic libc locale, ICU) is ordered by PostgreSQL:
//! such a filter carries its column's [`Collation`], and [`Filter::matches_with`] asks an
//! oracle for the order of (value, operand) pairs, which the changes core fills with one
//! batched, parameterised query per batch of transactions ([`Filter::database_pairs`] lists the
//! pairs a row needs). `lt`/`lte`/`gt`/`gte` go to the database under such a collation; `eq`,
//! `neq`, `in` and `isdistinct` too when the collation is nondeterministic.

use std::cmp::Ordering;
use std::fmt;
use std::sync::Arc;

use engine::client_error::{BindingError, BindingException};
use regex::bytes::{Regex, RegexBuilder};

mod ordered;

use ordered::Numeric;
pub use ordered::Temporal;

/// Most values an `in` filter may list.
pub const IN_VALUES_MAX: usize = 100;
/// Longest `filter` string a binding may carry, in bytes (beyond: the binding fails with
/// [`engine::client_error::ChangesLimit::FilterTooLong`]). Far above any real filter (an
/// `in` list of 100 long values); it bounds the parse and compile work one binding can cause.
pub const FILTER_BYTES_MAX: usize = 65_536;
/// Most memory one compiled pattern (`like`, `ilike`, `match`, `imatch`) may take, and the
/// bound of its lazy-DFA cache (beyond: the binding fails with
/// [`engine::client_error::ChangesLimit::PatternTooComplex`], never a panic).
pub const REGEX_BYTES_MAX: usize = 256 * 1024;

/// A filter operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `=`
    Eq,
    /// `!=`
    Neq,
    /// `<`
    Lt,
    /// `<=`
    Lte,
    /// `>`
    Gt,
    /// `>=`
    Gte,
    /// `= ANY(...)`
    In,
    /// `LIKE`
    Like,
    /// `ILIKE`
    Ilike,
    /// `IS`
    Is,
    /// `~`
    Match,
    /// `~*`
    Imatch,
    /// `IS DISTINCT FROM`
    IsDistinct,
}

impl Op {
    fn parse(name: &str) -> Option<Op> {
        Some(match name {
            "eq" => Op::Eq,
            "neq" => Op::Neq,
            "lt" => Op::Lt,
            "lte" => Op::Lte,
            "gt" => Op::Gt,
            "gte" => Op::Gte,
            "in" => Op::In,
            "like" => Op::Like,
            "ilike" => Op::Ilike,
            "is" => Op::Is,
            "match" => Op::Match,
            "imatch" => Op::Imatch,
            "isdistinct" => Op::IsDistinct,
            _ => return None,
        })
    }

    /// The operator's name in filters.
    pub fn name(self) -> &'static str {
        match self {
            Op::Eq => "eq",
            Op::Neq => "neq",
            Op::Lt => "lt",
            Op::Lte => "lte",
            Op::Gt => "gt",
            Op::Gte => "gte",
            Op::In => "in",
            Op::Like => "like",
            Op::Ilike => "ilike",
            Op::Is => "is",
            Op::Match => "match",
            Op::Imatch => "imatch",
            Op::IsDistinct => "isdistinct",
        }
    }
}

/// One parsed `column=[not.]op.value` segment, before validation against the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFilter {
    /// Column name.
    pub column: String,
    /// Operator.
    pub op: Op,
    /// Value text (unquoted; for `in`, the text between the parentheses).
    pub value: String,
    /// `not.` prefix.
    pub negate: bool,
}

/// A filter parse error, with upstream's exact message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterParseError(pub String);

impl fmt::Display for FilterParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn elixir_list(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|i| format!("{:?}", i)).collect();
    format!("[{}]", quoted.join(", "))
}

fn parse_error(error: BindingError) -> FilterParseError {
    FilterParseError(error.text())
}

/// Splits on commas outside parentheses and outside quoted sections.
fn split_segments(filter: &str) -> Vec<&str> {
    let bytes = filter.as_bytes();
    let (mut depth, mut quoted, mut escaped) = (0usize, false, false);
    let mut start = 0;
    let mut segments = Vec::new();
    for (i, &b) in bytes.iter().enumerate() {
        if quoted {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                quoted = false;
            }
            continue;
        }
        match b {
            b'"' if i > 0 && (bytes[i - 1] == b'.' || bytes[i - 1] == b'(' || (depth > 0 && bytes[i - 1] == b',')) => quoted = true,
            b'(' => depth += 1,
            b')' => depth = depth.saturating_sub(1),
            b',' if depth == 0 => {
                segments.push(&filter[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    segments.push(&filter[start..]);
    segments
}

/// Removes the quotes of a value that is exactly one quoted string; anything else as is.
fn unquote(value: &str) -> String {
    let Some(inner) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) else {
        return value.to_string();
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(next) => out.push(next),
                None => return value.to_string(),
            },
            '"' => return value.to_string(), // an unescaped quote inside: not one quoted string
            c => out.push(c),
        }
    }
    out
}

/// Parses a filter string (AND of segments). A whitespace-only filter is no filter.
pub fn parse(filter: &str) -> Result<Vec<RawFilter>, FilterParseError> {
    if filter.len() > FILTER_BYTES_MAX {
        return Err(FilterParseError(engine::client_error::ChangesLimit::FilterTooLong { bytes: filter.len(), max: FILTER_BYTES_MAX }.text()));
    }
    if filter.trim().is_empty() {
        return Ok(Vec::new());
    }
    let mut filters = Vec::new();
    for segment in split_segments(filter) {
        let segment = segment.trim();
        if segment.is_empty() {
            return Err(parse_error(BindingError::FilterEmptySegment));
        }
        let Some((column, rest)) = segment.split_once('=') else {
            return Err(parse_error(BindingError::FilterParse { detail: elixir_list(&segment.split('=').collect::<Vec<_>>()) }));
        };
        let (negate, rest) = match rest.strip_prefix("not.") {
            Some(rest) => (true, rest),
            None => (false, rest),
        };
        let Some((op_name, value)) = rest.split_once('.') else {
            return Err(parse_error(BindingError::FilterParse { detail: elixir_list(&[rest]) }));
        };
        let Some(op) = Op::parse(op_name) else {
            return Err(parse_error(BindingError::FilterParse { detail: elixir_list(&[op_name, value]) }));
        };
        let value = if op == Op::In {
            let Some(inner) = value.strip_prefix('(').and_then(|v| v.strip_suffix(')')) else {
                return Err(parse_error(BindingError::FilterInNeedsParentheses));
            };
            inner.to_string()
        } else {
            unquote(value)
        };
        filters.push(RawFilter { column: column.trim().to_string(), op, value, negate });
    }
    Ok(filters)
}

fn malformed(body: &str) -> String {
    BindingException::MalformedArrayLiteral { body: body.to_string() }.text()
}

/// Parses the items of an `in` list as a PostgreSQL array literal body (`a,"b,c",NULL`).
fn array_items(body: &str) -> Result<Vec<Option<String>>, String> {
    let mut items = Vec::new();
    let mut chars = body.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut item = String::new();
        let mut was_quoted = false;
        if chars.peek() == Some(&'"') {
            was_quoted = true;
            chars.next();
            loop {
                match chars.next() {
                    Some('\\') => item.push(chars.next().ok_or_else(|| malformed(body))?),
                    Some('"') => break,
                    Some(c) => item.push(c),
                    None => return Err(malformed(body)),
                }
            }
            while chars.peek().is_some_and(|c| c.is_whitespace()) {
                chars.next();
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                item.push(c);
                chars.next();
            }
            item = item.trim_end().to_string();
        }
        if !was_quoted && item.eq_ignore_ascii_case("NULL") {
            items.push(None);
        } else {
            items.push(Some(item));
        }
        match chars.next() {
            None => break,
            Some(',') => continue,
            Some(_) => return Err(malformed(body)),
        }
    }
    Ok(items)
}

/// How a column's values compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// int2/int4/int8/oid.
    Integer,
    /// float4/float8/money.
    Decimal,
    /// numeric: exact decimal order.
    Numeric,
    /// date, timestamp, timestamptz, time, timetz: by value.
    Temporal(Temporal),
    /// bool.
    Boolean,
    /// uuid (case-insensitive).
    Uuid,
    /// Text-like types (LIKE and regex allowed).
    Text,
    /// Anything else: compared by its text.
    Other,
}

impl Kind {
    /// The comparison kind of a column type, by `pg_type.typname`.
    pub fn of(type_name: &str) -> Kind {
        match type_name {
            "int2" | "int4" | "int8" | "oid" => Kind::Integer,
            "numeric" => Kind::Numeric,
            "float4" | "float8" | "money" => Kind::Decimal,
            "bool" => Kind::Boolean,
            "uuid" => Kind::Uuid,
            "text" | "varchar" | "bpchar" | "name" | "citext" | "char" => Kind::Text,
            other => Temporal::of(other).map(Kind::Temporal).unwrap_or(Kind::Other),
        }
    }
}

/// A text column's collation when it does not order by bytes: comparisons under it are made
/// by PostgreSQL. Built from the catalog (`pg_attribute.attcollation`, `pg_collation`), never
/// from client input.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Collation {
    /// The column's type as SQL names it (`text`, `character varying`), for the casts.
    pub type_sql: String,
    /// The collation as SQL names it, quoted and schema-qualified (`pg_catalog."en-x-icu"`).
    pub collation_sql: String,
    /// `collisdeterministic`: equal only when the bytes are equal. When false, equality is
    /// asked of the database too.
    pub deterministic: bool,
}

/// How a column's text values order: by bytes, or by a collation only PostgreSQL knows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub enum TextOrder {
    /// Byte order: the `C`/`POSIX`/`C.UTF-8` collations, and non-text columns.
    #[default]
    Bytes,
    /// Compared by PostgreSQL under this collation.
    Database(Arc<Collation>),
}

/// A typed operand.
#[derive(Debug, Clone)]
enum Operand {
    Integer(i128),
    Decimal(f64),
    Boolean(bool),
    Numeric(Numeric),
    Temporal((i128, i64)),
    Text(Vec<u8>),
}

/// `IS` keywords.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IsKeyword {
    Null,
    True,
    False,
    Unknown,
}

#[derive(Debug, Clone)]
enum Test {
    Compare(Op, Operand),
    In(Vec<Option<Operand>>),
    Pattern(Regex),
    Is(IsKeyword),
    IsDistinct(Operand),
}

/// A filter validated against its column: ready to evaluate.
#[derive(Debug, Clone)]
pub struct Filter {
    /// Index of the column in the relation.
    pub column: usize,
    kind: Kind,
    test: Test,
    negate: bool,
    /// Set when the test compares under a collation PostgreSQL must evaluate.
    collation: Option<Arc<Collation>>,
}

/// Why a filter does not fit the table (upstream reports these as database exceptions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterCheckError(pub String);

fn type_label(type_name: &str) -> &str {
    match type_name {
        "int2" => "smallint",
        "int4" => "integer",
        "int8" => "bigint",
        "float4" => "real",
        "float8" => "double precision",
        "bool" => "boolean",
        other => other,
    }
}

fn operand(kind: Kind, type_name: &str, text: &str) -> Result<Operand, FilterCheckError> {
    let invalid = || FilterCheckError(BindingException::InvalidInput { type_label: type_label(type_name).to_string(), text: text.to_string() }.text());
    Ok(match kind {
        Kind::Integer => Operand::Integer(text.trim().parse().map_err(|_| invalid())?),
        Kind::Decimal => {
            let value: f64 = text.trim().parse().map_err(|_| invalid())?;
            Operand::Decimal(value)
        }
        Kind::Boolean => Operand::Boolean(parse_bool(text.trim().as_bytes()).ok_or_else(invalid)?),
        Kind::Uuid => {
            let normalized = normalize_uuid(text.trim().as_bytes()).ok_or_else(|| FilterCheckError(BindingException::InvalidInput { type_label: "uuid".into(), text: text.to_string() }.text()))?;
            Operand::Text(normalized)
        }
        Kind::Numeric => Operand::Numeric(Numeric::parse(text).ok_or_else(invalid)?),
        // An operand in a form the ISO parser does not know keeps the text comparison.
        Kind::Temporal(t) => t.key(text).map(Operand::Temporal).unwrap_or_else(|| Operand::Text(text.as_bytes().to_vec())),
        Kind::Text | Kind::Other => Operand::Text(text.as_bytes().to_vec()),
    })
}

fn parse_bool(text: &[u8]) -> Option<bool> {
    let lower = text.to_ascii_lowercase();
    match lower.as_slice() {
        b"t" | b"true" | b"yes" | b"y" | b"on" | b"1" => Some(true),
        b"f" | b"false" | b"no" | b"n" | b"off" | b"0" => Some(false),
        _ => None,
    }
}

fn normalize_uuid(text: &[u8]) -> Option<Vec<u8>> {
    let text = text.strip_prefix(b"{").and_then(|t| t.strip_suffix(b"}")).unwrap_or(text);
    let hex: Vec<u8> = text.iter().filter(|b| **b != b'-').map(u8::to_ascii_lowercase).collect();
    (hex.len() == 32 && hex.iter().all(u8::is_ascii_hexdigit)).then_some(hex)
}

/// Compiles a pattern within [`REGEX_BYTES_MAX`]; a syntax error is reported with `op`'s name.
fn bounded_regex(pattern: &str, op: Op) -> Result<Regex, FilterCheckError> {
    RegexBuilder::new(pattern).size_limit(REGEX_BYTES_MAX).dfa_size_limit(REGEX_BYTES_MAX).build().map_err(|error| match error {
        regex::Error::CompiledTooBig(_) => {
            FilterCheckError(engine::client_error::ChangesLimit::PatternTooComplex { op: op.name(), max: REGEX_BYTES_MAX }.text())
        }
        other => FilterCheckError(BindingException::InvalidRegex { op: op.name(), error: other.to_string() }.text()),
    })
}

/// Translates a LIKE pattern (`%`, `_`, `\` escapes) to an anchored regex.
fn like_regex(pattern: &str, op: Op) -> Result<Regex, FilterCheckError> {
    let case_insensitive = op == Op::Ilike;
    let mut out = String::from(if case_insensitive { "(?is)^" } else { "(?s)^" });
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        match c {
            '%' => out.push_str(".*"),
            '_' => out.push('.'),
            '\\' => {
                if let Some(next) = chars.next() {
                    out.push_str(&regex::escape(&next.to_string()));
                }
            }
            c => out.push_str(&regex::escape(&c.to_string())),
        }
    }
    out.push('$');
    bounded_regex(&out, op)
}

/// Validates `raw` against the column (`index`, `type_name`) and prepares it for evaluation,
/// for a column whose text orders by bytes.
pub fn compile(raw: &RawFilter, index: usize, type_name: &str) -> Result<Filter, FilterCheckError> {
    compile_ordered(raw, index, type_name, &TextOrder::Bytes)
}

/// [`compile`] for a column whose text values order as `order` says: under a collation that is
/// not byte order, the text comparisons that depend on it are left to the database
/// ([`Filter::database_collation`]).
pub fn compile_ordered(raw: &RawFilter, index: usize, type_name: &str, order: &TextOrder) -> Result<Filter, FilterCheckError> {
    let kind = Kind::of(type_name);
    let test = match raw.op {
        Op::Eq | Op::Neq | Op::Lt | Op::Lte | Op::Gt | Op::Gte => Test::Compare(raw.op, operand(kind, type_name, &raw.value)?),
        Op::IsDistinct => Test::IsDistinct(operand(kind, type_name, &raw.value)?),
        Op::In => {
            let items = array_items(&raw.value).map_err(FilterCheckError)?;
            if items.len() > IN_VALUES_MAX {
                return Err(FilterCheckError(BindingException::TooManyInValues { max: IN_VALUES_MAX }.text()));
            }
            let items = items
                .into_iter()
                .map(|item| item.map(|text| operand(kind, type_name, &text)).transpose())
                .collect::<Result<Vec<_>, _>>()?;
            Test::In(items)
        }
        Op::Like | Op::Ilike => {
            if kind != Kind::Text {
                return Err(FilterCheckError(BindingException::OperatorNeedsText { op: raw.op.name(), type_name: type_name.to_string() }.text()));
            }
            Test::Pattern(like_regex(&raw.value, raw.op)?)
        }
        Op::Match | Op::Imatch => {
            if kind != Kind::Text {
                return Err(FilterCheckError(BindingException::OperatorNeedsText { op: raw.op.name(), type_name: type_name.to_string() }.text()));
            }
            let pattern = if raw.op == Op::Imatch { format!("(?i){}", raw.value) } else { raw.value.clone() };
            Test::Pattern(bounded_regex(&pattern, raw.op)?)
        }
        Op::Is => {
            let keyword = match raw.value.to_ascii_lowercase().as_str() {
                "null" => IsKeyword::Null,
                "true" => IsKeyword::True,
                "false" => IsKeyword::False,
                "unknown" => IsKeyword::Unknown,
                _ => return Err(FilterCheckError(BindingException::InvalidIsValue.text())),
            };
            if keyword != IsKeyword::Null && kind != Kind::Boolean {
                return Err(FilterCheckError(BindingException::IsNeedsBoolean { keyword: raw.value.to_ascii_lowercase(), type_name: type_name.to_string() }.text()));
            }
            Test::Is(keyword)
        }
    };
    let collation = match order {
        TextOrder::Database(collation) if kind == Kind::Text => {
            let ordering = matches!(test, Test::Compare(Op::Lt | Op::Lte | Op::Gt | Op::Gte, _));
            let equality = matches!(test, Test::Compare(Op::Eq | Op::Neq, _) | Test::In(_) | Test::IsDistinct(_));
            (ordering || (equality && !collation.deterministic)).then(|| Arc::clone(collation))
        }
        _ => None,
    };
    Ok(Filter { column: index, kind, test, negate: raw.negate, collation })
}

fn compare(kind: Kind, value: &[u8], operand: &Operand) -> Option<Ordering> {
    match (kind, operand) {
        (Kind::Integer, Operand::Integer(b)) => std::str::from_utf8(value).ok()?.trim().parse::<i128>().ok().map(|a| a.cmp(b)),
        (Kind::Decimal, Operand::Decimal(b)) => std::str::from_utf8(value).ok()?.trim().parse::<f64>().ok()?.partial_cmp(b),
        (Kind::Boolean, Operand::Boolean(b)) => parse_bool(value).map(|a| a.cmp(b)),
        (Kind::Uuid, Operand::Text(b)) => normalize_uuid(value).map(|a| a.cmp(b)),
        (Kind::Numeric, Operand::Numeric(b)) => Numeric::parse(std::str::from_utf8(value).ok()?).map(|a| a.cmp(b)),
        (Kind::Temporal(t), Operand::Temporal(b)) => t.key(std::str::from_utf8(value).ok()?).map(|a| a.cmp(b)),
        (_, Operand::Text(b)) => Some(value.cmp(b.as_slice())),
        _ => None,
    }
}

impl Filter {
    /// Evaluates the filter on a row: `value(column)` is `None` when the column is absent from
    /// the change, `Some(None)` for SQL NULL, `Some(Some(text))` otherwise. Text comparisons are
    /// by bytes; a filter that needs the database ([`Filter::database_collation`]) must be
    /// evaluated with [`Filter::matches_with`].
    pub fn matches<'a>(&self, value: impl Fn(usize) -> Option<Option<&'a [u8]>>) -> bool {
        self.matches_with(value, |a, b| Some(a.cmp(b)))
    }

    /// The collation PostgreSQL must compare under for this filter, when it has one.
    pub fn database_collation(&self) -> Option<&Arc<Collation>> {
        self.collation.as_ref()
    }

    /// The (value, operand) pairs whose order [`Filter::matches_with`] will ask for on a row
    /// whose column holds `value` (nothing for NULL, an absent column or a byte-order filter).
    pub fn database_pairs<'s>(&'s self, value: Option<Option<&[u8]>>) -> Vec<&'s [u8]> {
        if self.collation.is_none() || !matches!(value, Some(Some(_))) {
            return Vec::new();
        }
        let text = |o: &'s Operand| match o {
            Operand::Text(bytes) => Some(bytes.as_slice()),
            _ => None,
        };
        match &self.test {
            Test::Compare(_, operand) | Test::IsDistinct(operand) => text(operand).into_iter().collect(),
            Test::In(items) => items.iter().flatten().filter_map(text).collect(),
            Test::Pattern(_) | Test::Is(_) => Vec::new(),
        }
    }

    /// [`Filter::matches`] with `order(value, operand)` giving the order of text pairs under the
    /// filter's collation when it has one (`None`: unknown, the comparison fails).
    pub fn matches_with<'a>(&self, value: impl Fn(usize) -> Option<Option<&'a [u8]>>, order: impl Fn(&[u8], &[u8]) -> Option<Ordering>) -> bool {
        let compare = |text: &[u8], operand: &Operand| match (&self.collation, operand) {
            (Some(_), Operand::Text(b)) => order(text, b),
            _ => compare(self.kind, text, operand),
        };
        let Some(cell) = value(self.column) else { return false };
        match (&self.test, cell) {
            (Test::Is(keyword), cell) => {
                let result = match keyword {
                    IsKeyword::Null | IsKeyword::Unknown => cell.is_none(),
                    IsKeyword::True => cell.and_then(parse_bool) == Some(true),
                    IsKeyword::False => cell.and_then(parse_bool) == Some(false),
                };
                result != self.negate
            }
            (Test::IsDistinct(_), None) => !self.negate,
            (Test::IsDistinct(operand), Some(text)) => {
                let distinct = compare(text, operand) != Some(Ordering::Equal);
                distinct != self.negate
            }
            // NULL fails every other operator, `not.` included.
            (_, None) => false,
            (test, Some(text)) => {
                let result = match test {
                    Test::Compare(op, operand) => match compare(text, operand) {
                        None => false,
                        Some(order) => match op {
                            Op::Eq => order.is_eq(),
                            Op::Neq => order.is_ne(),
                            Op::Lt => order.is_lt(),
                            Op::Lte => order.is_le(),
                            Op::Gt => order.is_gt(),
                            Op::Gte => order.is_ge(),
                            _ => unreachable!("compare ops only"),
                        },
                    },
                    Test::In(items) => items.iter().flatten().any(|item| compare(text, item).is_some_and(|o| o.is_eq())),
                    Test::Pattern(regex) => regex.is_match(text),
                    Test::Is(_) | Test::IsDistinct(_) => unreachable!("handled above"),
                };
                result != self.negate
            }
        }
    }
}

/// Renders filters as upstream prints them in `system` messages: an Elixir list of
/// `{column, op, value, negate}` tuples.
pub fn render(filters: &[RawFilter]) -> String {
    let items: Vec<String> = filters
        .iter()
        .map(|f| {
            let value = if f.op == Op::In { format!("{{{}}}", f.value) } else { f.value.clone() };
            format!("{{{:?}, {:?}, {:?}, {}}}", f.column, f.op.name(), value, f.negate)
        })
        .collect();
    format!("[{}]", items.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn err(filter: &str) -> String {
        parse(filter).unwrap_err().0
    }

    #[test]
    fn bounds_give_errors_not_panics() {
        let long = format!("t=eq.{}", "x".repeat(FILTER_BYTES_MAX));
        assert_eq!(err(&long), format!("Error parsing `filter` params: the filter is {} bytes long; at most {FILTER_BYTES_MAX} bytes are allowed", long.len()));
        let at_limit = format!("t=like.{}", "_".repeat(FILTER_BYTES_MAX - 7));
        assert_eq!(at_limit.len(), FILTER_BYTES_MAX);
        let raw = &parse(&at_limit).unwrap()[0];
        for (op, name) in [(Op::Like, "like"), (Op::Ilike, "ilike")] {
            let raw = RawFilter { op, ..raw.clone() };
            let error = compile(&raw, 0, "text").unwrap_err().0;
            assert_eq!(error, format!("the pattern of the {name} filter is too complex (its compiled form exceeds {REGEX_BYTES_MAX} bytes); use a shorter pattern"));
        }
        let nested = &parse("t=match.(a{100}){100}").unwrap()[0];
        assert!(compile(nested, 0, "text").unwrap_err().0.starts_with("the pattern of the match filter is too complex"));
        // An ordinary pattern is far below the limit.
        assert!(eval("t=like.%needle%haystack_", "text", Some("a needle in a haystackX")));
    }

    #[test]
    fn parse_errors_are_upstream_texts() {
        assert_eq!(err("subject=foo.hey"), r#"Error parsing `filter` params: ["foo", "hey"]"#);
        assert_eq!(err("undefined"), r#"Error parsing `filter` params: ["undefined"]"#);
        assert_eq!(err("id=eq5"), r#"Error parsing `filter` params: ["eq5"]"#);
        assert_eq!(err("id=in.1,2"), "Error parsing `filter` params: `in` filter value must be wrapped by parentheses");
        assert_eq!(err("id=eq.1,"), "Error parsing `filter` params: filter must not contain empty segments (check for extra commas)");
    }

    #[test]
    fn parses_segments_quotes_and_lists() {
        let filters = parse(r#"status=in.("a,b",c), name=eq."x,y", owner=not.is.null, url=eq.a.b=c"#).unwrap();
        assert_eq!(filters.len(), 4);
        assert_eq!(filters[0], RawFilter { column: "status".into(), op: Op::In, value: r#""a,b",c"#.into(), negate: false });
        assert_eq!(filters[1].value, "x,y");
        assert!(filters[2].negate && filters[2].op == Op::Is);
        assert_eq!(filters[3].value, "a.b=c");
        assert!(parse("  ").unwrap().is_empty());
        assert_eq!(render(&filters[..1]), r#"[{"status", "in", "{\"a,b\",c}", false}]"#);
    }

    fn eval(filter: &str, type_name: &str, value: Option<&str>) -> bool {
        let raw = &parse(filter).unwrap()[0];
        let compiled = compile(raw, 0, type_name).unwrap();
        compiled.matches(|_| Some(value.map(str::as_bytes)))
    }

    #[test]
    fn typed_evaluation() {
        assert!(eval("id=eq.5", "int4", Some("5")));
        assert!(!eval("id=eq.5", "int4", Some("50")));
        assert!(eval("n=gt.9", "int8", Some("10")), "numeric, not lexical");
        assert!(eval("n=lte.2.5", "numeric", Some("2.50")));
        // Issue 11: by value, not by text.
        assert!(eval("n=gt.9.99", "numeric", Some("10.0")), "numeric by value");
        assert!(eval("n=lt.123456789012345678901234567890.2", "numeric", Some("123456789012345678901234567890.1")), "numeric beyond f64");
        assert!(eval("t=gt.2026-01-01T00:00:00Z", "timestamptz", Some("2026-01-01 01:00:00+00")));
        assert!(!eval("t=gt.2026-01-01 00:00:00+02", "timestamptz", Some("2025-12-31 21:59:59+00")), "instants, offsets applied");
        assert!(eval("d=lt.2026-02-01", "date", Some("2026-01-31")));
        assert!(eval("d=gt.0001-01-01", "date", Some("2026-01-31")) && eval("d=lt.0001-01-01", "date", Some("0005-01-01 BC")), "BC dates");
        assert!(!eval("i=gt.1 day", "interval", Some("23:00:00")) && eval("i=lt.2 days", "interval", Some("1 day 23:00:00")));
        assert!(eval("i=eq.1 mon", "interval", Some("30 days")), "a month is 30 days in interval order");
        assert!(eval("t=lt.10:00", "time", Some("09:59:59.999999")));
        assert!(eval("id=in.(1,2,3)", "int4", Some("2")));
        assert!(!eval("id=not.in.(1,2,3)", "int4", Some("2")));
        assert!(eval("s=in.(\"a,b\",c)", "text", Some("a,b")));
        assert!(eval("done=eq.true", "bool", Some("t")));
        assert!(eval("u=eq.9F1C0000-0000-0000-0000-000000000001", "uuid", Some("9f1c0000-0000-0000-0000-000000000001")));
        assert!(eval("t=like.%foo%", "text", Some("a foo b")));
        assert!(eval("t=ilike.FOO%", "text", Some("foobar")));
        assert!(eval("t=match.^A", "text", Some("Abc")));
        assert!(eval("t=imatch.^a", "varchar", Some("Abc")));
        assert!(eval("d=is.null", "timestamptz", None));
        assert!(eval("d=not.is.null", "timestamptz", Some("2024-01-01")));
        assert!(eval("b=is.true", "bool", Some("t")));
        assert!(eval("o=isdistinct.42", "int4", None), "NULL is distinct from 42");
        assert!(!eval("o=not.isdistinct.42", "int4", None));
        assert!(!eval("o=eq.42", "int4", None), "NULL fails eq");
        assert!(!eval("o=not.eq.42", "int4", None), "and not.eq");
        assert!(eval("s=neq.draft", "text", Some("open")));
        // Absent column: fails.
        let compiled = compile(&parse("id=eq.1").unwrap()[0], 0, "int4").unwrap();
        assert!(!compiled.matches(|_| None));
    }

    #[test]
    fn check_errors() {
        let check = |filter: &str, type_name: &str| compile(&parse(filter).unwrap()[0], 0, type_name).unwrap_err().0;
        assert_eq!(check("id=eq.abc", "int4"), r#"invalid input syntax for type integer: "abc""#);
        assert_eq!(check("id=is.maybe", "int4"), "invalid value for is filter: must be null, true, false, or unknown");
        assert_eq!(check("id=is.true", "int4"), "is true filter requires a boolean column, got int4");
        assert_eq!(check("id=like.1%", "int4"), "operator like requires a text-compatible column type, got int4");
        assert!(check("t=match.(", "text").starts_with("invalid regular expression for match filter: "));
        let list = format!("id=in.({})", (0..101).map(|i| i.to_string()).collect::<Vec<_>>().join(","));
        assert_eq!(check(&list, "int4"), "too many values for `in` filter. Maximum 100");
        let huge = format!("id=in.({})", (0..10_000).map(|i| i.to_string()).collect::<Vec<_>>().join(","));
        assert_eq!(check(&huge, "int4"), "too many values for `in` filter. Maximum 100");
    }

    /// Found by the panic review of issue 16: a four-byte zone holding a multi-byte character
    /// (`+a€`) was sliced at byte 2, inside the character, which panicked the changes core (and
    /// with it the process) at a client's join. An exponent of `i64::MIN` overflowed `abs()`.
    #[test]
    fn hostile_operands_compile_without_panics() {
        let check = |filter: &str, type_name: &str| compile(&parse(filter).unwrap()[0], 0, type_name).unwrap_err().0;
        for type_name in ["timestamptz", "timestamp", "timetz", "time"] {
            for filter in ["t=lt.2024-01-01T10:00+a€", "t=lt.10:00+a€", "t=lt.10:00-€a", "t=in.(10:00+a€,10:00)", "t=gt.2024-01-01 10:00:00+ü1"] {
                // A temporal operand that does not read as one is compared as text (as for
                // `now` or `infinity` spelled otherwise), so these compile.
                let compiled = compile(&parse(filter).unwrap()[0], 0, type_name);
                assert!(compiled.is_ok(), "{filter} as {type_name}: {compiled:?}");
            }
        }
        assert!(eval("t=lt.10:00+0130", "timetz", Some("10:00:00+02")), "the four-digit zone still reads");
        for filter in ["n=lt.0.01e-9223372036854775808", "n=lt.1e9223372036854775807", "n=lt.1e-1000000"] {
            assert_eq!(check(filter, "numeric"), format!("invalid input syntax for type numeric: \"{}\"", &filter[5..]));
        }
    }

    proptest! {
        #[test]
        fn arbitrary_filters_never_panic(filter in "\\PC{0,60}", value in proptest::option::of("\\PC{0,20}")) {
            if let Ok(filters) = parse(&filter) {
                for raw in &filters {
                    for type_name in ["int4", "numeric", "bool", "uuid", "text", "jsonb"] {
                        if let Ok(compiled) = compile(raw, 0, type_name) {
                            let _ = compiled.matches(|_| Some(value.as_deref().map(str::as_bytes)));
                        }
                    }
                }
            }
        }

        #[test]
        fn hostile_values_stay_values(payload in "[';\"\\\\()a-z0-9 ]{0,40}") {
            // Quotes, semicolons and parentheses are data: eq matches exactly that text.
            let filter = format!("t=eq.{}", payload.replace(',', ""));
            if let Ok(filters) = parse(&filter) {
                if filters.len() == 1 {
                    let compiled = compile(&filters[0], 0, "text").unwrap();
                    let expected = filters[0].value.clone();
                    prop_assert!(compiled.matches(|_| Some(Some(expected.as_bytes()))));
                }
            }
        }
    }

    /// Differential test of typed comparisons (issue 11 item 4): random numeric, date,
    /// timestamp, timestamptz, time, timetz and interval values, rendered by PostgreSQL as the replication
    /// connection sees them (DateStyle ISO, TimeZone UTC), compared by the filter and by
    /// PostgreSQL's own `<`/`=`. Seeded (`POWA_FILTER_DIFF_SEED`; printed on failure).
    #[test]
    fn typed_order_differential_against_postgres() {
        let seed: u64 = std::env::var("POWA_FILTER_DIFF_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
        });
        let mut state = seed;
        let mut next = move |n: u64| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) % n
        };
        let (cluster, _guard) = crate::cluster::Cluster::throwaway().expect("PostgreSQL 15");
        let mut sql = String::from("set timezone = 'UTC'; set datestyle = 'ISO, MDY'; ");
        let mut values: Vec<(&str, String)> = Vec::new();
        for _ in 0..60 {
            let sign = if next(3) == 0 { "-" } else { "" };
            let numeric = match next(12) {
                0 => "'NaN'".to_string(),
                1 => format!("'{sign}Infinity'"),
                _ => format!("'{sign}{}.{}e{}'", next(100_000), next(1_000), next(7) as i64 - 3),
            };
            let date = format!("{:04}-{:02}-{:02}{}", 1 + next(3000), 1 + next(12), 1 + next(28), if next(10) == 0 { " BC" } else { "" });
            let clock = format!("{:02}:{:02}:{:02}.{:06}", next(24), next(60), next(60), next(1_000_000));
            let zone = format!("{}{:02}:{:02}", if next(2) == 0 { "+" } else { "-" }, next(14), next(2) * 30);
            values.push(("numeric", numeric));
            values.push(("date", format!("'{date}'")));
            values.push(("timestamp", format!("'{date} {clock}'")));
            values.push(("timestamptz", if next(15) == 0 { "'infinity'".into() } else { format!("'{date} {clock}{zone}'") }));
            values.push(("time", format!("'{clock}'")));
            values.push(("timetz", format!("'{clock}{zone}'")));
            let sign = |n: u64| if n == 0 { "-" } else { "" };
            values.push(("interval", format!("'{}{} years {}{} mons {}{} days {}{:02}:{:02}:{:02}.{:03}'", sign(next(4)), next(3), sign(next(4)), next(14), sign(next(4)), next(40), sign(next(3)), next(30), next(60), next(60), next(1000))));
        }
        sql.push_str("create table v (n int, ty text, v text); insert into v values ");
        sql.push_str(&values.iter().enumerate().map(|(i, (ty, v))| format!("({i}, '{ty}', {v}::{ty}::text)")).collect::<Vec<_>>().join(", "));
        sql.push_str("; select a.ty, a.v, b.v, case when a.v = b.v then 0 else 0 end, \
            case a.ty when 'numeric' then (a.v::numeric < b.v::numeric)::int - (a.v::numeric > b.v::numeric)::int \
                      when 'date' then (a.v::date < b.v::date)::int - (a.v::date > b.v::date)::int \
                      when 'timestamp' then (a.v::timestamp < b.v::timestamp)::int - (a.v::timestamp > b.v::timestamp)::int \
                      when 'timestamptz' then (a.v::timestamptz < b.v::timestamptz)::int - (a.v::timestamptz > b.v::timestamptz)::int \
                      when 'time' then (a.v::time < b.v::time)::int - (a.v::time > b.v::time)::int \
                      when 'interval' then (a.v::interval < b.v::interval)::int - (a.v::interval > b.v::interval)::int \
                      else (a.v::timetz < b.v::timetz)::int - (a.v::timetz > b.v::timetz)::int end \
            from v a join v b on a.ty = b.ty;");
        let output = cluster.psql(&sql).unwrap();
        let mut cases = 0;
        for line in output.lines() {
            let fields: Vec<&str> = line.split('|').collect();
            if fields.len() != 5 {
                continue;
            }
            let (ty, a, b, pg) = (fields[0], fields[1], fields[2], fields[4].trim());
            let Ok(pg) = pg.parse::<i32>() else { continue };
            // PostgreSQL: 1 = a < b, -1 = a > b, 0 = equal.
            let wanted = match pg {
                1 => std::cmp::Ordering::Less,
                -1 => std::cmp::Ordering::Greater,
                _ => std::cmp::Ordering::Equal,
            };
            for (op, holds) in [("lt", wanted.is_lt()), ("lte", wanted.is_le()), ("gt", wanted.is_gt()), ("gte", wanted.is_ge()), ("eq", wanted.is_eq())] {
                let raw = RawFilter { column: "c".into(), op: Op::parse(op).unwrap(), value: b.to_string(), negate: false };
                let compiled = compile(&raw, 0, ty).unwrap_or_else(|e| panic!("seed {seed}: {ty} {b}: {e:?}"));
                assert_eq!(compiled.matches(|_| Some(Some(a.as_bytes()))), holds, "seed {seed}: {ty}: {a} {op} {b}");
                cases += 1;
            }
        }
        assert!(cases > 10_000, "seed {seed}: only {cases} comparisons ({output:.200})");
    }
}
