//! Liveness, readiness and MLflow's health endpoint.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwapOption;
use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde_json::{Value, json};

use super::AppState;

/// The process is alive and serving HTTP.
pub async fn healthz() -> &'static str {
    "ok"
}

/// What `serve` reports about its configuration files: the generation of the table serving now
/// (1 for the first load, +1 per reload that changed it) and why the last reload failed, if it did.
#[derive(Default, Debug)]
pub struct ConfigStatus {
    generation: AtomicU64,
    last_error: ArcSwapOption<String>,
}

impl ConfigStatus {
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn set_generation(&self, generation: u64) {
        self.generation.store(generation, Ordering::Release);
    }

    pub fn last_error(&self) -> Option<Arc<String>> {
        self.last_error.load_full()
    }

    /// `None` when the latest reload went through cleanly.
    pub fn set_last_error(&self, error: Option<String>) {
        self.last_error.store(error.map(Arc::new));
    }
}

/// Ready once the first complete sync has produced a table; stays ready while the API server is
/// unreachable (or a config file is broken), because the last good table keeps serving.
pub async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let (status, text) = if state.draining.load(Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down")
    } else if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ok")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the first complete sync of Routes and Secrets",
        )
    };
    match &state.config {
        None => (status, text).into_response(),
        Some(config) => (
            status,
            Json(json!({
                "status": text,
                "configGeneration": config.generation(),
                "lastReloadError": config.last_error().as_deref(),
            })),
        )
            .into_response(),
    }
}

/// MLflow's gateway health check.
pub async fn health() -> Json<Value> {
    Json(json!({"status": "OK"}))
}
