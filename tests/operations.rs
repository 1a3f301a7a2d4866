//! Operating the gateway: metrics, request ids and logs, graceful shutdown, and several replicas
//! with one leader writing status.

mod support;

use std::io::Read;
use std::time::{Duration, Instant};

use portcullis_sim::Behaviour;
use serde_json::json;
use support::*;

#[test]
fn metrics_request_ids_and_logs_describe_each_call_without_prompts() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("observe");
    let route = unique("chat");
    let gw = Gateway::start(cp, &["--namespace", &ns]);
    cp.apply(&openai_manifests(&ns, &route, "openai", "sk-obs", &sim));
    cp.wait_ready(&ns, &route);
    eventually(Duration::from_secs(5), || gw.chat(&route).0 == 200).expect("route never served");

    let body =
        json!({"model": route, "messages": [{"role": "user", "content": "a very private prompt"}]})
            .to_string();
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("x-request-id", "req-from-caller-42")
        .body(body)
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["x-request-id"], "req-from-caller-42");
    let generated = client().get(gw.url("/v1/models")).send().unwrap();
    assert!(
        !generated.headers()["x-request-id"].is_empty(),
        "a request id is generated when none is sent"
    );
    // A streamed call, for time-to-first-token.
    let (status, _) = gw.post(
        "/v1/chat/completions",
        &json!({"model": route, "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
    );
    assert_eq!(status, 200);
    gw.chat("no-such-route");

    let metrics = eventually(Duration::from_secs(5), || {
        gw.metrics()
            .contains("gen_ai_server_time_to_first_token_seconds_count{")
    })
    .map(|_| gw.metrics())
    .expect("no time-to-first-token metric");
    let has = |needle: &str| assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    has(&format!(
        "portcullis_requests_total{{route=\"{route}\",gen_ai_provider_name=\"openai\",surface=\"openai\",status=\"200\"}}"
    ));
    has(
        "portcullis_requests_total{route=\"\",gen_ai_provider_name=\"\",surface=\"openai\",status=\"404\"}",
    );
    has(&format!(
        "gen_ai_client_token_usage_total{{route=\"{route}\",gen_ai_provider_name=\"openai\",gen_ai_request_model=\"gpt-4o-mini\",consumer=\"\",gen_ai_token_type=\"output\"}}"
    ));
    has("gen_ai_server_request_duration_seconds_bucket");
    has("gen_ai_client_operation_duration_seconds_bucket");
    has("portcullis_routes{reason=\"Resolved\"} 1");
    has("portcullis_reconciles_total");
    assert!(
        !metrics.contains("no-such-route"),
        "label values must not come from request input"
    );

    let log = gw.log();
    let line = log
        .lines()
        .find(|l| l.contains("req-from-caller-42"))
        .expect("a log line with the request id");
    let entry: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(entry["route"], route.as_str());
    assert_eq!(entry["provider"], "openai");
    assert_eq!(entry["status"], 200);
    assert_eq!(entry["completion_tokens"], 20);
    assert!(entry["latency_ms"].as_f64().is_some());
    assert!(
        !log.contains("a very private prompt"),
        "prompts are never logged"
    );
    assert!(log.contains("stream finished"));
}

#[test]
fn sigterm_fails_readiness_at_once_and_lets_an_open_stream_finish() {
    let cp = ControlPlane::shared();
    let sim = sim();
    sim.set_behaviour(Behaviour {
        chunk_delay: Duration::from_millis(100),
        answer_words: 25,
        ..Default::default()
    });
    let ns = cp.namespace("drain");
    let route = unique("chat");
    let mut gw = Gateway::start(cp, &["--namespace", &ns, "--shutdown-delay", "1"]);
    cp.apply(&openai_manifests(&ns, &route, "openai", "sk-drain", &sim));
    cp.wait_ready(&ns, &route);
    eventually(Duration::from_secs(5), || gw.chat(&route).0 == 200).expect("route never served");

    let url = gw.url("/v1/chat/completions");
    let body =
        json!({"model": route, "stream": true, "messages": [{"role": "user", "content": "long"}]})
            .to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut resp = client()
            .post(url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .unwrap();
        let mut first = [0u8; 16];
        let n = resp.read(&mut first).unwrap();
        tx.send(()).unwrap();
        let mut rest = String::new();
        resp.read_to_string(&mut rest).unwrap();
        format!("{}{rest}", String::from_utf8_lossy(&first[..n]))
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the stream never started");
    let signalled = Instant::now();
    gw.terminate();
    eventually(Duration::from_secs(1), || gw.get("/readyz").0 == 503)
        .expect("readiness did not fail at once");
    eprintln!("readiness false after {:?}", signalled.elapsed());

    let streamed = reader.join().unwrap();
    assert!(
        streamed.contains("word25"),
        "the stream was cut short:\n{streamed}"
    );
    assert!(streamed.trim_end().ends_with("data: [DONE]"), "{streamed}");
    let status = gw
        .wait_exit(Duration::from_secs(20))
        .expect("the gateway did not exit after draining");
    assert!(status.success(), "exit status {status:?}");
    assert!(
        signalled.elapsed() >= Duration::from_secs(2),
        "the process must wait for the stream"
    );
}

fn lease_holder(cp: &ControlPlane, ns: &str) -> Option<String> {
    let out = cp.kubectl(&[
        "get",
        "lease",
        "-n",
        ns,
        "portcullis-leader",
        "-o",
        "jsonpath={.spec.holderIdentity}",
    ]);
    let holder = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !holder.is_empty()).then_some(holder)
}

#[test]
fn two_replicas_serve_one_leader_writes_status_and_leadership_moves_when_it_dies() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("replicas");
    let election = |id: &str| {
        vec![
            "--namespace".to_string(),
            ns.clone(),
            "--leader-election".into(),
            "--lease-namespace".into(),
            ns.clone(),
            "--lease-duration".into(),
            "4".into(),
            "--lease-grace".into(),
            "1".into(),
            "--identity".into(),
            id.to_string(),
        ]
    };
    let args_a = election("gw-a");
    let args_b = election("gw-b");
    let mut a = Some(Gateway::start(
        cp,
        &args_a.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    let mut b = Some(Gateway::start(
        cp,
        &args_b.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    eventually(Duration::from_secs(15), || lease_holder(cp, &ns).is_some())
        .expect("nobody took the lease");
    let leader = lease_holder(cp, &ns).unwrap();

    let first = unique("chat");
    cp.apply(&openai_manifests(&ns, &first, "openai", "sk-r", &sim));
    cp.wait_ready(&ns, &first);
    for gw in [a.as_ref().unwrap(), b.as_ref().unwrap()] {
        eventually(Duration::from_secs(5), || gw.chat(&first).0 == 200)
            .expect("a replica does not serve");
    }
    let (leading, following) = if leader == "gw-a" { (&a, &b) } else { (&b, &a) };
    assert!(
        leading
            .as_ref()
            .unwrap()
            .log()
            .contains("wrote Route status")
    );
    assert!(
        !following
            .as_ref()
            .unwrap()
            .log()
            .contains("wrote Route status"),
        "a follower wrote status"
    );

    // No flapping: the status stays put while both replicas run.
    let rv = |name: &str| {
        cp.json(&["get", "-n", &ns, "route.portcullis.dev", name])["metadata"]["resourceVersion"]
            .clone()
    };
    let before = rv(&first);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(rv(&first), before, "status changed with nothing to change");

    // Kill the leader hard (no lease release): the follower takes over within the lease duration.
    let killed_at = Instant::now();
    if leader == "gw-a" {
        a.take();
    } else {
        b.take();
    }
    let successor = if leader == "gw-a" { "gw-b" } else { "gw-a" };
    eventually(Duration::from_secs(10), || {
        lease_holder(cp, &ns).as_deref() == Some(successor)
    })
    .expect("leadership never moved");
    let moved = killed_at.elapsed();
    eprintln!("leadership moved after {moved:?}");
    assert!(
        moved <= Duration::from_secs(4 + 3),
        "took {moved:?}, longer than the lease duration allows"
    );

    let second = unique("chat");
    cp.apply(&openai_manifests(&ns, &second, "openai", "sk-r", &sim));
    cp.wait_ready(&ns, &second);
    let survivor = a.as_ref().or(b.as_ref()).unwrap();
    assert!(survivor.log().contains("wrote Route status"));
    assert_eq!(survivor.chat(&second).0, 200);
}

#[test]
fn traceparent_reaches_the_provider_and_spans_are_exported_over_otlp() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let collector = support::sim(); // records every POST, so it doubles as an OTLP/HTTP receiver
    let ns = cp.namespace("trace");
    let route = unique("chat");
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let call = |gw: &Gateway| {
        let resp = client()
            .post(gw.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .header("traceparent", &caller)
            .body(
                json!({"model": route, "messages": [{"role": "user", "content": "hi"}]})
                    .to_string(),
            )
            .send()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        sim.last_request()
            .unwrap()
            .header("traceparent")
            .map(str::to_string)
    };
    // Without an exporter the caller's context is passed on as it came.
    let plain = Gateway::start(cp, &["--namespace", &ns]);
    cp.apply(&openai_manifests(&ns, &route, "openai", "sk-trace", &sim));
    cp.wait_ready(&ns, &route);
    eventually(Duration::from_secs(5), || plain.chat(&route).0 == 200).expect("route never served");
    assert_eq!(call(&plain).as_deref(), Some(caller.as_str()));
    drop(plain);

    // With OTLP on: same trace, a new parent span (the gateway's), and spans exported at shutdown.
    let endpoint = format!("http://{}/v1/traces", collector.addr);
    let mut gw = Gateway::start(
        cp,
        &[
            "--namespace",
            &ns,
            "--otlp-endpoint",
            &endpoint,
            "--shutdown-delay",
            "0",
        ],
    );
    eventually(Duration::from_secs(5), || gw.chat(&route).0 == 200).expect("route never served");
    let sent = call(&gw).expect("no traceparent sent upstream");
    let parts: Vec<&str> = sent.split('-').collect();
    assert_eq!(parts[1], trace_id, "the trace id must be kept");
    assert_ne!(
        parts[2], "00f067aa0ba902b7",
        "the upstream call is a child span of the gateway"
    );
    gw.terminate();
    assert!(
        gw.wait_exit(Duration::from_secs(20))
            .is_some_and(|s| s.success())
    );
    let exported = collector
        .requests()
        .into_iter()
        .find(|r| r.path == "/v1/traces")
        .expect("no spans exported");
    assert_eq!(
        exported.header("content-type"),
        Some("application/x-protobuf")
    );
    let body = exported.body.to_vec();
    let contains = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
    let raw_trace_id: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    assert!(
        contains(&raw_trace_id),
        "exported spans are not in the caller's trace"
    );
    for attribute in [
        "gen_ai.operation.name",
        "gen_ai.provider.name",
        "gen_ai.request.model",
        "gen_ai.usage.output_tokens",
    ] {
        assert!(
            contains(attribute.as_bytes()),
            "missing span attribute {attribute}"
        );
    }
    assert!(!contains(b"sk-trace"), "a credential was exported");
}
