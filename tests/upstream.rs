//! Hostile or broken upstreams: answers too large, streams that stall or end without their end
//! marker. The gateway bounds all of them and never passes a cut answer off as a whole one.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use portcullis_sim::Behaviour;
use serde_json::{Value, json};
use support::*;

fn stream_body(route: &str) -> Value {
    json!({"model": route, "stream": true, "messages": [{"role": "user", "content": "hello there"}]})
}

/// A namespace with an OpenAI and an Anthropic chat Route on one simulated provider, and a gateway.
fn setup(prefix: &str, flags: &[&str]) -> (SimProvider, Gateway) {
    let cp = ControlPlane::shared();
    let ns = cp.namespace(prefix);
    let sim = sim();
    let mut all = vec!["--namespace", ns.as_str()];
    all.extend_from_slice(flags);
    let gw = Gateway::start(cp, &all);
    cp.apply(&format!(
        "{}---\n{}---\n{}",
        secret_manifest(&ns, "openai", "apiKey", "sk-up"),
        route_manifest(&ns, "gpt", "llm/v1/chat", "openai", &sim.openai_base()),
        provider_route(
            &ns,
            "claude",
            "llm/v1/chat",
            "anthropic",
            "claude-sonnet-4-5",
            &sim.anthropic_base(),
            Some("openai"),
            &[]
        ),
    ));
    cp.wait_ready(&ns, "gpt");
    cp.wait_ready(&ns, "claude");
    (sim, gw)
}

#[test]
fn a_stream_ending_without_its_end_marker_is_an_error_on_every_streaming_surface() {
    let (sim, gw) = setup("truncated", &[]);
    sim.set_behaviour(Behaviour {
        fault: Fault::EndStream { after_frames: 4 },
        chunk_delay: Duration::from_millis(10),
        ..Default::default()
    });
    for route in ["gpt", "claude"] {
        for (path, body) in [
            ("/v1/chat/completions".to_string(), stream_body(route)),
            (format!("/endpoints/{route}/invocations"), {
                let mut b = stream_body(route);
                b.as_object_mut().unwrap().remove("model");
                b
            }),
        ] {
            let (status, _, text) = post_full(&gw.url(&path), &body);
            assert_eq!(status, 200, "{route} {path}: {text}");
            assert!(text.contains("word1"), "{route} {path}: {text}");
            let chunks = sse_chunks(&text);
            let last = chunks.last().expect("chunks");
            assert_eq!(
                last["error"]["code"], "upstream_truncated",
                "{route} {path}: {text}"
            );
            assert!(!text.contains("[DONE]"), "never a normal end: {text}");
            assert!(
                !chunks.iter().any(|c| c["choices"]
                    .get(0)
                    .is_some_and(|ch| !ch["finish_reason"].is_null())),
                "a cut stream must not look finished: {text}"
            );
        }
    }
    eventually(Duration::from_secs(2), || {
        gw.log()
            .contains("provider stream ended without its end marker")
    })
    .expect("logged");
    let metrics = gw.metrics();
    for (route, provider) in [("gpt", "openai"), ("claude", "anthropic")] {
        assert!(
            metrics.contains(&format!("portcullis_upstream_errors_total{{route=\"{route}\",gen_ai_provider_name=\"{provider}\",error_type=\"upstream_truncated\"}} 2")),
            "counted: {metrics}"
        );
    }
}

#[test]
fn a_stalled_stream_ends_with_an_error_after_the_idle_timeout() {
    let (sim, gw) = setup("stalled", &["--stream-idle-timeout", "1"]);
    sim.set_behaviour(Behaviour {
        fault: Fault::StallStream { after_frames: 3 },
        ..Default::default()
    });
    let started = Instant::now();
    let (status, _, text) = post_full(&gw.url("/v1/chat/completions"), &stream_body("gpt"));
    let took = started.elapsed();
    assert_eq!(status, 200);
    assert!(text.contains("word1"), "{text}");
    assert!(text.contains("upstream_stalled"), "{text}");
    assert!(!text.contains("[DONE]"));
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(10),
        "{took:?}"
    );
}

#[test]
fn an_answer_larger_than_the_limit_is_a_502_that_says_so() {
    let (sim, gw) = setup("large", &["--max-upstream-body", "4096"]);
    sim.set_behaviour(Behaviour {
        answer_words: 2000,
        ..Default::default()
    });
    let (status, body) = gw.chat("gpt");
    assert_eq!(status, 502, "{body}");
    assert_eq!(
        body["error"]["message"],
        "upstream provider returned a malformed response: the openai provider's answer is larger than the gateway's limit of 4096 bytes"
    );
    // An error body of any size is read only up to its cap, quickly.
    sim.set_behaviour(Behaviour {
        fault: Fault::Status {
            status: 500,
            body: format!(
                "{{\"error\":{{\"message\":\"{}\"}}}}",
                "x".repeat(8 * 1024 * 1024)
            ),
            retry_after: None,
        },
        ..Default::default()
    });
    let started = Instant::now();
    let (status, _) = gw.chat("gpt");
    assert_eq!(status, 502);
    assert!(started.elapsed() < Duration::from_secs(5));
    // Normal answers still pass.
    sim.set_behaviour(Behaviour::default());
    assert_eq!(gw.chat("gpt").0, 200);
}

#[test]
fn a_route_pointing_back_at_the_gateway_is_refused_after_one_hop() {
    let cp = ControlPlane::shared();
    // Seen statically: an apiBase at the gateway's own address is not ready, and says why.
    let ns = cp.namespace("loop");
    let gw = Gateway::start(cp, &["--namespace", &ns]);
    cp.apply(&format!(
        "{}---\n{}",
        secret_manifest(&ns, "openai", "apiKey", "sk-loop"),
        route_manifest(&ns, "ouroboros", "llm/v1/chat", "openai", &gw.url("/v1")),
    ));
    cp.wait_reason(&ns, "ouroboros", "InvalidSpec");
    let route = cp.json(&["get", "-n", &ns, "route.portcullis.dev", "ouroboros"]);
    assert!(
        route["status"]["conditions"][0]["message"]
            .as_str()
            .unwrap()
            .contains("points at this gateway itself"),
        "{route}"
    );

    // Not seen statically (another replica of the same gateway): refused after one hop.
    let other_ns = cp.namespace("loop-replica");
    let replica = Gateway::start(cp, &["--namespace", &other_ns]);
    cp.apply(&route_manifest(
        &ns,
        "via-replica",
        "llm/v1/chat",
        "openai",
        &replica.url("/v1"),
    ));
    cp.wait_ready(&ns, "via-replica");
    let started = Instant::now();
    let (status, body) = gw.chat("via-replica");
    assert_eq!(status, 502, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("request loop"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(5));
    eventually(Duration::from_secs(2), || {
        replica.log().contains("request loop refused")
    })
    .expect("the replica refused it");
    assert!(!replica.log().contains("sk-loop"));
}

#[test]
fn a_fanned_out_embeddings_request_is_capped_and_charged_per_upstream_call() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("fanout");
    let sim = sim();
    let gw = Gateway::start(cp, &["--namespace", &ns]);
    cp.apply(&format!(
        "{}---\n{}  limits:\n    - renewalPeriod: minute\n      calls: 10\n",
        secret_with(
            &ns,
            "aws",
            &[("awsAccessKeyId", "AKID"), ("awsSecretAccessKey", "s3cr3t")]
        ),
        provider_route(
            &ns,
            "titan",
            "llm/v1/embeddings",
            "bedrock",
            "amazon.titan-embed-text-v2:0",
            &sim.bedrock_base(),
            Some("aws"),
            &[("region", "us-east-1")]
        ),
    ));
    cp.wait_ready(&ns, "titan");
    // Over the cap: a 400 in each surface's shape, and nothing sent upstream.
    let many: Vec<String> = (0..129).map(|i| format!("text {i}")).collect();
    let (status, body) = gw.post("/v1/embeddings", &json!({"model": "titan", "input": many}));
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "input");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at most 128 inputs")
    );
    let (status, body) = gw.post("/endpoints/titan/invocations", &json!({"input": many}));
    assert_eq!(status, 400, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("at most 128 inputs")
    );
    assert!(sim.requests().is_empty());

    // Four inputs are four Titan calls, charged as four against the 10-calls limit.
    let four = json!({"model": "titan", "input": ["a", "b", "c", "d"]});
    for _ in 0..2 {
        let (status, body) = gw.post("/v1/embeddings", &four);
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["data"].as_array().unwrap().len(), 4);
    }
    assert_eq!(sim.requests().len(), 8);
    let (status, body) = gw.post("/v1/embeddings", &four);
    assert_eq!(status, 429, "8 + 4 calls exceed 10: {body}");
    assert_eq!(sim.requests().len(), 8);
}

#[test]
fn a_provider_refusing_the_routes_credential_is_a_502_and_an_event_for_the_operator() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("rejected");
    let sim = sim();
    let gw = Gateway::start(cp, &["--namespace", &ns]);
    cp.apply(&openai_manifests(
        &ns,
        "revoked",
        "openai",
        "sk-revoked-key",
        &sim,
    ));
    cp.wait_ready(&ns, "revoked");
    sim.set_fault(Fault::Status {
        status: 401,
        body: json!({"error": {"message": "Incorrect API key provided: sk-revoked-key", "type": "invalid_request_error", "code": "invalid_api_key"}}).to_string(),
        retry_after: None,
    });
    for _ in 0..3 {
        let (status, body) = gw.chat("revoked");
        assert_eq!(status, 502, "{body}");
        assert_eq!(body["error"]["code"], "upstream_credential_rejected");
        assert!(!body.to_string().contains("sk-revoked-key"));
    }
    eventually(Duration::from_secs(15), || {
        cp.ok(&["get", "events", "-n", &ns, "-o", "json"])
            .contains("CredentialRejected")
    })
    .expect("an Event tells the operator");
    let events = cp.ok(&["get", "events", "-n", &ns, "-o", "json"]);
    assert!(!events.contains("sk-revoked-key"));
}

/// A raw HTTP listener that answers every request with `answer` and counts the connections it got.
fn raw_listener(answer: String) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = hits.clone();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut buf = [0u8; 65536];
            let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(answer.as_bytes());
        }
    });
    (format!("http://{addr}"), hits)
}

#[test]
fn a_provider_redirect_is_a_502_and_never_followed_with_the_credential() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("redirect");
    let (elsewhere, elsewhere_hits) =
        raw_listener("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}".into());
    let (provider, provider_hits) = raw_listener(format!(
        "HTTP/1.1 307 Temporary Redirect\r\nlocation: {elsewhere}/v1/chat/completions\r\ncontent-length: 0\r\n\r\n"
    ));
    let gw = Gateway::start(cp, &["--namespace", &ns]);
    cp.apply(&format!(
        "{}---\n{}",
        secret_manifest(&ns, "openai", "apiKey", "sk-redirected"),
        route_manifest(&ns, "moved", "llm/v1/chat", "openai", &provider),
    ));
    cp.wait_ready(&ns, "moved");
    let (status, body) = gw.chat("moved");
    assert_eq!(status, 502, "{body}");
    assert!(provider_hits.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    assert_eq!(
        elsewhere_hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the redirect was followed (with the route's credential)"
    );
    assert!(!body.to_string().contains("sk-redirected"));
}

/// A Route of two OpenAI backends at `first` (priority 0) and `second` (priority 1), tried twice
/// on the failure classes `retry_on` (a YAML list), ejecting after two failures in a row.
fn two_backends(ns: &str, name: &str, first: &str, second: &str, retry_on: &str) -> String {
    format!(
        "apiVersion: portcullis.dev/v1alpha1\nkind: Route\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  routeType: llm/v1/chat\n  backends:\n  - {{provider: openai, name: gpt-4o-mini, apiBase: \"{first}\", secretRef: {{name: openai}}, priority: 0}}\n  - {{provider: openai, name: gpt-4o-mini, apiBase: \"{second}\", secretRef: {{name: openai}}, priority: 1}}\n  retry: {{attempts: 2, retryOn: {retry_on}}}\n  outlierDetection: {{consecutiveFailures: 2}}\n"
    )
}

/// A connection that breaks after the request was written is not a connect failure: the provider
/// may have the request (and bill it), so it is `upstream_connection_lost` (retried only as
/// `unavailable`), while a refused connection stays `upstream_unreachable` (`connect-failure`). A
/// Route retrying only connect failures does not send it again elsewhere.
#[test]
fn a_connection_lost_after_the_request_was_sent_is_not_a_connect_failure() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("lost");
    // Reads the request, then closes the connection without a word.
    let (hangup, hangup_hits) = raw_listener(String::new());
    let refused = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}/v1", l.local_addr().unwrap())
    };
    let fallback = sim();
    let gw = Gateway::start(cp, &["--namespace", &ns]);
    cp.apply(&format!(
        "{}---\n{}---\n{}---\n{}",
        secret_manifest(&ns, "openai", "apiKey", "sk-lost"),
        route_manifest(
            &ns,
            "lost",
            "llm/v1/chat",
            "openai",
            &format!("{hangup}/v1")
        ),
        route_manifest(&ns, "refused", "llm/v1/chat", "openai", &refused),
        two_backends(
            &ns,
            "pair",
            &format!("{hangup}/v1"),
            &fallback.openai_base(),
            "[connect-failure]"
        ),
    ));
    for route in ["lost", "refused", "pair"] {
        cp.wait_ready(&ns, route);
    }
    let (status, body) = gw.chat("lost");
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "upstream_connection_lost", "{body}");
    assert!(hangup_hits.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    let (status, body) = gw.chat("refused");
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "upstream_unreachable", "{body}");
    let (status, body) = gw.chat("pair");
    assert_eq!(status, 502, "{body}");
    assert!(
        fallback.requests().is_empty(),
        "sent a second time after the provider may have taken it"
    );
}

/// A 429 whose provider's rate-limit headers show room left on the key is this request's own
/// (too large for what is left of a per-minute budget): it is retried elsewhere but does not eject
/// the shared backend for every other caller. A 429 that exhausts the key still does.
#[test]
fn a_429_about_one_request_does_not_eject_the_shared_backend() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("scoped429");
    let (primary, fallback) = (sim(), sim());
    let gw = Gateway::start(cp, &["--namespace", &ns]);
    cp.apply(&format!(
        "{}---\n{}",
        secret_manifest(&ns, "openai", "apiKey", "sk-429"),
        two_backends(
            &ns,
            "shared",
            &primary.openai_base(),
            &fallback.openai_base(),
            "[rate-limited]"
        ),
    ));
    cp.wait_ready(&ns, "shared");
    let too_large = |remaining_tokens: &str| {
        portcullis_sim::Fault::StatusWithHeaders {
        status: 429,
        body: r#"{"error":{"message":"Request too large for gpt-4o-mini on tokens per min (TPM): Limit 30000, Requested 52000.","type":"tokens","code":"rate_limit_exceeded"}}"#.into(),
        headers: vec![
            ("retry-after".into(), "30".into()),
            ("x-ratelimit-remaining-requests".into(), "499".into()),
            ("x-ratelimit-remaining-tokens".into(), remaining_tokens.into()),
        ],
    }
    };
    primary.set_fault(too_large("29000"));
    for _ in 0..3 {
        let (status, body) = gw.chat("shared");
        assert_eq!(status, 200, "retried on the fallback: {body}");
    }
    assert_eq!(primary.requests().len(), 3);
    // Another caller's ordinary request still goes to the primary.
    primary.set_fault(portcullis_sim::Fault::None);
    primary.clear();
    fallback.clear();
    assert_eq!(gw.chat("shared").0, 200);
    assert_eq!(primary.requests().len(), 1, "the primary was ejected");
    assert!(fallback.requests().is_empty());
    // The key itself exhausted (no tokens left): Retry-After ejects the backend.
    primary.set_fault(too_large("0"));
    assert_eq!(gw.chat("shared").0, 200);
    primary.set_fault(portcullis_sim::Fault::None);
    primary.clear();
    assert_eq!(gw.chat("shared").0, 200);
    assert!(primary.requests().is_empty(), "an exhausted key is ejected");
}
