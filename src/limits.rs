//! Rate limits and token budgets: fixed windows per Route limit (and per consumer when keyed so).
//!
//! Counts live in this process by default. With a shared store (Redis), every replica counts in the
//! same keys through one Lua script per request, which checks every limit and only then charges all
//! of them, so N replicas enforce one limit. When the store does not answer, this replica enforces
//! locally with 1/N of each limit and says so (metric and log); it never refuses service because
//! the store is down.
//!
//! Token budgets charge an estimate up front and settle to the real usage once it is known.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tracing::{debug, info, warn};

use crate::api::{LimitKey, RenewalPeriod};
use crate::table::RouteEntry;
use crate::telemetry::metrics::{LimitLabels, Metrics};

/// Longest wait for the shared store before a request is counted locally instead.
const STORE_TIMEOUT: Duration = Duration::from_millis(250);
/// After a store failure, requests are counted locally this long before the store is tried again,
/// so an outage costs one timeout per interval, not one per request.
const STORE_RETRY: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Calls,
    Tokens,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Calls => "calls",
            Kind::Tokens => "tokens",
        }
    }
}

pub fn period_secs(period: RenewalPeriod) -> u64 {
    match period {
        RenewalPeriod::Second => 1,
        RenewalPeriod::Minute => 60,
        RenewalPeriod::Hour => 3600,
        RenewalPeriod::Day => 86_400,
    }
}

fn period_word(period: RenewalPeriod) -> &'static str {
    match period {
        RenewalPeriod::Second => "second",
        RenewalPeriod::Minute => "minute",
        RenewalPeriod::Hour => "hour",
        RenewalPeriod::Day => "day",
    }
}

/// One counter a request touches.
#[derive(Clone, Debug)]
struct Counter {
    key: String,
    kind: Kind,
    limit: u64,
    amount: u64,
    /// Unix seconds at which the window ends.
    reset_at: u64,
    period: RenewalPeriod,
    per_consumer: bool,
}

/// How much of one window is left, for the `x-ratelimit-*` headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowState {
    pub limit: u64,
    pub remaining: u64,
    pub reset: Duration,
}

/// A refused request: what to tell the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimited {
    pub message: String,
    /// Whole seconds until the refusing window renews.
    pub retry_after: u64,
    pub requests: Option<WindowState>,
    pub tokens: Option<WindowState>,
}

/// The counts a successful admission charged; settle it when the real token usage is known.
pub struct Reservation {
    limiter: Arc<Limiter>,
    shared: bool,
    /// Token counters and what was charged to them.
    tokens: Vec<(String, u64, u64)>,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("shared", &self.shared)
            .field("token_counters", &self.tokens.len())
            .finish()
    }
}

impl Reservation {
    /// Replaces the up-front token charge with `used`. Never blocks: a shared store is updated in
    /// the background.
    pub fn settle(self, used: u64) {
        // Clamped before any signed arithmetic: a huge figure must charge, never wrap to a refund.
        let used = signed(used.min(crate::llm::MAX_REPORTED_TOKENS));
        let deltas: Vec<(String, i64, u64)> = self
            .tokens
            .iter()
            .map(|(key, charged, ttl)| (key.clone(), used.saturating_sub(signed(*charged)), *ttl))
            .filter(|(_, delta, _)| *delta != 0)
            .collect();
        if deltas.is_empty() {
            return;
        }
        if self.shared
            && let Some(shared) = &self.limiter.shared
        {
            // A stream can be dropped while the runtime shuts down; a lost settlement is harmless then.
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return;
            };
            let shared = Arc::clone(shared);
            runtime.spawn(async move {
                if let Err(e) = tokio::time::timeout(STORE_TIMEOUT, shared.settle(&deltas)).await {
                    debug!(error = %e, "settling a token charge in the shared store timed out");
                }
            });
        } else {
            self.limiter.local.settle(&deltas);
        }
    }
}

fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Fixed-window counters in this process.
#[derive(Default)]
struct LocalCounters {
    counts: Mutex<HashMap<String, (u64, u64)>>,
}

impl LocalCounters {
    /// Checks every counter against `limit(c)` and charges all of them only if all pass.
    fn admit(&self, counters: &[Counter], now: u64, divisor: u64) -> (Option<usize>, Vec<u64>) {
        let mut counts = self.counts.lock();
        if counts.len() > 100_000 {
            counts.retain(|_, (_, reset_at)| *reset_at > now);
        }
        let current: Vec<u64> = counters
            .iter()
            .map(|c| match counts.get(&c.key) {
                Some((n, reset_at)) if *reset_at > now => *n,
                _ => 0,
            })
            .collect();
        let violated = counters
            .iter()
            .zip(&current)
            .position(|(c, n)| n.saturating_add(c.amount) > local_limit(c.limit, divisor));
        if violated.is_some() {
            return (violated, current);
        }
        let after = counters
            .iter()
            .zip(current)
            .map(|(c, n)| {
                let after = n.saturating_add(c.amount);
                counts.insert(c.key.clone(), (after, c.reset_at));
                after
            })
            .collect();
        (None, after)
    }

    fn settle(&self, deltas: &[(String, i64, u64)]) {
        let mut counts = self.counts.lock();
        for (key, delta, _) in deltas {
            if let Some((n, _)) = counts.get_mut(key) {
                *n = n.saturating_add_signed(*delta);
            }
        }
    }
}

/// Each replica's share of a limit while counting alone.
fn local_limit(limit: u64, divisor: u64) -> u64 {
    limit.div_ceil(divisor.max(1))
}

const ADMIT_SCRIPT: &str = r"
local out = {0}
for i = 1, #KEYS do
  local cur = tonumber(redis.call('GET', KEYS[i]) or '0')
  out[i + 1] = cur
  if out[1] == 0 and cur + tonumber(ARGV[3 * i - 1]) > tonumber(ARGV[3 * i - 2]) then
    out[1] = i
  end
end
if out[1] ~= 0 then return out end
for i = 1, #KEYS do
  out[i + 1] = redis.call('INCRBY', KEYS[i], ARGV[3 * i - 1])
  if redis.call('TTL', KEYS[i]) < 0 then redis.call('EXPIRE', KEYS[i], ARGV[3 * i]) end
end
return out
";

const SETTLE_SCRIPT: &str = r"
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('INCRBY', KEYS[i], ARGV[i]) end
end
return 0
";

/// Counters in Redis, shared by every replica.
struct SharedCounters {
    conn: ConnectionManager,
    admit: redis::Script,
    settle: redis::Script,
    /// Unix millis before which the store is not tried (after a failure).
    retry_at: AtomicU64,
    falling_back: AtomicBool,
}

impl SharedCounters {
    async fn admit(&self, counters: &[Counter], now: u64) -> redis::RedisResult<Vec<i64>> {
        let mut call = self.admit.prepare_invoke();
        for c in counters {
            call.key(&c.key)
                .arg(c.limit)
                .arg(c.amount)
                .arg(c.reset_at.saturating_sub(now).max(1));
        }
        call.invoke_async(&mut self.conn.clone()).await
    }

    async fn settle(&self, deltas: &[(String, i64, u64)]) -> redis::RedisResult<()> {
        let mut call = self.settle.prepare_invoke();
        for (key, delta, _) in deltas {
            call.key(key).arg(*delta);
        }
        call.invoke_async::<i64>(&mut self.conn.clone())
            .await
            .map(|_| ())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LimitsConfigError {
    #[error("--limits-store must be a redis:// or rediss:// URL: {0}")]
    InvalidUrl(String),
}

/// Enforces every Route's limits.
pub struct Limiter {
    local: LocalCounters,
    shared: Option<Arc<SharedCounters>>,
    /// How many replicas share a limit when each counts alone.
    replicas: AtomicU32,
    metrics: Arc<Metrics>,
}

impl Limiter {
    /// Local counting only.
    pub fn local(metrics: Arc<Metrics>, replicas: u32) -> Self {
        Limiter {
            local: LocalCounters::default(),
            shared: None,
            replicas: AtomicU32::new(replicas.max(1)),
            metrics,
        }
    }

    /// Counting in the Redis at `url`; connects lazily and reconnects on its own. Needs a Tokio runtime.
    pub fn shared(
        metrics: Arc<Metrics>,
        replicas: u32,
        url: &str,
    ) -> Result<Self, LimitsConfigError> {
        // The URL may carry a password: errors name only what is wrong with it.
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return Err(LimitsConfigError::InvalidUrl("unsupported scheme".into()));
        }
        let client = redis::Client::open(url)
            .map_err(|e| LimitsConfigError::InvalidUrl(format!("{:?}", e.kind())))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(STORE_TIMEOUT))
            .set_response_timeout(Some(STORE_TIMEOUT))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| LimitsConfigError::InvalidUrl(format!("{:?}", e.kind())))?;
        let mut limiter = Self::local(metrics, replicas);
        limiter.shared = Some(Arc::new(SharedCounters {
            conn,
            admit: redis::Script::new(ADMIT_SCRIPT),
            settle: redis::Script::new(SETTLE_SCRIPT),
            retry_at: AtomicU64::new(0),
            falling_back: AtomicBool::new(false),
        }));
        Ok(limiter)
    }

    pub fn set_replicas(&self, replicas: u32) {
        self.replicas.store(replicas.max(1), Ordering::Relaxed);
    }

    /// Counts one call (and `tokens` estimated tokens) against every limit of `route`. `Ok(None)`
    /// when the route has no token budget to settle.
    pub async fn admit(
        self: &Arc<Self>,
        route: &RouteEntry,
        consumer: &str,
        tokens: u64,
    ) -> Result<Option<Reservation>, RateLimited> {
        self.admit_calls(route, consumer, 1, tokens).await
    }

    /// Like `admit` for a request that costs `calls` upstream calls (a fanned-out embeddings request).
    pub async fn admit_calls(
        self: &Arc<Self>,
        route: &RouteEntry,
        consumer: &str,
        calls: u64,
        tokens: u64,
    ) -> Result<Option<Reservation>, RateLimited> {
        if route.limits.is_empty() {
            return Ok(None);
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let counters = counters(route, consumer, calls, tokens, now.as_secs());
        let (violated, used, shared) = self.count(&counters, now).await;
        let divisor = if shared {
            1
        } else {
            u64::from(self.replicas.load(Ordering::Relaxed))
        };
        if let Some(i) = violated {
            let c = &counters[i];
            self.metrics
                .rate_limited
                .get_or_create(&LimitLabels {
                    route: route.name.to_string(),
                    limit: c.kind.as_str(),
                })
                .inc();
            return Err(rejection(&route.name, &counters, &used, i, divisor, now));
        }
        let tokens: Vec<(String, u64, u64)> = counters
            .iter()
            .filter(|c| c.kind == Kind::Tokens)
            .map(|c| {
                (
                    c.key.clone(),
                    c.amount,
                    c.reset_at.saturating_sub(now.as_secs()).max(1),
                )
            })
            .collect();
        Ok((!tokens.is_empty()).then(|| Reservation {
            limiter: Arc::clone(self),
            shared,
            tokens,
        }))
    }

    /// Returns the violated counter (if any), the counts, and whether the shared store answered.
    async fn count(&self, counters: &[Counter], now: Duration) -> (Option<usize>, Vec<u64>, bool) {
        if let Some(shared) = &self.shared
            && now.as_millis() as u64 >= shared.retry_at.load(Ordering::Relaxed)
        {
            match tokio::time::timeout(STORE_TIMEOUT, shared.admit(counters, now.as_secs())).await {
                Ok(Ok(reply)) if store_reply(&reply, counters.len()).is_some() => {
                    if shared.falling_back.swap(false, Ordering::Relaxed) {
                        self.metrics.limits_fallback.set(0);
                        info!(
                            "the shared limits store answers again; limits are shared by all replicas"
                        );
                    }
                    let (violated, used) = store_reply(&reply, counters.len()).unwrap_or_default();
                    return (violated, used, true);
                }
                outcome => {
                    let error = match outcome {
                        Ok(Ok(_)) => "unexpected reply".to_string(),
                        Ok(Err(e)) => format!("{:?}", e.kind()),
                        Err(_) => "timed out".to_string(),
                    };
                    self.metrics.limits_store_errors.inc();
                    shared
                        .retry_at
                        .store((now + STORE_RETRY).as_millis() as u64, Ordering::Relaxed);
                    if !shared.falling_back.swap(true, Ordering::Relaxed) {
                        self.metrics.limits_fallback.set(1);
                        warn!(
                            error,
                            replicas = self.replicas.load(Ordering::Relaxed),
                            "the shared limits store is unreachable; enforcing limits locally, each replica taking 1/N of every limit"
                        );
                    }
                }
            }
        }
        let divisor = u64::from(self.replicas.load(Ordering::Relaxed));
        let (violated, used) = self.local.admit(counters, now.as_secs(), divisor);
        (violated, used, false)
    }
}

/// The admit script's reply, checked: `[violated (1-based, 0 for none), count per counter...]`.
/// Anything else (wrong length, an index out of range) is `None`, as if the store had failed.
fn store_reply(reply: &[i64], counters: usize) -> Option<(Option<usize>, Vec<u64>)> {
    let (&first, counts) = reply.split_first()?;
    if counts.len() != counters {
        return None;
    }
    let violated = match usize::try_from(first).ok()? {
        0 => None,
        i if i <= counters => Some(i - 1),
        _ => return None,
    };
    let used = counts
        .iter()
        .map(|n| u64::try_from(*n).unwrap_or(0))
        .collect();
    Some((violated, used))
}

/// The counters a call touches, in the order of the Route's limits.
fn counters(route: &RouteEntry, consumer: &str, calls: u64, tokens: u64, now: u64) -> Vec<Counter> {
    let mut out = Vec::with_capacity(route.limits.len() * 2);
    for (i, limit) in route.limits.iter().enumerate() {
        let period = period_secs(limit.renewal_period);
        let window = now / period;
        let per_consumer = limit.key == LimitKey::Consumer;
        let who = if per_consumer { consumer } else { "*" };
        for (kind, max, amount) in [
            (Kind::Calls, limit.calls, calls.max(1)),
            // Never charge more than the whole budget, or a large max_tokens could never pass.
            (Kind::Tokens, limit.tokens, tokens.max(1)),
        ] {
            let Some(max) = max else { continue };
            out.push(Counter {
                key: format!(
                    "portcullis:{}:{i}:{}:{who}:{window}",
                    route.name,
                    kind.as_str()
                ),
                kind,
                limit: max,
                amount: amount.min(max),
                reset_at: (window + 1) * period,
                period: limit.renewal_period,
                per_consumer,
            });
        }
    }
    out
}

fn rejection(
    route: &str,
    counters: &[Counter],
    used: &[u64],
    violated: usize,
    divisor: u64,
    now: Duration,
) -> RateLimited {
    let state = |i: usize| {
        let c = &counters[i];
        let limit = local_limit(c.limit, divisor);
        WindowState {
            limit,
            remaining: limit.saturating_sub(used.get(i).copied().unwrap_or(0)),
            reset: Duration::from_secs(c.reset_at).saturating_sub(now),
        }
    };
    // The refusing window for its kind; otherwise the tightest window of the other kind.
    let pick = |kind: Kind| {
        if counters[violated].kind == kind {
            return Some(state(violated));
        }
        (0..counters.len())
            .filter(|i| counters[*i].kind == kind)
            .map(state)
            .min_by_key(|s| s.remaining)
    };
    let c = &counters[violated];
    let s = state(violated);
    RateLimited {
        message: format!(
            "rate limit exceeded for route {route}: {} {} per {}{}",
            s.limit,
            c.kind.as_str(),
            period_word(c.period),
            if c.per_consumer { " per consumer" } else { "" }
        ),
        retry_after: s.reset.as_secs_f64().ceil().max(1.0) as u64,
        requests: pick(Kind::Calls),
        tokens: pick(Kind::Tokens),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Limit;

    fn entry(limits: Vec<Limit>) -> RouteEntry {
        RouteEntry {
            limits,
            ..RouteEntry::not_ready("r")
        }
    }

    fn limit(calls: Option<u64>, tokens: Option<u64>, key: LimitKey) -> Limit {
        Limit {
            renewal_period: RenewalPeriod::Day,
            calls,
            tokens,
            key,
        }
    }

    #[tokio::test]
    async fn calls_per_route_and_per_consumer() {
        let limiter = Arc::new(Limiter::local(Arc::new(Metrics::new()), 1));
        let route = entry(vec![
            limit(Some(5), None, LimitKey::Route),
            limit(Some(2), None, LimitKey::Consumer),
        ]);
        assert!(limiter.admit(&route, "a", 0).await.is_ok());
        assert!(limiter.admit(&route, "a", 0).await.is_ok());
        let refused = limiter.admit(&route, "a", 0).await.unwrap_err();
        assert!(refused.message.contains("per consumer"), "{refused:?}");
        assert_eq!(refused.requests.unwrap().remaining, 0);
        assert!(refused.retry_after >= 1);
        // Refused calls are not counted: b still gets its 2, then the route's 5 are used up.
        assert!(limiter.admit(&route, "b", 0).await.is_ok());
        assert!(limiter.admit(&route, "b", 0).await.is_ok());
        assert!(limiter.admit(&route, "c", 0).await.is_ok());
        let refused = limiter.admit(&route, "d", 0).await.unwrap_err();
        assert!(!refused.message.contains("per consumer"), "{refused:?}");
        assert_eq!(refused.requests.unwrap().limit, 5);
    }

    #[tokio::test]
    async fn token_budgets_charge_up_front_and_settle() {
        let limiter = Arc::new(Limiter::local(Arc::new(Metrics::new()), 1));
        let route = entry(vec![limit(None, Some(100), LimitKey::Route)]);
        let r = limiter.admit(&route, "", 60).await.unwrap().unwrap();
        // 60 reserved: another 60 does not fit...
        let refused = limiter.admit(&route, "", 60).await.unwrap_err();
        assert_eq!(refused.tokens.unwrap().remaining, 40);
        assert!(refused.requests.is_none());
        // ...until the first call settles at what it really used.
        r.settle(10);
        let r2 = limiter.admit(&route, "", 60).await.unwrap().unwrap();
        r2.settle(30);
        let refused = limiter.admit(&route, "", 61).await.unwrap_err();
        assert_eq!(refused.tokens.unwrap().remaining, 60);
        // A request larger than the whole budget is charged the budget, not refused forever.
        let fresh = entry(vec![limit(None, Some(100), LimitKey::Consumer)]);
        assert!(limiter.admit(&fresh, "x", 1_000).await.is_ok());
    }

    #[tokio::test]
    async fn an_absurd_usage_never_refunds_a_budget() {
        let limiter = Arc::new(Limiter::local(Arc::new(Metrics::new()), 1));
        let route = entry(vec![limit(None, Some(100), LimitKey::Route)]);
        for absurd in [u64::MAX, u64::MAX - 1, 1 << 63] {
            let fresh = entry(vec![limit(None, Some(100), LimitKey::Consumer)]);
            let who = format!("{absurd}");
            let r = limiter.admit(&fresh, &who, 10).await.unwrap().unwrap();
            r.settle(absurd);
            assert!(
                limiter.admit(&fresh, &who, 10).await.is_err(),
                "a usage of {absurd} refunded the budget"
            );
        }
        // The counter stays usable after a huge charge: no overflow on the next admission.
        let r = limiter.admit(&route, "", 10).await.unwrap().unwrap();
        r.settle(u64::MAX);
        assert!(limiter.admit(&route, "", u64::MAX).await.is_err());
    }

    #[tokio::test]
    async fn local_counting_takes_a_share_per_replica() {
        let limiter = Arc::new(Limiter::local(Arc::new(Metrics::new()), 3));
        let route = entry(vec![limit(Some(9), None, LimitKey::Route)]);
        for _ in 0..3 {
            assert!(limiter.admit(&route, "", 0).await.is_ok());
        }
        assert_eq!(
            limiter
                .admit(&route, "", 0)
                .await
                .unwrap_err()
                .requests
                .unwrap()
                .limit,
            3
        );
    }

    #[tokio::test]
    async fn unreachable_store_falls_back_to_local_counting() {
        let metrics = Arc::new(Metrics::new());
        // Port 1 on loopback: nothing listens, the connection is refused at once.
        let limiter = Arc::new(Limiter::shared(metrics.clone(), 2, "redis://127.0.0.1:1").unwrap());
        let route = entry(vec![limit(Some(4), None, LimitKey::Route)]);
        assert!(limiter.admit(&route, "", 0).await.is_ok());
        assert!(limiter.admit(&route, "", 0).await.is_ok());
        assert!(limiter.admit(&route, "", 0).await.is_err());
        assert_eq!(metrics.limits_fallback.get(), 1);
        assert!(metrics.limits_store_errors.get() >= 1);
    }

    #[test]
    fn store_replies_out_of_range_are_refused_not_trusted() {
        assert_eq!(store_reply(&[0, 5, 7], 2), Some((None, vec![5, 7])));
        assert_eq!(store_reply(&[2, 5, -7], 2), Some((Some(1), vec![5, 0])));
        assert_eq!(store_reply(&[3, 5, 7], 2), None, "index past the counters");
        assert_eq!(store_reply(&[-1, 5, 7], 2), None);
        assert_eq!(store_reply(&[i64::MAX, 5, 7], 2), None);
        assert_eq!(store_reply(&[0, 5], 2), None);
        assert_eq!(store_reply(&[], 0), None);
    }

    #[test]
    fn bad_store_urls_are_rejected() {
        let m = Arc::new(Metrics::new());
        assert!(Limiter::shared(m, 1, "http://x").is_err());
    }
}
