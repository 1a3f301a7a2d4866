//! Runtime trouble the data plane sees but only the operator can fix, told as Events on the
//! Route: a provider refusing a Route's own credential again and again; and guardrail audits and
//! blocks (`guardrails::audit`), at most one Event per check a minute.
//!
//! The data plane only counts (atomics in the table's backend health); this task reads the
//! published table every few seconds, so nothing flows back from the data plane to the controller.

use std::collections::HashSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::table::{RouteState, SharedTable};

/// Refusals in a row after which the Route's owner is told.
pub const REJECTIONS_BEFORE_EVENT: u32 = 3;
const SCAN_EVERY: Duration = Duration::from_secs(2);

/// The Route `namespace/name`, as an Event's subject.
fn route_reference(namespace: &str, name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some("portcullis.dev/v1alpha1".into()),
        kind: Some("Route".into()),
        name: Some(name.to_string()),
        namespace: Some(namespace.to_string()),
        ..Default::default()
    }
}

pub async fn run(
    table: SharedTable,
    recorder: Recorder,
    leader: watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    // Backends already reported, until their credential works again (or they go away).
    let mut told: HashSet<String> = HashSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(SCAN_EVERY) => {}
        }
        let snapshot = table.load_full();
        let mut failing = Vec::new();
        let mut still: HashSet<String> = HashSet::new();
        for entry in snapshot.routes() {
            let RouteState::Ready(backends) = &entry.state else {
                continue;
            };
            for b in &backends.list {
                if b.health.credential_rejections() < REJECTIONS_BEFORE_EVENT {
                    continue;
                }
                still.insert(b.key.clone());
                if !told.contains(&b.key) {
                    failing.push((
                        entry.namespace.clone(),
                        entry.qualified.clone(),
                        b.id.clone(),
                        b.key.clone(),
                    ));
                }
            }
        }
        told.retain(|k| still.contains(k));
        if !*leader.borrow() {
            continue;
        }
        for (namespace, qualified, backend, key) in failing {
            let name = qualified.rsplit('/').next().unwrap_or_default().to_string();
            warn!(route = %qualified, %backend, "the provider keeps rejecting this route's credential");
            let reference = route_reference(&namespace, &name);
            let event = Event {
                type_: EventType::Warning,
                reason: "CredentialRejected".into(),
                note: Some(format!(
                    "the {backend} provider rejected this route's credential {REJECTIONS_BEFORE_EVENT} times in a row; check the Secret it references"
                )),
                action: "Call".into(),
                secondary: None,
            };
            match recorder.publish(&event, &reference).await {
                Ok(()) => {
                    told.insert(key);
                }
                Err(e) => debug!(route = %qualified, error = %e, "publishing an Event failed"),
            }
        }
    }
}

/// Publishes the alerts of limits with `action: alert` as Events on their Route or Team. Each
/// crossing is detected by exactly one replica (see `Limiter::take_alerts`), so every replica
/// publishes its own, leader or not.
pub async fn run_limit_alerts(
    limiter: std::sync::Arc<crate::limits::Limiter>,
    recorder: Recorder,
    shutdown: CancellationToken,
) {
    publish_pending(recorder, shutdown, || {
        limiter
            .take_alerts()
            .into_iter()
            .map(|alert| {
                let reference = ObjectReference {
                    api_version: Some("portcullis.dev/v1alpha1".into()),
                    kind: Some(alert.kind.into()),
                    name: Some(alert.name.clone()),
                    namespace: alert.namespace.clone(),
                    ..Default::default()
                };
                let event = Event {
                    type_: EventType::Warning,
                    reason: if alert.percent >= 100 {
                        "LimitReached".into()
                    } else {
                        "LimitNearlyReached".into()
                    },
                    note: Some(alert.message),
                    action: "Admit".into(),
                    secondary: None,
                };
                (reference, event)
            })
            .collect()
    })
    .await
}

/// Publishes the guardrail audit and block Events the data plane noted (`guardrails::audit`,
/// already rate-limited). Every replica publishes its own calls' Events, leader or not.
pub async fn run_guardrail_events(
    metrics: std::sync::Arc<crate::telemetry::metrics::Metrics>,
    recorder: Recorder,
    shutdown: CancellationToken,
) {
    publish_pending(recorder, shutdown, || {
        metrics
            .guardrails
            .audits
            .take()
            .into_iter()
            .map(|audit| {
                let (namespace, name) = audit.route.split_once('/').unwrap_or_default();
                let blocked = audit.action == crate::api::GuardrailAction::Block;
                let event = Event {
                    type_: if blocked {
                        EventType::Warning
                    } else {
                        EventType::Normal
                    },
                    reason: if blocked {
                        "GuardrailBlocked".into()
                    } else {
                        "GuardrailAudit".into()
                    },
                    note: Some(audit.note()),
                    action: "Check".into(),
                    secondary: None,
                };
                (route_reference(namespace, name), event)
            })
            .collect()
    })
    .await
}

/// Every half second until shutdown: publishes the Events `pending` gives, with their subjects.
async fn publish_pending(
    recorder: Recorder,
    shutdown: CancellationToken,
    mut pending: impl FnMut() -> Vec<(ObjectReference, Event)>,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
        for (reference, event) in pending() {
            if let Err(e) = recorder.publish(&event, &reference).await {
                debug!(
                    name = reference.name.as_deref().unwrap_or_default(),
                    reason = %event.reason,
                    error = %e,
                    "publishing an Event failed"
                );
            }
        }
    }
}
