//! Self-hosted model pools: backends that are model servers in the cluster (an InferencePool's
//! pods, or a Service's ready endpoints) instead of one provider URL.
//!
//! One room per job: `scrape` (each endpoint's model-server metrics, on a timer), `pick` (the
//! pure choice of an endpoint for one call); `controller/pools.rs` watches the API objects that
//! say which endpoints are ready. A `Pool` is shared by every Route that names it and outlives table rebuilds: its
//! endpoint set is an atomic snapshot the data plane reads without locks, replaced whole by the
//! watcher; figures and health live in atomics beside it.

pub mod epp;
pub mod pick;
pub mod scrape;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use arc_swap::{ArcSwap, ArcSwapOption};
use http::HeaderValue;

use crate::api::{ModelSpec, PoolRef};
use crate::telemetry::metrics::{EndpointLabels, Metrics, PoolLabels};
use crate::traffic::BackendHealth;

/// The origin of a pool backend's upstream URL: each try's host and port are those of the
/// endpoint picked (never resolved: `.invalid`).
pub const POOL_URL_ORIGIN: &str = "http://pool.invalid";
/// The base URL of a pool backend's upstream: the path model servers serve the OpenAI API under.
pub const POOL_API_BASE: &str = "http://pool.invalid/v1";

/// Which pool a backend names; two Routes naming the same one share it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PoolKey {
    InferencePool {
        namespace: String,
        name: String,
    },
    Service {
        namespace: String,
        name: String,
        port: u16,
    },
}

impl PoolKey {
    /// The pool a backend of a Route in `namespace` names, if it names one.
    pub fn of(model: &ModelSpec, namespace: &str) -> Option<PoolKey> {
        if let Some(PoolRef {
            name,
            namespace: ns,
        }) = &model.inference_pool
        {
            return Some(PoolKey::InferencePool {
                namespace: ns.clone().unwrap_or_else(|| namespace.to_string()),
                name: name.clone(),
            });
        }
        model.service.as_ref().map(|s| PoolKey::Service {
            namespace: namespace.to_string(),
            name: s.name.clone(),
            port: s.port,
        })
    }

    pub fn namespace(&self) -> &str {
        match self {
            PoolKey::InferencePool { namespace, .. } | PoolKey::Service { namespace, .. } => {
                namespace
            }
        }
    }
}

impl std::fmt::Display for PoolKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PoolKey::InferencePool { namespace, name } => {
                write!(f, "inferencepool/{namespace}/{name}")
            }
            PoolKey::Service {
                namespace,
                name,
                port,
            } => write!(f, "service/{namespace}/{name}:{port}"),
        }
    }
}

/// One ready endpoint as the API server lists it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct EndpointAddr {
    pub addr: SocketAddr,
    /// The pod's name, or `ip:port` when the endpoint names none.
    pub name: String,
}

/// What an endpoint's model server last reported, and what the gateway sent it since.
#[derive(Debug, Default)]
pub struct Load {
    waiting: AtomicU32,
    running: AtomicU32,
    /// KV-cache usage in millionths.
    kv_millionths: AtomicU32,
    /// `now_ms()` of the last good scrape; 0: never.
    scraped_at: AtomicU64,
    /// The gateway's calls in flight to this endpoint now, and when it was last scraped.
    inflight: AtomicU32,
    inflight_at_scrape: AtomicU32,
    /// LoRA adapters running or waiting there (`vllm:lora_requests_info`).
    adapters: ArcSwapOption<Vec<String>>,
    /// How many adapters it may hold at once (`max_lora`); 0: unknown.
    max_adapters: AtomicU32,
}

impl Load {
    pub fn record(&self, figures: &scrape::Figures, now: u64) {
        self.waiting.store(figures.waiting, Ordering::Relaxed);
        self.running.store(figures.running, Ordering::Relaxed);
        self.kv_millionths.store(
            (figures.kv_cache.clamp(0.0, 1.0) * 1e6) as u32,
            Ordering::Relaxed,
        );
        self.inflight_at_scrape
            .store(self.inflight.load(Ordering::Relaxed), Ordering::Relaxed);
        let adapters = (!figures.adapters.is_empty()).then(|| Arc::new(figures.adapters.clone()));
        self.adapters.store(adapters);
        self.max_adapters
            .store(figures.max_adapters, Ordering::Relaxed);
        self.scraped_at.store(now, Ordering::Relaxed);
    }

    /// The picker's view: reported figures plus the calls sent since, or, when the figures are
    /// older than `stale_after_ms`, only the gateway's own calls in flight.
    pub fn view(&self, now: u64, stale_after_ms: u64, adapter: Option<&str>) -> pick::Figures {
        let inflight = self.inflight.load(Ordering::Relaxed);
        let scraped_at = self.scraped_at.load(Ordering::Relaxed);
        let fresh = scraped_at != 0 && now.saturating_sub(scraped_at) <= stale_after_ms;
        let (adapter_loaded, adapter_room) = match adapter {
            None => (false, false),
            Some(name) => {
                let loaded = self.adapters.load();
                let list = loaded.as_deref().map_or(&[][..], Vec::as_slice);
                let max = self.max_adapters.load(Ordering::Relaxed) as usize;
                (list.iter().any(|a| a == name), max == 0 || list.len() < max)
            }
        };
        if !fresh {
            return pick::Figures {
                waiting: 0,
                load: inflight,
                kv_cache: 0.0,
                adapter_loaded,
                adapter_room,
                stale: true,
            };
        }
        // Calls sent since the scrape are not in its figures yet: counted as waiting, so a burst
        // between two scrapes spreads instead of landing on one endpoint.
        let since = inflight.saturating_sub(self.inflight_at_scrape.load(Ordering::Relaxed));
        let waiting = self.waiting.load(Ordering::Relaxed).saturating_add(since);
        pick::Figures {
            waiting,
            load: waiting.saturating_add(self.running.load(Ordering::Relaxed)),
            kv_cache: f64::from(self.kv_millionths.load(Ordering::Relaxed)) / 1e6,
            adapter_loaded,
            adapter_room,
            stale: false,
        }
    }
}

/// One model server of a pool.
pub struct Endpoint {
    pub addr: SocketAddr,
    pub name: Arc<str>,
    /// `x-portcullis-endpoint` value: the pod's name.
    pub header: HeaderValue,
    /// Passive health: connection failures eject the endpoint, not the pool.
    pub health: BackendHealth,
    pub load: Load,
    picks: prometheus_client::metrics::counter::Counter,
    queue: prometheus_client::metrics::gauge::Gauge,
    kv_cache: prometheus_client::metrics::gauge::Gauge<f64, AtomicU64>,
    scrape_errors: prometheus_client::metrics::counter::Counter,
}

impl Endpoint {
    fn new(pool: &Arc<str>, at: &EndpointAddr, metrics: &Metrics) -> Endpoint {
        let name: Arc<str> = at.name.as_str().into();
        let labels = EndpointLabels {
            pool: Arc::clone(pool),
            endpoint: Arc::clone(&name),
        };
        Endpoint {
            addr: at.addr,
            header: HeaderValue::from_str(&name).unwrap_or(HeaderValue::from_static("unknown")),
            name,
            health: BackendHealth::default(),
            load: Load::default(),
            picks: metrics.pools.picks.get_or_create_owned(&labels),
            queue: metrics.pools.queue.get_or_create_owned(&labels),
            kv_cache: metrics.pools.kv_cache.get_or_create_owned(&labels),
            scrape_errors: metrics.pools.scrape_errors.get_or_create_owned(&labels),
        }
    }

    /// A call is sent here: counted until the guard drops (the answer or stream ended).
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.picks.inc();
        self.load.inflight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(self))
    }

    pub fn scraped(&self, figures: &scrape::Figures, now: u64) {
        self.load.record(figures, now);
        self.queue.set(i64::from(figures.waiting));
        self.kv_cache.set(figures.kv_cache);
    }

    pub fn scrape_failed(&self) {
        self.scrape_errors.inc();
    }
}

/// One call in flight to an endpoint.
pub struct InFlight(Arc<Endpoint>);

impl InFlight {
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.load.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The endpoints of a pool at one moment.
#[derive(Default)]
pub struct EndpointSet {
    pub list: Vec<Arc<Endpoint>>,
}

/// One pool: its endpoints (a lock-free snapshot), prompt-prefix affinity and metric handles.
pub struct Pool {
    pub key: PoolKey,
    pub id: Arc<str>,
    pub header: HeaderValue,
    endpoints: ArcSwap<EndpointSet>,
    pub prefixes: pick::PrefixIndex,
    /// The InferencePool's endpoint picker, when it names one that resolves.
    picker: ArcSwapOption<Picker>,
    /// Whether the last exchange with the picker worked: 0 not tried yet, 1 yes, 2 no.
    picker_reachable: std::sync::atomic::AtomicU8,
    /// Told when something the Routes' status shows changed (the picker's reachability).
    status_changed: Arc<tokio::sync::watch::Sender<()>>,
    /// Speak h2c to the picker instead of TLS (`--pool-picker-plaintext`).
    picker_plaintext: bool,
    metrics: Arc<Metrics>,
    ready_gauge: prometheus_client::metrics::gauge::Gauge,
    spillovers: prometheus_client::metrics::counter::Counter,
}

/// An InferencePool's endpoint picker and what to do when it does not answer.
pub struct Picker {
    /// `None` while its Service has no ready Pod: every call is then a failure.
    pub client: Option<epp::EndpointPicker>,
    /// `FailOpen`: the gateway picks itself; `FailClose` (the API's default): the pool takes no
    /// call (the Route's next backend does).
    pub fail_open: bool,
}

impl Pool {
    pub fn new(key: PoolKey, metrics: Arc<Metrics>) -> Pool {
        Self::with_status(
            key,
            metrics,
            Arc::new(tokio::sync::watch::channel(()).0),
            false,
        )
    }

    fn with_status(
        key: PoolKey,
        metrics: Arc<Metrics>,
        status_changed: Arc<tokio::sync::watch::Sender<()>>,
        picker_plaintext: bool,
    ) -> Pool {
        let id: Arc<str> = key.to_string().into();
        let labels = PoolLabels {
            pool: Arc::clone(&id),
        };
        Pool {
            header: HeaderValue::from_str(&id).unwrap_or(HeaderValue::from_static("pool")),
            ready_gauge: metrics.pools.endpoints.get_or_create_owned(&labels),
            spillovers: metrics.pools.spillovers.get_or_create_owned(&labels),
            key,
            id,
            endpoints: ArcSwap::default(),
            prefixes: pick::PrefixIndex::default(),
            picker: ArcSwapOption::empty(),
            picker_reachable: Default::default(),
            status_changed,
            picker_plaintext,
            metrics,
        }
    }

    pub fn endpoints(&self) -> arc_swap::Guard<Arc<EndpointSet>> {
        self.endpoints.load()
    }

    pub fn ready_count(&self) -> u32 {
        self.endpoints.load().list.len() as u32
    }

    /// Publishes the ready endpoints; those already known keep their figures and health.
    /// True when the set changed.
    pub fn set_endpoints(&self, mut ready: Vec<EndpointAddr>) -> bool {
        ready.sort();
        ready.dedup_by(|a, b| a.addr == b.addr);
        let current = self.endpoints.load();
        let same = current.list.len() == ready.len()
            && current
                .list
                .iter()
                .zip(&ready)
                .all(|(e, r)| e.addr == r.addr && *e.name == *r.name);
        if same {
            return false;
        }
        let known: HashMap<SocketAddr, &Arc<Endpoint>> =
            current.list.iter().map(|e| (e.addr, e)).collect();
        let list = ready
            .iter()
            .map(|r| match known.get(&r.addr) {
                Some(e) if *e.name == *r.name => Arc::clone(e),
                _ => Arc::new(Endpoint::new(&self.id, r, &self.metrics)),
            })
            .collect::<Vec<_>>();
        // Gone endpoints' series go with them (pod names do not come back).
        for gone in current
            .list
            .iter()
            .filter(|e| !list.iter().any(|n| Arc::ptr_eq(n, e)))
        {
            let labels = EndpointLabels {
                pool: Arc::clone(&self.id),
                endpoint: Arc::clone(&gone.name),
            };
            self.metrics.pools.picks.remove(&labels);
            self.metrics.pools.queue.remove(&labels);
            self.metrics.pools.kv_cache.remove(&labels);
            self.metrics.pools.scrape_errors.remove(&labels);
        }
        self.ready_gauge.set(list.len() as i64);
        self.endpoints.store(Arc::new(EndpointSet { list }));
        true
    }

    /// The pool could not take a call.
    pub fn spilled(&self) {
        self.spillovers.inc();
    }

    pub fn picker(&self) -> Option<Arc<Picker>> {
        self.picker.load_full()
    }

    /// Sets the endpoint picker: `None` when the pool names none, else its address (`None` while
    /// it does not resolve) and whether it fails open; a picker at the same address and mode is
    /// kept (its connection with it). True when it changed.
    pub fn set_picker(&self, picker: Option<(Option<SocketAddr>, bool)>) -> bool {
        let current = self.picker.load();
        let same = match (current.as_deref(), picker) {
            (None, None) => true,
            (Some(p), Some((addr, fail_open))) => {
                p.client.as_ref().map(|c| c.addr) == addr && p.fail_open == fail_open
            }
            _ => false,
        };
        if same {
            return false;
        }
        let picker = picker.map(|(addr, fail_open)| {
            let client =
                addr.and_then(|a| epp::EndpointPicker::new(a, EPP_TIMEOUT, self.picker_plaintext));
            Arc::new(Picker { client, fail_open })
        });
        self.picker.store(picker);
        self.picker_reachable.store(0, Ordering::Relaxed);
        true
    }

    /// What status says of the picker: `None` without one.
    pub fn picker_state(&self) -> Option<&'static str> {
        if self.picker.load().as_ref()?.client.is_none() {
            return Some("Unreachable");
        }
        Some(match self.picker_reachable.load(Ordering::Relaxed) {
            1 => "Reachable",
            2 => "Unreachable",
            _ => "Unknown",
        })
    }

    /// Records an exchange with the picker: its latency, its error, and a change of
    /// reachability (which the Routes' status shows).
    pub fn picker_answered(&self, took: std::time::Duration, error: Option<&epp::EppError>) {
        let labels = PoolLabels {
            pool: Arc::clone(&self.id),
        };
        self.metrics
            .pools
            .epp_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        if let Some(e) = error {
            self.metrics
                .pools
                .epp_errors
                .get_or_create(&crate::telemetry::metrics::EppErrorLabels {
                    pool: Arc::clone(&self.id),
                    error: e.code(),
                })
                .inc();
        }
        let now = if error.is_some() { 2 } else { 1 };
        if self.picker_reachable.swap(now, Ordering::Relaxed) != now {
            self.status_changed.send_replace(());
        }
    }
}

/// The longest wait for the endpoint picker's choice.
const EPP_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// Every pool some Route names, shared by the route controller (which says which are wanted),
/// the watcher (which fills their endpoints) and the scraper.
pub struct Pools {
    map: parking_lot::Mutex<HashMap<PoolKey, Arc<Pool>>>,
    metrics: Arc<Metrics>,
    /// Bumped when the set of pools changes, so the watcher computes the new ones' endpoints.
    changed: tokio::sync::watch::Sender<u64>,
    /// Told when something a Route's status shows changed (ready counts, picker reachability).
    status_changed: Arc<tokio::sync::watch::Sender<()>>,
    picker_plaintext: bool,
}

impl Pools {
    pub fn new(metrics: Arc<Metrics>) -> Pools {
        Pools {
            map: Default::default(),
            metrics,
            changed: tokio::sync::watch::channel(0).0,
            status_changed: Arc::new(tokio::sync::watch::channel(()).0),
            picker_plaintext: false,
        }
    }

    /// Endpoint pickers are spoken to without TLS (pickers run with `--secure-serving=false`).
    pub fn with_plaintext_pickers(mut self, plaintext: bool) -> Pools {
        self.picker_plaintext = plaintext;
        self
    }

    /// Fires when a pool's status (ready count, picker reachability) changed.
    pub fn status_changes(&self) -> tokio::sync::watch::Receiver<()> {
        self.status_changed.subscribe()
    }

    pub fn status_changed(&self) {
        self.status_changed.send_replace(());
    }

    /// Keeps exactly the `wanted` pools (new ones start with no endpoints) and returns them.
    pub fn want(&self, wanted: HashSet<PoolKey>) -> HashMap<PoolKey, Arc<Pool>> {
        let mut map = self.map.lock();
        let before = map.len();
        map.retain(|k, _| wanted.contains(k));
        let mut added = false;
        for key in wanted {
            map.entry(key.clone()).or_insert_with(|| {
                added = true;
                Arc::new(Pool::with_status(
                    key,
                    Arc::clone(&self.metrics),
                    Arc::clone(&self.status_changed),
                    self.picker_plaintext,
                ))
            });
        }
        if added || map.len() != before {
            self.changed.send_modify(|n| *n += 1);
        }
        map.clone()
    }

    pub fn all(&self) -> Vec<Arc<Pool>> {
        self.map.lock().values().cloned().collect()
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// Where reconcile finds the pool a backend names.
pub trait PoolLookup {
    fn pool(&self, key: &PoolKey) -> Option<Arc<Pool>>;
}

impl PoolLookup for HashMap<PoolKey, Arc<Pool>> {
    fn pool(&self, key: &PoolKey) -> Option<Arc<Pool>> {
        self.get(key).cloned()
    }
}

/// No cluster (`portcullis serve`): no pool resolves.
pub struct NoPools;

impl PoolLookup for NoPools {
    fn pool(&self, _key: &PoolKey) -> Option<Arc<Pool>> {
        None
    }
}

/// How a pool backend's calls choose an endpoint, fixed when the table is built.
pub struct PoolBackend {
    pub pool: Arc<Pool>,
    /// Requests waiting above which an endpoint is saturated; `None`: never (the pool takes
    /// every call while it has an endpoint).
    pub saturation: Option<u32>,
    /// The backend's model when an endpoint may serve it as a LoRA adapter (any model name:
    /// only endpoints that report it as an adapter get the preference).
    pub adapter: Arc<str>,
}

/// Figures older than this are stale: more than the longest scrape (1 s) plus the longest
/// interval ago.
const STALE_AFTER_MS: u64 = 1500;

impl PoolBackend {
    /// The endpoint for the next try of a call whose prompt has these prefix `blocks`, among
    /// those not `tried` yet; `None` when the pool cannot take the call (no endpoint left, or
    /// every one saturated). Ejected endpoints are passed over while another one is healthy.
    pub fn pick(&self, blocks: &[u64], tried: &[SocketAddr], now: u64) -> Option<Arc<Endpoint>> {
        let set = self.pool.endpoints();
        let untried: Vec<&Arc<Endpoint>> = set
            .list
            .iter()
            .filter(|e| !tried.contains(&e.addr))
            .collect();
        let healthy: Vec<&Arc<Endpoint>> = untried
            .iter()
            .copied()
            .filter(|e| !e.health.is_ejected(now))
            .collect();
        let open = if healthy.is_empty() { untried } else { healthy };
        let longest = self.pool.prefixes.longest(blocks);
        let candidates: Vec<pick::Candidate> = open
            .iter()
            .map(|e| pick::Candidate {
                figures: e.load.view(now, STALE_AFTER_MS, Some(&self.adapter)),
                prefix: match longest {
                    Some((at, share)) if at == e.addr => share,
                    _ => 0.0,
                },
            })
            .collect();
        let chosen =
            Arc::clone(open[pick::choose(&candidates, self.saturation, fastrand::u64(..))?]);
        self.pool.prefixes.served(blocks, chosen.addr);
        Some(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_picker_without_an_address_is_unreachable_and_an_unchanged_one_is_kept() {
        let pool = Pool::new(
            PoolKey::Service {
                namespace: "ns".into(),
                name: "vllm".into(),
                port: 8000,
            },
            Arc::new(Metrics::new()),
        );
        assert_eq!(pool.picker_state(), None);
        // Named, but its Service has no ready Pod: every call fails (FailClose holds).
        assert!(pool.set_picker(Some((None, false))));
        assert!(pool.picker().unwrap().client.is_none());
        assert_eq!(pool.picker_state(), Some("Unreachable"));
        let at: SocketAddr = "10.0.0.9:9002".parse().unwrap();
        assert!(pool.set_picker(Some((Some(at), false))));
        assert_eq!(pool.picker_state(), Some("Unknown"));
        let kept = pool.picker().unwrap();
        assert!(!pool.set_picker(Some((Some(at), false))));
        assert!(Arc::ptr_eq(&kept, &pool.picker().unwrap()));
        // A new failure mode is a new picker.
        assert!(pool.set_picker(Some((Some(at), true))));
        assert!(pool.set_picker(None));
        assert_eq!(pool.picker_state(), None);
    }

    #[test]
    fn stale_figures_fall_back_to_the_gateways_own_calls_and_keep_the_endpoint() {
        let load = Load::default();
        let figures = scrape::Figures {
            waiting: 3,
            running: 2,
            kv_cache: 0.5,
            adapters: vec!["sql".into()],
            max_adapters: 2,
        };
        load.record(&figures, 1000);
        load.inflight.fetch_add(2, Ordering::Relaxed);
        // Fresh: the report plus the two calls sent since.
        let v = load.view(1100, STALE_AFTER_MS, Some("sql"));
        assert_eq!((v.waiting, v.load, v.stale), (5, 7, false));
        assert!(v.adapter_loaded && v.adapter_room);
        // Stale (scrapes failing): only the calls in flight count; nothing says it is gone.
        let v = load.view(1000 + STALE_AFTER_MS + 1, STALE_AFTER_MS, None);
        assert_eq!((v.waiting, v.load, v.kv_cache, v.stale), (0, 2, 0.0, true));
    }

    #[test]
    fn a_new_endpoint_set_keeps_known_endpoints_and_their_state() {
        let pool = Pool::new(
            PoolKey::Service {
                namespace: "ns".into(),
                name: "s".into(),
                port: 80,
            },
            Arc::new(Metrics::new()),
        );
        let at = |ip: &str, name: &str| EndpointAddr {
            addr: format!("{ip}:80").parse().unwrap(),
            name: name.into(),
        };
        assert!(pool.set_endpoints(vec![at("10.0.0.1", "a"), at("10.0.0.2", "b")]));
        let a = Arc::clone(&pool.endpoints().list[0]);
        let _call = a.begin();
        assert!(!pool.set_endpoints(vec![at("10.0.0.2", "b"), at("10.0.0.1", "a")]));
        assert!(pool.set_endpoints(vec![at("10.0.0.1", "a")]));
        assert!(Arc::ptr_eq(&pool.endpoints().list[0], &a));
        assert_eq!(pool.ready_count(), 1);
        assert_eq!(a.load.inflight.load(Ordering::Relaxed), 1);
    }
}
