//! Google Gemini (Developer API): generateContent, streamGenerateContent with `alt=sse`,
//! embedContent and batchEmbedContents. The key travels in `x-goog-api-key`, never in the URL.

use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::features::{self, Image, OutputFormat, ToolChoice};
use super::sse::{SseDecoder, SseEvent, SseHandler, SseParser};
use super::{
    API_KEY, ProviderAdapter, ProviderError, ProviderInfo, StreamDecoder, Target, UpstreamRequest,
    error_message, insert_secret, json_headers, malformed, normalize_finish_reason, path_segment,
    post_json, present_fields, push_turn, upstream_error,
};
use crate::api::{Provider, RouteType};
use crate::llm::{
    ChatMessage, Choice, Content, Embeddings, Generation, LlmRequest, LlmResponse, Params, Role,
    StreamDelta, ToolCall, ToolCallDelta, Usage, unix_now,
};

pub struct Gemini;

impl ProviderAdapter for Gemini {
    fn info(&self) -> &'static ProviderInfo {
        &super::info::GEMINI
    }

    fn build_request(
        &self,
        target: &Target,
        request: &LlmRequest,
    ) -> Result<UpstreamRequest, ProviderError> {
        let version = target
            .config
            .get("apiVersion")
            .map(String::as_str)
            .unwrap_or("v1beta");
        let model = target.model.trim_start_matches("models/");
        let base = format!(
            "{}/{}/models/{}",
            target.api_base,
            path_segment(version)?,
            path_segment(model)?
        );
        let (url, body) = match request {
            LlmRequest::Chat(c) => {
                generate(&base, &c.messages, &c.params, c.stream.stream, &c.extra)?
            }
            LlmRequest::Completions(c) => {
                let prompt = ChatMessage::from_json("user", json!(c.prompt));
                generate(&base, &[prompt], &c.params, c.stream.stream, &c.extra)?
            }
            LlmRequest::Native(_) => return Err(super::native_unsupported(Provider::Gemini)),
            LlmRequest::Embeddings(e) => {
                let task = e
                    .extra
                    .get("task_type")
                    .cloned()
                    .or_else(|| target.config.get("taskType").map(|t| json!(t)));
                let dims = e.extra.get("dimensions").cloned();
                let entry = |text: &str| {
                    let mut req = Map::new();
                    req.insert("model".into(), json!(format!("models/{model}")));
                    req.insert("content".into(), json!({"parts": [{"text": text}]}));
                    if let Some(t) = &task {
                        req.insert("taskType".into(), t.clone());
                    }
                    if let Some(d) = &dims {
                        req.insert("outputDimensionality".into(), d.clone());
                    }
                    req
                };
                match e.input.as_slice() {
                    [one] => {
                        let mut req = entry(one);
                        req.remove("model");
                        (format!("{base}:embedContent"), Value::Object(req))
                    }
                    many => (
                        format!("{base}:batchEmbedContents"),
                        json!({"requests": many.iter().map(|t| Value::Object(entry(t))).collect::<Vec<_>>()}),
                    ),
                }
            }
        };
        let mut headers = json_headers();
        if let Some(key) = target.credentials.get(API_KEY) {
            insert_secret(&mut headers, "x-goog-api-key", key)?;
        }
        Ok(post_json(url, headers, &body))
    }

    fn parse_response(
        &self,
        _target: &Target,
        route_type: RouteType,
        body: &[u8],
    ) -> Result<LlmResponse, ProviderError> {
        if route_type == RouteType::Embeddings {
            let wire: WireEmbeddings = serde_json::from_slice(body).map_err(malformed)?;
            let data = match (wire.embedding, wire.embeddings) {
                (Some(one), _) => vec![one.values],
                (None, Some(many)) => many.into_iter().map(|e| e.values).collect(),
                (None, None) => return Err(malformed("no embedding in the answer")),
            };
            return Ok(LlmResponse::Embeddings(Embeddings {
                model: String::new(),
                data,
                usage: Usage::default(),
            }));
        }
        let wire: WireResponse = serde_json::from_slice(body).map_err(malformed)?;
        let mut choices: Vec<Choice> = wire
            .candidates
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (text, calls) = candidate_parts(c);
                Choice {
                    index: c.index.unwrap_or(i as u32),
                    text,
                    finish_reason: finish_reason(c),
                    tool_calls: calls,
                    message_extra: Map::new(),
                }
            })
            .collect();
        if choices.is_empty() && wire.prompt_feedback.is_some() {
            choices.push(Choice {
                index: 0,
                text: String::new(),
                finish_reason: Some("content_filter".into()),
                tool_calls: Vec::new(),
                message_extra: Map::new(),
            });
        }
        Ok(LlmResponse::Generation(Generation {
            id: wire.response_id.unwrap_or_default(),
            created: unix_now(),
            model: wire.model_version.unwrap_or_default(),
            choices,
            usage: wire
                .usage_metadata
                .map(WireUsage::usage)
                .unwrap_or_default(),
        }))
    }

    fn parse_error(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> ProviderError {
        let mut err = upstream_error(status, headers, error_message(body), body);
        // Gemini says how long to wait in the body (RetryInfo), not always in a header.
        if let ProviderError::Upstream { retry_after, .. } = &mut err
            && retry_after.is_none()
        {
            *retry_after = retry_delay(body);
        }
        err
    }

    fn stream_decoder(&self, _route_type: RouteType) -> Box<dyn StreamDecoder> {
        SseDecoder::with_parser(SseParser::with_bare_json(), GeminiStream::default())
    }
}

/// A message's text and image parts as Gemini parts.
fn content_parts(content: &Content) -> Result<Vec<Value>, ProviderError> {
    let mut parts = Vec::new();
    match content {
        Content::Text(s) => parts.push(json!({"text": s})),
        Content::Parts(items) => {
            for p in items {
                match features::image(p)? {
                    Some(Image::Inline { media_type, data }) => {
                        parts.push(json!({"inlineData": {"mimeType": media_type, "data": data}}));
                    }
                    Some(Image::Url(url)) => {
                        let mut file = Map::new();
                        if let Some(mime) = image_mime_from_url(url) {
                            file.insert("mimeType".into(), json!(mime));
                        }
                        file.insert("fileUri".into(), json!(url));
                        parts.push(json!({"fileData": file}));
                    }
                    None => {
                        if let Some(t) = p.get("text").and_then(Value::as_str) {
                            parts.push(json!({"text": t}));
                        }
                    }
                }
            }
        }
        _ => {}
    }
    Ok(parts)
}

/// Gemini wants a media type with `fileData`; a URL's extension is the only hint the gateway has.
fn image_mime_from_url(url: &str) -> Option<&'static str> {
    let path = url.split(['?', '#']).next().unwrap_or_default();
    let ext = path.rsplit_once('.')?.1.to_ascii_lowercase();
    Some(match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "heic" => "image/heic",
        "heif" => "image/heif",
        _ => return None,
    })
}

/// Where a JSON Schema goes: Gemini's `Schema` field (`parameters`, `responseSchema`) takes a
/// subset of OpenAPI 3.0 and refuses other keywords (`additionalProperties`, `$ref`, type lists,
/// ...); a schema beyond that subset goes in the `...JsonSchema` twin, which takes JSON Schema.
fn schema_field(field: &'static str, schema: &Value) -> String {
    if openapi_subset(schema) {
        field.to_string()
    } else {
        format!("{}JsonSchema", field.trim_end_matches("Schema"))
    }
}

fn openapi_subset(schema: &Value) -> bool {
    const KEYWORDS: &[&str] = &[
        "type",
        "format",
        "title",
        "description",
        "nullable",
        "enum",
        "maxItems",
        "minItems",
        "properties",
        "required",
        "minProperties",
        "maxProperties",
        "minLength",
        "maxLength",
        "pattern",
        "example",
        "anyOf",
        "propertyOrdering",
        "default",
        "items",
        "minimum",
        "maximum",
    ];
    let Value::Object(fields) = schema else {
        return false;
    };
    fields.iter().all(|(k, v)| match k.as_str() {
        "type" => v.is_string(),
        "properties" => v
            .as_object()
            .is_some_and(|p| p.values().all(openapi_subset)),
        "items" => openapi_subset(v),
        "anyOf" => v.as_array().is_some_and(|a| a.iter().all(openapi_subset)),
        other => KEYWORDS.contains(&other),
    })
}

/// An OpenAI tool message as a `functionResponse` part: Gemini keys results by function name.
fn function_response(m: &ChatMessage, messages: &[ChatMessage]) -> Value {
    let id = m.tool_call_id.as_deref().unwrap_or_default();
    let name = m
        .extra
        .get("name")
        .and_then(Value::as_str)
        .or_else(|| features::tool_name_for(messages, id))
        .unwrap_or(id);
    let text = m.text();
    // `response` must be an object: a JSON object result goes as is, anything else is wrapped.
    let response = serde_json::from_str::<Value>(&text)
        .ok()
        .filter(Value::is_object)
        .unwrap_or_else(|| json!({"content": text}));
    json!({"functionResponse": {"name": name, "response": response}})
}

fn generate(
    base: &str,
    messages: &[ChatMessage],
    params: &Params,
    stream: bool,
    extra: &Map<String, Value>,
) -> Result<(String, Value), ProviderError> {
    let mut system = Vec::new();
    let mut contents: Vec<Value> = Vec::new();
    for m in messages {
        let (role, parts) = match &m.role {
            Role::System | Role::Developer => {
                system.push(json!({"text": m.text()}));
                continue;
            }
            Role::Tool => ("user", vec![function_response(m, messages)]),
            Role::Assistant => {
                let mut parts = content_parts(&m.content)?;
                parts.retain(|p| p.get("text").is_none_or(|t| t != ""));
                for call in &m.tool_calls {
                    let mut part = json!({"functionCall": {"name": call.name, "args": call.arguments_object()}});
                    if let Some(sig) = signature_from_id(&call.id) {
                        part["thoughtSignature"] = json!(sig);
                    }
                    parts.push(part);
                }
                ("model", parts)
            }
            Role::User | Role::Other(_) => ("user", content_parts(&m.content)?),
        };
        push_turn(&mut contents, role, "parts", parts);
    }
    let format = features::output_format(extra)?;
    let mut config = present_fields([
        ("temperature", params.temperature.map(|v| json!(v))),
        ("topP", params.top_p.map(|v| json!(v))),
        ("maxOutputTokens", params.max_tokens.map(|v| json!(v))),
        ("stopSequences", params.stop.as_ref().map(|v| json!(v))),
        ("candidateCount", params.n.map(|v| json!(v))),
        ("seed", extra.get("seed").cloned()),
        ("presencePenalty", extra.get("presence_penalty").cloned()),
        ("frequencyPenalty", extra.get("frequency_penalty").cloned()),
        ("topK", extra.get("top_k").cloned()),
        (
            "responseMimeType",
            format.as_ref().map(|_| json!("application/json")),
        ),
    ]);
    if let Some(OutputFormat::JsonSchema { schema, .. }) = &format {
        config.insert(schema_field("responseSchema", schema), schema.clone());
    }
    let mut body = Map::new();
    if !system.is_empty() {
        body.insert("systemInstruction".into(), json!({"parts": system}));
    }
    body.insert("contents".into(), Value::Array(contents));
    if !config.is_empty() {
        body.insert("generationConfig".into(), Value::Object(config));
    }
    let tools = features::tools(extra)?;
    if !tools.is_empty() {
        let declarations: Vec<Value> = tools
            .iter()
            .map(|t| {
                let mut d = Map::new();
                d.insert("name".into(), json!(t.name));
                if let Some(desc) = t.description {
                    d.insert("description".into(), json!(desc));
                }
                d.insert(
                    schema_field("parameters", &t.parameters),
                    t.parameters.clone(),
                );
                Value::Object(d)
            })
            .collect();
        body.insert(
            "tools".into(),
            json!([{"functionDeclarations": declarations}]),
        );
    }
    let calling = match features::tool_choice(extra)? {
        None => None,
        Some(ToolChoice::Auto) => Some(json!({"mode": "AUTO"})),
        Some(ToolChoice::None) => Some(json!({"mode": "NONE"})),
        Some(ToolChoice::Required) => Some(json!({"mode": "ANY"})),
        Some(ToolChoice::Function(name)) => {
            Some(json!({"mode": "ANY", "allowedFunctionNames": [name]}))
        }
    };
    if let Some(c) = calling.filter(|_| !tools.is_empty()) {
        body.insert("toolConfig".into(), json!({"functionCallingConfig": c}));
    }
    if let Some(s) = extra.get("safetySettings") {
        body.insert("safetySettings".into(), s.clone());
    }
    let url = if stream {
        format!("{base}:streamGenerateContent?alt=sse")
    } else {
        format!("{base}:generateContent")
    };
    Ok((url, Value::Object(body)))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct WireResponse {
    #[serde(default)]
    candidates: Vec<WireCandidate>,
    prompt_feedback: Option<Value>,
    usage_metadata: Option<WireUsage>,
    model_version: Option<String>,
    response_id: Option<String>,
    error: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireCandidate {
    content: Option<WireContent>,
    finish_reason: Option<String>,
    index: Option<u32>,
}

#[derive(Deserialize)]
struct WireContent {
    #[serde(default)]
    parts: Vec<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireUsage {
    #[serde(default, deserialize_with = "crate::llm::token_count")]
    prompt_token_count: Option<u64>,
    #[serde(default, deserialize_with = "crate::llm::token_count")]
    candidates_token_count: Option<u64>,
    #[serde(default, deserialize_with = "crate::llm::token_count")]
    total_token_count: Option<u64>,
    #[serde(default, deserialize_with = "crate::llm::token_count")]
    thoughts_token_count: Option<u64>,
    #[serde(default, deserialize_with = "crate::llm::token_count")]
    tool_use_prompt_token_count: Option<u64>,
    #[serde(default, deserialize_with = "crate::llm::token_count")]
    cached_content_token_count: Option<u64>,
}

impl WireUsage {
    fn usage(self) -> Usage {
        let add = |a: Option<u64>, b: Option<u64>| a.map(|a| a.saturating_add(b.unwrap_or(0)));
        let mut usage = Usage::new(
            add(self.prompt_token_count, self.tool_use_prompt_token_count),
            add(self.candidates_token_count, self.thoughts_token_count),
        )
        .with_cached(self.cached_content_token_count);
        usage.total_tokens = self.total_token_count.or(usage.total_tokens);
        usage
    }
}

#[derive(Deserialize)]
struct WireEmbeddings {
    embedding: Option<WireValues>,
    embeddings: Option<Vec<WireValues>>,
}

#[derive(Deserialize)]
struct WireValues {
    values: Vec<f64>,
}

/// A candidate's text (thought summaries skipped) and its function calls as OpenAI tool calls.
fn candidate_parts(c: &WireCandidate) -> (String, Vec<ToolCall>) {
    let mut text = String::new();
    let mut calls = Vec::new();
    for part in c.content.iter().flat_map(|c| &c.parts) {
        if part["thought"] == true {
            continue;
        }
        if let Some(t) = part["text"].as_str() {
            text.push_str(t);
        }
        if let Some(call) = part.get("functionCall") {
            calls.push(ToolCall::function(
                call_id(part, calls.len()),
                call["name"].as_str().unwrap_or_default(),
                call.get("args").cloned().unwrap_or(json!({})).to_string(),
            ));
        }
    }
    (text, calls)
}

/// A function call's own id when Gemini gives one, else one numbered within its candidate.
///
/// A part's `thoughtSignature` rides in the id, base64url-encoded after `SIGNATURE`: thinking
/// models want it back with the call in the next request, and the id is the one thing every
/// client returns untouched (the gateway keeps no state between calls).
fn call_id(part: &Value, n: usize) -> String {
    let id = part
        .pointer("/functionCall/id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map_or_else(|| format!("call_{n}"), str::to_string);
    match part["thoughtSignature"].as_str().and_then(signature_to_id) {
        Some(sig) => format!("{id}{SIGNATURE}{sig}"),
        None => id,
    }
}

/// Where a thought signature starts in a tool call id.
const SIGNATURE: &str = "_ts_";

/// A base64 signature in id-safe characters (`[A-Za-z0-9_-]`); `None` if it is not base64.
fn signature_to_id(sig: &str) -> Option<String> {
    let body = sig.trim_end_matches('=');
    body.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'-' | b'_'))
        .then(|| body.replace('+', "-").replace('/', "_"))
}

/// The thought signature carried in a tool call id, back in base64.
fn signature_from_id(id: &str) -> Option<String> {
    let (_, sig) = id.split_once(SIGNATURE)?;
    let mut out = sig.replace('-', "+").replace('_', "/");
    while out.len() % 4 != 0 {
        out.push('=');
    }
    Some(out)
}

/// Gemini has no tool finish reason: a function call ends with STOP.
fn finish_reason(c: &WireCandidate) -> Option<String> {
    let has_call = c
        .content
        .iter()
        .flat_map(|c| &c.parts)
        .any(|p| p.get("functionCall").is_some());
    let reason = c
        .finish_reason
        .as_deref()
        .and_then(normalize_finish_reason)?;
    Some(if has_call && reason == "stop" {
        "tool_calls".into()
    } else {
        reason
    })
}

/// `RetryInfo.retryDelay` ("38s") from a google.rpc.Status body.
fn retry_delay(body: &[u8]) -> Option<u64> {
    let v: Value = serde_json::from_slice(body).ok()?;
    v.pointer("/error/details")?
        .as_array()?
        .iter()
        .find_map(|d| d["retryDelay"].as_str())?
        .trim_end_matches('s')
        .parse::<f64>()
        .ok()
        .and_then(super::retry_secs)
}

/// Each event is a whole GenerateContentResponse with the new parts; no terminator.
#[derive(Default)]
struct GeminiStream {
    started: Vec<u32>,
    usage: Option<Usage>,
    /// Function calls so far per candidate: Gemini sends each call whole, in any chunk, and ends
    /// the candidate with STOP, which is `tool_calls` once a call was made.
    calls: Vec<(u32, u32)>,
}

impl SseHandler for GeminiStream {
    fn event(&mut self, event: SseEvent, out: &mut Vec<StreamDelta>) -> Result<(), ProviderError> {
        let wire: WireResponse = serde_json::from_str(&event.data).map_err(malformed)?;
        if let Some(err) = wire.error {
            return Err(ProviderError::Upstream {
                status: err["code"]
                    .as_u64()
                    .and_then(|c| u16::try_from(c).ok())
                    .and_then(|c| StatusCode::from_u16(c).ok())
                    .unwrap_or(StatusCode::BAD_GATEWAY),
                message: err["message"]
                    .as_str()
                    .unwrap_or("upstream stream error")
                    .to_string(),
                retry_after: None,
            });
        }
        if let Some(u) = wire.usage_metadata {
            self.usage = Some(u.usage());
        }
        if wire.candidates.is_empty() && wire.prompt_feedback.is_some() {
            out.push(StreamDelta {
                finish_reason: Some("content_filter".into()),
                ..Default::default()
            });
        }
        for (i, c) in wire.candidates.iter().enumerate() {
            let index = c.index.unwrap_or(i as u32);
            let role = (!self.started.contains(&index)).then(|| {
                self.started.push(index);
                Role::Assistant
            });
            let (text, _) = candidate_parts(c);
            let before = self
                .calls
                .iter()
                .find(|(i, _)| *i == index)
                .map_or(0, |(_, n)| *n);
            let tool_calls: Vec<ToolCallDelta> = c
                .content
                .iter()
                .flat_map(|c| &c.parts)
                .filter_map(|p| Some((p, p.get("functionCall")?)))
                .enumerate()
                .map(|(k, (part, call))| {
                    let n = before + k as u32;
                    ToolCallDelta {
                        index: n,
                        id: Some(call_id(part, n as usize)),
                        name: call["name"].as_str().map(str::to_string),
                        arguments: call.get("args").cloned().unwrap_or(json!({})).to_string(),
                    }
                })
                .collect();
            let made = before + tool_calls.len() as u32;
            match self.calls.iter_mut().find(|(i, _)| *i == index) {
                Some(entry) => entry.1 = made,
                None => self.calls.push((index, made)),
            }
            let finish_reason = finish_reason(c).map(|r| {
                if made > 0 && r == "stop" {
                    "tool_calls".to_string()
                } else {
                    r
                }
            });
            out.push(StreamDelta {
                id: wire.response_id.clone(),
                model: wire.model_version.clone(),
                index,
                role,
                text: Some(text).filter(|t| !t.is_empty()),
                finish_reason,
                tool_calls,
                ..Default::default()
            });
        }
        Ok(())
    }

    fn end(&mut self, out: &mut Vec<StreamDelta>) -> Result<(), ProviderError> {
        if let Some(usage) = self.usage.take() {
            out.push(StreamDelta {
                usage: Some(usage),
                ..Default::default()
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::{ChatRequest, EmbeddingsRequest, StreamOptions};
    use crate::providers::testing::{decode_split, text};
    use crate::providers::{Credentials, SecretValue};
    use proptest::prelude::*;

    fn target() -> Target {
        let mut credentials = Credentials::default();
        credentials.insert(API_KEY, SecretValue::new("AIza-key"));
        Target {
            model: "gemini-2.5-flash".into(),
            api_base: "https://generativelanguage.googleapis.com".into(),
            credentials,
            config: Default::default(),
        }
    }

    fn chat(stream: bool, n: Option<u32>) -> LlmRequest {
        let m = |role: &str, text: &str| ChatMessage::from_json(role, json!(text));
        LlmRequest::Chat(ChatRequest {
            messages: vec![
                m("system", "Be terse."),
                m("user", "Name a prime."),
                m("assistant", "7"),
                m("user", "Another."),
            ],
            params: Params {
                temperature: Some(0.2),
                top_p: Some(0.9),
                max_tokens: Some(50),
                stop: Some(vec!["\n\n".into()]),
                n,
            },
            stream: StreamOptions {
                stream,
                include_usage: false,
            },
            extra: Map::new(),
        })
    }

    fn body(req: &UpstreamRequest) -> Value {
        serde_json::from_slice(&req.body).unwrap_or_default()
    }

    #[test]
    fn chat_request_url_header_and_body() {
        let req = Gemini
            .build_request(&target(), &chat(false, Some(2)))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            req.url,
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent"
        );
        assert!(!req.url.contains("key="));
        assert_eq!(req.headers["x-goog-api-key"], "AIza-key");
        assert!(req.headers["x-goog-api-key"].is_sensitive());
        assert_eq!(
            body(&req),
            json!({"systemInstruction":{"parts":[{"text":"Be terse."}]},
                   "contents":[{"role":"user","parts":[{"text":"Name a prime."}]},{"role":"model","parts":[{"text":"7"}]},{"role":"user","parts":[{"text":"Another."}]}],
                   "generationConfig":{"temperature":0.2,"topP":0.9,"maxOutputTokens":50,"stopSequences":["\n\n"],"candidateCount":2}})
        );
        let req = Gemini
            .build_request(&target(), &chat(true, None))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            req.url,
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
        );
    }

    #[test]
    fn embeddings_use_embed_content_for_one_and_batch_for_many() {
        let emb = |input: &[&str]| {
            LlmRequest::Embeddings(EmbeddingsRequest {
                input: input.iter().map(|s| s.to_string()).collect(),
                extra: Map::new(),
            })
        };
        let req = Gemini
            .build_request(&target(), &emb(&["a"]))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            req.url
                .ends_with("/v1beta/models/gemini-2.5-flash:embedContent")
        );
        assert_eq!(body(&req), json!({"content":{"parts":[{"text":"a"}]}}));
        let req = Gemini
            .build_request(&target(), &emb(&["a", "b"]))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(req.url.ends_with(":batchEmbedContents"));
        assert_eq!(
            body(&req),
            json!({"requests":[{"model":"models/gemini-2.5-flash","content":{"parts":[{"text":"a"}]}},{"model":"models/gemini-2.5-flash","content":{"parts":[{"text":"b"}]}}]})
        );
        let Ok(LlmResponse::Embeddings(e)) = Gemini.parse_response(
            &target(),
            RouteType::Embeddings,
            br#"{"embeddings":[{"values":[1.0]},{"values":[2.0]}]}"#,
        ) else {
            panic!("embeddings")
        };
        assert_eq!(e.data, vec![vec![1.0], vec![2.0]]);
    }

    #[test]
    fn response_candidates_usage_tool_calls_and_blocked_prompts() {
        let body = br#"{"candidates":[{"content":{"role":"model","parts":[{"text":"hm","thought":true},{"text":"7"}]},"finishReason":"STOP","index":0},{"content":{"role":"model","parts":[{"functionCall":{"name":"f","args":{"a":1}}}]},"finishReason":"STOP","index":1},{"finishReason":"SAFETY","index":2}],"usageMetadata":{"promptTokenCount":8,"candidatesTokenCount":1,"totalTokenCount":30,"thoughtsTokenCount":21},"modelVersion":"gemini-2.5-flash","responseId":"abc"}"#;
        let Ok(LlmResponse::Generation(g)) =
            Gemini.parse_response(&target(), RouteType::Chat, body)
        else {
            panic!("generation")
        };
        assert_eq!(g.choices[0].text, "7");
        assert_eq!(g.choices[0].finish_reason.as_deref(), Some("stop"));
        assert_eq!(g.choices[1].finish_reason.as_deref(), Some("tool_calls"));
        assert_eq!(g.choices[1].tool_calls[0].arguments, "{\"a\":1}");
        assert_eq!(
            g.choices[2].finish_reason.as_deref(),
            Some("content_filter")
        );
        assert_eq!(g.usage.prompt_tokens, Some(8));
        assert_eq!(g.usage.completion_tokens, Some(22));
        assert_eq!(g.usage.total_tokens, Some(30));
        let blocked = br#"{"promptFeedback":{"blockReason":"SAFETY"}}"#;
        let Ok(LlmResponse::Generation(g)) =
            Gemini.parse_response(&target(), RouteType::Chat, blocked)
        else {
            panic!("generation")
        };
        assert_eq!(
            g.choices[0].finish_reason.as_deref(),
            Some("content_filter")
        );
    }

    #[test]
    fn quota_error_takes_retry_delay_from_the_body() {
        let err = Gemini.parse_error(
            StatusCode::TOO_MANY_REQUESTS,
            &HeaderMap::new(),
            br#"{"error":{"code":429,"message":"You exceeded your current quota","status":"RESOURCE_EXHAUSTED","details":[{"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"38s"}]}}"#,
        );
        assert_eq!(
            err,
            ProviderError::Upstream {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: "You exceeded your current quota".into(),
                retry_after: Some(38)
            }
        );
    }

    const STREAM: &str = "data: {\"candidates\":[{\"content\":{\"role\":\"model\",\"parts\":[{\"text\":\"Hel\"}]},\"index\":0}],\"usageMetadata\":{\"promptTokenCount\":8},\"modelVersion\":\"gemini-2.5-flash\",\"responseId\":\"r1\"}\r\n\r\ndata: {\"candidates\":[{\"content\":{\"role\":\"model\",\"parts\":[{\"text\":\"lo\"}]},\"finishReason\":\"MAX_TOKENS\",\"index\":0}],\"usageMetadata\":{\"promptTokenCount\":8,\"candidatesTokenCount\":2,\"totalTokenCount\":10},\"modelVersion\":\"gemini-2.5-flash\",\"responseId\":\"r1\"}\r\n\r\n";

    #[test]
    fn stream_ends_cleanly_at_close_with_last_usage() {
        let out = decode_split(&Gemini, RouteType::Chat, STREAM.as_bytes(), vec![])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(text(&out), "Hello");
        assert_eq!(out[0].role.as_ref().map(Role::as_str), Some("assistant"));
        assert_eq!(out[1].finish_reason.as_deref(), Some("length"));
        assert_eq!(
            out.iter().filter_map(|d| d.usage).collect::<Vec<_>>(),
            vec![Usage::new(Some(8), Some(2))]
        );
    }

    #[test]
    fn bare_json_error_after_200_is_a_stream_error() {
        let wire = format!(
            "{STREAM}{{\n  \"error\": {{\n    \"code\": 503,\n    \"message\": \"The model is overloaded.\",\n    \"status\": \"UNAVAILABLE\"\n  }}\n}}\n"
        );
        for cut in [0, STREAM.len() + 3, wire.len() - 2] {
            let err = decode_split(&Gemini, RouteType::Chat, wire.as_bytes(), vec![cut]).err();
            assert_eq!(
                err,
                Some(ProviderError::Upstream {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    message: "The model is overloaded.".into(),
                    retry_after: None
                })
            );
        }
    }

    proptest! {
        #[test]
        fn stream_is_the_same_however_it_is_cut(cuts in proptest::collection::vec(0..STREAM.len(), 0..8)) {
            let whole = decode_split(&Gemini, RouteType::Chat, STREAM.as_bytes(), vec![]);
            prop_assert_eq!(decode_split(&Gemini, RouteType::Chat, STREAM.as_bytes(), cuts), whole);
        }
    }

    #[test]
    fn tools_tool_turns_images_and_structured_output_are_translated() {
        let mut call = ChatMessage::from_json("assistant", Value::Null);
        call.tool_calls = ToolCall::openai_list(
            json!([{"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]),
        );
        let mut result = ChatMessage::from_json("tool", json!("{\"temp\": 21}"));
        result.tool_call_id = Some("call_0".into());
        let user = ChatMessage::from_json(
            "user",
            json!([{"type": "text", "text": "Weather here?"}, {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}}, {"type": "image_url", "image_url": {"url": "https://img.example/map.png?x=1"}}]),
        );
        let extra = json!({
            "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object", "properties": {"temp": {"type": "number"}}}}},
        });
        let req = LlmRequest::Chat(ChatRequest {
            messages: vec![user, call, result],
            params: Params::default(),
            stream: StreamOptions::default(),
            extra: extra.as_object().cloned().unwrap_or_default(),
        });
        let b = body(
            &Gemini
                .build_request(&target(), &req)
                .unwrap_or_else(|e| panic!("{e}")),
        );
        assert_eq!(
            b["contents"],
            json!([
                {"role": "user", "parts": [{"text": "Weather here?"}, {"inlineData": {"mimeType": "image/jpeg", "data": "/9j/4AAQ"}}, {"fileData": {"mimeType": "image/png", "fileUri": "https://img.example/map.png?x=1"}}]},
                {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]},
                {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp": 21}}}]},
            ])
        );
        assert_eq!(
            b["tools"],
            json!([{"functionDeclarations": [{"name": "get_weather", "description": "Weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]}])
        );
        assert_eq!(
            b["toolConfig"],
            json!({"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}})
        );
        assert_eq!(
            b["generationConfig"]["responseMimeType"],
            "application/json"
        );
        assert_eq!(
            b["generationConfig"]["responseSchema"],
            json!({"type": "object", "properties": {"temp": {"type": "number"}}})
        );
    }

    #[test]
    fn thought_signatures_ride_in_call_ids_and_go_back_with_the_call() {
        use crate::providers::testing::tool_calls;
        let sig = "CiQB0e2Kb+/x9Q==";
        let wire = format!(
            "data: {}\r\n\r\n",
            json!({"candidates": [{"content": {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {"a": 1}}, "thoughtSignature": sig}]}, "finishReason": "STOP", "index": 0}]})
        );
        let out = decode_split(&Gemini, RouteType::Chat, wire.as_bytes(), vec![])
            .unwrap_or_else(|e| panic!("{e}"));
        let calls = tool_calls(&out);
        let id = calls[0].0.clone();
        assert_eq!(id, "call_0_ts_CiQB0e2Kb-_x9Q");
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        );
        let mut call = ChatMessage::from_json("assistant", Value::Null);
        call.tool_calls = ToolCall::openai_list(
            json!([{"id": id, "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]),
        );
        let req = LlmRequest::Chat(ChatRequest {
            messages: vec![call],
            params: Params::default(),
            stream: StreamOptions::default(),
            extra: Map::new(),
        });
        let b = body(
            &Gemini
                .build_request(&target(), &req)
                .unwrap_or_else(|e| panic!("{e}")),
        );
        assert_eq!(
            b["contents"][0]["parts"][0],
            json!({"functionCall": {"name": "f", "args": {"a": 1}}, "thoughtSignature": sig})
        );
        // Without a signature the id stays short.
        let plain = json!({"functionCall": {"name": "f"}});
        assert_eq!(call_id(&plain, 3), "call_3");
    }

    #[test]
    fn schemas_beyond_gemini_openapi_subset_go_as_json_schema() {
        let strict = json!({"type": "object", "properties": {"a": {"type": ["string", "null"]}}, "additionalProperties": false});
        let plain = json!({"type": "object", "properties": {"a": {"type": "string", "enum": ["x"]}, "b": {"type": "array", "items": {"type": "integer"}}}, "required": ["a"]});
        assert_eq!(schema_field("parameters", &plain), "parameters");
        assert_eq!(schema_field("parameters", &strict), "parametersJsonSchema");
        assert_eq!(schema_field("responseSchema", &plain), "responseSchema");
        assert_eq!(
            schema_field("responseSchema", &strict),
            "responseJsonSchema"
        );
    }

    #[test]
    fn streamed_function_calls_are_whole_fragments_and_finish_as_tool_calls() {
        use crate::providers::testing::{finish, tool_calls};
        let wire = concat!(
            "data: {\"candidates\":[{\"content\":{\"role\":\"model\",\"parts\":[{\"text\":\"Let me check.\"}]},\"index\":0}]}\r\n\r\n",
            "data: {\"candidates\":[{\"content\":{\"role\":\"model\",\"parts\":[{\"functionCall\":{\"name\":\"get_weather\",\"args\":{\"city\":\"Paris\"}}}]},\"index\":0}]}\r\n\r\n",
            "data: {\"candidates\":[{\"content\":{\"role\":\"model\",\"parts\":[{\"functionCall\":{\"name\":\"get_time\",\"args\":{}}}]},\"finishReason\":\"STOP\",\"index\":0}],\"usageMetadata\":{\"promptTokenCount\":5,\"candidatesTokenCount\":7}}\r\n\r\n",
        );
        let out = decode_split(&Gemini, RouteType::Chat, wire.as_bytes(), vec![])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            tool_calls(&out),
            vec![
                (
                    "call_0".into(),
                    "get_weather".into(),
                    "{\"city\":\"Paris\"}".into()
                ),
                ("call_1".into(), "get_time".into(), "{}".into()),
            ]
        );
        assert_eq!(finish(&out), Some("tool_calls"));
        // No finishReason: the stream never finished.
        let cut = wire.rfind("data:").unwrap_or_default();
        let out = decode_split(&Gemini, RouteType::Chat, &wire.as_bytes()[..cut], vec![])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(finish(&out), None);
    }
}
