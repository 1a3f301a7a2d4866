//! The `Team` resource: consumers grouped under limits and budgets that hold across every route.
//!
//! Cluster-scoped on purpose: a team names members from any namespace and caps what they may spend
//! everywhere, so creating one is a platform decision (RBAC on a cluster-scoped resource), never a
//! namespace owner's: a namespaced Team could enrol another namespace's ServiceAccount and hold it
//! to a budget of its own choosing.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::route::{AccessRule, Limit};

/// A group of consumers held to shared limits and budgets on every route they call.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "portcullis.dev",
    version = "v1alpha1",
    kind = "Team",
    plural = "teams",
    status = "TeamStatus",
    category = "portcullis",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TeamSpec {
    /// Who belongs to the team: ServiceAccounts, every ServiceAccount of a namespace, API-key
    /// consumers. A caller in several teams is held to the limits of each.
    #[schemars(length(min = 1, max = 256))]
    pub members: Vec<AccessRule>,
    /// Limits and budgets over the calls of all members on any route: `key: route` counts the team
    /// as a whole, `key: consumer` each member separately.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub limits: Vec<Limit>,
    /// The only routes (`namespace/name`) members may call; absent: any route that admits them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub routes: Option<Vec<String>>,
    /// GuardrailPolicies (`namespace/name`) whose checks every call of a member passes, after
    /// the route's own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub guardrails: Vec<String>,
}

/// What the gateway enforces for a Team (no live counters: see `portcullis spend`).
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TeamStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The limits and budgets in force.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<Limit>,
    /// The routes members are restricted to, when the team restricts them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routes: Option<Vec<String>>,
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}
