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
    /// `sa/namespace/name` or `key/namespace/name`: the consumer name in logs, metrics and
    /// per-consumer limits. The kind is part of it, so a ServiceAccount and an API-key Secret of
    /// the same name are two consumers, never one (no `:`: limit counters' keys are split on it).
    pub fn name(&self) -> String {
        match self {
            Identity::ServiceAccount { namespace, name } => format!("sa/{namespace}/{name}"),
            Identity::Consumer { namespace, name } => format!("key/{namespace}/{name}"),
        }
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

    /// ServiceAccount tokens are JWTs: three dot-separated base64url parts. Anything else (an SDK's
    /// placeholder key such as `sk-xxx` or `EMPTY`) is never sent to a TokenReview.
    pub fn looks_like_jwt(&self) -> bool {
        self.0.split('.').count() == 3
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
    /// Refused by the gateway's own review rate or concurrency cap: not a failure of the API
    /// server, so it pauses nothing.
    #[error("too many new tokens to review right now")]
    Throttled,
}

/// Validates a ServiceAccount token; `Ok(None)` means the token is not valid.
pub trait TokenReviewer: Send + Sync {
    fn review<'a>(&'a self, token: &'a str)
    -> BoxFuture<'a, Result<Option<Identity>, ReviewError>>;
}

#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("{0}")]
    Invalid(Rejection),
    #[error("the credential cannot be checked right now")]
    Unavailable,
}

/// Why a presented credential is not valid: said in the 401, so a caller with a misconfigured
/// token learns what to fix (the reasons are about the token, never about a Route).
#[derive(Clone, Copy, Debug, thiserror::Error, PartialEq, Eq)]
pub enum Rejection {
    /// Not a JWT and not a known API key (an SDK placeholder such as `sk-xxx` or `EMPTY`). The
    /// only rejection that counts as no credential under `--default-access allow-all`.
    #[error("the credential is not a known API key")]
    NotAKey,
    #[error(
        "the token is not a well-formed JWT (base64url JSON header and claims, with exp and aud)"
    )]
    Malformed,
    #[error("the token has expired")]
    Expired,
    #[error(
        "the token was not issued for this gateway's audience (--token-audience); request a projected token with that audience"
    )]
    WrongAudience,
    #[error("the token was issued by an issuer this gateway does not trust (--token-issuer)")]
    WrongIssuer,
    #[error("the Kubernetes API server rejected the token")]
    Rejected,
    #[error(
        "this gateway does not accept ServiceAccount tokens (it has no Kubernetes API to review them)"
    )]
    NoReviewer,
}

impl Rejection {
    /// A presented JWT that failed: always a 401, whatever `--default-access` says.
    pub fn is_token(self) -> bool {
        self != Rejection::NotAKey
    }
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

/// What a ServiceAccount token must show before it costs a TokenReview, and how many reviews the
/// gateway asks for: a flood of junk tokens costs the API server at most `rate` reviews a second
/// (after a burst of as many), `concurrency` at a time.
#[derive(Clone, Debug)]
pub struct TokenPolicy {
    /// `aud` must contain it (`--token-audience`).
    pub audience: String,
    /// When not empty, `iss` must be one of them (`--token-issuer`).
    pub issuers: Vec<String>,
    /// New tokens reviewed per second at most; the bucket holds as many.
    pub rate: f64,
    /// Reviews in flight at most.
    pub concurrency: usize,
}

impl Default for TokenPolicy {
    fn default() -> Self {
        TokenPolicy {
            audience: "portcullis".into(),
            issuers: Vec::new(),
            rate: 50.0,
            concurrency: 16,
        }
    }
}

/// Clock skew allowed on `exp` (the API server's own leeway).
const EXPIRY_LEEWAY_SECS: u64 = 60;

/// The local checks of a JWT-shaped bearer: structure, `exp`, `aud`, and `iss` when issuers are
/// configured. The signature is the API server's to check; this only spares it tokens that cannot
/// pass. Returns the token's expiry (seconds since the epoch).
pub fn check_jwt(token: &str, policy: &TokenPolicy, now: u64) -> Result<u64, Rejection> {
    use base64::Engine as _;
    #[derive(serde::Deserialize)]
    struct Header {
        alg: String,
    }
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Audience {
        One(String),
        Many(Vec<String>),
    }
    #[derive(serde::Deserialize)]
    struct Claims {
        exp: Option<u64>,
        aud: Option<Audience>,
        iss: Option<String>,
    }
    let decode = |part: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part.trim_end_matches('='))
            .map_err(|_| Rejection::Malformed)
    };
    let mut parts = token.split('.');
    let (Some(header), Some(claims)) = (parts.next(), parts.next()) else {
        return Err(Rejection::Malformed);
    };
    let header: Header =
        serde_json::from_slice(&decode(header)?).map_err(|_| Rejection::Malformed)?;
    if header.alg.is_empty() || header.alg.eq_ignore_ascii_case("none") {
        return Err(Rejection::Malformed);
    }
    let claims: Claims =
        serde_json::from_slice(&decode(claims)?).map_err(|_| Rejection::Malformed)?;
    let exp = claims.exp.ok_or(Rejection::Malformed)?;
    if exp.saturating_add(EXPIRY_LEEWAY_SECS) < now {
        return Err(Rejection::Expired);
    }
    let audience_ok = match claims.aud.ok_or(Rejection::Malformed)? {
        Audience::One(a) => a == policy.audience,
        Audience::Many(all) => all.contains(&policy.audience),
    };
    if !audience_ok {
        return Err(Rejection::WrongAudience);
    }
    if !policy.issuers.is_empty()
        && !claims
            .iss
            .as_ref()
            .is_some_and(|iss| policy.issuers.iter().any(|i| i == iss))
    {
        return Err(Rejection::WrongIssuer);
    }
    Ok(exp)
}

/// A token bucket: `rate` a second, holding at most `rate` (at least one).
struct Bucket {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    fn new(rate: f64) -> Self {
        let capacity = rate.max(1.0);
        Bucket {
            rate,
            state: Mutex::new((capacity, Instant::now())),
        }
    }

    fn take(&self) -> bool {
        let capacity = self.rate.max(1.0);
        let mut state = self.state.lock();
        let now = Instant::now();
        let (tokens, since) = *state;
        let tokens = (tokens + now.duration_since(since).as_secs_f64() * self.rate).min(capacity);
        if tokens >= 1.0 {
            *state = (tokens - 1.0, now);
            true
        } else {
            *state = (tokens, now);
            false
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

    /// Whether `key` was accepted by a review and is still within its usable time.
    fn accepted_before(&self, key: &Digest) -> bool {
        let now = Instant::now();
        self.entries
            .lock()
            .map
            .get(key)
            .is_some_and(|e| e.identity.is_some() && now < e.usable_until)
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
    /// After a failed review, no new token is reviewed before this instant: during an outage
    /// callers get their answer (a cached identity, or 503) at once instead of each waiting out
    /// the deadline. Cached identities never wait for it.
    reviews_paused_until: Mutex<Option<Instant>>,
    policy: TokenPolicy,
    /// Reviews of tokens never seen before, per second.
    bucket: Bucket,
    /// Reviews in flight.
    reviews: tokio::sync::Semaphore,
    pub default_access: DefaultAccess,
}

/// How long reviews pause after one failed.
const REVIEW_RETRY: Duration = Duration::from_secs(1);

/// Longest bearer credential looked at: projected tokens are about 1 KiB.
const MAX_TOKEN_LEN: usize = 16 * 1024;

type InFlight = tokio::sync::OnceCell<Result<Option<Identity>, AuthError>>;

impl Authenticator {
    pub fn new(
        api_keys: SharedApiKeys,
        reviewer: Option<Arc<dyn TokenReviewer>>,
        ttl: CacheTtl,
        default_access: DefaultAccess,
    ) -> Self {
        Self::with_policy(
            api_keys,
            reviewer,
            ttl,
            default_access,
            TokenPolicy::default(),
        )
    }

    pub fn with_policy(
        api_keys: SharedApiKeys,
        reviewer: Option<Arc<dyn TokenReviewer>>,
        ttl: CacheTtl,
        default_access: DefaultAccess,
        policy: TokenPolicy,
    ) -> Self {
        Authenticator {
            api_keys,
            reviewer,
            cache: ReviewCache::new(ttl),
            in_flight: Mutex::new(HashMap::new()),
            reviews_paused_until: Mutex::new(None),
            bucket: Bucket::new(policy.rate),
            reviews: tokio::sync::Semaphore::new(policy.concurrency.max(1)),
            policy,
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
        if !bearer.looks_like_jwt() {
            return Err(AuthError::Invalid(Rejection::NotAKey));
        }
        if let Some(cached) = self.cache.get(&key) {
            return cached
                .map(Some)
                .ok_or(AuthError::Invalid(Rejection::Rejected));
        }
        // What can be told without the API server is told without it (and never cached: it is
        // cheaper to check again than to remember).
        if bearer.expose().len() > MAX_TOKEN_LEN {
            return Err(AuthError::Invalid(Rejection::Malformed));
        }
        check_jwt(bearer.expose(), &self.policy, unix_now()).map_err(AuthError::Invalid)?;
        if self.reviewer.is_none() {
            return Err(AuthError::Invalid(Rejection::NoReviewer));
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
        outcome?
            .map(Some)
            .ok_or(AuthError::Invalid(Rejection::Rejected))
    }

    async fn review(&self, bearer: &Bearer, key: Digest) -> Result<Option<Identity>, AuthError> {
        let Some(reviewer) = &self.reviewer else {
            return Err(AuthError::Invalid(Rejection::NoReviewer));
        };
        let reviewed = match self.timed_review(reviewer.as_ref(), bearer, &key).await {
            Ok(reviewed) => reviewed,
            Err(e) => {
                // An identity the API server accepted before keeps working through its outage.
                if let Some(identity) = self.cache.stale(&key) {
                    tracing::debug!(error = %e, "TokenReview unavailable; using the cached review");
                    return Ok(Some(identity));
                }
                match e {
                    ReviewError::Throttled => {
                        tracing::debug!("too many new tokens; a review was refused")
                    }
                    ReviewError::Unavailable(_) => {
                        tracing::warn!(error = %e, "cannot validate a ServiceAccount token")
                    }
                }
                return Err(AuthError::Unavailable);
            }
        };
        let lifetime = reviewed
            .as_ref()
            .and_then(|_| token_lifetime(bearer.expose()));
        self.cache.put(key, reviewed.clone(), lifetime);
        Ok(reviewed)
    }
}

impl Authenticator {
    /// One review under the deadline, unless reviews are paused after a failure or the review
    /// rate or concurrency cap is reached. A token accepted before (its cache entry past its
    /// lifetime) is reviewed without taking from the bucket: a flood of new tokens never starves
    /// the callers already known.
    async fn timed_review(
        &self,
        reviewer: &dyn TokenReviewer,
        bearer: &Bearer,
        key: &Digest,
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
        if !self.cache.accepted_before(key) && !self.bucket.take() {
            return Err(ReviewError::Throttled);
        }
        let deadline = self.cache.ttl.review_timeout;
        let Ok(Ok(_permit)) = tokio::time::timeout(deadline, self.reviews.acquire()).await else {
            return Err(ReviewError::Throttled);
        };
        let review = reviewer.review(bearer.expose());
        let outcome = match tokio::time::timeout(deadline, review).await {
            Ok(outcome) => outcome,
            Err(_) => Err(ReviewError::Unavailable("no answer in time".into())),
        };
        *self.reviews_paused_until.lock() = matches!(outcome, Err(ReviewError::Unavailable(_)))
            .then(|| Instant::now() + REVIEW_RETRY);
        outcome
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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

    /// A JWT for the default audience, expiring in 2100 (the same token on every call); `label`
    /// makes it unique, `sig` is what the test reviewers read ("good" is accepted).
    fn jwt(label: &str, sig: &str) -> String {
        jwt_with(
            &format!(r#"{{"sub":"{label}","aud":["portcullis"],"exp":4102444800}}"#),
            sig,
        )
    }

    fn jwt_with(claims: &str, sig: &str) -> String {
        use base64::Engine as _;
        let enc = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!("{}.{}.{sig}", enc(r#"{"alg":"RS256"}"#), enc(claims))
    }

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
        assert_eq!(sa("ns", "sa").name(), "sa/ns/sa");
        assert_eq!(consumer("ns", "sa").name(), "key/ns/sa");
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

    /// Accepts tokens signed "good" after `1` of delay; counts its calls in `0`.
    struct CountingReviewer(AtomicUsize, Duration);

    impl TokenReviewer for CountingReviewer {
        fn review<'a>(
            &'a self,
            token: &'a str,
        ) -> BoxFuture<'a, Result<Option<Identity>, ReviewError>> {
            self.0.fetch_add(1, Ordering::SeqCst);
            let ok = token.ends_with(".good");
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
                auth.authenticate(Some(&bearer(&jwt("a", "good")))).await,
                Ok(Some(sa("ns", "sa")))
            );
            assert_eq!(
                auth.authenticate(Some(&bearer(&jwt("a", "bad")))).await,
                Err(AuthError::Invalid(Rejection::Rejected))
            );
        }
        assert_eq!(reviewer.0.load(Ordering::SeqCst), 2);
        // Garbage never reaches the API server.
        assert_eq!(
            auth.authenticate(Some(&bearer("not a jwt"))).await,
            Err(AuthError::Invalid(Rejection::NotAKey))
        );
        assert_eq!(reviewer.0.load(Ordering::SeqCst), 2);
        assert_eq!(
            auth.authenticate(Some(&bearer("sk-key"))).await,
            Ok(Some(consumer("p", "k")))
        );
        keys.store(Arc::default());
        assert_eq!(
            auth.authenticate(Some(&bearer("sk-key"))).await,
            Err(AuthError::Invalid(Rejection::NotAKey))
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
        let bearer =
            Bearer::from_header(format!("Bearer {}", jwt("b", "good")).as_bytes()).unwrap();
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

    /// Answers from a switch: accepts tokens signed "good" while up, fails while down.
    struct SwitchedReviewer(std::sync::atomic::AtomicBool);

    impl TokenReviewer for SwitchedReviewer {
        fn review<'a>(
            &'a self,
            token: &'a str,
        ) -> BoxFuture<'a, Result<Option<Identity>, ReviewError>> {
            let up = self.0.load(Ordering::SeqCst);
            let ok = token.ends_with(".good");
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
        let bearer =
            Bearer::from_header(format!("Bearer {}", jwt("b", "good")).as_bytes()).unwrap();
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
            auth.authenticate(Some(&bearer(&jwt("a", "good")))).await,
            Ok(Some(sa("ns", "sa")))
        );
        reviewer.0.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(
            auth.authenticate(Some(&bearer(&jwt("a", "good")))).await,
            Ok(Some(sa("ns", "sa"))),
            "a cached identity stopped working during the outage"
        );
        assert_eq!(
            auth.authenticate(Some(&bearer(&jwt("new", "good")))).await,
            Err(AuthError::Unavailable)
        );
    }

    #[tokio::test]
    async fn jwts_are_checked_locally_before_any_review() {
        let reviewer = Arc::new(CountingReviewer(AtomicUsize::new(0), Duration::ZERO));
        let auth = Authenticator::with_policy(
            Arc::default(),
            Some(reviewer.clone()),
            CacheTtl::default(),
            DefaultAccess::AllowAll,
            TokenPolicy {
                issuers: vec!["https://kubernetes.default.svc".into()],
                ..TokenPolicy::default()
            },
        );
        let check = |token: String| {
            let auth = &auth;
            async move {
                let bearer = Bearer::from_header(format!("Bearer {token}").as_bytes()).unwrap();
                auth.authenticate(Some(&bearer)).await
            }
        };
        let now = unix_now();
        let iss = "https://kubernetes.default.svc";
        let claims = |aud: &str, exp: u64, iss: &str| {
            format!(r#"{{"aud":{aud},"exp":{exp},"iss":"{iss}","sub":"x"}}"#)
        };
        let invalid = |why| Err(AuthError::Invalid(why));
        assert_eq!(
            check(jwt_with(
                &claims(r#"["portcullis"]"#, now - 3600, iss),
                "good"
            ))
            .await,
            invalid(Rejection::Expired)
        );
        assert_eq!(
            check(jwt_with(
                &claims(r#"["kubernetes"]"#, now + 3600, iss),
                "good"
            ))
            .await,
            invalid(Rejection::WrongAudience)
        );
        assert_eq!(
            check(jwt_with(
                &claims(r#""portcullis""#, now + 3600, "evil"),
                "good"
            ))
            .await,
            invalid(Rejection::WrongIssuer)
        );
        assert_eq!(
            check(jwt_with(r#"{"aud":"portcullis"}"#, "good")).await,
            invalid(Rejection::Malformed)
        );
        assert_eq!(check("a.b.c".into()).await, invalid(Rejection::Malformed));
        assert_eq!(check("EMPTY".into()).await, invalid(Rejection::NotAKey));
        assert!(!Rejection::NotAKey.is_token() && Rejection::Expired.is_token());
        assert_eq!(reviewer.0.load(Ordering::SeqCst), 0, "nothing was reviewed");
        assert_eq!(
            check(jwt_with(
                &claims(r#"["x","portcullis"]"#, now + 3600, iss),
                "good"
            ))
            .await,
            Ok(Some(sa("ns", "sa")))
        );
        assert_eq!(reviewer.0.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_flood_of_new_tokens_costs_at_most_the_bucket_and_known_callers_keep_working() {
        let reviewer = Arc::new(CountingReviewer(AtomicUsize::new(0), Duration::ZERO));
        let auth = Authenticator::with_policy(
            Arc::default(),
            Some(reviewer.clone()),
            CacheTtl {
                positive: Duration::from_millis(100),
                ..CacheTtl::default()
            },
            DefaultAccess::Authenticated,
            TokenPolicy {
                rate: 5.0,
                concurrency: 2,
                ..TokenPolicy::default()
            },
        );
        let bearer = |s: &str| Bearer::from_header(format!("Bearer {s}").as_bytes()).unwrap();
        let known = bearer(&jwt("known", "good"));
        assert_eq!(
            auth.authenticate(Some(&known)).await,
            Ok(Some(sa("ns", "sa")))
        );
        let started = Instant::now();
        let mut throttled = 0;
        for i in 0..2000 {
            let junk = bearer(&jwt(&format!("junk-{i}"), "bad"));
            if auth.authenticate(Some(&junk)).await == Err(AuthError::Unavailable) {
                throttled += 1;
            }
            if i % 100 == 0 {
                // The known caller is served throughout, its cache entry expiring on the way.
                assert_eq!(
                    auth.authenticate(Some(&known)).await,
                    Ok(Some(sa("ns", "sa")))
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let elapsed = started.elapsed().as_secs_f64();
        let reviews = reviewer.0.load(Ordering::SeqCst) as f64;
        // One for `known` at the start, its re-reviews (outside the bucket), then the bucket.
        assert!(
            reviews <= 1.0 + 5.0 + 5.0 * elapsed + 2000.0 / 100.0,
            "{reviews} reviews in {elapsed:.1} s"
        );
        assert!(throttled > 1500, "only {throttled} throttled");
        // Throttling is no failure: nothing is paused.
        assert!(auth.reviews_paused_until.lock().is_none());
    }
}
