//! Route status: computed purely from the reconcile outcome, written with server-side apply only
//! when it differs from what the API server already has, with an Event on every Ready transition.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::backoff::RetryBackoff;
use super::reconcile::{RouteOutcome, ShortName};
use crate::api::{BackendStatus, Route, RouteStatus, condition, ready_condition};

/// The field manager of every status write; never shared with kubectl or GitOps tools.
pub const FIELD_MANAGER: &str = "portcullis-controller";

/// After one pass of a status writer with `failures`: waits for a change (of `changed` or of
/// leadership), or for the retry's backoff when some write failed; false when shutting down.
pub async fn next_pass<T>(
    backoff: &mut RetryBackoff,
    failures: usize,
    changed: &mut watch::Receiver<T>,
    leader: &mut watch::Receiver<bool>,
    shutdown: &CancellationToken,
) -> bool {
    let wait = (failures > 0).then(|| backoff.next_delay());
    if failures == 0 {
        backoff.reset();
    }
    let retry = async {
        match wait {
            Some(d) => tokio::time::sleep(d).await,
            None => futures::future::pending().await,
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => false,
        c = changed.changed() => c.is_ok(),
        c = leader.changed() => c.is_ok(),
        _ = retry => true,
    }
}

/// Whether `conditions` hold a Ready condition with this (status, reason, message).
pub fn shows_ready(
    conditions: &[Condition],
    (status, reason, message): (&str, &str, String),
) -> bool {
    conditions.iter().any(|c| {
        c.type_ == "Ready" && c.status == status && c.reason == reason && c.message == message
    })
}

/// Applies `status` to the `kind` object `namespace/name` (server-side, within the API call
/// deadline); false, logged, when that failed (an object deleted meanwhile is not a failure).
pub async fn apply_status<K>(
    api: &Api<K>,
    kind: &str,
    namespace: &str,
    name: &str,
    status: &impl serde::Serialize,
) -> bool
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let patch = json!({"apiVersion": "portcullis.dev/v1alpha1", "kind": kind, "status": status});
    let (params, patch) = (
        PatchParams::apply(FIELD_MANAGER).force(),
        Patch::Apply(&patch),
    );
    let write = api.patch_status(name, &params, &patch);
    match tokio::time::timeout(super::API_CALL_TIMEOUT, write).await {
        Ok(Ok(_)) => {
            debug!(kind, namespace, name, "wrote status");
            true
        }
        Ok(Err(kube::Error::Api(s))) if s.code == 404 => true,
        outcome => {
            let error = match outcome {
                Ok(Err(e)) => e.to_string(),
                _ => "timed out".into(),
            };
            warn!(kind, namespace, name, error, "writing status failed");
            false
        }
    }
}

/// The status `route` should have for its reconcile outcome.
pub fn desired_status(route: &Route, outcome: &RouteOutcome, now: Timestamp) -> RouteStatus {
    let generation = route.metadata.generation;
    let name = &outcome.served_as;
    let ready = &outcome.outcome;
    let mut conditions = vec![ready_condition(
        ready,
        generation,
        current(route, "Ready"),
        now,
    )];
    conditions.push(short_name_condition(
        outcome,
        generation,
        current(route, "ShortName"),
        now,
    ));
    // One backend says nothing that Ready does not: backends and Degraded only where there are several.
    let several = !route.spec.backends.is_empty();
    if several && !outcome.backends.is_empty() {
        conditions.push(degraded_condition(
            &outcome.backends,
            generation,
            current(route, "Degraded"),
            now,
        ));
    }
    let (provider, model) = route.spec.summary();
    RouteStatus {
        observed_generation: generation,
        url: Some(format!("/gateway/{name}/invocations")),
        provider: Some(provider),
        model: Some(model),
        limits: if ready.is_ready() {
            route.spec.limits.clone()
        } else {
            Vec::new()
        },
        // A pool's ready endpoint count is news even for a single `model`.
        backends: if several || outcome.backends.iter().any(|b| b.pool.is_some()) {
            outcome.backends.clone()
        } else {
            Vec::new()
        },
        conditions,
    }
}

/// `Degraded` (abnormal-true, as kstatus expects): True while some backend does not resolve.
fn degraded_condition(
    backends: &[BackendStatus],
    generation: Option<i64>,
    previous: Option<&Condition>,
    now: Timestamp,
) -> Condition {
    let failed: Vec<String> = backends
        .iter()
        .enumerate()
        .filter(|(_, b)| !b.resolved)
        .map(|(i, b)| {
            format!(
                "backend {i} ({}/{}): {}",
                b.provider,
                b.model,
                b.message.as_deref().unwrap_or_default()
            )
        })
        .collect();
    let state = if failed.is_empty() {
        (
            "False",
            "AllBackendsResolved",
            "every backend resolved".to_string(),
        )
    } else {
        ("True", "BackendsUnresolved", failed.join("; "))
    };
    condition("Degraded", state, generation, previous, now)
}

/// `ShortName`: whether callers may use the one-word name, or only `namespace/name`.
fn short_name_condition(
    outcome: &RouteOutcome,
    generation: Option<i64>,
    previous: Option<&Condition>,
    now: Timestamp,
) -> Condition {
    let (name, ns) = (&outcome.name, &outcome.namespace);
    let state = match &outcome.short_name {
        ShortName::Owned => (
            "True",
            "Owned",
            format!("served as {name:?} and {:?}", format!("{ns}/{name}")),
        ),
        ShortName::Taken { by } => (
            "False",
            "NameConflict",
            format!(
                "the name {name:?} is served by Route {by}, created earlier; this Route is served as {:?} only",
                format!("{ns}/{name}")
            ),
        ),
        ShortName::NotPublic => (
            "False",
            "NotPublic",
            format!(
                "namespace {ns} is not in the gateway's --public-namespaces; this Route is served as {:?} only",
                format!("{ns}/{name}")
            ),
        ),
    };
    condition("ShortName", state, generation, previous, now)
}

fn current<'a>(route: &'a Route, type_: &str) -> Option<&'a Condition> {
    route
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == type_))
}

/// Whether the fields this controller owns already hold `desired` (other managers' conditions are ignored).
pub fn status_is_current(route: &Route, desired: &RouteStatus) -> bool {
    let Some(have) = &route.status else {
        return false;
    };
    have.observed_generation == desired.observed_generation
        && have.url == desired.url
        && have.limits == desired.limits
        && have.backends == desired.backends
        && desired
            .conditions
            .iter()
            .all(|c| current(route, &c.type_) == Some(c))
}

/// Writes statuses for the latest outcomes; retries failures with backoff until they succeed or
/// newer outcomes arrive.
/// Only writes while `leader` is true.
pub async fn run_writer(
    client: Client,
    routes: Store<Route>,
    mut outcomes: watch::Receiver<Arc<Vec<RouteOutcome>>>,
    mut leader: watch::Receiver<bool>,
    recorder: Recorder,
    shutdown: CancellationToken,
) {
    let mut backoff = RetryBackoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let latest = outcomes.borrow_and_update().clone();
        let leading = *leader.borrow_and_update();
        let failures = if leading {
            write_all(&client, &routes, &latest, &recorder).await
        } else {
            0
        };
        let wait = if failures == 0 {
            backoff.reset();
            None
        } else {
            let delay = backoff.next_delay();
            warn!(
                failures,
                retry_in_ms = delay.as_millis() as u64,
                "some Route status writes failed; will retry"
            );
            Some(delay)
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            changed = outcomes.changed() => if changed.is_err() { return },
            changed = leader.changed() => if changed.is_err() { return },
            _ = sleep_or_forever(wait) => {}
        }
    }
}

async fn sleep_or_forever(wait: Option<Duration>) {
    match wait {
        Some(d) => tokio::time::sleep(d).await,
        None => futures::future::pending().await,
    }
}

async fn write_all(
    client: &Client,
    routes: &Store<Route>,
    outcomes: &[RouteOutcome],
    recorder: &Recorder,
) -> usize {
    let now = Timestamp::now();
    let writes: Vec<_> = outcomes
        .iter()
        .filter_map(|o| {
            let route = routes.get(&ObjectRef::new(&o.name).within(&o.namespace))?;
            let desired = desired_status(&route, o, now);
            (!status_is_current(&route, &desired)).then_some((route, desired))
        })
        .collect();
    futures::stream::iter(writes)
        .map(|(route, desired)| write_one(client, recorder, route, desired))
        .buffer_unordered(8)
        .filter(|ok| futures::future::ready(!ok))
        .count()
        .await
}

async fn write_one(
    client: &Client,
    recorder: &Recorder,
    route: Arc<Route>,
    desired: RouteStatus,
) -> bool {
    let namespace = route.metadata.namespace.clone().unwrap_or_default();
    let name = route.metadata.name.clone().unwrap_or_default();
    let api: Api<Route> = Api::namespaced(client.clone(), &namespace);
    let patch =
        json!({"apiVersion": "portcullis.dev/v1alpha1", "kind": "Route", "status": desired});
    let (params, patch) = (
        PatchParams::apply(FIELD_MANAGER).force(),
        Patch::Apply(&patch),
    );
    let write = api.patch_status(&name, &params, &patch);
    let written = tokio::time::timeout(super::API_CALL_TIMEOUT, write).await;
    if let Err(e) = written.unwrap_or_else(|_| Err(kube::Error::Service("timed out".into()))) {
        // A Route deleted since the outcome was computed is not a failure.
        if matches!(&e, kube::Error::Api(s) if s.code == 404) {
            return true;
        }
        warn!(route = %name, namespace = %namespace, error = %e, "writing Route status failed");
        return false;
    }
    debug!(route = %name, namespace = %namespace, "wrote Route status");
    for new in &desired.conditions {
        let old = current(&route, &new.type_);
        if old.map(|c| (&c.status, &c.reason)) == Some((&new.status, &new.reason)) {
            continue;
        }
        // Ready on every change; the others only when they change, or a name is refused.
        let worth_telling = new.type_ == "Ready" || old.is_some() || new.reason == "NameConflict";
        if !worth_telling {
            continue;
        }
        let healthy = match new.type_.as_str() {
            "Degraded" => new.status == "False",
            "ShortName" => new.reason != "NameConflict",
            _ => new.status == "True",
        };
        info!(route = %name, namespace = %namespace, condition = %new.type_, status = %new.status, reason = %new.reason, "Route condition changed");
        let event = Event {
            type_: if healthy {
                EventType::Normal
            } else {
                EventType::Warning
            },
            reason: new.reason.clone(),
            note: Some(new.message.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &route.object_ref(&())).await {
            debug!(route = %name, error = %e, "publishing an Event failed");
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ModelSpec, Outcome, Provider, Reason, RouteSpec, RouteType};

    fn oc(outcome: Outcome) -> RouteOutcome {
        RouteOutcome {
            namespace: "ns".into(),
            name: "chat".into(),
            served_as: "chat".into(),
            short_name: ShortName::Owned,
            outcome,
            backends: vec![],
        }
    }

    fn route(generation: i64) -> Route {
        let mut r = Route::new(
            "chat",
            RouteSpec::new(
                RouteType::Chat,
                ModelSpec {
                    provider: Provider::Openai,
                    name: "m".into(),
                    api_base: None,
                    secret_ref: None,
                    config: Default::default(),
                    inference_pool: None,
                    service: None,
                    saturation: None,
                },
            ),
        );
        r.metadata.namespace = Some("ns".into());
        r.metadata.generation = Some(generation);
        r
    }

    #[test]
    fn unchanged_outcome_needs_no_write() {
        let mut r = route(1);
        let t0 = Timestamp::from_second(10).unwrap();
        let first = desired_status(&r, &oc(Outcome::ready()), t0);
        assert!(!status_is_current(&r, &first));
        assert_eq!(first.url.as_deref(), Some("/gateway/chat/invocations"));
        r.status = Some(first);
        let later = desired_status(
            &r,
            &oc(Outcome::ready()),
            Timestamp::from_second(99).unwrap(),
        );
        assert!(status_is_current(&r, &later));
    }

    #[test]
    fn status_reports_the_enforced_limits_of_serving_routes() {
        use crate::api::{Limit, LimitKey, RenewalPeriod};
        let mut r = route(1);
        r.spec.limits = vec![Limit {
            renewal_period: RenewalPeriod::Minute,
            calls: Some(10),
            tokens: None,
            usd: None,
            on_exceed: None,
            action: None,
            key: LimitKey::Consumer,
        }];
        let t = Timestamp::from_second(10).unwrap();
        assert_eq!(
            desired_status(&r, &oc(Outcome::ready()), t).limits,
            r.spec.limits
        );
        let lost = Outcome::not_ready(Reason::SecretNotFound, "gone");
        assert!(desired_status(&r, &oc(lost.clone()), t).limits.is_empty());
        r.status = Some(desired_status(&r, &oc(lost.clone()), t));
        assert!(!status_is_current(
            &r,
            &desired_status(&r, &oc(Outcome::ready()), t)
        ));
    }

    #[test]
    fn new_generation_or_new_reason_needs_a_write() {
        let mut r = route(1);
        r.status = Some(desired_status(
            &r,
            &oc(Outcome::ready()),
            Timestamp::from_second(10).unwrap(),
        ));
        r.metadata.generation = Some(2);
        assert!(!status_is_current(
            &r,
            &desired_status(
                &r,
                &oc(Outcome::ready()),
                Timestamp::from_second(11).unwrap()
            )
        ));
        r.metadata.generation = Some(1);
        let lost = Outcome::not_ready(Reason::SecretNotFound, "gone");
        assert!(!status_is_current(
            &r,
            &desired_status(&r, &oc(lost.clone()), Timestamp::from_second(11).unwrap())
        ));
    }
}
