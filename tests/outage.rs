//! The data plane keeps serving through API server outages and converges afterwards. Each test
//! runs its own control plane, because it stops parts of it.

mod support;

use std::process::Command;
use std::time::Duration;

use support::*;

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill {sig} {pid}");
}

#[test]
fn serves_the_last_good_table_while_the_api_server_is_down_and_resyncs_after() {
    let cp = ControlPlane::start_private();
    let sim = sim();
    let ns = cp.namespace("outage");
    let gw = Gateway::start(&cp, &["--namespace", &ns]);
    cp.apply(&openai_manifests(&ns, "before", "openai", "sk-1", &sim));
    cp.wait_ready(&ns, "before");
    eventually(Duration::from_secs(5), || gw.chat("before").0 == 200).expect("route never served");

    cp.stop_apiserver();
    for _ in 0..20 {
        assert_eq!(
            gw.chat("before").0,
            200,
            "stopped serving while the API server is down"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        gw.get("/readyz").0,
        200,
        "readiness must not drop while the last good table serves"
    );

    cp.start_apiserver();
    cp.apply(&route_manifest(
        &ns,
        "after",
        "llm/v1/chat",
        "openai",
        &sim.openai_base(),
    ));
    eventually(Duration::from_secs(20), || gw.chat("after").0 == 200)
        .expect("a change made after the restart was never picked up");
    cp.wait_ready(&ns, "after");
    assert_eq!(gw.chat("before").0, 200);
}

#[test]
fn a_relist_after_410_gone_drops_routes_deleted_while_disconnected() {
    // Without the watch cache, resuming a watch from a compacted revision fails with 410 Gone.
    let cp = ControlPlane::start_with_args("--watch-cache=false");
    let sim = sim();
    let ns = cp.namespace("gone");
    let gw = Gateway::start(&cp, &["--namespace", &ns]);
    cp.apply(&format!(
        "{}---\n{}",
        openai_manifests(&ns, "keep", "openai", "sk-1", &sim),
        route_manifest(&ns, "drop", "llm/v1/chat", "openai", &sim.openai_base())
    ));
    cp.wait_ready(&ns, "keep");
    cp.wait_ready(&ns, "drop");
    eventually(Duration::from_secs(5), || gw.chat("drop").0 == 200).expect("route never served");

    // Freeze the gateway across an API server restart, delete a Route, and compact etcd past it.
    cp.stop_apiserver();
    signal(gw.pid(), "-STOP");
    cp.start_apiserver();
    cp.ok(&["delete", "-n", &ns, "route.portcullis.dev", "drop"]);
    for i in 0..3 {
        cp.ok(&["create", "configmap", "-n", &ns, &format!("churn-{i}")]);
    }
    cp.compact_etcd();
    signal(gw.pid(), "-CONT");

    eventually(Duration::from_secs(30), || gw.chat("drop").0 == 404).unwrap_or_else(|_| {
        panic!(
            "the deleted route is still served after the relist; log:\n{}",
            gw.log()
        )
    });
    assert_eq!(gw.chat("keep").0, 200);
    let log = gw.log();
    assert!(
        log.contains("410") || log.contains("Expired") || log.contains("too old"),
        "no 410 Gone was seen; log:\n{log}"
    );
}
