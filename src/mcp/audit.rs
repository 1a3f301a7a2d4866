//! The record of every `tools/call`: one log line and span, a counter and a latency histogram.
//! Arguments and results are logged only with `--mcp-log-payloads` (off by default): they are the
//! callers' and the tools' data, not the gateway's.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// `namespace/name` of the McpServer.
    pub server: String,
    /// The tool as the server names it (only tools the server listed: never request input).
    pub tool: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServerLabels {
    pub server: String,
}

pub struct McpMetrics {
    pub calls: Family<CallLabels, Counter>,
    pub duration: Family<ServerLabels, Histogram>,
}

impl McpMetrics {
    pub fn register(registry: &mut Registry) -> McpMetrics {
        let calls = Family::<CallLabels, Counter>::default();
        let duration = Family::<ServerLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.0005, 2.5, 14))) as fn() -> Histogram,
        );
        registry.register(
            "portcullis_mcp_calls",
            "MCP tools/call requests by server, tool and outcome",
            calls.clone(),
        );
        registry.register_with_unit(
            "portcullis_mcp_call_duration",
            "Duration of MCP tools/call requests through the gateway",
            Unit::Seconds,
            duration.clone(),
        );
        McpMetrics { calls, duration }
    }
}

/// One finished `tools/call`.
pub struct CallRecord<'a> {
    pub caller: &'a str,
    pub server: &'a str,
    pub tool: &'a str,
    pub outcome: &'static str,
    pub duration: Duration,
    pub request_bytes: usize,
    pub response_bytes: usize,
}

impl CallRecord<'_> {
    pub fn log(&self, metrics: &McpMetrics) {
        tracing::info!(
            caller = self.caller,
            server = self.server,
            tool = self.tool,
            outcome = self.outcome,
            duration_ms = self.duration.as_secs_f64() * 1000.0,
            request_bytes = self.request_bytes,
            response_bytes = self.response_bytes,
            "mcp tools/call"
        );
        metrics
            .calls
            .get_or_create(&CallLabels {
                server: self.server.to_string(),
                tool: self.tool.to_string(),
                outcome: self.outcome,
            })
            .inc();
        metrics
            .duration
            .get_or_create(&ServerLabels {
                server: self.server.to_string(),
            })
            .observe(self.duration.as_secs_f64());
    }
}
