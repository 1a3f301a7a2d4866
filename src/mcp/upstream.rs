//! Upstream MCP servers over Streamable HTTP: initialize, requests with JSON or SSE answers,
//! notifications, and the bounded set of upstream sessions this replica holds.
//!
//! An upstream session belongs to one caller session (keyed by its nonce) on this replica, so two
//! callers never share a server-side session. It is opened on first use and re-opened once,
//! transparently, when the server answers 404 (its session expired). The set is capped: the least
//! recently used session is closed to make room.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http::{HeaderValue, StatusCode};
use parking_lot::Mutex;
use rmcp::model::{ProtocolVersion, Tool};
use serde_json::{Value, json};

use crate::providers::sse::{SseEvent, SseParser};

use super::legacy::{self, LegacySession};
use super::reply::{MessageStream, Reply, UpstreamError};
use super::table::{Credential, ServerEntry};

const SESSION_HEADER: &str = "mcp-session-id";
const VERSION_HEADER: &str = "mcp-protocol-version";
/// Pages of `tools/list` read at discovery, and tools kept: a server cannot make the table huge.
const MAX_PAGES: usize = 20;
pub const MAX_TOOLS: usize = 1000;

#[derive(Clone)]
struct Opened {
    id: Option<HeaderValue>,
    version: HeaderValue,
    used: Instant,
    /// The event stream of a server on the older HTTP+SSE transport.
    legacy: Option<Arc<LegacySession>>,
}

/// What discovery learnt from a server.
#[derive(Debug, Clone)]
pub struct Discovery {
    pub version: String,
    pub tools: Vec<Tool>,
}

pub struct Upstreams {
    http: reqwest::Client,
    sessions: Mutex<HashMap<(String, String), Opened>>,
    max_sessions: usize,
    /// Largest answer (a JSON body or one SSE event) read.
    pub max_body: usize,
}

impl Upstreams {
    pub fn new(http: reqwest::Client, max_sessions: usize, max_body: usize) -> Upstreams {
        Upstreams {
            http,
            sessions: Mutex::new(HashMap::new()),
            max_sessions: max_sessions.max(1),
            max_body,
        }
    }

    /// Sends `request` (a JSON-RPC request) in the caller session `nonce`, opening or re-opening
    /// its upstream session as needed.
    pub async fn request(
        &self,
        server: &ServerEntry,
        nonce: &str,
        request: &Value,
    ) -> Result<Reply, UpstreamError> {
        let key = (server.qualified.clone(), nonce.to_string());
        let known = self.sessions.lock().get_mut(&key).map(|o| {
            o.used = Instant::now();
            o.clone()
        });
        let session = match known {
            // An HTTP+SSE session whose stream closed is gone: open a new one.
            Some(s) if s.legacy.as_ref().is_some_and(|l| !l.is_open()) => {
                self.sessions.lock().remove(&key);
                self.open(server, &key).await?
            }
            Some(s) => s,
            None => self.open(server, &key).await?,
        };
        match self.send(server, Some(&session), request).await {
            Err(UpstreamError::Status(404)) if session.id.is_some() => {
                // The server forgot the session (restart, idle expiry): open a new one, once.
                self.sessions.lock().remove(&key);
                let session = self.open(server, &key).await?;
                self.send(server, Some(&session), request).await
            }
            other => other,
        }
    }

    /// Sends a notification in the caller session `nonce` if it has an upstream session here.
    pub async fn notify(&self, server: &ServerEntry, nonce: &str, notification: &Value) {
        let key = (server.qualified.clone(), nonce.to_string());
        let Some(session) = self.sessions.lock().get(&key).cloned() else {
            return;
        };
        let _ = self.send(server, Some(&session), notification).await;
    }

    /// Closes the caller session's upstream sessions on this replica.
    pub async fn close(&self, servers: &[std::sync::Arc<ServerEntry>], nonce: &str) {
        for server in servers {
            let key = (server.qualified.clone(), nonce.to_string());
            let removed = self.sessions.lock().remove(&key);
            if let Some(Opened { id: Some(id), .. }) = removed {
                self.delete(server, id).await;
            }
        }
    }

    /// Upstream sessions held now.
    pub fn open_sessions(&self) -> usize {
        self.sessions.lock().len()
    }

    async fn open(
        &self,
        server: &ServerEntry,
        key: &(String, String),
    ) -> Result<Opened, UpstreamError> {
        let (opened, _) = self.initialize(server).await?;
        let evicted = {
            let mut sessions = self.sessions.lock();
            let evicted = if sessions.len() >= self.max_sessions && !sessions.contains_key(key) {
                let oldest = sessions
                    .iter()
                    .min_by_key(|(_, o)| o.used)
                    .map(|(k, _)| k.clone());
                oldest.and_then(|k| sessions.remove(&k).map(|o| (k, o)))
            } else {
                None
            };
            sessions.insert(key.clone(), opened.clone());
            evicted
        };
        if let Some(((qualified, _), Opened { id: Some(id), .. })) = evicted
            && qualified == server.qualified
        {
            self.delete(server, id).await;
        }
        Ok(opened)
    }

    /// initialize + notifications/initialized. Returns the session and the initialize result.
    async fn initialize(&self, server: &ServerEntry) -> Result<(Opened, Value), UpstreamError> {
        if server.legacy_sse {
            return self.initialize_legacy(server).await;
        }
        let request = json!({
            "jsonrpc": "2.0",
            "id": 0,
            "method": "initialize",
            "params": {
                "protocolVersion": ProtocolVersion::LATEST_WITH_INITIALIZE.as_str(),
                "capabilities": {},
                "clientInfo": {"name": "portcullis", "version": env!("CARGO_PKG_VERSION")},
            }
        });
        let response = self.post(server, None, &request).await?;
        let id = response.headers().get(SESSION_HEADER).cloned();
        let answer = self.collect(response, &json!(0)).await?;
        if let Some(error) = answer.get("error") {
            let message = error["message"].as_str().unwrap_or("no message");
            return Err(UpstreamError::Initialize(
                message.chars().take(200).collect(),
            ));
        }
        let result = answer.get("result").cloned().unwrap_or(Value::Null);
        let version = result["protocolVersion"]
            .as_str()
            .and_then(|v| HeaderValue::from_str(v).ok())
            .ok_or(UpstreamError::Malformed(
                "initialize result without protocolVersion",
            ))?;
        let opened = Opened {
            id,
            version,
            used: Instant::now(),
            legacy: None,
        };
        let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        self.send(server, Some(&opened), &initialized).await?;
        Ok((opened, result))
    }

    async fn initialize_legacy(
        &self,
        server: &ServerEntry,
    ) -> Result<(Opened, Value), UpstreamError> {
        let get = self.authorize(server, self.http.get(&server.url)).await?;
        let stream = LegacySession::open(server, get, self.max_body).await?;
        let mut opened = Opened {
            id: None,
            version: HeaderValue::from_static("2024-11-05"),
            used: Instant::now(),
            legacy: Some(Arc::new(stream)),
        };
        let request = legacy::initialize_request();
        let reply = self.send(server, Some(&opened), &request).await?;
        let answer = self.answer(reply, &json!(0)).await?;
        if let Some(error) = answer.get("error") {
            let message = error["message"].as_str().unwrap_or("no message");
            return Err(UpstreamError::Initialize(
                message.chars().take(200).collect(),
            ));
        }
        let result = answer.get("result").cloned().unwrap_or(Value::Null);
        if let Some(v) = result["protocolVersion"]
            .as_str()
            .and_then(|v| HeaderValue::from_str(v).ok())
        {
            opened.version = v;
        }
        let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        self.send(server, Some(&opened), &initialized).await?;
        Ok((opened, result))
    }

    /// A throwaway session that lists the server's tools (every page, bounded).
    pub async fn discover(&self, server: &ServerEntry) -> Result<Discovery, UpstreamError> {
        let (session, result) = self.initialize(server).await?;
        let version = result["protocolVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let mut tools = Vec::new();
        let mut cursor: Option<String> = None;
        let mut outcome = Ok(());
        for page in 0..MAX_PAGES {
            let mut request = json!({"jsonrpc": "2.0", "id": page + 1, "method": "tools/list"});
            if let Some(c) = &cursor {
                request["params"] = json!({"cursor": c});
            }
            let answer = match self.send(server, Some(&session), &request).await {
                Ok(reply) => self.answer(reply, &request["id"]).await,
                Err(e) => Err(e),
            };
            let answer = match answer {
                Ok(a) => a,
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            };
            let Some(listed) = answer["result"]["tools"].as_array() else {
                outcome = Err(UpstreamError::Malformed("tools/list without tools"));
                break;
            };
            tools.extend(
                listed
                    .iter()
                    .filter_map(|t| serde_json::from_value::<Tool>(t.clone()).ok()),
            );
            cursor = answer["result"]["nextCursor"].as_str().map(str::to_string);
            if cursor.is_none() || tools.len() >= MAX_TOOLS {
                break;
            }
        }
        if let Some(id) = session.id {
            self.delete(server, id).await;
        }
        outcome?;
        tools.truncate(MAX_TOOLS);
        Ok(Discovery { version, tools })
    }

    /// The response message to `id` from a reply (an SSE answer read until it comes).
    pub async fn answer(&self, reply: Reply, id: &Value) -> Result<Value, UpstreamError> {
        match reply {
            Reply::Json(v) => Ok(v),
            Reply::Stream(mut s) => {
                while let Some(message) = s.next().await {
                    let message = message?;
                    if is_response_to(&message, id) {
                        return Ok(message);
                    }
                }
                Err(UpstreamError::Closed)
            }
        }
    }

    async fn send(
        &self,
        server: &ServerEntry,
        session: Option<&Opened>,
        message: &Value,
    ) -> Result<Reply, UpstreamError> {
        if let Some(legacy) = session.and_then(|s| s.legacy.as_ref()) {
            // Answers come on the event stream: register before posting, so none is missed.
            let reply = legacy.expect(message);
            if let Err(e) = self.post_to(server, legacy.endpoint(), None, message).await {
                legacy.abandon(message);
                return Err(e);
            }
            return Ok(reply.unwrap_or(Reply::Json(Value::Null)));
        }
        let response = self.post(server, session, message).await?;
        if message.get("id").is_none() {
            // A notification: 202 and no body.
            return Ok(Reply::Json(Value::Null));
        }
        self.reply(response).await
    }

    async fn post(
        &self,
        server: &ServerEntry,
        session: Option<&Opened>,
        message: &Value,
    ) -> Result<reqwest::Response, UpstreamError> {
        self.post_to(server, &server.url, session, message).await
    }

    async fn post_to(
        &self,
        server: &ServerEntry,
        url: &str,
        session: Option<&Opened>,
        message: &Value,
    ) -> Result<reqwest::Response, UpstreamError> {
        let body = serde_json::to_vec(message).map_err(|_| UpstreamError::Malformed("body"))?;
        let mut request = self
            .http
            .post(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json, text/event-stream")
            .body(body);
        if let Some(s) = session {
            request = request.header(VERSION_HEADER, s.version.clone());
            if let Some(id) = &s.id {
                request = request.header(SESSION_HEADER, id.clone());
            }
        }
        request = self.authorize(server, request).await?;
        let response = request.send().await.map_err(|e| {
            if e.is_timeout() {
                UpstreamError::Timeout
            } else {
                UpstreamError::Unreachable
            }
        })?;
        match response.status() {
            s if s.is_success() => Ok(response),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                if let Credential::OAuth(tokens) = &server.credential {
                    // Revoked early, perhaps: the next call fetches a new token.
                    tokens.forget().await;
                }
                Err(UpstreamError::Unauthorized(response.status().as_u16()))
            }
            s => Err(UpstreamError::Status(s.as_u16())),
        }
    }

    async fn reply(&self, response: reqwest::Response) -> Result<Reply, UpstreamError> {
        let sse = response
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        let max = self.max_body;
        if sse {
            return Ok(Reply::Stream(sse_messages(response.bytes_stream(), max)));
        }
        let body = read_capped(response, max).await?;
        serde_json::from_slice::<Value>(&body)
            .map(Reply::Json)
            .map_err(|_| UpstreamError::Malformed("a body that is not JSON"))
    }

    /// Sends `request` and returns its response message, whatever the transport's framing.
    async fn collect(
        &self,
        response: reqwest::Response,
        id: &Value,
    ) -> Result<Value, UpstreamError> {
        let reply = self.reply(response).await?;
        self.answer(reply, id).await
    }

    async fn delete(&self, server: &ServerEntry, id: HeaderValue) {
        let request = self.http.delete(&server.url).header(SESSION_HEADER, id);
        let Ok(request) = self.authorize(server, request).await else {
            return;
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), request.send()).await;
    }

    /// The server's credential on `request`.
    async fn authorize(
        &self,
        server: &ServerEntry,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::RequestBuilder, UpstreamError> {
        Ok(match &server.credential {
            Credential::None => request,
            Credential::Header(name, value) => request.header(name.clone(), value.clone()),
            Credential::OAuth(tokens) => request.header(
                http::header::AUTHORIZATION,
                tokens.header(&self.http).await?,
            ),
        })
    }
}

fn is_response_to(message: &Value, id: &Value) -> bool {
    message.get("id") == Some(id)
        && (message.get("result").is_some() || message.get("error").is_some())
}

async fn read_capped(response: reqwest::Response, max: usize) -> Result<Bytes, UpstreamError> {
    let mut body = Vec::new();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|_| UpstreamError::Closed)?;
        if body.len() + chunk.len() > max {
            return Err(UpstreamError::TooLarge(max));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(body))
}

/// The JSON-RPC messages of an SSE body, each event at most `max` bytes.
fn sse_messages(
    body: impl Stream<Item = reqwest::Result<Bytes>> + Send + 'static,
    max: usize,
) -> MessageStream {
    let mut parser = SseParser::default();
    parser.set_max_frame(max);
    let state = (
        Box::pin(body),
        parser,
        std::collections::VecDeque::<SseEvent>::new(),
        false,
    );
    Box::pin(futures::stream::unfold(
        state,
        move |(mut body, mut parser, mut queue, mut done)| async move {
            loop {
                if let Some(event) = queue.pop_front() {
                    if event.data.is_empty() {
                        continue;
                    }
                    let message = serde_json::from_str::<Value>(&event.data)
                        .map_err(|_| UpstreamError::Malformed("an SSE event that is not JSON"));
                    return Some((message, (body, parser, queue, done)));
                }
                if done {
                    return None;
                }
                let mut events = Vec::new();
                match body.next().await {
                    Some(Ok(chunk)) => {
                        if parser.feed(&chunk, &mut events).is_err() {
                            done = true;
                            return Some((
                                Err(UpstreamError::TooLarge(max)),
                                (body, parser, queue, done),
                            ));
                        }
                    }
                    Some(Err(_)) => {
                        done = true;
                        return Some((Err(UpstreamError::Closed), (body, parser, queue, done)));
                    }
                    None => {
                        done = true;
                        let _ = parser.finish(&mut events);
                    }
                }
                queue.extend(events);
            }
        },
    ))
}
