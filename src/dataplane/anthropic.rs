//! Anthropic's Messages API, `POST /v1/messages`, on every chat Route (the body's `model` names
//! the Route). A Route served only by Anthropic gets the caller's body and Anthropic's answer as
//! they are (see `native`). On any other Route the request is translated into the unified
//! (OpenAI-shaped) chat model, the answer and its stream back into Anthropic's content blocks and
//! named events; `top_k` is passed on only when every backend of the Route reads it.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use http::HeaderMap;
use serde_json::{Map, Value, json};

use super::AppState;
use super::admission::{Visibility, tokens_for_chars};
use super::body::read_json_object;
use super::error::{AnthropicError, GatewayError, anthropic_message, anthropic_type};
use super::forward::{self, ServingRoute};
use super::openai::{model_name, sse_response};
use super::reframe::{Reframer, push_named, reframe};
use super::request::{require_string, take_bool, take_count, take_number};
use crate::api::RouteType;
use crate::llm::{
    ChatMessage, ChatRequest, Content, Generation, LlmRequest, LlmResponse, NativeRequest, Params,
    Role, StreamDelta, StreamOptions, Usage,
};
use crate::providers;
use crate::providers::anthropic_wire::{self as wire, Delta, Event, Message, block_type};

type Fields = Map<String, Value>;
type Result<T, E = AnthropicError> = std::result::Result<T, E>;

/// What of a Messages request may be passed on as is, decided by the Route's backends.
#[derive(Clone, Copy, Debug, Default)]
pub struct PassOn {
    /// Every backend reads `top_k`.
    pub top_k: bool,
    /// Every backend is Anthropic: the whole request passes through (see `native`), untranslated.
    /// Not when the Route checks answers: the gateway reads and masks only its own stream model.
    pub anthropic: bool,
}

impl PassOn {
    fn for_route(state: &AppState, route: &ServingRoute) -> PassOn {
        PassOn {
            top_k: route.providers().all(|p| providers::info(p).reads_top_k),
            anthropic: state.pass_through
                && route.wire() == Some(providers::Wire::Anthropic)
                && !route.guards().any(|g| g.response),
        }
    }
}

pub async fn messages(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let (body, route, pass) = read_and_look_up(&state, &headers, body).await?;
    if pass.anthropic {
        return native(&state, &route, native_request(body, &headers)?).await;
    }
    let chat = parse(body, pass, true)?;
    let stream = chat.stream.stream;
    let estimate = if stream { estimate_input(&chat) } else { 0 };
    let request = LlmRequest::Chat(chat);
    if stream {
        let (deltas, model) = forward::invoke_stream(&state, &route, &request).await?;
        return Ok(sse_response(reframe(
            deltas,
            MessagesStream::new(model).with_input_estimate(estimate),
        )));
    }
    let LlmResponse::Generation(g) = forward::invoke(&state, &route, &request).await? else {
        return Err(GatewayError::UpstreamMalformed("expected a chat answer".into()).into());
    };
    Ok(Json(render(&g, &route.entry.model)).into_response())
}

/// A Route served only by Anthropic gets the caller's body as is (but for `model`) and gives back
/// Anthropic's answer as is: thinking, server tools, documents, citations and any field to come
/// survive. The gateway still reads usage, and ends a cut stream with an `error` event.
async fn native(
    state: &AppState,
    route: &ServingRoute,
    request: NativeRequest,
) -> Result<Response> {
    let stream = request.stream;
    let request = LlmRequest::Native(request);
    if stream {
        let (deltas, _) = forward::invoke_stream(state, route, &request).await?;
        return Ok(sse_response(reframe(deltas, Verbatim)));
    }
    let LlmResponse::Native(answer) = forward::invoke(state, route, &request).await? else {
        return Err(GatewayError::UpstreamMalformed("expected a native answer".into()).into());
    };
    Ok((
        [(http::header::CONTENT_TYPE, "application/json")],
        answer.body,
    )
        .into_response())
}

/// The caller's Messages body (without `model`) for a native call: only what the gateway itself
/// reads is checked (`max_tokens` for budgets, `stream`); Anthropic judges the rest.
pub fn native_request(
    mut body: Fields,
    headers: &HeaderMap,
) -> Result<NativeRequest, GatewayError> {
    let max_tokens = take_count(&mut body, "max_tokens", 1, u32::MAX as u64)?
        .ok_or_else(|| GatewayError::bad_param("max_tokens", "'max_tokens' is required"))?;
    body.insert("max_tokens".into(), json!(max_tokens));
    let stream = take_bool(&mut body, "stream")?;
    if let Some(s) = stream {
        body.insert("stream".into(), json!(s));
    }
    match body.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => {}
        _ => return Err(bad("'messages' must be a non-empty list of messages")),
    }
    let prompt_chars = ["system", "messages", "tools"]
        .iter()
        .filter_map(|k| body.get(*k))
        .map(prompt_chars)
        .sum();
    let headers = headers
        .get("anthropic-beta")
        .and_then(|v| v.to_str().ok())
        .map(|beta| ("anthropic-beta".to_string(), beta.to_string()))
        .into_iter()
        .collect();
    Ok(NativeRequest {
        route_type: RouteType::Chat,
        body,
        stream: stream.unwrap_or(false),
        max_tokens: Some(max_tokens),
        prompt_chars,
        headers,
    })
}

/// Characters a tokenizer would read in `value`: its strings, but not opaque ones (base64 `data`,
/// thinking `signature`s), which are no text.
fn prompt_chars(value: &Value) -> usize {
    match value {
        Value::String(s) => s.len(),
        Value::Array(items) => items.iter().map(prompt_chars).sum(),
        Value::Object(fields) => fields
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "data" | "signature"))
            .map(|(_, v)| prompt_chars(v))
            .sum(),
        _ => 0,
    }
}

/// A native stream: Anthropic's events as they came, an `error` event if it breaks.
struct Verbatim;

impl Reframer for Verbatim {
    fn deltas(&mut self, deltas: Vec<StreamDelta>, out: &mut BytesMut) {
        for raw in deltas.iter().filter_map(|d| d.raw.as_ref()) {
            out.extend_from_slice(raw);
        }
    }

    fn failed(&mut self, err: &GatewayError, out: &mut BytesMut) {
        push_error(err, out);
    }

    fn end(&mut self, _out: &mut BytesMut) {}
}

fn push_error(err: &GatewayError, out: &mut BytesMut) {
    push_event(
        out,
        &Event::Error {
            error: json!({"type": anthropic_type(err.status()), "message": anthropic_message(err)}),
        },
    );
}

fn push_event(out: &mut BytesMut, event: &Event) {
    push_named(out, event.name(), event);
}

/// Anthropic's clients send `anthropic-version` on every call; the model listing answers them in
/// Anthropic's shape, everyone else in OpenAI's.
fn wants_anthropic(headers: &HeaderMap) -> bool {
    headers.contains_key("anthropic-version")
}

fn model_object(name: &str) -> Value {
    json!({"type": "model", "id": name, "display_name": name, "created_at": "1970-01-01T00:00:00Z"})
}

/// `GET /v1/models`: the chat routes the caller may use, as Anthropic models (a single page).
pub async fn list_models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if !wants_anthropic(&headers) {
        return super::openai::list_models(State(state))
            .await
            .into_response();
    }
    let visible = match Visibility::of_caller(&state).await {
        Ok(visible) => visible,
        Err(e) => return AnthropicError(e).into_response(),
    };
    let table = state.table.load();
    let data: Vec<Value> = table
        .routes()
        .iter()
        .filter(|e| e.route_type == RouteType::Chat && visible.shows(e))
        .map(|e| model_object(&e.name))
        .collect();
    let first = data.first().map(|m| m["id"].clone()).unwrap_or(Value::Null);
    let last = data.last().map(|m| m["id"].clone()).unwrap_or(Value::Null);
    Json(json!({"data": data, "has_more": false, "first_id": first, "last_id": last}))
        .into_response()
}

/// `GET /v1/models/{name}`, in Anthropic's shape for Anthropic's clients.
pub async fn get_model(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    path: Path<Vec<String>>,
) -> Response {
    if !wants_anthropic(&headers) {
        return super::openai::get_model(State(state), path)
            .await
            .into_response();
    }
    match Visibility::find(&state, path.0.join("/")).await {
        Ok(entry) if entry.route_type == RouteType::Chat => {
            Json(model_object(&entry.name)).into_response()
        }
        Ok(entry) => {
            AnthropicError(GatewayError::UnknownRoute(entry.name.to_string())).into_response()
        }
        Err(e) => AnthropicError(e).into_response(),
    }
}

/// The request's body and its chat Route (named by `model`), with what may pass on as is.
async fn read_and_look_up(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Fields, forward::ServingRoute, PassOn)> {
    let mut body = read_json_object(state, headers, body).await?;
    let model = require_string(&mut body, "model")?;
    let route = forward::lookup(state, &model, RouteType::Chat).await?;
    let pass = PassOn::for_route(state, &route);
    Ok((body, route, pass))
}

/// `POST /v1/messages/count_tokens`: an estimate (about four characters a token), not the
/// provider's tokenizer; nothing is sent upstream.
pub async fn count_tokens(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>> {
    // Looked up for its answer too: an unknown or forbidden route is refused here as on `messages`.
    let (body, _route, pass) = read_and_look_up(&state, &headers, body).await?;
    if pass.anthropic {
        let chars: usize = ["system", "messages", "tools"]
            .iter()
            .filter_map(|k| body.get(*k))
            .map(prompt_chars)
            .sum();
        return Ok(Json(
            json!({"input_tokens": tokens_for_chars(chars).max(1)}),
        ));
    }
    let chat = parse(body, pass, false)?;
    Ok(Json(json!({"input_tokens": estimate_input(&chat)})))
}

/// The characters a provider would tokenize: every message's text and the tool definitions.
pub fn estimate_input(chat: &ChatRequest) -> u64 {
    let text: usize = chat.messages.iter().map(|m| m.text().len()).sum();
    let tool_calls: usize = chat
        .messages
        .iter()
        .filter(|m| !m.tool_calls.is_empty())
        .map(|m| serde_json::to_string(&m.tool_calls).map_or(0, |c| c.len()))
        .sum();
    let tools = chat.extra.get("tools").map_or(0, |t| t.to_string().len());
    tokens_for_chars(text + tool_calls + tools).max(1)
}

fn bad(message: impl Into<String>) -> GatewayError {
    GatewayError::bad_request(message)
}

/// A Messages body (without `model`) as a unified chat request. `max_tokens` is required unless
/// only counting tokens.
pub fn parse(mut body: Fields, pass: PassOn, generate: bool) -> Result<ChatRequest, GatewayError> {
    let max_tokens = take_count(&mut body, "max_tokens", 1, u32::MAX as u64)?;
    if generate && max_tokens.is_none() {
        return Err(GatewayError::bad_param(
            "max_tokens",
            "'max_tokens' is required",
        ));
    }
    let mut messages = Vec::new();
    match body.remove("system") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => messages.push(ChatMessage::new(Role::System, Content::Text(s))),
        Some(Value::Array(blocks)) => {
            let parts = blocks
                .into_iter()
                .enumerate()
                .map(|(i, b)| match block_type(&b) {
                    Some("text") => text_part(&b, &format!("system[{i}]")),
                    _ => Err(bad(format!("system[{i}] must be a text block"))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            messages.push(ChatMessage::new(Role::System, Content::Parts(parts)));
        }
        Some(_) => return Err(bad("'system' must be a string or a list of text blocks")),
    }
    let turns = match body.remove("messages") {
        Some(Value::Array(items)) if !items.is_empty() => items,
        Some(Value::Array(_)) => return Err(bad("'messages' must contain at least one message")),
        None | Some(Value::Null) => return Err(bad("'messages' is required")),
        Some(_) => return Err(bad("'messages' must be a list of messages")),
    };
    for (i, turn) in turns.into_iter().enumerate() {
        push_turn(&mut messages, turn, i)?;
    }
    let mut extra = Map::new();
    let stop = match body.remove("stop_sequences") {
        None | Some(Value::Null) => None,
        Some(Value::Array(items)) => Some(
            items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    _ => Err(bad("'stop_sequences' must be a list of strings")),
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(_) => return Err(bad("'stop_sequences' must be a list of strings")),
    };
    let params = Params {
        temperature: take_number(&mut body, "temperature", 0.0, 1.0)?,
        top_p: take_number(&mut body, "top_p", 0.0, 1.0)?,
        max_tokens,
        stop,
        n: None,
    };
    if let Some(k) = take_count(&mut body, "top_k", 0, u32::MAX as u64)?
        && pass.top_k
    {
        extra.insert("top_k".into(), json!(k));
    }
    match body.remove("metadata") {
        None | Some(Value::Null) => {}
        // Only Anthropic reads it, and Anthropic-only Routes are not translated.
        Some(Value::Object(_)) => {}
        Some(_) => return Err(bad("'metadata' must be an object")),
    }
    let tools = take_tools(&mut body)?;
    let has_tools = !tools.is_empty();
    if has_tools {
        extra.insert("tools".into(), Value::Array(tools));
    }
    if let Some(choice) = body.remove("tool_choice").filter(|v| !v.is_null()) {
        let (choice, parallel) = wire::unified_tool_choice(&choice).map_err(bad)?;
        if has_tools {
            extra.insert("tool_choice".into(), choice);
            if !parallel {
                extra.insert("parallel_tool_calls".into(), json!(false));
            }
        }
    }
    if let Some(format) = output_format(body.remove("output_config"))? {
        extra.insert("response_format".into(), format);
    }
    let stream = take_bool(&mut body, "stream")?.unwrap_or(false);
    Ok(ChatRequest {
        messages,
        params,
        // Usage is asked for always: Anthropic's stream reports it in `message_delta`.
        stream: StreamOptions {
            stream,
            include_usage: true,
        },
        extra,
    })
}

/// A text block as a text part (its `cache_control` only Anthropic reads).
fn text_part(block: &Value, at: &str) -> Result<Value, GatewayError> {
    let text = block
        .get("text")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(format!("{at}.text must be a string")))?;
    Ok(json!({"type": "text", "text": text}))
}

/// An Anthropic image block as an OpenAI `image_url` part.
fn image_part(block: &Value, at: &str) -> Result<Value, GatewayError> {
    wire::image_part(block).map_err(|e| bad(format!("{at}{e}")))
}

/// One Messages turn as unified messages: an assistant turn's `tool_use` blocks become its
/// `tool_calls`; a user turn's `tool_result` blocks become `tool` messages, placed first (the
/// OpenAI shape wants them right after the call).
fn push_turn(out: &mut Vec<ChatMessage>, turn: Value, i: usize) -> Result<(), GatewayError> {
    let at = format!("messages[{i}]");
    let Value::Object(mut turn) = turn else {
        return Err(bad(format!(
            "{at} must be an object with 'role' and 'content'"
        )));
    };
    let role = match turn.remove("role") {
        Some(Value::String(r)) if r == "user" => Role::User,
        Some(Value::String(r)) if r == "assistant" => Role::Assistant,
        _ => return Err(bad(format!("{at}.role must be \"user\" or \"assistant\""))),
    };
    let blocks = match turn.remove("content") {
        Some(Value::String(s)) => {
            out.push(ChatMessage::new(role, Content::Text(s)));
            return Ok(());
        }
        Some(Value::Array(blocks)) => blocks,
        _ => {
            return Err(bad(format!(
                "{at}.content must be a string or a list of content blocks"
            )));
        }
    };
    let mut parts = Vec::new();
    let mut calls = Vec::new();
    let mut results = Vec::new();
    let mut result_images = Vec::new();
    for (j, block) in blocks.iter().enumerate() {
        let at = format!("{at}.content[{j}]");
        match (block_type(block), &role) {
            (Some("text"), _) => parts.push(text_part(block, &at)?),
            (Some("image"), Role::User) => parts.push(image_part(block, &at)?),
            (Some("tool_use"), Role::Assistant) => {
                let Some(call) = wire::tool_call(block) else {
                    return Err(bad(format!("{at} needs a string id and name")));
                };
                if block.get("input").is_some_and(|i| !i.is_object()) {
                    return Err(bad(format!("{at}.input must be an object")));
                }
                calls.push(call);
            }
            (Some("tool_result"), Role::User) => {
                let Some(id) = block.get("tool_use_id").and_then(Value::as_str) else {
                    return Err(bad(format!("{at}.tool_use_id must be a string")));
                };
                let text = match block.get("content") {
                    None | Some(Value::Null) => String::new(),
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(inner)) => {
                        let mut text = Vec::new();
                        for (k, b) in inner.iter().enumerate() {
                            let at = format!("{at}.content[{k}]");
                            match block_type(b) {
                                Some("text") => text.push(
                                    b.get("text")
                                        .and_then(Value::as_str)
                                        .unwrap_or_default()
                                        .to_string(),
                                ),
                                // OpenAI's tool messages hold text: images follow as a user turn.
                                Some("image") => result_images.push(image_part(b, &at)?),
                                other => {
                                    return Err(bad(format!(
                                        "{at}: block type {other:?} is not supported in a tool_result"
                                    )));
                                }
                            }
                        }
                        text.join("\n")
                    }
                    Some(_) => {
                        return Err(bad(format!(
                            "{at}.content must be a string or a list of blocks"
                        )));
                    }
                };
                results.push(ChatMessage::tool_result(id, text));
            }
            // Reasoning from an earlier turn: the providers behind a translated Route cannot
            // check its signature, so it is not sent back.
            (Some("thinking" | "redacted_thinking"), Role::Assistant) => {}
            (Some(kind @ ("image" | "tool_use" | "tool_result")), _) => {
                return Err(bad(format!(
                    "{at}: a {kind} block cannot appear in a {} message",
                    role.as_str()
                )));
            }
            (Some(kind), _) => {
                return Err(bad(format!(
                    "{at}: content block type {kind:?} is not supported by the gateway (text, image, tool_use, tool_result are)"
                )));
            }
            (None, _) => return Err(bad(format!("{at} must be an object with a 'type'"))),
        }
    }
    out.extend(results);
    if !result_images.is_empty() {
        out.push(ChatMessage::new(Role::User, Content::Parts(result_images)));
    }
    if role == Role::Assistant {
        if parts.is_empty() && calls.is_empty() {
            return Ok(());
        }
        let content = if parts.is_empty() {
            Content::Empty
        } else {
            Content::Parts(parts)
        };
        let mut m = ChatMessage::new(Role::Assistant, content);
        m.tool_calls = calls;
        out.push(m);
    } else if !parts.is_empty() {
        out.push(ChatMessage::new(Role::User, Content::Parts(parts)));
    }
    Ok(())
}

/// Anthropic's custom tools as OpenAI function tools; a malformed definition is a 400.
fn take_tools(body: &mut Fields) -> Result<Vec<Value>, GatewayError> {
    let tools = match body.remove("tools") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(t)) => t,
        Some(_) => return Err(bad("'tools' must be a list of tool definitions")),
    };
    tools
        .iter()
        .enumerate()
        .map(|(i, t)| wire::function_tool(t).map_err(|e| bad(format!("tools[{i}]{e}"))))
        .collect()
}

/// Anthropic's structured output (`output_config.format`, a JSON schema) as OpenAI's `response_format`.
fn output_format(config: Option<Value>) -> Result<Option<Value>, GatewayError> {
    let format = match config {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(c)) => match c.get("format") {
            None | Some(Value::Null) => return Ok(None),
            Some(f) => f.clone(),
        },
        Some(_) => return Err(bad("'output_config' must be an object")),
    };
    match (
        format.get("type").and_then(Value::as_str),
        format.get("schema").filter(|s| s.is_object()),
    ) {
        (Some("json_schema"), Some(schema)) => Ok(Some(json!({"type": "json_schema",
            "json_schema": {"name": "output", "schema": schema, "strict": true}}))),
        _ => Err(bad(
            "output_config.format must be {\"type\": \"json_schema\", \"schema\": {...}}",
        )),
    }
}

/// Anthropic's message ids start `msg_`; another provider's id keeps its text after that prefix.
fn message_id(reported: Option<&str>) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    match reported.filter(|s| !s.is_empty()) {
        Some(id) if id.starts_with("msg_") => id.to_string(),
        Some(id) => format!("msg_{id}"),
        None => format!("msg_portcullis_{}", NEXT.fetch_add(1, Ordering::Relaxed)),
    }
}

/// A tool call's arguments as the object Anthropic's `input` is; text that is not a JSON object
/// (a provider's malformed arguments) is kept under `_raw` rather than lost.
fn tool_input(arguments: &str) -> Value {
    match serde_json::from_str::<Value>(arguments) {
        Ok(v @ Value::Object(_)) => v,
        _ if arguments.trim().is_empty() => json!({}),
        _ => json!({"_raw": arguments}),
    }
}

/// A non-streaming answer as an Anthropic message.
pub fn render(g: &Generation, configured_model: &str) -> Message {
    let choice = g.choices.first();
    let mut content = Vec::new();
    if let Some(c) = choice.filter(|c| !c.text.is_empty()) {
        content.push(wire::text_block(&c.text));
    }
    for call in choice.iter().flat_map(|c| &c.tool_calls) {
        content.push(wire::tool_use_block(call, tool_input(&call.arguments)));
    }
    if content.is_empty() {
        content.push(wire::text_block(""));
    }
    Message::assistant(
        message_id(Some(&g.id)),
        model_name(&g.model, configured_model),
        content,
        Some(wire::stop_reason(
            choice.and_then(|c| c.finish_reason.as_deref()),
        )),
        wire::Usage::reported(&g.usage),
    )
}

#[derive(Clone, Copy, PartialEq)]
enum Block {
    Text(u32),
    Tool(u32),
}

/// Unified deltas as Anthropic's stream: `message_start`, content blocks opened, filled and
/// stopped in order, then `message_delta` (stop reason, usage) and `message_stop`.
pub struct MessagesStream {
    fallback_model: String,
    started: bool,
    open: Option<Block>,
    next_block: u32,
    /// Unified tool-call index -> content block index and the call's id.
    tools: Vec<(u32, u32, String)>,
    finish: Option<String>,
    usage: Usage,
    /// `message_start` comes before any provider reports usage: it carries this estimate.
    input_estimate: u64,
}

impl MessagesStream {
    pub fn with_input_estimate(mut self, tokens: u64) -> Self {
        self.input_estimate = tokens;
        self
    }

    pub fn new(fallback_model: String) -> Self {
        MessagesStream {
            fallback_model,
            started: false,
            open: None,
            next_block: 0,
            tools: Vec::new(),
            finish: None,
            usage: Usage::default(),
            input_estimate: 0,
        }
    }

    fn start(&mut self, d: Option<&StreamDelta>, out: &mut BytesMut) {
        if self.started {
            return;
        }
        self.started = true;
        let model = d
            .and_then(|d| d.model.as_deref())
            .filter(|m| !m.is_empty())
            .unwrap_or(&self.fallback_model);
        let message = Message::assistant(
            message_id(d.and_then(|d| d.id.as_deref())),
            model,
            Vec::new(),
            None,
            wire::Usage {
                input_tokens: Some(self.input_estimate),
                output_tokens: Some(0),
                ..Default::default()
            },
        );
        push_event(out, &Event::MessageStart { message });
        push_event(out, &Event::Ping);
    }

    fn close(&mut self, out: &mut BytesMut) {
        if let Some(Block::Text(i) | Block::Tool(i)) = self.open.take() {
            push_event(out, &Event::ContentBlockStop { index: i.into() });
        }
    }

    fn open(&mut self, block: Value, out: &mut BytesMut) -> u32 {
        self.close(out);
        let index = self.next_block;
        self.next_block += 1;
        push_event(
            out,
            &Event::ContentBlockStart {
                index: index.into(),
                content_block: block,
            },
        );
        index
    }
}

impl Reframer for MessagesStream {
    fn deltas(&mut self, deltas: Vec<StreamDelta>, out: &mut BytesMut) {
        for d in deltas {
            self.start(Some(&d), out);
            // Anthropic's messages have one choice.
            if d.index != 0 {
                continue;
            }
            if let Some(text) = d.text.as_deref().filter(|t| !t.is_empty()) {
                let index = match self.open {
                    Some(Block::Text(i)) => i,
                    _ => {
                        let i = self.open(json!({"type": "text", "text": ""}), out);
                        self.open = Some(Block::Text(i));
                        i
                    }
                };
                push_event(
                    out,
                    &Event::ContentBlockDelta {
                        index: index.into(),
                        delta: Delta::TextDelta { text: text.into() },
                    },
                );
            }
            for call in &d.tool_calls {
                // A fragment continues its call unless it brings another id (some providers
                // repeat the id on every fragment).
                let known = self
                    .tools
                    .iter()
                    .find(|(t, _, id)| *t == call.index && call.id.as_ref().is_none_or(|c| c == id))
                    .map(|x| x.1);
                let index = match known {
                    Some(i) => i,
                    None => {
                        let id = call
                            .id
                            .clone()
                            .unwrap_or_else(|| format!("toolu_portcullis_{}", call.index));
                        let i = self.open(
                            json!({"type": "tool_use", "id": id, "name": call.name.clone().unwrap_or_default(), "input": {}}),
                            out,
                        );
                        self.open = Some(Block::Tool(i));
                        self.tools.retain(|(t, _, _)| *t != call.index);
                        self.tools.push((call.index, i, id));
                        i
                    }
                };
                if !call.arguments.is_empty() {
                    push_event(
                        out,
                        &Event::ContentBlockDelta {
                            index: index.into(),
                            delta: Delta::InputJsonDelta {
                                partial_json: call.arguments.clone(),
                            },
                        },
                    );
                }
            }
            if let Some(reason) = d.finish_reason {
                self.finish = Some(reason);
            }
            if let Some(u) = d.usage {
                self.usage = u;
            }
        }
    }

    fn failed(&mut self, err: &GatewayError, out: &mut BytesMut) {
        push_error(err, out);
    }

    fn end(&mut self, out: &mut BytesMut) {
        self.start(None, out);
        self.close(out);
        push_event(
            out,
            &Event::MessageDelta {
                delta: wire::MessageDelta {
                    stop_reason: Some(wire::stop_reason(self.finish.as_deref()).into()),
                    stop_sequence: None,
                },
                usage: Some(wire::Usage::reported(&Usage {
                    prompt_tokens: self.usage.prompt_tokens.or(Some(self.input_estimate)),
                    ..self.usage
                })),
            },
        );
        push_event(out, &Event::MessageStop);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::{Choice, ToolCall, ToolCallDelta};
    use crate::providers::ProviderError;

    fn body(v: Value) -> Fields {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    fn parse_ok(v: Value) -> ChatRequest {
        parse(body(v), PassOn::default(), true).unwrap_or_else(|e| panic!("{e}"))
    }

    fn parse_err(v: Value) -> String {
        parse(body(v), PassOn::default(), true)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn system_blocks_tools_and_turns_become_openai_shaped() {
        let chat = parse_ok(json!({
            "max_tokens": 64, "system": [{"type": "text", "text": "Be terse.", "cache_control": {"type": "ephemeral"}}],
            "temperature": 0.5, "top_k": 5, "stop_sequences": ["END"], "metadata": {"user_id": "u"},
            "tools": [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Weather?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}}]},
                {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "Sunny"}]},
                    {"type": "text", "text": "Thanks"}]}
            ]
        }));
        let roles: Vec<&str> = chat.messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["system", "user", "assistant", "tool", "user"]);
        // cache_control goes only to Anthropic backends.
        assert_eq!(
            chat.messages[0].content,
            json!([{"type": "text", "text": "Be terse."}])
        );
        assert_eq!(
            json!(chat.messages[1].content)[1],
            json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR"}})
        );
        assert_eq!(
            chat.messages[2].content,
            json!([{"type": "text", "text": "Checking."}])
        );
        assert_eq!(
            json!(chat.messages[2].tool_calls),
            json!([{"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}])
        );
        assert_eq!(chat.messages[3].content, json!("Sunny"));
        assert_eq!(chat.messages[3].tool_call_id.as_deref(), Some("toolu_1"));
        assert_eq!(chat.params.max_tokens, Some(64));
        assert_eq!(chat.params.stop, Some(vec!["END".to_string()]));
        assert_eq!(chat.extra["tools"][0]["function"]["name"], "get_weather");
        assert_eq!(
            chat.extra["tools"][0]["function"]["parameters"]["type"],
            "object"
        );
        assert_eq!(chat.extra["tool_choice"], "required");
        assert_eq!(chat.extra["parallel_tool_calls"], false);
        // top_k only where every backend reads it; metadata never (only Anthropic reads it).
        assert!(chat.extra.get("top_k").is_none() && chat.extra.get("metadata").is_none());
        let top_k = parse(
            body(json!({"max_tokens": 1, "top_k": 5, "messages": [{"role": "user", "content": "hi"}]})),
            PassOn {
                top_k: true,
                anthropic: false,
            },
            true,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(top_k.extra["top_k"], 5);
    }

    #[test]
    fn bad_bodies_are_refused_with_reasons() {
        let hi = json!([{"role": "user", "content": "hi"}]);
        assert!(parse_err(json!({"messages": hi})).contains("'max_tokens' is required"));
        assert!(parse(body(json!({"messages": hi})), PassOn::default(), false).is_ok());
        assert!(
            parse_err(json!({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "hologram"}]}]}))
                .contains("\"hologram\" is not supported")
        );
        assert!(
            parse_err(json!({"max_tokens": 5, "messages": hi, "tools": [{"name": "f", "input_schema": "x"}]}))
                .contains("input_schema")
        );
        assert!(
            parse_err(json!({"max_tokens": 5, "messages": hi, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}))
                .contains("custom tools")
        );
        assert!(
            parse_err(json!({"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}))
                .contains("role")
        );
        assert!(
            parse_err(json!({"max_tokens": 5, "messages": hi, "temperature": 1.5}))
                .contains("temperature")
        );
        assert!(parse_err(json!({"max_tokens": 5, "messages": []})).contains("at least one"));
        assert!(
            parse_err(json!({"max_tokens": 5, "messages": hi, "output_config": {"format": {"type": "json_schema"}}}))
                .contains("output_config.format")
        );
        let structured = parse_ok(json!({"max_tokens": 5, "messages": hi,
            "output_config": {"effort": "low", "format": {"type": "json_schema", "schema": {"type": "object"}}}}));
        assert_eq!(
            structured.extra["response_format"],
            json!({"type": "json_schema", "json_schema": {"name": "output", "schema": {"type": "object"}, "strict": true}})
        );
        assert!(
            parse_err(json!({"max_tokens": 5, "messages": [{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "x"}]}]}))
                .contains("cannot appear")
        );
    }

    #[test]
    fn answers_render_as_messages_with_tool_use() {
        let calls = ToolCall::openai_list(
            json!([{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]),
        );
        let g = Generation {
            id: "chatcmpl-1".into(),
            created: 0,
            model: String::new(),
            choices: vec![Choice {
                index: 0,
                text: String::new(),
                finish_reason: Some("tool_calls".into()),
                tool_calls: calls,
                message_extra: Map::new(),
            }],
            usage: Usage::new(Some(10), Some(3)),
        };
        let m = json!(render(&g, "gpt-4o-mini"));
        assert_eq!(m["type"], "message");
        assert_eq!(m["model"], "gpt-4o-mini");
        assert_eq!(m["stop_reason"], "tool_use");
        assert_eq!(
            m["content"],
            json!([{"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}}])
        );
        assert_eq!(m["usage"], json!({"input_tokens": 10, "output_tokens": 3}));
        assert_eq!(wire::stop_reason(Some("length")), "max_tokens");
        assert_eq!(wire::stop_reason(Some("stop")), "end_turn");
    }

    fn delta(text: Option<&str>, calls: Vec<ToolCallDelta>, finish: Option<&str>) -> StreamDelta {
        StreamDelta {
            id: Some("chatcmpl-9".into()),
            text: text.map(String::from),
            tool_calls: calls,
            finish_reason: finish.map(String::from),
            ..Default::default()
        }
    }

    #[test]
    fn streams_open_fill_and_stop_blocks_in_order() {
        let call = |index, id: Option<&str>, args: &str| ToolCallDelta {
            index,
            id: id.map(String::from),
            name: id.map(|_| "get_weather".to_string()),
            arguments: args.into(),
        };
        let events = super::super::reframe::run(
            MessagesStream::new("m".into()),
            vec![
                Ok(vec![
                    delta(Some("Let me "), vec![], None),
                    delta(Some("check."), vec![], None),
                ]),
                Ok(vec![delta(
                    None,
                    vec![call(0, Some("call_a"), ""), call(0, None, "{\"city\":")],
                    None,
                )]),
                Ok(vec![delta(None, vec![call(0, None, "\"Paris\"}")], None)]),
                Ok(vec![delta(
                    None,
                    vec![call(1, Some("call_b"), "{}")],
                    Some("tool_calls"),
                )]),
                Ok(vec![StreamDelta {
                    usage: Some(Usage::new(Some(7), Some(4))),
                    ..Default::default()
                }]),
            ],
        );
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "message_start",
                "ping",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(events[0].1["message"]["id"], "msg_chatcmpl-9");
        assert_eq!(
            events[6].1["content_block"],
            json!({"type": "tool_use", "id": "call_a", "name": "get_weather", "input": {}})
        );
        let json: String = events
            .iter()
            .filter(|(_, e)| e["index"] == 1 && e["delta"]["type"] == "input_json_delta")
            .filter_map(|(_, e)| e["delta"]["partial_json"].as_str())
            .collect();
        assert_eq!(json, "{\"city\":\"Paris\"}");
        assert_eq!(events[10].1["index"], 2);
        assert_eq!(events[13].1["delta"]["stop_reason"], "tool_use");
        assert_eq!(
            events[13].1["usage"],
            json!({"input_tokens": 7, "output_tokens": 4})
        );
    }

    #[test]
    fn a_call_whose_fragments_repeat_its_id_stays_one_block() {
        let frag = |args: &str| ToolCallDelta {
            index: 0,
            id: Some("call_x".into()),
            name: Some("f".into()),
            arguments: args.into(),
        };
        let events = super::super::reframe::run(
            MessagesStream::new("m".into()),
            vec![Ok(vec![
                delta(None, vec![frag("{\"a\"")], None),
                delta(None, vec![frag(":1}")], Some("tool_calls")),
            ])],
        );
        let starts = events
            .iter()
            .filter(|(n, _)| n == "content_block_start")
            .count();
        assert_eq!(starts, 1, "{events:?}");
    }

    #[test]
    fn native_requests_keep_the_body_and_check_only_what_the_gateway_reads() {
        let mut headers = HeaderMap::new();
        headers.insert("anthropic-beta", http::HeaderValue::from_static("b1"));
        let sent = json!({"max_tokens": 2048, "stream": true, "service_tier": "auto",
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "system": [{"type": "text", "text": "abcd", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": [
                {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjQK"}},
                {"type": "text", "text": "12345678"}]},
                {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "long-opaque-signature"}]}],
            "future_field": {"x": 1}});
        let native = native_request(body(sent.clone()), &headers).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(Value::Object(native.body), sent);
        assert!(native.stream);
        assert_eq!(native.max_tokens, Some(2048));
        assert_eq!(
            native.headers,
            [("anthropic-beta".to_string(), "b1".to_string())]
        );
        // Text is counted; base64 data and signatures are not.
        let counted = "text".len() * 2
            + "abcd".len()
            + "ephemeral".len()
            + "user".len()
            + "document".len()
            + "base64".len()
            + "application/pdf".len()
            + "12345678".len()
            + "assistant".len()
            + "thinking".len()
            + "hm".len();
        assert_eq!(native.prompt_chars, counted);
        let refused = |v: Value| {
            native_request(body(v), &HeaderMap::new())
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        let hi = json!([{"role": "user", "content": "hi"}]);
        assert!(refused(json!({"messages": hi})).contains("max_tokens"));
        assert!(
            refused(json!({"max_tokens": 5, "messages": hi, "stream": "yes"})).contains("stream")
        );
        assert!(refused(json!({"max_tokens": 5, "messages": []})).contains("messages"));
    }

    #[test]
    fn native_streams_are_written_as_they_came_and_end_in_an_error_when_cut() {
        let raw = |s: &'static str| StreamDelta {
            raw: Some(bytes::Bytes::from_static(s.as_bytes())),
            ..Default::default()
        };
        let events = super::super::reframe::run(
            Verbatim,
            vec![Ok(vec![
                raw("event: message_start\ndata: {\"type\":\"message_start\"}\n\n"),
                StreamDelta {
                    usage: Some(Usage::new(Some(1), Some(2))),
                    ..Default::default()
                },
                raw("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"),
            ])],
        );
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["message_start", "message_stop"]);
        let events = super::super::reframe::run(
            Verbatim,
            vec![
                Ok(vec![raw("event: ping\ndata: {\"type\":\"ping\"}\n\n")]),
                Err(GatewayError::UpstreamTruncated(
                    crate::api::Provider::Anthropic,
                )),
            ],
        );
        let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["ping", "error"]);
        assert_eq!(events[1].1["error"]["type"], "api_error");
    }

    #[test]
    fn a_cut_stream_ends_with_an_error_event_not_message_stop() {
        let events = super::super::reframe::run(
            MessagesStream::new("m".into()),
            vec![
                Ok(vec![delta(Some("Hel"), vec![], None)]),
                Err(GatewayError::UpstreamTruncated(
                    crate::api::Provider::Openai,
                )),
            ],
        );
        let (name, last) = events.last().cloned().unwrap_or_default();
        assert_eq!(name, "error");
        assert_eq!(last["error"]["type"], "api_error");
        assert!(
            events
                .iter()
                .all(|(n, _)| n != "message_stop" && n != "message_delta")
        );
        let limited = GatewayError::from_provider(ProviderError::Upstream {
            status: http::StatusCode::TOO_MANY_REQUESTS,
            message: "slow down".into(),
            retry_after: None,
        });
        let events =
            super::super::reframe::run(MessagesStream::new("m".into()), vec![Err(limited)]);
        assert_eq!(events[0].1["error"]["type"], "rate_limit_error");
    }
}
