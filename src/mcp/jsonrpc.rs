//! JSON-RPC answers in MCP's shapes (rmcp's envelope and error types), as HTTP responses.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};
use rmcp::model::{ErrorCode, ErrorData, JsonRpcError, JsonRpcResponse, NumberOrString};
use serde_json::Value;

/// An implementation-defined server error (JSON-RPC's -32000..-32099): a limit refused the call.
pub const RATE_LIMITED: ErrorCode = ErrorCode(-32029);
/// The upstream server failed the call (unreachable, timed out, broken answer).
pub const UPSTREAM_FAILED: ErrorCode = ErrorCode(-32001);

/// The request id as rmcp types it; ids that are neither number nor string are not requests.
pub fn request_id(id: &Value) -> Option<NumberOrString> {
    match id {
        Value::Number(n) => n.as_i64().map(NumberOrString::Number),
        Value::String(s) => Some(NumberOrString::String(s.as_str().into())),
        _ => None,
    }
}

/// A response with `result`, as JSON.
pub fn result(id: &Value, result: Value) -> Response {
    match (request_id(id), result) {
        (Some(id), Value::Object(result)) => json(
            StatusCode::OK,
            &JsonRpcResponse {
                jsonrpc: Default::default(),
                id,
                result,
            },
        ),
        _ => error(
            StatusCode::OK,
            Some(id),
            ErrorCode::INTERNAL_ERROR,
            "unrenderable result",
            None,
        ),
    }
}

/// An error response (HTTP `status`, 200 for errors of an accepted request).
pub fn error(
    status: StatusCode,
    id: Option<&Value>,
    code: ErrorCode,
    message: impl Into<String>,
    data: Option<Value>,
) -> Response {
    let body = JsonRpcError::new(
        id.and_then(request_id),
        ErrorData::new(code, message.into(), data),
    );
    json(status, &body)
}

pub fn json(status: StatusCode, body: &impl serde::Serialize) -> Response {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        bytes,
    )
        .into_response()
}

/// A message as one SSE event.
pub fn sse_event(message: &Value) -> bytes::Bytes {
    let mut out = b"event: message\ndata: ".to_vec();
    // serde_json never writes a raw newline, so the data fits one `data:` line.
    out.extend(serde_json::to_vec(message).unwrap_or_default());
    out.extend_from_slice(b"\n\n");
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn errors_keep_the_request_id_and_say_why() {
        let r = error(
            StatusCode::OK,
            Some(&serde_json::json!(7)),
            ErrorCode::INVALID_PARAMS,
            "Unknown tool: x",
            None,
        );
        let body = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"jsonrpc": "2.0", "id": 7, "error": {"code": -32602, "message": "Unknown tool: x"}})
        );
    }
}
