//! Routes from files instead of a cluster: Route and Secret manifests, MLflow AI Gateway configs
//! (served as they are) and LiteLLM proxy configs (imported). Every format becomes the same
//! `Route` and `Secret` objects, which go through the controller's own `reconcile`.
//!
//! `load` reads one file into objects, `source` watches the files and publishes the table,
//! `serve` wires it to the data plane, `import` prints manifests for a cluster.

pub mod convert;
pub mod import;
pub mod litellm;
pub mod load;
pub mod manifests;
pub mod mlflow;
pub mod serve;
pub mod source;
mod yaml;
