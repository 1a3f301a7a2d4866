//! OpenAI's Responses API, `POST /v1/responses`, stateless, on every chat Route (the body's
//! `model` names the Route): input items are translated into the unified (chat-shaped) request,
//! the answer into a `response` object, and its stream into the typed `response.*` events.
//!
//! The gateway keeps no state and runs no tools: `previous_response_id`, `conversation`,
//! `store: true`, `background` and built-in tools are refused with a 400 saying so.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use http::HeaderMap;
use serde_json::{Map, Value, json};

use super::AppState;
use super::body::read_json_object;
use super::error::{GatewayError, OpenAiError};
use super::forward;
use super::openai::{model_name, sse_response};
use super::reframe::{Reframer, push_named, reframe};
use super::request::{require_string, take_bool, take_count, take_number};
use crate::api::RouteType;
use crate::llm::{
    ChatMessage, ChatRequest, Content, Generation, LlmRequest, LlmResponse, Params, Role,
    StreamDelta, StreamOptions, ToolCall, Usage, unix_now,
};

type Fields = Map<String, Value>;
type Result<T, E = OpenAiError> = std::result::Result<T, E>;

pub async fn create(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let mut body = read_json_object(&state, &headers, body).await?;
    let model = require_string(&mut body, "model")?;
    let route = forward::lookup(&state, &model, RouteType::Chat).await?;
    let (chat, echo) = parse(body)?;
    let request = LlmRequest::Chat(chat);
    if request.stream().stream {
        let (deltas, upstream_model) = forward::invoke_stream(&state, &route, &request).await?;
        return Ok(sse_response(reframe(
            deltas,
            ResponsesStream::new(upstream_model, echo),
        )));
    }
    let LlmResponse::Generation(g) = forward::invoke(&state, &route, &request).await? else {
        return Err(GatewayError::UpstreamMalformed("expected a chat answer".into()).into());
    };
    Ok(Json(render(&g, &route.entry.model, &echo)).into_response())
}

/// `/v1/responses/{id}` (retrieve, delete, cancel, input items): there is nothing stored to find.
pub async fn stored() -> OpenAiError {
    OpenAiError(GatewayError::NoSuchPath(
        "the gateway is stateless and stores no responses; /v1/responses/{id} has nothing to retrieve, delete or cancel".into(),
    ))
}

fn bad(param: &'static str, message: impl Into<String>) -> GatewayError {
    GatewayError::bad_param(param, message)
}

/// Request fields a `response` object repeats back.
#[derive(Clone, Debug, Default)]
pub struct Echo {
    fields: Map<String, Value>,
}

/// A Responses body (without `model`) as a unified chat request, and what the answer echoes.
pub fn parse(mut body: Fields) -> Result<(ChatRequest, Echo), GatewayError> {
    refuse_state(&mut body)?;
    let mut echo = Map::new();
    let mut messages = Vec::new();
    match body.remove("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            echo.insert("instructions".into(), json!(s));
            messages.push(ChatMessage::new(Role::System, Content::Text(s)));
        }
        Some(_) => return Err(bad("instructions", "'instructions' must be a string")),
    }
    match body.remove("input") {
        Some(Value::String(s)) => messages.push(ChatMessage::new(Role::User, Content::Text(s))),
        Some(Value::Array(items)) if !items.is_empty() => {
            for (i, item) in items.into_iter().enumerate() {
                push_item(&mut messages, item, i)?;
            }
        }
        Some(Value::Array(_)) => return Err(bad("input", "'input' must not be empty")),
        None | Some(Value::Null) => return Err(bad("input", "'input' is required")),
        Some(_) => return Err(bad("input", "'input' must be a string or a list of items")),
    }
    if messages.iter().all(|m| m.role == Role::System) {
        return Err(bad("input", "'input' has no message to answer"));
    }
    let params = Params {
        temperature: take_number(&mut body, "temperature", 0.0, 2.0)?,
        top_p: take_number(&mut body, "top_p", 0.0, 1.0)?,
        max_tokens: take_count(&mut body, "max_output_tokens", 1, u32::MAX as u64)?,
        stop: None,
        n: None,
    };
    for (k, v) in [
        ("temperature", params.temperature.map(|t| json!(t))),
        ("top_p", params.top_p.map(|t| json!(t))),
        ("max_output_tokens", params.max_tokens.map(|t| json!(t))),
    ] {
        echo.insert(k.into(), v.unwrap_or(Value::Null));
    }
    let mut extra = Map::new();
    let tools = take_tools(&mut body)?;
    echo.insert("tools".into(), Value::Array(tools.1));
    if !tools.0.is_empty() {
        extra.insert("tools".into(), Value::Array(tools.0));
    }
    let choice = body.remove("tool_choice").filter(|v| !v.is_null());
    echo.insert(
        "tool_choice".into(),
        choice.clone().unwrap_or(json!("auto")),
    );
    if let Some(choice) = choice
        && extra.contains_key("tools")
    {
        extra.insert("tool_choice".into(), tool_choice(&choice)?);
    }
    let parallel = take_bool(&mut body, "parallel_tool_calls")?;
    echo.insert(
        "parallel_tool_calls".into(),
        json!(parallel.unwrap_or(true)),
    );
    if let (Some(p), true) = (parallel, extra.contains_key("tools")) {
        extra.insert("parallel_tool_calls".into(), json!(p));
    }
    let text = match body.remove("text") {
        None | Some(Value::Null) => json!({"format": {"type": "text"}}),
        Some(Value::Object(t)) => Value::Object(t),
        Some(_) => return Err(bad("text", "'text' must be an object")),
    };
    if let Some(format) = response_format(&text)? {
        extra.insert("response_format".into(), format);
    }
    echo.insert("text".into(), text);
    if let Some(m) = body.remove("metadata").filter(Value::is_object) {
        echo.insert("metadata".into(), m);
    }
    let stream = take_bool(&mut body, "stream")?.unwrap_or(false);
    Ok((
        ChatRequest {
            messages,
            params,
            stream: StreamOptions {
                stream,
                include_usage: true,
            },
            extra,
        },
        Echo { fields: echo },
    ))
}

/// The stateful and background features a stateless gateway cannot honour: refused, never ignored.
fn refuse_state(body: &mut Fields) -> Result<(), GatewayError> {
    if body
        .get("previous_response_id")
        .is_some_and(|v| !v.is_null())
    {
        return Err(bad(
            "previous_response_id",
            "the gateway is stateless and keeps no responses: 'previous_response_id' is not supported; send the whole conversation in 'input'",
        ));
    }
    if body.get("conversation").is_some_and(|v| !v.is_null()) {
        return Err(bad(
            "conversation",
            "the gateway is stateless and keeps no conversations: 'conversation' is not supported; send the whole conversation in 'input'",
        ));
    }
    if take_bool(body, "store")? == Some(true) {
        return Err(bad(
            "store",
            "the gateway is stateless and does not store responses: send 'store': false or leave it out",
        ));
    }
    if take_bool(body, "background")? == Some(true) {
        return Err(bad(
            "background",
            "the gateway does not run responses in the background: leave 'background' out",
        ));
    }
    if body.get("prompt").is_some_and(|v| !v.is_null()) {
        return Err(bad(
            "prompt",
            "the gateway keeps no prompt templates: 'prompt' is not supported",
        ));
    }
    Ok(())
}

/// One input item as unified messages.
fn push_item(out: &mut Vec<ChatMessage>, item: Value, i: usize) -> Result<(), GatewayError> {
    let Value::Object(item) = item else {
        return Err(bad("input", format!("input[{i}] must be an object")));
    };
    let kind = item.get("type").and_then(Value::as_str);
    match kind {
        None | Some("message") => {
            let role = match item.get("role").and_then(Value::as_str) {
                Some("user") => Role::User,
                Some("assistant") => Role::Assistant,
                Some("system") => Role::System,
                Some("developer") => Role::Developer,
                _ => {
                    return Err(bad(
                        "input",
                        format!("input[{i}].role must be user, assistant, system or developer"),
                    ));
                }
            };
            let content = match item.get("content") {
                Some(Value::String(s)) => Content::text(s.as_str()),
                Some(Value::Array(parts)) => Content::Parts(
                    parts
                        .iter()
                        .enumerate()
                        .map(|(j, p)| content_part(p, &format!("input[{i}].content[{j}]")))
                        .collect::<Result<_, _>>()?,
                ),
                _ => {
                    return Err(bad(
                        "input",
                        format!("input[{i}].content must be a string or a list of content parts"),
                    ));
                }
            };
            out.push(ChatMessage::new(role, content));
        }
        Some("function_call") => {
            let call_id = item.get("call_id").and_then(Value::as_str);
            let name = item.get("name").and_then(Value::as_str);
            let arguments = item.get("arguments").and_then(Value::as_str);
            let (Some(call_id), Some(name), Some(arguments)) = (call_id, name, arguments) else {
                return Err(bad(
                    "input",
                    format!("input[{i}]: a function_call needs string call_id, name and arguments"),
                ));
            };
            let call = ToolCall::function(call_id, name, arguments.to_string());
            // Calls of one turn join the assistant message before them (its text, its other calls).
            match out.last_mut() {
                Some(last) if last.role == Role::Assistant => last.tool_calls.push(call),
                _ => {
                    let mut m = ChatMessage::new(Role::Assistant, Content::Empty);
                    m.tool_calls.push(call);
                    out.push(m);
                }
            }
        }
        Some("function_call_output") => {
            let Some(call_id) = item.get("call_id").and_then(Value::as_str) else {
                return Err(bad(
                    "input",
                    format!("input[{i}]: a function_call_output needs a string call_id"),
                ));
            };
            let output = match item.get("output") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join(""),
                _ => {
                    return Err(bad("input", format!("input[{i}].output must be a string")));
                }
            };
            out.push(ChatMessage::tool_result(call_id, output));
        }
        // Reasoning from an earlier turn is the provider's own; translated Routes cannot use it.
        Some("reasoning") => {}
        Some("item_reference") => {
            return Err(bad(
                "input",
                format!(
                    "input[{i}]: the gateway is stateless and cannot resolve item references; send the item itself"
                ),
            ));
        }
        Some(other) => {
            return Err(bad(
                "input",
                format!(
                    "input[{i}]: item type {other:?} is not supported (message, function_call, function_call_output are)"
                ),
            ));
        }
    }
    Ok(())
}

/// A Responses content part as an OpenAI chat content part.
fn content_part(part: &Value, at: &str) -> Result<Value, GatewayError> {
    match part.get("type").and_then(Value::as_str) {
        Some("input_text" | "output_text" | "text") => {
            let text = part
                .get("text")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("input", format!("{at}.text must be a string")))?;
            Ok(json!({"type": "text", "text": text}))
        }
        Some("refusal") => Ok(json!({"type": "text",
            "text": part.get("refusal").and_then(Value::as_str).unwrap_or_default()})),
        Some("input_image") => {
            let url = part
                .get("image_url")
                .and_then(Value::as_str)
                .filter(|u| u.starts_with("https://") || u.starts_with("http://") || u.starts_with("data:"))
                .ok_or_else(|| {
                    bad(
                        "input",
                        format!("{at}.image_url must be an http(s) or data: URL (file_id is not supported)"),
                    )
                })?;
            let mut image = json!({"url": url});
            if let Some(d) = part.get("detail").and_then(Value::as_str) {
                image["detail"] = json!(d);
            }
            Ok(json!({"type": "image_url", "image_url": image}))
        }
        other => Err(bad(
            "input",
            format!("{at}: content type {other:?} is not supported (input_text, input_image are)"),
        )),
    }
}

/// Function tools as chat tools, and the definitions the response echoes; other tool types are
/// built-in tools the gateway does not run.
fn take_tools(body: &mut Fields) -> Result<(Vec<Value>, Vec<Value>), GatewayError> {
    let tools = match body.remove("tools") {
        None | Some(Value::Null) => return Ok((Vec::new(), Vec::new())),
        Some(Value::Array(t)) => t,
        Some(_) => return Err(bad("tools", "'tools' must be a list of tools")),
    };
    let mut chat = Vec::with_capacity(tools.len());
    for (i, t) in tools.iter().enumerate() {
        match t.get("type").and_then(Value::as_str) {
            Some("function") => {}
            Some(kind) => {
                return Err(bad(
                    "tools",
                    format!(
                        "tools[{i}]: {kind:?} is a built-in tool and the gateway does not run built-in tools; only function tools are supported"
                    ),
                ));
            }
            None => return Err(bad("tools", format!("tools[{i}] needs a 'type'"))),
        }
        let name = t
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                bad(
                    "tools",
                    format!("tools[{i}].name must be a non-empty string"),
                )
            })?;
        let mut function = json!({"name": name});
        match t.get("parameters") {
            None | Some(Value::Null) => {}
            Some(p @ Value::Object(_)) => function["parameters"] = p.clone(),
            Some(_) => {
                return Err(bad(
                    "tools",
                    format!("tools[{i}].parameters must be a JSON Schema object"),
                ));
            }
        }
        for key in ["description", "strict"] {
            if let Some(v) = t.get(key).filter(|v| !v.is_null()) {
                function[key] = v.clone();
            }
        }
        chat.push(json!({"type": "function", "function": function}));
    }
    Ok((chat, tools))
}

fn tool_choice(choice: &Value) -> Result<Value, GatewayError> {
    match choice {
        Value::String(s) if matches!(s.as_str(), "auto" | "none" | "required") => Ok(json!(s)),
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            match o.get("name").and_then(Value::as_str) {
                Some(name) => Ok(json!({"type": "function", "function": {"name": name}})),
                None => Err(bad("tool_choice", "a function tool_choice needs a 'name'")),
            }
        }
        _ => Err(bad(
            "tool_choice",
            "'tool_choice' must be auto, none, required or {\"type\": \"function\", \"name\": ...}; built-in tools are not run by the gateway",
        )),
    }
}

/// `text.format` as chat's `response_format`.
fn response_format(text: &Value) -> Result<Option<Value>, GatewayError> {
    let Some(format) = text.get("format").filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let name = format.get("name").and_then(Value::as_str);
            let schema = format.get("schema").filter(|s| s.is_object());
            let (Some(name), Some(schema)) = (name, schema) else {
                return Err(bad(
                    "text",
                    "text.format of type json_schema needs a 'name' and a 'schema' object",
                ));
            };
            let mut spec = json!({"name": name, "schema": schema});
            for key in ["description", "strict"] {
                if let Some(v) = format.get(key).filter(|v| !v.is_null()) {
                    spec[key] = v.clone();
                }
            }
            Ok(Some(json!({"type": "json_schema", "json_schema": spec})))
        }
        _ => Err(bad(
            "text",
            "text.format.type must be text, json_object or json_schema",
        )),
    }
}

fn next_id(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!(
        "{prefix}_portcullis{:08x}{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn usage_json(u: &Usage) -> Value {
    let input = u.prompt_tokens.unwrap_or(0);
    let output = u.completion_tokens.unwrap_or(0);
    json!({
        "input_tokens": input, "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.total_tokens.unwrap_or(input.saturating_add(output)),
    })
}

/// Status and `incomplete_details` for a finish reason.
fn status(finish: Option<&str>) -> (&'static str, Value) {
    match finish {
        Some("length") => ("incomplete", json!({"reason": "max_output_tokens"})),
        Some("content_filter") => ("incomplete", json!({"reason": "content_filter"})),
        _ => ("completed", Value::Null),
    }
}

fn response_object(
    id: &str,
    created: i64,
    model: &str,
    echo: &Echo,
    (status, incomplete): (&str, Value),
    output: Vec<Value>,
    usage: Option<&Usage>,
) -> Value {
    let mut r = json!({
        "id": id, "object": "response", "created_at": created, "status": status,
        "background": false, "error": null, "incomplete_details": incomplete,
        "instructions": null, "max_output_tokens": null, "model": model, "output": output,
        "parallel_tool_calls": true, "previous_response_id": null, "reasoning": {"effort": null, "summary": null},
        "store": false, "temperature": null, "text": {"format": {"type": "text"}},
        "tool_choice": "auto", "tools": [], "top_p": null, "truncation": "disabled",
        "usage": usage.map(usage_json), "metadata": {},
    });
    for (k, v) in &echo.fields {
        r[k] = v.clone();
    }
    r
}

fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({"type": "message", "id": id, "status": status, "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]})
}

fn call_item(id: &str, call_id: &str, name: &str, arguments: &str, status: &str) -> Value {
    json!({"type": "function_call", "id": id, "call_id": call_id, "name": name,
        "arguments": arguments, "status": status})
}

/// A non-streaming answer as a `response` object.
pub fn render(g: &Generation, configured_model: &str, echo: &Echo) -> Value {
    let choice = g.choices.first();
    let mut output = Vec::new();
    if let Some(c) = choice.filter(|c| !c.text.is_empty()) {
        output.push(message_item(&next_id("msg"), &c.text, "completed"));
    }
    for call in choice.iter().flat_map(|c| &c.tool_calls) {
        output.push(call_item(
            &next_id("fc"),
            &call.id,
            &call.name,
            &call.arguments,
            "completed",
        ));
    }
    response_object(
        &next_id("resp"),
        if g.created > 0 { g.created } else { unix_now() },
        model_name(&g.model, configured_model),
        echo,
        status(choice.and_then(|c| c.finish_reason.as_deref())),
        output,
        Some(&g.usage),
    )
}

/// An output item being streamed.
enum Item {
    Text {
        id: String,
        text: String,
    },
    Call {
        id: String,
        call_id: String,
        name: String,
        arguments: String,
        tool: u32,
    },
}

/// Unified deltas as the Responses stream: `response.created`, `response.in_progress`, each output
/// item added, filled and done in turn, then `response.completed` with the whole response.
pub struct ResponsesStream {
    id: String,
    created: i64,
    model: String,
    echo: Echo,
    seq: u64,
    started: bool,
    open: Option<Item>,
    done: Vec<Value>,
    finish: Option<String>,
    usage: Option<Usage>,
}

impl ResponsesStream {
    pub fn new(model: String, echo: Echo) -> Self {
        ResponsesStream {
            id: next_id("resp"),
            created: unix_now(),
            model,
            echo,
            seq: 0,
            started: false,
            open: None,
            done: Vec::new(),
            finish: None,
            usage: None,
        }
    }

    fn emit(&mut self, out: &mut BytesMut, kind: &str, mut event: Value) {
        event["type"] = json!(kind);
        event["sequence_number"] = json!(self.seq);
        self.seq += 1;
        push_named(out, kind, &event);
    }

    fn snapshot(&self, status: &str, incomplete: Value) -> Value {
        response_object(
            &self.id,
            self.created,
            &self.model,
            &self.echo,
            (status, incomplete),
            self.done.clone(),
            self.usage.as_ref(),
        )
    }

    fn start(&mut self, d: Option<&StreamDelta>, out: &mut BytesMut) {
        if self.started {
            return;
        }
        self.started = true;
        if let Some(m) = d.and_then(|d| d.model.clone()).filter(|m| !m.is_empty()) {
            self.model = m;
        }
        let r = self.snapshot("in_progress", Value::Null);
        self.emit(out, "response.created", json!({"response": r}));
        self.emit(out, "response.in_progress", json!({"response": r}));
    }

    fn index(&self) -> usize {
        self.done.len()
    }

    fn close(&mut self, out: &mut BytesMut) {
        let index = self.index();
        match self.open.take() {
            None => {}
            Some(Item::Text { id, text }) => {
                self.emit(out, "response.output_text.done", json!({"item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": []}));
                self.emit(out, "response.content_part.done", json!({"item_id": id, "output_index": index, "content_index": 0,
                    "part": {"type": "output_text", "text": text, "annotations": [], "logprobs": []}}));
                let item = message_item(&id, &text, "completed");
                self.emit(
                    out,
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                );
                self.done.push(item);
            }
            Some(Item::Call {
                id,
                call_id,
                name,
                arguments,
                ..
            }) => {
                self.emit(out, "response.function_call_arguments.done", json!({"item_id": id, "output_index": index, "name": name, "arguments": arguments}));
                let item = call_item(&id, &call_id, &name, &arguments, "completed");
                self.emit(
                    out,
                    "response.output_item.done",
                    json!({"output_index": index, "item": item}),
                );
                self.done.push(item);
            }
        }
    }
}

impl Reframer for ResponsesStream {
    fn deltas(&mut self, deltas: Vec<StreamDelta>, out: &mut BytesMut) {
        for d in deltas {
            self.start(Some(&d), out);
            if d.index != 0 {
                continue;
            }
            if let Some(text) = d.text.as_deref().filter(|t| !t.is_empty()) {
                if !matches!(self.open, Some(Item::Text { .. })) {
                    self.close(out);
                    let id = next_id("msg");
                    let index = self.index();
                    self.emit(out, "response.output_item.added", json!({"output_index": index,
                        "item": {"type": "message", "id": id, "status": "in_progress", "role": "assistant", "content": []}}));
                    self.emit(out, "response.content_part.added", json!({"item_id": id, "output_index": index, "content_index": 0,
                        "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}));
                    self.open = Some(Item::Text {
                        id,
                        text: String::new(),
                    });
                }
                let index = self.index();
                if let Some(Item::Text { id, text: all }) = &mut self.open {
                    all.push_str(text);
                    let id = id.clone();
                    self.emit(out, "response.output_text.delta", json!({"item_id": id, "output_index": index, "content_index": 0, "delta": text, "logprobs": []}));
                }
            }
            for call in d.tool_calls {
                // A fragment continues the open call unless it brings another index or id (some
                // providers repeat the id on every fragment).
                let same = matches!(&self.open, Some(Item::Call { tool, call_id, .. })
                    if *tool == call.index && call.id.as_ref().is_none_or(|c| c == call_id));
                if !same {
                    self.close(out);
                    let id = next_id("fc");
                    let call_id = call
                        .id
                        .clone()
                        .unwrap_or_else(|| format!("call_portcullis_{}", call.index));
                    let name = call.name.clone().unwrap_or_default();
                    let index = self.index();
                    self.emit(
                        out,
                        "response.output_item.added",
                        json!({"output_index": index,
                        "item": call_item(&id, &call_id, &name, "", "in_progress")}),
                    );
                    self.open = Some(Item::Call {
                        id,
                        call_id,
                        name,
                        arguments: String::new(),
                        tool: call.index,
                    });
                }
                let index = self.index();
                if let Some(Item::Call { id, arguments, .. }) = &mut self.open
                    && !call.arguments.is_empty()
                {
                    arguments.push_str(&call.arguments);
                    let id = id.clone();
                    self.emit(
                        out,
                        "response.function_call_arguments.delta",
                        json!({"item_id": id, "output_index": index, "delta": call.arguments}),
                    );
                }
            }
            if let Some(reason) = d.finish_reason {
                self.finish = Some(reason);
            }
            if let Some(u) = d.usage {
                self.usage = Some(u);
            }
        }
    }

    fn failed(&mut self, err: &GatewayError, out: &mut BytesMut) {
        self.start(None, out);
        self.emit(
            out,
            "error",
            json!({"code": err.code(), "message": err.to_string(), "param": null}),
        );
        let mut r = self.snapshot("failed", Value::Null);
        r["error"] = json!({"code": err.code(), "message": err.to_string()});
        self.emit(out, "response.failed", json!({"response": r}));
    }

    fn end(&mut self, out: &mut BytesMut) {
        self.start(None, out);
        self.close(out);
        let (status, incomplete) = status(self.finish.as_deref());
        let r = self.snapshot(status, incomplete);
        let kind = if status == "completed" {
            "response.completed"
        } else {
            "response.incomplete"
        };
        self.emit(out, kind, json!({"response": r}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Provider;
    use crate::llm::{Choice, ToolCallDelta};

    fn body(v: Value) -> Fields {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    fn parse_err(v: Value) -> String {
        parse(body(v))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn items_become_chat_messages() {
        let (chat, echo) = parse(body(json!({
            "instructions": "Be terse.", "max_output_tokens": 50, "temperature": 0.2,
            "tools": [{"type": "function", "name": "get_weather", "description": "Weather", "parameters": {"type": "object"}, "strict": true}],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": true}},
            "store": false,
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather?"},
                    {"type": "input_image", "image_url": "data:image/png;base64,iVBOR", "detail": "low"}]},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
                {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"},
                {"type": "function_call_output", "call_id": "call_2", "output": "Rain"}
            ]
        })))
        .unwrap_or_else(|e| panic!("{e}"));
        let roles: Vec<&str> = chat.messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool", "tool"]);
        assert_eq!(
            json!(chat.messages[1].content)[1],
            json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR", "detail": "low"}})
        );
        assert_eq!(
            json!(chat.messages[2].tool_calls).as_array().map(Vec::len),
            Some(2)
        );
        assert_eq!(chat.messages[3].tool_call_id.as_deref(), Some("call_1"));
        assert_eq!(chat.params.max_tokens, Some(50));
        assert_eq!(
            chat.extra["tools"][0],
            json!({"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object"}, "strict": true}})
        );
        assert_eq!(
            chat.extra["tool_choice"],
            json!({"type": "function", "function": {"name": "get_weather"}})
        );
        assert_eq!(
            chat.extra["response_format"],
            json!({"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": true}})
        );
        assert_eq!(echo.fields["instructions"], "Be terse.");
    }

    #[test]
    fn stateful_features_and_built_in_tools_are_refused() {
        assert!(
            parse_err(json!({"input": "x", "previous_response_id": "resp_1"}))
                .contains("stateless")
        );
        assert!(parse_err(json!({"input": "x", "store": true})).contains("stateless"));
        assert!(parse_err(json!({"input": "x", "background": true})).contains("background"));
        assert!(
            parse_err(json!({"input": "x", "tools": [{"type": "web_search"}]}))
                .contains("does not run built-in tools")
        );
        assert!(parse_err(json!({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": "x"}]})).contains("JSON Schema"));
        assert!(
            parse_err(json!({"input": [{"type": "item_reference", "id": "x"}]}))
                .contains("stateless")
        );
        assert!(parse_err(json!({})).contains("'input' is required"));
        assert!(parse_err(json!({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]})).contains("not supported"));
        assert!(parse(body(json!({"input": "x", "store": false}))).is_ok());
    }

    #[test]
    fn answers_render_as_response_objects() {
        let calls = ToolCall::openai_list(
            json!([{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]),
        );
        let g = Generation {
            id: String::new(),
            created: 5,
            model: "gpt-4o-mini-2024".into(),
            choices: vec![Choice {
                index: 0,
                text: "Hi".into(),
                finish_reason: Some("tool_calls".into()),
                tool_calls: calls,
                message_extra: Map::new(),
            }],
            usage: Usage::new(Some(3), Some(2)),
        };
        let (_, echo) = parse(body(json!({"input": "x"}))).unwrap_or_else(|e| panic!("{e}"));
        let r = render(&g, "m", &echo);
        assert_eq!(r["object"], "response");
        assert_eq!(r["status"], "completed");
        assert_eq!(r["model"], "gpt-4o-mini-2024");
        assert_eq!(r["output"][0]["content"][0]["text"], "Hi");
        assert_eq!(r["output"][1]["type"], "function_call");
        assert_eq!(r["output"][1]["call_id"], "call_1");
        assert_eq!(r["usage"]["total_tokens"], 5);
        assert_eq!(r["store"], false);
    }

    #[test]
    fn streams_are_typed_events_with_sequence_numbers() {
        let (_, echo) = parse(body(json!({"input": "x"}))).unwrap_or_else(|e| panic!("{e}"));
        let text = |t: &str| StreamDelta {
            text: Some(t.into()),
            ..Default::default()
        };
        let call = |id: Option<&str>, args: &str| StreamDelta {
            tool_calls: vec![ToolCallDelta {
                index: 0,
                id: id.map(String::from),
                name: id.map(|_| "f".into()),
                arguments: args.into(),
            }],
            ..Default::default()
        };
        let events = super::super::reframe::run(
            ResponsesStream::new("m".into(), echo.clone()),
            vec![
                Ok(vec![text("He"), text("llo")]),
                Ok(vec![call(Some("call_1"), "{\"a\""), call(None, ":1}")]),
                Ok(vec![StreamDelta {
                    finish_reason: Some("tool_calls".into()),
                    usage: Some(Usage::new(Some(4), Some(6))),
                    ..Default::default()
                }]),
            ],
        );
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.content_part.added",
                "response.output_text.delta",
                "response.output_text.delta",
                "response.output_text.done",
                "response.content_part.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        for (i, (name, e)) in events.iter().enumerate() {
            assert_eq!(e["sequence_number"], i as u64);
            assert_eq!(e["type"], name.as_str());
        }
        assert_eq!(events[6].1["text"], "Hello");
        assert_eq!(events[12].1["arguments"], "{\"a\":1}");
        let done = &events[14].1["response"];
        assert_eq!(done["output"][1]["call_id"], "call_1");
        assert_eq!(done["usage"]["total_tokens"], 10);
        let repeated = super::super::reframe::run(
            ResponsesStream::new("m".into(), echo.clone()),
            vec![Ok(vec![
                call(Some("call_1"), "{"),
                call(Some("call_1"), "}"),
            ])],
        );
        let added = repeated
            .iter()
            .filter(|(n, _)| n == "response.output_item.added")
            .count();
        assert_eq!(added, 1, "{repeated:?}");
        let cut = super::super::reframe::run(
            ResponsesStream::new("m".into(), echo),
            vec![
                Ok(vec![text("He")]),
                Err(GatewayError::UpstreamTruncated(Provider::Openai)),
            ],
        );
        let names: Vec<&str> = cut.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names.last().copied(), Some("response.failed"));
        assert!(names.contains(&"error") && !names.contains(&"response.completed"));
    }
}
