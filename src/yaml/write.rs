//! The writer: every manifest the project prints (`crds/`, `portcullis crd`, `portcullis import`)
//! goes through `to_string`, which quotes any text that a YAML 1.1 or 1.2 reader could take for
//! something else, so a key or value means the same to every reader.

use serde::Serialize;
use serde_json::Value;
use std::fmt::Write;

/// Block-style YAML of any serialisable value (a multi-document stream is the caller's `---`).
pub fn to_string<T: Serialize>(value: &T) -> Result<String, serde_json::Error> {
    let value = serde_json::to_value(value)?;
    let mut out = String::new();
    match &value {
        Value::Object(map) if !map.is_empty() => mapping(&mut out, map, 0, false),
        Value::Array(items) if !items.is_empty() => sequence(&mut out, items, 0),
        scalar => {
            inline(&mut out, scalar, 0);
            out.push('\n');
        }
    }
    Ok(out)
}

fn indent(out: &mut String, level: usize) {
    out.extend(std::iter::repeat_n(' ', level));
}

/// A block mapping at `level`; `inline_first` when its first key continues a `- ` line.
fn mapping(
    out: &mut String,
    map: &serde_json::Map<String, Value>,
    level: usize,
    inline_first: bool,
) {
    for (i, (key, value)) in map.iter().enumerate() {
        if i > 0 || !inline_first {
            indent(out, level);
        }
        key_text(out, key);
        out.push(':');
        child(out, value, level);
    }
}

fn sequence(out: &mut String, items: &[Value], level: usize) {
    for item in items {
        indent(out, level);
        out.push('-');
        match item {
            // The first key shares the dash's line; the rest align under it.
            Value::Object(map) if !map.is_empty() => {
                out.push(' ');
                mapping(out, map, level + 2, true);
            }
            Value::Array(inner) if !inner.is_empty() => {
                out.push('\n');
                sequence(out, inner, level + 2);
            }
            scalar => {
                out.push(' ');
                inline(out, scalar, level + 2);
                out.push('\n');
            }
        }
    }
}

/// What follows `key:` on its line, and the lines below it.
fn child(out: &mut String, value: &Value, level: usize) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            out.push('\n');
            mapping(out, map, level + 2, false);
        }
        // Sequences under a key at the key's own indentation, as kubectl and kustomize write them.
        Value::Array(items) if !items.is_empty() => {
            out.push('\n');
            sequence(out, items, level);
        }
        scalar => {
            out.push(' ');
            inline(out, scalar, level + 2);
            out.push('\n');
        }
    }
}

fn inline(out: &mut String, value: &Value, level: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            let _ = write!(out, "{n}");
        }
        Value::String(s) => text(out, s, level),
        Value::Array(_) => out.push_str("[]"),
        Value::Object(_) => out.push_str("{}"),
    }
}

fn key_text(out: &mut String, key: &str) {
    if plain_is_safe(key) {
        out.push_str(key);
    } else {
        double_quoted(out, key);
    }
}

/// JSON's string escapes are YAML's; YAML also breaks lines at NEL, U+2028 and U+2029, which
/// JSON leaves raw, and a byte-order mark may not stand inside: those are escaped as `\u`.
fn double_quoted(out: &mut String, s: &str) {
    let json = Value::String(s.to_string()).to_string();
    for c in json.chars() {
        match c {
            '\u{85}' | '\u{2028}' | '\u{2029}' | '\u{feff}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
}

/// A string plain when no YAML 1.1 or 1.2 reader could take it for anything but this text, as a
/// literal block when it spans lines, else double-quoted (JSON's escapes are YAML's).
fn text(out: &mut String, s: &str, level: usize) {
    if plain_is_safe(s) {
        out.push_str(s);
    } else if let Some(body) = literal_block(s) {
        out.push_str(if s.ends_with('\n') { "|" } else { "|-" });
        for line in body.split('\n') {
            out.push('\n');
            if !line.is_empty() {
                indent(out, level);
                out.push_str(line);
            }
        }
    } else {
        double_quoted(out, s);
    }
}

/// The lines of a string a literal block (`|`, `|-`) reproduces exactly, if it is one.
fn literal_block(s: &str) -> Option<&str> {
    let body = s.strip_suffix('\n').unwrap_or(s);
    let printable = body.chars().all(|c| {
        c == '\n'
            || c == '\t'
            || !(c.is_control() || matches!(c, '\u{85}' | '\u{2028}' | '\u{2029}' | '\u{feff}'))
    });
    let ok = body.contains('\n')
        && printable
        && !body.ends_with('\n')
        && !body.starts_with([' ', '\t', '\n'])
        && body.split('\n').all(|line| !line.ends_with([' ', '\t']));
    ok.then_some(body)
}

/// Words YAML 1.1 (kubectl, PyYAML) or 1.2 resolve to booleans or null, in any case.
const RESERVED: &[&str] = &[
    "y", "n", "yes", "no", "on", "off", "true", "false", "null", "~", "=", "<<",
];

fn plain_is_safe(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    if RESERVED.iter().any(|w| s.eq_ignore_ascii_case(w)) {
        return false;
    }
    // Numbers, timestamps, base-60 values, `.inf`/`.nan` and every indicator start with one of
    // these; quoting all of them is simpler than telling the harmless ones apart.
    if first.is_ascii_digit() || !(first.is_alphabetic() || first == '_' || first == '/') {
        return false;
    }
    if s.ends_with([' ', ':']) || s.contains(": ") || s.contains(" #") {
        return false;
    }
    // Past the first character every printable character is plain text in block context, except
    // the line breaks YAML 1.1 adds (NEL, U+2028, U+2029) and a byte-order mark.
    s.chars()
        .all(|c| !c.is_control() && !matches!(c, '\u{85}' | '\u{2028}' | '\u{2029}' | '\u{feff}'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn words_yaml_1_1_reads_as_booleans_are_quoted() {
        for word in [
            "on", "On", "OFF", "y", "N", "yes", "No", "true", "null", "~",
        ] {
            let out = to_string(&json!({ word: word })).unwrap();
            assert_eq!(out, format!("\"{word}\": \"{word}\"\n"));
        }
    }

    #[test]
    fn numbers_and_timestamps_in_text_are_quoted() {
        for s in [
            "1e3",
            "0777",
            "1_000",
            "2024-10-21",
            "12:30",
            ".5",
            "+1",
            "-1",
            ".inf",
        ] {
            let out = to_string(&json!({ "v": s })).unwrap();
            assert_eq!(out, format!("v: \"{s}\"\n"), "{s}");
        }
    }

    #[test]
    fn ordinary_text_stays_plain() {
        let out =
            to_string(&json!({"name": "gpt-4o-mini", "path": "/v1/chat", "d": "Task type served"}))
                .unwrap();
        assert_eq!(
            out,
            "d: Task type served\nname: gpt-4o-mini\npath: /v1/chat\n"
        );
    }

    #[test]
    fn indicators_and_control_characters_are_quoted() {
        for s in [
            "- x",
            "a: b",
            "a #b",
            "#x",
            "*x",
            "&x",
            "!x",
            "|",
            ">",
            "'x",
            "\"x",
            "{x}",
            "x ",
            "",
            "a\u{7}",
            "a:",
            "a\u{2028}b",
        ] {
            let out = to_string(&json!({ "v": s })).unwrap();
            assert!(out.starts_with("v: \""), "{s:?} -> {out}");
        }
    }

    #[test]
    fn nested_shapes_round_trip_through_serde_yaml() {
        let value = json!({
            "spec": {
                "retry": {"retryOn": ["rate-limited", "on"], "attempts": 3},
                "backends": [{"provider": "openai", "weight": 0}, {"x": [1, [2, 3], {}], "e": []}],
                "description": "line one\nline two: with colon\n",
                "tricky": "  leading space\nx",
                "unicode": "café ☕",
            },
            "list": [[], {}, null, true, 1.5],
        });
        let out = to_string(&value).unwrap();
        assert_eq!(both_readings(&out), (value.clone(), value), "{out}");
        assert!(
            out.contains("description: |\n    line one\n    line two: with colon\n"),
            "{out}"
        );
    }

    /// What serde_yaml (YAML 1.2) and kubectl (YAML 1.1) each read from `text`.
    fn both_readings(text: &str) -> (Value, Value) {
        let v12: Value = serde_yaml::from_str(text).unwrap();
        let docs = crate::yaml::documents(text).unwrap();
        let v11 = serde_json::to_value(&docs[0]).unwrap();
        (v12, v11)
    }

    proptest::proptest! {
        /// Any text, as a key or a value, reads back as itself under either YAML version.
        #[test]
        fn any_text_means_itself_to_both_readers(key in "\\PC{0,12}", text in "(\\PC|\n){0,40}", word in "(on|off|y|n|yes|no|0[0-7]{1,3}|[0-9]{1,4}-[0-9]{1,2}-[0-9]{1,2}|[0-9e._+-]{1,6})") {
            let value = json!({ key: [text, word.clone()], "w": word });
            let out = to_string(&value).unwrap();
            let (v12, v11) = both_readings(&out);
            proptest::prop_assert_eq!(&v12, &value, "{}", out);
            proptest::prop_assert_eq!(&v11, &value, "{}", out);
        }
    }
}
