//! The shipped manifests: `kubectl apply -k deploy/` on a real API server, and the gateway running
//! with exactly the RBAC they grant (a ServiceAccount token from the TokenRequest API).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: failing loudly is the point

mod support;

use std::time::Duration;

use support::*;

fn repo_path(p: &str) -> String {
    format!("{}/{p}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn deploy_manifests_apply_and_their_rbac_is_exactly_enough() {
    let cp = ControlPlane::start_private();
    // Server-side dry runs cannot create the namespace the other objects go into.
    cp.ok(&["create", "namespace", "portcullis-system"]);
    cp.ok(&["apply", "-k", &repo_path("deploy"), "--dry-run=server"]);
    cp.ok(&[
        "apply",
        "-k",
        &repo_path("deploy/overlays/namespaced"),
        "--dry-run=server",
    ]);
    // The optional ServiceMonitor component composes with the base.
    let rendered = cp.ok(&["kustomize", &repo_path("deploy/overlays/monitored")]);
    assert!(rendered.contains("kind: ServiceMonitor") && rendered.contains("kind: Deployment"));

    cp.ok(&["apply", "-k", &repo_path("deploy")]);
    let deployment = cp.json(&["get", "deployment", "-n", "portcullis-system", "portcullis"]);
    assert_eq!(deployment["spec"]["replicas"], 2);
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");

    let tmp = tempfile::tempdir().unwrap();
    let kubeconfig =
        cp.service_account_kubeconfig("portcullis-system", "portcullis", &tmp.path().join("sa"));
    let gw = Gateway::start_with_kubeconfig(
        &kubeconfig,
        &[
            "--leader-election",
            "--lease-namespace",
            "portcullis-system",
            "--identity",
            "rbac-test",
            "--replicas-service",
            "portcullis",
        ],
    );

    let sim = sim();
    let ns = cp.namespace("team");
    cp.apply(&openai_manifests(
        &ns,
        "rbac-chat",
        "openai",
        "sk-rbac",
        &sim,
    ));
    cp.wait_ready(&ns, "rbac-chat");
    eventually(Duration::from_secs(5), || gw.chat("rbac-chat").0 == 200)
        .expect("route never served");
    let lease = cp.json(&[
        "get",
        "lease",
        "-n",
        "portcullis-system",
        "portcullis-leader",
    ]);
    assert_eq!(lease["spec"]["holderIdentity"], "rbac-test");
    eventually(Duration::from_secs(5), || {
        cp.ok(&["get", "events", "-n", &ns]).contains("Resolved")
    })
    .expect("no Event recorded");
    eventually(Duration::from_secs(5), || {
        gw.log().contains("replica count for local limit shares")
    })
    .unwrap_or_else(|_| panic!("the EndpointSlice watch never synced:\n{}", gw.log()));
    assert!(
        !gw.log().contains("forbidden"),
        "the shipped RBAC is not enough:\n{}",
        gw.log()
    );

    // TokenReview: a caller's projected ServiceAccount token is checked with exactly this RBAC.
    cp.ok(&["create", "serviceaccount", "caller", "-n", &ns]);
    let token = cp.ok(&[
        "create",
        "token",
        "caller",
        "-n",
        &ns,
        "--audience",
        "portcullis",
        "--duration",
        "10m",
    ]);
    cp.apply(&format!(
        "{}  access:\n    - serviceAccount: {ns}/caller\n",
        route_manifest(
            &ns,
            "rbac-restricted",
            "llm/v1/chat",
            "openai",
            &sim.openai_base()
        )
    ));
    cp.wait_ready(&ns, "rbac-restricted");
    let body = r#"{"model":"rbac-restricted","messages":[{"role":"user","content":"hi"}]}"#;
    let auth = format!("Bearer {}", token.trim());
    let call = |headers: &[(&str, &str)]| {
        http_request("POST", &gw.url("/v1/chat/completions"), Some(body), headers).0
    };
    let json = ("content-type", "application/json");
    eventually(Duration::from_secs(5), || {
        call(&[json, ("authorization", &auth)]) == 200
    })
    .unwrap_or_else(|_| {
        panic!(
            "a valid ServiceAccount token was not accepted:\n{}",
            gw.log()
        )
    });
    assert_eq!(
        call(&[json]),
        404,
        "anonymous: as if the route did not exist"
    );
    assert!(!gw.log().contains(token.trim()), "a token reached the log");

    // Take away the status permission: the gateway keeps serving and says exactly what is missing.
    let rules = cp.json(&["get", "clusterrole", "portcullis"])["rules"].clone();
    let status_rule = rules
        .as_array()
        .unwrap()
        .iter()
        .position(|r| r["resources"][0] == "routes/status")
        .unwrap();
    cp.ok(&[
        "patch",
        "clusterrole",
        "portcullis",
        "--type=json",
        &format!(r#"-p=[{{"op":"remove","path":"/rules/{status_rule}"}}]"#),
    ]);
    std::thread::sleep(Duration::from_millis(500));
    cp.apply(&route_manifest(
        &ns,
        "rbac-chat-2",
        "llm/v1/chat",
        "openai",
        &sim.openai_base(),
    ));
    eventually(Duration::from_secs(15), || {
        gw.log()
            .lines()
            .any(|l| l.contains("cannot patch resource") && l.contains("routes/status"))
    })
    .unwrap_or_else(|_| panic!("no log line names the missing permission:\n{}", gw.log()));
    eventually(Duration::from_secs(5), || gw.chat("rbac-chat-2").0 == 200)
        .expect("serving must not depend on status writes");
}

/// The objects of a kustomization, rendered by the real kubectl.
fn kustomize(cp: &ControlPlane, dir: &str) -> Vec<serde_json::Value> {
    yaml_documents(&cp.ok(&["kustomize", &repo_path(dir)]))
}

fn object<'a>(docs: &'a [serde_json::Value], kind: &str, name: &str) -> &'a serde_json::Value {
    docs.iter()
        .find(|d| {
            d["kind"] == kind
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n == name || n.starts_with(&format!("{name}-")))
        })
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn metrics_are_on_their_own_service_and_admitted_only_from_monitoring_namespaces() {
    let cp = ControlPlane::shared();
    let docs = kustomize(cp, "deploy");
    let service_ports = |name: &str| -> Vec<String> {
        object(&docs, "Service", name)["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["targetPort"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        service_ports("portcullis"),
        ["http"],
        "the data plane's Service"
    );
    let metrics = object(&docs, "Service", "portcullis-metrics");
    assert_eq!(service_ports("portcullis-metrics"), ["metrics"]);
    assert_eq!(
        metrics["metadata"]["labels"]["app.kubernetes.io/component"],
        "metrics"
    );

    // The ServiceMonitor selects the metrics Service only.
    let monitored = kustomize(cp, "deploy/overlays/monitored");
    let selector =
        &object(&monitored, "ServiceMonitor", "portcullis")["spec"]["selector"]["matchLabels"];
    for svc in ["portcullis", "portcullis-metrics"] {
        let labels = &object(&monitored, "Service", svc)["metadata"]["labels"];
        let selected = selector
            .as_object()
            .unwrap()
            .iter()
            .all(|(k, v)| &labels[k] == v);
        assert_eq!(
            selected,
            svc == "portcullis-metrics",
            "ServiceMonitor and Service {svc}"
        );
    }

    // The NetworkPolicy: data plane from every namespace, metrics from `monitoring` only.
    let policy = object(&docs, "NetworkPolicy", "portcullis");
    assert_eq!(
        policy["spec"]["policyTypes"],
        serde_json::json!(["Ingress"])
    );
    let pods = &object(&docs, "Deployment", "portcullis")["spec"]["template"]["metadata"]["labels"];
    for (k, v) in policy["spec"]["podSelector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(&pods[k], v, "the policy selects the gateway's pods");
    }
    let rules = policy["spec"]["ingress"].as_array().unwrap();
    assert_eq!(rules.len(), 2);
    let rule_for = |port: &str| {
        rules
            .iter()
            .find(|r| r["ports"][0]["port"] == port)
            .unwrap_or_else(|| panic!("no ingress rule for {port}"))
    };
    assert_eq!(
        rule_for("http")["from"],
        serde_json::json!([{"namespaceSelector": {}}])
    );
    assert_eq!(
        rule_for("metrics")["from"],
        serde_json::json!([{"namespaceSelector": {"matchExpressions": [
            {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["monitoring"]}]}}])
    );
    // Opting out is one component.
    let dir = repo_path(&format!("target/{}", unique("no-netpol")));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        format!("{dir}/kustomization.yaml"),
        "resources: [../../deploy]\ncomponents: [../../deploy/components/no-network-policy]\n",
    )
    .unwrap();
    let opted_out = yaml_documents(&cp.ok(&["kustomize", &dir]));
    let _ = std::fs::remove_dir_all(&dir);
    assert!(opted_out.iter().all(|d| d["kind"] != "NetworkPolicy"));
    assert!(opted_out.iter().any(|d| d["kind"] == "Deployment"));
}

/// The shipped policy ConfigMap's data: the environment the gateway's pods get (`envFrom`).
fn policy_env(docs: &[serde_json::Value]) -> Vec<(String, String)> {
    object(docs, "ConfigMap", "portcullis-policy")["data"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect()
}

fn as_env(vars: &[(String, String)]) -> Vec<(&str, &str)> {
    vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

#[test]
fn the_shipped_install_is_safe_by_default_and_each_switch_opens_it() {
    let cp = ControlPlane::shared();
    let docs = kustomize(cp, "deploy");
    let container =
        &object(&docs, "Deployment", "portcullis")["spec"]["template"]["spec"]["containers"][0];
    let config_map = object(&docs, "ConfigMap", "portcullis-policy");
    assert_eq!(
        container["envFrom"][0]["configMapRef"]["name"], config_map["metadata"]["name"],
        "the Deployment reads the policy"
    );
    let env = policy_env(&docs);
    let var = |name: &str| {
        env.iter()
            .find(|(k, _)| k == name)
            .unwrap_or_else(|| panic!("{name} not set: {env:?}"))
            .1
            .clone()
    };
    let hosts = var("PORTCULLIS_ALLOWED_UPSTREAM_HOSTS");
    for host in [
        "api.openai.com",
        "api.anthropic.com",
        "*.openai.azure.com",
        "generativelanguage.googleapis.com",
        "*.svc",
        "*.svc.cluster.local",
    ] {
        assert!(
            hosts.split(',').any(|h| h == host),
            "{host} missing from {hosts}"
        );
    }
    assert_eq!(
        var("PORTCULLIS_SECRET_SELECTOR"),
        "portcullis.dev/provider-key=true"
    );
    assert_eq!(var("PORTCULLIS_PUBLIC_NAMESPACES"), "portcullis-system");
    // The namespaced overlay serves only its own namespace: all its Routes keep their names.
    let namespaced = kustomize(cp, "deploy/overlays/namespaced");
    assert!(policy_env(&namespaced).contains(&("PORTCULLIS_PUBLIC_NAMESPACES".into(), "*".into())));

    // The shipped values on a running gateway: an unlabelled Secret, an unlisted host (the
    // simulated provider on loopback) and a one-word name outside the platform's namespace are
    // each refused; a labelled Secret sent to a listed host serves.
    let sim = sim();
    let ns = cp.namespace("safe");
    let in_cluster = format!("http://sim.{ns}.svc.cluster.local:9090/openai/v1");
    cp.apply(
        &[
            secret_manifest(&ns, "plain", "apiKey", "sk-plain"),
            provider_key_manifest(&ns, "labelled", "apiKey", "sk-safe"),
            route_manifest(
                &ns,
                "unlabelled",
                "llm/v1/chat",
                "plain",
                "https://api.openai.com/v1",
            ),
            route_manifest(
                &ns,
                "loopback",
                "llm/v1/chat",
                "labelled",
                &sim.openai_base(),
            ),
            route_manifest(
                &ns,
                "official",
                "llm/v1/chat",
                "labelled",
                "https://api.openai.com/v1",
            ),
            route_manifest(&ns, "service", "llm/v1/chat", "labelled", &in_cluster),
        ]
        .join("---\n"),
    );
    let gw = Gateway::start_with_env(cp, &["--namespace", &ns], &as_env(&env));
    cp.wait_reason(&ns, "unlabelled", "SecretNotAllowed");
    cp.wait_reason(&ns, "loopback", "EgressDenied");
    cp.wait_ready(&ns, "official");
    cp.wait_ready(&ns, "service");
    eventually(Duration::from_secs(10), || {
        cp.short_name(&ns, "official").is_some()
    })
    .expect("no ShortName condition");
    let (status, reason, _) = cp.short_name(&ns, "official").unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("False", "NotPublic"));
    drop(gw);

    // Each switch, as the README writes it, opens it.
    let dir = repo_path(&format!("target/{}", unique("opened")));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        format!("{dir}/kustomization.yaml"),
        "resources: [../../deploy]\nconfigMapGenerator:\n  - name: portcullis-policy\n    behavior: merge\n    literals:\n      - PORTCULLIS_ALLOWED_UPSTREAM_HOSTS=\n      - PORTCULLIS_SECRET_SELECTOR=\n      - PORTCULLIS_PUBLIC_NAMESPACES=*\n",
    )
    .unwrap();
    let opened = yaml_documents(&cp.ok(&["kustomize", &dir]));
    let _ = std::fs::remove_dir_all(&dir);
    let env = policy_env(&opened);
    let expected: Vec<(String, String)> = [
        ("PORTCULLIS_ALLOWED_UPSTREAM_HOSTS", ""),
        ("PORTCULLIS_PUBLIC_NAMESPACES", "*"),
        ("PORTCULLIS_SECRET_SELECTOR", ""),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(env, expected);
    let gw = Gateway::start_with_env(cp, &["--namespace", &ns], &as_env(&env));
    for route in ["unlabelled", "loopback"] {
        cp.wait_reason(&ns, route, "Resolved");
    }
    eventually(Duration::from_secs(10), || gw.chat("loopback").0 == 200)
        .expect("the opened gateway does not serve the loopback Route by its one-word name");
    let (status, reason, _) = cp.short_name(&ns, "official").unwrap();
    assert_eq!(status, "True", "{reason}");
}
