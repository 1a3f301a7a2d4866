//! OpenAI's Chat Completions, Completions and Embeddings APIs.

use std::borrow::Cow;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::sse::{SseDecoder, SseEvent, SseHandler, merged};
use super::{
    API_KEY, ProviderAdapter, ProviderError, ProviderInfo, StreamDecoder, Target, UpstreamRequest,
    json_headers, malformed, normalize_finish_reason, post_json,
};
use crate::api::{Provider, RouteType};
use crate::llm::{
    ChatRequest, Choice, CompletionsRequest, Embeddings, EmbeddingsRequest, Generation, LlmRequest,
    LlmResponse, NativeAnswer, NativeRequest, Params, Role, StreamDelta, StreamOptions, ToolCall,
    ToolCallDelta, Usage, unix_now,
};

pub struct OpenAi;

impl ProviderAdapter for OpenAi {
    fn info(&self) -> &'static ProviderInfo {
        &super::info::OPENAI
    }

    fn build_request(
        &self,
        target: &Target,
        request: &LlmRequest,
    ) -> Result<UpstreamRequest, ProviderError> {
        let path = path(request.route_type());
        let mut headers = bearer_headers(target)?;
        for (config_key, header_name) in [
            ("organization", "openai-organization"),
            ("project", "openai-project"),
        ] {
            if let Some(v) = target
                .config
                .get(config_key)
                .and_then(|v| HeaderValue::from_str(v).ok())
            {
                headers.insert(header_name, v);
            }
        }
        let url = [target.api_base.as_str(), path].concat();
        let model = &target.model;
        Ok(match request {
            LlmRequest::Native(request) => {
                post_json(url, headers, &NativeBody::plain(Some(model), request))
            }
            request => post_json(url, headers, &WireRequest { model, request }),
        })
    }

    fn parse_response(
        &self,
        _target: &Target,
        route_type: RouteType,
        body: &[u8],
    ) -> Result<LlmResponse, ProviderError> {
        parse_response(route_type, body)
    }

    fn stream_decoder(&self, route_type: RouteType) -> Box<dyn StreamDecoder> {
        stream_decoder(route_type)
    }
}

/// The API path of a route type's calls; shared with Azure and OpenAI-compatible servers.
pub(super) fn path(route_type: RouteType) -> &'static str {
    match route_type {
        RouteType::Chat => "/chat/completions",
        RouteType::Completions => "/completions",
        RouteType::Embeddings => "/embeddings",
    }
}

/// A native answer, kept as sent, with its usage read. Serde skips the rest without building it.
/// Shared with Azure and OpenAI-compatible servers.
pub(super) fn parse_native(
    route_type: RouteType,
    body: Bytes,
) -> Result<LlmResponse, ProviderError> {
    let wire: NativeUsage = serde_json::from_slice(&body).map_err(malformed)?;
    let usage = wire.usage.map(Usage::from).unwrap_or_default();
    // The text is measured only when the answer does not say what it generated (the cost then
    // falls back to it); embeddings generate none.
    let chars = match (route_type, usage.completion_tokens) {
        (RouteType::Embeddings, _) | (_, Some(_)) => 0,
        _ => native_chars(&body)?,
    };
    Ok(LlmResponse::Native(NativeAnswer { usage, chars, body }))
}

/// A decoder for a native stream; shared with Azure and OpenAI-compatible servers.
pub(super) fn native_stream_decoder(route_type: RouteType) -> Box<dyn StreamDecoder> {
    SseDecoder::boxed(NativeStream {
        counted: OpenAiStream {
            route_type,
            usage: None,
            finished: false,
            calls: Vec::new(),
        },
    })
}

/// The caller's body as it came, but for the backend's `model` and a provider's quirks; a
/// stream also asks for usage (the gateway counts tokens from it), keeping the caller's other
/// stream options.
pub(super) struct NativeBody<'a> {
    /// `None` where the URL names the model (Azure deployments, Databricks serving endpoints).
    pub model: Option<&'a str>,
    pub request: &'a NativeRequest,
    /// Whether the server takes `stream_options`; when not, the caller's are left out too, as
    /// on the translating path (such servers report a stream's usage unasked).
    pub stream_options: bool,
    /// Fields the server spells differently: (OpenAI name, server name).
    pub renames: &'static [(&'static str, &'static str)],
}

impl<'a> NativeBody<'a> {
    /// OpenAI's own body: no quirks.
    pub fn plain(model: Option<&'a str>, request: &'a NativeRequest) -> Self {
        NativeBody {
            model,
            request,
            stream_options: true,
            renames: &[],
        }
    }
}

impl Serialize for NativeBody<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let stream = self.request.stream;
        let mut map = s.serialize_map(None)?;
        for (k, v) in &self.request.body {
            if k == "model" || (k == "stream_options" && (stream || !self.stream_options)) {
                continue;
            }
            let k = self
                .renames
                .iter()
                .find(|(from, _)| from == k)
                .map_or(k.as_str(), |(_, to)| to);
            map.serialize_entry(k, v)?;
        }
        if let Some(model) = self.model {
            map.serialize_entry("model", model)?;
        }
        if stream && self.stream_options {
            let caller = self.request.body.get("stream_options");
            map.serialize_entry(
                "stream_options",
                &WithUsage(caller.and_then(Value::as_object)),
            )?;
        }
        map.end()
    }
}

/// The caller's `stream_options` with `include_usage: true`.
struct WithUsage<'a>(Option<&'a Map<String, Value>>);

impl Serialize for WithUsage<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        for (k, v) in self.0.into_iter().flatten() {
            if k != "include_usage" {
                map.serialize_entry(k, v)?;
            }
        }
        map.serialize_entry("include_usage", &true)?;
        map.end()
    }
}

/// What the gateway reads of a native answer: its usage. Everything else is skipped, not built.
#[derive(Deserialize)]
struct NativeUsage {
    usage: Option<WireUsage>,
}

/// The generated text's length, for an answer without usage.
fn native_chars(body: &[u8]) -> Result<usize, ProviderError> {
    let wire: NativeText = serde_json::from_slice(body).map_err(malformed)?;
    Ok(wire
        .choices
        .iter()
        .map(|c| {
            c.text.as_deref().map_or(0, str::len)
                + c.message.as_ref().map_or(0, |m| {
                    m.content.as_deref().map_or(0, str::len)
                        + m.tool_calls
                            .iter()
                            .map(|t| t.function.arguments.as_deref().map_or(0, str::len))
                            .sum::<usize>()
                })
        })
        .sum())
}

#[derive(Deserialize)]
struct NativeText<'a> {
    #[serde(default, borrow)]
    choices: Vec<NativeChoice<'a>>,
}

#[derive(Deserialize)]
struct NativeChoice<'a> {
    #[serde(borrow)]
    message: Option<NativeMessage<'a>>,
    /// Completions' text.
    #[serde(borrow)]
    text: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct NativeMessage<'a> {
    #[serde(borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    tool_calls: Vec<NativeToolCall<'a>>,
}

#[derive(Deserialize)]
struct NativeToolCall<'a> {
    #[serde(borrow)]
    function: NativeFunction<'a>,
}

#[derive(Deserialize)]
struct NativeFunction<'a> {
    #[serde(borrow)]
    arguments: Option<Cow<'a, str>>,
}

/// A native stream: every event goes on as the provider sent it, in a delta that also carries
/// what the gateway counts, read by the translating decoder. A usage-only chunk (`choices: []`)
/// keeps its usage on its own delta, so the surface can price it, or drop it for a caller that
/// did not ask for usage.
struct NativeStream {
    counted: OpenAiStream,
}

impl SseHandler for NativeStream {
    fn event(&mut self, event: SseEvent, out: &mut Vec<StreamDelta>) -> Result<(), ProviderError> {
        let raw = event.raw();
        let mut parsed = Vec::new();
        self.counted.event(event, &mut parsed)?;
        // A usage-only chunk (`choices: []`) keeps its usage on its own delta.
        let usage = if parsed.is_empty() {
            self.counted.usage.take()
        } else {
            None
        };
        let mut merged = merged(parsed, Some(raw));
        merged.usage = merged.usage.or(usage);
        out.push(merged);
        Ok(())
    }

    fn end(&mut self, out: &mut Vec<StreamDelta>) -> Result<(), ProviderError> {
        // Usage of a stream cut before its end: counted, nothing for the caller.
        self.counted.end(out)
    }
}

/// JSON headers plus `Authorization: Bearer <key>` when the route has a key.
pub(super) fn bearer_headers(target: &Target) -> Result<HeaderMap, ProviderError> {
    let mut headers = json_headers();
    if let Some(key) = target.credentials.secret(API_KEY) {
        let value = key.bearer().ok_or_else(|| {
            ProviderError::Unsupported(
                "the credential holds characters not allowed in a header".into(),
            )
        })?;
        headers.insert(header::AUTHORIZATION, value);
    }
    Ok(headers)
}

/// A decoder for OpenAI's `data: {chunk}` streams; shared with OpenAI-compatible servers.
pub(super) fn stream_decoder(route_type: RouteType) -> Box<dyn StreamDecoder> {
    SseDecoder::boxed(OpenAiStream {
        route_type,
        usage: None,
        finished: false,
        calls: Vec::new(),
    })
}

/// The OpenAI request body for `request` (its path is `path`); shared with Azure and
/// OpenAI-compatible servers.
pub(super) fn request_body(model: &str, request: &LlmRequest) -> Result<Value, ProviderError> {
    Ok(match request {
        LlmRequest::Chat(ChatRequest {
            messages,
            params,
            stream,
            extra,
        }) => {
            let mut body = base_body(model, extra, params, stream);
            body.insert("messages".into(), json!(messages));
            Value::Object(body)
        }
        LlmRequest::Completions(CompletionsRequest {
            prompt,
            params,
            stream,
            extra,
        }) => {
            let mut body = base_body(model, extra, params, stream);
            body.insert("prompt".into(), json!(prompt));
            Value::Object(body)
        }
        LlmRequest::Embeddings(EmbeddingsRequest { input, extra }) => {
            let mut body = extra.clone();
            body.insert("model".into(), json!(model));
            body.insert("input".into(), json!(input));
            Value::Object(body)
        }
        LlmRequest::Native(_) => return Err(super::native_unsupported(Provider::Openai)),
    })
}

/// The same body as `request_body`, serialised straight from the request (no `Value` tree): the
/// hot path. Fields the gateway sets win over the caller's extra fields of the same name.
struct WireRequest<'a> {
    model: &'a str,
    request: &'a LlmRequest,
}

impl Serialize for WireRequest<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let (extra, params, stream) = match self.request {
            LlmRequest::Chat(r) => (&r.extra, Some(&r.params), r.stream.stream),
            LlmRequest::Completions(r) => (&r.extra, Some(&r.params), r.stream.stream),
            LlmRequest::Embeddings(r) => (&r.extra, None, false),
            // Sent as `NativeBody` by `build_request`, never through here.
            LlmRequest::Native(r) => (&r.body, None, false),
        };
        let ours = |k: &str| {
            matches!(k, "model" | "messages" | "prompt" | "input")
                || (stream && matches!(k, "stream" | "stream_options"))
                || params.is_some_and(|p| match k {
                    "temperature" => p.temperature.is_some(),
                    "top_p" => p.top_p.is_some(),
                    "max_tokens" => p.max_tokens.is_some(),
                    "stop" => p.stop.is_some(),
                    "n" => p.n.is_some(),
                    _ => false,
                })
        };
        let mut map = s.serialize_map(None)?;
        for (k, v) in extra.iter().filter(|(k, _)| !ours(k)) {
            map.serialize_entry(k, v)?;
        }
        map.serialize_entry("model", self.model)?;
        if let Some(p) = params {
            if let Some(v) = &p.temperature {
                map.serialize_entry("temperature", v)?;
            }
            if let Some(v) = &p.top_p {
                map.serialize_entry("top_p", v)?;
            }
            if let Some(v) = &p.max_tokens {
                map.serialize_entry("max_tokens", v)?;
            }
            if let Some(v) = &p.stop {
                map.serialize_entry("stop", v)?;
            }
            if let Some(v) = &p.n {
                map.serialize_entry("n", v)?;
            }
        }
        if stream {
            map.serialize_entry("stream", &true)?;
            // Always ask for usage: token accounting needs it even when the caller did not.
            map.serialize_entry(
                "stream_options",
                &IncludeUsage {
                    include_usage: true,
                },
            )?;
        }
        match self.request {
            LlmRequest::Chat(r) => map.serialize_entry("messages", &r.messages)?,
            LlmRequest::Completions(r) => map.serialize_entry("prompt", &r.prompt)?,
            LlmRequest::Embeddings(r) => map.serialize_entry("input", &r.input)?,
            LlmRequest::Native(_) => {}
        }
        map.end()
    }
}

#[derive(Serialize)]
struct IncludeUsage {
    include_usage: bool,
}

fn base_body(
    model: &str,
    extra: &Map<String, Value>,
    params: &Params,
    stream: &StreamOptions,
) -> Map<String, Value> {
    let mut body = extra.clone();
    body.insert("model".into(), json!(model));
    if let Ok(Value::Object(p)) = serde_json::to_value(params) {
        body.extend(p);
    }
    if stream.stream {
        body.insert("stream".into(), json!(true));
        // Always ask for usage: token accounting needs it even when the caller did not.
        body.insert("stream_options".into(), json!({"include_usage": true}));
    }
    body
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default, deserialize_with = "crate::llm::token_count")]
    prompt_tokens: Option<u64>,
    #[serde(default, deserialize_with = "crate::llm::token_count")]
    completion_tokens: Option<u64>,
    #[serde(default, deserialize_with = "crate::llm::token_count")]
    total_tokens: Option<u64>,
    #[serde(default)]
    prompt_tokens_details: Option<PromptTokensDetails>,
}

/// OpenAI's breakdown of the prompt: `cached_tokens` were read from its prompt cache.
#[derive(Deserialize)]
struct PromptTokensDetails {
    #[serde(default, deserialize_with = "crate::llm::token_count")]
    cached_tokens: Option<u64>,
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Self {
        let mut usage = Usage::new(u.prompt_tokens, u.completion_tokens)
            .with_cached(u.prompt_tokens_details.and_then(|d| d.cached_tokens));
        usage.total_tokens = u.total_tokens.or(usage.total_tokens);
        usage
    }
}

#[derive(Deserialize)]
struct WireGeneration {
    #[serde(default)]
    id: String,
    #[serde(default)]
    created: Option<i64>,
    #[serde(default)]
    model: String,
    choices: Choices,
    usage: Option<WireUsage>,
}

/// The answer's choices, converted one by one as they are read: no vector of wire choices.
struct Choices(Vec<Choice>);

impl<'de> Deserialize<'de> for Choices {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Seq;
        impl<'de> serde::de::Visitor<'de> for Seq {
            type Value = Choices;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a list of choices")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Choices, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(1).min(16));
                while let Some(c) = seq.next_element::<WireChoice<'de>>()? {
                    out.push(c.into_choice());
                }
                Ok(Choices(out))
            }
        }
        d.deserialize_seq(Seq)
    }
}

impl WireChoice<'_> {
    fn into_choice(self) -> Choice {
        let (text, tool_calls, message_extra) = match self.message {
            Some(m) => (content_text(m.content), m.tool_calls, m.extra),
            None => (self.text.unwrap_or_default(), Vec::new(), Map::new()),
        };
        Choice {
            index: self.index,
            text,
            finish_reason: self
                .finish_reason
                .as_deref()
                .and_then(normalize_finish_reason),
            tool_calls,
            message_extra,
        }
    }
}

#[derive(Deserialize)]
struct WireChoice<'a> {
    #[serde(default)]
    index: u32,
    message: Option<WireMessage>,
    text: Option<String>,
    /// Borrowed from the body: only its normalised word is kept.
    #[serde(borrow)]
    finish_reason: Option<Cow<'a, str>>,
}

/// An answer's message: `content` (a string, or, from Databricks reasoning models, a list of
/// typed parts) and the fields beyond role/content. Read by hand, not as a struct with a
/// flattened rest: flattening buffers every field twice, and `role` need not be kept at all.
struct WireMessage {
    content: Option<Value>,
    tool_calls: Vec<ToolCall>,
    extra: Map<String, Value>,
}

impl<'de> Deserialize<'de> for WireMessage {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = WireMessage;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a message object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<WireMessage, A::Error> {
                let mut message = WireMessage {
                    content: None,
                    tool_calls: Vec::new(),
                    extra: Map::new(),
                };
                while let Some(key) = map.next_key::<MessageKey>()? {
                    match key {
                        MessageKey::Role => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                        }
                        MessageKey::Content => message.content = map.next_value()?,
                        MessageKey::ToolCalls => {
                            message.tool_calls = map
                                .next_value::<Option<Vec<ToolCall>>>()?
                                .unwrap_or_default();
                        }
                        MessageKey::Other(k) => {
                            message.extra.insert(k, map.next_value()?);
                        }
                    }
                }
                Ok(message)
            }
        }
        d.deserialize_map(Fields)
    }
}

enum MessageKey {
    Role,
    Content,
    ToolCalls,
    Other(String),
}

impl<'de> Deserialize<'de> for MessageKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Key;
        impl serde::de::Visitor<'_> for Key {
            type Value = MessageKey;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: serde::de::Error>(self, k: &str) -> Result<MessageKey, E> {
                Ok(match k {
                    "role" => MessageKey::Role,
                    "content" => MessageKey::Content,
                    "tool_calls" => MessageKey::ToolCalls,
                    other => MessageKey::Other(other.to_owned()),
                })
            }
        }
        d.deserialize_identifier(Key)
    }
}

#[derive(Deserialize)]
struct WireEmbeddings {
    #[serde(default)]
    model: String,
    data: Vec<WireEmbedding>,
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireEmbedding {
    #[serde(default)]
    index: usize,
    embedding: Vec<f64>,
}

/// Parses an OpenAI-shaped answer; shared with OpenAI-compatible servers.
pub(super) fn parse_response(
    route_type: RouteType,
    body: &[u8],
) -> Result<LlmResponse, ProviderError> {
    match route_type {
        RouteType::Embeddings => {
            let mut wire: WireEmbeddings = serde_json::from_slice(body).map_err(malformed)?;
            wire.data.sort_by_key(|e| e.index);
            Ok(LlmResponse::Embeddings(Embeddings {
                model: wire.model,
                data: wire.data.into_iter().map(|e| e.embedding).collect(),
                usage: wire.usage.map(Usage::from).unwrap_or_default(),
            }))
        }
        RouteType::Chat | RouteType::Completions => {
            let wire: WireGeneration = serde_json::from_slice(body).map_err(malformed)?;
            let choices = wire.choices.0;
            Ok(LlmResponse::Generation(Generation {
                id: wire.id,
                created: wire.created.unwrap_or_else(unix_now),
                model: wire.model,
                choices,
                usage: wire.usage.map(Usage::from).unwrap_or_default(),
            }))
        }
    }
}

/// Text of a message `content`: the string, or the `text` parts of a list (reasoning parts skipped).
fn content_text(content: Option<Value>) -> String {
    match content {
        Some(Value::String(s)) => s,
        Some(Value::Array(parts)) => parts
            .iter()
            .filter(|p| p.get("type").and_then(Value::as_str).unwrap_or("text") == "text")
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

struct OpenAiStream {
    route_type: RouteType,
    /// Reported once at the end: some servers repeat a cumulative usage on every chunk.
    usage: Option<Usage>,
    /// A finish reason arrived.
    finished: bool,
    /// The tool calls started so far: (choice index, call index).
    calls: Vec<(u32, u32)>,
}

#[derive(Deserialize)]
struct WireChunk {
    id: Option<String>,
    model: Option<String>,
    created: Option<i64>,
    #[serde(default)]
    choices: Vec<WireChunkChoice>,
    usage: Option<WireUsage>,
    /// Groq reports stream usage here.
    x_groq: Option<WireGroq>,
    error: Option<Value>,
}

#[derive(Deserialize)]
struct WireGroq {
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireChunkChoice {
    #[serde(default)]
    index: u32,
    delta: Option<WireDelta>,
    text: Option<String>,
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireDelta {
    role: Option<Role>,
    content: Option<Value>,
    #[serde(default)]
    tool_calls: Option<Vec<WireToolCallDelta>>,
}

#[derive(Deserialize)]
struct WireToolCallDelta {
    /// Some compatible servers (Mistral) send whole calls without an index: their position counts.
    index: Option<u32>,
    id: Option<String>,
    function: Option<WireFunctionDelta>,
}

#[derive(Deserialize)]
struct WireFunctionDelta {
    name: Option<String>,
    /// A fragment of the JSON text; a few servers send the whole arguments as an object.
    arguments: Option<Value>,
}

impl WireToolCallDelta {
    fn into_delta(self, position: usize) -> ToolCallDelta {
        let (name, arguments) = match self.function {
            Some(f) => (
                f.name,
                match f.arguments {
                    Some(Value::String(s)) => s,
                    Some(Value::Null) | None => String::new(),
                    Some(other) => other.to_string(),
                },
            ),
            None => (None, String::new()),
        };
        ToolCallDelta {
            index: self.index.unwrap_or(position as u32),
            id: self.id.filter(|s| !s.is_empty()),
            name: name.filter(|s| !s.is_empty()),
            arguments,
        }
    }
}

impl OpenAiStream {
    /// One fragment in the unified shape whatever the server's habits: the first fragment of a
    /// call names it (an id is made up for servers that send none), later ones never repeat it.
    fn tool_call(&mut self, choice: u32, mut call: ToolCallDelta) -> ToolCallDelta {
        if self.calls.contains(&(choice, call.index)) {
            call.id = None;
            call.name = None;
        } else {
            self.calls.push((choice, call.index));
            if call.id.is_none() {
                call.id = Some(format!("call_{choice}_{}", call.index));
            }
        }
        call
    }

    fn flush_usage(&mut self, out: &mut Vec<StreamDelta>) {
        if let Some(usage) = self.usage.take() {
            out.push(StreamDelta {
                usage: Some(usage),
                ..Default::default()
            });
        }
    }
}

impl SseHandler for OpenAiStream {
    fn event(&mut self, event: SseEvent, out: &mut Vec<StreamDelta>) -> Result<(), ProviderError> {
        if event.data == "[DONE]" {
            // `[DONE]` ends the answer even from a server that sent no finish reason.
            if !self.finished {
                self.finished = true;
                out.push(StreamDelta {
                    finish_reason: Some("stop".into()),
                    ..Default::default()
                });
            }
            self.flush_usage(out);
            return Ok(());
        }
        let chunk: WireChunk = serde_json::from_str(&event.data).map_err(malformed)?;
        if let Some(err) = chunk.error {
            let message = err
                .get("message")
                .and_then(Value::as_str)
                .or(err.as_str())
                .unwrap_or("upstream stream error");
            return Err(ProviderError::Upstream {
                status: StatusCode::BAD_GATEWAY,
                message: message.to_string(),
                retry_after: None,
            });
        }
        if let Some(u) = chunk.usage.or(chunk.x_groq.and_then(|g| g.usage)) {
            self.usage = Some(u.into());
        }
        for c in chunk.choices {
            let (role, text, tool_calls) = match (self.route_type, c.delta) {
                (RouteType::Chat, Some(d)) => (
                    d.role,
                    d.content.map(|v| content_text(Some(v))),
                    d.tool_calls
                        .unwrap_or_default()
                        .into_iter()
                        .enumerate()
                        .map(|(i, t)| self.tool_call(c.index, t.into_delta(i)))
                        .collect(),
                ),
                _ => (None, c.text, Vec::new()),
            };
            let finish_reason = c.finish_reason.as_deref().and_then(normalize_finish_reason);
            self.finished |= finish_reason.is_some();
            if role.is_none()
                && text.as_deref().is_none_or(str::is_empty)
                && finish_reason.is_none()
                && tool_calls.is_empty()
            {
                continue;
            }
            out.push(StreamDelta {
                raw: None,
                id: chunk.id.clone(),
                model: chunk.model.clone(),
                created: chunk.created,
                index: c.index,
                role,
                text,
                finish_reason,
                usage: None,
                tool_calls,
                cost_usd: None,
            });
        }
        Ok(())
    }

    fn end(&mut self, out: &mut Vec<StreamDelta>) -> Result<(), ProviderError> {
        self.flush_usage(out);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::ChatMessage;
    use crate::providers::{Credentials, SecretValue};

    fn target() -> Target {
        let mut credentials = Credentials::default();
        credentials.insert(API_KEY, SecretValue::new("sk-test"));
        Target {
            model: "gpt-4o-mini".into(),
            api_base: "http://upstream/v1".into(),
            credentials,
            config: Default::default(),
        }
    }

    fn chat(stream: bool) -> LlmRequest {
        let mut extra = Map::new();
        extra.insert("user".into(), json!("u1"));
        LlmRequest::Chat(ChatRequest {
            messages: vec![ChatMessage::from_json("user", json!("hi"))],
            params: Params {
                temperature: Some(0.5),
                max_tokens: Some(10),
                ..Default::default()
            },
            stream: StreamOptions {
                stream,
                include_usage: false,
            },
            extra,
        })
    }

    #[test]
    fn chat_request_carries_model_key_params_and_extras() {
        let req = OpenAi
            .build_request(&target(), &chat(false))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(req.url, "http://upstream/v1/chat/completions");
        assert_eq!(req.headers[header::AUTHORIZATION], "Bearer sk-test");
        let body: Value = serde_json::from_slice(&req.body).unwrap_or_default();
        assert_eq!(
            body,
            json!({"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"temperature":0.5,"max_tokens":10,"user":"u1"})
        );
    }

    #[test]
    fn streaming_request_always_asks_for_usage() {
        let req = OpenAi
            .build_request(&target(), &chat(true))
            .unwrap_or_else(|e| panic!("{e}"));
        let body: Value = serde_json::from_slice(&req.body).unwrap_or_default();
        assert_eq!(body["stream"], json!(true));
        assert_eq!(body["stream_options"], json!({"include_usage": true}));
    }

    #[test]
    fn parses_chat_completion() {
        let body = br#"{"id":"c1","object":"chat.completion","created":7,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#;
        let LlmResponse::Generation(g) = OpenAi
            .parse_response(&target(), RouteType::Chat, body)
            .unwrap_or_else(|e| panic!("{e}"))
        else {
            panic!("not a generation")
        };
        assert_eq!(g.choices[0].text, "hello");
        assert_eq!(g.choices[0].finish_reason.as_deref(), Some("stop"));
        assert_eq!(
            g.usage,
            Usage {
                prompt_tokens: Some(3),
                completion_tokens: Some(1),
                total_tokens: Some(4),
                cached_prompt_tokens: None,
            }
        );
    }

    #[test]
    fn cached_prompt_tokens_are_read_from_the_usage_details() {
        let body = br#"{"id":"c1","model":"gpt-4o","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":2006,"completion_tokens":300,"total_tokens":2306,"prompt_tokens_details":{"cached_tokens":1920}}}"#;
        let LlmResponse::Generation(g) = OpenAi
            .parse_response(&target(), RouteType::Chat, body)
            .unwrap_or_else(|e| panic!("{e}"))
        else {
            panic!("not a generation")
        };
        assert_eq!(g.usage.prompt_tokens, Some(2006));
        assert_eq!(g.usage.cached_prompt_tokens, Some(1920));
    }

    #[test]
    fn malformed_body_is_reported_as_such() {
        let err = OpenAi
            .parse_response(&target(), RouteType::Chat, b"<html>")
            .err();
        assert!(matches!(err, Some(ProviderError::MalformedResponse(_))));
    }

    #[test]
    fn error_keeps_status_message_and_retry_after() {
        let mut headers = HeaderMap::new();
        headers.insert(header::RETRY_AFTER, HeaderValue::from_static("7"));
        let err = OpenAi.parse_error(
            StatusCode::TOO_MANY_REQUESTS,
            &headers,
            br#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#,
        );
        assert_eq!(
            err,
            ProviderError::Upstream {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: "Rate limit reached".into(),
                retry_after: Some(7)
            }
        );
    }

    #[test]
    fn stream_decoder_yields_deltas_and_usage() {
        let mut d = OpenAi.stream_decoder(RouteType::Chat);
        let mut out = Vec::new();
        let wire = b"data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"He\"}}]}\n\ndata: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"llo\"},\"finish_reason\":\"stop\"}]}\n\ndata: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":2,\"total_tokens\":4}}\n\ndata: [DONE]\n\n";
        for piece in wire.chunks(5) {
            d.feed(piece, &mut out).unwrap_or_else(|e| panic!("{e}"));
        }
        d.finish(&mut out).unwrap_or_else(|e| panic!("{e}"));
        let text: String = out.iter().filter_map(|d| d.text.clone()).collect();
        assert_eq!(text, "Hello");
        assert_eq!(
            out.last()
                .and_then(|d| d.usage)
                .and_then(|u| u.total_tokens),
            Some(4)
        );
    }

    fn decode(wire: &str) -> Vec<StreamDelta> {
        crate::providers::testing::decode_split(&OpenAi, RouteType::Chat, wire.as_bytes(), vec![])
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn streamed_tool_calls_keep_ids_indexes_and_argument_fragments() {
        use crate::providers::testing::{finish, tool_calls};
        let chunk = |delta: Value, finish: Value| {
            format!(
                "data: {}\n\n",
                json!({"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            )
        };
        let wire = [
            chunk(json!({"role": "assistant", "content": null}), Value::Null),
            chunk(json!({"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}), Value::Null),
            chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}), Value::Null),
            chunk(json!({"tool_calls": [{"index": 1, "id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]}), Value::Null),
            chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}), Value::Null),
            chunk(json!({}), json!("tool_calls")),
            "data: [DONE]\n\n".to_string(),
        ]
        .concat();
        let out = decode(&wire);
        assert_eq!(
            tool_calls(&out),
            vec![
                (
                    "call_a".into(),
                    "get_weather".into(),
                    "{\"city\":\"Paris\"}".into()
                ),
                ("call_b".into(), "get_time".into(), "{}".into()),
            ]
        );
        assert_eq!(finish(&out), Some("tool_calls"));
        // Servers that repeat the id on every fragment, or never send one.
        let wire = [
            chunk(json!({"tool_calls": [{"index": 0, "id": "r", "function": {"name": "f", "arguments": "{"}}]}), Value::Null),
            chunk(json!({"tool_calls": [{"index": 0, "id": "r", "function": {"name": "f", "arguments": "}"}}]}), Value::Null),
            chunk(json!({"tool_calls": [{"index": 1, "function": {"name": "g", "arguments": "{}"}}]}), json!("tool_calls")),
        ]
        .concat();
        let out = decode(&wire);
        assert_eq!(
            tool_calls(&out),
            vec![
                ("r".into(), "f".into(), "{}".into()),
                ("call_0_1".into(), "g".into(), "{}".into()),
            ]
        );
        let later: Vec<&ToolCallDelta> = out
            .iter()
            .flat_map(|d| &d.tool_calls)
            .skip(1)
            .take(1)
            .collect();
        assert_eq!(later[0].id, None);
        // Mistral sends each call whole, without an index.
        let whole = chunk(
            json!({"tool_calls": [{"id": "m1", "function": {"name": "f", "arguments": "{\"a\":1}"}}, {"id": "m2", "function": {"name": "g", "arguments": "{}"}}]}),
            json!("tool_calls"),
        );
        let out = decode(&whole);
        assert_eq!(
            tool_calls(&out),
            vec![
                ("m1".into(), "f".into(), "{\"a\":1}".into()),
                ("m2".into(), "g".into(), "{}".into()),
            ]
        );
    }

    #[test]
    fn done_ends_a_stream_and_its_absence_is_no_end() {
        use crate::providers::testing::finish;
        let text =
            "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}]}\n\n";
        assert_eq!(
            finish(&decode(&format!("{text}data: [DONE]\n\n"))),
            Some("stop")
        );
        assert_eq!(finish(&decode(text)), None);
    }

    fn native(stream: bool, extra: Value) -> LlmRequest {
        let Value::Object(mut body) = json!({
            "messages": [{"role": "user", "content": "hi"}],
            "stream": stream,
            "reasoning_effort": "low",
            "a_parameter_of_tomorrow": {"x": [1, 2]},
        }) else {
            unreachable!()
        };
        if let Value::Object(more) = extra {
            body.extend(more);
        }
        LlmRequest::Native(NativeRequest {
            route_type: RouteType::Chat,
            body,
            stream,
            max_tokens: None,
            prompt_chars: 2,
            headers: Vec::new(),
        })
    }

    #[test]
    fn a_native_body_is_the_callers_but_for_model_and_a_streams_usage_request() {
        let plain = OpenAi
            .build_request(&target(), &native(false, json!({})))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(plain.url.ends_with("/chat/completions"));
        let sent: Value = serde_json::from_slice(&plain.body).unwrap_or_default();
        assert_eq!(sent["model"], "gpt-4o-mini");
        assert_eq!(sent["a_parameter_of_tomorrow"], json!({"x": [1, 2]}));
        assert_eq!(sent["reasoning_effort"], "low");
        assert!(sent.get("stream_options").is_none());
        assert_eq!(plain.headers["authorization"], "Bearer sk-test");

        let streamed = OpenAi
            .build_request(
                &target(),
                &native(
                    true,
                    json!({"stream_options": {"include_obfuscation": false}}),
                ),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        let sent: Value = serde_json::from_slice(&streamed.body).unwrap_or_default();
        assert_eq!(
            sent["stream_options"],
            json!({"include_obfuscation": false, "include_usage": true})
        );
    }

    #[test]
    fn a_native_answer_is_kept_as_sent_and_its_usage_read() {
        let body = Bytes::from_static(br#"{"id":"chatcmpl-1","object":"chat.completion","system_fingerprint":"fp","choices":[{"index":0,"message":{"role":"assistant","content":"Hello","refusal":null,"tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{}"}}]},"finish_reason":"stop"}],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#);
        let Ok(LlmResponse::Native(answer)) = OpenAi.parse_native(RouteType::Chat, body.clone())
        else {
            panic!("not a native answer")
        };
        assert_eq!(answer.body, body);
        assert_eq!(answer.usage.completion_tokens, Some(4));
        // Without usage, the text is what the call is charged for.
        let bare = Bytes::from_static(br#"{"choices":[{"message":{"content":"Hello","tool_calls":[{"function":{"name":"f","arguments":"{}"}}]}}]}"#);
        let Ok(LlmResponse::Native(answer)) = OpenAi.parse_native(RouteType::Chat, bare) else {
            panic!("not a native answer")
        };
        assert_eq!(answer.chars, "Hello".len() + "{}".len());
    }

    #[test]
    fn a_native_stream_passes_every_event_and_keeps_usage_on_its_own_chunk() {
        let wire: &[u8] = b"data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"He\"}}]}\n\ndata: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"llo\"},\"finish_reason\":\"stop\"}]}\n\ndata: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":2,\"total_tokens\":4}}\n\ndata: [DONE]\n\n";
        // However the bytes are cut, the events come out as they went in.
        for cut in [1, 5, 64, wire.len()] {
            let mut d = OpenAi
                .native_stream_decoder(RouteType::Chat)
                .unwrap_or_else(|| panic!("no native decoder"));
            let mut out = Vec::new();
            for piece in wire.chunks(cut) {
                d.feed(piece, &mut out).unwrap_or_else(|e| panic!("{e}"));
            }
            d.finish(&mut out).unwrap_or_else(|e| panic!("{e}"));
            let raw: Vec<u8> = out.iter().filter_map(|d| d.raw.clone()).flatten().collect();
            assert_eq!(raw, wire);
            let text: String = out.iter().filter_map(|d| d.text.clone()).collect();
            assert_eq!(text, "Hello");
            let with_usage: Vec<_> = out.iter().filter(|d| d.usage.is_some()).collect();
            assert_eq!(with_usage.len(), 1);
            assert!(with_usage[0].text.is_none() && with_usage[0].finish_reason.is_none());
            assert_eq!(
                with_usage[0].usage.and_then(|u| u.completion_tokens),
                Some(2)
            );
        }
    }
}
