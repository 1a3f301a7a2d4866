//! Per-request observability: the request id (honoured from `x-request-id` or generated, and
//! always returned), one structured log line, and the request metrics. Handlers deep in the call
//! note what they learn (route, provider, tokens) in a task-local, so no handler signature changes.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use http::{HeaderName, HeaderValue};
use tracing::field::Empty;
use tracing::{Instrument, Span, debug};

use super::AppState;
use crate::access::Bearer;
use crate::llm::Usage;
use crate::telemetry::metrics::RequestLabels;
use crate::telemetry::requestlog::{self, RequestLine};
use crate::telemetry::tracecontext::{self, TRACEPARENT};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Where Anthropic's clients put their credential.
pub const API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// The backend that answered a call (or gave its final error), and after how many tries.
pub struct Answered {
    pub backend: Arc<str>,
    pub header: HeaderValue,
    pub attempts: u32,
    /// A pool backend's endpoint (its pod's name).
    pub endpoint: Option<HeaderValue>,
}

pub const BACKEND_HEADER: HeaderName = HeaderName::from_static("x-portcullis-backend");
/// The pod of a pool backend that answered.
pub const ENDPOINT_HEADER: HeaderName = HeaderName::from_static("x-portcullis-endpoint");
pub const ATTEMPTS_HEADER: HeaderName = HeaderName::from_static("x-portcullis-attempts");
/// The USD cost of a non-streaming answer (`unknown` when its model has no price).
pub const COST_HEADER: HeaderName = HeaderName::from_static("x-portcullis-cost-usd");
/// What the response cache did: `hit`, `miss` or `bypass` (absent: the Route does not cache).
pub const CACHE_HEADER: HeaderName = HeaderName::from_static("x-portcullis-cache");
/// How a hit matched: `semantic` for a prompt close in meaning (absent: an identical call).
pub const CACHE_MATCH_HEADER: HeaderName = HeaderName::from_static("x-portcullis-cache-match");

/// What an answered call cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallCost {
    Known(crate::cost::Usd),
    /// The answering model has no price: reported as unknown, never as zero.
    Unknown,
}

impl std::fmt::Display for CallCost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallCost::Known(usd) => usd.fmt(f),
            CallCost::Unknown => f.write_str("unknown"),
        }
    }
}

/// What the handlers learned about one call.
#[derive(Default)]
pub struct CallInfo {
    pub answered: Option<Answered>,
    pub route: Option<Arc<str>>,
    pub provider: Option<&'static str>,
    pub usage: Option<Usage>,
    /// Set once a non-streaming call is answered (a stream's cost is on its own log line).
    pub cost: Option<CallCost>,
    pub consumer: Option<Arc<str>>,
    pub model: Option<Arc<str>>,
    /// The OpenTelemetry GenAI operation name: chat, text_completion, embeddings.
    pub operation: Option<&'static str>,
    /// Passed on to the provider when no span of ours is exported.
    pub caller_traceparent: Option<HeaderValue>,
    /// The gateways this request already passed through (`x-portcullis-via`).
    pub via: Option<HeaderValue>,
    /// The caller's credential, taken once by admission; never logged.
    pub bearer: Option<Bearer>,
    /// Who the caller is, once admission asked.
    pub caller: Option<Result<Option<crate::access::Identity>, crate::access::AuthError>>,
    /// The request's share of the buffer budget (from the listener).
    pub intake: Option<Arc<super::intake::Intake>>,
    /// The caller's `Cache-Control` and `x-portcullis-cache-ttl`.
    pub cache_directive: crate::cache::Directive,
    /// What the response cache did, and a hit's age in seconds.
    pub cache: Option<(crate::cache::CacheStatus, Option<u64>)>,
    /// A hit answered for a prompt close in meaning, not an identical one.
    pub cache_semantic: bool,
    /// Guardrail checks that matched: `policy/check:action:phase`, comma-separated (names only).
    pub guardrail: Option<String>,
}

tokio::task_local! {
    static CALL: RefCell<CallInfo>;
}

/// Records something about the current call; a no-op outside a request.
pub fn note(f: impl FnOnce(&mut CallInfo)) {
    let _ = CALL.try_with(|c| f(&mut c.borrow_mut()));
}

/// Runs `call` as a call of its own that the gateway makes inside a caller's (a guardrail judge's
/// verdict, the response cache embedding a prompt), under `consumer` and no caller identity: what
/// it notes (route, backend, cost) stays out of the outer call's log line and headers.
pub async fn scoped<F: std::future::Future>(consumer: Arc<str>, call: F) -> F::Output {
    let info = CallInfo {
        consumer: Some(consumer),
        caller: Some(Ok(None)),
        ..Default::default()
    };
    CALL.scope(RefCell::new(info), call).await
}

/// The consumer label of anonymous calls, made once: an anonymous call allocates none.
static ANONYMOUS: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));

/// The caller's identity, or "" for anonymous calls (a bounded label: identities come from configuration).
pub fn consumer() -> Arc<str> {
    CALL.try_with(|c| c.borrow().consumer.clone())
        .ok()
        .flatten()
        .unwrap_or_else(|| Arc::clone(&ANONYMOUS))
}

/// Takes the caller's bearer credential out of the call, so it is held no longer than needed.
pub fn take_bearer() -> Option<Bearer> {
    CALL.try_with(|c| c.borrow_mut().bearer.take())
        .ok()
        .flatten()
}

/// Who the caller is, if admission already asked.
pub fn caller() -> Option<Result<Option<crate::access::Identity>, crate::access::AuthError>> {
    CALL.try_with(|c| c.borrow().caller.clone()).ok().flatten()
}

/// Counts `bytes` more against this request's share of the buffer budget.
pub fn charge(bytes: usize) -> Result<(), super::error::GatewayError> {
    let intake = CALL.try_with(|c| c.borrow().intake.clone()).ok().flatten();
    match intake {
        Some(intake) => intake.charge(bytes),
        None => Ok(()),
    }
}

/// The gateways this request already passed through, if any.
pub fn caller_via() -> Option<HeaderValue> {
    CALL.try_with(|c| c.borrow().via.clone()).ok().flatten()
}

/// The caller's cache directive (`Cache-Control`, `x-portcullis-cache-ttl`).
pub fn cache_directive() -> crate::cache::Directive {
    CALL.try_with(|c| c.borrow().cache_directive)
        .unwrap_or_default()
}

/// The caller's `traceparent`, if any.
pub fn caller_traceparent() -> Option<HeaderValue> {
    CALL.try_with(|c| c.borrow().caller_traceparent.clone())
        .ok()
        .flatten()
}

/// The API surface a path belongs to (a bounded metric label).
pub fn surface(path: &str) -> &'static str {
    if path == "/v1/messages" || path.starts_with("/v1/messages/") {
        "anthropic"
    } else if path == "/v1/responses" || path.starts_with("/v1/responses/") {
        "responses"
    } else if path.starts_with("/v1/") {
        "openai"
    } else if path.starts_with("/gateway/") || path.starts_with("/api/2.0/gateway/") {
        "mlflow-gateway"
    } else if path.starts_with("/endpoints/") || path.starts_with("/api/2.0/endpoints/") {
        "mlflow-deployments"
    } else if matches!(path, "/health" | "/healthz" | "/readyz") {
        "health"
    } else {
        "other"
    }
}

fn request_id(req: &Request) -> HeaderValue {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    req.headers()
        .get(REQUEST_ID)
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .cloned()
        .unwrap_or_else(|| {
            static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let pid = *PID.get_or_init(std::process::id);
            // Formatted on the stack: the header value is then the only copy.
            let mut buf = [0u8; 40];
            let mut w = &mut buf[..];
            let _ = std::io::Write::write_fmt(&mut w, format_args!("pc-{pid:08x}-{n}"));
            let len = 40 - w.len();
            HeaderValue::from_bytes(&buf[..len]).unwrap_or(HeaderValue::from_static("pc"))
        })
}

pub async fn middleware(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request_id(&req);
    let surface = surface(req.uri().path());
    let method = req.method().clone();
    // A shared handle on the caller's URI (no copy of the path) for the log line.
    let uri = req.uri().clone();
    let path = uri.path();
    let span = request_span(&req, surface);
    let call = CallInfo {
        caller_traceparent: req.headers().get(TRACEPARENT).cloned(),
        via: req.headers().get(super::via::VIA).cloned(),
        intake: super::intake::current(),
        cache_directive: crate::cache::Directive::from_headers(
            req.headers().get(http::header::CACHE_CONTROL),
            req.headers().get(crate::cache::TTL_HEADER),
        ),
        // `Authorization: Bearer` first; Anthropic's clients send `x-api-key` instead.
        bearer: req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| Bearer::from_header(v.as_bytes()))
            .or_else(|| {
                req.headers()
                    .get(API_KEY)
                    .and_then(|v| Bearer::from_api_key(v.as_bytes()))
            }),
        ..Default::default()
    };
    let via = &state.via;
    let (mut response, call) = CALL
        .scope(
            RefCell::new(call),
            async move {
                let response = match super::via::refuse_loop(via, &req) {
                    Some(refused) => refused,
                    None => next.run(req).await,
                };
                (response, CALL.with(|c| c.take()))
            }
            .instrument(span.clone()),
        )
        .await;
    // The handler is done with the body and its parsed form: their bytes go back to the budget
    // (a stream's answer holds only its in-flight slot).
    if let Some(intake) = &call.intake {
        intake.release();
    }
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    if let Some(a) = &call.answered {
        let headers = response.headers_mut();
        headers.insert(BACKEND_HEADER, a.header.clone());
        headers.insert(ATTEMPTS_HEADER, attempts_header(a.attempts));
        if let Some(endpoint) = &a.endpoint {
            headers.insert(ENDPOINT_HEADER, endpoint.clone());
        }
    }
    if let Some(cost) = call.cost
        && let Ok(v) = HeaderValue::try_from(cost.to_string())
    {
        response.headers_mut().insert(COST_HEADER, v);
    }
    if let Some((status, age)) = call.cache {
        let headers = response.headers_mut();
        headers.insert(CACHE_HEADER, HeaderValue::from_static(status.as_str()));
        if let Some(age) = age {
            headers.insert(http::header::AGE, HeaderValue::from(age));
        }
        if call.cache_semantic {
            headers.insert(CACHE_MATCH_HEADER, HeaderValue::from_static("semantic"));
        }
    }
    response.headers_mut().insert(REQUEST_ID, id);
    // Logged from the header just set: no copy of the id.
    let request_id = response
        .headers()
        .get(REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if surface == "health" {
        debug!(request_id, %method, path, status, "health check");
        return response;
    }
    let labels = RequestLabels {
        route: call.route.clone().unwrap_or_else(|| Arc::from("")),
        gen_ai_provider_name: call.provider.unwrap_or_default(),
        surface,
        status,
    };
    state
        .metrics
        .request_duration
        .get_or_create(&labels)
        .observe(elapsed.as_secs_f64());
    state.metrics.requests.get_or_create(&labels).inc();
    let usage = call.usage.unwrap_or_default();
    if !span.is_disabled() {
        span.record("http.response.status_code", status);
        span.record("gen_ai.operation.name", call.operation);
        span.record("gen_ai.provider.name", call.provider);
        span.record("gen_ai.request.model", call.model.as_deref());
        span.record("gen_ai.usage.input_tokens", usage.prompt_tokens);
        span.record("gen_ai.usage.output_tokens", usage.completion_tokens);
        span.record("portcullis.route", call.route.as_deref());
        span.record("portcullis.cache", call.cache.map(|(s, _)| s.as_str()));
        if let Some(a) = &call.answered {
            span.record("portcullis.backend", &*a.backend);
            span.record("portcullis.attempts", a.attempts);
        }
    }
    let cost = call.cost.as_ref().map(|c| c as &dyn std::fmt::Display);
    requestlog::log(&RequestLine {
        request_id,
        method: method.as_str(),
        path,
        surface,
        route: call.route.as_deref().unwrap_or_default(),
        provider: call.provider.unwrap_or_default(),
        consumer: call.consumer.as_deref().unwrap_or_default(),
        backend: call.answered.as_ref().map(|a| &*a.backend),
        attempts: call.answered.as_ref().map(|a| a.attempts),
        status,
        latency_ms: elapsed.as_secs_f64() * 1000.0,
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        cost_usd: cost,
        cache: call.cache.map(|(s, _)| s.as_str()),
        cache_match: call.cache_semantic.then_some("semantic"),
        guardrail: call.guardrail.as_deref(),
    });
    response
}

/// The attempts header; the usual counts without formatting a number.
fn attempts_header(n: u32) -> HeaderValue {
    match n {
        1 => HeaderValue::from_static("1"),
        2 => HeaderValue::from_static("2"),
        3 => HeaderValue::from_static("3"),
        n => HeaderValue::from(n),
    }
}

/// A server span for the request, only when traces are exported: span bookkeeping is not free.
fn request_span(req: &Request, surface: &'static str) -> Span {
    if !tracecontext::exporting() || surface == "health" {
        return Span::none();
    }
    let span = tracing::info_span!(
        "gen_ai request",
        otel.name = %format!("{} {}", req.method(), req.uri().path()),
        otel.kind = "server",
        http.request.method = %req.method(),
        url.path = %req.uri().path(),
        http.response.status_code = Empty,
        gen_ai.operation.name = Empty,
        gen_ai.provider.name = Empty,
        gen_ai.request.model = Empty,
        gen_ai.usage.input_tokens = Empty,
        gen_ai.usage.output_tokens = Empty,
        portcullis.route = Empty,
        portcullis.backend = Empty,
        portcullis.attempts = Empty,
        portcullis.cache = Empty,
    );
    tracecontext::adopt_parent(&span, req.headers());
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn surfaces_are_named_by_path() {
        assert_eq!(surface("/v1/messages"), "anthropic");
        assert_eq!(surface("/v1/messages/count_tokens"), "anthropic");
        assert_eq!(surface("/v1/responses"), "responses");
        assert_eq!(surface("/v1/messagesx"), "openai");
        assert_eq!(surface("/v1/chat/completions"), "openai");
    }
}
