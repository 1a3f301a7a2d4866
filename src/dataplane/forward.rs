//! Forwarding a unified request to a route's provider and back: the only place that talks upstream.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};

use super::AppState;
use super::admission::{self, Admission};
use super::error::GatewayError;
use super::observe;
use super::observe::CallCost;
use crate::access::Identity;
use crate::api::{RetryOn, RouteType};
use crate::cost::{Price, Tokens};
use crate::limits::Spent;
use crate::llm::Usage;
use crate::llm::{
    Embeddings as LlmEmbeddings, Generation as LlmGeneration, LlmRequest, LlmResponse,
    NativeAnswer, StreamDelta,
};
use crate::providers::{ProviderError, StreamDecoder, join_embeddings, split_inputs};
use crate::table::{Backend, Backends, RouteEntry, RouteState, Upstream};
use crate::telemetry::metrics::{
    BackendErrorLabels, CostLabels, ErrorLabels, Metrics, RouteLabels, TokenLabels,
};
use crate::telemetry::tracecontext;
use crate::traffic;
use tracing::{Instrument, Span, debug, warn};

/// A route looked up for serving: the entry is held by `Arc`, so a table swap during the call is harmless.
pub struct ServingRoute {
    pub entry: Arc<RouteEntry>,
    backends: Arc<Backends>,
    caller: Option<Identity>,
}

impl ServingRoute {
    /// The providers of the route's backends (a surface passes provider-only fields through only
    /// when every backend understands them).
    pub fn providers(&self) -> impl Iterator<Item = crate::api::Provider> + '_ {
        self.backends
            .list
            .iter()
            .map(|b| b.upstream.adapter.provider())
    }
}

/// Finds `name` for its caller (see `admission::authorize`) and checks it can serve `route_type`.
pub async fn lookup(
    state: &AppState,
    name: &str,
    route_type: RouteType,
) -> Result<ServingRoute, GatewayError> {
    resolve(state, name, Some(route_type)).await
}

/// Finds `name` for a per-route path, where the route's own type decides the request shape.
pub async fn lookup_route(state: &AppState, name: &str) -> Result<ServingRoute, GatewayError> {
    resolve(state, name, None).await
}

async fn resolve(
    state: &AppState,
    name: &str,
    route_type: Option<RouteType>,
) -> Result<ServingRoute, GatewayError> {
    let (entry, caller) = admission::authorize(state, name).await?;
    observe::note(|c| {
        c.route = Some(entry.name.clone());
        c.provider = Some(entry.provider.as_str());
        c.model = Some(entry.model.clone());
        c.operation = Some(operation(entry.route_type));
    });
    if let Some(requested) = route_type.filter(|t| *t != entry.route_type) {
        return Err(GatewayError::WrongRouteType {
            route: name.to_string(),
            actual: entry.route_type,
            requested,
        });
    }
    match &entry.state {
        RouteState::Ready(backends) => Ok(ServingRoute {
            backends: Arc::clone(backends),
            entry,
            caller,
        }),
        RouteState::NotReady { reason, message } => Err(GatewayError::RouteNotReady {
            route: name.to_string(),
            reason: *reason,
            message: message.clone(),
        }),
    }
}

/// The failure class of an upstream error, for retries and outlier detection; `None` for errors
/// that say nothing about the backend's health (a 400, a content policy refusal).
fn failure_class(err: &GatewayError) -> Option<RetryOn> {
    match err {
        GatewayError::Upstream { status, .. } if status.as_u16() == 429 => {
            Some(RetryOn::RateLimited)
        }
        GatewayError::Upstream { status, .. }
            if status.is_server_error() || status.as_u16() == 529 =>
        {
            Some(RetryOn::Unavailable)
        }
        GatewayError::UpstreamTimeout(_) | GatewayError::UpstreamStalled(_) => {
            Some(RetryOn::Timeout)
        }
        // Only a failure before the request was written: retrying it cannot bill twice.
        GatewayError::UpstreamUnreachable(_) => Some(RetryOn::ConnectFailure),
        // A stream closed before its first chunk, or a connection lost after the request was
        // sent, is a provider that went away mid-answer (and may bill it).
        GatewayError::UpstreamTruncated(_) | GatewayError::UpstreamConnectionLost(_) => {
            Some(RetryOn::Unavailable)
        }
        _ => None,
    }
}

/// Whether the provider may have billed a try that ended in `err`: the request was sent and no
/// usable answer (with its usage) came back. Such a call is settled at no less than its
/// reservation; errors the provider answered (4xx, 5xx) and failures to connect are refunded.
fn may_have_billed(err: &GatewayError) -> bool {
    matches!(
        err,
        GatewayError::UpstreamTimeout(_)
            | GatewayError::UpstreamStalled(_)
            | GatewayError::UpstreamMalformed(_)
            | GatewayError::UpstreamTruncated(_)
            | GatewayError::UpstreamConnectionLost(_)
    )
}

/// The tries of one call across a route's backends: which backend next, with how much time, and
/// whether a failure is retried. Health and per-backend metrics are updated as tries end.
struct Tries<'a> {
    state: &'a AppState,
    route: &'a ServingRoute,
    /// The whole call's deadline: no try starts after it, none runs past it.
    deadline: Instant,
    tried: u32,
    count: u32,
    /// A failed try may have been billed (see `may_have_billed`).
    billed: bool,
}

impl<'a> Tries<'a> {
    fn new(state: &'a AppState, route: &'a ServingRoute) -> Self {
        Tries {
            state,
            route,
            deadline: Instant::now() + state.upstream_timeout,
            tried: 0,
            count: 0,
            billed: false,
        }
    }

    /// The backend for the next try and the time it may take.
    fn next(&mut self) -> Result<(&'a Backend, Duration), GatewayError> {
        let list = &self.route.backends.list;
        // Reconcile publishes a route as ready only with a backend of positive weight.
        let Some((index, backend)) = traffic::pick(list, self.tried, traffic::now_ms())
            .and_then(|i| Some((i, list.get(i)?)))
        else {
            return Err(GatewayError::UpstreamUnreachable(format!(
                "route {:?} has no backend that can take calls",
                self.route.entry.name
            )));
        };
        self.tried |= 1 << index;
        self.count += 1;
        backend
            .metrics(&self.route.entry.name, &self.state.metrics)
            .requests
            .inc();
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        let timeout = self
            .route
            .backends
            .policy
            .per_try_timeout
            .map_or(remaining, |t| t.min(remaining));
        Ok((backend, timeout))
    }

    /// Records how a try ended; `Continue` when the call is to be tried again.
    fn settle<T>(
        &mut self,
        backend: &Backend,
        result: Result<T, GatewayError>,
    ) -> ControlFlow<Result<T, GatewayError>> {
        let metrics = backend.metrics(&self.route.entry.name, &self.state.metrics);
        let err = match result {
            Ok(answer) => {
                if backend.health.succeeded(traffic::now_ms()) {
                    metrics.ejected.set(0);
                }
                self.note_answered(backend);
                return ControlFlow::Break(Ok(answer));
            }
            Err(e) => e,
        };
        self.state
            .metrics
            .backend_errors
            .get_or_create(&BackendErrorLabels {
                route: metrics.labels.route.clone(),
                backend: metrics.labels.backend.clone(),
                error_type: err.code(),
            })
            .inc();
        if matches!(err, GatewayError::CredentialRejected { .. }) {
            backend.health.credential_rejected();
        }
        self.billed |= may_have_billed(&err);
        let Some(class) = failure_class(&err) else {
            self.note_answered(backend);
            return ControlFlow::Break(Err(err));
        };
        let policy = &self.route.backends.policy;
        let retry_after = err.retry_after().filter(|_| class == RetryOn::RateLimited);
        // A 429 that concerns this request alone is retried but says nothing of the backend.
        let scoped = matches!(
            err,
            GatewayError::Upstream {
                request_scoped: true,
                ..
            }
        );
        if !scoped
            && let Some(hold) =
                backend
                    .health
                    .failed(&policy.outlier, retry_after, traffic::now_ms())
        {
            metrics.ejections.inc();
            metrics.ejected.set(1);
            warn!(route = %self.route.entry.name, backend = %backend.id, ejected_ms = hold.as_millis() as u64, error = err.code(), "backend ejected");
        }
        let retry =
            policy.retries(class) && self.count < policy.attempts && Instant::now() < self.deadline;
        if !retry {
            self.note_answered(backend);
            return ControlFlow::Break(Err(err));
        }
        metrics.retries.inc();
        debug!(route = %self.route.entry.name, backend = %backend.id, error = err.code(), attempt = self.count, "retrying on another backend");
        ControlFlow::Continue(())
    }

    /// The backend that gave the call's answer, for the response header, log line and metrics.
    fn note_answered(&self, backend: &Backend) {
        let answered = observe::Answered {
            backend: Arc::clone(&backend.id),
            header: backend.header.clone(),
            attempts: self.count,
        };
        let provider = backend.upstream.adapter.provider().as_str();
        observe::note(|c| {
            c.provider = Some(provider);
            c.answered = Some(answered);
        });
    }
}

/// Non-streaming call: one parsed answer, from the first backend that gives one.
pub async fn invoke(
    state: &AppState,
    route: &ServingRoute,
    request: &LlmRequest,
) -> Result<LlmResponse, GatewayError> {
    let calls = fan_out(route, request)?;
    let admission =
        admission::admit(state, &route.entry, route.caller.as_ref(), request, calls).await?;
    let started = Instant::now();
    let mut tries = Tries::new(state, route);
    let mut last = None;
    let result = loop {
        let (backend, timeout) = match tries.next() {
            Ok(next) => next,
            Err(e) => break Err(e),
        };
        last = Some(backend);
        let answer = call_backend(state, route.entry.route_type, backend, request, timeout).await;
        if let ControlFlow::Break(result) = tries.settle(backend, answer) {
            break result;
        }
    };
    let labels = route_labels(&route.entry);
    state
        .metrics
        .upstream_duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    match (&result, last) {
        (Ok(answer), Some(backend)) => {
            let usage = match answer {
                LlmResponse::Generation(LlmGeneration { usage, .. })
                | LlmResponse::Embeddings(LlmEmbeddings { usage, .. })
                | LlmResponse::Native(NativeAnswer { usage, .. }) => usage,
            };
            let consumer = observe::consumer();
            record_usage(&state.metrics, &route.entry, &consumer, usage);
            let tokens = Tokens::from_usage(usage).unwrap_or_else(|| Tokens {
                input: admission.prompt_estimate,
                cached: 0,
                output: admission::tokens_for_chars(answer_chars(answer)),
            });
            let priced = Priced::of(backend);
            let cost = record_cost(&state.metrics, &route.entry, &consumer, &priced, tokens);
            observe::note(|c| c.cost = Some(cost));
            let spent = priced.spent(tokens);
            if tries.billed {
                // An earlier try may have been billed too.
                admission.settle_at_least(admission::used_tokens(usage).unwrap_or(0), spent);
            } else {
                admission.settle_usage(usage, spent);
            }
        }
        (Ok(_), None) => admission.refund(),
        (Err(e), _) => {
            record_error(&state.metrics, &route.entry, e);
            if tries.billed {
                // The provider may have billed it: the reservation stands.
                drop(admission);
            } else {
                admission.refund();
            }
        }
    }
    result
}

/// Characters of generated text in an answer (what a call without a usage report is charged for).
fn answer_chars(answer: &LlmResponse) -> usize {
    match answer {
        LlmResponse::Generation(g) => g.choices.iter().map(|c| c.text.len()).sum(),
        LlmResponse::Embeddings(_) => 0,
        LlmResponse::Native(n) => n.chars,
    }
}

/// The backend that answered, as its cost is counted.
struct Priced {
    price: Option<Price>,
    /// The price Team budgets are charged (never below the cluster-wide price).
    team_price: Option<Price>,
    provider: &'static str,
    model: Arc<str>,
}

impl Priced {
    fn of(backend: &Backend) -> Priced {
        Priced {
            price: backend.price,
            team_price: backend.team_price,
            provider: backend.upstream.adapter.provider().as_str(),
            model: Arc::clone(&backend.model),
        }
    }

    /// What `tokens` cost the Route's and the Teams' budgets; `None` when unknown.
    fn spent(&self, tokens: Tokens) -> Option<Spent> {
        let route = self.price?.cost(tokens);
        Some(Spent {
            route,
            team: self.team_price.map_or(route, |p| p.cost(tokens)),
        })
    }
}

/// The cost of an answered call at its backend's price, counted in `portcullis_cost_usd_total`.
fn record_cost(
    metrics: &Metrics,
    entry: &RouteEntry,
    consumer: &str,
    backend: &Priced,
    tokens: Tokens,
) -> CallCost {
    let labels = || CostLabels {
        route: entry.name.clone(),
        gen_ai_provider_name: backend.provider,
        gen_ai_request_model: backend.model.clone(),
        consumer: consumer.to_string(),
    };
    match backend.price {
        Some(price) => {
            let usd = price.cost(tokens);
            metrics.cost.usd.get_or_create(&labels()).add(usd);
            CallCost::Known(usd)
        }
        None => {
            metrics.cost.unknown.get_or_create(&labels()).inc();
            CallCost::Unknown
        }
    }
}

/// Most embeddings inputs one request may have when a backend takes few per call (Titan: one),
/// so that one request cannot become an unbounded number of upstream calls.
pub const MAX_FAN_OUT_INPUTS: usize = 128;
/// Upstream calls of one fanned-out request in flight at once.
const FAN_OUT_CONCURRENCY: usize = 8;

/// How many upstream calls `request` costs at most on this route's backends (the calls charged
/// against its limits); a 400 when it has more inputs than a fanned-out request may.
fn fan_out(route: &ServingRoute, request: &LlmRequest) -> Result<u64, GatewayError> {
    let LlmRequest::Embeddings(e) = request else {
        return Ok(1);
    };
    let per_call = route
        .backends
        .list
        .iter()
        .filter_map(|b| {
            b.upstream
                .adapter
                .max_inputs_per_call(&b.upstream.target, route.entry.route_type)
        })
        .min();
    let Some(per_call) = per_call.filter(|n| *n > 0) else {
        return Ok(1);
    };
    if e.input.len() > per_call && e.input.len() > MAX_FAN_OUT_INPUTS {
        return Err(GatewayError::bad_param(
            "input",
            format!(
                "this route's provider takes {per_call} input(s) per call; send at most {MAX_FAN_OUT_INPUTS} inputs per request"
            ),
        ));
    }
    Ok(e.input.len().div_ceil(per_call).max(1) as u64)
}

/// One try on one backend. Providers that take few embeddings inputs per call (Titan) get one
/// call per batch, a few at a time, joined in order.
async fn call_backend(
    state: &AppState,
    route_type: RouteType,
    backend: &Backend,
    request: &LlmRequest,
    timeout: Duration,
) -> Result<LlmResponse, GatewayError> {
    let upstream = &backend.upstream;
    let split = upstream
        .adapter
        .max_inputs_per_call(&upstream.target, route_type)
        .and_then(|max| split_inputs(request, max));
    let mut answer = match split {
        Some(parts) => {
            let mut answers = Vec::with_capacity(parts.len());
            for batch in parts.chunks(FAN_OUT_CONCURRENCY) {
                let calls = batch
                    .iter()
                    .map(|p| call_once(state, route_type, upstream, p, timeout));
                answers.extend(futures::future::try_join_all(calls).await?);
            }
            join_embeddings(answers).map_err(|e| provider_error(upstream, e))?
        }
        None => call_once(state, route_type, upstream, request, timeout).await?,
    };
    // Answers that do not name their model are named after the backend's.
    let model = match &mut answer {
        LlmResponse::Generation(g) => &mut g.model,
        LlmResponse::Embeddings(e) => &mut e.model,
        // Passed back untouched.
        LlmResponse::Native(_) => return Ok(answer),
    };
    if model.is_empty() {
        model.clone_from(&upstream.target.model);
    }
    Ok(answer)
}

async fn call_once(
    state: &AppState,
    route_type: RouteType,
    upstream: &Upstream,
    request: &LlmRequest,
    timeout: Duration,
) -> Result<LlmResponse, GatewayError> {
    let response = send(state, upstream, request, Some(timeout)).await?;
    let body = read_capped(response, state.upstream_limits.max_body)
        .await
        .map_err(|e| e.into_gateway(upstream, timeout))?;
    let answer = match request {
        LlmRequest::Native(_) => upstream.adapter.parse_native(body),
        _ => upstream
            .adapter
            .parse_response(&upstream.target, route_type, &body),
    };
    answer.map_err(|e| provider_error(upstream, e))
}

type Deltas = BoxStream<'static, Result<Vec<StreamDelta>, GatewayError>>;

/// A stream whose first deltas have arrived: the point after which it can no longer fall back.
struct Opened {
    first: Vec<StreamDelta>,
    rest: Deltas,
}

/// Streaming call: yields the deltas decoded from each upstream read as soon as it arrives.
/// A try that fails before its first deltas arrive falls back to another backend like a plain
/// call; after that an upstream failure ends the stream with an error item.
/// Dropping the stream (the client went away) drops the upstream response and cancels the call.
/// Also returns the answering backend's model, for chunks that do not name theirs.
pub async fn invoke_stream(
    state: &AppState,
    route: &ServingRoute,
    request: &LlmRequest,
) -> Result<
    (
        impl Stream<Item = Result<Vec<StreamDelta>, GatewayError>> + Send + 'static,
        String,
    ),
    GatewayError,
> {
    let admission =
        admission::admit(state, &route.entry, route.caller.as_ref(), request, 1).await?;
    let started = Instant::now();
    let mut tries = Tries::new(state, route);
    let opened = loop {
        let (backend, timeout) = match tries.next() {
            Ok(next) => next,
            Err(e) => break Err(e),
        };
        let opened = match tokio::time::timeout(
            timeout,
            open_stream(state, route.entry.route_type, backend, request),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(GatewayError::UpstreamTimeout(timeout.as_secs().max(1))),
        };
        if let ControlFlow::Break(result) = tries.settle(backend, opened) {
            break result.map(|o| (o, backend));
        }
    };
    let (opened, backend) = match opened {
        Ok(o) => o,
        Err(e) => {
            record_error(&state.metrics, &route.entry, &e);
            if tries.billed {
                // The provider may have billed it: the reservation stands.
                drop(admission);
            } else {
                admission.refund();
            }
            return Err(e);
        }
    };
    let allowance = admission.allowance();
    let observer = StreamObserver {
        allowance,
        truncated: false,
        metrics: Arc::clone(&state.metrics),
        entry: Arc::clone(&route.entry),
        consumer: observe::consumer(),
        started,
        first_chunk: None,
        usage: None,
        streamed_chars: 0,
        admission: Some(admission),
        priced: Priced::of(backend),
        billed: tries.billed,
        failed: false,
        finished: false,
    };
    let deltas = futures::stream::once(futures::future::ready(Ok(opened.first)))
        .chain(opened.rest)
        .filter(|item| futures::future::ready(!matches!(item, Ok(d) if d.is_empty())))
        .scan(observer, |observer, mut item| {
            if observer.truncated {
                // Ending here drops the upstream response, which cancels the provider's call.
                return futures::future::ready(None);
            }
            if let Some(cut) = observer.over_budget(&item) {
                observer.truncated = true;
                return futures::future::ready(Some(Err(cut)));
            }
            observer.see(&item);
            if let Ok(deltas) = &mut item {
                observer.price_usage(deltas);
            }
            futures::future::ready(Some(item))
        })
        .boxed();
    let deltas = Drained {
        inner: Some(deltas),
        done: false,
        limits: state.upstream_limits,
    };
    Ok((deltas, backend.upstream.target.model.clone()))
}

/// The caller's side of a stream. Dropped before its end (the caller went away), the rest of the
/// provider's stream is read in the background, within `UpstreamLimits::drain_time` and
/// `drain_bytes`, so that the call is charged the provider's final usage report (thinking, images
/// and tokens generated but never sent included) rather than the text the caller saw.
struct Drained {
    inner: Option<Deltas>,
    done: bool,
    limits: super::UpstreamLimits,
}

impl Stream for Drained {
    type Item = Result<Vec<StreamDelta>, GatewayError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let Some(inner) = self.inner.as_mut() else {
            return std::task::Poll::Ready(None);
        };
        let item = futures::ready!(inner.poll_next_unpin(cx));
        if item.is_none() {
            self.done = true;
        }
        std::task::Poll::Ready(item)
    }
}

impl Drop for Drained {
    fn drop(&mut self) {
        let Some(mut rest) = self.inner.take().filter(|_| !self.done) else {
            return;
        };
        // During shutdown there is no runtime to drain on: the reservation then stands.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let limits = self.limits;
        runtime.spawn(async move {
            let mut read = 0usize;
            let drain = async {
                while let Some(item) = rest.next().await {
                    read += item.as_ref().map_or(0, |d| d.iter().map(delta_bytes).sum());
                    if read > limits.drain_bytes {
                        warn!(
                            bytes = read,
                            "a stream left by its caller is larger than the drain limit; ending it"
                        );
                        return;
                    }
                }
            };
            if tokio::time::timeout(limits.drain_time, drain)
                .await
                .is_err()
            {
                warn!(
                    seconds = limits.drain_time.as_secs(),
                    "a stream left by its caller did not end within the drain limit; ending it"
                );
            }
            // Dropping `rest` here settles the call (`StreamObserver::drop`).
        });
    }
}

/// Bytes a decoded delta carries, for the drain limit.
fn delta_bytes(d: &StreamDelta) -> usize {
    d.text.as_ref().map_or(0, String::len)
        + d.raw.as_ref().map_or(0, bytes::Bytes::len)
        + d.tool_calls
            .iter()
            .map(|t| t.arguments.len())
            .sum::<usize>()
}

/// One provider stream being decoded.
struct Decoding {
    bytes: BoxStream<'static, reqwest::Result<Bytes>>,
    decoder: Box<dyn StreamDecoder>,
    upstream: Arc<Upstream>,
    /// Fires when the provider has sent nothing for the idle timeout; reset on every read.
    idle: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// Whether the provider's end marker (a finish reason) arrived.
    ended: bool,
}

/// Sends the request and reads until the first deltas (or the end of an empty stream).
async fn open_stream(
    state: &AppState,
    route_type: RouteType,
    backend: &Backend,
    request: &LlmRequest,
) -> Result<Opened, GatewayError> {
    let upstream = Arc::clone(&backend.upstream);
    let mut decoder = match request {
        LlmRequest::Native(_) => upstream.adapter.native_stream_decoder().ok_or_else(|| {
            GatewayError::from_provider(crate::providers::native_unsupported(
                upstream.adapter.provider(),
            ))
        })?,
        _ => upstream.adapter.stream_decoder(route_type),
    };
    let response = send(state, &upstream, request, None).await?;
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
                    let provider = d.upstream.adapter.provider();
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
                        let provider = d.upstream.adapter.provider();
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
fn upstream_span(upstream: &Upstream, request: &LlmRequest) -> Span {
    if !tracecontext::exporting() {
        return Span::none();
    }
    let operation = operation(request.route_type());
    tracing::info_span!(
        "gen_ai upstream",
        otel.name = %format!("{operation} {}", upstream.target.model),
        otel.kind = "client",
        gen_ai.operation.name = operation,
        gen_ai.provider.name = upstream.adapter.provider().as_str(),
        gen_ai.request.model = %upstream.target.model,
    )
}

fn operation(route_type: RouteType) -> &'static str {
    match route_type {
        RouteType::Chat => "chat",
        RouteType::Completions => "text_completion",
        RouteType::Embeddings => "embeddings",
    }
}

fn route_labels(entry: &RouteEntry) -> RouteLabels {
    RouteLabels {
        route: entry.name.clone(),
        gen_ai_provider_name: entry.provider.as_str(),
        gen_ai_operation_name: operation(entry.route_type),
    }
}

/// Token counters, and the usage fields of the request log line.
fn record_usage(metrics: &Metrics, entry: &RouteEntry, consumer: &str, usage: &Usage) {
    for (kind, count) in [
        ("input", usage.prompt_tokens),
        ("output", usage.completion_tokens),
    ] {
        if let Some(n) = count {
            let labels = TokenLabels {
                route: entry.name.clone(),
                gen_ai_provider_name: entry.provider.as_str(),
                gen_ai_request_model: entry.model.clone(),
                consumer: consumer.to_string(),
                gen_ai_token_type: kind,
            };
            metrics.tokens.get_or_create(&labels).inc_by(n);
        }
    }
    let usage = *usage;
    observe::note(|c| c.usage = Some(usage));
}

fn record_error(metrics: &Metrics, entry: &RouteEntry, err: &GatewayError) {
    let labels = ErrorLabels {
        route: entry.name.clone(),
        gen_ai_provider_name: entry.provider.as_str(),
        error_type: err.code(),
    };
    metrics.upstream_errors.get_or_create(&labels).inc();
}

/// Records a stream's metrics as it passes: time to first token, usage, errors, and the total
/// upstream time when the stream ends or the client goes away (on drop).
struct StreamObserver {
    metrics: Arc<Metrics>,
    entry: Arc<RouteEntry>,
    consumer: String,
    started: Instant,
    first_chunk: Option<Instant>,
    usage: Option<Usage>,
    /// Text seen so far: what an early-ended stream is charged when no usage arrived.
    streamed_chars: usize,
    admission: Option<Admission>,
    priced: Priced,
    /// What a `truncate` budget lets this stream spend, and that budget.
    allowance: Option<(crate::cost::Usd, String)>,
    /// Ended by its budget: charged what was sent, whatever usage arrives.
    truncated: bool,
    /// A try before this one may have been billed.
    billed: bool,
    /// The provider's stream failed (broke, stalled, cut): it may have billed more than was sent.
    failed: bool,
    /// The provider's end marker (a finish reason) arrived.
    finished: bool,
}

impl StreamObserver {
    /// The final event when passing these deltas would take the stream's cost past its allowance.
    fn over_budget(&self, item: &Result<Vec<StreamDelta>, GatewayError>) -> Option<GatewayError> {
        let (Some((allowed, budget)), Ok(deltas), Some(price)) =
            (self.allowance.as_ref(), item, self.priced.price)
        else {
            return None;
        };
        let text: usize = deltas
            .iter()
            .filter_map(|d| d.text.as_ref())
            .map(String::len)
            .sum();
        if text == 0 {
            return None;
        }
        let prompt = self.admission.as_ref().map_or(0, |a| a.prompt_estimate);
        let running = price.cost(Tokens {
            input: prompt,
            cached: 0,
            output: admission::tokens_for_chars(self.streamed_chars + text),
        });
        (running > *allowed).then(|| GatewayError::BudgetTruncated {
            budget: budget.clone(),
            allowed: allowed.format(2),
        })
    }

    fn see(&mut self, item: &Result<Vec<StreamDelta>, GatewayError>) {
        match item {
            Ok(deltas) => {
                if self.first_chunk.is_none() {
                    let now = Instant::now();
                    self.first_chunk = Some(now);
                    let ttft = now.duration_since(self.started).as_secs_f64();
                    self.metrics
                        .time_to_first_token
                        .get_or_create(&route_labels(&self.entry))
                        .observe(ttft);
                }
                // Tool-call arguments are output too.
                self.streamed_chars += deltas
                    .iter()
                    .map(|d| {
                        d.text.as_ref().map_or(0, String::len)
                            + d.tool_calls
                                .iter()
                                .map(|t| t.arguments.len())
                                .sum::<usize>()
                    })
                    .sum::<usize>();
                if let Some(usage) = deltas.iter().rev().find_map(|d| d.usage) {
                    self.usage = Some(usage);
                }
                self.finished |= deltas.iter().any(|d| d.finish_reason.is_some());
            }
            Err(e) => {
                self.failed = true;
                record_error(&self.metrics, &self.entry, e);
            }
        }
    }
}

impl StreamObserver {
    /// Notes the call's cost on the delta that reports usage, for dialects with a final usage
    /// chunk (the metric and the log line are written when the stream ends, on drop).
    fn price_usage(&self, deltas: &mut [StreamDelta]) {
        let Some(delta) = deltas.iter_mut().rev().find(|d| d.usage.is_some()) else {
            return;
        };
        let tokens = delta.usage.as_ref().and_then(Tokens::from_usage);
        delta.cost_usd = Some(match (self.priced.price, tokens) {
            (Some(price), Some(tokens)) => price.cost(tokens).to_string(),
            _ => "unknown".to_string(),
        });
    }
}

impl Drop for StreamObserver {
    fn drop(&mut self) {
        let labels = route_labels(&self.entry);
        self.metrics
            .upstream_duration
            .get_or_create(&labels)
            .observe(self.started.elapsed().as_secs_f64());
        if let Some(usage) = self.usage {
            record_usage(&self.metrics, &self.entry, &self.consumer, &usage);
        }
        // A stream cut short has no usage report: it costs the prompt and the text sent so far.
        let prompt_estimate = self.admission.as_ref().map_or(0, |a| a.prompt_estimate);
        let tokens = self
            .usage
            .as_ref()
            .filter(|_| !self.truncated)
            .and_then(Tokens::from_usage)
            .unwrap_or(Tokens {
                input: prompt_estimate,
                cached: 0,
                output: admission::tokens_for_chars(self.streamed_chars),
            });
        let cost = record_cost(
            &self.metrics,
            &self.entry,
            &self.consumer,
            &self.priced,
            tokens,
        );
        if let Some(admission) = self.admission.take() {
            let reported = self
                .usage
                .as_ref()
                .filter(|_| !self.truncated)
                .and_then(admission::used_tokens);
            let used = reported.unwrap_or(tokens.input.saturating_add(tokens.output));
            let spent = self.priced.spent(tokens);
            // Without the provider's usage, a stream that failed, or was left before its end
            // and not drained to it, may have been billed for more than was sent.
            let unknown = reported.is_none() && (self.failed || !self.finished);
            if !self.truncated && (self.billed || unknown) {
                admission.settle_at_least(used, spent);
            } else {
                admission.settle(used, spent);
            }
        }
        tracing::info!(
            route = %self.entry.name,
            provider = self.entry.provider.as_str(),
            cost_usd = %cost,
            ttft_ms = self.first_chunk.map(|t| t.duration_since(self.started).as_secs_f64() * 1000.0),
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            prompt_tokens = self.usage.and_then(|u| u.prompt_tokens),
            completion_tokens = self.usage.and_then(|u| u.completion_tokens),
            "stream finished"
        );
    }
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
    let mut built = upstream
        .adapter
        .build_request(&upstream.target, request)
        .map_err(|e| provider_error(upstream, e))?;
    let span = upstream_span(upstream, request);
    tracecontext::inject(&span, &mut built.headers, observe::caller_traceparent());
    built.headers.insert(
        super::via::VIA,
        state.via.upstream_value(observe::caller_via().as_ref()),
    );
    let call = match upstream.url(&built.url) {
        Some(url) => state.http.request(built.method, url),
        None => state.http.request(built.method, built.url),
    };
    let mut call = call.headers(built.headers).body(built.body);
    if let Some(t) = timeout {
        call = call.timeout(t);
    }
    let response = call
        .send()
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
        *request_scoped = status.as_u16() == 429 && traffic::limits_have_room(&headers);
    }
    Err(err)
}

enum ReadError {
    /// Over the cap; the prefix read so far.
    TooLarge(Bytes),
    Transport(reqwest::Error),
}

impl ReadError {
    fn into_gateway(self, upstream: &Upstream, timeout: Duration) -> GatewayError {
        match self {
            ReadError::TooLarge(prefix) => GatewayError::UpstreamMalformed(format!(
                "the {} provider's answer is larger than the gateway's limit of {} bytes",
                upstream.adapter.provider(),
                prefix.len()
            )),
            ReadError::Transport(e) => transport_error(upstream, timeout, &e),
        }
    }
}

/// Reads a whole answer body, refusing one over `limit` bytes (never trusting Content-Length).
async fn read_capped(mut response: reqwest::Response, limit: usize) -> Result<Bytes, ReadError> {
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
fn provider_error(upstream: &Upstream, err: ProviderError) -> GatewayError {
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
                provider: upstream.adapter.provider(),
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
fn transport_error(upstream: &Upstream, timeout: Duration, err: &reqwest::Error) -> GatewayError {
    let provider = upstream.adapter.provider();
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// Sets its flag when dropped: the drained stream was let go.
    struct Released(Arc<AtomicBool>);

    impl Drop for Released {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    fn left_early(inner: Deltas, limits: super::super::UpstreamLimits) {
        drop(Drained {
            inner: Some(inner),
            done: false,
            limits,
        });
    }

    #[tokio::test]
    async fn a_stream_left_early_is_drained_within_its_time_and_byte_bounds() {
        let limits = super::super::UpstreamLimits {
            drain_time: Duration::from_millis(200),
            drain_bytes: 10_000,
            ..Default::default()
        };
        // An endless provider: drained until the byte bound.
        let (released, read) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (guard, count) = (Released(Arc::clone(&released)), Arc::clone(&read));
        let endless = futures::stream::repeat_with(move || {
            let _ = &guard;
            count.fetch_add(1, Ordering::SeqCst);
            Ok(vec![StreamDelta {
                text: Some("x".repeat(1000)),
                ..Default::default()
            }])
        });
        left_early(endless.boxed(), limits);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(released.load(Ordering::SeqCst));
        assert_eq!(read.load(Ordering::SeqCst), 11);

        // A silent one: drained until the time bound.
        let released = Arc::new(AtomicBool::new(false));
        let guard = Released(Arc::clone(&released));
        let silent =
            futures::stream::pending::<Result<Vec<StreamDelta>, GatewayError>>().map(move |x| {
                let _ = &guard;
                x
            });
        left_early(silent.boxed(), limits);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!released.load(Ordering::SeqCst), "still draining");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(released.load(Ordering::SeqCst));

        // A stream read to its end is not drained again.
        let released = Arc::new(AtomicBool::new(false));
        let guard = Released(Arc::clone(&released));
        let mut whole = Drained {
            inner: Some(
                futures::stream::iter([Ok(Vec::new())])
                    .map(move |x| {
                        let _ = &guard;
                        x
                    })
                    .boxed(),
            ),
            done: false,
            limits,
        };
        while whole.next().await.is_some() {}
        drop(whole);
        assert!(released.load(Ordering::SeqCst));
    }

    #[test]
    fn only_failures_before_the_request_was_written_are_connect_failures() {
        let lost = GatewayError::UpstreamConnectionLost("broke".into());
        assert_eq!(failure_class(&lost), Some(RetryOn::Unavailable));
        assert!(may_have_billed(&lost));
        let refused = GatewayError::UpstreamUnreachable("refused".into());
        assert_eq!(failure_class(&refused), Some(RetryOn::ConnectFailure));
        assert!(!may_have_billed(&refused));
        assert!(may_have_billed(&GatewayError::UpstreamTimeout(1)));
        assert!(!may_have_billed(&GatewayError::Upstream {
            status: http::StatusCode::INTERNAL_SERVER_ERROR,
            message: String::new(),
            retry_after: None,
            request_scoped: false,
        }));
    }
}
