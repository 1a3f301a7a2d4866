//! The Helm chart, the Grafana dashboard and the Prometheus alerts, each checked by the tool that
//! consumes it: `helm` (lint, template, server-side dry runs on the test API server), `promtool`
//! (every dashboard query and alert expression parses; the alerts' unit tests) and a running
//! gateway's own `/metrics` after real traffic (every metric they name is exported).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: failing loudly is the point

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{Value, json};
use support::*;

const CHART: &str = "deploy/helm/portcullis";
const RULES: &str = "deploy/prometheus/portcullis-rules.yaml";
const RULE_TESTS: &str = "deploy/prometheus/portcullis-rules.test.yaml";
const DASHBOARD: &str = "deploy/grafana/portcullis.json";

fn repo_path(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn read(p: &str) -> String {
    std::fs::read_to_string(repo_path(p)).unwrap_or_else(|e| panic!("{p}: {e}"))
}

/// `helm ARGS` with the test API server as its cluster; (success, stdout, stderr).
fn helm(args: &[&str]) -> (bool, String, String) {
    ControlPlane::shared().helm(args)
}

fn helm_ok(args: &[&str]) -> String {
    ControlPlane::shared().helm_ok(args)
}

fn promtool(args: &[&str]) -> (bool, String) {
    let (ok, out, err) = run_with_stdin(&tool("promtool"), args, &[], "");
    (ok, format!("{out}{err}"))
}

/// The shared control plane with the Prometheus Operator's CRDs (ServiceMonitor, PrometheusRule)
/// from the operator's own module, and the namespaces the renders go into.
fn cluster() -> &'static ControlPlane {
    static READY: OnceLock<()> = OnceLock::new();
    let cp = ControlPlane::shared();
    READY.get_or_init(|| {
        cp.install_prometheus_operator_crds();
        for ns in ["portcullis-system", "gateways", "monitoring"] {
            let _ = cp.kubectl(&["create", "namespace", ns]);
        }
    });
    cp
}

/// `helm template` of the chart with `values` (`--set`-style pairs) and extra flags.
fn render(release: &str, namespace: &str, values: &[&str], flags: &[&str]) -> String {
    let chart = repo_path(CHART);
    let mut args = vec!["template", release, path_str(&chart), "-n", namespace];
    for v in values {
        args.extend(["--set", v]);
    }
    args.extend(flags);
    helm_ok(&args)
}

/// The values combinations the tests render; each must be accepted by the API server.
const COMBINATIONS: &[(&str, &str, &[&str])] = &[
    ("portcullis", "portcullis-system", &[]),
    ("portcullis", "portcullis-system", &["namespaced=true"]),
    (
        "gw",
        "gateways",
        &[
            "replicaCount=3",
            "image.repository=registry.example/portcullis",
            "image.tag=0.2.0",
            "defaultAccess=authenticated",
            "policy.allowedUpstreamHosts={api.openai.com,10.0.0.0/8}",
            "policy.secretSelector=team=ml",
            "policy.publicNamespaces={*}",
            "store.host=redis.gateways.svc",
            "store.tls=true",
            "store.username=portcullis",
            "store.secret.name=redis",
            "store.secret.caKey=ca.crt",
            "leaderElection=false",
            "metrics.serviceMonitor.enabled=true",
            "metrics.prometheusRule.enabled=true",
            "metrics.dashboard.enabled=true",
            "metrics.dashboard.namespace=monitoring",
            "autoscaling.enabled=true",
            "networkPolicy.egress.enabled=true",
            "networkPolicy.egress.apiServer.cidrs={10.96.0.1/32}",
            "networkPolicy.egress.store.cidrs={10.1.0.0/16}",
            "extraArgs={--max-in-flight=2048}",
            "nodeSelector.kubernetes\\.io/os=linux",
        ],
    ),
    (
        "portcullis",
        "portcullis-system",
        &[
            "networkPolicy.enabled=false",
            "podDisruptionBudget.enabled=false",
        ],
    ),
];

#[test]
fn chart_lints_and_every_values_combination_applies_on_the_api_server() {
    let cp = cluster();
    let chart = repo_path(CHART);
    for (release, ns, values) in COMBINATIONS {
        let mut lint = vec!["lint", "--strict", path_str(&chart)];
        for v in values.iter() {
            lint.extend(["--set", v]);
        }
        let out = helm_ok(&lint);
        assert!(out.contains("0 chart(s) failed"), "{values:?}: {out}");
        let rendered = render(release, ns, values, &[]);
        let out = cp.kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], &rendered);
        assert!(
            out.status.success(),
            "the API server refused the chart with {values:?}: {}\n{rendered}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The chart's CRDs too (Helm installs crds/ before the templates).
    let with_crds = render("portcullis", "portcullis-system", &[], &["--include-crds"]);
    let out = cp.kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], &with_crds);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Monitoring objects: off unless asked for or the cluster serves their API ("auto").
    let plain = render("portcullis", "portcullis-system", &[], &[]);
    assert!(!plain.contains("kind: ServiceMonitor") && !plain.contains("kind: PrometheusRule"));
    let auto = render(
        "portcullis",
        "portcullis-system",
        &[],
        &["--api-versions", "monitoring.coreos.com/v1"],
    );
    assert!(auto.contains("kind: ServiceMonitor") && auto.contains("kind: PrometheusRule"));

    // The full combination renders what its values say.
    let (_, _, values) = COMBINATIONS[2];
    let docs = yaml_documents(&render("gw", "gateways", values, &[]));
    let find = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
            .clone()
    };
    let deployment = find("Deployment", "gw-portcullis");
    assert!(
        deployment["spec"]["replicas"].is_null(),
        "the HPA owns replicas"
    );
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], "registry.example/portcullis:0.2.0");
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(args.contains(&"--default-access=authenticated"), "{args:?}");
    assert!(args.contains(&"--max-in-flight=2048"));
    assert!(args.contains(&"--replicas-service=gw-portcullis"));
    assert!(!args.contains(&"--leader-election"));
    let other = yaml_documents(&render("gw", "gateways", &[], &[]));
    let other_args = &other.iter().find(|d| d["kind"] == "Deployment").unwrap()["spec"]["template"]
        ["spec"]["containers"][0]["args"];
    assert!(
        other_args
            .as_array()
            .unwrap()
            .contains(&json!("--lease-name=gw-portcullis-leader")),
        "{other_args}"
    );
    let env = container["env"].as_array().unwrap();
    let store = env
        .iter()
        .find(|e| e["name"] == "PORTCULLIS_LIMITS_STORE")
        .expect("store env");
    assert_eq!(store["value"], "rediss://redis.gateways.svc:6379/0");
    // The password and CA come from the mounted Secret's files, never from args or env.
    for arg in [
        "--store-username=portcullis",
        "--store-password-file=/etc/portcullis/store/password",
        "--store-ca-file=/etc/portcullis/store/ca.crt",
    ] {
        assert!(args.contains(&arg), "{arg} missing: {args:?}");
    }
    assert_eq!(
        container["volumeMounts"],
        json!([{"name": "store", "mountPath": "/etc/portcullis/store", "readOnly": true}])
    );
    assert_eq!(
        deployment["spec"]["template"]["spec"]["volumes"],
        json!([{"name": "store", "secret": {"secretName": "redis"}}])
    );
    let policy = find("ConfigMap", "gw-portcullis-policy");
    assert_eq!(
        policy["data"],
        json!({"PORTCULLIS_ALLOWED_UPSTREAM_HOSTS": "api.openai.com,10.0.0.0/8",
               "PORTCULLIS_SECRET_SELECTOR": "team=ml", "PORTCULLIS_PUBLIC_NAMESPACES": "*"})
    );
    let dashboard = find("ConfigMap", "gw-portcullis-dashboard");
    assert_eq!(dashboard["metadata"]["namespace"], "monitoring");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let json: Value =
        serde_json::from_str(dashboard["data"]["portcullis.json"].as_str().unwrap()).unwrap();
    assert_eq!(json["uid"], "portcullis");
    let netpol = find("NetworkPolicy", "gw-portcullis");
    assert_eq!(netpol["spec"]["policyTypes"], json!(["Ingress", "Egress"]));
    let rule = find("PrometheusRule", "gw-portcullis");
    let rules_file: Value = serde_yaml::from_str(&read(RULES)).unwrap();
    assert_eq!(rule["spec"]["groups"], rules_file["groups"]);
}

#[test]
fn values_schema_rejects_typos_and_bad_values() {
    let chart = repo_path(CHART);
    for (set, complaint) in [
        ("replicaCont=3", "replicaCont"),
        ("policy.secretSelektor=x", "secretSelektor"),
        ("defaultAccess=everyone", "defaultAccess"),
        ("store.url=http://redis:6379", "url"),
        ("metrics.serviceMonitor.enabled=sometimes", "enabled"),
    ] {
        let (ok, _, err) = helm(&["template", "portcullis", path_str(&chart), "--set", set]);
        assert!(!ok, "--set {set} was accepted");
        assert!(
            err.contains("schema") && err.contains(complaint),
            "--set {set}: {err}"
        );
    }
}

/// Objects by (kind, name) with what may differ between the two renders taken out: labels and
/// selectors (the chart adds the release's), annotations (the chart's config checksum), the image
/// reference, and kustomize's name hash on generated ConfigMaps.
fn comparable(
    rendered: &str,
    rename: &dyn Fn(&str) -> String,
) -> BTreeMap<(String, String), Value> {
    fn strip(v: &mut Value, rename: &dyn Fn(&str) -> String) {
        match v {
            Value::Object(map) => {
                for key in [
                    "labels",
                    "annotations",
                    "selector",
                    "labelSelector",
                    "podSelector",
                    "image",
                    "namespace",
                ] {
                    map.remove(key);
                }
                if let Some(Value::String(name)) = map.get_mut("name") {
                    *name = rename(name);
                }
                map.values_mut().for_each(|v| strip(v, rename));
            }
            Value::Array(items) => items.iter_mut().for_each(|v| strip(v, rename)),
            _ => {}
        }
    }
    yaml_documents(rendered)
        .into_iter()
        .filter(|d| d["kind"] != "Namespace" && d["kind"] != "CustomResourceDefinition")
        .map(|mut d| {
            strip(&mut d, rename);
            let key = (
                d["kind"].as_str().unwrap().to_string(),
                d["metadata"]["name"].as_str().unwrap().to_string(),
            );
            (key, d)
        })
        .collect()
}

/// kustomize's content hash on generated names (`portcullis-policy-hk8khbgf8f`).
fn unhash(name: &str) -> String {
    match name.rsplit_once('-') {
        Some((base, hash))
            if hash.len() == 10 && hash.chars().all(|c| c.is_ascii_alphanumeric()) =>
        {
            base.to_string()
        }
        _ => name.to_string(),
    }
}

fn assert_same(kustomize: &str, chart: &str, rename: &dyn Fn(&str) -> String, what: &str) {
    let a = comparable(kustomize, &|n| rename(&unhash(n)));
    let b = comparable(chart, rename);
    let keys_a: BTreeSet<_> = a.keys().collect();
    let keys_b: BTreeSet<_> = b.keys().collect();
    assert_eq!(keys_a, keys_b, "{what}: the two install different objects");
    for (key, object) in &a {
        assert_eq!(
            serde_json::to_string_pretty(object).unwrap(),
            serde_json::to_string_pretty(&b[key]).unwrap(),
            "{what}: {key:?} differs between deploy/ and the chart"
        );
    }
}

#[test]
fn chart_and_kustomize_base_install_the_same_objects() {
    let cp = ControlPlane::shared();
    let same = |n: &str| n.to_string();
    assert_same(
        &cp.ok(&["kustomize", path_str(&repo_path("deploy"))]),
        &render("portcullis", "portcullis-system", &[], &[]),
        &same,
        "cluster-wide",
    );
    // The chart names its namespaced TokenReview grant after the namespace (a ClusterRole is
    // cluster-wide), the overlay does not.
    let tokenreview = |n: &str| {
        n.replace(
            "portcullis-tokenreview-portcullis-system",
            "portcullis-tokenreview",
        )
    };
    assert_same(
        &cp.ok(&[
            "kustomize",
            path_str(&repo_path("deploy/overlays/namespaced")),
        ]),
        &render("portcullis", "portcullis-system", &["namespaced=true"], &[]),
        &tokenreview,
        "namespaced",
    );
    // Selectors the comparison leaves out still select the chart's pods.
    let docs = yaml_documents(&render("portcullis", "portcullis-system", &[], &[]));
    let pod_labels = docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .unwrap()["spec"]["template"]["metadata"]["labels"]
        .clone();
    for d in &docs {
        // A Service's selector is the label map itself; the others' are under matchLabels.
        let selector = if d["kind"] == "Service" {
            &d["spec"]["selector"]
        } else if d["kind"] == "NetworkPolicy" {
            &d["spec"]["podSelector"]["matchLabels"]
        } else {
            &d["spec"]["selector"]["matchLabels"]
        };
        for (k, v) in selector.as_object().into_iter().flatten() {
            assert_eq!(
                &pod_labels[k], v,
                "{} selects {k}={v}",
                d["metadata"]["name"]
            );
        }
    }
}

#[test]
fn copies_match_their_sources() {
    for (copy, source) in [
        ("deploy/helm/portcullis/crds/route.yaml", "crds/route.yaml"),
        ("deploy/helm/portcullis/crds/team.yaml", "crds/team.yaml"),
        (
            "deploy/helm/portcullis/crds/guardrailpolicy.yaml",
            "crds/guardrailpolicy.yaml",
        ),
        (
            "deploy/helm/portcullis/crds/mcpserver.yaml",
            "crds/mcpserver.yaml",
        ),
        ("deploy/helm/portcullis/files/portcullis.json", DASHBOARD),
        ("deploy/helm/portcullis/files/portcullis-rules.yaml", RULES),
    ] {
        assert!(
            read(copy) == read(source),
            "{copy} is not {source}: run `make chart-files`"
        );
    }
    let component: Value = serde_yaml::from_str(&read(
        "deploy/components/prometheusrule/prometheusrule.yaml",
    ))
    .unwrap();
    let rules: Value = serde_yaml::from_str(&read(RULES)).unwrap();
    assert_eq!(
        component["spec"]["groups"], rules["groups"],
        "deploy/components/prometheusrule is stale: run `make chart-files`"
    );
}

/// Every PromQL expression of the dashboard, with its template variables given values.
fn dashboard_queries() -> Vec<(String, String)> {
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).expect("dashboard json");
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            let concrete = expr
                .replace("$__rate_interval", "5m")
                .replace("$namespace", ".*")
                .replace("$route", ".*")
                .replace("$consumer", ".*");
            out.push((panel["title"].as_str().unwrap().to_string(), concrete));
        }
    }
    out
}

/// A rules file recording each expression, for `promtool check rules` to parse.
fn recording_rules(exprs: &[(String, String)]) -> String {
    let rules: Vec<Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, (_, e))| json!({"record": format!("dashboard:query_{i}"), "expr": e}))
        .collect();
    serde_yaml::to_string(&json!({"groups": [{"name": "dashboard", "rules": rules}]})).unwrap()
}

#[test]
fn dashboard_is_importable_and_every_query_parses() {
    let dashboard: Value = serde_json::from_str(&read(DASHBOARD)).unwrap();
    assert_eq!(dashboard["uid"], "portcullis");
    assert!(
        dashboard["id"].is_null(),
        "an id ties the file to one Grafana"
    );
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(variables, ["datasource", "namespace", "route", "consumer"]);
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "{}",
            panel["title"]
        );
        for target in panel["targets"].as_array().unwrap() {
            assert_eq!(target["datasource"]["uid"], "${datasource}");
        }
    }
    let queries = dashboard_queries();
    assert!(queries.len() > 25, "{} queries", queries.len());
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("dashboard-rules.yaml");
    std::fs::write(&file, recording_rules(&queries)).unwrap();
    let (ok, out) = promtool(&["check", "rules", path_str(&file)]);
    assert!(ok, "a dashboard query does not parse:\n{out}");
    // A broken query is caught.
    let broken = vec![(
        "broken".to_string(),
        "sum by (route (rate(x[5m]))".to_string(),
    )];
    std::fs::write(&file, recording_rules(&broken)).unwrap();
    assert!(!promtool(&["check", "rules", path_str(&file)]).0);
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests_catch_silent_and_noisy_alerts() {
    let (ok, out) = promtool(&["check", "rules", path_str(&repo_path(RULES))]);
    assert!(ok, "{out}");
    let (ok, out) = promtool(&["test", "rules", path_str(&repo_path(RULE_TESTS))]);
    assert!(ok, "{out}");

    // Every alert has a unit test, and the tests fail when the alerts never fire or always do.
    let rules: Value = serde_yaml::from_str(&read(RULES)).unwrap();
    let tests = read(RULE_TESTS);
    let alerts: Vec<String> = rules["groups"][0]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["alert"].as_str().unwrap().to_string())
        .collect();
    for alert in &alerts {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "{alert} has no unit test"
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("portcullis-rules.test.yaml"), &tests).unwrap();
    for (expr, what) in [
        ("vector(1) < 0", "never fire"),
        ("vector(1)", "always fire"),
    ] {
        for alert in &alerts {
            let mut mutated = rules.clone();
            for rule in mutated["groups"][0]["rules"].as_array_mut().unwrap() {
                if rule["alert"] == alert.as_str() {
                    rule["expr"] = json!(expr);
                }
            }
            std::fs::write(
                tmp.path().join("portcullis-rules.yaml"),
                serde_yaml::to_string(&mutated).unwrap(),
            )
            .unwrap();
            let (ok, _) = promtool(&[
                "test",
                "rules",
                path_str(&tmp.path().join("portcullis-rules.test.yaml")),
            ]);
            assert!(!ok, "the unit tests pass when {alert} would {what}");
        }
    }

    // Each runbook is a section of the README.
    let anchors: BTreeSet<String> = read("README.md")
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| github_anchor(l.trim_start_matches('#').trim()))
        .collect();
    for rule in rules["groups"][0]["rules"].as_array().unwrap() {
        let url = rule["annotations"]["runbook_url"].as_str().unwrap();
        let anchor = url.strip_prefix("README.md#").expect("a README section");
        assert!(anchors.contains(anchor), "README has no section #{anchor}");
    }
}

/// GitHub's heading anchors: lower case, spaces to dashes, other punctuation dropped.
fn github_anchor(heading: &str) -> String {
    heading
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The metric names an expression uses (ours all start with these prefixes): identifiers outside
/// label matchers `{...}`, quoted strings and the label lists of `by`, `without`, `on`, `ignoring`
/// and `group_left`/`group_right`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const LABEL_LISTS: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let chars: Vec<char> = expr.chars().collect();
    // Index just past the `close` matching the opener at `i` (quoted strings skipped).
    let skip = |mut i: usize, close: char| {
        while i < chars.len() && chars[i] != close {
            if chars[i] == '"' {
                i += 1;
                while i < chars.len() && chars[i] != '"' {
                    i += 1 + usize::from(chars[i] == '\\');
                }
            }
            i += 1;
        }
        i + 1
    };
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if LABEL_LISTS.contains(&word.as_str()) {
                while i < chars.len() && chars[i] == ' ' {
                    i += 1;
                }
                if chars.get(i) == Some(&'(') {
                    i = skip(i + 1, ')');
                }
            } else if word.starts_with("portcullis_") || word.starts_with("gen_ai_") {
                names.insert(word);
            }
        } else if c == '{' {
            i = skip(i + 1, '}');
        } else if c == '"' {
            i = skip(i + 1, '"');
        } else {
            i += 1;
        }
    }
    names
}

/// Sample names and histogram bucket bounds of a Prometheus text exposition.
fn exported(exposition: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut names = BTreeSet::new();
    let mut bounds = BTreeSet::new();
    for line in exposition.lines().filter(|l| !l.starts_with('#')) {
        let name: String = line
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        if let Some(rest) = line.split("le=\"").nth(1) {
            bounds.insert(rest.split('"').next().unwrap_or_default().to_string());
        }
        if !name.is_empty() {
            names.insert(name);
        }
    }
    (names, bounds)
}

/// One Route per behaviour the dashboard and alerts watch: priced and budgeted calls (plain and
/// streamed), a rate limit, an unpriced model, a backend pool whose first backend fails (retries,
/// ejections), a provider refusing the key, and a Route only a ServiceAccount may call (TokenReview).
fn traffic(cp: &ControlPlane, gw: &Gateway, ns: &str) {
    let ok = sim();
    let failing = sim();
    let refusing = sim();
    failing.set_fault(Fault::Status {
        status: 503,
        body: r#"{"error":{"message":"down","type":"server_error"}}"#.into(),
        retry_after: None,
    });
    refusing.set_fault(Fault::Status {
        status: 401,
        body: r#"{"error":{"message":"Incorrect API key provided","type":"invalid_request_error","code":"invalid_api_key"}}"#.into(),
        retry_after: None,
    });
    let fields = |sim: &SimProvider, name: &str| {
        format!(
            "provider: openai, name: {name}, apiBase: \"{}\", secretRef: {{name: key}}",
            sim.openai_base()
        )
    };
    let model = |sim: &SimProvider, name: &str| format!("{{{}}}", fields(sim, name));
    let route = |name: &str, body: &str| {
        format!(
            "apiVersion: portcullis.dev/v1alpha1\nkind: Route\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  routeType: llm/v1/chat\n{body}"
        )
    };
    cp.ok(&["create", "serviceaccount", "caller", "-n", ns]);
    let manifests = [
        secret_manifest(ns, "key", "apiKey", "sk-dashboard"),
        route(
            "dash-chat",
            &format!(
                "  model: {}\n  limits:\n    - {{renewalPeriod: day, usd: 100}}\n    - {{renewalPeriod: day, tokens: 1000000}}\n",
                model(&ok, "gpt-4o-mini")
            ),
        ),
        route(
            "dash-limited",
            &format!(
                "  model: {}\n  limits:\n    - {{renewalPeriod: minute, calls: 1}}\n",
                model(&ok, "gpt-4o-mini")
            ),
        ),
        route(
            "dash-unpriced",
            &format!("  model: {}\n", model(&ok, "portcullis-unpriced-model")),
        ),
        route(
            "dash-pool",
            &format!(
                "  backends:\n    - {{{}, priority: 0}}\n    - {{{}, priority: 1}}\n  retry: {{attempts: 2}}\n  outlierDetection: {{consecutiveFailures: 1}}\n",
                fields(&failing, "gpt-4o-mini"),
                fields(&ok, "gpt-4o")
            ),
        ),
        route(
            "dash-refused",
            &format!("  model: {}\n", model(&refusing, "gpt-4o-mini")),
        ),
        route(
            "dash-private",
            &format!(
                "  model: {}\n  access:\n    - serviceAccount: {ns}/caller\n",
                model(&ok, "gpt-4o-mini")
            ),
        ),
    ];
    cp.apply(&manifests.join("---\n"));
    for name in [
        "dash-chat",
        "dash-limited",
        "dash-unpriced",
        "dash-pool",
        "dash-refused",
        "dash-private",
    ] {
        cp.wait_ready(ns, name);
    }
    eventually(Duration::from_secs(10), || gw.chat("dash-chat").0 == 200)
        .expect("dash-chat never served");
    for _ in 0..3 {
        assert_eq!(gw.chat("dash-chat").0, 200);
    }
    let (status, _, text) = post_full(
        &gw.url("/v1/chat/completions"),
        &json!({"model": "dash-chat", "stream": true, "stream_options": {"include_usage": true},
                "messages": [{"role": "user", "content": "hello there"}]}),
    );
    assert_eq!(status, 200, "{text}");
    assert_eq!(gw.chat("dash-limited").0, 200);
    assert_eq!(gw.chat("dash-limited").0, 429);
    assert_eq!(gw.chat("dash-unpriced").0, 200);
    for _ in 0..3 {
        assert_eq!(gw.chat("dash-pool").0, 200);
    }
    assert_eq!(gw.chat("dash-refused").0, 502);
    let token = cp.token(ns, "caller", "portcullis");
    let (status, _) = http_request(
        "POST",
        &gw.url("/v1/chat/completions"),
        Some(r#"{"model":"dash-private","messages":[{"role":"user","content":"hi"}]}"#),
        &[
            ("content-type", "application/json"),
            ("authorization", &format!("Bearer {token}")),
        ],
    );
    assert_eq!(status, 200);
}

#[test]
fn dashboard_and_alerts_name_only_metrics_a_running_gateway_exports() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("dash");
    let gw = Gateway::start(cp, &["--namespace", &ns]);
    traffic(cp, &gw, &ns);
    let exposition = gw.metrics();
    let (names, bounds) = exported(&exposition);
    // The gauges behind the budget, leader and replica panels carry the values they describe.
    for line in [
        format!(
            "portcullis_budget_limit{{kind=\"Route\",name=\"{ns}/dash-chat\",limit=\"usd\",period=\"day\"}} 100.0"
        ),
        format!(
            "portcullis_budget_limit{{kind=\"Route\",name=\"{ns}/dash-chat\",limit=\"tokens\",period=\"day\"}} 1000000.0"
        ),
        "portcullis_leader 1".to_string(),
        "portcullis_replicas 1".to_string(),
    ] {
        assert!(
            exposition.lines().any(|l| l == line),
            "no {line:?} in\n{exposition}"
        );
    }

    let mut used: BTreeMap<String, String> = BTreeMap::new();
    for (title, expr) in dashboard_queries() {
        for name in metric_names(&expr) {
            used.entry(name)
                .or_insert_with(|| format!("dashboard panel {title:?}"));
        }
    }
    let rules: Value = serde_yaml::from_str(&read(RULES)).unwrap();
    for rule in rules["groups"][0]["rules"].as_array().unwrap() {
        for name in metric_names(rule["expr"].as_str().unwrap()) {
            used.entry(name)
                .or_insert_with(|| format!("alert {}", rule["alert"].as_str().unwrap()));
        }
    }
    assert!(used.len() > 20, "{used:?}");
    let missing: Vec<String> = used
        .iter()
        .filter(|(name, _)| !names.contains(*name))
        .map(|(name, user)| format!("{name} (used by {user})"))
        .collect();
    assert!(
        missing.is_empty(),
        "not exported by the gateway: {missing:?}\nexported: {names:?}"
    );
    // The latency SLO's bucket bound is one the histograms have.
    let all = format!("{}{}", read(DASHBOARD), read(RULES));
    for part in all
        .split("le=\\\"")
        .skip(1)
        .chain(all.split("le=\"").skip(1))
    {
        let bound = part.split(['"', '\\']).next().unwrap();
        assert!(
            bounds.contains(bound),
            "no bucket le=\"{bound}\" in {bounds:?}"
        );
    }
    // The old names would be caught (a renamed metric fails here, not in Grafana).
    assert!(!names.contains("portcullis_requests"));
    assert!(
        metric_names("sum(rate(portcullis_x_total{a=\"portcullis_y\"}[5m]))")
            == BTreeSet::from(["portcullis_x_total".to_string()])
    );
}

/// Helm's own life cycle on a real API server (no kubelet: objects, not pods; the pods' side is
/// `make cluster-test`): install creates the CRDs from the chart's crds/, upgrade and rollback
/// change the Deployment's image, uninstall removes the gateway and leaves the CRDs.
#[test]
fn helm_install_upgrade_rollback_and_uninstall_leave_the_crds() {
    let cp = ControlPlane::start_private();
    // Helm installs crds/ only where they are missing: start from a cluster without them.
    cp.ok(&[
        "delete",
        "crd",
        "routes.portcullis.dev",
        "teams.portcullis.dev",
        "guardrailpolicies.portcullis.dev",
        "--wait",
    ]);
    let chart = repo_path(CHART);
    let chart = path_str(&chart);
    let helm = |args: &[&str]| cp.helm_ok(args);
    let ns = "portcullis-system";
    let image = || {
        cp.json(&["get", "deployment", "-n", ns, "portcullis"])["spec"]["template"]["spec"]
            ["containers"][0]["image"]
            .as_str()
            .unwrap()
            .to_string()
    };
    helm(&[
        "install",
        "portcullis",
        chart,
        "-n",
        ns,
        "--create-namespace",
    ]);
    cp.ok(&[
        "wait",
        "--for=condition=Established",
        "crd/routes.portcullis.dev",
        "crd/teams.portcullis.dev",
        "crd/guardrailpolicies.portcullis.dev",
        "crd/mcpservers.portcullis.dev",
        "--timeout=60s",
    ]);
    assert_eq!(image(), "portcullis:0.1.0");
    helm(&[
        "upgrade",
        "portcullis",
        chart,
        "-n",
        ns,
        "--reuse-values",
        "--set",
        "image.tag=0.1.0-next",
    ]);
    assert_eq!(image(), "portcullis:0.1.0-next");
    helm(&["rollback", "portcullis", "1", "-n", ns]);
    assert_eq!(image(), "portcullis:0.1.0");
    let history: Value =
        serde_json::from_str(&helm(&["history", "portcullis", "-n", ns, "-o", "json"])).unwrap();
    assert_eq!(history.as_array().unwrap().len(), 3);

    // A Route made while installed outlives the uninstall.
    cp.apply(&route_manifest(
        ns,
        "kept",
        "llm/v1/chat",
        "key",
        "https://api.openai.com/v1",
    ));
    helm(&["uninstall", "portcullis", "-n", ns]);
    let out = cp.kubectl(&["get", "deployment", "-n", ns, "portcullis"]);
    assert!(
        !out.status.success(),
        "the Deployment outlived helm uninstall"
    );
    cp.ok(&[
        "get",
        "crd",
        "routes.portcullis.dev",
        "teams.portcullis.dev",
        "guardrailpolicies.portcullis.dev",
    ]);
    cp.ok(&["get", "route.portcullis.dev", "-n", ns, "kept"]);
}
