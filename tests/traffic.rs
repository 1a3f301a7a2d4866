//! Traffic policies end to end: Routes with several backends on the real control plane, simulated
//! providers that fail on command, and what each of them received.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use portcullis::api::{OutlierDetection, Provider, RetryPolicy, RouteSpec, RouteType};
use serde_json::{Value, json};
use support::*;

fn chat_body(route: &str, stream: bool) -> Value {
    json!({"model": route, "stream": stream, "messages": [{"role": "user", "content": "hello there"}]})
}

fn pool_spec(backends: Vec<portcullis::api::BackendSpec>) -> RouteSpec {
    let mut spec = RouteSpec::new(
        RouteType::Chat,
        model(
            Provider::Openai,
            "unused",
            "http://127.0.0.1:1/v1",
            "unused",
        ),
    );
    spec.model = None;
    spec.backends = backends;
    spec
}

/// Puts a simulated provider into a failure mode.
type Inject<'a> = Box<dyn Fn() + 'a>;

fn no_ejection() -> Option<OutlierDetection> {
    Some(OutlierDetection {
        consecutive_failures: Some(0),
        ..Default::default()
    })
}

/// Two OpenAI backends of equal weight and priority (keys a and b), each tried once per call.
fn equal_pair(
    (a, model_a): (&SimProvider, &str),
    (b, model_b): (&SimProvider, &str),
    outlier: OutlierDetection,
) -> RouteSpec {
    let mut spec = pool_spec(vec![
        backend(
            model(Provider::Openai, model_a, &a.openai_base(), "key-a"),
            1,
            0,
        ),
        backend(
            model(Provider::Openai, model_b, &b.openai_base(), "key-b"),
            1,
            0,
        ),
    ]);
    spec.retry = Some(RetryPolicy {
        attempts: Some(2),
        ..Default::default()
    });
    spec.outlier_detection = Some(outlier);
    spec
}

/// A namespace with the Secrets `key-a`, `key-b` and `anthropic`, and a gateway.
fn setup(prefix: &str) -> (&'static ControlPlane, String, Gateway) {
    let cp = ControlPlane::shared();
    let ns = cp.namespace(prefix);
    cp.apply(&format!(
        "{}---\n{}---\n{}",
        secret_manifest(&ns, "key-a", "apiKey", "sk-a"),
        secret_manifest(&ns, "key-b", "apiKey", "sk-b"),
        secret_manifest(&ns, "anthropic", "apiKey", "sk-ant"),
    ));
    let gw = Gateway::start(cp, &["--namespace", &ns]);
    (cp, ns, gw)
}

fn apply_route(cp: &ControlPlane, ns: &str, name: &str, spec: RouteSpec) {
    cp.apply(&route_yaml(ns, name, spec));
    cp.wait_ready(ns, name);
}

fn authorizations(sim: &SimProvider) -> Vec<String> {
    sim.requests()
        .iter()
        .filter_map(|r| r.header("authorization").map(str::to_string))
        .collect()
}

#[test]
fn weighted_split_spreads_calls_over_a_key_pool_and_names_the_backend() {
    let (cp, ns, gw) = setup("split");
    let sim = sim();
    apply_route(
        cp,
        &ns,
        "pool",
        pool_spec(vec![
            backend(
                model(Provider::Openai, "gpt-4o-mini", &sim.openai_base(), "key-a"),
                3,
                0,
            ),
            backend(
                model(Provider::Openai, "gpt-4o-mini", &sim.openai_base(), "key-b"),
                1,
                0,
            ),
        ]),
    );
    for _ in 0..400 {
        let (status, headers, _) =
            post_full(&gw.url("/v1/chat/completions"), &chat_body("pool", false));
        assert_eq!(status, 200);
        assert_eq!(
            header(&headers, "x-portcullis-backend"),
            Some("openai/gpt-4o-mini")
        );
        assert_eq!(header(&headers, "x-portcullis-attempts"), Some("1"));
    }
    let auth = authorizations(&sim);
    let a = auth.iter().filter(|h| *h == "Bearer sk-a").count();
    let b = auth.iter().filter(|h| *h == "Bearer sk-b").count();
    assert_eq!(a + b, 400, "every call used one of the two keys");
    // The exact distribution is unit-tested (10,000 picks within ±3%); this checks the wiring.
    assert!(
        (260..=340).contains(&a),
        "key a got {a} of 400 calls at weight 3:1"
    );
    let log = gw.log();
    assert!(
        log.contains("\"backend\":\"openai/gpt-4o-mini\""),
        "backend in the request log"
    );
    assert!(!log.contains("sk-a") && !log.contains("sk-b"));
    assert!(gw.metrics().contains(
        "portcullis_backend_requests_total{route=\"pool\",backend=\"openai/gpt-4o-mini\"} 400"
    ));
}

/// Every surface and mode a caller may use, with how to tell that it succeeded.
fn call_every_surface(gw: &Gateway, route: &str) -> Vec<(String, u16, Option<String>, String)> {
    let plain = json!({"messages": [{"role": "user", "content": "hello there"}]});
    let mut streamed = plain.clone();
    streamed["stream"] = json!(true);
    let calls = [
        ("/v1/chat/completions".to_string(), chat_body(route, false)),
        ("/v1/chat/completions".to_string(), chat_body(route, true)),
        (format!("/endpoints/{route}/invocations"), plain.clone()),
        (format!("/endpoints/{route}/invocations"), streamed),
        (format!("/gateway/{route}/invocations"), plain),
    ];
    calls
        .iter()
        .map(|(path, body)| {
            let (status, headers, text) = post_full(&gw.url(path), body);
            (
                format!("{path} stream={}", body["stream"] == json!(true)),
                status,
                header(&headers, "x-portcullis-backend").map(str::to_string),
                text,
            )
        })
        .collect()
}

/// The README's "Several backends" Route, applied as written there (plain `retryOn:` as kubectl
/// reads it) on the simulated providers, with its retry list cut to `rate-limited`.
#[test]
fn the_readme_retry_list_is_honoured_a_timeout_is_not_retried_unless_listed() {
    let (cp, ns, gw) = setup("readme-retry");
    let primary = sim();
    let fallback = sim();
    let block = readme_yaml_blocks()
        .into_iter()
        .find(|b| b.contains("name: assistant") && b.contains("retryOn:"))
        .expect("README's several-backends example");
    let edits = [
        ("namespace: team-a", format!("namespace: {ns}")),
        (
            "secretRef: {name: openai-key-a}",
            format!(
                "apiBase: {}, secretRef: {{name: key-a}}",
                primary.openai_base()
            ),
        ),
        (
            "secretRef: {name: openai-key-b}",
            format!(
                "apiBase: {}, secretRef: {{name: key-b}}",
                primary.openai_base()
            ),
        ),
        (
            "secretRef: {name: anthropic}",
            format!(
                "apiBase: {}, secretRef: {{name: anthropic}}",
                fallback.anthropic_base()
            ),
        ),
        (
            "retryOn: [rate-limited, unavailable, timeout, connect-failure]",
            "retryOn: [rate-limited]".into(),
        ),
        ("perTryTimeout: 30s", "perTryTimeout: 700ms".into()),
    ];
    let mut yaml = block.clone();
    for (from, to) in &edits {
        assert!(
            yaml.contains(from),
            "the README example no longer says {from:?}"
        );
        yaml = yaml.replace(from, to);
    }
    cp.apply(&yaml);
    cp.wait_ready(&ns, "assistant");
    let stored = cp.json(&["get", "-n", &ns, "route.portcullis.dev", "assistant"]);
    assert_eq!(stored["spec"]["retry"]["retryOn"], json!(["rate-limited"]));

    // A timeout is not in the list: the caller gets it, the fallback never sees the call.
    primary.set_fault(Fault::Delay(Duration::from_secs(5)));
    let (status, headers, _) = post_full(
        &gw.url("/v1/chat/completions"),
        &chat_body("assistant", false),
    );
    assert_eq!(status, 504);
    assert_eq!(header(&headers, "x-portcullis-attempts"), Some("1"));
    assert!(fallback.requests().is_empty(), "a timeout was retried");

    // A 429 is: both OpenAI keys, then Anthropic (`attempts: 3`).
    primary.set_fault(Fault::Status {
        status: 429,
        body: r#"{"error":{"message":"Rate limit reached","type":"requests"}}"#.into(),
        retry_after: None,
    });
    let (status, headers, _) = post_full(
        &gw.url("/v1/chat/completions"),
        &chat_body("assistant", false),
    );
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-portcullis-attempts"), Some("3"));
    assert_eq!(
        header(&headers, "x-portcullis-backend"),
        Some("anthropic/claude-sonnet-4-5")
    );

    // kubectl shows the backends, not empty columns.
    let table = cp.ok(&["get", "-n", &ns, "routes.portcullis.dev", "assistant"]);
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        row[..5],
        [
            "assistant",
            "llm/v1/chat",
            "openai,anthropic",
            "gpt-4o-mini",
            "+2"
        ],
        "{table}"
    );
}

#[test]
fn fallback_to_another_provider_hides_429_500_timeouts_and_refused_connections() {
    let (cp, ns, gw) = setup("fallback");
    let primary = sim();
    let fallback = sim();
    let mut spec = pool_spec(vec![
        backend(
            model(
                Provider::Openai,
                "gpt-4o-mini",
                &primary.openai_base(),
                "key-a",
            ),
            1,
            0,
        ),
        backend(
            model(
                Provider::Anthropic,
                "claude-sonnet-4-5",
                &fallback.anthropic_base(),
                "anthropic",
            ),
            1,
            1,
        ),
    ]);
    spec.retry = Some(RetryPolicy {
        per_try_timeout: Some("700ms".into()),
        ..Default::default()
    });
    // Every call must meet the failing primary first, so nothing is ejected here.
    spec.outlier_detection = no_ejection();
    apply_route(cp, &ns, "resilient", spec);

    let faults: [(&str, Inject); 6] = [
        (
            "429",
            Box::new(|| {
                primary.set_fault(Fault::Status {
                    status: 429,
                    body: r#"{"error":{"message":"Rate limit reached","type":"requests"}}"#.into(),
                    retry_after: None,
                })
            }),
        ),
        (
            "500",
            Box::new(|| {
                primary.set_fault(Fault::Status {
                    status: 500,
                    body: r#"{"error":{"message":"boom","type":"server_error"}}"#.into(),
                    retry_after: None,
                })
            }),
        ),
        (
            "529",
            Box::new(|| {
                primary.set_fault(Fault::Status {
                    status: 529,
                    body: r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#.into(),
                    retry_after: None,
                })
            }),
        ),
        (
            "hang",
            Box::new(|| primary.set_fault(Fault::Delay(Duration::from_secs(5)))),
        ),
        (
            "cut before the first chunk",
            Box::new(|| primary.set_fault(Fault::CutStream { after_frames: 0 })),
        ),
        ("refused", Box::new(|| primary.kill())),
    ];
    for (name, inject) in &faults {
        inject();
        primary.clear();
        fallback.clear();
        for (call, status, backend, text) in call_every_surface(&gw, "resilient") {
            if *name == "cut before the first chunk" && !call.contains("stream=true") {
                continue; // the fault only affects streams
            }
            assert_eq!(status, 200, "{name}: {call}: {text}");
            assert_eq!(
                backend.as_deref(),
                Some("anthropic/claude-sonnet-4-5"),
                "{name}: {call}"
            );
            assert!(text.contains("word1"), "{name}: {call}: {text}");
            if call.contains("stream=true") && call.starts_with("/v1/") {
                assert!(text.trim_end().ends_with("data: [DONE]"), "{name}: {call}");
            }
        }
        let to_anthropic = fallback.requests();
        assert!(
            to_anthropic
                .iter()
                .all(|r| r.path == "/anthropic/v1/messages"
                    && r.header("x-api-key") == Some("sk-ant")),
            "{name}: the fallback got Anthropic's wire format"
        );
        if *name != "refused" {
            assert!(
                !primary.requests().is_empty(),
                "{name}: the primary was tried first"
            );
        }
    }

    // A 400 is the caller's problem: returned unchanged, never retried elsewhere.
    let runtime = runtime();
    runtime.block_on(primary.restart()).expect("restart");
    primary.set_fault(Fault::Status {
        status: 400,
        body: r#"{"error":{"message":"Invalid 'messages': too short","type":"invalid_request_error"}}"#.into(),
        retry_after: None,
    });
    primary.clear();
    fallback.clear();
    let (status, body) = gw.post("/v1/chat/completions", &chat_body("resilient", false));
    assert_eq!(status, 400);
    assert_eq!(body["error"]["message"], "Invalid 'messages': too short");
    assert_eq!(primary.requests().len(), 1);
    assert!(fallback.requests().is_empty(), "nothing else was called");
}

#[test]
fn a_stream_that_fails_after_its_first_chunk_ends_with_an_error_not_a_clean_end() {
    let (cp, ns, gw) = setup("midstream");
    let primary = sim();
    let fallback = sim();
    apply_route(
        cp,
        &ns,
        "cut",
        pool_spec(vec![
            backend(
                model(
                    Provider::Openai,
                    "gpt-4o-mini",
                    &primary.openai_base(),
                    "key-a",
                ),
                1,
                0,
            ),
            backend(
                model(
                    Provider::Openai,
                    "gpt-4o-mini",
                    &fallback.openai_base(),
                    "key-b",
                ),
                1,
                1,
            ),
        ]),
    );
    // Paced, so the first frames surely leave before the cut.
    primary.set_behaviour(portcullis_sim::Behaviour {
        fault: Fault::CutStream { after_frames: 3 },
        chunk_delay: Duration::from_millis(30),
        ..Default::default()
    });
    let (status, _, text) = post_full(&gw.url("/v1/chat/completions"), &chat_body("cut", true));
    assert_eq!(status, 200);
    assert!(text.contains("word1"), "{text}");
    assert!(
        text.contains("\"error\""),
        "an error event ends the stream: {text}"
    );
    assert!(!text.contains("[DONE]"), "never a normal end: {text}");
    assert!(
        fallback.requests().is_empty(),
        "no fallback once bytes reached the caller"
    );
}

#[test]
fn outlier_ejection_keeps_a_failing_backend_out_then_lets_it_back() {
    let (cp, ns, gw) = setup("eject");
    let bad = sim();
    let good = sim();
    let spec = equal_pair(
        (&bad, "gpt-4o-mini"),
        (&good, "gpt-4o"),
        OutlierDetection {
            consecutive_failures: Some(3),
            base_ejection_time: Some("1500ms".into()),
            ..Default::default()
        },
    );
    apply_route(cp, &ns, "eject", spec);
    bad.set_fault(Fault::Status {
        status: 503,
        body: r#"{"error":{"message":"down","type":"server_error"}}"#.into(),
        retry_after: None,
    });
    // Until the third failure the bad backend still gets its share; every call succeeds.
    let mut calls = 0;
    while bad.requests().len() < 3 {
        let (status, _) = gw.chat("eject");
        assert_eq!(status, 200);
        calls += 1;
        assert!(calls < 200, "the bad backend never got 3 calls");
    }
    let ejected_at = Instant::now();
    bad.set_fault(Fault::None);
    bad.clear();
    while ejected_at.elapsed() < Duration::from_millis(1200) {
        assert_eq!(gw.chat("eject").0, 200);
    }
    assert!(bad.requests().is_empty(), "no traffic while ejected");
    assert!(gw.metrics().contains(
        "portcullis_backend_ejections_total{route=\"eject\",backend=\"openai/gpt-4o-mini\"} 1"
    ));
    std::thread::sleep(Duration::from_millis(400));
    for _ in 0..100 {
        assert_eq!(gw.chat("eject").0, 200);
    }
    assert!(
        bad.requests().len() > 20,
        "traffic again after the ejection"
    );

    // A 429 with Retry-After: 2 keeps the backend out for about two seconds.
    bad.set_fault(Fault::Status {
        status: 429,
        body: r#"{"error":{"message":"slow down","type":"requests"}}"#.into(),
        retry_after: Some(2),
    });
    bad.clear();
    while bad.requests().is_empty() {
        assert_eq!(gw.chat("eject").0, 200);
    }
    let limited_at = Instant::now();
    bad.set_fault(Fault::None);
    bad.clear();
    while limited_at.elapsed() < Duration::from_millis(1700) {
        assert_eq!(gw.chat("eject").0, 200);
    }
    assert!(bad.requests().is_empty(), "kept out for the Retry-After");
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..50 {
        assert_eq!(gw.chat("eject").0, 200);
    }
    assert!(!bad.requests().is_empty(), "back after the Retry-After");
}

#[test]
fn a_provider_outage_under_load_fails_no_request() {
    let (cp, ns, gw) = setup("outage");
    let one = sim();
    let two = sim();
    let spec = equal_pair(
        (&one, "gpt-4o-mini"),
        (&two, "gpt-4o-mini"),
        OutlierDetection {
            base_ejection_time: Some("1s".into()),
            max_ejection_time: Some("1s".into()),
            ..Default::default()
        },
    );
    apply_route(cp, &ns, "steady", spec);

    let url = gw.url("/v1/chat/completions");
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let stop_at = Instant::now() + Duration::from_secs(10);
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (url, ok, failed) = (url.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                while Instant::now() < stop_at {
                    let (status, text) =
                        http_blocking("POST", &url, Some(&chat_body("steady", false).to_string()));
                    if status == 200 {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.lock().push((status, text));
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    one.kill();
    std::thread::sleep(Duration::from_secs(3));
    runtime().block_on(one.restart()).expect("restart");
    one.clear();
    for w in workers {
        w.join().expect("worker");
    }
    let failed = failed.lock();
    assert!(
        failed.is_empty(),
        "failed requests: {:?}",
        &failed[..failed.len().min(3)]
    );
    assert!(ok.load(Ordering::Relaxed) > 100);
    assert!(
        !one.requests().is_empty(),
        "the restarted backend serves again"
    );
}

#[test]
fn status_reports_each_backend_and_degraded() {
    let (cp, ns, gw) = setup("status");
    let sim = sim();
    apply_route(
        cp,
        &ns,
        "half",
        pool_spec(vec![
            backend(
                model(Provider::Openai, "gpt-4o-mini", &sim.openai_base(), "key-a"),
                1,
                0,
            ),
            backend(
                model(
                    Provider::Anthropic,
                    "claude-sonnet-4-5",
                    &sim.anthropic_base(),
                    "nope",
                ),
                1,
                1,
            ),
        ]),
    );
    let route = cp.json(&["get", "-n", &ns, "route.portcullis.dev", "half"]);
    let backends = route["status"]["backends"]
        .as_array()
        .expect("status.backends");
    assert_eq!(backends.len(), 2);
    assert_eq!(backends[0]["resolved"], true);
    assert_eq!(backends[1]["resolved"], false);
    assert_eq!(backends[1]["reason"], "SecretNotFound");
    let degraded = route["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Degraded")
        .expect("Degraded condition")
        .clone();
    assert_eq!(degraded["status"], "True");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap()
            .contains("anthropic/claude-sonnet-4-5"),
        "{degraded}"
    );
    // Listings name the first-choice backend as the route's model.
    let (status, endpoint) = gw.get("/api/2.0/endpoints/half");
    assert_eq!(status, 200);
    assert_eq!(endpoint["model"]["name"], "gpt-4o-mini");
    assert_eq!(endpoint["model"]["provider"], "openai");
    cp.ok(&[
        "wait",
        "-n",
        &ns,
        "--for=condition=Degraded=True",
        "route.portcullis.dev/half",
        "--timeout=10s",
    ]);
    // Creating the missing Secret clears Degraded.
    cp.apply(&secret_manifest(&ns, "nope", "apiKey", "sk-late"));
    cp.ok(&[
        "wait",
        "-n",
        &ns,
        "--for=condition=Degraded=False",
        "route.portcullis.dev/half",
        "--timeout=30s",
    ]);
}

#[test]
fn the_traffic_policy_example_is_a_valid_route() {
    let cp = ControlPlane::shared();
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/traffic-policy.yaml");
    cp.ok(&["apply", "--dry-run=server", "-f", example.to_str().unwrap()]);
}

#[test]
fn the_schema_refuses_both_model_and_backends_and_unknown_failure_classes() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("schema");
    let mut both = pool_spec(vec![backend(
        model(Provider::Openai, "m", "http://127.0.0.1:1/v1", "k"),
        1,
        0,
    )]);
    both.model = Some(model(Provider::Openai, "m", "http://127.0.0.1:1/v1", "k"));
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], &route_yaml(&ns, "both", both));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("set exactly one of model and backends"));

    let drained = pool_spec(vec![backend(
        model(Provider::Openai, "m", "http://127.0.0.1:1/v1", "k"),
        0,
        0,
    )]);
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], &route_yaml(&ns, "drained", drained));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("weight above 0"));

    let yaml = route_yaml(
        &ns,
        "typo",
        pool_spec(vec![backend(
            model(Provider::Openai, "m", "http://127.0.0.1:1/v1", "k"),
            1,
            0,
        )]),
    ) + "  retry:\n    retryOn: [teapot]\n    perTryTimeout: soon\n";
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], &yaml);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("teapot") && err.contains("perTryTimeout"),
        "{err}"
    );

    let bad_name = pool_spec(vec![backend(
        model(
            Provider::Openai,
            "x/../admin?y=1#",
            "http://127.0.0.1:1/v1",
            "k",
        ),
        1,
        0,
    )]);
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], &route_yaml(&ns, "badname", bad_name));
    assert!(
        !out.status.success(),
        "model names are restricted to a sane character set"
    );
}

#[test]
fn one_chat_route_may_fall_back_to_any_provider_and_answers_in_the_callers_dialect() {
    let (cp, ns, gw) = setup("mix");
    let sim = sim();
    cp.apply(&secret_with(
        &ns,
        "aws",
        &[
            ("awsAccessKeyId", "AKIDSIM"),
            ("awsSecretAccessKey", "aws-secret"),
        ],
    ));
    // Nothing listens on port 1: the primary always refuses the connection.
    let dead = model(
        Provider::Openai,
        "gpt-4o-mini",
        "http://127.0.0.1:1/v1",
        "key-a",
    );
    let fallbacks = [
        (Provider::AzureOpenai, "gpt-4o-prod", "key-b", "apiVersion"),
        (Provider::Gemini, "gemini-2.0-flash", "key-b", ""),
        (
            Provider::Bedrock,
            "anthropic.claude-3-haiku-20240307-v1:0",
            "aws",
            "region",
        ),
        (Provider::Anthropic, "claude-sonnet-4-5", "anthropic", ""),
    ];
    for (provider, name, secret, config) in fallbacks {
        let mut fallback = model(provider, name, &sim.base(provider.as_str()), secret);
        match config {
            "apiVersion" => fallback.config.insert(config.into(), "2024-10-21".into()),
            "region" => fallback.config.insert(config.into(), "us-east-1".into()),
            _ => None,
        };
        let route = format!("mix-{provider}");
        apply_route(
            cp,
            &ns,
            &route,
            pool_spec(vec![backend(dead.clone(), 1, 0), backend(fallback, 1, 1)]),
        );
        for stream in [false, true] {
            let (status, headers, text) =
                post_full(&gw.url("/v1/chat/completions"), &chat_body(&route, stream));
            assert_eq!(status, 200, "{provider} stream={stream}: {text}");
            assert_eq!(
                header(&headers, "x-portcullis-backend"),
                Some(format!("{provider}/{name}").as_str())
            );
            assert_eq!(header(&headers, "x-portcullis-attempts"), Some("2"));
            if stream {
                let chunks = sse_chunks(&text);
                assert!(
                    chunks
                        .iter()
                        .all(|c| c["object"] == "chat.completion.chunk")
                );
                assert!(text.trim_end().ends_with("data: [DONE]"));
            } else {
                let body: Value = serde_json::from_str(&text).unwrap();
                assert_eq!(body["object"], "chat.completion", "{provider}");
                assert!(
                    body["choices"][0]["message"]["content"]
                        .as_str()
                        .unwrap()
                        .starts_with("word1")
                );
            }
        }
    }
}
