//! The data of the Secrets that Routes reference, and nothing else.
//!
//! Secrets are watched metadata-only (names and resourceVersions), so unrelated Secret contents are
//! never held in memory. A referenced Secret's data is read with one GET when its resourceVersion
//! changes; the last good copy is kept if that read fails.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client};
use tracing::warn;

use super::policy::OperatorPolicy;
use super::reconcile::{SecretData, SecretLookup};
use kube::ResourceExt;

type Key = (String, String);

#[derive(Default)]
pub struct SecretCache {
    entries: HashMap<Key, (Option<String>, Arc<SecretData>)>,
    /// Referenced Secrets that do not match `--secret-selector`: never read.
    denied: HashSet<Key>,
}

impl SecretLookup for SecretCache {
    fn secret(&self, namespace: &str, name: &str) -> Option<&SecretData> {
        self.entries
            .get(&(namespace.to_string(), name.to_string()))
            .map(|(_, d)| d.as_ref())
    }

    fn denied(&self, namespace: &str, name: &str) -> bool {
        self.denied
            .contains(&(namespace.to_string(), name.to_string()))
    }
}

impl SecretCache {
    /// Brings the cache in line with `wanted` and the metadata store. Returns false if some read
    /// failed (the old copy, if any, stays in use and the caller retries later).
    pub async fn refresh(
        &mut self,
        client: &Client,
        wanted: HashSet<Key>,
        meta: &Store<PartialObjectMeta<Secret>>,
        policy: &OperatorPolicy,
    ) -> bool {
        self.entries.retain(|k, _| wanted.contains(k));
        self.denied.clear();
        let mut stale = Vec::new();
        for key in wanted {
            match meta.get(&ObjectRef::new(&key.1).within(&key.0)) {
                None => {
                    self.entries.remove(&key);
                }
                Some(m) if !policy.secret_allowed(m.labels()) => {
                    self.entries.remove(&key);
                    self.denied.insert(key);
                }
                Some(m) => {
                    let rv = m.metadata.resource_version.clone();
                    if self.entries.get(&key).is_none_or(|(have, _)| *have != rv) {
                        stale.push(key);
                    }
                }
            }
        }
        let reads: Vec<_> = futures::stream::iter(stale)
            .map(|key| async move {
                let api: Api<Secret> = Api::namespaced(client.clone(), &key.0);
                let result = api.get_opt(&key.1).await;
                (key, result)
            })
            .buffer_unordered(16)
            .collect()
            .await;
        let mut ok = true;
        for (key, result) in reads {
            match result {
                Ok(Some(secret)) => {
                    let rv = secret.metadata.resource_version;
                    let data = secret.data.unwrap_or_default().into_iter().collect();
                    self.entries.insert(key, (rv, Arc::new(data)));
                }
                Ok(None) => {
                    self.entries.remove(&key);
                }
                Err(e) => {
                    warn!(namespace = %key.0, secret = %key.1, error = %e, "reading a referenced Secret failed; keeping the last good copy");
                    ok = false;
                }
            }
        }
        ok
    }
}
