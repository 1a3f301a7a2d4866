//! Where a call meets its Route's guardrails: the request's texts before anything is admitted or
//! sent, a plain answer before the caller sees it, a stream as it flows (`guardrails::stream`).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use futures::{Stream, StreamExt};

use super::serving::ServingRoute;
use crate::access::Identity;
use crate::api::Reason;
use crate::dataplane::AppState;
use crate::dataplane::error::GatewayError;
use crate::dataplane::observe;
use crate::guardrails::{BlockReason, Guard, Phase, request, stream};
use crate::table::RouteEntry;

/// The guards of the caller's Teams on `entry`; a Team whose policy is missing or invalid
/// refuses its members' calls (fail closed).
pub(super) fn team_guards(
    state: &AppState,
    entry: &RouteEntry,
    caller: Option<&Identity>,
) -> Result<Vec<Arc<Guard>>, GatewayError> {
    let table = state.table.load();
    let teams = &table.teams;
    if !teams.guarded {
        return Ok(Vec::new());
    }
    // The same Teams admission counts the call against (`admission::admit`).
    let mine = match (caller, state.anonymous_team.as_deref()) {
        (Some(c), _) => teams.of(c),
        (None, Some(name)) => teams.named(name).into_iter().collect(),
        (None, None) => Vec::new(),
    };
    let mut guards = Vec::new();
    for team in &mine {
        match &team.guards {
            Ok(by_route) => guards.extend(by_route.get(&entry.qualified).cloned()),
            Err(why) => {
                return Err(GatewayError::RouteNotReady {
                    route: entry.name.to_string(),
                    reason: Reason::GuardrailNotReady,
                    message: format!("Team {}: {why}", team.name),
                });
            }
        }
    }
    Ok(guards)
}

impl ServingRoute {
    /// Every guard of the call, the route's first.
    pub fn guards(&self) -> impl Iterator<Item = &Arc<Guard>> {
        self.entry.guard.iter().chain(&self.team_guards)
    }
}
use crate::llm::{LlmRequest, LlmResponse, StreamDelta};

/// The request as it may go upstream: as sent, or with its findings masked; a 400
/// `guardrail_blocked` when a check blocks it (then nothing is admitted, charged or sent).
pub fn check_request<'a>(
    state: &AppState,
    route: &ServingRoute,
    request: &'a LlmRequest,
) -> Result<Cow<'a, LlmRequest>, GatewayError> {
    let mut out = Cow::Borrowed(request);
    for guard in route.guards().filter(|g| g.request) {
        let started = Instant::now();
        let mut masked = out.as_ref().clone();
        let mut findings = Vec::new();
        let verdict = request::check_request(guard, &mut masked, &mut findings);
        note(guard.record(
            &state.metrics.guardrails,
            Phase::Request,
            &findings,
            started.elapsed(),
        ));
        verdict.map_err(|f| guard.blocked(f, Phase::Request, BlockReason::Matched))?;
        if masked != *out {
            out = Cow::Owned(masked);
        }
    }
    Ok(out)
}

/// A plain answer as the caller may see it; a block replaces it by the error (the call stays
/// charged what the provider billed).
pub fn check_answer(
    state: &AppState,
    route: &ServingRoute,
    answer: Result<LlmResponse, GatewayError>,
) -> Result<LlmResponse, GatewayError> {
    route
        .guards()
        .filter(|g| g.response)
        .try_fold(answer?, |answer, guard| {
            check_answer_with(state, guard, answer)
        })
}

fn check_answer_with(
    state: &AppState,
    guard: &Guard,
    answer: LlmResponse,
) -> Result<LlmResponse, GatewayError> {
    let started = Instant::now();
    let mut findings = Vec::new();
    let verdict = match answer {
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
        &state.metrics.guardrails,
        Phase::Response,
        &findings,
        started.elapsed(),
    ));
    Ok(verdict?)
}

/// The stream with the call's response checks applied as it flows (each guard's hold-back in
/// turn: a Team's checks read what the route's released); passed on as it is, unboxed, when the
/// call has none.
pub fn check_stream(
    state: &AppState,
    route: &ServingRoute,
    deltas: impl Stream<Item = Result<Vec<StreamDelta>, GatewayError>> + Send + 'static,
) -> impl Stream<Item = Result<Vec<StreamDelta>, GatewayError>> + Send + 'static {
    let mut guards = route.guards().filter(|g| g.response).peekable();
    if guards.peek().is_none() {
        return futures::future::Either::Left(deltas);
    }
    futures::future::Either::Right(guards.fold(deltas.boxed(), |deltas, guard| {
        stream::guard_stream(deltas, Arc::clone(guard), state.metrics.guardrails.clone()).boxed()
    }))
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
