//! The response cache on the forward path: a call on a caching Route is looked up before it is
//! admitted; a hit is counted as a call (no tokens, no USD) and answered from the entry, plain
//! or replayed as a stream; a miss's live answer is stored once complete (a stream as it passes).

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::{Stream, StreamExt};

use super::serving::ServingRoute;
use crate::cache::{CacheStatus, Lookup, Recorder, Ticket, scope_of};
use crate::cost::{Tokens, Usd};
use crate::dataplane::AppState;
use crate::dataplane::admission;
use crate::dataplane::error::GatewayError;
use crate::dataplane::observe::{self, CallCost};
use crate::llm::{LlmRequest, LlmResponse, StreamDelta};

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
) -> Result<Cached, GatewayError> {
    let Some(policy) = &route.entry.cache else {
        return Ok(Cached::Live(None));
    };
    let caller = route.caller.as_ref();
    let teams = admission::teams_of(state, &route.entry, caller)?;
    let names: Vec<&str> = teams.iter().map(|t| t.name.as_str()).collect();
    let scope = scope_of(policy.scope, caller, &names);
    let directive = observe::cache_directive();
    match state.cache.lookup(policy, &scope, request, directive).await {
        Lookup::Live { status, ticket } => {
            observe::note(|c| c.cache = Some((status, None)));
            Ok(Cached::Live(ticket))
        }
        Lookup::Hit(hit) => {
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
                c.cost = Some(CallCost::Known(Usd::ZERO));
            });
            Ok(Cached::Hit(hit.entry.into_response()))
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
