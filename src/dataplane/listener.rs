//! The data-plane listener: accepts connections under a cap, cuts slow and idle ones, and sheds
//! requests beyond the in-flight cap with a 503 before they reach a handler.
//!
//! hyper does the HTTP work (its HTTP/1 header-read timeout included); this module adds what hyper
//! and axum::serve do not have: the two caps, the idle timeout (HTTP/2 connections have no header
//! timeout to close them) and a pause limit inside request bodies.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::error::{self, GatewayError};
use crate::telemetry::metrics::Metrics;

/// The listener's flags (flattened into `portcullis run`).
#[derive(clap::Args, Clone, Debug)]
pub struct ListenerArgs {
    /// Seconds an HTTP/1 client has to send a complete request head, counted from the moment the
    /// connection is ready for a request (so a keep-alive connection that sends nothing is also
    /// closed after at most this long).
    #[arg(long, env = "PORTCULLIS_HEADER_READ_TIMEOUT", default_value_t = 10.0)]
    pub header_read_timeout: f64,
    /// Longest pause, in seconds, while a request body is being received (a body that stops
    /// arriving ends with 408).
    #[arg(long, env = "PORTCULLIS_BODY_READ_TIMEOUT", default_value_t = 30.0)]
    pub body_read_timeout: f64,
    /// Seconds a connection (HTTP/1 or HTTP/2) may stay open without any request in flight.
    #[arg(long, env = "PORTCULLIS_IDLE_TIMEOUT", default_value_t = 30.0)]
    pub idle_timeout: f64,
    /// Open client connections at most; beyond it new connections wait in the kernel's backlog.
    #[arg(long, env = "PORTCULLIS_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: u32,
    /// Requests in flight at most (a streamed answer counts until its last byte); beyond it
    /// requests are answered 503 with `Retry-After` (health probes are never refused).
    #[arg(long, env = "PORTCULLIS_MAX_IN_FLIGHT", default_value_t = 4096)]
    pub max_in_flight: u32,
}

impl ListenerArgs {
    /// Checks the flags; the message names the flag at fault.
    pub fn limits(&self) -> Result<ListenerLimits, String> {
        let secs = |v: f64, flag: &str| {
            Duration::try_from_secs_f64(v)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| format!("--{flag} must be a positive number of seconds"))
        };
        let count = |v: u32, flag: &str| {
            if v == 0 {
                Err(format!("--{flag} must be at least 1"))
            } else {
                Ok(v)
            }
        };
        Ok(ListenerLimits {
            header_read_timeout: secs(self.header_read_timeout, "header-read-timeout")?,
            body_read_timeout: secs(self.body_read_timeout, "body-read-timeout")?,
            idle_timeout: secs(self.idle_timeout, "idle-timeout")?,
            max_connections: count(self.max_connections, "max-connections")?,
            max_in_flight: count(self.max_in_flight, "max-in-flight")?,
        })
    }
}

/// Validated listener limits.
#[derive(Clone, Copy, Debug)]
pub struct ListenerLimits {
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: u32,
    pub max_in_flight: u32,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            max_in_flight: 4096,
        }
    }
}

/// Where accepted connections are served.
pub enum Placement {
    /// On the current runtime (tests, and `--workers 0`).
    Here(Router),
    /// Round-robin over single-threaded workers, each with its own router.
    Workers(super::workers::Workers),
}

/// Serves `placement`'s router(s) on `listener` until `shutdown` is cancelled, then stops
/// accepting, asks every connection to finish its in-flight requests and close, and returns once
/// all have closed.
pub async fn serve(
    listener: TcpListener,
    placement: Placement,
    limits: ListenerLimits,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let connections = Arc::new(Semaphore::new(limits.max_connections as usize));
    let in_flight = Arc::new(Semaphore::new(limits.max_in_flight as usize));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let mut next_lane = 0usize;
    loop {
        let permit = tokio::select! {
            p = connections.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        // Small SSE frames must leave at once, not wait behind Nagle for the previous write's ACK.
        let _ = tcp.set_nodelay(true);
        let service = |router: &Router| ConnectionService {
            router: router.clone(),
            limits,
            in_flight: in_flight.clone(),
            metrics: metrics.clone(),
            activity: Arc::new(Activity::new()),
        };
        match &placement {
            Placement::Here(router) => {
                tokio::spawn(serve_connection(
                    builder.clone(),
                    tcp,
                    service(router),
                    shutdown.clone(),
                    permit,
                ));
            }
            Placement::Workers(workers) => {
                let (handle, router) = &workers.lanes[next_lane % workers.lanes.len()];
                next_lane = next_lane.wrapping_add(1);
                // The socket moves to the worker's own I/O driver.
                let tcp = match tcp.into_std() {
                    Ok(tcp) => tcp,
                    Err(e) => {
                        debug!(error = %e, "cannot hand a connection to a worker");
                        continue;
                    }
                };
                let (builder, service, shutdown) =
                    (builder.clone(), service(router), shutdown.clone());
                handle.spawn(async move {
                    match tokio::net::TcpStream::from_std(tcp) {
                        Ok(tcp) => serve_connection(builder, tcp, service, shutdown, permit).await,
                        Err(e) => debug!(error = %e, "a worker cannot take a connection"),
                    }
                });
            }
        }
    }
    drop(listener);
    // Every open connection holds one permit: all of them back means all connections closed.
    let _ = connections.acquire_many(limits.max_connections).await;
    Ok(())
}

async fn serve_connection(
    builder: Arc<auto::Builder<TokioExecutor>>,
    tcp: tokio::net::TcpStream,
    service: ConnectionService,
    shutdown: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let activity = service.activity.clone();
    let idle_timeout = service.limits.idle_timeout;
    // hyper's header timer starts only once the protocol is known: until the first request, the
    // header-read timeout is enforced here (a connection that never sends a byte included).
    let first_request_timeout = service.limits.header_read_timeout.min(idle_timeout);
    let conn = builder.serve_connection(
        TokioIo::new(tcp),
        hyper::service::service_fn(move |req| service.call(req)),
    );
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    // Header timeouts, resets and malformed requests end here; they are the client's.
                    debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = shutdown.cancelled(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
            _ = activity.idle_for(idle_timeout, first_request_timeout), if !closing => {
                debug!("closing an idle connection");
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}

/// Requests in flight on one connection, and since when it has had none.
struct Activity {
    started: Instant,
    /// False until the first request arrives.
    served: AtomicBool,
    in_flight: AtomicUsize,
    /// Milliseconds after `started` at which the last request finished.
    idle_since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            started: Instant::now(),
            served: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
        }
    }

    fn begin(self: &Arc<Self>) -> RequestGuard {
        self.served.store(true, Ordering::Release);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        RequestGuard {
            activity: self.clone(),
            _slot: None,
        }
    }

    /// Resolves once the connection has had no request in flight for `timeout` (`first` before
    /// its first request).
    async fn idle_for(&self, timeout: Duration, first: Duration) {
        loop {
            let timeout = if self.served.load(Ordering::Acquire) {
                timeout
            } else {
                first
            };
            if self.in_flight.load(Ordering::Acquire) == 0 {
                let since = self.started
                    + Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
                let deadline = since + timeout;
                if Instant::now() >= deadline {
                    if self.in_flight.load(Ordering::Acquire) == 0 {
                        return;
                    }
                    continue;
                }
                tokio::time::sleep_until(deadline).await;
            } else {
                tokio::time::sleep(timeout).await;
            }
        }
    }
}

/// Held from a request's arrival until its response body is finished or dropped.
struct RequestGuard {
    activity: Arc<Activity>,
    /// The in-flight slot, for requests that are counted against the cap.
    _slot: Option<OwnedSemaphorePermit>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let ms = u64::try_from(self.activity.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.activity.idle_since_ms.store(ms, Ordering::Release);
        self.activity.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Clone)]
struct ConnectionService {
    router: Router,
    limits: ListenerLimits,
    in_flight: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    activity: Arc<Activity>,
}

/// Probes must answer under load, or the kubelet restarts a replica for being busy.
fn is_probe(path: &str) -> bool {
    matches!(path, "/healthz" | "/readyz" | "/health")
}

impl ConnectionService {
    fn call(
        &self,
        req: Request<Incoming>,
    ) -> impl Future<Output = Result<Response<Body>, Infallible>> + Send + use<> {
        let mut guard = self.activity.begin();
        let admitted = if is_probe(req.uri().path()) {
            Ok(())
        } else {
            match self.in_flight.clone().try_acquire_owned() {
                Ok(slot) => {
                    guard._slot = Some(slot);
                    Ok(())
                }
                Err(_) => Err(()),
            }
        };
        let router = self.router.clone();
        let metrics = self.metrics.clone();
        let body_timeout = self.limits.body_read_timeout;
        async move {
            if admitted.is_err() {
                metrics.requests_shed.inc();
                let response = error::for_path(req.uri().path(), GatewayError::Overloaded);
                return Ok(response.map(|b| {
                    Body::new(Guarded {
                        inner: b,
                        _guard: guard,
                    })
                }));
            }
            let req = req.map(|b| Body::new(PauseLimited::new(b, body_timeout)));
            let response = match tower_oneshot(router, req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            Ok(response.map(|b| {
                Body::new(Guarded {
                    inner: b,
                    _guard: guard,
                })
            }))
        }
    }
}

async fn tower_oneshot(router: Router, req: Request<Body>) -> Result<Response<Body>, Infallible> {
    use hyper::service::Service as _;
    hyper_util::service::TowerToHyperService::new(router)
        .call(req)
        .await
}

/// A response body that releases its request's guard when finished or dropped.
struct Guarded {
    inner: Body,
    _guard: RequestGuard,
}

impl hyper::body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A request body that fails once it pauses longer than its limit. The timer is armed only when
/// a read would wait, so a body that arrives with its head (nearly every LLM call) costs no timer.
struct PauseLimited {
    inner: Incoming,
    limit: Duration,
    pause: Option<Pin<Box<Sleep>>>,
}

impl PauseLimited {
    fn new(inner: Incoming, limit: Duration) -> Self {
        PauseLimited {
            inner,
            limit,
            pause: None,
        }
    }
}

/// The error of a request body that paused longer than `--body-read-timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the request body paused for longer than the gateway allows")]
pub struct BodyPaused;

impl hyper::body::Body for PauseLimited {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            // The next wait starts its own count.
            this.pause = None;
            return Poll::Ready(frame.map(|r| r.map_err(Into::into)));
        }
        let limit = this.limit;
        let pause = this
            .pause
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match pause.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyPaused)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether a body-read error is the pause limit of `--body-read-timeout`.
pub fn is_body_timeout(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(e) = current {
        if e.is::<BodyPaused>() {
            return true;
        }
        current = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::routing::{get, post};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::sync::Notify;

    use super::*;

    struct Server {
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        release: Arc<Notify>,
        stop: CancellationToken,
    }

    /// A listener over a router whose `/v1/chat/completions` waits until released and whose
    /// `/echo` reads a JSON body the way the surfaces do.
    async fn start(limits: ListenerLimits) -> Server {
        let release = Arc::new(Notify::new());
        let held = release.clone();
        let wait = move || {
            let held = held.clone();
            async move {
                held.notified().await;
                "released"
            }
        };
        let router = Router::new()
            .route("/v1/chat/completions", post(wait.clone()))
            .route("/gateway/{name}/invocations", post(wait))
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/echo",
                post(|headers: http::HeaderMap, body: Body| async move {
                    match super::super::body::read_json_object(&headers, body, 1 << 20).await {
                        Ok(map) => axum::response::IntoResponse::into_response(axum::Json(map)),
                        Err(e) => error::for_path("/v1/echo", e),
                    }
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::new());
        let stop = CancellationToken::new();
        // The shipped shape: connections handed to single-threaded workers.
        let workers = crate::dataplane::workers::Workers::start(2, move || router.clone()).unwrap();
        tokio::spawn(serve(
            listener,
            Placement::Workers(workers),
            limits,
            metrics.clone(),
            stop.clone(),
        ));
        Server {
            addr,
            metrics,
            release,
            stop,
        }
    }

    /// Sends `raw` and reads until the server closes the connection (or `within` passes).
    async fn exchange(addr: SocketAddr, raw: &[u8], within: Duration) -> (String, Duration) {
        let started = Instant::now();
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(raw).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(within, tcp.read_to_end(&mut out)).await;
        (
            String::from_utf8_lossy(&out).into_owned(),
            started.elapsed(),
        )
    }

    fn post_raw(path: &str, body: &str) -> Vec<u8> {
        format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    #[tokio::test]
    async fn requests_beyond_the_in_flight_cap_are_shed_with_503_and_retry_after() {
        let server = start(ListenerLimits {
            max_in_flight: 2,
            ..Default::default()
        })
        .await;
        let addr = server.addr;
        let held: Vec<_> = (0..2)
            .map(|_| {
                tokio::spawn(async move {
                    exchange(
                        addr,
                        &post_raw("/v1/chat/completions", "{}"),
                        Duration::from_secs(10),
                    )
                    .await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(300)).await;

        let (openai, _) = exchange(
            addr,
            &post_raw("/v1/chat/completions", "{}"),
            Duration::from_secs(5),
        )
        .await;
        assert!(openai.starts_with("HTTP/1.1 503"), "{openai}");
        assert!(
            openai.to_ascii_lowercase().contains("retry-after: 1"),
            "{openai}"
        );
        assert!(openai.contains(r#""code":"overloaded""#), "{openai}");
        let (mlflow, _) = exchange(
            addr,
            &post_raw("/gateway/r/invocations", "{}"),
            Duration::from_secs(5),
        )
        .await;
        assert!(mlflow.starts_with("HTTP/1.1 503"), "{mlflow}");
        assert!(
            mlflow.contains(r#"{"detail":"#),
            "MLflow's error shape: {mlflow}"
        );
        let (probe, _) = exchange(
            addr,
            b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
            Duration::from_secs(5),
        )
        .await;
        assert!(
            probe.starts_with("HTTP/1.1 200"),
            "probes are never shed: {probe}"
        );
        assert_eq!(server.metrics.requests_shed.get(), 2);
        assert!(
            server
                .metrics
                .encode()
                .contains("portcullis_requests_shed_total 2")
        );

        server.release.notify_waiters();
        for h in held {
            let (answer, _) = h.await.unwrap();
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        }
        let next = tokio::spawn(async move {
            exchange(
                addr,
                &post_raw("/v1/chat/completions", "{}"),
                Duration::from_secs(5),
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        server.release.notify_waiters();
        let (answer, _) = next.await.unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "slots come back: {answer}"
        );
        server.stop.cancel();
    }

    #[tokio::test]
    async fn a_request_head_that_trickles_is_cut_at_the_header_read_timeout() {
        let server = start(ListenerLimits {
            header_read_timeout: Duration::from_millis(500),
            ..Default::default()
        })
        .await;
        let (_, took) =
            exchange(server.addr, b"POST /v1/chat/compl", Duration::from_secs(10)).await;
        assert!(
            took < Duration::from_secs(3),
            "connection held for {took:?}"
        );
    }

    #[tokio::test]
    async fn a_body_that_stops_arriving_ends_with_408() {
        let server = start(ListenerLimits {
            body_read_timeout: Duration::from_millis(500),
            ..Default::default()
        })
        .await;
        let raw = b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"a\":";
        let (answer, took) = exchange(server.addr, raw, Duration::from_secs(10)).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("request_timeout"), "{answer}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        let (ok, _) = exchange(
            server.addr,
            &post_raw("/echo", r#"{"a":1}"#),
            Duration::from_secs(5),
        )
        .await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    }

    #[tokio::test]
    async fn an_idle_keep_alive_connection_is_closed() {
        let server = start(ListenerLimits {
            header_read_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_millis(500),
            ..Default::default()
        })
        .await;
        let (answer, took) = exchange(
            server.addr,
            b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n",
            Duration::from_secs(10),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            took < Duration::from_secs(3),
            "idle connection held for {took:?}"
        );
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_wait_for_a_free_slot() {
        let server = start(ListenerLimits {
            max_connections: 1,
            header_read_timeout: Duration::from_secs(1),
            ..Default::default()
        })
        .await;
        // The first connection sends nothing and holds the only slot until its header timeout.
        let _idle = TcpStream::connect(server.addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (answer, took) = exchange(
            server.addr,
            b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
            Duration::from_secs(10),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            took >= Duration::from_millis(700),
            "served before a slot was free: {took:?}"
        );
    }

    #[test]
    fn flags_are_checked() {
        let args = ListenerArgs {
            header_read_timeout: 10.0,
            body_read_timeout: 30.0,
            idle_timeout: 30.0,
            max_connections: 10,
            max_in_flight: 10,
        };
        assert!(args.limits().is_ok());
        let bad = ListenerArgs {
            idle_timeout: 0.0,
            ..args.clone()
        };
        assert!(bad.limits().unwrap_err().contains("--idle-timeout"));
        let bad = ListenerArgs {
            max_in_flight: 0,
            ..args
        };
        assert!(bad.limits().unwrap_err().contains("--max-in-flight"));
    }
}
