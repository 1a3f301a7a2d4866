//! The older HTTP+SSE transport (protocol 2024-11-05), toward upstreams that only have it: a GET
//! opens an event stream whose first `endpoint` event names where to POST messages; answers come
//! back on that stream. A reader task hands each answer to the request waiting for its id (and a
//! progress notification to the request that asked with its token), so callers see the same
//! `Reply::Stream` as from a Streamable HTTP server.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::providers::sse::SseParser;

use super::reply::{Reply, UpstreamError};
use super::table::ServerEntry;

/// Messages queued for one waiting request before the reader waits for it.
const QUEUE: usize = 64;
/// How long the server has to name its message endpoint.
const ENDPOINT_DEADLINE: Duration = Duration::from_secs(10);

type Waiters = Arc<Mutex<HashMap<String, mpsc::Sender<Value>>>>;

/// One open HTTP+SSE session; dropping it closes the stream.
pub struct LegacySession {
    endpoint: String,
    waiters: Waiters,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for LegacySession {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn key(v: &Value) -> String {
    v.to_string()
}

impl LegacySession {
    /// Opens the event stream and waits for the endpoint event.
    pub async fn open(
        server: &ServerEntry,
        get: reqwest::RequestBuilder,
        max_event: usize,
    ) -> Result<LegacySession, UpstreamError> {
        let response = get
            .header(http::header::ACCEPT, "text/event-stream")
            .send()
            .await
            .map_err(|_| UpstreamError::Unreachable)?;
        match response.status().as_u16() {
            200..=299 => {}
            s @ (401 | 403) => return Err(UpstreamError::Unauthorized(s)),
            s => return Err(UpstreamError::Status(s)),
        }
        let mut body = response.bytes_stream();
        let mut parser = SseParser::default();
        parser.set_max_frame(max_event);
        let mut events = Vec::new();
        let endpoint = tokio::time::timeout(ENDPOINT_DEADLINE, async {
            loop {
                if let Some(i) = events
                    .iter()
                    .position(|e: &crate::providers::sse::SseEvent| {
                        e.event.as_deref() == Some("endpoint")
                    })
                {
                    let e = events.remove(i);
                    return Ok(e.data);
                }
                match body.next().await {
                    Some(Ok(chunk)) => parser
                        .feed(&chunk, &mut events)
                        .map_err(|_| UpstreamError::TooLarge(max_event))?,
                    _ => return Err(UpstreamError::Closed),
                }
            }
        })
        .await
        .map_err(|_| UpstreamError::Timeout)??;
        let endpoint = reqwest::Url::parse(&server.url)
            .and_then(|base| base.join(endpoint.trim()))
            .map_err(|_| UpstreamError::Malformed("an endpoint event that is not a URL"))?;
        // The endpoint must be on the server's own origin: the credential goes there too.
        let base = reqwest::Url::parse(&server.url)
            .map_err(|_| UpstreamError::Malformed("the server URL"))?;
        if endpoint.origin() != base.origin() {
            return Err(UpstreamError::Malformed(
                "an endpoint on another origin than the server's",
            ));
        }
        let waiters: Waiters = Arc::default();
        let reader = tokio::spawn(read(body, parser, events, Arc::clone(&waiters)));
        Ok(LegacySession {
            endpoint: endpoint.to_string(),
            waiters,
            reader,
        })
    }

    /// Whether the event stream is still open.
    pub fn is_open(&self) -> bool {
        !self.reader.is_finished()
    }

    /// Where messages are POSTed.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Registers `message` (a request) for its answers; the returned reply ends with its response.
    pub fn expect(&self, message: &Value) -> Option<Reply> {
        let id = message.get("id")?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let mut waiters = self.waiters.lock();
        waiters.insert(key(id), tx.clone());
        if let Some(token) = message["params"]["_meta"].get("progressToken") {
            waiters.insert(format!("progress:{}", key(token)), tx);
        }
        let stream =
            futures::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|m| (Ok(m), rx)) },
            );
        Some(Reply::Stream(Box::pin(stream)))
    }

    /// Forgets a request that was never sent.
    pub fn abandon(&self, message: &Value) {
        if let Some(id) = message.get("id") {
            self.waiters.lock().remove(&key(id));
        }
        if let Some(token) = message["params"]["_meta"].get("progressToken") {
            self.waiters
                .lock()
                .remove(&format!("progress:{}", key(token)));
        }
    }
}

/// The initialize request this gateway sends over the older transport.
pub fn initialize_request() -> Value {
    json!({
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": "2024-11-05",
            "capabilities": {},
            "clientInfo": {"name": "portcullis", "version": env!("CARGO_PKG_VERSION")},
        }
    })
}

async fn read(
    mut body: impl futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin,
    mut parser: SseParser,
    mut events: Vec<crate::providers::sse::SseEvent>,
    waiters: Waiters,
) {
    loop {
        for event in events.drain(..) {
            if event.event.as_deref().is_some_and(|e| e != "message") {
                continue;
            }
            let Ok(message) = serde_json::from_str::<Value>(&event.data) else {
                continue;
            };
            let answer = message.get("result").is_some() || message.get("error").is_some();
            let target = match (message.get("id"), answer) {
                (Some(id), true) => {
                    let mut waiting = waiters.lock();
                    let tx = waiting.remove(&key(id));
                    // Its progress entry goes too, so the request's stream ends after the answer.
                    if let Some(tx) = &tx {
                        waiting.retain(|_, t| !t.same_channel(tx));
                    }
                    tx
                }
                _ => message["params"]
                    .get("progressToken")
                    .and_then(|t| waiters.lock().get(&format!("progress:{}", key(t))).cloned()),
            };
            if let Some(tx) = target {
                // A caller that went away: its answer is dropped.
                let _ = tx.send(message).await;
            }
        }
        match body.next().await {
            Some(Ok(chunk)) => {
                if parser.feed(&chunk, &mut events).is_err() {
                    break;
                }
            }
            _ => break,
        }
    }
    // The stream ended: every waiting request ends with it (its reply stream closes).
    waiters.lock().clear();
}
