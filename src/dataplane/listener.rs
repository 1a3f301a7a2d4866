//! The data-plane listener: accepts connections under a cap, cuts slow and idle ones, bounds what
//! request bodies may hold, and sheds requests beyond the in-flight cap with a 503.
//!
//! hyper does the HTTP work (its HTTP/1 header-read timeout included); this module adds what hyper
//! and axum::serve do not have: the caps, the idle timeout (HTTP/2 connections have no header
//! timeout to close them), a pause limit and a total deadline on request bodies, and the global
//! budget of buffered request bytes (`intake.rs`). A request takes its in-flight slot only once
//! its body is complete, and so after its caller was authenticated (the surfaces authenticate
//! before they read): slow or unauthenticated bodies never hold a slot.

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

use super::error::GatewayError;
use super::intake::{Budget, Intake};
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
    /// Seconds a whole request body may take to arrive, counted from its head (a body that
    /// trickles in ends with 408).
    #[arg(long, env = "PORTCULLIS_BODY_TIMEOUT", default_value_t = 30.0)]
    pub body_timeout: f64,
    /// Bytes all request bodies together may hold while they are read and served (their bytes
    /// plus what their parsed JSON costs); beyond it requests are answered 503 with `Retry-After`.
    #[arg(long, env = "PORTCULLIS_MAX_BUFFERED_REQUEST_BYTES", default_value_t = DEFAULT_BUFFER_BUDGET)]
    pub max_buffered_request_bytes: usize,
    /// Seconds a connection (HTTP/1 or HTTP/2) may stay open without any request in flight.
    #[arg(long, env = "PORTCULLIS_IDLE_TIMEOUT", default_value_t = 30.0)]
    pub idle_timeout: f64,
    /// Open client connections at most; beyond it new connections wait in the kernel's backlog.
    #[arg(long, env = "PORTCULLIS_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: u32,
    /// Requests in flight at most, counted from a complete request body to the answer's last
    /// byte; beyond it requests are answered 503 with `Retry-After` (health probes are never
    /// refused).
    #[arg(long, env = "PORTCULLIS_MAX_IN_FLIGHT", default_value_t = 4096)]
    pub max_in_flight: u32,
}

/// 128 MiB: with the parsing bound of `body.rs` this is the most request bodies can hold.
pub const DEFAULT_BUFFER_BUDGET: usize = 128 * 1024 * 1024;

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
            body_timeout: secs(self.body_timeout, "body-timeout")?,
            max_buffered_request_bytes: match self.max_buffered_request_bytes {
                0 => return Err("--max-buffered-request-bytes must be at least 1".into()),
                n => n,
            },
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
    pub body_timeout: Duration,
    pub max_buffered_request_bytes: usize,
    pub idle_timeout: Duration,
    pub max_connections: u32,
    pub max_in_flight: u32,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
            max_buffered_request_bytes: DEFAULT_BUFFER_BUDGET,
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
    let budget = Arc::new(Budget::new(
        limits.max_buffered_request_bytes,
        metrics.request_buffer_bytes.clone(),
    ));
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
            budget: budget.clone(),
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

    fn begin(self: &Arc<Self>, intake: Arc<Intake>) -> RequestGuard {
        self.served.store(true, Ordering::Release);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        RequestGuard {
            activity: self.clone(),
            _intake: intake,
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
    /// The request's budget share and, once its body was complete, its in-flight slot.
    _intake: Arc<Intake>,
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
    budget: Arc<Budget>,
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
        let intake = Arc::new(Intake::new(self.budget.clone()));
        let guard = self.activity.begin(intake.clone());
        // An HTTP/1 request whose body is not read to its end leaves its connection unusable:
        // hyper closes it after the answer, which must then say so (see `closing`).
        let unread = (req.version() < http::Version::HTTP_2
            && !hyper::body::Body::is_end_stream(req.body()))
        .then(|| intake.clone());
        let inbound = Inbound {
            pause_limit: self.limits.body_read_timeout,
            deadline: Instant::now() + self.limits.body_timeout,
            timer: None,
            intake: intake.clone(),
            // Probes are never refused.
            in_flight: (!is_probe(req.uri().path())).then(|| self.in_flight.clone()),
            metrics: self.metrics.clone(),
            ended: false,
            inner: None,
        };
        let router = self.router.clone();
        super::intake::scope(intake, async move {
            let req = req.map(|b| {
                Body::new(Inbound {
                    inner: Some(b),
                    ..inbound
                })
            });
            let response = match tower_oneshot(router, req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            let mut response = response.map(|b| {
                Body::new(Guarded {
                    inner: b,
                    _guard: guard,
                })
            });
            if unread.is_some_and(|intake| !intake.was_read()) {
                closing(&mut response);
            }
            Ok(response)
        })
    }
}

/// Marks an answer given before its request's body was read (an unknown route, a refused caller):
/// a pooling client then opens a new connection for its next call instead of writing it into the
/// one hyper is about to close.
fn closing(response: &mut Response<Body>) {
    response.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
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

/// A request body under the listener's bounds: it fails once it pauses longer than its limit or
/// runs past its deadline, counts its bytes against the buffer budget, and takes the request's
/// in-flight slot when it ends. The timer is armed only when a read would wait, so a body that
/// arrives with its head (nearly every LLM call) costs no timer.
struct Inbound {
    /// `None` only while the request is being built.
    inner: Option<Incoming>,
    pause_limit: Duration,
    /// The whole body's deadline.
    deadline: Instant,
    timer: Option<Pin<Box<Sleep>>>,
    intake: Arc<Intake>,
    /// The in-flight cap, for requests counted against it.
    in_flight: Option<Arc<Semaphore>>,
    metrics: Arc<Metrics>,
    ended: bool,
}

/// The error of a request body that paused longer than `--body-read-timeout` or took longer than
/// `--body-timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the request body paused for longer than the gateway allows")]
pub struct BodyPaused;

/// A complete request body the gateway will not take: the buffer budget is spent, or the
/// in-flight cap is reached.
#[derive(Debug, thiserror::Error)]
pub enum BodyRefused {
    #[error("the buffer budget is spent")]
    BuffersFull,
    #[error("the in-flight cap is reached")]
    Shed,
}

type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl Inbound {
    /// The body is complete: take the request's in-flight slot, or refuse it.
    fn admit(&mut self) -> Option<BodyError> {
        self.ended = true;
        self.intake.mark_read();
        let sem = self.in_flight.as_ref()?;
        match sem.clone().try_acquire_owned() {
            Ok(slot) => {
                self.intake.hold(slot);
                None
            }
            Err(_) => {
                self.metrics.requests_shed.inc();
                Some(Box::new(BodyRefused::Shed))
            }
        }
    }
}

impl hyper::body::Body for Inbound {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                // The next wait starts its own count.
                this.timer = None;
                if Instant::now() > this.deadline {
                    return Poll::Ready(Some(Err(Box::new(BodyPaused))));
                }
                if let Some(data) = frame.data_ref()
                    && this.intake.charge(data.len()).is_err()
                {
                    return Poll::Ready(Some(Err(Box::new(BodyRefused::BuffersFull))));
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => {
                return Poll::Ready(this.admit().map(Err));
            }
            Poll::Pending => {}
        }
        let (limit, deadline) = (this.pause_limit, this.deadline);
        let timer = this.timer.get_or_insert_with(|| {
            Box::pin(tokio::time::sleep_until(
                deadline.min(Instant::now() + limit),
            ))
        });
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyPaused)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        // Polled to its end even when hyper knows it is empty: the end takes the slot.
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(SizeHint::default, |b| b.size_hint())
    }
}

/// The gateway's answer to a body-read error raised here: 408 past `--body-read-timeout` or
/// `--body-timeout`, 503 when the buffer budget or the in-flight cap refused the request.
pub fn body_error(err: &(dyn std::error::Error + 'static)) -> Option<GatewayError> {
    let mut current = Some(err);
    while let Some(e) = current {
        if e.is::<BodyPaused>() {
            return Some(GatewayError::BodyTimeout);
        }
        if let Some(refused) = e.downcast_ref::<BodyRefused>() {
            return Some(match refused {
                BodyRefused::BuffersFull => GatewayError::BuffersFull,
                BodyRefused::Shed => GatewayError::Overloaded,
            });
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use axum::routing::{get, post};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::sync::Notify;

    use super::super::error;
    use super::*;

    struct Server {
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        release: Arc<Notify>,
        stop: CancellationToken,
    }

    /// A listener over a router whose `/v1/chat/completions` reads its body, then waits until
    /// released, and whose `/echo` reads a JSON body the way the surfaces do.
    async fn start(limits: ListenerLimits) -> Server {
        let release = Arc::new(Notify::new());
        let held = release.clone();
        let wait = move |uri: http::Uri, body: Body| {
            let held = held.clone();
            async move {
                if let Err(e) = axum::body::to_bytes(body, 1 << 20).await {
                    let err = body_error(&e).unwrap_or(GatewayError::BodyTimeout);
                    return error::for_path(uri.path(), err);
                }
                held.notified().await;
                axum::response::IntoResponse::into_response("released")
            }
        };
        let router = Router::new()
            .route("/v1/chat/completions", post(wait.clone()))
            .route("/gateway/{name}/invocations", post(wait))
            .route("/healthz", get(|| async { "ok" }))
            .route(
                "/echo",
                post(|headers: http::HeaderMap, body: Body| async move {
                    match super::super::body::read_json(&headers, body, 1 << 20).await {
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

    /// A small body still gets its 200 (the listener gave back what the last request held).
    async fn assert_serves(addr: SocketAddr) {
        let (ok, _) = exchange(
            addr,
            &post_raw("/echo", r#"{"a":1}"#),
            Duration::from_secs(5),
        )
        .await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
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
        assert_serves(server.addr).await;
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

    #[tokio::test]
    async fn a_body_that_trickles_ends_with_408_at_its_deadline() {
        let server = start(ListenerLimits {
            body_read_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_millis(800),
            ..Default::default()
        })
        .await;
        let started = Instant::now();
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        tcp.write_all(b"POST /echo HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\nconnection: close\r\n\r\n{").await.unwrap();
        // A byte every 200 ms never pauses long enough for the pause limit.
        let mut out = Vec::new();
        for _ in 0..20 {
            if tcp.write_all(b" ").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut buf = [0u8; 512];
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(1), tcp.read(&mut buf)).await
            {
                out.extend_from_slice(&buf[..n]);
                break;
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), tcp.read_to_end(&mut out)).await;
        let answer = String::from_utf8_lossy(&out);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn bodies_beyond_the_buffer_budget_are_refused_with_503() {
        let server = start(ListenerLimits {
            max_buffered_request_bytes: 1000,
            ..Default::default()
        })
        .await;
        let big = format!(r#"{{"a":"{}"}}"#, "x".repeat(2000));
        let (answer, _) = exchange(
            server.addr,
            &post_raw("/echo", &big),
            Duration::from_secs(5),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("retry-after: 1"),
            "{answer}"
        );
        assert!(answer.contains("max-buffered-request-bytes"), "{answer}");
        // Given back: a small body passes afterwards.
        assert_eq!(server.metrics.request_buffer_bytes.get(), 0);
        assert_serves(server.addr).await;
    }

    #[tokio::test]
    async fn a_request_whose_body_never_completes_holds_no_in_flight_slot() {
        let server = start(ListenerLimits {
            max_in_flight: 1,
            ..Default::default()
        })
        .await;
        // Ten bodies stalled half-way: none of them is in flight.
        let mut stalled = Vec::new();
        for _ in 0..10 {
            let mut tcp = TcpStream::connect(server.addr).await.unwrap();
            tcp.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{").await.unwrap();
            stalled.push(tcp);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let addr = server.addr;
        let call = tokio::spawn(async move {
            exchange(
                addr,
                &post_raw("/v1/chat/completions", "{}"),
                Duration::from_secs(5),
            )
            .await
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.release.notify_waiters();
        let (answer, _) = call.await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert_eq!(server.metrics.requests_shed.get(), 0);
    }

    #[test]
    fn flags_are_checked() {
        let args = ListenerArgs {
            header_read_timeout: 10.0,
            body_read_timeout: 30.0,
            body_timeout: 30.0,
            max_buffered_request_bytes: 1 << 20,
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
