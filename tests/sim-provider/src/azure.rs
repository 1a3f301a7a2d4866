//! Azure OpenAI's classic deployment API: `/openai/deployments/{deployment}/{operation}?api-version=`,
//! an `api-key` header (or an Entra ID bearer token), OpenAI's bodies, Azure's error shape.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use axum::{Extension, Router};
use bytes::Bytes;
use serde_json::{Value, json};

use crate::openai::{self, Flavor};
use crate::{Shared, json_response};

pub fn router() -> Router<Arc<Shared>> {
    Router::new()
        .route(
            "/openai/deployments/{deployment}/{*operation}",
            post(deployment),
        )
        .layer(Extension(Flavor::KEYLESS))
}

async fn deployment(
    State(shared): State<Arc<Shared>>,
    Path((deployment, operation)): Path<(String, String)>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let keyed = headers.get("api-key").is_some_and(|v| !v.is_empty());
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("Bearer ") && v.len() > 7);
    if !keyed && !bearer {
        return json_response(
            401,
            json!({"error": {"code": "401", "message": "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key for an active subscription and use a correct regional API endpoint for your resource."}}),
        );
    }
    if !query
        .iter()
        .any(|(k, v)| k == "api-version" && !v.is_empty())
    {
        return json_response(
            404,
            json!({"error": {"code": "404", "message": "Resource not found"}}),
        );
    }
    // The deployment picks the model; the OpenAI simulation wants it in the body.
    let mut req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if let Some(fields) = req.as_object_mut() {
        fields.insert("model".into(), json!(deployment));
    }
    let body = Bytes::from(req.to_string());
    match operation.as_str() {
        "chat/completions" => openai::generate(shared, Flavor::KEYLESS, headers, body, true).await,
        "completions" => openai::generate(shared, Flavor::KEYLESS, headers, body, false).await,
        "embeddings" => openai::embeddings(Extension(Flavor::KEYLESS), headers, body).await,
        _ => json_response(
            404,
            json!({"error": {"code": "404", "message": "Resource not found"}}),
        ),
    }
}
