//! Anthropic's Messages wire format and its mapping to the unified model, in both directions: the
//! adapter (`super`) writes requests and reads answers and streams; the `/v1/messages` surface
//! (`dataplane::anthropic`) reads requests and writes answers and streams. One place for each
//! shape, so the two sides cannot drift apart.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::llm::{self, ToolCall};
use crate::providers::features::{Image, ToolChoice};

// --- Content blocks -------------------------------------------------------------------------

pub fn block_type(block: &Value) -> Option<&str> {
    block.get("type").and_then(Value::as_str)
}

pub fn text_block(text: &str) -> Value {
    json!({"type": "text", "text": text})
}

/// A call as a `tool_use` block; `input` is the arguments as the object Anthropic wants (each side
/// decides what becomes of arguments that are no object).
pub fn tool_use_block(call: &ToolCall, input: Value) -> Value {
    json!({"type": "tool_use", "id": call.id, "name": call.name, "input": input})
}

/// A `tool_use` block as a call; `None` when its id or name is not a string.
pub fn tool_call(block: &Value) -> Option<ToolCall> {
    let id = block.get("id").and_then(Value::as_str)?;
    let name = block.get("name").and_then(Value::as_str)?;
    let input = block
        .get("input")
        .map_or_else(|| "{}".into(), Value::to_string);
    Some(ToolCall::function(id, name, input))
}

/// A unified image part as an `image` block.
pub fn image_block(image: Image<'_>) -> Value {
    match image {
        Image::Inline { media_type, data } => {
            json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}})
        }
        Image::Url(url) => json!({"type": "image", "source": {"type": "url", "url": url}}),
    }
}

/// An `image` block as a unified `image_url` part (a `data:` URL for base64 sources); the error
/// says what is wrong, after the block's path.
pub fn image_part(block: &Value) -> Result<Value, String> {
    let source = block.get("source").ok_or(".source is required")?;
    let url = match source.get("type").and_then(Value::as_str) {
        Some("base64") => {
            let media = source.get("media_type").and_then(Value::as_str);
            let data = source.get("data").and_then(Value::as_str);
            match (media, data) {
                (Some(m), Some(d)) if m.starts_with("image/") && !d.is_empty() => {
                    format!("data:{m};base64,{d}")
                }
                _ => return Err(".source needs an image media_type and base64 data".into()),
            }
        }
        Some("url") => match source.get("url").and_then(Value::as_str) {
            Some(u) if u.starts_with("https://") || u.starts_with("http://") => u.to_string(),
            _ => return Err(".source.url must be an http(s) URL".into()),
        },
        other => {
            return Err(format!(
                ".source.type {other:?} is not supported; send base64 or url image sources"
            ));
        }
    };
    Ok(json!({"type": "image_url", "image_url": {"url": url}}))
}

// --- Tools ----------------------------------------------------------------------------------

/// A unified function tool as an Anthropic custom tool.
pub fn tool_definition(name: &str, description: &str, schema: &Value) -> Value {
    json!({"name": name, "description": description, "input_schema": schema})
}

/// An Anthropic tool definition as a unified (OpenAI) function tool; only custom tools translate.
pub fn function_tool(tool: &Value) -> Result<Value, String> {
    match tool.get("type").and_then(Value::as_str) {
        None | Some("custom") => {}
        Some(kind) => {
            return Err(format!(
                ": tool type {kind:?} is a tool Anthropic runs itself; the gateway passes only custom tools (name, description, input_schema)"
            ));
        }
    }
    let name = tool
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty() && n.len() <= 128)
        .ok_or(".name must be a non-empty string")?;
    let schema = tool
        .get("input_schema")
        .filter(|s| s.get("type").and_then(Value::as_str) == Some("object"))
        .ok_or(".input_schema must be a JSON Schema object with \"type\": \"object\"")?;
    let mut function = json!({"name": name, "parameters": schema});
    match tool.get("description") {
        None | Some(Value::Null) => {}
        Some(Value::String(d)) => function["description"] = json!(d),
        Some(_) => return Err(".description must be a string".into()),
    }
    Ok(json!({"type": "function", "function": function}))
}

/// A unified tool choice as Anthropic's.
pub fn tool_choice(choice: &ToolChoice<'_>) -> Value {
    match choice {
        ToolChoice::Auto => json!({"type": "auto"}),
        ToolChoice::None => json!({"type": "none"}),
        ToolChoice::Required => json!({"type": "any"}),
        ToolChoice::Function(name) => json!({"type": "tool", "name": name}),
    }
}

/// Anthropic's `tool_choice` as the unified (OpenAI) one, and whether parallel calls are allowed.
pub fn unified_tool_choice(choice: &Value) -> Result<(Value, bool), &'static str> {
    let parallel = !choice
        .get("disable_parallel_tool_use")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mapped = match choice.get("type").and_then(Value::as_str) {
        Some("auto") => json!("auto"),
        Some("any") => json!("required"),
        Some("none") => json!("none"),
        Some("tool") => match choice.get("name").and_then(Value::as_str) {
            Some(name) => json!({"type": "function", "function": {"name": name}}),
            None => return Err("tool_choice of type \"tool\" needs a 'name'"),
        },
        _ => return Err("'tool_choice' must be an object with type auto, any, tool or none"),
    };
    Ok((mapped, parallel))
}

// --- Answers --------------------------------------------------------------------------------

/// A unified finish reason as Anthropic's `stop_reason` (the adapter reads Anthropic's through
/// `providers::normalize_finish_reason`, with every provider's).
pub fn stop_reason(finish: Option<&str>) -> &'static str {
    match finish {
        Some("length") => "max_tokens",
        Some("tool_calls") => "tool_use",
        Some("content_filter") => "refusal",
        _ => "end_turn",
    }
}

/// Token counts as Anthropic reports them.
#[derive(Serialize, Deserialize, Default, Clone, Copy, Debug, PartialEq)]
pub struct Usage {
    #[serde(default, deserialize_with = "llm::token_count")]
    pub input_tokens: Option<u64>,
    #[serde(default, deserialize_with = "llm::token_count")]
    pub output_tokens: Option<u64>,
    #[serde(
        default,
        deserialize_with = "llm::token_count",
        skip_serializing_if = "Option::is_none"
    )]
    pub cache_creation_input_tokens: Option<u64>,
    #[serde(
        default,
        deserialize_with = "llm::token_count",
        skip_serializing_if = "Option::is_none"
    )]
    pub cache_read_input_tokens: Option<u64>,
}

impl Usage {
    /// Input counts cache writes and reads too; `input` overrides with an earlier report (streams).
    pub fn into_usage(self, input: Option<u64>) -> llm::Usage {
        let prompt = input.or_else(|| {
            self.input_tokens.map(|i| {
                i.saturating_add(self.cache_creation_input_tokens.unwrap_or(0))
                    .saturating_add(self.cache_read_input_tokens.unwrap_or(0))
            })
        });
        llm::Usage::new(prompt, self.output_tokens).with_cached(self.cache_read_input_tokens)
    }

    /// Unified counts as Anthropic reports them (zero for a count not known).
    pub fn reported(u: &llm::Usage) -> Usage {
        Usage {
            input_tokens: Some(u.prompt_tokens.unwrap_or(0)),
            output_tokens: Some(u.completion_tokens.unwrap_or(0)),
            ..Usage::default()
        }
    }
}

/// A message: the non-streamed answer, and `message_start`'s.
#[derive(Serialize, Deserialize)]
pub struct Message {
    #[serde(default)]
    pub id: String,
    #[serde(rename = "type", default = "message_type")]
    pub kind: String,
    #[serde(default = "assistant")]
    pub role: String,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub content: Vec<Value>,
    pub stop_reason: Option<String>,
    #[serde(default)]
    pub stop_sequence: Option<String>,
    pub usage: Option<Usage>,
}

fn message_type() -> String {
    "message".into()
}

fn assistant() -> String {
    "assistant".into()
}

impl Message {
    /// An assistant message as the gateway writes it.
    pub fn assistant(
        id: String,
        model: &str,
        content: Vec<Value>,
        stop_reason: Option<&str>,
        usage: Usage,
    ) -> Message {
        Message {
            id,
            kind: message_type(),
            role: assistant(),
            model: model.to_string(),
            content,
            stop_reason: stop_reason.map(str::to_string),
            stop_sequence: None,
            usage: Some(usage),
        }
    }
}

// --- Streams --------------------------------------------------------------------------------

/// A stream event: its `type` is also the SSE event's name.
#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    MessageStart {
        message: Message,
    },
    ContentBlockStart {
        #[serde(default)]
        index: u64,
        #[serde(default)]
        content_block: Value,
    },
    ContentBlockDelta {
        #[serde(default)]
        index: u64,
        delta: Delta,
    },
    ContentBlockStop {
        #[serde(default)]
        index: u64,
    },
    MessageDelta {
        #[serde(default)]
        delta: MessageDelta,
        usage: Option<Usage>,
    },
    MessageStop,
    Ping,
    Error {
        #[serde(default)]
        error: Value,
    },
    /// An event type to come: skipped.
    #[serde(other)]
    Other,
}

impl Event {
    pub fn name(&self) -> &'static str {
        match self {
            Event::MessageStart { .. } => "message_start",
            Event::ContentBlockStart { .. } => "content_block_start",
            Event::ContentBlockDelta { .. } => "content_block_delta",
            Event::ContentBlockStop { .. } => "content_block_stop",
            Event::MessageDelta { .. } => "message_delta",
            Event::MessageStop => "message_stop",
            Event::Ping => "ping",
            Event::Error { .. } => "error",
            Event::Other => "other",
        }
    }
}

/// A content block's increment.
#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Delta {
    TextDelta {
        #[serde(default)]
        text: String,
    },
    InputJsonDelta {
        #[serde(default)]
        partial_json: String,
    },
    /// Thinking, signatures, citations: passed through natively, not translated.
    #[serde(other)]
    Other,
}

#[derive(Serialize, Deserialize, Default)]
pub struct MessageDelta {
    pub stop_reason: Option<String>,
    #[serde(default)]
    pub stop_sequence: Option<String>,
}
