//! Leader election on a `coordination.k8s.io` Lease. Every replica watches and serves; only the
//! leader writes Route status and Events, so replicas never write competing status.

use kube::Client;
use kube_lease_manager::{LeaseManagerBuilder, LeaseParams};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::telemetry::metrics::Metrics;

#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub lease_name: String,
    pub namespace: String,
    pub identity: String,
    /// Seconds a lease stays valid after its last renewal; a dead leader is replaced within this.
    pub duration_secs: u64,
    /// Seconds before expiry at which the holder renews.
    pub grace_secs: u64,
}

impl LeaderConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.grace_secs == 0 || self.duration_secs <= self.grace_secs {
            return Err(
                "the lease duration must be longer than the renewal grace, and both positive"
                    .into(),
            );
        }
        Ok(())
    }
}

/// Mirrors leadership into `portcullis_leader`, so an alert can tell that no replica leads.
pub async fn export(mut leading: watch::Receiver<bool>, metrics: std::sync::Arc<Metrics>) {
    loop {
        metrics.leader.set(i64::from(*leading.borrow_and_update()));
        if leading.changed().await.is_err() {
            metrics.leader.set(0);
            return;
        }
    }
}

/// Leadership as a watch channel: `true` while this replica holds the lease. With no election
/// configured the replica always leads (a single replica, or local runs).
pub async fn elect(
    client: Client,
    config: Option<LeaderConfig>,
    shutdown: CancellationToken,
) -> watch::Receiver<bool> {
    let Some(config) = config else {
        let (tx, rx) = watch::channel(true);
        // Keep the sender alive for the life of the process.
        tokio::spawn(async move {
            shutdown.cancelled().await;
            drop(tx);
        });
        return rx;
    };
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let params = LeaseParams::new(
            config.identity.clone(),
            config.duration_secs,
            config.grace_secs,
        )
        .with_field_manager("portcullis-leader-election");
        let manager = loop {
            let built = LeaseManagerBuilder::new(client.clone(), &config.lease_name)
                .with_namespace(&config.namespace)
                .with_parameters(params.clone())
                .build()
                .await;
            match built {
                Ok(m) => break m,
                Err(e) => {
                    warn!(error = %e, lease = %config.lease_name, namespace = %config.namespace, "cannot use the leader-election Lease; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
                    }
                }
            }
        };
        let (mut leading, task) = manager.watch().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                changed = leading.changed() => {
                    if changed.is_err() { break }
                    let now = *leading.borrow_and_update();
                    info!(identity = %config.identity, leader = now, "leadership changed");
                    if tx.send(now).is_err() { break }
                }
            }
        }
        let _ = tx.send(false);
        // Closing the channel makes the manager release the lease, so a successor need not wait for expiry.
        drop(leading);
        let _ = task.await;
    });
    rx
}
