//! The caller side of the MCP gateway: Streamable HTTP at `/mcp`, `/mcp/{name}` and
//! `/mcp/{namespace}/{name}`. One POST carries one JSON-RPC message; requests are answered with
//! JSON, or with SSE where the upstream streams (progress before a tool's result).

use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use rmcp::model::{ErrorCode, ProtocolVersion};
use serde_json::{Value, json};

use super::McpState;
use crate::access::{AuthError, Identity};
use crate::dataplane::admission;

use super::audit::CallRecord;
use super::jsonrpc::{self, RATE_LIMITED, UPSTREAM_FAILED};
use super::reply::{Reply, UpstreamError};
use super::session::{CallerSession, nonce};
use super::table::{self, Caller, DEFAULT_VIRTUAL_SERVER, ServerEntry};
use super::{McpGateway, wellknown};

const SESSION_HEADER: &str = "mcp-session-id";

/// The protocol versions with `initialize` the gateway speaks, newest first.
fn supported_versions() -> [ProtocolVersion; 3] {
    [
        ProtocolVersion::V_2025_11_25,
        ProtocolVersion::V_2025_06_18,
        ProtocolVersion::V_2025_03_26,
    ]
}

/// Which virtual server a path names.
pub struct Target {
    namespace: Option<String>,
    name: String,
}

pub async fn post_default(
    State(state): State<McpState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let target = Target {
        namespace: None,
        name: DEFAULT_VIRTUAL_SERVER.into(),
    };
    post(state, target, headers, body).await
}

pub async fn post_named(
    State(state): State<McpState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let target = Target {
        namespace: None,
        name,
    };
    post(state, target, headers, body).await
}

pub async fn post_qualified(
    State(state): State<McpState>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let target = Target {
        namespace: Some(namespace),
        name,
    };
    post(state, target, headers, body).await
}

/// No server-initiated stream is offered (the gateway sends nothing unasked).
pub async fn get() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [(header::ALLOW, HeaderValue::from_static("POST, DELETE"))],
    )
        .into_response()
}

pub async fn delete_default(State(state): State<McpState>, headers: HeaderMap) -> Response {
    let target = Target {
        namespace: None,
        name: DEFAULT_VIRTUAL_SERVER.into(),
    };
    delete(state, target, headers).await
}

pub async fn delete_named(
    State(state): State<McpState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let target = Target {
        namespace: None,
        name,
    };
    delete(state, target, headers).await
}

pub async fn delete_qualified(
    State(state): State<McpState>,
    Path((namespace, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let target = Target {
        namespace: Some(namespace),
        name,
    };
    delete(state, target, headers).await
}

/// The caller and the servers of the virtual server it may use.
struct Admitted {
    caller: Option<Identity>,
    /// The caller's Teams, for `team` access rules.
    teams: Vec<String>,
    consumer: String,
    namespace: String,
    servers: Vec<Arc<ServerEntry>>,
}

impl Admitted {
    fn who(&self) -> Caller<'_> {
        Caller {
            identity: self.caller.as_ref(),
            teams: &self.teams,
        }
    }

    fn visible_tool(
        &self,
        state: &McpState,
        prefixed: &str,
    ) -> Option<(&Arc<ServerEntry>, String)> {
        let (server, tool) = table::split(prefixed)?;
        let entry = self.servers.iter().find(|s| s.name == server)?;
        (entry.tool(tool).is_some()
            && entry.grants(state.app.auth.default_access, self.who(), tool))
        .then(|| (entry, tool.to_string()))
    }

    fn whole_server(&self, state: &McpState, name: &str) -> Option<&Arc<ServerEntry>> {
        self.servers
            .iter()
            .find(|s| s.name == name && s.grants_all(state.app.auth.default_access, self.who()))
    }
}

/// Why a message is refused before it reaches any server: one variant, one HTTP answer.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("authentication required: a ServiceAccount token or API key as a bearer token")]
    Unauthenticated,
    #[error("{0}")]
    InvalidToken(String),
    #[error("the caller's credential cannot be checked right now; retry")]
    AuthUnavailable,
    /// Missing, or not one the caller may use (answered alike).
    #[error("no MCP server {0}")]
    NoServer(String),
    #[error("missing Mcp-Session-Id: send initialize first")]
    MissingSession,
    /// 404 tells the client to start a new session.
    #[error("unknown MCP session: send initialize again")]
    UnknownSession,
}

impl Refusal {
    fn render(self, headers: &HeaderMap) -> Response {
        let status = match self {
            Refusal::Unauthenticated => return wellknown::unauthorized(headers, None),
            Refusal::InvalidToken(why) => return wellknown::unauthorized(headers, Some(why)),
            Refusal::AuthUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::NoServer(_) | Refusal::UnknownSession => StatusCode::NOT_FOUND,
            Refusal::MissingSession => StatusCode::BAD_REQUEST,
        };
        let code = match self {
            Refusal::AuthUnavailable => ErrorCode::INTERNAL_ERROR,
            _ => ErrorCode::INVALID_REQUEST,
        };
        jsonrpc::error(status, None, code, self.to_string(), None)
    }
}

async fn admit(state: &McpState, target: &Target) -> Result<Admitted, Refusal> {
    let caller = match admission::authenticate(&state.app).await {
        Err(AuthError::Invalid(why)) if why.is_token() => {
            return Err(Refusal::InvalidToken(why.to_string()));
        }
        Err(AuthError::Unavailable) => return Err(Refusal::AuthUnavailable),
        Ok(caller) => caller,
        Err(AuthError::Invalid(_)) => None,
    };
    let namespace = match (&target.namespace, &caller) {
        (Some(ns), _) => ns.clone(),
        (None, Some(Identity::ServiceAccount { namespace, .. }))
        | (None, Some(Identity::Consumer { namespace, .. })) => namespace.clone(),
        (None, None) => return Err(Refusal::Unauthenticated),
    };
    let default = state.app.auth.default_access;
    let teams: Vec<String> = caller
        .as_ref()
        .map(|c| state.app.table.load().teams.of(c))
        .unwrap_or_default()
        .iter()
        .map(|t| t.name.clone())
        .collect();
    let who = Caller {
        identity: caller.as_ref(),
        teams: &teams,
    };
    let servers: Vec<Arc<ServerEntry>> = state
        .gateway
        .table
        .load()
        .virtual_server(&namespace, &target.name)
        .unwrap_or_default()
        .iter()
        .filter(|s| {
            s.grants_all(default, who) || s.tools.iter().any(|t| s.grants(default, who, &t.name))
        })
        .cloned()
        .collect();
    if servers.is_empty() {
        // A virtual server the caller may not use answers like a missing one.
        return Err(match caller {
            None => Refusal::Unauthenticated,
            Some(_) => Refusal::NoServer(format!("{namespace}/{}", target.name)),
        });
    }
    let consumer = caller.as_ref().map(Identity::name).unwrap_or_default();
    Ok(Admitted {
        caller,
        teams,
        consumer,
        namespace,
        servers,
    })
}

/// The caller session a request continues, checked against who calls and where.
fn session_of(
    gateway: &McpGateway,
    headers: &HeaderMap,
    admitted: &Admitted,
    target: &Target,
) -> Result<CallerSession, Refusal> {
    let Some(id) = headers.get(SESSION_HEADER).and_then(|v| v.to_str().ok()) else {
        return Err(Refusal::MissingSession);
    };
    match gateway.sessions.open(id) {
        Some(s)
            if s.ns == admitted.namespace && s.vs == target.name && s.sub == admitted.consumer =>
        {
            Ok(s)
        }
        _ => Err(Refusal::UnknownSession),
    }
}

async fn post(state: McpState, target: Target, headers: HeaderMap, body: Body) -> Response {
    let admitted = match admit(&state, &target).await {
        Ok(a) => a,
        Err(refusal) => return refusal.render(&headers),
    };
    let gateway = &state.gateway;
    let bytes = match axum::body::to_bytes(body, gateway.max_request).await {
        Ok(b) => b,
        Err(_) => {
            return jsonrpc::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                None,
                ErrorCode::INVALID_REQUEST,
                format!("the message is larger than {} bytes", gateway.max_request),
                None,
            );
        }
    };
    let message: Value = match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Value::Object(m),
        Ok(Value::Array(_)) => {
            return jsonrpc::error(
                StatusCode::BAD_REQUEST,
                None,
                ErrorCode::INVALID_REQUEST,
                "JSON-RPC batches are not supported: send one message per request",
                None,
            );
        }
        _ => {
            return jsonrpc::error(
                StatusCode::BAD_REQUEST,
                None,
                ErrorCode::PARSE_ERROR,
                "the body is not a JSON-RPC message",
                None,
            );
        }
    };
    let id = message.get("id").cloned();
    let Some(method) = message.get("method").and_then(Value::as_str) else {
        // A response to a request of ours: the gateway sends none, so there is nothing to do.
        return StatusCode::ACCEPTED.into_response();
    };
    if method == "initialize" {
        return initialize(gateway, &admitted, &target, id.as_ref(), &message);
    }
    let session = match session_of(gateway, &headers, &admitted, &target) {
        Ok(s) => s,
        Err(refusal) => return refusal.render(&headers),
    };
    let Some(id) = id else {
        notification(&state, &admitted, &session, method, &message).await;
        return StatusCode::ACCEPTED.into_response();
    };
    match method {
        "ping" | "logging/setLevel" => jsonrpc::result(&id, json!({})),
        "tools/list" => tools_list(&state, &admitted, &id),
        "tools/call" => tools_call(&state, &admitted, &session, id, message, bytes.len()).await,
        "prompts/list" => {
            fan_out(&state, &admitted, &session, &id, "prompts/list", "prompts").await
        }
        "resources/list" => {
            fan_out(
                &state,
                &admitted,
                &session,
                &id,
                "resources/list",
                "resources",
            )
            .await
        }
        "resources/templates/list" => {
            fan_out(
                &state,
                &admitted,
                &session,
                &id,
                "resources/templates/list",
                "resourceTemplates",
            )
            .await
        }
        "prompts/get" => prompts_get(&state, &admitted, &session, id, message).await,
        "resources/read" => resources_read(&state, &admitted, &session, id, message).await,
        other => jsonrpc::error(
            StatusCode::OK,
            Some(&id),
            ErrorCode::METHOD_NOT_FOUND,
            format!(
                "method not found: {}",
                other.chars().take(64).collect::<String>()
            ),
            None,
        ),
    }
}

fn initialize(
    gateway: &McpGateway,
    admitted: &Admitted,
    target: &Target,
    id: Option<&Value>,
    message: &Value,
) -> Response {
    let Some(id) = id else {
        return jsonrpc::error(
            StatusCode::BAD_REQUEST,
            None,
            ErrorCode::INVALID_REQUEST,
            "initialize is a request: it needs an id",
            None,
        );
    };
    let asked = message["params"]["protocolVersion"]
        .as_str()
        .unwrap_or_default();
    // The caller's version when the gateway speaks it, else the newest the gateway speaks (the
    // caller then decides whether it can go on).
    let version = supported_versions()
        .into_iter()
        .find(|v| v.as_str() == asked)
        .unwrap_or(ProtocolVersion::LATEST_WITH_INITIALIZE);
    let session = CallerSession {
        v: version.as_str().to_string(),
        ns: admitted.namespace.clone(),
        vs: target.name.clone(),
        sub: admitted.consumer.clone(),
        n: nonce(),
    };
    let sealed = gateway.sessions.seal(&session);
    let mut response = jsonrpc::result(
        id,
        json!({
            "protocolVersion": version.as_str(),
            "capabilities": {
                "tools": {"listChanged": false},
                "prompts": {"listChanged": false},
                "resources": {"listChanged": false, "subscribe": false},
            },
            "serverInfo": {"name": "portcullis", "version": env!("CARGO_PKG_VERSION")},
            "instructions": format!(
                "Tools of several MCP servers, each named <server>{}<tool>.",
                table::SEPARATOR
            ),
        }),
    );
    if let Ok(value) = HeaderValue::from_str(&sealed) {
        response.headers_mut().insert(SESSION_HEADER, value);
    }
    response
}

async fn notification(
    state: &McpState,
    admitted: &Admitted,
    session: &CallerSession,
    method: &str,
    message: &Value,
) {
    // Cancellation reaches the upstream sessions this caller has on this replica (the request
    // it names went to one of them; the others ignore an id they do not know).
    if method == "notifications/cancelled" {
        let calls = admitted
            .servers
            .iter()
            .map(|s| state.gateway.upstreams.notify(s, &session.n, message));
        futures::future::join_all(calls).await;
    }
}

fn tools_list(state: &McpState, admitted: &Admitted, id: &Value) -> Response {
    let default = state.app.auth.default_access;
    let mut tools = Vec::new();
    for server in &admitted.servers {
        for tool in &server.tools {
            if server.grants(default, admitted.who(), &tool.name) {
                let mut shown = tool.clone();
                shown.name = table::prefixed(&server.name, &tool.name).into();
                tools.push(shown);
            }
        }
    }
    jsonrpc::result(id, json!({ "tools": tools }))
}

fn unknown(id: &Value, what: &str, name: &str) -> Response {
    jsonrpc::error(
        StatusCode::OK,
        Some(id),
        ErrorCode::INVALID_PARAMS,
        format!(
            "Unknown {what}: {}",
            name.chars().take(200).collect::<String>()
        ),
        None,
    )
}

async fn tools_call(
    state: &McpState,
    admitted: &Admitted,
    session: &CallerSession,
    id: Value,
    mut message: Value,
    request_bytes: usize,
) -> Response {
    let started = Instant::now();
    let name = param(&message, "name");
    // A tool the caller may not call is exactly as unknown as a missing one.
    let Some((server, tool)) = admitted.visible_tool(state, &name) else {
        return unknown(&id, "tool", &name);
    };
    let server = Arc::clone(server);
    let record = |outcome: &'static str, response_bytes: usize| CallRecord {
        caller: if admitted.consumer.is_empty() {
            "anonymous"
        } else {
            &admitted.consumer
        },
        server: &server.qualified,
        tool: &tool,
        outcome,
        duration: started.elapsed(),
        request_bytes,
        response_bytes,
    };
    let qualified_tool = format!("{}/{tool}", server.qualified);
    if let Err(limited) = state
        .app
        .limits
        .admit_tool(
            &qualified_tool,
            &server.limits_of(&tool),
            &admitted.consumer,
        )
        .await
    {
        record("rate_limited", 0).log(&state.app.metrics.mcp);
        let reset = crate::limits::utc_text(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs()
                + limited.retry_after,
        );
        return jsonrpc::error(
            StatusCode::OK,
            Some(&id),
            RATE_LIMITED,
            format!("{}; resets {reset}", limited.message),
            Some(json!({"retryAfterSeconds": limited.retry_after, "resetsAt": reset})),
        );
    }
    message["params"]["name"] = Value::String(tool.clone());
    if state.gateway.log_payloads {
        tracing::info!(server = %server.qualified, tool = %tool, arguments = %message["params"]["arguments"], "mcp tools/call arguments");
    }
    let deadline = tokio::time::Instant::now() + server.timeout;
    let reply = tokio::time::timeout_at(
        deadline,
        state
            .gateway
            .upstreams
            .request(&server, &session.n, &message),
    )
    .await
    .unwrap_or(Err(UpstreamError::Timeout));
    match reply {
        Err(e) => {
            record(e.outcome(), 0).log(&state.app.metrics.mcp);
            state.gateway.nudge.notify_one();
            upstream_failed(&id, &server, &e)
        }
        Ok(Reply::Json(answer)) => {
            let bytes = serde_json::to_vec(&answer).unwrap_or_default();
            record(outcome_of(&answer), bytes.len()).log(&state.app.metrics.mcp);
            if state.gateway.log_payloads {
                tracing::info!(server = %server.qualified, tool = %tool, result = %answer, "mcp tools/call result");
            }
            (
                StatusCode::OK,
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )],
                bytes,
            )
                .into_response()
        }
        Ok(Reply::Stream(stream)) => {
            let audit = StreamAudit {
                metrics: state.app.metrics.clone(),
                caller: if admitted.consumer.is_empty() {
                    "anonymous".into()
                } else {
                    admitted.consumer.clone()
                },
                server: Arc::clone(&server),
                tool,
                started,
                request_bytes,
                response_bytes: 0,
                outcome: None,
                log_payloads: state.gateway.log_payloads,
            };
            sse_response(stream, id, deadline, audit)
        }
    }
}

fn outcome_of(answer: &Value) -> &'static str {
    if answer.get("error").is_some() {
        "error"
    } else if answer["result"]["isError"].as_bool() == Some(true) {
        "tool_error"
    } else {
        "ok"
    }
}

fn upstream_failed(id: &Value, server: &ServerEntry, e: &UpstreamError) -> Response {
    tracing::debug!(server = %server.qualified, error = %e, "MCP upstream call failed");
    jsonrpc::error(
        StatusCode::OK,
        Some(id),
        UPSTREAM_FAILED,
        format!("MCP server {}: {e}", server.qualified),
        None,
    )
}

/// Records a streamed call once: at its response, or when the stream ends or is dropped.
struct StreamAudit {
    metrics: Arc<crate::telemetry::metrics::Metrics>,
    caller: String,
    server: Arc<ServerEntry>,
    tool: String,
    started: Instant,
    request_bytes: usize,
    response_bytes: usize,
    outcome: Option<&'static str>,
    log_payloads: bool,
}

impl Drop for StreamAudit {
    fn drop(&mut self) {
        CallRecord {
            caller: &self.caller,
            server: &self.server.qualified,
            tool: &self.tool,
            // Dropped before the result: the caller went away.
            outcome: self.outcome.unwrap_or("cancelled"),
            duration: self.started.elapsed(),
            request_bytes: self.request_bytes,
            response_bytes: self.response_bytes,
        }
        .log(&self.metrics.mcp);
    }
}

/// The upstream's SSE answer passed on event by event until the response to `id`; a deadline
/// or a broken stream ends it with a JSON-RPC error event instead.
fn sse_response(
    stream: super::reply::MessageStream,
    id: Value,
    deadline: tokio::time::Instant,
    audit: StreamAudit,
) -> Response {
    let events = futures::stream::unfold((stream, Some(audit)), move |(mut stream, audit)| {
        let id = id.clone();
        async move {
            let mut audit = audit?;
            let next = tokio::time::timeout_at(deadline, stream.next()).await;
            let (message, done) = match next {
                Ok(Some(Ok(message))) => {
                    let done = message.get("id") == Some(&id)
                        && (message.get("result").is_some() || message.get("error").is_some());
                    if done {
                        audit.outcome = Some(outcome_of(&message));
                        if audit.log_payloads {
                            tracing::info!(server = %audit.server.qualified, tool = %audit.tool, result = %message, "mcp tools/call result");
                        }
                    }
                    (message, done)
                }
                Ok(Some(Err(e))) => {
                    audit.outcome = Some(e.outcome());
                    (error_message(&id, &audit.server, &e), true)
                }
                Ok(None) => {
                    let e = UpstreamError::Closed;
                    audit.outcome = Some(e.outcome());
                    (error_message(&id, &audit.server, &e), true)
                }
                Err(_) => {
                    let e = UpstreamError::Timeout;
                    audit.outcome = Some(e.outcome());
                    (error_message(&id, &audit.server, &e), true)
                }
            };
            let event = jsonrpc::sse_event(&message);
            audit.response_bytes += event.len();
            let next_audit = if done { None } else { Some(audit) };
            // `audit` (when done) is dropped here, which records the call.
            Some((
                Ok::<Bytes, std::convert::Infallible>(event),
                (stream, next_audit),
            ))
        }
    });
    (
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        Body::from_stream(events),
    )
        .into_response()
}

fn error_message(id: &Value, server: &ServerEntry, e: &UpstreamError) -> Value {
    json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": {"code": UPSTREAM_FAILED.0, "message": format!("MCP server {}: {e}", server.qualified)},
    })
}

/// A list method asked of every server the caller may use whole, names (or URIs) prefixed by
/// their server. A server that fails is left out (and logged), not the whole answer.
async fn fan_out(
    state: &McpState,
    admitted: &Admitted,
    session: &CallerSession,
    id: &Value,
    method: &str,
    key: &str,
) -> Response {
    let default = state.app.auth.default_access;
    let servers: Vec<_> = admitted
        .servers
        .iter()
        .filter(|s| s.grants_all(default, admitted.who()))
        .collect();
    let request = json!({"jsonrpc": "2.0", "id": id, "method": method});
    let answers = futures::future::join_all(servers.iter().map(|server| {
        let request = &request;
        async move {
            let call = async {
                let reply = state
                    .gateway
                    .upstreams
                    .request(server, &session.n, request)
                    .await?;
                state.gateway.upstreams.answer(reply, id).await
            };
            let answer = tokio::time::timeout(server.timeout, call)
                .await
                .unwrap_or(Err(UpstreamError::Timeout));
            (server, answer)
        }
    }))
    .await;
    let mut items = Vec::new();
    for (server, answer) in answers {
        match answer {
            Ok(answer) => {
                let listed = answer["result"][key]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                items.extend(listed.into_iter().map(|mut item| {
                    rename(&mut item, &server.name);
                    item
                }));
            }
            // A server without prompts or resources says so with an error: not worth a warning.
            Err(e) => {
                tracing::debug!(server = %server.qualified, method, error = %e, "MCP list failed")
            }
        }
    }
    jsonrpc::result(id, json!({ key: items }))
}

/// Prefixes what names an item: a prompt's `name`, a resource's `uri` (`server+uri`: still a
/// URI, its scheme extended) and a template's `uriTemplate`.
fn rename(item: &mut Value, server: &str) {
    for (field, sep) in [
        ("name", table::SEPARATOR),
        ("uri", '+'),
        ("uriTemplate", '+'),
    ] {
        if field == "name" && (item.get("uri").is_some() || item.get("uriTemplate").is_some()) {
            continue; // a resource's name is a label, its uri the key
        }
        if let Some(v) = item.get(field).and_then(Value::as_str) {
            item[field] = Value::String(format!("{server}{sep}{v}"));
        }
    }
}

async fn prompts_get(
    state: &McpState,
    admitted: &Admitted,
    session: &CallerSession,
    id: Value,
    mut message: Value,
) -> Response {
    let name = param(&message, "name");
    let found = table::split(&name).and_then(|(s, p)| Some((admitted.whole_server(state, s)?, p)));
    let Some((server, prompt)) = found else {
        return unknown(&id, "prompt", &name);
    };
    message["params"]["name"] = Value::String(prompt.to_string());
    forward(state, server, session, id, message, |_| {}).await
}

async fn resources_read(
    state: &McpState,
    admitted: &Admitted,
    session: &CallerSession,
    id: Value,
    mut message: Value,
) -> Response {
    let uri = param(&message, "uri");
    let found = uri
        .split_once('+')
        .and_then(|(s, u)| Some((admitted.whole_server(state, s)?, u)));
    let Some((server, original)) = found else {
        return unknown(&id, "resource", &uri);
    };
    message["params"]["uri"] = Value::String(original.to_string());
    let name = server.name.clone();
    forward(state, server, session, id, message, move |answer| {
        if let Some(contents) = answer["result"]["contents"].as_array_mut() {
            for c in contents {
                rename(c, &name);
            }
        }
    })
    .await
}

/// One request to one server, its answer (adjusted by `fix`) returned as JSON.
async fn forward(
    state: &McpState,
    server: &Arc<ServerEntry>,
    session: &CallerSession,
    id: Value,
    message: Value,
    fix: impl FnOnce(&mut Value),
) -> Response {
    let call = async {
        let reply = state
            .gateway
            .upstreams
            .request(server, &session.n, &message)
            .await?;
        state.gateway.upstreams.answer(reply, &id).await
    };
    match tokio::time::timeout(server.timeout, call)
        .await
        .unwrap_or(Err(UpstreamError::Timeout))
    {
        Ok(mut answer) => {
            fix(&mut answer);
            jsonrpc::json(StatusCode::OK, &answer)
        }
        Err(e) => upstream_failed(&id, server, &e),
    }
}

async fn delete(state: McpState, target: Target, headers: HeaderMap) -> Response {
    let admitted = match admit(&state, &target).await {
        Ok(a) => a,
        Err(refusal) => return refusal.render(&headers),
    };
    match session_of(&state.gateway, &headers, &admitted, &target) {
        Ok(session) => {
            state
                .gateway
                .upstreams
                .close(&admitted.servers, &session.n)
                .await;
            StatusCode::OK.into_response()
        }
        Err(refusal) => refusal.render(&headers),
    }
}

/// A string parameter of a request (empty when absent or not a string), owned: the message is
/// rewritten after it is read.
fn param(message: &Value, field: &str) -> String {
    message["params"][field]
        .as_str()
        .unwrap_or_default()
        .to_string()
}
