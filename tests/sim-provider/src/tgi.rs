//! Text Generation Inference's native API: `/generate` and `/generate_stream` (SSE without a
//! terminator; the last event carries `generated_text` and `details`), TGI's parameter validation
//! and `{"error","error_type"}` errors. Like a default TGI launch, it checks no credential.

#![allow(clippy::result_large_err)] // handlers return ready responses as errors

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::response::Response;
use axum::routing::post;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::{Shared, answer_words, count_tokens, json_response, pieces, stream_response};

pub fn router() -> Router<Arc<Shared>> {
    Router::new()
        .route("/generate", post(generate))
        .route("/generate_stream", post(generate_stream))
}

fn validation(message: &str) -> Response {
    json_response(
        422,
        json!({"error": format!("Input validation error: {message}"), "error_type": "validation"}),
    )
}

fn check(body: &Bytes) -> Result<(Value, String), Response> {
    let req: Value = serde_json::from_slice(body).map_err(|_| {
        json_response(422, json!({"error": "Failed to parse the request body as JSON", "error_type": "validation"}))
    })?;
    let Some(inputs) = req
        .get("inputs")
        .and_then(Value::as_str)
        .map(str::to_string)
    else {
        return Err(json_response(
            422,
            json!({"error": "Failed to deserialize the JSON body into the target type: missing field `inputs`", "error_type": "validation"}),
        ));
    };
    let p = &req["parameters"];
    if p["temperature"].as_f64().is_some_and(|t| t <= 0.0) {
        return Err(validation("`temperature` must be strictly positive"));
    }
    if p["top_p"].as_f64().is_some_and(|t| t <= 0.0 || t >= 1.0) {
        return Err(validation("`top_p` must be > 0.0 and < 1.0"));
    }
    Ok((req, inputs))
}

async fn generate(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let (req, inputs) = match check(&body) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let p = &req["parameters"];
    let (words, cut) = answer_words(&shared, p["max_new_tokens"].as_u64());
    let mut details = json!({"finish_reason": if cut { "length" } else { "eos_token" }, "generated_tokens": words.len(), "seed": null});
    if p["decoder_input_details"] == true {
        let prefill: Vec<Value> = inputs
            .split_whitespace()
            .enumerate()
            .map(|(i, t)| json!({"id": i, "text": t, "logprob": null}))
            .collect();
        details["prefill"] = json!(prefill);
    }
    let mut answer = json!({"generated_text": words.join(" ")});
    if p["details"] == true {
        answer["details"] = details;
    }
    json_response(200, answer)
}

async fn generate_stream(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let (req, inputs) = match check(&body) {
        Ok(r) => r,
        Err(e) => return e,
    };
    let (words, cut) = answer_words(&shared, req["parameters"]["max_new_tokens"].as_u64());
    let n = words.len();
    let mut frames: Vec<Bytes> = pieces(&words)
        .into_iter()
        .enumerate()
        .map(|(i, p)| Bytes::from(format!("data:{}\n\n", json!({"index": i + 1, "token": {"id": i, "text": p, "logprob": -0.1, "special": false}, "generated_text": null, "details": null}))))
        .collect();
    frames.insert(1.min(frames.len()), Bytes::from_static(b":keep-alive\n\n"));
    let details = json!({"finish_reason": if cut { "length" } else { "eos_token" }, "generated_tokens": n, "seed": null, "input_length": count_tokens(&inputs)});
    frames.push(Bytes::from(format!(
        "data:{}\n\n",
        json!({"index": n + 1, "token": {"id": 2, "text": "</s>", "logprob": -0.1, "special": true}, "generated_text": words.join(" "), "details": details})
    )));
    stream_response(&shared, "text/event-stream", frames)
}
