//! The Gemini Developer API as documented: `x-goog-api-key`, `models/{model}:generateContent`,
//! `:streamGenerateContent` (SSE only with `alt=sse`, otherwise one JSON array, no terminator),
//! `:embedContent`, `:batchEmbedContents`, and google.rpc.Status errors.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::openai::embed;
use crate::{
    Shared, answer_words, count_tokens, fragments, json_response, pieces, stream_response,
    structured_answer, tool_arguments, tools_to_call,
};

pub fn router() -> Router<Arc<Shared>> {
    Router::new().route("/v1beta/models/{model_action}", post(model_action))
}

fn error(code: u16, status: &str, message: &str) -> Response {
    json_response(
        code,
        json!({"error": {"code": code, "message": message, "status": status}}),
    )
}

async fn model_action(
    State(shared): State<Arc<Shared>>,
    Path(model_action): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if headers.get("x-goog-api-key").is_none_or(|v| v.is_empty()) {
        return error(
            403,
            "PERMISSION_DENIED",
            "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.",
        );
    }
    let Some((model, action)) = model_action.split_once(':') else {
        return error(
            404,
            "NOT_FOUND",
            "The requested URL was not found on this server.",
        );
    };
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return error(400, "INVALID_ARGUMENT", "Invalid JSON payload received.");
    };
    match action {
        "generateContent" | "streamGenerateContent" => {
            let sse = query.iter().any(|(k, v)| k == "alt" && v == "sse");
            generate(&shared, model, &req, action == "streamGenerateContent", sse)
        }
        "embedContent" => {
            let text = req.pointer("/content/parts/0/text").and_then(Value::as_str);
            match text {
                Some(t) => json_response(200, json!({"embedding": {"values": embed(t)}})),
                None => error(
                    400,
                    "INVALID_ARGUMENT",
                    "* EmbedContentRequest.content: contents is not specified",
                ),
            }
        }
        "batchEmbedContents" => {
            let Some(requests) = req.get("requests").and_then(Value::as_array) else {
                return error(
                    400,
                    "INVALID_ARGUMENT",
                    "* BatchEmbedContentsRequest.requests: requests is not specified",
                );
            };
            let want = format!("models/{model}");
            if requests.iter().any(|r| r["model"] != want.as_str()) {
                return error(
                    400,
                    "INVALID_ARGUMENT",
                    "Model names in the requests must match the model in the URL.",
                );
            }
            let embeddings: Vec<Value> = requests
                .iter()
                .map(|r| json!({"values": embed(r.pointer("/content/parts/0/text").and_then(Value::as_str).unwrap_or_default())}))
                .collect();
            json_response(200, json!({"embeddings": embeddings}))
        }
        _ => error(
            404,
            "NOT_FOUND",
            "The requested URL was not found on this server.",
        ),
    }
}

fn generate(shared: &Arc<Shared>, model: &str, req: &Value, stream: bool, sse: bool) -> Response {
    let Some(contents) = req.get("contents").and_then(Value::as_array) else {
        return error(
            400,
            "INVALID_ARGUMENT",
            "* GenerateContentRequest.contents: contents is not specified",
        );
    };
    if contents
        .iter()
        .any(|c| c["role"] != "user" && c["role"] != "model")
    {
        return error(
            400,
            "INVALID_ARGUMENT",
            "Please use a valid role: user, model.",
        );
    }
    let text_of = |v: &Value| -> u64 {
        v["parts"].as_array().map_or(0, |ps| {
            ps.iter()
                .map(|p| count_tokens(p["text"].as_str().unwrap_or_default()))
                .sum()
        })
    };
    let prompt: u64 =
        contents.iter().map(text_of).sum::<u64>() + text_of(&req["systemInstruction"]);
    let config = &req["generationConfig"];
    let calls = planned_calls(req, contents);
    if !calls.is_empty() || config["responseMimeType"] == "application/json" {
        return special_answer(shared, model, &calls, stream, sse);
    }
    let (words, cut) = answer_words(shared, config["maxOutputTokens"].as_u64());
    let finish = if cut { "MAX_TOKENS" } else { "STOP" };
    let candidates = config["candidateCount"].as_u64().unwrap_or(1);
    let output = words.len() as u64 * candidates;
    let usage = json!({"promptTokenCount": prompt, "candidatesTokenCount": output, "totalTokenCount": prompt + output});
    if stream {
        let chunks: Vec<Value> = pieces(&words)
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let mut candidate = json!({"content": {"role": "model", "parts": [{"text": p}]}, "index": 0});
                if i + 1 == words.len() {
                    candidate["finishReason"] = json!(finish);
                }
                json!({"candidates": [candidate], "usageMetadata": usage, "modelVersion": model, "responseId": "resp-sim"})
            })
            .collect();
        if !sse {
            // Without alt=sse the answer is one JSON array, delivered bit by bit.
            return json_response(200, Value::Array(chunks));
        }
        let frames = chunks
            .into_iter()
            .map(|c| Bytes::from(format!("data: {c}\r\n\r\n")))
            .collect();
        return stream_response(shared, "text/event-stream", frames);
    }
    let text = words.join(" ");
    let candidates: Vec<Value> = (0..candidates)
        .map(|i| json!({"content": {"role": "model", "parts": [{"text": text}]}, "finishReason": finish, "index": i}))
        .collect();
    json_response(
        200,
        json!({"candidates": candidates, "usageMetadata": usage, "modelVersion": model, "responseId": "resp-sim"}),
    )
}

/// The functions this answer calls: the offered ones (the allowed ones when named), unless
/// told `NONE` or answering a function response.
fn planned_calls(req: &Value, contents: &[Value]) -> Vec<String> {
    let offered: Vec<&str> = req["tools"]
        .as_array()
        .map(|tools| {
            tools
                .iter()
                .filter_map(|t| t["functionDeclarations"].as_array())
                .flatten()
                .filter_map(|f| f["name"].as_str())
                .collect()
        })
        .unwrap_or_default();
    let answers_result = contents.last().is_some_and(|c| {
        c["parts"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p.get("functionResponse").is_some()))
    });
    let calling = req.pointer("/toolConfig/functionCallingConfig");
    if offered.is_empty() || answers_result || calling.is_some_and(|c| c["mode"] == "NONE") {
        return Vec::new();
    }
    let allowed: Vec<&str> = calling
        .and_then(|c| c["allowedFunctionNames"].as_array())
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    tools_to_call(if allowed.is_empty() { offered } else { allowed })
}

/// An answer calling `calls` (each call whole, one per chunk when streamed, as Gemini does), or
/// with no calls the JSON text of `structured_answer` (streamed in fragments).
fn special_answer(
    shared: &Arc<Shared>,
    model: &str,
    calls: &[String],
    stream: bool,
    sse: bool,
) -> Response {
    let mut parts: Vec<Value> = Vec::new();
    if calls.is_empty() {
        parts.extend(
            fragments(&structured_answer().to_string(), 8)
                .into_iter()
                .map(|t| json!({"text": t})),
        );
    } else {
        parts.push(json!({"text": "Let me check."}));
        // Thinking models sign their calls; the signature must come back with the call.
        parts.extend(calls.iter().enumerate().map(|(i, name)| {
            json!({"functionCall": {"name": name, "args": tool_arguments(name, i)}, "thoughtSignature": thought_signature(i)})
        }));
    }
    let usage = json!({"promptTokenCount": 5, "candidatesTokenCount": 10, "totalTokenCount": 15});
    if !stream {
        let mut merged: Vec<Value> = Vec::new();
        let mut text = String::new();
        for p in parts {
            match p["text"].as_str() {
                Some(t) if calls.is_empty() => text.push_str(t),
                _ => merged.push(p),
            }
        }
        if calls.is_empty() {
            merged.push(json!({"text": text}));
        }
        return json_response(
            200,
            json!({"candidates": [{"content": {"role": "model", "parts": merged}, "finishReason": "STOP", "index": 0}], "usageMetadata": usage, "modelVersion": model, "responseId": "resp-sim"}),
        );
    }
    let n = parts.len();
    let chunks: Vec<Value> = parts
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let mut candidate = json!({"content": {"role": "model", "parts": [p]}, "index": 0});
            let mut chunk = json!({"modelVersion": model, "responseId": "resp-sim"});
            if i + 1 == n {
                candidate["finishReason"] = json!("STOP");
                chunk["usageMetadata"] = usage.clone();
            }
            chunk["candidates"] = json!([candidate]);
            chunk
        })
        .collect();
    if !sse {
        return json_response(200, Value::Array(chunks));
    }
    let frames = chunks
        .into_iter()
        .map(|c| Bytes::from(format!("data: {c}\r\n\r\n")))
        .collect();
    stream_response(shared, "text/event-stream", frames)
}

/// The thought signature of the `n`th function call of a simulated answer (base64, as Gemini's).
pub fn thought_signature(n: usize) -> String {
    format!("c2lnLXNpbS0{n}+/==")
}
