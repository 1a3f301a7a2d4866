//! The OpenAI-compatible surface: `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/models`.
//! The body's `model` names the route. The response shapes here are shared with the MLflow
//! deployments surface, which speaks OpenAI's shapes on per-route paths.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use bytes::{BufMut, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use http::{HeaderValue, header};
use serde::Serialize;
use serde_json::{Map, Value, json};

use super::AppState;
use super::admission::Visibility;
use super::body::read_json_object;
use super::error::{GatewayError, OpenAiError};
use super::forward::{self, ServingRoute};
use super::reframe::{Reframer, reframe};
use super::request::{
    OPENAI, check_input, check_params, check_prompt, count, parse_request, require_string,
    stream_options, string_or_null,
};
use crate::api::RouteType;
use crate::llm::{
    Choice, Embeddings, Generation, LlmRequest, LlmResponse, NativeRequest, StreamDelta,
    StreamOptions, ToolCall, ToolCallDelta, Usage, unix_now,
};
use crate::providers::Wire;

type Result<T, E = OpenAiError> = std::result::Result<T, E>;

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    req: Request,
) -> Result<Response> {
    handle(&state, req, RouteType::Chat).await
}

pub async fn completions(State(state): State<Arc<AppState>>, req: Request) -> Result<Response> {
    handle(&state, req, RouteType::Completions).await
}

pub async fn embeddings(State(state): State<Arc<AppState>>, req: Request) -> Result<Response> {
    handle(&state, req, RouteType::Embeddings).await
}

/// Takes the whole request, not a `HeaderMap` extractor: that one clones the caller's headers.
async fn handle(state: &AppState, req: Request, route_type: RouteType) -> Result<Response> {
    let (parts, body) = req.into_parts();
    let mut body = read_json_object(state, &parts.headers, body).await?;
    let route = forward::lookup(state, &require_string(&mut body, "model")?, route_type).await?;
    if passes_through(state, &route, &body) {
        let (request, include_usage) = native_request(route_type, body)?;
        return Ok(native(state, &route, request, include_usage).await?);
    }
    let request = parse_request(route_type, body, &OPENAI)?;
    Ok(respond(state, &route, request, true).await?)
}

/// Same dialect on both sides, and nothing of the call needs the parsed body: every backend
/// speaks OpenAI's API (a stream's usage chunk included, for a stream), the Route has no
/// guardrails and no cache, one candidate is asked for. Anything else takes the translating
/// path, for that call only.
fn passes_through(state: &AppState, route: &ServingRoute, body: &Map<String, Value>) -> bool {
    state.pass_through
        && route.wire() == Some(Wire::OpenAi)
        && (route.wire_streams() || body.get("stream") != Some(&Value::Bool(true)))
        && route.guards().next().is_none()
        && route.entry.cache.is_none()
        && body
            .get("n")
            .is_none_or(|n| n.is_null() || n.as_u64() == Some(1))
}

/// The caller's body (without `model`) for a pass-through call. What the translating path checks
/// of the fields it models (`messages`, `prompt` or `input`, `stream`, `stream_options`,
/// sampling, token caps) is checked alike, with the same 400s; the provider judges the rest, so
/// a parameter OpenAI adds works the day it ships. Also whether the caller asked for the
/// stream's usage chunk.
fn native_request(
    route_type: RouteType,
    body: Map<String, Value>,
) -> Result<(NativeRequest, bool), GatewayError> {
    let (prompt_chars, max_tokens, stream) = match route_type {
        RouteType::Chat => {
            let max_tokens = check_params(&body, &OPENAI)?;
            let max_completion_tokens = count(
                "max_completion_tokens",
                body.get("max_completion_tokens"),
                1,
                u32::MAX as u64,
            )?;
            let stream = stream_options(&body)?;
            let chars = check_messages(body.get("messages"))?;
            (chars, max_completion_tokens.or(max_tokens), stream)
        }
        RouteType::Completions => {
            let chars = check_prompt(&body)?;
            let max_tokens = check_params(&body, &OPENAI)?;
            (chars, max_tokens, stream_options(&body)?)
        }
        RouteType::Embeddings => {
            let chars = check_input(&body, OPENAI.input_field)?;
            string_or_null(&body, "encoding_format")?;
            (chars, None, StreamOptions::default())
        }
    };
    let request = NativeRequest {
        route_type,
        body,
        stream: stream.stream,
        max_tokens,
        prompt_chars,
        headers: Vec::new(),
    };
    Ok((request, stream.include_usage))
}

/// `messages` as the translating path would take them (a non-empty list of objects with a role
/// and a string or list content), read in place; their characters, for the up-front estimate.
fn check_messages(messages: Option<&Value>) -> Result<usize, GatewayError> {
    let bad = |m: String| GatewayError::bad_param("messages", m);
    let items = match messages {
        Some(Value::Array(items)) if !items.is_empty() => items,
        Some(Value::Array(_)) => {
            return Err(bad("'messages' must contain at least one message".into()));
        }
        None | Some(Value::Null) => return Err(bad("'messages' is required".into())),
        Some(_) => return Err(bad("'messages' must be a list of messages".into())),
    };
    for (i, m) in items.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(bad(format!(
                "messages[{i}] must be an object with 'role' and 'content'"
            )));
        };
        if m.get("role")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            return Err(bad(format!(
                "messages[{i}].role must be a non-empty string"
            )));
        }
        if !matches!(
            m.get("content"),
            None | Some(Value::Null | Value::String(_) | Value::Array(_))
        ) {
            return Err(bad(format!(
                "messages[{i}].content must be a string or a list of content parts"
            )));
        }
    }
    Ok(items.iter().map(prompt_chars).sum())
}

/// Characters of a message's text, counted as the translating path counts them (`Content::as_text`):
/// a string content, or its parts' `text`; media are counted apart (`admission::media_tokens`).
fn prompt_chars(message: &Value) -> usize {
    match message.get("content") {
        Some(Value::String(s)) => s.len(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .map(str::len)
            .sum(),
        _ => 0,
    }
}

/// A pass-through call: the caller's body goes upstream but for `model`, and OpenAI's answer or
/// stream comes back as it was sent. The gateway reads only what it meters: usage, and a stream's
/// text as it passes (for budgets and a cut stream's charge).
async fn native(
    state: &AppState,
    route: &ServingRoute,
    request: NativeRequest,
    include_usage: bool,
) -> Result<Response, GatewayError> {
    let stream = request.stream;
    let request = LlmRequest::Native(request);
    if stream {
        let (deltas, _) = forward::invoke_stream(state, route, &request).await?;
        return Ok(sse_response(reframe(deltas, Verbatim { include_usage })));
    }
    let LlmResponse::Native(answer) = forward::invoke(state, route, &request).await? else {
        return Err(GatewayError::UpstreamMalformed(
            "expected a native answer".into(),
        ));
    };
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        answer.body,
    )
        .into_response())
}

/// A pass-through stream: OpenAI's events as they came. The usage chunk gets the call's cost (as
/// on the translating path), or is left out when the caller did not ask for usage (the gateway
/// always asks, to count tokens). A stream that breaks ends with an error event, never `[DONE]`.
struct Verbatim {
    include_usage: bool,
}

impl Reframer for Verbatim {
    fn deltas(&mut self, deltas: Vec<StreamDelta>, out: &mut BytesMut) {
        for d in deltas {
            let Some(raw) = &d.raw else { continue };
            let usage_only = d.usage.is_some()
                && d.text.is_none()
                && d.finish_reason.is_none()
                && d.tool_calls.is_empty();
            match (usage_only, &d.cost_usd) {
                (true, _) if !self.include_usage => {}
                (true, Some(cost)) => push_with_cost(out, raw, cost),
                _ => out.extend_from_slice(raw),
            }
        }
    }

    fn failed(&mut self, err: &GatewayError, out: &mut BytesMut) {
        push_event(out, &error_event(err));
    }

    fn end(&mut self, _out: &mut BytesMut) {}
}

/// `raw` (`data: {...}` and a blank line) with `x_portcullis_cost_usd` as its object's last field.
fn push_with_cost(out: &mut BytesMut, raw: &Bytes, cost: &str) {
    match raw.iter().rposition(|b| *b == b'}') {
        Some(end) => {
            out.extend_from_slice(&raw[..end]);
            out.extend_from_slice(b",\"x_portcullis_cost_usd\":");
            let _ = serde_json::to_writer((&mut *out).writer(), cost);
            out.extend_from_slice(&raw[end..]);
        }
        None => out.extend_from_slice(raw),
    }
}

/// The error event that ends a broken stream, on both paths.
fn error_event(e: &GatewayError) -> Value {
    json!({"error": {"message": e.to_string(), "type": "api_error", "param": null, "code": e.code()}})
}

pub async fn list_models(State(state): State<Arc<AppState>>) -> Result<Json<Value>> {
    let visible = Visibility::of_caller(&state).await?;
    let table = state.table.load();
    let data: Vec<Value> = table
        .routes()
        .iter()
        .filter(|e| visible.shows(e))
        .map(|e| model_object(&e.name, e.provider.as_str()))
        .collect();
    Ok(Json(json!({"object": "list", "data": data})))
}

pub async fn get_model(
    State(state): State<Arc<AppState>>,
    Path(name): Path<Vec<String>>,
) -> Result<Json<Value>> {
    let entry = Visibility::find(&state, name.join("/")).await?;
    Ok(Json(model_object(&entry.name, entry.provider.as_str())))
}

fn model_object(name: &str, provider: &str) -> Value {
    json!({"id": name, "object": "model", "created": 0, "owned_by": provider})
}

/// Calls the route and answers in OpenAI's shapes, streaming when asked. `done_marker` ends a
/// stream with `data: [DONE]`, as OpenAI does.
pub async fn respond(
    state: &AppState,
    route: &ServingRoute,
    request: LlmRequest,
    done_marker: bool,
) -> Result<Response, GatewayError> {
    let stream = request.stream();
    if stream.stream {
        let (deltas, model) = forward::invoke_stream(state, route, &request).await?;
        return Ok(sse_response(openai_stream(
            deltas,
            model,
            request.route_type(),
            stream,
            done_marker,
        )));
    }
    let answer = forward::invoke(state, route, &request).await?;
    Ok(render(&answer, route))
}

/// A non-streaming answer in OpenAI's shape.
pub fn render(answer: &LlmResponse, route: &ServingRoute) -> Response {
    match answer {
        LlmResponse::Generation(g) => {
            let text: usize = g.choices.iter().map(|c| c.text.len() + 128).sum();
            json_response(&render_generation(g, route), 256 + text)
        }
        LlmResponse::Embeddings(e) => {
            let floats: usize = e.data.iter().map(|v| 64 + 24 * v.len()).sum();
            json_response(&render_embeddings(e, route), 256 + floats)
        }
        // Only the Messages surface sends native requests.
        LlmResponse::Native(n) => json_response(&native_body(n), n.body.len()),
    }
}

/// A native answer's own JSON body.
pub fn native_body(answer: &crate::llm::NativeAnswer) -> Value {
    serde_json::from_slice(&answer.body).unwrap_or_default()
}

/// `Json(value)`, written into a buffer sized for the answer: axum's starts at 128 bytes and
/// regrows on every usual answer.
fn json_response(value: &impl Serialize, size_hint: usize) -> Response {
    let mut buf = BytesMut::with_capacity(size_hint).writer();
    match serde_json::to_writer(&mut buf, value) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            buf.into_inner().freeze(),
        )
            .into_response(),
        // Not reached for these shapes (string keys only); answers as `Json` would.
        Err(_) => Json(value).into_response(),
    }
}

/// The model the provider reported, else the route's configured one.
pub fn model_name<'a>(reported: &'a str, configured: &'a str) -> &'a str {
    if reported.is_empty() {
        configured
    } else {
        reported
    }
}

// Typed, borrowed answer shapes: serialised straight from the unified answer, no `Value` tree.
#[derive(Serialize)]
struct GenerationOut<'a> {
    id: Cow<'a, str>,
    object: &'static str,
    created: i64,
    model: &'a str,
    choices: ChoicesOut<'a>,
    usage: &'a Usage,
}

/// The choices, serialised one by one as they are rendered: no vector of rendered choices.
struct ChoicesOut<'a> {
    choices: &'a [Choice],
    chat: bool,
}

impl Serialize for ChoicesOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_seq(self.choices.iter().map(|c| choice_out(c, self.chat)))
    }
}

#[derive(Serialize)]
#[serde(untagged)]
enum ChoiceOut<'a> {
    Chat {
        index: u32,
        message: MessageOut<'a>,
        finish_reason: Option<&'a str>,
    },
    Text {
        index: u32,
        text: &'a str,
        finish_reason: Option<&'a str>,
        logprobs: Option<()>,
    },
}

/// An assistant message: role, content, then the tool calls among the provider's extra fields in
/// key order (role/content win).
struct MessageOut<'a> {
    content: Option<&'a str>,
    tool_calls: &'a [ToolCall],
    extra: &'a Map<String, Value>,
}

impl Serialize for MessageOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("role", "assistant")?;
        map.serialize_entry("content", &self.content)?;
        let mut calls = (!self.tool_calls.is_empty()).then_some(self.tool_calls);
        for (k, v) in self.extra {
            if let Some(c) = calls.filter(|_| k.as_str() > "tool_calls") {
                map.serialize_entry("tool_calls", c)?;
                calls = None;
            }
            if !matches!(k.as_str(), "role" | "content" | "tool_calls") {
                map.serialize_entry(k, v)?;
            }
        }
        if let Some(c) = calls {
            map.serialize_entry("tool_calls", c)?;
        }
        map.end()
    }
}

fn choice_out(c: &Choice, chat: bool) -> ChoiceOut<'_> {
    if chat {
        // As OpenAI answers: a message that only calls tools has no content.
        let content = if c.text.is_empty() && !c.tool_calls.is_empty() {
            None
        } else {
            Some(c.text.as_str())
        };
        ChoiceOut::Chat {
            index: c.index,
            message: MessageOut {
                content,
                tool_calls: &c.tool_calls,
                extra: &c.message_extra,
            },
            finish_reason: c.finish_reason.as_deref(),
        }
    } else {
        ChoiceOut::Text {
            index: c.index,
            text: &c.text,
            finish_reason: c.finish_reason.as_deref(),
            logprobs: None,
        }
    }
}

fn render_generation<'a>(g: &'a Generation, route: &'a ServingRoute) -> GenerationOut<'a> {
    let chat = route.entry.route_type == RouteType::Chat;
    let choices = ChoicesOut {
        choices: &g.choices,
        chat,
    };
    GenerationOut {
        id: if g.id.is_empty() {
            Cow::Owned(response_id(chat))
        } else {
            Cow::Borrowed(&g.id)
        },
        object: if chat {
            "chat.completion"
        } else {
            "text_completion"
        },
        created: g.created,
        model: model_name(&g.model, &route.entry.model),
        choices,
        usage: &g.usage,
    }
}

#[derive(Serialize)]
struct EmbeddingsOut<'a> {
    object: &'static str,
    data: Vec<EmbeddingOut<'a>>,
    model: &'a str,
    usage: &'a Usage,
}

#[derive(Serialize)]
struct EmbeddingOut<'a> {
    object: &'static str,
    index: usize,
    embedding: &'a [f64],
}

fn render_embeddings<'a>(e: &'a Embeddings, route: &'a ServingRoute) -> EmbeddingsOut<'a> {
    let data = e
        .data
        .iter()
        .enumerate()
        .map(|(i, v)| EmbeddingOut {
            object: "embedding",
            index: i,
            embedding: v,
        })
        .collect();
    EmbeddingsOut {
        object: "list",
        data,
        model: model_name(&e.model, &route.entry.model),
        usage: &e.usage,
    }
}

/// The final usage chunk, with the call's cost as the gateway priced it (the streaming
/// counterpart of the `x-portcullis-cost-usd` header).
fn usage_chunk(mut chunk: Value, cost_usd: Option<&str>) -> Value {
    if let Some(cost) = cost_usd {
        chunk["x_portcullis_cost_usd"] = Value::from(cost);
    }
    chunk
}

pub fn usage_json(u: &Usage) -> Value {
    json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens})
}

fn response_id(chat: bool) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    if chat {
        format!("chatcmpl-portcullis-{n}")
    } else {
        format!("cmpl-portcullis-{n}")
    }
}

pub fn sse_response(body: impl Stream<Item = Bytes> + Send + 'static) -> Response {
    let mut response = Response::new(Body::from_stream(
        body.map(Ok::<_, std::convert::Infallible>),
    ));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

fn push_event(buf: &mut BytesMut, value: &Value) {
    buf.put_slice(b"data: ");
    // Writing into BytesMut cannot fail.
    let _ = serde_json::to_writer((&mut *buf).writer(), value);
    buf.put_slice(b"\n\n");
}

/// Tool-call fragments as OpenAI's `delta.tool_calls`: the first fragment of a call names it.
fn tool_call_chunks(calls: &[ToolCallDelta]) -> Value {
    calls
        .iter()
        .map(|c| {
            let mut function = Map::new();
            if let Some(name) = &c.name {
                function.insert("name".into(), json!(name));
            }
            function.insert("arguments".into(), json!(c.arguments));
            let mut call = Map::new();
            call.insert("index".into(), json!(c.index));
            if let Some(id) = &c.id {
                call.insert("id".into(), json!(id));
                call.insert("type".into(), json!("function"));
            }
            call.insert("function".into(), Value::Object(function));
            Value::Object(call)
        })
        .collect()
}

/// Re-frames unified deltas as OpenAI chunks, one output write per upstream read.
fn openai_stream(
    deltas: impl Stream<Item = Result<Vec<StreamDelta>, GatewayError>> + Send + 'static,
    fallback_model: String,
    route_type: RouteType,
    options: StreamOptions,
    done_marker: bool,
) -> impl Stream<Item = Bytes> + Send + 'static {
    let chat = route_type == RouteType::Chat;
    let fallback_id = response_id(chat);
    let created = unix_now();
    let object = if chat {
        "chat.completion.chunk"
    } else {
        "text_completion"
    };
    let failed = Arc::new(AtomicBool::new(false));
    let ended_badly = Arc::clone(&failed);
    let frames = deltas.map(move |item| {
        let mut buf = BytesMut::new();
        match item {
            Ok(deltas) => {
                for d in deltas {
                    let id = d.id.as_deref().filter(|s| !s.is_empty()).unwrap_or(&fallback_id);
                    let model = d.model.as_deref().filter(|s| !s.is_empty()).unwrap_or(&fallback_model);
                    let created = d.created.unwrap_or(created);
                    if d.role.is_some() || d.text.is_some() || d.finish_reason.is_some() || !d.tool_calls.is_empty() {
                        let choice = if chat {
                            let mut delta = Map::new();
                            if let Some(role) = &d.role {
                                delta.insert("role".into(), json!(role));
                            }
                            if let Some(text) = &d.text {
                                delta.insert("content".into(), json!(text));
                            }
                            if !d.tool_calls.is_empty() {
                                delta.insert("tool_calls".into(), tool_call_chunks(&d.tool_calls));
                            }
                            json!({"index": d.index, "delta": delta, "finish_reason": d.finish_reason})
                        } else {
                            json!({"index": d.index, "text": d.text.clone().unwrap_or_default(), "finish_reason": d.finish_reason, "logprobs": null})
                        };
                        push_event(&mut buf, &json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]}));
                    }
                    if let (Some(usage), true) = (d.usage, options.include_usage) {
                        push_event(
                            &mut buf,
                            &usage_chunk(json!({"id": id, "object": object, "created": created, "model": model, "choices": [], "usage": usage_json(&usage)}), d.cost_usd.as_deref()),
                        );
                    }
                }
            }
            Err(e) => {
                failed.store(true, Ordering::Relaxed);
                push_event(&mut buf, &error_event(&e));
            }
        }
        buf.freeze()
    });
    // A stream that failed part-way ends with its error event, never with the normal end marker.
    let done = futures::stream::once(async move {
        if done_marker && !ended_badly.load(Ordering::Relaxed) {
            Bytes::from_static(b"data: [DONE]\n\n")
        } else {
            Bytes::new()
        }
    });
    frames
        .chain(done)
        .filter(|b| futures::future::ready(!b.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(deltas: Vec<StreamDelta>, done_marker: bool) -> Vec<Value> {
        let stream = openai_stream(
            futures::stream::iter([Ok(deltas)]),
            "m".into(),
            RouteType::Chat,
            StreamOptions::default(),
            done_marker,
        );
        let bytes: Vec<Bytes> = futures::executor::block_on(stream.collect());
        let text = String::from_utf8_lossy(&bytes.concat()).into_owned();
        text.lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .map(|d| serde_json::from_str(d).unwrap_or(Value::String(d.to_string())))
            .collect()
    }

    #[test]
    fn tool_call_fragments_render_as_openai_delta_tool_calls() {
        let call = |index, id: Option<&str>, name: Option<&str>, arguments: &str| StreamDelta {
            tool_calls: vec![ToolCallDelta {
                index,
                id: id.map(str::to_string),
                name: name.map(str::to_string),
                arguments: arguments.into(),
            }],
            ..Default::default()
        };
        let out = frames(
            vec![
                call(0, Some("c1"), Some("f"), ""),
                call(0, None, None, "{\"a\":"),
                call(0, None, None, "1}"),
                StreamDelta {
                    finish_reason: Some("tool_calls".into()),
                    ..Default::default()
                },
            ],
            true,
        );
        assert_eq!(
            out[0]["choices"][0]["delta"]["tool_calls"],
            json!([{"index": 0, "id": "c1", "type": "function", "function": {"name": "f", "arguments": ""}}])
        );
        assert_eq!(
            out[1]["choices"][0]["delta"]["tool_calls"],
            json!([{"index": 0, "function": {"arguments": "{\"a\":"}}])
        );
        assert_eq!(out[3]["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(out[4], Value::String("[DONE]".into()));
    }

    fn verbatim(include_usage: bool, items: Vec<Result<Vec<StreamDelta>, GatewayError>>) -> String {
        let stream = reframe(futures::stream::iter(items), Verbatim { include_usage });
        let bytes: Vec<Bytes> = futures::executor::block_on(stream.collect());
        String::from_utf8_lossy(&bytes.concat()).into_owned()
    }

    fn raw(text: &str) -> Option<Bytes> {
        Some(Bytes::from(format!("data: {text}\n\n")))
    }

    #[test]
    fn a_pass_through_stream_is_as_sent_with_the_cost_on_its_usage_chunk_when_asked() {
        let deltas = || {
            vec![
                StreamDelta {
                    raw: raw(r#"{"choices":[{"index":0,"delta":{"content":"Hi"}}],"x":1}"#),
                    text: Some("Hi".into()),
                    ..Default::default()
                },
                StreamDelta {
                    raw: raw(r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}"#),
                    usage: Some(Usage::default()),
                    cost_usd: Some("0.0001".into()),
                    ..Default::default()
                },
                StreamDelta {
                    raw: raw("[DONE]"),
                    ..Default::default()
                },
            ]
        };
        assert_eq!(
            verbatim(true, vec![Ok(deltas())]),
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"x\":1}\n\n\
             data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1},\"x_portcullis_cost_usd\":\"0.0001\"}\n\n\
             data: [DONE]\n\n"
        );
        // The gateway asked for usage for itself: a caller that did not gets no usage chunk.
        assert_eq!(
            verbatim(false, vec![Ok(deltas())]),
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"}}],\"x\":1}\n\n\
             data: [DONE]\n\n"
        );
        // A break ends with the error event, never [DONE].
        let broken = verbatim(
            true,
            vec![
                Ok(deltas()[..1].to_vec()),
                Err(GatewayError::UpstreamConnectionLost("cut".into())),
            ],
        );
        assert!(broken.contains("\"error\""), "{broken}");
        assert!(!broken.contains("[DONE]"), "{broken}");
    }

    #[test]
    fn a_pass_through_request_keeps_the_body_and_checks_what_the_gateway_reads() {
        let body = |v: Value| v.as_object().cloned().unwrap_or_default();
        let (native, include_usage) = native_request(RouteType::Chat, body(json!({
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}],
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_completion_tokens": 50,
            "web_search_options": {},
        })))
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(native.stream && include_usage);
        assert_eq!(native.max_tokens, Some(50));
        assert_eq!(native.prompt_chars, "hello".len());
        assert!(native.body.contains_key("web_search_options"));
        let err = |v: Value| {
            native_request(RouteType::Chat, body(v))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(err(json!({"messages": []})).contains("at least one message"));
        assert!(
            err(json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}))
                .contains("max_tokens")
        );
        assert!(
            err(json!({"messages": [{"role": "user", "content": "x"}], "stream": "yes"}))
                .contains("stream")
        );
    }

    #[test]
    fn completions_and_embeddings_pass_through_with_the_translating_paths_checks() {
        let body = |v: Value| v.as_object().cloned().unwrap_or_default();
        let both = |route_type, v: Value| {
            let native = native_request(route_type, body(v.clone())).map(|(n, _)| n);
            let parsed = parse_request(route_type, body(v), &OPENAI);
            (native, parsed)
        };
        let (native, parsed) = both(
            RouteType::Completions,
            json!({"prompt": ["once upon"], "max_tokens": 7, "stream": true, "suffix": "end"}),
        );
        let native = native.unwrap_or_else(|e| panic!("{e}"));
        assert!(parsed.is_ok());
        assert_eq!(native.route_type, RouteType::Completions);
        assert_eq!((native.prompt_chars, native.max_tokens), (9, Some(7)));
        assert!(native.stream && native.body.contains_key("suffix"));
        let (native, _) = both(
            RouteType::Embeddings,
            json!({"input": ["ab", "cde"], "encoding_format": "base64", "dimensions": 8}),
        );
        let native = native.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((native.prompt_chars, native.stream), (5, false));
        assert_eq!(native.body["encoding_format"], "base64");
        // Refused alike, with the same message.
        for (route_type, bad) in [
            (RouteType::Completions, json!({})),
            (RouteType::Completions, json!({"prompt": 3})),
            (
                RouteType::Completions,
                json!({"prompt": "x", "temperature": "hot"}),
            ),
            (RouteType::Embeddings, json!({"input": []})),
            (RouteType::Embeddings, json!({"input": ["a", 1]})),
            (
                RouteType::Embeddings,
                json!({"input": "a", "encoding_format": 1}),
            ),
        ] {
            let (native, parsed) = both(route_type, bad.clone());
            let (Err(native), Err(parsed)) = (native, parsed) else {
                panic!("{bad} accepted");
            };
            assert_eq!(native.to_string(), parsed.to_string(), "{bad}");
        }
    }
}
