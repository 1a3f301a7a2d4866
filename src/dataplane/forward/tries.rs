//! The tries of one call across a route's backends: which backend next and with how much time,
//! and, after each try, the verdict (a pure function of the outcome, the policy, the tries made
//! and the clock) applied together with the backend's health and metrics.

use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::api::RetryOn;
use crate::dataplane::AppState;
use crate::dataplane::error::GatewayError;
use crate::dataplane::observe;
use crate::llm::LlmRequest;
use crate::pools::{Endpoint, InFlight, Picker, PoolBackend};
use crate::table::{Backend, Backends};
use crate::telemetry::metrics::BackendErrorLabels;
use crate::traffic::{self, BackendHealth, TrafficPolicy};

/// The failure class of an upstream error, for retries and outlier detection; `None` for errors
/// that say nothing about the backend's health (a 400, a content policy refusal).
pub(super) fn failure_class(err: &GatewayError) -> Option<RetryOn> {
    match err {
        GatewayError::Upstream { status, .. } if status.as_u16() == 429 => {
            Some(RetryOn::RateLimited)
        }
        GatewayError::Upstream { status, .. }
            if status.is_server_error() || status.as_u16() == 529 =>
        {
            Some(RetryOn::Unavailable)
        }
        GatewayError::UpstreamTimeout(_) | GatewayError::UpstreamStalled(_) => {
            Some(RetryOn::Timeout)
        }
        // Only a failure before the request was written: retrying it cannot bill twice.
        GatewayError::UpstreamUnreachable(_) => Some(RetryOn::ConnectFailure),
        // A stream closed before its first chunk, or a connection lost after the request was
        // sent, is a provider that went away mid-answer (and may bill it).
        GatewayError::UpstreamTruncated(_) | GatewayError::UpstreamConnectionLost(_) => {
            Some(RetryOn::Unavailable)
        }
        _ => None,
    }
}

/// Whether the provider may have billed a try that ended in `err`: the request was sent and no
/// usable answer (with its usage) came back. Such a call is settled at no less than its
/// reservation; errors the provider answered (4xx, 5xx) and failures to connect are refunded.
pub(super) fn may_have_billed(err: &GatewayError) -> bool {
    matches!(
        err,
        GatewayError::UpstreamTimeout(_)
            | GatewayError::UpstreamStalled(_)
            | GatewayError::UpstreamMalformed(_)
            | GatewayError::UpstreamTruncated(_)
            | GatewayError::UpstreamConnectionLost(_)
    )
}

/// What follows a try.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// The try's outcome is the call's: an answer, or an error that says nothing of the
    /// backend's health (a 400, a refused credential).
    Answer,
    /// A failure of this class, tried again on another backend.
    Retry(RetryOn),
    /// A failure of this class that ends the call: not listed in `retryOn`, or no tries or time left.
    GiveUp(RetryOn),
}

/// The retry decision, pure: `error` is the try's (`None` for an answer), `tries` the tries made
/// so far including this one.
pub(super) fn verdict(
    error: Option<&GatewayError>,
    policy: &TrafficPolicy,
    tries: u32,
    now: Instant,
    deadline: Instant,
) -> Verdict {
    let Some(class) = error.and_then(failure_class) else {
        return Verdict::Answer;
    };
    if policy.retries(class) && tries < policy.attempts && now < deadline {
        Verdict::Retry(class)
    } else {
        Verdict::GiveUp(class)
    }
}

/// One try: the backend, for a pool backend the endpoint (counted in flight while this lives),
/// and the time the try may take.
pub(super) struct Try<'a> {
    pub(super) backend: &'a Backend,
    pub(super) endpoint: Option<InFlight>,
    pub(super) timeout: Duration,
}

impl Try<'_> {
    /// Where a pool backend's call goes instead of its URL's host.
    pub(super) fn to(&self) -> Option<SocketAddr> {
        self.endpoint.as_ref().map(|e| e.endpoint().addr)
    }

    fn health(&self) -> &BackendHealth {
        match &self.endpoint {
            Some(e) => &e.endpoint().health,
            None => &self.backend.health,
        }
    }
}

/// The tries of one call across a route's backends: which backend next, with how much time, and
/// whether a failure is retried. Health and per-backend metrics are updated as tries end.
pub(super) struct Tries<'a> {
    state: &'a AppState,
    /// The route's served name, for metrics and logs.
    route: &'a Arc<str>,
    backends: &'a Backends,
    request: &'a LlmRequest,
    /// The whole call's deadline: no try starts after it, none runs past it.
    deadline: Instant,
    tried: u32,
    /// Pool backends that cannot take this call (saturated, or no untried endpoint left).
    unavailable: u32,
    /// Endpoints of pool backends tried already.
    tried_endpoints: Vec<SocketAddr>,
    /// The prompt's prefix blocks, hashed on the first pick of a pool backend.
    blocks: Option<Vec<u64>>,
    count: u32,
    /// A failed try may have been billed (see `may_have_billed`).
    pub(super) billed: bool,
}

impl<'a> Tries<'a> {
    pub(super) fn new(
        state: &'a AppState,
        route: &'a Arc<str>,
        backends: &'a Backends,
        request: &'a LlmRequest,
    ) -> Self {
        Tries {
            state,
            route,
            backends,
            request,
            deadline: Instant::now() + state.upstream_timeout,
            tried: 0,
            unavailable: 0,
            tried_endpoints: Vec::new(),
            blocks: None,
            count: 0,
            billed: false,
        }
    }

    /// The backend (and endpoint) for the next try and the time it may take.
    pub(super) async fn next(&mut self) -> Result<Try<'a>, GatewayError> {
        let list = &self.backends.list;
        let now = traffic::now_ms();
        let (backend, endpoint) = loop {
            let open = |i: &usize| self.unavailable & (1 << i) == 0;
            // Untried backends first; then any that can still take the call (a retry).
            let index = traffic::pick(list, self.tried | self.unavailable, now)
                .filter(open)
                .or_else(|| traffic::pick(list, self.unavailable, now).filter(open));
            // Reconcile publishes a route as ready only with a backend of positive weight.
            let Some((index, backend)) = index.and_then(|i| Some((i, list.get(i)?))) else {
                return Err(GatewayError::UpstreamUnreachable(format!(
                    "route {:?} has no backend that can take calls",
                    self.route
                )));
            };
            let Some(pool) = &backend.pool else {
                self.tried |= 1 << index;
                break (backend, None);
            };
            let chosen = match pool.pool.picker() {
                Some(picker) => match self.ask_picker(backend, pool, &picker).await {
                    Ok(endpoint) => Some(endpoint),
                    // FailOpen: the gateway's own choice, as if there were no picker.
                    Err(()) if picker.fail_open => self.own_pick(pool, now),
                    Err(()) => None,
                },
                None => self.own_pick(pool, now),
            };
            match chosen {
                Some(endpoint) => {
                    // The pool stays untried while it has an untried endpoint: a retry goes to
                    // another of its endpoints first (a pod that just went away, say).
                    self.tried_endpoints.push(endpoint.addr);
                    break (backend, Some(endpoint.begin()));
                }
                None => {
                    // Saturated or empty: the next priority takes the call, unnoticed.
                    pool.pool.spilled();
                    debug!(route = %self.route, pool = %pool.pool.id, "pool cannot take the call; trying the next backend");
                    self.unavailable |= 1 << index;
                }
            }
        };
        self.count += 1;
        backend
            .metrics(self.route, &self.state.metrics)
            .requests
            .inc();
        let remaining = self.deadline.saturating_duration_since(Instant::now());
        let timeout = self
            .backends
            .policy
            .per_try_timeout
            .map_or(remaining, |t| t.min(remaining));
        Ok(Try {
            backend,
            endpoint,
            timeout,
        })
    }

    /// The gateway's own choice of an untried endpoint of `pool`.
    fn own_pick(&mut self, pool: &PoolBackend, now: u64) -> Option<Arc<Endpoint>> {
        let request = self.request;
        let blocks = self
            .blocks
            .get_or_insert_with(|| crate::pools::pick::prefix_blocks(request));
        pool.pick(blocks, &self.tried_endpoints, now)
    }

    /// The endpoint picker's choice: its first named endpoint that is a ready, untried one of
    /// the pool (its fallbacks in order); `Err` when it did not answer with one.
    async fn ask_picker(
        &self,
        backend: &Backend,
        pool: &PoolBackend,
        picker: &Picker,
    ) -> Result<Arc<Endpoint>, ()> {
        let upstream = &backend.upstream;
        // What the model server will get, so the picker reads the same model and prompt.
        let built = upstream
            .adapter
            .build_request(&upstream.target, self.request)
            .map_err(|_| ())?;
        let path = built
            .url
            .strip_prefix(crate::pools::POOL_URL_ORIGIN)
            .unwrap_or("/v1/chat/completions");
        let started = Instant::now();
        let answer = match &picker.client {
            Some(client) => {
                client
                    .pick(path, &[("content-type", "application/json")], built.body)
                    .await
            }
            None => Err(crate::pools::epp::EppError::NoAddress),
        };
        pool.pool
            .picker_answered(started.elapsed(), answer.as_ref().err());
        let named = answer.map_err(|e| {
            debug!(route = %self.route, pool = %pool.pool.id, error = %e, "endpoint picker gave no choice");
        })?;
        let set = pool.pool.endpoints();
        named
            .iter()
            .filter(|a| !self.tried_endpoints.contains(a))
            .find_map(|a| set.list.iter().find(|e| e.addr == *a).cloned())
            .ok_or(())
    }

    /// Records how a try ended; `Continue` when the call is to be tried again.
    pub(super) fn settle<T>(
        &mut self,
        attempt: &Try<'_>,
        result: Result<T, GatewayError>,
    ) -> ControlFlow<Result<T, GatewayError>> {
        let backend = attempt.backend;
        let health = attempt.health();
        let metrics = backend.metrics(self.route, &self.state.metrics);
        let err = match result {
            Ok(answer) => {
                if health.succeeded(traffic::now_ms()) {
                    metrics.ejected.set(0);
                }
                self.note_answered(attempt);
                return ControlFlow::Break(Ok(answer));
            }
            Err(e) => e,
        };
        self.state
            .metrics
            .backend_errors
            .get_or_create(&BackendErrorLabels {
                route: metrics.labels.route.clone(),
                backend: metrics.labels.backend.clone(),
                error_type: err.code(),
            })
            .inc();
        if matches!(err, GatewayError::CredentialRejected { .. }) {
            backend.health.credential_rejected();
        }
        self.billed |= may_have_billed(&err);
        let policy = &self.backends.policy;
        let decision = verdict(
            Some(&err),
            policy,
            self.count,
            Instant::now(),
            self.deadline,
        );
        let class = match decision {
            Verdict::Answer => {
                self.note_answered(attempt);
                return ControlFlow::Break(Err(err));
            }
            Verdict::Retry(class) | Verdict::GiveUp(class) => class,
        };
        let retry_after = err.retry_after().filter(|_| class == RetryOn::RateLimited);
        // A 429 that concerns this request alone is retried but says nothing of the backend.
        let scoped = matches!(
            err,
            GatewayError::Upstream {
                request_scoped: true,
                ..
            }
        );
        // A pool's endpoint is ejected alone: the pool's other endpoints go on serving.
        if !scoped
            && let Some(hold) = health.failed(&policy.outlier, retry_after, traffic::now_ms())
        {
            metrics.ejections.inc();
            if attempt.endpoint.is_none() {
                metrics.ejected.set(1);
            }
            match &attempt.endpoint {
                Some(e) => {
                    warn!(route = %self.route, backend = %backend.id, endpoint = %e.endpoint().name, ejected_ms = hold.as_millis() as u64, error = err.code(), "pool endpoint ejected")
                }
                None => {
                    warn!(route = %self.route, backend = %backend.id, ejected_ms = hold.as_millis() as u64, error = err.code(), "backend ejected")
                }
            }
        }
        if !matches!(decision, Verdict::Retry(_)) {
            self.note_answered(attempt);
            return ControlFlow::Break(Err(err));
        }
        metrics.retries.inc();
        debug!(route = %self.route, backend = %backend.id, error = err.code(), attempt = self.count, "retrying on another backend");
        ControlFlow::Continue(())
    }

    /// The backend that gave the call's answer, for the response header, log line and metrics.
    pub(super) fn note_answered(&self, attempt: &Try<'_>) {
        let backend = attempt.backend;
        let answered = observe::Answered {
            backend: Arc::clone(&backend.id),
            header: backend.header.clone(),
            attempts: self.count,
            endpoint: attempt
                .endpoint
                .as_ref()
                .map(|e| e.endpoint().header.clone()),
        };
        let provider = backend.upstream.adapter.info().provider.as_str();
        observe::note(|c| {
            c.provider = Some(provider);
            c.answered = Some(answered);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::RetryPolicy;
    use http::StatusCode;

    fn upstream(status: u16) -> GatewayError {
        GatewayError::Upstream {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
            message: "x".into(),
            retry_after: None,
            request_scoped: false,
        }
    }

    fn policy(attempts: u32, on: Option<Vec<RetryOn>>) -> TrafficPolicy {
        let retry = RetryPolicy {
            attempts: Some(attempts),
            retry_on: on,
            ..Default::default()
        };
        TrafficPolicy::from_spec(Some(&retry), None, 1).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn verdicts() {
        use RetryOn::*;
        use Verdict::*;
        let now = Instant::now();
        let later = now + Duration::from_secs(30);
        let all = policy(3, None);
        let only_429 = policy(3, Some(vec![RateLimited]));
        let only_connect = policy(3, Some(vec![ConnectFailure]));
        // (case, the try's error, policy, tries made, the call's deadline, verdict)
        type Case<'a> = (
            &'a str,
            Option<GatewayError>,
            &'a TrafficPolicy,
            u32,
            Instant,
            Verdict,
        );
        let cases: Vec<Case> = vec![
            ("an answer", None, &all, 1, later, Answer),
            (
                "a 400 is the caller's",
                Some(upstream(400)),
                &all,
                1,
                later,
                Answer,
            ),
            (
                "429",
                Some(upstream(429)),
                &all,
                1,
                later,
                Retry(RateLimited),
            ),
            (
                "500",
                Some(upstream(500)),
                &all,
                2,
                later,
                Retry(Unavailable),
            ),
            (
                "529 overloaded",
                Some(upstream(529)),
                &all,
                1,
                later,
                Retry(Unavailable),
            ),
            (
                "timeout",
                Some(GatewayError::UpstreamTimeout(1)),
                &all,
                1,
                later,
                Retry(Timeout),
            ),
            (
                "stalled stream",
                Some(GatewayError::UpstreamStalled(1)),
                &all,
                1,
                later,
                Retry(Timeout),
            ),
            (
                "refused",
                Some(GatewayError::UpstreamUnreachable("x".into())),
                &all,
                1,
                later,
                Retry(ConnectFailure),
            ),
            (
                "connection lost after the request was sent: the provider may bill it",
                Some(GatewayError::UpstreamConnectionLost("x".into())),
                &only_connect,
                1,
                later,
                GiveUp(Unavailable),
            ),
            (
                "closed before the first chunk",
                Some(GatewayError::UpstreamTruncated(
                    crate::api::Provider::Openai,
                )),
                &all,
                1,
                later,
                Retry(Unavailable),
            ),
            (
                "out of tries",
                Some(upstream(429)),
                &all,
                3,
                later,
                GiveUp(RateLimited),
            ),
            (
                "out of time",
                Some(upstream(429)),
                &all,
                1,
                now,
                GiveUp(RateLimited),
            ),
            (
                "not listed",
                Some(GatewayError::UpstreamTimeout(1)),
                &only_429,
                1,
                later,
                GiveUp(Timeout),
            ),
            (
                "listed",
                Some(upstream(429)),
                &only_429,
                1,
                later,
                Retry(RateLimited),
            ),
        ];
        for (name, error, policy, tries, deadline, expected) in cases {
            assert_eq!(
                verdict(error.as_ref(), policy, tries, now, deadline),
                expected,
                "{name}"
            );
        }
    }

    #[test]
    fn only_tries_that_reached_the_provider_may_have_been_billed() {
        assert!(may_have_billed(&GatewayError::UpstreamConnectionLost(
            "x".into()
        )));
        assert!(may_have_billed(&GatewayError::UpstreamTimeout(1)));
        assert!(may_have_billed(&GatewayError::UpstreamMalformed(
            "x".into()
        )));
        assert!(!may_have_billed(&GatewayError::UpstreamUnreachable(
            "x".into()
        )));
        assert!(!may_have_billed(&upstream(500)));
    }
}
