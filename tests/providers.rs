//! Every provider end to end: real kube-apiserver, the real gateway binary, and each provider's
//! simulation recording what the gateway sent. Each case pins the upstream request (path, auth,
//! body) and the unified answer, streaming and not, plus one upstream error.

#![allow(clippy::expect_used, clippy::unwrap_used)] // test helpers: failing loudly is the point

mod support;

use serde_json::{Value, json};
use support::*;

const CHAT: &str = "llm/v1/chat";
const COMPLETIONS: &str = "llm/v1/completions";
const EMBEDDINGS: &str = "llm/v1/embeddings";
const ANSWER: &str = "word1 word2 word3 word4 word5";
const INPUTS: [&str; 3] = ["a", "bbb", "cc"];

struct Case {
    provider: &'static str,
    /// Supported route types and the model each route names.
    models: &'static [(&'static str, &'static str)],
    /// Secret data; `{KEY}` in a value is this case's unique secret.
    secret: &'static [(&'static str, &'static str)],
    config: &'static [(&'static str, &'static str)],
    /// The route's `apiBase` for a route type, when not the simulation's usual base.
    base: Option<fn(&SimProvider, &str) -> String>,
    /// The upstream path (without the sim's address) for a route type, streaming or not.
    path: fn(&str, bool) -> String,
    /// Checks auth headers and the body the provider received.
    check: fn(&str, bool, &portcullis_sim::RecordedRequest, &str),
    /// The provider's error body for a 429; `{KEY}` is replaced by the secret to test redaction.
    error_body: &'static str,
    streams: bool,
    usage: bool,
    /// MLflow's served chat models take one message.
    single_message: bool,
}

fn bearer(r: &portcullis_sim::RecordedRequest, key: &str) {
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {key}").as_str())
    );
}

fn openai_path(prefix: &'static str) -> impl Fn(&str, bool) -> String {
    move |rt, _| {
        let op = match rt {
            CHAT => "chat/completions",
            COMPLETIONS => "completions",
            _ => "embeddings",
        };
        format!("{prefix}/{op}")
    }
}

/// The OpenAI body the family receives for the standard requests below.
fn openai_body(rt: &str, stream: bool, body: &Value, model: &str, stream_options: bool) {
    match rt {
        CHAT => {
            let mut want = json!({"model": model, "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hello there"}], "max_tokens": 5, "temperature": 0.5});
            if stream {
                want["stream"] = json!(true);
                if stream_options {
                    want["stream_options"] = json!({"include_usage": true});
                }
            }
            if model.is_empty() {
                want.as_object_mut().map(|o| o.remove("model"));
            }
            assert_eq!(body, &want);
        }
        COMPLETIONS => {
            assert_eq!(body["prompt"], "Once upon");
            assert_eq!(body["max_tokens"], 5);
        }
        _ => assert_eq!(body["input"], json!(INPUTS)),
    }
}

macro_rules! family {
    ($name:ident, $provider:literal, $prefix:literal, $models:expr, $stream_options:expr, $error:literal) => {
        #[test]
        fn $name() {
            exercise(&Case {
                provider: $provider,
                models: $models,
                secret: &[("apiKey", "{KEY}")],
                config: &[],
                base: None,
                path: |rt, s| openai_path($prefix)(rt, s),
                check: |rt, stream, r, key| {
                    bearer(r, key);
                    let model = $models
                        .iter()
                        .find(|(t, _)| *t == rt)
                        .map(|(_, m)| *m)
                        .unwrap_or_default();
                    openai_body(rt, stream, &r.json(), model, $stream_options);
                },
                error_body: $error,
                streams: true,
                usage: true,
                single_message: false,
            });
        }
    };
}

family!(
    openai_end_to_end,
    "openai",
    "/openai/v1",
    &[
        (CHAT, "gpt-4o-mini"),
        (COMPLETIONS, "gpt-3.5-turbo-instruct"),
        (EMBEDDINGS, "text-embedding-3-small")
    ],
    true,
    r#"{"error":{"message":"slow down: rate limit reached for key {KEY}","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#
);
family!(
    mistral_end_to_end,
    "mistral",
    "/mistral/v1",
    &[
        (CHAT, "mistral-small-latest"),
        (EMBEDDINGS, "mistral-embed")
    ],
    false,
    r#"{"object":"error","message":"slow down: Rate limit exceeded for {KEY}","type":"rate_limited","param":null,"code":"1300"}"#
);
family!(
    together_end_to_end,
    "together",
    "/together/v1",
    &[
        (CHAT, "meta-llama/Llama-3.3-70B-Instruct-Turbo"),
        (COMPLETIONS, "meta-llama/Llama-3-8b-hf"),
        (EMBEDDINGS, "BAAI/bge-base-en-v1.5")
    ],
    true,
    r#"{"error":{"message":"slow down {KEY}","type":"rate_limit","param":null,"code":null}}"#
);
family!(
    groq_end_to_end,
    "groq",
    "/groq/openai/v1",
    &[
        (CHAT, "llama-3.3-70b-versatile"),
        (EMBEDDINGS, "nomic-embed-text-v1.5")
    ],
    true,
    r#"{"error":{"message":"slow down: Rate limit reached on tokens per minute","type":"tokens","code":"rate_limit_exceeded"}}"#
);
family!(
    deepseek_end_to_end,
    "deepseek",
    "/deepseek",
    &[(CHAT, "deepseek-chat")],
    true,
    r#"{"error":{"message":"slow down: Rate Limit Reached","type":"rate_limit_error","param":null,"code":"rate_limit"}}"#
);
family!(
    ai21_end_to_end,
    "ai21",
    "/ai21/studio/v1",
    &[(CHAT, "jamba-mini")],
    true,
    r#"{"detail":"slow down: too many requests for {KEY}"}"#
);
family!(
    openai_compatible_end_to_end,
    "openai-compatible",
    "/compatible/v1",
    &[
        (CHAT, "qwen2.5-7b-instruct"),
        (COMPLETIONS, "qwen2.5-7b"),
        (EMBEDDINGS, "bge-m3")
    ],
    true,
    r#"{"error":{"message":"slow down","type":"rate_limit","param":null,"code":null}}"#
);

#[test]
fn ollama_end_to_end_without_a_key() {
    exercise(&Case {
        provider: "ollama",
        models: &[
            (CHAT, "llama3.2"),
            (COMPLETIONS, "llama3.2"),
            (EMBEDDINGS, "nomic-embed-text"),
        ],
        secret: &[],
        config: &[],
        base: None,
        path: |rt, s| openai_path("/ollama/v1")(rt, s),
        check: |rt, stream, r, _| {
            assert_eq!(r.header("authorization"), None);
            let model = if rt == EMBEDDINGS {
                "nomic-embed-text"
            } else {
                "llama3.2"
            };
            openai_body(rt, stream, &r.json(), model, true);
        },
        error_body: r#"{"error":{"message":"slow down: server busy","type":"api_error","param":null,"code":null}}"#,
        streams: true,
        usage: true,
        single_message: false,
    });
}

#[test]
fn azure_openai_end_to_end() {
    exercise(&Case {
        provider: "azure-openai",
        models: &[
            (CHAT, "gpt4o-prod"),
            (COMPLETIONS, "instruct-prod"),
            (EMBEDDINGS, "embed-prod"),
        ],
        secret: &[("apiKey", "{KEY}")],
        config: &[("apiVersion", "2024-10-21")],
        base: None,
        path: |rt, _| {
            let (dep, op) = match rt {
                CHAT => ("gpt4o-prod", "chat/completions"),
                COMPLETIONS => ("instruct-prod", "completions"),
                _ => ("embed-prod", "embeddings"),
            };
            format!("/azure/openai/deployments/{dep}/{op}")
        },
        check: |rt, stream, r, key| {
            assert_eq!(r.header("api-key"), Some(key));
            assert_eq!(r.header("authorization"), None);
            assert_eq!(r.query.as_deref(), Some("api-version=2024-10-21"));
            openai_body(rt, stream, &r.json(), "", true);
        },
        error_body: r#"{"error":{"code":"429","message":"slow down: Requests to the ChatCompletions_Create Operation have exceeded token rate limit. Please retry after 7 seconds."}}"#,
        streams: true,
        usage: true,
        single_message: false,
    });
}

#[test]
fn anthropic_end_to_end() {
    exercise(&Case {
        provider: "anthropic",
        models: &[(CHAT, "claude-sonnet-4-5")],
        secret: &[("apiKey", "{KEY}")],
        config: &[],
        base: None,
        path: |_, _| "/anthropic/v1/messages".into(),
        check: |_, stream, r, key| {
            assert_eq!(r.header("x-api-key"), Some(key));
            assert_eq!(r.header("anthropic-version"), Some("2023-06-01"));
            assert_eq!(r.header("authorization"), None);
            let mut want = json!({"model": "claude-sonnet-4-5", "max_tokens": 5, "system": "Be terse.",
                "messages": [{"role": "user", "content": [{"type": "text", "text": "hello there"}]}], "temperature": 0.5});
            if stream {
                want["stream"] = json!(true);
            }
            assert_eq!(r.json(), want);
        },
        error_body: r#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down: Number of request tokens has exceeded your per-minute rate limit"},"request_id":"req_1"}"#,
        streams: true,
        usage: true,
        single_message: false,
    });
}

#[test]
fn cohere_end_to_end() {
    exercise(&Case {
        provider: "cohere",
        models: &[
            (CHAT, "command-r-plus"),
            (COMPLETIONS, "command"),
            (EMBEDDINGS, "embed-english-v3.0"),
        ],
        secret: &[("apiKey", "{KEY}")],
        config: &[],
        base: None,
        path: |rt, _| match rt {
            CHAT => "/cohere/v2/chat".into(),
            COMPLETIONS => "/cohere/v1/generate".into(),
            _ => "/cohere/v2/embed".into(),
        },
        check: |rt, stream, r, key| {
            bearer(r, key);
            let body = r.json();
            match rt {
                CHAT => {
                    let mut want = json!({"model": "command-r-plus", "messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hello there"}], "max_tokens": 5, "temperature": 0.5});
                    if stream {
                        want["stream"] = json!(true);
                    }
                    assert_eq!(body, want);
                }
                COMPLETIONS => {
                    assert_eq!(body["prompt"], "Once upon");
                    assert_eq!(body["max_tokens"], 5);
                }
                _ => assert_eq!(
                    body,
                    json!({"model": "embed-english-v3.0", "texts": INPUTS, "input_type": "search_document", "embedding_types": ["float"]})
                ),
            }
        },
        error_body: r#"{"id":"e1","message":"slow down: You are past the per minute request limit"}"#,
        streams: true,
        usage: true,
        single_message: false,
    });
}

#[test]
fn gemini_end_to_end() {
    exercise(&Case {
        provider: "gemini",
        models: &[
            (CHAT, "gemini-2.5-flash"),
            (COMPLETIONS, "gemini-2.5-flash"),
            (EMBEDDINGS, "gemini-embedding-001"),
        ],
        secret: &[("apiKey", "{KEY}")],
        config: &[],
        base: None,
        path: |rt, stream| match (rt, stream) {
            (EMBEDDINGS, _) => {
                "/gemini/v1beta/models/gemini-embedding-001:batchEmbedContents".into()
            }
            (_, true) => "/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent".into(),
            _ => "/gemini/v1beta/models/gemini-2.5-flash:generateContent".into(),
        },
        check: |rt, stream, r, key| {
            assert_eq!(r.header("x-goog-api-key"), Some(key));
            assert!(!r.query.clone().unwrap_or_default().contains("key="));
            assert_eq!(r.query.as_deref(), stream.then_some("alt=sse"));
            let body = r.json();
            match rt {
                CHAT => assert_eq!(
                    body,
                    json!({"systemInstruction": {"parts": [{"text": "Be terse."}]}, "contents": [{"role": "user", "parts": [{"text": "hello there"}]}],
                           "generationConfig": {"temperature": 0.5, "maxOutputTokens": 5}})
                ),
                COMPLETIONS => assert_eq!(
                    body["contents"],
                    json!([{"role": "user", "parts": [{"text": "Once upon"}]}])
                ),
                _ => assert_eq!(
                    body["requests"][1],
                    json!({"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "bbb"}]}})
                ),
            }
        },
        error_body: r#"{"error":{"code":429,"message":"slow down: You exceeded your current quota","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"7s"}]}}"#,
        streams: true,
        usage: true,
        single_message: false,
    });
}

#[test]
fn bedrock_end_to_end() {
    exercise(&Case {
        provider: "bedrock",
        models: &[
            (CHAT, "anthropic.claude-3-haiku-20240307-v1:0"),
            (COMPLETIONS, "amazon.nova-lite-v1:0"),
            (EMBEDDINGS, "amazon.titan-embed-text-v2:0"),
        ],
        secret: &[
            ("awsAccessKeyId", "AKIDSIMULATED"),
            ("awsSecretAccessKey", "{KEY}"),
            ("awsSessionToken", "session-{KEY}"),
        ],
        config: &[("region", "us-west-2")],
        base: None,
        path: |rt, stream| match (rt, stream) {
            (EMBEDDINGS, _) => "/bedrock/model/amazon.titan-embed-text-v2%3A0/invoke".into(),
            (CHAT, true) => {
                "/bedrock/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse-stream".into()
            }
            (CHAT, false) => {
                "/bedrock/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse".into()
            }
            (_, true) => "/bedrock/model/amazon.nova-lite-v1%3A0/converse-stream".into(),
            _ => "/bedrock/model/amazon.nova-lite-v1%3A0/converse".into(),
        },
        check: |rt, _, r, key| {
            let auth = r.header("authorization").unwrap_or_default();
            assert!(
                auth.starts_with("AWS4-HMAC-SHA256 Credential=AKIDSIMULATED/"),
                "{auth}"
            );
            assert!(auth.contains("/us-west-2/bedrock/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amz-security-token, Signature="), "{auth}");
            assert!(!auth.contains(key));
            assert_eq!(
                r.header("x-amz-security-token"),
                Some(format!("session-{key}").as_str())
            );
            let body = r.json();
            match rt {
                CHAT => assert_eq!(
                    body,
                    json!({"system": [{"text": "Be terse."}], "messages": [{"role": "user", "content": [{"text": "hello there"}]}],
                           "inferenceConfig": {"maxTokens": 5, "temperature": 0.5}})
                ),
                COMPLETIONS => assert_eq!(
                    body["messages"],
                    json!([{"role": "user", "content": [{"text": "Once upon"}]}])
                ),
                // One Titan call per input (sent concurrently, so any of them may be the last).
                _ => assert!(
                    INPUTS.iter().any(|t| body == json!({"inputText": t})),
                    "{body}"
                ),
            }
        },
        error_body: r#"{"message":"slow down: Too many requests, please wait before trying again."}"#,
        streams: true,
        usage: true,
        single_message: false,
    });
}

#[test]
fn huggingface_tgi_end_to_end() {
    exercise(&Case {
        provider: "huggingface-tgi",
        models: &[(COMPLETIONS, "tgi")],
        secret: &[("apiKey", "{KEY}")],
        config: &[],
        base: None,
        path: |_, stream| {
            if stream {
                "/tgi/generate_stream".into()
            } else {
                "/tgi/generate".into()
            }
        },
        check: |_, stream, r, key| {
            bearer(r, key);
            assert_eq!(
                r.json(),
                json!({"inputs": "Once upon", "parameters": {"max_new_tokens": 5, "details": true, "decoder_input_details": !stream}})
            );
        },
        error_body: r#"{"error":"slow down: Model is overloaded","error_type":"overloaded"}"#,
        streams: true,
        usage: true,
        single_message: false,
    });
}

#[test]
fn databricks_model_serving_end_to_end() {
    exercise(&Case {
        provider: "databricks-model-serving",
        models: &[
            (CHAT, "databricks-meta-llama-3-3-70b-instruct"),
            (COMPLETIONS, "my-completions"),
            (EMBEDDINGS, "databricks-gte-large-en"),
        ],
        secret: &[("apiKey", "{KEY}")],
        config: &[],
        base: None,
        path: |rt, _| {
            let name = match rt {
                CHAT => "databricks-meta-llama-3-3-70b-instruct",
                COMPLETIONS => "my-completions",
                _ => "databricks-gte-large-en",
            };
            format!("/databricks/serving-endpoints/{name}/invocations")
        },
        check: |rt, stream, r, key| {
            bearer(r, key);
            let body = r.json();
            assert!(body.get("model").is_none() && body.get("stream_options").is_none());
            if rt == CHAT {
                openai_body(rt, stream, &body, "", false);
            }
        },
        error_body: r#"{"error_code":"REQUEST_LIMIT_EXCEEDED","message":"slow down: Exceeded workspace rate limit for {KEY}"}"#,
        streams: true,
        usage: true,
        single_message: false,
    });
}

#[test]
fn mlflow_model_serving_end_to_end() {
    exercise(&Case {
        provider: "mlflow-model-serving",
        models: &[
            (CHAT, "chat-model"),
            (COMPLETIONS, "text-model"),
            (EMBEDDINGS, "embedder"),
        ],
        secret: &[],
        config: &[],
        // A scoring server hosts one model: the embedder has its own URL.
        base: Some(|sim, rt| {
            if rt == EMBEDDINGS {
                sim.mlflow_embedder_base()
            } else {
                sim.mlflow_base()
            }
        }),
        path: |rt, _| {
            if rt == EMBEDDINGS {
                "/mlflow/embedder/invocations".into()
            } else {
                "/mlflow/generator/invocations".into()
            }
        },
        check: |rt, _, r, _| {
            let body = r.json();
            match rt {
                CHAT => assert_eq!(
                    body,
                    json!({"inputs": ["hello there"], "params": {"temperature": 0.5, "max_tokens": 5}})
                ),
                COMPLETIONS => assert_eq!(
                    body,
                    json!({"inputs": ["Once upon"], "params": {"max_tokens": 5}})
                ),
                _ => assert_eq!(body, json!({"inputs": INPUTS})),
            }
        },
        error_body: r#"{"error_code":"TEMPORARILY_UNAVAILABLE","message":"slow down: the model server is busy"}"#,
        streams: false,
        usage: false,
        single_message: true,
    });
}

fn chat_request(route: &str, single: bool, stream: bool) -> Value {
    let messages = if single {
        json!([{"role": "user", "content": "hello there"}])
    } else {
        json!([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hello there"}])
    };
    let mut body =
        json!({"model": route, "messages": messages, "max_tokens": 5, "temperature": 0.5});
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

fn request_for(rt: &str, route: &str, single: bool, stream: bool) -> (&'static str, Value) {
    match rt {
        CHAT => ("/v1/chat/completions", chat_request(route, single, stream)),
        COMPLETIONS => {
            let mut body = json!({"model": route, "prompt": "Once upon", "max_tokens": 5});
            if stream {
                body["stream"] = json!(true);
                body["stream_options"] = json!({"include_usage": true});
            }
            ("/v1/completions", body)
        }
        _ => ("/v1/embeddings", json!({"model": route, "input": INPUTS})),
    }
}

/// Applies a Secret and one Route per supported route type, then checks every call shape.
fn exercise(case: &Case) {
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace(&case.provider.replace('-', ""));
    let gw = Gateway::start(cp, &["--namespace", &ns]);
    let key = format!("sk-sim-{}-4f9a2c7e1b", case.provider);
    let secret_data: Vec<(&str, String)> = case
        .secret
        .iter()
        .map(|(k, v)| (*k, v.replace("{KEY}", &key)))
        .collect();
    let secret_data: Vec<(&str, &str)> =
        secret_data.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut yaml = String::new();
    let secret = (!secret_data.is_empty()).then_some("creds");
    if secret.is_some() {
        yaml.push_str(&secret_with(&ns, "creds", &secret_data));
    }
    let mut routes = Vec::new();
    for (rt, model) in case.models {
        let route = unique(&format!(
            "{}-{}",
            case.provider,
            rt.rsplit('/').next().unwrap_or("r")
        ));
        let base = match case.base {
            Some(base) => base(&sim, rt),
            None => sim.base(case.provider),
        };
        yaml.push_str("---\n");
        yaml.push_str(&provider_route(
            &ns,
            &route,
            rt,
            case.provider,
            model,
            &base,
            secret,
            case.config,
        ));
        routes.push((*rt, route));
    }
    cp.apply(&yaml);
    if case.provider == "bedrock" {
        // Like AWS, the simulation then recomputes each signature from what arrived.
        sim.set_aws_secret(&key);
    }
    for (_, route) in &routes {
        cp.wait_ready(&ns, route);
    }

    for (rt, route) in &routes {
        // Non-streaming.
        sim.clear();
        let (path, body) = request_for(rt, route, case.single_message, false);
        let (status, answer) = gw.post(path, &body);
        assert_eq!(status, 200, "{} {rt}: {answer}", case.provider);
        let sent = sim.last_request().expect("the provider got a request");
        let calls = if case.provider == "bedrock" && *rt == EMBEDDINGS {
            INPUTS.len()
        } else {
            1
        };
        assert_eq!(sim.requests().len(), calls, "{} {rt}", case.provider);
        assert_eq!(sent.method, "POST");
        assert_eq!(sent.path, (case.path)(rt, false), "{} {rt}", case.provider);
        (case.check)(rt, false, &sent, &key);
        if *rt == EMBEDDINGS {
            assert_eq!(answer["object"], "list");
            let got: Vec<Value> = answer["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["embedding"].clone())
                .collect();
            let want: Vec<Value> = INPUTS
                .iter()
                .map(|t| json!(portcullis_sim::embed(t)))
                .collect();
            assert_eq!(got, want, "{} embeddings out of order", case.provider);
        } else {
            let choice = &answer["choices"][0];
            let text = if *rt == CHAT {
                assert_eq!(answer["object"], "chat.completion");
                assert_eq!(choice["message"]["role"], "assistant");
                choice["message"]["content"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            } else {
                assert_eq!(answer["object"], "text_completion");
                choice["text"].as_str().unwrap_or_default().to_string()
            };
            assert_eq!(text, ANSWER, "{} {rt}: {answer}", case.provider);
            if case.usage {
                assert_eq!(
                    choice["finish_reason"], "length",
                    "{} {rt}: {answer}",
                    case.provider
                );
                assert_eq!(
                    answer["usage"]["completion_tokens"], 5,
                    "{} {rt}: {answer}",
                    case.provider
                );
            }
        }

        // Streaming.
        if *rt == EMBEDDINGS {
            continue;
        }
        sim.clear();
        let (path, body) = request_for(rt, route, case.single_message, true);
        let (status, headers, text) = http_full(&gw.url(path), &body.to_string());
        if !case.streams {
            assert_eq!(status, 400, "{text}");
            assert!(text.contains("does not support streaming"), "{text}");
            assert!(sim.requests().is_empty());
            continue;
        }
        assert_eq!(status, 200, "{} {rt} stream: {text}", case.provider);
        assert!(
            headers
                .iter()
                .any(|(k, v)| k == "content-type" && v.starts_with("text/event-stream"))
        );
        let sent = sim
            .last_request()
            .expect("the provider got a streaming request");
        assert_eq!(sent.path, (case.path)(rt, true), "{} {rt}", case.provider);
        (case.check)(rt, true, &sent, &key);
        let chunks = sse_chunks(&text);
        let streamed: String = chunks
            .iter()
            .filter_map(|c| {
                let choice = c["choices"].get(0)?;
                if *rt == CHAT {
                    choice["delta"]["content"].as_str()
                } else {
                    choice["text"].as_str()
                }
            })
            .collect();
        assert_eq!(streamed, ANSWER, "{} {rt} stream: {text}", case.provider);
        assert!(text.trim_end().ends_with("data: [DONE]"));
        let finish: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c["choices"].get(0))
            .map(|c| &c["finish_reason"])
            .filter(|f| !f.is_null())
            .collect();
        assert_eq!(
            finish,
            vec![&json!("length")],
            "{} {rt} stream: {text}",
            case.provider
        );
        let usage: Vec<&Value> = chunks
            .iter()
            .filter(|c| c["choices"] == json!([]))
            .map(|c| &c["usage"])
            .collect();
        assert_eq!(usage.len(), 1, "{} {rt} stream: {text}", case.provider);
        assert_eq!(
            usage[0]["completion_tokens"], 5,
            "{} {rt} stream: {text}",
            case.provider
        );
    }

    // An upstream error keeps its status, message and Retry-After, and never echoes the key.
    let (rt, route) = &routes[0];
    sim.set_fault(Fault::Status {
        status: 429,
        body: case.error_body.replace("{KEY}", &key),
        retry_after: Some(7),
    });
    let (path, body) = request_for(rt, route, case.single_message, false);
    let (status, headers, text) = http_full(&gw.url(path), &body.to_string());
    assert_eq!(status, 429, "{} error: {text}", case.provider);
    let err: Value = serde_json::from_str(&text).expect("error json");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("slow down"),
        "{} error: {text}",
        case.provider
    );
    assert!(
        headers.iter().any(|(k, v)| k == "retry-after" && v == "7"),
        "{headers:?}"
    );
    assert!(!text.contains(&key) && !text.contains(&key[..12]), "{text}");
    sim.set_fault(Fault::None);

    assert!(!gw.log().contains(&key), "the gateway log holds the key");
}

/// The same chat request through every chat-capable provider gives the same unified answer.
#[test]
fn every_chat_provider_gives_the_same_unified_answer() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("allchat");
    let gw = Gateway::start(cp, &["--namespace", &ns]);
    type Pairs = &'static [(&'static str, &'static str)];
    let table: &[(&str, &str, Pairs, Pairs)] = &[
        ("openai", "gpt-4o-mini", &[("apiKey", "k1")], &[]),
        ("azure-openai", "gpt4o-prod", &[("apiKey", "k1")], &[]),
        ("anthropic", "claude-sonnet-4-5", &[("apiKey", "k1")], &[]),
        ("cohere", "command-r-plus", &[("apiKey", "k1")], &[]),
        ("gemini", "gemini-2.5-flash", &[("apiKey", "k1")], &[]),
        (
            "bedrock",
            "anthropic.claude-3-haiku-20240307-v1:0",
            &[("awsAccessKeyId", "AKID"), ("awsSecretAccessKey", "s1")],
            &[("region", "eu-central-1")],
        ),
        ("mistral", "mistral-small-latest", &[("apiKey", "k1")], &[]),
        (
            "databricks-model-serving",
            "databricks-dbrx-instruct",
            &[("apiKey", "k1")],
            &[],
        ),
        ("mlflow-model-serving", "chat-model", &[], &[]),
        ("ai21", "jamba-mini", &[("apiKey", "k1")], &[]),
        (
            "together",
            "meta-llama/Llama-3.3-70B-Instruct-Turbo",
            &[("apiKey", "k1")],
            &[],
        ),
        ("groq", "llama-3.3-70b-versatile", &[("apiKey", "k1")], &[]),
        ("deepseek", "deepseek-chat", &[("apiKey", "k1")], &[]),
        ("ollama", "llama3.2", &[], &[]),
        ("openai-compatible", "qwen2.5-7b-instruct", &[], &[]),
    ];
    let mut yaml = String::new();
    let mut routes = Vec::new();
    for (i, (provider, model, secret, config)) in table.iter().enumerate() {
        let name = unique(&format!("all-{provider}"));
        let secret_name = format!("s{i}");
        let secret_ref = (!secret.is_empty()).then_some(secret_name.as_str());
        if secret_ref.is_some() {
            yaml.push_str(&secret_with(&ns, &secret_name, secret));
            yaml.push_str("---\n");
        }
        yaml.push_str(&provider_route(
            &ns,
            &name,
            CHAT,
            provider,
            model,
            &sim.base(provider),
            secret_ref,
            config,
        ));
        yaml.push_str("---\n");
        routes.push((*provider, name));
    }
    cp.apply(&yaml);
    for (provider, route) in &routes {
        cp.wait_ready(&ns, route);
        let (status, answer) = gw.post("/v1/chat/completions", &chat_request(route, true, false));
        assert_eq!(status, 200, "{provider}: {answer}");
        assert_eq!(answer["object"], "chat.completion", "{provider}");
        assert_eq!(
            answer["choices"].as_array().map(Vec::len),
            Some(1),
            "{provider}"
        );
        let choice = &answer["choices"][0];
        assert_eq!(choice["index"], 0, "{provider}");
        assert_eq!(choice["message"]["role"], "assistant", "{provider}");
        assert_eq!(choice["message"]["content"], ANSWER, "{provider}: {answer}");
        if *provider == "mlflow-model-serving" {
            // A scoring server reports neither why it stopped nor token counts.
            assert_eq!(choice["finish_reason"], "stop");
            continue;
        }
        assert_eq!(choice["finish_reason"], "length", "{provider}: {answer}");
        assert_eq!(
            answer["usage"]["completion_tokens"], 5,
            "{provider}: {answer}"
        );
        assert_eq!(answer["usage"]["prompt_tokens"], 2, "{provider}: {answer}");
        assert_eq!(answer["usage"]["total_tokens"], 7, "{provider}: {answer}");
    }
}

#[test]
fn unsupported_route_types_and_n_are_refused_clearly() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("unsupported");
    let gw = Gateway::start(cp, &["--namespace", &ns]);
    let embed = unique("anthropic-embed");
    let tgi_chat = unique("tgi-chat");
    let groq = unique("groq-chat");
    let mut yaml = secret_with(&ns, "k", &[("apiKey", "sk-x")]);
    for (name, rt, provider, model) in [
        (&embed, EMBEDDINGS, "anthropic", "claude-sonnet-4-5"),
        (&tgi_chat, CHAT, "huggingface-tgi", "tgi"),
        (&groq, CHAT, "groq", "llama-3.3-70b-versatile"),
    ] {
        yaml.push_str("---\n");
        yaml.push_str(&provider_route(
            &ns,
            name,
            rt,
            provider,
            model,
            &sim.base(provider),
            Some("k"),
            &[],
        ));
    }
    cp.apply(&yaml);
    cp.wait_reason(&ns, &embed, "ProviderUnsupported");
    cp.wait_reason(&ns, &tgi_chat, "ProviderUnsupported");
    let r = cp.json(&["get", "-n", &ns, "route.portcullis.dev", &embed]);
    assert_eq!(
        r["status"]["conditions"][0]["message"],
        "provider anthropic cannot serve llm/v1/embeddings; it serves llm/v1/chat"
    );
    let r = cp.json(&["get", "-n", &ns, "route.portcullis.dev", &tgi_chat]);
    assert_eq!(
        r["status"]["conditions"][0]["message"],
        "provider huggingface-tgi cannot serve llm/v1/chat; it serves llm/v1/completions"
    );
    let (status, body) = gw.post("/v1/embeddings", &json!({"model": embed, "input": "x"}));
    assert_eq!(status, 503, "{body}");

    cp.wait_ready(&ns, &groq);
    sim.clear();
    let mut req = chat_request(&groq, true, false);
    req["n"] = json!(2);
    let (status, body) = gw.post("/v1/chat/completions", &req);
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["error"]["message"],
        "provider groq does not support n > 1"
    );
    assert!(
        sim.requests().is_empty(),
        "refused before any upstream call"
    );
}

#[test]
fn bedrock_signatures_are_verified_and_corrupt_frames_end_in_an_error() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("bedrocksig");
    let gw = Gateway::start(cp, &["--namespace", &ns]);
    let route = unique("bedrock-chat");
    cp.apply(&format!(
        "{}---\n{}",
        secret_with(
            &ns,
            "aws",
            &[
                ("awsAccessKeyId", "AKID"),
                ("awsSecretAccessKey", "secret-value-123")
            ]
        ),
        provider_route(
            &ns,
            &route,
            CHAT,
            "bedrock",
            "anthropic.claude-3-haiku-20240307-v1:0",
            &sim.bedrock_base(),
            Some("aws"),
            &[("region", "ap-northeast-1")]
        )
    ));
    cp.wait_ready(&ns, &route);

    sim.set_aws_secret("secret-value-123");
    let (status, body) = gw.post("/v1/chat/completions", &chat_request(&route, false, false));
    assert_eq!(status, 200, "{body}");
    sim.set_aws_secret("some-other-secret");
    // The provider refusing the route's own credential is the operator's problem: a 502 saying so.
    let (status, body) = gw.post("/v1/chat/completions", &chat_request(&route, false, false));
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["code"], "upstream_credential_rejected");
    assert_ne!(body["error"]["type"], "authentication_error");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("the bedrock provider rejected this route's credential (403: InvalidSignatureException: The request signature"),
        "{body}"
    );
    assert!(!body.to_string().contains("secret-value-123"));

    // A stream that is broken before its first chunk is a plain error: nothing was sent yet.
    sim.set_fault(Fault::Malformed);
    let (status, _, text) = http_full(
        &gw.url("/v1/chat/completions"),
        &chat_request(&route, true, true).to_string(),
    );
    assert_eq!(status, 502, "{text}");
    let body: Value = serde_json::from_str(&text).expect("error body");
    assert_eq!(
        body["error"]["code"], "upstream_malformed_response",
        "{text}"
    );
}

/// Every example manifest passes the CRD's schema, and there is one per provider.
#[test]
fn provider_examples_are_valid_routes() {
    let cp = ControlPlane::shared();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/providers");
    let mut providers = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let out = cp.kubectl(&["apply", "--dry-run=server", "-f", path_str(&path)]);
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let yaml = std::fs::read_to_string(&path).unwrap();
        assert!(yaml.contains("kubectl create secret") || !yaml.contains("secretRef"));
        providers.push(path.file_stem().unwrap().to_string_lossy().into_owned());
    }
    providers.sort();
    let crd = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crds/route.yaml"),
    )
    .unwrap();
    for p in portcullis_sim::PROVIDERS {
        assert!(crd.contains(&format!("- {p}")), "{p} is not a CRD provider");
        assert!(providers.iter().any(|x| x == p), "no example for {p}");
    }
}

/// Anthropic's 529 (overloaded across all customers) reaches clients as a retryable 503.
#[test]
fn anthropic_overloaded_becomes_503_with_the_message() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("overloaded");
    let gw = Gateway::start(cp, &["--namespace", &ns]);
    let route = unique("claude");
    cp.apply(&format!(
        "{}---\n{}",
        secret_with(&ns, "k", &[("apiKey", "sk-ant-sim-0123456789")]),
        provider_route(
            &ns,
            &route,
            CHAT,
            "anthropic",
            "claude-sonnet-4-5",
            &sim.anthropic_base(),
            Some("k"),
            &[]
        )
    ));
    cp.wait_ready(&ns, &route);
    sim.set_fault(Fault::Status {
        status: 529,
        body: r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#
            .into(),
        retry_after: None,
    });
    let (status, body) = gw.post("/v1/chat/completions", &chat_request(&route, true, false));
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["message"], "Overloaded");
}
