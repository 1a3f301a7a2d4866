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
use tracing::{debug, info, warn};

use crate::api::Limit;
use crate::api::{LimitKey, RenewalPeriod};
use crate::cost::Usd;
use crate::store::{KeyPrefix, Store, StoreError};
use crate::table::RouteEntry;
use crate::teams::TeamEntry;
use crate::telemetry::metrics::{LimitLabels, Metrics};

/// After a store failure, requests are counted locally this long before the store is tried again,
/// so an outage costs one timeout per interval, not one per request.
const STORE_RETRY: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Calls,
    Tokens,
    /// A USD budget, counted in whole nanodollars (each call's cost rounded up).
    Usd,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Calls => "calls",
            Kind::Tokens => "tokens",
            Kind::Usd => "usd",
        }
    }
}

/// What one call is counted as against a route's limits.
#[derive(Clone, Copy, Debug, Default)]
pub struct Charge {
    /// Upstream calls (a fanned-out embeddings request makes several).
    pub calls: u64,
    /// Estimated tokens, settled to the real usage.
    pub tokens: u64,
    /// The most the call can cost, settled to its real cost; `None` when its price is unknown.
    pub usd: Option<Usd>,
    /// A stream, which a `truncate` budget admits with what is left of it (at least `usd_floor`)
    /// and ends once that is spent.
    pub stream: bool,
    /// What the call costs before any output (its prompt).
    pub usd_floor: Usd,
    /// The fewest tokens that admit the call; `None`: all of `tokens` must fit. A call without
    /// `max_tokens` reserves its model's whole output maximum, but is admitted while its prompt
    /// and a typical answer fit: it then holds what is left, up to `tokens`. Whoever holds the
    /// rest of a budget blocks the others until it settles, so concurrent calls overshoot a
    /// budget by at most one call's reservation.
    pub tokens_min: Option<u64>,
    /// The same for `usd`.
    pub usd_min: Option<Usd>,
    /// What the call counts against Team USD budgets, when it differs from the Route's (a Team
    /// is charged at no less than the cluster-wide price); `None`: the same.
    pub team: Option<TeamCharge>,
}

/// A call's USD charge against Team budgets: the fields of `Charge` of the same names.
#[derive(Clone, Copy, Debug, Default)]
pub struct TeamCharge {
    pub usd: Option<Usd>,
    pub usd_floor: Usd,
    pub usd_min: Option<Usd>,
}

/// What a settled call cost: at the Route's price and at the Teams' (see `TeamCharge`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spent {
    pub route: Usd,
    pub team: Usd,
}

impl Spent {
    /// The same cost for Route and Team budgets.
    pub fn same(usd: Usd) -> Spent {
        Spent {
            route: usd,
            team: usd,
        }
    }
}

/// Nanodollars a budget counts for `usd`: rounded up, so rounding never lets spend through.
pub fn usd_units(usd: Usd) -> u64 {
    usd.0.div_ceil(1000)
}

/// A budget of `dollars` in the units `usd_units` counts.
pub fn budget_units(dollars: f64) -> u64 {
    Usd::from_dollars(dollars).map_or(0, usd_units)
}

fn period_word(period: RenewalPeriod) -> &'static str {
    match period {
        RenewalPeriod::Second => "second",
        RenewalPeriod::Minute => "minute",
        RenewalPeriod::Hour => "hour",
        RenewalPeriod::Day => "day",
        RenewalPeriod::Week => "week",
        RenewalPeriod::Month => "month",
    }
}

const DAY: u64 = 86_400;

/// The fixed window of `period` that Unix second `now` falls in: a number that identifies it and
/// the Unix second it ends. Windows are aligned in UTC: days at midnight, weeks on Monday 00:00
/// (ISO weeks), months on the 1st at 00:00.
pub fn window(period: RenewalPeriod, now: u64) -> (u64, u64) {
    let fixed = |len: u64| (now / len, (now / len + 1) * len);
    match period {
        RenewalPeriod::Second => fixed(1),
        RenewalPeriod::Minute => fixed(60),
        RenewalPeriod::Hour => fixed(3600),
        RenewalPeriod::Day => fixed(DAY),
        RenewalPeriod::Week => {
            // 1970-01-01 was a Thursday: day 4 is the first Monday.
            let week = (now / DAY + 3) / 7;
            (week, (week * 7 + 4) * DAY)
        }
        RenewalPeriod::Month => {
            let (y, m, _) = civil_from_days(now / DAY);
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            (y * 12 + (m - 1), days_from_civil(ny, nm, 1) * DAY)
        }
    }
}

/// (year, month 1-12, day 1-31) of a day counted from 1970-01-01 (H. Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// Days from 1970-01-01 to a date on or after it.
fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    (era * 146_097 + doe).saturating_sub(719_468)
}

/// A Unix second as RFC 3339 in UTC: `2026-12-01T00:00:00Z`.
pub fn utc_text(secs: u64) -> String {
    let (y, m, d) = civil_from_days(secs / DAY);
    let s = secs % DAY;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// Whose limits a counter belongs to, as refusals name it: borrowed from the Route's or Team's
/// entry, so a call copies none of it.
#[derive(Clone, Copy, Debug)]
struct Scope<'a> {
    /// `route` or `team`.
    what: &'static str,
    /// The route's served name or the team's name: rate-limit messages.
    name: &'a str,
    /// The route's `namespace/name` or the team's name: budget messages.
    full: &'a str,
    /// The Route's namespace (a Team has none): where its alert Events go.
    namespace: Option<&'a str>,
    /// The start of its counters' keys.
    keys: &'a KeyPrefix,
}

/// The start of a Route's counter keys, made when the Route is reconciled.
pub fn route_keys(served_as: &str) -> KeyPrefix {
    KeyPrefix::new("portcullis:", served_as)
}

/// The start of a Team's counter keys. They cannot collide with a Route's: a route's served name
/// never contains ':'.
pub fn team_keys(team: &str) -> KeyPrefix {
    KeyPrefix::new("portcullis:team:", team)
}

/// A limit with `action: alert` crossed 80% or 100% of itself: told once per window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitAlert {
    /// `Route` or `Team`.
    pub kind: &'static str,
    pub namespace: Option<String>,
    pub name: String,
    pub percent: u64,
    pub message: String,
}

/// Alerts waiting for the controller to publish them (bounded: a stuck publisher drops the oldest).
const MAX_PENDING_ALERTS: usize = 1000;

/// One counter a request touches.
#[derive(Clone, Debug)]
struct Counter {
    scope: usize,
    key: String,
    kind: Kind,
    limit: u64,
    amount: u64,
    /// The least amount that admits the call: `amount`, or less for a truncating stream, which is
    /// charged what is left when that is below `amount`.
    min: u64,
    truncate: bool,
    /// `action: alert`: counted, never refusing.
    alert: bool,
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
    /// The tightest USD budget, in nanodollars (`x-ratelimit-*-usd`).
    pub usd: Option<WindowState>,
}

/// The counts a successful admission charged; settle it when the real token usage is known.
pub struct Reservation {
    limiter: Arc<Limiter>,
    shared: bool,
    /// Token and USD counters: key, kind, what was charged, seconds left in the window, and
    /// whether a Team's (whose USD is counted at the Team price).
    charged: Vec<(String, Kind, u64, u64, bool)>,
    /// For a stream under `truncate` budgets: the USD (nanodollars) it may spend before it is
    /// ended, and the budget that sets it.
    allowance: Option<(u64, String)>,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("shared", &self.shared)
            .field("counters", &self.charged.len())
            .finish()
    }
}

impl Reservation {
    /// The USD a truncatable stream may spend, when a `truncate` budget applies.
    pub fn allowance(&self) -> Option<(Usd, &str)> {
        self.allowance
            .as_ref()
            .map(|(n, budget)| (Usd(n.saturating_mul(1000)), budget.as_str()))
    }

    /// Replaces the up-front token charge with `used`, keeping any USD charge as reserved.
    pub fn settle(self, used: u64) {
        self.settle_cost(used, None);
    }

    /// Replaces the up-front charges with `used` tokens and `cost` (`None`: unknown, the USD
    /// reservation stands). Never blocks: a shared store is updated in the background.
    pub fn settle_cost(self, used: u64, cost: Option<Usd>) {
        self.settle_spent(used, cost.map(Spent::same), false);
    }

    /// Replaces the up-front charges with `used` tokens and `spent` (`None`: unknown, the USD
    /// reservation stands). With `at_least` (a call the provider may have billed without saying
    /// what it used: a timeout after the request was sent, a broken or oversized answer), only
    /// what exceeds the reservation is charged; it is never refunded.
    pub fn settle_spent(self, used: u64, spent: Option<Spent>, at_least: bool) {
        // Clamped before any signed arithmetic: a huge figure must charge, never wrap to a refund.
        let used = signed(used.min(crate::llm::MAX_REPORTED_TOKENS));
        let cost = spent.map(|c| (signed(usd_units(c.route)), signed(usd_units(c.team))));
        let deltas: Vec<(String, i64, u64)> = self
            .charged
            .iter()
            .filter_map(|(key, kind, charged, ttl, team)| {
                let real = match (kind, cost) {
                    (Kind::Usd, None) => return None,
                    (Kind::Usd, Some((route, team_cost))) => {
                        if *team {
                            team_cost
                        } else {
                            route
                        }
                    }
                    _ => used,
                };
                let delta = real.saturating_sub(signed(*charged));
                Some((
                    key.clone(),
                    if at_least { delta.max(0) } else { delta },
                    *ttl,
                ))
            })
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
                if let Err(e) = shared.settle(&deltas).await {
                    debug!(error = %e, "settling a token charge in the shared store failed");
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
    /// Alerts already told this window: key -> the window's end.
    told: Mutex<HashMap<String, u64>>,
}

impl LocalCounters {
    /// Checks every counter against `limit(c)` and charges all of them only if all pass.
    fn admit(&self, counters: &[Counter], now: u64, divisor: u64) -> Counted {
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
            .position(|(c, n)| n.saturating_add(c.min) > c.enforced(divisor));
        if violated.is_some() {
            return Counted {
                violated,
                used: current,
                charged: Vec::new(),
            };
        }
        let (used, charged) = counters
            .iter()
            .zip(current)
            .map(|(c, n)| {
                let charge = c.amount.min(c.enforced(divisor).saturating_sub(n));
                let after = n.saturating_add(charge);
                counts.insert(c.key.clone(), (after, c.reset_at));
                (after, charge)
            })
            .unzip();
        Counted {
            violated: None,
            used,
            charged,
        }
    }

    /// True the first time `key` is told in a window that ends at `reset_at`.
    fn first_alert(&self, key: &str, reset_at: u64, now: u64) -> bool {
        let mut told = self.told.lock();
        if told.len() > 10_000 {
            told.retain(|_, end| *end > now);
        }
        match told.get(key) {
            Some(end) if *end > now => false,
            _ => {
                told.insert(key.to_string(), reset_at);
                true
            }
        }
    }

    /// Adds `n` (a share of what the store last counted) to `key`'s count, keeping what calls
    /// that raced ahead of the seeding already admitted.
    fn seed(&self, key: &str, n: u64, reset_at: u64, now: u64) {
        let mut counts = self.counts.lock();
        let entry = counts.entry(key.to_string()).or_insert((0, reset_at));
        if entry.1 <= now {
            *entry = (0, reset_at);
        }
        entry.0 = entry.0.saturating_add(n);
    }

    /// Every count of a window not yet over, leaving none.
    fn drain(&self, now: u64) -> Vec<(String, u64, u64)> {
        self.counts
            .lock()
            .drain()
            .filter(|(_, (_, reset_at))| *reset_at > now)
            .map(|(key, (n, reset_at))| (key, n, reset_at))
            .collect()
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

impl Counter {
    /// The count past which this counter refuses: its share of the limit, or never for an alert.
    fn enforced(&self, divisor: u64) -> u64 {
        if self.alert {
            // Within Redis's signed 64 bits.
            i64::MAX as u64
        } else {
            local_limit(self.limit, divisor)
        }
    }
}

/// Each replica's share of a limit while counting alone.
fn local_limit(limit: u64, divisor: u64) -> u64 {
    limit.div_ceil(divisor.max(1))
}

/// Per counter: limit, amount, least amount that admits, TTL. Replies `[0, count..., charged...]`
/// when admitted, `[i, count...]` when counter i refuses.
const ADMIT_SCRIPT: &str = r"
local n = #KEYS
local out = {0}
for i = 1, n do
  local cur = tonumber(redis.call('GET', KEYS[i]) or '0')
  out[i + 1] = cur
  if out[1] == 0 and cur + tonumber(ARGV[4 * i - 1]) > tonumber(ARGV[4 * i - 3]) then
    out[1] = i
  end
end
if out[1] ~= 0 then return out end
for i = 1, n do
  local charge = math.min(tonumber(ARGV[4 * i - 2]), tonumber(ARGV[4 * i - 3]) - out[i + 1])
  out[i + 1] = redis.call('INCRBY', KEYS[i], string.format('%d', charge))
  out[n + i + 1] = charge
  if redis.call('TTL', KEYS[i]) < 0 then redis.call('EXPIRE', KEYS[i], ARGV[4 * i]) end
end
return out
";

/// What an admission found: the refusing counter if any, each counter's count, and (when
/// admitted) what each was charged.
#[derive(Debug, Default, PartialEq, Eq)]
struct Counted {
    violated: Option<usize>,
    used: Vec<u64>,
    charged: Vec<u64>,
}

const SETTLE_SCRIPT: &str = r"
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('INCRBY', KEYS[i], ARGV[i]) end
end
return 0
";

/// Counters in Redis, shared by every replica.
struct SharedCounters {
    store: Store,
    admit: redis::Script,
    settle: redis::Script,
    /// Unix millis before which the store is not tried (after a failure).
    retry_at: AtomicU64,
    falling_back: AtomicBool,
    /// The count the store last gave for each key, and its window's end: where this replica's
    /// share starts when it has to count alone.
    seen: Mutex<HashMap<String, (u64, u64)>>,
    /// Where counting alone started, per key: what it admitted beyond that is added to the store
    /// when it answers again.
    seeds: Mutex<HashMap<String, u64>>,
}

/// Adds `deltas` to the keys that exist (one script per hash slot in a Cluster).
async fn settle_in(
    store: &Store,
    script: &redis::Script,
    deltas: &[(String, i64, u64)],
) -> Result<(), StoreError> {
    let mut groups: Vec<&[(String, i64, u64)]> = Vec::new();
    if store.is_cluster() {
        // Settlements come in counter order, so each Route's or Team's keys are adjacent.
        let mut rest = deltas;
        while let Some((first, _)) = rest.split_first() {
            let slot = crate::store::slot_of(&first.0);
            let n = rest
                .iter()
                .take_while(|d| crate::store::slot_of(&d.0) == slot)
                .count();
            groups.push(&rest[..n]);
            rest = &rest[n..];
        }
    } else {
        groups.push(deltas);
    }
    for group in groups {
        let mut call = script.prepare_invoke();
        for (key, delta, _) in group {
            call.key(key).arg(*delta);
        }
        store.invoke::<i64>(&call).await?;
    }
    Ok(())
}

impl SharedCounters {
    fn new(store: Store) -> Self {
        SharedCounters {
            store,
            admit: redis::Script::new(ADMIT_SCRIPT),
            settle: redis::Script::new(SETTLE_SCRIPT),
            retry_at: AtomicU64::new(0),
            falling_back: AtomicBool::new(false),
            seen: Mutex::default(),
            seeds: Mutex::default(),
        }
    }

    /// One script per hash slot: everything in one round trip on one node; in a Cluster, one
    /// per Route or Team the call counts against (see `count_in_store`).
    async fn admit(&self, counters: &[Counter], now: u64) -> Result<Vec<i64>, StoreError> {
        let mut call = self.admit.prepare_invoke();
        for c in counters {
            call.key(&c.key)
                .arg(c.enforced(1))
                .arg(c.amount)
                .arg(c.min)
                .arg(c.reset_at.saturating_sub(now).max(1));
        }
        self.store.invoke(&call).await
    }

    async fn settle(&self, deltas: &[(String, i64, u64)]) -> Result<(), StoreError> {
        settle_in(&self.store, &self.settle, deltas).await
    }

    /// Remembers the counts the store gave (up to a refusing counter: in a Cluster the later ones
    /// were not read).
    fn saw(&self, counters: &[Counter], counted: &Counted, now: u64) {
        let known = counted.violated.map_or(counters.len(), |i| i + 1);
        let mut seen = self.seen.lock();
        if seen.len() > 100_000 {
            seen.retain(|_, (_, reset_at)| *reset_at > now);
            // Bounded whatever the consumers: forgetting only widens a share while counting alone.
            if seen.len() > 100_000 {
                seen.clear();
            }
        }
        for (c, n) in counters.iter().zip(&counted.used).take(known) {
            match seen.get_mut(&c.key) {
                Some(entry) => *entry = (*n, c.reset_at),
                None => {
                    seen.insert(c.key.clone(), (*n, c.reset_at));
                }
            }
        }
    }

    /// Adds (or takes back) counts in the background.
    fn push(&self, deltas: Vec<(String, i64, u64)>, what: &'static str) {
        if deltas.is_empty() {
            return;
        }
        let (store, settle) = (self.store.clone(), self.settle.clone());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = settle_in(&store, &settle, &deltas).await {
                    debug!(error = %e, what, "updating counts in the shared store failed");
                }
            });
        }
    }

    /// Counts in the store, all or nothing. In a Cluster the keys of different Routes and Teams
    /// live in different slots: each is checked and charged in turn, and when a later one
    /// refuses (or fails) the earlier charges are taken back. Meanwhile another call may see
    /// them and be refused; none is ever admitted past a limit.
    async fn count(&self, counters: &[Counter], now: u64) -> Result<Counted, StoreError> {
        if !self.store.is_cluster() || counters.iter().all(|c| c.scope == counters[0].scope) {
            let reply = self.admit(counters, now).await?;
            return store_reply(&reply, counters.len())
                .ok_or_else(|| StoreError::Reply("unexpected reply".into()));
        }
        let mut total = Counted::default();
        let mut done = 0;
        while done < counters.len() {
            let scope = counters[done].scope;
            let n = counters[done..]
                .iter()
                .take_while(|c| c.scope == scope)
                .count();
            let group = &counters[done..done + n];
            let counted = match self.admit(group, now).await {
                Ok(reply) => store_reply(&reply, n)
                    .ok_or_else(|| StoreError::Reply("unexpected reply".into())),
                Err(e) => Err(e),
            };
            let refund = |total: &Counted| {
                counters[..done]
                    .iter()
                    .zip(&total.charged)
                    .filter(|(_, n)| **n > 0)
                    .map(|(c, n)| (c.key.clone(), -signed(*n), 0))
                    .collect::<Vec<_>>()
            };
            match counted {
                Ok(Counted {
                    violated: None,
                    used,
                    charged,
                }) => {
                    total.used.extend(used);
                    total.charged.extend(charged);
                    done += n;
                }
                Ok(Counted {
                    violated: Some(i),
                    used,
                    ..
                }) => {
                    self.push(refund(&total), "taking back a charge");
                    total.used.extend(used);
                    total.used.resize(counters.len(), 0);
                    total.violated = Some(done + i);
                    total.charged.clear();
                    return Ok(total);
                }
                Err(e) => {
                    self.push(refund(&total), "taking back a charge");
                    return Err(e);
                }
            }
        }
        Ok(total)
    }
}

/// Enforces every Route's limits.
pub struct Limiter {
    local: LocalCounters,
    shared: Option<Arc<SharedCounters>>,
    /// How many replicas share a limit when each counts alone.
    replicas: AtomicU32,
    metrics: Arc<Metrics>,
    alerts: Mutex<std::collections::VecDeque<LimitAlert>>,
}

impl Limiter {
    /// Local counting only.
    pub fn local(metrics: Arc<Metrics>, replicas: u32) -> Self {
        metrics.replicas.set(i64::from(replicas.max(1)));
        Limiter {
            local: LocalCounters::default(),
            shared: None,
            replicas: AtomicU32::new(replicas.max(1)),
            metrics,
            alerts: Mutex::default(),
        }
    }

    /// Counting in the shared `store`.
    pub fn shared(metrics: Arc<Metrics>, replicas: u32, store: Store) -> Self {
        let mut limiter = Self::local(metrics, replicas);
        limiter.shared = Some(Arc::new(SharedCounters::new(store)));
        limiter
    }

    /// The alerts crossed since the last call, for the controller to publish as Events.
    pub fn take_alerts(&self) -> Vec<LimitAlert> {
        self.alerts.lock().drain(..).collect()
    }

    fn tell(&self, alert: LimitAlert) {
        warn!(
            kind = alert.kind,
            namespace = alert.namespace.as_deref().unwrap_or_default(),
            name = %alert.name,
            percent = alert.percent,
            message = %alert.message,
            "limit alert"
        );
        self.metrics
            .cost
            .alerts
            .get_or_create(&crate::telemetry::metrics::AlertLabels {
                kind: alert.kind,
                name: match &alert.namespace {
                    Some(ns) => format!("{ns}/{}", alert.name),
                    None => alert.name.clone(),
                },
                percent: alert.percent,
            })
            .inc();
        let mut pending = self.alerts.lock();
        if pending.len() >= MAX_PENDING_ALERTS {
            pending.pop_front();
        }
        pending.push_back(alert);
    }

    /// Shared (not per-consumer) limits' use after an admission, as gauges: per-consumer ones
    /// would make a series per caller.
    fn export_usage(
        &self,
        scopes: &[(Scope<'_>, &[Limit])],
        counters: &[Counter],
        used: &[u64],
        divisor: u64,
    ) {
        for (c, &n) in counters.iter().zip(used).filter(|(c, _)| !c.per_consumer) {
            let owner = &scopes[c.scope].0;
            let labels = crate::telemetry::metrics::BudgetLabels {
                kind: if owner.what == "team" {
                    "Team"
                } else {
                    "Route"
                },
                name: owner.full.to_string(),
                limit: c.kind.as_str(),
                period: period_word(c.period),
            };
            // USD budgets count nanodollars.
            let unit = if c.kind == Kind::Usd { 1e-9 } else { 1.0 };
            let budgets = &self.metrics.budgets;
            budgets.used.get_or_create(&labels).set(n as f64 * unit);
            let limit = local_limit(c.limit, divisor) as f64 * unit;
            budgets.limit.get_or_create(&labels).set(limit);
            let end = i64::try_from(c.reset_at).unwrap_or(i64::MAX);
            budgets.window_end.get_or_create(&labels).set(end);
        }
    }

    /// Alert counters whose admission crossed 80% or 100%: each crossing is told once per window
    /// across replicas (a marker set only if absent in the shared store, or in this process).
    fn check_alerts(
        self: &Arc<Self>,
        scopes: &[(Scope<'_>, &[Limit])],
        counters: &[Counter],
        counted: (&[u64], &[u64]),
        shared: bool,
        now: u64,
    ) {
        let divisor = if shared {
            1
        } else {
            u64::from(self.replicas.load(Ordering::Relaxed))
        };
        for (c, (&after, &charge)) in counters
            .iter()
            .zip(counted.0.iter().zip(counted.1))
            .filter(|(c, _)| c.alert)
        {
            let limit = local_limit(c.limit, divisor);
            let before = after.saturating_sub(charge);
            for percent in [80u64, 100] {
                let threshold = limit.saturating_mul(percent).div_ceil(100);
                if !(before < threshold && after >= threshold) {
                    continue;
                }
                let owner = &scopes[c.scope].0;
                let alert = LimitAlert {
                    kind: if owner.what == "team" {
                        "Team"
                    } else {
                        "Route"
                    },
                    namespace: owner.namespace.map(str::to_string),
                    name: owner
                        .full
                        .rsplit('/')
                        .next()
                        .unwrap_or_default()
                        .to_string(),
                    percent,
                    message: format!(
                        "{} reached {percent}% (window ends {}); alert only, calls are not refused",
                        limit_text(owner, c),
                        utc_text(c.reset_at)
                    ),
                };
                let marker = format!("{}:alert{percent}", c.key);
                let ttl = c.reset_at.saturating_sub(now).max(1);
                match (&self.shared, shared) {
                    (Some(store), true) => {
                        let (store, limiter) = (Arc::clone(store), Arc::clone(self));
                        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                            runtime.spawn(async move {
                                let mut cmd = redis::cmd("SET");
                                cmd.arg(&marker).arg(1).arg("NX").arg("EX").arg(ttl);
                                if let Ok(Some(_)) = store.store.query::<Option<String>>(&cmd).await
                                {
                                    limiter.tell(alert);
                                }
                            });
                        }
                    }
                    _ => {
                        if self.local.first_alert(&marker, c.reset_at, now) {
                            self.tell(alert);
                        }
                    }
                }
            }
        }
    }

    pub fn set_replicas(&self, replicas: u32) {
        self.replicas.store(replicas.max(1), Ordering::Relaxed);
        self.metrics.replicas.set(i64::from(replicas.max(1)));
    }

    /// Counts one call (and `tokens` estimated tokens) against every limit of `route`. `Ok(None)`
    /// when the route has no token or USD budget to settle.
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
        self.admit_charge(
            route,
            consumer,
            Charge {
                calls,
                tokens,
                ..Charge::default()
            },
        )
        .await
    }

    /// Counts `charge` against every limit of `route`, all or nothing.
    pub async fn admit_charge(
        self: &Arc<Self>,
        route: &RouteEntry,
        consumer: &str,
        charge: Charge,
    ) -> Result<Option<Reservation>, RateLimited> {
        self.admit_with_teams(route, &[], consumer, charge).await
    }

    /// Counts `charge` against every limit of `route` and of each of the caller's `teams`, all
    /// or nothing (one store round trip for all of them).
    pub async fn admit_with_teams(
        self: &Arc<Self>,
        route: &RouteEntry,
        teams: &[Arc<TeamEntry>],
        consumer: &str,
        charge: Charge,
    ) -> Result<Option<Reservation>, RateLimited> {
        if route.limits.is_empty() && teams.iter().all(|t| t.limits.is_empty()) {
            return Ok(None);
        }
        let mut scopes = Vec::with_capacity(1 + teams.len());
        scopes.push((
            Scope {
                what: "route",
                name: &route.name,
                full: &route.qualified,
                namespace: Some(&route.namespace),
                keys: &route.counter_keys,
            },
            route.limits.as_slice(),
        ));
        for t in teams {
            scopes.push((
                Scope {
                    what: "team",
                    name: &t.name,
                    full: &t.name,
                    namespace: None,
                    keys: &t.counter_keys,
                },
                t.limits.as_slice(),
            ));
        }
        self.admit_scopes(&scopes, &route.name, consumer, charge)
            .await
    }

    /// Counts one call of an MCP tool (`namespace/server/tool`) against `limits`, keyed apart
    /// from routes (`portcullis:mcp:...`) in the same store and windows.
    pub async fn admit_tool(
        self: &Arc<Self>,
        tool: &str,
        limits: &[Limit],
        consumer: &str,
    ) -> Result<(), RateLimited> {
        if limits.is_empty() {
            return Ok(());
        }
        // Counter keys are split on ':'; MCP tool names may contain one.
        let name = tool.replace(':', "_");
        // Apart from routes: a route's served name never starts with `mcp:`.
        let keys = KeyPrefix::new("portcullis:mcp:", &name);
        let scopes = [(
            Scope {
                what: "tool",
                name: &name,
                full: &name,
                namespace: tool.split('/').next(),
                keys: &keys,
            },
            limits,
        )];
        let label = format!("mcp/{name}");
        let charge = Charge {
            calls: 1,
            ..Charge::default()
        };
        self.admit_scopes(&scopes, &label, consumer, charge)
            .await
            .map(|_| ())
    }

    async fn admit_scopes(
        self: &Arc<Self>,
        scopes: &[(Scope<'_>, &[Limit])],
        label: &str,
        consumer: &str,
        charge: Charge,
    ) -> Result<Option<Reservation>, RateLimited> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let tagged = self.shared.as_ref().is_some_and(|s| s.store.is_cluster());
        let counters = counters(scopes, consumer, charge, now.as_secs(), tagged);
        let (
            Counted {
                violated,
                used,
                charged,
            },
            shared,
        ) = self.count(&counters, now).await;
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
                    route: label.to_string(),
                    limit: match (c.scope, c.kind) {
                        (0, kind) => kind.as_str(),
                        (_, Kind::Calls) => "team-calls",
                        (_, Kind::Tokens) => "team-tokens",
                        (_, Kind::Usd) => "team-usd",
                    },
                })
                .inc();
            return Err(rejection(
                &scopes[c.scope].0,
                &counters,
                &used,
                i,
                divisor,
                now,
            ));
        }
        self.check_alerts(scopes, &counters, (&used, &charged), shared, now.as_secs());
        self.export_usage(scopes, &counters, &used, divisor);
        let allowance = counters
            .iter()
            .zip(&charged)
            .filter(|(c, _)| c.truncate)
            .min_by_key(|(_, n)| **n)
            .map(|(c, n)| (*n, limit_text(&scopes[c.scope].0, c)));
        let charged: Vec<(String, Kind, u64, u64, bool)> = counters
            .iter()
            .zip(charged)
            .filter(|(c, _)| c.kind != Kind::Calls)
            .map(|(c, n)| {
                (
                    c.key.clone(),
                    c.kind,
                    n,
                    c.reset_at.saturating_sub(now.as_secs()).max(1),
                    scopes[c.scope].0.what == "team",
                )
            })
            .collect();
        Ok((!charged.is_empty()).then(|| Reservation {
            limiter: Arc::clone(self),
            shared,
            charged,
            allowance,
        }))
    }

    /// Counting alone starts each counter the store has told this replica about at 1/N of the
    /// store's count, so the replicas together admit about what was left, not a whole limit more.
    fn start_alone(&self, shared: &SharedCounters, now: u64) {
        let divisor = u64::from(self.replicas.load(Ordering::Relaxed)).max(1);
        let seen = shared.seen.lock();
        let mut seeds = shared.seeds.lock();
        seeds.clear();
        for (key, (n, reset_at)) in seen.iter().filter(|(_, (_, end))| *end > now) {
            let share = n.div_ceil(divisor);
            seeds.insert(key.clone(), share);
            self.local.seed(key, share, *reset_at, now);
        }
    }

    /// Adds what this replica admitted alone to the store's counts (keys the store still has: one
    /// that came back empty starts its windows afresh); the number of keys updated.
    fn hand_back(&self, shared: &SharedCounters, now: u64) -> usize {
        let seeds = std::mem::take(&mut *shared.seeds.lock());
        let deltas: Vec<(String, i64, u64)> = self
            .local
            .drain(now)
            .into_iter()
            .filter_map(|(key, n, reset_at)| {
                let alone = n.saturating_sub(seeds.get(&key).copied().unwrap_or(0));
                (alone > 0).then(|| (key, signed(alone), reset_at.saturating_sub(now)))
            })
            .collect();
        let added = deltas.len();
        shared.push(deltas, "adding what was counted alone");
        added
    }

    /// Counts in the shared store, or locally when it does not answer; true when it answered.
    async fn count(&self, counters: &[Counter], now: Duration) -> (Counted, bool) {
        if let Some(shared) = &self.shared
            && now.as_millis() as u64 >= shared.retry_at.load(Ordering::Relaxed)
        {
            // One deadline for the whole count, however many slots it touches.
            let counting = shared.count(counters, now.as_secs());
            match tokio::time::timeout(shared.store.timeout(), counting).await {
                Ok(Ok(counted)) => {
                    if shared.falling_back.swap(false, Ordering::Relaxed) {
                        self.metrics.limits_fallback.set(0);
                        let added = self.hand_back(shared, now.as_secs());
                        info!(
                            added,
                            "the shared limits store answers again; limits are shared by all replicas"
                        );
                    }
                    shared.saw(counters, &counted, now.as_secs());
                    return (counted, true);
                }
                outcome => {
                    let error = match outcome {
                        Ok(Err(e)) => e.to_string(),
                        _ => StoreError::Timeout.to_string(),
                    };
                    self.metrics.limits_store_errors.inc();
                    shared
                        .retry_at
                        .store((now + STORE_RETRY).as_millis() as u64, Ordering::Relaxed);
                    if !shared.falling_back.swap(true, Ordering::Relaxed) {
                        self.metrics.limits_fallback.set(1);
                        self.start_alone(shared, now.as_secs());
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
        (self.local.admit(counters, now.as_secs(), divisor), false)
    }
}

/// The admit script's reply, checked: `[0, count..., charged...]` or `[violated (1-based),
/// count...]`. Anything else (wrong length, an index out of range) is `None`, as if the store had
/// failed.
fn store_reply(reply: &[i64], counters: usize) -> Option<Counted> {
    let (&first, rest) = reply.split_first()?;
    let violated = match usize::try_from(first).ok()? {
        0 => None,
        i if i <= counters => Some(i - 1),
        _ => return None,
    };
    let expected = if violated.is_some() {
        counters
    } else {
        2 * counters
    };
    if rest.len() != expected {
        return None;
    }
    let figures =
        |s: &[i64]| -> Vec<u64> { s.iter().map(|n| u64::try_from(*n).unwrap_or(0)).collect() };
    Some(Counted {
        violated,
        used: figures(&rest[..counters]),
        charged: figures(&rest[counters..]),
    })
}

/// The counters a call touches, in the order of the Route's limits.
/// `tagged`: keys carry their Route's or Team's name as a Cluster hash tag.
fn counters(
    scopes: &[(Scope<'_>, &[Limit])],
    consumer: &str,
    charge: Charge,
    now: u64,
    tagged: bool,
) -> Vec<Counter> {
    let mut out = Vec::with_capacity(scopes.iter().map(|s| s.1.len()).sum::<usize>() * 2);
    for (scope, (owner, limits)) in scopes.iter().enumerate() {
        push_counters(
            &mut out, scope, owner, limits, consumer, charge, now, tagged,
        );
    }
    out
}

#[allow(clippy::too_many_arguments)] // the parts of one key
fn push_counters(
    out: &mut Vec<Counter>,
    scope: usize,
    owner: &Scope<'_>,
    limits: &[Limit],
    consumer: &str,
    charge: Charge,
    now: u64,
    tagged: bool,
) {
    let prefix = owner.keys.get(tagged);
    let usd = match (owner.what, charge.team) {
        ("team", Some(team)) => team,
        _ => TeamCharge {
            usd: charge.usd,
            usd_floor: charge.usd_floor,
            usd_min: charge.usd_min,
        },
    };
    for (i, limit) in limits.iter().enumerate() {
        let (window, reset_at) = window(limit.renewal_period, now);
        let per_consumer = limit.key == LimitKey::Consumer;
        let who = if per_consumer { consumer } else { "*" };
        for (kind, max, amount) in [
            (Kind::Calls, limit.calls, charge.calls.max(1)),
            // Never charge more than the whole budget, or a large max_tokens could never pass.
            (Kind::Tokens, limit.tokens, charge.tokens.max(1)),
            // A price is known wherever a USD budget applies (reconcile sees to it).
            (
                Kind::Usd,
                limit.usd.map(budget_units),
                usd.usd.map_or(0, usd_units),
            ),
        ] {
            let Some(max) = max else { continue };
            let amount = amount.min(max);
            let alert = limit.action == Some(crate::api::LimitAction::Alert);
            let truncate = !alert
                && kind == Kind::Usd
                && charge.stream
                && limit.on_exceed == Some(crate::api::OnExceed::Truncate);
            out.push(Counter {
                scope,
                key: format!("{prefix}:{i}:{}:{who}:{window}", kind.as_str()),
                kind,
                limit: max,
                amount,
                // A truncating stream starts while its prompt (at least a nanodollar) fits; a
                // call without max_tokens while its prompt and a typical answer do.
                min: match kind {
                    Kind::Usd if truncate => usd_units(usd.usd_floor).clamp(1, amount.max(1)),
                    Kind::Usd => usd
                        .usd_min
                        .map_or(amount, |m| usd_units(m).clamp(1, amount.max(1))),
                    Kind::Tokens => charge
                        .tokens_min
                        .map_or(amount, |m| m.clamp(1, amount.max(1))),
                    Kind::Calls => amount,
                },
                truncate,
                alert,
                reset_at,
                period: limit.renewal_period,
                per_consumer,
            });
        }
    }
}

/// `route ns/name: $1.00 per day`, `team t: 100 calls per hour per consumer`.
fn limit_text(owner: &Scope<'_>, c: &Counter) -> String {
    let amount = match c.kind {
        Kind::Usd => format!("${}", Usd(c.limit.saturating_mul(1000)).format(2)),
        kind => format!("{} {}", c.limit, kind.as_str()),
    };
    format!(
        "{} {}: {amount} per {}{}",
        owner.what,
        owner.full,
        period_word(c.period),
        if c.per_consumer { " per consumer" } else { "" }
    )
}

fn rejection(
    owner: &Scope<'_>,
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
            .filter(|i| counters[*i].kind == kind && !counters[*i].alert)
            .map(state)
            .min_by_key(|s| s.remaining)
    };
    let c = &counters[violated];
    let s = state(violated);
    let per = format!(
        "per {}{}",
        period_word(c.period),
        if c.per_consumer { " per consumer" } else { "" }
    );
    let message = match c.kind {
        Kind::Usd => format!(
            "USD budget exceeded for {} {}: ${} {per}, resets {}",
            owner.what,
            owner.full,
            Usd(s.limit.saturating_mul(1000)).format(2),
            utc_text(c.reset_at)
        ),
        kind => format!(
            "rate limit exceeded for {} {}: {} {} {per}",
            owner.what,
            owner.name,
            s.limit,
            kind.as_str(),
        ),
    };
    RateLimited {
        message,
        retry_after: s.reset.as_secs_f64().ceil().max(1.0) as u64,
        requests: pick(Kind::Calls),
        tokens: pick(Kind::Tokens),
        usd: pick(Kind::Usd),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Limit;

    fn entry(limits: Vec<Limit>) -> RouteEntry {
        RouteEntry {
            metrics: Default::default(),
            limits,
            ..RouteEntry::not_ready("r")
        }
    }

    fn limit(calls: Option<u64>, tokens: Option<u64>, key: LimitKey) -> Limit {
        Limit {
            renewal_period: RenewalPeriod::Day,
            calls,
            tokens,
            usd: None,
            key,
            on_exceed: None,
            action: None,
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
        let args = crate::store::StoreArgs {
            store_timeout: Duration::from_millis(50),
            ..Default::default()
        };
        let store = Store::open(&args, "redis://127.0.0.1:1").unwrap();
        let limiter = Arc::new(Limiter::shared(metrics.clone(), 2, store));
        let route = entry(vec![limit(Some(4), None, LimitKey::Route)]);
        assert!(limiter.admit(&route, "", 0).await.is_ok());
        assert!(limiter.admit(&route, "", 0).await.is_ok());
        assert!(limiter.admit(&route, "", 0).await.is_err());
        assert_eq!(metrics.limits_fallback.get(), 1);
        assert!(metrics.limits_store_errors.get() >= 1);
    }

    #[test]
    fn store_replies_out_of_range_are_refused_not_trusted() {
        assert_eq!(
            store_reply(&[0, 5, 7, 1, 2], 2),
            Some(Counted {
                violated: None,
                used: vec![5, 7],
                charged: vec![1, 2]
            })
        );
        assert_eq!(
            store_reply(&[2, 5, -7], 2),
            Some(Counted {
                violated: Some(1),
                used: vec![5, 0],
                charged: vec![]
            })
        );
        assert_eq!(store_reply(&[0, 5, 7], 2), None, "admitted without charges");
        assert_eq!(store_reply(&[3, 5, 7], 2), None, "index past the counters");
        assert_eq!(store_reply(&[-1, 5, 7], 2), None);
        assert_eq!(store_reply(&[i64::MAX, 5, 7], 2), None);
        assert_eq!(store_reply(&[0, 5], 2), None);
        assert_eq!(store_reply(&[], 0), None);
    }

    #[test]
    fn calendar_windows_are_aligned_in_utc() {
        // 2026-11-30T09:00:00Z, a Monday.
        let now = 1_796_029_200;
        assert_eq!(utc_text(now), "2026-11-30T09:00:00Z");
        let (_, end) = window(RenewalPeriod::Day, now);
        assert_eq!(utc_text(end), "2026-12-01T00:00:00Z");
        let (week, end) = window(RenewalPeriod::Week, now);
        assert_eq!(utc_text(end), "2026-12-07T00:00:00Z");
        // Sunday night is still the same ISO week; Monday 00:00 starts the next.
        assert_eq!(window(RenewalPeriod::Week, end - 1).0, week);
        assert_eq!(window(RenewalPeriod::Week, end).0, week + 1);
        let (month, end) = window(RenewalPeriod::Month, now);
        assert_eq!(utc_text(end), "2026-12-01T00:00:00Z");
        let (next, end2) = window(RenewalPeriod::Month, end);
        assert_eq!(next, month + 1);
        assert_eq!(utc_text(end2), "2027-01-01T00:00:00Z");
        // Leap February.
        let feb = 1_709_251_199; // 2024-02-29T23:59:59Z
        assert_eq!(utc_text(feb), "2024-02-29T23:59:59Z");
        assert_eq!(
            utc_text(window(RenewalPeriod::Month, feb).1),
            "2024-03-01T00:00:00Z"
        );
        assert_eq!(utc_text(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            utc_text(window(RenewalPeriod::Week, 0).1),
            "1970-01-05T00:00:00Z"
        );
    }

    fn usd_limit(dollars: f64) -> Limit {
        Limit {
            usd: Some(dollars),
            ..limit(None, None, LimitKey::Route)
        }
    }

    fn charge(cents: u64) -> Charge {
        Charge {
            calls: 1,
            tokens: 1,
            usd: Some(Usd(cents * 10_000_000_000)),
            ..Charge::default()
        }
    }

    #[tokio::test]
    async fn usd_budgets_reserve_settle_and_name_the_budget() {
        let limiter = Arc::new(Limiter::local(Arc::new(Metrics::new()), 1));
        let route = entry(vec![usd_limit(1.0)]);
        // 100 calls reserving a cent each fit in a dollar, the 101st does not.
        let mut held = Vec::new();
        for _ in 0..100 {
            held.push(
                limiter
                    .admit_charge(&route, "", charge(1))
                    .await
                    .unwrap()
                    .unwrap(),
            );
        }
        let refused = limiter
            .admit_charge(&route, "", charge(1))
            .await
            .unwrap_err();
        assert!(
            refused
                .message
                .starts_with("USD budget exceeded for route ns/r: $1.00 per day, resets "),
            "{}",
            refused.message
        );
        assert!(
            refused.message.ends_with("T00:00:00Z"),
            "{}",
            refused.message
        );
        let usd = refused.usd.unwrap();
        assert_eq!((usd.limit, usd.remaining), (1_000_000_000, 0));
        // Settling below the reservation frees the difference; unknown cost keeps the reservation.
        held.pop().unwrap().settle_cost(0, Some(Usd(4_000_000_000)));
        held.pop().unwrap().settle_cost(0, None);
        let r = limiter
            .admit_charge(&route, "", charge(0))
            .await
            .unwrap()
            .unwrap();
        r.settle_cost(0, Some(Usd(6_000_000_000)));
        let refused = limiter
            .admit_charge(
                &route,
                "",
                Charge {
                    usd: Some(Usd(1)),
                    ..charge(0)
                },
            )
            .await;
        assert!(refused.is_err(), "exactly $1.00 spent");
        // A reservation larger than the whole budget is charged the budget, not refused forever.
        let fresh = entry(vec![Limit {
            key: LimitKey::Consumer,
            ..usd_limit(0.5)
        }]);
        assert!(limiter.admit_charge(&fresh, "x", charge(500)).await.is_ok());
    }

    #[tokio::test]
    async fn alert_limits_never_refuse_and_tell_each_crossing_once() {
        let limiter = Arc::new(Limiter::local(Arc::new(Metrics::new()), 1));
        let route = entry(vec![Limit {
            action: Some(crate::api::LimitAction::Alert),
            ..usd_limit(0.05)
        }]);
        for _ in 0..10 {
            let r = limiter
                .admit_charge(&route, "", charge(1))
                .await
                .unwrap()
                .unwrap();
            r.settle_cost(0, Some(Usd(10_000_000_000)));
        }
        let alerts = limiter.take_alerts();
        assert_eq!(
            alerts.iter().map(|a| a.percent).collect::<Vec<_>>(),
            [80, 100],
            "{alerts:?}"
        );
        assert_eq!(alerts[0].kind, "Route");
        assert_eq!(alerts[0].namespace.as_deref(), Some("ns"));
        assert!(
            alerts[1]
                .message
                .starts_with("route ns/r: $0.05 per day reached 100%"),
            "{}",
            alerts[1].message
        );
        assert!(limiter.take_alerts().is_empty());
    }
}
