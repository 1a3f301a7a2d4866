//! One file into objects: manifests or an MLflow gateway config, told apart by their content.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use serde::Deserialize;
use serde_yaml::Value;

use super::manifests::{self, Object};
use super::mlflow;
use crate::api::Route;

/// Config files larger than this are refused (a config is text a person edits).
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// Where an object came from: the file, the YAML document (1-based) and, in an MLflow config,
/// the entry (`endpoints[2]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    pub document: usize,
    pub entry: Option<String>,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.entry {
            Some(entry) => write!(f, "{} {entry}", self.file.display()),
            None => write!(f, "{} document {}", self.file.display(), self.document),
        }
    }
}

/// A document or entry left out, and why.
#[derive(Clone, Debug)]
pub struct Problem {
    pub origin: Origin,
    pub reason: String,
}

/// What one file contributes.
#[derive(Clone, Debug, Default)]
pub struct FileContents {
    pub routes: Vec<(Origin, Arc<Route>)>,
    pub secrets: Vec<(Origin, Arc<Secret>)>,
    pub problems: Vec<Problem>,
}

/// The whole file cannot be used; when reloading, its last good version keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is larger than {MAX_FILE_BYTES} bytes", path.display())]
    TooLarge { path: PathBuf },
    #[error("{} is not valid YAML: {message}", path.display())]
    Yaml { path: PathBuf, message: String },
    #[error("{} holds MLflow gateway settings Portcullis cannot honour:\n  - {}", path.display(), list.join("\n  - "))]
    Unsupported { path: PathBuf, list: Vec<String> },
    #[error("{} is a LiteLLM proxy config; convert it with `portcullis import litellm {}`", path.display(), path.display())]
    LiteLlm { path: PathBuf },
}

/// Reads a file, refusing huge ones.
pub fn read(path: &Path) -> Result<Vec<u8>, FileError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|source| FileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| FileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(FileError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

/// The YAML documents of a file (empty ones left out), or the syntax error.
pub fn documents(path: &Path, bytes: &[u8]) -> Result<Vec<(usize, Value)>, FileError> {
    let text = std::str::from_utf8(bytes).map_err(|e| FileError::Yaml {
        path: path.to_path_buf(),
        message: format!("not UTF-8 text: {e}"),
    })?;
    let mut docs = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(doc).map_err(|e| FileError::Yaml {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if !value.is_null() {
            docs.push((i + 1, value));
        }
    }
    Ok(docs)
}

/// Parses one file's bytes. Invalid documents become `problems`; only a file that cannot be
/// used at all (bad YAML, an MLflow config with unsupported settings) is an error.
pub fn parse(path: &Path, bytes: &[u8], namespace: &str) -> Result<FileContents, FileError> {
    let docs = documents(path, bytes)?;
    let origin = |document: usize, entry: Option<String>| Origin {
        file: path.to_path_buf(),
        document,
        entry,
    };
    let mut out = FileContents::default();
    if let [(document, doc)] = docs.as_slice() {
        if doc.get("model_list").is_some() {
            return Err(FileError::LiteLlm {
                path: path.to_path_buf(),
            });
        }
        if mlflow::is_mlflow(doc) {
            return from_mlflow(path, *document, doc.clone(), namespace);
        }
    }
    // Manifests mean what they mean to kubectl (YAML 1.1); MLflow and LiteLLM configs above keep
    // the reading their own tools give them.
    let text = String::from_utf8_lossy(bytes);
    let docs = crate::yaml::documents(&text).map_err(|e| FileError::Yaml {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let docs = docs
        .into_iter()
        .enumerate()
        .filter(|(_, doc)| !doc.is_null())
        .map(|(i, doc)| (i + 1, doc));
    for (document, doc) in docs {
        match manifests::objects(doc, namespace) {
            Ok(objects) => {
                for object in objects {
                    match object {
                        Object::Route(r) => out.routes.push((origin(document, None), Arc::new(*r))),
                        Object::Secret(s) => {
                            out.secrets.push((origin(document, None), Arc::new(*s)))
                        }
                    }
                }
            }
            Err(reason) => out.problems.push(Problem {
                origin: origin(document, None),
                reason,
            }),
        }
    }
    Ok(out)
}

fn from_mlflow(
    path: &Path,
    document: usize,
    doc: Value,
    namespace: &str,
) -> Result<FileContents, FileError> {
    let converted = mlflow::convert(doc, Some(namespace));
    if !converted.unsupported.is_empty() {
        return Err(FileError::Unsupported {
            path: path.to_path_buf(),
            list: converted.unsupported,
        });
    }
    let origin = |entry: &str| Origin {
        file: path.to_path_buf(),
        document,
        entry: Some(entry.to_string()),
    };
    let mut out = FileContents::default();
    for plan in &converted.secrets {
        let users: Vec<&String> = converted
            .routes
            .iter()
            .filter(|(_, r)| {
                r.spec
                    .models()
                    .any(|m| m.secret_ref.as_ref().map(|s| &s.name) == Some(&plan.name))
            })
            .map(|(entry, _)| entry)
            .collect();
        let mut data = BTreeMap::new();
        for (key, source) in &plan.data {
            match source.resolve() {
                Ok(value) => {
                    data.insert(key.clone(), ByteString(value.into_bytes()));
                }
                Err(reason) => {
                    for entry in &users {
                        out.problems.push(Problem {
                            origin: origin(entry),
                            reason: reason.clone(),
                        });
                    }
                }
            }
        }
        if data.len() == plan.data.len() {
            let mut secret = Secret::default();
            secret.metadata.name = Some(plan.name.clone());
            secret.metadata.namespace = Some(namespace.to_string());
            secret.data = Some(data);
            let first = users.first().map(|e| e.as_str()).unwrap_or("endpoints");
            out.secrets.push((origin(first), Arc::new(secret)));
        }
    }
    for (entry, route) in converted.routes {
        out.routes.push((origin(&entry), Arc::new(route)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_with_a_bad_document_keep_the_good_ones() {
        let yaml = "apiVersion: v1\nkind: Secret\nmetadata: {name: k}\nstringData: {apiKey: sk-1}\n---\n---\napiVersion: portcullis.dev/v1alpha1\nkind: Route\nmetadata: {name: bad}\nspec: {routeType: llm/v9/chat}\n---\napiVersion: portcullis.dev/v1alpha1\nkind: Route\nmetadata: {name: chat}\nspec: {routeType: llm/v1/chat, model: {provider: openai, name: m, secretRef: {name: k}}}\n";
        let c = parse(Path::new("x.yaml"), yaml.as_bytes(), "default").unwrap();
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.routes[0].0.document, 4);
        assert_eq!(c.secrets.len(), 1);
        assert_eq!(c.problems.len(), 1);
        assert_eq!(c.problems[0].origin.to_string(), "x.yaml document 3");
        assert!(
            c.problems[0].reason.contains("llm/v9/chat"),
            "{}",
            c.problems[0].reason
        );
    }

    #[test]
    fn manifests_read_as_kubectl_reads_them() {
        let route = |extra: &str| {
            format!(
                "apiVersion: portcullis.dev/v1alpha1\nkind: Route\nmetadata: {{name: r}}\nspec:\n  routeType: llm/v1/chat\n  model: {{provider: azure-openai, name: m, secretRef: {{name: k}}, config: {{apiVersion: 2024-10-21{extra}}}}}\n  retry:\n    on: [timeout]\n"
            )
        };
        let c = parse(Path::new("x.yaml"), route("").as_bytes(), "default").unwrap();
        let spec = &c.routes[0].1.spec;
        // A plain `on:` is `true`, refused by reconcile naming retryOn; an unquoted date is the
        // timestamp kubectl would send.
        let retry = spec.retry.as_ref().unwrap();
        assert!(retry.legacy_true.is_some() && retry.legacy_field().unwrap().contains("retryOn"));
        let config = &spec.model.as_ref().unwrap().config;
        assert_eq!(config["apiVersion"], "2024-10-21T00:00:00Z");
        // `no` is a boolean where text is expected: refused, as the API server refuses it.
        let c = parse(
            Path::new("x.yaml"),
            route(", organization: no").as_bytes(),
            "default",
        )
        .unwrap();
        assert!(c.routes.is_empty());
        assert_eq!(c.problems.len(), 1);
    }

    #[test]
    fn broken_yaml_is_a_file_error() {
        let e = parse(Path::new("x.yaml"), b"routes: [\n", "default").unwrap_err();
        assert!(matches!(e, FileError::Yaml { .. }), "{e}");
    }

    #[test]
    fn mlflow_configs_resolve_env_keys_and_name_missing_ones() {
        // PATH is always set; setting a variable would need `unsafe`, which the crate forbids.
        let yaml = "endpoints:\n  - {name: a, endpoint_type: llm/v1/chat, model: {provider: openai, name: m, config: {openai_api_key: $PATH}}}\n  - {name: b, endpoint_type: llm/v1/chat, model: {provider: openai, name: m, config: {openai_api_key: $PORTCULLIS_LOAD_TEST_UNSET}}}\n";
        let c = parse(Path::new("gw.yaml"), yaml.as_bytes(), "default").unwrap();
        assert_eq!(c.routes.len(), 2);
        assert_eq!(c.secrets.len(), 1);
        assert_eq!(
            c.secrets[0].1.data.as_ref().unwrap()["apiKey"].0,
            std::env::var("PATH").unwrap().as_bytes()
        );
        assert_eq!(c.problems.len(), 1);
        assert_eq!(c.problems[0].origin.to_string(), "gw.yaml endpoints[1]");
        assert!(
            c.problems[0]
                .reason
                .contains("$PORTCULLIS_LOAD_TEST_UNSET is not set")
        );
    }

    #[test]
    fn mlflow_configs_with_unsupported_keys_are_refused_whole() {
        let yaml = "endpoints:\n  - {name: a, endpoint_type: llm/v1/chat, model: {provider: openai, name: m, config: {openai_api_key: k, foo: 1}}}\n";
        let e = parse(Path::new("gw.yaml"), yaml.as_bytes(), "default").unwrap_err();
        assert!(
            e.to_string()
                .contains("endpoints[0].model.config.foo: not supported"),
            "{e}"
        );
    }
}
