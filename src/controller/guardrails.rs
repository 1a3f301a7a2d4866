//! GuardrailPolicy status: `Ready`, or `InvalidSpec` naming the bad check. The policies are
//! compiled by the control loop (`guardrails::compile_all`, once per change) and their webhooks
//! and judges resolved with each table build (`guardrails::resolve_all`); this writes what that
//! found, while this replica leads.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::Store;
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::backoff::RetryBackoff;
use super::status::{apply_status, next_pass, shows_ready};
use crate::api::{GuardrailPolicy, GuardrailPolicyStatus, condition};
use crate::guardrails::Policies;

/// The Ready condition's (status, reason, message) for a policy as compiled.
fn verdict(policy: &GuardrailPolicy, compiled: &Policies) -> (&'static str, &'static str, String) {
    let key = (policy.namespace().unwrap_or_default(), policy.name_any());
    match compiled.get(&key) {
        Some(Ok(p)) => (
            "True",
            "Compiled",
            if p.response.is_empty() {
                format!("{} check(s) compiled", p.checks.len())
            } else {
                format!(
                    "{} check(s) compiled; streamed answers are held back {} bytes",
                    p.checks.len(),
                    p.response.hold
                )
            },
        ),
        Some(Err(why)) => ("False", "InvalidSpec", why.clone()),
        None => ("False", "Pending", "not compiled yet".into()),
    }
}

fn desired(policy: &GuardrailPolicy, compiled: &Policies, now: Timestamp) -> GuardrailPolicyStatus {
    let previous = policy
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    let generation = policy.metadata.generation;
    GuardrailPolicyStatus {
        observed_generation: generation,
        conditions: vec![condition(
            "Ready",
            verdict(policy, compiled),
            generation,
            previous,
            now,
        )],
    }
}

fn is_current(policy: &GuardrailPolicy, compiled: &Policies) -> bool {
    policy.status.as_ref().is_some_and(|s| {
        s.observed_generation == policy.metadata.generation
            && shows_ready(&s.conditions, verdict(policy, compiled))
    })
}

/// Writes each policy's status when its verdict changed, while this replica leads.
pub async fn run_writer(
    client: Client,
    policies: Store<GuardrailPolicy>,
    mut compiled: watch::Receiver<Arc<Policies>>,
    mut leader: watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    let mut backoff = RetryBackoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let current = Arc::clone(&compiled.borrow_and_update());
        let leading = *leader.borrow_and_update();
        let mut failures = 0;
        if leading {
            for policy in policies.state().iter().filter(|p| {
                // Not compiled yet: the next rebuild will say.
                current.contains_key(&(p.namespace().unwrap_or_default(), p.name_any()))
                    && !is_current(p, &current)
            }) {
                let status = desired(policy, &current, Timestamp::now());
                let (ns, name) = (policy.namespace().unwrap_or_default(), policy.name_any());
                let api: Api<GuardrailPolicy> = Api::namespaced(client.clone(), &ns);
                if !apply_status(&api, "GuardrailPolicy", &ns, &name, &status).await {
                    failures += 1;
                }
            }
        }
        if !next_pass(
            &mut backoff,
            failures,
            &mut compiled,
            &mut leader,
            &shutdown,
        )
        .await
        {
            return;
        }
    }
}
