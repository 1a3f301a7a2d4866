//! Simulated LLM providers. Only the providers are simulated in Portcullis tests: each one here
//! answers in its provider's documented wire format and records every request it receives, so
//! tests can assert on exactly what the gateway sent upstream.

mod anthropic;
mod azure;
mod bedrock;
mod cohere;
mod databricks;
mod gemini;
mod mcp;
mod mlflow;
mod openai;
mod vllm;
pub use vllm::{ModelServer, ModelServerConfig};

pub use bedrock::encode_frame;
pub use gemini::thought_signature;
pub use openai::embed;
mod tgi;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use parking_lot::Mutex;
use serde_json::Value;

/// One request as the simulated provider received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl RecordedRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// How the provider misbehaves for the next requests (until changed).
#[derive(Clone, Debug, Default)]
pub enum Fault {
    #[default]
    None,
    /// Answer with this status and raw body (and `Retry-After` when given).
    Status {
        status: u16,
        body: String,
        retry_after: Option<u64>,
    },
    /// Answer with this status, raw body and extra headers (a provider's rate-limit headers).
    StatusWithHeaders {
        status: u16,
        body: String,
        headers: Vec<(String, String)>,
    },
    /// Wait this long before answering.
    Delay(Duration),
    /// Answer 200 with a body that is not the provider's format.
    Malformed,
    /// Streams: send this many frames, then break the connection (no end marker, no clean end).
    CutStream { after_frames: usize },
    /// Streams: send this many frames, then end the body cleanly without the end marker.
    EndStream { after_frames: usize },
    /// Streams: send this many frames, then go quiet for an hour.
    StallStream { after_frames: usize },
}

#[derive(Clone, Debug)]
pub struct Behaviour {
    pub fault: Fault,
    /// Pause between streamed chunks.
    pub chunk_delay: Duration,
    /// Words in a streamed or plain answer (each streamed word is one chunk).
    pub answer_words: usize,
    /// OpenAI: answer with exactly this text instead, streamed one piece per chunk (so a test
    /// decides where a value is split); a plain answer is the pieces joined.
    pub script: Option<Vec<String>>,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            fault: Fault::None,
            chunk_delay: Duration::ZERO,
            answer_words: 20,
            script: None,
        }
    }
}

#[derive(Default)]
pub struct Shared {
    pub requests: Mutex<Vec<RecordedRequest>>,
    pub behaviour: Mutex<Behaviour>,
    /// Recording costs a copy per request; the benchmark turns it off.
    pub record: std::sync::atomic::AtomicBool,
    /// When set, the Bedrock simulation verifies SigV4 signatures made with this secret key.
    pub aws_secret: Mutex<Option<String>>,
    /// Streams whose client went away before the last chunk.
    pub cancelled_streams: std::sync::atomic::AtomicUsize,
}

/// Every simulated provider, by its `spec.model.provider` value.
pub const PROVIDERS: [&str; 16] = [
    "openai",
    "azure-openai",
    "anthropic",
    "cohere",
    "gemini",
    "bedrock",
    "mistral",
    "huggingface-tgi",
    "databricks-model-serving",
    "mlflow-model-serving",
    "ai21",
    "together",
    "groq",
    "deepseek",
    "ollama",
    "openai-compatible",
];

/// A running simulated provider on loopback.
pub struct SimProvider {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: Mutex<tokio::task::JoinHandle<()>>,
}

impl SimProvider {
    /// Starts every simulated provider on one loopback port; each lives under its own path prefix.
    pub async fn start() -> std::io::Result<SimProvider> {
        Self::start_on("127.0.0.1:0".parse().map_err(std::io::Error::other)?, true).await
    }

    pub async fn start_on(addr: SocketAddr, record: bool) -> std::io::Result<SimProvider> {
        let shared = Arc::new(Shared::default());
        shared
            .record
            .store(record, std::sync::atomic::Ordering::Relaxed);
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(serve(listener, router(shared.clone())));
        Ok(SimProvider {
            addr,
            shared,
            task: Mutex::new(task),
        })
    }

    /// Stops answering at once, as a crashed provider does: the listener closes (new connections
    /// are refused) and every open connection is dropped mid-request.
    pub fn kill(&self) {
        self.task.lock().abort();
    }

    /// Serves again on the same address after `kill`.
    pub async fn restart(&self) -> std::io::Result<()> {
        self.kill();
        let mut tries = 0;
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                // The aborted task may take a moment to drop the old listener.
                Err(_) if tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e),
            }
        };
        *self.task.lock() = tokio::spawn(serve(listener, router(self.shared.clone())));
        Ok(())
    }

    /// Base URL of the OpenAI simulation, as a Route's `apiBase`.
    pub fn openai_base(&self) -> String {
        format!("http://{}/openai/v1", self.addr)
    }

    /// Base URL of the simulation of `provider` (a `spec.model.provider` value), as a Route's `apiBase`.
    pub fn base(&self, provider: &str) -> String {
        let path = match provider {
            "openai" => "/openai/v1",
            "azure-openai" => "/azure",
            "anthropic" => "/anthropic",
            "cohere" => "/cohere",
            "gemini" => "/gemini",
            "bedrock" => "/bedrock",
            "huggingface-tgi" => "/tgi",
            "databricks-model-serving" => "/databricks",
            "mlflow-model-serving" => "/mlflow/generator",
            "mistral" => "/mistral/v1",
            "ai21" => "/ai21/studio/v1",
            "together" => "/together/v1",
            "groq" => "/groq/openai/v1",
            "deepseek" => "/deepseek",
            "ollama" => "/ollama/v1",
            _ => "/compatible/v1",
        };
        format!("http://{}{path}", self.addr)
    }

    pub fn anthropic_base(&self) -> String {
        self.base("anthropic")
    }

    pub fn azure_base(&self) -> String {
        self.base("azure-openai")
    }

    pub fn cohere_base(&self) -> String {
        self.base("cohere")
    }

    pub fn gemini_base(&self) -> String {
        self.base("gemini")
    }

    pub fn bedrock_base(&self) -> String {
        self.base("bedrock")
    }

    pub fn tgi_base(&self) -> String {
        self.base("huggingface-tgi")
    }

    pub fn databricks_base(&self) -> String {
        self.base("databricks-model-serving")
    }

    pub fn mlflow_base(&self) -> String {
        self.base("mlflow-model-serving")
    }

    /// The MLflow scoring server that hosts an embedding model.
    pub fn mlflow_embedder_base(&self) -> String {
        format!("http://{}/mlflow/embedder", self.addr)
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests.lock().clone()
    }

    pub fn last_request(&self) -> Option<RecordedRequest> {
        self.shared.requests.lock().last().cloned()
    }

    /// How many streamed answers were cut off by the client closing the connection.
    pub fn cancelled_streams(&self) -> usize {
        self.shared
            .cancelled_streams
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn clear(&self) {
        self.shared.requests.lock().clear();
    }

    pub fn set_fault(&self, fault: Fault) {
        self.shared.behaviour.lock().fault = fault;
    }

    /// Makes the Bedrock simulation check signatures against this secret access key, as AWS does.
    pub fn set_aws_secret(&self, secret: &str) {
        *self.shared.aws_secret.lock() = Some(secret.to_string());
    }

    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *self.shared.behaviour.lock() = behaviour;
    }
}

impl Drop for SimProvider {
    fn drop(&mut self) {
        self.task.lock().abort();
    }
}

/// Accepts connections and serves each in a task of this one's set, so aborting this task
/// drops every connection with it.
async fn serve(listener: tokio::net::TcpListener, app: Router) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                // Like the providers' own front ends: small stream frames leave at once.
                let _ = tcp.set_nodelay(true);
                let service = hyper_util::service::TowerToHyperService::new(app.clone());
                connections.spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .nest("/openai/v1", openai::router())
        .nest("/mistral/v1", openai::flavored(openai::Flavor::MISTRAL))
        .nest("/ai21/studio/v1", openai::router())
        .nest("/together/v1", openai::router())
        .nest("/groq/openai/v1", openai::flavored(openai::Flavor::GROQ))
        .nest("/deepseek", openai::router())
        .nest("/ollama/v1", openai::flavored(openai::Flavor::KEYLESS))
        .nest("/compatible/v1", openai::flavored(openai::Flavor::KEYLESS))
        .nest("/azure", azure::router())
        .nest("/anthropic", anthropic::router())
        .nest("/cohere", cohere::router())
        .nest("/gemini", gemini::router())
        .nest("/bedrock", bedrock::router())
        .nest("/tgi", tgi::router())
        .nest("/databricks", databricks::router())
        .nest("/mlflow", mlflow::router())
        .nest("/mcp", mcp::router())
        .layer(middleware::from_fn_with_state(
            shared.clone(),
            record_and_fault,
        ))
        // Outside the recording layer: lets `make bench` see which key the gateway last used.
        .route(
            "/_sim/last-authorization",
            axum::routing::get(last_authorization),
        )
        .with_state(shared)
}

async fn last_authorization(State(shared): State<Arc<Shared>>) -> String {
    let requests = shared.requests.lock();
    requests
        .last()
        .and_then(|r| r.header("authorization").map(str::to_string))
        .unwrap_or_default()
}

/// Records the request, then applies the configured fault before the provider handler runs.
async fn record_and_fault(
    State(shared): State<Arc<Shared>>,
    request: Request,
    next: Next,
) -> Response {
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, usize::MAX)
        .await
        .unwrap_or_default();
    if shared.record.load(std::sync::atomic::Ordering::Relaxed) {
        shared.requests.lock().push(RecordedRequest {
            method: parts.method.to_string(),
            path: parts.uri.path().to_string(),
            query: parts.uri.query().map(str::to_string),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: bytes.clone(),
        });
    }
    let fault = shared.behaviour.lock().fault.clone();
    match fault {
        Fault::None => {}
        Fault::Delay(d) => tokio::time::sleep(d).await,
        Fault::Status {
            status,
            body,
            retry_after,
        } => {
            let mut response = Response::new(axum::body::Body::from(body));
            *response.status_mut() = http::StatusCode::from_u16(status)
                .unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
            response.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            if let Some(secs) = retry_after {
                response
                    .headers_mut()
                    .insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
            }
            return response;
        }
        Fault::StatusWithHeaders {
            status,
            body,
            headers,
        } => {
            let mut response = json_response(status, Value::Null);
            *response.body_mut() = axum::body::Body::from(body);
            for (k, v) in headers {
                if let (Ok(k), Ok(v)) = (
                    http::HeaderName::from_bytes(k.as_bytes()),
                    http::HeaderValue::from_str(&v),
                ) {
                    response.headers_mut().insert(k, v);
                }
            }
            return response;
        }
        Fault::Malformed => return Response::new(axum::body::Body::from("<html>surprise</html>")),
        Fault::CutStream { .. } | Fault::EndStream { .. } | Fault::StallStream { .. } => {}
    }
    next.run(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(bytes),
    ))
    .await
}

/// The answer's words, cut at `max` tokens when given (then the answer was cut for length).
pub fn answer_words(shared: &Shared, max: Option<u64>) -> (Vec<String>, bool) {
    let mut words = answer_text(shared.behaviour.lock().answer_words);
    match max {
        Some(max) if (max as usize) < words.len() => {
            words.truncate(max as usize);
            (words, true)
        }
        _ => (words, false),
    }
}

/// The word pieces a stream sends: every word but the last followed by a space.
pub fn pieces(words: &[String]) -> Vec<String> {
    let n = words.len();
    words
        .iter()
        .enumerate()
        .map(|(i, w)| {
            if i + 1 < n {
                format!("{w} ")
            } else {
                w.clone()
            }
        })
        .collect()
}

/// Counts a stream as cancelled when its body is dropped before the last chunk was taken.
struct StreamGuard {
    shared: Arc<Shared>,
    finished: bool,
}

impl StreamGuard {
    fn finish(mut self) {
        self.finished = true;
    }

    fn done() -> StreamGuard {
        StreamGuard {
            shared: Arc::default(),
            finished: true,
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.shared
                .cancelled_streams
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// A 200 streaming `frames` one by one, pausing `chunk_delay` before each; a stream the client
/// leaves early counts in `cancelled_streams`.
pub fn stream_response(
    shared: &Arc<Shared>,
    content_type: &'static str,
    frames: Vec<Bytes>,
) -> Response {
    let (delay, fault) = {
        let b = shared.behaviour.lock();
        (b.chunk_delay, b.fault.clone())
    };
    let guard = StreamGuard {
        shared: Arc::clone(shared),
        finished: false,
    };
    let body = futures::stream::unfold(
        (frames.into_iter().enumerate(), guard),
        move |(mut it, guard)| {
            let fault = fault.clone();
            async move {
                let Some((n, frame)) = it.next() else {
                    guard.finish();
                    return None;
                };
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                match fault {
                    Fault::CutStream { after_frames } if n >= after_frames => {
                        // An error from the body makes the server drop the connection mid-stream.
                        guard.finish();
                        return Some((
                            Err(std::io::Error::other("cut")),
                            (it, StreamGuard::done()),
                        ));
                    }
                    Fault::EndStream { after_frames } if n >= after_frames => {
                        guard.finish();
                        return None;
                    }
                    Fault::StallStream { after_frames } if n >= after_frames => {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                    }
                    _ => {}
                }
                Some((Ok(frame), (it, guard)))
            }
        },
    );
    let mut response = Response::new(axum::body::Body::from_stream(body));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

/// A JSON answer with the given status.
pub fn json_response(status: u16, body: Value) -> Response {
    let mut response = Response::new(axum::body::Body::from(body.to_string()));
    *response.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// The text of a message `content`: a string or text parts.
pub fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// Deterministic filler text: "word1 word2 ...".
pub fn answer_text(words: usize) -> Vec<String> {
    (1..=words).map(|i| format!("word{i}")).collect()
}

/// A rough token count: whitespace-separated words.
pub fn count_tokens(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// The arguments of the `n`th tool call of a simulated answer, calling tool `name`: nested JSON
/// with escapes and non-ASCII text, so that streamed fragments split inside strings and escapes.
pub fn tool_arguments(name: &str, n: usize) -> Value {
    serde_json::json!({
        "tool": name,
        "n": n,
        "city": "Zürich",
        "units": ["celsius", "kelvin"],
        "note": "a \"quoted\" word\nand a new line",
        "deep": {"ok": true, "ratio": 0.5},
    })
}

/// The tools a simulated provider calls when offered some (and not answering a tool result, nor
/// told not to): the first two offered, so answers exercise parallel calls.
pub fn tools_to_call<'a>(offered: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    offered.into_iter().take(2).map(str::to_string).collect()
}

/// `text` cut into pieces of at most `size` characters, as providers stream tool arguments.
pub fn fragments(text: &str, size: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars
        .chunks(size.max(1))
        .map(|c| c.iter().collect())
        .collect()
}

/// The answer of a simulated provider asked for JSON output (Gemini `responseMimeType`, Cohere
/// `response_format`): a fixed object, so tests can check it arrived whole.
pub fn structured_answer() -> Value {
    serde_json::json!({"answer": "word1", "confidence": 0.9, "tags": ["a", "b"]})
}
