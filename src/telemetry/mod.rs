//! Logs, traces and metrics. Nothing logged or exported carries a credential: secret values only
//! exist inside `SecretValue`, whose `Debug`/`Display` print a redaction, and no prompt is recorded.

mod batch;
pub mod mcp;
pub mod metrics;
pub mod requestlog;
pub mod tracecontext;

use std::io::IsTerminal;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Flushes exported spans and buffered log lines on drop (at shutdown).
pub struct TelemetryGuard {
    traces: Option<SdkTracerProvider>,
    _logs: batch::BatchGuard,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.traces.take() {
            let _ = provider.shutdown();
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TelemetryError(String);

/// Installs the log subscriber and, when `otlp_endpoint` is set, an OTLP/HTTP trace exporter.
pub fn init(
    format: LogFormat,
    otlp_endpoint: Option<&str>,
) -> Result<TelemetryGuard, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,kube=warn,hyper=warn"));
    let (writer, log_guard) = batch::writer(std::io::stderr())
        .map_err(|e| TelemetryError(format!("cannot start the log writer: {e}")))?;
    // Colours only for a terminal: a pod's log is a file, where escape codes are noise, and
    // painting every field costs a tenth of a proxied call's instructions.
    requestlog::install(format == LogFormat::Json, writer.clone());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .boxed(),
    };
    let provider = match otlp_endpoint {
        None => None,
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(endpoint)
                .build()
                .map_err(|e| {
                    TelemetryError(format!("cannot set up the OTLP trace exporter: {e}"))
                })?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name("portcullis")
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("portcullis")));
    tracecontext::set_exporting(otel.is_some());
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .init();
    Ok(TelemetryGuard {
        traces: provider,
        _logs: log_guard,
    })
}
