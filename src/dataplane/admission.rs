//! Before the upstream call: who is calling, may they use this route, and is there room left in
//! its limits. After it: settle the token charge to what was really used.

use crate::access::{AuthError, Decision, DefaultAccess, Identity, decide};
use crate::cost::{Price, Usd};
use crate::limits::{Charge, Reservation, Spent, TeamCharge};
use crate::llm::{Content, LlmRequest, Usage};
use crate::table::{RouteEntry, RouteState};
use serde_json::Value;
use std::sync::Arc;

use super::AppState;
use super::error::GatewayError;
use super::observe;

/// Completion tokens a call without `max_tokens` must find room for to be admitted (it reserves
/// its model's whole output maximum, or what is left of a budget when that is less).
const TYPICAL_COMPLETION: u64 = 256;

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
    pub fn settle(self, used: u64, cost: Option<Spent>) {
        if let Some(r) = self.reservation {
            r.settle_spent(used, cost, false);
        }
    }

    /// Settles a call the provider may have billed but reported no usage for (a timeout after the
    /// request was sent, a broken, cut or oversized answer): at no less than the reservation.
    pub fn settle_at_least(self, used: u64, cost: Option<Spent>) {
        if let Some(r) = self.reservation {
            r.settle_spent(used, cost, true);
        }
    }

    /// What a stream may spend before a `truncate` budget ends it, and that budget.
    pub fn allowance(&self) -> Option<(Usd, String)> {
        let (usd, budget) = self.reservation.as_ref()?.allowance()?;
        Some((usd, budget.to_string()))
    }

    /// A call that never reached the provider: nothing used, nothing spent.
    pub fn refund(self) {
        self.settle(0, Some(Spent::same(Usd::ZERO)));
    }

    /// Settles with the reported usage (the token estimate stands when none was reported).
    pub fn settle_usage(self, usage: &Usage, cost: Option<Spent>) {
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
    let teams = teams_of(state, entry, caller)?;
    let consumer = caller.map(Identity::name).unwrap_or_default();
    admit_as(state, entry, &consumer, &teams, request, calls).await
}

/// `admit` for `consumer` in `teams`; the gateway's own calls (a judge's verdict, the cache's
/// embedding) are admitted so, under a consumer of their own and in no Team.
pub async fn admit_as(
    state: &AppState,
    entry: &RouteEntry,
    consumer: &str,
    teams: &[Arc<crate::teams::TeamEntry>],
    request: &LlmRequest,
    calls: u64,
) -> Result<Admission, GatewayError> {
    let prompt_estimate = prompt_estimate(request);
    let (price, team_price, max_output) = match &entry.state {
        RouteState::Ready(b) => (b.max_price, b.max_team_price, b.max_output),
        RouteState::NotReady { .. } => (None, None, crate::cost::DEFAULT_MAX_OUTPUT),
    };
    // A team's USD budget cannot be kept on calls of unknown cost: never counted as free.
    if team_price.is_none()
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
    let bounded = has_max_tokens(request);
    let completion = completion_estimate(request, max_output);
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
    let reserve = if truncatable && !bounded {
        completion.max(TRUNCATABLE_COMPLETION_ESTIMATE)
    } else {
        completion
    };
    // Without max_tokens the call holds its model's whole output maximum, but is admitted while
    // its prompt and a typical answer fit (see `Charge::tokens_min`).
    let typical = TYPICAL_COMPLETION.saturating_mul(choices(request));
    let usd = |p: Option<Price>| TeamCharge {
        usd: p.map(|p| p.max_cost(prompt_estimate, reserve)),
        usd_floor: p.map_or(Usd::ZERO, |p| p.max_cost(prompt_estimate, 0)),
        usd_min: p
            .filter(|_| !bounded)
            .map(|p| p.max_cost(prompt_estimate, typical.min(reserve))),
    };
    let (route_usd, team_usd) = (usd(price), usd(team_price));
    let charge = Charge {
        calls,
        tokens: token_estimate,
        tokens_min: (!bounded).then(|| prompt_estimate.saturating_add(typical.min(completion))),
        usd: route_usd.usd,
        stream,
        usd_floor: route_usd.usd_floor,
        usd_min: route_usd.usd_min,
        team: Some(team_usd),
        calls_only: false,
    };
    let reservation = state
        .limits
        .admit_with_teams(entry, teams, consumer, charge)
        .await
        .map_err(|limited| GatewayError::RateLimited(Box::new(limited)))?;
    Ok(Admission {
        reservation,
        prompt_estimate,
        token_estimate,
    })
}

/// The caller's Teams, refused when one of them does not list `entry` among its routes.
pub fn teams_of(
    state: &AppState,
    entry: &RouteEntry,
    caller: Option<&Identity>,
) -> Result<Vec<Arc<crate::teams::TeamEntry>>, GatewayError> {
    let teams = match (caller, state.anonymous_team.as_deref()) {
        (Some(c), _) => state.table.load().teams.of(c),
        (None, None) => Vec::new(),
        // `--anonymous-team`: callers without identity are that Team's members; while it does
        // not exist they are refused, so its budget is never dodged by sending no credential.
        (None, Some(name)) => match state.table.load().teams.named(name) {
            Some(team) => vec![team],
            None => return Err(GatewayError::Unauthenticated),
        },
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
    Ok(teams)
}

/// Counts a call answered from the response cache, costing `calls` calls, against the calls
/// limits of its route and Teams: it uses no tokens and costs nothing, so no budget refuses it.
pub async fn admit_cached(
    state: &AppState,
    entry: &RouteEntry,
    caller: Option<&Identity>,
    teams: &[Arc<crate::teams::TeamEntry>],
    calls: u64,
) -> Result<(), GatewayError> {
    let consumer = caller.map(Identity::name).unwrap_or_default();
    let charge = Charge {
        calls,
        calls_only: true,
        ..Charge::default()
    };
    // Calls limits only: nothing to settle afterwards.
    let _ = state
        .limits
        .admit_with_teams(entry, teams, &consumer, charge)
        .await
        .map_err(|limited| GatewayError::RateLimited(Box::new(limited)))?;
    Ok(())
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

/// Prompt tokens estimated before the call: its text at four characters a token, plus its images,
/// documents and audio (`media_tokens`).
fn prompt_estimate(request: &LlmRequest) -> u64 {
    let (chars, media) = match request {
        LlmRequest::Chat(c) => (
            c.messages.iter().map(|m| m.text().len()).sum(),
            c.messages
                .iter()
                .map(|m| content_media_tokens(&m.content))
                .sum(),
        ),
        LlmRequest::Completions(c) => (c.prompt.len(), 0),
        LlmRequest::Embeddings(e) => (e.input.iter().map(String::len).sum(), 0),
        LlmRequest::Native(n) => (
            n.prompt_chars,
            ["system", "messages"]
                .iter()
                .filter_map(|k| n.body.get(*k))
                .map(media_tokens)
                .sum(),
        ),
    };
    tokens_for_chars(chars).saturating_add(media)
}

/// Tokens counted for one image: the most that OpenAI's published rule (85 + 170 per 512-pixel
/// tile of the image scaled to 2048×768: 1,445) and Anthropic's (width × height / 750 of the
/// image scaled to 1.15 megapixels: about 1,600) give, since the gateway does not decode images.
pub const IMAGE_TOKENS: u64 = 1_600;
/// Tokens counted at least for a document, file or audio part: one page at Anthropic's upper
/// figures (3,000 text tokens and an image of the page).
pub const DOCUMENT_TOKENS: u64 = 4_600;

/// Non-text input of a message content (or any part of a request body): `IMAGE_TOKENS` per image,
/// and per document, file or audio part one token per two characters of its inline (base64)
/// data, at least `DOCUMENT_TOKENS`. Conservative estimates: the reservation is settled to the
/// provider's reported usage once it arrives.
fn content_media_tokens(content: &Content) -> u64 {
    match content {
        Content::Parts(parts) => parts.iter().map(media_tokens).fold(0, u64::saturating_add),
        Content::Text(_) | Content::Empty => 0,
    }
}

pub fn media_tokens(value: &Value) -> u64 {
    match value {
        Value::Array(items) => items.iter().map(media_tokens).fold(0, u64::saturating_add),
        Value::Object(fields) => {
            let kind = fields.get("type").and_then(Value::as_str).unwrap_or("");
            match kind {
                "image" | "image_url" | "input_image" => IMAGE_TOKENS,
                "document" | "file" | "input_file" | "input_audio" => {
                    DOCUMENT_TOKENS.max((inline_data(value) as u64).div_ceil(2))
                }
                _ => fields
                    .values()
                    .map(media_tokens)
                    .fold(0, u64::saturating_add),
            }
        }
        _ => 0,
    }
}

/// Characters of the longest string in a part: its inline data, wherever the dialect puts it.
fn inline_data(value: &Value) -> usize {
    match value {
        Value::String(s) => s.len(),
        Value::Array(items) => items.iter().map(inline_data).max().unwrap_or(0),
        Value::Object(fields) => fields.values().map(inline_data).max().unwrap_or(0),
        _ => 0,
    }
}

/// Answers the call asks for (`n`).
fn choices(request: &LlmRequest) -> u64 {
    match request {
        LlmRequest::Chat(c) => u64::from(c.params.n.unwrap_or(1).max(1)),
        LlmRequest::Completions(c) => u64::from(c.params.n.unwrap_or(1).max(1)),
        _ => 1,
    }
}

/// Completion tokens reserved: `max_tokens` per answer, or the model's output maximum.
fn completion_estimate(request: &LlmRequest, max_output: u64) -> u64 {
    let max_tokens = match request {
        LlmRequest::Chat(c) => c.params.max_tokens,
        LlmRequest::Completions(c) => c.params.max_tokens,
        LlmRequest::Embeddings(_) => return 0,
        LlmRequest::Native(n) => n.max_tokens,
    };
    max_tokens
        .map_or(max_output, u64::from)
        .saturating_mul(choices(request))
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
    fn images_and_documents_count_as_input() {
        use serde_json::json;
        let text_only = json!([{"type": "text", "text": "what is this?"}]);
        assert_eq!(media_tokens(&text_only), 0);
        let image = json!([{"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]);
        assert_eq!(media_tokens(&image), IMAGE_TOKENS);
        // Anthropic's native shapes, nested in a tool result too.
        let native = json!([{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "data": "AAAA"}},
            {"type": "tool_result", "content": [{"type": "image", "source": {"type": "url", "url": "u"}}]},
            {"type": "document", "source": {"type": "base64", "data": "A".repeat(100_000)}}]}]);
        assert_eq!(media_tokens(&native), 2 * IMAGE_TOKENS + 50_000);
        let by_reference = json!({"type": "file", "file": {"file_id": "file-1"}});
        assert_eq!(media_tokens(&by_reference), DOCUMENT_TOKENS);
        // A chat request's estimate includes them.
        let chat = LlmRequest::Chat(crate::llm::ChatRequest {
            messages: vec![crate::llm::ChatMessage::from_json("user", image)],
            params: Default::default(),
            stream: Default::default(),
            extra: Default::default(),
        });
        assert_eq!(prompt_estimate(&chat), 4 + IMAGE_TOKENS);
        // Without max_tokens the reservation is the model's output maximum.
        assert_eq!(completion_estimate(&chat, 16_384), 16_384);
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
