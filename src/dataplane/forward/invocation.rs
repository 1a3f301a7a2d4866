//! Serving one call: the route looked up for its caller, the call admitted against its limits,
//! then tried on the route's backends, plain (`invoke`) or streamed (`invoke_stream`).

use std::future::Future;
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};

use super::cached::{self, Cached, Recording};
use super::metering::{
    Priced, StreamObserver, answer_chars, record_cost, record_error, record_usage,
};
use super::serving::ServingRoute;
use super::tries::Tries;
use super::upstream::{call_once, open_stream, provider_error};
use crate::api::RouteType;
use crate::cost::Tokens;
use crate::dataplane::AppState;
use crate::dataplane::admission;
use crate::dataplane::error::GatewayError;
use crate::dataplane::observe;
use crate::guardrails::external::Services;
use crate::llm::{
    ChatMessage, ChatRequest, Content, Embeddings as LlmEmbeddings, Generation as LlmGeneration,
    LlmRequest, LlmResponse, NativeAnswer, Role, StreamDelta,
};
use crate::providers::{join_embeddings, split_inputs};
use crate::table::{Backend, RouteState};

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

pub(super) async fn resolve(
    state: &AppState,
    name: &str,
    route_type: Option<RouteType>,
) -> Result<ServingRoute, GatewayError> {
    let (entry, caller) = admission::authorize(state, name).await?;
    observe::note(|c| {
        c.route = Some(entry.name.clone());
        c.provider = Some(entry.provider.as_str());
        c.model = Some(entry.model.clone());
        c.operation = Some(entry.route_type.operation());
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
            team_guards: super::guarded::team_guards(state, &entry, caller.as_ref())?,
            entry,
            caller,
            on_behalf_of: None,
        }),
        RouteState::NotReady { reason, message } => Err(GatewayError::RouteNotReady {
            route: name.to_string(),
            reason: *reason,
            message: message.clone(),
        }),
    }
}

/// A call the gateway makes itself (a guardrail judge's verdict as `guardrail:ns/policy`, the
/// response cache's embedding as `cache/ns/route`): the Route `qualified` asked by `consumer`,
/// admitted, limited, priced and guarded like any call but in no Team and past no cache, in a
/// call context of its own (the caller's log line and labels keep theirs). The Route's access
/// rules are not asked: a policy or a cache names only Routes of its own namespace.
pub(super) async fn invoke_as(
    state: &AppState,
    qualified: &str,
    consumer: Arc<str>,
    request: LlmRequest,
) -> Result<LlmResponse, GatewayError> {
    let entry = state
        .table
        .load()
        .get(qualified)
        .cloned()
        .ok_or_else(|| GatewayError::UnknownRoute(qualified.to_string()))?;
    let backends = match &entry.state {
        RouteState::Ready(backends) => Arc::clone(backends),
        RouteState::NotReady { reason, message } => {
            return Err(GatewayError::RouteNotReady {
                route: qualified.to_string(),
                reason: *reason,
                message: message.clone(),
            });
        }
    };
    let route = ServingRoute {
        entry,
        backends,
        caller: None,
        team_guards: Vec::new(),
        on_behalf_of: Some(Arc::clone(&consumer)),
    };
    observe::scoped(consumer, async { invoke(state, &route, &request).await }).await
}

/// `cached::OwnCall`: `invoke_as`, boxed (an embedding call looks the cache up in turn).
fn own_call<'a>(
    state: &'a AppState,
    qualified: &'a str,
    consumer: Arc<str>,
    request: LlmRequest,
) -> Pin<Box<dyn Future<Output = Result<LlmResponse, GatewayError>> + Send + 'a>> {
    Box::pin(invoke_as(state, qualified, consumer, request))
}

/// Non-streaming call: one parsed answer, from the first backend that gives one.
pub async fn invoke(
    state: &AppState,
    route: &ServingRoute,
    request: &LlmRequest,
) -> Result<LlmResponse, GatewayError> {
    let request = &*super::guarded::check_request(state, judge, route, request).await?;
    let calls = fan_out(route, request)?;
    let ticket = match cached::lookup(state, route, request, calls, own_call).await? {
        Cached::Hit(answer) => {
            return super::guarded::check_answer(state, judge, route, Ok(answer)).await;
        }
        Cached::Live(ticket) => ticket,
    };
    let admission = route.admit(state, request, calls).await?;
    let started = Instant::now();
    let mut tries = Tries::new(state, &route.entry.name, &route.backends, request);
    let mut last = None;
    let result = loop {
        let attempt = match tries.next().await {
            Ok(next) => next,
            Err(e) => break Err(e),
        };
        last = Some(attempt.backend);
        let answer = call_backend(
            state,
            route.entry.route_type,
            attempt.backend,
            attempt.to(),
            request,
            attempt.timeout,
        )
        .await;
        if let ControlFlow::Break(result) = tries.settle(&attempt, answer) {
            break result;
        }
    };
    route
        .entry
        .metrics(&state.metrics)
        .upstream_duration
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
    // What the caller receives is what is stored: masked, and never a blocked answer.
    let result = super::guarded::check_answer(state, judge, route, result).await;
    if let (Ok(answer), Some(ticket)) = (&result, ticket) {
        ticket.store(answer);
    }
    result
}

/// Most embeddings inputs one request may have when a backend takes few per call (Titan: one),
/// so that one request cannot become an unbounded number of upstream calls.
const MAX_FAN_OUT_INPUTS: usize = 128;

/// Upstream calls of one fanned-out request in flight at once.
pub(super) const FAN_OUT_CONCURRENCY: usize = 8;

/// How many upstream calls `request` costs at most on this route's backends (the calls charged
/// against its limits); a 400 when it has more inputs than a fanned-out request may.
pub(super) fn fan_out(route: &ServingRoute, request: &LlmRequest) -> Result<u64, GatewayError> {
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
pub(super) async fn call_backend(
    state: &AppState,
    route_type: RouteType,
    backend: &Backend,
    to: Option<SocketAddr>,
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
                    .map(|p| call_once(state, route_type, upstream, to, p, timeout));
                answers.extend(futures::future::try_join_all(calls).await?);
            }
            join_embeddings(answers).map_err(|e| provider_error(upstream, e))?
        }
        None => call_once(state, route_type, upstream, to, request, timeout).await?,
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

/// Streaming call: yields the deltas decoded from each upstream read as soon as it arrives.
/// A try that fails before its first deltas arrive falls back to another backend like a plain
/// call; after that an upstream failure ends the stream with an error item.
/// Dropping the stream (the client went away) reads the provider's stream on in the background,
/// within bounds, to charge its final usage (see `metering::Drained`).
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
    let request = &*super::guarded::check_request(state, judge, route, request).await?;
    let ticket = match cached::lookup(state, route, request, 1, own_call).await? {
        Cached::Hit(answer) => {
            // A hit is checked like a live answer: this caller's policies may differ.
            let (deltas, model) = cached::replayed(answer, route);
            let deltas = super::guarded::check_stream(state, judge, route, deltas);
            return Ok((futures::future::Either::Left(deltas), model));
        }
        Cached::Live(ticket) => ticket,
    };
    let admission = route.admit(state, request, 1).await?;
    let started = Instant::now();
    let mut tries = Tries::new(state, &route.entry.name, &route.backends, request);
    let opened = loop {
        let attempt = match tries.next().await {
            Ok(next) => next,
            Err(e) => break Err(e),
        };
        let timeout = attempt.timeout;
        let opened = match tokio::time::timeout(
            timeout,
            open_stream(
                state,
                route.entry.route_type,
                attempt.backend,
                attempt.to(),
                request,
            ),
        )
        .await
        {
            Ok(result) => result,
            Err(_) => Err(GatewayError::UpstreamTimeout(timeout.as_secs().max(1))),
        };
        if let ControlFlow::Break(result) = tries.settle(&attempt, opened) {
            break result.map(|o| (o, attempt));
        }
    };
    let (opened, attempt) = match opened {
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
    let backend = attempt.backend;
    // The endpoint counts the call in flight until the stream ends or is dropped.
    let in_flight = attempt.endpoint;
    let observer = StreamObserver::new(
        state,
        &route.entry,
        started,
        admission,
        backend,
        tries.billed,
    );
    let deltas = futures::stream::once(futures::future::ready(Ok(opened.first)))
        .chain(opened.rest)
        .filter(|item| futures::future::ready(!matches!(item, Ok(d) if d.is_empty())));
    let model = backend.upstream.target.model.clone();
    let deltas = observer.watch(deltas).map(move |item| {
        let _held = &in_flight;
        item
    });
    let deltas = super::guarded::check_stream(state, judge, route, deltas);
    let deltas = Recording::new(deltas, ticket, &model);
    Ok((futures::future::Either::Right(deltas), model))
}

/// Output tokens a judge may spend on its verdict.
const JUDGE_MAX_TOKENS: u32 = 32;

/// The judge's way back into the gateway: a chat call to another Route, as the policy.
struct Gateway(AppState);

/// `guarded::Judge`: the services of a call's webhook and judge checks.
fn judge(state: &AppState) -> Arc<dyn Services> {
    Arc::new(Gateway(state.clone()))
}

impl Services for Gateway {
    fn http(&self) -> &reqwest::Client {
        &self.0.http
    }

    fn ask(
        &self,
        route: Arc<str>,
        consumer: Arc<str>,
        prompt: String,
    ) -> futures::future::BoxFuture<'static, Result<String, String>> {
        let state = self.0.clone();
        Box::pin(async move {
            let request = LlmRequest::Chat(ChatRequest {
                messages: vec![ChatMessage::new(Role::User, Content::text(prompt))],
                // A verdict is two short lines: the judge's answer (and its cost) stays small.
                params: crate::llm::Params {
                    max_tokens: Some(JUDGE_MAX_TOKENS),
                    temperature: Some(0.0),
                    ..Default::default()
                },
                stream: Default::default(),
                extra: Default::default(),
            });
            match invoke_as(&state, &route, consumer, request).await {
                Ok(LlmResponse::Generation(g)) => g
                    .choices
                    .into_iter()
                    .next()
                    .map(|c| c.text)
                    .ok_or_else(|| format!("judge Route {route} gave no answer")),
                Ok(_) => Err(format!("judge Route {route} is not a chat Route")),
                Err(e) => Err(format!("judge Route {route}: {}", e.code())),
            }
        })
    }
}
