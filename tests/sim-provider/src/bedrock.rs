//! The Bedrock runtime as documented: SigV4-signed requests (service `bedrock`), Converse and
//! ConverseStream (`application/vnd.amazon.eventstream` frames with CRCs, `:event-type` headers and
//! random `p` padding), InvokeModel for Titan and Cohere embeddings, and AWS JSON errors with
//! `x-amzn-ErrorType`.

#![allow(clippy::result_large_err)] // handlers return ready responses as errors

use std::sync::Arc;

use axum::Router;
use axum::extract::{OriginalUri, Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::openai::embed;
use crate::{
    Shared, answer_words, count_tokens, fragments, json_response, pieces, stream_response,
    tool_arguments, tools_to_call,
};

pub fn router() -> Router<Arc<Shared>> {
    Router::new().route("/model/{model}/{operation}", post(model))
}

/// An AWS error: JSON `message` plus the exception name in `x-amzn-ErrorType`.
pub fn error(status: u16, kind: &'static str, message: &str) -> Response {
    let mut response = json_response(status, json!({"message": message}));
    response
        .headers_mut()
        .insert("x-amzn-errortype", http::HeaderValue::from_static(kind));
    response
}

fn bad_signature() -> Response {
    error(
        403,
        "InvalidSignatureException",
        "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details.",
    )
}

/// Checks the SigV4 shape: algorithm, a credential scoped to the `bedrock` service, signed headers
/// including host and x-amz-date, and a hex signature; with a known secret, the signature itself.
fn check_signature(
    shared: &Shared,
    uri: &http::Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(), Response> {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let Some(rest) = auth.strip_prefix("AWS4-HMAC-SHA256 ") else {
        return Err(error(
            403,
            "MissingAuthenticationTokenException",
            "Missing Authentication Token",
        ));
    };
    let field = |name: &str| {
        rest.split(", ")
            .find_map(|kv| kv.strip_prefix(name))
            .unwrap_or_default()
    };
    let scope: Vec<&str> = field("Credential=").split('/').collect();
    let signed = field("SignedHeaders=");
    let signature = field("Signature=");
    let date = headers
        .get("x-amz-date")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let well_formed = scope.len() == 5
        && scope[3] == "bedrock"
        && scope[4] == "aws4_request"
        && date.starts_with(scope[1])
        && signed.split(';').any(|h| h == "host")
        && signed.split(';').any(|h| h == "x-amz-date")
        && signature.len() == 64
        && signature.bytes().all(|b| b.is_ascii_hexdigit());
    if !well_formed {
        return Err(bad_signature());
    }
    let Some(secret) = shared.aws_secret.lock().clone() else {
        return Ok(());
    };
    let expected = resign(uri, headers, body, &scope, signed, &secret, date);
    if expected.as_deref() == Some(auth) {
        Ok(())
    } else {
        Err(bad_signature())
    }
}

/// Signs the request as received (its wire path, the signed headers as they arrived, the body)
/// with the known secret, the way the service checks a signature.
#[allow(clippy::too_many_arguments)]
fn resign(
    uri: &http::Uri,
    headers: &HeaderMap,
    body: &[u8],
    scope: &[&str],
    signed: &str,
    secret: &str,
    date: &str,
) -> Option<String> {
    use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
    let host = headers.get("host")?.to_str().ok()?;
    let url = format!("http://{host}{}", uri.path_and_query()?.as_str());
    let token = headers
        .get("x-amz-security-token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let identity: aws_smithy_runtime_api::client::identity::Identity =
        aws_credential_types::Credentials::new(scope[0], secret, token, None, "sim").into();
    let params = aws_sigv4::sign::v4::SigningParams::builder()
        .identity(&identity)
        .region(scope[2])
        .name(scope[3])
        .time(parse_amz_date(date)?)
        .settings(SigningSettings::default())
        .build()
        .ok()?
        .into();
    let pass: Vec<(&str, &str)> = signed
        .split(';')
        .filter(|h| !matches!(*h, "x-amz-date" | "x-amz-security-token" | "host"))
        .filter_map(|h| Some((h, headers.get(h)?.to_str().ok()?)))
        .collect();
    let request =
        SignableRequest::new("POST", url, pass.into_iter(), SignableBody::Bytes(body)).ok()?;
    let (instructions, _) = sign(request, &params).ok()?.into_parts();
    instructions
        .headers()
        .find(|(k, _)| *k == "authorization")
        .map(|(_, v)| v.to_string())
}

/// `YYYYMMDDTHHMMSSZ` as a time.
fn parse_amz_date(date: &str) -> Option<std::time::SystemTime> {
    let num = |r: std::ops::Range<usize>| date.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (hh, mm, ss) = (num(9..11)?, num(11..13)?, num(13..15)?);
    // Days from the civil calendar (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    Some(std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(secs).ok()?))
}

async fn model(
    State(shared): State<Arc<Shared>>,
    Path((model, operation)): Path<(String, String)>,
    OriginalUri(uri): OriginalUri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(e) = check_signature(&shared, &uri, &headers, &body) {
        return e;
    }
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return error(
            400,
            "ValidationException",
            "Malformed input request, please reformat your input and try again.",
        );
    };
    match operation.as_str() {
        "converse" | "converse-stream" => {
            converse(&shared, &model, &req, operation == "converse-stream")
        }
        "invoke" => invoke(&model, &req),
        _ => error(404, "UnknownOperationException", "Unknown operation"),
    }
}

fn converse(shared: &Arc<Shared>, model: &str, req: &Value, stream: bool) -> Response {
    let Some(messages) = req.get("messages").and_then(Value::as_array) else {
        return error(
            400,
            "ValidationException",
            "1 validation error detected: Value null at 'messages' failed to satisfy constraint: Member must not be null",
        );
    };
    if messages
        .iter()
        .any(|m| m["role"] != "user" && m["role"] != "assistant")
    {
        return error(
            400,
            "ValidationException",
            "1 validation error detected: Value at 'messages.role' failed to satisfy constraint: Member must satisfy enum value set: [user, assistant]",
        );
    }
    let blocks_text = |v: &Value| -> u64 {
        v.as_array().map_or(0, |bs| {
            bs.iter()
                .map(|b| count_tokens(b["text"].as_str().unwrap_or_default()))
                .sum()
        })
    };
    let input = messages
        .iter()
        .map(|m| blocks_text(&m["content"]))
        .sum::<u64>()
        + blocks_text(&req["system"]);
    let calls = planned_calls(req, messages);
    if !calls.is_empty() {
        return tool_answer(shared, model, req, &calls, stream);
    }
    let (words, cut) = answer_words(
        shared,
        req.pointer("/inferenceConfig/maxTokens")
            .and_then(Value::as_u64),
    );
    let stop = if cut { "max_tokens" } else { "end_turn" };
    let output = words.len() as u64;
    let usage =
        json!({"inputTokens": input, "outputTokens": output, "totalTokens": input + output});
    if !stream {
        return json_response(
            200,
            json!({"output": {"message": {"role": "assistant", "content": [{"text": words.join(" ")}]}},
                   "stopReason": stop, "usage": usage, "metrics": {"latencyMs": 12}, "modelId": model}),
        );
    }
    let event = |kind: &str, mut payload: Value, padding: usize| {
        payload["p"] = json!("abcdefghijklmnopqrstuvwxyz"[..padding % 26].to_string());
        Bytes::from(encode_frame(
            &[
                (":event-type", kind),
                (":content-type", "application/json"),
                (":message-type", "event"),
            ],
            payload.to_string().as_bytes(),
        ))
    };
    let mut frames = vec![event("messageStart", json!({"role": "assistant"}), 3)];
    for (i, piece) in pieces(&words).into_iter().enumerate() {
        frames.push(event(
            "contentBlockDelta",
            json!({"contentBlockIndex": 0, "delta": {"text": piece}}),
            i * 7,
        ));
    }
    frames.push(event(
        "contentBlockStop",
        json!({"contentBlockIndex": 0}),
        5,
    ));
    frames.push(event("messageStop", json!({"stopReason": stop}), 11));
    frames.push(event(
        "metadata",
        json!({"usage": usage, "metrics": {"latencyMs": 12}}),
        2,
    ));
    stream_response(shared, "application/vnd.amazon.eventstream", frames)
}

/// The tools this answer uses: the offered ones (the named one under `toolChoice.tool`), unless
/// answering a tool result.
fn planned_calls(req: &Value, messages: &[Value]) -> Vec<String> {
    let offered: Vec<&str> = req
        .pointer("/toolConfig/tools")
        .and_then(Value::as_array)
        .map(|t| {
            t.iter()
                .filter_map(|t| t.pointer("/toolSpec/name")?.as_str())
                .collect()
        })
        .unwrap_or_default();
    let answers_result = messages.last().is_some_and(|m| {
        m["content"]
            .as_array()
            .is_some_and(|b| b.iter().any(|b| b.get("toolResult").is_some()))
    });
    if offered.is_empty() || answers_result {
        return Vec::new();
    }
    match req
        .pointer("/toolConfig/toolChoice/tool/name")
        .and_then(Value::as_str)
    {
        Some(name) => vec![name.to_string()],
        None => tools_to_call(offered),
    }
}

/// An answer using `calls`: `toolUse` blocks, streamed as ConverseStream does (a
/// `contentBlockStart` with the id and name, then `toolUse.input` string fragments).
fn tool_answer(
    shared: &Arc<Shared>,
    model: &str,
    req: &Value,
    calls: &[String],
    stream: bool,
) -> Response {
    let id = |i: usize| format!("tooluse_sim_{i}");
    let forced = req.pointer("/toolConfig/toolChoice/auto").is_none()
        && req.pointer("/toolConfig/toolChoice").is_some();
    let usage = json!({"inputTokens": 5, "outputTokens": 10, "totalTokens": 15});
    if !stream {
        let mut content = Vec::new();
        if !forced {
            content.push(json!({"text": "Let me check."}));
        }
        content.extend(calls.iter().enumerate().map(|(i, name)| {
            json!({"toolUse": {"toolUseId": id(i), "name": name, "input": tool_arguments(name, i)}})
        }));
        return json_response(
            200,
            json!({"output": {"message": {"role": "assistant", "content": content}},
                   "stopReason": "tool_use", "usage": usage, "metrics": {"latencyMs": 12}, "modelId": model}),
        );
    }
    let event = |kind: &str, mut payload: Value| {
        payload["p"] = json!("abcdefgh");
        Bytes::from(encode_frame(
            &[
                (":event-type", kind),
                (":content-type", "application/json"),
                (":message-type", "event"),
            ],
            payload.to_string().as_bytes(),
        ))
    };
    let mut frames = vec![event("messageStart", json!({"role": "assistant"}))];
    if !forced {
        frames.push(event(
            "contentBlockDelta",
            json!({"contentBlockIndex": 0, "delta": {"text": "Let me check."}}),
        ));
        frames.push(event("contentBlockStop", json!({"contentBlockIndex": 0})));
    }
    let first = usize::from(!forced);
    for (i, name) in calls.iter().enumerate() {
        let block = i + first;
        frames.push(event(
            "contentBlockStart",
            json!({"contentBlockIndex": block, "start": {"toolUse": {"toolUseId": id(i), "name": name}}}),
        ));
        for piece in fragments(&tool_arguments(name, i).to_string(), 6) {
            frames.push(event(
                "contentBlockDelta",
                json!({"contentBlockIndex": block, "delta": {"toolUse": {"input": piece}}}),
            ));
        }
        frames.push(event(
            "contentBlockStop",
            json!({"contentBlockIndex": block}),
        ));
    }
    frames.push(event("messageStop", json!({"stopReason": "tool_use"})));
    frames.push(event(
        "metadata",
        json!({"usage": usage, "metrics": {"latencyMs": 12}}),
    ));
    stream_response(shared, "application/vnd.amazon.eventstream", frames)
}

fn invoke(model: &str, req: &Value) -> Response {
    if model.starts_with("cohere.embed") {
        let (Some(texts), Some(_)) = (
            req.get("texts").and_then(Value::as_array),
            req.get("input_type"),
        ) else {
            return error(
                400,
                "ValidationException",
                "Malformed input request: required key [texts, input_type] not found, please reformat your input and try again.",
            );
        };
        let texts: Vec<&str> = texts.iter().filter_map(Value::as_str).collect();
        return json_response(
            200,
            json!({"id": "emb-sim", "embeddings": texts.iter().map(|t| embed(t)).collect::<Vec<_>>(), "response_type": "embeddings_floats", "texts": texts}),
        );
    }
    if model.starts_with("amazon.titan-embed") {
        let Some(text) = req.get("inputText").and_then(Value::as_str) else {
            return error(
                400,
                "ValidationException",
                "Malformed input request: #: required key [inputText] not found, please reformat your input and try again.",
            );
        };
        if req.as_object().is_some_and(|o| {
            o.keys().any(|k| {
                !["inputText", "dimensions", "normalize", "embeddingTypes"].contains(&k.as_str())
            })
        }) {
            return error(
                400,
                "ValidationException",
                "Malformed input request: #: extraneous key is not permitted, please reformat your input and try again.",
            );
        }
        return json_response(
            200,
            json!({"embedding": embed(text), "inputTextTokenCount": count_tokens(text)}),
        );
    }
    error(
        404,
        "ResourceNotFoundException",
        "Could not resolve the foundation model from the provided model identifier.",
    )
}

/// One event-stream message: prelude (lengths + CRC), string headers, payload, message CRC.
pub fn encode_frame(headers: &[(&str, &str)], payload: &[u8]) -> Vec<u8> {
    let mut h = Vec::new();
    for (name, value) in headers {
        h.push(name.len() as u8);
        h.extend_from_slice(name.as_bytes());
        h.push(7);
        h.extend_from_slice(&(value.len() as u16).to_be_bytes());
        h.extend_from_slice(value.as_bytes());
    }
    let total = (12 + h.len() + payload.len() + 4) as u32;
    let mut out = Vec::with_capacity(total as usize);
    out.extend_from_slice(&total.to_be_bytes());
    out.extend_from_slice(&(h.len() as u32).to_be_bytes());
    let prelude_crc = crc32fast::hash(&out);
    out.extend_from_slice(&prelude_crc.to_be_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(payload);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_be_bytes());
    out
}
