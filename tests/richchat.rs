//! Richer chat on every tool-capable provider, end to end: tool calls streamed as they arrive
//! (the real OpenAI Python SDK and raw SSE, on `/v1/chat/completions` and the MLflow invocations
//! stream), images and structured output translated to each provider's own shapes (asserted on what
//! the simulated provider received), and a provider stream cut short reported as an error event.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers of tests: failing loudly is the point

mod support;

use std::sync::OnceLock;

use portcullis_sim::{Fault, RecordedRequest, tool_arguments};
use serde_json::{Value, json};
use support::*;

/// The tool-capable providers, each with the model its Route names, its Secret and its config.
const PROVIDERS: &[(&str, &str)] = &[
    ("openai", "gpt-4o-mini"),
    ("azure-openai", "gpt4o-prod"),
    ("anthropic", "claude-sonnet-4-5"),
    ("gemini", "gemini-2.5-flash"),
    ("bedrock", "anthropic.claude-3-haiku-20240307-v1:0"),
    ("cohere", "command-a-03-2025"),
    ("mistral", "mistral-small-latest"),
    ("together", "meta-llama/Llama-3.3-70B-Instruct-Turbo"),
    ("groq", "llama-3.3-70b-versatile"),
    ("deepseek", "deepseek-chat"),
    ("ai21", "jamba-mini"),
    ("ollama", "llama3.2"),
    ("databricks-model-serving", "databricks-claude-sonnet"),
    ("openai-compatible", "local-model"),
];

/// The providers whose requests the gateway translates (the others take OpenAI's shapes as they are).
const TRANSLATED: &[&str] = &["anthropic", "gemini", "bedrock", "cohere"];

/// The structured-output tool of the Anthropic and Bedrock translations.
const OUTPUT_TOOL: &str = "portcullis_structured_output";

struct Fixture {
    gw: Gateway,
    /// Answers every route in `routes`.
    sim: SimProvider,
    /// Its faults are set by the stream-cut test only; it answers `cut_routes`.
    faulty: SimProvider,
    /// Provider name -> route name.
    routes: Vec<(&'static str, String)>,
    cut_routes: Vec<(&'static str, String)>,
    /// An MLflow model serving route: no images, no structured output.
    mlflow: String,
}

fn secret_for(provider: &str) -> &'static str {
    match provider {
        "bedrock" => "aws",
        _ => "key",
    }
}

fn config_for(provider: &str) -> &'static [(&'static str, &'static str)] {
    match provider {
        "azure-openai" => &[("apiVersion", "2024-10-21")],
        "bedrock" => &[("region", "us-west-2")],
        _ => &[],
    }
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let cp = ControlPlane::shared();
        let (sim, faulty) = (sim(), support::sim());
        // Chunks apart in time, so a cut after some of them lands mid-stream, not mid-headers.
        faulty.set_behaviour(portcullis_sim::Behaviour {
            chunk_delay: std::time::Duration::from_millis(20),
            ..Default::default()
        });
        let ns = cp.namespace("richchat");
        let gw = Gateway::start(cp, &["--namespace", &ns]);
        let mut docs = vec![
            secret_with(&ns, "key", &[("apiKey", "sk-richchat-5e1d")]),
            secret_with(
                &ns,
                "aws",
                &[
                    ("awsAccessKeyId", "AKIDRICHCHAT"),
                    ("awsSecretAccessKey", "richchat-secret"),
                ],
            ),
        ];
        let mut routes = Vec::new();
        let mut cut_routes = Vec::new();
        for (provider, model) in PROVIDERS {
            for (target, list) in [(&sim, &mut routes), (&faulty, &mut cut_routes)] {
                let name = unique(&format!("rc-{provider}"));
                docs.push(provider_route(
                    &ns,
                    &name,
                    "llm/v1/chat",
                    provider,
                    model,
                    &target.base(provider),
                    Some(secret_for(provider)),
                    config_for(provider),
                ));
                list.push((*provider, name));
            }
        }
        let mlflow = unique("rc-mlflow");
        docs.push(provider_route(
            &ns,
            &mlflow,
            "llm/v1/chat",
            "mlflow-model-serving",
            "chat-model",
            &sim.mlflow_base(),
            None,
            &[],
        ));
        cp.apply(&docs.join("---\n"));
        for (_, r) in routes.iter().chain(&cut_routes) {
            cp.wait_ready(&ns, r);
        }
        cp.wait_ready(&ns, &mlflow);
        Fixture {
            gw,
            sim,
            faulty,
            routes,
            cut_routes,
            mlflow,
        }
    })
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
        {"type": "function", "function": {"name": "get_time", "description": "The time in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    ])
}

/// What the simulated providers send when offered `tools()`: both tools, in order.
fn expected_calls() -> Vec<(String, Value)> {
    ["get_weather", "get_time"]
        .iter()
        .enumerate()
        .map(|(i, name)| (name.to_string(), tool_arguments(name, i)))
        .collect()
}

/// A streamed OpenAI answer, accumulated as a client does.
#[derive(Debug, Default)]
struct Streamed {
    text: String,
    /// (id, name, arguments text) by call index.
    calls: Vec<(String, String, String)>,
    finish: Option<String>,
    error: Option<Value>,
    done: bool,
}

fn accumulate(body: &str) -> Streamed {
    let mut s = Streamed::default();
    for data in body.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if data == "[DONE]" {
            s.done = true;
            continue;
        }
        let chunk: Value = serde_json::from_str(data).expect("chunk json");
        if let Some(e) = chunk.get("error") {
            s.error = Some(e.clone());
            continue;
        }
        for choice in chunk["choices"].as_array().into_iter().flatten() {
            if let Some(t) = choice.pointer("/delta/content").and_then(Value::as_str) {
                s.text.push_str(t);
            }
            for call in choice
                .pointer("/delta/tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let i = call["index"].as_u64().expect("a tool call index") as usize;
                if i == s.calls.len() {
                    let id = call["id"].as_str().expect("the first fragment has the id");
                    let name = call
                        .pointer("/function/name")
                        .and_then(Value::as_str)
                        .expect("the first fragment has the name");
                    assert_eq!(call["type"], "function", "{call}");
                    s.calls
                        .push((id.to_string(), name.to_string(), String::new()));
                } else {
                    assert!(i < s.calls.len(), "fragment of call {i} before it started");
                    assert!(
                        call.get("id").is_none(),
                        "a later fragment repeats the id: {call}"
                    );
                }
                if let Some(a) = call.pointer("/function/arguments").and_then(Value::as_str) {
                    s.calls[i].2.push_str(a);
                }
            }
            if let Some(f) = choice["finish_reason"].as_str() {
                s.finish = Some(f.to_string());
            }
        }
    }
    s
}

fn assert_calls(provider: &str, calls: &[(String, String, String)]) {
    let got: Vec<(String, Value)> = calls
        .iter()
        .map(|(_, name, args)| {
            let parsed = serde_json::from_str(args)
                .unwrap_or_else(|e| panic!("{provider}: arguments {args:?} are not JSON: {e}"));
            (name.clone(), parsed)
        })
        .collect();
    assert_eq!(got, expected_calls(), "{provider}");
    let mut ids: Vec<&str> = calls.iter().map(|(id, _, _)| id.as_str()).collect();
    ids.dedup();
    assert_eq!(ids.len(), calls.len(), "{provider}: ids {ids:?}");
    assert!(ids.iter().all(|id| !id.is_empty()), "{provider}");
}

fn post_stream(path: &str, body: &Value) -> (u16, String) {
    let f = fixture();
    let (status, _, text) = post_full(&f.gw.url(path), body);
    (status, text)
}

/// The requests `provider`'s simulation received whose body holds `marker`, newest first. The
/// tests here run in parallel against one simulation: each finds its own requests by a marker.
fn requests_for(sim: &SimProvider, provider: &str, marker: &str) -> Vec<RecordedRequest> {
    let base = sim.base(provider);
    let prefix = base
        .split_once(&sim.addr.to_string())
        .map(|(_, path)| path.to_string())
        .unwrap_or_default();
    sim.requests()
        .into_iter()
        .rev()
        .filter(|r| r.path.starts_with(&prefix))
        .filter(|r| String::from_utf8_lossy(&r.body).contains(marker))
        .collect()
}

fn last_request_for(sim: &SimProvider, provider: &str, marker: &str) -> RecordedRequest {
    requests_for(sim, provider, marker)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("{provider}: no request holding {marker:?}"))
}

/// The tools as each provider received them.
fn assert_tools_sent(provider: &str, body: &Value) {
    let names: Vec<&str> = match provider {
        "anthropic" => body["tools"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|t| t["name"].as_str())
            .collect(),
        "gemini" => body["tools"][0]["functionDeclarations"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|t| t["name"].as_str())
            .collect(),
        "bedrock" => body["toolConfig"]["tools"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|t| t.pointer("/toolSpec/name").and_then(Value::as_str))
            .collect(),
        _ => body["tools"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|t| t.pointer("/function/name").and_then(Value::as_str))
            .collect(),
    };
    assert_eq!(names, ["get_weather", "get_time"], "{provider}: {body}");
}

#[test]
fn streamed_tool_calls_from_every_provider_through_the_openai_python_sdk() {
    let f = fixture();
    let expected: Vec<Value> = expected_calls().into_iter().map(|(_, a)| a).collect();
    let routes = json!({
        "tools": f.routes.iter().map(|(p, r)| (p.to_string(), json!(r))).collect::<serde_json::Map<_, _>>(),
        "expected_arguments": expected,
    });
    let (passed, _) = support::pytest(
        "mlflow3",
        "richchat",
        &format!("http://{}", f.gw.addr),
        &routes,
    );
    assert!(
        passed,
        "pytest richchat failed; gateway log:\n{}",
        f.gw.log()
    );
    // The SDK's `parse` sends a strict schema (`additionalProperties: false`), beyond Gemini's
    // OpenAPI subset: it went as `responseJsonSchema`.
    let strict = requests_for(&f.sim, "gemini", "Answer in JSON.")
        .iter()
        .map(RecordedRequest::json)
        .find(|b| b["generationConfig"].get("responseJsonSchema").is_some())
        .expect("the SDK's strict schema reached Gemini as responseJsonSchema");
    assert_eq!(
        strict["generationConfig"]["responseJsonSchema"]["additionalProperties"], false,
        "{strict}"
    );
}

#[test]
fn streamed_tool_calls_on_chat_completions_and_mlflow_invocations() {
    let f = fixture();
    let messages = json!([{"role": "user", "content": "Weather and time, raw SSE?"}]);
    for (provider, route) in &f.routes {
        // /v1/chat/completions, streamed.
        let body = json!({"model": route, "messages": messages, "tools": tools(), "stream": true});
        let (status, text) = post_stream("/v1/chat/completions", &body);
        assert_eq!(status, 200, "{provider}: {text}");
        let s = accumulate(&text);
        assert!(s.error.is_none(), "{provider}: {text}");
        assert!(s.done, "{provider}: no [DONE]: {text}");
        assert_eq!(
            s.finish.as_deref(),
            Some("tool_calls"),
            "{provider}: {text}"
        );
        assert_calls(provider, &s.calls);
        assert_tools_sent(
            provider,
            &last_request_for(&f.sim, provider, "raw SSE?").json(),
        );

        // The MLflow deployments invocations stream: the same chunks, no [DONE].
        let body = json!({"messages": messages, "tools": tools(), "stream": true});
        let (status, text) = post_stream(&format!("/endpoints/{route}/invocations"), &body);
        assert_eq!(status, 200, "{provider}: {text}");
        let s = accumulate(&text);
        assert!(s.error.is_none() && !s.done, "{provider}: {text}");
        assert_eq!(s.finish.as_deref(), Some("tool_calls"), "{provider}");
        assert_calls(provider, &s.calls);

        // Not streamed: message.tool_calls, finish_reason tool_calls.
        let (status, answer) = f.gw.post(
            "/v1/chat/completions",
            &json!({"model": route, "messages": messages, "tools": tools()}),
        );
        assert_eq!(status, 200, "{provider}: {answer}");
        let choice = &answer["choices"][0];
        assert_eq!(
            choice["finish_reason"], "tool_calls",
            "{provider}: {answer}"
        );
        let calls: Vec<(String, String, String)> = choice["message"]["tool_calls"]
            .as_array()
            .unwrap_or_else(|| panic!("{provider}: {answer}"))
            .iter()
            .map(|c| {
                assert_eq!(c["type"], "function", "{provider}: {c}");
                (
                    c["id"].as_str().unwrap_or_default().to_string(),
                    c["function"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    c["function"]["arguments"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                )
            })
            .collect();
        assert_calls(provider, &calls);
    }
}

#[test]
fn gemini_thought_signatures_come_back_with_their_calls() {
    let f = fixture();
    let route = &f.routes.iter().find(|(p, _)| *p == "gemini").unwrap().1;
    let ask = json!([{"role": "user", "content": "Signed calls?"}]);
    let (status, answer) = f.gw.post(
        "/v1/chat/completions",
        &json!({"model": route, "messages": ask, "tools": tools()}),
    );
    assert_eq!(status, 200, "{answer}");
    let calls = answer["choices"][0]["message"]["tool_calls"].clone();
    let mut messages = ask.as_array().cloned().unwrap();
    messages.push(json!({"role": "assistant", "content": null, "tool_calls": calls}));
    for call in calls.as_array().unwrap() {
        messages.push(json!({"role": "tool", "tool_call_id": call["id"], "content": "ok"}));
    }
    let (status, answer) = f.gw.post(
        "/v1/chat/completions",
        &json!({"model": route, "messages": messages, "tools": tools()}),
    );
    assert_eq!(status, 200, "{answer}");
    let sent = last_request_for(&f.sim, "gemini", "Signed calls?").json();
    let parts = &sent["contents"][1]["parts"];
    for (i, name) in ["get_weather", "get_time"].iter().enumerate() {
        assert_eq!(parts[i]["functionCall"]["name"], *name, "{sent}");
        assert_eq!(
            parts[i]["thoughtSignature"],
            portcullis_sim::thought_signature(i),
            "{sent}"
        );
    }
    assert_eq!(
        sent["contents"][2]["parts"][0]["functionResponse"]["name"], "get_weather",
        "{sent}"
    );
}

#[test]
fn tool_results_go_back_in_each_providers_shape() {
    let f = fixture();
    let messages = json!([
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_w1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Zürich\"}"}}]},
        {"role": "tool", "tool_call_id": "call_w1", "content": "{\"temp\": 21}"},
    ]);
    for (provider, route) in &f.routes {
        let (status, answer) = f.gw.post(
            "/v1/chat/completions",
            &json!({"model": route, "messages": messages, "tools": tools()}),
        );
        assert_eq!(status, 200, "{provider}: {answer}");
        assert_eq!(
            answer["choices"][0]["finish_reason"], "stop",
            "{provider}: {answer}"
        );
        let sent = last_request_for(&f.sim, provider, "Weather in Z").json();
        match *provider {
            "anthropic" => {
                assert_eq!(
                    sent["messages"][1]["content"][0],
                    json!({"type": "tool_use", "id": "call_w1", "name": "get_weather", "input": {"city": "Zürich"}}),
                    "{sent}"
                );
                assert_eq!(
                    sent["messages"][2]["content"][0],
                    json!({"type": "tool_result", "tool_use_id": "call_w1", "content": "{\"temp\": 21}"}),
                    "{sent}"
                );
            }
            "gemini" => {
                assert_eq!(
                    sent["contents"][1],
                    json!({"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Zürich"}}}]}),
                    "{sent}"
                );
                assert_eq!(
                    sent["contents"][2],
                    json!({"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp": 21}}}]}),
                    "{sent}"
                );
            }
            "bedrock" => {
                assert_eq!(
                    sent["messages"][1]["content"][0],
                    json!({"toolUse": {"toolUseId": "call_w1", "name": "get_weather", "input": {"city": "Zürich"}}}),
                    "{sent}"
                );
                assert_eq!(
                    sent["messages"][2]["content"][0],
                    json!({"toolResult": {"toolUseId": "call_w1", "content": [{"text": "{\"temp\": 21}"}]}}),
                    "{sent}"
                );
            }
            _ => {
                assert_eq!(
                    sent["messages"][1]["tool_calls"][0]["id"], "call_w1",
                    "{provider}: {sent}"
                );
                assert_eq!(sent["messages"][2]["role"], "tool", "{provider}: {sent}");
                assert_eq!(
                    sent["messages"][2]["tool_call_id"], "call_w1",
                    "{provider}: {sent}"
                );
            }
        }
    }
}

const PNG: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";
const IMAGE_URL: &str = "https://images.example/cat.png";

fn image_message(url: &str) -> Value {
    json!([{"role": "user", "content": [{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]}])
}

#[test]
fn images_are_translated_for_each_provider_or_refused_by_name() {
    let f = fixture();
    let data_url = format!("data:image/png;base64,{PNG}");
    for (provider, route) in &f.routes {
        for url in [data_url.as_str(), IMAGE_URL] {
            let (status, answer) = f.gw.post(
                "/v1/chat/completions",
                &json!({"model": route, "messages": image_message(url)}),
            );
            if *provider == "bedrock" && url == IMAGE_URL {
                // Converse takes image bytes only, and the gateway never fetches a URL.
                assert_eq!(status, 400, "{answer}");
                let message = answer["error"]["message"].as_str().unwrap_or_default();
                assert!(message.contains("bedrock"), "{answer}");
                assert!(
                    requests_for(&f.sim, provider, IMAGE_URL).is_empty(),
                    "a refused image reached the provider"
                );
                continue;
            }
            assert_eq!(status, 200, "{provider} {url}: {answer}");
            let sent = last_request_for(&f.sim, provider, "What is this?").json();
            let inline = url.starts_with("data:");
            match *provider {
                "anthropic" => {
                    let source = if inline {
                        json!({"type": "base64", "media_type": "image/png", "data": PNG})
                    } else {
                        json!({"type": "url", "url": IMAGE_URL})
                    };
                    assert_eq!(
                        sent["messages"][0]["content"][1],
                        json!({"type": "image", "source": source}),
                        "{sent}"
                    );
                }
                "gemini" => {
                    let part = if inline {
                        json!({"inlineData": {"mimeType": "image/png", "data": PNG}})
                    } else {
                        json!({"fileData": {"mimeType": "image/png", "fileUri": IMAGE_URL}})
                    };
                    assert_eq!(sent["contents"][0]["parts"][1], part, "{sent}");
                }
                "bedrock" => assert_eq!(
                    sent["messages"][0]["content"][1],
                    json!({"image": {"format": "png", "source": {"bytes": PNG}}}),
                    "{sent}"
                ),
                // OpenAI, Azure, Cohere v2 and the compatible servers take OpenAI's parts as they are.
                _ => assert_eq!(
                    sent["messages"][0]["content"][1],
                    json!({"type": "image_url", "image_url": {"url": url}}),
                    "{provider}: {sent}"
                ),
            }
        }
    }
    // A provider that takes no images says so, by name, in a 400.
    let (status, answer) = f.gw.post(
        "/v1/chat/completions",
        &json!({"model": f.mlflow, "messages": image_message(&data_url)}),
    );
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("mlflow-model-serving") && m.contains("image")),
        "{answer}"
    );
    assert!(requests_for(&f.sim, "mlflow-model-serving", "What is this?").is_empty());
    // A URL that is neither https nor data: is the caller's error on every provider.
    for (provider, route) in &f.routes {
        if !TRANSLATED.contains(provider) {
            continue; // passed through as is: the provider judges its own input
        }
        let (status, answer) = f.gw.post(
            "/v1/chat/completions",
            &json!({"model": route, "messages": image_message("file:///etc/passwd")}),
        );
        assert_eq!(status, 400, "{provider}: {answer}");
    }
}

#[test]
fn structured_output_is_translated_for_each_provider_or_refused_by_name() {
    let f = fixture();
    let schema = json!({"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]});
    let format = json!({"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}});
    let messages = json!([{"role": "user", "content": "Answer in JSON, structured-output test."}]);
    for (provider, route) in &f.routes {
        for stream in [false, true] {
            let body = json!({"model": route, "messages": messages, "response_format": format, "stream": stream});
            let (status, text) = post_stream("/v1/chat/completions", &body);
            assert_eq!(status, 200, "{provider}: {text}");
            let (content, finish) = if stream {
                let s = accumulate(&text);
                assert!(s.error.is_none() && s.done, "{provider}: {text}");
                assert!(s.calls.is_empty(), "{provider}: {text}");
                (s.text, s.finish)
            } else {
                let v: Value = serde_json::from_str(&text).expect("json");
                assert!(
                    v["choices"][0]["message"].get("tool_calls").is_none(),
                    "{provider}: {v}"
                );
                (
                    v["choices"][0]["message"]["content"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    v["choices"][0]["finish_reason"]
                        .as_str()
                        .map(str::to_string),
                )
            };
            let sent =
                last_request_for(&f.sim, provider, "Answer in JSON, structured-output test.")
                    .json();
            match *provider {
                "anthropic" => {
                    assert_eq!(
                        sent["tools"],
                        json!([{"name": OUTPUT_TOOL, "description": "Give the answer as this tool's input.", "input_schema": schema}]),
                        "{sent}"
                    );
                    assert_eq!(
                        sent["tool_choice"],
                        json!({"type": "tool", "name": OUTPUT_TOOL}),
                        "{sent}"
                    );
                    let parsed: Value = serde_json::from_str(&content).expect("the answer is JSON");
                    assert_eq!(parsed, tool_arguments(OUTPUT_TOOL, 0));
                    assert_eq!(finish.as_deref(), Some("stop"));
                }
                "bedrock" => {
                    assert_eq!(
                        sent["toolConfig"]["toolChoice"],
                        json!({"tool": {"name": OUTPUT_TOOL}}),
                        "{sent}"
                    );
                    assert_eq!(
                        sent["toolConfig"]["tools"][0]["toolSpec"]["inputSchema"],
                        json!({"json": schema}),
                        "{sent}"
                    );
                    let parsed: Value = serde_json::from_str(&content).expect("the answer is JSON");
                    assert_eq!(parsed, tool_arguments(OUTPUT_TOOL, 0));
                    assert_eq!(finish.as_deref(), Some("stop"));
                }
                "gemini" => {
                    assert_eq!(
                        sent["generationConfig"]["responseMimeType"], "application/json",
                        "{sent}"
                    );
                    assert_eq!(sent["generationConfig"]["responseSchema"], schema, "{sent}");
                    let parsed: Value = serde_json::from_str(&content).expect("the answer is JSON");
                    assert_eq!(parsed, portcullis_sim::structured_answer());
                }
                "cohere" => {
                    assert_eq!(
                        sent["response_format"],
                        json!({"type": "json_object", "json_schema": schema}),
                        "{sent}"
                    );
                    let parsed: Value = serde_json::from_str(&content).expect("the answer is JSON");
                    assert_eq!(parsed, portcullis_sim::structured_answer());
                }
                _ => assert_eq!(sent["response_format"], format, "{provider}: {sent}"),
            }
        }
    }
    // json_object: Gemini's MIME type without a schema, a forced object for Anthropic.
    let route = |p: &str| &f.routes.iter().find(|(q, _)| *q == p).unwrap().1;
    let json_object = json!({"type": "json_object"});
    f.gw.post(
        "/v1/chat/completions",
        &json!({"model": route("gemini"), "messages": messages, "response_format": json_object}),
    );
    let sent = last_request_for(&f.sim, "gemini", "Answer in JSON, structured-output test.").json();
    assert_eq!(
        sent["generationConfig"]["responseMimeType"],
        "application/json"
    );
    assert!(
        sent["generationConfig"].get("responseSchema").is_none(),
        "{sent}"
    );
    f.gw.post(
        "/v1/chat/completions",
        &json!({"model": route("anthropic"), "messages": messages, "response_format": json_object}),
    );
    let sent = last_request_for(
        &f.sim,
        "anthropic",
        "Answer in JSON, structured-output test.",
    )
    .json();
    assert_eq!(
        sent["tools"][0]["input_schema"],
        json!({"type": "object"}),
        "{sent}"
    );
    // No equivalent: a 400 naming the provider, nothing sent.
    let (status, answer) = f.gw.post(
        "/v1/chat/completions",
        &json!({"model": f.mlflow, "messages": messages, "response_format": format}),
    );
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("mlflow-model-serving")),
        "{answer}"
    );
    assert!(
        requests_for(
            &f.sim,
            "mlflow-model-serving",
            "Answer in JSON, structured-output test."
        )
        .is_empty()
    );
}

/// The last SSE event of a body.
fn last_event(body: &str) -> Option<&str> {
    body.lines().rev().find_map(|l| l.strip_prefix("data: "))
}

#[test]
fn a_provider_cut_mid_stream_is_an_error_event_on_every_streaming_surface() {
    let f = fixture();
    let messages = json!([{"role": "user", "content": "Weather and time?"}]);
    for (provider, route) in &f.cut_routes {
        for fault in [
            Fault::EndStream { after_frames: 2 },
            Fault::CutStream { after_frames: 2 },
        ] {
            f.faulty.set_fault(fault.clone());
            for (path, body) in [
                (
                    "/v1/chat/completions".to_string(),
                    json!({"model": route, "messages": messages, "tools": tools(), "stream": true}),
                ),
                (
                    format!("/endpoints/{route}/invocations"),
                    json!({"messages": messages, "tools": tools(), "stream": true}),
                ),
            ] {
                let (status, text) = post_stream(&path, &body);
                assert_eq!(status, 200, "{provider} {fault:?} {path}: {text}");
                let s = accumulate(&text);
                assert!(
                    !s.done,
                    "{provider} {fault:?} {path}: a cut stream ended with [DONE]: {text}"
                );
                let last: Value =
                    serde_json::from_str(last_event(&text).unwrap_or("null")).unwrap_or_default();
                assert!(
                    last.get("error").is_some(),
                    "{provider} {fault:?} {path}: the stream did not end with an error event: {text}"
                );
                assert_ne!(
                    s.finish.as_deref(),
                    Some("tool_calls"),
                    "{provider}: {text}"
                );
            }
        }
    }
    // Cut right before the end marker, after everything else (the finish reason included).
    for (provider, frames) in [("anthropic", 25), ("bedrock", 22)] {
        let route = &f.cut_routes.iter().find(|(p, _)| *p == provider).unwrap().1;
        f.faulty.set_fault(Fault::EndStream {
            after_frames: frames,
        });
        let body = json!({"model": route, "messages": messages, "stream": true});
        let (status, text) = post_stream("/v1/chat/completions", &body);
        assert_eq!(status, 200, "{provider}: {text}");
        let s = accumulate(&text);
        assert!(!s.done && s.error.is_some(), "{provider}: {text}");
        assert!(s.text.starts_with("word1 word2"), "{provider}: {text}");
    }
    f.faulty.set_fault(Fault::None);
    // Unfaulted, the same routes end normally.
    let route = &f.cut_routes[0].1;
    let (_, text) = post_stream(
        "/v1/chat/completions",
        &json!({"model": route, "messages": messages, "stream": true}),
    );
    let s = accumulate(&text);
    assert!(s.done && s.error.is_none(), "{text}");
}
