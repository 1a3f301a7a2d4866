//! Start-up and shutdown of the data plane, shared by `run` (Routes from a cluster) and `serve`
//! (Routes from files): the common flags, the listeners, and the drain on SIGTERM. Where the
//! routing table comes from is the caller's business; it gets the handles to fill it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::access::{
    Authenticator, CacheTtl, DefaultAccess, SharedApiKeys, TokenPolicy, TokenReviewer,
};
use crate::controller::policy::Egress;
use crate::dataplane::listener::{ListenerArgs, ListenerLimits, Placement};
use crate::dataplane::via::Via;
use crate::dataplane::workers::Workers;
use crate::dataplane::{self, AppState, ConfigStatus, UpstreamLimits};
use crate::limits::Limiter;
use crate::table::{RoutingTable, SharedTable};
use crate::telemetry::LogFormat;
use crate::telemetry::metrics::Metrics;

/// More data-plane threads than this is a typo, not a machine.
const MAX_WORKERS: usize = 1024;

/// Flags of the data plane, the same for `run` and `serve`.
#[derive(clap::Args, Clone, Debug)]
pub struct DataPlaneArgs {
    #[arg(
        long,
        env = "PORTCULLIS_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Data-plane threads, each serving its share of client connections start to finish
    /// (default: the CPUs this process may use; 0 serves on the shared runtime instead).
    #[arg(long, env = "PORTCULLIS_WORKERS")]
    pub workers: Option<usize>,
    /// Largest accepted request body, in bytes (its parsed JSON may take at most 8 times this).
    #[arg(long, env = "PORTCULLIS_BODY_LIMIT", default_value_t = 2 * 1024 * 1024)]
    pub body_limit: usize,
    /// Longest wait for a provider: the whole answer, or between two chunks of a stream (seconds).
    #[arg(long, env = "PORTCULLIS_UPSTREAM_TIMEOUT", default_value_t = 600.0)]
    pub upstream_timeout: f64,
    /// Largest single event of an upstream stream (SSE event, NDJSON line, event-stream frame), in
    /// bytes; a larger one ends the stream with an error (502 before the first byte was sent).
    #[arg(long, env = "PORTCULLIS_MAX_STREAM_EVENT", default_value_t = crate::providers::sse::DEFAULT_MAX_FRAME)]
    pub max_stream_event: usize,
    /// Largest non-streaming provider answer read (bytes); a larger one fails the call with a 502.
    #[arg(long, env = "PORTCULLIS_MAX_UPSTREAM_BODY", default_value_t = 64 * 1024 * 1024)]
    pub max_upstream_body: usize,
    /// A provider stream that sends nothing for this long ends with an error event (seconds).
    #[arg(long, env = "PORTCULLIS_STREAM_IDLE_TIMEOUT", default_value_t = 60.0)]
    pub stream_idle_timeout: f64,
    /// Upstream hosts Routes may call: names (`api.openai.com`), wildcards (`*.openai.azure.com`),
    /// addresses and CIDRs, comma-separated. Default: any host but link-local and cloud metadata
    /// addresses (which must be listed here explicitly to be reachable).
    #[arg(long, env = "PORTCULLIS_ALLOWED_UPSTREAM_HOSTS", value_delimiter = ',')]
    pub allowed_upstream_hosts: Vec<String>,
    /// Routes per page of the MLflow route and endpoint listings (MLflow's own page size).
    #[arg(long, env = "PORTCULLIS_PAGE_SIZE", default_value_t = 3000, value_parser = clap::value_parser!(u32).range(1..))]
    pub page_size: u32,
    /// On SIGTERM: seconds to keep accepting connections after readiness turns false (endpoint propagation).
    #[arg(long, default_value_t = 5.0)]
    pub shutdown_delay: f64,
    /// OTLP/HTTP traces endpoint (for example http://otel-collector:4318/v1/traces); no export when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// On SIGTERM: longest wait for in-flight requests and open streams to finish (seconds).
    #[arg(long, default_value_t = 60.0)]
    pub drain_timeout: f64,
    /// Who may call Routes without `access`: allow-all (anyone, as MLflow's gateway) or authenticated
    /// (any valid ServiceAccount token or API key).
    #[arg(
        long,
        env = "PORTCULLIS_DEFAULT_ACCESS",
        value_enum,
        default_value = "allow-all"
    )]
    pub default_access: DefaultAccess,
    /// The audience ServiceAccount tokens must be issued for.
    #[arg(long, env = "PORTCULLIS_TOKEN_AUDIENCE", default_value = "portcullis")]
    pub token_audience: String,
    /// Issuers (`iss`) ServiceAccount tokens may come from, comma-separated; a token from another
    /// is refused without a TokenReview. Default: not checked here (the API server checks it).
    #[arg(long, env = "PORTCULLIS_TOKEN_ISSUER", value_delimiter = ',')]
    pub token_issuer: Vec<String>,
    /// New ServiceAccount tokens reviewed per second at most (a bucket of as many): beyond it a
    /// new token is answered 503 until there is room; tokens accepted before are not counted.
    #[arg(long, env = "PORTCULLIS_TOKEN_REVIEW_RATE", default_value_t = 50.0)]
    pub token_review_rate: f64,
    /// TokenReviews in flight at most.
    #[arg(long, env = "PORTCULLIS_TOKEN_REVIEW_CONCURRENCY", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub token_review_concurrency: u32,
    /// Seconds a valid ServiceAccount token is trusted without asking the API server again.
    #[arg(long, default_value_t = 30.0)]
    pub token_cache_ttl: f64,
    /// Seconds an invalid token is remembered as invalid.
    #[arg(long, default_value_t = 5.0)]
    pub negative_token_cache_ttl: f64,
    #[command(flatten)]
    pub store: crate::store::StoreArgs,
    /// Replicas serving together: while counting alone (no store, or the store is unreachable),
    /// each replica enforces 1/N of every limit.
    #[arg(long, env = "PORTCULLIS_REPLICAS", default_value_t = 1)]
    pub replicas: u32,
    /// Callers without identity (no credential, under `--default-access allow-all`) are members
    /// of this Team: its limits, budgets and `routes` hold them. While the Team does not exist
    /// they are refused (401). Unset: they belong to no Team.
    #[arg(long, env = "PORTCULLIS_ANONYMOUS_TEAM")]
    pub anonymous_team: Option<String>,
    /// Translate every call, even when the caller and every backend speak the same API (OpenAI
    /// chat to OpenAI, Anthropic Messages to Anthropic): by default those pass through with only
    /// `model` changed.
    #[arg(long, env = "PORTCULLIS_NO_PASS_THROUGH")]
    pub no_pass_through: bool,
    /// The store of the response cache (Routes with `spec.cache`), as `--limits-store` is
    /// written; default: the limits store. Without either, each replica caches in its memory.
    #[arg(long, env = "PORTCULLIS_CACHE_STORE")]
    pub cache_store: Option<String>,
    /// Bytes of answers one replica caches in its memory when there is no shared store (least
    /// recently used out first).
    #[arg(long, env = "PORTCULLIS_CACHE_MEMORY_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub cache_memory_bytes: usize,
    #[command(flatten)]
    pub listener: ListenerArgs,
    #[command(flatten)]
    pub mcp: crate::mcp::McpArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot load the Kubernetes client configuration: {0}")]
    KubeConfig(String),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error(transparent)]
    Controller(#[from] crate::controller::ControllerError),
    #[error("the data plane stopped: {0}")]
    Serve(std::io::Error),
    /// The configuration files hold nothing that can serve, or keys that cannot be honoured.
    #[error("{0}")]
    Files(String),
}

impl StartError {
    /// 2 for configuration files that cannot serve (as `mlflow gateway start` exits on a bad
    /// config), 1 for everything else.
    pub fn exit_code(&self) -> std::process::ExitCode {
        match self {
            StartError::Files(_) => std::process::ExitCode::from(2),
            _ => std::process::ExitCode::FAILURE,
        }
    }
}

/// A positive number of seconds from a flag, or a start-up error naming the flag.
pub fn positive_secs(v: f64, flag: &str) -> Result<Duration, StartError> {
    Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| StartError::Config(format!("--{flag} must be a positive number of seconds")))
}

/// The data-plane flags, checked before any port is bound.
#[derive(Clone, Debug)]
pub struct Settings {
    pub upstream_timeout: Duration,
    pub listener_limits: ListenerLimits,
    /// The upstream hosts Routes may call (`--allowed-upstream-hosts`), checked by reconcile.
    pub egress: Egress,
    pub upstream_limits: UpstreamLimits,
    pub drain_timeout: Duration,
    pub shutdown_delay: Duration,
    pub token_ttl: CacheTtl,
    pub token_policy: TokenPolicy,
    pub workers: usize,
}

impl DataPlaneArgs {
    pub fn check(&self) -> Result<Settings, StartError> {
        let token_ttl = CacheTtl {
            positive: positive_secs(self.token_cache_ttl, "token-cache-ttl")?,
            negative: positive_secs(self.negative_token_cache_ttl, "negative-token-cache-ttl")?,
            ..CacheTtl::default()
        };
        if self.replicas == 0 {
            return Err(StartError::Config("--replicas must be at least 1".into()));
        }
        if self.max_stream_event == 0 {
            return Err(StartError::Config(
                "--max-stream-event must be at least 1".into(),
            ));
        }
        if self.workers.is_some_and(|n| n > MAX_WORKERS) {
            return Err(StartError::Config(format!(
                "--workers must be at most {MAX_WORKERS}"
            )));
        }
        if !(self.token_review_rate.is_finite() && self.token_review_rate > 0.0) {
            return Err(StartError::Config(
                "--token-review-rate must be a positive number".into(),
            ));
        }
        if self.body_limit == 0 {
            return Err(StartError::Config("--body-limit must be at least 1".into()));
        }
        if self.token_audience.is_empty() {
            return Err(StartError::Config(
                "--token-audience must not be empty".into(),
            ));
        }
        Ok(Settings {
            upstream_timeout: positive_secs(self.upstream_timeout, "upstream-timeout")?,
            listener_limits: self.listener.limits().map_err(StartError::Config)?,
            egress: Egress::parse(&self.allowed_upstream_hosts).map_err(StartError::Config)?,
            upstream_limits: UpstreamLimits {
                max_body: self.max_upstream_body,
                stream_idle: positive_secs(self.stream_idle_timeout, "stream-idle-timeout")?,
                max_stream_event: self.max_stream_event,
                ..Default::default()
            },
            drain_timeout: positive_secs(self.drain_timeout, "drain-timeout")?,
            shutdown_delay: Duration::try_from_secs_f64(self.shutdown_delay).map_err(|_| {
                StartError::Config("--shutdown-delay must be a number of seconds".into())
            })?,
            token_ttl,
            token_policy: TokenPolicy {
                audience: self.token_audience.clone(),
                issuers: self.token_issuer.clone(),
                rate: self.token_review_rate,
                concurrency: self.token_review_concurrency as usize,
            },
            workers: self
                .workers
                .unwrap_or_else(dataplane::workers::default_count),
        })
    }
}

/// What a route source (the controller, or the file loader) fills for the data plane.
#[derive(Clone)]
pub struct SourceHandles {
    pub table: SharedTable,
    /// Set once the source has published its first complete table.
    pub ready: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
    pub api_keys: SharedApiKeys,
    pub limits: Arc<Limiter>,
}

/// A bound, not yet serving data plane.
pub struct DataPlane {
    state: Arc<AppState>,
    mcp: Arc<crate::mcp::McpGateway>,
    api_keys: SharedApiKeys,
    listener: tokio::net::TcpListener,
    metrics_listener: tokio::net::TcpListener,
    pub bound: SocketAddr,
    pub metrics_bound: SocketAddr,
    settings: Settings,
}

impl DataPlane {
    /// Builds the shared state and binds both ports. `reviewer` gets the metrics so TokenReview
    /// calls are counted; `None` means bearer tokens other than API keys are never valid.
    #[allow(clippy::too_many_arguments)] // each is one start-up choice of the caller
    pub async fn bind(
        args: &DataPlaneArgs,
        settings: Settings,
        listen: SocketAddr,
        metrics_listen: SocketAddr,
        via: Via,
        reviewer: impl FnOnce(Arc<Metrics>) -> Option<Arc<dyn TokenReviewer>>,
        config: Option<Arc<ConfigStatus>>,
    ) -> Result<DataPlane, StartError> {
        let http = dataplane::http_client(settings.upstream_timeout, &settings.egress)
            .map_err(|e| StartError::Config(e.to_string()))?;
        let metrics = Arc::new(Metrics::new());
        let mut limits_store = None;
        let limits = Arc::new(match &args.store.limits_store {
            Some(url) => {
                let store = crate::store::Store::open(&args.store, url)
                    .map_err(|e| StartError::Config(e.to_string()))?;
                limits_store = Some(store.clone());
                Limiter::shared(metrics.clone(), args.replicas, store)
            }
            None => Limiter::local(metrics.clone(), args.replicas),
        });
        let cache_store = match (&args.cache_store, limits_store) {
            (Some(url), _) => crate::cache::CacheStore::shared(
                crate::store::Store::open(&args.store, url)
                    .map_err(|e| StartError::Config(e.to_string()))?,
            ),
            (None, Some(store)) => crate::cache::CacheStore::shared(store),
            (None, None) => crate::cache::CacheStore::Local(crate::cache::LocalStore::new(
                args.cache_memory_bytes,
            )),
        };
        let cache = Arc::new(crate::cache::Cache::new(cache_store, metrics.clone()));
        let api_keys = SharedApiKeys::default();
        let auth = Arc::new(Authenticator::with_policy(
            api_keys.clone(),
            reviewer(metrics.clone()),
            settings.token_ttl,
            args.default_access,
            settings.token_policy.clone(),
        ));
        let mcp = Arc::new(crate::mcp::McpGateway::new(&args.mcp, http.clone()));
        let state = Arc::new(AppState {
            table: RoutingTable::default().shared(),
            http,
            ready: Arc::new(AtomicBool::new(false)),
            body_limit: args.body_limit,
            upstream_timeout: settings.upstream_timeout,
            page_size: args.page_size as usize,
            metrics,
            draining: Arc::new(AtomicBool::new(false)),
            auth,
            limits,
            config,
            upstream_limits: settings.upstream_limits,
            via,
            anonymous_team: args.anonymous_team.as_deref().map(Arc::from),
            pass_through: !args.no_pass_through,
            cache,
        });
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| StartError::Bind(listen, e))?;
        let bound = listener
            .local_addr()
            .map_err(|e| StartError::Bind(listen, e))?;
        let metrics_listener = tokio::net::TcpListener::bind(metrics_listen)
            .await
            .map_err(|e| StartError::Bind(metrics_listen, e))?;
        let metrics_bound = metrics_listener
            .local_addr()
            .map_err(|e| StartError::Bind(metrics_listen, e))?;
        info!(
            listen = %bound,
            metrics_listen = %metrics_bound,
            body_limit = args.body_limit,
            upstream_timeout_s = settings.upstream_timeout.as_secs_f64(),
            default_access = ?args.default_access,
            token_audience = %args.token_audience,
            limits_store = if args.store.limits_store.is_some() { "redis" } else { "local" },
            cache_store = state.cache.store_name(),
            store_timeout_ms = args.store.store_timeout.as_millis() as u64,
            replicas = args.replicas,
            workers = settings.workers,
            listener_limits = ?settings.listener_limits,
            "data plane listening"
        );
        Ok(DataPlane {
            state,
            mcp,
            api_keys,
            listener,
            metrics_listener,
            bound,
            metrics_bound,
            settings,
        })
    }

    /// The handles a route source publishes through.
    pub fn source_handles(&self) -> SourceHandles {
        SourceHandles {
            table: self.state.table.clone(),
            ready: self.state.ready.clone(),
            metrics: self.state.metrics.clone(),
            api_keys: self.api_keys.clone(),
            limits: self.state.limits.clone(),
        }
    }

    /// The MCP gateway, for its controller.
    pub fn mcp(&self) -> Arc<crate::mcp::McpGateway> {
        self.mcp.clone()
    }

    /// Serves until SIGTERM/SIGINT and the drain are over, or until `source` ends by itself (its
    /// result is returned then). `stop_source` is cancelled after the drain, so late table
    /// changes still apply while in-flight requests finish.
    pub async fn serve(
        self,
        mut source: JoinHandle<Result<(), StartError>>,
        stop_source: CancellationToken,
    ) -> Result<(), StartError> {
        let DataPlane {
            state,
            mcp,
            listener,
            metrics_listener,
            settings,
            ..
        } = self;
        let (shutdown_delay, drain_timeout) = (settings.shutdown_delay, settings.drain_timeout);
        let metrics = state.metrics.clone();
        let draining = state.draining.clone();

        // SIGTERM: readiness fails at once; connections are still accepted for `shutdown_delay`, then
        // the listener closes and in-flight requests and streams drain for up to `drain_timeout`.
        let signalled = CancellationToken::new();
        let stop_accepting = CancellationToken::new();
        tokio::spawn(signal_shutdown(signalled.clone()));
        tokio::spawn({
            let (signalled, stop_accepting) = (signalled.clone(), stop_accepting.clone());
            async move {
                signalled.cancelled().await;
                draining.store(true, Ordering::Release);
                info!(
                    delay_s = shutdown_delay.as_secs_f64(),
                    "shutting down: readiness is false; draining"
                );
                tokio::time::sleep(shutdown_delay).await;
                stop_accepting.cancel();
            }
        });

        // MCP beside the LLM routes, sharing the (per-worker) state: the data plane never names MCP.
        let router = move |app: Arc<AppState>| {
            let gateway = mcp.clone();
            let mcp = crate::mcp::routes(crate::mcp::McpState {
                app: app.clone(),
                gateway,
            });
            dataplane::router(app, mcp)
        };
        let placement = match settings.workers {
            0 => Placement::Here(router(state)),
            n => {
                let (base, timeout) = ((*state).clone(), settings.upstream_timeout);
                let egress = settings.egress.clone();
                let workers = Workers::start(n, move || {
                    // A pool per worker keeps each upstream connection on the thread that uses it.
                    let http = dataplane::http_client(timeout, &egress)
                        .unwrap_or_else(|_| base.http.clone());
                    router(Arc::new(AppState {
                        http,
                        ..base.clone()
                    }))
                })
                .map_err(StartError::Serve)?;
                Placement::Workers(workers)
            }
        };
        let server = dataplane::listener::serve(
            listener,
            placement,
            settings.listener_limits,
            metrics.clone(),
            stop_accepting.clone(),
        );
        let metrics_server = axum::serve(metrics_listener, dataplane::metrics_router(metrics))
            .with_graceful_shutdown(stop_accepting.clone().cancelled_owned());
        tokio::spawn(async move {
            if let Err(e) = metrics_server.await {
                warn!(error = %e, "the metrics endpoint stopped");
            }
        });
        let drain_deadline = async {
            stop_accepting.cancelled().await;
            tokio::time::sleep(drain_timeout).await;
        };

        let result = tokio::select! {
            served = server => served.map_err(StartError::Serve),
            _ = drain_deadline => {
                warn!(timeout_s = drain_timeout.as_secs_f64(), "drain timeout reached; closing the remaining connections");
                Ok(())
            }
            finished = &mut source => {
                return match finished {
                    Ok(result) => result,
                    Err(e) => Err(StartError::Config(format!("the route source task failed: {e}"))),
                };
            }
        };
        // The source outlives the drain so late table changes still apply; stopping it releases the Lease.
        stop_source.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), source).await;
        info!("stopped");
        result
    }
}

async fn signal_shutdown(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => futures::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    info!("shutdown signal received");
    token.cancel();
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: super::DataPlaneArgs,
    }

    fn workers(flags: &[&str]) -> Result<usize, String> {
        let cli = Cli::try_parse_from(std::iter::once("portcullis").chain(flags.iter().copied()))
            .map_err(|e| e.to_string())?;
        cli.args
            .check()
            .map(|s| s.workers)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn workers_default_to_the_cpus_and_are_bounded() {
        assert_eq!(workers(&[]), Ok(crate::dataplane::workers::default_count()));
        assert_eq!(workers(&["--workers", "0"]), Ok(0));
        assert_eq!(workers(&["--workers", "3"]), Ok(3));
        assert!(
            workers(&["--workers", "100000"])
                .unwrap_err()
                .contains("--workers")
        );
        assert!(workers(&["--workers", "-1"]).is_err());
    }
}
