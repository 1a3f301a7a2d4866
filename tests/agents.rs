//! The APIs agents speak, end to end: the real Anthropic Python SDK against `/v1/messages` and the
//! real OpenAI SDK's Responses API against `/v1/responses` (pytest in tests/python/agents), on
//! Routes served by OpenAI, Anthropic and Gemini, asserting what each simulated provider received;
//! the bad-input table of both surfaces; and a provider stream cut short on both.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers of tests: failing loudly is the point

mod support;

use std::sync::OnceLock;
use std::time::Duration;

use portcullis::api::{Provider, RouteSpec, RouteType};
use serde_json::{Value, json};
use support::*;

struct Fixture {
    gw: Gateway,
    sim: SimProvider,
    /// Faults are set on this one by `a_stream_cut_short_is_an_error_event_on_both_surfaces` only.
    faulty: SimProvider,
    openai: String,
    anthropic: String,
    gemini: String,
    throttled_openai: String,
    throttled_anthropic: String,
    embeddings: String,
    faulty_openai: String,
    faulty_anthropic: String,
    /// Two Anthropic backends, the first unreachable: calls fall back to the simulator.
    fallback_anthropic: String,
    /// Token budgets of 100 a day, one Route per surface.
    budget_messages: String,
    budget_responses: String,
    /// A ServiceAccount token: every call needs a caller (`--default-access authenticated`).
    token: String,
}

const BODY_LIMIT: usize = 16 * 1024;
const SECRET: &str = "sk-agents-upstream";

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let cp = ControlPlane::shared();
        let (sim, faulty) = (support::sim(), support::sim());
        let ns = cp.namespace("agents");
        let gw = Gateway::start(
            cp,
            &[
                "--namespace",
                &ns,
                "--default-access",
                "authenticated",
                "--body-limit",
                &BODY_LIMIT.to_string(),
                "--upstream-timeout",
                "5",
            ],
        );
        cp.ok(&["create", "serviceaccount", "agent", "-n", &ns]);
        let token = cp
            .ok(&[
                "create",
                "token",
                "agent",
                "-n",
                &ns,
                "--audience",
                "portcullis",
                "--duration",
                "30m",
            ])
            .trim()
            .to_string();
        let chat = |name: &str, provider: &str, model: &str, base: &str| {
            provider_route(
                &ns,
                name,
                "llm/v1/chat",
                provider,
                model,
                base,
                Some("keys"),
                &[],
            )
        };
        let name = |p: &str| unique(p);
        let (openai, anthropic, gemini) = (name("oa"), name("an"), name("ge"));
        let (throttled_openai, throttled_anthropic) = (name("oa-throttled"), name("an-throttled"));
        let (faulty_openai, faulty_anthropic) = (name("oa-faulty"), name("an-faulty"));
        let embeddings = name("emb");
        let fallback_anthropic = name("an-fallback");
        let mut fallback = RouteSpec::new(
            RouteType::Chat,
            model(Provider::Anthropic, "unused", "http://127.0.0.1:1", "keys"),
        );
        fallback.model = None;
        fallback.backends = vec![
            backend(
                model(
                    Provider::Anthropic,
                    "claude-gone",
                    "http://127.0.0.1:1",
                    "keys",
                ),
                1,
                0,
            ),
            backend(
                model(
                    Provider::Anthropic,
                    "claude-sonnet-4-5",
                    &sim.anthropic_base(),
                    "keys",
                ),
                1,
                1,
            ),
        ];
        let (budget_messages, budget_responses) = (name("budget-msg"), name("budget-resp"));
        let budget = "  limits:\n    - renewalPeriod: day\n      tokens: 100\n";
        let one_call = "  limits:\n    - renewalPeriod: hour\n      calls: 1\n";
        let docs = [
            secret_manifest(&ns, "keys", "apiKey", SECRET),
            chat(
                &budget_messages,
                "openai",
                "gpt-4o-mini",
                &sim.openai_base(),
            ) + budget,
            chat(
                &budget_responses,
                "openai",
                "gpt-4o-mini",
                &sim.openai_base(),
            ) + budget,
            chat(&openai, "openai", "gpt-4o-mini", &sim.openai_base()),
            // The Route's own beta feature: a caller's `anthropic-beta` adds to it.
            provider_route(
                &ns,
                &anthropic,
                "llm/v1/chat",
                "anthropic",
                "claude-sonnet-4-5",
                &sim.anthropic_base(),
                Some("keys"),
                &[("anthropicBeta", "context-1m-2025-08-07")],
            ),
            chat(&gemini, "gemini", "gemini-2.5-flash", &sim.gemini_base()),
            chat(
                &throttled_openai,
                "openai",
                "gpt-4o-mini",
                &sim.openai_base(),
            ) + one_call,
            chat(
                &throttled_anthropic,
                "anthropic",
                "claude-sonnet-4-5",
                &sim.anthropic_base(),
            ) + one_call,
            chat(
                &faulty_openai,
                "openai",
                "gpt-4o-mini",
                &faulty.openai_base(),
            ),
            chat(
                &faulty_anthropic,
                "anthropic",
                "claude-sonnet-4-5",
                &faulty.anthropic_base(),
            ),
            provider_route(
                &ns,
                &embeddings,
                "llm/v1/embeddings",
                "openai",
                "text-embedding-3-small",
                &sim.openai_base(),
                Some("keys"),
                &[],
            ),
            route_yaml(&ns, &fallback_anthropic, fallback),
        ];
        cp.apply(&docs.join("---\n"));
        let all = [
            &openai,
            &anthropic,
            &gemini,
            &throttled_openai,
            &throttled_anthropic,
            &faulty_openai,
            &faulty_anthropic,
            &embeddings,
            &fallback_anthropic,
            &budget_messages,
            &budget_responses,
        ];
        for r in all {
            cp.wait_ready(&ns, r);
        }
        let listed = || {
            let (_, body) = http_request(
                "GET",
                &gw.url("/v1/models"),
                None,
                &[("authorization", &format!("Bearer {token}"))],
            );
            serde_json::from_str::<Value>(&body).unwrap_or_default()["data"]
                .as_array()
                .map_or(0, Vec::len)
        };
        eventually(Duration::from_secs(15), || listed() == all.len())
            .expect("the gateway never served every route");
        Fixture {
            gw,
            sim,
            faulty,
            openai,
            anthropic,
            gemini,
            throttled_openai,
            throttled_anthropic,
            embeddings,
            faulty_openai,
            faulty_anthropic,
            fallback_anthropic,
            budget_messages,
            budget_responses,
            token,
        }
    })
}

/// Upstream JSON bodies the simulated provider received on paths containing `path`.
fn received(sim: &SimProvider, path: &str) -> Vec<Value> {
    sim.requests()
        .into_iter()
        .filter(|r| r.path.contains(path))
        .map(|r| r.json())
        .collect()
}

/// The first body whose JSON text contains `needle`.
fn find<'a>(bodies: &'a [Value], needle: &str) -> &'a Value {
    bodies
        .iter()
        .find(|b| b.to_string().contains(needle))
        .unwrap_or_else(|| panic!("no upstream body contains {needle:?}: {bodies:#?}"))
}

#[test]
fn anthropic_and_openai_sdks_on_every_provider() {
    let f = fixture();
    let routes = json!({
        "openai": f.openai, "anthropic": f.anthropic, "gemini": f.gemini,
        "throttled": {"openai": f.throttled_openai, "anthropic": f.throttled_anthropic},
        "token": f.token,
    });
    let (passed, _) = support::pytest(
        "mlflow3",
        "agents",
        &format!("http://{}", f.gw.addr),
        &routes,
    );
    assert!(passed, "pytest agents failed; gateway log:\n{}", f.gw.log());

    // OpenAI behind /v1/messages and /v1/responses: OpenAI's own shapes.
    let openai = received(&f.sim, "/openai/v1/chat/completions");
    let plain = find(&openai, "plain-check");
    assert_eq!(
        plain["messages"][0],
        json!({"role": "system", "content": "Be terse."})
    );
    assert_eq!(plain["max_tokens"], 100);
    assert_eq!(plain["temperature"], 0.5);
    assert_eq!(plain["stop"], json!(["END"]));
    for absent in ["top_k", "metadata", "anthropic_beta"] {
        assert!(
            plain.get(absent).is_none(),
            "{absent} reached OpenAI: {plain}"
        );
    }
    let image = find(&openai, "image-check");
    assert!(
        image["messages"][0]["content"][0]["image_url"]["url"]
            .as_str()
            .is_some_and(|u| u.starts_with("data:image/png;base64,")),
        "{image}"
    );
    let result = find(&openai, "Sunny, 21 C");
    assert_eq!(result["tools"][0]["function"]["name"], "get_weather");
    assert_eq!(
        result["tools"][0]["function"]["parameters"]["type"],
        "object"
    );
    // The call the provider made came back to it with the caller's result, ids intact.
    let turns = result["messages"].as_array().unwrap();
    let call = &turns[turns.len() - 2]["tool_calls"][0];
    assert!(
        call["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("call_sim")),
        "{result}"
    );
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert!(args.is_object(), "{result}");
    assert_eq!(
        turns[turns.len() - 1],
        json!({"role": "tool", "tool_call_id": call["id"], "content": "Sunny, 21 C"})
    );
    let responses = find(&openai, "responses-plain");
    assert_eq!(responses["messages"][0]["content"], "Be terse.");
    assert_eq!(responses["max_tokens"], 100);
    let structured = find(&openai, "structured-check");
    assert_eq!(
        structured["response_format"]["json_schema"]["schema"]["type"],
        "object"
    );
    let structured = find(&openai, "json-check");
    assert_eq!(structured["response_format"]["type"], "json_schema");
    assert_eq!(
        structured["response_format"]["json_schema"]["name"],
        "weather"
    );
    assert_eq!(structured["response_format"]["json_schema"]["strict"], true);

    // Anthropic behind /v1/messages: its own fields pass through untouched.
    let anthropic = received(&f.sim, "/anthropic/v1/messages");
    let plain = find(&anthropic, "plain-check");
    assert_eq!(plain["system"], "Be terse.");
    assert_eq!(plain["top_k"], 5);
    assert_eq!(plain["metadata"], json!({"user_id": "agent-1"}));
    assert_eq!(plain["stop_sequences"], json!(["END"]));
    assert_eq!(plain["max_tokens"], 100);
    let beta = f
        .sim
        .requests()
        .into_iter()
        .find(|r| r.path.contains("/anthropic/") && r.json().to_string().contains("plain-check"))
        .and_then(|r| r.header("anthropic-beta").map(String::from));
    assert_eq!(
        beta.as_deref(),
        Some("context-1m-2025-08-07,prompt-caching-2024-07-31")
    );
    let image = find(&anthropic, "image-check");
    assert_eq!(image["messages"][0]["content"][0]["type"], "image");
    assert_eq!(
        image["messages"][0]["content"][0]["source"]["type"],
        "base64"
    );
    assert_eq!(
        image["messages"][0]["content"][0]["source"]["media_type"],
        "image/png"
    );
    let result = find(&anthropic, "Sunny, 21 C");
    let turns = result["messages"].as_array().unwrap();
    let call = &turns[turns.len() - 2]["content"][0];
    assert_eq!(call["type"], "tool_use", "{result}");
    assert_eq!(call["name"], "get_weather");
    assert!(
        call["input"].is_object() && call["id"].is_string(),
        "{result}"
    );
    assert_eq!(turns[turns.len() - 1]["content"][0]["type"], "tool_result");
    assert_eq!(
        turns[turns.len() - 1]["content"][0]["tool_use_id"],
        call["id"]
    );

    // An Anthropic-only Route passes Anthropic-only fields through untouched: the SDK's body but
    // for `model` (its answers, thinking included, reached the SDK as sent: see the pytest).
    for stream in ["False", "True"] {
        let sent = find(&anthropic, &format!("passthrough-check stream={stream}"));
        assert_eq!(sent["model"], "claude-sonnet-4-5");
        assert_eq!(
            sent["thinking"],
            json!({"type": "enabled", "budget_tokens": 1024})
        );
        assert_eq!(sent["service_tier"], "standard_only");
        assert_eq!(sent["cache_control"], json!({"type": "ephemeral"}));
        assert_eq!(sent["tools"][0]["name"], "get_weather");
        assert_eq!(
            sent["tools"][0]["cache_control"],
            json!({"type": "ephemeral"})
        );
        assert_eq!(
            sent["tools"][1],
            json!({"type": "web_search_20250305", "name": "web_search", "max_uses": 1})
        );
        assert_eq!(
            sent["messages"][0]["content"][0],
            json!({"type": "document", "title": "passthrough-doc", "citations": {"enabled": true},
                "source": {"type": "text", "media_type": "text/plain", "data": "Paris is the capital of France."}})
        );
        assert_eq!(
            sent["messages"][1]["content"][0],
            json!({"type": "thinking", "thinking": "Look it up.", "signature": "sig_earlier"})
        );
        assert_eq!(
            sent["messages"][2]["content"][0],
            json!({"type": "tool_result", "tool_use_id": "toolu_pt", "content": "no such city", "is_error": true})
        );
    }

    // Cache breakpoints reach Anthropic on their blocks, and never OpenAI.
    let cached = find(&anthropic, "cache-check system");
    assert_eq!(
        cached["system"][0]["cache_control"],
        json!({"type": "ephemeral"}),
        "{cached}"
    );
    assert!(
        !find(&openai, "cache-check system")
            .to_string()
            .contains("cache_control")
    );

    // Structured output reaches Anthropic as a forced tool, Gemini as a JSON response.
    let structured = find(&anthropic, "json-check");
    assert_eq!(
        structured["tool_choice"]["name"], "portcullis_structured_output",
        "{structured}"
    );

    // Gemini behind /v1/responses.
    let gemini = received(&f.sim, "/gemini/");
    let plain = find(&gemini, "responses-plain");
    assert_eq!(plain["systemInstruction"]["parts"][0]["text"], "Be terse.");
    let structured = find(&gemini, "json-check");
    assert_eq!(
        structured["generationConfig"]["responseMimeType"], "application/json",
        "{structured}"
    );
    // Streamed tool calls were asked of every provider with the tools offered.
    assert!(find(&gemini, "stream-tools")["tools"].is_array());

    // Both surfaces have their own label; the caller's token is never logged.
    let metrics = f.gw.metrics();
    assert!(metrics.contains("surface=\"anthropic\""), "{metrics}");
    // The usage of Anthropic's untranslated answers and streams is still counted.
    for kind in ["input", "output"] {
        let counted = metrics.lines().any(|l| {
            l.starts_with(&format!(
                "gen_ai_client_token_usage_total{{route=\"{}\"",
                f.anthropic
            )) && l.contains(&format!("gen_ai_token_type=\"{kind}\""))
                && !l.ends_with(" 0")
        });
        assert!(
            counted,
            "no {kind} tokens counted for {}: {metrics}",
            f.anthropic
        );
    }
    assert!(metrics.contains("surface=\"responses\""), "{metrics}");
    let log = f.gw.log();
    assert!(!log.contains(&f.token) && !log.contains(SECRET));
    assert!(log.contains("\"surface\":\"anthropic\""));
}

/// Calls `path` with `body` (raw), as the fixture's caller unless `anonymous`.
fn call_raw(path: &str, body: &str, anonymous: bool) -> (u16, Value) {
    let f = fixture();
    let auth = format!("Bearer {}", f.token);
    let mut headers = vec![("content-type", "application/json")];
    if !anonymous {
        headers.push(("authorization", auth.as_str()));
    }
    let (status, text) = http_request("POST", &f.gw.url(path), Some(body), &headers);
    (
        status,
        serde_json::from_str(&text).unwrap_or(json!({"raw": text})),
    )
}

#[test]
fn bad_input_is_a_4xx_in_each_surfaces_own_shape() {
    let f = fixture();
    let hi = json!([{"role": "user", "content": "hi"}]);
    let oversize = format!(
        "{{\"model\": {:?}, \"max_tokens\": 5, \"input\": \"x\", \"messages\": [{{\"role\": \"user\", \"content\": {:?}}}]}}",
        f.openai,
        "x".repeat(BODY_LIMIT)
    );
    let weather = json!({"name": "get_weather", "input_schema": {"type": "object"}});
    let anthropic: Vec<(&str, String, bool, u16, &str)> = vec![
        ("missing max_tokens", json!({"model": f.openai, "messages": hi}).to_string(), false, 400, "invalid_request_error"),
        // Translated Routes refuse it themselves (Anthropic refuses it on its own Routes).
        ("unknown block type", json!({"model": f.openai, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "hologram"}]}]}).to_string(), false, 400, "invalid_request_error"),
        ("malformed tool schema", json!({"model": f.openai, "max_tokens": 5, "messages": hi, "tools": [{"name": "f", "input_schema": {"type": "string"}}]}).to_string(), false, 400, "invalid_request_error"),
        ("tool without a name", json!({"model": f.openai, "max_tokens": 5, "messages": hi, "tools": [{"input_schema": {"type": "object"}}]}).to_string(), false, 400, "invalid_request_error"),
        ("server tool", json!({"model": f.openai, "max_tokens": 5, "messages": hi, "tools": [weather, {"type": "web_search_20250305", "name": "web_search"}]}).to_string(), false, 400, "invalid_request_error"),
        ("system role in messages", json!({"model": f.openai, "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}).to_string(), false, 400, "invalid_request_error"),
        ("temperature above 1", json!({"model": f.openai, "max_tokens": 5, "messages": hi, "temperature": 1.5}).to_string(), false, 400, "invalid_request_error"),
        ("wrong route type", json!({"model": f.embeddings, "max_tokens": 5, "messages": hi}).to_string(), false, 400, "invalid_request_error"),
        ("unknown route", json!({"model": "no-such-route", "max_tokens": 5, "messages": hi}).to_string(), false, 404, "not_found_error"),
        ("not JSON", "{\"model\":".to_string(), false, 400, "invalid_request_error"),
        ("missing model", json!({"max_tokens": 5, "messages": hi}).to_string(), false, 400, "invalid_request_error"),
        ("oversize body", oversize.clone(), false, 413, "request_too_large"),
        ("no credential", json!({"model": f.openai, "max_tokens": 5, "messages": hi}).to_string(), true, 401, "authentication_error"),
    ];
    for (what, body, anonymous, want, kind) in &anthropic {
        for path in ["/v1/messages", "/v1/messages/count_tokens"] {
            if path.ends_with("count_tokens") && *what == "missing max_tokens" {
                continue; // counting needs no max_tokens
            }
            let (status, got) = call_raw(path, body, *anonymous);
            assert_eq!(status, *want, "{path} {what}: {got}");
            assert_eq!(got["type"], "error", "{path} {what}: {got}");
            assert_eq!(got["error"]["type"], *kind, "{path} {what}: {got}");
            assert!(
                got["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty()),
                "{what}"
            );
        }
    }
    let (status, counted) = call_raw(
        "/v1/messages/count_tokens",
        &json!({"model": f.openai, "messages": hi}).to_string(),
        false,
    );
    assert_eq!(status, 200, "{counted}");
    assert!(counted["input_tokens"].as_u64().is_some_and(|n| n > 0));

    let responses: Vec<(&str, Value, bool, u16)> = vec![
        ("missing input", json!({"model": f.openai}), false, 400),
        (
            "previous_response_id",
            json!({"model": f.openai, "input": "x", "previous_response_id": "resp_1"}),
            false,
            400,
        ),
        (
            "store",
            json!({"model": f.openai, "input": "x", "store": true}),
            false,
            400,
        ),
        (
            "background",
            json!({"model": f.openai, "input": "x", "background": true}),
            false,
            400,
        ),
        (
            "built-in tool",
            json!({"model": f.gemini, "input": "x", "tools": [{"type": "web_search_preview"}]}),
            false,
            400,
        ),
        (
            "malformed tool schema",
            json!({"model": f.openai, "input": "x", "tools": [{"type": "function", "name": "f", "parameters": "x"}]}),
            false,
            400,
        ),
        (
            "unknown item type",
            json!({"model": f.openai, "input": [{"type": "hologram"}]}),
            false,
            400,
        ),
        (
            "unknown content type",
            json!({"model": f.openai, "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}),
            false,
            400,
        ),
        (
            "bad text.format",
            json!({"model": f.openai, "input": "x", "text": {"format": {"type": "json_schema"}}}),
            false,
            400,
        ),
        (
            "wrong route type",
            json!({"model": f.embeddings, "input": "x"}),
            false,
            400,
        ),
        (
            "unknown route",
            json!({"model": "no-such-route", "input": "x"}),
            false,
            404,
        ),
        (
            "no credential",
            json!({"model": f.openai, "input": "x"}),
            true,
            401,
        ),
    ];
    for (what, body, anonymous, want) in &responses {
        let (status, got) = call_raw("/v1/responses", &body.to_string(), *anonymous);
        assert_eq!(status, *want, "{what}: {got}");
        assert!(
            got["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{what}: {got}"
        );
        assert!(
            got["error"]["type"].is_string() && got.get("type").is_none(),
            "{what}: {got}"
        );
    }
    let (status, got) = call_raw("/v1/responses/resp_123/cancel", "{}", false);
    assert_eq!(status, 404, "{got}");
    assert!(
        got["error"]["message"]
            .as_str()
            .unwrap()
            .contains("stateless"),
        "{got}"
    );
    let (status, got) = call_raw("/v1/responses", &oversize, false);
    assert_eq!(status, 413, "{got}");
    assert_eq!(got["error"]["code"], "payload_too_large");
}

/// Named SSE events of a streamed answer.
fn events(path: &str, body: Value) -> Vec<(String, Value)> {
    let f = fixture();
    let (status, text) = http_request(
        "POST",
        &f.gw.url(path),
        Some(&body.to_string()),
        &[
            ("content-type", "application/json"),
            ("x-api-key", &f.token),
        ],
    );
    assert_eq!(status, 200, "{path}: {text}");
    text.split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let name = e
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap_or_default()
                .to_string();
            let data = e
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .and_then(|d| serde_json::from_str(d).ok())
                .unwrap_or(Value::Null);
            (name, data)
        })
        .collect()
}

#[test]
fn a_stream_cut_short_is_an_error_event_on_both_surfaces() {
    let f = fixture();
    for fault in [
        Fault::CutStream { after_frames: 4 },
        Fault::EndStream { after_frames: 4 },
    ] {
        f.faulty.set_behaviour(portcullis_sim::Behaviour {
            fault: fault.clone(),
            chunk_delay: Duration::from_millis(10),
            ..Default::default()
        });
        for route in [&f.faulty_openai, &f.faulty_anthropic] {
            let messages = events(
                "/v1/messages",
                json!({"model": route, "max_tokens": 100, "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
            );
            let names: Vec<&str> = messages.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(
                names.first(),
                Some(&"message_start"),
                "{fault:?} {route}: {names:?}"
            );
            assert_eq!(names.last(), Some(&"error"), "{fault:?} {route}: {names:?}");
            assert!(!names.contains(&"message_stop") && !names.contains(&"message_delta"));
            assert_eq!(messages.last().unwrap().1["error"]["type"], "api_error");

            let responses = events(
                "/v1/responses",
                json!({"model": route, "stream": true, "input": "hi"}),
            );
            let names: Vec<&str> = responses.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(
                names.last(),
                Some(&"response.failed"),
                "{fault:?} {route}: {names:?}"
            );
            assert!(names.contains(&"error") && !names.contains(&"response.completed"));
            assert_eq!(responses.last().unwrap().1["response"]["status"], "failed");
        }
    }
    f.faulty.set_fault(Fault::None);
}

#[test]
fn token_budgets_charge_and_settle_on_both_surfaces() {
    let f = fixture();
    // Each call reserves about 63 tokens (prompt estimate + 60) and really uses 22 (20 words of
    // answer): two fit in 100 only if the first was settled to its real usage, a third does not.
    let messages = json!({"model": f.budget_messages, "max_tokens": 60, "stream": true,
        "messages": [{"role": "user", "content": "hello there"}]});
    for _ in 0..2 {
        let streamed = events("/v1/messages", messages.clone());
        assert_eq!(
            streamed.last().map(|(n, _)| n.as_str()),
            Some("message_stop")
        );
        // The charge is settled when the stream is dropped, just after its last event.
        std::thread::sleep(Duration::from_millis(200));
    }
    let (status, got) = call_raw("/v1/messages", &messages.to_string(), false);
    assert_eq!(status, 429, "{got}");
    assert_eq!(got["error"]["type"], "rate_limit_error");

    let responses =
        json!({"model": f.budget_responses, "max_output_tokens": 60, "input": "hello there"});
    for _ in 0..2 {
        let (status, got) = call_raw("/v1/responses", &responses.to_string(), false);
        assert_eq!(status, 200, "{got}");
        assert_eq!(got["usage"]["output_tokens"], 20);
    }
    let (status, got) = call_raw("/v1/responses", &responses.to_string(), false);
    assert_eq!(status, 429, "{got}");
    assert_eq!(got["error"]["code"], "rate_limit_exceeded");
}

#[test]
fn an_anthropic_route_answers_exactly_as_anthropic_did() {
    let f = fixture();
    let ask = json!({"model": f.anthropic, "max_tokens": 2048,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": [{"role": "user", "content": "verbatim-check"}]});
    let (status, got) = call_raw("/v1/messages", &ask.to_string(), false);
    assert_eq!(status, 200, "{got}");
    // The simulator's own answer: its id and model, the thinking block with its signature, and
    // its usage fields.
    assert_eq!(got["id"], "msg_sim");
    assert_eq!(got["model"], "claude-sonnet-4-5");
    assert_eq!(got["content"][0]["type"], "thinking", "{got}");
    assert_eq!(got["content"][0]["signature"], "sig_sim_thinking");
    assert_eq!(got["usage"]["cache_read_input_tokens"], 0, "{got}");

    let mut streamed = ask;
    streamed["stream"] = json!(true);
    let events = events("/v1/messages", streamed);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(names.last(), Some(&"message_stop"));
    assert_eq!(events[0].1["message"]["id"], "msg_sim");
    assert_eq!(
        events[1].1["content_block"],
        json!({"type": "thinking", "thinking": ""})
    );
    let deltas: Vec<&str> = events
        .iter()
        .filter_map(|(_, e)| e["delta"]["type"].as_str())
        .collect();
    assert!(
        deltas.contains(&"thinking_delta") && deltas.contains(&"signature_delta"),
        "{names:?}"
    );

    // Falling back from an unreachable Anthropic backend to the next keeps the body untouched.
    let sent = json!({"model": f.fallback_anthropic, "max_tokens": 2048, "service_tier": "auto",
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "messages": [{"role": "user", "content": "fallback-verbatim"}]});
    let (status, got) = call_raw("/v1/messages", &sent.to_string(), false);
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["content"][0]["type"], "thinking", "{got}");
    let received = find(&received(&f.sim, "/anthropic/"), "fallback-verbatim").clone();
    let mut want = sent;
    want["model"] = json!("claude-sonnet-4-5");
    assert_eq!(received, want);
}
