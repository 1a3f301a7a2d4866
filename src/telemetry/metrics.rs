//! Prometheus metrics. Names follow the OpenTelemetry GenAI semantic conventions where they exist
//! (`gen_ai.server.request.duration`, `gen_ai.server.time_to_first_token`,
//! `gen_ai.client.operation.duration`, `gen_ai.client.token.usage`). Every label value comes from
//! configuration (route names, providers, reasons) or a fixed set, never from request input.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: Arc<str>,
    pub gen_ai_provider_name: &'static str,
    pub surface: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: Arc<str>,
    pub gen_ai_provider_name: &'static str,
    pub gen_ai_operation_name: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub route: Arc<str>,
    pub gen_ai_provider_name: &'static str,
    pub gen_ai_request_model: Arc<str>,
    pub consumer: Arc<str>,
    pub gen_ai_token_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub route: Arc<str>,
    pub gen_ai_provider_name: &'static str,
    pub error_type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub route: String,
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    pub resource: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub route: String,
    /// `provider/model`.
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendErrorLabels {
    pub route: String,
    pub backend: String,
    pub error_type: &'static str,
}

/// One backend's counters, looked up once and then shared (counters are handles).
pub struct BackendMetrics {
    pub labels: BackendLabels,
    pub requests: Counter,
    pub retries: Counter,
    pub ejections: Counter,
    pub ejected: Gauge,
}

/// A route's own handles (its labels do not vary per call), made once per route.
pub struct RouteMetrics {
    pub upstream_duration: Histogram,
    pub time_to_first_token: Histogram,
    /// Token counters by consumer.
    pub tokens: PerConsumer<ConsumerTokens>,
}

/// A Route's token counters of one consumer.
#[derive(Clone)]
pub struct ConsumerTokens {
    pub input: Counter,
    pub output: Counter,
}

/// What one backend's answers to one consumer cost: USD when the backend has a price, else a count.
#[derive(Clone)]
pub enum ConsumerCost {
    Usd(UsdCounter),
    Unknown(Counter),
}

/// Handles by consumer, made on a consumer's first call and reused by the next: a call finds its
/// counters by one short key instead of hashing every label in the family. Bounded; past
/// `MAX_CONSUMERS` a call is counted through the family, as if not cached.
pub struct PerConsumer<V>(parking_lot::RwLock<std::collections::HashMap<Arc<str>, V>>);

const MAX_CONSUMERS: usize = 1024;

impl<V> Default for PerConsumer<V> {
    fn default() -> Self {
        PerConsumer(Default::default())
    }
}

impl<V: Clone> PerConsumer<V> {
    pub fn get(&self, consumer: &Arc<str>, make: impl FnOnce() -> V) -> V {
        if let Some(v) = self.0.read().get(consumer) {
            return v.clone();
        }
        let v = make();
        let mut map = self.0.write();
        if map.len() < MAX_CONSUMERS {
            map.insert(Arc::clone(consumer), v.clone());
        }
        v
    }
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RequestLabels, Histogram>,
    pub upstream_duration: Family<RouteLabels, Histogram>,
    pub time_to_first_token: Family<RouteLabels, Histogram>,
    pub tokens: Family<TokenLabels, Counter>,
    pub rate_limited: Family<LimitLabels, Counter>,
    pub upstream_errors: Family<ErrorLabels, Counter>,
    pub routes: Family<ReasonLabels, Gauge>,
    pub reconciles: Counter,
    pub reconcile_errors: Counter,
    pub reconcile_duration: Histogram,
    pub watch_restarts: Family<ResourceLabels, Counter>,
    /// 1 while limits are counted locally because the shared store does not answer.
    pub limits_fallback: Gauge,
    pub limits_store_errors: Counter,
    pub token_reviews: Family<OutcomeLabels, Counter>,
    /// Served from files: the generation of the configuration serving now.
    pub config_generation: Gauge,
    /// Served from files: 1 while the latest reload failed (the last good version serves).
    pub config_reload_failing: Gauge,
    pub config_reload_failures: Counter,
    /// Requests refused with 503 because the gateway was at its in-flight cap.
    pub requests_shed: Counter,
    /// Bytes of request bodies and their parsed JSON held now (`--max-buffered-request-bytes`).
    pub request_buffer_bytes: Gauge,
    pub backend_requests: Family<BackendLabels, Counter>,
    /// One-word route names that moved to another namespace's Route.
    pub short_name_changes: Counter,
    pub backend_errors: Family<BackendErrorLabels, Counter>,
    pub backend_retries: Family<BackendLabels, Counter>,
    pub backend_ejections: Family<BackendLabels, Counter>,
    pub backend_ejected: Family<BackendLabels, Gauge>,
    pub cost: CostMetrics,
    /// 1 while this replica holds the leader Lease (or elects no leader at all).
    pub leader: Gauge,
    /// Replicas serving together as this one counts them (the 1/N of local limit shares).
    pub replicas: Gauge,
    pub budgets: BudgetMetrics,
    pub cache: CacheMetrics,
    pub guardrails: crate::guardrails::metrics::GuardrailMetrics,
    pub pools: PoolMetrics,
    pub mcp: super::mcp::McpMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    /// `inferencepool/NAMESPACE/NAME` or `service/NAMESPACE/NAME:PORT`.
    pub pool: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub pool: Arc<str>,
    /// The pod's name (or `ip:port` for an endpoint without one).
    pub endpoint: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EppErrorLabels {
    pub pool: Arc<str>,
    pub error: &'static str,
}

/// Self-hosted model pools: what the picker saw and chose.
pub struct PoolMetrics {
    pub endpoints: Family<PoolLabels, Gauge>,
    pub spillovers: Family<PoolLabels, Counter>,
    pub picks: Family<EndpointLabels, Counter>,
    pub queue: Family<EndpointLabels, Gauge>,
    pub kv_cache: Family<EndpointLabels, Gauge<f64, AtomicU64>>,
    pub scrape_errors: Family<EndpointLabels, Counter>,
    /// Exchanges with an InferencePool's endpoint picker.
    pub epp_duration: Family<PoolLabels, Histogram>,
    pub epp_errors: Family<EppErrorLabels, Counter>,
}

impl PoolMetrics {
    fn register(registry: &mut Registry) -> PoolMetrics {
        let m = PoolMetrics {
            endpoints: Family::default(),
            spillovers: Family::default(),
            picks: Family::default(),
            queue: Family::default(),
            kv_cache: Family::default(),
            scrape_errors: Family::default(),
            epp_duration: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            epp_errors: Family::default(),
        };
        registry.register_with_unit(
            "portcullis_pool_epp_duration",
            "Time the endpoint picker took to choose (or to fail)",
            Unit::Seconds,
            m.epp_duration.clone(),
        );
        registry.register(
            "portcullis_pool_epp_errors",
            "Exchanges with the endpoint picker that gave no usable choice, by kind",
            m.epp_errors.clone(),
        );
        registry.register(
            "portcullis_pool_endpoints",
            "Ready endpoints of a self-hosted model pool",
            m.endpoints.clone(),
        );
        registry.register(
            "portcullis_pool_spillovers",
            "Calls a pool did not take because every endpoint was saturated, ejected or gone (the Route's next priority took them)",
            m.spillovers.clone(),
        );
        registry.register(
            "portcullis_pool_picks",
            "Tries sent to each endpoint of a pool",
            m.picks.clone(),
        );
        registry.register(
            "portcullis_pool_queue",
            "Requests waiting at an endpoint, as its model server last reported",
            m.queue.clone(),
        );
        registry.register(
            "portcullis_pool_kv_cache_usage",
            "KV-cache usage (0 to 1) of an endpoint, as its model server last reported",
            m.kv_cache.clone(),
        );
        registry.register(
            "portcullis_pool_scrape_errors",
            "Failed reads of an endpoint's model-server metrics (its figures are then stale)",
            m.scrape_errors.clone(),
        );
        m
    }
}

/// One shared (not per-consumer) limit of a Route or Team.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BudgetLabels {
    /// `Route` or `Team`.
    pub kind: &'static str,
    /// `namespace/name` of a Route, the name of a Team.
    pub name: String,
    /// `calls`, `tokens` or `usd`.
    pub limit: &'static str,
    pub period: &'static str,
}

/// A shared limit's state as of the last call admitted against it (dashboards, budget alerts).
pub struct BudgetMetrics {
    /// Counted in the current window, in the limit's unit (USD for `usd`).
    pub used: Family<BudgetLabels, Gauge<f64, AtomicU64>>,
    /// The limit this replica enforces (its 1/N share while it counts alone).
    pub limit: Family<BudgetLabels, Gauge<f64, AtomicU64>>,
    /// Unix seconds at which the window ends (after it, `used` is stale until the next call).
    pub window_end: Family<BudgetLabels, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

fn latency_histogram() -> Histogram {
    // 100 µs .. ~100 s: gateway overhead at the low end, long generations at the top.
    Histogram::new(exponential_buckets(0.0001, 2.5, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let request_duration = Family::<RequestLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let upstream_duration = Family::<RouteLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let time_to_first_token = Family::<RouteLabels, Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        let rate_limited = Family::<LimitLabels, Counter>::default();
        let upstream_errors = Family::<ErrorLabels, Counter>::default();
        let routes = Family::<ReasonLabels, Gauge>::default();
        let reconciles = Counter::default();
        let reconcile_errors = Counter::default();
        let reconcile_duration = latency_histogram();
        let watch_restarts = Family::<ResourceLabels, Counter>::default();
        let limits_fallback = Gauge::default();
        let limits_store_errors = Counter::default();
        let token_reviews = Family::<OutcomeLabels, Counter>::default();
        let config_generation = Gauge::default();
        let config_reload_failing = Gauge::default();
        let config_reload_failures = Counter::default();
        registry.register(
            "portcullis_config_generation",
            "portcullis serve: generation of the configuration files serving now (1 at start, +1 per applied reload)",
            config_generation.clone(),
        );
        registry.register(
            "portcullis_config_reload_failing",
            "portcullis serve: 1 while the latest reload failed and the last good configuration serves",
            config_reload_failing.clone(),
        );
        registry.register(
            "portcullis_config_reload_failures",
            "portcullis serve: configuration files that could not be loaded on a reload",
            config_reload_failures.clone(),
        );
        let requests_shed = Counter::default();
        registry.register(
            "portcullis_requests_shed",
            "Requests refused with 503 because the gateway was at --max-in-flight",
            requests_shed.clone(),
        );
        let request_buffer_bytes = Gauge::default();
        registry.register(
            "portcullis_request_buffer_bytes",
            "Bytes of request bodies and their parsed JSON held now (at most --max-buffered-request-bytes)",
            request_buffer_bytes.clone(),
        );
        let backend_requests = Family::<BackendLabels, Counter>::default();
        let short_name_changes = Counter::default();
        registry.register(
            "portcullis_short_name_changes",
            "Times a one-word route name moved to a Route in another namespace",
            short_name_changes.clone(),
        );
        let backend_errors = Family::<BackendErrorLabels, Counter>::default();
        let backend_retries = Family::<BackendLabels, Counter>::default();
        let backend_ejections = Family::<BackendLabels, Counter>::default();
        let backend_ejected = Family::<BackendLabels, Gauge>::default();
        registry.register(
            "portcullis_backend_requests",
            "Tries sent to each backend of a route (a retried call counts once per backend tried)",
            backend_requests.clone(),
        );
        registry.register(
            "portcullis_backend_errors",
            "Failed tries by backend and kind",
            backend_errors.clone(),
        );
        registry.register(
            "portcullis_backend_retries",
            "Failed tries that were retried on another backend, by the backend that failed",
            backend_retries.clone(),
        );
        registry.register(
            "portcullis_backend_ejections",
            "Times a backend was ejected by outlier detection or a 429's Retry-After",
            backend_ejections.clone(),
        );
        registry.register(
            "portcullis_backend_ejected",
            "1 while a backend is ejected (cleared by its next answered call)",
            backend_ejected.clone(),
        );
        registry.register(
            "portcullis_limits_fallback",
            "1 while this replica enforces limits locally (1/N each) because the shared limits store is unreachable",
            limits_fallback.clone(),
        );
        registry.register(
            "portcullis_limits_store_errors",
            "Failed or timed-out calls to the shared limits store",
            limits_store_errors.clone(),
        );
        registry.register(
            "portcullis_token_reviews",
            "TokenReview API calls by outcome (authenticated, rejected, error); cached tokens make none",
            token_reviews.clone(),
        );

        registry.register(
            "portcullis_requests",
            "Data-plane requests by route, provider, API surface and status",
            requests.clone(),
        );
        registry.register_with_unit(
            "gen_ai_server_request_duration",
            "Time from request to the end of the response head, by route, provider, surface and status",
            Unit::Seconds,
            request_duration.clone(),
        );
        registry.register_with_unit(
            "gen_ai_client_operation_duration",
            "Duration of upstream provider calls",
            Unit::Seconds,
            upstream_duration.clone(),
        );
        registry.register_with_unit(
            "gen_ai_server_time_to_first_token",
            "Time from request to the first streamed chunk",
            Unit::Seconds,
            time_to_first_token.clone(),
        );
        registry.register(
            "gen_ai_client_token_usage",
            "Tokens used, by route, provider, model, consumer and type (input/output)",
            tokens.clone(),
        );
        registry.register(
            "portcullis_rate_limited",
            "Requests refused by a route limit",
            rate_limited.clone(),
        );
        registry.register(
            "portcullis_upstream_errors",
            "Failed upstream calls by kind",
            upstream_errors.clone(),
        );
        registry.register(
            "portcullis_routes",
            "Routes by Ready reason",
            routes.clone(),
        );
        registry.register(
            "portcullis_reconciles",
            "Routing-table rebuilds",
            reconciles.clone(),
        );
        registry.register(
            "portcullis_reconcile_errors",
            "Routing-table rebuilds that must be retried",
            reconcile_errors.clone(),
        );
        registry.register_with_unit(
            "portcullis_reconcile_duration",
            "Routing-table rebuild time",
            Unit::Seconds,
            reconcile_duration.clone(),
        );
        registry.register(
            "portcullis_watch_restarts",
            "Watch failures that forced a reconnect",
            watch_restarts.clone(),
        );

        let leader = Gauge::default();
        registry.register(
            "portcullis_leader",
            "1 while this replica holds the leader Lease and writes status and Events",
            leader.clone(),
        );
        let replicas = Gauge::default();
        registry.register(
            "portcullis_replicas",
            "Replicas serving together as this one counts them (each enforces 1/N while counting alone)",
            replicas.clone(),
        );
        let budgets = BudgetMetrics {
            used: Family::default(),
            limit: Family::default(),
            window_end: Family::default(),
        };
        registry.register(
            "portcullis_budget_used",
            "Shared limits: counted in the current window as of the last admitted call (USD for usd)",
            budgets.used.clone(),
        );
        registry.register(
            "portcullis_budget_limit",
            "Shared limits: the limit this replica enforces (USD for usd)",
            budgets.limit.clone(),
        );
        registry.register(
            "portcullis_budget_window_end_seconds",
            "Shared limits: Unix time at which the current window ends",
            budgets.window_end.clone(),
        );
        let cost = CostMetrics::register(&mut registry);
        let cache = CacheMetrics::register(&mut registry);
        let guardrails = crate::guardrails::metrics::GuardrailMetrics::register(&mut registry);
        let pools = PoolMetrics::register(&mut registry);
        let mcp = super::mcp::McpMetrics::register(&mut registry);
        Metrics {
            guardrails,
            pools,
            mcp,
            leader,
            replicas,
            budgets,
            cost,
            cache,
            registry,
            requests,
            request_duration,
            upstream_duration,
            time_to_first_token,
            tokens,
            rate_limited,
            upstream_errors,
            routes,
            reconciles,
            reconcile_errors,
            reconcile_duration,
            watch_restarts,
            limits_fallback,
            limits_store_errors,
            token_reviews,
            config_generation,
            config_reload_failing,
            config_reload_failures,
            requests_shed,
            request_buffer_bytes,
            backend_requests,
            short_name_changes,
            backend_errors,
            backend_retries,
            backend_ejections,
            backend_ejected,
        }
    }

    /// Handles on one backend's counters.
    pub fn backend(&self, route: &str, backend: &str) -> BackendMetrics {
        let labels = BackendLabels {
            route: route.to_string(),
            backend: backend.to_string(),
        };
        BackendMetrics {
            requests: self.backend_requests.get_or_create_owned(&labels),
            retries: self.backend_retries.get_or_create_owned(&labels),
            ejections: self.backend_ejections.get_or_create_owned(&labels),
            ejected: self.backend_ejected.get_or_create_owned(&labels),
            labels,
        }
    }

    pub fn route(&self, labels: &RouteLabels) -> RouteMetrics {
        RouteMetrics {
            upstream_duration: self.upstream_duration.get_or_create_owned(labels),
            time_to_first_token: self.time_to_first_token.get_or_create_owned(labels),
            tokens: PerConsumer::default(),
        }
    }

    /// The Prometheus/OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CostLabels {
    pub route: Arc<str>,
    pub gen_ai_provider_name: &'static str,
    pub gen_ai_request_model: Arc<str>,
    pub consumer: Arc<str>,
}

/// A counter of USD kept in exact picodollars, exposed as dollars.
#[derive(Clone, Debug, Default)]
pub struct UsdCounter(Arc<AtomicU64>);

impl UsdCounter {
    pub fn add(&self, amount: crate::cost::Usd) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_add(amount.0))
            });
    }

    pub fn get(&self) -> crate::cost::Usd {
        crate::cost::Usd(self.0.load(Ordering::Relaxed))
    }
}

impl TypedMetric for UsdCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for UsdCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get().as_f64(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlertLabels {
    /// `Route` or `Team`.
    pub kind: &'static str,
    /// `namespace/name` of a Route, the name of a Team.
    pub name: String,
    pub percent: u64,
}

/// Spend: `portcullis_cost_usd_total` and the calls whose cost is unknown (no price).
pub struct CostMetrics {
    pub usd: Family<CostLabels, UsdCounter>,
    pub unknown: Family<CostLabels, Counter>,
    /// Alert limits crossing 80% / 100% (once per window across replicas).
    pub alerts: Family<AlertLabels, Counter>,
}

impl CostMetrics {
    fn register(registry: &mut Registry) -> CostMetrics {
        let m = CostMetrics {
            usd: Family::default(),
            unknown: Family::default(),
            alerts: Family::default(),
        };
        registry.register(
            "portcullis_cost_usd",
            "USD spent on answered calls, by route, answering provider and model, and consumer",
            m.usd.clone(),
        );
        registry.register(
            "portcullis_cost_unknown_calls",
            "Answered calls whose cost is unknown (no catalog price or override for the model)",
            m.unknown.clone(),
        );
        registry.register(
            "portcullis_limit_alerts",
            "Limits with action: alert that crossed 80% or 100% of themselves (once per window)",
            m.alerts.clone(),
        );
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_uses_genai_names() {
        let m = Metrics::new();
        m.requests
            .get_or_create(&RequestLabels {
                route: "chat".into(),
                gen_ai_provider_name: "openai",
                surface: "openai",
                status: 200,
            })
            .inc();
        m.routes
            .get_or_create(&ReasonLabels { reason: "Resolved" })
            .set(1);
        let text = m.encode();
        assert!(text.contains("portcullis_requests_total{route=\"chat\",gen_ai_provider_name=\"openai\",surface=\"openai\",status=\"200\"} 1"), "{text}");
        assert!(
            !text.contains("gen_ai_server_request_duration_seconds_count"),
            "empty families print no samples"
        );
        assert!(text.contains("portcullis_routes{reason=\"Resolved\"} 1"));
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub route: Arc<str>,
}

/// The response cache (`cache` module): per Route, and of the store as a whole.
pub struct CacheMetrics {
    hits: Family<CacheLabels, Counter>,
    misses: Family<CacheLabels, Counter>,
    bypasses: Family<CacheLabels, Counter>,
    saved_usd: Family<CacheLabels, UsdCounter>,
    /// Bytes of entries written (compressed, as stored).
    pub stored_bytes: Counter,
    /// Entries the per-replica store dropped to stay within its bytes.
    pub evictions: Counter,
    /// Bytes the per-replica store holds now.
    pub local_bytes: Gauge,
    /// Reads and writes the shared store did not answer in time (each one a miss, never a failure).
    pub store_errors: Counter,
    /// Hits answered for a prompt close in meaning (semantic matching), also counted as hits.
    pub semantic_hits: Counter,
    /// How long each lookup took the store to answer: what a call waits for before it is answered
    /// from the cache or sent to the provider.
    pub lookup_duration: Histogram,
    /// Prompts a semantic index dropped to stay within its Route's `maxEntries`.
    pub semantic_evictions: Counter,
}

/// One Route's cache counters, made once per route.
pub struct CacheRouteMetrics {
    pub hits: Counter,
    pub misses: Counter,
    pub bypasses: Counter,
    pub saved_usd: UsdCounter,
}

impl CacheMetrics {
    fn register(registry: &mut Registry) -> CacheMetrics {
        let m = CacheMetrics {
            hits: Family::default(),
            misses: Family::default(),
            bypasses: Family::default(),
            saved_usd: Family::default(),
            stored_bytes: Counter::default(),
            evictions: Counter::default(),
            local_bytes: Gauge::default(),
            store_errors: Counter::default(),
            semantic_hits: Counter::default(),
            // 10 µs .. 0.6 s: a local store's lookup at the low end, a store timing out at the top.
            lookup_duration: Histogram::new(exponential_buckets(0.00001, 2.5, 13)),
            semantic_evictions: Counter::default(),
        };
        for (name, help, family) in [
            (
                "portcullis_cache_hits",
                "Calls answered from the response cache",
                &m.hits,
            ),
            (
                "portcullis_cache_misses",
                "Calls looked up in the response cache and answered by the provider",
                &m.misses,
            ),
            (
                "portcullis_cache_bypasses",
                "Calls on a caching Route that skipped the lookup (no-cache, no-store, not cacheable)",
                &m.bypasses,
            ),
        ] {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "portcullis_cache_saved_usd",
            "USD the provider would have billed for the calls answered from the cache",
            m.saved_usd.clone(),
        );
        registry.register_with_unit(
            "portcullis_cache_stored",
            "Bytes of cache entries written (as stored, compressed)",
            Unit::Bytes,
            m.stored_bytes.clone(),
        );
        registry.register(
            "portcullis_cache_evictions",
            "Entries the per-replica cache dropped to stay within its size",
            m.evictions.clone(),
        );
        registry.register_with_unit(
            "portcullis_cache_local",
            "Bytes the per-replica cache holds",
            Unit::Bytes,
            m.local_bytes.clone(),
        );
        registry.register(
            "portcullis_cache_store_errors",
            "Cache reads and writes the shared store failed (each a miss, never a failed call)",
            m.store_errors.clone(),
        );
        registry.register(
            "portcullis_cache_semantic_hits",
            "Calls answered from the entry of a prompt close in meaning (also counted as hits)",
            m.semantic_hits.clone(),
        );
        registry.register_with_unit(
            "portcullis_cache_lookup_duration",
            "Time the cache store took to answer each lookup",
            Unit::Seconds,
            m.lookup_duration.clone(),
        );
        registry.register(
            "portcullis_cache_semantic_evictions",
            "Prompts a per-replica semantic index dropped to stay within its Route's maxEntries",
            m.semantic_evictions.clone(),
        );
        m
    }

    pub fn route(&self, route: &Arc<str>) -> CacheRouteMetrics {
        let labels = CacheLabels {
            route: Arc::clone(route),
        };
        CacheRouteMetrics {
            hits: self.hits.get_or_create_owned(&labels),
            misses: self.misses.get_or_create_owned(&labels),
            bypasses: self.bypasses.get_or_create_owned(&labels),
            saved_usd: self.saved_usd.get_or_create_owned(&labels),
        }
    }
}
