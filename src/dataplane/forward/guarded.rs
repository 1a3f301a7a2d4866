//! Where a call meets its Route's guardrails: the request's texts before anything is admitted or
//! sent, a plain answer before the caller sees it, a stream as it flows (`guardrails::stream`).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use futures::{Stream, StreamExt};

use super::invocation::ServingRoute;
use crate::dataplane::AppState;
use crate::dataplane::error::GatewayError;
use crate::dataplane::observe;
use crate::guardrails::{BlockReason, Phase, request, stream};
use crate::llm::{LlmRequest, LlmResponse, StreamDelta};

/// The request as it may go upstream: as sent, or with its findings masked; a 400
/// `guardrail_blocked` when a check blocks it (then nothing is admitted, charged or sent).
pub fn check_request<'a>(
    state: &AppState,
    route: &ServingRoute,
    request: &'a LlmRequest,
) -> Result<Cow<'a, LlmRequest>, GatewayError> {
    let Some(guard) = route.entry.guard.as_ref().filter(|g| g.request) else {
        return Ok(Cow::Borrowed(request));
    };
    let started = Instant::now();
    let mut masked = request.clone();
    let mut findings = Vec::new();
    let verdict = request::check_request(guard, &mut masked, &mut findings);
    note(guard.record(&state.metrics, Phase::Request, &findings, started.elapsed()));
    verdict.map_err(|f| guard.blocked(f, Phase::Request, BlockReason::Matched))?;
    Ok(if masked == *request {
        Cow::Borrowed(request)
    } else {
        Cow::Owned(masked)
    })
}

/// A plain answer as the caller may see it; a block replaces it by the error (the call stays
/// charged what the provider billed).
pub fn check_answer(
    state: &AppState,
    route: &ServingRoute,
    answer: Result<LlmResponse, GatewayError>,
) -> Result<LlmResponse, GatewayError> {
    let Some(guard) = route.entry.guard.as_ref().filter(|g| g.response) else {
        return answer;
    };
    let started = Instant::now();
    let mut findings = Vec::new();
    let verdict = match answer? {
        LlmResponse::Generation(mut g) => request::check_generation(guard, &mut g, &mut findings)
            .map(|()| LlmResponse::Generation(g))
            .map_err(|f| guard.blocked(f, Phase::Response, BlockReason::Matched)),
        embeddings @ LlmResponse::Embeddings(_) => Ok(embeddings),
        // Routes with response checks are not served natively (see `anthropic::PassOn`).
        LlmResponse::Native(_) => Err(guard.blocked(
            crate::guardrails::mask::Finding {
                policy: 0,
                check: 0,
            },
            Phase::Response,
            BlockReason::Unreadable,
        )),
    };
    note(guard.record(
        &state.metrics,
        Phase::Response,
        &findings,
        started.elapsed(),
    ));
    verdict
}

/// The stream with the Route's response checks applied as it flows.
pub fn check_stream(
    state: &AppState,
    route: &ServingRoute,
    deltas: impl Stream<Item = Result<Vec<StreamDelta>, GatewayError>> + Send + 'static,
) -> futures::stream::BoxStream<'static, Result<Vec<StreamDelta>, GatewayError>> {
    match route.entry.guard.as_ref().filter(|g| g.response) {
        Some(guard) => {
            stream::guard_stream(deltas, Arc::clone(guard), Arc::clone(&state.metrics)).boxed()
        }
        None => deltas.boxed(),
    }
}

fn note(summary: Option<String>) {
    if let Some(summary) = summary {
        observe::note(|c| match &mut c.guardrail {
            Some(s) => {
                s.push(',');
                s.push_str(&summary);
            }
            None => c.guardrail = Some(summary),
        });
    }
}
