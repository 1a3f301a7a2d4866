//! The control loop: watches Routes and Secret metadata, rebuilds the routing table from the
//! reflector stores after every change, and hands the outcomes to the status writer.
//!
//! The table is rebuilt from the stores (the desired state), never patched event by event, so a
//! deletion missed while a watch was down (a relist after 410 Gone) cannot leave a stale route.
//! While the API server is unreachable the stores keep their contents and the last table serves.

pub mod alarms;
mod backoff;
pub mod consumers;
pub mod guardrails;
pub mod leader;
pub mod policy;
pub mod pools;
pub mod reconcile;
pub mod replicas;
mod secrets;
pub mod status;
pub mod teams;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{ListParams, PartialObjectMeta};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::api::{GuardrailPolicy, Route, Team};
use crate::table::SharedTable;
use crate::telemetry::metrics::{Metrics, ResourceLabels};
use backoff::RetryBackoff;
use reconcile::reconcile_with;
use secrets::SecretCache;

/// Deadline of one API-server request the data plane's freshness waits on (a Secret read, a
/// status write): a hanging API server must fail the call, which is then retried, never stall it.
pub(crate) const API_CALL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("the Route CRD (routes.portcullis.dev) is not installed; apply crds/route.yaml first")]
    CrdMissing,
    #[error("cannot reach the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Watch one namespace, or all when `None`.
    pub namespace: Option<String>,
    /// How long to gather bursts of watch events into one rebuild.
    pub debounce: Duration,
    /// Upper bound of the watch reconnect backoff.
    pub max_backoff: Duration,
    /// Shown as the reporting instance of Events.
    pub instance: String,
    /// Lease-based leader election for status writes; `None`: this replica always writes.
    pub leader: Option<leader::LeaderConfig>,
    /// What the operator allows Routes (Secrets, upstream hosts).
    pub policy: policy::OperatorPolicy,
    /// The ConfigMap (namespace, name) of cluster-wide price overrides; `None`: none.
    pub pricing: Option<(String, String)>,
    /// How often each self-hosted pool endpoint's metrics are read.
    pub pool_scrape_interval: Duration,
    /// Speak h2c, not TLS, to InferencePools' endpoint pickers.
    pub pool_picker_plaintext: bool,
}

/// The key of the pricing ConfigMap that holds the prices (the catalog's format).
pub const PRICING_KEY: &str = "prices.yaml";

/// What the controller shares with the rest of the process.
pub struct ControllerHandles {
    pub table: SharedTable,
    /// Set once the first table built from a complete sync is published and the API keys are loaded.
    pub ready: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
    /// Published digests of the API-key consumers' keys.
    pub api_keys: crate::access::SharedApiKeys,
    /// The limiter whose `action: alert` crossings are published as Events.
    pub limits: Option<Arc<crate::limits::Limiter>>,
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Runs until `shutdown` is cancelled.
pub async fn run(
    client: Client,
    config: ControllerConfig,
    handles: ControllerHandles,
    shutdown: CancellationToken,
) -> Result<(), ControllerError> {
    let routes: Api<Route> = api(&client, config.namespace.as_deref());
    // Fail fast with a clear message when the CRD is missing, as controller-rs does.
    if let Err(e) = routes.list(&ListParams::default().limit(1)).await {
        return Err(match e {
            kube::Error::Api(s) if s.code == 404 => ControllerError::CrdMissing,
            other => ControllerError::Kube(other),
        });
    }
    let gate = Arc::new(ReadyGate {
        table: AtomicBool::new(false),
        keys: AtomicBool::new(false),
        ready: handles.ready.clone(),
    });
    let api_keys = tokio::spawn(consumers::run_api_keys(
        client.clone(),
        config.namespace.clone(),
        handles.api_keys.clone(),
        {
            let gate = gate.clone();
            move || gate.mark(&gate.keys)
        },
        config.max_backoff,
        shutdown.clone(),
    ));
    // Metadata only: unrelated Secret contents never enter this process.
    let secrets: Api<PartialObjectMeta<Secret>> = api(&client, config.namespace.as_deref());

    // Teams are optional: without their CRD (or the right to list them) the gateway serves Routes
    // alone and says so.
    let team_api: Api<Team> = Api::all(client.clone());
    let teams_watched = match team_api.list(&ListParams::default().limit(1)).await {
        Err(kube::Error::Api(s)) if matches!(s.code, 403 | 404) => {
            warn!(
                code = s.code,
                "Teams cannot be listed (teams.portcullis.dev not installed, or not allowed); no Team limits apply"
            );
            false
        }
        _ => true,
    };
    let (team_store, team_writer) = reflector::store::<Team>();
    let team_events = if teams_watched {
        watcher(team_api, watcher::Config::default())
            .backoff(RetryBackoff::new(
                Duration::from_millis(250),
                config.max_backoff,
            ))
            .modify(|t: &mut Team| t.managed_fields_mut().clear())
            .reflect(team_writer)
            .map(|e| (Source::Teams, e.map(Signal::from)))
            .boxed()
    } else {
        futures::stream::pending().boxed()
    };
    let (pricing_store, pricing_writer) = reflector::store::<ConfigMap>();
    let pricing_watched = match &config.pricing {
        Some((ns, name)) => {
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
            match api.get_opt(name).await {
                Err(kube::Error::Api(s)) if s.code == 403 => {
                    warn!(
                        namespace = %ns,
                        configmap = %name,
                        "the pricing ConfigMap cannot be read (forbidden); only the built-in and per-Route prices apply"
                    );
                    None
                }
                _ => Some(api),
            }
        }
        None => None,
    };
    let pricing_events = match (pricing_watched.clone(), &config.pricing) {
        (Some(api), Some((_, name))) => watcher(
            api,
            watcher::Config::default().fields(&format!("metadata.name={name}")),
        )
        .backoff(RetryBackoff::new(
            Duration::from_millis(250),
            config.max_backoff,
        ))
        .reflect(pricing_writer)
        .map(|e| (Source::Pricing, e.map(Signal::from)))
        .boxed(),
        _ => futures::stream::pending().boxed(),
    };
    // GuardrailPolicies are optional like Teams: without their CRD no Route may name one (a Route
    // that does is not Ready: its policy is missing).
    let guardrail_api: Api<GuardrailPolicy> = api(&client, config.namespace.as_deref());
    let guardrails_watched = match guardrail_api.list(&ListParams::default().limit(1)).await {
        Err(kube::Error::Api(s)) if matches!(s.code, 403 | 404) => {
            warn!(
                code = s.code,
                "GuardrailPolicies cannot be listed (guardrailpolicies.portcullis.dev not installed, or not allowed); Routes that name one do not serve"
            );
            false
        }
        _ => true,
    };
    let (guardrail_store, guardrail_writer) = reflector::store::<GuardrailPolicy>();
    let guardrail_events = if guardrails_watched {
        watcher(guardrail_api, watcher::Config::default())
            .backoff(RetryBackoff::new(
                Duration::from_millis(250),
                config.max_backoff,
            ))
            .modify(|p: &mut GuardrailPolicy| p.managed_fields_mut().clear())
            .reflect(guardrail_writer)
            .map(|e| (Source::Guardrails, e.map(Signal::from)))
            .boxed()
    } else {
        futures::stream::pending().boxed()
    };
    let (route_store, route_writer) = reflector::store::<Route>();
    let (secret_store, secret_writer) = reflector::store();
    let watch_backoff = || RetryBackoff::new(Duration::from_millis(250), config.max_backoff);
    let route_events = watcher(routes, watcher::Config::default())
        .backoff(watch_backoff())
        .modify(|r: &mut Route| r.managed_fields_mut().clear())
        .reflect(route_writer)
        .map(|e| (Source::Routes, e.map(Signal::from)));
    let secret_events = watcher(secrets, watcher::Config::default())
        .backoff(watch_backoff())
        .modify(|s| {
            s.managed_fields_mut().clear();
            s.annotations_mut().clear();
        })
        .reflect(secret_writer)
        .map(|e| (Source::Secrets, e.map(Signal::from_secret)));

    let (outcomes_tx, outcomes_rx) = watch::channel(Arc::new(Vec::new()));
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "portcullis".into(),
            instance: Some(config.instance.clone()),
        },
    );
    let leading = leader::elect(client.clone(), config.leader.clone(), shutdown.clone()).await;
    tokio::spawn(leader::export(leading.clone(), handles.metrics.clone()));
    let audit_events = tokio::spawn(alarms::run_guardrail_events(
        handles.metrics.clone(),
        recorder.clone(),
        shutdown.clone(),
    ));
    let limit_alerts = handles.limits.clone().map(|limiter| {
        tokio::spawn(alarms::run_limit_alerts(
            limiter,
            recorder.clone(),
            shutdown.clone(),
        ))
    });
    let alarms = tokio::spawn(alarms::run(
        handles.table.clone(),
        recorder.clone(),
        leading.clone(),
        shutdown.clone(),
    ));
    let (teams_tx, teams_rx) = watch::channel(None);
    let team_status = tokio::spawn(teams::run_writer(
        client.clone(),
        team_store.clone(),
        teams_rx,
        leading.clone(),
        shutdown.clone(),
    ));
    let (guardrails_tx, guardrails_rx) =
        watch::channel(Arc::new(crate::guardrails::Policies::new()));
    let guardrail_status = tokio::spawn(guardrails::run_writer(
        client.clone(),
        guardrail_store.clone(),
        guardrails_rx,
        leading.clone(),
        shutdown.clone(),
    ));
    let writer = tokio::spawn(status::run_writer(
        client.clone(),
        route_store.clone(),
        outcomes_rx,
        leading,
        recorder,
        shutdown.clone(),
    ));

    let pools = Arc::new(
        crate::pools::Pools::new(handles.metrics.clone())
            .with_plaintext_pickers(config.pool_picker_plaintext),
    );
    let pool_changes = pools.status_changes();
    let pool_watch = tokio::spawn(pools::run(
        client.clone(),
        config.namespace.clone(),
        pools.clone(),
        handles.metrics.clone(),
        config.max_backoff,
        shutdown.clone(),
    ));
    let scraper = tokio::spawn(crate::pools::scrape::run(
        pools.clone(),
        config.pool_scrape_interval,
        shutdown.clone(),
    ));
    // A pool's ready count is in its Routes' status: a change rebuilds (the data plane reads the
    // endpoints from the pool itself, without waiting for this).
    let pool_events = futures::stream::unfold(pool_changes, |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((Source::Pools, Ok(Signal::Changed)), rx))
    });

    let mut loop_state = Loop {
        pools,
        client,
        route_store,
        secret_store,
        secret_cache: SecretCache::default(),
        policy: config.policy.clone(),
        handles,
        gate,
        outcomes: outcomes_tx,
        retry: RetryBackoff::new(Duration::from_millis(250), config.max_backoff),
        referenced: HashSet::new(),
        team_store,
        teams_watched,
        teams_changed: teams_tx,
        pricing_store,
        pricing_watched: pricing_watched.is_some(),
        pricing_version: None,
        cluster_prices: None,
        guardrail_store,
        guardrails_watched,
        guardrail_version: None,
        guardrails: Arc::default(),
        guardrails_changed: guardrails_tx,
    };
    loop_state
        .run(
            futures::stream::select(
                futures::stream::select(route_events, secret_events),
                futures::stream::select(
                    futures::stream::select(team_events, pricing_events),
                    futures::stream::select(guardrail_events, pool_events),
                ),
            ),
            config.debounce,
            shutdown,
        )
        .await;
    let _ = writer.await;
    let _ = team_status.await;
    let _ = guardrail_status.await;
    if let Some(task) = limit_alerts {
        let _ = task.await;
    }
    let _ = alarms.await;
    let _ = audit_events.await;
    let _ = api_keys.await;
    let _ = pool_watch.await;
    let _ = scraper.await;
    Ok(())
}

#[derive(Clone, Copy, Debug)]
enum Source {
    Routes,
    Secrets,
    Teams,
    Pricing,
    Guardrails,
    Pools,
}

enum Signal {
    Changed,
    /// This Secret changed: a rebuild is due only if some Route references it.
    Secret(String, String),
    /// Part of a relist; `Synced` follows.
    Relisting,
    /// A (re)list finished: the store now holds the complete current state.
    Synced,
}

impl Signal {
    fn from_secret(e: watcher::Event<PartialObjectMeta<Secret>>) -> Self {
        match e {
            watcher::Event::Apply(s) | watcher::Event::Delete(s) => {
                Signal::Secret(s.namespace().unwrap_or_default(), s.name_any())
            }
            watcher::Event::Init | watcher::Event::InitApply(_) => Signal::Relisting,
            watcher::Event::InitDone => Signal::Synced,
        }
    }
}

impl<K> From<watcher::Event<K>> for Signal {
    fn from(e: watcher::Event<K>) -> Self {
        match e {
            watcher::Event::InitDone => Signal::Synced,
            _ => Signal::Changed,
        }
    }
}

struct Loop {
    client: Client,
    /// The self-hosted model pools the Routes name.
    pools: Arc<crate::pools::Pools>,
    route_store: Store<Route>,
    secret_store: Store<PartialObjectMeta<Secret>>,
    secret_cache: SecretCache,
    policy: policy::OperatorPolicy,
    handles: ControllerHandles,
    gate: Arc<ReadyGate>,
    outcomes: watch::Sender<Arc<Vec<RouteOutcome>>>,
    retry: RetryBackoff,
    /// The Secrets the Routes of the last rebuild reference (existing or not).
    referenced: HashSet<(String, String)>,
    team_store: Store<Team>,
    /// Whether Teams are watched (a rebuild then waits for their first sync too).
    teams_watched: bool,
    /// Nudges the Team status writer after a rebuild.
    /// Teams were rebuilt, with the policies they were checked against (for their status).
    /// `None` until the first rebuild.
    teams_changed: watch::Sender<Option<Arc<crate::guardrails::Policies>>>,
    pricing_store: Store<ConfigMap>,
    pricing_watched: bool,
    /// The resourceVersion of the pricing ConfigMap last applied.
    pricing_version: Option<String>,
    /// The pricing ConfigMap's last good prices.
    cluster_prices: Option<crate::cost::Catalog>,
    guardrail_store: Store<GuardrailPolicy>,
    /// Whether GuardrailPolicies are watched (a rebuild then waits for their first sync too).
    guardrails_watched: bool,
    /// The uid and generation of each policy compiled: a rebuild for another reason (a status
    /// write included) compiles nothing again.
    guardrail_version: Option<Vec<(String, String)>>,
    guardrails: Arc<crate::guardrails::Policies>,
    /// The compiled policies, for their status writer.
    guardrails_changed: watch::Sender<Arc<crate::guardrails::Policies>>,
}

use reconcile::RouteOutcome;

/// The Secrets GuardrailPolicies' webhooks name, `(namespace, name)`.
fn webhook_secrets(policies: &[Arc<GuardrailPolicy>]) -> Vec<(String, String)> {
    policies
        .iter()
        .flat_map(|p| {
            let ns = p.namespace().unwrap_or_default();
            p.spec.checks.iter().filter_map(move |c| {
                let r = c.detector.webhook.as_ref()?.secret_ref.as_ref()?;
                Some((ns.clone(), r.name.clone()))
            })
        })
        .collect()
}

/// Readiness waits for the routing table and the API keys both, so a new replica never turns away
/// a valid key it has not loaded yet.
struct ReadyGate {
    table: AtomicBool,
    keys: AtomicBool,
    ready: Arc<AtomicBool>,
}

impl ReadyGate {
    fn mark(&self, part: &AtomicBool) {
        part.store(true, Ordering::Release);
        if self.table.load(Ordering::Acquire) && self.keys.load(Ordering::Acquire) {
            self.ready.store(true, Ordering::Release);
        }
    }
}

impl Loop {
    async fn run(
        &mut self,
        events: impl Stream<Item = (Source, Result<Signal, watcher::Error>)>,
        debounce: Duration,
        shutdown: CancellationToken,
    ) {
        let mut events = std::pin::pin!(events);
        let (mut routes_synced, mut secrets_synced) = (false, false);
        let mut teams_synced = !self.teams_watched;
        let mut pricing_synced = !self.pricing_watched;
        let mut guardrails_synced = !self.guardrails_watched;
        let mut rebuild_at: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                event = events.next() => match event {
                    None => return,
                    Some((source, Ok(signal))) => {
                        let due = match signal {
                            Signal::Synced => {
                                debug!(?source, "watch (re)synced");
                                match source {
                                    Source::Routes => routes_synced = true,
                                    Source::Secrets => secrets_synced = true,
                                    Source::Teams => teams_synced = true,
                                    Source::Pricing => pricing_synced = true,
                                    Source::Guardrails => guardrails_synced = true,
                                    Source::Pools => {}
                                }
                                true
                            }
                            Signal::Changed => true,
                            Signal::Relisting => false,
                            // Churn in Secrets no Route uses costs a set lookup, not a rebuild. A
                            // Route that starts using one schedules its own rebuild, which reads
                            // the current store.
                            Signal::Secret(namespace, name) => {
                                self.referenced.contains(&(namespace, name))
                            }
                        };
                        if due {
                            rebuild_at.get_or_insert_with(|| Instant::now() + debounce);
                        }
                    }
                    Some((source, Err(e))) => {
                        warn!(?source, error = %e, "watch failed; reconnecting with backoff and serving the last good table");
                        let resource = match source { Source::Routes => "routes", Source::Secrets => "secrets", Source::Teams => "teams", Source::Pricing => "configmaps", Source::Guardrails => "guardrailpolicies", Source::Pools => "pools" };
                        self.handles.metrics.watch_restarts.get_or_create(&ResourceLabels { resource }).inc();
                    }
                },
                _ = sleep_until(rebuild_at), if rebuild_at.is_some() && routes_synced && secrets_synced && teams_synced && pricing_synced && guardrails_synced => {
                    rebuild_at = None;
                    if !self.rebuild().await {
                        rebuild_at = Some(Instant::now() + self.retry.next_delay());
                    } else {
                        self.retry.reset();
                    }
                }
            }
        }
    }

    /// Applies the pricing ConfigMap when it changed; a bad one keeps the last good prices.
    fn refresh_prices(&mut self) {
        if !self.pricing_watched {
            return;
        }
        let current = self.pricing_store.state().into_iter().next();
        let version = current
            .as_ref()
            .map(|c| c.resource_version().unwrap_or_default());
        if version == self.pricing_version {
            return;
        }
        self.pricing_version = version;
        let Some(map) = current else {
            self.cluster_prices = None;
            info!("no pricing ConfigMap: the built-in catalog and per-Route prices apply");
            return;
        };
        let yaml = map
            .data
            .as_ref()
            .and_then(|d| d.get(PRICING_KEY))
            .cloned()
            .unwrap_or_default();
        match crate::cost::Catalog::parse(&yaml) {
            Ok(catalog) => {
                info!(
                    configmap = %map.name_any(),
                    models = catalog.len(),
                    "cluster-wide prices applied"
                );
                self.cluster_prices = Some(catalog);
            }
            Err(e) => warn!(
                configmap = %map.name_any(),
                error = %e,
                "the pricing ConfigMap does not parse; the last good prices stay in force"
            ),
        }
    }

    /// Compiles the GuardrailPolicies when any changed (once per change, never per call).
    fn refresh_guardrails(&mut self) {
        let policies = self.guardrail_store.state();
        let mut version: Vec<(String, String)> = policies
            .iter()
            .map(|p| {
                (
                    format!("{}/{}", p.namespace().unwrap_or_default(), p.name_any()),
                    format!(
                        "{}#{}",
                        p.uid().unwrap_or_default(),
                        p.metadata.generation.unwrap_or_default()
                    ),
                )
            })
            .collect();
        version.sort_unstable();
        if self.guardrail_version.as_ref() == Some(&version) {
            return;
        }
        self.guardrail_version = Some(version);
        self.guardrails = Arc::new(crate::guardrails::compile_all(&policies));
    }

    /// Rebuilds and publishes the table; false if a Secret read failed and a retry is due.
    async fn rebuild(&mut self) -> bool {
        let started = std::time::Instant::now();
        self.refresh_prices();
        self.refresh_guardrails();
        let routes = self.route_store.state();
        let wanted: HashSet<(String, String)> = routes
            .iter()
            .flat_map(|r| {
                let ns = r.namespace();
                r.spec
                    .models()
                    .filter_map(move |m| Some((ns.clone()?, m.secret_ref.as_ref()?.name.clone())))
            })
            .chain(webhook_secrets(&self.guardrail_store.state()))
            .collect();
        self.referenced.clone_from(&wanted);
        let complete = self
            .secret_cache
            .refresh(&self.client, wanted, &self.secret_store, &self.policy)
            .await;
        let prices = crate::cost::Prices {
            catalog: crate::cost::Catalog::builtin(),
            cluster: self.cluster_prices.as_ref(),
        };
        let pools = self.pools.want(
            routes
                .iter()
                .flat_map(|r| {
                    let ns = r.namespace().unwrap_or_default();
                    r.spec
                        .models()
                        .filter_map(|m| crate::pools::PoolKey::of(m, &ns))
                        .collect::<Vec<_>>()
                })
                .collect(),
        );
        // Webhooks' credentials and judges' Routes, read with this build's Secrets and Routes.
        let guardrails = Arc::new(crate::guardrails::resolve_all(
            &self.guardrails,
            &reconcile::GuardrailEnv {
                secrets: &self.secret_cache,
                policy: &self.policy,
                routes: &routes,
            },
        ));
        // Their status says what this build found: a judge Route or webhook Secret that is
        // missing makes the policy InvalidSpec, naming the check, as an invalid regex does.
        self.guardrails_changed
            .send_replace(Arc::clone(&guardrails));
        let reconciled = reconcile_with(
            &routes,
            &self.secret_cache,
            &self.handles.table.load(),
            &self.policy,
            prices,
            &pools,
            &guardrails,
        );
        let (total, serving) = (
            reconciled.outcomes.len(),
            reconciled
                .outcomes
                .iter()
                .filter(|o| o.outcome.is_ready())
                .count(),
        );
        let mut reconciled = reconciled;
        reconciled.table.teams = Arc::new(teams::build(
            &self.team_store.state(),
            &reconciled.table,
            &guardrails,
        ));
        self.teams_changed.send_replace(Some(guardrails));
        let metrics = &self.handles.metrics;
        reconciled.record(metrics, started.elapsed());
        if !complete {
            metrics.reconcile_errors.inc();
        }
        self.handles.table.store(Arc::new(reconciled.table));
        if !self.gate.table.load(Ordering::Acquire) {
            self.gate.mark(&self.gate.table);
            info!(
                routes = total,
                ready = serving,
                "first complete sync; routing table published"
            );
        }
        debug!(
            routes = total,
            ready = serving,
            elapsed_us = started.elapsed().as_micros() as u64,
            "routing table rebuilt"
        );
        for change in &reconciled.short_name_changes {
            metrics.short_name_changes.inc();
            warn!(name = %change.name, from = %change.from, to = %change.to, "the one-word route name changed owner: its callers now reach another namespace's Route");
        }
        self.outcomes.send_replace(Arc::new(reconciled.outcomes));
        complete
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => futures::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use kube::runtime::reflector::store::Writer;

    use super::*;

    type Events = futures::channel::mpsc::UnboundedSender<(Source, Result<Signal, watcher::Error>)>;

    /// A control loop over in-memory stores; the client points nowhere and is never called.
    fn control_loop(routes: Store<Route>, secrets: Store<PartialObjectMeta<Secret>>) -> Loop {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
        let ready = Arc::new(AtomicBool::new(false));
        Loop {
            pools: Arc::new(crate::pools::Pools::new(Arc::new(Metrics::new()))),
            client: Client::try_from(config).unwrap(),
            route_store: routes,
            secret_store: secrets,
            secret_cache: SecretCache::default(),
            handles: ControllerHandles {
                table: crate::table::RoutingTable::default().shared(),
                ready: ready.clone(),
                metrics: Arc::new(Metrics::new()),
                api_keys: Default::default(),
                limits: None,
            },
            gate: Arc::new(ReadyGate {
                table: AtomicBool::new(false),
                keys: AtomicBool::new(true),
                ready,
            }),
            outcomes: watch::channel(Arc::new(Vec::new())).0,
            retry: RetryBackoff::new(Duration::from_millis(10), Duration::from_millis(100)),
            referenced: HashSet::new(),
            policy: policy::OperatorPolicy::default(),
            team_store: reflector::store::<Team>().0,
            teams_watched: false,
            teams_changed: watch::channel(None).0,
            pricing_store: reflector::store::<ConfigMap>().0,
            pricing_watched: false,
            pricing_version: None,
            cluster_prices: None,
            guardrail_store: reflector::store::<GuardrailPolicy>().0,
            guardrails_watched: false,
            guardrail_version: None,
            guardrails: Arc::default(),
            guardrails_changed: watch::channel(Arc::default()).0,
        }
    }

    async fn settle(metrics: &Metrics, expect: u64) {
        for _ in 0..100 {
            if metrics.reconciles.get() >= expect {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Long enough for any stray rebuild to show.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    #[tokio::test]
    async fn churn_in_unreferenced_secrets_never_rebuilds_the_table() {
        let mut route_writer: Writer<Route> = Writer::default();
        let route: Route = serde_json::from_value(serde_json::json!({
            "apiVersion": "portcullis.dev/v1alpha1",
            "kind": "Route",
            "metadata": {"name": "chat", "namespace": "ns"},
            "spec": {"routeType": "llm/v1/chat", "model": {
                "provider": "openai", "name": "m", "secretRef": {"name": "used"}}}
        }))
        .unwrap();
        route_writer.apply_watcher_event(&watcher::Event::Apply(route));
        let secret_writer: Writer<PartialObjectMeta<Secret>> = Writer::default();
        let mut control = control_loop(route_writer.as_reader(), secret_writer.as_reader());
        let metrics = control.handles.metrics.clone();
        let (tx, rx): (Events, _) = futures::channel::mpsc::unbounded();
        let stop = CancellationToken::new();
        let running = tokio::spawn({
            let stop = stop.clone();
            async move { control.run(rx, Duration::from_millis(1), stop).await }
        });
        let send = |source, signal| tx.unbounded_send((source, Ok(signal))).unwrap();
        send(Source::Routes, Signal::Synced);
        send(Source::Secrets, Signal::Synced);
        settle(&metrics, 1).await;
        assert_eq!(metrics.reconciles.get(), 1);

        for i in 0..1000 {
            send(
                Source::Secrets,
                Signal::Secret("ns".into(), format!("unrelated-{i}")),
            );
            send(
                Source::Secrets,
                Signal::Secret("other".into(), "used".into()),
            );
        }
        settle(&metrics, 2).await;
        assert_eq!(
            metrics.reconciles.get(),
            1,
            "unrelated Secret events rebuilt the table"
        );

        send(Source::Secrets, Signal::Secret("ns".into(), "used".into()));
        settle(&metrics, 2).await;
        assert_eq!(
            metrics.reconciles.get(),
            2,
            "a referenced Secret's change must rebuild"
        );
        send(Source::Routes, Signal::Changed);
        settle(&metrics, 3).await;
        assert_eq!(metrics.reconciles.get(), 3);
        stop.cancel();
        let _ = running.await;
    }
}
