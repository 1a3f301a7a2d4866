//! The MCP gateway's metrics (defined here, beside the others, so telemetry names no gateway
//! above it): tool calls by server, tool and outcome, and their latency.

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
