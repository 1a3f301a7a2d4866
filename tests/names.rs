//! `--public-namespaces`: a gateway that watches every namespace with its own naming policy, so it
//! runs against its own control plane (a shared one would have other tests' gateways disagree).
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::*;

#[test]
fn outside_public_namespaces_routes_serve_only_by_their_qualified_name() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let public = cp.namespace("public");
    let private = cp.namespace("private");
    let gw = Gateway::start(cp, &["--public-namespaces", &public]);
    let route = unique("squat");
    // The private Route is older, yet cannot take the name from the public namespace's Route.
    cp.apply(&openai_manifests(
        &private,
        &route,
        "openai",
        "sk-private",
        &sim,
    ));
    cp.wait_ready(&private, &route);
    std::thread::sleep(Duration::from_millis(1100));
    cp.apply(&openai_manifests(
        &public,
        &route,
        "openai",
        "sk-public",
        &sim,
    ));
    cp.wait_ready(&public, &route);
    let (status, reason, message) = cp.short_name(&private, &route).unwrap();
    assert_eq!((status.as_str(), reason.as_str()), ("False", "NotPublic"));
    assert!(message.contains("--public-namespaces"), "{message}");
    assert_eq!(gw.chat(&route).0, 200);
    assert_eq!(
        sim.last_request().unwrap().header("authorization"),
        Some("Bearer sk-public")
    );
    assert_eq!(gw.chat(&format!("{private}/{route}")).0, 200);
    assert_eq!(
        sim.last_request().unwrap().header("authorization"),
        Some("Bearer sk-private")
    );
}
