//! How many replicas serve together: the ready endpoints of the gateway's own Service. Each replica
//! takes 1/N of every limit while it counts alone (no shared store, or the store is unreachable).

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::backoff::RetryBackoff;

/// Ready endpoints across the Service's slices, each pod counted once (dual-stack Services have a
/// slice per address family).
pub fn ready_endpoints(slices: &[std::sync::Arc<EndpointSlice>]) -> u32 {
    let pods: BTreeSet<String> = slices
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .filter_map(|e| {
            e.target_ref
                .as_ref()
                .and_then(|r| r.name.clone())
                .or_else(|| e.addresses.first().cloned())
        })
        .collect();
    u32::try_from(pods.len()).unwrap_or(u32::MAX)
}

/// Watches the EndpointSlices of `service` and calls `on_change` with the replica count (at least 1).
pub async fn run(
    client: Client,
    namespace: String,
    service: String,
    on_change: impl Fn(u32) + Send + 'static,
    max_backoff: Duration,
    shutdown: CancellationToken,
) {
    let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
    let config =
        watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
    let (store, writer): (Store<EndpointSlice>, _) = reflector::store();
    let mut events = watcher(api, config)
        .backoff(RetryBackoff::new(Duration::from_millis(250), max_backoff))
        .reflect(writer)
        .boxed();
    let mut current = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            event = events.next() => match event {
                None => return,
                Some(Err(e)) => {
                    warn!(error = %e, service = %service, "the EndpointSlice watch failed; keeping the last replica count");
                }
                Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => {}
                Some(Ok(_)) => {
                    let n = ready_endpoints(&store.state()).max(1);
                    if n != current {
                        current = n;
                        on_change(n);
                        info!(replicas = n, service = %service, "replica count for local limit shares");
                    }
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ObjectReference;
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};
    use std::sync::Arc;

    fn endpoint(pod: &str, ready: Option<bool>) -> Endpoint {
        Endpoint {
            addresses: vec![format!("10.0.0.{}", pod.len())],
            conditions: Some(EndpointConditions {
                ready,
                ..Default::default()
            }),
            target_ref: Some(ObjectReference {
                name: Some(pod.into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn counts_ready_pods_once() {
        let slice = |eps: Vec<Endpoint>| {
            Arc::new(EndpointSlice {
                endpoints: eps,
                ..Default::default()
            })
        };
        let slices = [
            slice(vec![
                endpoint("a", Some(true)),
                endpoint("bb", None),
                endpoint("ccc", Some(false)),
            ]),
            // The same pods again, in the other address family's slice.
            slice(vec![endpoint("a", Some(true)), endpoint("bb", Some(true))]),
        ];
        assert_eq!(ready_endpoints(&slices), 2);
        assert_eq!(ready_endpoints(&[]), 0);
    }
}
