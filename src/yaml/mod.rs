//! YAML as Kubernetes tools read it. kubectl, Argo CD and Flux parse YAML 1.1 (go-yaml v2), where a
//! plain `on`, `no` or `y` is a boolean and `2024-10-21` a timestamp; serde_yaml reads and writes
//! YAML 1.2 and leaves them text. A `retry.on:` list once became `retry.true` in every cluster while
//! the tests, which went through serde_yaml, passed. Both directions therefore go through here.

mod read;
mod write;

pub use read::{ReadError, documents};
pub use write::to_string;
