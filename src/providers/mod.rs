//! Provider adapters: pure translations between the unified model and one provider's wire format.
//!
//! Adapters do no I/O. The data plane sends what `build_request` returns with its shared HTTP client
//! and hands the answer back to `parse_response`, `parse_error` or a `StreamDecoder`.

mod anthropic;
/// Anthropic's Messages wire format, read and written by the adapter and by the Messages surface.
pub use anthropic::wire as anthropic_wire;
mod azure;
mod bedrock;
mod cohere;
mod compat;
mod credentials;
mod eventstream;
mod features;
mod gemini;
mod info;
mod mlflow;
mod openai;
pub mod sse;
pub use bedrock::DEFAULT_REGION as BEDROCK_DEFAULT_REGION;
mod tgi;

use std::collections::BTreeMap;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};

pub use credentials::{Credentials, SecretValue};
pub use info::{ProviderInfo, Wire, info};

use crate::api::{Provider, RouteType};
use crate::llm::{
    Embeddings, EmbeddingsRequest, LlmRequest, LlmResponse, Params, StreamDelta, Usage,
};

/// Where and as whom a route calls its provider: everything an adapter needs besides the request.
#[derive(Clone, Debug)]
pub struct Target {
    /// The provider's model (or deployment) name.
    pub model: String,
    /// Base URL without a trailing slash.
    pub api_base: String,
    pub credentials: Credentials,
    pub config: BTreeMap<String, String>,
}

/// A ready-to-send upstream HTTP request.
#[derive(Debug)]
pub struct UpstreamRequest {
    pub method: Method,
    pub url: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Which Secret keys an adapter reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialKeys {
    /// One API key, read from `secretRef.key`; `required: false` for servers that may run without one.
    ApiKey { required: bool },
    /// An API key from `secretRef.key` or, instead, one of `alternatives` (held under its own name),
    /// for providers with a second kind of credential such as Azure's Entra ID token.
    ApiKeyOr {
        alternatives: &'static [&'static str],
    },
    /// Fixed, well-known keys (for example AWS access keys).
    Named {
        required: &'static [&'static str],
        optional: &'static [&'static str],
    },
}

/// The name under which a single API key is held in `Credentials`.
pub const API_KEY: &str = "apiKey";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProviderError {
    /// The request asks for something this provider cannot do (a caller error: 400).
    #[error("{0}")]
    Unsupported(String),
    /// The provider answered with a body that does not follow its documented format.
    #[error("upstream returned a malformed response: {0}")]
    MalformedResponse(String),
    /// The provider answered with an error status.
    #[error("{message}")]
    Upstream {
        status: StatusCode,
        message: String,
        retry_after: Option<u64>,
    },
}

/// One provider's wire format.
pub trait ProviderAdapter: Send + Sync + 'static {
    /// The provider's fixed facts (`info.rs`).
    fn info(&self) -> &'static ProviderInfo;
    fn build_request(
        &self,
        target: &Target,
        request: &LlmRequest,
    ) -> Result<UpstreamRequest, ProviderError>;
    fn parse_response(
        &self,
        target: &Target,
        route_type: RouteType,
        body: &[u8],
    ) -> Result<LlmResponse, ProviderError>;
    /// Maps a non-success answer; `retry_after` comes from the response headers when present.
    /// The default reads the common JSON error shapes (see `error_message`).
    fn parse_error(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> ProviderError {
        upstream_error(status, headers, error_message(body), body)
    }
    /// A fresh incremental parser for one streamed answer.
    fn stream_decoder(&self, route_type: RouteType) -> Box<dyn StreamDecoder>;
    /// How many embeddings inputs one upstream call takes, when the provider limits it (Titan: one).
    /// The data plane then sends one call per batch and joins the answers in order.
    fn max_inputs_per_call(&self, _target: &Target, _route_type: RouteType) -> Option<usize> {
        None
    }
    /// The answer to a `NativeRequest`, kept as is; only providers whose `info().wire` is set
    /// take native requests, and read the answer for its usage (OpenAI's by default).
    fn parse_native(
        &self,
        route_type: RouteType,
        body: Bytes,
    ) -> Result<LlmResponse, ProviderError> {
        match self.info().wire {
            Some(Wire::OpenAi) => openai::parse_native(route_type, body),
            _ => Err(native_unsupported(self.info().provider)),
        }
    }
    /// A decoder for a native stream: each provider event as a delta whose `raw` holds it, with
    /// the text and usage the gateway counts (OpenAI's by default).
    fn native_stream_decoder(&self, route_type: RouteType) -> Option<Box<dyn StreamDecoder>> {
        match self.info().wire {
            Some(Wire::OpenAi) => Some(openai::native_stream_decoder(route_type)),
            _ => None,
        }
    }
}

/// The refusal of a `NativeRequest` by a provider that does not speak its dialect (surfaces send
/// native requests only to Routes whose backends all do).
pub fn native_unsupported(provider: Provider) -> ProviderError {
    ProviderError::Unsupported(format!("provider {provider} takes no native requests"))
}

/// Incremental parser of a provider's streaming framing; bytes may be split anywhere.
pub trait StreamDecoder: Send {
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<StreamDelta>) -> Result<(), ProviderError>;
    /// The provider closed the stream; flush anything complete that is still buffered.
    fn finish(&mut self, out: &mut Vec<StreamDelta>) -> Result<(), ProviderError>;
    /// Largest single event (SSE event, line, frame) to buffer; a larger one fails the stream.
    /// Decoders start at `sse::DEFAULT_MAX_FRAME`.
    fn set_max_frame(&mut self, max_bytes: usize);
}

/// The adapter for `provider`, or `None` while this gateway does not speak it yet.
pub fn adapter_for(provider: Provider) -> Option<&'static dyn ProviderAdapter> {
    Some(match provider {
        Provider::Openai => &openai::OpenAi,
        Provider::AzureOpenai => &azure::AzureOpenAi,
        Provider::Anthropic => &anthropic::Anthropic,
        Provider::Cohere => &cohere::Cohere,
        Provider::Gemini => &gemini::Gemini,
        Provider::Bedrock => &bedrock::Bedrock,
        Provider::HuggingfaceTgi => &tgi::Tgi,
        Provider::DatabricksModelServing => &compat::DATABRICKS,
        Provider::MlflowModelServing => &mlflow::MlflowModelServing,
        Provider::Mistral => &compat::MISTRAL,
        Provider::Ai21 => &compat::AI21,
        Provider::Together => &compat::TOGETHER,
        Provider::Groq => &compat::GROQ,
        Provider::Deepseek => &compat::DEEPSEEK,
        Provider::Ollama => &compat::OLLAMA,
        Provider::OpenaiCompatible => &compat::OPENAI_COMPATIBLE,
    })
}

/// Splits an embeddings request into requests of at most `max` inputs each, when it has more.
pub fn split_inputs(request: &LlmRequest, max: usize) -> Option<Vec<LlmRequest>> {
    match request {
        LlmRequest::Embeddings(e) if max > 0 && e.input.len() > max => Some(
            e.input
                .chunks(max)
                .map(|inputs| {
                    LlmRequest::Embeddings(EmbeddingsRequest {
                        input: inputs.to_vec(),
                        extra: e.extra.clone(),
                    })
                })
                .collect(),
        ),
        _ => None,
    }
}

/// Joins the answers to split embeddings requests, in order; usage is summed.
pub fn join_embeddings(parts: Vec<LlmResponse>) -> Result<LlmResponse, ProviderError> {
    let mut joined = Embeddings {
        model: String::new(),
        data: Vec::new(),
        usage: Usage::default(),
    };
    let add = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (None, None) => None,
        (a, b) => Some(
            a.unwrap_or(0)
                .saturating_add(b.unwrap_or(0))
                .min(crate::llm::MAX_REPORTED_TOKENS),
        ),
    };
    for part in parts {
        let LlmResponse::Embeddings(e) = part else {
            return Err(ProviderError::MalformedResponse(
                "expected embeddings".into(),
            ));
        };
        if joined.model.is_empty() {
            joined.model = e.model;
        }
        joined.data.extend(e.data);
        joined.usage = Usage {
            prompt_tokens: add(joined.usage.prompt_tokens, e.usage.prompt_tokens),
            completion_tokens: add(joined.usage.completion_tokens, e.usage.completion_tokens),
            total_tokens: add(joined.usage.total_tokens, e.usage.total_tokens),
            cached_prompt_tokens: add(
                joined.usage.cached_prompt_tokens,
                e.usage.cached_prompt_tokens,
            ),
        };
    }
    Ok(LlmResponse::Embeddings(joined))
}

/// Every route type, for providers that serve them all.
pub(crate) const ALL_ROUTE_TYPES: &[RouteType] = &[
    RouteType::Chat,
    RouteType::Completions,
    RouteType::Embeddings,
];

/// A JSON POST.
pub(crate) fn post_json(
    url: String,
    headers: HeaderMap,
    body: &impl serde::Serialize,
) -> UpstreamRequest {
    UpstreamRequest {
        method: Method::POST,
        url,
        headers,
        body: Bytes::from(json_bytes(body)),
    }
}

/// A request body as JSON, in a buffer big enough for the usual request (`to_vec` starts at 128
/// bytes and regrows).
fn json_bytes(body: &impl serde::Serialize) -> Vec<u8> {
    let mut buf = Vec::with_capacity(512);
    // Serialising JSON into memory cannot fail for these bodies (string keys only).
    if serde_json::to_writer(&mut buf, body).is_err() {
        buf.clear();
    }
    buf
}

/// An answer with a single choice, as from every provider without candidate counts.
pub(crate) fn single_choice(
    id: String,
    model: String,
    text: String,
    finish_reason: Option<&str>,
    tool_calls: Vec<crate::llm::ToolCall>,
    usage: Usage,
) -> LlmResponse {
    LlmResponse::Generation(crate::llm::Generation {
        id,
        created: crate::llm::unix_now(),
        model,
        choices: vec![crate::llm::Choice {
            index: 0,
            text,
            finish_reason: finish_reason.and_then(normalize_finish_reason),
            tool_calls,
            message_extra: serde_json::Map::new(),
        }],
        usage,
    })
}

/// Appends a turn of `blocks` under `field`, merging with the previous turn of the same role:
/// Anthropic, Gemini and Bedrock want user and assistant turns alternating.
pub(crate) fn push_turn(
    turns: &mut Vec<serde_json::Value>,
    role: &str,
    field: &str,
    blocks: Vec<serde_json::Value>,
) {
    if let Some(last) = turns.last_mut()
        && last["role"] == role
        && let Some(existing) = last[field].as_array_mut()
    {
        existing.extend(blocks);
        return;
    }
    let mut turn = serde_json::Map::new();
    turn.insert("role".into(), serde_json::Value::from(role));
    turn.insert(field.into(), serde_json::Value::Array(blocks));
    turns.push(serde_json::Value::Object(turn));
}

/// The fields among `pairs` that have a value.
pub(crate) fn present_fields<const N: usize>(
    pairs: [(&str, Option<serde_json::Value>); N],
) -> serde_json::Map<String, serde_json::Value> {
    pairs
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_string(), v?)))
        .collect()
}

/// Headers of a JSON request.
pub(crate) fn json_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers
}

/// Adds a credential header, marked sensitive so hyper's and reqwest's debug output hide it.
pub(crate) fn insert_secret(
    headers: &mut HeaderMap,
    name: impl header::IntoHeaderName,
    value: &str,
) -> Result<(), ProviderError> {
    let mut value = HeaderValue::from_str(value).map_err(|_| {
        ProviderError::Unsupported("the credential holds characters not allowed in a header".into())
    })?;
    value.set_sensitive(true);
    headers.insert(name, value);
    Ok(())
}

/// For providers without candidate counts: one answer is all they can give.
pub(crate) fn reject_n(provider: Provider, params: &Params) -> Result<(), ProviderError> {
    match params.n {
        Some(n) if n > 1 => Err(ProviderError::Unsupported(format!(
            "provider {provider} does not support n > 1"
        ))),
        _ => Ok(()),
    }
}

/// A name from a Route (model, deployment, endpoint, API version) as exactly one URL path segment:
/// every byte but RFC 3986's unreserved ones is percent-encoded, so `/`, `?`, `#` and `%` stay
/// literal. `.` and `..` are refused: URL parsers treat them, even encoded as `%2E`, as dot
/// segments and would climb out of the path.
pub(crate) fn path_segment(name: &str) -> Result<String, ProviderError> {
    if matches!(name, "" | "." | "..") {
        return Err(ProviderError::Unsupported(format!(
            "the Route's name {name:?} cannot be used as a URL path segment"
        )));
    }
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xF)]));
        }
    }
    Ok(out)
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

pub(crate) fn malformed(e: impl std::fmt::Display) -> ProviderError {
    ProviderError::MalformedResponse(e.to_string())
}

/// The usual mapping of an error answer: the provider's message (or a status fallback) and `Retry-After`.
pub(crate) fn upstream_error(
    status: StatusCode,
    headers: &HeaderMap,
    message: Option<String>,
    body: &[u8],
) -> ProviderError {
    ProviderError::Upstream {
        status,
        message: message
            .filter(|m| !m.trim().is_empty())
            .unwrap_or_else(|| fallback_message(status, body)),
        retry_after: retry_after_secs(headers),
    }
}

/// A provider's finish reason in OpenAI's words (`stop`, `length`, `tool_calls`, `content_filter`);
/// a word with no OpenAI equivalent is kept, lower-cased. Empty means "not finished".
pub fn normalize_finish_reason(raw: &str) -> Option<String> {
    let word = match raw {
        "" => return None,
        "stop" | "end_turn" | "stop_sequence" | "pause_turn" | "STOP" | "COMPLETE"
        | "STOP_SEQUENCE" | "USER_CANCEL" | "eos" | "eos_token" => "stop",
        "length"
        | "max_tokens"
        | "MAX_TOKENS"
        | "model_length"
        | "model_context_window_exceeded" => "length",
        "tool_calls" | "tool_use" | "TOOL_CALL" | "function_call" => "tool_calls",
        "content_filter"
        | "refusal"
        | "SAFETY"
        | "RECITATION"
        | "BLOCKLIST"
        | "PROHIBITED_CONTENT"
        | "SPII"
        | "IMAGE_SAFETY"
        | "IMAGE_PROHIBITED_CONTENT"
        | "IMAGE_RECITATION"
        | "guardrail_intervened"
        | "content_filtered"
        | "ERROR_TOXIC" => "content_filter",
        other => return Some(other.to_ascii_lowercase()),
    };
    Some(word.to_string())
}

/// `Retry-After` in seconds, when the header holds a number.
pub fn retry_after_secs(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .and_then(retry_secs)
}

/// The longest `Retry-After` passed on: a day. A provider's figure is not trusted beyond it.
const MAX_RETRY_AFTER: u64 = 86_400;

/// Seconds from a provider's retry hint, rounded up and clamped; `None` for NaN or infinity.
pub(crate) fn retry_secs(secs: f64) -> Option<u64> {
    secs.is_finite()
        .then(|| (secs.ceil().max(0.0) as u64).min(MAX_RETRY_AFTER))
}

/// Error text from a JSON error body: the common `error.message`, `message`, `detail` or `error` shapes.
pub fn error_message(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let candidates = [
        value.pointer("/error/message"),
        value.get("message"),
        value.get("detail"),
        value.get("error"),
    ];
    candidates
        .into_iter()
        .flatten()
        .find_map(|v| v.as_str().map(str::to_string))
}

/// Status text fallback when a provider error body has no usable message.
pub fn fallback_message(status: StatusCode, body: &[u8]) -> String {
    let snippet: String = String::from_utf8_lossy(body).chars().take(200).collect();
    if snippet.trim().is_empty() {
        format!("upstream answered {status}")
    } else {
        format!("upstream answered {status}: {}", snippet.trim())
    }
}

/// Test helpers shared by the adapters' unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// Decodes `bytes` fed in pieces cut at `cuts` (any order, any values up to the length).
    pub fn decode_split(
        adapter: &dyn ProviderAdapter,
        route_type: RouteType,
        bytes: &[u8],
        mut cuts: Vec<usize>,
    ) -> Result<Vec<StreamDelta>, ProviderError> {
        cuts.sort_unstable();
        let mut decoder = adapter.stream_decoder(route_type);
        let mut out = Vec::new();
        let mut last = 0;
        for c in cuts.into_iter().map(|c| c.min(bytes.len())) {
            decoder.feed(&bytes[last..c], &mut out)?;
            last = c;
        }
        decoder.feed(&bytes[last..], &mut out)?;
        decoder.finish(&mut out)?;
        Ok(out)
    }

    /// The text of a decoded stream, joined.
    pub fn text(deltas: &[StreamDelta]) -> String {
        deltas.iter().filter_map(|d| d.text.as_deref()).collect()
    }

    /// The tool calls of a decoded stream, accumulated as a client does: `(id, name, arguments)`
    /// by call index. Panics when a call's first fragment lacks its id or name, or when a later
    /// fragment comes for a call never started.
    pub fn tool_calls(deltas: &[StreamDelta]) -> Vec<(String, String, String)> {
        let mut calls: Vec<(String, String, String)> = Vec::new();
        for call in deltas.iter().flat_map(|d| &d.tool_calls) {
            let i = call.index as usize;
            if i == calls.len() {
                let id = call
                    .id
                    .clone()
                    .unwrap_or_else(|| panic!("call {i} has no id"));
                let name = call
                    .name
                    .clone()
                    .unwrap_or_else(|| panic!("call {i} has no name"));
                calls.push((id, name, String::new()));
            }
            let Some(entry) = calls.get_mut(i) else {
                panic!("fragment for call {i} before it started")
            };
            entry.2.push_str(&call.arguments);
        }
        calls
    }

    /// The last finish reason of a decoded stream.
    pub fn finish(deltas: &[StreamDelta]) -> Option<&str> {
        deltas.iter().rev().find_map(|d| d.finish_reason.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Map, json};

    use super::*;
    use crate::llm::{ChatMessage, ChatRequest, CompletionsRequest, StreamOptions};

    fn request(route_type: RouteType) -> LlmRequest {
        match route_type {
            RouteType::Chat => LlmRequest::Chat(ChatRequest {
                messages: vec![ChatMessage::from_json("user", json!("hi"))],
                params: Params::default(),
                stream: StreamOptions::default(),
                extra: Map::new(),
            }),
            RouteType::Completions => LlmRequest::Completions(CompletionsRequest {
                prompt: "hi".into(),
                params: Params::default(),
                stream: StreamOptions::default(),
                extra: Map::new(),
            }),
            RouteType::Embeddings => LlmRequest::Embeddings(EmbeddingsRequest {
                input: vec!["hi".into()],
                extra: Map::new(),
            }),
        }
    }

    #[test]
    fn every_provider_has_an_adapter_and_hides_credentials_in_requests() {
        for provider in Provider::ALL {
            let adapter = adapter_for(provider).unwrap_or_else(|| panic!("{provider}"));
            assert_eq!(adapter.info().provider, provider);
            let mut credentials = Credentials::default();
            for key in [
                API_KEY,
                "azureAdToken",
                "awsAccessKeyId",
                "awsSecretAccessKey",
                "awsSessionToken",
            ] {
                credentials.insert(key, SecretValue::new(format!("SECRET-{key}-0123456789")));
            }
            let target = Target {
                model: "m".into(),
                api_base: adapter
                    .info()
                    .default_api_base
                    .unwrap_or("https://upstream.example")
                    .into(),
                credentials,
                config: Default::default(),
            };
            for route_type in adapter.info().route_types {
                let req = adapter
                    .build_request(&target, &request(*route_type))
                    .unwrap_or_else(|e| panic!("{provider} {route_type}: {e}"));
                let shown = format!("{req:?}");
                assert!(!shown.contains("SECRET"), "{provider}: {shown}");
                assert!(!req.url.contains("SECRET"), "{provider}: {}", req.url);
                assert!(!String::from_utf8_lossy(&req.body).contains("SECRET"));
                let auth = req.headers.iter().filter(|(_, v)| v.is_sensitive()).count();
                assert!(auth >= 1, "{provider} sent no credential header");
            }
        }
    }

    fn target_for(adapter: &dyn ProviderAdapter, model: &str) -> Target {
        let mut credentials = Credentials::default();
        for key in [API_KEY, "awsAccessKeyId", "awsSecretAccessKey"] {
            credentials.insert(key, SecretValue::new("k"));
        }
        Target {
            model: model.into(),
            api_base: adapter
                .info()
                .default_api_base
                .unwrap_or("https://upstream.example/base")
                .into(),
            credentials,
            config: Default::default(),
        }
    }

    #[test]
    fn model_names_reach_every_provider_as_one_literal_path_segment() {
        let hostile = "x/../../admin?y=1#";
        let encoded = "x%2F..%2F..%2Fadmin%3Fy%3D1%23";
        // Providers that put the model (deployment, endpoint) in the path; the others send it in the body.
        let in_path = [
            Provider::AzureOpenai,
            Provider::Bedrock,
            Provider::Gemini,
            Provider::DatabricksModelServing,
        ];
        for provider in Provider::ALL {
            let adapter = adapter_for(provider).unwrap_or_else(|| panic!("{provider}"));
            let target = target_for(adapter, hostile);
            let base = reqwest::Url::parse(&target.api_base.replace("{region}", "us-east-1"))
                .unwrap_or_else(|e| panic!("{provider}: {e}"));
            for route_type in adapter.info().route_types {
                let req = adapter
                    .build_request(&target, &request(*route_type))
                    .unwrap_or_else(|e| panic!("{provider} {route_type}: {e}"));
                let url = reqwest::Url::parse(&req.url)
                    .unwrap_or_else(|e| panic!("{provider}: {} {e}", req.url));
                assert_eq!(url.host_str(), base.host_str(), "{provider}: {url}");
                assert!(url.path().starts_with(base.path()), "{provider}: {url}");
                assert!(url.fragment().is_none(), "{provider}: {url}");
                assert!(
                    !url.query().unwrap_or_default().contains("y=1"),
                    "{provider}: {url}"
                );
                let segments: Vec<&str> = url.path_segments().into_iter().flatten().collect();
                assert!(
                    !segments.contains(&"admin") && !segments.contains(&".."),
                    "{provider}: {url}"
                );
                if in_path.contains(&provider) {
                    assert!(
                        segments.iter().any(|s| s.starts_with(encoded)),
                        "{provider}: the name is not one segment in {url}"
                    );
                }
            }
            if in_path.contains(&provider) {
                for dots in [".", "..", ""] {
                    let r = adapter
                        .build_request(&target_for(adapter, dots), &request(RouteType::Chat));
                    assert!(
                        matches!(r, Err(ProviderError::Unsupported(_))),
                        "{provider} accepted {dots:?} as a path segment"
                    );
                }
            }
        }
    }

    #[test]
    fn route_config_in_urls_is_encoded_too() {
        let gemini = adapter_for(Provider::Gemini).unwrap_or_else(|| panic!("gemini"));
        let mut target = target_for(gemini, "gemini-2.5-flash");
        target
            .config
            .insert("apiVersion".into(), "v1/../../evil?x=".into());
        let req = gemini.build_request(&target, &request(RouteType::Chat));
        let url = req.map(|r| r.url).unwrap_or_default();
        assert!(
            url.contains("/v1%2F..%2F..%2Fevil%3Fx%3D/models/gemini-2.5-flash:generateContent"),
            "{url}"
        );

        let azure = adapter_for(Provider::AzureOpenai).unwrap_or_else(|| panic!("azure"));
        let mut target = target_for(azure, "dep");
        target
            .config
            .insert("apiVersion".into(), "2024-10-21&evil=1#".into());
        let url = azure
            .build_request(&target, &request(RouteType::Chat))
            .map(|r| r.url)
            .unwrap_or_default();
        assert!(
            url.ends_with("?api-version=2024-10-21%26evil%3D1%23"),
            "{url}"
        );

        let bedrock = adapter_for(Provider::Bedrock).unwrap_or_else(|| panic!("bedrock"));
        let mut target = target_for(bedrock, "m");
        target
            .config
            .insert("region".into(), "evil.example/#".into());
        assert!(matches!(
            bedrock.build_request(&target, &request(RouteType::Chat)),
            Err(ProviderError::Unsupported(_))
        ));
    }

    /// Feeds `prefix`, then `total` bytes of `fill` in 64 KiB chunks, then `suffix`, and finishes.
    fn feed_long(
        decoder: &mut dyn StreamDecoder,
        prefix: &[u8],
        fill: u8,
        total: usize,
        suffix: &[u8],
    ) -> Result<(), ProviderError> {
        let mut out = Vec::new();
        decoder.feed(prefix, &mut out)?;
        let chunk = vec![fill; 64 * 1024];
        let mut sent = 0;
        while sent < total {
            let n = chunk.len().min(total - sent);
            decoder.feed(&chunk[..n], &mut out)?;
            sent += n;
        }
        decoder.feed(suffix, &mut out)?;
        decoder.finish(&mut out)
    }

    /// A 16 MiB single-line event: refused with a clear error, quickly (framing never rescans what
    /// it already scanned; the bound is generous so it holds in debug builds on a busy machine).
    #[test]
    fn a_16_mib_stream_line_is_refused_quickly_by_every_framing() {
        const HUGE: usize = 16 << 20;
        let cases: [(Provider, RouteType, &[u8], u8); 4] = [
            (Provider::Openai, RouteType::Chat, b"data: {\"x\":\"", b'a'),
            (
                Provider::Anthropic,
                RouteType::Chat,
                b"event: content_block_delta\ndata: \"",
                b'a',
            ),
            (
                Provider::Cohere,
                RouteType::Completions,
                b"{\"event_type\":\"text-generation\",\"text\":\"",
                b'a',
            ),
            (Provider::Gemini, RouteType::Chat, b"{\"error\": \"", b'a'),
        ];
        for (provider, route_type, prefix, fill) in cases {
            let adapter = adapter_for(provider).unwrap_or_else(|| panic!("{provider}"));
            let mut decoder = adapter.stream_decoder(route_type);
            let started = std::time::Instant::now();
            let result = feed_long(decoder.as_mut(), prefix, fill, HUGE, b"\"}\n\n");
            let took = started.elapsed();
            assert!(
                took < std::time::Duration::from_secs(3),
                "{provider}: a 16 MiB line took {took:?}"
            );
            match result {
                Err(ProviderError::MalformedResponse(m)) => {
                    assert!(m.contains("larger than"), "{provider}: {m}")
                }
                other => panic!("{provider}: a 16 MiB event was accepted: {other:?}"),
            }
        }
    }

    #[test]
    fn an_oversized_event_stream_frame_is_refused_at_its_prelude() {
        let adapter = adapter_for(Provider::Bedrock).unwrap_or_else(|| panic!("bedrock"));
        let mut decoder = adapter.stream_decoder(RouteType::Chat);
        // A prelude announcing a 20 MiB frame (within botocore's limit, far beyond any real event).
        let total: u32 = 20 << 20;
        let mut prelude = Vec::new();
        prelude.extend_from_slice(&total.to_be_bytes());
        prelude.extend_from_slice(&0u32.to_be_bytes());
        let crc = crc32fast::hash(&prelude);
        prelude.extend_from_slice(&crc.to_be_bytes());
        let mut out = Vec::new();
        match decoder.feed(&prelude, &mut out) {
            Err(ProviderError::MalformedResponse(m)) => assert!(m.contains("larger than"), "{m}"),
            other => panic!("a 20 MiB frame was waited for: {other:?}"),
        }
    }

    #[test]
    fn joining_absurd_embeddings_usage_saturates() {
        let part = || {
            LlmResponse::Embeddings(Embeddings {
                model: "m".into(),
                data: vec![vec![1.0]],
                usage: Usage {
                    prompt_tokens: Some(u64::MAX),
                    completion_tokens: None,
                    total_tokens: Some(u64::MAX),
                    cached_prompt_tokens: None,
                },
            })
        };
        let Ok(LlmResponse::Embeddings(e)) = join_embeddings(vec![part(), part(), part()]) else {
            panic!("embeddings")
        };
        assert!(e.usage.total_tokens.is_some_and(|t| t >= 1 << 40));
    }

    /// Usage figures from every adapter: absurd numbers (huge, negative, 1e308) neither fail the
    /// answer nor produce a figure below what was claimed.
    #[test]
    fn absurd_usage_from_providers_is_clamped_and_never_fails_the_answer() {
        let cases: [(Provider, RouteType, &str); 5] = [
            (
                Provider::Openai,
                RouteType::Chat,
                r#"{"id":"c","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":-5,"completion_tokens":1e308,"total_tokens":18446744073709551615}}"#,
            ),
            (
                Provider::Anthropic,
                RouteType::Chat,
                r#"{"id":"m","type":"message","role":"assistant","model":"c","content":[{"type":"text","text":"hi"}],"stop_reason":"end_turn","usage":{"input_tokens":18446744073709551615,"output_tokens":1e308,"cache_read_input_tokens":18446744073709551615}}"#,
            ),
            (
                Provider::Gemini,
                RouteType::Chat,
                r#"{"candidates":[{"content":{"role":"model","parts":[{"text":"hi"}]},"finishReason":"STOP","index":0}],"usageMetadata":{"promptTokenCount":18446744073709551615,"candidatesTokenCount":-1,"totalTokenCount":1e308,"thoughtsTokenCount":18446744073709551615}}"#,
            ),
            (
                Provider::Cohere,
                RouteType::Chat,
                r#"{"id":"x","finish_reason":"COMPLETE","message":{"role":"assistant","content":[{"type":"text","text":"hi"}]},"usage":{"tokens":{"input_tokens":18446744073709551615,"output_tokens":1e308},"billed_units":{"input_tokens":-3,"output_tokens":18446744073709551615}}}"#,
            ),
            (
                Provider::Bedrock,
                RouteType::Chat,
                r#"{"output":{"message":{"role":"assistant","content":[{"text":"hi"}]}},"stopReason":"end_turn","usage":{"inputTokens":18446744073709551615,"outputTokens":1e308,"totalTokens":-7}}"#,
            ),
        ];
        for (provider, route_type, body) in cases {
            let adapter = adapter_for(provider).unwrap_or_else(|| panic!("{provider}"));
            let target = target_for(adapter, "m");
            let answer = adapter
                .parse_response(&target, route_type, body.as_bytes())
                .unwrap_or_else(|e| panic!("{provider}: the answer was lost over its usage: {e}"));
            let LlmResponse::Generation(g) = answer else {
                panic!("{provider}: generation")
            };
            let used = crate::dataplane::admission::used_tokens(&g.usage);
            assert!(
                used.is_none_or(|t| t >= 1 << 40),
                "{provider}: an absurd usage became {used:?} ({:?})",
                g.usage
            );
        }
    }

    #[test]
    fn retry_hints_from_providers_are_clamped() {
        let hint = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::RETRY_AFTER, HeaderValue::from_str(v).unwrap());
            retry_after_secs(&h)
        };
        assert_eq!(hint("2.5"), Some(3));
        assert_eq!(hint("-4"), Some(0));
        assert_eq!(hint("1e308"), Some(86_400));
        assert_eq!(hint("18446744073709551616"), Some(86_400));
        assert_eq!(hint("inf"), None);
        assert_eq!(hint("NaN"), None);
        assert_eq!(hint("Wed, 21 Oct 2015 07:28:00 GMT"), None);
    }

    #[test]
    fn split_and_join_keep_embeddings_in_order() {
        let request = LlmRequest::Embeddings(EmbeddingsRequest {
            input: vec!["a".into(), "b".into(), "c".into()],
            extra: Map::new(),
        });
        assert!(split_inputs(&request, 3).is_none());
        let parts = split_inputs(&request, 2).unwrap_or_default();
        assert_eq!(parts.len(), 2);
        let answer = |data: Vec<Vec<f64>>, tokens| {
            LlmResponse::Embeddings(Embeddings {
                model: "m".into(),
                data,
                usage: Usage::new(Some(tokens), None),
            })
        };
        let joined = join_embeddings(vec![
            answer(vec![vec![1.0], vec![2.0]], 2),
            answer(vec![vec![3.0]], 1),
        ]);
        let Ok(LlmResponse::Embeddings(e)) = joined else {
            panic!("embeddings")
        };
        assert_eq!(e.data, vec![vec![1.0], vec![2.0], vec![3.0]]);
        assert_eq!(e.usage.prompt_tokens, Some(3));
    }
}
