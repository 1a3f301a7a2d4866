//! The reader: manifests as `kubectl apply` sends them. Plain scalars resolve by go-yaml v2's
//! rules (YAML 1.1: `on`/`yes`/`y` booleans, `0777` octal, unquoted dates as timestamps), keys
//! become strings as sigs.k8s.io/yaml makes them, and the result is what the API server would get.

use std::collections::HashMap;

use serde_yaml::{Mapping, Number, Value};
use yaml_rust2::parser::{Event, Parser, Tag};
use yaml_rust2::scanner::TScalarStyle;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Syntax(String),
    #[error("mapping key {0:?} already defined")]
    DuplicateKey(String),
    #[error("{0:?} is not representable in JSON")]
    NotJson(String),
    #[error("alias to an unknown anchor")]
    UnknownAnchor,
    #[error("nesting deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

/// Past this, a document is refused rather than walked (kubectl's own limit is far lower in practice).
const MAX_DEPTH: usize = 256;

/// Every document of a multi-document stream; empty documents are `Value::Null`.
pub fn documents(text: &str) -> Result<Vec<Value>, ReadError> {
    let mut reader = Reader {
        parser: Parser::new_from_str(text),
        anchors: HashMap::new(),
    };
    let mut docs = Vec::new();
    loop {
        match reader.next()? {
            Event::StreamEnd => return Ok(docs),
            Event::DocumentStart => {
                let event = reader.next()?;
                let value = match event {
                    Event::DocumentEnd => Value::Null,
                    event => {
                        let value = reader.node(event, 0)?;
                        reader.expect_document_end()?;
                        value
                    }
                };
                docs.push(value);
            }
            _ => {}
        }
    }
}

struct Reader<'a> {
    parser: Parser<std::str::Chars<'a>>,
    anchors: HashMap<usize, Value>,
}

impl Reader<'_> {
    fn next(&mut self) -> Result<Event, ReadError> {
        self.parser
            .next_token()
            .map(|(event, _)| event)
            .map_err(|e| ReadError::Syntax(e.to_string()))
    }

    fn expect_document_end(&mut self) -> Result<(), ReadError> {
        match self.next()? {
            Event::DocumentEnd => Ok(()),
            other => Err(ReadError::Syntax(format!(
                "expected the end of the document, found {other:?}"
            ))),
        }
    }

    fn node(&mut self, event: Event, depth: usize) -> Result<Value, ReadError> {
        if depth > MAX_DEPTH {
            return Err(ReadError::TooDeep);
        }
        let (value, anchor) = match event {
            Event::Alias(id) => {
                return self
                    .anchors
                    .get(&id)
                    .cloned()
                    .ok_or(ReadError::UnknownAnchor);
            }
            Event::Scalar(text, style, anchor, tag) => (scalar(text, style, tag.as_ref())?, anchor),
            Event::SequenceStart(anchor, _) => {
                let mut items = Vec::new();
                loop {
                    match self.next()? {
                        Event::SequenceEnd => break,
                        event => items.push(self.node(event, depth + 1)?),
                    }
                }
                (Value::Sequence(items), anchor)
            }
            Event::MappingStart(anchor, _) => (self.mapping(depth)?, anchor),
            other => {
                return Err(ReadError::Syntax(format!("unexpected {other:?}")));
            }
        };
        if anchor > 0 {
            self.anchors.insert(anchor, value.clone());
        }
        Ok(value)
    }

    fn mapping(&mut self, depth: usize) -> Result<Value, ReadError> {
        let mut map = Mapping::new();
        // `<<` merges: the mapping's own keys win, then earlier merged mappings over later ones.
        let mut merged: Vec<Mapping> = Vec::new();
        loop {
            let (key, merge) = match self.next()? {
                Event::MappingEnd => break,
                // Only a plain `<<` merges; a quoted one is an ordinary key.
                event => {
                    let merge = matches!(&event, Event::Scalar(t, TScalarStyle::Plain, _, None) if t == "<<");
                    (self.node(event, depth + 1)?, merge)
                }
            };
            let event = self.next()?;
            let value = self.node(event, depth + 1)?;
            if merge {
                match value {
                    Value::Mapping(m) => merged.push(m),
                    Value::Sequence(items) => {
                        merged.extend(items.into_iter().filter_map(|v| match v {
                            Value::Mapping(m) => Some(m),
                            _ => None,
                        }))
                    }
                    _ => {
                        return Err(ReadError::Syntax(
                            "<< takes a mapping or a list of them".into(),
                        ));
                    }
                }
                continue;
            }
            let key = Value::String(key_text(key)?);
            if map.contains_key(&key) {
                return Err(ReadError::DuplicateKey(
                    key.as_str().unwrap_or_default().into(),
                ));
            }
            map.insert(key, value);
        }
        for m in merged {
            for (k, v) in m {
                if !map.contains_key(&k) {
                    map.insert(k, v);
                }
            }
        }
        Ok(Value::Mapping(map))
    }
}

/// A key as sigs.k8s.io/yaml writes it into JSON.
fn key_text(key: Value) -> Result<String, ReadError> {
    Ok(match key {
        Value::String(s) => s,
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Null => "null".into(),
        other => {
            return Err(ReadError::Syntax(format!(
                "a key must be a scalar, found {other:?}"
            )));
        }
    })
}

fn scalar(text: String, style: TScalarStyle, tag: Option<&Tag>) -> Result<Value, ReadError> {
    let tag = tag
        .filter(|t| t.handle == "!!" || t.handle == "tag:yaml.org,2002:")
        .map(|t| t.suffix.as_str());
    match (style, tag) {
        (_, Some("str")) => Ok(Value::String(text)),
        (TScalarStyle::Plain, _) | (_, Some("int" | "float" | "bool" | "null" | "timestamp")) => {
            resolve(text)
        }
        _ => Ok(Value::String(text)),
    }
}

/// go-yaml v2's resolution of a plain scalar.
fn resolve(text: String) -> Result<Value, ReadError> {
    match text.as_str() {
        "" | "~" | "null" | "Null" | "NULL" => return Ok(Value::Null),
        "y" | "Y" | "yes" | "Yes" | "YES" | "true" | "True" | "TRUE" | "on" | "On" | "ON" => {
            return Ok(Value::Bool(true));
        }
        "n" | "N" | "no" | "No" | "NO" | "false" | "False" | "FALSE" | "off" | "Off" | "OFF" => {
            return Ok(Value::Bool(false));
        }
        ".inf" | ".Inf" | ".INF" | "+.inf" | "+.Inf" | "+.INF" | "-.inf" | "-.Inf" | "-.INF"
        | ".nan" | ".NaN" | ".NAN" => return Err(ReadError::NotJson(text)),
        _ => {}
    }
    let first = text.as_bytes()[0];
    if !(first.is_ascii_digit() || matches!(first, b'+' | b'-' | b'.')) {
        return Ok(Value::String(text));
    }
    if let Some(stamp) = timestamp(&text) {
        return Ok(Value::String(stamp));
    }
    let plain = text.replace('_', "");
    if let Some(n) = integer(&plain) {
        return Ok(Value::Number(n));
    }
    if yaml_style_float(&plain)
        && let Ok(f) = plain.parse::<f64>()
    {
        return Ok(Value::Number(Number::from(f)));
    }
    Ok(Value::String(text))
}

/// Go's `strconv.ParseInt(s, 0, 64)`, then `ParseUint`: a sign, then `0x`, `0o`, `0b` or a
/// leading `0` (octal) choose the base.
fn integer(s: &str) -> Option<Number> {
    let (negative, digits) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let lower = digits.to_ascii_lowercase();
    let (radix, body) = if let Some(rest) = lower.strip_prefix("0x") {
        (16, rest)
    } else if let Some(rest) = lower.strip_prefix("0o") {
        (8, rest)
    } else if let Some(rest) = lower.strip_prefix("0b") {
        (2, rest)
    } else if lower.len() > 1 && lower.starts_with('0') {
        (8, &lower[1..])
    } else {
        (10, lower.as_str())
    };
    if body.is_empty() || body.starts_with(['+', '-']) {
        return None;
    }
    let magnitude = u64::from_str_radix(body, radix).ok()?;
    if negative {
        let n = i64::try_from(magnitude)
            .map(|m| -m)
            .ok()
            .or((magnitude == 1 << 63).then_some(i64::MIN))?;
        Some(Number::from(n))
    } else {
        Some(Number::from(magnitude))
    }
}

/// `^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$`
fn yaml_style_float(s: &str) -> bool {
    let s = s.strip_prefix(['+', '-']).unwrap_or(s);
    let (mantissa, exponent) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    let mantissa_ok = match mantissa.split_once('.') {
        Some(("", frac)) => digits(frac),
        Some((int, frac)) => digits(int) && (frac.is_empty() || digits(frac)),
        None => digits(mantissa),
    };
    let exponent_ok = exponent.is_none_or(|e| digits(e.strip_prefix(['+', '-']).unwrap_or(e)));
    mantissa_ok && exponent_ok
}

/// go-yaml v2's timestamps (`2006-1-2`, with `T`, `t` or a space and a time, optionally a zone),
/// as Go's JSON encoding of the time writes them: RFC 3339, UTC as `Z`.
fn timestamp(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let num = |from: usize, min: usize, max: usize| -> Option<(u32, usize)> {
        let len = b[from..].iter().take_while(|c| c.is_ascii_digit()).count();
        if len < min || len > max {
            return None;
        }
        Some((s[from..from + len].parse().ok()?, from + len))
    };
    let (year, i) = num(0, 4, 4)?;
    let (month, i) = (b.get(i) == Some(&b'-')).then(|| num(i + 1, 1, 2))??;
    let (day, i) = (b.get(i) == Some(&b'-')).then(|| num(i + 1, 1, 2))??;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return None;
    }
    let date = format!("{year:04}-{month:02}-{day:02}");
    if i == b.len() {
        return Some(format!("{date}T00:00:00Z"));
    }
    if !matches!(b[i], b'T' | b't' | b' ') {
        return None;
    }
    let (hour, j) = num(i + 1, 1, 2)?;
    let (minute, j) = (b.get(j) == Some(&b':')).then(|| num(j + 1, 1, 2))??;
    let (second, mut j) = (b.get(j) == Some(&b':')).then(|| num(j + 1, 1, 2))??;
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut fraction = String::new();
    if b.get(j) == Some(&b'.') {
        let len = b[j + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        if len == 0 || len > 9 {
            return None;
        }
        fraction = s[j + 1..j + 1 + len].trim_end_matches('0').to_string();
        j += 1 + len;
    }
    let zone = match &s[j..] {
        "" | "Z" => "Z".to_string(),
        z if z.len() == 6
            && z.starts_with(['+', '-'])
            && z.as_bytes()[3] == b':'
            && z[1..3]
                .bytes()
                .chain(z[4..].bytes())
                .all(|c| c.is_ascii_digit()) =>
        {
            if &z[1..] == "00:00" {
                "Z".to_string()
            } else {
                z.to_string()
            }
        }
        _ => return None,
    };
    let fraction = if fraction.is_empty() {
        String::new()
    } else {
        format!(".{fraction}")
    };
    Some(format!(
        "{date}T{hour:02}:{minute:02}:{second:02}{fraction}{zone}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(text: &str) -> serde_json::Value {
        let docs = documents(text).unwrap();
        serde_json::to_value(&docs[0]).unwrap()
    }

    #[test]
    fn yaml_1_1_words_are_booleans_and_keys_become_their_text() {
        let v = json("retry:\n  on: [rate-limited]\nflags: {a: yes, b: Off, c: 'on', d: y}\n");
        assert_eq!(
            v,
            serde_json::json!({"retry": {"true": ["rate-limited"]}, "flags": {"a": true, "b": false, "c": "on", "d": true}})
        );
    }

    #[test]
    fn numbers_dates_and_quoted_text() {
        let v = json(
            "a: 0777\nb: 0x1F\nc: 1_000\nd: 1e3\ne: 1.5\nf: \"0777\"\ng: 2024-10-21\nh: 2024-1-2 3:04:05.120\ni: 12:30\nj: -0b11\nk: v1\nl: 1.2.3\nm: 18446744073709551615\n",
        );
        assert_eq!(
            v,
            serde_json::json!({
                "a": 511, "b": 31, "c": 1000, "d": 1000.0, "e": 1.5, "f": "0777",
                "g": "2024-10-21T00:00:00Z", "h": "2024-01-02T03:04:05.12Z", "i": "12:30",
                "j": -3, "k": "v1", "l": "1.2.3", "m": 18446744073709551615u64
            })
        );
    }

    #[test]
    fn anchors_merges_tags_and_several_documents() {
        let docs = documents(
            "base: &b {p: 1, q: 2}\nuse:\n  <<: *b\n  q: 3\nt: !!str on\n---\n---\nlast: ~\n",
        )
        .unwrap();
        assert_eq!(docs.len(), 3);
        assert_eq!(
            serde_json::to_value(&docs[0]).unwrap(),
            serde_json::json!({"base": {"p": 1, "q": 2}, "use": {"p": 1, "q": 3}, "t": "on"})
        );
        assert!(docs[1].is_null());
        assert_eq!(
            serde_json::to_value(&docs[2]).unwrap(),
            serde_json::json!({"last": null})
        );
    }

    #[test]
    fn only_a_plain_merge_key_merges() {
        assert_eq!(json("\"<<\": [a]\n"), serde_json::json!({"<<": ["a"]}));
        assert_eq!(
            json("<<: {a: 1}\nb: 2\n"),
            serde_json::json!({"a": 1, "b": 2})
        );
    }

    #[test]
    fn refusals() {
        assert!(matches!(documents("a: 1\na: 2\n"), Err(ReadError::DuplicateKey(k)) if k == "a"));
        assert!(matches!(documents("a: .inf\n"), Err(ReadError::NotJson(_))));
        assert!(matches!(documents("a: [\n"), Err(ReadError::Syntax(_))));
        let deep = "[".repeat(MAX_DEPTH + 10) + &"]".repeat(MAX_DEPTH + 10);
        assert!(documents(&deep).is_err());
    }
}
