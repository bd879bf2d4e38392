//! Column values in text format → JSON, rendered the way PostgreSQL's `to_jsonb` renders the
//! typed value (PROTOCOL.md §5.5), with no catalog access and no allocation in the common case.
//!
//! The text comes from pgoutput ([`crate::pgoutput::Cell::Text`]), produced by each type's
//! output function under the replication connection's settings: `DateStyle=ISO, MDY`,
//! `TimeZone=UTC`, `bytea_output=hex`, `extra_float_digits=3`, `IntervalStyle=postgres`.
//! From that text:
//!
//! | type | JSON |
//! |---|---|
//! | `int2` `int4` `int8` `float4` `float8` `numeric` | the number as written; `NaN`, `Infinity`, `-Infinity` as strings |
//! | `bool` | `true` / `false` |
//! | `json` `jsonb` | the text itself (it is JSON) |
//! | `timestamptz` | `"2026-08-21T10:15:30.123456+00:00"`: `T` for the space, `+HH` widened to `+HH:MM` |
//! | `timestamp` | `"2026-08-21T10:15:30.123456"` |
//! | `bytea` | the hex digits without `\x` (PROTOCOL.md; `to_jsonb` would keep the `\x`) |
//! | arrays of built-in types | JSON arrays, elements rendered by the element type, `NULL` → `null` |
//! | anything else (`text`, `uuid`, `date`, `time`, `oid`, enums, domains, …) | a JSON string of the text |
//!
//! Deliberate differences from `to_jsonb`, all invisible to a JSON reader: `float4`/`float8`
//! keep their shortest text form (`1e-07`), where `to_jsonb` spells the same number in full
//! (`0.0000001`); `json` is passed through as written where `to_jsonb` would normalise it to
//! `jsonb` (whitespace, duplicate keys). `oid` is a string, as in `to_jsonb`.
//!
//! Whatever the bytes, the output is valid JSON: text that does not fit its type's grammar (a
//! "number" that is not a JSON number, "json" that does not parse, a malformed array) is written
//! as a JSON string instead, and invalid UTF-8 is replaced by U+FFFD.

use crate::stream::PG_EPOCH_OFFSET_SECS;
use smallvec::SmallVec;
use std::borrow::Cow;

#[cfg(test)]
mod tests;

/// Oids of the built-in types this module renders specially.
pub mod oid {
    /// `bool`
    pub const BOOL: u32 = 16;
    /// `bytea`
    pub const BYTEA: u32 = 17;
    /// `int8`
    pub const INT8: u32 = 20;
    /// `int2`
    pub const INT2: u32 = 21;
    /// `int4`
    pub const INT4: u32 = 23;
    /// `text`
    pub const TEXT: u32 = 25;
    /// `oid`
    pub const OID: u32 = 26;
    /// `json`
    pub const JSON: u32 = 114;
    /// `box`, the one built-in type whose arrays use `;` between elements
    pub const BOX: u32 = 603;
    /// `float4`
    pub const FLOAT4: u32 = 700;
    /// `float8`
    pub const FLOAT8: u32 = 701;
    /// `varchar`
    pub const VARCHAR: u32 = 1043;
    /// `date`
    pub const DATE: u32 = 1082;
    /// `timestamp`
    pub const TIMESTAMP: u32 = 1114;
    /// `timestamptz`
    pub const TIMESTAMPTZ: u32 = 1184;
    /// `numeric`
    pub const NUMERIC: u32 = 1700;
    /// `uuid`
    pub const UUID: u32 = 2950;
    /// `jsonb`
    pub const JSONB: u32 = 3802;
}

/// `(oid, pg_type.typname, element oid for array types else 0)` for every built-in base, range
/// and multirange type and their arrays (PostgreSQL 15's `pg_type`, oid < 10000, sorted by oid;
/// `tests/fixtures/pg_type.tsv` is the catalog dump a test checks this against). pgoutput sends
/// a Type message only for types outside this range, so this is the whole naming job for
/// built-ins.
#[rustfmt::skip]
static BUILTIN_TYPES: [(u32, &str, u32); 163] = [
    (16, "bool", 0), (17, "bytea", 0), (18, "char", 0), (19, "name", 0), (20, "int8", 0), (21, "int2", 0), (22,
    "int2vector", 0), (23, "int4", 0), (24, "regproc", 0), (25, "text", 0), (26, "oid", 0), (27, "tid", 0), (28,
    "xid", 0), (29, "cid", 0), (30, "oidvector", 0), (114, "json", 0), (142, "xml", 0), (143, "_xml", 142), (194,
    "pg_node_tree", 0), (199, "_json", 114), (210, "_pg_type", 71), (270, "_pg_attribute", 75), (271, "_xid8",
    5069), (272, "_pg_proc", 81), (273, "_pg_class", 83), (600, "point", 0), (601, "lseg", 0), (602, "path", 0),
    (603, "box", 0), (604, "polygon", 0), (628, "line", 0), (629, "_line", 628), (650, "cidr", 0), (651, "_cidr",
    650), (700, "float4", 0), (701, "float8", 0), (718, "circle", 0), (719, "_circle", 718), (774, "macaddr8",
    0), (775, "_macaddr8", 774), (790, "money", 0), (791, "_money", 790), (829, "macaddr", 0), (869, "inet", 0),
    (1000, "_bool", 16), (1001, "_bytea", 17), (1002, "_char", 18), (1003, "_name", 19), (1005, "_int2", 21),
    (1006, "_int2vector", 22), (1007, "_int4", 23), (1008, "_regproc", 24), (1009, "_text", 25), (1010, "_tid",
    27), (1011, "_xid", 28), (1012, "_cid", 29), (1013, "_oidvector", 30), (1014, "_bpchar", 1042), (1015,
    "_varchar", 1043), (1016, "_int8", 20), (1017, "_point", 600), (1018, "_lseg", 601), (1019, "_path", 602),
    (1020, "_box", 603), (1021, "_float4", 700), (1022, "_float8", 701), (1027, "_polygon", 604), (1028, "_oid",
    26), (1033, "aclitem", 0), (1034, "_aclitem", 1033), (1040, "_macaddr", 829), (1041, "_inet", 869), (1042,
    "bpchar", 0), (1043, "varchar", 0), (1082, "date", 0), (1083, "time", 0), (1114, "timestamp", 0), (1115,
    "_timestamp", 1114), (1182, "_date", 1082), (1183, "_time", 1083), (1184, "timestamptz", 0), (1185,
    "_timestamptz", 1184), (1186, "interval", 0), (1187, "_interval", 1186), (1231, "_numeric", 1700), (1263,
    "_cstring", 2275), (1266, "timetz", 0), (1270, "_timetz", 1266), (1560, "bit", 0), (1561, "_bit", 1560),
    (1562, "varbit", 0), (1563, "_varbit", 1562), (1700, "numeric", 0), (1790, "refcursor", 0), (2201,
    "_refcursor", 1790), (2202, "regprocedure", 0), (2203, "regoper", 0), (2204, "regoperator", 0), (2205,
    "regclass", 0), (2206, "regtype", 0), (2207, "_regprocedure", 2202), (2208, "_regoper", 2203), (2209,
    "_regoperator", 2204), (2210, "_regclass", 2205), (2211, "_regtype", 2206), (2949, "_txid_snapshot", 2970),
    (2950, "uuid", 0), (2951, "_uuid", 2950), (2970, "txid_snapshot", 0), (3220, "pg_lsn", 0), (3221, "_pg_lsn",
    3220), (3361, "pg_ndistinct", 0), (3402, "pg_dependencies", 0), (3614, "tsvector", 0), (3615, "tsquery", 0),
    (3642, "gtsvector", 0), (3643, "_tsvector", 3614), (3644, "_gtsvector", 3642), (3645, "_tsquery", 3615),
    (3734, "regconfig", 0), (3735, "_regconfig", 3734), (3769, "regdictionary", 0), (3770, "_regdictionary",
    3769), (3802, "jsonb", 0), (3807, "_jsonb", 3802), (3904, "int4range", 0), (3905, "_int4range", 3904), (3906,
    "numrange", 0), (3907, "_numrange", 3906), (3908, "tsrange", 0), (3909, "_tsrange", 3908), (3910,
    "tstzrange", 0), (3911, "_tstzrange", 3910), (3912, "daterange", 0), (3913, "_daterange", 3912), (3926,
    "int8range", 0), (3927, "_int8range", 3926), (4072, "jsonpath", 0), (4073, "_jsonpath", 4072), (4089,
    "regnamespace", 0), (4090, "_regnamespace", 4089), (4096, "regrole", 0), (4097, "_regrole", 4096), (4191,
    "regcollation", 0), (4192, "_regcollation", 4191), (4451, "int4multirange", 0), (4532, "nummultirange", 0),
    (4533, "tsmultirange", 0), (4534, "tstzmultirange", 0), (4535, "datemultirange", 0), (4536, "int8multirange",
    0), (4600, "pg_brin_bloom_summary", 0), (4601, "pg_brin_minmax_multi_summary", 0), (5017, "pg_mcv_list", 0),
    (5038, "pg_snapshot", 0), (5039, "_pg_snapshot", 5038), (5069, "xid8", 0), (6150, "_int4multirange", 4451),
    (6151, "_nummultirange", 4532), (6152, "_tsmultirange", 4533), (6153, "_tstzmultirange", 4534), (6155,
    "_datemultirange", 4535), (6157, "_int8multirange", 4536),];

/// `pg_type.typname` of a built-in type (oid below 10000), e.g. `int4`, `_text` for `text[]`.
/// `None` for other oids: user-defined types are named by pgoutput's Type messages.
pub fn builtin_type_name(oid: u32) -> Option<&'static str> {
    builtin(oid).map(|&(_, name, _)| name)
}

/// The element type of a built-in array type (`_int4` → `int4`), `None` for anything else.
pub fn array_element_oid(array_oid: u32) -> Option<u32> {
    builtin(array_oid).and_then(|&(_, _, element)| (element != 0).then_some(element))
}

fn builtin(oid: u32) -> Option<&'static (u32, &'static str, u32)> {
    BUILTIN_TYPES.binary_search_by_key(&oid, |&(oid, _, _)| oid).ok().map(|index| &BUILTIN_TYPES[index])
}

/// How a type's text becomes JSON.
enum Rendering {
    Number,
    Bool,
    Json,
    Timestamp,
    TimestampTz,
    Bytea,
    Array(u32),
    String,
}

fn rendering(type_oid: u32) -> Rendering {
    match type_oid {
        oid::INT2 | oid::INT4 | oid::INT8 | oid::FLOAT4 | oid::FLOAT8 | oid::NUMERIC => Rendering::Number,
        oid::BOOL => Rendering::Bool,
        oid::JSON | oid::JSONB => Rendering::Json,
        oid::TIMESTAMP => Rendering::Timestamp,
        oid::TIMESTAMPTZ => Rendering::TimestampTz,
        oid::BYTEA => Rendering::Bytea,
        oid::TEXT | oid::VARCHAR | oid::UUID | oid::DATE => Rendering::String,
        other => array_element_oid(other).map_or(Rendering::String, Rendering::Array),
    }
}

/// Appends the JSON for one non-null value of type `type_oid`, given in text format.
pub fn write_json_value(type_oid: u32, text: &[u8], out: &mut Vec<u8>) {
    match rendering(type_oid) {
        Rendering::Number if is_json_number(text) => out.extend_from_slice(text),
        Rendering::Bool if text == b"t" => out.extend_from_slice(b"true"),
        Rendering::Bool if text == b"f" => out.extend_from_slice(b"false"),
        Rendering::Json if is_json(text) => out.extend_from_slice(text),
        Rendering::Timestamp => write_timestamp(text, false, out),
        Rendering::TimestampTz => write_timestamp(text, true, out),
        Rendering::Bytea => write_json_string(text.strip_prefix(b"\\x").unwrap_or(text), out),
        Rendering::Array(element_oid) => write_json_array(element_oid, text, out),
        Rendering::Number | Rendering::Bool | Rendering::Json | Rendering::String => write_json_string(text, out),
    }
}

/// Appends the JSON array for an array value in text format (`{1,2,NULL}`, `{{1,2},{3,4}}`,
/// `[0:1]={"a b",c}`) whose elements have type `element_oid`. [`write_json_value`] calls this
/// for built-in array types; call it directly for arrays of user-defined types (a Type
/// message whose name starts with `_`), whose elements then become strings.
/// Text that is not a well-formed array is written as a JSON string.
pub fn write_json_array(element_oid: u32, text: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    if write_array_elements(element_oid, text, out).is_none() {
        out.truncate(start);
        write_json_string(text, out);
    }
}

/// Where the array parser is: just after `{`, just after a delimiter, or just after an element.
#[derive(PartialEq)]
enum ArrayState {
    Opened,
    Delimited,
    Element,
}

/// The array grammar as `array_out` writes it: optional bounds (`[0:2][1:2]=`), then braces;
/// elements are unquoted (never empty, no whitespace, quotes, braces or backslashes; `NULL`
/// means null) or double-quoted with backslash escapes. `None` if the text does not follow it.
fn write_array_elements(element_oid: u32, text: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let delimiter = if element_oid == oid::BOX { b';' } else { b',' };
    let mut position = array_body_start(text)?;
    if text.get(position) != Some(&b'{') {
        return None;
    }
    out.push(b'[');
    position += 1;
    let mut depth = 1usize;
    let mut state = ArrayState::Opened;
    while depth > 0 {
        let byte = *text.get(position)?;
        match state {
            ArrayState::Element if byte == delimiter => {
                out.push(b',');
                position += 1;
                state = ArrayState::Delimited;
            }
            ArrayState::Element | ArrayState::Opened if byte == b'}' => {
                out.push(b']');
                position += 1;
                depth -= 1;
                state = ArrayState::Element;
            }
            ArrayState::Element => return None,
            _ if byte == b'{' => {
                out.push(b'[');
                position += 1;
                depth += 1;
                state = ArrayState::Opened;
            }
            _ if byte == b'"' => {
                let (element, next) = quoted_element(text, position + 1)?;
                write_json_value(element_oid, &element, out);
                position = next;
                state = ArrayState::Element;
            }
            _ => {
                let length = text[position..].iter().position(|&byte| byte == delimiter || byte == b'}')?;
                let element = &text[position..position + length];
                if element.is_empty() || element.iter().any(|byte| b"\"{\\ \t\n\r".contains(byte)) {
                    return None;
                }
                match element {
                    b"NULL" => out.extend_from_slice(b"null"),
                    _ => write_json_value(element_oid, element, out),
                }
                position += length;
                state = ArrayState::Element;
            }
        }
    }
    (position == text.len()).then_some(())
}

/// Skips a dimension decoration (`[0:2][1:2]=`), which `array_out` writes when a lower bound
/// is not 1; `to_jsonb` drops the bounds, and so do we.
fn array_body_start(text: &[u8]) -> Option<usize> {
    if text.first() != Some(&b'[') {
        return Some(0);
    }
    let equals = text.iter().position(|&byte| byte == b'=')?;
    let bounds_ok = text[..equals].iter().all(|&byte| byte.is_ascii_digit() || b"[]:-".contains(&byte));
    bounds_ok.then_some(equals + 1)
}

/// Unescapes a double-quoted element starting just after its opening quote. Returns the
/// element and the position after the closing quote. Borrows unless there was an escape.
fn quoted_element(text: &[u8], start: usize) -> Option<(Cow<'_, [u8]>, usize)> {
    let mut position = start;
    let mut unescaped: Option<Vec<u8>> = None;
    loop {
        match *text.get(position)? {
            b'"' => {
                let element = match unescaped {
                    Some(bytes) => Cow::Owned(bytes),
                    None => Cow::Borrowed(&text[start..position]),
                };
                return Some((element, position + 1));
            }
            b'\\' => {
                let escaped = *text.get(position + 1)?;
                unescaped.get_or_insert_with(|| text[start..position].to_vec()).push(escaped);
                position += 2;
            }
            byte => {
                if let Some(bytes) = unescaped.as_mut() {
                    bytes.push(byte);
                }
                position += 1;
            }
        }
    }
}

/// `2026-08-21 10:15:30.123456+00` → `"2026-08-21T10:15:30.123456+00:00"`, and the same
/// without the zone for `timestamp`; a ` BC` suffix is kept, as `to_jsonb` keeps it. Anything
/// else (`infinity`, `-infinity`, unexpected text) is written as it is, as a string.
fn write_timestamp(text: &[u8], with_zone: bool, out: &mut Vec<u8>) {
    let Some(parts) = timestamp_parts(text, with_zone) else {
        return write_json_string(text, out);
    };
    // Every part is made of ASCII digits and `-:.+ BC`: nothing to escape.
    out.push(b'"');
    out.extend_from_slice(parts.date);
    out.push(b'T');
    out.extend_from_slice(parts.time);
    out.extend_from_slice(parts.zone);
    if parts.zone_needs_minutes {
        out.extend_from_slice(b":00");
    }
    out.extend_from_slice(parts.era);
    out.push(b'"');
}

struct TimestampParts<'a> {
    date: &'a [u8],
    time: &'a [u8],
    zone: &'a [u8],
    zone_needs_minutes: bool,
    era: &'a [u8],
}

fn timestamp_parts(text: &[u8], with_zone: bool) -> Option<TimestampParts<'_>> {
    let space = text.iter().position(|&byte| byte == b' ')?;
    let (date, rest) = (&text[..space], &text[space + 1..]);
    let date_ok = date.first()?.is_ascii_digit() && date.iter().all(|&byte| byte.is_ascii_digit() || byte == b'-');
    let time_length = rest.iter().take_while(|&&byte| byte.is_ascii_digit() || byte == b':' || byte == b'.').count();
    let (time, rest) = rest.split_at(time_length);
    if !date_ok || !time.first()?.is_ascii_digit() {
        return None;
    }
    let mut zone_length = 0;
    if with_zone {
        // ±HH, then :MM and :SS only when not zero (ISO style); to_jsonb always has :MM.
        if !matches!(rest.first(), Some(b'+' | b'-')) {
            return None;
        }
        zone_length = 1 + rest[1..].iter().take_while(|&&byte| byte.is_ascii_digit() || byte == b':').count();
        if zone_length < 3 || !rest[1..3].iter().all(u8::is_ascii_digit) {
            return None;
        }
    }
    let (zone, era) = rest.split_at(zone_length);
    if !era.is_empty() && era != b" BC" {
        return None;
    }
    Some(TimestampParts { date, time, zone, zone_needs_minutes: zone_length == 3, era })
}

/// Appends `text` as a JSON string, escaped as `to_jsonb` escapes: `\"`, `\\`, `\b`, `\f`,
/// `\n`, `\r`, `\t`, other control characters as `\u00XX`, everything else (including
/// non-ASCII) as it is. Invalid UTF-8 sequences become U+FFFD.
pub fn write_json_string(text: &[u8], out: &mut Vec<u8>) {
    match std::str::from_utf8(text) {
        Ok(_) => write_escaped(text, out),
        Err(_) => write_escaped(String::from_utf8_lossy(text).as_bytes(), out),
    }
}

fn write_escaped(text: &[u8], out: &mut Vec<u8>) {
    out.reserve(text.len() + 2);
    out.push(b'"');
    let mut copied = 0;
    for (index, &byte) in text.iter().enumerate() {
        let escape: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&text[copied..index]);
        if escape.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[usize::from(byte >> 4)], HEX[usize::from(byte & 15)]]);
        } else {
            out.extend_from_slice(escape);
        }
        copied = index + 1;
    }
    out.extend_from_slice(&text[copied..]);
    out.push(b'"');
}

/// Whether `text` is exactly one JSON number: `-? (0 | [1-9][0-9]*) (\.[0-9]+)? ([eE][+-]?[0-9]+)?`.
fn is_json_number(text: &[u8]) -> bool {
    json_number_length(text) == Some(text.len())
}

/// The length of the JSON number at the start of `text`, if one starts there.
fn json_number_length(text: &[u8]) -> Option<usize> {
    let digits =
        |from: usize| text.get(from..).map_or(0, |rest| rest.iter().take_while(|byte| byte.is_ascii_digit()).count());
    let mut position = usize::from(text.first() == Some(&b'-'));
    match text.get(position)? {
        b'0' => position += 1,
        b'1'..=b'9' => position += digits(position),
        _ => return None,
    }
    if text.get(position) == Some(&b'.') {
        match digits(position + 1) {
            0 => return None,
            count => position += 1 + count,
        }
    }
    if matches!(text.get(position), Some(b'e' | b'E')) {
        position += 1;
        if matches!(text.get(position), Some(b'+' | b'-')) {
            position += 1;
        }
        match digits(position) {
            0 => return None,
            count => position += count,
        }
    }
    Some(position)
}

/// Whether `text` is one JSON value (RFC 8259), surrounded by optional whitespace. Iterative,
/// so nesting depth is bounded by the input only; allocates only past 32 levels of nesting.
fn is_json(text: &[u8]) -> bool {
    if std::str::from_utf8(text).is_err() {
        return false;
    }
    let mut scanner = JsonScanner { text, position: 0 };
    // The containers open around the current position: `[` or `{`.
    let mut open: SmallVec<[u8; 32]> = SmallVec::new();
    loop {
        // A value starts here.
        scanner.skip_whitespace();
        let complete = match scanner.next() {
            Some(b'{') if scanner.eat(b'}') => true,
            Some(b'[') if scanner.eat(b']') => true,
            Some(b'{') if scanner.key() => {
                open.push(b'{');
                false
            }
            Some(b'[') => {
                open.push(b'[');
                false
            }
            Some(b'"') if scanner.string() => true,
            Some(b't') if scanner.literal(b"rue") => true,
            Some(b'f') if scanner.literal(b"alse") => true,
            Some(b'n') if scanner.literal(b"ull") => true,
            Some(b'-' | b'0'..=b'9') if scanner.number() => true,
            _ => return false,
        };
        if complete {
            // The value is done: close the containers it ends, then expect the next value.
            loop {
                scanner.skip_whitespace();
                let Some(&container) = open.last() else {
                    return scanner.position == text.len();
                };
                match (container, scanner.next()) {
                    (b'[', Some(b',')) => break,
                    (b'{', Some(b',')) if scanner.key() => break,
                    (b'[', Some(b']')) | (b'{', Some(b'}')) => {
                        open.pop();
                    }
                    _ => return false,
                }
            }
        }
    }
}

struct JsonScanner<'a> {
    text: &'a [u8],
    position: usize,
}

impl JsonScanner<'_> {
    fn next(&mut self) -> Option<u8> {
        let byte = *self.text.get(self.position)?;
        self.position += 1;
        Some(byte)
    }

    fn eat(&mut self, expected: u8) -> bool {
        self.skip_whitespace();
        let found = self.text.get(self.position) == Some(&expected);
        self.position += usize::from(found);
        found
    }

    fn skip_whitespace(&mut self) {
        while matches!(self.text.get(self.position), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.position += 1;
        }
    }

    /// `"name" :` — an object key and its colon.
    fn key(&mut self) -> bool {
        self.eat(b'"') && self.string() && self.eat(b':')
    }

    /// The rest of a literal whose first letter was read.
    fn literal(&mut self, rest: &[u8]) -> bool {
        let found = self.text[self.position..].starts_with(rest);
        if found {
            self.position += rest.len();
        }
        found
    }

    /// The rest of a number whose first byte was read.
    fn number(&mut self) -> bool {
        let start = self.position - 1;
        match json_number_length(&self.text[start..]) {
            Some(length) => {
                self.position = start + length;
                true
            }
            None => false,
        }
    }

    /// The rest of a string whose opening quote was read.
    fn string(&mut self) -> bool {
        loop {
            match self.next() {
                Some(b'"') => return true,
                Some(b'\\') => match self.next() {
                    Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {}
                    Some(b'u') => {
                        let hex = self.text.get(self.position..self.position + 4);
                        if !hex.is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit)) {
                            return false;
                        }
                        self.position += 4;
                    }
                    _ => return false,
                },
                Some(0x00..=0x1f) | None => return false,
                Some(_) => {}
            }
        }
    }
}

/// A commit time (microseconds since 2000-01-01 UTC) as PROTOCOL.md's `commit_timestamp`:
/// `YYYY-MM-DDTHH:MM:SS.mmmZ`, always three fraction digits (truncated, like `to_char`'s `MS`).
pub fn format_commit_timestamp(pg_micros: i64) -> String {
    let unix_seconds = pg_micros.div_euclid(1_000_000) + PG_EPOCH_OFFSET_SECS;
    let millis = pg_micros.rem_euclid(1_000_000) / 1000;
    let second_of_day = unix_seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(unix_seconds.div_euclid(86_400));
    let (hour, minute, second) = (second_of_day / 3600, second_of_day / 60 % 60, second_of_day % 60);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}.{millis:03}Z")
}

/// Days since 1970-01-01 → proleptic Gregorian (year, month, day), by Howard Hinnant's
/// `civil_from_days` method: count from 0000-03-01 so the leap day ends each year, split into
/// 400-year eras of 146 097 days, then find the year of the era and the month from the day.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let shifted = days + 719_468; // 0000-03-01 → 1970-01-01
    let era = shifted.div_euclid(146_097);
    let day_of_era = shifted.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 };
    (era * 400 + year_of_era + i64::from(month <= 2), month, day)
}
