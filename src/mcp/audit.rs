//! The record of every `tools/call`: one log line and span, a counter and a latency histogram.
//! Arguments and results are logged only with `--mcp-log-payloads` (off by default): they are the
//! callers' and the tools' data, not the gateway's.

use std::time::Duration;

use crate::telemetry::mcp::{CallLabels, McpMetrics, ServerLabels};

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
