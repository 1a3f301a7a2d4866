//! The HTTP call to one backend: the adapter's request sent with the shared client, answers read
//! within their caps, streams decoded as they arrive, and every error redacted of the route's
//! credentials before it goes anywhere.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use tracing::{Instrument, Span, warn};

use crate::api::RouteType;
use crate::dataplane::AppState;
use crate::dataplane::error::GatewayError;
use crate::dataplane::observe;
use crate::llm::{LlmRequest, LlmResponse, StreamDelta};
use crate::providers::{ProviderError, StreamDecoder};
use crate::table::{Backend, Upstream};
use crate::telemetry::tracecontext;

pub(super) async fn call_once(
    state: &AppState,
    route_type: RouteType,
    upstream: &Upstream,
    to: Option<SocketAddr>,
    request: &LlmRequest,
    timeout: Duration,
) -> Result<LlmResponse, GatewayError> {
    let response = send(state, upstream, to, request, Some(timeout)).await?;
    let body = read_capped(response, state.upstream_limits.max_body)
        .await
        .map_err(|e| e.into_gateway(upstream, timeout))?;
    let answer = match request {
        LlmRequest::Native(_) => upstream.adapter.parse_native(route_type, body),
        _ => upstream
            .adapter
            .parse_response(&upstream.target, route_type, &body),
    };
    answer.map_err(|e| provider_error(upstream, e))
}

pub(super) type Deltas = BoxStream<'static, Result<Vec<StreamDelta>, GatewayError>>;

/// A stream whose first deltas have arrived: the point after which it can no longer fall back.
pub(super) struct Opened {
    pub(super) first: Vec<StreamDelta>,
    pub(super) rest: Deltas,
}

/// One provider stream being decoded.
pub(super) struct Decoding {
    pub(super) bytes: BoxStream<'static, reqwest::Result<Bytes>>,
    pub(super) decoder: Box<dyn StreamDecoder>,
    pub(super) upstream: Arc<Upstream>,
    /// Fires when the provider has sent nothing for the idle timeout; reset on every read.
    pub(super) idle: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// Whether the provider's end marker (a finish reason) arrived.
    pub(super) ended: bool,
}

/// Sends the request and reads until the first deltas (or the end of an empty stream).
pub(super) async fn open_stream(
    state: &AppState,
    route_type: RouteType,
    backend: &Backend,
    to: Option<SocketAddr>,
    request: &LlmRequest,
) -> Result<Opened, GatewayError> {
    let upstream = Arc::clone(&backend.upstream);
    let mut decoder = match request {
        LlmRequest::Native(_) => upstream
            .adapter
            .native_stream_decoder(route_type)
            .ok_or_else(|| {
                GatewayError::from_provider(crate::providers::native_unsupported(
                    upstream.adapter.info().provider,
                ))
            })?,
        _ => upstream.adapter.stream_decoder(route_type),
    };
    let response = send(state, &upstream, to, request, None).await?;
    decoder.set_max_frame(state.upstream_limits.max_stream_event);
    let timeout = state.upstream_timeout;
    let idle = state.upstream_limits.stream_idle;
    let decode = Decoding {
        bytes: response.bytes_stream().boxed(),
        decoder,
        upstream,
        idle: Box::pin(tokio::time::sleep(idle)),
        ended: false,
    };
    let mut rest: Deltas = futures::stream::unfold(Some(Ok(decode)), move |st| async move {
        let mut d = match st? {
            Ok(d) => d,
            Err(e) => return Some((Err(e), None)),
        };
        let mut out = Vec::new();
        loop {
            let next = tokio::select! {
                next = d.bytes.next() => next,
                () = d.idle.as_mut() => {
                    let provider = d.upstream.adapter.info().provider;
                    warn!(%provider, idle_s = idle.as_secs_f64(), "provider stream stalled; ending it");
                    return Some((Err(GatewayError::UpstreamStalled(idle.as_secs().max(1))), None));
                }
            };
            d.idle.as_mut().reset(tokio::time::Instant::now() + idle);
            match next {
                Some(Ok(chunk)) => match d.decoder.feed(&chunk, &mut out) {
                    Ok(()) if out.is_empty() => continue,
                    Ok(()) => {
                        d.ended |= out.iter().any(|x| x.finish_reason.is_some());
                        return Some((Ok(out), Some(Ok(d))));
                    }
                    Err(e) => return Some((Err(provider_error(&d.upstream, e)), None)),
                },
                Some(Err(e)) => {
                    return Some((Err(transport_error(&d.upstream, timeout, &e)), None));
                }
                None => {
                    if let Err(e) = finish(d.decoder.as_mut(), &mut out) {
                        return Some((Err(provider_error(&d.upstream, e)), None));
                    }
                    d.ended |= out.iter().any(|x| x.finish_reason.is_some());
                    if !d.ended {
                        // Closed without the provider's end marker: never passed off as a full answer.
                        let provider = d.upstream.adapter.info().provider;
                        warn!(%provider, "provider stream ended without its end marker");
                        let cut = GatewayError::UpstreamTruncated(provider);
                        return Some(if out.is_empty() {
                            (Err(cut), None)
                        } else {
                            (Ok(out), Some(Err(cut)))
                        });
                    }
                    return (!out.is_empty()).then_some((Ok(out), None));
                }
            }
        }
    })
    .boxed();
    let first = match rest.next().await {
        Some(Ok(first)) => first,
        Some(Err(e)) => return Err(e),
        None => Vec::new(),
    };
    Ok(Opened { first, rest })
}

/// A client span for the provider call, only when traces are exported.
pub(super) fn upstream_span(upstream: &Upstream, request: &LlmRequest) -> Span {
    if !tracecontext::exporting() {
        return Span::none();
    }
    let operation = request.route_type().operation();
    tracing::info_span!(
        "gen_ai upstream",
        otel.name = %format!("{operation} {}", upstream.target.model),
        otel.kind = "client",
        gen_ai.operation.name = operation,
        gen_ai.provider.name = upstream.adapter.info().provider.as_str(),
        gen_ai.request.model = %upstream.target.model,
    )
}

pub(super) fn finish(
    decoder: &mut dyn StreamDecoder,
    out: &mut Vec<StreamDelta>,
) -> Result<(), ProviderError> {
    decoder.finish(out)
}

/// Sends the adapter's request; `to` (a pool's endpoint) replaces the URL's host and port.
pub(super) async fn send(
    state: &AppState,
    upstream: &Upstream,
    to: Option<SocketAddr>,
    request: &LlmRequest,
    timeout: Option<Duration>,
) -> Result<reqwest::Response, GatewayError> {
    let mut built = upstream
        .adapter
        .build_request(&upstream.target, request)
        .map_err(|e| provider_error(upstream, e))?;
    let span = upstream_span(upstream, request);
    tracecontext::inject(&span, &mut built.headers, observe::caller_traceparent());
    built.headers.insert(
        crate::dataplane::via::VIA,
        state.via.upstream_value(observe::caller_via().as_ref()),
    );
    let url = match (upstream.url(&built.url), to) {
        (Some(mut url), Some(to)) => {
            // A pool upstream's URL is `http://pool.invalid/...`: always has a host to replace.
            let _ = url.set_ip_host(to.ip());
            let _ = url.set_port(Some(to.port()));
            url
        }
        (Some(url), None) => url,
        (None, _) => {
            let provider = upstream.adapter.info().provider;
            return Err(GatewayError::UpstreamUnreachable(format!(
                "the request to the {provider} provider failed"
            )));
        }
    };
    // Built as a whole, not through the builder: the adapter's header map becomes the request's
    // instead of being copied into a second one.
    let mut call = reqwest::Request::new(built.method, url);
    *call.headers_mut() = built.headers;
    *call.body_mut() = Some(built.body.into());
    *call.timeout_mut() = timeout;
    let response = state
        .http
        .execute(call)
        .instrument(span)
        .await
        .map_err(|e| transport_error(upstream, state.upstream_timeout, &e))?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let headers = response.headers().clone();
    // Only the message matters: read a bounded prefix, and not for longer than the try may take.
    let limit = state.upstream_limits.max_error_body;
    let deadline = timeout.unwrap_or(state.upstream_timeout);
    let body = match tokio::time::timeout(deadline, read_capped(response, limit)).await {
        Ok(Ok(body)) => body,
        Ok(Err(ReadError::TooLarge(prefix))) => prefix,
        Ok(Err(ReadError::Transport(_))) | Err(_) => Bytes::new(),
    };
    let mut err = provider_error(
        upstream,
        upstream.adapter.parse_error(status, &headers, &body),
    );
    if let GatewayError::Upstream { request_scoped, .. } = &mut err {
        *request_scoped = status.as_u16() == 429 && crate::traffic::limits_have_room(&headers);
    }
    Err(err)
}

pub(super) enum ReadError {
    /// Over the cap; the prefix read so far.
    TooLarge(Bytes),
    Transport(reqwest::Error),
}

impl ReadError {
    pub(super) fn into_gateway(self, upstream: &Upstream, timeout: Duration) -> GatewayError {
        match self {
            ReadError::TooLarge(prefix) => GatewayError::UpstreamMalformed(format!(
                "the {} provider's answer is larger than the gateway's limit of {} bytes",
                upstream.adapter.info().provider,
                prefix.len()
            )),
            ReadError::Transport(e) => transport_error(upstream, timeout, &e),
        }
    }
}

/// Reads a whole answer body, refusing one over `limit` bytes (never trusting Content-Length).
pub(super) async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Bytes, ReadError> {
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response.chunk().await.map_err(ReadError::Transport)? {
        if body.len() + chunk.len() > limit {
            let room = limit - body.len();
            body.extend_from_slice(&chunk[..room]);
            return Err(ReadError::TooLarge(body.freeze()));
        }
        if body.is_empty() && chunk.len() == response.content_length().unwrap_or(0) as usize {
            // The common case, one chunk holding the whole body: no copy.
            return Ok(chunk);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

/// Provider errors with any echo of the route's credentials removed.
pub(super) fn provider_error(upstream: &Upstream, err: ProviderError) -> GatewayError {
    let redact = |m: String| upstream.target.credentials.redact(&m);
    GatewayError::from_provider(match err {
        ProviderError::Unsupported(m) => ProviderError::Unsupported(redact(m)),
        ProviderError::MalformedResponse(m) => ProviderError::MalformedResponse(redact(m)),
        // The provider refused the route's own credential: the operator's problem, never the
        // caller's authentication error.
        ProviderError::Upstream {
            status, message, ..
        } if matches!(status.as_u16(), 401 | 403) => {
            return GatewayError::CredentialRejected {
                provider: upstream.adapter.info().provider,
                status: status.as_u16(),
                message: redact(message),
            };
        }
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
pub(super) fn transport_error(
    upstream: &Upstream,
    timeout: Duration,
    err: &reqwest::Error,
) -> GatewayError {
    let provider = upstream.adapter.info().provider;
    // Only a failed connect (its timeout included) is known to precede the request: anything
    // later may have reached the provider.
    if err.is_connect() {
        GatewayError::UpstreamUnreachable(format!("could not connect to the {provider} provider"))
    } else if err.is_timeout() {
        GatewayError::UpstreamTimeout(timeout.as_secs().max(1))
    } else if err.is_builder() {
        GatewayError::UpstreamUnreachable(format!("the request to the {provider} provider failed"))
    } else if err.is_body() || err.is_decode() {
        GatewayError::UpstreamConnectionLost(format!(
            "the connection to the {provider} provider broke while reading its answer"
        ))
    } else {
        GatewayError::UpstreamConnectionLost(format!(
            "the connection to the {provider} provider broke after the request was sent"
        ))
    }
}
