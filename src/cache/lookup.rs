//! One call's use of the cache: whose entries it may see (its scope), whether it looks up (the
//! caller's directive), what it found, and the ticket that stores the live answer of a miss.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Mutex, RwLock};

use super::control::Directive;
use super::entry::Entry;
use super::key::{CacheKey, cache_key, chat_shape};
use super::policy::CachePolicy;
use super::semantic::{Index, normalized, prompt_text};
use super::store::CacheStore;
use crate::access::Identity;
use crate::api::CacheScope;
use crate::llm::{LlmRequest, LlmResponse};
use crate::telemetry::metrics::Metrics;

/// The cache of this replica: its store and where it counts.
pub struct Cache {
    store: CacheStore,
    metrics: Arc<Metrics>,
    /// The semantic index of each Route that matches semantically, by `namespace/name` (kept
    /// across routing table rebuilds; emptied when the Route's backends change).
    indexes: Mutex<HashMap<Arc<str>, Arc<RwLock<Index>>>>,
}

/// What the cache did for a call: the `x-portcullis-cache` header and the log field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheStatus {
    Hit,
    Miss,
    /// The lookup was skipped: the caller said `no-cache` or `no-store`, or the call is not
    /// cacheable.
    Bypass,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Bypass => "bypass",
        }
    }
}

pub enum Lookup {
    Hit(Hit),
    /// Answer live; with a ticket, store the answer.
    Live {
        status: CacheStatus,
        ticket: Option<Ticket>,
    },
}

pub struct Hit {
    pub entry: Entry,
    pub age: Duration,
    /// Answered for a prompt close in meaning, not for this one (`x-portcullis-cache-match`).
    pub semantic: bool,
}

/// A miss that semantic matching may still answer: the prompt to embed, and where to look.
pub struct Probe {
    pub text: String,
    shape: [u8; 32],
    index: Arc<RwLock<Index>>,
}

/// The right to store one call's answer under its key.
pub struct Ticket {
    cache: Arc<Cache>,
    key: CacheKey,
    ttl: Duration,
    pub max_bytes: usize,
    /// The prompt's embedding, added to the semantic index once the answer is stored.
    remember: Option<Remember>,
}

/// Where a stored prompt joins its Route's index: the index, the prompt's shape, its embedding.
type Remember = (Arc<RwLock<Index>>, [u8; 32], Box<[f32]>);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

impl Cache {
    pub fn new(store: CacheStore, metrics: Arc<Metrics>) -> Cache {
        Cache {
            store,
            metrics,
            indexes: Mutex::new(HashMap::new()),
        }
    }

    /// `local` or `redis`, for the start-up log line.
    pub fn store_name(&self) -> &'static str {
        self.store.name()
    }

    /// Looks `request` up for a caller of `scope`; a store that fails or does not answer in time
    /// is a miss (the call goes to the provider), never an error.
    pub async fn lookup(
        self: &Arc<Self>,
        policy: &CachePolicy,
        scope: &str,
        request: &LlmRequest,
        directive: Directive,
    ) -> Lookup {
        let m = policy.metrics(&self.metrics);
        let bypass = |ticket| {
            m.bypasses.inc();
            Lookup::Live {
                status: CacheStatus::Bypass,
                ticket,
            }
        };
        if directive.no_store {
            return bypass(None);
        }
        let Some(key) = cache_key(&policy.route_digest, scope, request) else {
            return bypass(None);
        };
        let ticket = Ticket {
            cache: Arc::clone(self),
            key,
            ttl: directive.ttl(policy.ttl),
            max_bytes: policy.max_entry_bytes,
            remember: None,
        };
        if directive.no_cache {
            return bypass(Some(ticket));
        }
        match self.entry(policy, &ticket.key).await {
            Some(hit) => {
                m.hits.inc();
                Lookup::Hit(hit)
            }
            None => {
                // Counted once semantic matching has had its say (see `semantic_lookup`).
                if policy.semantic.is_none() {
                    m.misses.inc();
                }
                Lookup::Live {
                    status: CacheStatus::Miss,
                    ticket: Some(ticket),
                }
            }
        }
    }

    /// The entry under `key`; a store that fails, and an entry this version cannot read, are
    /// none (the live answer replaces it).
    async fn entry(&self, policy: &CachePolicy, key: &CacheKey) -> Option<Hit> {
        let started = Instant::now();
        let found = self.store.get(&key.0).await;
        self.metrics
            .cache
            .lookup_duration
            .observe(started.elapsed().as_secs_f64());
        let found = match found {
            Ok(found) => found?,
            Err(e) => {
                self.metrics.cache.store_errors.inc();
                tracing::debug!(error = %e, "the cache store did not answer; a miss");
                return None;
            }
        };
        let entry = Entry::decode(&found, policy.max_entry_bytes).ok()?;
        let age = Duration::from_millis(now_ms().saturating_sub(entry.stored_ms));
        Some(Hit {
            entry,
            age,
            semantic: false,
        })
    }

    /// What semantic matching needs to look an exact miss up: `None` when the Route does not
    /// match semantically or the call is never matched so (see `semantic::prompt_text`).
    pub fn probe(&self, policy: &CachePolicy, scope: &str, request: &LlmRequest) -> Option<Probe> {
        let semantic = policy.semantic.as_ref()?;
        let LlmRequest::Chat(chat) = request else {
            return None;
        };
        let text = prompt_text(request)?;
        let index = {
            let mut indexes = self.indexes.lock();
            let index = indexes
                .entry(Arc::clone(&policy.qualified))
                .or_insert_with(|| {
                    Arc::new(RwLock::new(Index::new(
                        policy.route_digest,
                        semantic.max_entries,
                    )))
                });
            Arc::clone(index)
        };
        // A new generation of the Route (its backends changed) starts empty; a new bound applies.
        let current = {
            let i = index.read();
            i.digest == policy.route_digest && i.max() == semantic.max_entries
        };
        if !current {
            let mut i = index.write();
            if i.digest != policy.route_digest {
                *i = Index::new(policy.route_digest, semantic.max_entries);
            } else {
                i.set_max(semantic.max_entries);
            }
        }
        Some(Probe {
            text,
            shape: chat_shape(&policy.route_digest, scope, chat),
            index,
        })
    }

    /// After an exact miss on a Route that matches semantically: the stored answer of the
    /// nearest prompt of the same shape when its similarity to `embedding` (the probe's text,
    /// embedded; `None` when that failed or the call is not matched so) reaches the threshold.
    /// The ticket keeps the embedding, so a live answer's prompt joins the index once stored.
    pub async fn semantic_lookup(
        &self,
        policy: &CachePolicy,
        probe: Option<Probe>,
        embedding: Option<&[f64]>,
        ticket: &mut Ticket,
    ) -> Option<Hit> {
        let m = policy.metrics(&self.metrics);
        let found = async {
            let semantic = policy.semantic.as_ref()?;
            let probe = probe?;
            let vector = normalized(embedding?)?;
            let nearest = probe
                .index
                .read()
                .nearest(&probe.shape, &vector, semantic.threshold);
            ticket.remember = Some((Arc::clone(&probe.index), probe.shape, vector));
            let key = nearest?;
            match self.entry(policy, &key).await {
                Some(hit) => Some(Hit {
                    semantic: true,
                    ..hit
                }),
                None => {
                    // Expired or evicted from the store: forgotten here too.
                    probe.index.write().remove(&key);
                    None
                }
            }
        }
        .await;
        if found.is_some() {
            m.hits.inc();
            self.metrics.cache.semantic_hits.inc();
        } else {
            m.misses.inc();
        }
        found
    }
}

impl Ticket {
    /// Stores a complete, successful answer in the background (the caller does not wait on the
    /// store); one larger than the Route's `maxEntryBytes` is not stored.
    pub fn store(self, answer: &LlmResponse) {
        let Some(entry) = Entry::of(answer, now_ms()) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        // Encoded (and compressed) in the task too: the caller waits for none of it.
        runtime.spawn(async move {
            let (bytes, size) = entry.encode();
            if size > self.max_bytes {
                return;
            }
            let m = &self.cache.metrics.cache;
            let len = bytes.len() as u64;
            match self.cache.store.put(&self.key.0, bytes, self.ttl).await {
                Ok(written) => {
                    if let Some((index, shape, vector)) = self.remember {
                        let evicted = index.write().insert(shape, vector, self.key);
                        m.semantic_evictions.inc_by(evicted);
                    }
                    m.stored_bytes.inc_by(len);
                    m.evictions.inc_by(written.evicted);
                    if let Some(held) = self.cache.store.held_bytes() {
                        m.local_bytes.set(held as i64);
                    }
                }
                Err(e) => {
                    m.store_errors.inc();
                    tracing::debug!(error = %e, "the cache store did not take an entry");
                }
            }
        });
    }
}

/// Whose entries a caller shares under `scope`: everyone's (`route`), its Teams' (`team`; a
/// caller in no Team is its own scope), or its own (`consumer`; anonymous callers share one).
/// Kinds are spelled out so that a Team and a consumer of the same name never meet.
pub fn scope_of(scope: CacheScope, caller: Option<&Identity>, teams: &[&str]) -> String {
    let consumer = || {
        format!(
            "consumer:{}",
            caller.map(Identity::name).unwrap_or_default()
        )
    };
    match scope {
        CacheScope::Route => "route".to_string(),
        CacheScope::Consumer => consumer(),
        CacheScope::Team if teams.is_empty() => consumer(),
        CacheScope::Team => {
            let mut names = teams.to_vec();
            names.sort_unstable();
            format!("team:{}", names.join(","))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_never_meet_across_their_boundary() {
        let a = Identity::ServiceAccount {
            namespace: "ns".into(),
            name: "a".into(),
        };
        let b = Identity::Consumer {
            namespace: "ns".into(),
            name: "a".into(),
        };
        let c = CacheScope::Consumer;
        assert_ne!(scope_of(c, Some(&a), &[]), scope_of(c, Some(&b), &[]));
        assert_ne!(scope_of(c, Some(&a), &[]), scope_of(c, None, &[]));
        let t = CacheScope::Team;
        assert_eq!(
            scope_of(t, Some(&a), &["x", "y"]),
            scope_of(t, Some(&b), &["y", "x"])
        );
        assert_ne!(scope_of(t, Some(&a), &["x"]), scope_of(t, Some(&b), &[]));
        assert_eq!(
            scope_of(CacheScope::Route, Some(&a), &["x"]),
            scope_of(CacheScope::Route, None, &[])
        );
    }
}
