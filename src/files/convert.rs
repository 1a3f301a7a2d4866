//! What the MLflow and LiteLLM converters produce: typed Routes plus plans for the Secrets they
//! reference, whose values stay where the foreign config put them (an environment variable, a
//! file, or the config itself) until `serve` resolves them or `import` prints them.

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::api::Route;

/// Where a credential's value comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyRef {
    /// `$NAME` (MLflow) or `os.environ/NAME` (LiteLLM).
    Env(String),
    /// MLflow reads a key field that names an existing file from that file.
    File(PathBuf),
    /// The key written in the config itself.
    Literal(String),
    /// `$NAME` or `os.environ/NAME` where NAME is not `[A-Za-z_][A-Za-z0-9_]*`. Never echoed: it
    /// would land in YAML comments and a suggested shell command.
    BadEnvName,
}

/// An environment variable name as shells take it: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn env(name: &str) -> KeyRef {
    if is_env_name(name) {
        KeyRef::Env(name.to_string())
    } else {
        KeyRef::BadEnvName
    }
}

impl KeyRef {
    /// The value, or why it cannot be had; the error never contains the value.
    pub fn resolve(&self) -> Result<String, String> {
        match self {
            KeyRef::Env(name) => match std::env::var(name) {
                Ok(v) if !v.trim().is_empty() => Ok(v),
                Ok(_) => Err(format!("the environment variable ${name} is empty")),
                Err(_) => Err(format!("the environment variable ${name} is not set")),
            },
            KeyRef::File(path) => std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read the key file {}: {e}", path.display())),
            KeyRef::Literal(v) => Ok(v.clone()),
            KeyRef::BadEnvName => Err(BAD_ENV_NAME.to_string()),
        }
    }

    /// Where the value comes from, for comments and messages.
    pub fn describe(&self) -> String {
        match self {
            KeyRef::Env(name) => format!("${name}"),
            KeyRef::File(path) => format!("the file {}", path.display()),
            KeyRef::Literal(_) => "a key written in the config".to_string(),
            KeyRef::BadEnvName => "an invalid environment variable name".to_string(),
        }
    }

    /// MLflow's rules for an API-key field: `$NAME`, else an existing file's path, else the key.
    pub fn mlflow(value: &str) -> KeyRef {
        if let Some(name) = value.strip_prefix('$') {
            env(name.trim_matches(|c| c == '{' || c == '}'))
        } else if !value.contains(char::is_control) && std::path::Path::new(value).is_file() {
            KeyRef::File(PathBuf::from(value))
        } else {
            KeyRef::Literal(value.to_string())
        }
    }

    /// LiteLLM's rule: `os.environ/NAME`, else the key.
    pub fn litellm(value: &str) -> KeyRef {
        match value.strip_prefix("os.environ/") {
            Some(name) => env(name),
            None => KeyRef::Literal(value.to_string()),
        }
    }
}

const BAD_ENV_NAME: &str =
    "the config names an environment variable that is not [A-Za-z_][A-Za-z0-9_]*";

/// A Secret a converted Route references: its name and where each key's value comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretPlan {
    pub name: String,
    pub data: BTreeMap<String, KeyRef>,
}

/// The result of converting one foreign config.
#[derive(Debug, Default)]
pub struct Converted {
    /// Routes in config order, each with the entry it came from (for example `endpoints[2]`).
    pub routes: Vec<(String, Route)>,
    pub secrets: Vec<SecretPlan>,
    /// Keys or values that cannot be carried over, each naming its path in the config.
    pub unsupported: Vec<String>,
    /// Per Route name: what the manifest's comment must say was not carried over, or renamed.
    pub comments: BTreeMap<String, Vec<String>>,
}

impl Converted {
    /// Adds a Secret plan and returns its name: plans with the same data share one Secret (one
    /// Secret per environment variable), and a different plan never takes an existing name.
    pub fn add_secret(&mut self, preferred: &str, data: BTreeMap<String, KeyRef>) -> String {
        if let Some(same) = self.secrets.iter().find(|s| s.data == data) {
            return same.name.clone();
        }
        let base = k8s_name(preferred);
        let mut name = base.clone();
        let mut n = 2;
        while self.secrets.iter().any(|s| s.name == name) {
            name = format!("{base}-{n}");
            n += 1;
        }
        self.secrets.push(SecretPlan {
            name: name.clone(),
            data,
        });
        name
    }

    /// The Secret for one credential: named after its environment variable when it has one.
    pub fn add_key_secret(&mut self, route: &str, secret_key: &str, key: KeyRef) -> String {
        let preferred = match &key {
            KeyRef::Env(var) => var.clone(),
            _ => format!("{route}-credentials"),
        };
        self.add_secret(&preferred, BTreeMap::from([(secret_key.to_string(), key)]))
    }

    pub fn comment(&mut self, route: &str, text: String) {
        self.comments
            .entry(route.to_string())
            .or_default()
            .push(text);
    }
}

/// A Kubernetes object name (DNS-1123 subdomain) made from a foreign name: lower case, anything
/// else than letters, digits, `-` and `.` becomes `-`, at most 253 characters, alphanumeric ends.
pub fn k8s_name(raw: &str) -> String {
    let mapped: String = raw
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '-' | '.') => c,
            _ => '-',
        })
        .collect();
    let trimmed: String = mapped
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .chars()
        .take(253)
        .collect();
    let trimmed = trimmed.trim_end_matches(|c: char| !c.is_ascii_alphanumeric());
    if trimmed.is_empty() {
        "unnamed".to_string()
    } else {
        trimmed.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_kubernetes_names() {
        assert_eq!(k8s_name("OPENAI_API_KEY"), "openai-api-key");
        assert_eq!(k8s_name("Chat_V2"), "chat-v2");
        assert_eq!(k8s_name("openai/gpt-4o"), "openai-gpt-4o");
        assert_eq!(k8s_name("claude-3.5-sonnet"), "claude-3.5-sonnet");
        assert_eq!(k8s_name("_x_"), "x");
        assert_eq!(k8s_name("__"), "unnamed");
    }

    #[test]
    fn key_references() {
        assert_eq!(
            KeyRef::mlflow("$OPENAI_API_KEY"),
            KeyRef::Env("OPENAI_API_KEY".into())
        );
        assert_eq!(
            KeyRef::mlflow("${OPENAI_API_KEY}"),
            KeyRef::Env("OPENAI_API_KEY".into())
        );
        assert_eq!(KeyRef::mlflow("sk-1"), KeyRef::Literal("sk-1".into()));
        assert_eq!(
            KeyRef::litellm("os.environ/AZURE_KEY"),
            KeyRef::Env("AZURE_KEY".into())
        );
        let err = KeyRef::Env("PORTCULLIS_SURELY_UNSET_VAR".into())
            .resolve()
            .unwrap_err();
        assert!(
            err.contains("$PORTCULLIS_SURELY_UNSET_VAR is not set"),
            "{err}"
        );
    }

    #[test]
    fn an_existing_file_path_is_read_as_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("openai.key");
        std::fs::write(&path, "sk-from-file").unwrap();
        let key = KeyRef::mlflow(path.to_str().unwrap());
        assert_eq!(key, KeyRef::File(path.clone()));
        assert_eq!(key.resolve().unwrap(), "sk-from-file");
        std::fs::remove_file(&path).unwrap();
        let err = key.resolve().unwrap_err();
        assert!(err.contains("cannot read the key file"), "{err}");
    }

    #[test]
    fn secrets_are_shared_per_variable_and_never_clash() {
        let mut c = Converted::default();
        let a = c.add_key_secret("chat", "apiKey", KeyRef::Env("OPENAI_API_KEY".into()));
        let b = c.add_key_secret(
            "completions",
            "apiKey",
            KeyRef::Env("OPENAI_API_KEY".into()),
        );
        assert_eq!(
            (a.as_str(), b.as_str()),
            ("openai-api-key", "openai-api-key")
        );
        let d = c.add_secret(
            "openai-api-key",
            BTreeMap::from([("apiKey".into(), KeyRef::Literal("x".into()))]),
        );
        assert_eq!(d, "openai-api-key-2");
        assert_eq!(c.secrets.len(), 2);
    }
}
