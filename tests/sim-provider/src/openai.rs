//! OpenAI's API as documented: Bearer auth, chat.completion / text_completion / embedding list
//! shapes, `data: {chunk}\n\n` streaming ended by `data: [DONE]`, and `{"error": {...}}` errors.
//! The OpenAI-compatible servers (Mistral, Groq, Ollama, ...) are this simulation with a `Flavor`.
#![allow(clippy::result_large_err)] // handlers return ready responses as errors

use std::sync::Arc;

use axum::Extension;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::{
    Shared, answer_text, count_tokens, fragments, pieces, stream_response, tool_arguments,
    tools_to_call, unix_now,
};

/// Where an OpenAI-compatible server departs from OpenAI, as far as the gateway must care.
#[derive(Clone, Copy, Debug)]
pub struct Flavor {
    pub require_key: bool,
    /// Mistral: 422 on `stream_options`, and stream usage sent without it.
    pub mistral: bool,
    /// Groq: 400 unless `n` is 1.
    pub single_choice: bool,
    /// Databricks: cumulative usage on every stream chunk, asked for or not.
    pub usage_every_chunk: bool,
}

impl Flavor {
    pub const OPENAI: Flavor = Flavor {
        require_key: true,
        mistral: false,
        single_choice: false,
        usage_every_chunk: false,
    };
    pub const MISTRAL: Flavor = Flavor {
        mistral: true,
        ..Flavor::OPENAI
    };
    pub const GROQ: Flavor = Flavor {
        single_choice: true,
        ..Flavor::OPENAI
    };
    pub const KEYLESS: Flavor = Flavor {
        require_key: false,
        ..Flavor::OPENAI
    };
    pub const DATABRICKS: Flavor = Flavor {
        usage_every_chunk: true,
        ..Flavor::OPENAI
    };
}

pub fn router() -> Router<Arc<Shared>> {
    flavored(Flavor::OPENAI)
}

pub fn flavored(flavor: Flavor) -> Router<Arc<Shared>> {
    Router::new()
        .route("/chat/completions", post(chat))
        .route("/completions", post(completions))
        .route("/embeddings", post(embeddings))
        .layer(Extension(flavor))
}

pub fn error(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Response {
    (
        status,
        axum::Json(
            json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
        ),
    )
        .into_response()
}

fn check(flavor: Flavor, headers: &HeaderMap, body: &Bytes) -> Result<Value, Response> {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if flavor.require_key && (!auth.starts_with("Bearer ") || auth.len() <= 7) {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            "invalid_request_error",
            None,
        ));
    }
    let value: Value = serde_json::from_slice(body).map_err(|_| {
        error(
            StatusCode::BAD_REQUEST,
            "We could not parse the JSON body of your request.",
            "invalid_request_error",
            None,
        )
    })?;
    if flavor.mistral && value.get("stream_options").is_some() {
        return Err((
            StatusCode::UNPROCESSABLE_ENTITY,
            axum::Json(json!({"detail": [{"type": "extra_forbidden", "loc": ["body", "stream_options"], "msg": "Extra inputs are not permitted", "input": value["stream_options"]}]})),
        )
            .into_response());
    }
    if flavor.single_choice && value.get("n").and_then(Value::as_u64).unwrap_or(1) != 1 {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "'n' : number must be at most 1",
            "invalid_request_error",
            None,
        ));
    }
    if value.get("model").and_then(Value::as_str).is_none() {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "you must provide a model parameter",
            "invalid_request_error",
            None,
        ));
    }
    Ok(value)
}

/// The answer's words, cut at `max_tokens` (then finish_reason is "length").
fn answer(shared: &Shared, req: &Value) -> (Vec<String>, &'static str) {
    if let Some(script) = shared.behaviour.lock().script.clone() {
        return (script, "stop");
    }
    let mut words = answer_text(shared.behaviour.lock().answer_words);
    match req.get("max_tokens").and_then(Value::as_u64) {
        Some(max) if (max as usize) < words.len() => {
            words.truncate(max as usize);
            (words, "length")
        }
        _ => (words, "stop"),
    }
}

fn prompt_tokens(req: &Value) -> u64 {
    match (req.get("messages"), req.get("prompt")) {
        (Some(Value::Array(msgs)), _) => msgs
            .iter()
            .filter_map(|m| m.get("content")?.as_str())
            .map(count_tokens)
            .sum(),
        (_, Some(Value::String(p))) => count_tokens(p),
        _ => 0,
    }
}

fn usage(prompt: u64, completion: u64) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

async fn chat(
    State(shared): State<Arc<Shared>>,
    Extension(flavor): Extension<Flavor>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    generate(shared, flavor, headers, body, true).await
}

async fn completions(
    State(shared): State<Arc<Shared>>,
    Extension(flavor): Extension<Flavor>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    generate(shared, flavor, headers, body, false).await
}

pub async fn generate(
    shared: Arc<Shared>,
    flavor: Flavor,
    headers: HeaderMap,
    body: Bytes,
    chat: bool,
) -> Response {
    let req = match check(flavor, &headers, &body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let model = req["model"].as_str().unwrap_or_default().to_string();
    let calls = if chat {
        planned_calls(&req)
    } else {
        Vec::new()
    };
    if !calls.is_empty() {
        return tool_answer(&shared, flavor, &req, &model, &calls);
    }
    let (words, finish) = answer(&shared, &req);
    let prompt = prompt_tokens(&req);
    let n = req.get("n").and_then(Value::as_u64).unwrap_or(1);
    let id = if chat { "chatcmpl-sim" } else { "cmpl-sim" };
    let created = unix_now();
    if req.get("stream").and_then(Value::as_bool) == Some(true) {
        let include_usage = flavor.mistral
            || req
                .pointer("/stream_options/include_usage")
                .and_then(Value::as_bool)
                == Some(true);
        let usage_mode = if flavor.usage_every_chunk {
            UsageMode::EveryChunk
        } else if include_usage {
            UsageMode::FinalChunk
        } else {
            UsageMode::None
        };
        return stream(
            &shared, id, created, model, words, finish, prompt, chat, usage_mode,
        );
    }
    let scripted = shared.behaviour.lock().script.is_some();
    let text = words.join(if scripted { "" } else { " " });
    let choices: Vec<Value> = (0..n)
        .map(|i| {
            if chat {
                json!({"index": i, "message": {"role": "assistant", "content": text, "refusal": null}, "logprobs": null, "finish_reason": finish})
            } else {
                json!({"index": i, "text": text, "logprobs": null, "finish_reason": finish})
            }
        })
        .collect();
    let completion = words.len() as u64 * n;
    axum::Json(json!({
        "id": id,
        "object": if chat { "chat.completion" } else { "text_completion" },
        "created": created,
        "model": model,
        "system_fingerprint": "fp_sim",
        "choices": choices,
        "usage": usage(prompt, completion),
    }))
    .into_response()
}

/// The tools this answer calls: the offered ones (the named one when `tool_choice` names one),
/// unless told `none` or answering a tool result.
fn planned_calls(req: &Value) -> Vec<String> {
    let offered: Vec<&str> = req["tools"]
        .as_array()
        .map(|t| {
            t.iter()
                .filter_map(|t| t.pointer("/function/name")?.as_str())
                .collect()
        })
        .unwrap_or_default();
    let last_is_result = req["messages"]
        .as_array()
        .and_then(|m| m.last())
        .is_some_and(|m| m["role"] == "tool");
    if offered.is_empty() || last_is_result || req["tool_choice"] == "none" {
        return Vec::new();
    }
    match req
        .pointer("/tool_choice/function/name")
        .and_then(Value::as_str)
    {
        Some(name) => vec![name.to_string()],
        None => tools_to_call(offered),
    }
}

/// An answer calling `calls`: whole, or streamed as OpenAI does (each call's id and name first,
/// then its arguments in small fragments). Mistral streams each call whole in one chunk.
fn tool_answer(
    shared: &Arc<Shared>,
    flavor: Flavor,
    req: &Value,
    model: &str,
    calls: &[String],
) -> Response {
    let created = unix_now();
    let id = "chatcmpl-sim";
    let prompt = prompt_tokens(req);
    let completion = 10 * calls.len() as u64;
    let call_id = |i: usize| format!("call_sim_{i}");
    let args = |i: usize, name: &str| tool_arguments(name, i).to_string();
    if req.get("stream").and_then(Value::as_bool) != Some(true) {
        let tool_calls: Vec<Value> = calls
            .iter()
            .enumerate()
            .map(|(i, name)| json!({"id": call_id(i), "type": "function", "function": {"name": name, "arguments": args(i, name)}}))
            .collect();
        return axum::Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": null, "refusal": null, "tool_calls": tool_calls}, "logprobs": null, "finish_reason": "tool_calls"}],
            "usage": usage(prompt, completion),
        }))
        .into_response();
    }
    let chunk = |delta: Value, finish: Value| {
        let c = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "system_fingerprint": "fp_sim", "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]});
        Bytes::from(format!("data: {c}\n\n"))
    };
    let mut frames = vec![chunk(
        json!({"role": "assistant", "content": null}),
        Value::Null,
    )];
    for (i, name) in calls.iter().enumerate() {
        if flavor.mistral {
            frames.push(chunk(json!({"tool_calls": [{"id": call_id(i), "type": "function", "index": i, "function": {"name": name, "arguments": args(i, name)}}]}), Value::Null));
            continue;
        }
        frames.push(chunk(json!({"tool_calls": [{"index": i, "id": call_id(i), "type": "function", "function": {"name": name, "arguments": ""}}]}), Value::Null));
        for piece in fragments(&args(i, name), 7) {
            frames.push(chunk(
                json!({"tool_calls": [{"index": i, "function": {"arguments": piece}}]}),
                Value::Null,
            ));
        }
    }
    frames.push(chunk(json!({}), json!("tool_calls")));
    let wants_usage = flavor.mistral
        || req
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true);
    if wants_usage {
        let u = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [], "usage": usage(prompt, completion)});
        frames.push(Bytes::from(format!("data: {u}\n\n")));
    }
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    stream_response(shared, "text/event-stream; charset=utf-8", frames)
}

#[derive(Clone, Copy, PartialEq)]
enum UsageMode {
    None,
    /// OpenAI with `include_usage`: `"usage": null` on every chunk, then a `choices: []` usage chunk.
    FinalChunk,
    /// Databricks: the running total on every chunk.
    EveryChunk,
}

#[allow(clippy::too_many_arguments)]
fn stream(
    shared: &Arc<Shared>,
    id: &'static str,
    created: u64,
    model: String,
    words: Vec<String>,
    finish: &'static str,
    prompt: u64,
    chat: bool,
    usage_mode: UsageMode,
) -> Response {
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let completion = words.len() as u64;
    let chunk = |choice: Value, so_far: u64| {
        let mut c = json!({"id": id, "object": object, "created": created, "model": model, "system_fingerprint": "fp_sim", "choices": [choice]});
        match usage_mode {
            UsageMode::None => {}
            UsageMode::FinalChunk => c["usage"] = Value::Null,
            UsageMode::EveryChunk => c["usage"] = usage(prompt, so_far),
        }
        Bytes::from(format!("data: {c}\n\n"))
    };
    let mut frames: Vec<Bytes> = Vec::with_capacity(words.len() + 3);
    if chat {
        frames.push(chunk(json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}), 0));
    }
    let scripted = shared.behaviour.lock().script.is_some();
    let parts = if scripted { words } else { pieces(&words) };
    for (i, text) in parts.into_iter().enumerate() {
        frames.push(if chat {
            chunk(json!({"index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": null}), i as u64 + 1)
        } else {
            chunk(json!({"index": 0, "text": text, "logprobs": null, "finish_reason": null}), i as u64 + 1)
        });
    }
    frames.push(if chat {
        chunk(
            json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish}),
            completion,
        )
    } else {
        chunk(
            json!({"index": 0, "text": "", "logprobs": null, "finish_reason": finish}),
            completion,
        )
    });
    if usage_mode == UsageMode::FinalChunk {
        let u = json!({"id": id, "object": object, "created": created, "choices": [], "usage": usage(prompt, completion)});
        frames.push(Bytes::from(format!("data: {u}\n\n")));
    }
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
    stream_response(shared, "text/event-stream; charset=utf-8", frames)
}

pub async fn embeddings(
    Extension(flavor): Extension<Flavor>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = match check(flavor, &headers, &body) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let inputs: Vec<String> = match req.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "'input' is a required property",
                "invalid_request_error",
                None,
            );
        }
    };
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| json!({"object": "embedding", "index": i, "embedding": embed_for(&req["model"], text)}))
        .collect();
    let tokens: u64 = inputs.iter().map(|t| count_tokens(t)).sum();
    axum::Json(json!({"object": "list", "data": data, "model": req["model"], "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}))
        .into_response()
}

/// A deterministic 8-dimensional vector derived from the text, so tests can check order.
pub fn embed(text: &str) -> Vec<f64> {
    let len = text.len() as f64;
    (0..8).map(|i| ((len + i as f64) * 0.125).fract()).collect()
}

/// Models named so get `bag_of_words` vectors from this endpoint; any other model gets `embed`'s.
pub const BAG_OF_WORDS_PREFIX: &str = "sim-bow";

/// The vector `model` embeds `text` as.
pub fn embed_for(model: &Value, text: &str) -> Vec<f64> {
    match model.as_str() {
        Some(m) if m.starts_with(BAG_OF_WORDS_PREFIX) => bag_of_words(text),
        _ => embed(text),
    }
}

/// A deterministic 256-dimensional bag of words: each lower-cased alphanumeric word adds 1 to the
/// dimension its FNV-1a hash picks. Texts sharing most words are close (cosine near 1), texts
/// sharing few are far: enough for tests of semantic matching, with nothing learned.
pub fn bag_of_words(text: &str) -> Vec<f64> {
    let mut v = vec![0.0; 256];
    for word in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        let mut h: u32 = 0x811c_9dc5;
        for b in word.to_lowercase().bytes() {
            h = (h ^ u32::from(b)).wrapping_mul(0x0100_0193);
        }
        v[(h % 256) as usize] += 1.0;
    }
    v
}
