//! The endpoints of self-hosted model pools, from the API server: InferencePools (their label
//! selector and target port) with the Pods they select, and Services' EndpointSlices. Only ready
//! endpoints count (a Pod Ready and not terminating, an EndpointSlice endpoint `ready`), and only
//! addresses the API server gives: never DNS.
//!
//! Like the route controller, every change recomputes each pool's set from the reflector stores,
//! and while the API server is away the stores, and so the last good sets, stay as they were.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, ListParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::backoff::RetryBackoff;
use crate::pools::{EndpointAddr, PoolKey, Pools};
use crate::telemetry::metrics::{Metrics, ResourceLabels};

/// The upstream InferencePool API this gateway reads (it does not own the CRD).
pub fn inference_pool_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("inference.networking.k8s.io", "v1", "InferencePool"),
        "inferencepools",
    )
}

/// The parts of an InferencePool's spec the gateway honours.
#[derive(Deserialize, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InferencePoolSpec {
    #[serde(default)]
    pub selector: Selector,
    #[serde(default)]
    pub target_ports: Vec<TargetPort>,
    #[serde(default)]
    pub endpoint_picker_ref: Option<PickerRef>,
}

/// `endpointPickerRef`: a Service (the only kind the API defines a port for) in the pool's
/// namespace, and what to do when it does not answer.
#[derive(Deserialize, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PickerRef {
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default)]
    pub port: Option<TargetPort>,
    /// `FailOpen` or `FailClose` (the API's default).
    #[serde(default)]
    pub failure_mode: Option<String>,
}

impl PickerRef {
    pub fn fail_open(&self) -> bool {
        self.failure_mode.as_deref() == Some("FailOpen")
    }
}

/// The address of a pool's endpoint picker: the first Ready Pod its Service selects, on the
/// Service port's target port (the API server's own addresses, as for the model servers).
pub fn picker_address<'a>(
    reference: &PickerRef,
    namespace: &str,
    services: impl IntoIterator<Item = &'a Service>,
    pods: impl IntoIterator<Item = &'a Pod> + Clone,
) -> Option<SocketAddr> {
    if reference.kind.as_deref().is_some_and(|k| k != "Service") {
        return None;
    }
    let port = reference.port.as_ref()?.number;
    let service = services.into_iter().find(|s| {
        s.metadata.namespace.as_deref() == Some(namespace) && s.name_any() == reference.name
    })?;
    let spec = service.spec.as_ref()?;
    let selector = spec.selector.as_ref().filter(|s| !s.is_empty())?;
    let target = spec
        .ports
        .iter()
        .flatten()
        .find(|p| p.port == i32::from(port))
        .and_then(|p| match &p.target_port {
            Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
            // A named port needs the container's ports, which this watch does not keep.
            Some(IntOrString::String(_)) => None,
            None => Some(port),
        })?;
    let mut ready: Vec<(String, IpAddr)> = pods
        .into_iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(namespace))
        .filter(|p| {
            let labels = p.labels();
            selector.iter().all(|(k, v)| labels.get(k) == Some(v))
        })
        .filter_map(|p| Some((p.name_any(), pod_ready(p)?)))
        .collect();
    ready.sort();
    ready.first().map(|(_, ip)| SocketAddr::new(*ip, target))
}

#[derive(Deserialize, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Selector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Deserialize, Debug, PartialEq)]
pub struct TargetPort {
    pub number: u16,
}

/// A Pod that takes calls: Ready, not being deleted, with an IP.
fn pod_ready(pod: &Pod) -> Option<IpAddr> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if !ready {
        return None;
    }
    status.pod_ip.as_deref()?.parse().ok()
}

/// The ready endpoints of an InferencePool: its namespace's Pods matching its selector, on its
/// first target port (the reference picker's choice for several). An empty selector selects
/// nothing (the CRD requires one; a pool of every Pod is never meant).
pub fn pool_endpoints<'a>(
    spec: &InferencePoolSpec,
    namespace: &str,
    pods: impl IntoIterator<Item = &'a Pod>,
) -> Vec<EndpointAddr> {
    let Some(port) = spec.target_ports.first().map(|p| p.number) else {
        return Vec::new();
    };
    if spec.selector.match_labels.is_empty() {
        return Vec::new();
    }
    pods.into_iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(namespace))
        .filter(|p| {
            let labels = p.labels();
            spec.selector
                .match_labels
                .iter()
                .all(|(k, v)| labels.get(k) == Some(v))
        })
        .filter_map(|p| {
            Some(EndpointAddr {
                addr: SocketAddr::new(pod_ready(p)?, port),
                name: p.name_any(),
            })
        })
        .collect()
}

/// The ready endpoints of a Service on `port`, from its EndpointSlices.
pub fn service_endpoints<'a>(
    namespace: &str,
    service: &str,
    port: u16,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> Vec<EndpointAddr> {
    let mut out = Vec::new();
    for slice in slices {
        if slice.metadata.namespace.as_deref() != Some(namespace)
            || slice
                .labels()
                .get("kubernetes.io/service-name")
                .map(String::as_str)
                != Some(service)
            || !matches!(slice.address_type.as_str(), "IPv4" | "IPv6")
        {
            continue;
        }
        let serves_port = slice
            .ports
            .iter()
            .flatten()
            .any(|p| p.port == Some(i32::from(port)));
        if !serves_port {
            continue;
        }
        for e in &slice.endpoints {
            let conditions = e.conditions.as_ref();
            // `ready` unset means ready (the API's rule); terminating endpoints are not.
            let ready = conditions.and_then(|c| c.ready).unwrap_or(true)
                && !conditions.and_then(|c| c.terminating).unwrap_or(false);
            if !ready {
                continue;
            }
            for a in &e.addresses {
                let Ok(ip) = a.parse::<IpAddr>() else {
                    continue;
                };
                let addr = SocketAddr::new(ip, port);
                let name = e
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"))
                    .and_then(|r| r.name.clone())
                    .unwrap_or_else(|| addr.to_string());
                out.push(EndpointAddr { addr, name });
            }
        }
    }
    out
}

/// Watches what pools need and keeps every wanted pool's endpoints and endpoint picker current;
/// a change of a ready count is told through `Pools::status_changed` (Routes' status shows it).
pub async fn run(
    client: Client,
    namespace: Option<String>,
    pools: Arc<Pools>,
    metrics: Arc<Metrics>,
    max_backoff: Duration,
    shutdown: CancellationToken,
) {
    let backoff = || RetryBackoff::new(Duration::from_millis(250), max_backoff);
    let resource = inference_pool_resource();
    let pool_api: Api<DynamicObject> = match &namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    // Without the Inference Extension's CRD (or the right to read it), `inferencePool` backends
    // have no endpoints and `service` backends still work.
    let pools_watched = match pool_api.list(&ListParams::default().limit(1)).await {
        Err(kube::Error::Api(s)) if matches!(s.code, 403 | 404) => {
            warn!(
                code = s.code,
                "InferencePools cannot be listed (the Inference Extension's CRD is not installed, or not allowed); inferencePool backends have no endpoints"
            );
            false
        }
        _ => true,
    };
    let pod_api: Api<Pod> = super::api(&client, namespace.as_deref());
    let slice_api: Api<EndpointSlice> = super::api(&client, namespace.as_deref());
    let pool_writer = reflector::store::Writer::<DynamicObject>::new(resource.clone());
    let pool_store_reader = pool_writer.as_reader();
    let (pod_store, pod_writer) = reflector::store::<Pod>();
    let (slice_store, slice_writer) = reflector::store::<EndpointSlice>();
    let service_api: Api<Service> = super::api(&client, namespace.as_deref());
    let (service_store, service_writer) = reflector::store::<Service>();
    // Services only name endpoint pickers: watched only when some InferencePool can name one.
    let service_events = if pools_watched {
        watcher(service_api, watcher::Config::default())
            .backoff(backoff())
            .modify(|s: &mut Service| {
                s.managed_fields_mut().clear();
                s.annotations_mut().clear();
                s.status = None;
            })
            .reflect(service_writer)
            .map(|e| ("services", e.map(|_| ())))
            .boxed()
    } else {
        futures::stream::pending().boxed()
    };
    let pool_events = if pools_watched {
        watcher(pool_api, watcher::Config::default())
            .backoff(backoff())
            .reflect(pool_writer)
            .map(|e| ("inferencepools", e.map(|_| ())))
            .boxed()
    } else {
        futures::stream::pending().boxed()
    };
    let pod_events = watcher(pod_api, watcher::Config::default())
        .backoff(backoff())
        .modify(|p: &mut Pod| {
            // Only labels, deletion, IP and conditions are read: the rest is not kept.
            p.managed_fields_mut().clear();
            p.annotations_mut().clear();
            p.spec = None;
        })
        .reflect(pod_writer)
        .map(|e| ("pods", e.map(|_| ())));
    let slice_events = watcher(
        slice_api,
        watcher::Config::default().labels("kubernetes.io/service-name"),
    )
    .backoff(backoff())
    .modify(|s: &mut EndpointSlice| s.managed_fields_mut().clear())
    .reflect(slice_writer)
    .map(|e| ("endpointslices", e.map(|_| ())));
    let mut events = futures::stream::select(
        futures::stream::select(pool_events, service_events),
        futures::stream::select(pod_events, slice_events),
    )
    .boxed();
    let mut wanted = pools.subscribe();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = wanted.changed() => if changed.is_err() { return },
            event = events.next() => match event {
                None => return,
                Some((_, Ok(()))) => {}
                Some((resource, Err(e))) => {
                    warn!(resource, error = %e, "watch failed; reconnecting with backoff, the pools keep their last endpoints");
                    metrics.watch_restarts.get_or_create(&ResourceLabels { resource }).inc();
                    continue;
                }
            },
        }
        // Gather a burst of events into one pass.
        tokio::time::sleep(Duration::from_millis(5)).await;
        while let Some(Some(_)) = futures::FutureExt::now_or_never(events.next()) {}
        let stores = Stores {
            pools: &pool_store_reader,
            pods: &pod_store,
            slices: &slice_store,
            services: &service_store,
        };
        if refresh(&pools, &stores) {
            pools.status_changed();
        }
    }
}

/// Recomputes every wanted pool's endpoints from the stores; true when a ready count changed.
/// A relist replaces a store whole when it completes, so it never shows a pool half-empty.
struct Stores<'a> {
    pools: &'a Store<DynamicObject>,
    pods: &'a Store<Pod>,
    slices: &'a Store<EndpointSlice>,
    services: &'a Store<Service>,
}

fn refresh(pools: &Pools, stores: &Stores<'_>) -> bool {
    let mut counts_changed = false;
    let pod_list = stores.pods.state();
    let slice_list = stores.slices.state();
    let service_list = stores.services.state();
    let pool_store = stores.pools;
    for pool in pools.all() {
        let before = pool.ready_count();
        let ready = match &pool.key {
            PoolKey::InferencePool { namespace, name } => {
                let object = pool_store
                    .state()
                    .into_iter()
                    .find(|o| o.namespace().as_deref() == Some(namespace) && o.name_any() == *name);
                match object {
                    None => Vec::new(),
                    Some(o) => {
                        let spec: InferencePoolSpec = o
                            .data
                            .get("spec")
                            .cloned()
                            .and_then(|s| serde_json::from_value(s).ok())
                            .unwrap_or_default();
                        let picker = spec.endpoint_picker_ref.as_ref().map(|r| {
                            let at = picker_address(
                                r,
                                namespace,
                                service_list.iter().map(|s| s.as_ref()),
                                pod_list.iter().map(|p| p.as_ref()),
                            );
                            (at, r.fail_open())
                        });
                        if let Some((None, _)) = picker {
                            debug!(pool = %pool.id, "the endpoint picker has no ready address");
                        }
                        if pool.set_picker(picker) {
                            info!(pool = %pool.id, picker = ?pool.picker().map(|p| p.client.as_ref().map(|c| c.addr)), "endpoint picker");
                            counts_changed = true;
                        }
                        pool_endpoints(&spec, namespace, pod_list.iter().map(|p| p.as_ref()))
                    }
                }
            }
            PoolKey::Service {
                namespace,
                name,
                port,
            } => service_endpoints(
                namespace,
                name,
                *port,
                slice_list.iter().map(|s| s.as_ref()),
            ),
        };
        if pool.set_endpoints(ready) {
            let after = pool.ready_count();
            debug!(pool = %pool.id, endpoints = after, "pool endpoints changed");
            if after != before {
                info!(pool = %pool.id, before, after, "pool ready endpoints");
                counts_changed = true;
            }
        }
    }
    counts_changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, ip: &str, ready: bool, labels: serde_json::Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "ns", "labels": labels},
            "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
        }))
        .unwrap()
    }

    #[test]
    fn an_inference_pool_is_its_ready_selected_pods_on_its_target_port() {
        let spec: InferencePoolSpec = serde_json::from_value(json!({
            "selector": {"matchLabels": {"app": "llama"}},
            "targetPorts": [{"number": 8000}],
            "endpointPickerRef": {"name": "epp", "port": {"number": 9002}}
        }))
        .unwrap();
        let mut gone = pod("c", "10.0.0.3", true, json!({"app": "llama"}));
        gone.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::from_second(1).unwrap(),
            ));
        let pods = [
            pod("a", "10.0.0.1", true, json!({"app": "llama"})),
            pod("b", "10.0.0.2", false, json!({"app": "llama"})),
            gone,
            pod("d", "10.0.0.4", true, json!({"app": "other"})),
        ];
        let got = pool_endpoints(&spec, "ns", &pods);
        assert_eq!(
            got,
            [EndpointAddr {
                addr: "10.0.0.1:8000".parse().unwrap(),
                name: "a".into()
            }]
        );
        assert!(pool_endpoints(&spec, "other", &pods).is_empty());
    }

    #[test]
    fn a_service_is_its_ready_slice_endpoints_on_the_port() {
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "s-1", "namespace": "ns", "labels": {"kubernetes.io/service-name": "vllm"}},
            "addressType": "IPv4",
            "ports": [{"port": 8000}],
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": "p1"}},
                {"addresses": ["10.0.0.2"], "conditions": {"ready": false}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": true, "terminating": true}},
                {"addresses": ["10.0.0.4"]}
            ]
        }))
        .unwrap();
        let got = service_endpoints("ns", "vllm", 8000, [&slice]);
        let names: Vec<_> = got.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["p1", "10.0.0.4:8000"]);
        assert!(service_endpoints("ns", "vllm", 9000, [&slice]).is_empty());
        assert!(service_endpoints("ns", "other", 8000, [&slice]).is_empty());
    }
}
