//! Every way a data-plane request can fail, and the one place that maps each to a status code.
//! Each API surface renders the same error in its own body shape.

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use serde_json::json;

use crate::api::{Reason, RouteType};
use crate::limits::{RateLimited, WindowState};
use crate::providers::ProviderError;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<&'static str>,
    },
    #[error("{0}")]
    Unprocessable(String),
    #[error("route {0:?} does not exist")]
    UnknownRoute(String),
    #[error("route {route:?} serves {actual}, not {requested}")]
    WrongRouteType {
        route: String,
        actual: RouteType,
        requested: RouteType,
    },
    #[error(
        "request loop: this request already passed through gateway {0:?}; a Route's apiBase points back at the gateway"
    )]
    LoopDetected(String),
    #[error("no such path: {0}")]
    NoSuchPath(String),
    #[error("method not allowed for this path")]
    MethodNotAllowed,
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("route {route:?} is not ready ({}): {message}", reason.as_str())]
    RouteNotReady {
        route: String,
        reason: Reason,
        message: String,
    },
    /// The provider rejected or failed the call; `message` is already stripped of credentials.
    #[error("{message}")]
    Upstream {
        status: StatusCode,
        message: String,
        retry_after: Option<u64>,
        /// A 429 whose provider's rate-limit headers show room left for the key: this request's
        /// own limit (too large for a per-minute budget, an upstream's per-user quota), not the
        /// backend's, so it never ejects the backend for everyone else.
        request_scoped: bool,
    },
    #[error(
        "the {provider} provider rejected this route's credential ({status}: {message}); the route's operator must fix its Secret"
    )]
    CredentialRejected {
        provider: crate::api::Provider,
        status: u16,
        message: String,
    },
    #[error("upstream provider returned a malformed response: {0}")]
    UpstreamMalformed(String),
    /// No connection could be made: the request was not sent.
    #[error("{0}")]
    UpstreamUnreachable(String),
    /// The connection failed after the request was (or may have been) sent: the provider may
    /// have it, and bill it.
    #[error("{0}")]
    UpstreamConnectionLost(String),
    #[error("upstream provider did not answer within {0} seconds")]
    UpstreamTimeout(u64),
    #[error("the provider's stream sent nothing for {0} seconds and was ended")]
    UpstreamStalled(u64),
    #[error("the {0} provider's stream ended without its end marker; the answer is incomplete")]
    UpstreamTruncated(crate::api::Provider),
    #[error(
        "missing or invalid credentials: send a ServiceAccount token or an API key as 'Authorization: Bearer <credential>'"
    )]
    Unauthenticated,
    /// A presented JWT that fails the local checks or the TokenReview: a 401 that says why, on
    /// every path, whether or not the Route named exists.
    #[error("the ServiceAccount token is not valid: {0}")]
    InvalidToken(crate::access::Rejection),
    #[error("the caller's credentials cannot be checked right now; retry shortly")]
    AuthUnavailable,
    #[error("{}", .0.message)]
    RateLimited(Box<RateLimited>),
    #[error(
        "the stream was ended here: going on would pass the USD budget {budget}, which left this call ${allowed}; it is charged what was sent"
    )]
    BudgetTruncated { budget: String, allowed: String },
    #[error(
        "team {team} has a USD budget and route {route} has no price for its model; the route needs spec.pricing (0 for a free model)"
    )]
    UnpricedForBudget { team: String, route: String },
    #[error("team {team} may not use route {route}: it is not among the team's routes")]
    NotInTeamRoutes { team: String, route: String },
    #[error("the request body stopped arriving before it was complete")]
    BodyTimeout,
    #[error("the gateway is at its limit of requests in flight; retry shortly")]
    Overloaded,
    #[error(
        "the gateway holds as many request bodies as it may (--max-buffered-request-bytes); retry shortly"
    )]
    BuffersFull,
    #[error(
        "the request body's JSON would take about {estimate} bytes in memory, more than the {limit} the gateway allows for one request; send fewer, larger values"
    )]
    BodyTooComplex { estimate: usize, limit: usize },
    #[error("the request body's JSON is nested deeper than {0} levels")]
    BodyTooDeep(usize),
    /// A guardrail check blocked the call; names the policy and check, never the matched text.
    #[error(transparent)]
    GuardrailBlocked(#[from] crate::guardrails::Blocked),
}

impl GatewayError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        GatewayError::BadRequest {
            message: message.into(),
            param: None,
        }
    }

    pub fn bad_param(param: &'static str, message: impl Into<String>) -> Self {
        GatewayError::BadRequest {
            message: message.into(),
            param: Some(param),
        }
    }

    /// FastAPI, hence MLflow, answers 422 for a body that breaks the request schema (a missing,
    /// mistyped or out-of-range field); the MLflow surfaces keep that, OpenAI's keeps 400.
    pub fn schema_violation(self) -> Self {
        match self {
            GatewayError::BadRequest { message, .. } => GatewayError::Unprocessable(message),
            other => other,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::BadRequest { .. } | GatewayError::WrongRouteType { .. } => {
                StatusCode::BAD_REQUEST
            }
            GatewayError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            GatewayError::UnknownRoute(_) | GatewayError::NoSuchPath(_) => StatusCode::NOT_FOUND,
            GatewayError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::LoopDetected(_) => StatusCode::LOOP_DETECTED,
            GatewayError::PayloadTooLarge { .. } | GatewayError::BodyTooComplex { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            GatewayError::BodyTooDeep(_) | GatewayError::GuardrailBlocked(_) => {
                StatusCode::BAD_REQUEST
            }
            GatewayError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            GatewayError::RouteNotReady { .. } => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::Upstream { status, .. } => upstream_status(*status),
            GatewayError::UpstreamMalformed(_)
            | GatewayError::UpstreamUnreachable(_)
            | GatewayError::UpstreamConnectionLost(_)
            | GatewayError::CredentialRejected { .. } => StatusCode::BAD_GATEWAY,
            GatewayError::UpstreamTimeout(_) | GatewayError::UpstreamStalled(_) => {
                StatusCode::GATEWAY_TIMEOUT
            }
            GatewayError::UpstreamTruncated(_) => StatusCode::BAD_GATEWAY,
            GatewayError::Unauthenticated | GatewayError::InvalidToken(_) => {
                StatusCode::UNAUTHORIZED
            }
            GatewayError::AuthUnavailable | GatewayError::BuffersFull => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            GatewayError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::NotInTeamRoutes { .. } | GatewayError::UnpricedForBudget { .. } => {
                StatusCode::FORBIDDEN
            }
            GatewayError::BudgetTruncated { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            GatewayError::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A stable, machine-readable code (OpenAI's `code`, metrics labels).
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::BadRequest { .. } => "invalid_request",
            GatewayError::Unprocessable(_) => "invalid_schema",
            GatewayError::UnknownRoute(_) => "route_not_found",
            GatewayError::WrongRouteType { .. } => "wrong_route_type",
            GatewayError::NoSuchPath(_) => "not_found",
            GatewayError::MethodNotAllowed => "method_not_allowed",
            GatewayError::LoopDetected(_) => "loop_detected",
            GatewayError::PayloadTooLarge { .. } | GatewayError::BodyTooComplex { .. } => {
                "payload_too_large"
            }
            GatewayError::BodyTooDeep(_) => "invalid_request",
            GatewayError::GuardrailBlocked(_) => "guardrail_blocked",
            GatewayError::UnsupportedMediaType(_) => "unsupported_media_type",
            GatewayError::RouteNotReady { .. } => "route_not_ready",
            GatewayError::Upstream { .. } => "upstream_error",
            GatewayError::UpstreamMalformed(_) => "upstream_malformed_response",
            GatewayError::CredentialRejected { .. } => "upstream_credential_rejected",
            GatewayError::UpstreamUnreachable(_) => "upstream_unreachable",
            GatewayError::UpstreamConnectionLost(_) => "upstream_connection_lost",
            GatewayError::UpstreamTimeout(_) => "upstream_timeout",
            GatewayError::UpstreamStalled(_) => "upstream_stalled",
            GatewayError::UpstreamTruncated(_) => "upstream_truncated",
            GatewayError::Unauthenticated => "unauthenticated",
            GatewayError::InvalidToken(_) => "invalid_token",
            GatewayError::AuthUnavailable => "auth_unavailable",
            GatewayError::RateLimited(_) => "rate_limit_exceeded",
            GatewayError::NotInTeamRoutes { .. } => "route_not_in_team",
            GatewayError::UnpricedForBudget { .. } => "route_unpriced",
            GatewayError::BudgetTruncated { .. } => "budget_exceeded",
            GatewayError::BodyTimeout => "request_timeout",
            GatewayError::Overloaded | GatewayError::BuffersFull => "overloaded",
        }
    }

    pub fn param(&self) -> Option<&'static str> {
        match self {
            GatewayError::BadRequest { param, .. } => *param,
            _ => None,
        }
    }

    pub fn retry_after(&self) -> Option<u64> {
        match self {
            GatewayError::Upstream { retry_after, .. } => *retry_after,
            GatewayError::RateLimited(limited) => Some(limited.retry_after),
            GatewayError::AuthUnavailable
            | GatewayError::Overloaded
            | GatewayError::BuffersFull => Some(1),
            _ => None,
        }
    }

    /// Maps a provider failure; the caller has already removed credential echoes from messages.
    pub fn from_provider(err: ProviderError) -> Self {
        match err {
            ProviderError::Unsupported(message) => GatewayError::bad_request(message),
            ProviderError::MalformedResponse(message) => GatewayError::UpstreamMalformed(message),
            ProviderError::Upstream {
                status,
                message,
                retry_after,
            } => GatewayError::Upstream {
                status,
                message,
                retry_after,
                request_scoped: false,
            },
        }
    }
}

/// Upstream 4xx (429 included) keep their status so callers can act on them; upstream overload
/// stays 503 (Anthropic's 529 included); any other upstream failure is the gateway's 502.
fn upstream_status(status: StatusCode) -> StatusCode {
    match status.as_u16() {
        400..=499 => status,
        503 | 529 => StatusCode::SERVICE_UNAVAILABLE,
        504 => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    }
}

/// OpenAI's error type word for a status.
fn openai_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

/// The headers that go with an error: `Retry-After`, OpenAI's `x-ratelimit-*` on 429, and the
/// auth scheme on 401.
fn with_headers(mut response: Response, err: &GatewayError) -> Response {
    let headers = response.headers_mut();
    if let Some(secs) = err.retry_after() {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    match err {
        GatewayError::Unauthenticated => {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        GatewayError::InvalidToken(_) => {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Bearer error="invalid_token""#),
            );
        }
        GatewayError::RateLimited(limited) => {
            for (suffix, window) in [
                ("requests", limited.requests),
                ("tokens", limited.tokens),
                ("usd", limited.usd),
            ] {
                let Some(WindowState {
                    limit,
                    remaining,
                    reset,
                }) = window
                else {
                    continue;
                };
                // USD budgets count nanodollars; their headers are in dollars.
                let amount = |n: u64| match suffix {
                    "usd" => crate::cost::Usd(n.saturating_mul(1000)).format(2),
                    _ => n.to_string(),
                };
                for (name, value) in [
                    ("limit", amount(limit)),
                    ("remaining", amount(remaining)),
                    ("reset", reset_text(reset)),
                ] {
                    if let (Ok(n), Ok(v)) = (
                        http::HeaderName::try_from(format!("x-ratelimit-{name}-{suffix}")),
                        HeaderValue::try_from(value),
                    ) {
                        headers.insert(n, v);
                    }
                }
            }
        }
        _ => {}
    }
    response
}

/// A duration as OpenAI writes `x-ratelimit-reset-*`: `20ms`, `59s`, `6m0s`, `1h2m3s`.
fn reset_text(d: std::time::Duration) -> String {
    if d < std::time::Duration::from_secs(1) {
        return format!("{}ms", d.as_millis());
    }
    let secs = d.as_secs_f64().ceil() as u64;
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

/// The error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
pub struct OpenAiError(pub GatewayError);

impl From<GatewayError> for OpenAiError {
    fn from(e: GatewayError) -> Self {
        OpenAiError(e)
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let status = self.0.status();
        let body = json!({"error": {
            "message": self.0.to_string(),
            "type": openai_type(status),
            "param": self.0.param(),
            "code": self.0.code(),
        }});
        with_headers((status, Json(body)).into_response(), &self.0)
    }
}

/// The error in MLflow's shape: `{"detail": "..."}`.
pub struct MlflowError(pub GatewayError);

impl From<GatewayError> for MlflowError {
    fn from(e: GatewayError) -> Self {
        MlflowError(e)
    }
}

impl IntoResponse for MlflowError {
    fn into_response(self) -> Response {
        let status = self.0.status();
        with_headers(
            (status, Json(json!({"detail": self.0.to_string()}))).into_response(),
            &self.0,
        )
    }
}

/// Anthropic's error type word for a status.
pub fn anthropic_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

/// The message of an error as Anthropic's clients read it: they send their key as `x-api-key`.
pub fn anthropic_message(err: &GatewayError) -> String {
    match err {
        GatewayError::Unauthenticated => "missing or invalid credentials: send a ServiceAccount token or an API key as 'x-api-key: <credential>' or 'Authorization: Bearer <credential>'".into(),
        other => other.to_string(),
    }
}

/// The error in Anthropic's shape: `{"type": "error", "error": {"type", "message"}}`.
pub struct AnthropicError(pub GatewayError);

impl From<GatewayError> for AnthropicError {
    fn from(e: GatewayError) -> Self {
        AnthropicError(e)
    }
}

impl IntoResponse for AnthropicError {
    fn into_response(self) -> Response {
        let status = self.0.status();
        let body = json!({"type": "error", "error": {
            "type": anthropic_type(status),
            "message": anthropic_message(&self.0),
        }});
        with_headers((status, Json(body)).into_response(), &self.0)
    }
}

/// Which body shape errors take on a path: MLflow's under its prefixes, Anthropic's on
/// `/v1/messages`, OpenAI's elsewhere.
pub fn for_path(path: &str, err: GatewayError) -> Response {
    if path == "/v1/messages" || path.starts_with("/v1/messages/") {
        return AnthropicError(err).into_response();
    }
    if ["/api/", "/gateway/", "/endpoints/"]
        .iter()
        .any(|p| path.starts_with(p))
    {
        MlflowError(err).into_response()
    } else {
        OpenAiError(err).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_statuses_map_per_contract() {
        let up = |s: u16| {
            GatewayError::Upstream {
                status: StatusCode::from_u16(s).unwrap(),
                message: String::new(),
                retry_after: None,
                request_scoped: false,
            }
            .status()
            .as_u16()
        };
        assert_eq!(up(400), 400);
        assert_eq!(up(401), 401);
        assert_eq!(up(429), 429);
        assert_eq!(up(500), 502);
        assert_eq!(up(503), 503);
        assert_eq!(up(529), 503);
    }

    #[test]
    fn deterministic_errors_never_use_retryable_statuses() {
        let retryable = [429, 500, 502, 503];
        for e in [
            GatewayError::bad_request("x"),
            GatewayError::Unprocessable("x".into()),
            GatewayError::UnknownRoute("r".into()),
            GatewayError::PayloadTooLarge { limit: 1 },
            GatewayError::UnsupportedMediaType("x".into()),
            GatewayError::MethodNotAllowed,
            GatewayError::Unauthenticated,
        ] {
            assert!(!retryable.contains(&e.status().as_u16()), "{e:?}");
        }
    }

    #[test]
    fn rate_limited_renders_openai_headers() {
        let err = GatewayError::RateLimited(Box::new(RateLimited {
            message: "rate limit exceeded".into(),
            retry_after: 42,
            requests: Some(WindowState {
                limit: 10,
                remaining: 0,
                reset: std::time::Duration::from_secs(42),
            }),
            tokens: None,
            usd: Some(WindowState {
                limit: 1_000_000_000,
                remaining: 5_000_000,
                reset: std::time::Duration::from_secs(3600),
            }),
        }));
        let response = OpenAiError(err).into_response();
        assert_eq!(response.status(), 429);
        let h = response.headers();
        assert_eq!(h["retry-after"], "42");
        assert_eq!(h["x-ratelimit-limit-requests"], "10");
        assert_eq!(h["x-ratelimit-remaining-requests"], "0");
        assert_eq!(h["x-ratelimit-reset-requests"], "42s");
        assert!(h.get("x-ratelimit-limit-tokens").is_none());
        assert_eq!(h["x-ratelimit-limit-usd"], "1.00");
        assert_eq!(h["x-ratelimit-remaining-usd"], "0.005");
        assert_eq!(h["x-ratelimit-reset-usd"], "1h0m0s");
        let mlflow = MlflowError(GatewayError::Unauthenticated).into_response();
        assert_eq!(mlflow.status(), 401);
        assert_eq!(mlflow.headers()["www-authenticate"], "Bearer");
    }

    #[test]
    fn reset_texts_follow_openai() {
        let t = |ms: u64| reset_text(std::time::Duration::from_millis(ms));
        assert_eq!(t(20), "20ms");
        assert_eq!(t(59_000), "59s");
        assert_eq!(t(360_000), "6m0s");
        assert_eq!(t(3_723_000), "1h2m3s");
    }

    #[test]
    fn errors_answer_in_the_dialect_of_the_path() {
        let body = |path: &str| {
            let response = for_path(path, GatewayError::MethodNotAllowed);
            assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
            futures::executor::block_on(axum::body::to_bytes(response.into_body(), 1 << 16))
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        for path in [
            "/api/2.0/gateway/routes/",
            "/gateway/x/invocations",
            "/endpoints/x/invocations",
        ] {
            assert!(body(path).starts_with(r#"{"detail":"#), "{path}");
        }
        assert!(body("/v1/models").starts_with(r#"{"error":"#));
        assert!(body("/v1/responses").starts_with(r#"{"error":"#));
        for path in ["/v1/messages", "/v1/messages/count_tokens"] {
            let v: serde_json::Value = serde_json::from_str(&body(path)).unwrap_or_default();
            assert_eq!(v["type"], "error", "{path}");
            assert_eq!(v["error"]["type"], "invalid_request_error", "{path}");
        }
        assert!(body("/nowhere").starts_with(r#"{"error":"#));
    }

    #[test]
    fn schema_violations_become_422_and_keep_their_message() {
        let e = GatewayError::bad_param("n", "'n' must be an integer").schema_violation();
        assert_eq!(e.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(e.to_string(), "'n' must be an integer");
        assert_eq!(
            GatewayError::UnknownRoute("r".into())
                .schema_violation()
                .status(),
            404
        );
    }
}
