//! What a call is counted as: token and cost metrics, upstream errors, and a stream's observer
//! (time to first token, usage, the `truncate` budget that may end it, settlement on drop, and
//! the drain of a stream its caller left).

use std::sync::Arc;
use std::time::Instant;

use futures::{Stream, StreamExt};

use crate::cost::{Price, Tokens};
use crate::dataplane::admission::{self, Admission};
use crate::dataplane::error::GatewayError;
use crate::dataplane::observe::{self, CallCost};
use crate::dataplane::{AppState, UpstreamLimits};
use crate::limits::Spent;
use crate::llm::{LlmResponse, StreamDelta, Usage};
use crate::table::{Backend, RouteEntry};
use crate::telemetry::metrics::{
    ConsumerCost, ConsumerTokens, CostLabels, ErrorLabels, Metrics, PerConsumer, TokenLabels,
};

/// Characters of generated text in an answer (what a call without a usage report is charged for).
pub(super) fn answer_chars(answer: &LlmResponse) -> usize {
    match answer {
        LlmResponse::Generation(g) => g.choices.iter().map(|c| c.text.len()).sum(),
        LlmResponse::Embeddings(_) => 0,
        LlmResponse::Native(n) => n.chars,
    }
}

/// The backend that answered, as its cost is counted.
pub(super) struct Priced {
    pub(super) price: Option<Price>,
    /// The price Team budgets are charged (never below the cluster-wide price).
    pub(super) team_price: Option<Price>,
    pub(super) provider: &'static str,
    pub(super) model: Arc<str>,
    cost: Arc<PerConsumer<ConsumerCost>>,
}

impl Priced {
    pub(super) fn of(backend: &Backend) -> Priced {
        Priced {
            price: backend.price,
            team_price: backend.team_price,
            provider: backend.upstream.adapter.info().provider.as_str(),
            model: Arc::clone(&backend.model),
            cost: Arc::clone(&backend.cost),
        }
    }

    /// What `tokens` cost the Route's and the Teams' budgets; `None` when unknown.
    pub(super) fn spent(&self, tokens: Tokens) -> Option<Spent> {
        let route = self.price?.cost(tokens);
        Some(Spent {
            route,
            team: self.team_price.map_or(route, |p| p.cost(tokens)),
        })
    }
}

/// The cost of an answered call at its backend's price, counted in `portcullis_cost_usd_total`.
pub(super) fn record_cost(
    metrics: &Metrics,
    entry: &RouteEntry,
    consumer: &Arc<str>,
    backend: &Priced,
    tokens: Tokens,
) -> CallCost {
    let counter = backend.cost.get(consumer, || {
        let labels = CostLabels {
            route: entry.name.clone(),
            gen_ai_provider_name: backend.provider,
            gen_ai_request_model: backend.model.clone(),
            consumer: Arc::clone(consumer),
        };
        match backend.price {
            Some(_) => ConsumerCost::Usd(metrics.cost.usd.get_or_create_owned(&labels)),
            None => ConsumerCost::Unknown(metrics.cost.unknown.get_or_create_owned(&labels)),
        }
    });
    match (counter, backend.price) {
        (ConsumerCost::Usd(usd), Some(price)) => {
            let spent = price.cost(tokens);
            usd.add(spent);
            CallCost::Known(spent)
        }
        (ConsumerCost::Unknown(n), _) => {
            n.inc();
            CallCost::Unknown
        }
        // Not made: a backend's counter follows its price.
        (ConsumerCost::Usd(_), None) => CallCost::Unknown,
    }
}

/// Token counters, and the usage fields of the request log line.
pub(super) fn record_usage(
    metrics: &Metrics,
    entry: &RouteEntry,
    consumer: &Arc<str>,
    usage: &Usage,
) {
    if usage.prompt_tokens.is_some() || usage.completion_tokens.is_some() {
        let counters = entry.metrics(metrics).tokens.get(consumer, || {
            let counter = |kind| {
                metrics.tokens.get_or_create_owned(&TokenLabels {
                    route: entry.name.clone(),
                    gen_ai_provider_name: entry.provider.as_str(),
                    gen_ai_request_model: entry.model.clone(),
                    consumer: Arc::clone(consumer),
                    gen_ai_token_type: kind,
                })
            };
            ConsumerTokens {
                input: counter("input"),
                output: counter("output"),
            }
        });
        for (counter, count) in [
            (&counters.input, usage.prompt_tokens),
            (&counters.output, usage.completion_tokens),
        ] {
            if let Some(n) = count {
                counter.inc_by(n);
            }
        }
    }
    let usage = *usage;
    observe::note(|c| c.usage = Some(usage));
}

pub(super) fn record_error(metrics: &Metrics, entry: &RouteEntry, err: &GatewayError) {
    let labels = ErrorLabels {
        route: entry.name.clone(),
        gen_ai_provider_name: entry.provider.as_str(),
        error_type: err.code(),
    };
    metrics.upstream_errors.get_or_create(&labels).inc();
}

/// Records a stream's metrics as it passes: time to first token, usage, errors, and the total
/// upstream time when the stream ends or the client goes away (on drop).
pub(super) struct StreamObserver {
    metrics: Arc<Metrics>,
    entry: Arc<RouteEntry>,
    consumer: Arc<str>,
    started: Instant,
    first_chunk: Option<Instant>,
    usage: Option<Usage>,
    /// Text seen so far: what an early-ended stream is charged when no usage arrived.
    streamed_chars: usize,
    admission: Option<Admission>,
    priced: Priced,
    /// What a `truncate` budget lets this stream spend, and that budget.
    allowance: Option<(crate::cost::Usd, String)>,
    /// Ended by its budget: charged what was sent, whatever usage arrives.
    truncated: bool,
    /// A try before this one may have been billed.
    billed: bool,
    /// The provider's stream failed (broke, stalled, cut): it may have billed more than was sent.
    failed: bool,
    /// The provider's end marker (a finish reason) arrived.
    finished: bool,
    /// How long and how far a stream its caller left is read on for its usage.
    limits: UpstreamLimits,
}

impl StreamObserver {
    pub(super) fn new(
        state: &AppState,
        entry: &Arc<RouteEntry>,
        started: Instant,
        admission: Admission,
        backend: &Backend,
        billed: bool,
    ) -> StreamObserver {
        StreamObserver {
            billed,
            failed: false,
            finished: false,
            limits: state.upstream_limits,
            allowance: admission.allowance(),
            truncated: false,
            metrics: Arc::clone(&state.metrics),
            entry: Arc::clone(entry),
            consumer: observe::consumer(),
            started,
            first_chunk: None,
            usage: None,
            streamed_chars: 0,
            admission: Some(admission),
            priced: Priced::of(backend),
        }
    }

    /// The stream as the caller gets it: observed as it passes, ended by an error event where
    /// its budget runs out (which drops the upstream response and cancels the call), and drained
    /// for its usage when the caller leaves early (see `Drained`).
    pub(super) fn watch(
        self,
        deltas: impl Stream<Item = Result<Vec<StreamDelta>, GatewayError>> + Send + 'static,
    ) -> impl Stream<Item = Result<Vec<StreamDelta>, GatewayError>> + Send + 'static {
        let limits = self.limits;
        let watched = deltas.scan(self, |observer, mut item| {
            if observer.truncated {
                return futures::future::ready(None);
            }
            if let Some(cut) = observer.over_budget(&item) {
                observer.truncated = true;
                return futures::future::ready(Some(Err(cut)));
            }
            observer.see(&item);
            if let Ok(deltas) = &mut item {
                observer.price_usage(deltas);
            }
            futures::future::ready(Some(item))
        });
        Drained {
            inner: Some(watched.boxed()),
            done: false,
            limits,
        }
    }

    /// The final event when passing these deltas would take the stream's cost past its allowance.
    fn over_budget(&self, item: &Result<Vec<StreamDelta>, GatewayError>) -> Option<GatewayError> {
        let (Some((allowed, budget)), Ok(deltas), Some(price)) =
            (self.allowance.as_ref(), item, self.priced.price)
        else {
            return None;
        };
        let text: usize = deltas
            .iter()
            .filter_map(|d| d.text.as_ref())
            .map(String::len)
            .sum();
        if text == 0 {
            return None;
        }
        let prompt = self.admission.as_ref().map_or(0, |a| a.prompt_estimate);
        let running = price.cost(Tokens {
            input: prompt,
            cached: 0,
            output: admission::tokens_for_chars(self.streamed_chars + text),
        });
        (running > *allowed).then(|| GatewayError::BudgetTruncated {
            budget: budget.clone(),
            allowed: allowed.format(2),
        })
    }

    fn see(&mut self, item: &Result<Vec<StreamDelta>, GatewayError>) {
        match item {
            Ok(deltas) => {
                if self.first_chunk.is_none() {
                    let now = Instant::now();
                    self.first_chunk = Some(now);
                    let ttft = now.duration_since(self.started).as_secs_f64();
                    self.entry
                        .metrics(&self.metrics)
                        .time_to_first_token
                        .observe(ttft);
                }
                // Tool-call arguments are output too.
                self.streamed_chars += deltas
                    .iter()
                    .map(|d| {
                        d.text.as_ref().map_or(0, String::len)
                            + d.tool_calls
                                .iter()
                                .map(|t| t.arguments.len())
                                .sum::<usize>()
                    })
                    .sum::<usize>();
                if let Some(usage) = deltas.iter().rev().find_map(|d| d.usage) {
                    self.usage = Some(usage);
                }
                self.finished |= deltas.iter().any(|d| d.finish_reason.is_some());
            }
            Err(e) => {
                self.failed = true;
                record_error(&self.metrics, &self.entry, e);
            }
        }
    }
}

impl StreamObserver {
    /// Notes the call's cost on the delta that reports usage, for dialects with a final usage
    /// chunk (the metric and the log line are written when the stream ends, on drop).
    fn price_usage(&self, deltas: &mut [StreamDelta]) {
        let Some(delta) = deltas.iter_mut().rev().find(|d| d.usage.is_some()) else {
            return;
        };
        let tokens = delta.usage.as_ref().and_then(Tokens::from_usage);
        delta.cost_usd = Some(match (self.priced.price, tokens) {
            (Some(price), Some(tokens)) => price.cost(tokens).to_string(),
            _ => "unknown".to_string(),
        });
    }
}

impl Drop for StreamObserver {
    fn drop(&mut self) {
        self.entry
            .metrics(&self.metrics)
            .upstream_duration
            .observe(self.started.elapsed().as_secs_f64());
        if let Some(usage) = self.usage {
            record_usage(&self.metrics, &self.entry, &self.consumer, &usage);
        }
        // A stream cut short has no usage report: it costs the prompt and the text sent so far.
        let prompt_estimate = self.admission.as_ref().map_or(0, |a| a.prompt_estimate);
        let tokens = self
            .usage
            .as_ref()
            .filter(|_| !self.truncated)
            .and_then(Tokens::from_usage)
            .unwrap_or(Tokens {
                input: prompt_estimate,
                cached: 0,
                output: admission::tokens_for_chars(self.streamed_chars),
            });
        let cost = record_cost(
            &self.metrics,
            &self.entry,
            &self.consumer,
            &self.priced,
            tokens,
        );
        if let Some(admission) = self.admission.take() {
            let reported = self
                .usage
                .as_ref()
                .filter(|_| !self.truncated)
                .and_then(admission::used_tokens);
            let used = reported.unwrap_or(tokens.input.saturating_add(tokens.output));
            let spent = self.priced.spent(tokens);
            // Without the provider's usage, a stream that failed, or was left before its end
            // and not drained to it, may have been billed for more than was sent.
            let unknown = reported.is_none() && (self.failed || !self.finished);
            if !self.truncated && (self.billed || unknown) {
                admission.settle_at_least(used, spent);
            } else {
                admission.settle(used, spent);
            }
        }
        tracing::info!(
            route = %self.entry.name,
            provider = self.entry.provider.as_str(),
            cost_usd = %cost,
            ttft_ms = self.first_chunk.map(|t| t.duration_since(self.started).as_secs_f64() * 1000.0),
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            prompt_tokens = self.usage.and_then(|u| u.prompt_tokens),
            completion_tokens = self.usage.and_then(|u| u.completion_tokens),
            "stream finished"
        );
    }
}

/// The caller's side of a stream. Dropped before its end (the caller went away), the rest of the
/// provider's stream is read in the background, within `UpstreamLimits::drain_time` and
/// `drain_bytes`, so that the call is charged the provider's final usage report (thinking, images
/// and tokens generated but never sent included) rather than the text the caller saw.
struct Drained {
    inner: Option<futures::stream::BoxStream<'static, Result<Vec<StreamDelta>, GatewayError>>>,
    done: bool,
    limits: UpstreamLimits,
}

impl Stream for Drained {
    type Item = Result<Vec<StreamDelta>, GatewayError>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let Some(inner) = self.inner.as_mut() else {
            return std::task::Poll::Ready(None);
        };
        let item = futures::ready!(inner.poll_next_unpin(cx));
        if item.is_none() {
            self.done = true;
        }
        std::task::Poll::Ready(item)
    }
}

impl Drop for Drained {
    fn drop(&mut self) {
        let Some(mut rest) = self.inner.take().filter(|_| !self.done) else {
            return;
        };
        // During shutdown there is no runtime to drain on: the reservation then stands.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let limits = self.limits;
        runtime.spawn(async move {
            let mut read = 0usize;
            let drain = async {
                while let Some(item) = rest.next().await {
                    read += item.as_ref().map_or(0, |d| d.iter().map(delta_bytes).sum());
                    if read > limits.drain_bytes {
                        tracing::warn!(
                            bytes = read,
                            "a stream left by its caller is larger than the drain limit; ending it"
                        );
                        return;
                    }
                }
            };
            if tokio::time::timeout(limits.drain_time, drain)
                .await
                .is_err()
            {
                tracing::warn!(
                    seconds = limits.drain_time.as_secs(),
                    "a stream left by its caller did not end within the drain limit; ending it"
                );
            }
            // Dropping `rest` here settles the call (`StreamObserver::drop`).
        });
    }
}

/// Bytes a decoded delta carries, for the drain limit.
fn delta_bytes(d: &StreamDelta) -> usize {
    d.text.as_ref().map_or(0, String::len)
        + d.raw.as_ref().map_or(0, bytes::Bytes::len)
        + d.tool_calls
            .iter()
            .map(|t| t.arguments.len())
            .sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    type Deltas = futures::stream::BoxStream<'static, Result<Vec<StreamDelta>, GatewayError>>;

    /// Sets its flag when dropped: the drained stream was let go.
    struct Released(Arc<AtomicBool>);

    impl Drop for Released {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    fn left_early(inner: Deltas, limits: UpstreamLimits) {
        drop(Drained {
            inner: Some(inner),
            done: false,
            limits,
        });
    }

    #[tokio::test]
    async fn a_stream_left_early_is_drained_within_its_time_and_byte_bounds() {
        let limits = UpstreamLimits {
            drain_time: Duration::from_millis(200),
            drain_bytes: 10_000,
            ..Default::default()
        };
        // An endless provider: drained until the byte bound.
        let (released, read) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        );
        let (guard, count) = (Released(Arc::clone(&released)), Arc::clone(&read));
        let endless = futures::stream::repeat_with(move || {
            let _ = &guard;
            count.fetch_add(1, Ordering::SeqCst);
            Ok(vec![StreamDelta {
                text: Some("x".repeat(1000)),
                ..Default::default()
            }])
        });
        left_early(endless.boxed(), limits);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(released.load(Ordering::SeqCst));
        assert_eq!(read.load(Ordering::SeqCst), 11);

        // A silent one: drained until the time bound.
        let released = Arc::new(AtomicBool::new(false));
        let guard = Released(Arc::clone(&released));
        let silent =
            futures::stream::pending::<Result<Vec<StreamDelta>, GatewayError>>().map(move |x| {
                let _ = &guard;
                x
            });
        left_early(silent.boxed(), limits);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!released.load(Ordering::SeqCst), "still draining");
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(released.load(Ordering::SeqCst));

        // A stream read to its end is not drained again.
        let released = Arc::new(AtomicBool::new(false));
        let guard = Released(Arc::clone(&released));
        let mut whole = Drained {
            inner: Some(
                futures::stream::iter([Ok(Vec::new())])
                    .map(move |x| {
                        let _ = &guard;
                        x
                    })
                    .boxed(),
            ),
            done: false,
            limits,
        };
        while whole.next().await.is_some() {}
        drop(whole);
        assert!(released.load(Ordering::SeqCst));
    }
}
