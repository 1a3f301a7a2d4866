//! The MCP gateway: upstream MCP servers (`McpServer` resources) federated into virtual servers
//! behind the same identities, access rules, limits and audit as the LLM routes.
//!
//! `controller.rs` (watch McpServers, list each server's tools, write status) -> `table.rs` (the
//! served snapshot) <- `handler.rs` (Streamable HTTP toward callers) -> `upstream.rs` (Streamable
//! HTTP toward servers). `session.rs` seals caller sessions so any replica continues them;
//! `wellknown.rs` answers unauthenticated callers; `audit.rs` records every tool call.

pub mod audit;
pub mod controller;
mod glob;
mod handler;
mod jsonrpc;
mod legacy;
pub mod oauth;
pub mod reply;
pub mod session;
pub mod table;
pub mod upstream;
mod wellknown;

use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};

use crate::dataplane::AppState;

/// What the MCP handlers read: the data plane's identities, table and metrics, and the gateway.
/// Its own state (not a field of `AppState`) keeps the data plane unaware of MCP.
#[derive(Clone)]
pub struct McpState {
    pub app: Arc<AppState>,
    pub gateway: Arc<McpGateway>,
}

/// The MCP gateway: its table, sessions and upstream sessions.
pub struct McpGateway {
    pub table: table::SharedMcpTable,
    pub sessions: session::Sealer,
    pub upstreams: upstream::Upstreams,
    /// Largest caller message read, in bytes.
    pub max_request: usize,
    /// `--mcp-log-payloads`: tool arguments and results in the log (off: never).
    pub log_payloads: bool,
    /// Named in the protected-resource metadata, when set.
    pub authorization_servers: Vec<String>,
    /// Told when a call found a server failing: the controller re-lists at once, so status says why.
    pub nudge: tokio::sync::Notify,
}

/// What the operator chooses (data-plane flags).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct McpArgs {
    /// Key that seals MCP session ids; replicas sharing it continue each other's sessions.
    /// Unset: a random key per process (sessions then stay on one replica).
    #[arg(long, env = "PORTCULLIS_MCP_SESSION_KEY", hide_env_values = true)]
    pub mcp_session_key: Option<String>,
    /// Upstream MCP sessions one replica holds at most (least recently used closed first).
    #[arg(long, default_value_t = 10_000)]
    pub mcp_max_sessions: usize,
    /// Largest MCP message read from a caller, and from an upstream (a JSON body or one SSE event).
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub mcp_max_message: usize,
    /// Log tools/call arguments and results (off by default: they are the callers' data).
    #[arg(long)]
    pub mcp_log_payloads: bool,
    /// Seconds between two listings of every McpServer's tools (also after each change).
    #[arg(long, default_value_t = 30.0)]
    pub mcp_refresh_interval: f64,
    /// OAuth authorization servers named in /.well-known/oauth-protected-resource.
    #[arg(long, value_delimiter = ',')]
    pub mcp_authorization_server: Vec<String>,
}

impl McpGateway {
    pub fn new(args: &McpArgs, http: reqwest::Client) -> McpGateway {
        let sessions = match &args.mcp_session_key {
            Some(key) if !key.is_empty() => session::Sealer::new(key.as_bytes()),
            _ => session::Sealer::random(),
        };
        McpGateway {
            table: Arc::default(),
            sessions,
            upstreams: upstream::Upstreams::new(
                http,
                args.mcp_max_sessions,
                args.mcp_max_message.max(1024),
            ),
            max_request: args.mcp_max_message.max(1024),
            log_payloads: args.mcp_log_payloads,
            authorization_servers: args.mcp_authorization_server.clone(),
            nudge: tokio::sync::Notify::new(),
        }
    }
}

/// The MCP routes, served beside the data plane's (see `dataplane::router`).
pub fn routes<S>(state: McpState) -> Router<S> {
    Router::new()
        .route(
            "/mcp",
            post(handler::post_default)
                .get(handler::get)
                .delete(handler::delete_default),
        )
        .route(
            "/mcp/{name}",
            post(handler::post_named)
                .get(handler::get)
                .delete(handler::delete_named),
        )
        .route(
            "/mcp/{namespace}/{name}",
            post(handler::post_qualified)
                .get(handler::get)
                .delete(handler::delete_qualified),
        )
        .route(wellknown::METADATA_PATH, get(wellknown::metadata))
        .route(
            "/.well-known/oauth-protected-resource/{*resource}",
            get(wellknown::metadata),
        )
        .with_state(state)
}
