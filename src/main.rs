use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use portcullis::controller::{self, ControllerConfig, ControllerHandles};
use portcullis::dataplane::{self, AppState};
use portcullis::table::RoutingTable;
use portcullis::telemetry::{self, LogFormat};

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
    Run(RunArgs),
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
    /// Routes per page of the MLflow route and endpoint listings (MLflow's own page size).
    #[arg(long, env = "PORTCULLIS_PAGE_SIZE", default_value_t = 3000, value_parser = clap::value_parser!(u32).range(1..))]
    page_size: u32,
    /// Upper bound of the reconnect backoff after the API server went away (seconds).
    #[arg(long, default_value_t = 10.0)]
    max_watch_backoff: f64,
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
            telemetry::init_logging(args.log_format);
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
            match runtime.block_on(run(args)) {
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
    // kube and reqwest share rustls; pick its crypto provider once, before either builds a client.
    let _ = rustls::crypto::ring::default_provider().install_default();
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
    let http =
        dataplane::http_client(upstream_timeout).map_err(|e| StartError::Config(e.to_string()))?;
    let client = kube::Client::try_default()
        .await
        .map_err(|e| StartError::KubeConfig(e.to_string()))?;

    let table = RoutingTable::default().shared();
    let ready = Arc::new(AtomicBool::new(false));
    let state = Arc::new(AppState {
        table: table.clone(),
        http,
        ready: ready.clone(),
        body_limit: args.body_limit,
        upstream_timeout,
        page_size: args.page_size as usize,
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| StartError::Bind(args.listen, e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| StartError::Bind(args.listen, e))?;
    info!(
        listen = %bound,
        namespace = args.namespace.as_deref().unwrap_or("<all>"),
        body_limit = args.body_limit,
        upstream_timeout_s = upstream_timeout.as_secs_f64(),
        "data plane listening"
    );

    let shutdown = CancellationToken::new();
    tokio::spawn(signal_shutdown(shutdown.clone()));
    let config = ControllerConfig {
        namespace: args.namespace,
        debounce: Duration::from_millis(5),
        max_backoff,
        instance: std::env::var("HOSTNAME").unwrap_or_else(|_| "portcullis".into()),
    };
    let controller = tokio::spawn(controller::run(
        client,
        config,
        ControllerHandles { table, ready },
        shutdown.clone(),
    ));
    let server = axum::serve(listener, dataplane::router(state))
        .with_graceful_shutdown(shutdown.clone().cancelled_owned());

    tokio::select! {
        served = server => served.map_err(StartError::Serve)?,
        finished = controller => {
            shutdown.cancel();
            match finished {
                Ok(result) => result?,
                Err(e) => return Err(StartError::Config(format!("the controller task failed: {e}"))),
            }
        }
    }
    Ok(())
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
