//! The shipped manifests: `kubectl apply -k deploy/` on a real API server, and the gateway running
//! with exactly the RBAC they grant (a ServiceAccount token from the TokenRequest API).

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
