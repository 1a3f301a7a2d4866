//! `portcullis serve`: the data plane of `run`, with Routes and Secrets from files. No Kubernetes
//! API is contacted unless `--kubeconfig` is given (then only to check ServiceAccount tokens).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::source::{FileSource, Sink, Wake};
use crate::access::TokenReviewer;
use crate::controller::consumers::KubeTokenReviewer;
use crate::controller::policy::{OperatorPolicy, self_addresses};
use crate::dataplane::ConfigStatus;
use crate::dataplane::via::Via;
use crate::server::{DataPlane, DataPlaneArgs, StartError};

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// A file of Route and Secret manifests, an MLflow AI Gateway config, or a directory of them
    /// (its .yaml, .yml and .json files). Repeatable.
    #[arg(long = "config", visible_alias = "config-path", required = true)]
    pub config: Vec<PathBuf>,
    /// Address the data plane listens on; MLflow's gateway default, so its clients need no change.
    #[arg(long, env = "PORTCULLIS_LISTEN", default_value = "127.0.0.1:5000")]
    pub listen: SocketAddr,
    /// The host of `--listen` (`mlflow gateway start --host`, for a drop-in).
    #[arg(long)]
    pub host: Option<std::net::IpAddr>,
    /// The port of `--listen` (`mlflow gateway start --port`).
    #[arg(long)]
    pub port: Option<u16>,
    /// Address of the Prometheus `/metrics` endpoint.
    #[arg(
        long,
        env = "PORTCULLIS_METRICS_LISTEN",
        default_value = "127.0.0.1:9464"
    )]
    pub metrics_listen: SocketAddr,
    /// Namespace given to Routes and Secrets that name none (and to MLflow endpoints).
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Accept ServiceAccount bearer tokens, checked with this cluster's TokenReview API. Without
    /// it, callers authenticate with the API-key Secrets of the files only.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Seconds between two looks at the files for changes (0: only on SIGHUP).
    #[arg(long, default_value_t = 0.2)]
    pub reload_interval: f64,
    #[command(flatten)]
    pub dataplane: DataPlaneArgs,
}

pub async fn serve(args: ServeArgs) -> Result<(), StartError> {
    let settings = args.dataplane.check()?;
    let mut listen = args.listen;
    if let Some(host) = args.host {
        listen.set_ip(host);
    }
    if let Some(port) = args.port {
        listen.set_port(port);
    }
    let interval = if args.reload_interval == 0.0 {
        None
    } else {
        Some(crate::server::positive_secs(
            args.reload_interval,
            "reload-interval",
        )?)
    };
    let reviewer = match &args.kubeconfig {
        None => None,
        Some(path) => Some(kube_client(path).await?),
    };
    // The files are read and checked before any port is bound, on a blocking thread.
    let egress = settings.egress.clone();
    let policy = |bound| OperatorPolicy {
        // Every Secret in the files is the operator's own: no selector among them.
        secret_selector: None,
        egress: egress.clone(),
        // One operator owns every file: every Route keeps its one-word name.
        public_namespaces: None,
        self_addresses: self_addresses(bound, "portcullis", &args.namespace),
    };
    let mut source = FileSource::new(args.config.clone(), args.namespace.clone(), policy(listen));
    let mut source = tokio::task::spawn_blocking(move || source.load_initial().map(|()| source))
        .await
        .map_err(|e| StartError::Config(format!("the file loader failed: {e}")))??;
    let status = Arc::new(ConfigStatus::default());
    let dataplane = DataPlane::bind(
        &args.dataplane,
        settings,
        listen,
        args.metrics_listen,
        // Not `run`'s name: a file-served gateway in front of a cluster one is no loop.
        Via::new(&format!("portcullis-serve.{}", args.namespace)),
        |metrics| {
            reviewer.map(|client| {
                Arc::new(KubeTokenReviewer::new(
                    client,
                    args.dataplane.token_audience.clone(),
                    metrics,
                )) as Arc<dyn TokenReviewer>
            })
        },
        Some(status.clone()),
    )
    .await?;
    info!(
        config = ?args.config,
        namespace = %args.namespace,
        reload_interval_s = interval.map(|d| d.as_secs_f64()).unwrap_or(0.0),
        service_account_tokens = args.kubeconfig.is_some(),
        "serving from files"
    );
    source.attach(
        Sink {
            handles: dataplane.source_handles(),
            status,
        },
        policy(dataplane.bound),
    );

    let (wake_tx, wake_rx) = mpsc::channel();
    let stop = CancellationToken::new();
    tokio::spawn(forward_signals(wake_tx, stop.clone()));
    let reloader = tokio::task::spawn_blocking(move || {
        source.run(interval, wake_rx);
        Ok(())
    });
    dataplane.serve(reloader, stop).await
}

async fn kube_client(path: &std::path::Path) -> Result<kube::Client, StartError> {
    let kubeconfig = kube::config::Kubeconfig::read_from(path)
        .map_err(|e| StartError::KubeConfig(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .map_err(|e| StartError::KubeConfig(e.to_string()))?;
    kube::Client::try_from(config).map_err(|e| StartError::KubeConfig(e.to_string()))
}

/// SIGHUP forces a reload; `stop` ends the reload loop.
async fn forward_signals(wake: mpsc::Sender<Wake>, stop: CancellationToken) {
    #[cfg(unix)]
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGHUP; reloads happen on file changes only");
            None
        }
    };
    loop {
        let hup = async {
            match hangup.as_mut() {
                Some(s) => s.recv().await,
                None => futures::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => {
                let _ = wake.send(Wake::Stop);
                return;
            }
            Some(()) = hup => {
                if wake.send(Wake::Reload).is_err() {
                    return;
                }
            }
        }
    }
}
