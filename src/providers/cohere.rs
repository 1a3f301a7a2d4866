//! Cohere: v2 Chat (typed SSE events), v2 Embed, and v1 Generate for completions (NDJSON streams).

use http::StatusCode;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::features::{self, OutputFormat, ToolChoice};
use super::sse::{JsonLines, SseDecoder, SseEvent, SseHandler};
use super::{
    ProviderAdapter, ProviderError, ProviderInfo, StreamDecoder, Target, UpstreamRequest,
    malformed, normalize_finish_reason, openai, post_json, present_fields, reject_n, single_choice,
};
use crate::api::{Provider, RouteType};
use crate::llm::{
    ChatMessage, ChatRequest, Choice, CompletionsRequest, Content, Embeddings, EmbeddingsRequest,
    Generation, LlmRequest, LlmResponse, Params, Role, StreamDelta, ToolCall, ToolCallDelta, Usage,
    unix_now,
};

/// v3+ embed models require an `input_type`; callers may pass one (or set `config.inputType`).
pub const DEFAULT_INPUT_TYPE: &str = "search_document";

pub struct Cohere;

impl ProviderAdapter for Cohere {
    fn info(&self) -> &'static ProviderInfo {
        &super::info::COHERE
    }

    fn build_request(
        &self,
        target: &Target,
        request: &LlmRequest,
    ) -> Result<UpstreamRequest, ProviderError> {
        let (path, body) = match request {
            LlmRequest::Chat(chat) => ("/v2/chat", chat_body(target, chat)?),
            LlmRequest::Completions(c) => ("/v1/generate", generate_body(target, c)),
            LlmRequest::Embeddings(e) => ("/v2/embed", embed_body(target, e)),
            LlmRequest::Native(_) => return Err(super::native_unsupported(Provider::Cohere)),
        };
        Ok(post_json(
            format!("{}{path}", target.api_base),
            openai::bearer_headers(target)?,
            &body,
        ))
    }

    fn parse_response(
        &self,
        _target: &Target,
        route_type: RouteType,
        body: &[u8],
    ) -> Result<LlmResponse, ProviderError> {
        match route_type {
            RouteType::Chat => parse_chat(body),
            RouteType::Completions => parse_generate(body),
            RouteType::Embeddings => {
                let wire: WireEmbed = serde_json::from_slice(body).map_err(malformed)?;
                let tokens = wire
                    .meta
                    .and_then(|m| m.billed_units)
                    .and_then(|b| b.input_tokens);
                Ok(LlmResponse::Embeddings(Embeddings {
                    model: String::new(),
                    data: wire.embeddings.float,
                    usage: Usage {
                        prompt_tokens: tokens,
                        completion_tokens: None,
                        total_tokens: tokens,
                        cached_prompt_tokens: None,
                    },
                }))
            }
        }
    }

    fn stream_decoder(&self, route_type: RouteType) -> Box<dyn StreamDecoder> {
        match route_type {
            RouteType::Completions => Box::new(GenerateStream::default()),
            _ => SseDecoder::boxed(ChatStream::default()),
        }
    }
}

fn sampling(body: &mut Map<String, Value>, params: &Params) {
    body.extend(present_fields([
        ("max_tokens", params.max_tokens.map(|v| json!(v))),
        ("temperature", params.temperature.map(|v| json!(v))),
        ("p", params.top_p.map(|v| json!(v))),
        ("stop_sequences", params.stop.as_ref().map(|v| json!(v))),
    ]));
}

/// Caller fields Cohere understands under the same name.
fn pass_through(body: &mut Map<String, Value>, extra: &Map<String, Value>, keys: &[&str]) {
    for key in keys {
        if let Some(v) = extra.get(*key) {
            body.insert((*key).to_string(), v.clone());
        }
    }
}

/// A message's content for Cohere: its text, or text and image parts (v2's image parts are
/// OpenAI's) when it holds images.
fn content(m: &ChatMessage) -> Result<Value, ProviderError> {
    let Content::Parts(parts) = &m.content else {
        return Ok(json!(m.text()));
    };
    if !features::has_images(std::slice::from_ref(m)) {
        return Ok(json!(m.text()));
    }
    let mut out = Vec::new();
    for p in parts {
        if features::image(p)?.is_some() {
            out.push(
                json!({"type": "image_url", "image_url": {"url": p.pointer("/image_url/url")}}),
            );
        } else if let Some(t) = p.get("text").and_then(Value::as_str) {
            out.push(json!({"type": "text", "text": t}));
        }
    }
    Ok(Value::Array(out))
}

fn chat_body(target: &Target, chat: &ChatRequest) -> Result<Value, ProviderError> {
    reject_n(Provider::Cohere, &chat.params)?;
    let messages = chat
        .messages
        .iter()
        .map(|m| {
            let role = match &m.role {
                Role::Developer => "system",
                other => other.as_str(),
            };
            let mut out = Map::new();
            out.insert("role".into(), json!(role));
            let content = content(m)?;
            // An assistant turn that only calls tools has no content.
            if content != "" || m.tool_calls.is_empty() {
                out.insert("content".into(), content);
            }
            if !m.tool_calls.is_empty() {
                out.insert("tool_calls".into(), json!(m.tool_calls));
            }
            if let Some(id) = &m.tool_call_id {
                out.insert("tool_call_id".into(), json!(id));
            }
            Ok(Value::Object(out))
        })
        .collect::<Result<Vec<Value>, ProviderError>>()?;
    let mut body = Map::new();
    body.insert("model".into(), json!(target.model));
    body.insert("messages".into(), Value::Array(messages));
    sampling(&mut body, &chat.params);
    pass_through(
        &mut body,
        &chat.extra,
        &["seed", "frequency_penalty", "presence_penalty"],
    );
    let tools = features::tools(&chat.extra)?;
    let choice = features::tool_choice(&chat.extra)?;
    if !tools.is_empty() {
        // Cohere cannot name the tool to call: naming one offers only that one, required.
        let forced = match choice {
            Some(ToolChoice::Function(name)) => Some(name),
            _ => None,
        };
        let offered: Vec<Value> = tools
            .iter()
            .filter(|t| forced.is_none_or(|f| f == t.name))
            .map(|t| json!({"type": "function", "function": {"name": t.name, "description": t.description.unwrap_or_default(), "parameters": t.parameters}}))
            .collect();
        body.insert("tools".into(), Value::Array(offered));
        match choice {
            Some(ToolChoice::Required | ToolChoice::Function(_)) => {
                body.insert("tool_choice".into(), json!("REQUIRED"));
            }
            Some(ToolChoice::None) => {
                body.insert("tool_choice".into(), json!("NONE"));
            }
            _ => {}
        }
    }
    match features::output_format(&chat.extra)? {
        Some(OutputFormat::JsonObject) => {
            body.insert("response_format".into(), json!({"type": "json_object"}));
        }
        Some(OutputFormat::JsonSchema { schema, .. }) => {
            body.insert(
                "response_format".into(),
                json!({"type": "json_object", "json_schema": schema}),
            );
        }
        None => {}
    }
    if chat.stream.stream {
        body.insert("stream".into(), json!(true));
    }
    Ok(Value::Object(body))
}

fn generate_body(target: &Target, c: &CompletionsRequest) -> Value {
    let mut body = Map::new();
    body.insert("model".into(), json!(target.model));
    body.insert("prompt".into(), json!(c.prompt));
    sampling(&mut body, &c.params);
    if let Some(n) = c.params.n {
        body.insert("num_generations".into(), json!(n));
    }
    pass_through(
        &mut body,
        &c.extra,
        &["seed", "frequency_penalty", "presence_penalty", "truncate"],
    );
    if c.stream.stream {
        body.insert("stream".into(), json!(true));
    }
    Value::Object(body)
}

fn embed_body(target: &Target, e: &EmbeddingsRequest) -> Value {
    let input_type = e
        .extra
        .get("input_type")
        .cloned()
        .or_else(|| target.config.get("inputType").map(|v| json!(v)))
        .unwrap_or(json!(DEFAULT_INPUT_TYPE));
    let mut body = Map::new();
    body.insert("model".into(), json!(target.model));
    body.insert("texts".into(), json!(e.input));
    body.insert("input_type".into(), input_type);
    body.insert("embedding_types".into(), json!(["float"]));
    pass_through(&mut body, &e.extra, &["truncate", "output_dimension"]);
    if let Some(d) = e.extra.get("dimensions") {
        body.insert("output_dimension".into(), d.clone());
    }
    Value::Object(body)
}

#[derive(Deserialize, Default)]
struct WireTokens {
    #[serde(default, deserialize_with = "crate::llm::token_count")]
    input_tokens: Option<u64>,
    #[serde(default, deserialize_with = "crate::llm::token_count")]
    output_tokens: Option<u64>,
}

/// Cohere reports what the model saw (`tokens`) and what is billed; the former is the usage.
#[derive(Deserialize, Default)]
struct WireUsage {
    tokens: Option<WireTokens>,
    billed_units: Option<WireTokens>,
}

impl WireUsage {
    fn usage(self) -> Usage {
        let t = self.tokens.or(self.billed_units).unwrap_or_default();
        Usage::new(t.input_tokens, t.output_tokens)
    }
}

#[derive(Deserialize)]
struct WireChat {
    #[serde(default)]
    id: String,
    finish_reason: Option<String>,
    message: WireChatMessage,
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireChatMessage {
    #[serde(default)]
    content: Vec<Value>,
    #[serde(default, deserialize_with = "crate::llm::tool_calls_or_none")]
    tool_calls: Vec<ToolCall>,
}

fn parse_chat(body: &[u8]) -> Result<LlmResponse, ProviderError> {
    let wire: WireChat = serde_json::from_slice(body).map_err(malformed)?;
    let text: String = wire
        .message
        .content
        .iter()
        .filter(|c| c["type"] == "text")
        .filter_map(|c| c["text"].as_str())
        .collect();
    Ok(single_choice(
        wire.id,
        String::new(),
        text,
        wire.finish_reason.as_deref(),
        wire.message.tool_calls,
        wire.usage.map(WireUsage::usage).unwrap_or_default(),
    ))
}

#[derive(Deserialize)]
struct WireGenerate {
    #[serde(default)]
    id: String,
    generations: Vec<WireGeneration>,
    meta: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireGeneration {
    #[serde(default)]
    text: String,
    index: Option<u32>,
    finish_reason: Option<String>,
}

fn parse_generate(body: &[u8]) -> Result<LlmResponse, ProviderError> {
    let wire: WireGenerate = serde_json::from_slice(body).map_err(malformed)?;
    Ok(LlmResponse::Generation(Generation {
        id: wire.id,
        created: unix_now(),
        model: String::new(),
        choices: wire
            .generations
            .into_iter()
            .enumerate()
            .map(|(i, g)| Choice {
                index: g.index.unwrap_or(i as u32),
                text: g.text,
                finish_reason: Some(
                    g.finish_reason
                        .as_deref()
                        .and_then(normalize_finish_reason)
                        .unwrap_or_else(|| "stop".into()),
                ),
                tool_calls: Vec::new(),
                message_extra: Map::new(),
            })
            .collect(),
        usage: wire.meta.map(WireUsage::usage).unwrap_or_default(),
    }))
}

#[derive(Deserialize)]
struct WireEmbed {
    embeddings: WireEmbeddingsByType,
    meta: Option<WireMeta>,
}

#[derive(Deserialize)]
struct WireEmbeddingsByType {
    float: Vec<Vec<f64>>,
}

#[derive(Deserialize)]
struct WireMeta {
    billed_units: Option<WireBilled>,
}

#[derive(Deserialize)]
struct WireBilled {
    #[serde(default, deserialize_with = "crate::llm::token_count")]
    input_tokens: Option<u64>,
}

/// v2 chat stream: `message-start`, `content-delta`s, `tool-call-start`/`-delta`s, `message-end`
/// with the finish reason and usage.
#[derive(Default)]
struct ChatStream {
    id: Option<String>,
    /// Cohere's index of each tool call so far, in call order (the position is the call's index).
    tool_calls: Vec<u64>,
}

impl SseHandler for ChatStream {
    fn event(&mut self, event: SseEvent, out: &mut Vec<StreamDelta>) -> Result<(), ProviderError> {
        if event.data == "[DONE]" {
            return Ok(());
        }
        let v: Value = serde_json::from_str(&event.data).map_err(malformed)?;
        let base = StreamDelta {
            id: self.id.clone(),
            ..Default::default()
        };
        match v["type"].as_str().or(event.event.as_deref()) {
            Some("message-start") => {
                self.id = v["id"].as_str().map(str::to_string);
                out.push(StreamDelta {
                    id: self.id.clone(),
                    role: Some(Role::Assistant),
                    ..base
                });
            }
            Some("content-delta") => {
                if let Some(text) = v
                    .pointer("/delta/message/content/text")
                    .and_then(Value::as_str)
                {
                    out.push(StreamDelta {
                        text: Some(text.to_string()),
                        ..base
                    });
                }
            }
            Some("tool-call-start") => {
                let call = v
                    .pointer("/delta/message/tool_calls")
                    .cloned()
                    .unwrap_or_default();
                let index = self.tool_calls.len() as u32;
                self.tool_calls
                    .push(v["index"].as_u64().unwrap_or_default());
                out.push(StreamDelta {
                    tool_calls: vec![ToolCallDelta {
                        index,
                        id: call["id"].as_str().map(str::to_string),
                        name: call
                            .pointer("/function/name")
                            .and_then(Value::as_str)
                            .map(str::to_string),
                        arguments: call
                            .pointer("/function/arguments")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_string(),
                    }],
                    ..base
                });
            }
            Some("tool-call-delta") => {
                let theirs = v["index"].as_u64().unwrap_or_default();
                let fragment = v
                    .pointer("/delta/message/tool_calls/function/arguments")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                if let Some(index) = self.tool_calls.iter().rposition(|i| *i == theirs) {
                    out.push(StreamDelta {
                        tool_calls: vec![ToolCallDelta {
                            index: index as u32,
                            arguments: fragment.to_string(),
                            ..Default::default()
                        }],
                        ..base
                    });
                }
            }
            Some("message-end") => {
                let delta = &v["delta"];
                if let Some(err) = delta.get("error").and_then(Value::as_str) {
                    return Err(ProviderError::Upstream {
                        status: StatusCode::BAD_GATEWAY,
                        message: err.to_string(),
                        retry_after: None,
                    });
                }
                let usage = serde_json::from_value::<WireUsage>(delta["usage"].clone())
                    .ok()
                    .map(WireUsage::usage);
                // message-end is the end marker: it ends the answer, reason or not.
                out.push(StreamDelta {
                    finish_reason: Some(
                        delta["finish_reason"]
                            .as_str()
                            .and_then(normalize_finish_reason)
                            .unwrap_or_else(|| "stop".into()),
                    ),
                    usage,
                    ..base
                });
            }
            _ => {}
        }
        Ok(())
    }
}

/// v1 generate stream: NDJSON `text-generation` lines, then `stream-end` (or `stream-error`).
#[derive(Default)]
struct GenerateStream {
    lines: JsonLines,
    pending: Vec<String>,
}

impl GenerateStream {
    fn drain(&mut self, out: &mut Vec<StreamDelta>) -> Result<(), ProviderError> {
        for line in self.pending.drain(..) {
            let v: Value = serde_json::from_str(&line).map_err(malformed)?;
            match v["event_type"].as_str() {
                Some("text-generation") => out.push(StreamDelta {
                    index: v["index"]
                        .as_u64()
                        .and_then(|i| u32::try_from(i).ok())
                        .unwrap_or(0),
                    text: v["text"].as_str().map(str::to_string),
                    ..Default::default()
                }),
                Some("stream-end") => {
                    let response = &v["response"];
                    // stream-end is the end marker: it ends every generation, reason or not.
                    let reason = v["finish_reason"]
                        .as_str()
                        .and_then(normalize_finish_reason)
                        .or_else(|| Some("stop".into()));
                    let count = response["generations"]
                        .as_array()
                        .map_or(1, Vec::len)
                        .max(1);
                    for index in 0..count {
                        out.push(StreamDelta {
                            id: response["id"].as_str().map(str::to_string),
                            index: index as u32,
                            finish_reason: reason.clone(),
                            ..Default::default()
                        });
                    }
                    if let Ok(meta) = serde_json::from_value::<WireUsage>(response["meta"].clone())
                    {
                        out.push(StreamDelta {
                            usage: Some(meta.usage()),
                            ..Default::default()
                        });
                    }
                }
                Some("stream-error") => {
                    return Err(ProviderError::Upstream {
                        status: StatusCode::BAD_GATEWAY,
                        message: v["err"]
                            .as_str()
                            .or(v["message"].as_str())
                            .unwrap_or("upstream stream error")
                            .to_string(),
                        retry_after: None,
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }
}

impl StreamDecoder for GenerateStream {
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<StreamDelta>) -> Result<(), ProviderError> {
        // Lines complete before an oversized one are still delivered, then the error.
        let framed = self.lines.feed(bytes, &mut self.pending);
        self.drain(out)?;
        framed
    }

    fn finish(&mut self, out: &mut Vec<StreamDelta>) -> Result<(), ProviderError> {
        self.lines.finish(&mut self.pending);
        self.drain(out)
    }

    fn set_max_frame(&mut self, max_bytes: usize) {
        self.lines.set_max_frame(max_bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::StreamOptions;
    use crate::providers::testing::{decode_split, text};
    use crate::providers::{API_KEY, Credentials, SecretValue};
    use http::HeaderMap;
    use proptest::prelude::*;

    fn target() -> Target {
        let mut credentials = Credentials::default();
        credentials.insert(API_KEY, SecretValue::new("co-key"));
        Target {
            model: "command-r".into(),
            api_base: "https://api.cohere.com".into(),
            credentials,
            config: Default::default(),
        }
    }

    fn body(req: &UpstreamRequest) -> Value {
        serde_json::from_slice(&req.body).unwrap_or_default()
    }

    #[test]
    fn chat_request_maps_params_to_cohere_names() {
        let req = Cohere
            .build_request(
                &target(),
                &LlmRequest::Chat(ChatRequest {
                    messages: vec![
                        ChatMessage::from_json("system", json!("Be terse.")),
                        ChatMessage::from_json(
                            "user",
                            json!([{"type": "text", "text": "Name a prime."}]),
                        ),
                    ],
                    params: Params {
                        temperature: Some(0.3),
                        top_p: Some(0.9),
                        max_tokens: Some(20),
                        stop: Some(vec!["END".into()]),
                        n: None,
                    },
                    stream: StreamOptions {
                        stream: true,
                        include_usage: true,
                    },
                    extra: Map::new(),
                }),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(req.url, "https://api.cohere.com/v2/chat");
        assert_eq!(req.headers["authorization"], "Bearer co-key");
        assert!(req.headers["authorization"].is_sensitive());
        assert_eq!(
            body(&req),
            json!({"model":"command-r","messages":[{"role":"system","content":"Be terse."},{"role":"user","content":"Name a prime."}],
                   "max_tokens":20,"temperature":0.3,"p":0.9,"stop_sequences":["END"],"stream":true})
        );
    }

    #[test]
    fn generate_and_embed_requests() {
        let req = Cohere
            .build_request(
                &target(),
                &LlmRequest::Completions(CompletionsRequest {
                    prompt: "Once".into(),
                    params: Params {
                        n: Some(2),
                        max_tokens: Some(3),
                        ..Default::default()
                    },
                    stream: StreamOptions::default(),
                    extra: Map::new(),
                }),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(req.url, "https://api.cohere.com/v1/generate");
        assert_eq!(
            body(&req),
            json!({"model":"command-r","prompt":"Once","max_tokens":3,"num_generations":2})
        );
        let req = Cohere
            .build_request(
                &target(),
                &LlmRequest::Embeddings(EmbeddingsRequest {
                    input: vec!["a".into(), "b".into()],
                    extra: Map::new(),
                }),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(req.url, "https://api.cohere.com/v2/embed");
        assert_eq!(
            body(&req),
            json!({"model":"command-r","texts":["a","b"],"input_type":"search_document","embedding_types":["float"]})
        );
    }

    #[test]
    fn chat_n_above_one_is_refused() {
        let err = Cohere
            .build_request(
                &target(),
                &LlmRequest::Chat(ChatRequest {
                    messages: vec![],
                    params: Params {
                        n: Some(3),
                        ..Default::default()
                    },
                    stream: StreamOptions::default(),
                    extra: Map::new(),
                }),
            )
            .err();
        assert!(matches!(err, Some(ProviderError::Unsupported(m)) if m.contains("n > 1")));
    }

    #[test]
    fn parses_chat_generate_and_embed_answers() {
        let chat = br#"{"id":"c1","finish_reason":"MAX_TOKENS","message":{"role":"assistant","content":[{"type":"thinking","thinking":"x"},{"type":"text","text":"7"}]},"usage":{"billed_units":{"input_tokens":5,"output_tokens":1},"tokens":{"input_tokens":70,"output_tokens":1}}}"#;
        let Ok(LlmResponse::Generation(g)) =
            Cohere.parse_response(&target(), RouteType::Chat, chat)
        else {
            panic!("chat")
        };
        assert_eq!(g.choices[0].text, "7");
        assert_eq!(g.choices[0].finish_reason.as_deref(), Some("length"));
        assert_eq!(g.usage, Usage::new(Some(70), Some(1)));
        let gen_body = br#"{"id":"g","prompt":"Once","generations":[{"id":"a","text":" upon","index":0},{"id":"b","text":" more","index":1,"finish_reason":"MAX_TOKENS"}],"meta":{"billed_units":{"input_tokens":1,"output_tokens":2}}}"#;
        let Ok(LlmResponse::Generation(g)) =
            Cohere.parse_response(&target(), RouteType::Completions, gen_body)
        else {
            panic!("generate")
        };
        assert_eq!(g.choices.len(), 2);
        assert_eq!(g.choices[1].finish_reason.as_deref(), Some("length"));
        assert_eq!(g.usage, Usage::new(Some(1), Some(2)));
        let emb = br#"{"id":"e","response_type":"embeddings_by_type","embeddings":{"float":[[0.1],[0.2]]},"texts":["a","b"],"meta":{"billed_units":{"input_tokens":2}}}"#;
        let Ok(LlmResponse::Embeddings(e)) =
            Cohere.parse_response(&target(), RouteType::Embeddings, emb)
        else {
            panic!("embed")
        };
        assert_eq!(e.data, vec![vec![0.1], vec![0.2]]);
        assert_eq!(e.usage.prompt_tokens, Some(2));
    }

    #[test]
    fn error_message_is_kept() {
        let err = Cohere.parse_error(
            StatusCode::TOO_MANY_REQUESTS,
            &HeaderMap::new(),
            br#"{"id":"x","message":"You are past the per minute request limit"}"#,
        );
        assert!(
            matches!(err, ProviderError::Upstream { ref message, .. } if message == "You are past the per minute request limit")
        );
    }

    const CHAT_STREAM: &str = "event: message-start\ndata: {\"id\":\"m1\",\"type\":\"message-start\",\"delta\":{\"message\":{\"role\":\"assistant\"}}}\n\nevent: content-start\ndata: {\"type\":\"content-start\",\"index\":0,\"delta\":{\"message\":{\"content\":{\"type\":\"text\",\"text\":\"\"}}}}\n\nevent: content-delta\ndata: {\"type\":\"content-delta\",\"index\":0,\"delta\":{\"message\":{\"content\":{\"text\":\"Hel\"}}}}\n\nevent: content-delta\ndata: {\"type\":\"content-delta\",\"index\":0,\"delta\":{\"message\":{\"content\":{\"text\":\"lo\"}}}}\n\nevent: content-end\ndata: {\"type\":\"content-end\",\"index\":0}\n\nevent: message-end\ndata: {\"type\":\"message-end\",\"delta\":{\"finish_reason\":\"COMPLETE\",\"usage\":{\"billed_units\":{\"input_tokens\":5,\"output_tokens\":2},\"tokens\":{\"input_tokens\":70,\"output_tokens\":2}}}}\n\n";

    const GENERATE_STREAM: &str = "{\"is_finished\":false,\"event_type\":\"text-generation\",\"text\":\" upon\",\"index\":0}\n{\"is_finished\":false,\"event_type\":\"text-generation\",\"text\":\" a\",\"index\":0}\n{\"is_finished\":true,\"event_type\":\"stream-end\",\"finish_reason\":\"COMPLETE\",\"response\":{\"id\":\"g1\",\"generations\":[{\"id\":\"a\",\"text\":\" upon a\",\"index\":0,\"finish_reason\":\"COMPLETE\"}],\"meta\":{\"billed_units\":{\"input_tokens\":1,\"output_tokens\":2}}}}\n";

    #[test]
    fn chat_stream_text_finish_and_usage() {
        let out = decode_split(&Cohere, RouteType::Chat, CHAT_STREAM.as_bytes(), vec![])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(text(&out), "Hello");
        let last = out.last().cloned().unwrap_or_default();
        assert_eq!(last.finish_reason.as_deref(), Some("stop"));
        assert_eq!(last.usage, Some(Usage::new(Some(70), Some(2))));
    }

    #[test]
    fn generate_stream_text_finish_and_usage() {
        let out = decode_split(
            &Cohere,
            RouteType::Completions,
            GENERATE_STREAM.as_bytes(),
            vec![],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(text(&out), " upon a");
        assert!(
            out.iter()
                .any(|d| d.finish_reason.as_deref() == Some("stop"))
        );
        assert_eq!(
            out.iter().filter_map(|d| d.usage).collect::<Vec<_>>(),
            vec![Usage::new(Some(1), Some(2))]
        );
        let err = decode_split(
            &Cohere,
            RouteType::Completions,
            b"{\"event_type\":\"stream-error\",\"is_finished\":true,\"err\":\"boom\"}",
            vec![],
        )
        .err();
        assert!(matches!(err, Some(ProviderError::Upstream { message, .. }) if message == "boom"));
    }

    proptest! {
        #[test]
        fn streams_are_the_same_however_they_are_cut(cuts in proptest::collection::vec(0..400usize, 0..8)) {
            for (rt, wire) in [(RouteType::Chat, CHAT_STREAM), (RouteType::Completions, GENERATE_STREAM)] {
                let whole = decode_split(&Cohere, rt, wire.as_bytes(), vec![]);
                prop_assert_eq!(decode_split(&Cohere, rt, wire.as_bytes(), cuts.clone()), whole);
            }
        }
    }

    #[test]
    fn chat_stream_tool_calls_and_request_features() {
        use crate::providers::testing::{finish, tool_calls};
        let ev = |data: Value| {
            format!(
                "event: {}\ndata: {data}\n\n",
                data["type"].as_str().unwrap_or_default()
            )
        };
        let wire = [
            ev(json!({"type": "message-start", "id": "m1", "delta": {"message": {"role": "assistant"}}})),
            ev(json!({"type": "tool-plan-delta", "delta": {"message": {"tool_plan": "I will look it up."}}})),
            ev(json!({"type": "tool-call-start", "index": 0, "delta": {"message": {"tool_calls": {"id": "get_weather_x1", "type": "function", "function": {"name": "get_weather", "arguments": ""}}}}})),
            ev(json!({"type": "tool-call-delta", "index": 0, "delta": {"message": {"tool_calls": {"function": {"arguments": "{\"city\":"}}}}})),
            ev(json!({"type": "tool-call-delta", "index": 0, "delta": {"message": {"tool_calls": {"function": {"arguments": "\"Paris\"}"}}}}})),
            ev(json!({"type": "tool-call-end", "index": 0})),
            ev(json!({"type": "message-end", "delta": {"finish_reason": "TOOL_CALL", "usage": {"tokens": {"input_tokens": 5, "output_tokens": 9}}}})),
        ]
        .concat();
        let out = decode_split(&Cohere, RouteType::Chat, wire.as_bytes(), vec![])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            tool_calls(&out),
            vec![(
                "get_weather_x1".into(),
                "get_weather".into(),
                "{\"city\":\"Paris\"}".into()
            )]
        );
        assert_eq!(finish(&out), Some("tool_calls"));

        let extra = json!({
            "tools": [{"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}}, {"type": "function", "function": {"name": "b"}}],
            "tool_choice": {"type": "function", "function": {"name": "b"}},
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
        });
        let req = LlmRequest::Chat(ChatRequest {
            messages: vec![ChatMessage::from_json(
                "user",
                json!([{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "https://img.example/a.png"}}]),
            )],
            params: Params::default(),
            stream: StreamOptions::default(),
            extra: extra.as_object().cloned().unwrap_or_default(),
        });
        let built = Cohere
            .build_request(&target(), &req)
            .unwrap_or_else(|e| panic!("{e}"));
        let b: Value = serde_json::from_slice(&built.body).unwrap_or_default();
        assert_eq!(
            b["messages"][0]["content"],
            json!([{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "https://img.example/a.png"}}])
        );
        assert_eq!(b["tools"].as_array().map(Vec::len), Some(1));
        assert_eq!(b["tools"][0]["function"]["name"], "b");
        assert_eq!(b["tool_choice"], "REQUIRED");
        assert_eq!(
            b["response_format"],
            json!({"type": "json_object", "json_schema": {"type": "object"}})
        );
    }

    #[test]
    fn a_chat_stream_without_message_end_never_finishes() {
        use crate::providers::testing::finish;
        let cut = CHAT_STREAM
            .find("event: message-end")
            .unwrap_or(CHAT_STREAM.len());
        let out = decode_split(
            &Cohere,
            RouteType::Chat,
            &CHAT_STREAM.as_bytes()[..cut],
            vec![],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(text(&out), "Hello");
        assert_eq!(finish(&out), None);
    }
}
