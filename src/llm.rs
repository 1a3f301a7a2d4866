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

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    /// A string, or OpenAI's list of content parts; `null` for some assistant tool-call turns.
    #[serde(default)]
    pub content: Value,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl ChatMessage {
    /// The message's text: the string content, or its text parts joined.
    /// Borrowed when the content is a plain string (the usual case): no copy per request.
    pub fn text(&self) -> std::borrow::Cow<'_, str> {
        match &self.content {
            Value::String(s) => s.as_str().into(),
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join("")
                .into(),
            _ => "".into(),
        }
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
            LlmRequest::Chat(_) | LlmRequest::Native(_) => RouteType::Chat,
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
    /// Provider fields of the chat message beyond role/content (for example `tool_calls`).
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
    pub role: Option<String>,
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
