//! MLflow's scoring server (`mlflow models serve`): `POST /invocations` with `{"inputs": [...],
//! "params": {...}}`, answering `{"predictions": [...]}`; `{"error_code","message"}` errors.
//! A scoring server hosts one model: `/embedder/invocations` serves an embedding model, any other
//! `/{name}/invocations` a text generator.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::post;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::openai::embed;
use crate::{Shared, answer_words, json_response};

pub fn router() -> Router<Arc<Shared>> {
    Router::new().route("/{name}/invocations", post(invocations))
}

async fn invocations(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return json_response(
            400,
            json!({"error_code": "MALFORMED_REQUEST", "message": "Failed to parse input from JSON."}),
        );
    };
    let Some(inputs) = req.get("inputs").and_then(Value::as_array) else {
        return json_response(
            400,
            json!({"error_code": "BAD_REQUEST", "message": "The input must be a JSON dictionary with exactly one of the input fields {'dataframe_split', 'dataframe_records', 'instances', 'inputs'}."}),
        );
    };
    if name == "embedder" {
        let data: Vec<Value> = inputs
            .iter()
            .map(|i| json!(embed(i.as_str().unwrap_or_default())))
            .collect();
        return json_response(200, json!({"predictions": data}));
    }
    let max = req.pointer("/params/max_tokens").and_then(Value::as_u64);
    let (words, _) = answer_words(&shared, max);
    let text = words.join(" ");
    json_response(
        200,
        json!({"predictions": inputs.iter().map(|_| text.clone()).collect::<Vec<_>>()}),
    )
}
