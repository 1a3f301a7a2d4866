//! Portcullis: a Kubernetes-native LLM gateway.
//!
//! `api` (the Route resource) -> `controller` (watches, reconcile, status) -> `table` (the routing
//! snapshot, with `traffic`: backend selection and health) <- `dataplane` (the HTTP surfaces) -> `providers` (one adapter per LLM provider).

pub mod access;
pub mod api;
pub mod cache;
pub mod controller;
pub mod cost;
pub mod dataplane;
pub mod files;
pub mod guardrails;
pub mod limits;
pub mod llm;
pub mod mcp;
pub mod pools;
pub mod providers;
pub mod server;
pub mod spend;
pub mod store;
pub mod table;
pub mod teams;
pub mod telemetry;
pub mod traffic;
pub mod yaml;

/// The CRD manifest as checked in under `crds/`.
pub fn crd_yaml() -> Result<String, serde_json::Error> {
    use kube::CustomResourceExt;
    yaml::to_string(&api::Route::crd())
}

/// The Team CRD manifest (`crds/team.yaml`).
pub fn team_crd_yaml() -> Result<String, serde_json::Error> {
    use kube::CustomResourceExt;
    yaml::to_string(&api::Team::crd())
}

/// The GuardrailPolicy CRD manifest (`crds/guardrailpolicy.yaml`).
pub fn guardrail_crd_yaml() -> Result<String, serde_json::Error> {
    use kube::CustomResourceExt;
    yaml::to_string(&api::GuardrailPolicy::crd())
}

/// The McpServer CRD manifest (`crds/mcpserver.yaml`).
pub fn mcp_crd_yaml() -> Result<String, serde_json::Error> {
    use kube::CustomResourceExt;
    yaml::to_string(&api::McpServer::crd())
}

#[cfg(test)]
mod tests {
    /// The checked-in CRD must match the Rust types; `make crds` regenerates it.
    #[test]
    fn checked_in_crd_is_current() {
        let generated = super::crd_yaml().unwrap();
        for (path, checked_in) in [
            ("crds/route.yaml", include_str!("../crds/route.yaml")),
            (
                "deploy/base/crd.yaml",
                include_str!("../deploy/base/crd.yaml"),
            ),
        ] {
            assert!(
                generated == checked_in,
                "{path} is stale: run `make crds` and commit the result"
            );
        }
        let generated = super::mcp_crd_yaml().unwrap();
        for (path, checked_in) in [
            (
                "crds/mcpserver.yaml",
                include_str!("../crds/mcpserver.yaml"),
            ),
            (
                "deploy/base/crd-mcpserver.yaml",
                include_str!("../deploy/base/crd-mcpserver.yaml"),
            ),
        ] {
            assert!(
                generated == checked_in,
                "{path} is stale: run `make crds` and commit the result"
            );
        }
        let generated = super::team_crd_yaml().unwrap();
        for (path, checked_in) in [
            ("crds/team.yaml", include_str!("../crds/team.yaml")),
            (
                "deploy/base/crd-team.yaml",
                include_str!("../deploy/base/crd-team.yaml"),
            ),
        ] {
            assert!(
                generated == checked_in,
                "{path} is stale: run `make crds` and commit the result"
            );
        }
        let generated = super::guardrail_crd_yaml().unwrap();
        for (path, checked_in) in [
            (
                "crds/guardrailpolicy.yaml",
                include_str!("../crds/guardrailpolicy.yaml"),
            ),
            (
                "deploy/base/crd-guardrailpolicy.yaml",
                include_str!("../deploy/base/crd-guardrailpolicy.yaml"),
            ),
        ] {
            assert!(
                generated == checked_in,
                "{path} is stale: run `make crds` and commit the result"
            );
        }
    }
}
