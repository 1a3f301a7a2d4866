//! Traffic policy of a Route with several backends: weighted selection within a priority,
//! fallback to the next priority, which failures are retried, and passive health (ejection).
//!
//! Policies are fixed at reconcile time; the health of a backend is a handful of atomics beside
//! the immutable table (no locks on the hot path), carried over to the next table for backends
//! that did not change.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::api::{OutlierDetection, RetryOn, RetryPolicy, parse_duration};

/// At most this many backends per Route (the CRD's limit), so a `u32` bit set names any subset.
pub const MAX_BACKENDS: usize = 16;

const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
const DEFAULT_MAX_EJECTION: Duration = Duration::from_secs(300);

/// What a Route's spec says about retries and ejection, with defaults applied.
#[derive(Clone, Debug, PartialEq)]
pub struct TrafficPolicy {
    /// Total tries of one call, the first included.
    pub attempts: u32,
    retry_on: u8,
    pub per_try_timeout: Option<Duration>,
    pub outlier: OutlierPolicy,
}

#[derive(Clone, Debug, PartialEq)]
pub struct OutlierPolicy {
    /// 0: failures never eject (a 429's Retry-After still does).
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
}

impl Default for OutlierPolicy {
    fn default() -> Self {
        OutlierPolicy {
            consecutive_failures: DEFAULT_CONSECUTIVE_FAILURES,
            base_ejection: DEFAULT_BASE_EJECTION,
            max_ejection: DEFAULT_MAX_EJECTION,
        }
    }
}

fn bit(class: RetryOn) -> u8 {
    1 << (class as u8)
}

impl TrafficPolicy {
    /// The policy of a spec; `priorities` is the number of distinct priorities among the backends.
    /// Durations were checked by the CRD pattern; an unparsable one is an error message.
    pub fn from_spec(
        retry: Option<&RetryPolicy>,
        outlier: Option<&OutlierDetection>,
        priorities: usize,
    ) -> Result<TrafficPolicy, String> {
        let duration = |field: &str, text: Option<&String>, default: Option<Duration>| match text {
            None => Ok(default),
            Some(t) => parse_duration(t)
                .filter(|d| !d.is_zero())
                .map(Some)
                .ok_or_else(|| format!("{field} {t:?} is not a duration such as 30s or 500ms")),
        };
        if let Some(message) = retry.and_then(RetryPolicy::legacy_field) {
            return Err(message.to_string());
        }
        let retry_on = match retry.and_then(|r| r.retry_on.as_ref()) {
            None => RetryOn::ALL.iter().fold(0, |acc, c| acc | bit(*c)),
            Some(list) => list.iter().fold(0, |acc, c| acc | bit(*c)),
        };
        let attempts = retry
            .and_then(|r| r.attempts)
            .unwrap_or(priorities.max(1) as u32)
            .clamp(1, 10);
        let per_try_timeout = duration(
            "retry.perTryTimeout",
            retry.and_then(|r| r.per_try_timeout.as_ref()),
            None,
        )?;
        let base = duration(
            "outlierDetection.baseEjectionTime",
            outlier.and_then(|o| o.base_ejection_time.as_ref()),
            Some(DEFAULT_BASE_EJECTION),
        )?
        .unwrap_or(DEFAULT_BASE_EJECTION);
        let max = duration(
            "outlierDetection.maxEjectionTime",
            outlier.and_then(|o| o.max_ejection_time.as_ref()),
            Some(DEFAULT_MAX_EJECTION),
        )?
        .unwrap_or(DEFAULT_MAX_EJECTION)
        .max(base);
        Ok(TrafficPolicy {
            attempts,
            retry_on,
            per_try_timeout,
            outlier: OutlierPolicy {
                consecutive_failures: outlier
                    .and_then(|o| o.consecutive_failures)
                    .unwrap_or(DEFAULT_CONSECUTIVE_FAILURES),
                base_ejection: base,
                max_ejection: max,
            },
        })
    }

    pub fn retries(&self, class: RetryOn) -> bool {
        self.retry_on & bit(class) != 0
    }
}

impl Default for TrafficPolicy {
    fn default() -> Self {
        TrafficPolicy {
            attempts: 1,
            retry_on: RetryOn::ALL.iter().fold(0, |acc, c| acc | bit(*c)),
            per_try_timeout: None,
            outlier: OutlierPolicy::default(),
        }
    }
}

/// Milliseconds on a process-wide monotonic clock (never 0, so 0 can mean "never").
pub fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = START.get_or_init(Instant::now);
    (start.elapsed().as_millis() as u64).saturating_add(1)
}

/// Passive health of one backend: failures in a row and the current ejection.
#[derive(Debug, Default)]
pub struct BackendHealth {
    failures: AtomicU32,
    /// Ejected while `now_ms() < ejected_until`.
    ejected_until: AtomicU64,
    /// When the current or last ejection began (0: never ejected).
    ejected_at: AtomicU64,
    /// Ejections since the last success; each one lasts twice the one before.
    ejections: AtomicU32,
    /// The provider refused the route's own credential this many times in a row.
    rejections: AtomicU32,
}

impl BackendHealth {
    pub fn is_ejected(&self, now: u64) -> bool {
        now < self.ejected_until.load(Ordering::Relaxed)
    }

    fn ejected_at(&self) -> u64 {
        self.ejected_at.load(Ordering::Relaxed)
    }

    /// A call answered: the failure count and the ejection backoff start again. An ejection in
    /// force is kept (a call that began before it may answer late). True when this is the first
    /// answer since an ejection ended.
    pub fn succeeded(&self, now: u64) -> bool {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.ejections.load(Ordering::Relaxed) != 0 {
            self.ejections.store(0, Ordering::Relaxed);
        }
        if self.rejections.load(Ordering::Relaxed) != 0 {
            self.rejections.store(0, Ordering::Relaxed);
        }
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0
            && now >= until
            && self
                .ejected_until
                .compare_exchange(until, 0, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// The provider refused the route's own credential (a 401 or 403).
    pub fn credential_rejected(&self) {
        self.rejections.fetch_add(1, Ordering::Relaxed);
    }

    pub fn credential_rejections(&self) -> u32 {
        self.rejections.load(Ordering::Relaxed)
    }

    /// A retryable failure; returns how long the backend is now ejected for, if it is.
    /// `retry_after` (a 429's Retry-After, seconds) ejects at once for that long, capped.
    pub fn failed(
        &self,
        policy: &OutlierPolicy,
        retry_after: Option<u64>,
        now: u64,
    ) -> Option<Duration> {
        if let Some(secs) = retry_after.filter(|s| *s > 0) {
            let hold = Duration::from_secs(secs).min(policy.max_ejection);
            self.eject(now, hold);
            return Some(hold);
        }
        if policy.consecutive_failures == 0 {
            return None;
        }
        let failures = self
            .failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if failures < policy.consecutive_failures {
            return None;
        }
        self.failures.store(0, Ordering::Relaxed);
        let n = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let hold = policy
            .base_ejection
            .saturating_mul(1u32 << n)
            .min(policy.max_ejection);
        self.eject(now, hold);
        Some(hold)
    }

    fn eject(&self, now: u64, hold: Duration) {
        let until = now.saturating_add(hold.as_millis() as u64);
        // Never shorten a longer ejection already in force.
        self.ejected_until.fetch_max(until, Ordering::Relaxed);
        self.ejected_at.store(now, Ordering::Relaxed);
    }
}

/// The rate-limit headers providers send with their answers, each the room left on the key.
const REMAINING_HEADERS: [&str; 6] = [
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "anthropic-ratelimit-requests-remaining",
    "anthropic-ratelimit-tokens-remaining",
    "anthropic-ratelimit-input-tokens-remaining",
    "anthropic-ratelimit-output-tokens-remaining",
];

/// Whether a 429's rate-limit headers show room left on every limit they name: then the refusal
/// is this request's own (too large for what is left of a per-minute budget, an upstream
/// gateway's per-user quota) and the backend still serves others, so it is not ejected. A 429
/// without these headers, or with one at 0, is the backend's: it counts toward ejection, and its
/// `Retry-After` ejects at once.
pub fn limits_have_room(headers: &http::HeaderMap) -> bool {
    let mut named = REMAINING_HEADERS
        .iter()
        .filter_map(|h| headers.get(*h))
        .peekable();
    named.peek().is_some()
        && named.all(|v| {
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<f64>().ok())
                .is_some_and(|n| n >= 1.0)
        })
}

/// What selection needs to know of one backend.
pub trait Candidate {
    fn weight(&self) -> u32;
    fn priority(&self) -> u32;
    fn health(&self) -> &BackendHealth;
}

/// The backend for the next try of a call, as an index into `backends` (sorted by priority).
///
/// Weighted random among the healthy, untried backends of the lowest priority that has one; when
/// every untried backend is ejected, the least recently ejected of them; when every backend has
/// been tried, the same rules over all of them (so a retry still happens). Drained backends
/// (weight 0) are never chosen. `None` only when no backend has a weight.
pub fn pick<C: Candidate>(backends: &[C], tried: u32, now: u64) -> Option<usize> {
    pick_untried(backends, tried, now).or_else(|| pick_untried(backends, 0, now))
}

fn pick_untried<C: Candidate>(backends: &[C], tried: u32, now: u64) -> Option<usize> {
    let open = |i: usize, b: &C| b.weight() > 0 && tried & (1 << i) == 0;
    let mut start = 0;
    while start < backends.len() {
        let priority = backends[start].priority();
        let end = backends[start..]
            .iter()
            .position(|b| b.priority() != priority)
            .map_or(backends.len(), |n| start + n);
        let healthy = |i: usize, b: &C| open(i, b) && !b.health().is_ejected(now);
        let total: u64 = (start..end)
            .filter(|&i| healthy(i, &backends[i]))
            .map(|i| u64::from(backends[i].weight()))
            .sum();
        if total > 0 {
            let mut ticket = fastrand::u64(..total);
            for (i, b) in backends.iter().enumerate().take(end).skip(start) {
                if !healthy(i, b) {
                    continue;
                }
                let w = u64::from(b.weight());
                if ticket < w {
                    return Some(i);
                }
                ticket -= w;
            }
        }
        start = end;
    }
    // Every open backend is ejected: try the one whose ejection began longest ago.
    (0..backends.len())
        .filter(|&i| open(i, &backends[i]))
        .min_by_key(|&i| backends[i].health().ejected_at())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct B(u32, u32, BackendHealth);

    impl Candidate for B {
        fn weight(&self) -> u32 {
            self.0
        }
        fn priority(&self) -> u32 {
            self.1
        }
        fn health(&self) -> &BackendHealth {
            &self.2
        }
    }

    fn b(weight: u32, priority: u32) -> B {
        B(weight, priority, BackendHealth::default())
    }

    #[test]
    fn weights_three_to_one_split_within_three_percent() {
        let backends = [b(3, 0), b(1, 0), b(5, 1)];
        let mut counts = [0u32; 3];
        for _ in 0..10_000 {
            counts[pick(&backends, 0, now_ms()).unwrap()] += 1;
        }
        let share = f64::from(counts[0]) / 10_000.0;
        assert!((0.72..=0.78).contains(&share), "{counts:?}");
        assert_eq!(
            counts[2], 0,
            "a fallback priority gets nothing while priority 0 is healthy"
        );
    }

    #[test]
    fn retries_go_to_another_backend_then_the_next_priority() {
        let backends = [b(1, 0), b(1, 0), b(1, 1)];
        for _ in 0..100 {
            let first = pick(&backends, 0, 1).unwrap();
            assert!(first < 2);
            let second = pick(&backends, 1 << first, 1).unwrap();
            assert_eq!(second, 1 - first);
            assert_eq!(pick(&backends, 0b11, 1), Some(2));
        }
        // All tried: the same rules again, so a retry still has somewhere to go.
        assert!(pick(&backends, 0b111, 1).unwrap() < 2);
    }

    #[test]
    fn a_429_is_the_requests_own_only_while_the_providers_limits_have_room() {
        let headers = |pairs: &[(&'static str, &str)]| {
            let mut h = http::HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, v.parse().unwrap());
            }
            h
        };
        assert!(!limits_have_room(&headers(&[])));
        assert!(!limits_have_room(&headers(&[("retry-after", "20")])));
        assert!(limits_have_room(&headers(&[
            ("x-ratelimit-remaining-requests", "499"),
            ("x-ratelimit-remaining-tokens", "12000"),
        ])));
        assert!(!limits_have_room(&headers(&[
            ("x-ratelimit-remaining-requests", "499"),
            ("x-ratelimit-remaining-tokens", "0"),
        ])));
        assert!(limits_have_room(&headers(&[(
            "anthropic-ratelimit-tokens-remaining",
            "8000"
        )])));
        assert!(!limits_have_room(&headers(&[(
            "anthropic-ratelimit-requests-remaining",
            "zero"
        )])));
    }

    #[test]
    fn drained_backends_get_nothing() {
        let backends = [b(0, 0), b(1, 0)];
        for _ in 0..100 {
            assert_eq!(pick(&backends, 0, 1), Some(1));
        }
        assert_eq!(pick(&[b(0, 0)], 0, 1), None);
    }

    #[test]
    fn ejection_after_consecutive_failures_doubles_and_ends() {
        let policy = OutlierPolicy {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(3),
        };
        let h = BackendHealth::default();
        assert_eq!(h.failed(&policy, None, 10), None);
        assert_eq!(h.failed(&policy, None, 10), None);
        assert_eq!(h.failed(&policy, None, 10), Some(Duration::from_secs(1)));
        assert!(h.is_ejected(10) && h.is_ejected(1009) && !h.is_ejected(1010));
        for _ in 0..2 {
            h.failed(&policy, None, 2000);
        }
        assert_eq!(h.failed(&policy, None, 2000), Some(Duration::from_secs(2)));
        for _ in 0..2 {
            h.failed(&policy, None, 5000);
        }
        assert_eq!(
            h.failed(&policy, None, 5000),
            Some(Duration::from_secs(3)),
            "capped"
        );
        h.succeeded(9000);
        for _ in 0..2 {
            h.failed(&policy, None, 9000);
        }
        assert_eq!(h.failed(&policy, None, 9000), Some(Duration::from_secs(1)));
    }

    #[test]
    fn retry_after_ejects_at_once_for_that_long_capped() {
        let policy = OutlierPolicy::default();
        let h = BackendHealth::default();
        assert_eq!(
            h.failed(&policy, Some(2), 100),
            Some(Duration::from_secs(2))
        );
        assert!(h.is_ejected(2099) && !h.is_ejected(2100));
        assert_eq!(
            h.failed(&policy, Some(u64::MAX), 100),
            Some(policy.max_ejection)
        );
    }

    #[test]
    fn when_every_backend_is_ejected_the_least_recently_ejected_is_tried() {
        let backends = [b(1, 0), b(1, 0), b(1, 1)];
        let policy = OutlierPolicy::default();
        backends[1].2.failed(&policy, Some(60), 10);
        backends[0].2.failed(&policy, Some(60), 20);
        backends[2].2.failed(&policy, Some(60), 30);
        assert_eq!(pick(&backends, 0, 40), Some(1));
        assert_eq!(pick(&backends, 0b10, 40), Some(0));
    }

    #[test]
    fn policy_defaults_and_parsing() {
        let p = TrafficPolicy::from_spec(None, None, 2).unwrap();
        assert_eq!(p.attempts, 2);
        assert!(RetryOn::ALL.iter().all(|c| p.retries(*c)));
        assert_eq!(p.outlier, OutlierPolicy::default());
        let retry = RetryPolicy {
            attempts: Some(3),
            retry_on: Some(vec![RetryOn::Timeout]),
            per_try_timeout: Some("1m30s".into()),
            ..Default::default()
        };
        let p = TrafficPolicy::from_spec(Some(&retry), None, 1).unwrap();
        assert_eq!(p.attempts, 3);
        assert!(p.retries(RetryOn::Timeout) && !p.retries(RetryOn::RateLimited));
        assert_eq!(p.per_try_timeout, Some(Duration::from_secs(90)));
        let bad = RetryPolicy {
            per_try_timeout: Some("0s".into()),
            ..Default::default()
        };
        assert!(TrafficPolicy::from_spec(Some(&bad), None, 1).is_err());
        for legacy in [
            RetryPolicy {
                legacy_on: Some(serde_json::json!(["timeout"])),
                ..Default::default()
            },
            RetryPolicy {
                legacy_true: Some(serde_json::json!(["timeout"])),
                ..Default::default()
            },
        ] {
            let err = TrafficPolicy::from_spec(Some(&legacy), None, 1).unwrap_err();
            assert!(err.contains("retry.retryOn"), "{err}");
        }
    }
}
