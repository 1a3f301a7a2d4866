use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use portcullis::access::{Authenticator, CacheTtl, DefaultAccess, TokenReviewer};
use portcullis::controller::consumers::KubeTokenReviewer;
use portcullis::controller::leader::LeaderConfig;
use portcullis::controller::{self, ControllerConfig, ControllerHandles};
use portcullis::dataplane::{self, AppState};
use portcullis::limits::Limiter;
use portcullis::table::RoutingTable;
use portcullis::telemetry::metrics::Metrics;
use portcullis::telemetry::{self, LogFormat};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "portcullis",
    version,
    about = "A Kubernetes-native LLM gateway"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller and the data plane against a cluster (in-cluster config or KUBECONFIG).
    Run(Box<RunArgs>),
    /// Print the Route CRD as YAML.
    Crd,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Address the data plane listens on (port 0 picks a free port; the bound address is logged).
    #[arg(long, env = "PORTCULLIS_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Watch Routes and Secrets in this namespace only (default: all namespaces).
    #[arg(long, env = "PORTCULLIS_NAMESPACE")]
    namespace: Option<String>,
    #[arg(
        long,
        env = "PORTCULLIS_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    log_format: LogFormat,
    /// Largest accepted request body, in bytes.
    #[arg(long, env = "PORTCULLIS_BODY_LIMIT", default_value_t = 10 * 1024 * 1024)]
    body_limit: usize,
    /// Longest wait for a provider: the whole answer, or between two chunks of a stream (seconds).
    #[arg(long, env = "PORTCULLIS_UPSTREAM_TIMEOUT", default_value_t = 600.0)]
    upstream_timeout: f64,
    /// Largest single event of an upstream stream (SSE event, NDJSON line, event-stream frame), in
    /// bytes; a larger one ends the stream with an error (502 before the first byte was sent).
    #[arg(long, env = "PORTCULLIS_MAX_STREAM_EVENT", default_value_t = portcullis::providers::sse::DEFAULT_MAX_FRAME)]
    max_stream_event: usize,
    /// Largest non-streaming provider answer read (bytes); a larger one fails the call with a 502.
    #[arg(long, env = "PORTCULLIS_MAX_UPSTREAM_BODY", default_value_t = 64 * 1024 * 1024)]
    max_upstream_body: usize,
    /// A provider stream that sends nothing for this long ends with an error event (seconds).
    #[arg(long, env = "PORTCULLIS_STREAM_IDLE_TIMEOUT", default_value_t = 60.0)]
    stream_idle_timeout: f64,
    /// Only Secrets matching this label selector may back a Route (for example
    /// `portcullis.dev/provider-key=true`); a Route referencing another is not ready, and nothing
    /// is read from that Secret. Default: any Secret of the Route's namespace.
    #[arg(long, env = "PORTCULLIS_SECRET_SELECTOR")]
    secret_selector: Option<String>,
    /// Upstream hosts Routes may call: names (`api.openai.com`), wildcards (`*.openai.azure.com`),
    /// addresses and CIDRs, comma-separated. Default: any host but link-local and cloud metadata
    /// addresses (which must be listed here explicitly to be reachable).
    #[arg(long, env = "PORTCULLIS_ALLOWED_UPSTREAM_HOSTS", value_delimiter = ',')]
    allowed_upstream_hosts: Vec<String>,
    /// Namespaces whose Routes also get their one-word name (`*`: all). Every Route is callable as
    /// `namespace/name`; on a multi-tenant cluster list only the namespaces trusted to own names.
    #[arg(
        long,
        env = "PORTCULLIS_PUBLIC_NAMESPACES",
        value_delimiter = ',',
        default_value = "*"
    )]
    public_namespaces: Vec<String>,
    /// Routes per page of the MLflow route and endpoint listings (MLflow's own page size).
    #[arg(long, env = "PORTCULLIS_PAGE_SIZE", default_value_t = 3000, value_parser = clap::value_parser!(u32).range(1..))]
    page_size: u32,
    /// Upper bound of the reconnect backoff after the API server went away (seconds).
    #[arg(long, default_value_t = 10.0)]
    max_watch_backoff: f64,
    /// Address of the Prometheus `/metrics` endpoint (a separate port from the data plane).
    #[arg(
        long,
        env = "PORTCULLIS_METRICS_LISTEN",
        default_value = "0.0.0.0:9464"
    )]
    metrics_listen: SocketAddr,
    /// Elect a leader through a Lease so that only one replica writes Route status and Events.
    #[arg(long, env = "PORTCULLIS_LEADER_ELECTION")]
    leader_election: bool,
    /// Namespace of the leader-election Lease (defaults to the pod's namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    #[arg(long, default_value = "portcullis-leader")]
    lease_name: String,
    /// Seconds a leader's lease stays valid without renewal; a dead leader is replaced within this.
    #[arg(long, default_value_t = 15)]
    lease_duration: u64,
    /// Seconds before expiry at which the leader renews.
    #[arg(long, default_value_t = 5)]
    lease_grace: u64,
    /// This replica's identity in the Lease and in Events (defaults to the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// On SIGTERM: seconds to keep accepting connections after readiness turns false (endpoint propagation).
    #[arg(long, default_value_t = 5.0)]
    shutdown_delay: f64,
    /// OTLP/HTTP traces endpoint (for example http://otel-collector:4318/v1/traces); no export when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")]
    otlp_endpoint: Option<String>,
    /// On SIGTERM: longest wait for in-flight requests and open streams to finish (seconds).
    #[arg(long, default_value_t = 60.0)]
    drain_timeout: f64,
    /// Who may call Routes without `access`: allow-all (anyone, as MLflow's gateway) or authenticated
    /// (any valid ServiceAccount token or API key).
    #[arg(
        long,
        env = "PORTCULLIS_DEFAULT_ACCESS",
        value_enum,
        default_value = "allow-all"
    )]
    default_access: DefaultAccess,
    /// The audience ServiceAccount tokens must be issued for.
    #[arg(long, env = "PORTCULLIS_TOKEN_AUDIENCE", default_value = "portcullis")]
    token_audience: String,
    /// Seconds a valid ServiceAccount token is trusted without asking the API server again.
    #[arg(long, default_value_t = 30.0)]
    token_cache_ttl: f64,
    /// Seconds an invalid token is remembered as invalid.
    #[arg(long, default_value_t = 5.0)]
    negative_token_cache_ttl: f64,
    /// Share limits across replicas through this Redis (redis://[:password@]host:port[/db]);
    /// without it each replica counts alone.
    #[arg(long, env = "PORTCULLIS_LIMITS_STORE")]
    limits_store: Option<String>,
    /// Replicas serving together: while counting alone (no store, or the store is unreachable),
    /// each replica enforces 1/N of every limit.
    #[arg(long, env = "PORTCULLIS_REPLICAS", default_value_t = 1)]
    replicas: u32,
    /// Take N from the ready endpoints of this Service (in the pod's namespace) instead of --replicas.
    #[arg(long, env = "PORTCULLIS_REPLICAS_SERVICE")]
    replicas_service: Option<String>,
    #[command(flatten)]
    listener: dataplane::listener::ListenerArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd => match portcullis::crd_yaml() {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("cannot render the CRD: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => {
            // kube, reqwest and the OTLP exporter share rustls; pick its crypto provider before any client exists.
            let _ = rustls::crypto::ring::default_provider().install_default();
            let _telemetry = match telemetry::init(args.log_format, args.otlp_endpoint.as_deref()) {
                Ok(guard) => guard,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(64);
                }
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    error!(error = %e, "cannot start the async runtime");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run(*args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("cannot load the Kubernetes client configuration: {0}")]
    KubeConfig(String),
    #[error("cannot listen on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error(transparent)]
    Controller(#[from] controller::ControllerError),
    #[error("the data plane stopped: {0}")]
    Serve(std::io::Error),
}

async fn run(args: RunArgs) -> Result<(), StartError> {
    // Configuration is checked before any port is bound.
    let secs = |v: f64, flag: &str| {
        Duration::try_from_secs_f64(v)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| {
                StartError::Config(format!("--{flag} must be a positive number of seconds"))
            })
    };
    let upstream_timeout = secs(args.upstream_timeout, "upstream-timeout")?;
    let max_backoff = secs(args.max_watch_backoff, "max-watch-backoff")?;
    let drain_timeout = secs(args.drain_timeout, "drain-timeout")?;
    let token_ttl = CacheTtl {
        positive: secs(args.token_cache_ttl, "token-cache-ttl")?,
        negative: secs(args.negative_token_cache_ttl, "negative-token-cache-ttl")?,
        ..CacheTtl::default()
    };
    let listener_limits = args.listener.limits().map_err(StartError::Config)?;
    if args.max_stream_event == 0 {
        return Err(StartError::Config(
            "--max-stream-event must be at least 1".into(),
        ));
    }
    if args.replicas == 0 {
        return Err(StartError::Config("--replicas must be at least 1".into()));
    }
    if args.token_audience.is_empty() {
        return Err(StartError::Config(
            "--token-audience must not be empty".into(),
        ));
    }
    let shutdown_delay = Duration::try_from_secs_f64(args.shutdown_delay)
        .map_err(|_| StartError::Config("--shutdown-delay must be a number of seconds".into()))?;
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "portcullis".into());
        format!("{host}-{}", std::process::id())
    });
    let leader = args.leader_election.then(|| LeaderConfig {
        lease_name: args.lease_name.clone(),
        namespace: args.lease_namespace.clone(),
        identity: identity.clone(),
        duration_secs: args.lease_duration,
        grace_secs: args.lease_grace,
    });
    if let Some(l) = &leader {
        l.validate().map_err(StartError::Config)?;
    }
    let http =
        dataplane::http_client(upstream_timeout).map_err(|e| StartError::Config(e.to_string()))?;
    let client = kube::Client::try_default()
        .await
        .map_err(|e| StartError::KubeConfig(e.to_string()))?;

    let metrics = Arc::new(Metrics::new());
    let limits = Arc::new(match &args.limits_store {
        Some(url) => Limiter::shared(metrics.clone(), args.replicas, url)
            .map_err(|e| StartError::Config(e.to_string()))?,
        None => Limiter::local(metrics.clone(), args.replicas),
    });
    let api_keys = portcullis::access::SharedApiKeys::default();
    let reviewer: Arc<dyn TokenReviewer> = Arc::new(KubeTokenReviewer::new(
        client.clone(),
        args.token_audience.clone(),
        metrics.clone(),
    ));
    let auth = Arc::new(Authenticator::new(
        api_keys.clone(),
        Some(reviewer),
        token_ttl,
        args.default_access,
    ));
    let table = RoutingTable::default().shared();
    let ready = Arc::new(AtomicBool::new(false));
    let draining = Arc::new(AtomicBool::new(false));
    let state = Arc::new(AppState {
        table: table.clone(),
        http,
        ready: ready.clone(),
        body_limit: args.body_limit,
        upstream_timeout,
        page_size: args.page_size as usize,
        metrics: metrics.clone(),
        draining: draining.clone(),
        auth,
        limits: limits.clone(),
        upstream_limits: dataplane::UpstreamLimits {
            max_body: args.max_upstream_body,
            stream_idle: secs(args.stream_idle_timeout, "stream-idle-timeout")?,
            max_stream_event: args.max_stream_event,
            ..Default::default()
        },
        via: dataplane::via::Via::for_namespace(&args.lease_namespace),
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| StartError::Bind(args.listen, e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| StartError::Bind(args.listen, e))?;
    let metrics_listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .map_err(|e| StartError::Bind(args.metrics_listen, e))?;
    let metrics_bound = metrics_listener
        .local_addr()
        .map_err(|e| StartError::Bind(args.metrics_listen, e))?;
    info!(
        listen = %bound,
        metrics_listen = %metrics_bound,
        namespace = args.namespace.as_deref().unwrap_or("<all>"),
        identity = %identity,
        leader_election = args.leader_election,
        body_limit = args.body_limit,
        upstream_timeout_s = upstream_timeout.as_secs_f64(),
        default_access = ?args.default_access,
        token_audience = %args.token_audience,
        limits_store = if args.limits_store.is_some() { "redis" } else { "local" },
        replicas = args.replicas,
        replicas_service = args.replicas_service.as_deref().unwrap_or_default(),
        listener_limits = ?listener_limits,
        "data plane listening"
    );

    // SIGTERM: readiness fails at once; connections are still accepted for `shutdown_delay`, then
    // the listener closes and in-flight requests and streams drain for up to `drain_timeout`.
    let signalled = CancellationToken::new();
    let stop_accepting = CancellationToken::new();
    let stop_controller = CancellationToken::new();
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

    if let Some(service) = args.replicas_service.clone() {
        tokio::spawn(controller::replicas::run(
            client.clone(),
            args.lease_namespace.clone(),
            service,
            move |n| limits.set_replicas(n),
            max_backoff,
            stop_controller.clone(),
        ));
    }
    let policy = controller::policy::OperatorPolicy {
        secret_selector: args
            .secret_selector
            .as_deref()
            .map(controller::policy::parse_selector)
            .transpose()
            .map_err(StartError::Config)?,
        egress: controller::policy::Egress::parse(&args.allowed_upstream_hosts)
            .map_err(StartError::Config)?,
        public_namespaces: (!args.public_namespaces.iter().any(|n| n == "*")).then(|| {
            args.public_namespaces
                .iter()
                .map(|n| n.trim().to_string())
                .filter(|n| !n.is_empty())
                .collect()
        }),
        self_addresses: controller::policy::self_addresses(
            bound,
            args.replicas_service.as_deref().unwrap_or("portcullis"),
            &args.lease_namespace,
        ),
    };
    let config = ControllerConfig {
        namespace: args.namespace,
        debounce: Duration::from_millis(5),
        max_backoff,
        instance: identity,
        leader,
        policy,
    };
    let mut controller = tokio::spawn(controller::run(
        client,
        config,
        ControllerHandles {
            table,
            ready,
            metrics: metrics.clone(),
            api_keys,
        },
        stop_controller.clone(),
    ));
    let server = dataplane::listener::serve(
        listener,
        dataplane::router(state),
        listener_limits,
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
        finished = &mut controller => {
            return match finished {
                Ok(result) => result.map_err(StartError::from),
                Err(e) => Err(StartError::Config(format!("the controller task failed: {e}"))),
            };
        }
    };
    // The controller outlives the drain so late table changes still apply; stopping it releases the Lease.
    stop_controller.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), controller).await;
    info!("stopped");
    result
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
