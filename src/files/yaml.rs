//! Walking a parsed YAML config while recording every key the walk did not consume, so nothing
//! in a foreign config is ignored silently.

use serde_yaml::{Mapping, Value};

/// A mapping being consumed; keys left over at `finish` are reported under `path`.
pub struct Fields {
    path: String,
    map: Mapping,
}

impl Fields {
    /// `None` (and a report) when `value` is not a mapping.
    pub fn of(
        path: impl Into<String>,
        value: Value,
        unsupported: &mut Vec<String>,
    ) -> Option<Self> {
        let path = path.into();
        match value {
            Value::Mapping(map) => Some(Fields { path, map }),
            Value::Null => Some(Fields {
                path,
                map: Mapping::new(),
            }),
            other => {
                unsupported.push(format!(
                    "{path}: expected a mapping, found {}",
                    kind(&other)
                ));
                None
            }
        }
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// The path of a key below this mapping.
    pub fn at(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// Removes and returns a key; an explicit `null` counts as absent.
    pub fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key).filter(|v| !v.is_null())
    }

    /// A scalar as text (numbers and booleans too, as YAML users write `api_version: 2024-01-01`).
    pub fn take_str(&mut self, key: &str, unsupported: &mut Vec<String>) -> Option<String> {
        let value = self.take(key)?;
        let path = self.at(key);
        scalar(&path, value, unsupported)
    }

    pub fn take_u64(&mut self, key: &str, unsupported: &mut Vec<String>) -> Option<u64> {
        let value = self.take(key)?;
        match &value {
            Value::Number(n) if n.as_u64().is_some_and(|n| n > 0) => n.as_u64(),
            Value::String(s) if s.trim().parse::<u64>().is_ok_and(|n| n > 0) => {
                s.trim().parse().ok()
            }
            other => {
                unsupported.push(format!(
                    "{}: expected a positive whole number, found {}",
                    self.at(key),
                    kind(other)
                ));
                None
            }
        }
    }

    pub fn take_map(&mut self, key: &str, unsupported: &mut Vec<String>) -> Option<Fields> {
        let value = self.take(key)?;
        Fields::of(self.at(key), value, unsupported)
    }

    /// Keys nobody took, as `path.key` entries.
    pub fn leftover_keys(&self) -> Vec<String> {
        self.map
            .keys()
            .map(|k| match k {
                Value::String(s) => self.at(s),
                other => self.at(&format!("{other:?}")),
            })
            .collect()
    }

    /// Reports every key nobody took.
    pub fn finish(self, unsupported: &mut Vec<String>) {
        for key in self.leftover_keys() {
            unsupported.push(format!("{key}: not supported"));
        }
    }
}

pub fn scalar(path: &str, value: Value, unsupported: &mut Vec<String>) -> Option<String> {
    match value {
        Value::String(s) => Some(s),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        other => {
            unsupported.push(format!("{path}: expected text, found {}", kind(&other)));
            None
        }
    }
}

/// The kind of a value, for messages that must not echo the value itself (it may be a key).
pub fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "text",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}
