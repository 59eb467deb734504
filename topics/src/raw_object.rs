//! A JSON object's top-level fields, each kept as its raw text: what Dom0 reads and sets in every
//! request it relays (the identity field, `request_id`, `timeout_ms`, `deadline_ms`) without
//! decoding and re-encoding the other values — a chunk of an upload carries 87 KB of Base64 in
//! one string, which a `serde_json::Value` would unescape into a new string and escape again.
//!
//! The parse still validates the whole payload as JSON. Duplicate keys: the last one counts, as
//! for `serde_json::Value` (and so for every consumer that decodes the payload).

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

/// One field's value: as it came, or set here (already encoded).
#[derive(Debug, Clone)]
enum Field<'a> {
    Raw(&'a RawValue),
    Set(String),
}

impl Field<'_> {
    fn text(&self) -> &str {
        match self {
            Field::Raw(r) => r.get(),
            Field::Set(s) => s,
        }
    }
}

/// A JSON object read from a payload, its values untouched until asked for.
#[derive(Debug, Clone)]
pub struct RawObject<'a> {
    fields: BTreeMap<String, Field<'a>>,
}

/// Why a payload is not a [`RawObject`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RawObjectError {
    #[error("payload is not JSON: {0}")]
    NotJson(String),
    #[error("payload must be a JSON object")]
    NotObject,
}

impl<'a> RawObject<'a> {
    /// Reads `payload` as a JSON object.
    pub fn parse(payload: &'a [u8]) -> Result<RawObject<'a>, RawObjectError> {
        let fields: BTreeMap<String, &RawValue> = match serde_json::from_slice(payload) {
            Ok(fields) => fields,
            // Said apart (a second read, on the refusal's path only): JSON that is not an
            // object, or not JSON.
            Err(e) => {
                return Err(match serde_json::from_slice::<&RawValue>(payload) {
                    Ok(_) => RawObjectError::NotObject,
                    Err(_) => RawObjectError::NotJson(e.to_string()),
                });
            }
        };
        // Reading a value raw checks its syntax, not all that decoding checks (a lone surrogate
        // escape, a number out of range): every value but a plain string (no escape in it: the
        // raw read has checked all there is) is decoded once, so what is refused is what
        // `serde_json::Value`, and so every consumer, refuses. (Of duplicate keys only the last
        // value is kept, and checked; an earlier one is checked for its syntax only: a consumer
        // refuses the payload if Dom0 forwards it as it came.)
        for raw in fields.values() {
            let text = raw.get();
            let plain = text.starts_with('"') && !text.contains('\\');
            if !plain {
                serde_json::from_str::<serde_json::Value>(text)
                    .map_err(|e| RawObjectError::NotJson(e.to_string()))?;
            }
        }
        Ok(RawObject {
            fields: fields
                .into_iter()
                .map(|(k, v)| (k, Field::Raw(v)))
                .collect(),
        })
    }

    /// The raw text of a field's value (`"vm-gui"` with its quotes, `42`, `null`, `{...}`).
    pub fn raw(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(Field::text)
    }

    /// A field decoded as `T`; None when absent, `Some(Err)` when it is not a `T`.
    pub fn get<T: DeserializeOwned>(&self, key: &str) -> Option<Result<T, serde_json::Error>> {
        self.raw(key).map(serde_json::from_str)
    }

    /// True when the field is absent or `null`.
    pub fn is_unset(&self, key: &str) -> bool {
        self.raw(key).is_none_or(|r| r == "null")
    }

    /// Sets a field to `value`.
    pub fn set(&mut self, key: &str, value: &serde_json::Value) {
        self.fields
            .insert(key.to_owned(), Field::Set(value.to_string()));
    }

    /// The object as JSON text: keys in order, each value as it came or as set.
    pub fn to_vec(&self) -> Vec<u8> {
        let len: usize = self
            .fields
            .iter()
            .map(|(k, v)| k.len() + v.text().len() + 4)
            .sum();
        let mut out = Vec::with_capacity(len + 2);
        out.push(b'{');
        for (i, (k, v)) in self.fields.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            // A key is a string: its JSON encoding cannot fail.
            out.extend_from_slice(serde_json::Value::from(k.as_str()).to_string().as_bytes());
            out.push(b':');
            out.extend_from_slice(v.text().as_bytes());
        }
        out.push(b'}');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn fields_read_set_and_written_back() {
        let payload = br#"{ "sender" : "vm-gui", "args": {"data": "QUJD\u0044"}, "timeout_ms": 5000, "n": null }"#;
        let mut o = RawObject::parse(payload).unwrap();
        assert_eq!(o.raw("sender"), Some(r#""vm-gui""#));
        assert_eq!(o.get::<String>("sender").unwrap().unwrap(), "vm-gui");
        assert_eq!(o.get::<u64>("timeout_ms").unwrap().unwrap(), 5000);
        assert!(o.get::<u64>("sender").unwrap().is_err());
        assert!(o.get::<u64>("absent").is_none());
        assert!(o.is_unset("n") && o.is_unset("absent") && !o.is_unset("sender"));
        o.set("deadline_ms", &json!(123));
        o.set("sender", &json!("vm-\"x"));
        let out = o.to_vec();
        // The untouched value keeps its text (the escape included); the result is the same JSON
        // as decoding, setting and encoding would give.
        assert!(String::from_utf8_lossy(&out).contains(r#""QUJD\u0044""#));
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            json!({"sender": "vm-\"x", "args": {"data": "QUJDD"}, "timeout_ms": 5000, "n": null, "deadline_ms": 123})
        );
    }

    #[test]
    fn the_last_of_duplicate_keys_counts_like_serde_json_value() {
        let payload = br#"{"sender":"vm-gui","sender":"sys-usb"}"#;
        let o = RawObject::parse(payload).unwrap();
        let v: Value = serde_json::from_slice(payload).unwrap();
        assert_eq!(o.get::<String>("sender").unwrap().unwrap(), v["sender"]);
        // An escaped key is the same key.
        let o = RawObject::parse(br#"{"sen\u0064er":"sys-usb"}"#).unwrap();
        assert_eq!(o.raw("sender"), Some(r#""sys-usb""#));
    }

    #[test]
    fn what_is_not_an_object_is_refused() {
        for (payload, want) in [
            (&b"[1]"[..], RawObjectError::NotObject),
            (b"\"x\"", RawObjectError::NotObject),
            (b" 3 ", RawObjectError::NotObject),
        ] {
            assert_eq!(RawObject::parse(payload).unwrap_err(), want);
        }
        for payload in [&b""[..], b"{", b"{\"a\":}", b"{\"a\":1} x", b"\xff"] {
            assert!(matches!(
                RawObject::parse(payload),
                Err(RawObjectError::NotJson(_))
            ));
        }
        assert_eq!(RawObject::parse(b" {} ").unwrap().to_vec(), b"{}");
        // Values are judged as serde_json::Value judges them: a lone surrogate or a number out of
        // range is not JSON anyone here reads; a surrogate pair is.
        for payload in [
            &br#"{"a":"\ud800"}"#[..],
            br#"{"a":["x","\uDC00"]}"#,
            br#"{"a":"\ud83d\ud83d"}"#,
            br#"{"a":1e400}"#,
            br#"{"a":{"b":[-1e999]}}"#,
        ] {
            assert!(serde_json::from_slice::<Value>(payload).is_err());
            assert!(matches!(
                RawObject::parse(payload),
                Err(RawObjectError::NotJson(_))
            ));
        }
        let pair = br#"{"a":"\ud83d\ude00","b":"\\ud800"}"#;
        assert!(serde_json::from_slice::<Value>(pair).is_ok());
        assert_eq!(
            RawObject::parse(pair).unwrap().raw("a"),
            Some(r#""\ud83d\ude00""#)
        );
    }
}
