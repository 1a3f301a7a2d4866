//! Who is calling, and whether they may call a route.
//!
//! A caller presents `Authorization: Bearer <credential>`: either an API key (matched against the
//! digests of the labelled Secrets the controller publishes) or a projected ServiceAccount token
//! (validated by a [`TokenReviewer`], the controller's TokenReview client). Results are cached by
//! the credential's digest, so a cached caller costs no API-server call and no credential is kept
//! in memory in the clear beyond the request that carried it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use crate::api::AccessRule;

/// The label that marks a Secret as an API-key consumer.
pub const API_KEY_LABEL: &str = "portcullis.dev/api-key";
/// The Secret data key holding the API key.
pub const API_KEY_FIELD: &str = "apiKey";

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// A Kubernetes ServiceAccount, from a TokenReview.
    ServiceAccount { namespace: String, name: String },
    /// An API-key consumer, named after its Secret.
    Consumer { namespace: String, name: String },
}

impl Identity {
    /// `namespace/name`: the consumer name in logs, metrics and per-consumer limits.
    pub fn name(&self) -> String {
        let (Identity::ServiceAccount { namespace, name } | Identity::Consumer { namespace, name }) =
            self;
        format!("{namespace}/{name}")
    }

    /// Parses a TokenReview username (`system:serviceaccount:NS:NAME`).
    pub fn from_service_account_username(username: &str) -> Option<Identity> {
        let rest = username.strip_prefix("system:serviceaccount:")?;
        let (namespace, name) = rest.split_once(':')?;
        (!namespace.is_empty() && !name.is_empty() && !name.contains(':')).then(|| {
            Identity::ServiceAccount {
                namespace: namespace.into(),
                name: name.into(),
            }
        })
    }
}

/// The policy for Routes without `access`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DefaultAccess {
    /// Anyone may call (MLflow's unauthenticated gateway behaves so).
    #[default]
    AllowAll,
    /// Any valid ServiceAccount token or API key may call.
    Authenticated,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// No or invalid credentials where some are needed: 401.
    Unauthenticated,
    /// A valid caller that this route does not admit (answered like a missing route).
    Forbidden,
}

/// Whether `caller` may call a route with these `access` rules.
pub fn decide(
    access: Option<&[AccessRule]>,
    default: DefaultAccess,
    caller: Option<&Identity>,
) -> Decision {
    let Some(rules) = access else {
        return match (default, caller) {
            (DefaultAccess::AllowAll, _) | (DefaultAccess::Authenticated, Some(_)) => {
                Decision::Allow
            }
            (DefaultAccess::Authenticated, None) => Decision::Unauthenticated,
        };
    };
    let Some(caller) = caller else {
        return Decision::Unauthenticated;
    };
    if rules.iter().any(|rule| grants(rule, caller)) {
        Decision::Allow
    } else {
        Decision::Forbidden
    }
}

fn grants(rule: &AccessRule, caller: &Identity) -> bool {
    let is = |qualified: &Option<String>, namespace: &str, name: &str| {
        qualified
            .as_deref()
            .and_then(|q| q.split_once('/'))
            .is_some_and(|(ns, n)| ns == namespace && n == name)
    };
    match caller {
        Identity::ServiceAccount { namespace, name } => {
            is(&rule.service_account, namespace, name)
                || rule.namespace.as_deref() == Some(namespace.as_str())
        }
        Identity::Consumer { namespace, name } => is(&rule.consumer, namespace, name),
    }
}

/// A bearer credential as presented; never printed.
#[derive(Clone)]
pub struct Bearer(String);

impl Bearer {
    /// From an `Authorization` header value; `None` unless it is a non-empty Bearer credential.
    pub fn from_header(value: &[u8]) -> Option<Bearer> {
        let value = std::str::from_utf8(value).ok()?.trim();
        let (scheme, credential) = value.split_once(' ')?;
        let credential = credential.trim();
        (scheme.eq_ignore_ascii_case("bearer") && !credential.is_empty())
            .then(|| Bearer(credential.to_string()))
    }

    /// From an `x-api-key` header value (Anthropic's clients send their key there, bare).
    pub fn from_api_key(value: &[u8]) -> Option<Bearer> {
        let credential = std::str::from_utf8(value).ok()?.trim();
        (!credential.is_empty()).then(|| Bearer(credential.to_string()))
    }

    pub fn digest(&self) -> Digest {
        digest(self.0.as_bytes())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// ServiceAccount tokens are JWTs; anything else is not worth a TokenReview.
    fn looks_like_jwt(&self) -> bool {
        self.0.len() <= 16 * 1024
            && self.0.split('.').count() == 3
            && self
                .0
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'='))
    }
}

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bearer(<redacted>)")
    }
}

pub type Digest = [u8; 32];

pub fn digest(bytes: &[u8]) -> Digest {
    Sha256::digest(bytes).into()
}

/// The API-key consumers, held only as digests of their keys.
#[derive(Default)]
pub struct ApiKeys {
    /// By the first eight bytes of the digest: a lookup costs the same with ten keys or ten thousand.
    buckets: HashMap<u64, Vec<(Digest, Identity)>>,
    len: usize,
}

pub type SharedApiKeys = Arc<ArcSwap<ApiKeys>>;

fn bucket(digest: &Digest) -> u64 {
    let mut prefix = [0u8; 8];
    prefix.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(prefix)
}

impl ApiKeys {
    pub fn new(keys: impl IntoIterator<Item = (Digest, Identity)>) -> Self {
        let mut out = ApiKeys::default();
        for (digest, identity) in keys {
            out.buckets
                .entry(bucket(&digest))
                .or_default()
                .push((digest, identity));
            out.len += 1;
        }
        out
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Finds the key by a digest prefix, then compares whole digests in constant time. Timing can
    /// reveal at most whether some key's digest shares a prefix with the presented one's, which
    /// tells nothing about any key (finding such a presented key takes a SHA-256 preimage).
    pub fn find(&self, presented: &Digest) -> Option<&Identity> {
        let mut found = None;
        for (digest, identity) in self.buckets.get(&bucket(presented))? {
            if bool::from(digest.ct_eq(presented)) {
                found = Some(identity);
            }
        }
        found
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("the TokenReview API call failed: {0}")]
    Unavailable(String),
}

/// Validates a ServiceAccount token; `Ok(None)` means the token is not valid.
pub trait TokenReviewer: Send + Sync {
    fn review<'a>(&'a self, token: &'a str)
    -> BoxFuture<'a, Result<Option<Identity>, ReviewError>>;
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("the credential is not valid")]
    Invalid,
    #[error("the credential cannot be checked right now")]
    Unavailable,
}

/// Cache lifetimes of token reviews, and the deadline of one review.
#[derive(Clone, Copy, Debug)]
pub struct CacheTtl {
    pub positive: Duration,
    pub negative: Duration,
    pub capacity: usize,
    /// Longest wait for one TokenReview; past it the caller gets 503 with `Retry-After`.
    pub review_timeout: Duration,
    /// While the API server cannot review, a token it accepted earlier keeps working this long past
    /// its cache lifetime (never past the token's own expiry).
    pub stale_grace: Duration,
}

impl Default for CacheTtl {
    fn default() -> Self {
        CacheTtl {
            positive: Duration::from_secs(30),
            negative: Duration::from_secs(5),
            capacity: 10_000,
            review_timeout: Duration::from_secs(5),
            stale_grace: Duration::from_secs(300),
        }
    }
}

#[derive(Clone, Debug)]
struct CacheEntry {
    identity: Option<Identity>,
    /// Trusted without a new review until then.
    fresh_until: Instant,
    /// Usable, when a new review cannot be had, until then.
    usable_until: Instant,
    /// Recency, for eviction (a counter, not a clock).
    used: u64,
}

/// Token review results by token digest: bounded, least recently used entries evicted first, and
/// rejections before acceptances, so a flood of bad tokens never flushes the good ones. A plain
/// map behind a short lock: a hit is one hash lookup, and the lock is never held across an await.
struct ReviewCache {
    ttl: CacheTtl,
    entries: Mutex<CacheMap>,
}

#[derive(Default)]
struct CacheMap {
    map: HashMap<Digest, CacheEntry>,
    clock: u64,
}

impl ReviewCache {
    fn new(ttl: CacheTtl) -> Self {
        ReviewCache {
            ttl,
            entries: Mutex::new(CacheMap::default()),
        }
    }

    /// A fresh review of `key`.
    fn get(&self, key: &Digest) -> Option<Option<Identity>> {
        let mut entries = self.entries.lock();
        entries.clock += 1;
        let clock = entries.clock;
        let entry = entries.map.get_mut(key)?;
        entry.used = clock;
        (Instant::now() < entry.fresh_until).then(|| entry.identity.clone())
    }

    /// An accepted identity past its cache lifetime but still usable while reviews fail; it is
    /// then trusted for another negative-TTL period, so an outage costs one review timeout per
    /// period rather than one per request.
    fn stale(&self, key: &Digest) -> Option<Identity> {
        let now = Instant::now();
        let mut entries = self.entries.lock();
        let entry = entries.map.get_mut(key)?;
        let identity = entry.identity.clone()?;
        if now >= entry.usable_until {
            return None;
        }
        entry.fresh_until = (now + self.ttl.negative).min(entry.usable_until);
        Some(identity)
    }

    /// Caches a review; `lifetime` caps the entry at the token's own expiry.
    fn put(&self, key: Digest, identity: Option<Identity>, lifetime: Option<Duration>) {
        let now = Instant::now();
        let ttl = if identity.is_some() {
            self.ttl.positive
        } else {
            self.ttl.negative
        };
        let fresh = lifetime.map_or(ttl, |l| ttl.min(l));
        let usable = if identity.is_some() {
            let grace = ttl.saturating_add(self.ttl.stale_grace);
            lifetime.map_or(grace, |l| grace.min(l))
        } else {
            fresh
        };
        let mut entries = self.entries.lock();
        if entries.map.len() >= self.ttl.capacity && !entries.map.contains_key(&key) {
            evict(&mut entries.map, self.ttl.capacity, now);
        }
        entries.clock += 1;
        let used = entries.clock;
        entries.map.insert(
            key,
            CacheEntry {
                identity,
                fresh_until: now + fresh,
                usable_until: now + usable,
                used,
            },
        );
    }
}

/// Makes room for a quarter of `capacity`: expired entries first, then rejections, then the least
/// recently used acceptances. Batched, so a flood of new tokens costs O(1) amortised per insert.
fn evict(map: &mut HashMap<Digest, CacheEntry>, capacity: usize, now: Instant) {
    map.retain(|_, e| e.usable_until > now);
    let target = capacity - capacity.div_ceil(4).max(1).min(capacity);
    if map.len() <= target {
        return;
    }
    let mut order: Vec<(bool, u64, Digest)> = map
        .iter()
        .map(|(k, e)| (e.identity.is_some(), e.used, *k))
        .collect();
    let excess = map.len() - target;
    order.select_nth_unstable(excess - 1);
    for (_, _, key) in &order[..excess] {
        map.remove(key);
    }
}

/// Turns a presented credential into an identity.
pub struct Authenticator {
    api_keys: SharedApiKeys,
    reviewer: Option<Arc<dyn TokenReviewer>>,
    cache: ReviewCache,
    in_flight: Mutex<HashMap<Digest, Arc<InFlight>>>,
    /// After a failed review, none is tried before this instant: during an outage callers get
    /// their answer (a cached identity, or 503) at once instead of each waiting out the deadline.
    reviews_paused_until: Mutex<Option<Instant>>,
    pub default_access: DefaultAccess,
}

/// How long reviews pause after one failed.
const REVIEW_RETRY: Duration = Duration::from_secs(1);

type InFlight = tokio::sync::OnceCell<Result<Option<Identity>, AuthError>>;

impl Authenticator {
    pub fn new(
        api_keys: SharedApiKeys,
        reviewer: Option<Arc<dyn TokenReviewer>>,
        ttl: CacheTtl,
        default_access: DefaultAccess,
    ) -> Self {
        Authenticator {
            api_keys,
            reviewer,
            cache: ReviewCache::new(ttl),
            in_flight: Mutex::new(HashMap::new()),
            reviews_paused_until: Mutex::new(None),
            default_access,
        }
    }

    /// Anyone may call when nothing is configured; for tests and local use.
    pub fn allow_all() -> Self {
        Self::new(
            Arc::default(),
            None,
            CacheTtl::default(),
            DefaultAccess::AllowAll,
        )
    }

    /// The caller behind `bearer`; `Ok(None)` for anonymous calls.
    pub async fn authenticate(
        &self,
        bearer: Option<&Bearer>,
    ) -> Result<Option<Identity>, AuthError> {
        let Some(bearer) = bearer else {
            return Ok(None);
        };
        let key = bearer.digest();
        // API keys are never cached: deleting the Secret must revoke the key at once.
        if let Some(identity) = self.api_keys.load().find(&key) {
            return Ok(Some(identity.clone()));
        }
        if let Some(cached) = self.cache.get(&key) {
            return cached.map(Some).ok_or(AuthError::Invalid);
        }
        // Concurrent first requests with one new token share a single TokenReview.
        let review = {
            let mut in_flight = self.in_flight.lock();
            if in_flight.len() >= self.cache.ttl.capacity {
                // Reviews whose callers all went away leave their entry behind: drop those.
                in_flight.retain(|_, r| Arc::strong_count(r) > 1);
            }
            Arc::clone(in_flight.entry(key).or_default())
        };
        let outcome = review
            .get_or_init(|| self.review(bearer, key))
            .await
            .clone();
        let mut in_flight = self.in_flight.lock();
        if in_flight.get(&key).is_some_and(|r| Arc::ptr_eq(r, &review)) {
            in_flight.remove(&key);
        }
        outcome?.map(Some).ok_or(AuthError::Invalid)
    }

    async fn review(&self, bearer: &Bearer, key: Digest) -> Result<Option<Identity>, AuthError> {
        let reviewed = match &self.reviewer {
            Some(reviewer) if bearer.looks_like_jwt() => {
                let outcome = self.timed_review(reviewer.as_ref(), bearer).await;
                match outcome {
                    Ok(reviewed) => reviewed,
                    Err(e) => {
                        // An identity the API server accepted before keeps working through its outage.
                        if let Some(identity) = self.cache.stale(&key) {
                            tracing::debug!(error = %e, "TokenReview unavailable; using the cached review");
                            return Ok(Some(identity));
                        }
                        tracing::warn!(error = %e, "cannot validate a ServiceAccount token");
                        return Err(AuthError::Unavailable);
                    }
                }
            }
            _ => None,
        };
        let lifetime = reviewed
            .as_ref()
            .and_then(|_| token_lifetime(bearer.expose()));
        self.cache.put(key, reviewed.clone(), lifetime);
        Ok(reviewed)
    }
}

impl Authenticator {
    /// One review under the deadline, unless reviews are paused after a failure.
    async fn timed_review(
        &self,
        reviewer: &dyn TokenReviewer,
        bearer: &Bearer,
    ) -> Result<Option<Identity>, ReviewError> {
        if self
            .reviews_paused_until
            .lock()
            .is_some_and(|until| Instant::now() < until)
        {
            return Err(ReviewError::Unavailable(
                "paused after a failed review".into(),
            ));
        }
        let review = reviewer.review(bearer.expose());
        let outcome = match tokio::time::timeout(self.cache.ttl.review_timeout, review).await {
            Ok(outcome) => outcome,
            Err(_) => Err(ReviewError::Unavailable("no answer in time".into())),
        };
        *self.reviews_paused_until.lock() = outcome.is_err().then(|| Instant::now() + REVIEW_RETRY);
        outcome
    }
}

/// Time left until a JWT's `exp`. The claims are read without checking the signature: only for a
/// token the API server has just accepted, to keep its cache entry from outliving it.
fn token_lifetime(token: &str) -> Option<Duration> {
    use base64::Engine as _;
    #[derive(serde::Deserialize)]
    struct Claims {
        exp: Option<u64>,
    }
    let payload = token.split('.').nth(1)?.trim_end_matches('=');
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let exp = serde_json::from_slice::<Claims>(&bytes).ok()?.exp?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(Duration::from_secs(exp.saturating_sub(now)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn sa(ns: &str, name: &str) -> Identity {
        Identity::ServiceAccount {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn consumer(ns: &str, name: &str) -> Identity {
        Identity::Consumer {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn rule(sa: Option<&str>, ns: Option<&str>, consumer: Option<&str>) -> AccessRule {
        AccessRule {
            service_account: sa.map(Into::into),
            namespace: ns.map(Into::into),
            consumer: consumer.map(Into::into),
        }
    }

    #[test]
    fn default_policy_applies_without_access() {
        use DefaultAccess::*;
        assert_eq!(decide(None, AllowAll, None), Decision::Allow);
        assert_eq!(decide(None, Authenticated, None), Decision::Unauthenticated);
        assert_eq!(
            decide(None, Authenticated, Some(&sa("a", "b"))),
            Decision::Allow
        );
    }

    #[test]
    fn access_rules_match_service_accounts_namespaces_and_consumers() {
        let rules = [
            rule(Some("team-a/notebook"), None, None),
            rule(None, Some("team-b"), None),
            rule(None, None, Some("partner-x/key-1")),
        ];
        let d = |c: &Identity| decide(Some(&rules), DefaultAccess::AllowAll, Some(c));
        assert_eq!(d(&sa("team-a", "notebook")), Decision::Allow);
        assert_eq!(d(&sa("team-a", "other")), Decision::Forbidden);
        assert_eq!(d(&sa("team-b", "anything")), Decision::Allow);
        assert_eq!(d(&consumer("partner-x", "key-1")), Decision::Allow);
        // A consumer is not a ServiceAccount of its Secret's namespace.
        assert_eq!(d(&consumer("team-b", "key")), Decision::Forbidden);
        assert_eq!(d(&sa("partner-x", "key-1")), Decision::Forbidden);
        assert_eq!(
            decide(Some(&rules), DefaultAccess::AllowAll, None),
            Decision::Unauthenticated
        );
        assert_eq!(
            decide(Some(&[]), DefaultAccess::AllowAll, Some(&sa("a", "b"))),
            Decision::Forbidden
        );
    }

    #[test]
    fn service_account_usernames_parse() {
        assert_eq!(
            Identity::from_service_account_username("system:serviceaccount:ns:sa"),
            Some(sa("ns", "sa"))
        );
        assert_eq!(Identity::from_service_account_username("admin"), None);
        assert_eq!(
            Identity::from_service_account_username("system:serviceaccount:ns:"),
            None
        );
        assert_eq!(sa("ns", "sa").name(), "ns/sa");
    }

    #[test]
    fn bearer_parsing_and_redaction() {
        assert!(Bearer::from_header(b"Bearer abc").is_some());
        assert!(Bearer::from_header(b"bearer   abc ").is_some());
        assert!(Bearer::from_header(b"Basic abc").is_none());
        assert!(Bearer::from_header(b"Bearer ").is_none());
        assert!(Bearer::from_api_key(b" sk-ant ").is_some_and(|b| b.expose() == "sk-ant"));
        assert!(Bearer::from_api_key(b"  ").is_none());
        let b = Bearer::from_header(b"Bearer sk-secret").unwrap();
        assert!(!format!("{b:?}").contains("sk-secret"));
    }

    /// Accepts tokens starting with "good." after `1` of delay; counts its calls in `0`.
    struct CountingReviewer(AtomicUsize, Duration);

    impl TokenReviewer for CountingReviewer {
        fn review<'a>(
            &'a self,
            token: &'a str,
        ) -> BoxFuture<'a, Result<Option<Identity>, ReviewError>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            let ok = token.starts_with("good.");
            Box::pin(async move {
                tokio::time::sleep(self.1).await;
                Ok(ok.then(|| sa("ns", "sa")))
            })
        }
    }

    #[tokio::test]
    async fn reviews_are_cached_and_api_keys_win() {
        let reviewer = Arc::new(CountingReviewer(AtomicUsize::new(0), Duration::ZERO));
        let keys: SharedApiKeys = Arc::new(ArcSwap::from_pointee(ApiKeys::new([(
            digest(b"sk-key"),
            consumer("p", "k"),
        )])));
        let auth = Authenticator::new(
            keys.clone(),
            Some(reviewer.clone()),
            CacheTtl::default(),
            DefaultAccess::Authenticated,
        );
        let bearer = |s: &str| Bearer::from_header(format!("Bearer {s}").as_bytes()).unwrap();
        for _ in 0..3 {
            assert_eq!(
                auth.authenticate(Some(&bearer("good.a.b"))).await,
                Ok(Some(sa("ns", "sa")))
            );
            assert_eq!(
                auth.authenticate(Some(&bearer("bad.a.b"))).await,
                Err(AuthError::Invalid)
            );
        }
        assert_eq!(reviewer.0.load(Ordering::SeqCst), 2);
        // Garbage never reaches the API server.
        assert_eq!(
            auth.authenticate(Some(&bearer("not a jwt"))).await,
            Err(AuthError::Invalid)
        );
        assert_eq!(reviewer.0.load(Ordering::SeqCst), 2);
        assert_eq!(
            auth.authenticate(Some(&bearer("sk-key"))).await,
            Ok(Some(consumer("p", "k")))
        );
        keys.store(Arc::default());
        assert_eq!(
            auth.authenticate(Some(&bearer("sk-key"))).await,
            Err(AuthError::Invalid)
        );
        assert_eq!(auth.authenticate(None).await, Ok(None));
    }

    #[test]
    fn cache_entries_never_outlive_their_token() {
        use base64::Engine as _;
        let jwt = |claims: &str| {
            let enc = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
            format!("{}.{}.sig", enc(r#"{"alg":"RS256"}"#), enc(claims))
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let left = token_lifetime(&jwt(&format!(r#"{{"exp":{}}}"#, now + 10))).unwrap();
        assert!(left <= Duration::from_secs(10) && left >= Duration::from_secs(8));
        assert_eq!(token_lifetime(&jwt(r#"{"exp":1}"#)), Some(Duration::ZERO));
        assert_eq!(token_lifetime(&jwt(r#"{"sub":"x"}"#)), None);
        assert_eq!(token_lifetime("garbage"), None);
        let cache = ReviewCache::new(CacheTtl::default());
        cache.put(
            [1; 32],
            Some(Identity::ServiceAccount {
                namespace: "a".into(),
                name: "b".into(),
            }),
            Some(Duration::ZERO),
        );
        assert_eq!(cache.get(&[1; 32]), None);
    }

    #[test]
    fn api_keys_match_whole_digests_only() {
        let keys = ApiKeys::new((0..1000u32).map(|i| {
            (
                digest(format!("pk-{i}").as_bytes()),
                consumer("p", &format!("k{i}")),
            )
        }));
        assert_eq!(keys.len(), 1000);
        assert_eq!(keys.find(&digest(b"pk-7")), Some(&consumer("p", "k7")));
        assert_eq!(keys.find(&digest(b"pk-1000")), None);
        // Same bucket, different digest.
        let mut near = digest(b"pk-7");
        near[31] ^= 1;
        assert_eq!(keys.find(&near), None);
    }

    #[tokio::test]
    async fn concurrent_first_uses_of_a_token_share_one_review() {
        let reviewer = Arc::new(CountingReviewer(
            AtomicUsize::new(0),
            Duration::from_millis(50),
        ));
        let auth = Authenticator::new(
            Arc::default(),
            Some(reviewer.clone()),
            CacheTtl::default(),
            DefaultAccess::Authenticated,
        );
        let bearer = Bearer::from_header(b"Bearer good.b.c").unwrap();
        let all =
            futures::future::join_all((0..20).map(|_| auth.authenticate(Some(&bearer)))).await;
        assert!(all.iter().all(|r| *r == Ok(Some(sa("ns", "sa")))));
        assert_eq!(reviewer.0.load(Ordering::SeqCst), 1);
        assert!(auth.in_flight.lock().is_empty());
    }

    #[test]
    fn review_cache_is_bounded() {
        let cache = ReviewCache::new(CacheTtl {
            capacity: 4,
            ..Default::default()
        });
        for i in 0..100u8 {
            cache.put([i; 32], None, None);
        }
        assert!(cache.entries.lock().map.len() <= 4);
    }

    #[test]
    fn a_flood_of_new_tokens_never_flushes_identities_in_use() {
        let cache = ReviewCache::new(CacheTtl {
            capacity: 64,
            ..Default::default()
        });
        let good = |i: u8| Some(sa("ns", &format!("sa{i}")));
        for i in 0..8u8 {
            cache.put([i; 32], good(i), None);
        }
        // Bad tokens evict each other, never an accepted one.
        for i in 0..10_000u32 {
            let mut key = [0xff; 32];
            key[..4].copy_from_slice(&i.to_be_bytes());
            cache.put(key, None, None);
            assert!(cache.entries.lock().map.len() <= 64);
        }
        for i in 0..8u8 {
            assert_eq!(
                cache.get(&[i; 32]),
                Some(good(i)),
                "identity {i} was flushed"
            );
        }
        // Among accepted identities, the least recently used go first.
        for i in 8..200u8 {
            cache.put([i; 32], good(i), None);
            // sa0 is in constant use.
            assert_eq!(cache.get(&[0; 32]), Some(good(0)));
        }
        assert_eq!(cache.get(&[0; 32]), Some(good(0)));
        assert_eq!(cache.get(&[1; 32]), None, "least recently used");
    }

    /// Never answers; counts its calls.
    struct HangingReviewer(AtomicUsize);

    impl TokenReviewer for HangingReviewer {
        fn review<'a>(
            &'a self,
            _token: &'a str,
        ) -> BoxFuture<'a, Result<Option<Identity>, ReviewError>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Box::pin(futures::future::pending())
        }
    }

    /// Answers from a switch: accepts "good." tokens while up, fails while down.
    struct SwitchedReviewer(std::sync::atomic::AtomicBool);

    impl TokenReviewer for SwitchedReviewer {
        fn review<'a>(
            &'a self,
            token: &'a str,
        ) -> BoxFuture<'a, Result<Option<Identity>, ReviewError>> {
            let up = self.0.load(Ordering::SeqCst);
            let ok = token.starts_with("good.");
            Box::pin(async move {
                if up {
                    Ok(ok.then(|| sa("ns", "sa")))
                } else {
                    Err(ReviewError::Unavailable("down".into()))
                }
            })
        }
    }

    #[tokio::test]
    async fn a_hanging_review_ends_at_its_deadline_as_unavailable() {
        let reviewer = Arc::new(HangingReviewer(AtomicUsize::new(0)));
        let auth = Authenticator::new(
            Arc::default(),
            Some(reviewer.clone()),
            CacheTtl {
                review_timeout: Duration::from_millis(200),
                ..Default::default()
            },
            DefaultAccess::Authenticated,
        );
        let bearer = Bearer::from_header(b"Bearer good.b.c").unwrap();
        let started = Instant::now();
        let outcome =
            tokio::time::timeout(Duration::from_secs(5), auth.authenticate(Some(&bearer))).await;
        assert_eq!(outcome, Ok(Err(AuthError::Unavailable)));
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(auth.in_flight.lock().is_empty());
    }

    #[tokio::test]
    async fn accepted_identities_outlive_an_api_server_outage_new_tokens_do_not() {
        let reviewer = Arc::new(SwitchedReviewer(std::sync::atomic::AtomicBool::new(true)));
        let auth = Authenticator::new(
            Arc::default(),
            Some(reviewer.clone()),
            CacheTtl {
                positive: Duration::from_millis(50),
                negative: Duration::from_millis(50),
                ..Default::default()
            },
            DefaultAccess::Authenticated,
        );
        let bearer = |s: &str| Bearer::from_header(format!("Bearer {s}").as_bytes()).unwrap();
        assert_eq!(
            auth.authenticate(Some(&bearer("good.a.b"))).await,
            Ok(Some(sa("ns", "sa")))
        );
        reviewer.0.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(
            auth.authenticate(Some(&bearer("good.a.b"))).await,
            Ok(Some(sa("ns", "sa"))),
            "a cached identity stopped working during the outage"
        );
        assert_eq!(
            auth.authenticate(Some(&bearer("good.new.token"))).await,
            Err(AuthError::Unavailable)
        );
    }
}
