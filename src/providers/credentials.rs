use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, OnceLock};

use http::HeaderValue;

/// A credential value. Its `Debug` and `Display` print a redaction, so it cannot leak through logs.
#[derive(Clone)]
pub struct SecretValue(Arc<Secret>);

struct Secret {
    value: Box<str>,
    /// `Bearer <value>` as a sensitive header value, made on first use and shared by every call
    /// after it (the OpenAI family sends it on each request).
    bearer: OnceLock<Option<HeaderValue>>,
}

impl SecretValue {
    pub fn new(value: impl AsRef<str>) -> Self {
        SecretValue(Arc::new(Secret {
            value: value.as_ref().into(),
            bearer: OnceLock::new(),
        }))
    }

    /// The raw value, for the outgoing request only.
    pub fn expose(&self) -> &str {
        &self.0.value
    }

    /// `Authorization: Bearer <value>`; `None` when the value holds characters a header cannot.
    pub fn bearer(&self) -> Option<HeaderValue> {
        self.0
            .bearer
            .get_or_init(|| {
                let mut v = HeaderValue::try_from(format!("Bearer {}", self.0.value)).ok()?;
                v.set_sensitive(true);
                Some(v)
            })
            .clone()
    }
}

impl PartialEq for SecretValue {
    fn eq(&self, other: &Self) -> bool {
        self.0.value == other.0.value
    }
}

impl Eq for SecretValue {}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl fmt::Display for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[REDACTED]")
    }
}

/// The credential values of one route, by key name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Credentials(BTreeMap<String, SecretValue>);

impl Credentials {
    pub fn insert(&mut self, key: impl Into<String>, value: SecretValue) {
        self.0.insert(key.into(), value);
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(SecretValue::expose)
    }

    pub fn secret(&self, key: &str) -> Option<&SecretValue> {
        self.0.get(key)
    }

    /// Replaces every credential value (and any long fragment of one) in `text` with a redaction.
    /// Upstream error messages sometimes echo a key, in full or in part.
    pub fn redact(&self, text: &str) -> String {
        const FRAGMENT: usize = 8;
        let mut out = text.to_string();
        for secret in self.0.values().map(SecretValue::expose) {
            if secret.is_empty() {
                continue;
            }
            out = out.replace(secret, "[REDACTED]");
            if secret.len() >= FRAGMENT && secret.is_char_boundary(FRAGMENT) {
                let leaks = |word: &str| {
                    secret
                        .as_bytes()
                        .windows(FRAGMENT)
                        .any(|w| word.as_bytes().windows(FRAGMENT).any(|x| x == w))
                };
                if out.split_whitespace().any(&leaks) {
                    out = out
                        .split(' ')
                        .map(|w| if leaks(w) { "[REDACTED]" } else { w })
                        .collect::<Vec<_>>()
                        .join(" ");
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_never_show_the_value() {
        let mut c = Credentials::default();
        c.insert("apiKey", SecretValue::new("sk-very-secret-value"));
        assert!(!format!("{c:?}").contains("very-secret"));
        assert!(!format!("{}", SecretValue::new("sk-very-secret-value")).contains("secret"));
    }

    #[test]
    fn redacts_whole_and_partial_echoes() {
        let mut c = Credentials::default();
        c.insert("apiKey", SecretValue::new("sk-abcdefghijklmnop"));
        assert_eq!(
            c.redact("bad key sk-abcdefghijklmnop here"),
            "bad key [REDACTED] here"
        );
        assert_eq!(
            c.redact("Incorrect API key provided: sk-abcdefgh****mnop."),
            "Incorrect API key provided: [REDACTED]"
        );
        assert_eq!(c.redact("nothing to see"), "nothing to see");
    }
}
