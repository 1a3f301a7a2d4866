//! The richer parts of OpenAI's chat request that adapters translate to their provider's own
//! shapes: image parts, function tools and the tool choice, and structured output.
//!
//! Each reader validates what it reads: a malformed value is the caller's error (a 400), never a
//! field silently dropped on the way upstream.

use serde_json::{Map, Value, json};

use super::ProviderError;
use crate::api::Provider;
use crate::llm::{ChatMessage, Content};

/// The tool that carries structured output on providers that only force a tool's input into a
/// schema (Anthropic, Bedrock): its input comes back as the message text, never as a tool call.
pub const OUTPUT_TOOL: &str = "portcullis_structured_output";

/// An `image_url` part's image.
#[derive(Debug, PartialEq)]
pub enum Image<'a> {
    /// A `data:<media type>;base64,<data>` URL.
    Inline { media_type: &'a str, data: &'a str },
    /// An `https:` (or `http:`) URL, for the provider to fetch; the gateway never fetches it.
    Url(&'a str),
}

/// The image of a content part, `None` for parts that are not images.
pub fn image(part: &Value) -> Result<Option<Image<'_>>, ProviderError> {
    if part.get("type").and_then(Value::as_str) != Some("image_url") {
        return Ok(None);
    }
    let url = part
        .pointer("/image_url/url")
        .or_else(|| part.get("image_url"))
        .and_then(Value::as_str)
        .ok_or_else(|| bad("an image_url part needs image_url.url"))?;
    if let Some(rest) = url.strip_prefix("data:") {
        let (media_type, data) = rest
            .split_once(";base64,")
            .ok_or_else(|| bad("a data: image URL must be data:<media type>;base64,<data>"))?;
        if !media_type.starts_with("image/") {
            return Err(bad(format!(
                "a data: image URL must hold an image/* media type, not {media_type:?}"
            )));
        }
        return Ok(Some(Image::Inline { media_type, data }));
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(Some(Image::Url(url)));
    }
    Err(bad("an image URL must be an https: or a data: URL"))
}

/// Whether any message holds an image part.
pub fn has_images(messages: &[ChatMessage]) -> bool {
    messages.iter().any(|m| {
        matches!(&m.content, Content::Parts(parts) if parts.iter().any(|p| p["type"] == "image_url"))
    })
}

/// A 400 naming `provider` when a message holds an image.
pub fn refuse_images(provider: Provider, messages: &[ChatMessage]) -> Result<(), ProviderError> {
    if has_images(messages) {
        return Err(ProviderError::Unsupported(format!(
            "provider {provider} does not accept images in messages"
        )));
    }
    Ok(())
}

/// One function tool of `tools`.
#[derive(Debug, PartialEq)]
pub struct Tool<'a> {
    pub name: &'a str,
    pub description: Option<&'a str>,
    /// The parameters' JSON Schema; an object schema with no properties when not given.
    pub parameters: Value,
}

/// The function tools of `extra.tools` (OpenAI's shape).
pub fn tools(extra: &Map<String, Value>) -> Result<Vec<Tool<'_>>, ProviderError> {
    let list = match extra.get("tools") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(bad("'tools' must be a list of function tools")),
    };
    list.iter()
        .enumerate()
        .map(|(i, t)| {
            if t.get("type").and_then(Value::as_str).unwrap_or("function") != "function" {
                return Err(bad(format!("tools[{i}] must be of type function")));
            }
            let f = t
                .get("function")
                .ok_or_else(|| bad(format!("tools[{i}].function is required")))?;
            let name = f
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .ok_or_else(|| bad(format!("tools[{i}].function.name must be a string")))?;
            if name == OUTPUT_TOOL {
                return Err(bad(format!("the tool name {OUTPUT_TOOL} is reserved")));
            }
            let parameters = match f.get("parameters") {
                None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
                Some(p @ Value::Object(_)) => p.clone(),
                Some(_) => {
                    return Err(bad(format!(
                        "tools[{i}].function.parameters must be a JSON Schema object"
                    )));
                }
            };
            Ok(Tool {
                name,
                description: f.get("description").and_then(Value::as_str),
                parameters,
            })
        })
        .collect()
}

/// OpenAI's `tool_choice`.
#[derive(Debug, PartialEq)]
pub enum ToolChoice<'a> {
    Auto,
    None,
    Required,
    Function(&'a str),
}

pub fn tool_choice(extra: &Map<String, Value>) -> Result<Option<ToolChoice<'_>>, ProviderError> {
    Ok(Some(match extra.get("tool_choice") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => match s.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            other => return Err(bad(format!("unknown tool_choice {other:?}"))),
        },
        Some(v) => ToolChoice::Function(
            v.pointer("/function/name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("tool_choice must be auto, none, required or a function"))?,
        ),
    }))
}

/// OpenAI's `response_format`.
#[derive(Debug, PartialEq)]
pub enum OutputFormat {
    JsonObject,
    JsonSchema { name: String, schema: Value },
}

/// The structured output asked for; `None` for plain text.
pub fn output_format(extra: &Map<String, Value>) -> Result<Option<OutputFormat>, ProviderError> {
    let Some(format) = extra.get("response_format").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(OutputFormat::JsonObject)),
        Some("json_schema") => {
            let spec = format
                .get("json_schema")
                .ok_or_else(|| bad("response_format.json_schema is required"))?;
            let schema = spec
                .get("schema")
                .filter(|s| s.is_object())
                .cloned()
                .unwrap_or_else(|| json!({"type": "object"}));
            Ok(Some(OutputFormat::JsonSchema {
                name: spec
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("output")
                    .to_string(),
                schema,
            }))
        }
        _ => Err(bad(
            "response_format.type must be text, json_object or json_schema",
        )),
    }
}

impl OutputFormat {
    /// The JSON Schema the answer must follow (any object for `json_object`).
    pub fn schema(&self) -> Value {
        match self {
            OutputFormat::JsonObject => json!({"type": "object"}),
            OutputFormat::JsonSchema { schema, .. } => schema.clone(),
        }
    }
}

/// A 400 naming `provider` when structured output is asked for.
pub fn refuse_output_format(
    provider: Provider,
    extra: &Map<String, Value>,
) -> Result<(), ProviderError> {
    if output_format(extra)?.is_some() {
        return Err(ProviderError::Unsupported(format!(
            "provider {provider} does not support response_format (structured output)"
        )));
    }
    Ok(())
}

/// The tools the conversation's earlier calls name, sorted, each once: what a provider that
/// refuses tool calls without tool definitions (Anthropic, Bedrock) must be told of when a
/// conversation that used tools continues without them.
pub fn called_tools(messages: &[ChatMessage]) -> Vec<&str> {
    let mut used: Vec<&str> = messages
        .iter()
        .flat_map(|m| &m.tool_calls)
        .map(|c| c.name.as_str())
        .collect();
    used.sort_unstable();
    used.dedup();
    used
}

/// The function name of the assistant tool call `id` among `messages`: providers that key tool
/// results by name (Gemini) need it, OpenAI's tool messages only carry the call's id.
pub fn tool_name_for<'a>(messages: &'a [ChatMessage], id: &str) -> Option<&'a str> {
    messages
        .iter()
        .flat_map(|m| &m.tool_calls)
        .find(|c| c.id == id)
        .map(|c| c.name.as_str())
}

fn bad(message: impl Into<String>) -> ProviderError {
    ProviderError::Unsupported(message.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extra(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn images_from_data_and_https_urls_and_nothing_else() {
        let part = |url: &str| json!({"type": "image_url", "image_url": {"url": url}});
        assert_eq!(
            image(&part("data:image/png;base64,iVBO")).ok().flatten(),
            Some(Image::Inline {
                media_type: "image/png",
                data: "iVBO"
            })
        );
        assert_eq!(
            image(&part("https://x.example/a.jpg")).ok().flatten(),
            Some(Image::Url("https://x.example/a.jpg"))
        );
        assert!(image(&part("file:///etc/passwd")).is_err());
        assert!(image(&part("data:text/plain;base64,aGk=")).is_err());
        assert!(image(&part("data:image/png,raw")).is_err());
        assert_eq!(
            image(&json!({"type": "text", "text": "x"})).ok().flatten(),
            None
        );
    }

    #[test]
    fn tools_choices_and_formats_are_read_and_checked() {
        let e = extra(
            json!({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}], "tool_choice": {"type": "function", "function": {"name": "f"}}}),
        );
        let t = tools(&e).unwrap_or_default();
        assert_eq!(t[0].name, "f");
        assert_eq!(
            tool_choice(&e).ok().flatten(),
            Some(ToolChoice::Function("f"))
        );
        assert!(
            tools(&extra(
                json!({"tools": [{"type": "function", "function": {}}]})
            ))
            .is_err()
        );
        assert!(tools(&extra(json!({"tools": {"a": 1}}))).is_err());
        let reserved = json!({"tools": [{"type": "function", "function": {"name": OUTPUT_TOOL}}]});
        assert!(tools(&extra(reserved)).is_err());
        let f = output_format(&extra(
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}}}),
        ));
        assert!(
            matches!(f, Ok(Some(OutputFormat::JsonSchema { ref name, .. })) if name == "p"),
            "{f:?}"
        );
        assert_eq!(
            output_format(&extra(json!({"response_format": {"type": "text"}}))),
            Ok(None)
        );
        assert!(output_format(&extra(json!({"response_format": {"type": "xml"}}))).is_err());
    }
}
