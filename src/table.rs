//! The routing table: an immutable snapshot from public route name to a ready-to-serve entry.
//!
//! The controller builds a whole new table and publishes it with one atomic swap; the data plane
//! reads the current snapshot without locks. An entry is shared by `Arc`, so a request in flight
//! keeps using the credential it started with while a rotation publishes the next one.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::api::{AccessRule, Limit, LimitKey, Provider, Reason, RenewalPeriod, RouteType};
use crate::providers::{ProviderAdapter, Target};

/// The table shared by the controller (writer) and the data plane (readers).
pub type SharedTable = Arc<ArcSwap<RoutingTable>>;

#[derive(Default)]
pub struct RoutingTable {
    by_name: HashMap<String, Arc<RouteEntry>>,
    /// Sorted by name, for listings and paging.
    sorted: Vec<Arc<RouteEntry>>,
}

/// A Route that owns its public name (it won any name conflict).
pub struct RouteEntry {
    pub name: String,
    pub namespace: String,
    pub route_type: RouteType,
    pub provider: Provider,
    pub model: String,
    pub limits: Vec<Limit>,
    /// Who may call; `None`: the gateway-wide default.
    pub access: Option<Vec<AccessRule>>,
    pub state: RouteState,
}

/// The `limit` of a route on the MLflow listings: its first calls-limit.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MlflowLimit {
    pub calls: u64,
    pub key: LimitKey,
    pub renewal_period: RenewalPeriod,
}

impl RouteEntry {
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
    Ready(Arc<Upstream>),
    /// The Route exists but cannot serve; requests get 503 with this reason.
    NotReady {
        reason: Reason,
        message: String,
    },
}

pub struct Upstream {
    pub adapter: &'static dyn ProviderAdapter,
    pub target: Target,
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
        let by_name = sorted
            .iter()
            .map(|e| (e.name.clone(), Arc::clone(e)))
            .collect();
        RoutingTable { by_name, sorted }
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
}

#[cfg(test)]
impl RouteEntry {
    /// A chat route in namespace "ns" that does not serve; tests override the fields they need.
    pub fn not_ready(name: &str) -> RouteEntry {
        RouteEntry {
            name: name.into(),
            namespace: "ns".into(),
            route_type: RouteType::Chat,
            provider: Provider::Openai,
            model: "m".into(),
            limits: vec![],
            access: None,
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
            t.routes()
                .iter()
                .map(|e| e.name.as_str())
                .collect::<Vec<_>>(),
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
