//! Databricks Model Serving: `POST /serving-endpoints/{name}/invocations` with a bearer token and
//! OpenAI-shaped bodies without `model` (the endpoint fixes it); `{"error_code","message"}` errors.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use axum::{Extension, Router};
use bytes::Bytes;
use serde_json::{Value, json};

use crate::openai::{self, Flavor};
use crate::{Shared, json_response};

pub fn router() -> Router<Arc<Shared>> {
    Router::new().route("/serving-endpoints/{name}/invocations", post(invocations))
}

async fn invocations(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !auth.starts_with("Bearer ") || auth.len() <= 7 {
        return json_response(
            401,
            json!({"error_code": "UNAUTHENTICATED", "message": "Credential was not sent or was of an unsupported type for this API."}),
        );
    }
    let Ok(Value::Object(mut req)) = serde_json::from_slice::<Value>(&body) else {
        return json_response(
            400,
            json!({"error_code": "BAD_REQUEST", "message": "Malformed JSON in request body"}),
        );
    };
    if req.contains_key("model") {
        return json_response(
            400,
            json!({"error_code": "BAD_REQUEST", "message": "The model is fixed by the serving endpoint; do not send 'model'."}),
        );
    }
    req.insert("model".into(), json!(name));
    let kind = if req.contains_key("messages") {
        "chat"
    } else if req.contains_key("prompt") {
        "completions"
    } else {
        "embeddings"
    };
    let body = Bytes::from(Value::Object(req).to_string());
    match kind {
        "chat" => openai::generate(shared, Flavor::DATABRICKS, headers, body, true).await,
        "completions" => openai::generate(shared, Flavor::DATABRICKS, headers, body, false).await,
        _ => openai::embeddings(Extension(Flavor::OPENAI), headers, body).await,
    }
}
