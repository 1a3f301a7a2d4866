//! Before the upstream call: who is calling, may they use this route, and is there room left in
//! its limits. After it: settle the token charge to what was really used.

use crate::access::{AuthError, Decision, DefaultAccess, Identity, decide};
use crate::cost::Usd;
use crate::limits::{Charge, Reservation};
use crate::llm::{LlmRequest, Usage};
use crate::table::{RouteEntry, RouteState};
use std::sync::Arc;

use super::AppState;
use super::error::GatewayError;
use super::observe;

/// Completion tokens assumed for a request without `max_tokens`.
const DEFAULT_COMPLETION_ESTIMATE: u64 = 256;

/// An admitted call; settle it with the real usage once known (dropping it keeps the estimate).
#[derive(Debug, Default)]
pub struct Admission {
    reservation: Option<Reservation>,
    /// The prompt-size estimate, for streams that end before reporting usage.
    pub prompt_estimate: u64,
    /// The tokens charged up front.
    token_estimate: u64,
}

impl Admission {
    /// Settles to `used` tokens and `cost` (`None`: unknown, the USD reservation stands).
    pub fn settle(self, used: u64, cost: Option<Usd>) {
        if let Some(r) = self.reservation {
            r.settle_cost(used, cost);
        }
    }

    /// What a stream may spend before a `truncate` budget ends it, and that budget.
    pub fn allowance(&self) -> Option<(Usd, String)> {
        let (usd, budget) = self.reservation.as_ref()?.allowance()?;
        Some((usd, budget.to_string()))
    }

    /// A call that was not answered: nothing used, nothing spent.
    pub fn refund(self) {
        self.settle(0, Some(Usd::ZERO));
    }

    /// Settles with the reported usage (the token estimate stands when none was reported).
    pub fn settle_usage(self, usage: &Usage, cost: Option<Usd>) {
        let used = used_tokens(usage).unwrap_or(self.token_estimate);
        self.settle(used, cost);
    }
}

/// What a call is charged: the reported total, or the sum of its parts when that is larger (a
/// provider understating its total does not earn a refund). Saturating and clamped.
pub fn used_tokens(usage: &Usage) -> Option<u64> {
    let parts = match (usage.prompt_tokens, usage.completion_tokens) {
        (None, None) => None,
        (p, c) => Some(p.unwrap_or(0).saturating_add(c.unwrap_or(0))),
    };
    let used = match (usage.total_tokens, parts) {
        (Some(t), Some(s)) => Some(t.max(s)),
        (t, s) => t.or(s),
    };
    used.map(|u| u.min(crate::llm::MAX_REPORTED_TOKENS))
}

/// The caller of this request, authenticated once (credentials are taken out of the call; later
/// asks get the same answer).
pub async fn authenticate(state: &AppState) -> Result<Option<Identity>, AuthError> {
    if let Some(known) = observe::caller() {
        return known;
    }
    let bearer = observe::take_bearer();
    let outcome = state.auth.authenticate(bearer.as_ref()).await;
    if let Ok(Some(id)) = &outcome {
        let name = id.name();
        observe::note(|c| c.consumer = Some(name.into()));
    }
    let noted = outcome.clone();
    observe::note(|c| c.caller = Some(noted));
    outcome
}

/// Before a request body is read: the caller is authenticated, and refused at once when no Route
/// could admit it, so an unauthenticated caller costs no body buffer. A presented JWT that is not
/// valid is a 401 saying why; with `--default-access authenticated`, or when every Route has
/// `access` rules, so is a missing credential.
pub async fn before_body(state: &AppState) -> Result<(), GatewayError> {
    let outcome = authenticate(state).await;
    let anonymous_admitted = || {
        state.auth.default_access == DefaultAccess::AllowAll
            && state.table.load().admits_anonymous()
    };
    match outcome {
        Ok(Some(_)) => Ok(()),
        Err(AuthError::Invalid(why)) if why.is_token() => Err(GatewayError::InvalidToken(why)),
        Err(AuthError::Unavailable) if anonymous_admitted() => Ok(()),
        Err(AuthError::Unavailable) => Err(GatewayError::AuthUnavailable),
        Ok(None) | Err(AuthError::Invalid(_)) if anonymous_admitted() => Ok(()),
        Ok(None) | Err(AuthError::Invalid(_)) => Err(GatewayError::Unauthenticated),
    }
}

/// Which routes a listing shows its caller: only those the caller may use, so a route's existence
/// is not revealed to callers it does not admit.
pub struct Visibility {
    caller: Option<Identity>,
    default: DefaultAccess,
}

impl Visibility {
    /// The caller of this listing request; missing credentials and values that are not tokens
    /// list as anonymous, a JWT that is not valid is a 401 saying why.
    pub async fn of_caller(state: &AppState) -> Result<Visibility, GatewayError> {
        let caller = match authenticate(state).await {
            Ok(caller) => caller,
            Err(AuthError::Invalid(why)) if why.is_token() => {
                return Err(GatewayError::InvalidToken(why));
            }
            Err(_) => None,
        };
        Ok(Visibility {
            caller,
            default: state.auth.default_access,
        })
    }

    pub fn shows(&self, entry: &RouteEntry) -> bool {
        decide(entry.access.as_deref(), self.default, self.caller.as_ref()) == Decision::Allow
    }

    /// The named route if this caller may see it; a hidden route is as unknown as a missing one.
    pub async fn find(state: &AppState, name: String) -> Result<Arc<RouteEntry>, GatewayError> {
        let visible = Self::of_caller(state).await?;
        let table = state.table.load();
        table
            .get(&name)
            .filter(|e| visible.shows(e))
            .cloned()
            .ok_or(GatewayError::UnknownRoute(name))
    }
}

/// Who is calling and whether they may use `name`, decided before anything about the route is
/// revealed, so that to a caller it does not admit a route answers exactly like a missing one.
///
/// A presented JWT that is not valid is a 401 saying why, whatever the name. With
/// `--default-access authenticated` no route admits anonymous callers, so a missing credential or
/// a value that is not a known key is a 401 whatever the name. With `allow-all`, credentials are
/// optional: a value that is not a token counts as none (SDK placeholder keys; public routes
/// still serve), and a route that does not admit the caller is a 404 like a missing one. A
/// credential that cannot be checked right now is a 503 except on a public route.
pub async fn authorize(
    state: &AppState,
    name: &str,
) -> Result<(Arc<RouteEntry>, Option<Identity>), GatewayError> {
    let default = state.auth.default_access;
    let (caller, unchecked) = match (authenticate(state).await, default) {
        (Ok(Some(caller)), _) => (Some(caller), false),
        (Err(AuthError::Invalid(why)), _) if why.is_token() => {
            return Err(GatewayError::InvalidToken(why));
        }
        (Ok(None) | Err(AuthError::Invalid(_)), DefaultAccess::Authenticated) => {
            return Err(GatewayError::Unauthenticated);
        }
        (Err(AuthError::Unavailable), DefaultAccess::Authenticated) => {
            return Err(GatewayError::AuthUnavailable);
        }
        (Ok(None) | Err(AuthError::Invalid(_)), DefaultAccess::AllowAll) => (None, false),
        (Err(AuthError::Unavailable), DefaultAccess::AllowAll) => (None, true),
    };
    let table = state.table.load();
    let admitted = table
        .get(name)
        .filter(|e| decide(e.access.as_deref(), default, caller.as_ref()) == Decision::Allow);
    match admitted {
        Some(entry) => Ok((Arc::clone(entry), caller)),
        None if unchecked => Err(GatewayError::AuthUnavailable),
        None => Err(GatewayError::UnknownRoute(name.to_string())),
    }
}

/// Counts an authorized call, costing `calls` upstream calls, against its route's limits.
pub async fn admit(
    state: &AppState,
    entry: &RouteEntry,
    caller: Option<&Identity>,
    request: &LlmRequest,
    calls: u64,
) -> Result<Admission, GatewayError> {
    let prompt_estimate = prompt_estimate(request);
    let teams = match caller {
        Some(c) => state.table.load().teams.of(c),
        None => Vec::new(),
    };
    // A team that lists its routes holds its members to them.
    if let Some(team) = teams.iter().find(|t| {
        t.routes
            .as_ref()
            .is_some_and(|r| !r.contains(&entry.qualified))
    }) {
        return Err(GatewayError::NotInTeamRoutes {
            team: team.name.clone(),
            route: entry.qualified.clone(),
        });
    }
    let price = match &entry.state {
        RouteState::Ready(b) => b.max_price,
        RouteState::NotReady { .. } => None,
    };
    // A team's USD budget cannot be kept on calls of unknown cost: never counted as free.
    if price.is_none()
        && let Some(team) = teams
            .iter()
            .find(|t| t.limits.iter().any(|l| l.usd.is_some()))
    {
        return Err(GatewayError::UnpricedForBudget {
            team: team.name.clone(),
            route: entry.qualified.clone(),
        });
    }
    if entry.limits.is_empty() && teams.iter().all(|t| t.limits.is_empty()) {
        return Ok(Admission {
            reservation: None,
            prompt_estimate,
            token_estimate: 0,
        });
    }
    let consumer = caller.map(Identity::name).unwrap_or_default();
    let completion = completion_estimate(request);
    let token_estimate = prompt_estimate.saturating_add(completion);
    let stream = request.stream().stream;
    // The most the call can cost on the dearest backend it may reach. A stream that a truncating
    // budget may end is reserved for more than the default estimate when it sets no max_tokens.
    let truncatable = stream
        && entry
            .limits
            .iter()
            .chain(teams.iter().flat_map(|t| t.limits.iter()))
            .any(|l| l.on_exceed == Some(crate::api::OnExceed::Truncate));
    let reserve = if truncatable && !has_max_tokens(request) {
        completion.max(TRUNCATABLE_COMPLETION_ESTIMATE)
    } else {
        completion
    };
    let charge = Charge {
        calls,
        tokens: token_estimate,
        usd: price.map(|p| p.max_cost(prompt_estimate, reserve)),
        stream,
        usd_floor: price.map_or(Usd::ZERO, |p| p.max_cost(prompt_estimate, 0)),
    };
    let reservation = state
        .limits
        .admit_with_teams(entry, &teams, &consumer, charge)
        .await
        .map_err(|limited| GatewayError::RateLimited(Box::new(limited)))?;
    Ok(Admission {
        reservation,
        prompt_estimate,
        token_estimate,
    })
}

/// Completion tokens reserved for a stream without `max_tokens` under a `truncate` budget (it is
/// ended where the budget runs out, and settled to what it sent).
const TRUNCATABLE_COMPLETION_ESTIMATE: u64 = 4096;

fn has_max_tokens(request: &LlmRequest) -> bool {
    match request {
        LlmRequest::Chat(c) => c.params.max_tokens.is_some(),
        LlmRequest::Completions(c) => c.params.max_tokens.is_some(),
        LlmRequest::Embeddings(_) => true,
        LlmRequest::Native(n) => n.max_tokens.is_some(),
    }
}

/// Roughly four characters per token, as OpenAI's rule of thumb has it.
pub fn tokens_for_chars(chars: usize) -> u64 {
    (chars as u64).div_ceil(4)
}

fn prompt_estimate(request: &LlmRequest) -> u64 {
    let chars = match request {
        LlmRequest::Chat(c) => c.messages.iter().map(|m| m.text().len()).sum(),
        LlmRequest::Completions(c) => c.prompt.len(),
        LlmRequest::Embeddings(e) => e.input.iter().map(String::len).sum(),
        LlmRequest::Native(n) => n.prompt_chars,
    };
    tokens_for_chars(chars)
}

fn completion_estimate(request: &LlmRequest) -> u64 {
    let params = match request {
        LlmRequest::Chat(c) => &c.params,
        LlmRequest::Completions(c) => &c.params,
        LlmRequest::Embeddings(_) => return 0,
        LlmRequest::Native(n) => {
            return n.max_tokens.map_or(DEFAULT_COMPLETION_ESTIMATE, u64::from);
        }
    };
    let per_choice = params
        .max_tokens
        .map_or(DEFAULT_COMPLETION_ESTIMATE, u64::from);
    per_choice * u64::from(params.n.unwrap_or(1).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_totals() {
        assert_eq!(used_tokens(&Usage::default()), None);
        assert_eq!(used_tokens(&Usage::new(Some(3), Some(4))), Some(7));
        let mut u = Usage::new(Some(3), None);
        assert_eq!(used_tokens(&u), Some(3));
        u.total_tokens = Some(9);
        assert_eq!(used_tokens(&u), Some(9));
    }

    #[test]
    fn absurd_usage_saturates_instead_of_overflowing() {
        let u = Usage {
            prompt_tokens: Some(u64::MAX),
            completion_tokens: Some(u64::MAX),
            total_tokens: None,
            cached_prompt_tokens: None,
        };
        assert!(used_tokens(&u).is_some_and(|t| t >= 1 << 40));
        let u = Usage::new(Some(u64::MAX), Some(1));
        assert!(u.total_tokens.is_some_and(|t| t >= 1 << 40));
    }
}
