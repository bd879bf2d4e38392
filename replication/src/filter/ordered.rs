//! Value keys for ordering comparisons of `numeric` and date/time columns (issue 11 item 4):
//! `lt/lte/gt/gte` (and `eq`) compare by value, as PostgreSQL does, not by text.
//!
//! Column values arrive as PostgreSQL prints them on the replication connection (`DateStyle
//! ISO`, `TimeZone UTC`, see `reader.rs`); operands may be written in the ISO forms (`T` or
//! space between date and time, `Z` or `±HH[:MM[:SS]]` offsets, ` BC`). An operand that does not
//! parse keeps the text comparison (the behaviour before).

use std::cmp::Ordering;

/// A `numeric` value: NaN (greater than everything, equal to itself, as PostgreSQL orders it),
/// ±infinity, or sign × 0.d₁d₂… × 10^exponent with no trailing zero digits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Numeric {
    NegInfinity,
    Finite { negative: bool, exponent: i64, digits: Vec<u8> },
    Infinity,
    NaN,
}

impl Numeric {
    /// Parses `[+-]digits[.digits][e[+-]digits]`, `NaN`, `[+-]Infinity` (ASCII case-insensitive).
    pub(crate) fn parse(text: &str) -> Option<Numeric> {
        let text = text.trim();
        let lower = text.to_ascii_lowercase();
        match lower.as_str() {
            "nan" => return Some(Numeric::NaN),
            "infinity" | "+infinity" | "inf" | "+inf" => return Some(Numeric::Infinity),
            "-infinity" | "-inf" => return Some(Numeric::NegInfinity),
            _ => {}
        }
        let (negative, rest) = match lower.as_bytes().first()? {
            b'-' => (true, &lower[1..]),
            b'+' => (false, &lower[1..]),
            _ => (false, &lower[..]),
        };
        let (mantissa, exp) = match rest.split_once('e') {
            Some((m, e)) => (m, e.parse::<i64>().ok().filter(|e| e.unsigned_abs() < 1_000_000)?),
            None => (rest, 0),
        };
        let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
        if (int.is_empty() && frac.is_empty()) || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
            return None;
        }
        let all: Vec<u8> = int.bytes().chain(frac.bytes()).map(|b| b - b'0').collect();
        let leading = all.iter().take_while(|d| **d == 0).count();
        let mut digits = all[leading..].to_vec();
        while digits.last() == Some(&0) {
            digits.pop();
        }
        if digits.is_empty() {
            return Some(Numeric::Finite { negative: false, exponent: 0, digits });
        }
        let exponent = int.len() as i64 - leading as i64 + exp;
        Some(Numeric::Finite { negative, exponent, digits })
    }
}

impl Ord for Numeric {
    fn cmp(&self, other: &Self) -> Ordering {
        use Numeric::*;
        let rank = |n: &Numeric| match n {
            NegInfinity => 0,
            Finite { .. } => 1,
            Infinity => 2,
            NaN => 3,
        };
        match (self, other) {
            (Finite { negative: an, exponent: ae, digits: ad }, Finite { negative: bn, exponent: be, digits: bd }) => {
                let sign = |negative: bool, digits: &Vec<u8>| if digits.is_empty() { 0 } else if negative { -1 } else { 1 };
                let (a_sign, b_sign) = (sign(*an, ad), sign(*bn, bd));
                if a_sign != b_sign || a_sign == 0 {
                    return a_sign.cmp(&b_sign);
                }
                let magnitude = ae.cmp(be).then_with(|| ad.cmp(bd));
                if a_sign < 0 {
                    magnitude.reverse()
                } else {
                    magnitude
                }
            }
            _ => rank(self).cmp(&rank(other)),
        }
    }
}

impl PartialOrd for Numeric {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Date/time column types compared by value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Temporal {
    /// `date`.
    Date,
    /// `timestamp`.
    Timestamp,
    /// `timestamptz`.
    TimestampTz,
    /// `time`.
    Time,
    /// `timetz`.
    TimeTz,
    /// `interval` (ordered as PostgreSQL does: months of 30 days, days of 24 hours).
    Interval,
}

impl Temporal {
    pub(crate) fn of(type_name: &str) -> Option<Temporal> {
        Some(match type_name {
            "date" => Temporal::Date,
            "timestamp" => Temporal::Timestamp,
            "timestamptz" => Temporal::TimestampTz,
            "time" => Temporal::Time,
            "timetz" => Temporal::TimeTz,
            "interval" => Temporal::Interval,
            _ => return None,
        })
    }

    /// The value's order key: microseconds (UTC for `timestamptz`; for `timetz`, the time at
    /// UTC then the zone, as PostgreSQL orders them); infinities at the ends.
    pub(crate) fn key(self, text: &str) -> Option<(i128, i64)> {
        let text = text.trim();
        match text.to_ascii_lowercase().as_str() {
            "infinity" | "+infinity" if matches!(self, Temporal::Date | Temporal::Timestamp | Temporal::TimestampTz) => return Some((i128::MAX, 0)),
            "-infinity" if matches!(self, Temporal::Date | Temporal::Timestamp | Temporal::TimestampTz) => return Some((i128::MIN, 0)),
            _ => {}
        }
        match self {
            Temporal::Interval => interval_micros(text).map(|micros| (micros, 0)),
            Temporal::Time | Temporal::TimeTz => {
                let (micros, offset) = time_of_day(text)?;
                match self {
                    Temporal::Time if offset.is_none() => Some((micros as i128, 0)),
                    Temporal::Time => None,
                    _ => {
                        let offset = offset.unwrap_or(0);
                        Some(((micros - offset * 1_000_000) as i128, -offset))
                    }
                }
            }
            _ => {
                let (bc, body) = match text.strip_suffix(" BC").or_else(|| text.strip_suffix(" bc")) {
                    Some(body) => (true, body),
                    None => (false, text),
                };
                let date_end = body.find([' ', 'T', 't']).unwrap_or(body.len());
                let (date, time) = (&body[..date_end], body.get(date_end + 1..).unwrap_or(""));
                let mut parts = date.splitn(3, '-');
                let year: i64 = digits(parts.next()?)?;
                let month: i64 = digits(parts.next()?)?;
                let day: i64 = digits(parts.next()?)?;
                if year == 0 || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
                    return None;
                }
                let year = if bc { 1 - year } else { year };
                let days = days_from_civil(year, month, day) as i128;
                if self == Temporal::Date {
                    return if time.is_empty() { Some((days, 0)) } else { None };
                }
                let (micros, offset) = if time.is_empty() { (0, None) } else { time_of_day(time)? };
                let offset = if self == Temporal::TimestampTz { offset.unwrap_or(0) } else { 0 };
                Some((days * 86_400_000_000 + micros as i128 - offset as i128 * 1_000_000, 0))
            }
        }
    }
}

const DAY_MICROS: i128 = 86_400_000_000;

/// An interval in the `postgres` output style or written with units (`1 year 2 mons 3 days
/// -04:05:06.5`, `-1 days +02:00:00`, `90 minutes`, `1.5 hours`), as microseconds with months
/// of 30 days (PostgreSQL's interval order). Other forms (ISO 8601 `P…`, `ago`) → `None`.
fn interval_micros(text: &str) -> Option<i128> {
    let mut total: i128 = 0;
    let mut tokens = text.split_whitespace().peekable();
    let mut any = false;
    while let Some(token) = tokens.next() {
        any = true;
        if token.contains(':') {
            let (negative, clock) = match token.as_bytes().first()? {
                b'-' => (true, &token[1..]),
                b'+' => (false, &token[1..]),
                _ => (false, token),
            };
            let mut parts = clock.splitn(3, ':');
            let hours = digits(parts.next()?)? as i128;
            let minutes = digits(parts.next()?)? as i128;
            let seconds = match parts.next() {
                Some(s) => scaled(s, 1_000_000)?,
                None => 0,
            };
            let micros = (hours * 3600 + minutes * 60) * 1_000_000 + seconds;
            total += if negative { -micros } else { micros };
            continue;
        }
        let unit_text = tokens.next()?.to_ascii_lowercase();
        let unit: i128 = match unit_text.as_str() {
            "year" | "years" | "yr" | "yrs" | "y" => 360 * DAY_MICROS,
            "mon" | "mons" | "month" | "months" => 30 * DAY_MICROS,
            "week" | "weeks" | "w" => 7 * DAY_MICROS,
            "day" | "days" | "d" => DAY_MICROS,
            "hour" | "hours" | "hr" | "hrs" | "h" => 3_600_000_000,
            "minute" | "minutes" | "min" | "mins" | "m" => 60_000_000,
            "second" | "seconds" | "sec" | "secs" | "s" => 1_000_000,
            "millisecond" | "milliseconds" | "ms" | "msec" | "msecs" => 1_000,
            "microsecond" | "microseconds" | "us" | "usec" | "usecs" => 1,
            _ => return None,
        };
        total += scaled(token, unit)?;
    }
    any.then_some(total)
}

/// `[+-]int[.frac]` × `unit`, exact while the fraction divides (else truncated toward zero, as
/// PostgreSQL's cascade of fractional units does at microseconds).
fn scaled(text: &str, unit: i128) -> Option<i128> {
    let (negative, body) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    if int.is_empty() && frac.is_empty() || int.len() > 18 || frac.len() > 18 || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let int: i128 = if int.is_empty() { 0 } else { int.parse().ok()? };
    let frac_value: i128 = if frac.is_empty() { 0 } else { frac.parse().ok()? };
    let value = int * unit + frac_value * unit / 10_i128.pow(frac.len() as u32);
    Some(if negative { -value } else { value })
}

fn digits(text: &str) -> Option<i64> {
    (!text.is_empty() && text.len() <= 9 && text.bytes().all(|b| b.is_ascii_digit())).then(|| text.parse().ok()).flatten()
}

/// `HH:MM[:SS[.ffffff]][Z|±HH[:MM[:SS]]]` → (microseconds since midnight, offset seconds east).
fn time_of_day(text: &str) -> Option<(i64, Option<i64>)> {
    let zone_at = text.find(['+', '-', 'Z', 'z']);
    let (clock, zone) = match zone_at {
        Some(at) => (&text[..at], Some(&text[at..])),
        None => (text, None),
    };
    let mut parts = clock.trim().splitn(3, ':');
    let hour = digits(parts.next()?)?;
    let minute = digits(parts.next()?)?;
    let (second, micros) = match parts.next() {
        Some(s) => {
            let (whole, fraction) = s.split_once('.').unwrap_or((s, ""));
            if fraction.len() > 6 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let micros = if fraction.is_empty() { 0 } else { fraction.parse::<i64>().ok()? * 10_i64.pow(6 - fraction.len() as u32) };
            (digits(whole)?, micros)
        }
        None => (0, 0),
    };
    if hour > 24 || minute > 59 || second > 60 || (hour == 24 && (minute, second, micros) != (0, 0, 0)) {
        return None;
    }
    let offset = match zone {
        None => None,
        Some(z) if z.eq_ignore_ascii_case("z") => Some(0),
        Some(z) => {
            let negative = z.starts_with('-');
            let mut parts = z[1..].splitn(3, ':');
            let first = parts.next()?;
            // `get`, not indexing: `first` may hold multi-byte characters (`+a€`), cut inside by `..2`.
            let (h, m) = if first.len() == 4 && !z[1..].contains(':') { (digits(first.get(..2)?)?, digits(first.get(2..)?)?) } else { (digits(first)?, parts.next().map(digits).unwrap_or(Some(0))?) };
            let s = parts.next().map(digits).unwrap_or(Some(0))?;
            let seconds = h * 3600 + m * 60 + s;
            Some(if negative { -seconds } else { seconds })
        }
    };
    Some((((hour * 60 + minute) * 60 + second) * 1_000_000 + micros, offset))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (astronomical year numbering).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}
