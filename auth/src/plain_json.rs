//! Untrusted JSON into [`serde_json::Value`], with every object key an ordinary key.
//!
//! The workspace turns on serde_json's `raw_value` feature (frames keep their payloads as
//! `RawValue`). With it, `Value`'s own deserializer treats an object whose first key is
//! `$serde_json::private::RawValue` as JSON *text* held in a string and parses that text again,
//! with a fresh recursion limit. Untrusted input could therefore nest far past serde_json's
//! 128 levels (strings inside strings: a debug build overflowed a 2 MB stack at 12 levels, a
//! 3 KB frame; the release build survived the 4.2 MB frame of 20 levels), and an object with
//! that key sorted first, as the server writes presence metas, did not read back as a `Value`
//! (found by the `presence_payload` fuzz target). [`from_str`] and [`from_slice`] build the
//! same `Value` as serde_json otherwise would, without that rule.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// A [`Value`] read without serde_json's raw-value rule (usable as a field type).
#[derive(Debug, Clone, PartialEq)]
pub struct Plain(pub Value);

impl<'de> Deserialize<'de> for Plain {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Plain, D::Error> {
        deserializer.deserialize_any(PlainVisitor).map(Plain)
    }
}

struct PlainVisitor;

impl<'de> Visitor<'de> for PlainVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, value: bool) -> Result<Value, E> {
        Ok(Value::Bool(value))
    }

    fn visit_i64<E>(self, value: i64) -> Result<Value, E> {
        Ok(Value::Number(value.into()))
    }

    fn visit_u64<E>(self, value: u64) -> Result<Value, E> {
        Ok(Value::Number(value.into()))
    }

    fn visit_f64<E>(self, value: f64) -> Result<Value, E> {
        // As serde_json does: a float JSON can hold is always finite.
        Ok(Number::from_f64(value).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, value: &str) -> Result<Value, E> {
        Ok(Value::String(value.to_owned()))
    }

    fn visit_string<E>(self, value: String) -> Result<Value, E> {
        Ok(Value::String(value))
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        Plain::deserialize(deserializer).map(|plain| plain.0)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut values = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(Plain(value)) = seq.next_element()? {
            values.push(value);
        }
        Ok(Value::Array(values))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some((key, Plain(value))) = map.next_entry::<String, Plain>()? {
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

/// The object key with which serde_json's `Value` reader parses a string again as JSON text
/// (the `raw_value` feature's private marker).
pub const RAW_VALUE_KEY: &str = "$serde_json::private::RawValue";

/// Whether `value` holds, at any depth, an object with the [`RAW_VALUE_KEY`] key. Such a value
/// must not be handed to code that reads it as a `serde_json::Value` (a dependency's `Value`
/// field, `serde_json::from_value`): that reader would parse the string again with a fresh
/// recursion limit, and strings nested in strings overflow the stack. Iterative, so it needs no
/// stack of its own whatever the depth.
pub fn holds_raw_value_key(value: &Value) -> bool {
    let mut pending = vec![value];
    while let Some(value) = pending.pop() {
        match value {
            Value::Object(map) => {
                if map.contains_key(RAW_VALUE_KEY) {
                    return true;
                }
                pending.extend(map.values());
            }
            Value::Array(items) => pending.extend(items),
            _ => {}
        }
    }
    false
}

/// JSON text of `levels` objects keyed [`RAW_VALUE_KEY`], each holding as a string 120 arrays
/// around the next: what serde_json's `Value` reader recurses through string after string. For
/// the tests that check it is refused (here, in tenants and end to end); not used in serving.
#[doc(hidden)]
pub fn nested_raw_values(levels: usize) -> String {
    let mut nested = String::from("1");
    for _ in 0..levels {
        let inner = format!("{}{}{}", "[".repeat(120), nested, "]".repeat(120));
        let quoted = serde_json::to_string(&inner).expect("a string serialises");
        nested = format!(r#"{{"{RAW_VALUE_KEY}":{quoted}}}"#);
    }
    nested
}

/// Parses `text` as one JSON value (serde_json's syntax and recursion limit).
pub fn from_str(text: &str) -> serde_json::Result<Value> {
    serde_json::from_str::<Plain>(text).map(|plain| plain.0)
}

/// Parses `bytes` as one JSON value (serde_json's syntax and recursion limit).
pub fn from_slice(bytes: &[u8]) -> serde_json::Result<Value> {
    serde_json::from_slice::<Plain>(bytes).map(|plain| plain.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN_KEY: &str = RAW_VALUE_KEY;

    #[test]
    fn reads_what_serde_json_reads() {
        for text in [r#"{"a":[1,-2,3.5,true,null,"x"],"b":{"c":{}},"a":18446744073709551615}"#, "[]", "\"s\"", "-0.0", "1e300"] {
            assert_eq!(from_str(text).unwrap(), serde_json::from_str::<Value>(text).unwrap(), "{text}");
        }
        assert!(from_str("{\"a\":").is_err() && from_slice(b"\xff").is_err());
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(from_str(&deep).is_err(), "serde_json's recursion limit still holds");
    }

    /// The token key is an ordinary key here: its string is not parsed again, and what the
    /// server writes with it (sorted first) reads back.
    #[test]
    fn the_raw_value_token_is_an_ordinary_key() {
        let text = format!(r#"{{"{TOKEN_KEY}":"[1]","at":"x"}}"#);
        assert!(serde_json::from_str::<Value>(&text).is_err(), "serde_json's own Value parses the string again");
        let value = from_str(&text).unwrap();
        assert_eq!(value[TOKEN_KEY], "[1]");
        assert_eq!(from_slice(&serde_json::to_vec(&value).unwrap()).unwrap(), value);
        // Strings nested in strings: no recursion beyond the one level of each string.
        let nested = nested_raw_values(12);
        let parsed = std::thread::Builder::new().stack_size(256 * 1024).spawn(move || from_str(&nested).is_ok()).unwrap().join();
        assert_eq!(parsed.ok(), Some(true), "parsed on a small stack");
    }

    #[test]
    fn finds_the_raw_value_key_at_any_depth() {
        assert!(!holds_raw_value_key(&from_str(r#"{"alg":"HS256","x":[{"y":"$serde_json::private::RawValue"}]}"#).unwrap()));
        assert!(holds_raw_value_key(&from_str(&format!(r#"{{"{TOKEN_KEY}":"1"}}"#)).unwrap()));
        assert!(holds_raw_value_key(&from_str(&format!(r#"{{"alg":"HS256","x":[1,{{"y":{{"z":1,"{TOKEN_KEY}":"[]"}}}}]}}"#)).unwrap()));
        let deep = format!("{}{{\"{TOKEN_KEY}\":1}}{}", "[".repeat(120), "]".repeat(120));
        assert!(holds_raw_value_key(&from_str(&deep).unwrap()));
    }
}
