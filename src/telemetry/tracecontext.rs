//! W3C trace context across the gateway: the caller's `traceparent` parents the request span, and
//! the upstream call carries the context on to the provider. Without an OTLP exporter there are no
//! local spans, so the caller's header is passed on unchanged.

use http::{HeaderMap, HeaderValue};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub const TRACEPARENT: &str = "traceparent";

static EXPORTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether spans are exported (an OTLP endpoint is configured).
pub fn exporting() -> bool {
    EXPORTING.load(std::sync::atomic::Ordering::Relaxed)
}

pub(super) fn set_exporting(on: bool) {
    EXPORTING.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Makes `span` a child of the caller's trace, if the request carries one.
pub fn adopt_parent(span: &Span, headers: &HeaderMap) {
    if headers.contains_key(TRACEPARENT) {
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(headers))
        });
        let _ = span.set_parent(parent);
    }
}

/// Adds the trace context of `span` to an upstream request; falls back to the caller's
/// `traceparent` when no span is being exported.
pub fn inject(span: &Span, headers: &mut HeaderMap, caller_traceparent: Option<HeaderValue>) {
    if span.is_disabled() {
        if let Some(tp) = caller_traceparent {
            headers.insert(TRACEPARENT, tp);
        }
        return;
    }
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&cx, &mut HeaderInjector(headers))
        });
    } else if let Some(tp) = caller_traceparent {
        headers.insert(TRACEPARENT, tp);
    }
}
