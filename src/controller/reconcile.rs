//! Pure reconciliation: from the desired state (every Route, the Secrets they reference) and what
//! the controller holds (the table serving now, whose backend health carries over; the operator's
//! policy; the prices) to the next routing table, one outcome per Route and the short names that
//! changed owner. No I/O and no globals here, so every rule is unit-tested.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::ByteString;
use kube::ResourceExt;

use crate::api::{
    BackendStatus, ModelSpec, Outcome, Provider, Reason, Route, RouteSpec, RouteType,
};
use crate::cost::Prices;
use crate::pools::{NoPools, PoolBackend, PoolKey, PoolLookup};
use crate::providers::{API_KEY, CredentialKeys, Credentials, SecretValue, Target, adapter_for};
use crate::table::{Backend, Backends, RouteEntry, RouteState, RoutingTable, Upstream};
use crate::traffic::{BackendHealth, MAX_BACKENDS, TrafficPolicy};

use super::policy::OperatorPolicy;
use crate::telemetry::metrics::{Metrics, ReasonLabels};

/// Secret data by key, as read from the API.
pub type SecretData = BTreeMap<String, ByteString>;

/// Where reconcile finds Secret contents; `None` means the Secret does not exist.
pub trait SecretLookup {
    fn secret(&self, namespace: &str, name: &str) -> Option<&SecretData>;
    /// True for a Secret that exists but that Routes may not use (`--secret-selector`); its
    /// contents were never read.
    fn denied(&self, _namespace: &str, _name: &str) -> bool {
        false
    }
}

/// What GuardrailPolicies' webhooks and judges need of this build: Secrets, the operator's
/// egress rules, the Routes.
pub struct GuardrailEnv<'a, S> {
    pub secrets: &'a S,
    pub policy: &'a OperatorPolicy,
    pub routes: &'a [Arc<Route>],
}

impl<S: SecretLookup> crate::guardrails::Environment for GuardrailEnv<'_, S> {
    fn secret(&self, namespace: &str, r: &crate::api::SecretKeyRef) -> Result<SecretValue, String> {
        if self.secrets.denied(namespace, &r.name) {
            return Err(format!(
                "Secret {namespace}/{} does not match the gateway's --secret-selector",
                r.name
            ));
        }
        let data = self
            .secrets
            .secret(namespace, &r.name)
            .ok_or_else(|| format!("Secret {namespace}/{} not found", r.name))?;
        match data
            .get(&r.key)
            .map(|v| std::str::from_utf8(&v.0).map(str::trim))
        {
            Some(Ok(v)) if !v.is_empty() => Ok(SecretValue::new(v)),
            Some(_) => Err(format!(
                "key {:?} of Secret {namespace}/{} is empty or not UTF-8 text",
                r.key, r.name
            )),
            None => Err(format!(
                "Secret {namespace}/{} has no key {:?}",
                r.name, r.key
            )),
        }
    }

    fn refuse(&self, url: &str) -> Option<String> {
        self.policy.refuse_upstream(url).map(|o| o.message)
    }

    fn judge(&self, namespace: &str, name: &str) -> Result<(), String> {
        let route = self
            .routes
            .iter()
            .find(|r| {
                r.metadata.name.as_deref() == Some(name)
                    && r.metadata.namespace.as_deref() == Some(namespace)
            })
            .ok_or_else(|| format!("Route {namespace}/{name} does not exist"))?;
        if route.spec.route_type != crate::api::RouteType::Chat {
            return Err(format!(
                "Route {namespace}/{name} is not an llm/v1/chat Route"
            ));
        }
        Ok(())
    }
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
    /// The name callers use: the one-word name when the Route owns it, else `namespace/name`.
    pub served_as: String,
    pub short_name: ShortName,
    pub outcome: Outcome,
    /// Each backend (one for a `model` route) and whether it resolved; empty when the Route did
    /// not get that far (a name conflict or an invalid policy).
    pub backends: Vec<BackendStatus>,
}

pub struct Reconciled {
    pub table: RoutingTable,
    /// One per Route, sorted by namespace then name.
    pub outcomes: Vec<RouteOutcome>,
    /// One-word names whose owner changed since the previous table.
    pub short_name_changes: Vec<ShortNameChange>,
}

impl Reconciled {
    /// Counts this rebuild in `metrics`: its duration and the Routes by Ready reason.
    pub fn record(&self, metrics: &Metrics, elapsed: std::time::Duration) {
        metrics.reconciles.inc();
        metrics.reconcile_duration.observe(elapsed.as_secs_f64());
        for reason in Reason::ALL {
            let n = self
                .outcomes
                .iter()
                .filter(|o| o.outcome.reason == reason)
                .count();
            metrics
                .routes
                .get_or_create(&ReasonLabels {
                    reason: reason.as_str(),
                })
                .set(n as i64);
        }
    }
}

/// Whether a Route has its one-word name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShortName {
    Owned,
    /// An older Route (`namespace/name`) in a public namespace has it.
    Taken {
        by: String,
    },
    /// The Route's namespace is not in `--public-namespaces`.
    NotPublic,
}

/// A one-word name that moved from the Route in one namespace to the Route in another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShortNameChange {
    pub name: String,
    pub from: String,
    pub to: String,
}

/// Builds the table from every Route and the Secrets they reference, under the default policy.
pub fn reconcile(routes: &[Arc<Route>], secrets: &impl SecretLookup) -> Reconciled {
    reconcile_after(
        routes,
        secrets,
        &RoutingTable::default(),
        &OperatorPolicy::default(),
        Prices::builtin(),
    )
}

/// Like `reconcile` under the operator's `policy`, carrying the health of unchanged backends
/// over from the `previous` table.
///
/// Every Route is served by its qualified name `namespace/name`. A Route in a public namespace
/// also gets its one-word name unless an older one (then lexical `namespace/name`) has it; when
/// the owner goes, the next one takes over on the next build.
pub fn reconcile_after(
    routes: &[Arc<Route>],
    secrets: &impl SecretLookup,
    previous: &RoutingTable,
    policy: &OperatorPolicy,
    prices: Prices,
) -> Reconciled {
    reconcile_with(
        routes,
        secrets,
        previous,
        policy,
        prices,
        &NoPools,
        &Default::default(),
    )
}

/// Like `reconcile_after`, with the self-hosted model `pools` the Routes' pool backends name
/// (the controller's; without them such backends do not resolve), and each Route holding the
/// compiled GuardrailPolicies it names (a Route naming one missing or invalid does not serve).
pub fn reconcile_with(
    routes: &[Arc<Route>],
    secrets: &impl SecretLookup,
    previous: &RoutingTable,
    policy: &OperatorPolicy,
    prices: Prices,
    pools: &dyn PoolLookup,
    guardrails: &crate::guardrails::Policies,
) -> Reconciled {
    let health = previous.backend_health();
    let mut claimants: BTreeMap<&str, Vec<&Arc<Route>>> = BTreeMap::new();
    for route in routes {
        if policy.is_public(&route.namespace().unwrap_or_default()) {
            claimants
                .entry(route.metadata.name.as_deref().unwrap_or_default())
                .or_default()
                .push(route);
        }
    }
    let mut owners: HashMap<&str, String> = HashMap::new();
    for (name, mut list) in claimants {
        list.sort_by(|a, b| {
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
        owners.insert(name, list[0].namespace().unwrap_or_default());
    }

    let mut entries = Vec::with_capacity(routes.len());
    let mut outcomes = Vec::with_capacity(routes.len());
    let mut short_name_changes = Vec::new();
    for route in routes {
        let name = route.metadata.name.as_deref().unwrap_or_default();
        let namespace = route.namespace().unwrap_or_default();
        let qualified = format!("{namespace}/{name}");
        let short_name = match owners.get(name) {
            _ if !policy.is_public(&namespace) => ShortName::NotPublic,
            Some(owner) if *owner == namespace => ShortName::Owned,
            Some(owner) => ShortName::Taken {
                by: format!("{owner}/{name}"),
            },
            None => ShortName::NotPublic,
        };
        let served_as = if short_name == ShortName::Owned {
            if let Some(before) = previous.get(name).filter(|e| *e.name == *name)
                && before.namespace != namespace
            {
                short_name_changes.push(ShortNameChange {
                    name: name.to_string(),
                    from: before.namespace.clone(),
                    to: namespace.clone(),
                });
            }
            name.to_string()
        } else {
            qualified.clone()
        };
        let (mut state, backends) = resolve(route, secrets, &health, policy, prices, pools);
        let guard = match crate::guardrails::route_guard(
            &served_as,
            &qualified,
            &route.spec.guardrails,
            guardrails,
        ) {
            Ok(g) => g,
            Err(message) => {
                if matches!(state, RouteState::Ready(_)) {
                    state = RouteState::NotReady {
                        reason: Reason::GuardrailNotReady,
                        message,
                    };
                }
                None
            }
        };
        let mut semantic_off = None;
        let (cache, state) =
            match crate::cache::CachePolicy::compile(&served_as, &qualified, &route.spec) {
                Ok(Some(mut cache)) => {
                    let found = cache.semantic.as_ref().and_then(|s| {
                        routes
                            .iter()
                            .find(|r| {
                                format!(
                                    "{}/{}",
                                    r.namespace().unwrap_or_default(),
                                    r.metadata.name.as_deref().unwrap_or_default()
                                ) == s.embeddings_route
                            })
                            .map(|r| r.spec.route_type)
                    });
                    semantic_off = cache.check_semantic(found).err();
                    (Some(cache), state)
                }
                Ok(None) => (None, state),
                Err(message) => (
                    None,
                    RouteState::NotReady {
                        reason: Reason::InvalidSpec,
                        message,
                    },
                ),
            };
        let outcome = match &state {
            RouteState::Ready(_) => {
                let failed = backends.iter().filter(|b| !b.resolved).count();
                if let Some(message) = semantic_off {
                    Outcome {
                        reason: Reason::SemanticMatchingOff,
                        message,
                    }
                } else if failed == 0 {
                    Outcome::ready()
                } else {
                    Outcome {
                        reason: Reason::Resolved,
                        message: format!(
                            "route is serving; {failed} of {} backends did not resolve",
                            backends.len()
                        ),
                    }
                }
            }
            RouteState::NotReady { reason, message } => {
                Outcome::not_ready(*reason, message.clone())
            }
        };
        outcomes.push(RouteOutcome {
            namespace: namespace.clone(),
            name: name.to_string(),
            served_as: served_as.clone(),
            short_name,
            outcome,
            backends,
        });
        let primary = route.spec.primary_model();
        entries.push(RouteEntry {
            metrics: Default::default(),
            counter_keys: crate::limits::route_keys(&served_as),
            name: served_as.into(),
            qualified,
            namespace,
            route_type: route.spec.route_type,
            provider: primary.map_or(Provider::Openai, |m| m.provider),
            model: primary.map_or("", |m| m.name.as_str()).into(),
            limits: route.spec.limits.clone(),
            access: route.spec.access.clone(),
            cache,
            guard,
            state,
        });
    }
    outcomes.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    Reconciled {
        table: RoutingTable::new(entries),
        outcomes,
        short_name_changes,
    }
}

/// One backend of the spec with where it sits: `model` is backend 0 at weight 1, priority 0.
struct Declared<'a> {
    field: String,
    model: &'a ModelSpec,
    pricing: Option<&'a crate::api::Pricing>,
    weight: u32,
    priority: u32,
}

fn declared(spec: &RouteSpec) -> Result<Vec<Declared<'_>>, Outcome> {
    match (&spec.model, spec.backends.is_empty()) {
        (Some(model), true) => Ok(vec![Declared {
            field: "spec.model".into(),
            model,
            pricing: None,
            weight: 1,
            priority: 0,
        }]),
        (None, false) if spec.backends.len() <= MAX_BACKENDS => Ok(spec
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| Declared {
                field: format!("spec.backends[{i}]"),
                model: &b.model,
                pricing: b.pricing.as_ref(),
                weight: b.weight(),
                priority: b.priority(),
            })
            .collect()),
        (None, false) => Err(Outcome::not_ready(
            Reason::InvalidSpec,
            format!("a route has at most {MAX_BACKENDS} backends"),
        )),
        _ => Err(Outcome::not_ready(
            Reason::InvalidSpec,
            "set exactly one of spec.model and spec.backends",
        )),
    }
}

fn resolve(
    route: &Route,
    secrets: &impl SecretLookup,
    health: &HashMap<&str, &Arc<BackendHealth>>,
    policy: &OperatorPolicy,
    prices: Prices,
    pools: &dyn PoolLookup,
) -> (RouteState, Vec<BackendStatus>) {
    let not_ready = |o: Outcome| {
        (
            RouteState::NotReady {
                reason: o.reason,
                message: o.message,
            },
            Vec::new(),
        )
    };
    let spec = &route.spec;
    let declared = match declared(spec) {
        Ok(d) => d,
        Err(o) => return not_ready(o),
    };
    if spec.route_type == RouteType::Embeddings && !spec.allow_mixed_models {
        let mut models: Vec<&str> = declared.iter().map(|d| d.model.name.as_str()).collect();
        models.sort_unstable();
        models.dedup();
        if models.len() > 1 {
            return not_ready(Outcome::not_ready(
                Reason::InvalidSpec,
                format!(
                    "embeddings backends name different models ({}), whose vectors are not comparable; set spec.allowMixedModels: true if that is intended",
                    models.join(", ")
                ),
            ));
        }
    }
    let mut priorities: Vec<u32> = declared.iter().map(|d| d.priority).collect();
    priorities.sort_unstable();
    priorities.dedup();
    // A pool's call gets, by default, one more try: on another endpoint of the pool (a pod that
    // went away between the watch and the call is then invisible to the caller).
    let pool_tries = usize::from(declared.iter().any(|d| d.model.is_pool()));
    let traffic = match TrafficPolicy::from_spec(
        spec.retry.as_ref(),
        spec.outlier_detection.as_ref(),
        priorities.len() + pool_tries,
    ) {
        Ok(p) => p,
        Err(message) => return not_ready(Outcome::not_ready(Reason::InvalidSpec, message)),
    };

    let namespace = route.namespace().unwrap_or_default();
    let name = route.metadata.name.as_deref().unwrap_or_default();
    let mut list = Vec::with_capacity(declared.len());
    let mut statuses = Vec::with_capacity(declared.len());
    let mut failures = Vec::new();
    let mut keys: HashMap<u64, usize> = HashMap::new();
    for d in &declared {
        let pool_key = PoolKey::of(d.model, &namespace);
        let pool = pool_key.as_ref().and_then(|k| pools.pool(k));
        let status = |resolved: bool, why: Option<&Outcome>| BackendStatus {
            provider: d.model.provider,
            model: d.model.name.clone(),
            resolved,
            reason: why.map(|o| o.reason.as_str().to_string()),
            message: why.map(|o| o.message.clone()),
            pool: pool_key.as_ref().map(ToString::to_string),
            ready_endpoints: pool.as_ref().map(|p| p.ready_count()),
            endpoint_picker: pool
                .as_ref()
                .and_then(|p| p.picker_state())
                .map(str::to_string),
        };
        let resolved = match (&pool_key, &pool) {
            (Some(_), None) => Err(Outcome::not_ready(
                Reason::InvalidSpec,
                format!(
                    "{}: inferencePool and service backends need the cluster (portcullis run)",
                    d.field
                ),
            )),
            _ => resolve_model(d, spec.route_type, &namespace, secrets, policy),
        };
        match resolved {
            Ok(upstream) => {
                // Identical backends are told apart by their order among themselves. A digest of
                // the spec keeps the key short (it lives in every table).
                let content = {
                    use std::hash::{Hash, Hasher};
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    serde_json::to_string(d.model)
                        .unwrap_or_default()
                        .hash(&mut h);
                    h.finish()
                };
                let seen = keys.entry(content).or_default();
                *seen += 1;
                let key = format!("{namespace}/{name}#{seen}#{content:016x}");
                let mut backend = Backend::new(upstream, d.weight, d.priority, key);
                if let Some(pool) = &pool {
                    backend = backend.with_pool(PoolBackend {
                        pool: Arc::clone(pool),
                        saturation: d.model.saturation.as_ref().map(|s| s.queue_depth),
                        adapter: d.model.name.as_str().into(),
                    });
                }
                let cluster = prices
                    .cluster
                    .and_then(|c| c.get(d.model.provider, &d.model.name));
                let resolve = |overrides: &[Option<&crate::api::Pricing>]| {
                    crate::cost::resolve(
                        prices.catalog,
                        cluster.as_ref(),
                        d.model.provider,
                        &d.model.name,
                        spec.route_type,
                        overrides,
                    )
                };
                backend.price = resolve(&[d.pricing, spec.pricing.as_ref()]);
                backend.team_price = crate::cost::team_price(backend.price, resolve(&[]));
                backend.max_output =
                    crate::cost::max_output(prices, d.model.provider, &d.model.name);
                if let Some(h) = health.get(backend.key.as_str()) {
                    backend.health = Arc::clone(h);
                }
                list.push(backend);
                statuses.push(status(true, None));
            }
            Err(why) => {
                statuses.push(status(false, Some(&why)));
                failures.push((d, why));
            }
        }
    }
    if !list.iter().any(|b| b.weight > 0) {
        let outcome = match failures.as_slice() {
            [(d, why)] if declared.len() == 1 && d.field == "spec.model" => why.clone(),
            [] => Outcome::not_ready(
                Reason::InvalidSpec,
                "every backend that resolved has weight 0 (drained)",
            ),
            [(_, first), ..] => Outcome::not_ready(
                first.reason,
                format!(
                    "no backend can serve: {}",
                    failures
                        .iter()
                        .map(|(d, why)| format!("{}: {}", d.field, why.message))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            ),
        };
        return (
            RouteState::NotReady {
                reason: outcome.reason,
                message: outcome.message,
            },
            statuses,
        );
    }
    list.sort_by_key(|b| b.priority);
    // A budget in USD cannot be kept on a call of unknown cost.
    if let Some(i) = spec.limits.iter().position(|l| l.usd.is_some())
        && let Some(b) = list.iter().find(|b| b.price.is_none())
    {
        return (
            RouteState::NotReady {
                reason: Reason::InvalidSpec,
                message: format!(
                    "spec.limits[{i}].usd needs a price for every backend; {} has none in the built-in catalog: set spec.pricing",
                    b.id
                ),
            },
            statuses,
        );
    }
    let dearest = |price: fn(&Backend) -> Option<crate::cost::Price>| {
        list.iter()
            .map(price)
            .try_fold(crate::cost::Price::default(), |m, p| Some(m.max(p?)))
    };
    let max_price = dearest(|b| b.price);
    let max_team_price = dearest(|b| b.team_price);
    let max_output = list.iter().map(|b| b.max_output).max().unwrap_or_default();
    // A pool picks its endpoint by the parsed prompt (prefix affinity, LoRA adapters, the
    // endpoint picker): a Route with a pool backend translates.
    let wire = list
        .iter()
        .map(|b| b.upstream.adapter.info().wire.filter(|_| b.pool.is_none()))
        .reduce(|a, b| if a == b { a } else { None })
        .flatten();
    let wire_streams = list
        .iter()
        .all(|b| b.upstream.adapter.info().stream_options);
    (
        RouteState::Ready(Arc::new(Backends {
            list,
            policy: traffic,
            max_price,
            max_team_price,
            max_output,
            wire,
            wire_streams,
        })),
        statuses,
    )
}

/// Providers whose adapter is the OpenAI-compatible one (`providers/compat.rs`): the quirks a
/// pool backend may name; the first is the plain one.
const SPEAKS_OPENAI: [Provider; 5] = [
    Provider::OpenaiCompatible,
    Provider::Ollama,
    Provider::Together,
    Provider::Deepseek,
    Provider::Mistral,
];

fn resolve_model(
    declared: &Declared<'_>,
    route_type: RouteType,
    namespace: &str,
    secrets: &impl SecretLookup,
    policy: &OperatorPolicy,
) -> Result<Upstream, Outcome> {
    let model = declared.model;
    let field = &declared.field;
    let provider = model.provider;
    let adapter = adapter_for(provider).ok_or_else(|| {
        Outcome::not_ready(
            Reason::ProviderUnsupported,
            format!("provider {provider} is not supported by this gateway version"),
        )
    })?;
    if !adapter.info().route_types.contains(&route_type) {
        let supported: Vec<&str> = adapter
            .info()
            .route_types
            .iter()
            .map(|t| t.as_str())
            .collect();
        return Err(Outcome::not_ready(
            Reason::ProviderUnsupported,
            format!(
                "provider {provider} cannot serve {route_type}; it serves {}",
                supported.join(", ")
            ),
        ));
    }
    if model.is_pool() && !SPEAKS_OPENAI.contains(&provider) {
        return Err(Outcome::not_ready(
            Reason::ProviderUnsupported,
            format!(
                "{field}: a pool backend's model servers speak the OpenAI-compatible API; set provider to openai-compatible (or {})",
                SPEAKS_OPENAI[1..]
                    .iter()
                    .map(|p| p.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let api_base = model
        .is_pool()
        .then_some(crate::pools::POOL_API_BASE)
        .or(model.api_base.as_deref())
        .or(adapter.info().default_api_base)
        .ok_or_else(|| {
            Outcome::not_ready(
                Reason::InvalidSpec,
                format!("provider {provider} needs {field}.apiBase"),
            )
        })?
        .trim_end_matches('/')
        .to_string();
    // Checked as it will be called: Bedrock's `{region}` filled in as the adapter fills it (a
    // region such as `254` must not complete `http://169.254.169.{region}`).
    let region = model
        .config
        .get("region")
        .map_or(crate::providers::BEDROCK_DEFAULT_REGION, String::as_str);
    // A pool's endpoints are the cluster's own Pods, listed by the API server, not a URL a
    // Route author wrote: the egress policy is about the latter.
    if !model.is_pool()
        && let Some(refused) = policy.refuse_upstream(&api_base.replace("{region}", region))
    {
        let message = format!("{field}: {}", refused.message);
        return Err(Outcome::not_ready(refused.reason, message));
    }

    let credentials = resolve_credentials(
        model,
        field,
        namespace,
        adapter.info().credential_keys,
        secrets,
    )?;
    Ok(Upstream::new(
        adapter,
        Target {
            model: model.name.clone(),
            api_base,
            credentials,
            config: model.config.clone(),
        },
    ))
}

fn resolve_credentials(
    model: &ModelSpec,
    field: &str,
    namespace: &str,
    keys: CredentialKeys,
    secrets: &impl SecretLookup,
) -> Result<Credentials, Outcome> {
    let provider = model.provider;
    let mut credentials = Credentials::default();
    let Some(secret_ref) = &model.secret_ref else {
        return match keys {
            CredentialKeys::ApiKey { required: false } => Ok(credentials),
            _ => Err(Outcome::not_ready(
                Reason::InvalidSpec,
                format!("provider {provider} needs {field}.secretRef"),
            )),
        };
    };
    if secrets.denied(namespace, &secret_ref.name) {
        return Err(Outcome::not_ready(
            Reason::SecretNotAllowed,
            format!(
                "Secret {namespace}/{} does not match the gateway's --secret-selector, so Routes may not use it",
                secret_ref.name
            ),
        ));
    }
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
            RouteSpec::new(
                RouteType::Chat,
                ModelSpec {
                    provider,
                    name: "gpt-4o-mini".into(),
                    api_base: None,
                    secret_ref: Some(SecretKeyRef {
                        name: "openai".into(),
                        key: "apiKey".into(),
                    }),
                    config: Default::default(),
                    inference_pool: None,
                    service: None,
                    saturation: None,
                },
            ),
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
        assert_eq!(
            up.list[0].upstream.target.credentials.get(API_KEY),
            Some("sk-1")
        );
        assert_eq!(
            up.list[0].upstream.target.api_base,
            "https://api.openai.com/v1"
        );
        assert_eq!(up.list[0].upstream.target.model, "gpt-4o-mini");
    }

    #[test]
    fn a_route_whose_guardrail_policy_is_missing_or_invalid_fails_closed() {
        let policy = |name: &str, regex: &str| {
            let mut p = crate::api::GuardrailPolicy::new(
                name,
                serde_json::from_value(serde_json::json!({"checks": [
                    {"name": "t", "action": "mask", "detector": {"regex": regex}}
                ]}))
                .unwrap(),
            );
            p.metadata.namespace = Some("a".into());
            Arc::new(p)
        };
        let compiled =
            crate::guardrails::compile_all(&[policy("good", "TCK-[0-9]+"), policy("bad", "(")]);
        let run = |names: &[&str]| {
            let mut r = (*route("a", "chat", 1, Provider::Openai)).clone();
            r.spec.guardrails = names.iter().map(|n| n.to_string()).collect();
            reconcile_with(
                &[Arc::new(r)],
                &secrets(&[("a", "openai", "apiKey", "sk-1")]),
                &RoutingTable::default(),
                &OperatorPolicy::default(),
                Prices::builtin(),
                &NoPools,
                &compiled,
            )
        };
        let r = run(&["good"]);
        assert_eq!(outcome_of(&r, "a").reason, Reason::Resolved);
        assert!(r.table.get("chat").unwrap().guard.is_some());
        let r = run(&["good", "bad"]);
        let o = outcome_of(&r, "a");
        assert_eq!(o.reason, Reason::GuardrailNotReady);
        assert!(
            o.message.contains("a/bad") && o.message.contains("spec.checks[0] (t): invalid regex"),
            "{}",
            o.message
        );
        assert!(matches!(
            r.table.get("chat").unwrap().state,
            RouteState::NotReady { .. }
        ));
        let o = outcome_of(&run(&["nope"]), "a").clone();
        assert_eq!(o.reason, Reason::GuardrailNotReady);
        assert!(o.message.contains("a/nope does not exist"), "{}", o.message);
        assert!(run(&[]).table.get("chat").unwrap().guard.is_none());
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
    fn oldest_route_wins_the_short_name_and_every_route_serves_by_its_qualified_name() {
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
        for ns in ["a", "b", "c"] {
            assert_eq!(outcome_of(&r, ns).reason, Reason::Resolved);
            assert_eq!(r.table.get(&format!("{ns}/chat")).unwrap().namespace, ns);
        }
        let a = r.outcomes.iter().find(|o| o.namespace == "a").unwrap();
        assert_eq!(
            a.short_name,
            ShortName::Taken {
                by: "b/chat".into()
            }
        );
        assert_eq!(a.served_as, "a/chat");
        // Listings show the short name for its owner, the qualified one for the others.
        let names: Vec<&str> = r.table.routes().iter().map(|e| &*e.name).collect();
        assert_eq!(names, ["a/chat", "c/chat", "chat"]);

        // The owner goes: the next oldest takes over, and the change is reported.
        let next = reconcile_after(
            &routes[1..],
            &s,
            &r.table,
            &OperatorPolicy::default(),
            Prices::builtin(),
        );
        assert_eq!(next.table.get("chat").unwrap().namespace, "c");
        assert_eq!(
            next.short_name_changes,
            [ShortNameChange {
                name: "chat".into(),
                from: "b".into(),
                to: "c".into()
            }]
        );
    }

    #[test]
    fn only_public_namespaces_get_short_names() {
        let s = secrets(&[
            ("a", "openai", "apiKey", "k"),
            ("b", "openai", "apiKey", "k"),
        ]);
        let routes = [
            route("a", "chat", 1, Provider::Openai),
            route("b", "chat", 9, Provider::Openai),
        ];
        let policy = OperatorPolicy {
            public_namespaces: Some(["b".to_string()].into()),
            ..Default::default()
        };
        let r = reconcile_after(
            &routes,
            &s,
            &RoutingTable::default(),
            &policy,
            Prices::builtin(),
        );
        assert_eq!(
            r.table.get("chat").unwrap().namespace,
            "b",
            "a is older but not public"
        );
        let a = r.outcomes.iter().find(|o| o.namespace == "a").unwrap();
        assert_eq!(a.short_name, ShortName::NotPublic);
        assert!(a.outcome.is_ready());
        assert!(r.table.get("a/chat").is_some());
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
        azure.spec.model.as_mut().unwrap().api_base = Some("https://res.openai.azure.com".into());
        let r = reconcile(&[Arc::new(azure.clone())], &s);
        let RouteState::Ready(up) = &r.table.get("az").unwrap().state else {
            panic!("not ready: {:?}", r.outcomes)
        };
        assert_eq!(
            up.list[0].upstream.target.credentials.get("azureAdToken"),
            Some("eyJ0")
        );
        assert_eq!(up.list[0].upstream.target.credentials.get(API_KEY), None);
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

    fn backend(provider: Provider, model: &str, secret: &str) -> crate::api::BackendSpec {
        crate::api::BackendSpec {
            model: ModelSpec {
                provider,
                name: model.into(),
                api_base: Some("http://127.0.0.1:1/v1".into()),
                secret_ref: Some(SecretKeyRef {
                    name: secret.into(),
                    key: "apiKey".into(),
                }),
                config: Default::default(),
                inference_pool: None,
                service: None,
                saturation: None,
            },
            weight: None,
            priority: None,
            pricing: None,
        }
    }

    fn with_backends(backends: Vec<crate::api::BackendSpec>) -> Arc<Route> {
        let mut r = (*route("a", "pool", 1, Provider::Openai)).clone();
        r.spec.model = None;
        r.spec.backends = backends;
        Arc::new(r)
    }

    fn ready_backends(r: &Reconciled, name: &str) -> Arc<Backends> {
        match &r.table.get(name).unwrap().state {
            RouteState::Ready(b) => Arc::clone(b),
            RouteState::NotReady { message, .. } => panic!("not ready: {message}"),
        }
    }

    #[test]
    fn a_route_with_one_good_backend_serves_and_reports_the_broken_one() {
        let mut fallback = backend(Provider::Anthropic, "claude-sonnet-4-5", "missing");
        fallback.priority = Some(1);
        let r = reconcile(
            &[with_backends(vec![
                backend(Provider::Openai, "gpt-4o-mini", "key-a"),
                fallback,
            ])],
            &secrets(&[("a", "key-a", "apiKey", "k")]),
        );
        let o = &r.outcomes[0];
        assert_eq!(o.outcome.reason, Reason::Resolved);
        assert!(
            o.outcome
                .message
                .contains("1 of 2 backends did not resolve")
        );
        assert_eq!(o.backends.len(), 2);
        assert!(o.backends[0].resolved && !o.backends[1].resolved);
        assert_eq!(o.backends[1].reason.as_deref(), Some("SecretNotFound"));
        assert_eq!(ready_backends(&r, "pool").list.len(), 1);
    }

    #[test]
    fn each_backend_is_priced_once_and_a_usd_budget_needs_every_price() {
        let mut priced = backend(Provider::Openai, "house", "k");
        priced.pricing = Some(crate::api::Pricing {
            input_per_million: Some(1.0),
            output_per_million: Some(4.0),
            cached_input_per_million: None,
        });
        let catalog = backend(Provider::Openai, "gpt-4o-mini", "k");
        let s = secrets(&[("a", "k", "apiKey", "v")]);
        let r = reconcile(&[with_backends(vec![priced.clone(), catalog])], &s);
        let b = ready_backends(&r, "pool");
        let price = |model: &str| {
            b.list
                .iter()
                .find(|x| x.upstream.target.model == model)
                .and_then(|x| x.price)
                .unwrap()
        };
        assert_eq!(
            (price("house").input, price("house").output),
            (1_000_000, 4_000_000)
        );
        assert_eq!(price("gpt-4o-mini").input, 150_000);
        // The reservation price: the dearest of each kind.
        let max = b.max_price.unwrap();
        assert_eq!((max.input, max.output), (1_000_000, 4_000_000));

        // An unpriced backend makes a USD budget unkeepable: the route does not serve.
        let mut route =
            (*with_backends(vec![priced, backend(Provider::Openai, "house2", "k")])).clone();
        route.spec.limits = vec![crate::api::Limit {
            renewal_period: crate::api::RenewalPeriod::Day,
            calls: None,
            tokens: None,
            usd: Some(1.0),
            key: crate::api::LimitKey::Route,
            on_exceed: None,
            action: None,
        }];
        let r = reconcile(&[Arc::new(route)], &s);
        let o = &r.outcomes[0].outcome;
        assert_eq!(o.reason, Reason::InvalidSpec);
        assert!(
            o.message
                .contains("spec.limits[0].usd needs a price for every backend; openai/house2"),
            "{}",
            o.message
        );
    }

    #[test]
    fn no_backend_resolving_names_each_problem() {
        let r = reconcile(
            &[with_backends(vec![
                backend(Provider::Openai, "gpt-4o-mini", "x"),
                backend(Provider::Openai, "gpt-4o-mini", "y"),
            ])],
            &secrets(&[]),
        );
        let o = &r.outcomes[0].outcome;
        assert_eq!(o.reason, Reason::SecretNotFound);
        assert_eq!(
            o.message,
            "no backend can serve: spec.backends[0]: Secret a/x not found; spec.backends[1]: Secret a/y not found"
        );
    }

    #[test]
    fn backends_are_ordered_by_priority_with_the_policy_applied() {
        let mut first = backend(Provider::Openai, "b", "k");
        first.priority = Some(2);
        let mut second = backend(Provider::Openai, "a", "k");
        second.weight = Some(3);
        let r = reconcile(
            &[with_backends(vec![first, second])],
            &secrets(&[("a", "k", "apiKey", "v")]),
        );
        let b = ready_backends(&r, "pool");
        assert_eq!(
            b.list.iter().map(|b| &*b.id).collect::<Vec<_>>(),
            ["openai/a", "openai/b"]
        );
        assert_eq!(b.list[0].weight, 3);
        assert_eq!(b.policy.attempts, 2, "1 + one fallback priority");
        // Listings name the first-choice backend.
        assert_eq!(&*r.table.get("pool").unwrap().model, "a");
    }

    #[test]
    fn embeddings_backends_of_different_models_need_consent() {
        let mut route = (*with_backends(vec![
            backend(Provider::Openai, "text-embedding-3-small", "k"),
            backend(Provider::Openai, "text-embedding-3-large", "k"),
        ]))
        .clone();
        route.spec.route_type = RouteType::Embeddings;
        let s = secrets(&[("a", "k", "apiKey", "v")]);
        let r = reconcile(&[Arc::new(route.clone())], &s);
        let o = &r.outcomes[0].outcome;
        assert_eq!(o.reason, Reason::InvalidSpec);
        assert!(o.message.contains("allowMixedModels"), "{}", o.message);
        route.spec.allow_mixed_models = true;
        let r = reconcile(&[Arc::new(route)], &s);
        assert!(r.outcomes[0].outcome.is_ready());
    }

    #[test]
    fn health_carries_over_for_unchanged_backends_only() {
        let s = secrets(&[("a", "k", "apiKey", "v")]);
        let routes = [with_backends(vec![
            backend(Provider::Openai, "m1", "k"),
            backend(Provider::Openai, "m2", "k"),
        ])];
        let first = reconcile(&routes, &s);
        let old = ready_backends(&first, "pool");
        let again = reconcile_after(
            &routes,
            &s,
            &first.table,
            &OperatorPolicy::default(),
            Prices::builtin(),
        );
        let new = ready_backends(&again, "pool");
        assert!(Arc::ptr_eq(&old.list[0].health, &new.list[0].health));
        assert!(Arc::ptr_eq(&old.list[1].health, &new.list[1].health));

        let changed = [with_backends(vec![
            backend(Provider::Openai, "m1", "k"),
            backend(Provider::Openai, "m3", "k"),
        ])];
        let next = reconcile_after(
            &changed,
            &s,
            &again.table,
            &OperatorPolicy::default(),
            Prices::builtin(),
        );
        let next = ready_backends(&next, "pool");
        assert!(Arc::ptr_eq(&new.list[0].health, &next.list[0].health));
        assert!(!Arc::ptr_eq(&new.list[1].health, &next.list[1].health));
    }

    #[test]
    fn model_and_backends_together_are_invalid() {
        let mut r = (*route("a", "both", 1, Provider::Openai)).clone();
        r.spec.backends = vec![backend(Provider::Openai, "m", "openai")];
        let out = reconcile(&[Arc::new(r)], &secrets(&[("a", "openai", "apiKey", "k")]));
        assert_eq!(out.outcomes[0].outcome.reason, Reason::InvalidSpec);
    }

    #[test]
    fn a_pool_backend_resolves_only_with_the_controllers_pools() {
        let mut route = (*route("ns", "llama", 1, Provider::OpenaiCompatible)).clone();
        let model = route.spec.model.as_mut().unwrap();
        model.secret_ref = None;
        model.inference_pool = Some(crate::api::PoolRef {
            name: "llama".into(),
            namespace: None,
        });
        model.saturation = Some(crate::api::Saturation { queue_depth: 4 });
        let routes = [Arc::new(route.clone())];
        // Without a cluster (`serve`): refused, naming why.
        let r = reconcile(&routes, &secrets(&[]));
        assert_eq!(outcome_of(&r, "ns").reason, Reason::InvalidSpec);
        assert!(outcome_of(&r, "ns").message.contains("need the cluster"));

        let metrics = Arc::new(crate::telemetry::metrics::Metrics::new());
        let pools = crate::pools::Pools::new(metrics);
        let key = PoolKey::of(route.spec.model.as_ref().unwrap(), "ns").unwrap();
        let map = pools.want([key.clone()].into());
        map[&key].set_endpoints(vec![crate::pools::EndpointAddr {
            addr: "10.0.0.1:8000".parse().unwrap(),
            name: "vllm-0".into(),
        }]);
        let r = reconcile_with(
            &routes,
            &secrets(&[]),
            &RoutingTable::default(),
            &OperatorPolicy::default(),
            Prices::builtin(),
            &map,
            &Default::default(),
        );
        assert!(
            outcome_of(&r, "ns").is_ready(),
            "{:?}",
            outcome_of(&r, "ns")
        );
        let status = &r.outcomes[0].backends[0];
        assert_eq!(status.pool.as_deref(), Some("inferencepool/ns/llama"));
        assert_eq!(status.ready_endpoints, Some(1));
        let entry = r.table.get("llama").unwrap();
        let RouteState::Ready(b) = &entry.state else {
            panic!("not ready")
        };
        assert_eq!(&*b.list[0].id, "inferencepool/ns/llama");
        assert_eq!(b.list[0].pool.as_ref().unwrap().saturation, Some(4));
        assert_eq!(
            b.policy.attempts, 2,
            "a pool call gets a second try by default"
        );

        // Hosted-only providers cannot be a pool's dialect.
        route.spec.model.as_mut().unwrap().provider = Provider::Anthropic;
        let r = reconcile_with(
            &[Arc::new(route)],
            &secrets(&[]),
            &RoutingTable::default(),
            &OperatorPolicy::default(),
            Prices::builtin(),
            &map,
            &Default::default(),
        );
        assert_eq!(outcome_of(&r, "ns").reason, Reason::ProviderUnsupported);
    }
}
