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
use crate::api::StreamMode;
use crate::guardrails::buffer;
use crate::guardrails::external::{self, Context, Services};
use crate::llm::{ChatMessage, ChatRequest, Content, LlmRequest, LlmResponse, Role, StreamDelta};

/// The request as it may go upstream: as sent, or with its findings masked; a 400
/// `guardrail_blocked` when a check blocks it (then nothing is admitted, charged or sent).
pub async fn check_request<'a>(
    state: &AppState,
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
                state,
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
    state: &AppState,
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
    external::check(guard, phase, mode, &mut texts, &context(state), findings).await?;
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
    route: &ServingRoute,
    answer: Result<LlmResponse, GatewayError>,
) -> Result<LlmResponse, GatewayError> {
    let mut answer = answer?;
    for guard in route.guards().filter(|g| g.response) {
        answer = check_answer_with(state, guard, answer).await?;
    }
    Ok(answer)
}

async fn check_answer_with(
    state: &AppState,
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
                    state,
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
                buffer::check_after(Arc::clone(guard), Arc::new(context(state)), texts);
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
            let ctx = ctx.get_or_insert_with(|| Arc::new(context(state)));
            deltas = buffer::external_stream(deltas, Arc::clone(guard), Arc::clone(ctx));
        }
        deltas
    }))
}

/// What a call's webhook and judge checks need: the gateway's client, its Routes (for judges),
/// and who is calling.
fn context(state: &AppState) -> Context {
    Context {
        services: Arc::new(Gateway(state.clone())),
        metrics: state.metrics.guardrails.clone(),
        consumer: observe::consumer(),
    }
}

/// Output tokens a judge may spend on its verdict.
const JUDGE_MAX_TOKENS: u32 = 32;

struct Gateway(AppState);

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
            match super::invocation::invoke_as(&state, &route, consumer, request).await {
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
