//! The callers' side of Kubernetes: ServiceAccount tokens checked with the TokenReview API, and
//! API-key consumers from labelled Secrets. The data plane sees only the `TokenReviewer` trait and
//! the published key digests.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::api;
use super::backoff::RetryBackoff;
use crate::access::{
    API_KEY_FIELD, API_KEY_LABEL, ApiKeys, Digest, Identity, ReviewError, SharedApiKeys,
    TokenReviewer, digest,
};
use crate::telemetry::metrics::{Metrics, OutcomeLabels};

/// Validates ServiceAccount tokens with the API server's TokenReview API.
pub struct KubeTokenReviewer {
    client: Client,
    audience: String,
    metrics: Arc<Metrics>,
}

impl KubeTokenReviewer {
    pub fn new(client: Client, audience: String, metrics: Arc<Metrics>) -> Self {
        KubeTokenReviewer {
            client,
            audience,
            metrics,
        }
    }

    async fn call(&self, token: &str) -> Result<Option<Identity>, ReviewError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let reviewed = api
            .create(&PostParams::default(), &review)
            .await
            // kube's error text never contains the request body, so the token stays out of it.
            .map_err(|e| ReviewError::Unavailable(e.to_string()))?;
        Ok(reviewed
            .status
            .and_then(|status| accepted_identity(status, &self.audience)))
    }
}

/// The identity a TokenReview vouches for. The answer must name the audience asked for: an API
/// server that ignores audiences (and so would accept a token minted for anyone) answers without
/// them, and that is not good enough.
fn accepted_identity(status: TokenReviewStatus, audience: &str) -> Option<Identity> {
    let audience_ok = status
        .audiences
        .as_ref()
        .is_some_and(|a| a.iter().any(|x| x == audience));
    if status.authenticated != Some(true) || !audience_ok {
        return None;
    }
    status
        .user
        .and_then(|u| u.username)
        .and_then(|name| Identity::from_service_account_username(&name))
}

impl TokenReviewer for KubeTokenReviewer {
    fn review<'a>(
        &'a self,
        token: &'a str,
    ) -> BoxFuture<'a, Result<Option<Identity>, ReviewError>> {
        Box::pin(async move {
            let result = self.call(token).await;
            let outcome = match &result {
                Ok(Some(_)) => "authenticated",
                Ok(None) => "rejected",
                Err(_) => "error",
            };
            self.metrics
                .token_reviews
                .get_or_create(&OutcomeLabels { outcome })
                .inc();
            result
        })
    }
}

type Key = (String, String);

/// The digest of a Secret's API key; `None` when it has no usable key.
fn key_digest(secret: &Secret) -> Option<Digest> {
    let value = secret.data.as_ref()?.get(API_KEY_FIELD)?;
    let trimmed = value.0.trim_ascii();
    (!trimmed.is_empty()).then(|| digest(trimmed))
}

fn publish(keys: &SharedApiKeys, current: &HashMap<Key, Digest>) {
    keys.store(Arc::new(ApiKeys::new(current.iter().map(
        |((namespace, name), d)| {
            (
                *d,
                Identity::Consumer {
                    namespace: namespace.clone(),
                    name: name.clone(),
                },
            )
        },
    ))));
}

/// Watches the labelled Secrets (the label selector keeps every other Secret out of this process)
/// and publishes the digests of their keys after every change, so a deleted or changed Secret
/// revokes its old key as soon as the watch event arrives.
pub async fn run_api_keys(
    client: Client,
    namespace: Option<String>,
    keys: SharedApiKeys,
    on_synced: impl Fn() + Send + 'static,
    max_backoff: Duration,
    shutdown: CancellationToken,
) {
    let secrets: Api<Secret> = api(&client, namespace.as_deref());
    let config = watcher::Config::default().labels(&format!("{API_KEY_LABEL}=true"));
    let mut events = watcher(secrets, config)
        .backoff(RetryBackoff::new(Duration::from_millis(250), max_backoff))
        .boxed();
    let mut current: HashMap<Key, Digest> = HashMap::new();
    let mut relisting: Option<HashMap<Key, Digest>> = None;
    let key_of = |s: &Secret| (s.namespace().unwrap_or_default(), s.name_any());
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            event = events.next() => match event {
                Some(event) => event,
                None => return,
            },
        };
        match event {
            Ok(watcher::Event::Init) => relisting = Some(HashMap::new()),
            Ok(watcher::Event::InitApply(s)) => {
                if let (Some(list), Some(d)) = (relisting.as_mut(), key_digest(&s)) {
                    list.insert(key_of(&s), d);
                }
            }
            Ok(watcher::Event::InitDone) => {
                current = relisting.take().unwrap_or_default();
                publish(&keys, &current);
                on_synced();
                info!(consumers = current.len(), "API-key consumers loaded");
            }
            Ok(watcher::Event::Apply(s)) => {
                match key_digest(&s) {
                    Some(d) => current.insert(key_of(&s), d),
                    None => current.remove(&key_of(&s)),
                };
                publish(&keys, &current);
                debug!(consumers = current.len(), "API-key consumers changed");
            }
            Ok(watcher::Event::Delete(s)) => {
                current.remove(&key_of(&s));
                publish(&keys, &current);
                debug!(consumers = current.len(), "API-key consumer removed");
            }
            Err(e) => {
                warn!(error = %e, "the API-key Secret watch failed; reconnecting and keeping the known keys");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::ByteString;

    #[test]
    fn keys_are_held_as_digests_of_the_trimmed_value() {
        let mut s = Secret::default();
        assert_eq!(key_digest(&s), None);
        s.data = Some(
            [(API_KEY_FIELD.to_string(), ByteString(b"sk-1\n".to_vec()))]
                .into_iter()
                .collect(),
        );
        assert_eq!(key_digest(&s), Some(digest(b"sk-1")));
        s.data = Some(
            [(API_KEY_FIELD.to_string(), ByteString(b" ".to_vec()))]
                .into_iter()
                .collect(),
        );
        assert_eq!(key_digest(&s), None);
    }

    #[test]
    fn a_review_must_name_the_audience_asked_for() {
        use k8s_openapi::api::authentication::v1::UserInfo;
        let status = |authenticated: bool, audiences: Option<Vec<&str>>| TokenReviewStatus {
            authenticated: Some(authenticated),
            audiences: audiences.map(|a| a.into_iter().map(String::from).collect()),
            user: Some(UserInfo {
                username: Some("system:serviceaccount:ns:sa".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let sa = Some(Identity::ServiceAccount {
            namespace: "ns".into(),
            name: "sa".into(),
        });
        assert_eq!(
            accepted_identity(status(true, Some(vec!["portcullis"])), "portcullis"),
            sa
        );
        assert_eq!(
            accepted_identity(status(true, None), "portcullis"),
            None,
            "no audiences"
        );
        assert_eq!(
            accepted_identity(status(true, Some(vec![])), "portcullis"),
            None
        );
        assert_eq!(
            accepted_identity(status(true, Some(vec!["other"])), "portcullis"),
            None
        );
        assert_eq!(
            accepted_identity(status(false, Some(vec!["portcullis"])), "portcullis"),
            None
        );
    }
}
