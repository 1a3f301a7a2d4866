//! Provider adapters: pure translations between the unified model and one provider's wire format.
//!
//! Adapters do no I/O. The data plane sends what `build_request` returns with its shared HTTP client
//! and hands the answer back to `parse_response`, `parse_error` or a `StreamDecoder`.

mod credentials;
mod openai;
pub mod sse;

use std::collections::BTreeMap;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};

pub use credentials::{Credentials, SecretValue};

use crate::api::{Provider, RouteType};
use crate::llm::{LlmRequest, LlmResponse, StreamDelta};

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
    fn provider(&self) -> Provider;
    /// Route types this provider can serve.
    fn route_types(&self) -> &'static [RouteType];
    fn credential_keys(&self) -> CredentialKeys;
    /// Used when the Route has no `apiBase`; `None` makes `apiBase` required.
    fn default_api_base(&self) -> Option<&'static str>;
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
    fn parse_error(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> ProviderError;
    /// A fresh incremental parser for one streamed answer.
    fn stream_decoder(&self, route_type: RouteType) -> Box<dyn StreamDecoder>;
}

/// Incremental parser of a provider's streaming framing; bytes may be split anywhere.
pub trait StreamDecoder: Send {
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<StreamDelta>) -> Result<(), ProviderError>;
    /// The provider closed the stream; flush anything complete that is still buffered.
    fn finish(&mut self, out: &mut Vec<StreamDelta>) -> Result<(), ProviderError>;
}

/// The adapter for `provider`, or `None` while this gateway does not speak it yet.
pub fn adapter_for(provider: Provider) -> Option<&'static dyn ProviderAdapter> {
    match provider {
        Provider::Openai => Some(&openai::OpenAi),
        _ => None,
    }
}

/// `Retry-After` in seconds, when the header holds a number.
pub fn retry_after_secs(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|s| s.ceil().max(0.0) as u64)
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
