//! AWS Bedrock runtime: Converse and ConverseStream (binary event stream) for chat and completions,
//! InvokeModel for Titan and Cohere embeddings; every request signed with SigV4 (service `bedrock`).

use std::time::SystemTime;

use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::eventstream::{Frame, FrameParser};
use super::features::{self, Image, OUTPUT_TOOL, ToolChoice};
use super::info::{ACCESS_KEY_ID, SECRET_ACCESS_KEY, SESSION_TOKEN};
use super::{
    ProviderAdapter, ProviderError, ProviderInfo, StreamDecoder, Target, UpstreamRequest,
    error_message, insert_secret, json_headers, malformed, normalize_finish_reason, path_segment,
    present_fields, push_turn, reject_n, single_choice, upstream_error,
};
use crate::api::{Provider, RouteType};
use crate::llm::{
    ChatMessage, Content, Embeddings, LlmRequest, LlmResponse, Params, Role, StreamDelta, ToolCall,
    ToolCallDelta, Usage,
};

/// Used when the Route sets no `config.region`.
pub const DEFAULT_REGION: &str = "us-east-1";

pub struct Bedrock;

impl ProviderAdapter for Bedrock {
    fn info(&self) -> &'static ProviderInfo {
        &super::info::BEDROCK
    }

    fn build_request(
        &self,
        target: &Target,
        request: &LlmRequest,
    ) -> Result<UpstreamRequest, ProviderError> {
        build_request_at(target, request, SystemTime::now())
    }

    fn parse_response(
        &self,
        target: &Target,
        route_type: RouteType,
        body: &[u8],
    ) -> Result<LlmResponse, ProviderError> {
        if route_type == RouteType::Embeddings {
            return parse_embeddings(target, body);
        }
        let wire: WireConverse = serde_json::from_slice(body).map_err(malformed)?;
        let text: String = wire
            .output
            .message
            .content
            .iter()
            .filter_map(|b| b["text"].as_str())
            .collect();
        let mut text = text;
        let mut calls = Vec::new();
        for t in wire
            .output
            .message
            .content
            .iter()
            .filter_map(|b| b.get("toolUse"))
        {
            if t["name"] == OUTPUT_TOOL {
                // Structured output through the forced tool: its input is the answer.
                text.push_str(&t["input"].to_string());
            } else {
                calls.push(ToolCall::function(
                    t["toolUseId"].as_str().unwrap_or_default(),
                    t["name"].as_str().unwrap_or_default(),
                    t["input"].to_string(),
                ));
            }
        }
        let structured = wire
            .output
            .message
            .content
            .iter()
            .any(|b| b.pointer("/toolUse/name").is_some_and(|n| n == OUTPUT_TOOL));
        let stop_reason = match wire.stop_reason.as_deref() {
            Some("tool_use") if structured && calls.is_empty() => Some("end_turn"),
            other => other,
        };
        Ok(single_choice(
            String::new(),
            target.model.clone(),
            text,
            stop_reason,
            calls,
            wire.usage.map(WireUsage::usage).unwrap_or_default(),
        ))
    }

    fn parse_error(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> ProviderError {
        // AWS JSON errors spell it `message` or `Message`; the exception name is in a header.
        let message = error_message(body).or_else(|| {
            serde_json::from_slice::<Value>(body)
                .ok()
                .and_then(|v| v["Message"].as_str().map(str::to_string))
        });
        let kind = headers
            .get("x-amzn-errortype")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(':').next())
            .filter(|v| !v.is_empty());
        let message = match (kind, message) {
            (Some(kind), Some(m)) => Some(format!("{kind}: {m}")),
            (_, m) => m,
        };
        upstream_error(status, headers, message, body)
    }

    fn stream_decoder(&self, _route_type: RouteType) -> Box<dyn StreamDecoder> {
        Box::new(ConverseStream::default())
    }

    fn max_inputs_per_call(&self, target: &Target, route_type: RouteType) -> Option<usize> {
        (route_type == RouteType::Embeddings && !is_cohere(&target.model)).then_some(1)
    }
}

fn is_cohere(model: &str) -> bool {
    model.contains("cohere.embed")
}

fn region(target: &Target) -> &str {
    target
        .config
        .get("region")
        .map(String::as_str)
        .unwrap_or(DEFAULT_REGION)
}

/// `build_request` with the signing time injected, so signatures are reproducible in tests.
pub(crate) fn build_request_at(
    target: &Target,
    request: &LlmRequest,
    time: SystemTime,
) -> Result<UpstreamRequest, ProviderError> {
    let region = region(target);
    // The region lands in the host name: a Route must not pick another host through it.
    if region.is_empty()
        || !region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(ProviderError::Unsupported(format!(
            "the Route's region {region:?} is not an AWS region name"
        )));
    }
    let base = target.api_base.replace("{region}", region);
    let model = path_segment(&target.model)?;
    let (operation, body) = match request {
        LlmRequest::Chat(c) => {
            reject_n(Provider::Bedrock, &c.params)?;
            let op = if c.stream.stream {
                "converse-stream"
            } else {
                "converse"
            };
            (op, converse_body(&c.messages, &c.params, &c.extra)?)
        }
        LlmRequest::Completions(c) => {
            reject_n(Provider::Bedrock, &c.params)?;
            let op = if c.stream.stream {
                "converse-stream"
            } else {
                "converse"
            };
            let prompt = ChatMessage::from_json("user", json!(c.prompt));
            (op, converse_body(&[prompt], &c.params, &c.extra)?)
        }
        LlmRequest::Native(_) => return Err(super::native_unsupported(Provider::Bedrock)),
        LlmRequest::Embeddings(e) if is_cohere(&target.model) => {
            let input_type = e
                .extra
                .get("input_type")
                .cloned()
                .unwrap_or(json!("search_document"));
            (
                "invoke",
                json!({"texts": e.input, "input_type": input_type}),
            )
        }
        LlmRequest::Embeddings(e) => {
            let [text] = e.input.as_slice() else {
                return Err(ProviderError::Unsupported(
                    "Titan embeddings take one input per call".into(),
                ));
            };
            let mut body = Map::new();
            body.insert("inputText".into(), json!(text));
            for (from, to) in [("dimensions", "dimensions"), ("normalize", "normalize")] {
                if let Some(v) = e.extra.get(from) {
                    body.insert(to.into(), v.clone());
                }
            }
            ("invoke", Value::Object(body))
        }
    };
    let url = format!("{base}/model/{model}/{operation}");
    let body = Bytes::from(body.to_string());
    let mut headers = json_headers();
    sign_request(target, "POST", &url, &mut headers, &body, time)?;
    let accept = if operation == "converse-stream" {
        "application/vnd.amazon.eventstream"
    } else {
        "application/json"
    };
    headers.insert(header::ACCEPT, HeaderValue::from_static(accept));
    Ok(UpstreamRequest {
        method: Method::POST,
        url,
        headers,
        body,
    })
}

/// Signs with SigV4 and adds the resulting headers (`authorization`, `x-amz-date`, and
/// `x-amz-security-token` for temporary credentials).
fn sign_request(
    target: &Target,
    method: &str,
    url: &str,
    headers: &mut HeaderMap,
    body: &[u8],
    time: SystemTime,
) -> Result<(), ProviderError> {
    let credential = |key: &str| {
        target
            .credentials
            .get(key)
            .ok_or_else(|| ProviderError::Unsupported(format!("the route's Secret has no {key}")))
    };
    sign_with(
        SigV4 {
            access_key_id: credential(ACCESS_KEY_ID)?,
            secret_access_key: credential(SECRET_ACCESS_KEY)?,
            session_token: target.credentials.get(SESSION_TOKEN),
            region: region(target),
            service: "bedrock",
            time,
        },
        method,
        url,
        headers,
        body,
    )
}

pub(crate) struct SigV4<'a> {
    pub access_key_id: &'a str,
    pub secret_access_key: &'a str,
    pub session_token: Option<&'a str>,
    pub region: &'a str,
    pub service: &'a str,
    pub time: SystemTime,
}

pub(crate) fn sign_with(
    sig: SigV4<'_>,
    method: &str,
    url: &str,
    headers: &mut HeaderMap,
    body: &[u8],
) -> Result<(), ProviderError> {
    let signing_error = |e: &dyn std::fmt::Display| {
        ProviderError::Unsupported(format!("could not sign the request: {e}"))
    };
    let identity: Identity = aws_credential_types::Credentials::new(
        sig.access_key_id,
        sig.secret_access_key,
        sig.session_token.map(str::to_string),
        None,
        "portcullis-route-secret",
    )
    .into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(sig.region)
        .name(sig.service)
        .time(sig.time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| signing_error(&e))?
        .into();
    let pairs: Vec<(&str, &str)> = headers
        .iter()
        .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?)))
        .collect();
    let signable = SignableRequest::new(method, url, pairs.into_iter(), SignableBody::Bytes(body))
        .map_err(|e| signing_error(&e))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| signing_error(&e))?
        .into_parts();
    let mut signed = Vec::new();
    for (name, value) in instructions.headers() {
        let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| signing_error(&e))?;
        signed.push((name, value.to_string()));
    }
    for (name, value) in signed {
        if name == header::AUTHORIZATION || name.as_str() == "x-amz-security-token" {
            insert_secret(headers, name, &value)?;
        } else {
            let value = HeaderValue::from_str(&value).map_err(|e| signing_error(&e))?;
            headers.insert(name, value);
        }
    }
    Ok(())
}

/// A message's text and image parts as Converse content blocks. Converse takes image bytes
/// only: an https image URL is refused, since the gateway never fetches a URL itself.
fn content_blocks(content: &Content) -> Result<Vec<Value>, ProviderError> {
    let mut blocks = Vec::new();
    match content {
        Content::Text(s) => blocks.push(json!({"text": s})),
        Content::Parts(parts) => {
            for p in parts {
                match features::image(p)? {
                    Some(Image::Inline { media_type, data }) => {
                        let format = match media_type {
                            "image/png" => "png",
                            "image/jpeg" | "image/jpg" => "jpeg",
                            "image/gif" => "gif",
                            "image/webp" => "webp",
                            other => {
                                return Err(ProviderError::Unsupported(format!(
                                    "provider bedrock takes png, jpeg, gif or webp images, not {other}"
                                )));
                            }
                        };
                        blocks
                            .push(json!({"image": {"format": format, "source": {"bytes": data}}}));
                    }
                    Some(Image::Url(_)) => {
                        return Err(ProviderError::Unsupported(
                            "provider bedrock takes images as data: URLs only (the gateway does not fetch image URLs)".into(),
                        ));
                    }
                    None => {
                        if let Some(t) = p.get("text").and_then(Value::as_str) {
                            blocks.push(json!({"text": t}));
                        }
                    }
                }
            }
        }
        _ => {}
    }
    // Converse refuses empty text blocks.
    blocks.retain(|b| b.get("text").is_none_or(|t| t != ""));
    Ok(blocks)
}

fn converse_body(
    messages: &[ChatMessage],
    params: &Params,
    extra: &Map<String, Value>,
) -> Result<Value, ProviderError> {
    let mut system = Vec::new();
    let mut turns: Vec<Value> = Vec::new();
    for m in messages {
        let (role, blocks) = match &m.role {
            Role::System | Role::Developer => {
                system.push(json!({"text": m.text()}));
                continue;
            }
            Role::Tool => (
                "user",
                vec![json!({"toolResult": {
                    "toolUseId": m.tool_call_id,
                    "content": [{"text": m.text()}],
                }})],
            ),
            Role::Assistant => {
                let mut blocks = content_blocks(&m.content)?;
                for call in &m.tool_calls {
                    blocks.push(json!({"toolUse": {
                        "toolUseId": call.id,
                        "name": call.name,
                        "input": call.arguments_object(),
                    }}));
                }
                ("assistant", blocks)
            }
            Role::User | Role::Other(_) => ("user", content_blocks(&m.content)?),
        };
        push_turn(&mut turns, role, "content", blocks);
    }
    let inference = present_fields([
        ("maxTokens", params.max_tokens.map(|v| json!(v))),
        ("temperature", params.temperature.map(|v| json!(v))),
        ("topP", params.top_p.map(|v| json!(v))),
        ("stopSequences", params.stop.as_ref().map(|v| json!(v))),
    ]);
    let mut body = Map::new();
    if !system.is_empty() {
        body.insert("system".into(), Value::Array(system));
    }
    body.insert("messages".into(), Value::Array(turns));
    if !inference.is_empty() {
        body.insert("inferenceConfig".into(), Value::Object(inference));
    }
    // Model-specific knobs ride in additionalModelRequestFields.
    let additional: Map<String, Value> = ["top_k", "seed"]
        .iter()
        .filter_map(|k| extra.get(*k).map(|v| ((*k).to_string(), v.clone())))
        .collect();
    if !additional.is_empty() {
        body.insert(
            "additionalModelRequestFields".into(),
            Value::Object(additional),
        );
    }
    if let Some(config) = tool_config(messages, extra)? {
        body.insert("toolConfig".into(), config);
    }
    Ok(Value::Object(body))
}

/// `toolConfig` from OpenAI's tools, tool choice and structured output (a forced tool).
fn tool_config(
    messages: &[ChatMessage],
    extra: &Map<String, Value>,
) -> Result<Option<Value>, ProviderError> {
    let spec = |name: &str, description: Option<&str>, schema: Value| {
        let mut s = Map::new();
        s.insert("name".into(), json!(name));
        if let Some(d) = description.filter(|d| !d.is_empty()) {
            s.insert("description".into(), json!(d));
        }
        s.insert("inputSchema".into(), json!({"json": schema}));
        json!({"toolSpec": s})
    };
    let tools = features::tools(extra)?;
    let mut specs: Vec<Value> = tools
        .into_iter()
        .map(|t| spec(t.name, t.description, t.parameters))
        .collect();
    let mut choice = match features::tool_choice(extra)? {
        None | Some(ToolChoice::Auto) => None,
        // Converse has no "none": the tools stay declared (earlier turns may use them), unforced.
        Some(ToolChoice::None) => None,
        Some(ToolChoice::Required) => Some(json!({"any": {}})),
        Some(ToolChoice::Function(name)) => Some(json!({"tool": {"name": name}})),
    };
    if let Some(format) = features::output_format(extra)? {
        if !specs.is_empty() {
            return Err(ProviderError::Unsupported(
                "provider bedrock cannot combine tools with response_format".into(),
            ));
        }
        specs.push(spec(
            OUTPUT_TOOL,
            Some("Give the answer as this tool's input."),
            format.schema(),
        ));
        choice = Some(json!({"tool": {"name": OUTPUT_TOOL}}));
    }
    if specs.is_empty() {
        // Converse refuses toolUse and toolResult blocks without a toolConfig: a conversation that
        // used tools, continued without them, declares the tools its calls name.
        specs = features::called_tools(messages)
            .into_iter()
            .map(|name| spec(name, None, json!({"type": "object"})))
            .collect();
        if specs.is_empty() {
            return Ok(None);
        }
    }
    let mut config = Map::new();
    config.insert("tools".into(), Value::Array(specs));
    if let Some(c) = choice {
        config.insert("toolChoice".into(), c);
    }
    Ok(Some(Value::Object(config)))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireConverse {
    output: WireOutput,
    stop_reason: Option<String>,
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireOutput {
    message: WireMessage,
}

#[derive(Deserialize)]
struct WireMessage {
    #[serde(default)]
    content: Vec<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireUsage {
    #[serde(default, deserialize_with = "crate::llm::token_count")]
    input_tokens: Option<u64>,
    #[serde(default, deserialize_with = "crate::llm::token_count")]
    output_tokens: Option<u64>,
    #[serde(default, deserialize_with = "crate::llm::token_count")]
    total_tokens: Option<u64>,
    #[serde(default, deserialize_with = "crate::llm::token_count")]
    cache_read_input_tokens: Option<u64>,
    #[serde(default, deserialize_with = "crate::llm::token_count")]
    cache_write_input_tokens: Option<u64>,
}

impl WireUsage {
    /// Converse counts cache reads and writes apart from `inputTokens`; all three are the prompt.
    fn usage(self) -> Usage {
        let input = self.input_tokens.map(|i| {
            i.saturating_add(self.cache_read_input_tokens.unwrap_or(0))
                .saturating_add(self.cache_write_input_tokens.unwrap_or(0))
        });
        let mut usage =
            Usage::new(input, self.output_tokens).with_cached(self.cache_read_input_tokens);
        usage.total_tokens = self.total_tokens.or(usage.total_tokens);
        usage
    }
}

fn parse_embeddings(target: &Target, body: &[u8]) -> Result<LlmResponse, ProviderError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Titan {
        embedding: Vec<f64>,
        #[serde(default, deserialize_with = "crate::llm::token_count")]
        input_text_token_count: Option<u64>,
    }
    #[derive(Deserialize)]
    struct Cohere {
        embeddings: Vec<Vec<f64>>,
    }
    let (data, tokens) = if is_cohere(&target.model) {
        let wire: Cohere = serde_json::from_slice(body).map_err(malformed)?;
        (wire.embeddings, None)
    } else {
        let wire: Titan = serde_json::from_slice(body).map_err(malformed)?;
        (vec![wire.embedding], wire.input_text_token_count)
    };
    Ok(LlmResponse::Embeddings(Embeddings {
        model: target.model.clone(),
        data,
        usage: Usage {
            prompt_tokens: tokens,
            completion_tokens: tokens.map(|_| 0),
            total_tokens: tokens,
            cached_prompt_tokens: None,
        },
    }))
}

/// ConverseStream: event-stream frames whose `:event-type` header names the event.
#[derive(Default)]
struct ConverseStream {
    frames: FrameParser,
    pending: Vec<Frame>,
    /// Tool-use blocks so far: (content block index, tool-call index or `None` for the
    /// structured-output tool, whose input streams as text).
    tool_blocks: Vec<(u64, Option<u32>)>,
    tool_calls: u32,
}

impl ConverseStream {
    fn drain(&mut self, out: &mut Vec<StreamDelta>) -> Result<(), ProviderError> {
        for frame in self.pending.drain(..) {
            match frame.header(":message-type").unwrap_or("event") {
                "event" => {}
                "exception" => {
                    let kind = frame.header(":exception-type").unwrap_or("exception");
                    let message = serde_json::from_slice::<Value>(&frame.payload)
                        .ok()
                        .and_then(|v| {
                            v["message"]
                                .as_str()
                                .or(v["Message"].as_str())
                                .map(str::to_string)
                        })
                        .unwrap_or_default();
                    return Err(ProviderError::Upstream {
                        status: exception_status(kind),
                        message: format!("{kind}: {message}"),
                        retry_after: None,
                    });
                }
                _ => {
                    return Err(ProviderError::Upstream {
                        status: StatusCode::BAD_GATEWAY,
                        message: format!(
                            "{}: {}",
                            frame.header(":error-code").unwrap_or("error"),
                            frame.header(":error-message").unwrap_or_default()
                        ),
                        retry_after: None,
                    });
                }
            }
            let payload: Value = serde_json::from_slice(&frame.payload).map_err(malformed)?;
            match frame.header(":event-type") {
                Some("messageStart") => out.push(StreamDelta {
                    role: payload["role"].as_str().map(Role::parse),
                    ..Default::default()
                }),
                Some("contentBlockStart") => {
                    if let Some(tool) = payload.pointer("/start/toolUse") {
                        let block = payload["contentBlockIndex"].as_u64().unwrap_or_default();
                        if tool["name"] == OUTPUT_TOOL {
                            self.tool_blocks.push((block, None));
                        } else {
                            let call = self.tool_calls;
                            self.tool_calls += 1;
                            self.tool_blocks.push((block, Some(call)));
                            out.push(StreamDelta {
                                tool_calls: vec![ToolCallDelta {
                                    index: call,
                                    id: tool["toolUseId"].as_str().map(str::to_string),
                                    name: tool["name"].as_str().map(str::to_string),
                                    arguments: String::new(),
                                }],
                                ..Default::default()
                            });
                        }
                    }
                }
                Some("contentBlockDelta") => {
                    if let Some(text) = payload.pointer("/delta/text").and_then(Value::as_str) {
                        out.push(StreamDelta {
                            text: Some(text.to_string()),
                            ..Default::default()
                        });
                    } else if let Some(input) = payload
                        .pointer("/delta/toolUse/input")
                        .and_then(Value::as_str)
                    {
                        let block = payload["contentBlockIndex"].as_u64().unwrap_or_default();
                        match self.tool_blocks.iter().find(|(b, _)| *b == block) {
                            Some((_, Some(call))) => out.push(StreamDelta {
                                tool_calls: vec![ToolCallDelta {
                                    index: *call,
                                    arguments: input.to_string(),
                                    ..Default::default()
                                }],
                                ..Default::default()
                            }),
                            Some((_, None)) if !input.is_empty() => out.push(StreamDelta {
                                text: Some(input.to_string()),
                                ..Default::default()
                            }),
                            _ => {}
                        }
                    }
                }
                Some("messageStop") => {
                    let structured = self.tool_calls == 0 && !self.tool_blocks.is_empty();
                    let reason = payload["stopReason"]
                        .as_str()
                        .and_then(normalize_finish_reason)
                        .map(|r| {
                            if structured && r == "tool_calls" {
                                "stop".to_string()
                            } else {
                                r
                            }
                        });
                    // messageStop is the end marker: it always ends the answer, reason or not.
                    out.push(StreamDelta {
                        finish_reason: Some(reason.unwrap_or_else(|| "stop".into())),
                        ..Default::default()
                    });
                }
                Some("metadata") => {
                    if let Ok(u) = serde_json::from_value::<WireUsage>(payload["usage"].clone()) {
                        out.push(StreamDelta {
                            usage: Some(u.usage()),
                            ..Default::default()
                        });
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn exception_status(kind: &str) -> StatusCode {
    match kind {
        "throttlingException" => StatusCode::TOO_MANY_REQUESTS,
        "serviceUnavailableException" => StatusCode::SERVICE_UNAVAILABLE,
        "validationException" => StatusCode::BAD_REQUEST,
        "modelStreamErrorException" => StatusCode::FAILED_DEPENDENCY,
        _ => StatusCode::BAD_GATEWAY,
    }
}

impl StreamDecoder for ConverseStream {
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<StreamDelta>) -> Result<(), ProviderError> {
        self.frames
            .feed(bytes, &mut self.pending)
            .map_err(malformed)?;
        self.drain(out)
    }

    fn finish(&mut self, out: &mut Vec<StreamDelta>) -> Result<(), ProviderError> {
        self.drain(out)?;
        self.frames.finish().map_err(malformed)
    }

    fn set_max_frame(&mut self, max_bytes: usize) {
        self.frames.set_max_frame(max_bytes);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::llm::{ChatRequest, EmbeddingsRequest, StreamOptions};
    use crate::providers::testing::{decode_split, text};
    use crate::providers::{Credentials, SecretValue, join_embeddings, split_inputs};
    use portcullis_sim::encode_frame as encode;
    use proptest::prelude::*;

    fn target(model: &str, token: Option<&str>) -> Target {
        let mut credentials = Credentials::default();
        credentials.insert(ACCESS_KEY_ID, SecretValue::new("AKIDEXAMPLE"));
        credentials.insert(
            SECRET_ACCESS_KEY,
            SecretValue::new("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"),
        );
        if let Some(t) = token {
            credentials.insert(SESSION_TOKEN, SecretValue::new(t));
        }
        Target {
            model: model.into(),
            api_base: crate::providers::info(Provider::Bedrock)
                .default_api_base
                .unwrap_or_default()
                .into(),
            credentials,
            config: [("region".to_string(), "us-west-2".to_string())].into(),
        }
    }

    /// 2015-08-30T12:36:00Z, the date of AWS's SigV4 test suite.
    fn suite_time() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_440_938_160)
    }

    #[test]
    fn signature_matches_the_aws_test_suite_get_vanilla_vector() {
        let mut headers = HeaderMap::new();
        sign_with(
            SigV4 {
                access_key_id: "AKIDEXAMPLE",
                secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                session_token: None,
                region: "us-east-1",
                service: "service",
                time: suite_time(),
            },
            "GET",
            "https://example.amazonaws.com/",
            &mut headers,
            b"",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(headers["x-amz-date"], "20150830T123600Z");
        assert_eq!(
            headers["authorization"],
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
        assert!(headers["authorization"].is_sensitive());
    }

    fn chat(stream: bool) -> LlmRequest {
        let m = |role: &str, text: &str| ChatMessage::from_json(role, json!(text));
        LlmRequest::Chat(ChatRequest {
            messages: vec![m("system", "Be terse."), m("user", "Name a prime.")],
            params: Params {
                max_tokens: Some(50),
                temperature: Some(0.2),
                top_p: Some(0.9),
                stop: Some(vec!["\n\n".into()]),
                n: None,
            },
            stream: StreamOptions {
                stream,
                include_usage: false,
            },
            extra: Map::new(),
        })
    }

    #[test]
    fn converse_request_url_body_and_signed_headers() {
        let t = target("anthropic.claude-3-haiku-20240307-v1:0", Some("FQoG-token"));
        let req =
            build_request_at(&t, &chat(false), suite_time()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            req.url,
            "https://bedrock-runtime.us-west-2.amazonaws.com/model/anthropic.claude-3-haiku-20240307-v1%3A0/converse"
        );
        let body: Value = serde_json::from_slice(&req.body).unwrap_or_default();
        assert_eq!(
            body,
            json!({"system":[{"text":"Be terse."}],"messages":[{"role":"user","content":[{"text":"Name a prime."}]}],
                   "inferenceConfig":{"maxTokens":50,"temperature":0.2,"topP":0.9,"stopSequences":["\n\n"]}})
        );
        let auth = req.headers["authorization"].to_str().unwrap_or_default();
        assert!(auth.starts_with(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-west-2/bedrock/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amz-security-token, Signature="
        ), "{auth}");
        assert_eq!(req.headers["x-amz-security-token"], "FQoG-token");
        assert!(req.headers["x-amz-security-token"].is_sensitive());
        // Same inputs, same signature; another second, another signature.
        let again =
            build_request_at(&t, &chat(false), suite_time()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(again.headers["authorization"], req.headers["authorization"]);
        let later = build_request_at(&t, &chat(false), suite_time() + Duration::from_secs(1))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(later.headers["authorization"], req.headers["authorization"]);
        let stream =
            build_request_at(&t, &chat(true), suite_time()).unwrap_or_else(|e| panic!("{e}"));
        assert!(stream.url.ends_with("/converse-stream"));
    }

    #[test]
    fn titan_takes_one_input_per_call_and_cohere_takes_all() {
        let titan = target("amazon.titan-embed-text-v2:0", None);
        assert_eq!(
            Bedrock.max_inputs_per_call(&titan, RouteType::Embeddings),
            Some(1)
        );
        let request = LlmRequest::Embeddings(EmbeddingsRequest {
            input: vec!["a".into(), "b".into()],
            extra: Map::new(),
        });
        let parts = split_inputs(&request, 1).unwrap_or_default();
        assert_eq!(parts.len(), 2);
        let req =
            build_request_at(&titan, &parts[1], suite_time()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            req.url,
            "https://bedrock-runtime.us-west-2.amazonaws.com/model/amazon.titan-embed-text-v2%3A0/invoke"
        );
        assert_eq!(
            serde_json::from_slice::<Value>(&req.body).unwrap_or_default(),
            json!({"inputText":"b"})
        );
        let answers: Vec<LlmResponse> = [
            br#"{"embedding":[1.0],"inputTextTokenCount":1}"#,
            br#"{"embedding":[2.0],"inputTextTokenCount":2}"#,
        ]
        .iter()
        .map(|b| {
            Bedrock
                .parse_response(&titan, RouteType::Embeddings, *b)
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .collect();
        let Ok(LlmResponse::Embeddings(e)) = join_embeddings(answers) else {
            panic!("embeddings")
        };
        assert_eq!(e.data, vec![vec![1.0], vec![2.0]]);
        assert_eq!(e.usage.prompt_tokens, Some(3));
        let cohere = target("cohere.embed-english-v3", None);
        assert_eq!(
            Bedrock.max_inputs_per_call(&cohere, RouteType::Embeddings),
            None
        );
        let req =
            build_request_at(&cohere, &request, suite_time()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            serde_json::from_slice::<Value>(&req.body).unwrap_or_default(),
            json!({"texts":["a","b"],"input_type":"search_document"})
        );
    }

    #[test]
    fn converse_response_and_errors() {
        let body = br#"{"output":{"message":{"role":"assistant","content":[{"text":"7"}]}},"stopReason":"max_tokens","usage":{"inputTokens":12,"outputTokens":5,"totalTokens":17},"metrics":{"latencyMs":412}}"#;
        let t = target("m", None);
        let Ok(LlmResponse::Generation(g)) = Bedrock.parse_response(&t, RouteType::Chat, body)
        else {
            panic!("generation")
        };
        assert_eq!(g.choices[0].text, "7");
        assert_eq!(g.choices[0].finish_reason.as_deref(), Some("length"));
        assert_eq!(g.usage.total_tokens, Some(17));
        let mut h = HeaderMap::new();
        h.insert(
            "x-amzn-errortype",
            HeaderValue::from_static(
                "ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/",
            ),
        );
        let err = Bedrock.parse_error(
            StatusCode::TOO_MANY_REQUESTS,
            &h,
            br#"{"message":"Too many requests, please wait before trying again."}"#,
        );
        assert!(
            matches!(err, ProviderError::Upstream { ref message, .. } if message == "ThrottlingException: Too many requests, please wait before trying again.")
        );
    }

    fn event(kind: &str, payload: &str) -> Vec<u8> {
        encode(
            &[
                (":event-type", kind),
                (":content-type", "application/json"),
                (":message-type", "event"),
            ],
            payload.as_bytes(),
        )
    }

    fn converse_stream() -> Vec<u8> {
        let mut wire = event("messageStart", r#"{"role":"assistant","p":"abcd"}"#);
        wire.extend(event(
            "contentBlockDelta",
            r#"{"contentBlockIndex":0,"delta":{"text":"Hel"},"p":"ab"}"#,
        ));
        wire.extend(event(
            "contentBlockDelta",
            r#"{"contentBlockIndex":0,"delta":{"text":"lo"},"p":"abcdefg"}"#,
        ));
        wire.extend(event("contentBlockStop", r#"{"contentBlockIndex":0}"#));
        wire.extend(event("messageStop", r#"{"stopReason":"end_turn"}"#));
        wire.extend(event("metadata", r#"{"usage":{"inputTokens":12,"outputTokens":2,"totalTokens":14},"metrics":{"latencyMs":300}}"#));
        wire
    }

    #[test]
    fn converse_stream_is_decoded_event_by_event() {
        let out = decode_split(&Bedrock, RouteType::Chat, &converse_stream(), vec![])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out[0].role.as_ref().map(Role::as_str), Some("assistant"));
        assert_eq!(text(&out), "Hello");
        assert!(
            out.iter()
                .any(|d| d.finish_reason.as_deref() == Some("stop"))
        );
        assert_eq!(
            out.iter().filter_map(|d| d.usage).collect::<Vec<_>>(),
            vec![Usage::new(Some(12), Some(2))]
        );
    }

    #[test]
    fn bad_crc_truncation_and_exceptions_are_errors() {
        let mut wire = converse_stream();
        let at = wire.len() - 10;
        wire[at] ^= 0x20;
        assert!(
            matches!(decode_split(&Bedrock, RouteType::Chat, &wire, vec![]), Err(ProviderError::MalformedResponse(m)) if m.contains("checksum"))
        );
        let wire = converse_stream();
        assert!(matches!(
            decode_split(&Bedrock, RouteType::Chat, &wire[..wire.len() - 3], vec![]),
            Err(ProviderError::MalformedResponse(_))
        ));
        let mut wire = event("messageStart", r#"{"role":"assistant"}"#);
        wire.extend(encode(
            &[
                (":exception-type", "throttlingException"),
                (":content-type", "application/json"),
                (":message-type", "exception"),
            ],
            br#"{"message":"Too many tokens, please wait before trying again."}"#,
        ));
        let err = decode_split(&Bedrock, RouteType::Chat, &wire, vec![]).err();
        assert!(
            matches!(err, Some(ProviderError::Upstream { status, .. }) if status == StatusCode::TOO_MANY_REQUESTS)
        );
    }

    proptest! {
        #[test]
        fn stream_is_the_same_however_it_is_cut(cuts in proptest::collection::vec(0..700usize, 0..12)) {
            let wire = converse_stream();
            let whole = decode_split(&Bedrock, RouteType::Chat, &wire, vec![]);
            prop_assert_eq!(decode_split(&Bedrock, RouteType::Chat, &wire, cuts), whole);
        }
    }

    #[test]
    fn converse_stream_tool_use_becomes_tool_call_fragments() {
        use crate::providers::testing::{finish, tool_calls};
        let mut wire = event("messageStart", r#"{"role":"assistant"}"#);
        wire.extend(event(
            "contentBlockDelta",
            r#"{"contentBlockIndex":0,"delta":{"text":"Sure."}}"#,
        ));
        wire.extend(event("contentBlockStop", r#"{"contentBlockIndex":0}"#));
        wire.extend(event("contentBlockStart", r#"{"contentBlockIndex":1,"start":{"toolUse":{"toolUseId":"tooluse_1","name":"get_weather"}}}"#));
        wire.extend(event(
            "contentBlockDelta",
            r#"{"contentBlockIndex":1,"delta":{"toolUse":{"input":"{\"city\":"}}}"#,
        ));
        wire.extend(event(
            "contentBlockDelta",
            r#"{"contentBlockIndex":1,"delta":{"toolUse":{"input":"\"Paris\"}"}}}"#,
        ));
        wire.extend(event("contentBlockStop", r#"{"contentBlockIndex":1}"#));
        wire.extend(event("messageStop", r#"{"stopReason":"tool_use"}"#));
        wire.extend(event(
            "metadata",
            r#"{"usage":{"inputTokens":3,"outputTokens":4,"totalTokens":7}}"#,
        ));
        let out = decode_split(&Bedrock, RouteType::Chat, &wire, vec![])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(text(&out), "Sure.");
        assert_eq!(
            tool_calls(&out),
            vec![(
                "tooluse_1".into(),
                "get_weather".into(),
                "{\"city\":\"Paris\"}".into()
            )]
        );
        assert_eq!(finish(&out), Some("tool_calls"));
    }

    #[test]
    fn converse_tools_images_and_structured_output() {
        let body_of = |messages: Vec<ChatMessage>, extra: Value| {
            let req = LlmRequest::Chat(ChatRequest {
                messages,
                params: Params::default(),
                stream: StreamOptions::default(),
                extra: extra.as_object().cloned().unwrap_or_default(),
            });
            build_request_at(&target("m", None), &req, UNIX_EPOCH)
                .map(|r| serde_json::from_slice::<Value>(&r.body).unwrap_or_default())
        };
        let msg = |role: &str, content: Value| ChatMessage::from_json(role, content);
        let mut call = msg("assistant", Value::Null);
        call.tool_calls = ToolCall::openai_list(
            json!([{"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]),
        );
        let mut result = msg("tool", json!("42"));
        result.tool_call_id = Some("t1".into());
        let image = msg(
            "user",
            json!([{"type": "text", "text": "see"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}}]),
        );
        let b = body_of(
            vec![image, call, result],
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}], "tool_choice": "required"}),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            b["messages"],
            json!([
                {"role": "user", "content": [{"text": "see"}, {"image": {"format": "png", "source": {"bytes": "iVBO"}}}]},
                {"role": "assistant", "content": [{"toolUse": {"toolUseId": "t1", "name": "f", "input": {"a": 1}}}]},
                {"role": "user", "content": [{"toolResult": {"toolUseId": "t1", "content": [{"text": "42"}]}}]},
            ])
        );
        assert_eq!(
            b["toolConfig"],
            json!({"tools": [{"toolSpec": {"name": "f", "inputSchema": {"json": {"type": "object"}}}}], "toolChoice": {"any": {}}})
        );
        // The same conversation continued without tools still declares the one its call names.
        let mut call = msg("assistant", Value::Null);
        call.tool_calls = ToolCall::openai_list(
            json!([{"id": "t1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]),
        );
        let mut result = msg("tool", json!("42"));
        result.tool_call_id = Some("t1".into());
        let b = body_of(vec![msg("user", json!("go")), call, result], json!({}))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            b["toolConfig"],
            json!({"tools": [{"toolSpec": {"name": "f", "inputSchema": {"json": {"type": "object"}}}}]})
        );
        let https = msg(
            "user",
            json!([{"type": "image_url", "image_url": {"url": "https://img.example/a.png"}}]),
        );
        assert!(
            matches!(body_of(vec![https], json!({})), Err(ProviderError::Unsupported(m)) if m.contains("provider bedrock"))
        );
        let b = body_of(
            vec![msg("user", json!("json please"))],
            json!({"response_format": {"type": "json_object"}}),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            b["toolConfig"]["toolChoice"],
            json!({"tool": {"name": OUTPUT_TOOL}})
        );
        assert_eq!(
            b["toolConfig"]["tools"][0]["toolSpec"]["inputSchema"],
            json!({"json": {"type": "object"}})
        );
        let answer = format!(
            r#"{{"output":{{"message":{{"role":"assistant","content":[{{"toolUse":{{"toolUseId":"x","name":"{OUTPUT_TOOL}","input":{{"ok":true}}}}}}]}}}},"stopReason":"tool_use","usage":{{"inputTokens":1,"outputTokens":1}}}}"#
        );
        let Ok(LlmResponse::Generation(g)) =
            Bedrock.parse_response(&target("m", None), RouteType::Chat, answer.as_bytes())
        else {
            panic!("generation")
        };
        assert_eq!(g.choices[0].text, "{\"ok\":true}");
        assert_eq!(g.choices[0].finish_reason.as_deref(), Some("stop"));
    }

    #[test]
    fn a_converse_stream_without_message_stop_never_finishes() {
        let mut wire = event("messageStart", r#"{"role":"assistant"}"#);
        wire.extend(event(
            "contentBlockDelta",
            r#"{"contentBlockIndex":0,"delta":{"text":"Hi"}}"#,
        ));
        wire.extend(event("contentBlockStop", r#"{"contentBlockIndex":0}"#));
        let out = decode_split(&Bedrock, RouteType::Chat, &wire, vec![])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(crate::providers::testing::finish(&out), None);
        wire.extend(event("messageStop", r#"{}"#));
        let out = decode_split(&Bedrock, RouteType::Chat, &wire, vec![])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(crate::providers::testing::finish(&out), Some("stop"));
    }
}
