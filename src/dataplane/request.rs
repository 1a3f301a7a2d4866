//! Field-by-field parsing of request bodies shared by the API surfaces. Each helper removes the
//! fields it understands from the body, so whatever remains can be passed through to the provider.

use serde_json::{Map, Value};

use super::error::GatewayError;
use crate::api::RouteType;
use crate::llm::{
    ChatMessage, ChatRequest, CompletionsRequest, EmbeddingsRequest, LlmRequest, Params,
    StreamOptions,
};

type Body = Map<String, Value>;

/// The `{name}` of a per-route path; axum's own rejection would answer in plain text.
/// The route named by a path: `{name}` (a one-word or `%2F`-encoded qualified name) or
/// `{namespace}/{name}`.
pub fn route_name(
    path: Result<axum::extract::Path<Vec<String>>, axum::extract::rejection::PathRejection>,
) -> Result<String, GatewayError> {
    path.map(|p| p.0.join("/"))
        .map_err(|e| GatewayError::bad_request(e.body_text()))
}

/// What differs between the surfaces' request bodies: names and ranges of a few fields.
pub struct Dialect {
    /// The number of alternatives: OpenAI's `n`, MLflow 2.5's `candidate_count`.
    pub n_field: &'static str,
    pub n_max: u64,
    pub temperature_max: f64,
    /// The embeddings input: OpenAI's `input`, MLflow 2.5's `text`.
    pub input_field: &'static str,
}

/// OpenAI's API, also spoken by MLflow's deployments surface.
pub const OPENAI: Dialect = Dialect {
    n_field: "n",
    n_max: 128,
    temperature_max: 2.0,
    input_field: "input",
};

/// A body (without `model`) for a route of `route_type`, in the unified model; unknown fields stay in `extra`.
pub fn parse_request(
    route_type: RouteType,
    mut body: Body,
    dialect: &Dialect,
) -> Result<LlmRequest, GatewayError> {
    Ok(match route_type {
        RouteType::Chat => {
            let messages = take_messages(&mut body)?;
            LlmRequest::Chat(ChatRequest {
                messages,
                params: take_params(&mut body, dialect)?,
                stream: take_stream(&mut body)?,
                extra: body,
            })
        }
        RouteType::Completions => {
            let prompt = take_prompt(&mut body)?;
            LlmRequest::Completions(CompletionsRequest {
                prompt,
                params: take_params(&mut body, dialect)?,
                stream: take_stream(&mut body)?,
                extra: body,
            })
        }
        RouteType::Embeddings => {
            let input = take_input(&mut body, dialect.input_field)?;
            let _ = take_string(&mut body, "encoding_format")?;
            LlmRequest::Embeddings(EmbeddingsRequest { input, extra: body })
        }
    })
}

pub fn take_string(body: &mut Body, field: &'static str) -> Result<Option<String>, GatewayError> {
    match body.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(wrong_type(field, "a string", &other)),
    }
}

/// `field` checked as `take_string` takes it, in place.
pub fn string_or_null(body: &Body, field: &'static str) -> Result<(), GatewayError> {
    match body.get(field) {
        None | Some(Value::Null | Value::String(_)) => Ok(()),
        Some(other) => Err(wrong_type(field, "a string", other)),
    }
}

pub fn require_string(body: &mut Body, field: &'static str) -> Result<String, GatewayError> {
    take_string(body, field)?
        .ok_or_else(|| GatewayError::bad_param(field, format!("'{field}' is required")))
}

pub fn take_bool(body: &mut Body, field: &'static str) -> Result<Option<bool>, GatewayError> {
    match body.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(b)),
        Some(other) => Err(wrong_type(field, "a boolean", &other)),
    }
}

pub fn take_number(
    body: &mut Body,
    field: &'static str,
    min: f64,
    max: f64,
) -> Result<Option<f64>, GatewayError> {
    number(field, body.remove(field).as_ref(), min, max)
}

fn number(
    field: &'static str,
    value: Option<&Value>,
    min: f64,
    max: f64,
) -> Result<Option<f64>, GatewayError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => {
            let v = n.as_f64().unwrap_or(f64::NAN);
            if (min..=max).contains(&v) {
                Ok(Some(v))
            } else {
                Err(GatewayError::bad_param(
                    field,
                    format!("'{field}' must be between {min} and {max}, got {v}"),
                ))
            }
        }
        Some(other) => Err(wrong_type(field, "a number", other)),
    }
}

pub fn take_count(
    body: &mut Body,
    field: &'static str,
    min: u64,
    max: u64,
) -> Result<Option<u32>, GatewayError> {
    count(field, body.remove(field).as_ref(), min, max)
}

pub fn count(
    field: &'static str,
    value: Option<&Value>,
    min: u64,
    max: u64,
) -> Result<Option<u32>, GatewayError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if (min..=max).contains(&v) => Ok(Some(v as u32)),
            _ => Err(GatewayError::bad_param(
                field,
                format!("'{field}' must be an integer from {min} to {max}, got {n}"),
            )),
        },
        Some(other) => Err(wrong_type(field, "an integer", other)),
    }
}

/// `stop`: a string or a list of strings.
pub fn take_stop(body: &mut Body) -> Result<Option<Vec<String>>, GatewayError> {
    let stop = body.remove("stop");
    check_stop(stop.as_ref())?;
    Ok(stop.filter(|v| !v.is_null()).map(into_strings))
}

/// A checked string or list of strings, as a list.
fn into_strings(value: Value) -> Vec<String> {
    match value {
        Value::String(s) => vec![s],
        Value::Array(items) => items
            .into_iter()
            .filter_map(|v| match v {
                Value::String(s) => Some(s),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn check_stop(stop: Option<&Value>) -> Result<(), GatewayError> {
    let wrong = |other: &Value| wrong_type("stop", "a string or a list of strings", other);
    match stop {
        None | Some(Value::Null | Value::String(_)) => Ok(()),
        Some(Value::Array(items)) => match items.iter().find(|v| !v.is_string()) {
            Some(other) => Err(wrong(other)),
            None => Ok(()),
        },
        Some(other) => Err(wrong(other)),
    }
}

/// The OpenAI-style sampling parameters, with the surface's name and ranges where they differ.
pub fn take_params(body: &mut Body, dialect: &Dialect) -> Result<Params, GatewayError> {
    Ok(Params {
        temperature: take_number(body, "temperature", 0.0, dialect.temperature_max)?,
        top_p: take_number(body, "top_p", 0.0, 1.0)?,
        max_tokens: take_count(body, "max_tokens", 1, u32::MAX as u64)?,
        stop: take_stop(body)?,
        n: take_count(body, dialect.n_field, 1, dialect.n_max)?,
    })
}

/// `take_params`' checks, in its order and with its errors, on a body left as it is (a
/// pass-through call sends it on); its `max_tokens`.
pub fn check_params(body: &Body, dialect: &Dialect) -> Result<Option<u32>, GatewayError> {
    number(
        "temperature",
        body.get("temperature"),
        0.0,
        dialect.temperature_max,
    )?;
    number("top_p", body.get("top_p"), 0.0, 1.0)?;
    let max_tokens = count("max_tokens", body.get("max_tokens"), 1, u32::MAX as u64)?;
    check_stop(body.get("stop"))?;
    count(dialect.n_field, body.get(dialect.n_field), 1, dialect.n_max)?;
    Ok(max_tokens)
}

/// `prompt`: a string (or OpenAI's list holding one string).
pub fn take_prompt(body: &mut Body) -> Result<String, GatewayError> {
    check_prompt(body)?;
    Ok(match body.remove("prompt") {
        Some(Value::String(s)) => s,
        Some(Value::Array(mut items)) => match items.pop() {
            Some(Value::String(s)) => s,
            _ => String::new(),
        },
        _ => String::new(),
    })
}

/// `prompt` checked as `take_prompt` takes it, in place; its length.
pub fn check_prompt(body: &Body) -> Result<usize, GatewayError> {
    match body.get("prompt") {
        Some(Value::String(s)) => Ok(s.len()),
        Some(Value::Array(items)) if items.len() == 1 && items[0].is_string() => {
            Ok(items[0].as_str().map_or(0, str::len))
        }
        None | Some(Value::Null) => Err(GatewayError::bad_param("prompt", "'prompt' is required")),
        Some(other) => Err(wrong_type("prompt", "a string", other)),
    }
}

/// Embeddings input from `field`: a string or a non-empty list of strings.
pub fn take_input(body: &mut Body, field: &'static str) -> Result<Vec<String>, GatewayError> {
    check_input(body, field)?;
    Ok(body.remove(field).map(into_strings).unwrap_or_default())
}

/// Embeddings input checked as `take_input` takes it, in place; its length.
pub fn check_input(body: &Body, field: &'static str) -> Result<usize, GatewayError> {
    let expected = "a string or a list of strings";
    match body.get(field) {
        Some(Value::String(s)) => Ok(s.len()),
        Some(Value::Array(items)) if items.is_empty() => Err(GatewayError::bad_param(
            field,
            format!("'{field}' must not be empty"),
        )),
        Some(Value::Array(items)) => items.iter().try_fold(0, |n, v| match v {
            Value::String(s) => Ok(n + s.len()),
            other => Err(wrong_type(field, expected, other)),
        }),
        None | Some(Value::Null) => Err(GatewayError::bad_param(
            field,
            format!("'{field}' is required"),
        )),
        Some(other) => Err(wrong_type(field, expected, other)),
    }
}

/// Per-route paths: the route defines the model, so a `model` key is refused (422), as MLflow does.
pub fn reject_model(body: &Body) -> Result<(), GatewayError> {
    if body.contains_key("model") {
        return Err(GatewayError::Unprocessable(
            "The parameter 'model' is not permitted to be passed. The route being queried already defines a model instance."
                .into(),
        ));
    }
    Ok(())
}

/// A body written for another route type (chat `messages` sent to an embeddings route, ...) is a
/// mistake about the route, not a malformed body: 400 naming both types, before field validation.
pub fn check_body_kind(
    route: &str,
    route_type: RouteType,
    body: &Body,
    input_field: &'static str,
) -> Result<(), GatewayError> {
    let key = |t: RouteType| match t {
        RouteType::Chat => "messages",
        RouteType::Completions => "prompt",
        RouteType::Embeddings => input_field,
    };
    if body.contains_key(key(route_type)) {
        return Ok(());
    }
    let written_for = [
        RouteType::Chat,
        RouteType::Completions,
        RouteType::Embeddings,
    ]
    .into_iter()
    .find(|t| body.contains_key(key(*t)));
    match written_for {
        Some(requested) => Err(GatewayError::WrongRouteType {
            route: route.to_string(),
            actual: route_type,
            requested,
        }),
        None => Ok(()),
    }
}

pub fn take_stream(body: &mut Body) -> Result<StreamOptions, GatewayError> {
    let options = stream_options(body)?;
    body.remove("stream");
    body.remove("stream_options");
    Ok(options)
}

/// `stream` and `stream_options.include_usage`, read without taking them.
pub fn stream_options(body: &Body) -> Result<StreamOptions, GatewayError> {
    let stream = match body.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => return Err(wrong_type("stream", "a boolean", other)),
    };
    let include_usage = match body.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(opts)) => match opts.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(wrong_type(
                    "stream_options",
                    "an object with a boolean include_usage",
                    other,
                ));
            }
        },
        Some(other) => return Err(wrong_type("stream_options", "an object", other)),
    };
    Ok(StreamOptions {
        stream,
        include_usage,
    })
}

/// `messages`: a non-empty list of `{role, content}` objects.
pub fn take_messages(body: &mut Body) -> Result<Vec<ChatMessage>, GatewayError> {
    let items = match body.remove("messages") {
        Some(Value::Array(items)) => items,
        None | Some(Value::Null) => {
            return Err(GatewayError::bad_param(
                "messages",
                "'messages' is required",
            ));
        }
        Some(other) => return Err(wrong_type("messages", "a list of messages", &other)),
    };
    if items.is_empty() {
        return Err(GatewayError::bad_param(
            "messages",
            "'messages' must contain at least one message",
        ));
    }
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let Value::Object(m) = item else {
                return Err(GatewayError::bad_param(
                    "messages",
                    format!("messages[{i}] must be an object with 'role' and 'content'"),
                ));
            };
            ChatMessage::from_openai(m)
                .map_err(|e| GatewayError::bad_param("messages", format!("messages[{i}].{e}")))
        })
        .collect()
}

fn wrong_type(field: &'static str, expected: &str, got: &Value) -> GatewayError {
    let kind = match got {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    };
    GatewayError::bad_param(field, format!("'{field}' must be {expected}, got {kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(v: Value) -> Body {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn params_are_validated_and_removed() {
        let mut b =
            body(json!({"temperature": 0.3, "max_tokens": 5, "stop": "x", "n": 2, "seed": 1}));
        let p = take_params(&mut b, &OPENAI).unwrap();
        assert_eq!(p.temperature, Some(0.3));
        assert_eq!(p.stop, Some(vec!["x".to_string()]));
        assert_eq!(b, body(json!({"seed": 1})));
    }

    #[test]
    fn out_of_range_and_wrong_types_name_the_field() {
        let err = |v: Value| {
            take_params(&mut body(v), &OPENAI)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(err(json!({"temperature": 3})).contains("'temperature' must be between 0 and 2"));
        assert!(
            err(json!({"temperature": "hot"}))
                .contains("'temperature' must be a number, got a string")
        );
        assert!(err(json!({"max_tokens": 0})).contains("'max_tokens' must be an integer"));
        assert!(err(json!({"n": 1.5})).contains("'n' must be an integer"));
    }

    #[test]
    fn messages_must_be_a_non_empty_list_of_role_content() {
        assert!(take_messages(&mut body(json!({"messages": []}))).is_err());
        assert!(take_messages(&mut body(json!({}))).is_err());
        assert!(take_messages(&mut body(json!({"messages": [{"content": "x"}]}))).is_err());
        let m = take_messages(&mut body(
            json!({"messages": [{"role": "user", "content": "x", "name": "n"}]}),
        ))
        .unwrap();
        assert_eq!(m[0].extra, body(json!({"name": "n"})));
    }
}
