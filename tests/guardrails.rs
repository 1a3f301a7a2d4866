//! Guardrails end to end: a GuardrailPolicy applied with kubectl, Routes that name it, the real
//! OpenAI, Anthropic and MLflow clients (tests/python/guardrails), and what the simulated provider
//! received. Blocked requests never reach the provider; masked ones reach it masked; streamed
//! answers are masked however they are split, and a block mid-stream ends with the dialect's
//! error event; an invalid policy fails its Routes closed, and a changed one applies to the next call.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers of tests: failing loudly is the point

mod support;

use std::sync::OnceLock;
use std::time::Duration;

use portcullis_sim::Behaviour;
use serde_json::{Value, json};
use support::*;

const KEY: &str = "sk-proj-abcdefghijklmnopqrstuvwxyz0123";
const MASKED: &str = "The key is [SECRET] and [TICKET] ok";
/// An answer carrying a key and a ticket, each cut mid-value across stream chunks; masked, it is
/// `MASKED`.
const LEAKY: [&str; 5] = [
    "The key is sk-pro",
    "j-abcdefghij",
    "klmnopqrstuvwxyz0123",
    " and TCK-12",
    "3456 ok",
];

fn policy(ns: &str, name: &str, checks: &str) -> String {
    format!(
        "apiVersion: portcullis.dev/v1alpha1\nkind: GuardrailPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  checks:\n{checks}"
    )
}

const PII: &str = "  - {name: cards, phase: both, action: mask, detector: {builtin: card}}
  - {name: codenames, phase: request, action: block, detector: {keywords: [bluebird, nightjar]}}
  - {name: keys, phase: response, action: mask, detector: {builtin: secret}}
  - {name: tickets, phase: response, action: mask, detector: {regex: 'TCK-[0-9]{6}', placeholder: '[TICKET]'}}
  - {name: leaks, phase: response, action: block, detector: {keywords: [classified]}}
  - {name: mail, phase: request, action: audit, detector: {builtin: email}}
";

fn guarded_route(ns: &str, name: &str, route_type: &str, api_base: &str, policies: &str) -> String {
    format!(
        "apiVersion: portcullis.dev/v1alpha1\nkind: Route\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  routeType: {route_type}\n  model:\n    provider: openai\n    name: gpt-4o-mini\n    apiBase: {api_base}\n    secretRef:\n      name: openai\n  guardrails: [{policies}]\n"
    )
}

/// A simulated provider that answers `pieces`, one per stream chunk.
fn scripted(pieces: &[&str]) -> SimProvider {
    let sim = sim();
    sim.set_behaviour(Behaviour {
        script: Some(pieces.iter().map(|p| p.to_string()).collect()),
        ..Default::default()
    });
    sim
}

struct Fixture {
    cp: &'static ControlPlane,
    gw: Gateway,
    ns: String,
    sim: SimProvider,
    _leaky: SimProvider,
    _blocky: SimProvider,
    routes: Value,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let cp = ControlPlane::shared();
        let ns = cp.namespace("guard");
        let gw = Gateway::start(cp, &["--namespace", &ns]);
        let sim = sim();
        let leaky = scripted(&LEAKY);
        // The blocked word cut in two.
        let blocky = scripted(&["all is ", "classi", "fied here", " end"]);
        let token = cp.new_service_account_token(&ns, "caller");
        let names = ["guarded", "completions", "embeddings", "leaky", "blocky"].map(unique);
        let docs = [
            secret_manifest(&ns, "openai", "apiKey", "sk-guard"),
            policy(&ns, "pii", PII),
            guarded_route(&ns, &names[0], "llm/v1/chat", &sim.openai_base(), "pii"),
            guarded_route(
                &ns,
                &names[1],
                "llm/v1/completions",
                &sim.openai_base(),
                "pii",
            ),
            guarded_route(
                &ns,
                &names[2],
                "llm/v1/embeddings",
                &sim.openai_base(),
                "pii",
            ),
            guarded_route(&ns, &names[3], "llm/v1/chat", &leaky.openai_base(), "pii"),
            guarded_route(&ns, &names[4], "llm/v1/chat", &blocky.openai_base(), "pii"),
        ];
        cp.apply(&docs.join("---\n"));
        for r in &names {
            cp.wait_ready(&ns, r);
        }
        eventually(Duration::from_secs(10), || {
            gw.get("/v1/models").1["data"]
                .as_array()
                .is_some_and(|d| d.len() == names.len())
        })
        .expect("the gateway never served every route");
        let routes = json!({
            "guarded": names[0], "completions": names[1], "embeddings": names[2],
            "leaky": names[3], "blocky": names[4], "token": token,
        });
        Fixture {
            cp,
            gw,
            ns,
            sim,
            _leaky: leaky,
            _blocky: blocky,
            routes,
        }
    })
}

fn route(name: &str) -> String {
    fixture().routes[name].as_str().unwrap().to_string()
}

/// What the provider received, as JSON text, one per request.
fn received(sim: &SimProvider) -> Vec<String> {
    sim.requests()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect()
}

#[test]
fn the_real_clients_see_blocks_masks_and_masked_streams() {
    let f = fixture();
    for (venv, dir) in [("mlflow3", "guardrails"), ("mlflow25", "guardrails25")] {
        let (passed, _) = pytest(venv, dir, &format!("http://{}", f.gw.addr), &f.routes);
        assert!(passed, "pytest {dir} failed; gateway log:\n{}", f.gw.log());
    }
    let bodies = received(&f.sim);
    for blocked in [
        "block-gateway25",
        "block-chat",
        "block-completions",
        "block-responses",
        "block-anthropic",
        "block-mlflow",
    ] {
        assert!(
            !bodies.iter().any(|b| b.contains(blocked)),
            "a blocked request reached the provider: {blocked}"
        );
    }
    for masked in [
        "mask-chat",
        "mask-emb",
        "mask-anthropic",
        "mask-mlflow",
        "mask-gateway25",
    ] {
        let body = bodies
            .iter()
            .find(|b| b.contains(masked))
            .unwrap_or_else(|| panic!("{masked} never reached the provider"));
        assert!(body.contains("[CARD]") && !body.contains("4111"), "{body}");
    }
    let metrics = f.gw.metrics();
    let line = format!(
        "portcullis_guardrail_actions_total{{route=\"{}\",policy=\"{}/pii\",check=\"cards\",action=\"mask\",phase=\"request\"}}",
        route("guarded"),
        f.ns
    );
    assert!(metrics.contains(&line), "no {line} in\n{metrics}");
    assert!(metrics.contains("portcullis_guardrail_check_duration_seconds_bucket"));
    let log = f.gw.log();
    assert!(
        log.contains(&format!("{}/pii/cards:mask:request", f.ns)),
        "{log}"
    );
    for secret in [
        "4111 1111",
        "4111111111111111",
        KEY,
        "sk-pro",
        "TCK-12",
        "classified",
        "bluebird",
        "nightjar",
    ] {
        let lower = secret.to_lowercase();
        assert!(
            !log.to_lowercase().contains(&lower),
            "the log shows {secret:?}"
        );
        assert!(!metrics.contains(secret), "the metrics show {secret:?}");
        // Statuses and Events of the namespace: no Route's, no policy's status, no Event.
        for kind in ["events", "routes.portcullis.dev"] {
            let listed = f.cp.json(&["get", kind, "-n", &f.ns]);
            let shown: Vec<String> = listed["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| {
                    let part = if kind == "events" { o } else { &o["status"] };
                    part.to_string().to_lowercase()
                })
                .collect();
            assert!(
                shown.iter().all(|t| !t.contains(&lower)),
                "{kind} show {secret:?}"
            );
        }
    }
    let policy = f.cp.json(&["get", "guardrailpolicy", "-n", &f.ns, "pii"]);
    assert!(!policy["status"].to_string().contains("4111"), "{policy}");
}

/// A streamed chat request on `path` for `model`, as raw SSE text.
fn stream(path: &str, body: Value) -> String {
    let (status, _, text) = http_full(&fixture().gw.url(path), &body.to_string());
    assert_eq!(status, 200, "{text}");
    text
}

fn requests(model: &str) -> [(&'static str, Value); 4] {
    let messages = json!([{"role": "user", "content": "stream"}]);
    [
        (
            "/v1/chat/completions",
            json!({"model": model, "messages": messages, "stream": true}),
        ),
        (
            "/v1/messages",
            json!({"model": model, "messages": messages, "max_tokens": 100, "stream": true}),
        ),
        (
            "/v1/responses",
            json!({"model": model, "input": "stream", "stream": true}),
        ),
        (
            "/endpoints/ROUTE/invocations",
            json!({"messages": messages, "stream": true}),
        ),
    ]
}

/// The text of an OpenAI chat stream, joined.
fn chat_text(sse: &str) -> String {
    sse_chunks(sse)
        .iter()
        .filter_map(|c| c.pointer("/choices/0/delta/content")?.as_str())
        .collect()
}

fn path_for(path: &str, model: &str) -> String {
    path.replace("ROUTE", model)
}

#[test]
fn streamed_keys_split_across_chunks_are_masked_on_every_surface() {
    let leaky = route("leaky");
    for (path, body) in requests(&leaky) {
        let text = stream(&path_for(path, &leaky), body);
        for secret in ["sk-", "TCK-"] {
            assert!(!text.contains(secret), "{path} leaked {secret}:\n{text}");
        }
        assert!(
            text.contains("[SECRET]") && text.contains("[TICKET]"),
            "{path}:\n{text}"
        );
    }
    // The OpenAI stream's text, joined, is the answer masked.
    let chat = stream("/v1/chat/completions", requests(&leaky)[0].1.clone());
    assert_eq!(chat_text(&chat), MASKED);
}

#[test]
fn a_block_mid_stream_ends_with_the_dialects_error_event() {
    let blocky = route("blocky");
    for (path, body) in requests(&blocky) {
        let path = path_for(path, &blocky);
        let text = stream(&path, body);
        assert!(text.contains("guardrail_blocked"), "{path}:\n{text}");
        assert!(
            !text.contains("classi"),
            "{path} released the blocked word:\n{text}"
        );
        for end in ["[DONE]", "message_stop", "response.completed"] {
            assert!(
                !text.contains(end),
                "{path} ended normally ({end}):\n{text}"
            );
        }
        if path == "/v1/messages" {
            assert!(text.contains("event: error"), "{text}");
        }
    }
}

/// The first condition (Ready) of the object `kubectl get ARGS` shows.
fn ready_condition(cp: &ControlPlane, args: &[&str]) -> Value {
    let args: Vec<&str> = ["get"].iter().chain(args).copied().collect();
    cp.json(&args)
        .pointer("/status/conditions/0")
        .cloned()
        .unwrap_or_default()
}

fn wait_ready_reason(cp: &ControlPlane, args: &[&str], reason: &str) {
    eventually(Duration::from_secs(30), || {
        ready_condition(cp, args)["reason"] == reason
    })
    .unwrap_or_else(|_| panic!("never {reason}: {}", ready_condition(cp, args)));
}

#[test]
fn an_invalid_policy_fails_its_routes_closed_and_changes_apply_to_the_next_call() {
    let f = fixture();
    let (cp, ns) = (f.cp, &f.ns);
    let name = unique("strict");
    let missing = unique("orphan");
    cp.apply(&format!(
        "{}---\n{}---\n{}",
        policy(
            ns,
            "strict",
            "  - {name: bad-pattern, action: block, detector: {regex: 'a(b'}}\n"
        ),
        guarded_route(ns, &name, "llm/v1/chat", &f.sim.openai_base(), "strict"),
        guarded_route(
            ns,
            &missing,
            "llm/v1/chat",
            &f.sim.openai_base(),
            "no-such-policy"
        ),
    ));
    cp.wait_reason(ns, &name, "GuardrailNotReady");
    cp.wait_reason(ns, &missing, "GuardrailNotReady");
    let status = || ready_condition(cp, &["-n", ns, "guardrailpolicy", "strict"]);
    wait_ready_reason(cp, &["-n", ns, "guardrailpolicy", "strict"], "InvalidSpec");
    assert!(
        status()["message"]
            .as_str()
            .is_some_and(|m| m.contains("spec.checks[0] (bad-pattern): invalid regex")),
        "{}",
        status()
    );
    let (code, body) = f.gw.chat(&name);
    assert_eq!(code, 503, "{body}");

    // Fixed: the Route serves, and the policy's check holds on the next call.
    cp.apply(&policy(
        ns,
        "strict",
        "  - {name: no-greetings, action: block, detector: {keywords: [hello]}}\n",
    ));
    cp.wait_ready(ns, &name);
    eventually(Duration::from_secs(10), || f.gw.chat(&name).0 == 400)
        .expect("the fixed policy never applied");
    let (_, body) = f.gw.chat(&name);
    assert_eq!(body["error"]["code"], "guardrail_blocked", "{body}");
    wait_ready_reason(cp, &["-n", ns, "guardrailpolicy", "strict"], "Compiled");

    // Changed again: the next call passes, with no restart.
    cp.apply(&policy(
        ns,
        "strict",
        "  - {name: no-greetings, action: block, detector: {keywords: [goodbye]}}\n",
    ));
    eventually(Duration::from_secs(10), || f.gw.chat(&name).0 == 200)
        .expect("the changed policy never applied");
}

#[test]
fn kubectl_explain_documents_every_field_of_the_spec() {
    let cp = ControlPlane::shared();
    let explained = cp.ok(&["explain", "guardrailpolicy.spec", "--recursive"]);
    for field in [
        "checks",
        "name",
        "phase",
        "action",
        "detector",
        "builtin",
        "keywords",
        "regex",
        "placeholder",
        "maxMatch",
        "webhook",
        "url",
        "timeout",
        "failureMode",
        "secretRef",
        "key",
        "judge",
        "route",
        "mode",
        "maxHoldBack",
    ] {
        assert!(explained.contains(field), "{field} missing:\n{explained}");
    }
    // Every property of the schema has a description.
    fn undocumented(path: &str, schema: &Value, out: &mut Vec<String>) {
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (k, v) in props {
                let p = format!("{path}.{k}");
                if v.get("description")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                {
                    out.push(p.clone());
                }
                undocumented(&p, v, out);
            }
        }
        if let Some(items) = schema.get("items") {
            undocumented(path, items, out);
        }
    }
    use kube::CustomResourceExt;
    let crd = serde_json::to_value(portcullis::api::GuardrailPolicy::crd()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut out = Vec::new();
    undocumented("spec", spec, &mut out);
    assert!(out.is_empty(), "undocumented: {out:?}");
}

/// A chat call as `bearer` on `path`; status and body text.
fn call_as(bearer: &str, path: &str, body: &Value) -> (u16, String) {
    let resp = client()
        .post(fixture().gw.url(path))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {bearer}"))
        .body(body.to_string())
        .send()
        .expect("request");
    let code = resp.status().as_u16();
    (code, resp.text().unwrap_or_default())
}

#[test]
fn a_teams_policies_hold_for_its_members_only_and_a_broken_one_refuses_them() {
    let f = fixture();
    let (cp, ns) = (f.cp, &f.ns);
    let team = unique("careful");
    let member = cp.new_service_account_token(ns, "member");
    let outsider = f.routes["token"].as_str().unwrap();
    let team_doc = |guardrails: &str| {
        format!(
            "apiVersion: portcullis.dev/v1alpha1\nkind: Team\nmetadata:\n  name: {team}\nspec:\n  members:\n    - serviceAccount: {ns}/member\n  guardrails: [{guardrails}]\n"
        )
    };
    cp.apply(&format!(
        "{}---\n{}",
        policy(
            ns,
            "team-rules",
            "  - {name: zeppelins, phase: request, action: block, detector: {keywords: [zeppelin]}}\n  - {name: acks, phase: response, action: mask, detector: {keywords: [ok]}}\n"
        ),
        team_doc(&format!("{ns}/team-rules"))
    ));
    let team_status = || ready_condition(cp, &["team", &team]);
    wait_ready_reason(cp, &["team", &team], "Enforced");
    let ask = |text: &str| json!({"model": route("guarded"), "messages": [{"role": "user", "content": text}]});
    // The Team's check holds for its member, after the route's own; not for anyone else.
    eventually(Duration::from_secs(10), || {
        call_as(&member, "/v1/chat/completions", &ask("a zeppelin")).0 == 400
    })
    .expect("the Team's policy never applied to its member");
    let (_, text) = call_as(&member, "/v1/chat/completions", &ask("a zeppelin"));
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["error"]["code"], "guardrail_blocked", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("{ns}/team-rules")) && message.contains("zeppelins"),
        "{message}"
    );
    assert!(!message.contains("zeppelin "), "{message}");
    let (_, text) = call_as(
        &member,
        "/v1/chat/completions",
        &ask("bluebird and zeppelin"),
    );
    assert!(
        text.contains("codenames"),
        "the route's check first: {text}"
    );
    let (code, text) = call_as(outsider, "/v1/chat/completions", &ask("a zeppelin"));
    assert_eq!(code, 200, "{text}");

    // Its response checks run on streams after the route's: the member's stream is masked by both.
    let leaky = route("leaky");
    let (path, body) = requests(&leaky)[0].clone();
    let (code, text) = call_as(&member, path, &body);
    assert_eq!(code, 200, "{text}");
    assert_eq!(
        chat_text(&text),
        "The key is [SECRET] and [TICKET] [REDACTED]"
    );
    let (_, text) = call_as(outsider, path, &body);
    assert_eq!(chat_text(&text), MASKED);

    // A policy it names is missing: the Team says so and its members are refused (fail closed).
    cp.apply(&team_doc(&format!("{ns}/team-rules, {ns}/no-such-policy")));
    wait_ready_reason(cp, &["team", &team], "GuardrailNotReady");
    assert!(
        team_status()["message"]
            .as_str()
            .is_some_and(|m| m.contains(&format!("{ns}/no-such-policy does not exist"))),
        "{}",
        team_status()
    );
    eventually(Duration::from_secs(10), || {
        call_as(&member, "/v1/chat/completions", &ask("hello")).0 == 503
    })
    .expect("the member was served under a broken Team policy");
    let (code, text) = call_as(outsider, "/v1/chat/completions", &ask("hello"));
    assert_eq!(code, 200, "{text}");
    cp.ok(&["delete", "team", &team, "--wait=false"]);
}

/// A guarded Route that caches: what is stored is what callers receive (masked), a hit is masked
/// like a live answer, streamed or not, and a blocked request is neither served nor stored.
#[test]
fn a_cached_answer_is_the_masked_one_and_blocked_requests_never_touch_the_cache() {
    let f = fixture();
    let leaky = scripted(&LEAKY);
    let name = unique("cached");
    let doc = guarded_route(&f.ns, &name, "llm/v1/chat", &leaky.openai_base(), "pii")
        + "  cache:\n    scope: route\n";
    f.cp.apply(&doc);
    f.cp.wait_ready(&f.ns, &name);
    let url = f.gw.url("/v1/chat/completions");
    let plain = json!({"model": name, "messages": [{"role": "user", "content": "the key?"}]});
    eventually(Duration::from_secs(10), || {
        http_full_with(&url, &plain.to_string(), &[("cache-control", "no-store")]).0 == 200
    })
    .expect("the gateway never served the cached Route");
    let before = leaky.requests().len();

    let mut seen = Vec::new();
    for _ in 0..2 {
        let (status, headers, text) = http_full(&url, &plain.to_string());
        assert_eq!(status, 200, "{text}");
        let answer: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(answer["choices"][0]["message"]["content"], MASKED, "{text}");
        seen.push(
            header(&headers, "x-portcullis-cache")
                .unwrap_or_default()
                .to_string(),
        );
    }
    assert_eq!(seen, ["miss", "hit"]);
    // The streamed call is answered from the plain call's entry, masked chunk by chunk.
    let streamed = json!({"model": name, "messages": plain["messages"], "stream": true});
    let (status, headers, sse) = http_full(&url, &streamed.to_string());
    assert_eq!(status, 200, "{sse}");
    assert_eq!(header(&headers, "x-portcullis-cache"), Some("hit"), "{sse}");
    assert_eq!(chat_text(&sse), MASKED);
    assert!(!sse.contains("sk-") && !sse.contains("TCK-"), "{sse}");
    assert_eq!(
        leaky.requests().len(),
        before + 1,
        "only the miss reached the provider"
    );

    // A blocked request is refused before the lookup, every time: nothing to store, nothing served.
    let blocked = json!({"model": name, "messages": [{"role": "user", "content": "bluebird?"}]});
    for _ in 0..2 {
        let (status, _, text) = http_full(&url, &blocked.to_string());
        assert_eq!(status, 400, "{text}");
        assert!(text.contains("guardrail_blocked"), "{text}");
    }
    assert_eq!(leaky.requests().len(), before + 1);
}

/// A webhook of the platform team's, as a real HTTP server: records what it receives (the
/// `Authorization` header and the JSON body) and answers by the asking check's name and the texts:
/// `gate`-like checks block texts with "forbidden" (with a reason), wait out "slow", fail (500) on
/// "crash"; `scrub` masks every `ACCT-<digits>` by its character span.
struct Webhook {
    url: String,
    seen: Seen,
}

/// What a webhook received: the Authorization header and the body, per call.
type Seen = std::sync::Arc<parking_lot::Mutex<Vec<(Option<String>, Value)>>>;

impl Webhook {
    fn start() -> Webhook {
        use axum::http::{HeaderMap, StatusCode};
        let seen = Seen::default();
        let rt = runtime();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}/check", listener.local_addr().unwrap());
        let record = std::sync::Arc::clone(&seen);
        let app = axum::Router::new().route(
            "/check",
            axum::routing::post(move |headers: HeaderMap, body: axum::Json<Value>| {
                let record = std::sync::Arc::clone(&record);
                async move {
                    let auth = headers
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    record.lock().push((auth, body.0.clone()));
                    let texts: Vec<String> =
                        serde_json::from_value(body["texts"].clone()).unwrap_or_default();
                    let all = texts.join(" ");
                    let answer = match body["check"].as_str().unwrap_or_default() {
                        "scrub" => {
                            let mut spans = Vec::new();
                            for (i, t) in texts.iter().enumerate() {
                                for (at, _) in t.match_indices("ACCT-") {
                                    let digits = t[at + 5..]
                                        .bytes()
                                        .take_while(u8::is_ascii_digit)
                                        .count();
                                    let chars = |b: usize| t[..b].chars().count();
                                    spans.push(json!({"text": i, "start": chars(at), "end": chars(at + 5 + digits)}));
                                }
                            }
                            if spans.is_empty() {
                                json!({"action": "allow"})
                            } else {
                                json!({"action": "mask", "spans": spans})
                            }
                        }
                        _ if all.contains("forbidden") => {
                            json!({"action": "block", "reason": "topic not allowed"})
                        }
                        _ if all.contains("slow") => {
                            tokio::time::sleep(Duration::from_secs(2)).await;
                            json!({"action": "allow"})
                        }
                        _ if all.contains("crash") => {
                            return (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(json!({})));
                        }
                        _ => json!({"action": "allow"}),
                    };
                    (StatusCode::OK, axum::Json(answer))
                }
            }),
        );
        rt.spawn(async move { axum::serve(listener, app).await.unwrap() });
        Webhook { url, seen }
    }

    /// What it received for `check`: the Authorization header and the body.
    fn seen(&self, check: &str) -> Vec<(Option<String>, Value)> {
        self.seen
            .lock()
            .iter()
            .filter(|(_, b)| b["check"] == check)
            .cloned()
            .collect()
    }
}

fn chat_as(model: &str, text: &str) -> (u16, String) {
    let token = fixture().routes["token"].as_str().unwrap();
    call_as(
        token,
        "/v1/chat/completions",
        &json!({"model": model, "messages": [{"role": "user", "content": text}]}),
    )
}

fn stream_as(model: &str) -> String {
    let token = fixture().routes["token"].as_str().unwrap();
    let (code, text) = call_as(
        token,
        "/v1/chat/completions",
        &json!({"model": model, "messages": [{"role": "user", "content": "stream"}], "stream": true}),
    );
    assert_eq!(code, 200, "{text}");
    text
}

/// Applies `docs` and waits until every Route of `routes` is Ready and served.
fn apply_ready(f: &Fixture, docs: &[String], routes: &[&str]) {
    f.cp.apply(&docs.join("---\n"));
    for r in routes {
        f.cp.wait_ready(&f.ns, r);
    }
    eventually(Duration::from_secs(10), || {
        routes.iter().all(|r| chat_as(r, "ready?").0 != 404)
    })
    .expect("the gateway never served the routes");
}

#[test]
fn webhooks_allow_block_mask_time_out_and_fail_open_or_closed_on_requests_and_streams() {
    let f = fixture();
    let ns = &f.ns;
    let hook = Webhook::start();
    let url = &hook.url;
    let closed = format!("http://127.0.0.1:{}/check", free_port());
    let answers = scripted(&["Your acc", "ount is ACCT-", "98765, a forb", "idden one"]);
    let [strict, open, down, streamed, blocked, later] = [
        "hooked",
        "hook-open",
        "hook-down",
        "hook-stream",
        "hook-block",
        "hook-later",
    ]
    .map(unique);
    let gate = |name: &str, phase: &str, extra: &str| {
        format!(
            "  - {{name: {name}, phase: {phase}, action: block, detector: {{webhook: {{url: '{url}', timeout: 300ms{extra}}}}}}}\n"
        )
    };
    let auth = ", secretRef: {name: hook, key: token}";
    let docs = [
        secret_with(ns, "hook", &[("token", "hook-token")]),
        policy(
            ns,
            "hooked",
            &(gate("gate", "request", auth)
                + &format!(
                    "  - {{name: scrub, phase: both, action: mask, detector: {{webhook: {{url: '{url}'{auth}}}}}}}\n"
                )),
        ),
        policy(
            ns,
            "hook-open",
            &gate("gate", "request", ", failureMode: open"),
        ),
        policy(ns, "hook-answers", &gate("gate", "response", "")),
        policy(
            ns,
            "hook-down",
            &format!(
                "  - {{name: down, phase: request, action: block, detector: {{webhook: {{url: '{closed}'}}}}}}\n"
            ),
        ),
        policy(
            ns,
            "hook-later",
            &format!(
                "  - {{name: later, phase: response, action: audit, mode: after, detector: {{webhook: {{url: '{url}'}}}}}}\n"
            ),
        ),
        guarded_route(ns, &strict, "llm/v1/chat", &f.sim.openai_base(), "hooked"),
        guarded_route(ns, &open, "llm/v1/chat", &f.sim.openai_base(), "hook-open"),
        guarded_route(ns, &down, "llm/v1/chat", &f.sim.openai_base(), "hook-down"),
        guarded_route(
            ns,
            &streamed,
            "llm/v1/chat",
            &answers.openai_base(),
            "hooked",
        ),
        guarded_route(
            ns,
            &blocked,
            "llm/v1/chat",
            &answers.openai_base(),
            "hook-answers",
        ),
        guarded_route(
            ns,
            &later,
            "llm/v1/chat",
            &answers.openai_base(),
            "hook-later",
        ),
    ];
    apply_ready(
        f,
        &docs,
        &[&strict, &open, &down, &streamed, &blocked, &later],
    );

    // Allowed: what the webhook received is documented, with its own bearer and no other credential.
    let (code, text) = chat_as(&strict, "hello there");
    assert_eq!(code, 200, "{text}");
    let (auth, body) = hook
        .seen("gate")
        .into_iter()
        .find(|(_, b)| b["texts"].to_string().contains("hello there"))
        .expect("the webhook never saw the request");
    assert_eq!(auth.as_deref(), Some("Bearer hook-token"));
    assert_eq!(body["phase"], "request");
    assert_eq!(body["route"], format!("{ns}/{strict}"));
    assert_eq!(body["policy"], format!("{ns}/hooked"));
    assert!(
        body["consumer"].as_str().unwrap().contains("caller"),
        "{body}"
    );
    assert!(!body.to_string().contains("sk-guard"), "{body}");

    // Blocked with the webhook's reason; the provider never sees it.
    let (code, text) = chat_as(&strict, "a forbidden question");
    assert_eq!(code, 400, "{text}");
    assert!(
        text.contains("guardrail_blocked") && text.contains("topic not allowed"),
        "{text}"
    );
    // Masked by spans before it goes upstream.
    let (code, text) = chat_as(&strict, "pay ACCT-12345 now");
    assert_eq!(code, 200, "{text}");
    let bodies = received(&f.sim);
    assert!(!bodies.iter().any(|b| b.contains("forbidden question")));
    assert!(
        bodies.iter().any(|b| b.contains("pay [REDACTED] now"))
            && !bodies.iter().any(|b| b.contains("ACCT-12345")),
        "{bodies:?}"
    );
    // Late or failing: closed blocks, open lets through; an unreachable one fails closed.
    for t in ["slow down", "crash it"] {
        let (code, text) = chat_as(&strict, t);
        assert_eq!(code, 400, "{t}: {text}");
        assert!(text.contains("could not be made"), "{text}");
        let (code, text) = chat_as(&open, t);
        assert_eq!(code, 200, "{t}: {text}");
    }
    let (code, text) = chat_as(&down, "anything");
    assert_eq!(code, 400, "{text}");
    let metrics = f.gw.metrics();
    for (policy, check, outcome) in [
        ("hooked", "gate", "failed_closed"),
        ("hook-open", "gate", "failed_open"),
        ("hook-down", "down", "failed_closed"),
    ] {
        let line = format!(
            "portcullis_guardrail_external_errors_total{{policy=\"{ns}/{policy}\",check=\"{check}\",kind=\"webhook\",outcome=\"{outcome}\"}}"
        );
        assert!(metrics.contains(&line), "no {line} in\n{metrics}");
    }

    // A streamed answer is held whole in buffer mode: blocked with the dialect's error event,
    // nothing of it released first, or masked by the webhook's spans.
    let sse = stream_as(&blocked);
    assert!(
        sse.contains("guardrail_blocked") && !sse.contains("forb") && !sse.contains("ACCT-"),
        "{sse}"
    );
    assert!(!sse.contains("[DONE]"), "{sse}");
    let sse = stream_as(&streamed);
    assert_eq!(
        chat_text(&sse),
        "Your account is [REDACTED], a forbidden one"
    );
    assert!(!sse.contains("ACCT-"), "{sse}");
    let (_, body) = hook
        .seen("scrub")
        .into_iter()
        .rfind(|(_, b)| b["phase"] == "response")
        .expect("the webhook never saw the answer");
    assert_eq!(
        body["texts"],
        json!(["Your account is ACCT-98765, a forbidden one"])
    );

    // After mode: the stream passes untouched; the check runs once it is complete, and audits.
    let sse = stream_as(&later);
    assert!(
        chat_text(&sse).contains("ACCT-98765, a forbidden one"),
        "{sse}"
    );
    assert!(sse.contains("[DONE]"), "{sse}");
    let line = format!(
        "portcullis_guardrail_actions_total{{route=\"{later}\",policy=\"{ns}/hook-later\",check=\"later\",action=\"audit\",phase=\"response\"}}"
    );
    eventually(Duration::from_secs(10), || f.gw.metrics().contains(&line))
        .unwrap_or_else(|_| panic!("no {line}"));

    // Neither the texts the webhook judged nor its credential show in logs, metrics or Events.
    no_leaks(
        f,
        &[
            "ACCT-12345",
            "ACCT-98765",
            "forbidden question",
            "hook-token",
        ],
    );
}

/// None of `texts` appears in the gateway's log, its metrics or the namespace's Events.
fn no_leaks(f: &Fixture, texts: &[&str]) {
    let (log, metrics) = (f.gw.log(), f.gw.metrics());
    let events = f.cp.json(&["get", "events", "-n", &f.ns]).to_string();
    for t in texts {
        assert!(!log.contains(t), "the log shows {t:?}");
        assert!(!metrics.contains(t), "the metrics show {t:?}");
        assert!(!events.contains(t), "an Event shows {t:?}");
    }
}

#[test]
fn a_judge_route_blocks_unsafe_requests_and_its_calls_are_limited_and_charged_like_any() {
    let f = fixture();
    let ns = &f.ns;
    let unsafe_judge = scripted(&["unsafe\nS1"]);
    let safe_judge = scripted(&["safe"]);
    let [guard_no, guard_yes, judge_no, judge_yes, orphan] = [
        "judged",
        "judged-ok",
        "judge-unsafe",
        "judge-safe",
        "judged-orphan",
    ]
    .map(unique);
    let judge = |name: &str, route: &str| {
        policy(
            ns,
            name,
            &format!(
                "  - {{name: llama, phase: request, action: block, detector: {{judge: {{route: {route}}}}}}}\n"
            ),
        )
    };
    let limited = guarded_route(ns, &judge_yes, "llm/v1/chat", &safe_judge.openai_base(), "")
        .replace(
            "  guardrails: []\n",
            "  limits:\n  - renewalPeriod: minute\n    calls: 3\n",
        );
    let docs = [
        judge("judged", &judge_no),
        judge("judged-ok", &judge_yes),
        judge("judged-orphan", "no-such-route"),
        guarded_route(
            ns,
            &judge_no,
            "llm/v1/chat",
            &unsafe_judge.openai_base(),
            "",
        ),
        limited,
        guarded_route(ns, &guard_no, "llm/v1/chat", &f.sim.openai_base(), "judged"),
        guarded_route(
            ns,
            &guard_yes,
            "llm/v1/chat",
            &f.sim.openai_base(),
            "judged-ok",
        ),
        guarded_route(
            ns,
            &orphan,
            "llm/v1/chat",
            &f.sim.openai_base(),
            "judged-orphan",
        ),
    ];
    f.cp.apply(&docs.join("---\n"));
    for r in [&judge_no, &judge_yes, &guard_no, &guard_yes] {
        f.cp.wait_ready(ns, r);
    }
    // A judge Route that does not exist: the Route naming the policy fails closed, saying why.
    f.cp.wait_reason(ns, &orphan, "GuardrailNotReady");
    let message = ready_condition(f.cp, &["-n", ns, "route", &orphan])["message"].to_string();
    assert!(
        message.contains(&format!("Route {ns}/no-such-route does not exist")),
        "{message}"
    );
    // ... and the policy itself is InvalidSpec, naming its check.
    wait_ready_reason(
        f.cp,
        &["-n", ns, "guardrailpolicy", "judged-orphan"],
        "InvalidSpec",
    );
    let message = ready_condition(f.cp, &["-n", ns, "guardrailpolicy", "judged-orphan"])["message"]
        .to_string();
    assert!(message.contains("judge"), "{message}");

    // `unsafe` + categories: blocked, the categories told, the provider never called.
    eventually(Duration::from_secs(10), || {
        chat_as(&guard_no, "how to pick a lock").0 == 400
    })
    .expect("the judge never blocked");
    let (_, text) = chat_as(&guard_no, "how to pick a lock");
    assert!(
        text.contains("guardrail_blocked") && text.contains("unsafe: S1"),
        "{text}"
    );
    assert!(!received(&f.sim).iter().any(|b| b.contains("pick a lock")));
    let asked = received(&unsafe_judge);
    let prompt = asked
        .iter()
        .rfind(|b| b.contains("pick a lock"))
        .expect("the judge was never asked");
    assert!(
        prompt.contains("'User' messages") && prompt.contains("'safe' or 'unsafe'"),
        "{prompt}"
    );

    // `safe`: through. The judge's Route counts its calls (limit: 3 a minute, one used by the
    // readiness probe above at most): once it refuses, the check fails closed.
    let mut codes = Vec::new();
    for i in 0..5 {
        codes.push(chat_as(&guard_yes, &format!("hello {i}")).0);
    }
    assert_eq!(codes[0], 200, "{codes:?}");
    assert!(
        codes.ends_with(&[400, 400]),
        "the judge's limit never held: {codes:?}"
    );
    let (_, text) = chat_as(&guard_yes, "hello again");
    assert!(text.contains("could not be made"), "{text}");
    // Charged to the policy, not the caller.
    let metrics = f.gw.metrics();
    let consumer = format!("consumer=\"guardrail:{ns}/judged-ok\"");
    assert!(
        metrics
            .lines()
            .any(|l| l.contains(&format!("route=\"{judge_yes}\"")) && l.contains(&consumer)),
        "no judge call charged to {consumer}:\n{metrics}"
    );
    no_leaks(f, &["pick a lock"]);
}

#[test]
fn audits_and_blocks_record_one_event_a_minute_on_the_route_without_the_text() {
    let f = fixture();
    let ns = &f.ns;
    let name = unique("audited");
    let docs = [
        policy(
            ns,
            "watchful",
            "  - {name: zebras, phase: request, action: audit, detector: {keywords: [zebra]}}\n  - {name: lions, phase: request, action: block, detector: {keywords: [lion]}}\n",
        ),
        guarded_route(ns, &name, "llm/v1/chat", &f.sim.openai_base(), "watchful"),
    ];
    apply_ready(f, &docs, &[&name]);
    for _ in 0..3 {
        assert_eq!(chat_as(&name, "a zebra crossing").0, 200);
        assert_eq!(chat_as(&name, "a lion sleeps").0, 400);
    }
    let events = || -> Vec<Value> {
        f.cp.json(&["get", "events", "-n", ns])["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["involvedObject"]["name"] == name.as_str())
            .filter(|e| {
                e["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("Guardrail"))
            })
            .cloned()
            .collect()
    };
    eventually(Duration::from_secs(15), || events().len() >= 2).expect("no guardrail Events");
    std::thread::sleep(Duration::from_secs(2));
    let seen = events();
    let reasons: Vec<&str> = seen.iter().filter_map(|e| e["reason"].as_str()).collect();
    assert_eq!(
        reasons.iter().filter(|r| **r == "GuardrailAudit").count(),
        1,
        "{seen:?}"
    );
    assert_eq!(
        reasons.iter().filter(|r| **r == "GuardrailBlocked").count(),
        1,
        "{seen:?}"
    );
    for e in &seen {
        let text = e.to_string().to_lowercase();
        assert!(
            !text.contains("zebra crossing") && !text.contains("lion sleeps"),
            "{e}"
        );
        assert!(e["count"].as_u64().unwrap_or(1) <= 1, "{e}");
    }
    let audit = seen
        .iter()
        .find(|e| e["reason"] == "GuardrailAudit")
        .unwrap();
    assert!(
        audit["message"]
            .as_str()
            .is_some_and(|m| m.contains(&format!("check zebras of GuardrailPolicy {ns}/watchful"))),
        "{audit}"
    );
}
