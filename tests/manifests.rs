//! What users apply is what the tests apply: the checked-in CRDs as kubectl reads them are the
//! Rust types' schema, property by property, and every manifest a user is shown (the README's YAML
//! objects, `examples/`, every kustomization under `deploy/`, `portcullis import` of the example
//! configs) passes the real API server.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers of tests: failing loudly is the point

mod support;

use std::collections::BTreeSet;
use std::process::Command;

use kube::CustomResourceExt;
use serde_json::Value;
use support::*;

fn repo_path(p: &str) -> String {
    format!("{}/{p}", env!("CARGO_MANIFEST_DIR"))
}

/// The JSON paths at which two values differ (a missing side shows as `null`).
fn differences(path: &str, a: &Value, b: &Value, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let null = Value::Null;
                differences(
                    &format!("{path}.{k}"),
                    x.get(k).unwrap_or(&null),
                    y.get(k).unwrap_or(&null),
                    out,
                );
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (a, b)) in x.iter().zip(y).enumerate() {
                differences(&format!("{path}[{i}]"), a, b, out);
            }
        }
        _ if a == b => {}
        // JSON numbers: kubectl writes `15` where serde writes `15.0`.
        (Value::Number(x), Value::Number(y)) if x.as_f64() == y.as_f64() => {}
        _ => out.push(format!("{path}: generated {a} but kubectl reads {b}")),
    }
}

#[test]
fn checked_in_crds_read_by_kubectl_are_the_generated_schema() {
    let cp = ControlPlane::shared();
    let generated = [
        (
            "route",
            serde_json::to_value(portcullis::api::Route::crd()).unwrap(),
        ),
        (
            "team",
            serde_json::to_value(portcullis::api::Team::crd()).unwrap(),
        ),
        (
            "guardrailpolicy",
            serde_json::to_value(portcullis::api::GuardrailPolicy::crd()).unwrap(),
        ),
        (
            "mcpserver",
            serde_json::to_value(portcullis::api::McpServer::crd()).unwrap(),
        ),
    ];
    for (kind, generated) in generated {
        for file in [format!("crds/{kind}.yaml"), deploy_copy(kind)] {
            let read = cp.json(&[
                "create",
                "--dry-run=client",
                "--validate=false",
                "-f",
                &repo_path(&file),
            ]);
            let mut diffs = Vec::new();
            differences("", &generated, &read, &mut diffs);
            assert!(
                diffs.is_empty(),
                "{file} is stale or reads differently under kubectl (run `make crds`):\n{}",
                diffs.join("\n")
            );
        }
    }
}

fn deploy_copy(kind: &str) -> String {
    match kind {
        "route" => "deploy/base/crd.yaml".into(),
        _ => format!("deploy/base/crd-{kind}.yaml"),
    }
}

/// The YAML documents of the README that are whole Kubernetes objects.
fn readme_objects() -> Vec<String> {
    readme_yaml_blocks()
        .iter()
        .flat_map(|block| block.split("\n---\n"))
        .filter(|doc| {
            let value: serde_yaml::Value = serde_yaml::from_str(doc).unwrap_or_default();
            value.get("apiVersion").is_some() && value.get("kind").is_some()
        })
        .map(str::to_string)
        .collect()
}

/// `kubectl apply --dry-run=server` of one manifest stream, after creating its namespaces.
fn server_accepts(cp: &ControlPlane, what: &str, manifests: &str) {
    let namespaces: BTreeSet<String> = portcullis::yaml::documents(manifests)
        .unwrap_or_else(|e| panic!("{what}: not YAML as kubectl reads it: {e}"))
        .iter()
        .filter_map(|d| {
            d.get("metadata")?
                .get("namespace")?
                .as_str()
                .map(String::from)
        })
        .collect();
    for ns in namespaces {
        let out = cp.kubectl(&["create", "namespace", &ns]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() || err.contains("AlreadyExists"),
            "{err}"
        );
    }
    let out = cp.kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], manifests);
    assert!(
        out.status.success(),
        "the API server refuses {what}: {}\n{manifests}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_manifest_a_user_is_shown_passes_the_api_server() {
    let cp = ControlPlane::shared();
    // The README's InferencePool is the Inference Extension's resource.
    install_inference_pool_crd(cp);
    let objects = readme_objects();
    assert!(
        objects.len() >= 5,
        "README objects found: {}",
        objects.len()
    );
    for (i, doc) in objects.iter().enumerate() {
        server_accepts(cp, &format!("README object {}", i + 1), doc);
    }
    let mut files: Vec<_> = ["examples", "examples/providers"]
        .iter()
        .flat_map(|d| std::fs::read_dir(repo_path(d)).unwrap())
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 10);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        server_accepts(cp, &file.display().to_string(), &text);
    }
    for (format, config) in [
        ("mlflow", "examples/migrate/mlflow-gateway.yaml"),
        ("litellm", "examples/migrate/litellm-config.yaml"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args([
                "import",
                format,
                &repo_path(config),
                "--namespace",
                "imported",
            ])
            .output()
            .unwrap();
        let manifests = String::from_utf8_lossy(&out.stdout);
        assert!(
            !manifests.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        server_accepts(
            cp,
            &format!("portcullis import {format} {config}"),
            &manifests,
        );
    }
}

#[test]
fn a_retry_list_under_its_old_name_is_refused_never_ignored() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("legacy");
    let route = |retry: &str| {
        format!(
            "apiVersion: portcullis.dev/v1alpha1\nkind: Route\nmetadata: {{name: r, namespace: {ns}}}\n\
             spec:\n  routeType: llm/v1/chat\n  model: {{provider: openai, name: m, secretRef: {{name: s}}}}\n  retry:\n{retry}"
        )
    };
    // Unquoted (kubectl reads `true`), quoted, and as JSON would write it; strict and not.
    for retry in [
        "    on: [timeout]\n",
        "    \"on\": [timeout]\n",
        "    \"true\": [timeout]\n",
    ] {
        for validate in ["--validate=strict", "--validate=false"] {
            let out = cp.kubectl_stdin(&["apply", validate, "-f", "-"], &route(retry));
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{retry:?} {validate} was accepted");
            assert!(err.contains("retryOn"), "{retry:?} {validate}: {err}");
        }
    }
    cp.apply(&route("    retryOn: [timeout]\n"));
    let stored = cp.json(&["get", "-n", &ns, "route.portcullis.dev", "r"]);
    assert_eq!(
        stored["spec"]["retry"],
        serde_json::json!({"retryOn": ["timeout"]})
    );
}

#[test]
fn every_kustomization_under_deploy_passes_the_api_server() {
    let cp = ControlPlane::shared();
    cp.install_prometheus_operator_crds();
    let mut dirs = Vec::new();
    let mut todo = vec![std::path::PathBuf::from(repo_path("deploy"))];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                todo.push(path);
            } else if path.file_name().is_some_and(|n| n == "kustomization.yaml") {
                // Components are applied through the overlays that use them.
                let text = std::fs::read_to_string(&path).unwrap();
                if text.contains("kind: Kustomization") {
                    dirs.push(dir.clone());
                }
            }
        }
    }
    dirs.sort();
    assert!(dirs.len() >= 5, "{dirs:?}");
    for dir in dirs {
        let rendered = cp.ok(&["kustomize", path_str(&dir)]);
        server_accepts(
            cp,
            &format!("kubectl kustomize {}", dir.display()),
            &rendered,
        );
    }
}
