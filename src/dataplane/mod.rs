//! The data plane: an axum router serving the standard LLM API from the current routing table.
//!
//! Surfaces: `mlflow_gateway.rs` (MLflow 2.5), `mlflow_deployments.rs` (MLflow 2.9+), `openai.rs`,
//! `anthropic.rs` (Anthropic Messages), `responses.rs` (OpenAI Responses).
//! A request flows: surface handler parses its dialect into the unified model ->
//! `forward.rs` looks the route up in the table and calls the provider adapter -> the handler renders
//! the answer back in its dialect. Errors are `GatewayError`, rendered per surface in `error.rs`.

pub mod admission;
mod anthropic;
mod body;
pub mod error;
mod forward;
#[cfg(test)]
mod fuzz;
mod health;
pub mod intake;
pub mod listener;
mod listing;
mod mlflow_deployments;
mod mlflow_gateway;
mod observe;
mod openai;
mod reframe;
mod request;
pub mod resolver;
mod responses;
pub mod via;
pub mod workers;

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use axum::Router;
use axum::extract::OriginalUri;
use axum::routing::{any, get, post};

use crate::access::Authenticator;
use crate::limits::Limiter;
use crate::table::SharedTable;
use crate::telemetry::metrics::Metrics;
use error::GatewayError;
pub use health::ConfigStatus;
use mlflow_deployments::Endpoints;
use mlflow_gateway::Routes;

/// Everything a handler needs, passed explicitly as axum state.
#[derive(Clone)]
pub struct AppState {
    pub table: SharedTable,
    /// One pooled client for every upstream call.
    pub http: reqwest::Client,
    /// True once the controller has published a table built from a complete sync.
    pub ready: Arc<AtomicBool>,
    pub body_limit: usize,
    pub upstream_timeout: Duration,
    /// Routes per page of the MLflow listings.
    pub page_size: usize,
    pub metrics: Arc<Metrics>,
    /// Set on shutdown: readiness fails at once so load balancers stop sending new requests.
    pub draining: Arc<AtomicBool>,
    /// Who is calling (API keys, cached TokenReviews) and the gateway-wide default access.
    pub auth: Arc<Authenticator>,
    pub limits: Arc<Limiter>,
    /// Served from files: the loaded configuration's generation and last reload error (in /readyz).
    pub config: Option<Arc<ConfigStatus>>,
    pub upstream_limits: UpstreamLimits,
    /// This gateway's name in `x-portcullis-via`, shared by its replicas.
    pub via: via::Via,
    /// `--anonymous-team`: the Team callers without identity belong to.
    pub anonymous_team: Option<Arc<str>>,
    /// The response cache of Routes with `spec.cache`.
    pub cache: Arc<crate::cache::Cache>,
    /// Same-dialect calls pass through untranslated (`--no-pass-through` turns it off).
    pub pass_through: bool,
}

/// Bounds on what a provider may send back: nothing from outside is trusted to be small or quick.
#[derive(Clone, Copy, Debug)]
pub struct UpstreamLimits {
    /// Largest non-streaming answer read, in bytes.
    pub max_body: usize,
    /// Largest error body read (only its message is used), in bytes.
    pub max_error_body: usize,
    /// A stream that sends nothing for this long ends with an error.
    pub stream_idle: Duration,
    /// Largest single stream event (SSE event, NDJSON line, event-stream frame), in bytes.
    pub max_stream_event: usize,
    /// A stream the caller leaves before its end is read on in the background for at most this
    /// long, to charge the provider's final usage report.
    pub drain_time: Duration,
    /// ... and for at most this many bytes of decoded events.
    pub drain_bytes: usize,
}

impl Default for UpstreamLimits {
    fn default() -> Self {
        UpstreamLimits {
            max_body: 64 * 1024 * 1024,
            max_error_body: 1024 * 1024,
            stream_idle: Duration::from_secs(60),
            max_stream_event: crate::providers::sse::DEFAULT_MAX_FRAME,
            drain_time: Duration::from_secs(60),
            drain_bytes: 8 * 1024 * 1024,
        }
    }
}

/// The upstream HTTP client: pooled connections, bounded connect and read times.
pub fn http_client(
    upstream_timeout: Duration,
    egress: &crate::controller::policy::Egress,
) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        // Every resolved address is checked against the metadata deny-list at connect time.
        .dns_resolver(resolver::EgressResolver::new(egress.clone()))
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(upstream_timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        // A provider's redirect is an error, not a hop: following it would send the route's
        // credential headers to wherever it points (and past the operator's upstream host list).
        .redirect(reqwest::redirect::Policy::none())
        // Retries are the Route's traffic policy (forward.rs), never the client's own.
        .retry(reqwest::retry::never())
        .build()
}

/// The data plane's routes, with `beside` (routes of other gateways, such as MCP's) under the same
/// fallbacks and middleware.
pub fn router(state: Arc<AppState>, beside: Router<Arc<AppState>>) -> Router {
    Router::new()
        .route("/api/2.0/gateway/routes/", get(listing::list::<Routes>))
        .route("/api/2.0/gateway/routes", get(listing::list::<Routes>))
        .route(
            "/api/2.0/gateway/routes/{name}",
            get(listing::get::<Routes>),
        )
        // A qualified name `namespace/name` also works unencoded, as two path segments.
        .route(
            "/api/2.0/gateway/routes/{namespace}/{name}",
            get(listing::get::<Routes>),
        )
        .route("/gateway/{name}/invocations", post(mlflow_gateway::invoke))
        .route(
            "/gateway/{namespace}/{name}/invocations",
            post(mlflow_gateway::invoke),
        )
        .route("/api/2.0/endpoints/", get(listing::list::<Endpoints>))
        .route("/api/2.0/endpoints", get(listing::list::<Endpoints>))
        .route("/api/2.0/endpoints/{name}", get(listing::get::<Endpoints>))
        .route(
            "/api/2.0/endpoints/{namespace}/{name}",
            get(listing::get::<Endpoints>),
        )
        .route(
            "/endpoints/{name}/invocations",
            post(mlflow_deployments::invoke),
        )
        .route(
            "/endpoints/{namespace}/{name}/invocations",
            post(mlflow_deployments::invoke),
        )
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/v1/responses", post(responses::create))
        .route("/v1/responses/{*rest}", any(responses::stored))
        // Anthropic's clients (`anthropic-version`) get Anthropic's shapes, others OpenAI's.
        .route("/v1/models", get(anthropic::list_models))
        .route("/v1/models/{name}", get(anthropic::get_model))
        .route("/v1/models/{namespace}/{name}", get(anthropic::get_model))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/health", get(health::health))
        .merge(beside)
        .method_not_allowed_fallback(|OriginalUri(uri): OriginalUri| async move {
            error::for_path(uri.path(), GatewayError::MethodNotAllowed)
        })
        .fallback(|OriginalUri(uri): OriginalUri| async move {
            error::for_path(uri.path(), GatewayError::NoSuchPath(uri.path().to_string()))
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            observe::middleware,
        ))
        .with_state(state)
}

/// The metrics endpoint, served on its own port so it is never exposed with the data plane.
pub fn metrics_router(metrics: Arc<Metrics>) -> Router {
    Router::new().route(
        "/metrics",
        get(move || {
            let metrics = metrics.clone();
            async move {
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.encode(),
                )
            }
        }),
    )
}
