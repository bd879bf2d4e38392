//! Value rendering: one `check(type, text, json)` line per case, the type table against a
//! `pg_type` dump, commit timestamps, and properties (valid JSON whatever the input).

use super::*;
use proptest::prelude::*;

#[track_caller]
fn check(type_oid: u32, text: &str, expected: &str) {
    check_bytes(type_oid, text.as_bytes(), expected);
}

#[track_caller]
fn check_bytes(type_oid: u32, text: &[u8], expected: &str) {
    let mut out = b"prefix".to_vec();
    write_json_value(type_oid, text, &mut out);
    let json = std::str::from_utf8(&out[6..]).expect("UTF-8 output");
    assert_eq!(json, expected, "type {type_oid}, text {:?}", String::from_utf8_lossy(text));
    assert!(&out[..6] == b"prefix", "appends");
    assert_valid_json(&out[6..]);
}

#[track_caller]
fn assert_valid_json(json: &[u8]) {
    if let Err(error) = serde_json::from_slice::<serde::de::IgnoredAny>(json) {
        panic!("invalid JSON ({error}): {}", String::from_utf8_lossy(json));
    }
}

const ENUM_OID: u32 = 16_385;

#[test]
fn numbers() {
    check(oid::INT2, "-32768", "-32768");
    check(oid::INT4, "123456", "123456");
    check(oid::INT8, "9007199254740993", "9007199254740993");
    check(oid::NUMERIC, "12345.6789", "12345.6789");
    check(oid::NUMERIC, "0.000001", "0.000001");
    check(oid::NUMERIC, "NaN", r#""NaN""#);
    check(oid::NUMERIC, "Infinity", r#""Infinity""#);
    check(oid::NUMERIC, "-Infinity", r#""-Infinity""#);
    check(oid::FLOAT8, "0.1", "0.1");
    check(oid::FLOAT8, "-0", "-0");
    check(oid::FLOAT8, "1e-07", "1e-07");
    check(oid::FLOAT8, "1.7976931348623157e+308", "1.7976931348623157e+308");
    check(oid::FLOAT4, "NaN", r#""NaN""#);
    check(oid::FLOAT4, "-Infinity", r#""-Infinity""#);
}

#[test]
fn text_that_is_not_a_json_number_becomes_a_string() {
    for bad in ["", "-", "01", "1.", ".5", "1e", "1e+", "+1", "0x10", "1 ", " 1", "1,5", "١"] {
        let mut out = Vec::new();
        write_json_value(oid::INT4, bad.as_bytes(), &mut out);
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&out).unwrap(), serde_json::Value::from(bad), "{bad:?}");
    }
}

#[test]
fn booleans() {
    check(oid::BOOL, "t", "true");
    check(oid::BOOL, "f", "false");
    check(oid::BOOL, "true", r#""true""#);
}

#[test]
fn json_passes_through_when_valid() {
    check(oid::JSONB, r#"{"c": "red", "n": [1, 2.5, null, true]}"#, r#"{"c": "red", "n": [1, 2.5, null, true]}"#);
    check(oid::JSON, "  [] ", "  [] ");
    check(oid::JSON, r#""\u00e9\n""#, r#""\u00e9\n""#);
    check(oid::JSONB, "null", "null");
    check(oid::JSONB, "-0.5e10", "-0.5e10");
    check(oid::JSON, r#"{"a":{"b":{"c":[[[]]]}},"d":{}}"#, r#"{"a":{"b":{"c":[[[]]]}},"d":{}}"#);
    // Deeper than serde_json's default recursion limit is still JSON.
    let deep = format!("{}{}", "[".repeat(500), "]".repeat(500));
    check(oid::JSONB, &deep, &deep);
}

#[test]
fn invalid_json_becomes_a_string() {
    for bad in [
        "",
        "{",
        "[1,]",
        "[,1]",
        "{\"a\"}",
        "{\"a\":}",
        "{a:1}",
        "tru",
        "nul",
        "01",
        "[1] [2]",
        "\"\t\"",
        "\"\\x\"",
        "\"\\u12\"",
        "{\"a\":1,}",
        "[1}",
        "{\"a\":1]",
        "\"unterminated",
        "1 2",
    ] {
        let mut out = Vec::new();
        write_json_value(oid::JSONB, bad.as_bytes(), &mut out);
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&out).unwrap(), serde_json::Value::from(bad), "{bad:?}");
    }
    check_bytes(oid::JSON, b"\"\xff\"", "\"\\\"\u{fffd}\\\"\"");
}

#[test]
fn timestamps() {
    check(oid::TIMESTAMPTZ, "2026-08-21 10:15:30.123456+00", r#""2026-08-21T10:15:30.123456+00:00""#);
    check(oid::TIMESTAMPTZ, "2026-08-21 10:15:30+00", r#""2026-08-21T10:15:30+00:00""#);
    check(oid::TIMESTAMPTZ, "2026-08-21 10:15:30.5+05:30", r#""2026-08-21T10:15:30.5+05:30""#);
    check(oid::TIMESTAMPTZ, "1883-11-18 12:00:00-07:52:58", r#""1883-11-18T12:00:00-07:52:58""#);
    check(oid::TIMESTAMPTZ, "2026-08-21 10:15:30-03", r#""2026-08-21T10:15:30-03:00""#);
    check(oid::TIMESTAMPTZ, "0044-03-15 12:00:00+00 BC", r#""0044-03-15T12:00:00+00:00 BC""#);
    check(oid::TIMESTAMPTZ, "12026-08-21 10:15:30+00", r#""12026-08-21T10:15:30+00:00""#);
    check(oid::TIMESTAMPTZ, "infinity", r#""infinity""#);
    check(oid::TIMESTAMPTZ, "-infinity", r#""-infinity""#);
    check(oid::TIMESTAMP, "2026-08-21 10:15:30.1", r#""2026-08-21T10:15:30.1""#);
    check(oid::TIMESTAMP, "2026-08-21 10:15:30", r#""2026-08-21T10:15:30""#);
    check(oid::TIMESTAMP, "0044-03-15 12:00:00 BC", r#""0044-03-15T12:00:00 BC""#);
    check(oid::TIMESTAMP, "infinity", r#""infinity""#);
}

#[test]
fn unexpected_timestamp_text_is_quoted_as_it_is() {
    check(oid::TIMESTAMP, "2026-08-21 10:15:30+00", r#""2026-08-21 10:15:30+00""#);
    check(oid::TIMESTAMPTZ, "2026-08-21 10:15:30", r#""2026-08-21 10:15:30""#);
    check(oid::TIMESTAMPTZ, "2026-08-21 10:15:30+0", r#""2026-08-21 10:15:30+0""#);
    check(oid::TIMESTAMPTZ, "2026-08-21 10:15:30+00 AD", r#""2026-08-21 10:15:30+00 AD""#);
    check(oid::TIMESTAMPTZ, "Sat Aug 21 10:15:30 2026 UTC", r#""Sat Aug 21 10:15:30 2026 UTC""#);
    check(oid::TIMESTAMP, " ", r#"" ""#);
    check(oid::TIMESTAMP, "\"x\" 1", r#""\"x\" 1""#);
}

#[test]
fn strings() {
    check(oid::TEXT, "Buy milk", r#""Buy milk""#);
    check(oid::TEXT, "", r#""""#);
    let expected =
        r#""quote \" backslash \\ newline \n tab \t bell \u0007 cr \r ff \f bs \b nul \u0000 us \u001f del "#;
    check(
        oid::TEXT,
        "quote \" backslash \\ newline \n tab \t bell \u{7} cr \r ff \u{c} bs \u{8} nul \u{0} us \u{1f} del \u{7f}",
        &format!("{expected}\u{7f}\""),
    );
    check(oid::TEXT, "unicode é 日本 🎉 \u{2028}", "\"unicode é 日本 🎉 \u{2028}\"");
    check(oid::VARCHAR, "short", r#""short""#);
    check(1042, "ab   ", r#""ab   ""#);
    check(oid::UUID, "9f1c2e4a-58b1-4c8e-9d0a-6b7c1e2f3a4b", r#""9f1c2e4a-58b1-4c8e-9d0a-6b7c1e2f3a4b""#);
    check(oid::DATE, "2026-08-21", r#""2026-08-21""#);
    check(oid::DATE, "2026-08-21 BC", r#""2026-08-21 BC""#);
    check(1083, "10:15:30.5", r#""10:15:30.5""#);
    check(1266, "10:15:30+02", r#""10:15:30+02""#);
    check(1186, "-1 years -2 mons +3 days -04:05:06.7", r#""-1 years -2 mons +3 days -04:05:06.7""#);
    // `to_jsonb` renders oid as a string: its type category is not numeric.
    check(oid::OID, "4242", r#""4242""#);
    check(ENUM_OID, "happy", r#""happy""#);
    check(0, "anything", r#""anything""#);
}

#[test]
fn invalid_utf8_is_replaced() {
    check_bytes(oid::TEXT, b"a\xffb\xc3", "\"a\u{fffd}b\u{fffd}\"");
}

#[test]
fn bytea_is_hex_digits_without_the_prefix() {
    check(oid::BYTEA, "\\x0102030405", r#""0102030405""#);
    check(oid::BYTEA, "\\x", r#""""#);
    // bytea_output=escape text is not ours to reinterpret: written as it is.
    check(oid::BYTEA, "ab\\000", r#""ab\\000""#);
}

#[test]
fn arrays() {
    check(1007, "{1,2,NULL}", "[1,2,null]");
    check(1007, "{}", "[]");
    check(1007, "{{1,2},{3,4}}", "[[1,2],[3,4]]");
    check(1007, "[0:2][1:2]={{1,2},{3,4},{5,6}}", "[[1,2],[3,4],[5,6]]");
    check(1007, "[-3:-2]={7,8}", "[7,8]");
    check(
        1009,
        r#"{"a b","c\"d",plain,NULL,"NULL","back\\slash",""}"#,
        r#"["a b","c\"d","plain",null,"NULL","back\\slash",""]"#,
    );
    check(1009, r#"{"{braces}","comma,inside"}"#, r#"["{braces}","comma,inside"]"#);
    check(1000, "{t,f,NULL}", "[true,false,null]");
    check(1231, "{1.5,NaN,-2,Infinity}", r#"[1.5,"NaN",-2,"Infinity"]"#);
    check(1022, "{-0,1e-07,-Infinity}", r#"[-0,1e-07,"-Infinity"]"#);
    check(3807, r#"{"{\"k\": [1]}","null",NULL}"#, r#"[{"k": [1]},null,null]"#);
    check(199, r#"{"not json"}"#, r#"["not json"]"#);
    check(1185, r#"{"2026-08-21 10:15:30+00",infinity}"#, r#"["2026-08-21T10:15:30+00:00","infinity"]"#);
    check(1115, r#"{"2026-08-21 10:15:30.1"}"#, r#"["2026-08-21T10:15:30.1"]"#);
    check(1001, r#"{"\\x00ff",NULL,"\\x"}"#, r#"["00ff",null,""]"#);
    check(2951, "{9f1c2e4a-58b1-4c8e-9d0a-6b7c1e2f3a4b}", r#"["9f1c2e4a-58b1-4c8e-9d0a-6b7c1e2f3a4b"]"#);
    check(1028, "{1,2}", r#"["1","2"]"#);
    // box is the one type whose array delimiter is ';' (its values contain commas).
    check(1020, "{(1,1),(0,0);(2,2),(1,1)}", r#"["(1,1),(0,0)","(2,2),(1,1)"]"#);
    check(1007, "{{{{{{{1}}}}}}}", "[[[[[[[1]]]]]]]");
}

#[test]
fn malformed_arrays_become_strings() {
    for bad in [
        "",
        "{",
        "}",
        "{1,2",
        "{1,,2}",
        "{1,}",
        "{,1}",
        "{1}x",
        "{1}}",
        "{\"a}",
        "{\"a\\",
        "{a b}",
        "1,2",
        "[1:2]{1,2}",
        "[a]={1}",
        "{{1},2",
        "{\"a\"b}",
        "{1 }",
        "{1}{2}",
    ] {
        let mut out = Vec::new();
        write_json_value(1007, bad.as_bytes(), &mut out);
        assert_eq!(serde_json::from_slice::<serde_json::Value>(&out).unwrap(), serde_json::Value::from(bad), "{bad:?}");
    }
}

#[test]
fn arrays_of_user_defined_types() {
    let mut out = Vec::new();
    write_json_array(ENUM_OID, b"{sad,happy,NULL}", &mut out);
    assert_eq!(out, br#"["sad","happy",null]"#);
    // Without knowing the column is an array, the text is a string.
    out.clear();
    write_json_value(16_384, b"{sad,happy}", &mut out);
    assert_eq!(out, br#""{sad,happy}""#);
}

#[test]
fn strings_helper_escapes_like_to_jsonb() {
    let mut out = Vec::new();
    write_json_string("a\"b\\c\u{1}".as_bytes(), &mut out);
    assert_eq!(out, br#""a\"b\\c\u0001""#);
}

/// Every row of a `pg_type` dump (PostgreSQL 15: oid, typname, typelem, typarray, typdelim).
fn pg_type_rows() -> Vec<(u32, String, u32, u8)> {
    let path = format!("{}/tests/fixtures/pg_type.tsv", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|line| {
            let fields: Vec<&str> = line.split('\t').collect();
            (fields[0].parse().unwrap(), fields[1].to_owned(), fields[2].parse().unwrap(), fields[4].as_bytes()[0])
        })
        .collect()
}

#[test]
fn type_table_matches_pg_type() {
    let rows = pg_type_rows();
    assert_eq!(rows.len(), BUILTIN_TYPES.len());
    for (oid, name, element, delimiter) in &rows {
        assert_eq!(builtin_type_name(*oid), Some(name.as_str()), "oid {oid}");
        // Arrays proper are the `_` types; `name`, `point` and the like have a typelem but are
        // not arrays in text form.
        let expected_element = name.starts_with('_').then_some(*element);
        assert_eq!(array_element_oid(*oid), expected_element, "{name}");
        assert_eq!(*delimiter == b';', *oid == oid::BOX || *oid == 1020, "{name} delimiter");
    }
    assert!(BUILTIN_TYPES.windows(2).all(|pair| pair[0].0 < pair[1].0), "sorted for binary search");
}

#[test]
fn type_names_for_the_spec_examples() {
    let names: Vec<Option<&str>> = [
        20, 23, 25, 1043, 16, 2950, 1184, 3802, 1700, 1009, 1007, 17, 1082, 1083, 1266, 1114, 1186, 26, 21, 701, 700,
        114, 1042,
    ]
    .into_iter()
    .map(builtin_type_name)
    .collect();
    let expected = [
        "int8",
        "int4",
        "text",
        "varchar",
        "bool",
        "uuid",
        "timestamptz",
        "jsonb",
        "numeric",
        "_text",
        "_int4",
        "bytea",
        "date",
        "time",
        "timetz",
        "timestamp",
        "interval",
        "oid",
        "int2",
        "float8",
        "float4",
        "json",
        "bpchar",
    ];
    assert_eq!(names, expected.map(Some));
    assert_eq!(builtin_type_name(16_384), None);
    assert_eq!(builtin_type_name(0), None);
    assert_eq!(array_element_oid(1007), Some(23));
    assert_eq!(array_element_oid(23), None);
    assert_eq!(array_element_oid(19), None, "name has a typelem but is not an array");
}

#[test]
fn commit_timestamps() {
    assert_eq!(format_commit_timestamp(0), "2000-01-01T00:00:00.000Z");
    // 2026-08-21T10:15:30.123456Z: 9729 days after 2000-01-01.
    let micros = ((9729 * 86_400 + 10 * 3600 + 15 * 60 + 30) * 1_000_000) + 123_456;
    assert_eq!(format_commit_timestamp(micros), "2026-08-21T10:15:30.123Z");
    assert_eq!(format_commit_timestamp(micros + 999), "2026-08-21T10:15:30.124Z");
    assert_eq!(format_commit_timestamp(-1), "1999-12-31T23:59:59.999Z");
    assert_eq!(format_commit_timestamp((31 + 28) * 86_400 * 1_000_000), "2000-02-29T00:00:00.000Z");
    assert_eq!(format_commit_timestamp(-946_684_800 * 1_000_000), "1970-01-01T00:00:00.000Z");
    // 2100 is not a leap year.
    let day_2100_02_28 = days_between_epoch_and(2100, 2, 28);
    assert_eq!(format_commit_timestamp((day_2100_02_28 + 1) * 86_400_000_000), "2100-03-01T00:00:00.000Z");
    for extreme in [i64::MIN, i64::MAX] {
        assert!(format_commit_timestamp(extreme).len() >= 24);
    }
}

/// Days from 2000-01-01 to a date, counted the slow way, for checking `civil_from_days`.
fn days_between_epoch_and(year: i64, month: i64, day: i64) -> i64 {
    let leap = |year: i64| (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let month_days = |year: i64, month: i64| match month {
        2 if leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    let mut days = 0;
    for y in 2000..year {
        days += if leap(y) { 366 } else { 365 };
    }
    for m in 1..month {
        days += month_days(year, m);
    }
    days + day - 1
}

#[test]
fn civil_from_days_matches_a_day_by_day_count() {
    // Walk every day from 1600-01-01 to 2500-12-31 and compare.
    let (mut year, mut month, mut day) = (1600, 1, 1);
    let leap = |year: i64| (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let unix_days_at_start = -135_140; // 1600-01-01 relative to 1970-01-01
    for offset in 0..(901 * 366) {
        if year > 2500 {
            break;
        }
        assert_eq!(civil_from_days(unix_days_at_start + offset), (year, month, day));
        let length = match month {
            2 if leap(year) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        day += 1;
        if day > length {
            day = 1;
            month += 1;
            if month > 12 {
                month = 1;
                year += 1;
            }
        }
    }
}

fn interesting_oid() -> impl Strategy<Value = u32> {
    prop_oneof![
        proptest::sample::select(vec![
            oid::BOOL,
            oid::BYTEA,
            oid::INT8,
            oid::INT2,
            oid::INT4,
            oid::TEXT,
            oid::OID,
            oid::JSON,
            oid::FLOAT4,
            oid::FLOAT8,
            oid::DATE,
            oid::TIMESTAMP,
            oid::TIMESTAMPTZ,
            oid::NUMERIC,
            oid::UUID,
            oid::JSONB,
            1000,
            1001,
            1007,
            1009,
            1020,
            1022,
            1115,
            1185,
            1231,
            199,
            3807,
            16_384,
        ]),
        any::<u32>(),
    ]
}

/// Text shaped like the values above, so the parsers get past their first byte.
fn interesting_text() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..40),
        "[-0-9.eE+ {}\",:NULLtf\\\\\\[\\]=a-z]{0,40}".prop_map(String::into_bytes),
        "[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9:.]{0,12}[+-]?[0-9:]{0,6}( BC)?".prop_map(String::into_bytes),
        "[\\[\\]{}\"\\\\,:0-9a-z tfnul.eE+-]{0,40}".prop_map(String::into_bytes),
    ]
}

proptest! {
    #[test]
    fn output_is_always_valid_json(type_oid in interesting_oid(), text in interesting_text()) {
        let mut out = Vec::new();
        write_json_value(type_oid, &text, &mut out);
        prop_assert!(serde_json::from_slice::<serde::de::IgnoredAny>(&out).is_ok(), "{}", String::from_utf8_lossy(&out));
        let mut out = Vec::new();
        write_json_array(type_oid, &text, &mut out);
        prop_assert!(serde_json::from_slice::<serde::de::IgnoredAny>(&out).is_ok(), "{}", String::from_utf8_lossy(&out));
    }

    /// Our JSON check agrees with serde_json's (within serde_json's nesting limit).
    #[test]
    fn json_check_agrees_with_serde_json(text in interesting_text()) {
        let serde_says = serde_json::from_slice::<serde::de::IgnoredAny>(&text).is_ok();
        prop_assert_eq!(is_json(&text), serde_says, "{}", String::from_utf8_lossy(&text));
    }

    #[test]
    fn strings_round_trip_through_serde_json(text: String) {
        let mut out = Vec::new();
        write_json_string(text.as_bytes(), &mut out);
        prop_assert_eq!(serde_json::from_slice::<String>(&out).unwrap(), text);
    }

    #[test]
    fn commit_timestamps_have_a_fixed_shape(micros in -10_000_000_000_000_000i64..10_000_000_000_000_000) {
        let text = format_commit_timestamp(micros);
        prop_assert_eq!(text.len(), 24, "{}", text);
        prop_assert!(text.ends_with('Z'));
    }
}
