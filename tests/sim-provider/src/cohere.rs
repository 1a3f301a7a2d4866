//! Cohere as documented: bearer auth; v2 chat with typed SSE events ending at `message-end`;
//! v2 embed (`texts`, required `input_type`, `embeddings_by_type`); v1 generate with NDJSON
//! streams; `{"message": ...}` errors.

#![allow(clippy::result_large_err)] // handlers return ready responses as errors

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::openai::embed;
use crate::{
    Shared, answer_words, content_text, count_tokens, fragments, json_response, pieces,
    stream_response, structured_answer, tool_arguments, tools_to_call,
};

pub fn router() -> Router<Arc<Shared>> {
    Router::new()
        .route("/v2/chat", post(chat))
        .route("/v2/embed", post(embed_texts))
        .route("/v1/generate", post(generate))
}

fn error(status: u16, message: &str) -> Response {
    json_response(status, json!({"id": "sim-error", "message": message}))
}

fn check(headers: &HeaderMap, body: &Bytes) -> Result<Value, Response> {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !auth.starts_with("Bearer ") || auth.len() <= 7 {
        return Err(error(401, "no api key supplied"));
    }
    let req: Value = serde_json::from_slice(body)
        .map_err(|_| error(400, "invalid request: the body is not valid JSON"))?;
    if req.get("model").and_then(Value::as_str).is_none() {
        return Err(error(400, "invalid request: model must be specified"));
    }
    Ok(req)
}

fn usage(input: u64, output: u64) -> Value {
    json!({"billed_units": {"input_tokens": input, "output_tokens": output}, "tokens": {"input_tokens": input, "output_tokens": output}})
}

async fn chat(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match check(&headers, &body) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let Some(messages) = req.get("messages").and_then(Value::as_array) else {
        return error(400, "invalid request: messages must be specified");
    };
    let input: u64 = messages
        .iter()
        .map(|m| count_tokens(&content_text(&m["content"])))
        .sum();
    let calls = planned_calls(&req, messages);
    if !calls.is_empty() {
        return tool_answer(&shared, &req, &calls, input);
    }
    if req.pointer("/response_format/type") == Some(&json!("json_object")) {
        // Asked for JSON: the answer is a JSON text, streamed in small pieces.
        let pieces = fragments(&structured_answer().to_string(), 8);
        return plain_answer(&shared, &req, pieces, "COMPLETE", input, false);
    }
    let (words, cut) = answer_words(&shared, req.get("max_tokens").and_then(Value::as_u64));
    let finish = if cut { "MAX_TOKENS" } else { "COMPLETE" };
    plain_answer(&shared, &req, words, finish, input, true)
}

/// A text answer; `spaced` joins the words with spaces, else the pieces are sent as they are.
fn plain_answer(
    shared: &Arc<Shared>,
    req: &Value,
    words: Vec<String>,
    finish: &str,
    input: u64,
    spaced: bool,
) -> Response {
    let output = words.len() as u64;
    let pieces = if spaced {
        pieces(&words)
    } else {
        words.clone()
    };
    let text: String = pieces.concat();
    if req["stream"] == true {
        let event = |data: Value| {
            Bytes::from(format!(
                "event: {}\ndata: {data}\n\n",
                data["type"].as_str().unwrap_or_default()
            ))
        };
        let mut frames = vec![
            event(
                json!({"id": "chat-sim", "type": "message-start", "delta": {"message": {"role": "assistant", "content": [], "tool_plan": "", "tool_calls": [], "citations": []}}}),
            ),
            event(
                json!({"type": "content-start", "index": 0, "delta": {"message": {"content": {"type": "text", "text": ""}}}}),
            ),
        ];
        for piece in pieces {
            frames.push(event(json!({"type": "content-delta", "index": 0, "delta": {"message": {"content": {"text": piece}}}})));
        }
        frames.push(event(json!({"type": "content-end", "index": 0})));
        frames.push(event(json!({"type": "message-end", "delta": {"finish_reason": finish, "usage": usage(input, output)}})));
        return stream_response(shared, "text/event-stream", frames);
    }
    json_response(
        200,
        json!({"id": "chat-sim", "finish_reason": finish,
               "message": {"role": "assistant", "content": [{"type": "text", "text": text}]},
               "usage": usage(input, output)}),
    )
}

/// The tools this answer calls: the offered ones, unless told `NONE` or answering a tool result.
fn planned_calls(req: &Value, messages: &[Value]) -> Vec<String> {
    let offered: Vec<&str> = req["tools"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter_map(|t| t.pointer("/function/name")?.as_str())
                .collect()
        })
        .unwrap_or_default();
    let answers_result = messages.last().is_some_and(|m| m["role"] == "tool");
    if offered.is_empty() || answers_result || req["tool_choice"] == "NONE" {
        return Vec::new();
    }
    tools_to_call(offered)
}

/// An answer calling `calls`, streamed as Cohere v2 does: a tool plan, then per call
/// `tool-call-start` (id, name), `tool-call-delta`s with argument pieces, `tool-call-end`.
fn tool_answer(shared: &Arc<Shared>, req: &Value, calls: &[String], input: u64) -> Response {
    let id = |i: usize, name: &str| format!("{name}_sim{i}");
    let plan = "I will call the tools.";
    if req["stream"] != true {
        let tool_calls: Vec<Value> = calls
            .iter()
            .enumerate()
            .map(|(i, name)| json!({"id": id(i, name), "type": "function", "function": {"name": name, "arguments": tool_arguments(name, i).to_string()}}))
            .collect();
        return json_response(
            200,
            json!({"id": "chat-sim", "finish_reason": "TOOL_CALL",
                   "message": {"role": "assistant", "tool_plan": plan, "tool_calls": tool_calls},
                   "usage": usage(input, 10)}),
        );
    }
    let event = |data: Value| {
        Bytes::from(format!(
            "event: {}\ndata: {data}\n\n",
            data["type"].as_str().unwrap_or_default()
        ))
    };
    let mut frames = vec![
        event(
            json!({"id": "chat-sim", "type": "message-start", "delta": {"message": {"role": "assistant", "content": [], "tool_plan": "", "tool_calls": [], "citations": []}}}),
        ),
        event(json!({"type": "tool-plan-delta", "delta": {"message": {"tool_plan": plan}}})),
    ];
    for (i, name) in calls.iter().enumerate() {
        frames.push(event(json!({"type": "tool-call-start", "index": i, "delta": {"message": {"tool_calls": {"id": id(i, name), "type": "function", "function": {"name": name, "arguments": ""}}}}})));
        for piece in fragments(&tool_arguments(name, i).to_string(), 5) {
            frames.push(event(json!({"type": "tool-call-delta", "index": i, "delta": {"message": {"tool_calls": {"function": {"arguments": piece}}}}})));
        }
        frames.push(event(json!({"type": "tool-call-end", "index": i})));
    }
    frames.push(event(json!({"type": "message-end", "delta": {"finish_reason": "TOOL_CALL", "usage": usage(input, 10)}})));
    stream_response(shared, "text/event-stream", frames)
}

async fn embed_texts(headers: HeaderMap, body: Bytes) -> Response {
    let req = match check(&headers, &body) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let Some(texts) = req.get("texts").and_then(Value::as_array) else {
        return error(400, "invalid request: texts must be specified");
    };
    if req.get("input_type").and_then(Value::as_str).is_none() {
        return error(
            400,
            "invalid request: valid input_type must be provided with the provided model",
        );
    }
    let texts: Vec<&str> = texts.iter().filter_map(Value::as_str).collect();
    let tokens: u64 = texts.iter().map(|t| count_tokens(t)).sum();
    json_response(
        200,
        json!({"id": "embed-sim", "response_type": "embeddings_by_type",
               "embeddings": {"float": texts.iter().map(|t| embed(t)).collect::<Vec<_>>()},
               "texts": texts, "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": tokens}}}),
    )
}

async fn generate(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let req = match check(&headers, &body) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let Some(prompt) = req.get("prompt").and_then(Value::as_str) else {
        return error(400, "invalid request: prompt must be specified");
    };
    let input = count_tokens(prompt);
    let (words, cut) = answer_words(&shared, req.get("max_tokens").and_then(Value::as_u64));
    let finish = if cut { "MAX_TOKENS" } else { "COMPLETE" };
    let n = req
        .get("num_generations")
        .and_then(Value::as_u64)
        .unwrap_or(1);
    let output = words.len() as u64 * n;
    let text = words.join(" ");
    let generations: Vec<Value> = (0..n)
        .map(|i| json!({"id": format!("gen-{i}"), "text": text, "index": i, "finish_reason": finish}))
        .collect();
    let meta = json!({"billed_units": {"input_tokens": input, "output_tokens": output}});
    if req["stream"] == true {
        let mut frames: Vec<Bytes> = pieces(&words)
            .into_iter()
            .map(|p| Bytes::from(format!("{}\n", json!({"is_finished": false, "event_type": "text-generation", "text": p, "index": 0}))))
            .collect();
        frames.push(Bytes::from(format!(
            "{}\n",
            json!({"is_finished": true, "event_type": "stream-end", "finish_reason": finish, "response": {"id": "generate-sim", "generations": generations, "prompt": prompt, "meta": meta}})
        )));
        return stream_response(&shared, "application/stream+json", frames);
    }
    json_response(
        200,
        json!({"id": "generate-sim", "generations": generations, "prompt": prompt, "meta": meta}),
    )
}
