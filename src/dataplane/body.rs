//! Reading a JSON request body: size limit, content type, UTF-8 and JSON syntax, each with its own error.

use axum::body::Body;
use http::{HeaderMap, header};
use serde_json::{Map, Value};

use super::error::GatewayError;

pub async fn read_json_object(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Map<String, Value>, GatewayError> {
    let bytes = read_bytes(headers, body, limit).await?;
    parse_json_object(&bytes)
}

/// The body's bytes after the content-type and size checks.
async fn read_bytes(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<bytes::Bytes, GatewayError> {
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        // Compared without case, lowercased only for the error: no copy per request.
        let essence = ct.to_str().unwrap_or_default();
        let essence = essence.split(';').next().unwrap_or_default().trim();
        let json_suffix = essence
            .len()
            .checked_sub(5)
            .and_then(|at| essence.get(at..))
            .is_some_and(|tail| tail.eq_ignore_ascii_case("+json"));
        if !essence.eq_ignore_ascii_case("application/json") && !json_suffix {
            let essence = essence.to_ascii_lowercase();
            return Err(GatewayError::UnsupportedMediaType(format!(
                "the request body must be JSON (Content-Type: application/json), not {essence:?}"
            )));
        }
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(GatewayError::PayloadTooLarge { limit });
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
        {
            GatewayError::PayloadTooLarge { limit }
        } else if super::listener::is_body_timeout(&e) {
            GatewayError::BodyTimeout
        } else {
            GatewayError::bad_request("could not read the request body")
        }
    })
}

pub fn parse_json_object(bytes: &[u8]) -> Result<Map<String, Value>, GatewayError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        GatewayError::bad_request(format!(
            "the request body is not valid UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })?;
    if text.trim().is_empty() {
        return Err(GatewayError::bad_request(
            "the request body is empty; expected a JSON object",
        ));
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(GatewayError::bad_request(
            "the request body must be a JSON object",
        )),
        Err(e) => Err(GatewayError::bad_request(format!(
            "the request body is not valid JSON: {e}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_bodies_with_clear_messages() {
        let msg = |b: &[u8]| {
            parse_json_object(b)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(msg(b"\xff\xfe").contains("UTF-8"));
        assert!(msg(b"{").contains("not valid JSON"));
        assert!(msg(b"[1]").contains("JSON object"));
        assert!(msg(b"  ").contains("empty"));
        assert!(parse_json_object(br#"{"a":1}"#).is_ok());
    }
}
