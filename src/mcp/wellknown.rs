//! MCP authorization for callers without a credential: 401 with `WWW-Authenticate` naming the
//! OAuth protected-resource metadata (RFC 9728), which is served here, so standard MCP clients
//! know the gateway wants a bearer token and where to get one.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use rmcp::model::ErrorCode;
use serde_json::json;

use super::McpState;

pub const METADATA_PATH: &str = "/.well-known/oauth-protected-resource";

/// `scheme://host` as the caller reached the gateway (a proxy's `X-Forwarded-Proto` honoured).
fn origin(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| !h.is_empty() && h.len() <= 255 && !h.contains(['"', ' ', '/']))
        .unwrap_or("localhost");
    let scheme = match headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
    {
        Some("https") => "https",
        _ => "http",
    };
    format!("{scheme}://{host}")
}

/// 401 for an MCP caller; `why` for a token that was presented and refused.
pub fn unauthorized(headers: &HeaderMap, why: Option<String>) -> Response {
    let mut challenge = format!(
        "Bearer resource_metadata=\"{}{METADATA_PATH}\"",
        origin(headers)
    );
    if why.is_some() {
        challenge.push_str(", error=\"invalid_token\"");
    }
    let message = why.unwrap_or_else(|| {
        "authentication required: a ServiceAccount token or API key as a bearer token".into()
    });
    let mut response = super::jsonrpc::error(
        StatusCode::UNAUTHORIZED,
        None,
        ErrorCode::INVALID_REQUEST,
        message,
        None,
    );
    if let Ok(v) = HeaderValue::from_str(&challenge) {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    response
}

/// The protected-resource metadata document.
pub async fn metadata(State(state): State<McpState>, headers: HeaderMap) -> Response {
    let mut doc = json!({
        "resource": format!("{}/mcp", origin(&headers)),
        "bearer_methods_supported": ["header"],
        "resource_name": "Portcullis MCP gateway",
    });
    if !state.gateway.authorization_servers.is_empty() {
        doc["authorization_servers"] = json!(state.gateway.authorization_servers);
    }
    (
        [(
            header::CACHE_CONTROL,
            HeaderValue::from_static("max-age=300"),
        )],
        axum::Json(doc),
    )
        .into_response()
}
