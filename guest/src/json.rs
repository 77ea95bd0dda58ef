//! JSON as requests arrive: a borrowed tree, and the helpers that name what was found.
//!
//! [`Node`] is `serde_json::Value` cut down for one pass over a request: strings borrow from the
//! body when they have no escapes, objects are vectors in document order (so duplicate keys are
//! seen, not silently merged) and numbers keep whether they were integers. Parsing a small
//! request costs one allocation per array or object.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::error::{Error, bad};

/// A parsed JSON value borrowing from the request body.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node<'de> {
    Null,
    Bool(bool),
    /// A non-negative integer.
    U64(u64),
    /// A negative integer.
    I64(i64),
    /// A number with a fraction or an exponent, or an integer out of 64-bit range.
    F64(f64),
    Str(Cow<'de, str>),
    Array(Vec<Node<'de>>),
    /// Members in document order, duplicates kept.
    Object(Vec<(Cow<'de, str>, Node<'de>)>),
}

impl<'de> Node<'de> {
    /// The JSON type's name, as used in "expected X, got Y" messages.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Node::Null => "null",
            Node::Bool(_) => "boolean",
            Node::U64(_) | Node::I64(_) | Node::F64(_) => "number",
            Node::Str(_) => "string",
            Node::Array(_) => "array",
            Node::Object(_) => "object",
        }
    }

    /// The number as `f64`, if this is a number.
    pub(crate) fn as_f64(&self) -> Option<f64> {
        match *self {
            Node::U64(n) => Some(n as f64),
            Node::I64(n) => Some(n as f64),
            Node::F64(x) => Some(x),
            _ => None,
        }
    }
}

/// Parses a request body.
pub(crate) fn parse(body: &[u8]) -> Result<Node<'_>, Error> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let node = Node::deserialize(&mut de).and_then(|n| de.end().map(|()| n));
    node.map_err(|e| bad(format!("the request body is not valid JSON: {e}")))
}

/// Members of a top-level request object, with unknown and duplicate keys rejected.
///
/// `allowed` lists the keys the form accepts; the result has one slot per allowed key.
pub(crate) fn top_level<'a, 'de, const N: usize>(
    node: &'a Node<'de>,
    allowed: [&str; N],
) -> Result<[Option<&'a Node<'de>>; N], Error> {
    let Node::Object(members) = node else {
        return Err(bad(format!(
            "the request must be a JSON object, got {}",
            node.kind()
        )));
    };
    let mut slots = [None; N];
    for (key, value) in members {
        let Some(i) = allowed.iter().position(|k| *k == key.as_ref()) else {
            return Err(bad(format!(
                "unknown field {} in the request (expected {})",
                Quoted(key),
                OneOf(&allowed)
            )));
        };
        if slots[i].replace(value).is_some() {
            return Err(bad(format!(
                "duplicate field {} in the request",
                Quoted(key)
            )));
        }
    }
    Ok(slots)
}

/// Displays a string as a JSON string literal (quoted, escaped), for messages.
pub(crate) struct Quoted<'a>(pub &'a str);

impl fmt::Display for Quoted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Names come from requests: escape them so a message is always one readable line.
        write!(f, "\"{}\"", self.0.escape_debug())
    }
}

/// Displays `"a"`, `"a" or "b"`, `"a", "b" or "c"`.
pub(crate) struct OneOf<'a, S: AsRef<str>>(pub &'a [S]);

impl<S: AsRef<str>> fmt::Display for OneOf<'_, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(if i + 1 == n { " or " } else { ", " })?;
            }
            Quoted(s.as_ref()).fmt(f)?;
        }
        Ok(())
    }
}

/// Displays `"a", "b", "c"`.
pub(crate) struct Listed<'a, S: AsRef<str>>(pub &'a [S]);

impl<S: AsRef<str>> fmt::Display for Listed<'_, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            Quoted(s.as_ref()).fmt(f)?;
        }
        Ok(())
    }
}

/// The media type of a `Content-Type` value: lower-cased, parameters and spaces removed.
pub(crate) fn media_type(content_type: &str) -> String {
    let essence = content_type.split(';').next().unwrap_or("");
    essence.trim().to_ascii_lowercase()
}

/// Reads and discards the rest of a sequence (after an error, so the parser can finish).
pub(crate) fn drain_seq<'de, A: SeqAccess<'de>>(seq: &mut A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

/// Reads and discards the rest of a map whose next item is a key.
pub(crate) fn drain_map<'de, A: MapAccess<'de>>(map: &mut A) -> Result<(), A::Error> {
    while map.next_key::<IgnoredAny>()?.is_some() {
        map.next_value::<IgnoredAny>()?;
    }
    Ok(())
}

/// A map key or string that borrows from the body when it can.
pub(crate) struct Str<'de>(pub Cow<'de, str>);

impl<'de> Deserialize<'de> for Str<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for Node<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Node::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Node::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        Node::deserialize(d)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        Ok(Node::Bool(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(Node::U64(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(if v >= 0 {
            Node::U64(v as u64)
        } else {
            Node::I64(v)
        })
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Node::F64(v))
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Node::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Node::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Node::Str(Cow::Owned(v)))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        // Never trust a size hint from input for a large allocation.
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(item) = seq.next_element::<Node<'de>>()? {
            items.push(item);
        }
        Ok(Node::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
        while let Some(Str(key)) = map.next_key::<Str<'de>>()? {
            members.push((key, map.next_value::<Node<'de>>()?));
        }
        Ok(Node::Object(members))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_type_and_borrows_plain_strings() {
        let body = br#"{"a": [null, true, 1, -2, 2.5, "s", "e\n"], "b": {}}"#;
        let node = parse(body).unwrap();
        let Node::Object(m) = &node else {
            panic!("not an object")
        };
        assert_eq!(m[0].0, "a");
        let Node::Array(items) = &m[0].1 else {
            panic!("not an array")
        };
        let kinds: Vec<_> = items.iter().map(Node::kind).collect();
        assert_eq!(
            kinds,
            [
                "null", "boolean", "number", "number", "number", "string", "string"
            ]
        );
        assert!(matches!(&items[5], Node::Str(Cow::Borrowed("s"))));
        assert!(matches!(&items[6], Node::Str(Cow::Owned(s)) if s == "e\n"));
        assert_eq!(items[3], Node::I64(-2));
        assert_eq!(items[2], Node::U64(1));
    }

    #[test]
    fn invalid_json_is_bad_input_with_position() {
        for body in [&b"{"[..], b"", b"{\"a\":1} x", b"\xff", b"[1,]"] {
            let err = parse(body).unwrap_err();
            assert_eq!(err.status(), 1);
            assert!(
                err.message()
                    .starts_with("the request body is not valid JSON: "),
                "{err}"
            );
        }
        // Deep nesting is refused by serde_json's recursion limit, not a stack overflow.
        let deep = "[".repeat(100_000);
        assert!(
            parse(deep.as_bytes())
                .unwrap_err()
                .message()
                .contains("recursion limit")
        );
    }

    #[test]
    fn top_level_rejects_unknown_and_duplicate_keys() {
        let node = parse(br#"{"record": {}, "extra": 1}"#).unwrap();
        let err = top_level(&node, ["records", "record"]).unwrap_err();
        assert_eq!(
            err.message(),
            r#"unknown field "extra" in the request (expected "records" or "record")"#
        );
        let node = parse(br#"{"record": {}, "record": {}}"#).unwrap();
        let err = top_level(&node, ["records", "record"]).unwrap_err();
        assert_eq!(err.message(), r#"duplicate field "record" in the request"#);
        let node = parse(b"[1]").unwrap();
        let err = top_level(&node, ["records"]).unwrap_err();
        assert_eq!(
            err.message(),
            "the request must be a JSON object, got array"
        );
    }

    #[test]
    fn media_types_ignore_case_and_parameters() {
        assert_eq!(
            media_type("Application/JSON; charset=utf-8"),
            "application/json"
        );
        assert_eq!(media_type(" image/png "), "image/png");
        assert_eq!(media_type(""), "");
    }

    #[test]
    fn quoted_escapes_control_characters() {
        assert_eq!(Quoted("a\"b\n").to_string(), r#""a\"b\n""#);
        assert_eq!(OneOf(&["a", "b", "c"]).to_string(), r#""a", "b" or "c""#);
    }
}
