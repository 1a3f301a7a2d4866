//! A simulated self-hosted model server in vLLM's image: OpenAI chat completions (plain and
//! streamed) under `/v1`, and `/metrics` in vLLM's exposition format whose queue and KV-cache
//! figures follow the server's real load: at most `max_running` requests run at once, each for
//! `service_time`; the others wait in the queue. LoRA adapters listed as loaded are served under
//! their own model name, as vLLM does; any other model name gets vLLM's 404.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::Response;
use axum::routing::{get, post};
use parking_lot::Mutex;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::{RecordedRequest, json_response};

/// How a simulated model server behaves.
#[derive(Clone, Debug)]
pub struct ModelServerConfig {
    /// The base model's name.
    pub model: String,
    /// LoRA adapters loaded (served under their own names).
    pub adapters: Vec<String>,
    /// Requests in the running batch at once; more wait.
    pub max_running: usize,
    /// Time one request takes once running (a stream spreads it over its chunks).
    pub service_time: Duration,
    /// Words in an answer (one streamed chunk each).
    pub words: usize,
    /// KV-cache blocks (in tokens) the running requests' prompts fill.
    pub kv_capacity_tokens: u64,
    /// A decode step per output token (make bench): when set, an answer has the request's
    /// `max_tokens` words (at most 4,096) and takes this per word, instead of `words` in
    /// `service_time`.
    pub per_token: Option<Duration>,
}

impl Default for ModelServerConfig {
    fn default() -> Self {
        ModelServerConfig {
            model: "llama".into(),
            adapters: Vec::new(),
            max_running: 4,
            service_time: Duration::from_millis(50),
            words: 5,
            kv_capacity_tokens: 20_000,
            per_token: None,
        }
    }
}

struct ServerState {
    config: Mutex<ModelServerConfig>,
    slots: Arc<Semaphore>,
    waiting: AtomicU32,
    running: AtomicU32,
    kv_tokens: AtomicU64,
    served: AtomicUsize,
    scrapes: AtomicUsize,
    requests: Mutex<Vec<RecordedRequest>>,
}

/// A running simulated model server.
pub struct ModelServer {
    pub addr: SocketAddr,
    state: Arc<ServerState>,
    task: Mutex<tokio::task::JoinHandle<()>>,
}

impl ModelServer {
    /// Serves on `addr` (a loopback address; port 0 for any).
    pub async fn start(
        addr: SocketAddr,
        config: ModelServerConfig,
    ) -> std::io::Result<ModelServer> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(ServerState {
            slots: Arc::new(Semaphore::new(config.max_running.max(1))),
            config: Mutex::new(config),
            waiting: AtomicU32::new(0),
            running: AtomicU32::new(0),
            kv_tokens: AtomicU64::new(0),
            served: AtomicUsize::new(0),
            scrapes: AtomicUsize::new(0),
            requests: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/metrics", get(metrics))
            .route("/health", get(|| async { "" }))
            .with_state(state.clone());
        let task = tokio::spawn(crate::serve(listener, app));
        Ok(ModelServer {
            addr,
            state,
            task: Mutex::new(task),
        })
    }

    /// Chat completions answered (or being answered).
    pub fn served(&self) -> usize {
        self.state.served.load(Ordering::Relaxed)
    }

    /// Reads of `/metrics`.
    pub fn scrapes(&self) -> usize {
        self.state.scrapes.load(Ordering::Relaxed)
    }

    pub fn waiting(&self) -> u32 {
        self.state.waiting.load(Ordering::Relaxed)
    }

    pub fn running(&self) -> u32 {
        self.state.running.load(Ordering::Relaxed)
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state.requests.lock().clone()
    }

    pub fn set_service_time(&self, t: Duration) {
        self.state.config.lock().service_time = t;
    }

    /// Stops at once: the listener closes and open connections drop.
    pub fn kill(&self) {
        self.task.lock().abort();
    }
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        self.task.lock().abort();
    }
}

/// Holds a running slot; gives it and its KV-cache share back when the answer is done.
struct Running {
    state: Arc<ServerState>,
    tokens: u64,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.state.running.fetch_sub(1, Ordering::Relaxed);
        self.state
            .kv_tokens
            .fetch_sub(self.tokens, Ordering::Relaxed);
    }
}

async fn chat(State(state): State<Arc<ServerState>>, body: Bytes) -> Response {
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    state.requests.lock().push(RecordedRequest {
        method: "POST".into(),
        path: "/v1/chat/completions".into(),
        query: None,
        headers: Vec::new(),
        body: body.clone(),
    });
    let config = state.config.lock().clone();
    let model = request["model"].as_str().unwrap_or_default().to_string();
    if model != config.model && !config.adapters.contains(&model) {
        return json_response(
            404,
            json!({"object": "error", "message": format!("The model `{model}` does not exist."), "type": "NotFoundError", "param": null, "code": 404}),
        );
    }
    let prompt_chars: usize = request["messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .map(|m| crate::content_text(&m["content"]).len())
                .sum()
        })
        .unwrap_or(0);
    let prompt_tokens = (prompt_chars as u64 / 4).max(1);
    state.served.fetch_add(1, Ordering::Relaxed);
    state.waiting.fetch_add(1, Ordering::Relaxed);
    let acquired = state.slots.clone().acquire_owned().await.ok();
    state.waiting.fetch_sub(1, Ordering::Relaxed);
    let Some(permit) = acquired else {
        return json_response(503, json!({"object": "error", "message": "shutting down"}));
    };
    state.running.fetch_add(1, Ordering::Relaxed);
    state.kv_tokens.fetch_add(prompt_tokens, Ordering::Relaxed);
    let running = Running {
        state: state.clone(),
        tokens: prompt_tokens,
        _permit: permit,
    };
    let (n_words, service_time) = match config.per_token {
        Some(step) => {
            let n = request["max_tokens"].as_u64().unwrap_or(16).clamp(1, 4096) as u32;
            (n as usize, step * n)
        }
        None => (config.words, config.service_time),
    };
    let words: Vec<String> = (1..=n_words).map(|i| format!("word{i}")).collect();
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": words.len(), "total_tokens": prompt_tokens + words.len() as u64});
    let id = format!("chatcmpl-{}", state.served.load(Ordering::Relaxed));
    if request["stream"].as_bool() != Some(true) {
        tokio::time::sleep(service_time).await;
        drop(running);
        return json_response(
            200,
            json!({
                "id": id, "object": "chat.completion", "created": crate::unix_now(), "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": words.join(" ")}, "finish_reason": "stop"}],
                "usage": usage,
            }),
        );
    }
    let include_usage = request["stream_options"]["include_usage"].as_bool() == Some(true);
    let pause = service_time / (words.len() as u32 + 1);
    let chunk = |delta: Value, finish: Value| {
        json!({"id": id, "object": "chat.completion.chunk", "created": crate::unix_now(), "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let mut frames = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    let n = words.len();
    for (i, w) in words.iter().enumerate() {
        let text = if i + 1 < n {
            format!("{w} ")
        } else {
            w.clone()
        };
        frames.push(chunk(json!({"content": text}), Value::Null));
    }
    frames.push(chunk(json!({}), json!("stop")));
    if include_usage {
        frames.push(json!({"id": id, "object": "chat.completion.chunk", "created": crate::unix_now(), "model": model, "choices": [], "usage": usage}));
    }
    let mut lines: Vec<Bytes> = frames
        .into_iter()
        .map(|f| Bytes::from(format!("data: {f}\n\n")))
        .collect();
    lines.push(Bytes::from_static(b"data: [DONE]\n\n"));
    let body = futures::stream::unfold(
        (lines.into_iter(), Some(running)),
        move |(mut it, running)| async move {
            let next = it.next();
            match next {
                Some(frame) => {
                    tokio::time::sleep(pause).await;
                    Some((Ok::<_, std::io::Error>(frame), (it, running)))
                }
                None => {
                    drop(running);
                    None
                }
            }
        },
    );
    let mut response = Response::new(axum::body::Body::from_stream(body));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/event-stream"),
    );
    response
}

async fn metrics(State(state): State<Arc<ServerState>>) -> String {
    state.scrapes.fetch_add(1, Ordering::Relaxed);
    let config = state.config.lock().clone();
    let labels = format!("engine=\"0\",model_name=\"{}\"", config.model);
    let kv = (state.kv_tokens.load(Ordering::Relaxed) as f64
        / config.kv_capacity_tokens.max(1) as f64)
        .min(1.0);
    let mut page = String::new();
    for (name, help, value) in [
        (
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            f64::from(state.running.load(Ordering::Relaxed)),
        ),
        (
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            f64::from(state.waiting.load(Ordering::Relaxed)),
        ),
        (
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            kv,
        ),
    ] {
        page.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{labels}}} {value:?}\n"
        ));
    }
    page.push_str(&format!(
        "# HELP vllm:lora_requests_info Running stats on lora requests.\n# TYPE vllm:lora_requests_info gauge\nvllm:lora_requests_info{{max_lora=\"{}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"\"}} {:?}\n",
        config.adapters.len().max(1),
        config.adapters.join(","),
        crate::unix_now() as f64
    ));
    page
}
