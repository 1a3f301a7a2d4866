//! A Route's cache settings, compiled once when the routing table is built: parsed durations,
//! the digest that starts every key of the Route, and the Route's metric handles.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::api::{CacheScope, RouteSpec, RouteType, parse_duration};
use crate::telemetry::metrics::{CacheRouteMetrics, Metrics};

/// How long an entry lives when the Route names no `ttl`.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// The longest `ttl` a Route may set (an entry outliving a month is a configuration mistake).
pub const MAX_TTL: Duration = Duration::from_secs(720 * 3600);
/// The largest answer stored when the Route names no `maxEntryBytes`.
pub const DEFAULT_MAX_ENTRY_BYTES: usize = 1 << 20;
/// The most `maxEntryBytes` may say (the CRD's bound; files are checked here).
pub const MAX_ENTRY_BYTES: usize = 64 << 20;
/// Semantic matching's least similarity when the Route names no `threshold`.
pub const DEFAULT_THRESHOLD: f32 = 0.95;
/// Prompts one replica remembers per Route when it names no `maxEntries`.
pub const DEFAULT_MAX_PROMPTS: usize = 1000;
/// The most `maxEntries` may say: each lookup compares the prompt with every remembered one of
/// its scope, and each holds a vector (6 KiB at 1536 dimensions).
pub const MAX_PROMPTS: usize = 10_000;

/// `spec.cache.semantic`, compiled.
#[derive(Clone, Debug, PartialEq)]
pub struct SemanticPolicy {
    /// The embeddings Route's `namespace/name`.
    pub embeddings_route: String,
    pub threshold: f32,
    pub max_entries: usize,
}

pub struct CachePolicy {
    pub ttl: Duration,
    pub scope: CacheScope,
    pub max_entry_bytes: usize,
    /// The Route's identity and its backends' spec: a model (or any backend) change makes new
    /// keys, so entries of the old model are never served again (they expire).
    pub route_digest: [u8; 32],
    /// Semantic matching, when on and its embeddings Route is one (see `check_semantic`).
    pub semantic: Option<SemanticPolicy>,
    /// The Route's `namespace/name`: where its semantic index is kept, and the cache's consumer.
    pub qualified: Arc<str>,
    /// The Route's public name, the metric label.
    route: Arc<str>,
    metrics: OnceLock<CacheRouteMetrics>,
}

impl CachePolicy {
    /// The settings of `spec.cache`, `Ok(None)` when the Route has none; the error names what is
    /// wrong (the Route is then not served, like any invalid spec).
    pub fn compile(
        served_as: &str,
        qualified: &str,
        spec: &RouteSpec,
    ) -> Result<Option<CachePolicy>, String> {
        let Some(cache) = &spec.cache else {
            return Ok(None);
        };
        let ttl = match cache.ttl.as_deref() {
            None => DEFAULT_TTL,
            Some(text) => parse_duration(text)
                .filter(|d| !d.is_zero() && *d <= MAX_TTL)
                .ok_or_else(|| {
                    format!("spec.cache.ttl {text:?} is not a duration between 1ms and 720h")
                })?,
        };
        let max_entry_bytes = match cache.max_entry_bytes {
            None => DEFAULT_MAX_ENTRY_BYTES,
            Some(n) => usize::try_from(n)
                .ok()
                .filter(|n| (1..=MAX_ENTRY_BYTES).contains(n))
                .ok_or_else(|| {
                    format!("spec.cache.maxEntryBytes {n} is not between 1 and {MAX_ENTRY_BYTES}")
                })?,
        };
        let namespace = qualified.split_once('/').map_or("", |(ns, _)| ns);
        let semantic = match &cache.semantic {
            None => None,
            Some(s) => Some(SemanticPolicy {
                embeddings_route: format!("{namespace}/{}", s.embeddings_route),
                threshold: match s.threshold {
                    None => DEFAULT_THRESHOLD,
                    Some(t) if t > 0.0 && t <= 1.0 => t as f32,
                    Some(t) => {
                        return Err(format!(
                            "spec.cache.semantic.threshold {t} is not above 0 and at most 1"
                        ));
                    }
                },
                max_entries: match s.max_entries {
                    None => DEFAULT_MAX_PROMPTS,
                    Some(n) => usize::try_from(n)
                        .ok()
                        .filter(|n| (1..=MAX_PROMPTS).contains(n))
                        .ok_or_else(|| {
                            format!(
                                "spec.cache.semantic.maxEntries {n} is not between 1 and {MAX_PROMPTS}"
                            )
                        })?,
                },
            }),
        };
        let mut h = Sha256::new();
        h.update(qualified.as_bytes());
        h.update([0]);
        h.update(spec.route_type.as_str().as_bytes());
        h.update([0]);
        // The backends as written: provider, model, endpoint, config, weights.
        h.update(serde_json::to_vec(&spec.model).unwrap_or_default());
        h.update(serde_json::to_vec(&spec.backends).unwrap_or_default());
        Ok(Some(CachePolicy {
            ttl,
            scope: cache.scope,
            max_entry_bytes,
            route_digest: h.finalize().into(),
            semantic,
            qualified: qualified.into(),
            route: served_as.into(),
            metrics: OnceLock::new(),
        }))
    }

    /// Turns semantic matching off when its embeddings Route is missing (`None`) or of another
    /// type; the error says why, for the Route's status.
    pub fn check_semantic(&mut self, found: Option<RouteType>) -> Result<(), String> {
        let Some(semantic) = &self.semantic else {
            return Ok(());
        };
        let why = match found {
            Some(RouteType::Embeddings) => return Ok(()),
            Some(other) => format!(
                "spec.cache.semantic.embeddingsRoute {} is a {} Route, not llm/v1/embeddings",
                semantic.embeddings_route,
                other.as_str()
            ),
            None => format!(
                "spec.cache.semantic.embeddingsRoute {} does not exist",
                semantic.embeddings_route
            ),
        };
        self.semantic = None;
        Err(format!(
            "route is serving; {why}: the cache matches identical calls only"
        ))
    }

    /// The Route's cache metric handles, made on first use and then shared by every call.
    pub fn metrics(&self, metrics: &Metrics) -> &CacheRouteMetrics {
        self.metrics
            .get_or_init(|| metrics.cache.route(&self.route))
    }
}

impl std::fmt::Debug for CachePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachePolicy")
            .field("ttl", &self.ttl)
            .field("scope", &self.scope)
            .field("max_entry_bytes", &self.max_entry_bytes)
            .field("semantic", &self.semantic)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CacheSpec, ModelSpec, Provider, RouteType};

    fn spec(cache: Option<CacheSpec>, model: &str) -> RouteSpec {
        let mut spec = RouteSpec::new(
            RouteType::Chat,
            serde_json::from_value::<ModelSpec>(serde_json::json!({
                "provider": "openai", "name": model, "secretRef": {"name": "s"}
            }))
            .unwrap(),
        );
        spec.cache = cache;
        spec
    }

    #[test]
    fn defaults_limits_and_the_model_in_the_digest() {
        assert!(
            CachePolicy::compile("r", "ns/r", &spec(None, "m"))
                .unwrap()
                .is_none()
        );
        let on = Some(CacheSpec::default());
        let p = CachePolicy::compile("r", "ns/r", &spec(on.clone(), "m"))
            .unwrap()
            .unwrap();
        assert_eq!(p.ttl, DEFAULT_TTL);
        assert_eq!(p.scope, CacheScope::Consumer);
        assert_eq!(p.max_entry_bytes, DEFAULT_MAX_ENTRY_BYTES);
        let other = CachePolicy::compile("r", "ns/r", &spec(on.clone(), "m2"))
            .unwrap()
            .unwrap();
        assert_ne!(
            p.route_digest, other.route_digest,
            "a model change invalidates"
        );
        let moved = CachePolicy::compile("r", "ns2/r", &spec(on, "m"))
            .unwrap()
            .unwrap();
        assert_ne!(p.route_digest, moved.route_digest);
        let bad = CacheSpec {
            ttl: Some("721h".into()),
            ..Default::default()
        };
        assert!(CachePolicy::compile("r", "ns/r", &spec(Some(bad), "m")).is_err());
        let _ = Provider::Openai;
    }

    #[test]
    fn semantic_defaults_bounds_and_its_embeddings_route() {
        let semantic = |threshold, max_entries| CacheSpec {
            semantic: Some(crate::api::SemanticSpec {
                embeddings_route: "emb".into(),
                threshold,
                max_entries,
            }),
            ..Default::default()
        };
        let compile = |c| CachePolicy::compile("r", "ns/r", &spec(Some(c), "m"));
        let mut p = compile(semantic(None, None)).unwrap().unwrap();
        assert_eq!(
            p.semantic,
            Some(SemanticPolicy {
                embeddings_route: "ns/emb".into(),
                threshold: DEFAULT_THRESHOLD,
                max_entries: DEFAULT_MAX_PROMPTS,
            })
        );
        for bad in [
            semantic(Some(0.0), None),
            semantic(Some(1.01), None),
            semantic(None, Some(10_001)),
        ] {
            assert!(compile(bad).is_err());
        }
        assert!(compile(semantic(Some(1.0), Some(1))).is_ok());
        assert_eq!(p.check_semantic(Some(RouteType::Embeddings)), Ok(()));
        assert!(p.semantic.is_some());
        let why = p.check_semantic(Some(RouteType::Chat)).unwrap_err();
        assert!(why.contains("ns/emb is a llm/v1/chat Route"), "{why}");
        assert!(p.semantic.is_none(), "exact matching only");
        let mut q = compile(semantic(None, None)).unwrap().unwrap();
        assert!(
            q.check_semantic(None)
                .unwrap_err()
                .contains("does not exist")
        );
    }
}
