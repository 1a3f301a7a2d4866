//! The routing table: an immutable snapshot from public route name to a ready-to-serve entry.
//!
//! The controller builds a whole new table and publishes it with one atomic swap; the data plane
//! reads the current snapshot without locks. An entry is shared by `Arc`, so a request in flight
//! keeps using the credential it started with while a rotation publishes the next one.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use arc_swap::ArcSwap;
use http::HeaderValue;

use crate::api::{AccessRule, Limit, LimitKey, Provider, Reason, RenewalPeriod, RouteType};
use crate::cost::Price;
use crate::providers::{ProviderAdapter, Target};
use crate::store::KeyPrefix;
use crate::telemetry::metrics::{
    BackendMetrics, ConsumerCost, Metrics, PerConsumer, RouteLabels, RouteMetrics,
};
use crate::traffic::{BackendHealth, Candidate, TrafficPolicy};

/// The table shared by the controller (writer) and the data plane (readers).
pub type SharedTable = Arc<ArcSwap<RoutingTable>>;

#[derive(Default)]
pub struct RoutingTable {
    by_name: HashMap<String, Arc<RouteEntry>>,
    /// Sorted by name, for listings and paging.
    sorted: Vec<Arc<RouteEntry>>,
    /// Every Team, by member: their limits hold across all routes.
    pub teams: Arc<crate::teams::Teams>,
    /// No Route, or some Route without `access` rules (so, under `--default-access allow-all`,
    /// callable without credentials).
    anonymous: bool,
}

/// A Route that owns its public name (it won any name conflict).
pub struct RouteEntry {
    /// The name callers use and listings show: the one-word name when the Route owns it, else
    /// the qualified one.
    pub name: Arc<str>,
    /// `namespace/name`: always callable.
    pub qualified: String,
    pub namespace: String,
    pub route_type: RouteType,
    /// The provider and model listings show: `model`, or the first-choice backend.
    pub provider: Provider,
    pub model: Arc<str>,
    pub limits: Vec<Limit>,
    /// The start of its limits' counter keys (`limits::route_keys`).
    pub counter_keys: KeyPrefix,
    /// Who may call; `None`: the gateway-wide default.
    pub access: Option<Vec<AccessRule>>,
    pub state: RouteState,
    /// `spec.cache`, compiled; `None`: calls are never cached.
    pub cache: Option<crate::cache::CachePolicy>,
    /// The route's guardrail policies, compiled; `None`: it has none.
    pub guard: Option<Arc<crate::guardrails::Guard>>,
    /// The route's metric handles, made on first use (like a backend's).
    pub metrics: OnceLock<RouteMetrics>,
}

/// The `limit` of a route on the MLflow listings: its first calls-limit.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MlflowLimit {
    pub calls: u64,
    pub key: LimitKey,
    pub renewal_period: RenewalPeriod,
}

impl RouteEntry {
    pub fn metrics(&self, metrics: &Metrics) -> &RouteMetrics {
        self.metrics.get_or_init(|| {
            metrics.route(&RouteLabels {
                route: Arc::clone(&self.name),
                gen_ai_provider_name: self.provider.as_str(),
                gen_ai_operation_name: self.route_type.operation(),
            })
        })
    }

    /// The first calls-limit as MLflow's listings show it (`{calls, key, renewal_period}`), or None.
    pub fn mlflow_limit(&self) -> Option<MlflowLimit> {
        self.limits.iter().find_map(|l| {
            Some(MlflowLimit {
                calls: l.calls?,
                key: l.key,
                renewal_period: l.renewal_period,
            })
        })
    }
}

pub enum RouteState {
    /// At least one backend resolved.
    Ready(Arc<Backends>),
    /// The Route exists but cannot serve; requests get 503 with this reason.
    NotReady { reason: Reason, message: String },
}

pub struct Upstream {
    pub adapter: &'static dyn ProviderAdapter,
    pub target: Target,
    /// The URLs this upstream's calls go to, parsed once (an adapter makes a handful per target).
    urls: parking_lot::Mutex<Vec<(Box<str>, reqwest::Url)>>,
}

/// URLs kept per upstream; an adapter that made more (none does) would parse the rest per call.
const MAX_CACHED_URLS: usize = 8;

impl Upstream {
    pub fn new(adapter: &'static dyn ProviderAdapter, target: Target) -> Upstream {
        Upstream {
            adapter,
            target,
            urls: parking_lot::Mutex::default(),
        }
    }

    /// `url` parsed, from the cache when this upstream was called with it before: URL parsing
    /// (IDNA included) is otherwise a visible share of a proxied call.
    /// `None` for a URL that does not parse (the caller lets the HTTP client report it).
    pub fn url(&self, url: &str) -> Option<reqwest::Url> {
        if let Some((_, parsed)) = self.urls.lock().iter().find(|(u, _)| &**u == url) {
            return Some(parsed.clone());
        }
        let parsed = reqwest::Url::parse(url).ok()?;
        let mut urls = self.urls.lock();
        if urls.len() < MAX_CACHED_URLS && !urls.iter().any(|(u, _)| &**u == url) {
            urls.push((url.into(), parsed.clone()));
        }
        Some(parsed)
    }
}

/// The resolved backends of a serving Route and its traffic policy.
pub struct Backends {
    /// Sorted by priority, in spec order within one; only backends that resolved.
    pub list: Vec<Backend>,
    pub policy: TrafficPolicy,
    /// The highest price of each kind among the backends (what a call reserves against a USD
    /// budget before its backend is chosen); `None` when any backend's price is unknown.
    pub max_price: Option<Price>,
    /// The same at the Team price (`cost::team_price`), for Team USD budgets.
    pub max_team_price: Option<Price>,
    /// The most output tokens any backend's model may write: what a call without `max_tokens`
    /// reserves against budgets.
    pub max_output: u64,
    /// The API every backend's wire speaks, if they share one and none is a pool: calls in it
    /// pass through.
    pub wire: Option<crate::providers::Wire>,
    /// Streams pass through too: every backend ends a stream with a usage chunk when asked.
    pub wire_streams: bool,
}

/// One resolved backend, with everything the hot path needs computed once.
pub struct Backend {
    pub upstream: Arc<Upstream>,
    pub weight: u32,
    pub priority: u32,
    /// `provider/model`: the log field, metric label and `x-portcullis-backend` header value.
    pub id: Arc<str>,
    pub header: HeaderValue,
    /// The provider's model, as the cost metric's label (a refcount per call, not a copy).
    pub model: Arc<str>,
    /// Identifies the backend across table rebuilds; its health carries over while this is unchanged.
    pub key: String,
    pub health: Arc<BackendHealth>,
    /// What a call costs here, resolved when the table is built; `None`: unknown (never zero).
    pub price: Option<Price>,
    /// What a call here counts against Team budgets: never below the cluster-wide price.
    pub team_price: Option<Price>,
    /// The most output tokens the model may write (catalog `maxOutput`, or the default).
    pub max_output: u64,
    /// Model servers in the cluster: each try goes to the endpoint picked from this pool (the
    /// upstream's URL then names the path only).
    pub pool: Option<crate::pools::PoolBackend>,
    metrics: OnceLock<BackendMetrics>,
    /// Cost counters by consumer (shared with the calls it answers, which may outlive a table).
    pub cost: Arc<PerConsumer<ConsumerCost>>,
}

impl Backend {
    pub fn new(upstream: Upstream, weight: u32, priority: u32, key: String) -> Backend {
        let id: Arc<str> = format!(
            "{}/{}",
            upstream.adapter.info().provider.as_str(),
            upstream.target.model
        )
        .into();
        Backend {
            header: HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("unknown")),
            model: upstream.target.model.as_str().into(),
            id,
            upstream: Arc::new(upstream),
            weight,
            priority,
            key,
            health: Arc::default(),
            price: None,
            team_price: None,
            max_output: crate::cost::DEFAULT_MAX_OUTPUT,
            pool: None,
            metrics: OnceLock::new(),
            cost: Arc::default(),
        }
    }

    /// Names the backend after its pool (`x-portcullis-backend`, metric label, log field).
    pub fn with_pool(mut self, pool: crate::pools::PoolBackend) -> Backend {
        self.id = Arc::clone(&pool.pool.id);
        self.header = pool.pool.header.clone();
        self.pool = Some(pool);
        self
    }

    /// This backend's metric handles, made on first use and then shared by every call.
    pub fn metrics(&self, route: &str, metrics: &Metrics) -> &BackendMetrics {
        self.metrics
            .get_or_init(|| metrics.backend(route, &self.id))
    }
}

impl Candidate for Backend {
    fn weight(&self) -> u32 {
        self.weight
    }
    fn priority(&self) -> u32 {
        self.priority
    }
    fn health(&self) -> &BackendHealth {
        &self.health
    }
}

impl std::fmt::Debug for RouteEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteEntry")
            .field("name", &self.name)
            .field("namespace", &self.namespace)
            .field("route_type", &self.route_type)
            .field("provider", &self.provider)
            .field("ready", &matches!(self.state, RouteState::Ready(_)))
            .finish()
    }
}

impl RoutingTable {
    pub fn new(entries: impl IntoIterator<Item = RouteEntry>) -> Self {
        let mut sorted: Vec<Arc<RouteEntry>> = entries.into_iter().map(Arc::new).collect();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        let mut by_name = HashMap::with_capacity(sorted.len() * 2);
        for e in &sorted {
            by_name.insert(e.qualified.clone(), Arc::clone(e));
            by_name.insert(e.name.to_string(), Arc::clone(e));
        }
        RoutingTable {
            anonymous: sorted.iter().any(|e| e.access.is_none()),
            by_name,
            sorted,
            teams: Arc::default(),
        }
    }

    /// Whether some Route may be called without credentials under `allow-all`.
    pub fn admits_anonymous(&self) -> bool {
        self.anonymous || self.sorted.is_empty()
    }

    pub fn shared(self) -> SharedTable {
        Arc::new(ArcSwap::from_pointee(self))
    }

    pub fn get(&self, name: &str) -> Option<&Arc<RouteEntry>> {
        self.by_name.get(name)
    }

    /// All routes, sorted by name.
    pub fn routes(&self) -> &[Arc<RouteEntry>] {
        &self.sorted
    }

    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// The health of every backend by key, to carry over into the next table.
    pub fn backend_health(&self) -> HashMap<&str, &Arc<BackendHealth>> {
        self.sorted
            .iter()
            .filter_map(|e| match &e.state {
                RouteState::Ready(b) => Some(b.list.iter()),
                RouteState::NotReady { .. } => None,
            })
            .flatten()
            .map(|b| (b.key.as_str(), &b.health))
            .collect()
    }
}

#[cfg(test)]
impl RouteEntry {
    /// A chat route in namespace "ns" that does not serve; tests override the fields they need.
    pub fn not_ready(name: &str) -> RouteEntry {
        RouteEntry {
            metrics: Default::default(),
            name: name.into(),
            qualified: format!("ns/{name}"),
            namespace: "ns".into(),
            route_type: RouteType::Chat,
            provider: Provider::Openai,
            model: "m".into(),
            limits: vec![],
            counter_keys: crate::limits::route_keys(name),
            access: None,
            cache: None,
            guard: None,
            state: RouteState::NotReady {
                reason: Reason::SecretNotFound,
                message: "x".into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str) -> RouteEntry {
        RouteEntry::not_ready(name)
    }

    #[test]
    fn lookup_and_sorted_listing() {
        let t = RoutingTable::new([entry("b"), entry("a"), entry("c")]);
        assert_eq!(
            t.routes().iter().map(|e| &*e.name).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        assert!(t.get("b").is_some());
        assert!(t.get("z").is_none());
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn swap_keeps_old_snapshot_alive_for_readers() {
        let shared = RoutingTable::new([entry("a")]).shared();
        let held = shared.load_full();
        shared.store(Arc::new(RoutingTable::new([entry("b")])));
        assert!(held.get("a").is_some());
        assert!(shared.load().get("a").is_none());
    }
}
