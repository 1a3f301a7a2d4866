//! Anthropic's Messages API: top-level `system`, required `max_tokens`, content blocks, and
//! named SSE events (`message_start` ... `message_stop`).

use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use serde::Serialize;
use serde_json::{Map, Value, json};

pub mod wire;

use super::features::{self, OUTPUT_TOOL};
use super::sse::{SseDecoder, SseEvent, SseHandler, merged};
use super::{
    API_KEY, ProviderAdapter, ProviderError, ProviderInfo, StreamDecoder, Target, UpstreamRequest,
    insert_secret, json_headers, malformed, normalize_finish_reason, post_json, push_turn,
    reject_n, single_choice,
};
use crate::api::{Provider, RouteType};
use crate::llm::{
    ChatMessage, ChatRequest, Content, LlmRequest, LlmResponse, NativeAnswer, Role, StreamDelta,
    ToolCallDelta, Usage,
};
use wire::{Delta, Event, Message, block_type};

pub const API_VERSION: &str = "2023-06-01";
/// Anthropic requires `max_tokens`; this is used when neither the caller nor `config.maxTokens` sets it.
pub const DEFAULT_MAX_TOKENS: u32 = 1024;

pub struct Anthropic;

impl ProviderAdapter for Anthropic {
    fn info(&self) -> &'static ProviderInfo {
        &super::info::ANTHROPIC
    }

    fn build_request(
        &self,
        target: &Target,
        request: &LlmRequest,
    ) -> Result<UpstreamRequest, ProviderError> {
        let (body, beta) = match request {
            LlmRequest::Chat(chat) => (
                Body::Translated(request_body(target, chat)?),
                // The caller's own `anthropic-beta` (the Messages surface passes it on for
                // Anthropic Routes).
                chat.extra.get("anthropic_beta").and_then(Value::as_str),
            ),
            LlmRequest::Native(native) => {
                let beta = native
                    .headers
                    .iter()
                    .find(|(name, _)| name == "anthropic-beta")
                    .map(|(_, v)| v.as_str());
                let body = Body::Native {
                    model: &target.model,
                    body: &native.body,
                };
                (body, beta)
            }
            _ => {
                return Err(ProviderError::Unsupported(
                    "provider anthropic serves only chat".into(),
                ));
            }
        };
        let mut headers = json_headers();
        if let Some(key) = target.credentials.get(API_KEY) {
            insert_secret(&mut headers, "x-api-key", key)?;
        }
        let version = target
            .config
            .get("anthropicVersion")
            .and_then(|v| HeaderValue::from_str(v).ok())
            .unwrap_or(HeaderValue::from_static(API_VERSION));
        headers.insert("anthropic-version", version);
        let betas = merge_betas(target.config.get("anthropicBeta").map(String::as_str), beta);
        if let Some(beta) = betas.and_then(|v| HeaderValue::from_str(&v).ok()) {
            headers.insert("anthropic-beta", beta);
        }
        Ok(post_json(
            format!("{}/v1/messages", target.api_base),
            headers,
            &body,
        ))
    }

    fn parse_response(
        &self,
        _target: &Target,
        _route_type: RouteType,
        body: &[u8],
    ) -> Result<LlmResponse, ProviderError> {
        let wire: Message = serde_json::from_slice(body).map_err(malformed)?;
        let mut text = String::new();
        let mut tool_calls = Vec::new();
        let mut structured = false;
        for block in &wire.content {
            match block_type(block) {
                Some("text") => text.push_str(block["text"].as_str().unwrap_or_default()),
                // Structured output asked for through the output tool: its input is the answer.
                Some("tool_use") if block["name"] == OUTPUT_TOOL => {
                    structured = true;
                    text.push_str(&block["input"].to_string());
                }
                Some("tool_use") => tool_calls.extend(wire::tool_call(block)),
                _ => {}
            }
        }
        let stop_reason = match wire.stop_reason.as_deref() {
            Some("tool_use") if structured && tool_calls.is_empty() => Some("end_turn"),
            other => other,
        };
        Ok(single_choice(
            wire.id,
            wire.model,
            text,
            stop_reason,
            tool_calls,
            wire.usage.map(|u| u.into_usage(None)).unwrap_or_default(),
        ))
    }

    fn stream_decoder(&self, _route_type: RouteType) -> Box<dyn StreamDecoder> {
        SseDecoder::boxed(AnthropicStream::default())
    }

    fn parse_native(
        &self,
        _route_type: RouteType,
        body: Bytes,
    ) -> Result<LlmResponse, ProviderError> {
        let wire: Message = serde_json::from_slice(&body).map_err(malformed)?;
        let chars = wire
            .content
            .iter()
            .map(|b| match block_type(b) {
                Some("text") => b["text"].as_str().map_or(0, str::len),
                Some("thinking") => b["thinking"].as_str().map_or(0, str::len),
                _ => b.get("input").map_or(0, |i| i.to_string().len()),
            })
            .sum();
        Ok(LlmResponse::Native(NativeAnswer {
            usage: wire.usage.map(|u| u.into_usage(None)).unwrap_or_default(),
            chars,
            body,
        }))
    }

    fn native_stream_decoder(&self, _route_type: RouteType) -> Option<Box<dyn StreamDecoder>> {
        Some(SseDecoder::boxed(NativeStream::default()))
    }
}

/// A request body: translated, or the caller's own with the backend's `model`, serialised straight
/// from the caller's fields (no copy).
enum Body<'a> {
    Translated(Value),
    Native {
        model: &'a str,
        body: &'a Map<String, Value>,
    },
}

impl Serialize for Body<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            Body::Translated(v) => v.serialize(s),
            Body::Native { model, body } => {
                let mut map = s.serialize_map(None)?;
                map.serialize_entry("model", model)?;
                for (k, v) in body.iter().filter(|(k, _)| *k != "model") {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

fn request_body(target: &Target, chat: &ChatRequest) -> Result<Value, ProviderError> {
    reject_n(Provider::Anthropic, &chat.params)?;
    let mut system_blocks = Vec::new();
    let mut system = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    for m in &chat.messages {
        match &m.role {
            Role::System | Role::Developer => {
                system.push(m.text());
                system_blocks.extend(content_blocks(&m.content)?);
            }
            Role::Tool => push_turn(
                &mut messages,
                "user",
                "content",
                vec![json!({
                    "type": "tool_result",
                    "tool_use_id": m.tool_call_id,
                    "content": m.text(),
                })],
            ),
            Role::Assistant => {
                push_turn(&mut messages, "assistant", "content", assistant_blocks(m)?)
            }
            Role::User | Role::Other(_) => push_turn(
                &mut messages,
                "user",
                "content",
                content_blocks(&m.content)?,
            ),
        }
    }
    let max_tokens = chat
        .params
        .max_tokens
        .or_else(|| target.config.get("maxTokens").and_then(|v| v.parse().ok()))
        .unwrap_or(DEFAULT_MAX_TOKENS);
    let mut body = Map::new();
    body.insert("model".into(), json!(target.model));
    body.insert("max_tokens".into(), json!(max_tokens));
    if system_blocks
        .iter()
        .any(|b| b.get("cache_control").is_some())
    {
        // Cache breakpoints live on blocks: the system prompt keeps its blocks.
        body.insert("system".into(), Value::Array(system_blocks));
    } else if !system.is_empty() {
        body.insert("system".into(), json!(system.join("\n\n")));
    }
    body.insert("messages".into(), Value::Array(messages));
    // Anthropic's scale ends at 1, and newer models refuse temperature and top_p together.
    match (chat.params.temperature, chat.params.top_p) {
        (Some(t), _) => {
            body.insert("temperature".into(), json!(t.min(1.0)));
        }
        (None, Some(p)) => {
            body.insert("top_p".into(), json!(p));
        }
        (None, None) => {}
    }
    if let Some(stop) = &chat.params.stop {
        body.insert("stop_sequences".into(), json!(stop));
    }
    if chat.stream.stream {
        body.insert("stream".into(), json!(true));
    }
    for key in ["top_k", "metadata"] {
        if let Some(v) = chat.extra.get(key) {
            body.insert(key.into(), v.clone());
        }
    }
    let mut tools: Vec<Value> = features::tools(&chat.extra)?
        .into_iter()
        .map(|t| wire::tool_definition(t.name, t.description.unwrap_or_default(), &t.parameters))
        .collect();
    let mut choice = features::tool_choice(&chat.extra)?
        .as_ref()
        .map(wire::tool_choice);
    if let Some(format) = features::output_format(&chat.extra)? {
        // Anthropic has no response format: a forced tool whose input schema is the format.
        if !tools.is_empty() {
            return Err(ProviderError::Unsupported(
                "provider anthropic cannot combine tools with response_format".into(),
            ));
        }
        tools.push(wire::tool_definition(
            OUTPUT_TOOL,
            "Give the answer as this tool's input.",
            &format.schema(),
        ));
        choice = Some(json!({"type": "tool", "name": OUTPUT_TOOL}));
    }
    if !tools.iter().any(|t| t["name"] != OUTPUT_TOOL) {
        // Anthropic refuses tool_use blocks in a request that defines no tools: a conversation
        // that used tools, continued without them, declares the ones its calls name.
        let used = features::called_tools(&chat.messages);
        if !used.is_empty() && tools.is_empty() {
            // Declared only for the history: the caller offered no tools to call now.
            choice.get_or_insert_with(|| json!({"type": "none"}));
        }
        let object = json!({"type": "object"});
        tools.extend(
            used.into_iter()
                .map(|name| wire::tool_definition(name, "", &object)),
        );
    }
    if chat.extra.get("parallel_tool_calls") == Some(&Value::Bool(false)) && !tools.is_empty() {
        let c = choice.get_or_insert_with(|| json!({"type": "auto"}));
        c["disable_parallel_tool_use"] = json!(true);
    }
    if !tools.is_empty() {
        body.insert("tools".into(), Value::Array(tools));
    }
    // A choice without tools is refused upstream; without tools there is nothing to choose.
    if let Some(c) = choice.filter(|_| body.contains_key("tools")) {
        body.insert("tool_choice".into(), c);
    }
    Ok(Value::Object(body))
}

fn content_blocks(content: &Content) -> Result<Vec<Value>, ProviderError> {
    let mut blocks = Vec::new();
    match content {
        Content::Text(s) => blocks.push(wire::text_block(s)),
        Content::Parts(parts) => {
            for p in parts {
                if let Some(image) = features::image(p)? {
                    blocks.push(wire::image_block(image));
                } else if p["type"] == "text" {
                    let mut block = json!({"type": "text", "text": p["text"]});
                    // A cache breakpoint (the Messages surface keeps them for Anthropic Routes).
                    if let Some(cc) = p.get("cache_control") {
                        block["cache_control"] = cc.clone();
                    }
                    blocks.push(block);
                }
            }
        }
        Content::Empty => {}
    }
    // Anthropic refuses empty text blocks (an assistant turn that only calls tools often has one).
    blocks.retain(|b| b["type"] != "text" || b["text"].as_str().is_some_and(|t| !t.is_empty()));
    Ok(blocks)
}

fn assistant_blocks(m: &ChatMessage) -> Result<Vec<Value>, ProviderError> {
    let mut blocks = content_blocks(&m.content)?;
    for call in &m.tool_calls {
        blocks.push(wire::tool_use_block(call, call.arguments_object()));
    }
    Ok(blocks)
}

#[derive(Default)]
struct AnthropicStream {
    id: Option<String>,
    model: Option<String>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    usage_sent: bool,
    /// The tool-use blocks so far: (content block index, tool-call index or `None` for the
    /// structured-output tool, whose input streams as text).
    tool_blocks: Vec<(u64, Option<u32>)>,
    tool_calls: u32,
    /// From `message_delta`; passed on only at `message_stop`, the stream's end marker, so a
    /// stream cut before it never looks finished.
    finish_reason: Option<String>,
}

impl AnthropicStream {
    fn delta(&self) -> StreamDelta {
        StreamDelta {
            id: self.id.clone(),
            model: self.model.clone(),
            ..Default::default()
        }
    }

    fn send_usage(&mut self, out: &mut Vec<StreamDelta>) {
        if self.usage_sent || (self.input_tokens.is_none() && self.output_tokens.is_none()) {
            return;
        }
        self.usage_sent = true;
        out.push(StreamDelta {
            usage: Some(Usage::new(self.input_tokens, self.output_tokens)),
            ..self.delta()
        });
    }
}

impl SseHandler for AnthropicStream {
    fn event(&mut self, event: SseEvent, out: &mut Vec<StreamDelta>) -> Result<(), ProviderError> {
        let wire: Event = serde_json::from_str(&event.data).map_err(malformed)?;
        match wire {
            Event::MessageStart { message: m } => {
                // An id or model left out is none, as the other providers' streams have it.
                self.id = Some(m.id).filter(|id| !id.is_empty());
                self.model = Some(m.model).filter(|model| !model.is_empty());
                if let Some(u) = m.usage {
                    self.input_tokens = u.into_usage(None).prompt_tokens;
                    self.output_tokens = u.output_tokens;
                }
                out.push(StreamDelta {
                    role: Some(Role::Assistant),
                    ..self.delta()
                });
            }
            Event::ContentBlockStart {
                index,
                content_block: block,
            } => {
                if block["type"] == "tool_use" {
                    if block["name"] == OUTPUT_TOOL {
                        self.tool_blocks.push((index, None));
                    } else {
                        let call = self.tool_calls;
                        self.tool_calls += 1;
                        self.tool_blocks.push((index, Some(call)));
                        out.push(StreamDelta {
                            tool_calls: vec![ToolCallDelta {
                                index: call,
                                id: block["id"].as_str().map(str::to_string),
                                name: block["name"].as_str().map(str::to_string),
                                arguments: String::new(),
                            }],
                            ..self.delta()
                        });
                    }
                }
            }
            Event::ContentBlockDelta { index, delta } => match delta {
                Delta::TextDelta { text } => out.push(StreamDelta {
                    text: Some(text),
                    ..self.delta()
                }),
                Delta::InputJsonDelta {
                    partial_json: fragment,
                } => match self.tool_blocks.iter().find(|(b, _)| *b == index) {
                    Some((_, Some(call))) => out.push(StreamDelta {
                        tool_calls: vec![ToolCallDelta {
                            index: *call,
                            arguments: fragment,
                            ..Default::default()
                        }],
                        ..self.delta()
                    }),
                    Some((_, None)) if !fragment.is_empty() => out.push(StreamDelta {
                        text: Some(fragment),
                        ..self.delta()
                    }),
                    _ => {}
                },
                Delta::Other => {}
            },
            Event::MessageDelta { delta, usage } => {
                // Output usage here is cumulative: the last report wins.
                if let Some(u) = usage {
                    self.output_tokens = u.output_tokens.or(self.output_tokens);
                }
                if let Some(reason) = delta
                    .stop_reason
                    .as_deref()
                    .and_then(normalize_finish_reason)
                {
                    // The structured-output tool's answer is the message, not a tool call.
                    let structured = self.tool_calls == 0 && !self.tool_blocks.is_empty();
                    self.finish_reason = Some(if structured && reason == "tool_calls" {
                        "stop".into()
                    } else {
                        reason
                    });
                }
            }
            Event::MessageStop => {
                out.push(StreamDelta {
                    finish_reason: Some(self.finish_reason.take().unwrap_or_else(|| "stop".into())),
                    ..self.delta()
                });
                self.send_usage(out);
            }
            Event::Error { error: err } => {
                let status = match err["type"].as_str() {
                    Some("overloaded_error") => {
                        StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)
                    }
                    Some("rate_limit_error") => StatusCode::TOO_MANY_REQUESTS,
                    _ => StatusCode::BAD_GATEWAY,
                };
                return Err(ProviderError::Upstream {
                    status,
                    message: err["message"]
                        .as_str()
                        .unwrap_or("upstream stream error")
                        .to_string(),
                    retry_after: None,
                });
            }
            Event::ContentBlockStop { .. } | Event::Ping | Event::Other => {}
        }
        Ok(())
    }

    fn end(&mut self, out: &mut Vec<StreamDelta>) -> Result<(), ProviderError> {
        self.send_usage(out);
        Ok(())
    }
}

/// A native stream: every event goes on as the provider sent it, in a delta that also carries what
/// the gateway counts (text, usage, the end marker), read by the translating decoder.
#[derive(Default)]
struct NativeStream {
    counted: AnthropicStream,
}

impl SseHandler for NativeStream {
    fn event(&mut self, event: SseEvent, out: &mut Vec<StreamDelta>) -> Result<(), ProviderError> {
        let raw = event.raw();
        let mut parsed = Vec::new();
        // An `error` event fails the stream here: the surface writes the one error event.
        self.counted.event(event, &mut parsed)?;
        out.push(merged(parsed, Some(raw)));
        Ok(())
    }

    fn end(&mut self, out: &mut Vec<StreamDelta>) -> Result<(), ProviderError> {
        // Usage of a stream cut before `message_stop`: counted, nothing for the caller.
        let mut parsed = Vec::new();
        self.counted.end(&mut parsed)?;
        if !parsed.is_empty() {
            out.push(merged(parsed, None));
        }
        Ok(())
    }
}

/// The Route's `anthropicBeta` features, then the caller's that it does not already name: a caller
/// adds betas, never removes the ones the Route's operator requires.
fn merge_betas(route: Option<&str>, caller: Option<&str>) -> Option<String> {
    let mut out: Vec<&str> = Vec::new();
    for feature in [route, caller]
        .into_iter()
        .flatten()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|f| !f.is_empty())
    {
        if !out.contains(&feature) {
            out.push(feature);
        }
    }
    (!out.is_empty()).then(|| out.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::{NativeRequest, Params, StreamOptions, ToolCall};
    use crate::providers::testing::decode_split;
    use crate::providers::{Credentials, SecretValue};
    use http::HeaderMap;
    use proptest::prelude::*;

    fn target() -> Target {
        let mut credentials = Credentials::default();
        credentials.insert(API_KEY, SecretValue::new("sk-ant-1"));
        Target {
            model: "claude-sonnet-4-5".into(),
            api_base: "https://api.anthropic.com".into(),
            credentials,
            config: Default::default(),
        }
    }

    /// The JSON body Anthropic would be sent for `req`.
    fn sent_body(req: &LlmRequest) -> Value {
        let built = Anthropic
            .build_request(&target(), req)
            .unwrap_or_else(|e| panic!("{e}"));
        serde_json::from_slice(&built.body).unwrap_or_default()
    }

    fn msg(role: &str, content: Value) -> ChatMessage {
        ChatMessage::from_json(role, content)
    }

    fn chat(params: Params, stream: bool) -> LlmRequest {
        LlmRequest::Chat(ChatRequest {
            messages: vec![
                msg("system", json!("Be terse.")),
                msg("user", json!("Name a prime.")),
            ],
            params,
            stream: StreamOptions {
                stream,
                include_usage: false,
            },
            extra: Map::new(),
        })
    }

    #[test]
    fn request_lifts_system_defaults_max_tokens_and_sets_headers() {
        let req = Anthropic
            .build_request(
                &target(),
                &chat(
                    Params {
                        temperature: Some(1.6),
                        top_p: Some(0.9),
                        stop: Some(vec!["\n\nHuman:".into()]),
                        ..Default::default()
                    },
                    true,
                ),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(req.url, "https://api.anthropic.com/v1/messages");
        assert_eq!(req.headers["x-api-key"], "sk-ant-1");
        assert!(req.headers["x-api-key"].is_sensitive());
        assert_eq!(req.headers["anthropic-version"], "2023-06-01");
        assert!(req.headers.get("authorization").is_none());
        let body: Value = serde_json::from_slice(&req.body).unwrap_or_default();
        assert_eq!(
            body,
            json!({"model":"claude-sonnet-4-5","max_tokens":1024,"system":"Be terse.",
                   "messages":[{"role":"user","content":[{"type":"text","text":"Name a prime."}]}],
                   "temperature":1.0,"stop_sequences":["\n\nHuman:"],"stream":true})
        );
    }

    #[test]
    fn n_above_one_is_refused_and_tool_turns_become_blocks() {
        let err = Anthropic
            .build_request(
                &target(),
                &chat(
                    Params {
                        n: Some(2),
                        ..Default::default()
                    },
                    false,
                ),
            )
            .err();
        assert_eq!(
            err,
            Some(ProviderError::Unsupported(
                "provider anthropic does not support n > 1".into()
            ))
        );
        let mut call = msg("assistant", json!(""));
        call.tool_calls = ToolCall::openai_list(
            json!([{"id":"t1","type":"function","function":{"name":"f","arguments":"{\"a\":1}"}}]),
        );
        let mut result = msg("tool", json!("42"));
        result.tool_call_id = Some("t1".into());
        let req = LlmRequest::Chat(ChatRequest {
            messages: vec![msg("user", json!("go")), call, result],
            params: Params {
                max_tokens: Some(5),
                ..Default::default()
            },
            stream: StreamOptions::default(),
            extra: Map::new(),
        });
        let body = sent_body(&req);
        assert_eq!(body["max_tokens"], 5);
        // No tools given, but the history uses one: it is declared, not offered.
        assert_eq!(
            body["tools"],
            json!([{"name": "f", "description": "", "input_schema": {"type": "object"}}])
        );
        assert_eq!(body["tool_choice"], json!({"type": "none"}));
        assert_eq!(
            body["messages"],
            json!([{"role":"user","content":[{"type":"text","text":"go"}]},
                   {"role":"assistant","content":[{"type":"tool_use","id":"t1","name":"f","input":{"a":1}}]},
                   {"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"42"}]}])
        );
    }

    #[test]
    fn cache_breakpoints_stay_on_their_blocks() {
        let req = LlmRequest::Chat(ChatRequest {
            messages: vec![
                msg(
                    "system",
                    json!([{"type": "text", "text": "S", "cache_control": {"type": "ephemeral"}}]),
                ),
                msg(
                    "user",
                    json!([{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]),
                ),
            ],
            params: Params::default(),
            stream: StreamOptions::default(),
            extra: Map::new(),
        });
        let body = sent_body(&req);
        assert_eq!(
            body["system"],
            json!([{"type": "text", "text": "S", "cache_control": {"type": "ephemeral"}}])
        );
        assert_eq!(
            body["messages"][0]["content"][0]["cache_control"],
            json!({"type": "ephemeral"})
        );
    }

    #[test]
    fn the_callers_beta_and_top_k_pass_through() {
        let mut extra = Map::new();
        extra.insert("anthropic_beta".into(), json!("prompt-caching-2024-07-31"));
        extra.insert("top_k".into(), json!(3));
        let req = LlmRequest::Chat(ChatRequest {
            messages: vec![msg("user", json!("hi"))],
            params: Params::default(),
            stream: StreamOptions::default(),
            extra,
        });
        let built = Anthropic
            .build_request(&target(), &req)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(built.headers["anthropic-beta"], "prompt-caching-2024-07-31");
        let body: Value = serde_json::from_slice(&built.body).unwrap_or_default();
        assert_eq!(body["top_k"], 3);
        assert!(body.get("anthropic_beta").is_none());
    }

    #[test]
    fn a_callers_beta_adds_to_the_routes_never_replaces_it() {
        let mut route = target();
        route
            .config
            .insert("anthropicBeta".into(), "context-1m-2025-08-07".into());
        let chat = |beta: Option<&str>| {
            let mut extra = Map::new();
            if let Some(b) = beta {
                extra.insert("anthropic_beta".into(), json!(b));
            }
            LlmRequest::Chat(ChatRequest {
                messages: vec![msg("user", json!("hi"))],
                params: Params::default(),
                stream: StreamOptions::default(),
                extra,
            })
        };
        let sent = |req: &LlmRequest| {
            Anthropic
                .build_request(&route, req)
                .unwrap_or_else(|e| panic!("{e}"))
                .headers["anthropic-beta"]
                .to_str()
                .unwrap_or_default()
                .to_string()
        };
        assert_eq!(sent(&chat(None)), "context-1m-2025-08-07");
        assert_eq!(
            sent(&chat(Some("files-api-2025-04-14, context-1m-2025-08-07"))),
            "context-1m-2025-08-07,files-api-2025-04-14"
        );
        let native = LlmRequest::Native(NativeRequest {
            route_type: RouteType::Chat,
            body: Map::new(),
            stream: false,
            max_tokens: Some(16),
            prompt_chars: 1,
            headers: vec![("anthropic-beta".into(), "files-api-2025-04-14".into())],
        });
        assert_eq!(sent(&native), "context-1m-2025-08-07,files-api-2025-04-14");
    }

    #[test]
    fn response_text_finish_reason_usage_and_tool_calls() {
        let body = br#"{"id":"msg_01X","type":"message","role":"assistant","model":"claude-sonnet-4-5-20250929","content":[{"type":"thinking","thinking":"hm"},{"type":"text","text":"7"},{"type":"tool_use","id":"t","name":"f","input":{"x":1}}],"stop_reason":"tool_use","stop_sequence":null,"usage":{"input_tokens":12,"output_tokens":5,"cache_creation_input_tokens":2,"cache_read_input_tokens":1}}"#;
        let Ok(LlmResponse::Generation(g)) =
            Anthropic.parse_response(&target(), RouteType::Chat, body)
        else {
            panic!("not a generation")
        };
        assert_eq!(g.id, "msg_01X");
        assert_eq!(g.choices[0].text, "7");
        assert_eq!(g.choices[0].finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(g.choices[0].tool_calls[0].arguments, "{\"x\":1}");
        assert_eq!(g.usage, Usage::new(Some(15), Some(5)).with_cached(Some(1)));
        for (raw, want) in [
            ("end_turn", "stop"),
            ("max_tokens", "length"),
            ("stop_sequence", "stop"),
            ("refusal", "content_filter"),
        ] {
            assert_eq!(normalize_finish_reason(raw).as_deref(), Some(want));
        }
    }

    #[test]
    fn errors_keep_message_status_and_retry_after() {
        let mut h = HeaderMap::new();
        h.insert(http::header::RETRY_AFTER, HeaderValue::from_static("30"));
        let err = Anthropic.parse_error(
            StatusCode::TOO_MANY_REQUESTS,
            &h,
            br#"{"type":"error","error":{"type":"rate_limit_error","message":"Number of request tokens has exceeded your per-minute rate limit"},"request_id":"req_1"}"#,
        );
        assert_eq!(
            err,
            ProviderError::Upstream {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: "Number of request tokens has exceeded your per-minute rate limit".into(),
                retry_after: Some(30)
            }
        );
    }

    const STREAM: &str = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"m\",\"content\":[],\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":12,\"output_tokens\":1}}}\n\nevent: ping\ndata: {\"type\":\"ping\"}\n\nevent: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hé\"}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"llo\"}}\n\nevent: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":5}}\n\nevent: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

    fn decode(bytes: &[u8]) -> Result<Vec<StreamDelta>, ProviderError> {
        decode_split(&Anthropic, RouteType::Chat, bytes, vec![])
    }

    #[test]
    fn stream_yields_role_text_finish_and_one_usage() {
        let out = decode(STREAM.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        let text: String = out.iter().filter_map(|d| d.text.clone()).collect();
        assert_eq!(text, "Héllo");
        assert_eq!(out[0].role.as_ref().map(Role::as_str), Some("assistant"));
        assert_eq!(out[0].id.as_deref(), Some("msg_1"));
        assert!(
            out.iter()
                .any(|d| d.finish_reason.as_deref() == Some("stop"))
        );
        let usages: Vec<Usage> = out.iter().filter_map(|d| d.usage).collect();
        assert_eq!(usages, vec![Usage::new(Some(12), Some(5))]);
    }

    #[test]
    fn stream_without_message_stop_still_reports_usage() {
        let cut = STREAM.find("event: message_stop").unwrap_or(STREAM.len());
        let out = decode(&STREAM.as_bytes()[..cut]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            out.iter().filter_map(|d| d.usage).collect::<Vec<_>>(),
            vec![Usage::new(Some(12), Some(5))]
        );
        // message_stop is the end marker: without it the answer never looks finished.
        assert!(out.iter().all(|d| d.finish_reason.is_none()), "{out:?}");
    }

    fn event(name: &str, data: Value) -> String {
        format!("event: {name}\ndata: {data}\n\n")
    }

    fn tool_stream(tool: &str) -> String {
        [
            event("message_start", json!({"type":"message_start","message":{"id":"msg_t","type":"message","role":"assistant","model":"m","content":[],"stop_reason":null,"usage":{"input_tokens":9,"output_tokens":1}}})),
            event("content_block_start", json!({"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}})),
            event("content_block_delta", json!({"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Checking."}})),
            event("content_block_stop", json!({"type":"content_block_stop","index":0})),
            event("content_block_start", json!({"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_1","name":tool,"input":{}}})),
            event("content_block_delta", json!({"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":""}})),
            event("content_block_delta", json!({"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{\"city\": \"Par"}})),
            event("content_block_delta", json!({"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"is\"}"}})),
            event("content_block_stop", json!({"type":"content_block_stop","index":1})),
            event("message_delta", json!({"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":20}})),
            event("message_stop", json!({"type":"message_stop"})),
        ]
        .concat()
    }

    #[test]
    fn streamed_tool_use_becomes_tool_call_fragments() {
        use crate::providers::testing::{finish, text, tool_calls};
        let wire = tool_stream("get_weather");
        let out = decode(wire.as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(text(&out), "Checking.");
        assert_eq!(
            tool_calls(&out),
            vec![(
                "toolu_1".into(),
                "get_weather".into(),
                "{\"city\": \"Paris\"}".into()
            )]
        );
        assert_eq!(finish(&out), Some("tool_calls"));
        for cut in (0..wire.len()).step_by(37) {
            assert_eq!(
                decode_split(&Anthropic, RouteType::Chat, wire.as_bytes(), vec![cut]).ok(),
                Some(out.clone())
            );
        }
        // The structured-output tool streams as the message text, and the answer just stops.
        let out = decode(tool_stream(OUTPUT_TOOL).as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(text(&out), "Checking.{\"city\": \"Paris\"}");
        assert!(tool_calls(&out).is_empty());
        assert_eq!(finish(&out), Some("stop"));
    }

    fn rich(extra: Value, content: Value) -> Result<Value, ProviderError> {
        let req = LlmRequest::Chat(ChatRequest {
            messages: vec![msg("user", content)],
            params: Params::default(),
            stream: StreamOptions::default(),
            extra: extra.as_object().cloned().unwrap_or_default(),
        });
        Anthropic
            .build_request(&target(), &req)
            .map(|r| serde_json::from_slice(&r.body).unwrap_or_default())
    }

    #[test]
    fn tools_choice_images_and_structured_output_are_translated() {
        let tools = json!({"tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}], "tool_choice": "required", "parallel_tool_calls": false});
        let body = rich(tools, json!("hi")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            body["tools"],
            json!([{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}])
        );
        assert_eq!(
            body["tool_choice"],
            json!({"type": "any", "disable_parallel_tool_use": true})
        );
        let images = json!([{"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}}, {"type": "image_url", "image_url": {"url": "https://img.example/cat.jpg"}}]);
        let body = rich(json!({}), images).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            body["messages"][0]["content"],
            json!([{"type": "text", "text": "What is this?"},
                   {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0K"}},
                   {"type": "image", "source": {"type": "url", "url": "https://img.example/cat.jpg"}}])
        );
        let bad = json!([{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]);
        assert!(matches!(
            rich(json!({}), bad),
            Err(ProviderError::Unsupported(_))
        ));
        let schema =
            json!({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]});
        let body = rich(
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "num", "schema": schema}}}),
            json!("a number"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(body["tools"][0]["name"], OUTPUT_TOOL);
        assert_eq!(body["tools"][0]["input_schema"], schema);
        assert_eq!(
            body["tool_choice"],
            json!({"type": "tool", "name": OUTPUT_TOOL})
        );
        let answer = format!(
            r#"{{"id":"m","type":"message","role":"assistant","model":"c","content":[{{"type":"tool_use","id":"t","name":"{OUTPUT_TOOL}","input":{{"n":7}}}}],"stop_reason":"tool_use","usage":{{"input_tokens":1,"output_tokens":1}}}}"#
        );
        let Ok(LlmResponse::Generation(g)) =
            Anthropic.parse_response(&target(), RouteType::Chat, answer.as_bytes())
        else {
            panic!("generation")
        };
        assert_eq!(g.choices[0].text, "{\"n\":7}");
        assert_eq!(g.choices[0].finish_reason.as_deref(), Some("stop"));
        assert!(g.choices[0].message_extra.is_empty());
    }

    #[test]
    fn error_event_after_200_is_a_stream_error() {
        let err = decode(b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n").err();
        assert!(
            matches!(err, Some(ProviderError::Upstream { status, ref message, .. }) if status.as_u16() == 529 && message == "Overloaded")
        );
    }

    #[test]
    fn native_requests_go_as_sent_but_for_the_model() {
        let body = json!({"model": "caller-route", "max_tokens": 2048, "service_tier": "standard_only",
            "thinking": {"type": "enabled", "budget_tokens": 1024}, "cache_control": {"type": "ephemeral"},
            "tools": [{"type": "web_search_20250305", "name": "web_search", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "assistant", "content": [{"type": "redacted_thinking", "data": "abc"}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "is_error": true, "content": "x"}]}]});
        let Value::Object(fields) = body.clone() else {
            panic!("an object");
        };
        let req = LlmRequest::Native(NativeRequest {
            route_type: RouteType::Chat,
            body: fields,
            stream: false,
            max_tokens: Some(2048),
            prompt_chars: 1,
            headers: vec![("anthropic-beta".into(), "files-api-2025-04-14".into())],
        });
        let built = Anthropic
            .build_request(&target(), &req)
            .unwrap_or_else(|e| panic!("{e}"));
        let sent: Value = serde_json::from_slice(&built.body).unwrap_or_default();
        let mut want = body;
        want["model"] = json!("claude-sonnet-4-5");
        assert_eq!(sent, want);
        assert_eq!(built.headers["anthropic-beta"], "files-api-2025-04-14");
        assert_eq!(built.headers["x-api-key"], "sk-ant-1");
        assert_eq!(built.headers["anthropic-version"], API_VERSION);
    }

    #[test]
    fn native_answers_stay_as_sent_and_report_usage() {
        let body = Bytes::from_static(
            br#"{"id":"msg_1","type":"message","model":"m","content":[{"type":"thinking","thinking":"hmm","signature":"s"},{"type":"text","text":"Hi","citations":[]}],"stop_reason":"end_turn","usage":{"input_tokens":10,"cache_read_input_tokens":5,"output_tokens":3,"service_tier":"standard"}}"#,
        );
        let Ok(LlmResponse::Native(answer)) = Anthropic.parse_native(RouteType::Chat, body.clone())
        else {
            panic!("a native answer");
        };
        assert_eq!(answer.body, body);
        assert_eq!(
            answer.usage,
            Usage::new(Some(15), Some(3)).with_cached(Some(5))
        );
        assert_eq!(answer.chars, 5);
        assert!(
            Anthropic
                .parse_native(RouteType::Chat, Bytes::from_static(b"[1]"))
                .is_err()
        );
    }

    fn decode_native(bytes: &[u8], cut: usize) -> Result<Vec<StreamDelta>, ProviderError> {
        let mut decoder = Anthropic
            .native_stream_decoder(RouteType::Chat)
            .unwrap_or_else(|| panic!("a native decoder"));
        let mut out = Vec::new();
        let cut = cut.min(bytes.len());
        decoder.feed(&bytes[..cut], &mut out)?;
        decoder.feed(&bytes[cut..], &mut out)?;
        decoder.finish(&mut out)?;
        Ok(out)
    }

    #[test]
    fn native_streams_pass_every_event_and_count_usage() {
        let thinking = "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"thinking\",\"thinking\":\"\"}}\n\nevent: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"signature_delta\",\"signature\":\"s\"}}\n\n";
        let wire = format!("{thinking}{STREAM}");
        for cut in [0, 7, 150, 400, wire.len()] {
            let out = decode_native(wire.as_bytes(), cut).unwrap_or_else(|e| panic!("{e}"));
            let raw: Vec<u8> = out
                .iter()
                .filter_map(|d| d.raw.clone())
                .flat_map(|b| b.to_vec())
                .collect();
            assert_eq!(String::from_utf8_lossy(&raw), wire, "cut at {cut}");
            let text: String = out.iter().filter_map(|d| d.text.clone()).collect();
            assert_eq!(text, "Héllo");
            assert_eq!(
                out.iter().filter_map(|d| d.usage).collect::<Vec<_>>(),
                [Usage::new(Some(12), Some(5))]
            );
            // Only `message_stop` ends the answer.
            let ends: Vec<usize> = (0..out.len())
                .filter(|i| out[*i].finish_reason.is_some())
                .collect();
            assert_eq!(ends, [out.len() - 1]);
        }
        // Cut before `message_stop`: no end marker, the usage so far still counted.
        let cut = &STREAM[..STREAM.find("event: message_stop").unwrap_or(0)];
        let out = decode_native(cut.as_bytes(), 0).unwrap_or_else(|e| panic!("{e}"));
        assert!(out.iter().all(|d| d.finish_reason.is_none()));
        assert!(
            out.last()
                .is_some_and(|d| d.raw.is_none() && d.usage.is_some())
        );
        // Anthropic's error event fails the stream (the surface writes its own).
        let failed = decode_native(
            b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n",
            0,
        );
        assert!(
            matches!(failed, Err(ProviderError::Upstream { status, .. }) if status.as_u16() == 529)
        );
    }

    proptest! {
        #[test]
        fn stream_is_the_same_however_it_is_cut(cuts in proptest::collection::vec(0..STREAM.len(), 0..8)) {
            let whole = decode(STREAM.as_bytes());
            prop_assert_eq!(decode_split(&Anthropic, RouteType::Chat, STREAM.as_bytes(), cuts), whole);
        }
    }
}
