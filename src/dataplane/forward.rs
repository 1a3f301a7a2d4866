//! Forwarding a unified request to a route's provider and back: the only place that talks upstream.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};

use super::AppState;
use super::error::GatewayError;
use crate::api::RouteType;
use crate::llm::{LlmRequest, LlmResponse, StreamDelta};
use crate::providers::{ProviderError, StreamDecoder, join_embeddings, split_inputs};
use crate::table::{RouteEntry, RouteState, Upstream};

/// A route looked up for serving: the entry is held by `Arc`, so a table swap during the call is harmless.
pub struct ServingRoute {
    pub entry: Arc<RouteEntry>,
    upstream: Arc<Upstream>,
}

/// Finds `name` in the current table and checks it can serve `route_type`.
pub fn lookup(
    state: &AppState,
    name: &str,
    route_type: RouteType,
) -> Result<ServingRoute, GatewayError> {
    let table = state.table.load();
    let entry = table
        .get(name)
        .ok_or_else(|| GatewayError::UnknownRoute(name.to_string()))?;
    if entry.route_type != route_type {
        return Err(GatewayError::WrongRouteType {
            route: name.to_string(),
            actual: entry.route_type,
            requested: route_type,
        });
    }
    match &entry.state {
        RouteState::Ready(upstream) => Ok(ServingRoute {
            entry: Arc::clone(entry),
            upstream: Arc::clone(upstream),
        }),
        RouteState::NotReady { reason, message } => Err(GatewayError::RouteNotReady {
            route: name.to_string(),
            reason: *reason,
            message: message.clone(),
        }),
    }
}

/// Non-streaming call: one parsed answer. Providers that take few embeddings inputs per call
/// (Titan) get one call per batch, sent concurrently and joined in order.
pub async fn invoke(
    state: &AppState,
    route: &ServingRoute,
    request: &LlmRequest,
) -> Result<LlmResponse, GatewayError> {
    let upstream = &route.upstream;
    let split = upstream
        .adapter
        .max_inputs_per_call(&upstream.target, route.entry.route_type)
        .and_then(|max| split_inputs(request, max));
    match split {
        Some(parts) => {
            let answers =
                futures::future::try_join_all(parts.iter().map(|p| invoke_one(state, route, p)))
                    .await?;
            join_embeddings(answers).map_err(|e| provider_error(upstream, e))
        }
        None => invoke_one(state, route, request).await,
    }
}

async fn invoke_one(
    state: &AppState,
    route: &ServingRoute,
    request: &LlmRequest,
) -> Result<LlmResponse, GatewayError> {
    let upstream = &route.upstream;
    let response = send(state, upstream, request, Some(state.upstream_timeout)).await?;
    let body = response
        .bytes()
        .await
        .map_err(|e| transport_error(upstream, state.upstream_timeout, &e))?;
    upstream
        .adapter
        .parse_response(&upstream.target, route.entry.route_type, &body)
        .map_err(|e| provider_error(upstream, e))
}

/// Streaming call: yields the deltas decoded from each upstream read as soon as it arrives.
/// Dropping the stream (the client went away) drops the upstream response and cancels the call.
pub async fn invoke_stream(
    state: &AppState,
    route: &ServingRoute,
    request: &LlmRequest,
) -> Result<impl Stream<Item = Result<Vec<StreamDelta>, GatewayError>> + Send + 'static, GatewayError>
{
    let response = send(state, &route.upstream, request, None).await?;
    let decoder = route
        .upstream
        .adapter
        .stream_decoder(route.entry.route_type);
    let upstream = Arc::clone(&route.upstream);
    let timeout = state.upstream_timeout;
    let bytes = response.bytes_stream();
    Ok(futures::stream::unfold(
        Some((bytes.boxed(), decoder, upstream)),
        move |st| async move {
            let (mut bytes, mut decoder, upstream) = st?;
            let mut out = Vec::new();
            loop {
                match bytes.next().await {
                    Some(Ok(chunk)) => match decoder.feed(&chunk, &mut out) {
                        Ok(()) if out.is_empty() => continue,
                        Ok(()) => return Some((Ok(out), Some((bytes, decoder, upstream)))),
                        Err(e) => return Some((Err(provider_error(&upstream, e)), None)),
                    },
                    Some(Err(e)) => {
                        return Some((Err(transport_error(&upstream, timeout, &e)), None));
                    }
                    None => {
                        return match finish(decoder.as_mut(), &mut out) {
                            Ok(()) if out.is_empty() => None,
                            Ok(()) => Some((Ok(out), None)),
                            Err(e) => Some((Err(provider_error(&upstream, e)), None)),
                        };
                    }
                }
            }
        },
    ))
}

fn finish(
    decoder: &mut dyn StreamDecoder,
    out: &mut Vec<StreamDelta>,
) -> Result<(), ProviderError> {
    decoder.finish(out)
}

async fn send(
    state: &AppState,
    upstream: &Upstream,
    request: &LlmRequest,
    timeout: Option<Duration>,
) -> Result<reqwest::Response, GatewayError> {
    let built = upstream
        .adapter
        .build_request(&upstream.target, request)
        .map_err(|e| provider_error(upstream, e))?;
    let mut call = state
        .http
        .request(built.method, built.url)
        .headers(built.headers)
        .body(built.body);
    if let Some(t) = timeout {
        call = call.timeout(t);
    }
    let response = call
        .send()
        .await
        .map_err(|e| transport_error(upstream, state.upstream_timeout, &e))?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let headers = response.headers().clone();
    let body: Bytes = response.bytes().await.unwrap_or_default();
    Err(provider_error(
        upstream,
        upstream.adapter.parse_error(status, &headers, &body),
    ))
}

/// Provider errors with any echo of the route's credentials removed.
fn provider_error(upstream: &Upstream, err: ProviderError) -> GatewayError {
    let redact = |m: String| upstream.target.credentials.redact(&m);
    GatewayError::from_provider(match err {
        ProviderError::Unsupported(m) => ProviderError::Unsupported(redact(m)),
        ProviderError::MalformedResponse(m) => ProviderError::MalformedResponse(redact(m)),
        ProviderError::Upstream {
            status,
            message,
            retry_after,
        } => ProviderError::Upstream {
            status,
            message: redact(message),
            retry_after,
        },
    })
}

/// Transport failures get fixed wording: reqwest's own text includes the URL, which may carry a key.
fn transport_error(upstream: &Upstream, timeout: Duration, err: &reqwest::Error) -> GatewayError {
    let provider = upstream.adapter.provider();
    if err.is_timeout() {
        GatewayError::UpstreamTimeout(timeout.as_secs().max(1))
    } else if err.is_connect() {
        GatewayError::UpstreamUnreachable(format!("could not connect to the {provider} provider"))
    } else if err.is_body() || err.is_decode() {
        GatewayError::UpstreamUnreachable(format!(
            "the connection to the {provider} provider broke while reading its answer"
        ))
    } else {
        GatewayError::UpstreamUnreachable(format!("the request to the {provider} provider failed"))
    }
}
