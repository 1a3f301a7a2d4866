//! The data of the Secrets that Routes reference, and nothing else.
//!
//! Secrets are watched metadata-only (names and resourceVersions), so unrelated Secret contents are
//! never held in memory. A referenced Secret's data is read with one GET when its resourceVersion
//! changes; the last good copy is kept if that read fails.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

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

pub struct SecretCache {
    entries: HashMap<Key, (Option<String>, Arc<SecretData>)>,
    /// Referenced Secrets that do not match `--secret-selector`: never read.
    denied: HashSet<Key>,
    /// Deadline of one Secret read.
    timeout: Duration,
}

impl Default for SecretCache {
    fn default() -> Self {
        SecretCache {
            entries: HashMap::new(),
            denied: HashSet::new(),
            timeout: super::API_CALL_TIMEOUT,
        }
    }
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
        let timeout = self.timeout;
        let reads: Vec<_> = futures::stream::iter(stale)
            .map(|key| async move {
                let api: Api<Secret> = Api::namespaced(client.clone(), &key.0);
                let result = tokio::time::timeout(timeout, api.get_opt(&key.1))
                    .await
                    .unwrap_or_else(|_| Err(kube::Error::Service("timed out".into())));
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

#[cfg(test)]
mod tests {
    use kube::api::ObjectMeta;
    use kube::runtime::reflector::store::Writer;
    use kube::runtime::watcher;

    use super::*;

    /// A Secret read against an API server that accepts the connection and never answers ends at
    /// its deadline; the last good copy stays and the caller is told to retry.
    #[tokio::test]
    async fn a_hanging_secret_read_ends_at_its_deadline() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap();
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((tcp, _)) = silent.accept().await {
                open.push(tcp);
            }
        });
        let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        let client = Client::try_from(config).unwrap();
        let mut writer: Writer<PartialObjectMeta<Secret>> = Writer::default();
        let meta = PartialObjectMeta::<Secret> {
            metadata: ObjectMeta {
                name: Some("s".into()),
                namespace: Some("ns".into()),
                resource_version: Some("2".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        writer.apply_watcher_event(&watcher::Event::Apply(meta));
        let store = writer.as_reader();
        let mut cache = SecretCache {
            timeout: Duration::from_millis(300),
            ..Default::default()
        };
        let old = Arc::new(SecretData::from_iter([(
            "apiKey".to_string(),
            k8s_openapi::ByteString(b"old".to_vec()),
        )]));
        cache
            .entries
            .insert(("ns".into(), "s".into()), (Some("1".into()), old));
        let wanted = HashSet::from([("ns".to_string(), "s".to_string())]);
        let started = std::time::Instant::now();
        let refreshed = tokio::time::timeout(
            Duration::from_secs(10),
            cache.refresh(&client, wanted, &store, &OperatorPolicy::default()),
        )
        .await;
        assert_eq!(refreshed, Ok(false), "the read must fail, not hang");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            cache.secret("ns", "s").is_some(),
            "the last good copy stays"
        );
        held.abort();
    }
}
