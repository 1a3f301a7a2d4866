use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use portcullis::access::TokenReviewer;
use portcullis::controller::consumers::KubeTokenReviewer;
use portcullis::controller::leader::LeaderConfig;
use portcullis::controller::{self, ControllerConfig, ControllerHandles};
use portcullis::dataplane::via::Via;
use portcullis::files;
use portcullis::server::{DataPlane, DataPlaneArgs, StartError, positive_secs};
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
    /// Serve Route and Secret manifests, or an MLflow gateway config, from files: no cluster needed.
    Serve(Box<files::serve::ServeArgs>),
    /// Print Route and Secret manifests converted from an MLflow gateway or LiteLLM proxy config.
    Import(files::import::ImportArgs),
    /// Print what each USD budget has spent in its current window, read from the shared limits store.
    Spend(portcullis::spend::SpendArgs),
    /// Print the Route CRD (or with `--team` the Team CRD, `--guardrail` the GuardrailPolicy CRD,
    /// `--mcp` the McpServer CRD) as YAML.
    Crd {
        #[arg(long)]
        team: bool,
        #[arg(long, conflicts_with = "team")]
        guardrail: bool,
        #[arg(long, conflicts_with_all = ["team", "guardrail"])]
        mcp: bool,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Address the data plane listens on (port 0 picks a free port; the bound address is logged).
    #[arg(long, env = "PORTCULLIS_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Address of the Prometheus `/metrics` endpoint (a separate port from the data plane).
    #[arg(
        long,
        env = "PORTCULLIS_METRICS_LISTEN",
        default_value = "0.0.0.0:9464"
    )]
    metrics_listen: SocketAddr,
    #[command(flatten)]
    dataplane: DataPlaneArgs,
    /// Watch Routes and Secrets in this namespace only (default: all namespaces).
    #[arg(long, env = "PORTCULLIS_NAMESPACE")]
    namespace: Option<String>,
    /// Only Secrets matching this label selector may back a Route (for example
    /// `portcullis.dev/provider-key=true`); a Route referencing another is not ready, and nothing
    /// is read from that Secret. Default: any Secret of the Route's namespace.
    #[arg(long, env = "PORTCULLIS_SECRET_SELECTOR")]
    secret_selector: Option<String>,
    /// Namespaces whose Routes also get their one-word name (`*`: all). Every Route is callable as
    /// `namespace/name`; on a multi-tenant cluster list only the namespaces trusted to own names.
    #[arg(
        long,
        env = "PORTCULLIS_PUBLIC_NAMESPACES",
        value_delimiter = ',',
        default_value = "*"
    )]
    public_namespaces: Vec<String>,
    /// Upper bound of the reconnect backoff after the API server went away (seconds).
    #[arg(long, default_value_t = 10.0)]
    max_watch_backoff: f64,
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
    /// ConfigMap (in the pod's namespace) whose `prices.yaml` holds cluster-wide prices over the
    /// built-in catalog, in the catalog's format; empty: none.
    #[arg(
        long,
        env = "PORTCULLIS_PRICING_CONFIGMAP",
        default_value = "portcullis-pricing"
    )]
    pricing_configmap: String,
    /// Take N from the ready endpoints of this Service (in the pod's namespace) instead of --replicas.
    #[arg(long, env = "PORTCULLIS_REPLICAS_SERVICE")]
    replicas_service: Option<String>,
    /// Milliseconds between two reads of each self-hosted pool endpoint's model-server metrics
    /// (50 to 200).
    #[arg(long, env = "PORTCULLIS_POOL_SCRAPE_INTERVAL_MS", default_value_t = 100, value_parser = clap::value_parser!(u64).range(50..=200))]
    pool_scrape_interval_ms: u64,
    /// Speak plain HTTP/2 (h2c) to InferencePools' endpoint pickers instead of TLS, for pickers
    /// run with `--secure-serving=false`.
    #[arg(long, env = "PORTCULLIS_POOL_PICKER_PLAINTEXT")]
    pool_picker_plaintext: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd {
            team,
            guardrail,
            mcp,
        } => match if team {
            portcullis::team_crd_yaml()
        } else if guardrail {
            portcullis::guardrail_crd_yaml()
        } else if mcp {
            portcullis::mcp_crd_yaml()
        } else {
            portcullis::crd_yaml()
        } {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("cannot render the CRD: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Spend(args) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(portcullis::spend::run(&args)) {
                Ok(table) => {
                    print!("{table}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run(args) => {
            let (format, otlp) = (
                args.dataplane.log_format,
                args.dataplane.otlp_endpoint.clone(),
            );
            in_runtime(format, otlp.as_deref(), run(*args))
        }
        Command::Serve(args) => {
            let (format, otlp) = (
                args.dataplane.log_format,
                args.dataplane.otlp_endpoint.clone(),
            );
            in_runtime(format, otlp.as_deref(), files::serve::serve(*args))
        }
        Command::Import(args) => files::import::main(&args),
    }
}

/// Starts telemetry and the async runtime, then runs a serving command to its end.
fn in_runtime(
    log_format: LogFormat,
    otlp_endpoint: Option<&str>,
    command: impl Future<Output = Result<(), StartError>>,
) -> ExitCode {
    // kube, reqwest and the OTLP exporter share rustls; pick its crypto provider before any client exists.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let _telemetry = match telemetry::init(log_format, otlp_endpoint) {
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
    match runtime.block_on(command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            e.exit_code()
        }
    }
}

async fn run(args: RunArgs) -> Result<(), StartError> {
    // Configuration is checked before any port is bound.
    let settings = args.dataplane.check()?;
    let egress = settings.egress.clone();
    let secret_selector = args
        .secret_selector
        .as_deref()
        .map(controller::policy::parse_selector)
        .transpose()
        .map_err(StartError::Config)?;
    let public_namespaces = (!args.public_namespaces.iter().any(|n| n == "*")).then(|| {
        args.public_namespaces
            .iter()
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty())
            .collect()
    });
    let max_backoff = positive_secs(args.max_watch_backoff, "max-watch-backoff")?;
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
    let client = kube::Client::try_default()
        .await
        .map_err(|e| StartError::KubeConfig(e.to_string()))?;
    info!(
        namespace = args.namespace.as_deref().unwrap_or("<all>"),
        identity = %identity,
        leader_election = args.leader_election,
        replicas_service = args.replicas_service.as_deref().unwrap_or_default(),
        "watching the cluster for Routes"
    );
    let dataplane = DataPlane::bind(
        &args.dataplane,
        settings,
        args.listen,
        args.metrics_listen,
        Via::for_namespace(&args.lease_namespace),
        |metrics| {
            Some(Arc::new(KubeTokenReviewer::new(
                client.clone(),
                args.dataplane.token_audience.clone(),
                metrics,
            )) as Arc<dyn TokenReviewer>)
        },
        None,
    )
    .await?;
    let handles = dataplane.source_handles();
    let stop_controller = CancellationToken::new();
    if let Some(service) = args.replicas_service.clone() {
        let limits = handles.limits.clone();
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
        secret_selector,
        egress,
        public_namespaces,
        self_addresses: controller::policy::self_addresses(
            dataplane.bound,
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
        pricing: (!args.pricing_configmap.is_empty())
            .then(|| (args.lease_namespace.clone(), args.pricing_configmap.clone())),
        pool_scrape_interval: Duration::from_millis(args.pool_scrape_interval_ms),
        pool_picker_plaintext: args.pool_picker_plaintext,
    };
    let mcp_refresh = positive_secs(
        args.dataplane.mcp.mcp_refresh_interval,
        "mcp-refresh-interval",
    )?;
    tokio::spawn(portcullis::mcp::controller::run(
        client.clone(),
        config.namespace.clone(),
        config.policy.clone(),
        dataplane.mcp(),
        mcp_refresh,
        stop_controller.clone(),
    ));
    let controller = tokio::spawn({
        let stop = stop_controller.clone();
        async move {
            controller::run(
                client,
                config,
                ControllerHandles {
                    table: handles.table,
                    ready: handles.ready,
                    metrics: handles.metrics,
                    api_keys: handles.api_keys,
                    limits: Some(handles.limits),
                },
                stop,
            )
            .await
            .map_err(StartError::from)
        }
    });
    dataplane.serve(controller, stop_controller).await
}
