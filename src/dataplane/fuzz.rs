//! Property-based fuzzing of everything that parses bytes from outside: request bodies and their
//! fields, provider answers and error bodies, and every provider's stream decoder.
//!
//! `cargo test` runs a few cases of each; `make fuzz` runs many (PORTCULLIS_FUZZ_CASES) for a
//! bounded time. A failing case is saved by proptest under `proptest-regressions/` and replayed
//! first by every later run, so a crash found once stays a regression test.

use proptest::prelude::*;
use serde_json::{Map, Value};

use super::body::parse_json_object;
use super::request::{self, parse_request};
use crate::api::{Provider, RouteType};
use crate::providers::{Credentials, ProviderAdapter, SecretValue, Target, adapter_for};

const ROUTE_TYPES: [RouteType; 3] = [
    RouteType::Chat,
    RouteType::Completions,
    RouteType::Embeddings,
];

fn config() -> ProptestConfig {
    let cases = std::env::var("PORTCULLIS_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// Field names the parsers and adapters look for, so generated objects reach their branches.
const FIELDS: &[&str] = &[
    "messages",
    "role",
    "content",
    "text",
    "type",
    "prompt",
    "input",
    "n",
    "candidate_count",
    "temperature",
    "max_tokens",
    "stop",
    "stream",
    "stream_options",
    "include_usage",
    "top_p",
    "model",
    "choices",
    "message",
    "delta",
    "usage",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "finish_reason",
    "index",
    "data",
    "embedding",
    "error",
    "candidates",
    "parts",
    "usageMetadata",
    "output",
    "generations",
    "event_type",
    "details",
    "predictions",
    "tool_calls",
    "id",
    "detail",
    "image_url",
    "url",
    "tools",
    "tool_choice",
    "function",
    "name",
    "arguments",
    "parameters",
    "tool_call_id",
    "response_format",
    "json_schema",
    "schema",
    "content_block",
    "partial_json",
    "functionCall",
    "toolUse",
    "contentBlockIndex",
    "start",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,12}".prop_map(Value::from),
        proptest::sample::select(FIELDS).prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((proptest::sample::select(FIELDS), inner), 0..6).prop_map(
                |pairs| Value::Object(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
            ),
        ]
    })
}

fn json_object() -> impl Strategy<Value = Map<String, Value>> {
    proptest::collection::vec((proptest::sample::select(FIELDS), json_value()), 0..8)
        .prop_map(|pairs| pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

/// Bytes that look like stream framing often enough to reach the decoders' deeper states.
fn stream_bytes() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b"data: ".to_vec()),
        Just(b"event: ".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\r".to_vec()),
        Just(b"\n\n".to_vec()),
        Just(b": ping\n".to_vec()),
        Just(b"[DONE]".to_vec()),
        Just(b"{".to_vec()),
        Just(b"}".to_vec()),
        Just(b"\"".to_vec()),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        proptest::collection::vec(any::<u8>(), 0..16),
    ];
    proptest::collection::vec(piece, 0..24).prop_map(|pieces| pieces.concat())
}

fn target(adapter: &dyn ProviderAdapter) -> Target {
    let mut credentials = Credentials::default();
    for key in ["apiKey", "awsAccessKeyId", "awsSecretAccessKey"] {
        credentials.insert(key, SecretValue::new("k"));
    }
    Target {
        model: "m".into(),
        api_base: adapter
            .info()
            .default_api_base
            .unwrap_or("http://upstream")
            .into(),
        credentials,
        config: Default::default(),
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn request_bodies_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = parse_json_object(&bytes);
    }

    #[test]
    fn request_objects_parse_or_fail_with_a_client_error(body in json_object()) {
        for route_type in ROUTE_TYPES {
            for dialect in [&request::OPENAI] {
                if let Err(e) = parse_request(route_type, body.clone(), dialect) {
                    prop_assert!(e.status().is_client_error(), "{e:?}");
                }
            }
            let text = Value::Object(body.clone()).to_string();
            let reparsed = parse_json_object(text.as_bytes());
            prop_assert!(reparsed.is_ok());
        }
    }

    #[test]
    fn chat_requests_reach_every_provider_or_fail_with_a_client_error(body in json_object()) {
        let Ok(request) = parse_request(RouteType::Chat, body, &request::OPENAI) else {
            return Ok(());
        };
        for provider in Provider::ALL {
            let Some(adapter) = adapter_for(provider) else { continue };
            if !adapter.info().route_types.contains(&RouteType::Chat) {
                continue;
            }
            if let Err(e) = adapter.build_request(&target(adapter), &request) {
                prop_assert!(
                    matches!(e, crate::providers::ProviderError::Unsupported(_)),
                    "{provider}: {e:?}"
                );
            }
        }
    }

    #[test]
    fn provider_answers_and_errors_never_panic(body in json_value(), raw in proptest::collection::vec(any::<u8>(), 0..64)) {
        let text = body.to_string();
        for provider in Provider::ALL {
            let Some(adapter) = adapter_for(provider) else { continue };
            let target = target(adapter);
            for route_type in adapter.info().route_types {
                let _ = adapter.parse_response(&target, *route_type, text.as_bytes());
                let _ = adapter.parse_response(&target, *route_type, &raw);
            }
            let _ = adapter.parse_error(http::StatusCode::BAD_REQUEST, &http::HeaderMap::new(), text.as_bytes());
            let _ = adapter.parse_error(http::StatusCode::TOO_MANY_REQUESTS, &http::HeaderMap::new(), &raw);
        }
    }

    #[test]
    fn stream_decoders_never_panic_however_the_bytes_are_cut(
        bytes in stream_bytes(),
        cuts in proptest::collection::vec(any::<usize>(), 0..6),
        max in prop_oneof![Just(crate::providers::sse::DEFAULT_MAX_FRAME), 1usize..64],
    ) {
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.sort_unstable();
        for provider in Provider::ALL {
            let Some(adapter) = adapter_for(provider) else { continue };
            for route_type in adapter.info().route_types {
                let mut decoder = adapter.stream_decoder(*route_type);
                decoder.set_max_frame(max);
                let mut out = Vec::new();
                let mut last = 0;
                let mut failed = false;
                for c in cuts.iter().copied().chain([bytes.len()]) {
                    if decoder.feed(&bytes[last..c], &mut out).is_err() {
                        failed = true;
                        break;
                    }
                    last = c;
                }
                if !failed {
                    let _ = decoder.finish(&mut out);
                }
            }
        }
    }

    #[test]
    fn event_stream_frames_with_any_lengths_never_panic(
        total in any::<u32>(),
        headers in any::<u32>(),
        body in proptest::collection::vec(any::<u8>(), 0..64),
        valid_crc in any::<bool>(),
    ) {
        let mut frame = Vec::new();
        frame.extend_from_slice(&total.to_be_bytes());
        frame.extend_from_slice(&headers.to_be_bytes());
        let crc = if valid_crc { crc32fast::hash(&frame) } else { 0 };
        frame.extend_from_slice(&crc.to_be_bytes());
        frame.extend_from_slice(&body);
        let Some(bedrock) = adapter_for(Provider::Bedrock) else { return Ok(()) };
        let mut decoder = bedrock.stream_decoder(RouteType::Chat);
        let mut out = Vec::new();
        if decoder.feed(&frame, &mut out).is_ok() {
            let _ = decoder.finish(&mut out);
        }
    }
}

/// Field and type names of the Anthropic Messages and OpenAI Responses bodies.
const AGENT_FIELDS: &[&str] = &[
    "messages",
    "role",
    "content",
    "text",
    "type",
    "system",
    "max_tokens",
    "source",
    "media_type",
    "data",
    "url",
    "base64",
    "image",
    "tool_use",
    "tool_result",
    "tool_use_id",
    "id",
    "name",
    "input",
    "input_schema",
    "tools",
    "tool_choice",
    "stop_sequences",
    "top_k",
    "metadata",
    "output_config",
    "format",
    "schema",
    "instructions",
    "call_id",
    "arguments",
    "function_call",
    "function_call_output",
    "output",
    "input_text",
    "input_image",
    "image_url",
    "max_output_tokens",
    "previous_response_id",
    "store",
    "background",
    "parameters",
    "user",
    "assistant",
    "object",
    "json_schema",
    "function",
    "stream",
];

fn agent_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,8}".prop_map(Value::from),
        proptest::sample::select(AGENT_FIELDS).prop_map(Value::from),
    ];
    leaf.prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            proptest::collection::vec((proptest::sample::select(AGENT_FIELDS), inner), 0..6)
                .prop_map(|pairs| Value::Object(
                    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
                )),
        ]
    })
}

fn agent_object() -> impl Strategy<Value = Map<String, Value>> {
    proptest::collection::vec(
        (proptest::sample::select(AGENT_FIELDS), agent_value()),
        0..8,
    )
    .prop_map(|pairs| pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

fn stream_delta() -> impl Strategy<Value = crate::llm::StreamDelta> {
    let call = (0u32..3, proptest::option::of("[a-z_]{0,6}"), ".{0,6}").prop_map(
        |(index, id, arguments)| crate::llm::ToolCallDelta {
            index,
            name: id.clone(),
            id,
            arguments,
        },
    );
    (
        0u32..2,
        proptest::option::of(".{0,6}"),
        proptest::option::of(proptest::sample::select(
            &["stop", "length", "tool_calls", "x"][..],
        )),
        proptest::collection::vec(call, 0..3),
        proptest::option::of((any::<u64>(), any::<u64>())),
    )
        .prop_map(
            |(index, text, finish, tool_calls, usage)| crate::llm::StreamDelta {
                index,
                text,
                finish_reason: finish.map(String::from),
                tool_calls,
                usage: usage.map(|(p, c)| crate::llm::Usage::new(Some(p), Some(c))),
                ..Default::default()
            },
        )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn agent_bodies_parse_or_fail_with_a_client_error(body in agent_object()) {
        let pass = super::anthropic::PassOn { top_k: true, anthropic: true };
        for generate in [true, false] {
            if let Err(e) = super::anthropic::parse(body.clone(), pass, generate) {
                prop_assert!(e.status().is_client_error(), "{e:?}");
            }
        }
        if let Err(e) = super::responses::parse(body) {
            prop_assert!(e.status().is_client_error(), "{e:?}");
        }
    }

    #[test]
    fn agent_streams_reframe_any_deltas(
        batches in proptest::collection::vec(proptest::collection::vec(stream_delta(), 0..4), 0..5),
        fail in any::<bool>(),
    ) {
        let mut items: Vec<Result<_, super::error::GatewayError>> = batches.into_iter().map(Ok).collect();
        if fail {
            items.push(Err(super::error::GatewayError::UpstreamTruncated(Provider::Openai)));
        }
        let messages = super::reframe::run(super::anthropic::MessagesStream::new("m".into()), items.iter().map(|i| match i {
            Ok(d) => Ok(d.clone()),
            Err(_) => Err(super::error::GatewayError::UpstreamTruncated(Provider::Openai)),
        }).collect());
        let last = messages.last().map(|(n, _)| n.as_str());
        prop_assert_eq!(last, Some(if fail { "error" } else { "message_stop" }));
        let (_, echo) = super::responses::parse(
            serde_json::from_str(r#"{"input": "x"}"#).unwrap_or_default(),
        ).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let responses = super::reframe::run(super::responses::ResponsesStream::new("m".into(), echo), items);
        let last = responses.last().map(|(n, _)| n.as_str());
        prop_assert!(matches!(last, Some("response.failed" | "response.completed" | "response.incomplete")));
        for (i, (_, e)) in responses.iter().enumerate() {
            prop_assert_eq!(e["sequence_number"].as_u64(), Some(i as u64));
        }
    }
}
