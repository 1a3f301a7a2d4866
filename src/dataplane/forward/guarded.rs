//! Where a call meets its Route's guardrails: the request's texts before anything is admitted or
//! sent, a plain answer before the caller sees it, a stream as it flows (`guardrails::stream`).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use futures::{Stream, StreamExt};

use super::serving::ServingRoute;
use crate::access::Identity;
use crate::api::{Reason, StreamMode};
use crate::dataplane::AppState;
use crate::dataplane::error::GatewayError;
use crate::dataplane::observe;
use crate::guardrails::external::{self, Context, Services};
use crate::guardrails::{BlockReason, Guard, Phase, buffer, request, stream};
use crate::llm::{LlmRequest, LlmResponse, StreamDelta};
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

/// The request as it may go upstream: as sent, or with its findings masked; a 400
/// `guardrail_blocked` when a check blocks it (then nothing is admitted, charged or sent).
pub async fn check_request<'a>(
    state: &AppState,
    judge: Judge,
    route: &ServingRoute,
    request: &'a LlmRequest,
) -> Result<Cow<'a, LlmRequest>, GatewayError> {
    let mut out = Cow::Borrowed(request);
    for guard in route.guards().filter(|g| g.request) {
        let started = Instant::now();
        let mut masked = out.as_ref().clone();
        let mut findings = Vec::new();
        let mut verdict = request::check_request(guard, &mut masked, &mut findings)
            .map_err(|f| guard.blocked(f, Phase::Request, BlockReason::Matched));
        if verdict.is_ok() && guard.external_request {
            let visit: Visit<LlmRequest> = |r, f| request::visit_request(r, &mut { f });
            verdict = external_texts(
                &context(state, judge),
                guard,
                Phase::Request,
                None,
                &mut masked,
                visit,
                &mut findings,
            )
            .await;
        }
        note(guard.record(
            &state.metrics.guardrails,
            Phase::Request,
            &findings,
            started.elapsed(),
        ));
        verdict?;
        if masked != *out {
            out = Cow::Owned(masked);
        }
    }
    Ok(out)
}

/// Calls `f` on each text of a request or an answer (`request::visit_request`, `visit_generation`).
type Visit<T> = fn(&mut T, &mut dyn FnMut(&mut String) -> Result<(), ()>) -> Result<(), ()>;

/// The webhook and judge checks of `phase` on `target`: its texts collected, checked, written back
/// masked.
async fn external_texts<T>(
    ctx: &Context,
    guard: &Guard,
    phase: Phase,
    mode: Option<StreamMode>,
    target: &mut T,
    visit: Visit<T>,
    findings: &mut Vec<crate::guardrails::mask::Finding>,
) -> Result<(), crate::guardrails::Blocked> {
    let mut texts = Vec::new();
    let _ = visit(target, &mut |t: &mut String| {
        texts.push(t.clone());
        Ok(())
    });
    let before = texts.clone();
    external::check(guard, phase, mode, &mut texts, ctx, findings).await?;
    if texts != before {
        let mut masked = texts.into_iter();
        let _ = visit(target, &mut |t: &mut String| {
            if let Some(m) = masked.next() {
                *t = m;
            }
            Ok(())
        });
    }
    Ok(())
}

/// A plain answer as the caller may see it; a block replaces it by the error (the call stays
/// charged what the provider billed).
pub async fn check_answer(
    state: &AppState,
    judge: Judge,
    route: &ServingRoute,
    answer: Result<LlmResponse, GatewayError>,
) -> Result<LlmResponse, GatewayError> {
    let mut answer = answer?;
    for guard in route.guards().filter(|g| g.response) {
        answer = check_answer_with(state, judge, guard, answer).await?;
    }
    Ok(answer)
}

async fn check_answer_with(
    state: &AppState,
    judge: Judge,
    guard: &Arc<Guard>,
    answer: LlmResponse,
) -> Result<LlmResponse, GatewayError> {
    let started = Instant::now();
    let mut findings = Vec::new();
    let verdict = match answer {
        LlmResponse::Generation(mut g) => {
            let mut verdict = request::check_generation(guard, &mut g, &mut findings)
                .map_err(|f| guard.blocked(f, Phase::Response, BlockReason::Matched));
            let visit: Visit<crate::llm::Generation> =
                |g, f| request::visit_generation(g, &mut { f });
            if verdict.is_ok() && guard.buffered {
                verdict = external_texts(
                    &context(state, judge),
                    guard,
                    Phase::Response,
                    Some(StreamMode::Buffer),
                    &mut g,
                    visit,
                    &mut findings,
                )
                .await;
            }
            if verdict.is_ok() && guard.after {
                // Audit only: checked in the background, as a stream's would be.
                let mut texts = Vec::new();
                let _ = visit(&mut g, &mut |t: &mut String| {
                    texts.push(t.clone());
                    Ok(())
                });
                buffer::check_after(Arc::clone(guard), Arc::new(context(state, judge)), texts);
            }
            verdict.map(|()| LlmResponse::Generation(g))
        }
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
/// turn: a Team's checks read what the route's released; then its webhook and judge checks in
/// their `mode`); passed on as it is, unboxed, when the call has none.
pub fn check_stream(
    state: &AppState,
    judge: Judge,
    route: &ServingRoute,
    deltas: impl Stream<Item = Result<Vec<StreamDelta>, GatewayError>> + Send + 'static,
) -> impl Stream<Item = Result<Vec<StreamDelta>, GatewayError>> + Send + 'static {
    let mut guards = route.guards().filter(|g| g.response).peekable();
    if guards.peek().is_none() {
        return futures::future::Either::Left(deltas);
    }
    let mut ctx = None;
    futures::future::Either::Right(guards.fold(deltas.boxed(), |mut deltas, guard| {
        if guard.scanned_response {
            deltas =
                stream::guard_stream(deltas, Arc::clone(guard), state.metrics.guardrails.clone())
                    .boxed();
        }
        if guard.buffered || guard.after {
            let ctx = ctx.get_or_insert_with(|| Arc::new(context(state, judge)));
            deltas = buffer::external_stream(deltas, Arc::clone(guard), Arc::clone(ctx));
        }
        deltas
    }))
}

/// Makes the services of a call's webhook and judge checks. Given by `invocation`, which owns
/// the forward path a judge is asked through (this room does not call back into it).
pub type Judge = fn(&AppState) -> Arc<dyn Services>;

/// What a call's webhook and judge checks need: the gateway's client, its Routes (for judges),
/// and who is calling.
fn context(state: &AppState, judge: Judge) -> Context {
    Context {
        services: judge(state),
        metrics: state.metrics.guardrails.clone(),
        consumer: observe::consumer(),
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
