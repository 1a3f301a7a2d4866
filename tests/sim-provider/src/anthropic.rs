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
    Shared, answer_words, content_text, count_tokens, fragments, json_response, pieces,
    stream_response, tool_arguments, tools_to_call,
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
    if let Some(bad) = unknown_block(messages) {
        return error(400, "invalid_request_error", &bad);
    }
    // As documented: extended thinking needs a budget of at least 1024 tokens, below max_tokens.
    let thinking = match req.pointer("/thinking/type").and_then(Value::as_str) {
        Some("enabled") => match req
            .pointer("/thinking/budget_tokens")
            .and_then(Value::as_u64)
        {
            Some(b) if (1024..max_tokens).contains(&b) => true,
            _ => {
                return error(
                    400,
                    "invalid_request_error",
                    "thinking.enabled.budget_tokens: must be at least 1024 and less than max_tokens",
                );
            }
        },
        _ => false,
    };
    if req.get("temperature").is_some() && req.get("top_p").is_some() {
        return error(
            400,
            "invalid_request_error",
            "`temperature` and `top_p` cannot both be specified for this model. Please use only one.",
        );
    }
    let model = req["model"].as_str().unwrap_or_default().to_string();
    let calls = planned_calls(&req, messages);
    if !calls.is_empty() {
        return tool_answer(&shared, &req, &model, &calls);
    }
    let input: u64 = count_tokens(&content_text(&req["system"]))
        + messages
            .iter()
            .map(|m| count_tokens(&content_text(&m["content"])))
            .sum::<u64>();
    let (words, cut) = answer_words(&shared, Some(max_tokens));
    let stop_reason = if cut { "max_tokens" } else { "end_turn" };
    let output = words.len() as u64;
    // With thinking enabled the answer opens with a thinking block, as documented.
    let text_index = usize::from(thinking);
    if req["stream"] == true {
        let event =
            |name: &str, data: Value| Bytes::from(format!("event: {name}\ndata: {data}\n\n"));
        let mut frames = vec![event(
            "message_start",
            json!({"type": "message_start", "message": {"id": "msg_sim", "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": input, "output_tokens": 1}}}),
        )];
        if thinking {
            frames.push(event("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": ""}})));
            for piece in fragments(THINKING, 8) {
                frames.push(event("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": piece}})));
            }
            frames.push(event("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": SIGNATURE}})));
            frames.push(event(
                "content_block_stop",
                json!({"type": "content_block_stop", "index": 0}),
            ));
        }
        frames.push(event(
            "content_block_start",
            json!({"type": "content_block_start", "index": text_index, "content_block": {"type": "text", "text": ""}}),
        ));
        frames.push(event("ping", json!({"type": "ping"})));
        for piece in pieces(&words) {
            frames.push(event("content_block_delta", json!({"type": "content_block_delta", "index": text_index, "delta": {"type": "text_delta", "text": piece}})));
        }
        frames.push(event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": text_index}),
        ));
        frames.push(event("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null}, "usage": {"output_tokens": output}})));
        frames.push(event("message_stop", json!({"type": "message_stop"})));
        return stream_response(&shared, "text/event-stream; charset=utf-8", frames);
    }
    let mut content = Vec::new();
    if thinking {
        content.push(json!({"type": "thinking", "thinking": THINKING, "signature": SIGNATURE}));
    }
    content.push(json!({"type": "text", "text": words.join(" ")}));
    json_response(
        200,
        json!({"id": "msg_sim", "type": "message", "role": "assistant", "model": model,
               "content": content,
               "stop_reason": stop_reason, "stop_sequence": null,
               "usage": {"input_tokens": input, "output_tokens": output, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}),
    )
}

/// The reasoning of an answer with thinking enabled, and its signature.
const THINKING: &str = "The caller wants an answer; twenty words will do.";
const SIGNATURE: &str = "sig_sim_thinking";

/// Content block types Anthropic documents for requests; any other is refused as Anthropic does.
const BLOCK_TYPES: &[&str] = &[
    "text",
    "image",
    "document",
    "search_result",
    "tool_use",
    "tool_result",
    "thinking",
    "redacted_thinking",
    "server_tool_use",
    "web_search_tool_result",
    "web_fetch_tool_result",
    "code_execution_tool_result",
    "bash_code_execution_tool_result",
    "text_editor_code_execution_tool_result",
    "mcp_tool_use",
    "mcp_tool_result",
    "container_upload",
];

/// Anthropic's refusal of the first content block of an unknown type.
fn unknown_block(messages: &[Value]) -> Option<String> {
    messages.iter().enumerate().find_map(|(i, m)| {
        m["content"].as_array()?.iter().enumerate().find_map(|(j, b)| {
            let kind = b["type"].as_str().unwrap_or_default();
            (!BLOCK_TYPES.contains(&kind)).then(|| {
                format!("messages.{i}.content.{j}: Input tag '{kind}' found using 'type' does not match any of the expected tags")
            })
        })
    })
}

/// The tools this answer uses: the offered ones (the named one when `tool_choice` names one),
/// unless told `none` or answering a tool result.
fn planned_calls(req: &Value, messages: &[Value]) -> Vec<String> {
    let offered: Vec<&str> = req["tools"]
        .as_array()
        .map(|t| t.iter().filter_map(|t| t["name"].as_str()).collect())
        .unwrap_or_default();
    let answers_result = messages.last().is_some_and(|m| {
        m["content"]
            .as_array()
            .is_some_and(|b| b.iter().any(|b| b["type"] == "tool_result"))
    });
    if offered.is_empty()
        || answers_result
        || req.pointer("/tool_choice/type") == Some(&json!("none"))
    {
        return Vec::new();
    }
    match req.pointer("/tool_choice/name").and_then(Value::as_str) {
        Some(name) if req.pointer("/tool_choice/type") == Some(&json!("tool")) => {
            vec![name.to_string()]
        }
        _ => tools_to_call(offered),
    }
}

/// An answer that uses `calls`: `tool_use` blocks, streamed as Anthropic does (a
/// `content_block_start` with the id and name, then `input_json_delta` fragments).
fn tool_answer(shared: &Arc<Shared>, req: &Value, model: &str, calls: &[String]) -> Response {
    let id = |i: usize| format!("toolu_sim_{i}");
    let output = 10 * calls.len() as u64;
    // As documented: a forced tool (`any` or `tool`) comes without any text before it.
    let forced = matches!(
        req.pointer("/tool_choice/type").and_then(Value::as_str),
        Some("any" | "tool")
    );
    let first = usize::from(!forced);
    if req["stream"] != true {
        let mut content = Vec::new();
        if !forced {
            content.push(json!({"type": "text", "text": "Let me check."}));
        }
        content.extend(calls.iter().enumerate().map(|(i, name)| {
            json!({"type": "tool_use", "id": id(i), "name": name, "input": tool_arguments(name, i)})
        }));
        return json_response(
            200,
            json!({"id": "msg_sim", "type": "message", "role": "assistant", "model": model,
                   "content": content, "stop_reason": "tool_use", "stop_sequence": null,
                   "usage": {"input_tokens": 5, "output_tokens": output}}),
        );
    }
    let event = |name: &str, data: Value| Bytes::from(format!("event: {name}\ndata: {data}\n\n"));
    let mut frames = vec![event(
        "message_start",
        json!({"type": "message_start", "message": {"id": "msg_sim", "type": "message", "role": "assistant", "model": model, "content": [], "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": 5, "output_tokens": 1}}}),
    )];
    if !forced {
        frames.push(event("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})));
        frames.push(event("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Let me check."}})));
        frames.push(event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ));
    }
    for (i, name) in calls.iter().enumerate() {
        let block = i + first;
        frames.push(event("content_block_start", json!({"type": "content_block_start", "index": block, "content_block": {"type": "tool_use", "id": id(i), "name": name, "input": {}}})));
        frames.push(event("content_block_delta", json!({"type": "content_block_delta", "index": block, "delta": {"type": "input_json_delta", "partial_json": ""}})));
        for piece in fragments(&tool_arguments(name, i).to_string(), 9) {
            frames.push(event("content_block_delta", json!({"type": "content_block_delta", "index": block, "delta": {"type": "input_json_delta", "partial_json": piece}})));
        }
        frames.push(event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": block}),
        ));
    }
    frames.push(event("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": output}})));
    frames.push(event("message_stop", json!({"type": "message_stop"})));
    stream_response(shared, "text/event-stream; charset=utf-8", frames)
}
