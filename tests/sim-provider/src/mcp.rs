//! A minimal MCP server (Streamable HTTP, plain JSON answers) for `make bench`: `initialize`,
//! `tools/list` with one tool `echo`, `tools/call` of it. Fast on purpose: the bench measures what
//! the gateway adds to a proxied tool call, not a tool's work.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http::StatusCode;
use serde_json::{Value, json};

use crate::Shared;

pub fn router() -> Router<Arc<Shared>> {
    Router::new().route("/", post(handle))
}

async fn handle(body: Bytes) -> Response {
    let Ok(message) = serde_json::from_slice::<Value>(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let Some(id) = message.get("id").cloned() else {
        return StatusCode::ACCEPTED.into_response();
    };
    let result = match message["method"].as_str().unwrap_or_default() {
        "initialize" => json!({
            "protocolVersion": message["params"]["protocolVersion"].as_str().unwrap_or("2025-06-18"),
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "sim", "version": "1"},
        }),
        "tools/list" => json!({"tools": [{
            "name": "echo",
            "description": "Echo text back.",
            "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}},
        }]}),
        "tools/call" => json!({"content": [{
            "type": "text",
            "text": message["params"]["arguments"]["text"].as_str().unwrap_or_default(),
        }]}),
        _ => {
            let error = json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": "method not found"}});
            return axum::Json(error).into_response();
        }
    };
    (
        [("mcp-session-id", "sim-session")],
        axum::Json(json!({"jsonrpc": "2.0", "id": id, "result": result})),
    )
        .into_response()
}
