//! Hostile or careless tenants: what the operator lets Routes use (Secrets, upstream hosts).
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use support::*;

#[test]
fn the_operator_narrows_which_secrets_and_hosts_routes_may_use() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("tenant");
    let sim = sim();
    let gw = Gateway::start(
        cp,
        &[
            "--namespace",
            &ns,
            "--secret-selector",
            "portcullis.dev/provider-key=true",
            "--allowed-upstream-hosts",
            "127.0.0.1,*.openai.azure.com",
        ],
    );
    let labelled = format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: blessed\n  namespace: {ns}\n  labels:\n    portcullis.dev/provider-key: \"true\"\nstringData:\n  apiKey: sk-blessed\n"
    );
    cp.apply(&format!(
        "{labelled}---\n{}---\n{}---\n{}---\n{}---\n{}",
        secret_manifest(&ns, "someones-db-password", "apiKey", "hunter2"),
        route_manifest(&ns, "good", "llm/v1/chat", "blessed", &sim.openai_base()),
        route_manifest(
            &ns,
            "exfil",
            "llm/v1/chat",
            "someones-db-password",
            &sim.openai_base()
        ),
        route_manifest(
            &ns,
            "metadata",
            "llm/v1/chat",
            "blessed",
            "http://169.254.169.254/latest"
        ),
        route_manifest(
            &ns,
            "elsewhere",
            "llm/v1/chat",
            "blessed",
            "https://api.example.com/v1"
        ),
    ));
    cp.wait_ready(&ns, "good");
    assert_eq!(gw.chat("good").0, 200);
    cp.wait_reason(&ns, "exfil", "SecretNotAllowed");
    cp.wait_reason(&ns, "metadata", "EgressDenied");
    cp.wait_reason(&ns, "elsewhere", "EgressDenied");
    let message = |route: &str| {
        cp.json(&["get", "-n", &ns, "route.portcullis.dev", route])["status"]["conditions"][0]
            ["message"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(message("exfil").contains("--secret-selector"));
    assert!(message("metadata").contains("link-local or cloud metadata"));
    assert!(message("elsewhere").contains("not in the gateway's allowed upstream hosts"));
    // Nothing was sent with the Secret the selector refused, and it is nowhere in the output.
    assert!(
        sim.requests()
            .iter()
            .all(|r| r.header("authorization") == Some("Bearer sk-blessed"))
    );
    assert!(!gw.log().contains("hunter2") && !gw.metrics().contains("hunter2"));
    assert_ne!(gw.chat("exfil").0, 200);
}

/// The metadata deny-list is not fooled by spelling: an IPv4-mapped IPv6 literal, the root's
/// trailing dot, and a Bedrock `{region}` that completes an address after the check.
#[test]
fn metadata_addresses_in_disguise_are_refused() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("tenant-meta");
    let sim = sim();
    let _gw = Gateway::start(cp, &["--namespace", &ns]);
    cp.apply(&format!(
        "{}---\n{}---\n{}---\n{}---\n{}---\n{}",
        secret_manifest(&ns, "key", "apiKey", "sk-1"),
        secret_with(
            &ns,
            "aws",
            &[
                ("awsAccessKeyId", "AKIA1"),
                ("awsSecretAccessKey", "s3cr3t")
            ]
        ),
        route_manifest(&ns, "good", "llm/v1/chat", "key", &sim.openai_base()),
        route_manifest(
            &ns,
            "mapped",
            "llm/v1/chat",
            "key",
            "http://[::ffff:169.254.169.254]/latest"
        ),
        route_manifest(
            &ns,
            "dotted",
            "llm/v1/chat",
            "key",
            "http://metadata.google.internal./computeMetadata/v1"
        ),
        provider_route(
            &ns,
            "region",
            "llm/v1/chat",
            "bedrock",
            "anthropic.claude-3-haiku",
            "http://169.254.169.{region}",
            Some("aws"),
            &[("region", "254")]
        ),
    ));
    cp.wait_ready(&ns, "good");
    for route in ["mapped", "dotted", "region"] {
        cp.wait_reason(&ns, route, "EgressDenied");
        let message =
            cp.json(&["get", "-n", &ns, "route.portcullis.dev", route])["status"]["conditions"][0]
                ["message"]
                .as_str()
                .unwrap()
                .to_string();
        assert!(
            message.contains("link-local or cloud metadata"),
            "{route}: {message}"
        );
    }
}
