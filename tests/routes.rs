//! Route lifecycle end to end: real kube-apiserver, real kubectl, the real gateway binary, and a
//! simulated OpenAI provider that records what the gateway sent it.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

#[test]
fn route_with_secret_becomes_ready_and_serves_chat_with_the_secret_key() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("ready");
    let route = unique("chat");
    let gw = Gateway::start(cp, &["--namespace", &ns]);

    let applied = Instant::now();
    cp.apply(&openai_manifests(
        &ns,
        &route,
        "openai",
        "sk-live-abc123",
        &sim,
    ));
    cp.wait_ready(&ns, &route);
    let servable = eventually(Duration::from_secs(10), || gw.chat(&route).0 == 200)
        .expect("route never served");
    eprintln!(
        "route applied -> servable: {:?} (ready + first 200 after {:?})",
        applied.elapsed(),
        servable
    );

    let (status, body) = gw.chat(&route);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert!(
        body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .starts_with("word1")
    );
    assert_eq!(body["usage"]["completion_tokens"], 20);

    let sent = sim.last_request().expect("the provider got a request");
    assert_eq!(sent.method, "POST");
    assert_eq!(sent.path, "/openai/v1/chat/completions");
    assert_eq!(sent.header("authorization"), Some("Bearer sk-live-abc123"));
    assert_eq!(sent.json()["model"], "gpt-4o-mini");
    assert_eq!(
        sent.json()["messages"],
        json!([{"role": "user", "content": "hello there"}])
    );

    // kubectl shows the printer columns.
    let table = cp.ok(&["get", "-n", &ns, "routes.portcullis.dev"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "TYPE", "PROVIDER", "MODEL", "READY", "AGE"]
    );
    assert!(
        table.contains("llm/v1/chat")
            && table.contains("openai")
            && table.contains("gpt-4o-mini")
            && table.contains("True")
    );

    // Status per the contract.
    let r = cp.json(&["get", "-n", &ns, "route.portcullis.dev", &route]);
    assert_eq!(r["status"]["observedGeneration"], 1);
    assert_eq!(r["status"]["url"], format!("/gateway/{route}/invocations"));
    assert_eq!(r["status"]["conditions"][0]["reason"], "Resolved");
    assert_eq!(r["status"]["conditions"][0]["observedGeneration"], 1);

    // /v1/models lists it.
    let (_, models) = gw.get("/v1/models");
    assert!(
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == route.as_str())
    );

    // A Ready event was recorded.
    let events = cp.ok(&["get", "events", "-n", &ns, "-o", "json"]);
    assert!(events.contains("Resolved"), "{events}");
}

#[test]
fn route_before_secret_reports_secret_not_found_then_becomes_ready() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("late-secret");
    let route = unique("chat");
    let gw = Gateway::start(cp, &["--namespace", &ns]);

    cp.apply(&route_manifest(
        &ns,
        &route,
        "llm/v1/chat",
        "late",
        &sim.openai_base(),
    ));
    cp.wait_reason(&ns, &route, "SecretNotFound");
    let (status, body) = gw.chat(&route);
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("SecretNotFound"),
        "{body}"
    );
    let r = cp.json(&["get", "-n", &ns, "route.portcullis.dev", &route]);
    assert_eq!(r["status"]["conditions"][0]["status"], "False");

    cp.apply(&secret_manifest(&ns, "late", "apiKey", "sk-late"));
    cp.wait_ready(&ns, &route);
    eventually(Duration::from_secs(5), || gw.chat(&route).0 == 200).expect("route never served");
    assert_eq!(
        sim.last_request().unwrap().header("authorization"),
        Some("Bearer sk-late")
    );
}

#[test]
fn secret_without_the_key_reports_secret_key_missing() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("nokey");
    let route = unique("chat");
    let _gw = Gateway::start(cp, &["--namespace", &ns]);
    cp.apply(&format!(
        "{}---\n{}",
        secret_manifest(&ns, "wrongkey", "token", "sk-x"),
        route_manifest(&ns, &route, "llm/v1/chat", "wrongkey", &sim.openai_base())
    ));
    cp.wait_reason(&ns, &route, "SecretKeyMissing");
    let r = cp.json(&["get", "-n", &ns, "route.portcullis.dev", &route]);
    let message = r["status"]["conditions"][0]["message"].as_str().unwrap();
    assert!(message.contains("apiKey"), "{message}");
}

#[test]
fn rotating_the_secret_switches_keys_without_failing_a_request() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("rotate");
    let route = unique("chat");
    let gw = Arc::new(Gateway::start(cp, &["--namespace", &ns]));
    cp.apply(&openai_manifests(&ns, &route, "openai", "sk-old", &sim));
    cp.wait_ready(&ns, &route);
    eventually(Duration::from_secs(5), || gw.chat(&route).0 == 200).expect("route never served");

    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (gw, stop, ok, failed, route) = (
            gw.clone(),
            stop.clone(),
            ok.clone(),
            failed.clone(),
            route.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match gw.chat(&route).0 {
                    200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let rotated = Instant::now();
    cp.apply(&secret_manifest(&ns, "openai", "apiKey", "sk-new"));
    let took = eventually(Duration::from_secs(10), || {
        sim.last_request()
            .and_then(|r| r.header("authorization").map(str::to_string))
            .as_deref()
            == Some("Bearer sk-new")
    })
    .expect("the new key was never used");
    eprintln!(
        "secret rotated -> new key in use: {:?}",
        rotated.elapsed().min(took)
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    load.join().unwrap();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during rotation"
    );
    assert!(ok.load(Ordering::Relaxed) > 10);
    // Once switched, the old key is never used again.
    let keys: Vec<String> = sim
        .requests()
        .iter()
        .filter_map(|r| r.header("authorization").map(str::to_string))
        .collect();
    let first_new = keys.iter().position(|k| k == "Bearer sk-new").unwrap();
    assert!(keys[first_new..].iter().all(|k| k == "Bearer sk-new"));
}

#[test]
fn deleting_a_route_makes_it_unknown() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("delete");
    let route = unique("chat");
    let gw = Gateway::start(cp, &["--namespace", &ns]);
    cp.apply(&openai_manifests(&ns, &route, "openai", "sk-1", &sim));
    cp.wait_ready(&ns, &route);
    eventually(Duration::from_secs(5), || gw.chat(&route).0 == 200).expect("route never served");
    cp.ok(&[
        "delete",
        "-n",
        &ns,
        "route.portcullis.dev",
        &route,
        "--wait",
        "--timeout=10s",
    ]);
    eventually(Duration::from_secs(5), || gw.chat(&route).0 == 404)
        .expect("deleted route still served");
    let (_, body) = gw.chat(&route);
    assert_eq!(body["error"]["code"], "route_not_found");
}

#[test]
fn same_name_in_two_namespaces_older_owns_the_short_name_both_serve_qualified() {
    let cp = ControlPlane::shared();
    let sim = sim();
    // The younger namespace sorts first lexically, so only the creation time can make the older win.
    let older_ns = cp.namespace("zz-older");
    let newer_ns = cp.namespace("aa-newer");
    let route = unique("shared");
    let gw = Gateway::start(cp, &[]);

    cp.apply(&openai_manifests(
        &older_ns, &route, "openai", "sk-older", &sim,
    ));
    cp.wait_ready(&older_ns, &route);
    std::thread::sleep(Duration::from_millis(1100)); // creationTimestamp has one-second resolution
    cp.apply(&openai_manifests(
        &newer_ns, &route, "openai", "sk-newer", &sim,
    ));
    cp.wait_ready(&newer_ns, &route);
    eventually(Duration::from_secs(10), || {
        cp.short_name(&newer_ns, &route)
            .is_some_and(|(s, r, _)| s == "False" && r == "NameConflict")
    })
    .expect("the newer Route reports the name conflict");
    let (_, _, message) = cp.short_name(&newer_ns, &route).unwrap();
    assert!(message.contains(&older_ns), "{message}");
    let key = |route: &str| {
        assert_eq!(gw.chat(route).0, 200, "{route}");
        sim.last_request()
            .unwrap()
            .header("authorization")
            .unwrap()
            .to_string()
    };
    assert_eq!(key(&route), "Bearer sk-older");
    assert_eq!(key(&format!("{older_ns}/{route}")), "Bearer sk-older");
    assert_eq!(key(&format!("{newer_ns}/{route}")), "Bearer sk-newer");
    // Qualified names on the MLflow paths: literal or %2F-encoded.
    let messages = serde_json::json!({"messages": [{"role": "user", "content": "hi"}]});
    for path in [
        format!("/endpoints/{newer_ns}/{route}/invocations"),
        format!("/endpoints/{newer_ns}%2F{route}/invocations"),
        format!("/gateway/{newer_ns}/{route}/invocations"),
    ] {
        assert_eq!(gw.post(&path, &messages).0, 200, "{path}");
        assert_eq!(
            sim.last_request().unwrap().header("authorization"),
            Some("Bearer sk-newer")
        );
    }
    // Listings: the short name for its owner, the qualified one for the other.
    let (_, models) = gw.get("/v1/models");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert!(ids.contains(&route.as_str()), "{ids:?}");
    assert!(
        ids.contains(&format!("{newer_ns}/{route}").as_str()),
        "{ids:?}"
    );

    cp.ok(&["delete", "-n", &older_ns, "route.portcullis.dev", &route]);
    eventually(Duration::from_secs(10), || {
        cp.short_name(&newer_ns, &route)
            .is_some_and(|(s, _, _)| s == "True")
    })
    .expect("the newer route never took over the short name");
    eventually(Duration::from_secs(5), || {
        gw.chat(&route).0 == 200
            && sim.last_request().unwrap().header("authorization") == Some("Bearer sk-newer")
    })
    .expect("the newer route never took over");
    assert!(
        gw.metrics()
            .contains("portcullis_short_name_changes_total 1")
    );
    let events = cp.ok(&["get", "events", "-n", &newer_ns, "-o", "json"]);
    assert!(
        events.contains("NameConflict") && events.contains("Owned"),
        "{events}"
    );
}

#[test]
fn invalid_specs_are_rejected_by_kubectl_apply() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("invalid");
    let bad_provider = route_manifest(&ns, "bad", "llm/v1/chat", "s", "http://x")
        .replace("provider: openai", "provider: skynet");
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], &bad_provider);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("spec.model.provider") && err.contains("Unsupported value"),
        "{err}"
    );

    let bad_type = route_manifest(&ns, "bad", "llm/v1/chat", "s", "http://x")
        .replace("llm/v1/chat", "llm/v2/chat");
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], &bad_type);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("spec.routeType"));

    let bad_limit = format!(
        "{}  limits:\n  - renewalPeriod: minute\n    key: route\n",
        route_manifest(&ns, "bad", "llm/v1/chat", "s", "http://x")
    );
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], &bad_limit);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("a limit needs calls, tokens, usd or several of them")
    );

    let bad_base = route_manifest(&ns, "bad", "llm/v1/chat", "s", "ftp://x");
    let out = cp.kubectl_stdin(&["apply", "-f", "-"], &bad_base);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("spec.model.apiBase"));
}

#[test]
fn reapplying_an_unchanged_manifest_changes_nothing() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("idem");
    let route = unique("chat");
    let _gw = Gateway::start(cp, &["--namespace", &ns]);
    let manifests = openai_manifests(&ns, &route, "openai", "sk-1", &sim);
    cp.apply(&manifests);
    cp.wait_ready(&ns, &route);
    std::thread::sleep(Duration::from_millis(500));
    let before = cp.json(&["get", "-n", &ns, "route.portcullis.dev", &route]);
    cp.apply(&manifests);
    std::thread::sleep(Duration::from_millis(1000));
    let after = cp.json(&["get", "-n", &ns, "route.portcullis.dev", &route]);
    assert_eq!(
        before["metadata"]["resourceVersion"],
        after["metadata"]["resourceVersion"]
    );
    assert_eq!(before["status"], after["status"]);
    assert!(
        before["metadata"]["finalizers"].is_null(),
        "no finalizer is needed"
    );
}

#[test]
fn upstream_and_request_errors_map_to_clear_openai_errors() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("errors");
    let chat = unique("chat");
    let emb = unique("emb");
    let dead = unique("dead");
    let gw = Gateway::start(
        cp,
        &[
            "--namespace",
            &ns,
            "--upstream-timeout",
            "1",
            "--body-limit",
            "2048",
        ],
    );
    cp.apply(&format!(
        "{}---\n{}---\n{}",
        openai_manifests(&ns, &chat, "openai", "sk-err", &sim),
        route_manifest(&ns, &emb, "llm/v1/embeddings", "openai", &sim.openai_base()),
        // Nothing listens on port 9 of loopback.
        route_manifest(&ns, &dead, "llm/v1/chat", "openai", "http://127.0.0.1:9/v1"),
    ));
    for r in [&chat, &emb, &dead] {
        cp.wait_ready(&ns, r);
    }
    eventually(Duration::from_secs(5), || gw.chat(&chat).0 == 200).expect("route never served");

    let expect = |(status, body): (u16, serde_json::Value), want: u16, code: &str| {
        assert_eq!(status, want, "{body}");
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(
            !body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .is_empty()
        );
    };
    expect(gw.chat("no-such-route"), 404, "route_not_found");
    expect(gw.chat(&emb), 400, "wrong_route_type");
    expect(
        gw.post(
            "/v1/chat/completions",
            &json!({"model": chat, "messages": "hi"}),
        ),
        400,
        "invalid_request",
    );
    let (status, text) = gw.post_raw("/v1/chat/completions", "{not json");
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("not valid JSON"));
    let big = json!({"model": chat, "messages": [{"role": "user", "content": "x".repeat(4096)}]});
    expect(
        gw.post("/v1/chat/completions", &big),
        413,
        "payload_too_large",
    );
    let (status, text) = http_request(
        "POST",
        &gw.url("/v1/chat/completions"),
        Some("model=x"),
        &[("content-type", "text/plain")],
    );
    assert_eq!(status, 415, "{text}");
    expect(gw.chat(&dead), 502, "upstream_unreachable");

    sim.set_fault(Fault::Delay(Duration::from_secs(3)));
    expect(gw.chat(&chat), 504, "upstream_timeout");
    sim.set_fault(Fault::Malformed);
    let (status, body) = gw.chat(&chat);
    assert_eq!(status, 502);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("malformed"),
        "{body}"
    );
    sim.set_fault(Fault::Status {
        status: 429,
        body: json!({"error": {"message": "Rate limit reached for gpt-4o-mini", "type": "requests", "code": "rate_limit_exceeded"}}).to_string(),
        retry_after: Some(7),
    });
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(json!({"model": chat, "messages": [{"role": "user", "content": "hi"}]}).to_string())
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 429);
    assert_eq!(resp.headers()["retry-after"], "7");
    assert!(
        resp.text()
            .unwrap()
            .contains("Rate limit reached for gpt-4o-mini")
    );
    sim.set_fault(Fault::None);
    assert_eq!(gw.chat(&chat).0, 200);
}

#[test]
fn credentials_never_leak_into_logs_status_events_or_responses() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("leak");
    let route = unique("chat");
    let conflict_ns = cp.namespace("leak2");
    let secret = "sk-SUPERSECRET-0123456789abcdef";
    let gw = Gateway::start(cp, &["--namespace", &ns]);
    cp.apply(&openai_manifests(&ns, &route, "openai", secret, &sim));
    cp.wait_ready(&ns, &route);
    eventually(Duration::from_secs(5), || gw.chat(&route).0 == 200).expect("route never served");
    let mut responses = vec![gw.chat(&route).1.to_string()];

    // A provider that echoes the key back in its error, as OpenAI's 401 does.
    sim.set_fault(Fault::Status {
        status: 401,
        body: json!({"error": {"message": format!("Incorrect API key provided: {secret}. You can find your API key at https://platform.openai.com/account/api-keys."), "type": "invalid_request_error", "code": "invalid_api_key"}}).to_string(),
        retry_after: None,
    });
    let (status, body) = gw.chat(&route);
    assert_eq!(
        status, 502,
        "the route's own key was refused: not the caller's 401"
    );
    assert_eq!(body["error"]["code"], "upstream_credential_rejected");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Incorrect API key provided")
    );
    responses.push(body.to_string());
    sim.set_fault(Fault::Status {
        status: 401,
        body: json!({"error": {"message": format!("Incorrect API key provided: {}****{}.", &secret[..12], &secret[secret.len() - 4..])}}).to_string(),
        retry_after: None,
    });
    responses.push(gw.chat(&route).1.to_string());
    sim.set_fault(Fault::None);

    // Status and events of a failing route too (missing key, name conflict).
    cp.apply(&route_manifest(
        &conflict_ns,
        &route,
        "llm/v1/chat",
        "openai",
        &sim.openai_base(),
    ));
    cp.ok(&[
        "patch",
        "secret",
        "-n",
        &ns,
        "openai",
        "--type=merge",
        "-p",
        r#"{"stringData":{"other":"x"}}"#,
    ]);
    let everything = [
        responses.join("\n"),
        gw.log(),
        cp.ok(&["get", "routes.portcullis.dev", "-A", "-o", "yaml"]),
        cp.ok(&["get", "events", "-A", "-o", "yaml"]),
        gw.get("/v1/models").1.to_string(),
    ]
    .join("\n");
    assert!(!everything.contains(secret), "the credential leaked");
    assert!(
        !everything.contains("SUPERSECRET"),
        "part of the credential leaked"
    );
    assert!(responses[1].contains("[REDACTED]"));
}

/// OpenAI chat to an OpenAI Route passes through: the caller's body goes upstream as sent but for
/// `model` (a parameter OpenAI adds works the day it ships) and OpenAI's answer comes back as sent,
/// fields the gateway does not model included. `--no-pass-through` translates the same call; the
/// two answers agree on everything the translating path keeps.
#[test]
fn same_dialect_calls_pass_through_and_agree_with_the_translating_path() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("passthrough");
    let route = unique("chat");
    let direct = Gateway::start(cp, &["--namespace", &ns]);
    let translating = Gateway::start(cp, &["--namespace", &ns, "--no-pass-through"]);
    cp.apply(&openai_manifests(&ns, &route, "openai", "sk-pt", &sim));
    cp.wait_ready(&ns, &route);
    for gw in [&direct, &translating] {
        eventually(Duration::from_secs(10), || gw.chat(&route).0 == 200).expect("never served");
    }
    let body = json!({
        "model": route,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_completion_tokens": 30,
        "a_parameter_of_tomorrow": {"x": [1, 2]},
    });
    let mut answers = Vec::new();
    for gw in [&direct, &translating] {
        let (status, headers, text) = http_full(&gw.url("/v1/chat/completions"), &body.to_string());
        assert_eq!(status, 200, "{text}");
        assert!(headers.iter().any(|(k, _)| k == "x-portcullis-cost-usd"));
        let sent = sim
            .last_request()
            .expect("the provider got the call")
            .json();
        assert_eq!(sent["model"], "gpt-4o-mini");
        assert_eq!(sent["a_parameter_of_tomorrow"], json!({"x": [1, 2]}));
        assert_eq!(sent["max_completion_tokens"], 30);
        answers.push(serde_json::from_str::<Value>(&text).expect("JSON"));
    }
    let [passed, translated] = [&answers[0], &answers[1]];
    assert_eq!(
        passed["system_fingerprint"], "fp_sim",
        "passed on as OpenAI sent it"
    );
    // The translating path writes the fields it models; the pass-through keeps OpenAI's others.
    assert!(passed["choices"][0].get("logprobs").is_some(), "{passed}");
    for field in [
        "/object",
        "/model",
        "/usage",
        "/choices/0/message",
        "/choices/0/finish_reason",
    ] {
        assert_eq!(passed.pointer(field), translated.pointer(field), "{field}");
    }

    // Streams: the same text, the usage chunk (priced) only for a caller that asks for it.
    let events = |gw: &Gateway, usage: bool| {
        let mut b = body.clone();
        b["stream"] = json!(true);
        if usage {
            b["stream_options"] = json!({"include_usage": true});
        }
        let (status, text) = gw.post_raw("/v1/chat/completions", &b.to_string());
        assert_eq!(status, 200, "{text}");
        let sent = sim
            .last_request()
            .expect("the provider got the call")
            .json();
        assert_eq!(
            sent["stream_options"]["include_usage"], true,
            "the gateway counts usage"
        );
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(|d| serde_json::from_str(d).unwrap_or(Value::String(d.into())))
            .collect::<Vec<Value>>()
    };
    for usage in [false, true] {
        let (passed, translated) = (events(&direct, usage), events(&translating, usage));
        let text = |events: &[Value]| -> String {
            events
                .iter()
                .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
                .collect()
        };
        assert_eq!(text(&passed), text(&translated));
        assert_eq!(passed.last(), Some(&json!("[DONE]")));
        let usage_chunks = |events: &[Value]| -> Vec<Value> {
            events
                .iter()
                .filter(|e| e.get("usage").is_some_and(|u| !u.is_null()))
                .map(|e| json!([e["usage"], e["x_portcullis_cost_usd"]]))
                .collect()
        };
        assert_eq!(usage_chunks(&passed), usage_chunks(&translated));
        assert_eq!(usage_chunks(&passed).len(), usize::from(usage));
    }
}
