//! Debezium's outbox table layout (`--table-layout debezium`): the records
//! the Debezium Outbox Event Router emits for a row of its outbox table with
//! its defaults, so consumers written for Debezium keep working when this
//! relay replaces it. Owns the settings that shape those records (the
//! converter Kafka Connect serialized them with, `table.expand.json.payload`,
//! `table.fields.additional.placement`) and the conversion of one row's
//! values into key, value and headers.
//!
//! The router's defaults, as its documentation gives them: topic
//! `outbox.event.<aggregatetype>` (this relay's default `--topic-template`),
//! key = `aggregateid`, header `id` = the row's `id`, value = `payload`
//! (a JSON payload as a string unless expanded), the Kafka timestamp the
//! time of the change (not the `timestamp` column).

use bytes::Bytes;

use crate::{Error, Result};

/// How Kafka Connect serialized keys and values (`key.converter` and
/// `value.converter`), which decides the bytes a consumer reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Converter {
    /// `org.apache.kafka.connect.json.JsonConverter` with
    /// `schemas.enable=false`: strings are JSON strings (`"1"`), bytes are
    /// base64 JSON strings, an expanded payload is the JSON document.
    #[default]
    Json,
    /// `org.apache.kafka.connect.storage.StringConverter`: strings as they
    /// are; a bytea payload as its bytes (what `ByteArrayConverter` gives).
    String,
}

/// The type of the `payload` column, which decides how its text form is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadKind {
    /// `json` or `jsonb`.
    Json,
    /// `bytea` (sent in PostgreSQL's hex text form).
    Bytea,
    /// Anything else, read as text.
    Text,
}

impl PayloadKind {
    /// From the column's type oid.
    pub fn from_oid(oid: Option<u32>) -> Self {
        match oid {
            Some(114 | 3802) => Self::Json,
            Some(17) => Self::Bytea,
            _ => Self::Text,
        }
    }
}

/// One `table.fields.additional.placement` entry: a column sent as a header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The outbox column.
    pub column: String,
    /// The header name (the alias, or the column's name).
    pub header: String,
}

/// The settings of the Debezium layout.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Debezium {
    /// How keys and values were serialized.
    pub converter: Converter,
    /// `table.expand.json.payload`: a JSON payload as the document itself
    /// rather than a string.
    pub expand_json_payload: bool,
    /// Columns sent as headers.
    pub placements: Vec<Placement>,
}

impl Debezium {
    /// Validated settings. `placements` has Debezium's shape,
    /// `column:header[:alias]` entries separated by commas.
    pub fn new(converter: Converter, expand_json_payload: bool, placements: &str) -> Result<Self> {
        if expand_json_payload && converter == Converter::String {
            return Err(Error::Config(
                "--expand-json-payload with --debezium-converter string is refused: Kafka Connect's \
                 StringConverter would have written the expanded structure's toString(), which no \
                 consumer reads; use --debezium-converter json, or leave the payload as a string"
                    .into(),
            ));
        }
        let mut parsed = Vec::new();
        for entry in placements
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            let parts: Vec<&str> = entry.split(':').collect();
            let bad = |why: &str| {
                Error::Config(format!(
                    "--additional-placement entry `{}` {why}",
                    entry.escape_debug()
                ))
            };
            let (column, placement, alias) = match parts.as_slice() {
                [c, p] => (*c, *p, *c),
                [c, p, a] => (*c, *p, *a),
                _ => return Err(bad("is not column:header or column:header:alias")),
            };
            if column.is_empty() {
                return Err(bad("has no column name"));
            }
            match placement {
                "header" => {}
                "envelope" | "partition" => {
                    return Err(bad(
                        "asks for a placement this relay does not support (only `header`); \
                         `envelope` changes the value's shape and `partition` the partitioning, \
                         both of which a consumer of this relay gets from the value and key",
                    ));
                }
                _ => {
                    return Err(bad(
                        "has an unknown placement (Debezium's are header, envelope, partition)",
                    ));
                }
            }
            let reserved = ["id", "traceparent", "tracestate"];
            if reserved.iter().any(|r| r.eq_ignore_ascii_case(alias))
                || outbox::header_name_problem(alias)
                    .is_some_and(|p| p != outbox::HeaderNameProblem::Reserved)
                || alias
                    .get(..outbox::RESERVED_HEADER_PREFIX.len())
                    .is_some_and(|p| p.eq_ignore_ascii_case(outbox::RESERVED_HEADER_PREFIX))
            {
                return Err(bad(
                    "names a header the relay sets itself (id, traceparent, tracestate, outbox.*) or \
                     one that is not visible ASCII; choose another alias",
                ));
            }
            if parsed
                .iter()
                .any(|p: &Placement| p.header.eq_ignore_ascii_case(alias))
            {
                return Err(bad(
                    "names a header another entry already names; each header once, or consumers \
                     cannot tell which is meant",
                ));
            }
            parsed.push(Placement {
                column: column.to_owned(),
                header: alias.to_owned(),
            });
        }
        Ok(Self {
            converter,
            expand_json_payload,
            placements: parsed,
        })
    }

    /// The record key for an `aggregateid` of the given type: under
    /// JsonConverter an integer column is a JSON number (`42`), anything
    /// else a JSON string (`"42"`), as Debezium writes them; the bytes
    /// decide the partition, so they must be the same.
    pub fn key(&self, aggregate_id: &str, integer: bool) -> Bytes {
        match self.converter {
            Converter::Json if integer => Bytes::copy_from_slice(aggregate_id.as_bytes()),
            Converter::Json => json_string(aggregate_id).into(),
            Converter::String => Bytes::copy_from_slice(aggregate_id.as_bytes()),
        }
    }

    /// The record value for the text form of a `payload` of `kind`, or
    /// why it cannot be one.
    pub fn value(&self, raw: &Bytes, kind: PayloadKind) -> std::result::Result<Bytes, String> {
        match (kind, self.converter) {
            (PayloadKind::Bytea, converter) => {
                let bytes = unhex(raw)?;
                Ok(match converter {
                    Converter::Json => json_string(&base64(&bytes)).into(),
                    Converter::String => bytes.into(),
                })
            }
            (_, Converter::String) => Ok(raw.clone()),
            (kind, Converter::Json) => {
                let text = std::str::from_utf8(raw)
                    .map_err(|_| "its `payload` is not valid UTF-8 text".to_owned())?;
                // Expanded: a json/jsonb payload is a JSON document; a text
                // one only when it parses as one (Debezium leaves others as
                // strings).
                let expand = self.expand_json_payload
                    && (kind == PayloadKind::Json
                        || serde_json::from_str::<&serde_json::value::RawValue>(text).is_ok());
                Ok(if expand {
                    raw.clone()
                } else {
                    json_string(text).into()
                })
            }
        }
    }
}

/// The W3C trace headers in a Debezium `tracingspancontext` value (a Java
/// properties text: `key=value` lines, `#` comments).
/// A key given twice keeps its last value, as Java's Properties does (and
/// a record never carries two `traceparent` headers).
pub fn span_context(text: &str) -> Vec<(String, String)> {
    let mut found: Vec<(String, String)> = Vec::new();
    let pairs = text
        .lines()
        .filter_map(|line| line.split_once('='))
        .filter(|(k, _)| matches!(k.trim(), "traceparent" | "tracestate"))
        // Java properties escape `=` and `:` in values (`congo\=t61`).
        .map(|(k, v)| {
            let v = v.trim().replace("\\=", "=").replace("\\:", ":");
            (k.trim().to_owned(), v)
        })
        .filter(|(_, v)| !v.is_empty() && v.bytes().all(|b| b.is_ascii_graphic() || b == b' '));
    for (k, v) in pairs {
        found.retain(|(seen, _)| *seen != k);
        found.push((k, v));
    }
    found
}

fn json_string(s: &str) -> Vec<u8> {
    serde_json::to_vec(s).expect("a string serializes")
}

/// PostgreSQL's hex text form of bytea (`\x0a1b...`).
fn unhex(raw: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let hex = raw.strip_prefix(b"\\x").ok_or_else(|| {
        "its bytea `payload` is not in hex form; set bytea_output = 'hex' (the default) for the \
         relay's role"
            .to_owned()
    })?;
    if hex.len() % 2 != 0 {
        return Err("its bytea `payload` has an odd number of hex digits".into());
    }
    let digit = |b: u8| -> std::result::Result<u8, String> {
        (b as char)
            .to_digit(16)
            .map(|d| d as u8)
            .ok_or_else(|| "its bytea `payload` has a character that is not a hex digit".to_owned())
    };
    hex.chunks(2)
        .map(|pair| Ok(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn values_follow_the_converter_and_the_expand_option() {
        let json = Debezium::new(Converter::Json, false, "").unwrap();
        let payload = b(r#"{"id": 1, "s": "a\"b"}"#);
        // The documentation's example: the jsonb text as a JSON string.
        assert_eq!(
            &json.value(&payload, PayloadKind::Json).unwrap()[..],
            br#""{\"id\": 1, \"s\": \"a\\\"b\"}""#
        );
        assert_eq!(&json.key("1", false)[..], br#""1""#);
        assert_eq!(&json.key("42", true)[..], b"42");
        let expanded = Debezium::new(Converter::Json, true, "").unwrap();
        assert_eq!(
            expanded.value(&payload, PayloadKind::Json).unwrap(),
            payload
        );
        // A text payload is expanded only when it is JSON.
        assert_eq!(
            expanded.value(&payload, PayloadKind::Text).unwrap(),
            payload
        );
        assert_eq!(
            &expanded.value(&b("plain"), PayloadKind::Text).unwrap()[..],
            br#""plain""#
        );
        let string = Debezium::new(Converter::String, false, "").unwrap();
        assert_eq!(string.value(&payload, PayloadKind::Json).unwrap(), payload);
        assert_eq!(&string.key("1", false)[..], b"1");
        // bytea: base64 under JsonConverter, the bytes under StringConverter.
        assert_eq!(
            &json.value(&b("\\x00ff10"), PayloadKind::Bytea).unwrap()[..],
            br#""AP8Q""#
        );
        assert_eq!(
            &string.value(&b("\\x00ff10"), PayloadKind::Bytea).unwrap()[..],
            &[0, 255, 16]
        );
        assert!(json.value(&b("\\x0"), PayloadKind::Bytea).is_err());
        assert!(json.value(&b("\\xzz"), PayloadKind::Bytea).is_err());
        assert!(json.value(&b("\\000"), PayloadKind::Bytea).is_err());
    }

    #[test]
    fn base64_matches_rfc_4648() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want, "{input}");
        }
    }

    #[test]
    fn placements_have_debeziums_shape() {
        let d = Debezium::new(
            Converter::Json,
            false,
            "type:header:eventType, tenant:header",
        )
        .unwrap();
        assert_eq!(
            d.placements,
            vec![
                Placement {
                    column: "type".into(),
                    header: "eventType".into()
                },
                Placement {
                    column: "tenant".into(),
                    header: "tenant".into()
                }
            ]
        );
        for (bad, needle) in [
            ("type", "is not column:header"),
            ("type:envelope:eventType", "only `header`"),
            ("type:partition", "only `header`"),
            ("type:somewhere", "unknown placement"),
            ("type:header:id", "sets itself"),
            ("type:header:outbox.error", "sets itself"),
            ("type:header:event type", "not visible ASCII"),
            (":header:x", "no column name"),
            ("a:header:x,b:header:X", "already names"),
        ] {
            let err = Debezium::new(Converter::Json, false, bad)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{bad}: {err}");
        }
        let err = Debezium::new(Converter::String, true, "")
            .unwrap_err()
            .to_string();
        assert!(err.contains("--expand-json-payload"), "{err}");
    }

    #[test]
    fn span_context_is_read_from_java_properties() {
        let text = "#Mon Nov 23 10:00:00 UTC 2026\ntraceparent=00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\ntracestate=congo\\=t61rcWkgMzE\nother=x\n";
        let got = span_context(text);
        assert_eq!(got[0].0, "traceparent");
        assert_eq!(
            got[0].1,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        assert_eq!(
            got[1],
            ("tracestate".to_owned(), "congo=t61rcWkgMzE".to_owned())
        );
        assert_eq!(got.len(), 2);
        assert!(span_context("garbage\nno equals").is_empty());
        let twice = span_context("traceparent=00-a\ntraceparent=00-b\n");
        assert_eq!(twice, vec![("traceparent".to_owned(), "00-b".to_owned())]);
    }
}
