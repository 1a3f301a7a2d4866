//! The response cache on the forward path: a call on a caching Route is looked up before it is
//! admitted; a hit is counted as a call (no tokens, no USD) and answered from the entry, plain
//! or replayed as a stream; a miss's live answer is stored once complete (a stream as it passes).
//! On a Route that matches semantically, an exact miss embeds the prompt through the embeddings
//! Route (a call of the cache's own) and may be answered for the nearest stored prompt.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};

use super::serving::ServingRoute;
use crate::api::RouteType;
use crate::cache::{CachePolicy, CacheStatus, Lookup, Recorder, SemanticPolicy, Ticket, scope_of};
use crate::cost::{Tokens, Usd};
use crate::dataplane::AppState;
use crate::dataplane::admission;
use crate::dataplane::error::GatewayError;
use crate::dataplane::observe::{self, CallCost};
use crate::llm::{EmbeddingsRequest, LlmRequest, LlmResponse, StreamDelta};

/// What the cache gave a call.
pub(super) enum Cached {
    /// The stored answer, the call already counted against its calls limits.
    Hit(LlmResponse),
    /// Answer live; with a ticket, store the answer.
    Live(Option<Ticket>),
}

/// Looks the call up when its Route caches, and admits a hit (costing `calls` calls).
pub(super) async fn lookup(
    state: &AppState,
    route: &ServingRoute,
    request: &LlmRequest,
    calls: u64,
    own_call: OwnCall,
) -> Result<Cached, GatewayError> {
    let Some(policy) = &route.entry.cache else {
        return Ok(Cached::Live(None));
    };
    // The gateway's own calls (embedding a prompt) are not cached: an exact miss needs them.
    if route.on_behalf_of.is_some() {
        return Ok(Cached::Live(None));
    }
    let caller = route.caller.as_ref();
    let teams = admission::teams_of(state, &route.entry, caller)?;
    let names: Vec<&str> = teams.iter().map(|t| t.name.as_str()).collect();
    let scope = scope_of(policy.scope, caller, &names);
    let directive = observe::cache_directive();
    let hit = match state.cache.lookup(policy, &scope, request, directive).await {
        Lookup::Hit(hit) => hit,
        Lookup::Live {
            status: CacheStatus::Miss,
            ticket: Some(mut ticket),
        } if policy.semantic.is_some() => {
            let probe = state.cache.probe(policy, &scope, request);
            let embedding = match (&probe, &policy.semantic) {
                (Some(probe), Some(semantic)) => {
                    embed(state, policy, semantic, &probe.text, own_call).await
                }
                _ => None,
            };
            let found = state
                .cache
                .semantic_lookup(policy, probe, embedding.as_deref(), &mut ticket)
                .await;
            match found {
                Some(hit) => hit,
                None => {
                    observe::note(|c| c.cache = Some((CacheStatus::Miss, None)));
                    return Ok(Cached::Live(Some(ticket)));
                }
            }
        }
        Lookup::Live { status, ticket } => {
            observe::note(|c| c.cache = Some((status, None)));
            return Ok(Cached::Live(ticket));
        }
    };
    admission::admit_cached(state, &route.entry, caller, &teams, calls).await?;
    let usage = hit.entry.usage();
    // What the provider would have billed, at the price of the Route's first backend.
    if let (Some(price), Some(tokens)) = (
        route.backends.list.first().and_then(|b| b.price),
        Tokens::from_usage(&usage),
    ) {
        policy
            .metrics(&state.metrics)
            .saved_usd
            .add(price.cost(tokens));
    }
    observe::note(|c| {
        c.cache = Some((CacheStatus::Hit, Some(hit.age.as_secs())));
        c.cache_semantic = hit.semantic;
        c.cost = Some(CallCost::Known(Usd::ZERO));
    });
    Ok(Cached::Hit(hit.entry.into_response()))
}

/// The longest a miss waits for its prompt's embedding: a slow embeddings provider costs each
/// miss at most this much, then the call goes on as a plain miss.
const EMBEDDING_DEADLINE: Duration = Duration::from_secs(2);

/// The gateway's own call to another of its Routes under a consumer of its own
/// (`invocation::invoke_as`), given by `invocation`, which owns the forward path: this room does
/// not call back into it. Boxed: the call looks the cache up again.
pub(super) type OwnCall =
    for<'a> fn(
        &'a AppState,
        &'a str,
        Arc<str>,
        LlmRequest,
    ) -> Pin<Box<dyn Future<Output = Result<LlmResponse, GatewayError>> + Send + 'a>>;

/// The embedding of `text` through the semantic policy's embeddings Route, by the forward path
/// like any call (the Route's limits, guardrails and cost apply), as a call of its own under the
/// consumer `cache/<namespace>/<route>`. `None` when it fails: the call is then a plain miss.
async fn embed(
    state: &AppState,
    policy: &CachePolicy,
    semantic: &SemanticPolicy,
    text: &str,
    own_call: OwnCall,
) -> Option<Vec<f64>> {
    let route_type = state
        .table
        .load()
        .get(&semantic.embeddings_route)?
        .route_type;
    if route_type != RouteType::Embeddings {
        return None;
    }
    let consumer: Arc<str> = format!("cache/{}", policy.qualified).into();
    let request = LlmRequest::Embeddings(EmbeddingsRequest {
        input: vec![text.to_string()],
        extra: serde_json::Map::new(),
    });
    let call = own_call(state, &semantic.embeddings_route, consumer, request);
    match tokio::time::timeout(EMBEDDING_DEADLINE, call).await {
        Ok(Ok(LlmResponse::Embeddings(mut e))) if e.data.len() == 1 => e.data.pop(),
        Ok(Ok(_)) => None,
        Err(_) => {
            tracing::debug!("embedding a prompt for the cache took too long; a plain miss");
            None
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "embedding a prompt for the cache failed; a plain miss");
            None
        }
    }
}

/// A hit as a stream of deltas in chunks, and its model.
pub(super) fn replayed(
    answer: LlmResponse,
    route: &ServingRoute,
) -> (
    impl Stream<Item = Result<Vec<StreamDelta>, GatewayError>> + Send + 'static,
    String,
) {
    let (chunks, model) = match answer {
        LlmResponse::Generation(g) => (
            crate::cache::replay(&g, &Usd::ZERO.to_string()),
            if g.model.is_empty() {
                route.entry.model.to_string()
            } else {
                g.model
            },
        ),
        // Embeddings and native answers are never streamed.
        LlmResponse::Embeddings(_) | LlmResponse::Native(_) => {
            (Vec::new(), route.entry.model.to_string())
        }
    };
    (futures::stream::iter(chunks.into_iter().map(Ok)), model)
}

/// A live stream, recorded as it passes and stored once it ends normally (never after an error
/// or a cut: those end the recording).
pub(super) struct Recording<S> {
    inner: S,
    /// The ticket, what was seen, and the model a stored answer is named after when its chunks
    /// do not name one; `None` when the call is not stored (nothing copied).
    recording: Option<(Ticket, Recorder, String)>,
}

impl<S> Recording<S> {
    pub(super) fn new(inner: S, ticket: Option<Ticket>, model: &str) -> Self {
        Recording {
            inner,
            recording: ticket.map(|t| (t, Recorder::default(), model.to_string())),
        }
    }
}

impl<S> Stream for Recording<S>
where
    S: Stream<Item = Result<Vec<StreamDelta>, GatewayError>> + Unpin,
{
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = futures::ready!(self.inner.poll_next_unpin(cx));
        match &item {
            Some(Ok(deltas)) => {
                if let Some((ticket, recorder, _)) = &mut self.recording {
                    recorder.see(deltas, ticket.max_bytes);
                }
            }
            Some(Err(_)) => self.recording = None,
            None => {
                if let Some((ticket, recorder, model)) = self.recording.take()
                    && let Some(answer) = recorder.finish(&model)
                {
                    ticket.store(&answer);
                }
            }
        }
        Poll::Ready(item)
    }
}
