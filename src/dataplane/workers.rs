//! Data-plane workers: one single-threaded runtime per core, each with its own router and so its
//! own upstream connection pool. A client connection is handed to one worker and everything it
//! causes (the request, the provider call over a pooled connection, the answer) runs on that
//! thread: no task hops between threads and no work stealing on the hot path, which on a shared
//! multi-threaded runtime cost a fifth of a proxied call's CPU (see the README's Performance).
//! The control plane (controller, watches, metrics endpoint) stays on the main runtime, so a
//! large table rebuild never delays a request.

use std::sync::Arc;
use std::thread::JoinHandle;

use axum::Router;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// Running workers; they stop (and their open connections close) when this is dropped.
pub struct Workers {
    pub(super) lanes: Vec<(Handle, Router)>,
    stop: CancellationToken,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    /// Starts `count` workers; `router` builds each one's router on its own thread.
    pub fn start(
        count: usize,
        router: impl Fn() -> Router + Send + Sync + 'static,
    ) -> std::io::Result<Workers> {
        let stop = CancellationToken::new();
        let router = Arc::new(router);
        let (tx, rx) = std::sync::mpsc::channel();
        let mut threads = Vec::with_capacity(count);
        for i in 0..count {
            let (tx, stop, router) = (tx.clone(), stop.clone(), router.clone());
            threads.push(
                std::thread::Builder::new()
                    .name(format!("portcullis-worker-{i}"))
                    .spawn(move || {
                        let runtime = match tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                        {
                            Ok(rt) => rt,
                            Err(e) => {
                                let _ = tx.send(Err(e));
                                return;
                            }
                        };
                        // Built inside the runtime: clients spawn their connection tasks here.
                        let lane = runtime.block_on(async { (Handle::current(), router()) });
                        let started = tx.send(Ok(lane)).is_ok();
                        drop(tx);
                        if started {
                            runtime.block_on(stop.cancelled());
                        }
                    })?,
            );
        }
        drop(tx);
        // Built first so that a failed start stops the workers already running (on drop).
        let mut workers = Workers {
            lanes: Vec::with_capacity(count),
            stop,
            threads,
        };
        // Ends when every worker has reported (its sender is dropped right after).
        for lane in rx {
            workers.lanes.push(lane?);
        }
        if workers.lanes.len() != count {
            return Err(std::io::Error::other("a data-plane worker did not start"));
        }
        Ok(workers)
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
        // The threads end once their runtime has dropped its tasks; nothing waits on them here,
        // since this may run on an async thread.
        self.threads.clear();
    }
}

/// The default worker count: the CPUs this process may use (cgroup quota included).
pub fn default_count() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}
