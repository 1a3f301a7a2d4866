//! Reading a JSON request body: the caller first, then size limit, content type, UTF-8, shape and
//! JSON syntax, each with its own error.
//!
//! Memory is bounded before anything is parsed: the caller is authenticated before a byte of the
//! body is read (`admission::before_body`), the body is capped (`--body-limit`) and counted
//! against the global buffer budget as it arrives (`listener.rs`), and one pass over its bytes
//! estimates what the parsed JSON will take (`parsed_size`) before it is parsed: a body whose
//! JSON would take more than `PARSE_FACTOR` times the body cap is refused, and the estimate is
//! charged to the budget too. The parse itself is serde_json's `Value`, whose worst shapes (a
//! list of one-key objects) take about 90 times their text.

use axum::body::Body;
use http::{HeaderMap, header};
use serde_json::{Map, Value};

use super::AppState;
use super::error::GatewayError;

/// Deepest JSON nesting accepted (serde_json refuses beyond 128).
pub const MAX_DEPTH: usize = 64;

/// What one body's parsed JSON may take in memory, as a multiple of `--body-limit`.
pub const PARSE_FACTOR: usize = 8;

/// The request body of an invocation as a JSON object, read only once its caller may send one.
pub async fn read_json_object(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Map<String, Value>, GatewayError> {
    super::admission::before_body(state).await?;
    let bytes = read_bytes(headers, body, state.body_limit).await?;
    let estimate = parsed_size(&bytes)?;
    let limit = PARSE_FACTOR.saturating_mul(state.body_limit);
    if estimate > limit {
        return Err(GatewayError::BodyTooComplex { estimate, limit });
    }
    super::observe::charge(estimate)?;
    parse_json_object(&bytes)
}

/// A JSON body under `limit` bytes, without the caller or budget checks (listener tests).
#[cfg(test)]
pub async fn read_json(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Map<String, Value>, GatewayError> {
    let bytes = read_bytes(headers, body, limit).await?;
    parsed_size(&bytes)?;
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
        } else if let Some(refused) = super::listener::body_error(&e) {
            refused
        } else {
            GatewayError::bad_request("could not read the request body")
        }
    })
}

/// An upper estimate of the heap a `serde_json::Value` of `json` takes, from one pass over its
/// bytes without allocating; nesting deeper than `MAX_DEPTH` is refused. The costs are
/// serde_json's (no `preserve_order`): a string is its bytes, a list a doubling `Vec` of 32-byte
/// values (half again for the copy while it grows), an object B-tree nodes of eleven entries
/// (752 bytes each, allocator overhead included) for every five members. Invalid JSON is left to
/// the parser.
pub fn parsed_size(json: &[u8]) -> Result<usize, GatewayError> {
    const NODE: usize = 752;
    const VALUE: usize = 32;
    const ALLOC: usize = 16;
    // Per open container: is it an object, its commas, whether it holds anything.
    let mut stack = [(false, 0usize, false); MAX_DEPTH];
    let mut depth = 0usize;
    let mut total = 0usize;
    let mut i = 0;
    while i < json.len() {
        let b = json[i];
        match b {
            b'"' => {
                let start = i + 1;
                i = start;
                while i < json.len() && json[i] != b'"' {
                    i += if json[i] == b'\\' { 2 } else { 1 };
                }
                let len = i.min(json.len()) - start;
                if len > 0 {
                    total = total.saturating_add(len.next_multiple_of(8) + ALLOC);
                }
                if let Some(top) = depth.checked_sub(1) {
                    stack[top].2 = true;
                }
            }
            b'{' | b'[' => {
                if let Some(top) = depth.checked_sub(1) {
                    stack[top].2 = true;
                }
                if depth == MAX_DEPTH {
                    return Err(GatewayError::BodyTooDeep(MAX_DEPTH));
                }
                stack[depth] = (b == b'{', 0, false);
                depth += 1;
            }
            b'}' | b']' => {
                let Some(top) = depth.checked_sub(1) else {
                    break;
                };
                depth = top;
                let (object, commas, filled) = stack[top];
                let n = if filled { commas + 1 } else { 0 };
                let cost = match (object, n) {
                    (_, 0) => 0,
                    (true, n) => (1 + n / 5).saturating_mul(NODE),
                    (false, n) => (n.max(4).next_power_of_two().saturating_mul(VALUE) / 2 * 3)
                        .saturating_add(ALLOC),
                };
                total = total.saturating_add(cost);
            }
            b',' => {
                if let Some(top) = depth.checked_sub(1) {
                    stack[top].1 += 1;
                }
            }
            b' ' | b'\t' | b'\n' | b'\r' | b':' => {}
            _ => {
                if let Some(top) = depth.checked_sub(1) {
                    stack[top].2 = true;
                }
            }
        }
        i += 1;
    }
    Ok(total)
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
    fn hostile_shapes_are_refused_before_parsing() {
        // 2 MiB of one-key objects would take about 90 times that once parsed.
        let hostile = format!("[{}]", vec![r#"{"a":0}"#; 2 * 1024 * 1024 / 8].join(","));
        let estimate = parsed_size(hostile.as_bytes()).unwrap();
        assert!(estimate > PARSE_FACTOR * 2 * 1024 * 1024, "{estimate}");
        let deep = "[".repeat(MAX_DEPTH + 1);
        assert!(matches!(
            parsed_size(deep.as_bytes()),
            Err(GatewayError::BodyTooDeep(_))
        ));
        // Brackets and escapes inside strings are text.
        let text = r#"{"a":"[[[[{{{{\"]]]"}"#;
        assert_eq!(
            parsed_size(text.as_bytes()).unwrap(),
            752 + (8 + 16) + (16 + 16)
        );
    }

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
