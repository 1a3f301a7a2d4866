//! The unified request/response model: every API surface maps into it, every provider maps out of it.
//!
//! Field names follow OpenAI's, the lingua franca of the surfaces; anything a surface does not model
//! explicitly rides along in `extra` so providers that understand it can pass it on.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::api::RouteType;

/// Sampling and length parameters shared by chat and completions.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Params {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
}

/// Who speaks a message. Exhaustive: a role the gateway does not know by name is `Other`, so each
/// translation decides explicitly what it becomes instead of falling through a string match.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    System,
    /// OpenAI's newer name for system instructions; providers without it read it as `System`.
    Developer,
    User,
    Assistant,
    /// A tool's result, answering the assistant call named by `ChatMessage::tool_call_id`.
    Tool,
    /// Any other role the caller named (OpenAI's deprecated `function`, a role to come): passed on
    /// by name to OpenAI-shaped providers, read as a user turn by the others.
    Other(Box<str>),
}

impl Role {
    pub fn parse(name: &str) -> Role {
        match name {
            "system" => Role::System,
            "developer" => Role::Developer,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            other => Role::Other(other.into()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Role::System => "system",
            Role::Developer => "developer",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
            Role::Other(name) => name,
        }
    }

    /// System instructions, whichever name the caller used.
    pub fn is_instructions(&self) -> bool {
        matches!(self, Role::System | Role::Developer)
    }
}

impl Serialize for Role {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Role {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Name;
        impl serde::de::Visitor<'_> for Name {
            type Value = Role;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a role name")
            }
            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Role, E> {
                Ok(Role::parse(name))
            }
        }
        d.deserialize_str(Name)
    }
}

/// A message's content as OpenAI's chat API carries it.
#[derive(Clone, Debug, PartialEq, Default)]
pub enum Content {
    /// `null` or absent: an assistant turn that only calls tools.
    #[default]
    Empty,
    Text(String),
    /// OpenAI's content parts (`text`, `image_url`, ...), kept as sent: each provider reads the
    /// kinds it supports (see `providers::features`).
    Parts(Vec<Value>),
}

impl Content {
    pub fn text(text: impl Into<String>) -> Content {
        Content::Text(text.into())
    }

    /// The text: the string, or the text parts joined. Borrowed for a plain string (the usual
    /// case): no copy per request.
    pub fn as_text(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Content::Text(s) => s.as_str().into(),
            Content::Parts(parts) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("")
                .into(),
            Content::Empty => "".into(),
        }
    }

    pub fn is_empty(&self) -> bool {
        match self {
            Content::Empty => true,
            Content::Text(s) => s.is_empty(),
            Content::Parts(p) => p.is_empty(),
        }
    }

    /// The content from a JSON value; `None` for a value that is no content (a number, an object).
    pub fn from_json(value: Value) -> Option<Content> {
        match value {
            Value::Null => Some(Content::Empty),
            Value::String(s) => Some(Content::Text(s)),
            Value::Array(parts) => Some(Content::Parts(parts)),
            _ => None,
        }
    }
}

impl Serialize for Content {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Content::Empty => s.serialize_none(),
            Content::Text(t) => s.serialize_str(t),
            Content::Parts(p) => p.serialize(s),
        }
    }
}

/// Content compared with its JSON, for tests.
#[cfg(test)]
impl PartialEq<Value> for Content {
    fn eq(&self, other: &Value) -> bool {
        serde_json::to_value(self).is_ok_and(|v| v == *other)
    }
}

/// What kind of tool a call is for; each has its own shape on OpenAI's wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ToolKind {
    /// `{"type": "function", "function": {"name", "arguments"}}`: arguments are a JSON document.
    #[default]
    Function,
    /// `{"type": "custom", "custom": {"name", "input"}}`: free-form input text.
    Custom,
}

/// A tool call the assistant made: in an answer, or in the history of a conversation.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// The arguments as the model wrote them: a JSON document for functions (possibly malformed:
    /// each provider decides what to make of that), free text for custom tools.
    pub arguments: String,
    pub kind: ToolKind,
}

impl ToolCall {
    pub fn function(id: impl Into<String>, name: impl Into<String>, arguments: String) -> Self {
        ToolCall {
            id: id.into(),
            name: name.into(),
            arguments,
            kind: ToolKind::Function,
        }
    }

    /// The arguments as a JSON object, as providers that take structured input want them; `{}`
    /// when they are no object.
    pub fn arguments_object(&self) -> Value {
        serde_json::from_str::<Value>(&self.arguments)
            .ok()
            .filter(Value::is_object)
            .unwrap_or_else(|| Value::Object(Map::new()))
    }

    /// Calls written as OpenAI's JSON list, for tests.
    #[cfg(test)]
    pub fn openai_list(calls: Value) -> Vec<ToolCall> {
        serde_json::from_value(calls).unwrap_or_else(|e| panic!("{e}"))
    }

    /// A call in OpenAI's shape, or what is wrong with it.
    pub fn from_openai(call: &Value) -> Result<ToolCall, &'static str> {
        let id = call.get("id").and_then(Value::as_str).unwrap_or_default();
        let (kind, body, text) = match call.get("type").and_then(Value::as_str) {
            None | Some("function") => (ToolKind::Function, "function", "arguments"),
            Some("custom") => (ToolKind::Custom, "custom", "input"),
            Some(_) => return Err("type must be \"function\" or \"custom\""),
        };
        let body = call
            .get(body)
            .ok_or("needs its function (name and arguments)")?;
        let name = body
            .get("name")
            .and_then(Value::as_str)
            .ok_or("needs a string function name")?;
        let arguments = match body.get(text) {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            // Some clients send the arguments as the object itself.
            Some(v @ Value::Object(_)) => v.to_string(),
            Some(_) => return Err("arguments must be a string"),
        };
        Ok(ToolCall {
            id: id.to_string(),
            name: name.to_string(),
            arguments,
            kind,
        })
    }
}

/// OpenAI's shape, the unified model's wire form.
impl Serialize for ToolCall {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        #[derive(Serialize)]
        struct Function<'a> {
            name: &'a str,
            arguments: &'a str,
        }
        #[derive(Serialize)]
        struct Custom<'a> {
            name: &'a str,
            input: &'a str,
        }
        let mut map = s.serialize_map(Some(3))?;
        map.serialize_entry("id", &self.id)?;
        match self.kind {
            ToolKind::Function => {
                map.serialize_entry("type", "function")?;
                map.serialize_entry(
                    "function",
                    &Function {
                        name: &self.name,
                        arguments: &self.arguments,
                    },
                )?;
            }
            ToolKind::Custom => {
                map.serialize_entry("type", "custom")?;
                map.serialize_entry(
                    "custom",
                    &Custom {
                        name: &self.name,
                        input: &self.arguments,
                    },
                )?;
            }
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for ToolCall {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = Value::deserialize(d)?;
        ToolCall::from_openai(&value).map_err(serde::de::Error::custom)
    }
}

/// `tool_calls` that may be `null` on the wire.
pub fn tool_calls_or_none<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<ToolCall>, D::Error> {
    Ok(Option::<Vec<ToolCall>>::deserialize(d)?.unwrap_or_default())
}

#[derive(Clone, Debug, PartialEq)]
pub struct ChatMessage {
    pub role: Role,
    pub content: Content,
    /// An assistant message's calls.
    pub tool_calls: Vec<ToolCall>,
    /// A tool message's answer to the call with this id.
    pub tool_call_id: Option<String>,
    /// The caller's other fields (`name`, ...), unknown to the gateway, passed on as sent.
    pub extra: Map<String, Value>,
}

impl ChatMessage {
    pub fn new(role: Role, content: Content) -> Self {
        ChatMessage {
            role,
            content,
            tool_calls: Vec::new(),
            tool_call_id: None,
            extra: Map::new(),
        }
    }

    /// A message from its role's name and its content as JSON (anything but text or parts is no
    /// content).
    pub fn from_json(role: &str, content: Value) -> Self {
        ChatMessage::new(
            Role::parse(role),
            Content::from_json(content).unwrap_or_default(),
        )
    }

    /// A message in OpenAI's shape; the error says which field is wrong (`role must be ...`).
    pub fn from_openai(mut m: Map<String, Value>) -> Result<Self, String> {
        let role = match m.remove("role") {
            Some(Value::String(r)) if !r.is_empty() => Role::parse(&r),
            _ => return Err("role must be a non-empty string".into()),
        };
        let content = Content::from_json(m.remove("content").unwrap_or(Value::Null))
            .ok_or("content must be a string or a list of content parts")?;
        let tool_calls = match m.remove("tool_calls") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(calls)) => calls
                .iter()
                .enumerate()
                .map(|(j, c)| ToolCall::from_openai(c).map_err(|e| format!("tool_calls[{j}] {e}")))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err("tool_calls must be a list of tool calls".into()),
        };
        let tool_call_id = match m.remove("tool_call_id") {
            None | Some(Value::Null) => None,
            Some(Value::String(id)) => Some(id),
            Some(_) => return Err("tool_call_id must be a string".into()),
        };
        Ok(ChatMessage {
            role,
            content,
            tool_calls,
            tool_call_id,
            extra: m,
        })
    }

    /// A message written as OpenAI's JSON, for tests.
    #[cfg(test)]
    pub fn openai(message: Value) -> Self {
        match message {
            Value::Object(m) => Self::from_openai(m).unwrap_or_else(|e| panic!("{e}")),
            other => panic!("not a message: {other}"),
        }
    }

    /// A tool's result for the call `id`.
    pub fn tool_result(id: impl Into<String>, text: impl Into<String>) -> Self {
        ChatMessage {
            tool_call_id: Some(id.into()),
            ..ChatMessage::new(Role::Tool, Content::text(text))
        }
    }

    /// The message's text: the string content, or its text parts joined.
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        self.content.as_text()
    }
}

/// OpenAI's shape. The typed fields take their place among `extra`'s in key order, so the bytes
/// are those of the caller's message re-serialised (keys sorted after `role` and `content`).
impl Serialize for ChatMessage {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("role", &self.role)?;
        map.serialize_entry("content", &self.content)?;
        let mut id = self.tool_call_id.as_ref();
        let mut calls = (!self.tool_calls.is_empty()).then_some(&self.tool_calls);
        for (k, v) in &self.extra {
            if let Some(i) = id.filter(|_| k.as_str() > "tool_call_id") {
                map.serialize_entry("tool_call_id", i)?;
                id = None;
            }
            if let Some(c) = calls.filter(|_| k.as_str() > "tool_calls") {
                map.serialize_entry("tool_calls", c)?;
                calls = None;
            }
            map.serialize_entry(k, v)?;
        }
        if let Some(i) = id {
            map.serialize_entry("tool_call_id", i)?;
        }
        if let Some(c) = calls {
            map.serialize_entry("tool_calls", c)?;
        }
        map.end()
    }
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct StreamOptions {
    pub stream: bool,
    /// The caller asked for a final usage chunk (`stream_options.include_usage`).
    pub include_usage: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    pub params: Params,
    pub stream: StreamOptions,
    pub extra: Map<String, Value>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct CompletionsRequest {
    pub prompt: String,
    pub params: Params,
    pub stream: StreamOptions,
    pub extra: Map<String, Value>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct EmbeddingsRequest {
    pub input: Vec<String>,
    pub extra: Map<String, Value>,
}

/// A chat request in the provider's own dialect, sent as is but for `model` (the caller spoke the
/// provider's API and every backend of the Route is that provider): nothing is lost in translation.
#[derive(Clone, Debug, PartialEq)]
pub struct NativeRequest {
    /// Chat for Anthropic Messages; OpenAI's chat, completions or embeddings.
    pub route_type: RouteType,
    /// The caller's body without `model`.
    pub body: Map<String, Value>,
    pub stream: bool,
    pub max_tokens: Option<u32>,
    /// Characters of the prompt as sent, for the up-front token estimate.
    pub prompt_chars: usize,
    /// Provider headers the caller set that the adapter passes on (for example `anthropic-beta`).
    pub headers: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum LlmRequest {
    Chat(ChatRequest),
    Completions(CompletionsRequest),
    Embeddings(EmbeddingsRequest),
    Native(NativeRequest),
}

impl LlmRequest {
    pub fn route_type(&self) -> RouteType {
        match self {
            LlmRequest::Chat(_) => RouteType::Chat,
            LlmRequest::Native(r) => r.route_type,
            LlmRequest::Completions(_) => RouteType::Completions,
            LlmRequest::Embeddings(_) => RouteType::Embeddings,
        }
    }

    pub fn stream(&self) -> StreamOptions {
        match self {
            LlmRequest::Chat(r) => r.stream.clone(),
            LlmRequest::Completions(r) => r.stream.clone(),
            LlmRequest::Embeddings(_) => StreamOptions::default(),
            LlmRequest::Native(r) => StreamOptions {
                stream: r.stream,
                include_usage: true,
            },
        }
    }
}

/// Token counts; a provider may not report all three.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
    pub total_tokens: Option<u64>,
    /// The part of `prompt_tokens` the provider read from its prompt cache (priced lower).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_prompt_tokens: Option<u64>,
}

/// The most tokens one call is taken to have used. Figures from outside are clamped to it, so an
/// absurd report charges a whole budget instead of overflowing (or wrapping into a refund).
pub const MAX_REPORTED_TOKENS: u64 = 1 << 40;

/// A provider's token count, for `#[serde(deserialize_with)]` on usage fields: any JSON number,
/// clamped to `MAX_REPORTED_TOKENS`; a negative number or a non-number is no figure at all (the
/// up-front estimate stands), and never fails the answer it came with.
pub fn token_count<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    let value = <Option<Value> as serde::Deserialize>::deserialize(d)?;
    Ok(value.as_ref().and_then(count_from_json))
}

fn count_from_json(value: &Value) -> Option<u64> {
    if let Some(n) = value.as_u64() {
        return Some(n.min(MAX_REPORTED_TOKENS));
    }
    let f = value.as_f64()?;
    // Saturating float-to-int conversion: 1e308 becomes the maximum.
    (f >= 0.0).then(|| (f.ceil() as u64).min(MAX_REPORTED_TOKENS))
}

impl Usage {
    pub fn new(prompt: Option<u64>, completion: Option<u64>) -> Self {
        let total = match (prompt, completion) {
            (Some(p), Some(c)) => Some(p.saturating_add(c).min(MAX_REPORTED_TOKENS)),
            _ => None,
        };
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: total,
            cached_prompt_tokens: None,
        }
    }

    /// The same counts with `cached` prompt tokens noted (a report without them leaves `None`).
    pub fn with_cached(mut self, cached: Option<u64>) -> Self {
        self.cached_prompt_tokens = cached.map(|c| c.min(MAX_REPORTED_TOKENS));
        self
    }
}

/// One generated alternative: a chat message's text or a completion's text.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    pub index: u32,
    pub text: String,
    /// Normalised: `stop`, `length`, `content_filter`, `tool_calls`, or the provider's own word.
    pub finish_reason: Option<String>,
    /// The chat message's tool calls.
    pub tool_calls: Vec<ToolCall>,
    /// Provider fields of the chat message the gateway does not model (`refusal`, `annotations`).
    pub message_extra: Map<String, Value>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    pub id: String,
    pub created: i64,
    pub model: String,
    pub choices: Vec<Choice>,
    pub usage: Usage,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Embeddings {
    pub model: String,
    /// In request order.
    pub data: Vec<Vec<f64>>,
    pub usage: Usage,
}

/// A provider's answer to a `NativeRequest`, passed back as is.
#[derive(Clone, Debug, PartialEq)]
pub struct NativeAnswer {
    pub body: bytes::Bytes,
    pub usage: Usage,
    /// Characters of generated text, charged when the answer reports no usage.
    pub chars: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub enum LlmResponse {
    Generation(Generation),
    Embeddings(Embeddings),
    Native(NativeAnswer),
}

/// One increment of a streamed answer.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct StreamDelta {
    pub id: Option<String>,
    pub model: Option<String>,
    pub created: Option<i64>,
    pub index: u32,
    pub role: Option<Role>,
    pub text: Option<String>,
    pub finish_reason: Option<String>,
    /// Present on the chunk that reports usage (often the last).
    pub usage: Option<Usage>,
    /// Tool-call fragments, in OpenAI's streaming shape (see `ToolCallDelta`).
    pub tool_calls: Vec<ToolCallDelta>,
    /// On the chunk that reports usage: the call's cost in USD as the gateway prices it
    /// (`x-portcullis-cost-usd`'s value: a decimal, or `unknown`), for the final usage chunk.
    pub cost_usd: Option<String>,
    /// A native stream's event, exactly as the provider sent it (see `NativeRequest`).
    pub raw: Option<bytes::Bytes>,
}

/// A fragment of a streamed tool call. The first fragment of a call carries its `id` and `name`;
/// later ones carry only more `arguments` text (a JSON document split anywhere). `index` numbers the
/// calls of one choice from 0, so fragments of parallel calls can interleave.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct ToolCallDelta {
    pub index: u32,
    pub id: Option<String>,
    pub name: Option<String>,
    pub arguments: String,
}

/// Unix seconds now, for response ids and `created` fields.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}
