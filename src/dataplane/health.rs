//! Liveness, readiness and MLflow's health endpoint.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::extract::State;
use http::StatusCode;
use serde_json::{Value, json};

use super::AppState;

/// The process is alive and serving HTTP.
pub async fn healthz() -> &'static str {
    "ok"
}

/// Ready once the first complete sync has produced a table; stays ready while the API server is
/// unreachable, because the last good table keeps serving.
pub async fn readyz(State(state): State<Arc<AppState>>) -> (StatusCode, &'static str) {
    if state.draining.load(Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down")
    } else if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ok")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the first complete sync of Routes and Secrets",
        )
    }
}

/// MLflow's gateway health check.
pub async fn health() -> Json<Value> {
    Json(json!({"status": "OK"}))
}
