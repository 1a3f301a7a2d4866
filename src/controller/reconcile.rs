//! Pure reconciliation: from the desired state (all Routes, the Secrets they reference) to a routing
//! table and one outcome per Route. No I/O here, so every rule is unit-tested.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::ByteString;
use kube::ResourceExt;

use crate::api::{Outcome, Reason, Route};
use crate::providers::{API_KEY, CredentialKeys, Credentials, SecretValue, Target, adapter_for};
use crate::table::{RouteEntry, RouteState, RoutingTable, Upstream};

/// Secret data by key, as read from the API.
pub type SecretData = BTreeMap<String, ByteString>;

/// Where reconcile finds Secret contents; `None` means the Secret does not exist.
pub trait SecretLookup {
    fn secret(&self, namespace: &str, name: &str) -> Option<&SecretData>;
}

impl SecretLookup for HashMap<(String, String), Arc<SecretData>> {
    fn secret(&self, namespace: &str, name: &str) -> Option<&SecretData> {
        self.get(&(namespace.to_string(), name.to_string()))
            .map(|d| d.as_ref())
    }
}

/// One Route's result, keyed like the Route itself.
#[derive(Clone, Debug, PartialEq)]
pub struct RouteOutcome {
    pub namespace: String,
    pub name: String,
    pub outcome: Outcome,
}

pub struct Reconciled {
    pub table: RoutingTable,
    /// One per Route, sorted by namespace then name.
    pub outcomes: Vec<RouteOutcome>,
}

/// Builds the table from every Route and the Secrets they reference.
///
/// Routes sharing a public name: the oldest (then lexical `namespace/name`) serves and the others
/// report `NameConflict`, so deleting the winner lets the next one take over on the next build.
pub fn reconcile(routes: &[Arc<Route>], secrets: &impl SecretLookup) -> Reconciled {
    let mut by_name: BTreeMap<&str, Vec<&Arc<Route>>> = BTreeMap::new();
    for route in routes {
        by_name
            .entry(route.metadata.name.as_deref().unwrap_or_default())
            .or_default()
            .push(route);
    }

    let mut entries = Vec::with_capacity(by_name.len());
    let mut outcomes = Vec::with_capacity(routes.len());
    for (name, mut claimants) in by_name {
        claimants.sort_by(|a, b| {
            let key = |r: &Route| {
                (
                    r.metadata.creation_timestamp.clone().map(|t| t.0),
                    r.namespace().unwrap_or_default(),
                )
            };
            // Missing timestamps (never from a real API server) sort last.
            match (key(a), key(b)) {
                ((Some(ta), na), (Some(tb), nb)) => (ta, na).cmp(&(tb, nb)),
                ((None, _), (Some(_), _)) => std::cmp::Ordering::Greater,
                ((Some(_), _), (None, _)) => std::cmp::Ordering::Less,
                ((None, na), (None, nb)) => na.cmp(&nb),
            }
        });
        let winner = claimants[0];
        let winner_ns = winner.namespace().unwrap_or_default();
        let state = resolve(winner, secrets);
        let outcome = match &state {
            RouteState::Ready(_) => Outcome::ready(),
            RouteState::NotReady { reason, message } => {
                Outcome::not_ready(*reason, message.clone())
            }
        };
        outcomes.push(RouteOutcome {
            namespace: winner_ns.clone(),
            name: name.to_string(),
            outcome,
        });
        for loser in &claimants[1..] {
            outcomes.push(RouteOutcome {
                namespace: loser.namespace().unwrap_or_default(),
                name: name.to_string(),
                outcome: Outcome::not_ready(
                    Reason::NameConflict,
                    format!("route name {name:?} is already served by Route {winner_ns}/{name}, created earlier"),
                ),
            });
        }
        entries.push(RouteEntry {
            name: name.to_string(),
            namespace: winner_ns,
            route_type: winner.spec.route_type,
            provider: winner.spec.model.provider,
            model: winner.spec.model.name.clone(),
            limits: winner.spec.limits.clone(),
            access: winner.spec.access.clone(),
            state,
        });
    }
    outcomes.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Reconciled {
        table: RoutingTable::new(entries),
        outcomes,
    }
}

fn resolve(route: &Route, secrets: &impl SecretLookup) -> RouteState {
    match try_resolve(route, secrets) {
        Ok(upstream) => RouteState::Ready(Arc::new(upstream)),
        Err(Outcome { reason, message }) => RouteState::NotReady { reason, message },
    }
}

fn try_resolve(route: &Route, secrets: &impl SecretLookup) -> Result<Upstream, Outcome> {
    let spec = &route.spec;
    let provider = spec.model.provider;
    let adapter = adapter_for(provider).ok_or_else(|| {
        Outcome::not_ready(
            Reason::ProviderUnsupported,
            format!("provider {provider} is not supported by this gateway version"),
        )
    })?;
    if !adapter.route_types().contains(&spec.route_type) {
        let supported: Vec<&str> = adapter.route_types().iter().map(|t| t.as_str()).collect();
        return Err(Outcome::not_ready(
            Reason::ProviderUnsupported,
            format!(
                "provider {provider} cannot serve {}; it serves {}",
                spec.route_type,
                supported.join(", ")
            ),
        ));
    }
    let api_base = spec
        .model
        .api_base
        .as_deref()
        .or(adapter.default_api_base())
        .ok_or_else(|| {
            Outcome::not_ready(
                Reason::InvalidSpec,
                format!("provider {provider} needs spec.model.apiBase"),
            )
        })?
        .trim_end_matches('/')
        .to_string();

    let namespace = route.namespace().unwrap_or_default();
    let credentials = resolve_credentials(route, &namespace, adapter.credential_keys(), secrets)?;
    Ok(Upstream {
        adapter,
        target: Target {
            model: spec.model.name.clone(),
            api_base,
            credentials,
            config: spec.model.config.clone(),
        },
    })
}

fn resolve_credentials(
    route: &Route,
    namespace: &str,
    keys: CredentialKeys,
    secrets: &impl SecretLookup,
) -> Result<Credentials, Outcome> {
    let provider = route.spec.model.provider;
    let mut credentials = Credentials::default();
    let Some(secret_ref) = &route.spec.model.secret_ref else {
        return match keys {
            CredentialKeys::ApiKey { required: false } => Ok(credentials),
            _ => Err(Outcome::not_ready(
                Reason::InvalidSpec,
                format!("provider {provider} needs spec.model.secretRef"),
            )),
        };
    };
    let data = secrets.secret(namespace, &secret_ref.name).ok_or_else(|| {
        Outcome::not_ready(
            Reason::SecretNotFound,
            format!("Secret {namespace}/{} not found", secret_ref.name),
        )
    })?;
    let read = |key: &str| -> Result<Option<SecretValue>, Outcome> {
        match data.get(key) {
            None => Ok(None),
            Some(bytes) => match std::str::from_utf8(&bytes.0).map(str::trim) {
                Ok(v) if !v.is_empty() => Ok(Some(SecretValue::new(v))),
                _ => Err(Outcome::not_ready(
                    Reason::SecretKeyMissing,
                    format!(
                        "key {key:?} of Secret {namespace}/{} is empty or not UTF-8 text",
                        secret_ref.name
                    ),
                )),
            },
        }
    };
    let missing = |key: &str| {
        Outcome::not_ready(
            Reason::SecretKeyMissing,
            format!("Secret {namespace}/{} has no key {key:?}", secret_ref.name),
        )
    };
    match keys {
        CredentialKeys::ApiKey { .. } => {
            let value = read(&secret_ref.key)?.ok_or_else(|| missing(&secret_ref.key))?;
            credentials.insert(API_KEY, value);
        }
        CredentialKeys::ApiKeyOr { alternatives } => {
            if let Some(value) = read(&secret_ref.key)? {
                credentials.insert(API_KEY, value);
            }
            for key in alternatives {
                if let Some(value) = read(key)? {
                    credentials.insert(*key, value);
                }
            }
            if credentials == Credentials::default() {
                return Err(missing(&secret_ref.key));
            }
        }
        CredentialKeys::Named { required, optional } => {
            for key in required {
                credentials.insert(*key, read(key)?.ok_or_else(|| missing(key))?);
            }
            for key in optional {
                if let Some(value) = read(key)? {
                    credentials.insert(*key, value);
                }
            }
        }
    }
    Ok(credentials)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ModelSpec, Provider, RouteSpec, RouteType, SecretKeyRef};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    fn route(ns: &str, name: &str, created: i64, provider: Provider) -> Arc<Route> {
        let mut r = Route::new(
            name,
            RouteSpec {
                route_type: RouteType::Chat,
                model: ModelSpec {
                    provider,
                    name: "gpt-4o-mini".into(),
                    api_base: None,
                    secret_ref: Some(SecretKeyRef {
                        name: "openai".into(),
                        key: "apiKey".into(),
                    }),
                    config: Default::default(),
                },
                limits: vec![],
                access: None,
            },
        );
        r.metadata.namespace = Some(ns.into());
        r.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
        Arc::new(r)
    }

    fn secrets(entries: &[(&str, &str, &str, &str)]) -> HashMap<(String, String), Arc<SecretData>> {
        let mut map: HashMap<(String, String), SecretData> = HashMap::new();
        for (ns, name, key, value) in entries {
            map.entry((ns.to_string(), name.to_string()))
                .or_default()
                .insert(key.to_string(), ByteString(value.as_bytes().to_vec()));
        }
        map.into_iter().map(|(k, v)| (k, Arc::new(v))).collect()
    }

    fn outcome_of<'a>(r: &'a Reconciled, ns: &str) -> &'a Outcome {
        &r.outcomes
            .iter()
            .find(|o| o.namespace == ns)
            .unwrap()
            .outcome
    }

    #[test]
    fn resolved_route_carries_key_model_and_default_base() {
        let r = reconcile(
            &[route("a", "chat", 1, Provider::Openai)],
            &secrets(&[("a", "openai", "apiKey", "sk-1\n")]),
        );
        assert_eq!(outcome_of(&r, "a").reason, Reason::Resolved);
        let RouteState::Ready(up) = &r.table.get("chat").unwrap().state else {
            panic!("not ready")
        };
        assert_eq!(up.target.credentials.get(API_KEY), Some("sk-1"));
        assert_eq!(up.target.api_base, "https://api.openai.com/v1");
        assert_eq!(up.target.model, "gpt-4o-mini");
    }

    #[test]
    fn missing_secret_and_missing_key() {
        let r = reconcile(&[route("a", "chat", 1, Provider::Openai)], &secrets(&[]));
        assert_eq!(outcome_of(&r, "a").reason, Reason::SecretNotFound);
        assert!(matches!(
            r.table.get("chat").unwrap().state,
            RouteState::NotReady {
                reason: Reason::SecretNotFound,
                ..
            }
        ));

        let r = reconcile(
            &[route("a", "chat", 1, Provider::Openai)],
            &secrets(&[("a", "openai", "other", "x")]),
        );
        let o = outcome_of(&r, "a");
        assert_eq!(o.reason, Reason::SecretKeyMissing);
        assert_eq!(o.message, "Secret a/openai has no key \"apiKey\"");
    }

    #[test]
    fn secret_in_another_namespace_does_not_count() {
        let r = reconcile(
            &[route("a", "chat", 1, Provider::Openai)],
            &secrets(&[("b", "openai", "apiKey", "sk")]),
        );
        assert_eq!(outcome_of(&r, "a").reason, Reason::SecretNotFound);
    }

    #[test]
    fn oldest_route_wins_a_name_conflict_then_lexical_namespace() {
        let s = secrets(&[
            ("a", "openai", "apiKey", "k"),
            ("b", "openai", "apiKey", "k"),
            ("c", "openai", "apiKey", "k"),
        ]);
        let routes = [
            route("b", "chat", 5, Provider::Openai),
            route("c", "chat", 5, Provider::Openai),
            route("a", "chat", 9, Provider::Openai),
        ];
        let r = reconcile(&routes, &s);
        assert_eq!(r.table.get("chat").unwrap().namespace, "b");
        assert_eq!(outcome_of(&r, "b").reason, Reason::Resolved);
        assert_eq!(outcome_of(&r, "c").reason, Reason::NameConflict);
        assert_eq!(outcome_of(&r, "a").reason, Reason::NameConflict);
        assert!(outcome_of(&r, "a").message.contains("b/chat"));

        let r = reconcile(&routes[1..], &s);
        assert_eq!(r.table.get("chat").unwrap().namespace, "c");
    }

    #[test]
    fn unsupported_route_type_does_not_affect_others() {
        let s = secrets(&[("a", "openai", "apiKey", "k")]);
        let mut bad = (*route("a", "bad", 1, Provider::Anthropic)).clone();
        bad.spec.route_type = RouteType::Embeddings;
        let r = reconcile(
            &[route("a", "good", 1, Provider::Openai), Arc::new(bad)],
            &s,
        );
        assert!(matches!(
            r.table.get("good").unwrap().state,
            RouteState::Ready(_)
        ));
        let bad = r.outcomes.iter().find(|o| o.name == "bad").unwrap();
        assert_eq!(bad.outcome.reason, Reason::ProviderUnsupported);
        assert_eq!(
            bad.outcome.message,
            "provider anthropic cannot serve llm/v1/embeddings; it serves llm/v1/chat"
        );
    }

    #[test]
    fn azure_accepts_an_entra_token_instead_of_a_key() {
        let s = secrets(&[("a", "openai", "azureAdToken", "eyJ0")]);
        let mut azure = (*route("a", "az", 1, Provider::AzureOpenai)).clone();
        azure.spec.model.api_base = Some("https://res.openai.azure.com".into());
        let r = reconcile(&[Arc::new(azure.clone())], &s);
        let RouteState::Ready(up) = &r.table.get("az").unwrap().state else {
            panic!("not ready: {:?}", r.outcomes)
        };
        assert_eq!(up.target.credentials.get("azureAdToken"), Some("eyJ0"));
        assert_eq!(up.target.credentials.get(API_KEY), None);
        let empty = secrets(&[("a", "openai", "other", "x")]);
        let r = reconcile(&[Arc::new(azure)], &empty);
        assert_eq!(r.outcomes[0].outcome.reason, Reason::SecretKeyMissing);
    }

    #[test]
    fn credential_values_never_appear_in_outcomes() {
        let s = secrets(&[("a", "openai", "apiKey", "sk-topsecret")]);
        let routes = [
            route("a", "x", 1, Provider::Openai),
            route("b", "x", 2, Provider::Openai),
        ];
        let r = reconcile(&routes, &s);
        for o in &r.outcomes {
            assert!(!o.outcome.message.contains("topsecret"));
        }
    }
}
