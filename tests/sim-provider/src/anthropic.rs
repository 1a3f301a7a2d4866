//! Anthropic's Messages API as documented: `x-api-key` and `anthropic-version` headers, required
//! `max_tokens`, content blocks, named SSE events ending with `message_stop`, and
//! `{"type":"error","error":{...}}` errors.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::{
    Shared, answer_words, content_text, count_tokens, json_response, pieces, stream_response,
};

pub fn router() -> Router<Arc<Shared>> {
    Router::new().route("/v1/messages", post(messages))
}

fn error(status: u16, kind: &str, message: &str) -> Response {
    json_response(
        status,
        json!({"type": "error", "error": {"type": kind, "message": message}, "request_id": "req_sim"}),
    )
}

async fn messages(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    if headers.get("x-api-key").is_none_or(|v| v.is_empty()) {
        return error(401, "authentication_error", "x-api-key header is required");
    }
    if headers.get("anthropic-version").is_none() {
        return error(
            400,
            "invalid_request_error",
            "anthropic-version: header is required",
        );
    }
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return error(
            400,
            "invalid_request_error",
            "There was an error parsing the body of your request.",
        );
    };
    let Some(max_tokens) = req.get("max_tokens").and_then(Value::as_u64) else {
        return error(400, "invalid_request_error", "max_tokens: Field required");
    };
    let Some(messages) = req.get("messages").and_then(Value::as_array) else {
        return error(400, "invalid_request_error", "messages: Field required");
    };
    if messages
        .iter()
        .any(|m| m["role"] != "user" && m["role"] != "assistant")
    {
        return error(
            400,
            "invalid_request_error",
            "messages: roles must be user or assistant; use the top-level system parameter",
        );
    }
    if req.get("temperature").is_some() && req.get("top_p").is_some() {
        return error(
            400,
            "invalid_request_error",
            "`temperature` and `top_p` cannot both be specified for this model. Please use only one.",
        );
    }
    let model = req["model"].as_str().unwrap_or_default().to_string();
    let input: u64 = count_tokens(&content_text(&req["system"]))
        + messages
            .iter()
            .map(|m| count_tokens(&content_text(&m["content"])))
            .sum::<u64>();
    let (words, cut) = answer_words(&shared, Some(max_tokens));
    let stop_reason = if cut { "max_tokens" } else { "end_turn" };
    let output = words.len() as u64;
    if req["stream"] == true {
        let event =
            |name: &str, data: Value| Bytes::from(format!("event: {name}\ndata: {data}\n\n"));
        let mut frames = vec![
            event(
                "message_start",
                json!({"type": "message_start", "message": {"id": "msg_sim", "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": input, "output_tokens": 1}}}),
            ),
            event(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
            ),
            event("ping", json!({"type": "ping"})),
        ];
        for piece in pieces(&words) {
            frames.push(event("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}})));
        }
        frames.push(event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ));
        frames.push(event("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null}, "usage": {"output_tokens": output}})));
        frames.push(event("message_stop", json!({"type": "message_stop"})));
        return stream_response(&shared, "text/event-stream; charset=utf-8", frames);
    }
    let answered = messages.iter().any(|m| {
        m["content"]
            .as_array()
            .is_some_and(|b| b.iter().any(|b| b["type"] == "tool_result"))
    });
    if let (Some(tool), false) = (req["tools"][0]["name"].as_str(), answered) {
        return json_response(
            200,
            json!({"id": "msg_sim", "type": "message", "role": "assistant", "model": model,
                   "content": [{"type": "tool_use", "id": "toolu_sim_1", "name": tool, "input": crate::tool_input()}],
                   "stop_reason": "tool_use", "stop_sequence": null,
                   "usage": {"input_tokens": input, "output_tokens": 5}}),
        );
    }
    json_response(
        200,
        json!({"id": "msg_sim", "type": "message", "role": "assistant", "model": model,
               "content": [{"type": "text", "text": words.join(" ")}],
               "stop_reason": stop_reason, "stop_sequence": null,
               "usage": {"input_tokens": input, "output_tokens": output, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}),
    )
}
