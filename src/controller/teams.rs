//! Teams: built into the routing table with the Routes, and their status (the limits in force).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::Store;
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::backoff::RetryBackoff;
use super::status::{apply_status, next_pass, shows_ready};
use crate::api::{Team, TeamStatus, condition};
use crate::guardrails::{Guard, Policies, team_policies};
use crate::table::RoutingTable;
use crate::teams::{TeamEntry, Teams};

/// The data plane's view of every Team, its GuardrailPolicies made into a guard for each route
/// of `table` (so a call picks one, never builds one).
pub fn build(teams: &[Arc<Team>], table: &RoutingTable, policies: &Policies) -> Teams {
    Teams::new(teams.iter().map(|t| {
        let guards = if t.spec.guardrails.is_empty() {
            Ok(HashMap::new())
        } else {
            team_policies(&t.spec.guardrails, policies).map(|list| {
                table
                    .routes()
                    .iter()
                    .filter_map(|r| {
                        let guard = Guard::new(&r.name, &r.qualified, list.clone())?;
                        Some((r.qualified.clone(), Arc::new(guard)))
                    })
                    .collect()
            })
        };
        (
            TeamEntry {
                guards,
                counter_keys: crate::limits::team_keys(&t.name_any()),
                name: t.name_any(),
                limits: t.spec.limits.clone(),
                routes: t
                    .spec
                    .routes
                    .as_ref()
                    .map(|r| r.iter().cloned().collect::<HashSet<_>>()),
            },
            t.spec.members.clone(),
        )
    }))
}

/// The Ready condition's (status, reason, message).
fn verdict(team: &Team, policies: &Policies) -> (&'static str, &'static str, String) {
    match team_policies(&team.spec.guardrails, policies) {
        Err(why) => (
            "False",
            "GuardrailNotReady",
            format!("{why}; members' calls are refused"),
        ),
        Ok(guards) => (
            "True",
            "Enforced",
            format!(
                "{} limit(s){} enforced across every route its {} member rule(s) call",
                team.spec.limits.len(),
                match guards.len() {
                    0 => String::new(),
                    n => format!(" and {n} guardrail policy(ies)"),
                },
                team.spec.members.len()
            ),
        ),
    }
}

fn desired(team: &Team, policies: &Policies, now: Timestamp) -> TeamStatus {
    let previous = team
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    let generation = team.metadata.generation;
    TeamStatus {
        observed_generation: generation,
        limits: team.spec.limits.clone(),
        routes: team.spec.routes.clone(),
        conditions: vec![condition(
            "Ready",
            verdict(team, policies),
            generation,
            previous,
            now,
        )],
    }
}

fn is_current(team: &Team, policies: &Policies) -> bool {
    team.status.as_ref().is_some_and(|s| {
        s.observed_generation == team.metadata.generation
            && s.limits == team.spec.limits
            && s.routes == team.spec.routes
            && shows_ready(&s.conditions, verdict(team, policies))
    })
}

/// Writes each Team's status when its spec changed, while this replica leads.
pub async fn run_writer(
    client: Client,
    teams: Store<Team>,
    mut changed: watch::Receiver<Option<Arc<Policies>>>,
    mut leader: watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    let api: Api<Team> = Api::all(client);
    let mut backoff = RetryBackoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        // None: not built yet (a Team's policies are not known missing before the first build).
        let policies = changed.borrow_and_update().clone();
        let leading = *leader.borrow_and_update();
        let mut failures = 0;
        if leading && let Some(policies) = policies {
            for team in teams.state().iter().filter(|t| !is_current(t, &policies)) {
                let status = desired(team, &policies, Timestamp::now());
                if !apply_status(&api, "Team", "", &team.name_any(), &status).await {
                    failures += 1;
                }
            }
        }
        if !next_pass(&mut backoff, failures, &mut changed, &mut leader, &shutdown).await {
            return;
        }
    }
}
