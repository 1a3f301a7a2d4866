//! `portcullis import mlflow|litellm FILE`: Route and Secret manifests on stdout, ready for
//! `kubectl apply -f -` or a Git repository; what could not be translated on stderr.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use k8s_openapi::api::core::v1::Secret;

use super::convert::{Converted, KeyRef, SecretPlan, k8s_name};
use super::{litellm, load, mlflow};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// An MLflow AI Gateway config (`routes:` of 2.5, or `endpoints:`).
    Mlflow,
    /// A LiteLLM proxy config (`model_list:`).
    Litellm,
}

#[derive(clap::Args, Debug)]
pub struct ImportArgs {
    pub format: Format,
    /// The config file to convert.
    pub file: PathBuf,
    /// Namespace written into the manifests (default: none, so kubectl's current namespace).
    #[arg(long)]
    pub namespace: Option<String>,
    /// Put the keys into the Secrets, read from the environment variables (and files) the config
    /// names. Without it the Secrets hold placeholders, and a comment shows the command that
    /// creates each one from your environment.
    #[arg(long)]
    pub with_secrets: bool,
    /// With `--with-secrets`: also read the files that MLflow key fields name (MLflow reads a key
    /// field naming an existing file from it). Without it such keys stay placeholders: a config
    /// from elsewhere must not make `import` copy local files into Secrets.
    #[arg(long)]
    pub read_key_files: bool,
}

pub fn main(args: &ImportArgs) -> ExitCode {
    let docs = match load::read(&args.file).and_then(|b| load::documents(&args.file, &b)) {
        Ok(docs) => docs,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    // A foreign config is one YAML document; anything else fails the format check below.
    let doc = match <[(usize, serde_yaml::Value); 1]>::try_from(docs) {
        Ok([(_, doc)]) => doc,
        Err(_) => serde_yaml::Value::Null,
    };
    let converted = match args.format {
        Format::Mlflow if mlflow::is_mlflow(&doc) => {
            mlflow::convert(doc, args.namespace.as_deref())
        }
        Format::Litellm if litellm::is_litellm(&doc) => {
            litellm::convert(doc, args.namespace.as_deref())
        }
        Format::Mlflow => {
            eprintln!(
                "error: {} is not an MLflow gateway config (one YAML document with `endpoints:` or `routes:`)",
                args.file.display()
            );
            return ExitCode::from(2);
        }
        Format::Litellm => {
            eprintln!(
                "error: {} is not a LiteLLM proxy config (one YAML document with `model_list:`)",
                args.file.display()
            );
            return ExitCode::from(2);
        }
    };
    let rendered = render(converted, args);
    for line in &rendered.stderr {
        eprintln!("{line}");
    }
    if rendered.routes == 0 {
        eprintln!(
            "error: nothing to import: no entry of {} could become a Route",
            args.file.display()
        );
        return ExitCode::from(2);
    }
    let mut stdout = std::io::stdout().lock();
    if stdout.write_all(rendered.stdout.as_bytes()).is_err() {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

pub struct Rendered {
    pub stdout: String,
    pub stderr: Vec<String>,
    pub routes: usize,
}

/// The manifests of a converted config: Secrets first (so a single `kubectl apply` finds them),
/// then Routes, each with a comment saying where it came from and what was not carried over.
pub fn render(mut converted: Converted, args: &ImportArgs) -> Rendered {
    let format = match args.format {
        Format::Mlflow => "mlflow",
        Format::Litellm => "litellm",
    };
    let mut stderr: Vec<String> = converted
        .unsupported
        .iter()
        .map(|u| format!("not imported: {u}"))
        .collect();
    let mut docs = vec![format!(
        "# Imported from {} by `portcullis import {format}`.\n",
        args.file.display()
    )];

    // Kubernetes names: MLflow allows '_' and capitals in endpoint names.
    let mut renamed: HashMap<String, String> = HashMap::new();
    let mut taken: Vec<String> = Vec::new();
    for (entry, route) in &mut converted.routes {
        let old = route.metadata.name.clone().unwrap_or_default();
        let mut new = k8s_name(&old);
        while taken.contains(&new) {
            new.push_str("-x");
        }
        taken.push(new.clone());
        if new != old {
            stderr.push(format!(
                "renamed: {entry}: {old:?} is not a Kubernetes name; the Route (and the name clients call) is {new:?}"
            ));
            renamed.insert(new.clone(), old.clone());
            route.metadata.name = Some(new);
        }
    }

    for plan in &converted.secrets {
        let (doc, problems) = secret_doc(plan, args);
        stderr.extend(problems);
        docs.push(doc);
    }
    for (entry, route) in &converted.routes {
        let name = route.metadata.name.clone().unwrap_or_default();
        let mut doc = format!("# From {entry}.\n");
        if let Some(old) = renamed.get(&name) {
            doc.push_str(&format!("# Renamed from {old:?}: clients call {name:?}.\n"));
        }
        for c in converted.comments.get(&name).into_iter().flatten() {
            doc.push_str(&format!("# {c}\n"));
        }
        match crate::yaml::to_string(route) {
            Ok(yaml) => doc.push_str(&yaml),
            Err(e) => {
                stderr.push(format!("error: {entry}: cannot render the Route: {e}"));
                continue;
            }
        }
        docs.push(doc);
    }
    Rendered {
        stdout: docs.join("---\n"),
        stderr,
        routes: converted.routes.len(),
    }
}

fn secret_doc(plan: &SecretPlan, args: &ImportArgs) -> (String, Vec<String>) {
    let mut problems = Vec::new();
    let mut data = BTreeMap::new();
    let mut from_literal = Vec::new();
    for (key, source) in &plan.data {
        let value = if args.with_secrets {
            let resolved = match source {
                KeyRef::File(path) if !args.read_key_files => Err(format!(
                    "the config names the file {}; --read-key-files reads it",
                    path.display()
                )),
                _ => source.resolve(),
            };
            match resolved {
                Ok(v) => v,
                Err(e) => {
                    problems.push(format!("placeholder: Secret {} key {key}: {e}", plan.name));
                    placeholder(source)
                }
            }
        } else {
            placeholder(source)
        };
        data.insert(key.clone(), value);
        from_literal.push(match source {
            KeyRef::Env(var) => format!("--from-literal={key}=\"${var}\""),
            KeyRef::File(path) => format!("--from-file={key}={}", shell_quote(path)),
            KeyRef::Literal(_) | KeyRef::BadEnvName => format!("--from-literal={key}=..."),
        });
    }
    let sources: Vec<String> = plan.data.values().map(KeyRef::describe).collect();
    let mut doc = format!("# Credentials from {}.\n", sources.join(", "));
    if !args.with_secrets {
        doc.push_str(
            "# The values are placeholders; create the Secret from your environment instead:\n",
        );
        let ns = args
            .namespace
            .as_deref()
            .map(|n| format!(" -n {n}"))
            .unwrap_or_default();
        doc.push_str(&format!(
            "#   kubectl create secret generic {}{ns} {}\n#   kubectl label secret {}{ns} portcullis.dev/provider-key=true\n",
            plan.name,
            from_literal.join(" "),
            plan.name,
        ));
    }
    let mut secret = Secret::default();
    secret.metadata.name = Some(plan.name.clone());
    secret.metadata.namespace = args.namespace.clone();
    // The label the shipped install's `--secret-selector` reads, so an imported Route can serve there.
    secret.metadata.labels = Some(BTreeMap::from([(
        "portcullis.dev/provider-key".to_string(),
        "true".to_string(),
    )]));
    secret.type_ = Some("Opaque".into());
    secret.string_data = Some(data);
    match crate::yaml::to_string(&secret) {
        Ok(yaml) => doc.push_str(&yaml),
        Err(e) => problems.push(format!("error: cannot render Secret {}: {e}", plan.name)),
    }
    (doc, problems)
}

fn placeholder(source: &KeyRef) -> String {
    match source {
        KeyRef::Env(var) => format!("REPLACE-with-the-value-of-${var}"),
        KeyRef::File(path) => format!("REPLACE-with-the-contents-of-{}", path.display()),
        KeyRef::Literal(_) => "REPLACE-with-the-key-written-in-the-config".into(),
        KeyRef::BadEnvName => "REPLACE-with-the-key".into(),
    }
}

/// A path as one single-quoted shell word (the suggested command is copied into a shell).
fn shell_quote(path: &std::path::Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(format: Format, with_secrets: bool) -> ImportArgs {
        ImportArgs {
            format,
            file: PathBuf::from("gw.yaml"),
            namespace: Some("team".into()),
            with_secrets,
            read_key_files: false,
        }
    }

    #[test]
    fn mlflow_import_renders_typed_manifests_with_placeholders() {
        let doc = serde_yaml::from_str(
            "endpoints:\n  - {name: Chat_V2, endpoint_type: llm/v1/chat, model: {provider: openai, name: gpt-4o-mini, config: {openai_api_key: $OPENAI_API_KEY}}, limit: {renewal_period: minute, calls: 5}}\n",
        )
        .unwrap();
        let r = render(
            mlflow::convert(doc, Some("team")),
            &args(Format::Mlflow, false),
        );
        assert_eq!(r.routes, 1);
        let docs: Vec<serde_yaml::Value> = r
            .stdout
            .split("---\n")
            .skip(1)
            .map(|d| serde_yaml::from_str(d).unwrap())
            .collect();
        assert_eq!(docs[0]["kind"], "Secret");
        assert_eq!(docs[0]["metadata"]["name"], "openai-api-key");
        assert_eq!(
            docs[0]["stringData"]["apiKey"],
            "REPLACE-with-the-value-of-$OPENAI_API_KEY"
        );
        assert_eq!(docs[1]["kind"], "Route");
        assert_eq!(docs[1]["metadata"]["name"], "chat-v2");
        assert_eq!(docs[1]["metadata"]["namespace"], "team");
        assert_eq!(docs[1]["spec"]["limits"][0]["calls"], 5);
        assert!(docs[1].get("status").is_none(), "{}", r.stdout);
        assert!(r.stdout.contains("kubectl create secret generic openai-api-key -n team --from-literal=apiKey=\"$OPENAI_API_KEY\"\n#   kubectl label secret openai-api-key -n team portcullis.dev/provider-key=true\n"), "{}", r.stdout);
        assert_eq!(
            docs[0]["metadata"]["labels"]["portcullis.dev/provider-key"],
            "true"
        );
        assert!(
            r.stderr.iter().any(|l| l.contains("renamed: endpoints[0]")),
            "{:?}",
            r.stderr
        );
    }

    #[test]
    fn with_secrets_reads_the_environment() {
        let doc = serde_yaml::from_str(
            "endpoints:\n  - {name: a, endpoint_type: llm/v1/chat, model: {provider: openai, name: m, config: {openai_api_key: $PATH}}}\n  - {name: b, endpoint_type: llm/v1/chat, model: {provider: openai, name: m, config: {openai_api_key: $PORTCULLIS_IMPORT_UNSET}}}\n",
        )
        .unwrap();
        let r = render(mlflow::convert(doc, None), &args(Format::Mlflow, true));
        assert!(r.stdout.contains(&std::env::var("PATH").unwrap()));
        assert!(
            r.stderr
                .iter()
                .any(|l| l.contains("$PORTCULLIS_IMPORT_UNSET is not set")),
            "{:?}",
            r.stderr
        );
    }
}
