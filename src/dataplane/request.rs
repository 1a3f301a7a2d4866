//! Field-by-field parsing of request bodies shared by the API surfaces. Each helper removes the
//! fields it understands from the body, so whatever remains can be passed through to the provider.

use serde_json::{Map, Value};

use super::error::GatewayError;
use crate::llm::{ChatMessage, Params, StreamOptions};

type Body = Map<String, Value>;

pub fn take_string(body: &mut Body, field: &'static str) -> Result<Option<String>, GatewayError> {
    match body.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(wrong_type(field, "a string", &other)),
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
    match body.remove(field) {
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
        Some(other) => Err(wrong_type(field, "a number", &other)),
    }
}

pub fn take_count(
    body: &mut Body,
    field: &'static str,
    min: u64,
    max: u64,
) -> Result<Option<u32>, GatewayError> {
    match body.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(v) if (min..=max).contains(&v) => Ok(Some(v as u32)),
            _ => Err(GatewayError::bad_param(
                field,
                format!("'{field}' must be an integer from {min} to {max}, got {n}"),
            )),
        },
        Some(other) => Err(wrong_type(field, "an integer", &other)),
    }
}

/// `stop`: a string or a list of strings.
pub fn take_stop(body: &mut Body) -> Result<Option<Vec<String>>, GatewayError> {
    match body.remove("stop") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(vec![s])),
        Some(Value::Array(items)) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                other => Err(wrong_type("stop", "a string or a list of strings", &other)),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(other) => Err(wrong_type("stop", "a string or a list of strings", &other)),
    }
}

/// The OpenAI-style sampling parameters; `temperature_max` differs per surface.
pub fn take_params(
    body: &mut Body,
    n_field: &'static str,
    temperature_max: f64,
) -> Result<Params, GatewayError> {
    Ok(Params {
        temperature: take_number(body, "temperature", 0.0, temperature_max)?,
        top_p: take_number(body, "top_p", 0.0, 1.0)?,
        max_tokens: take_count(body, "max_tokens", 1, u32::MAX as u64)?,
        stop: take_stop(body)?,
        n: take_count(body, n_field, 1, 128)?,
    })
}

pub fn take_stream(body: &mut Body) -> Result<StreamOptions, GatewayError> {
    let stream = take_bool(body, "stream")?.unwrap_or(false);
    let include_usage = match body.remove("stream_options") {
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
        Some(other) => return Err(wrong_type("stream_options", "an object", &other)),
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
            let Value::Object(mut m) = item else {
                return Err(GatewayError::bad_param(
                    "messages",
                    format!("messages[{i}] must be an object with 'role' and 'content'"),
                ));
            };
            let role = match m.remove("role") {
                Some(Value::String(r)) if !r.is_empty() => r,
                _ => {
                    return Err(GatewayError::bad_param(
                        "messages",
                        format!("messages[{i}].role must be a non-empty string"),
                    ));
                }
            };
            let content = m.remove("content").unwrap_or(Value::Null);
            if !matches!(content, Value::String(_) | Value::Array(_) | Value::Null) {
                return Err(GatewayError::bad_param(
                    "messages",
                    format!("messages[{i}].content must be a string or a list of content parts"),
                ));
            }
            Ok(ChatMessage {
                role,
                content,
                extra: m,
            })
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
        let p = take_params(&mut b, "n", 2.0).unwrap();
        assert_eq!(p.temperature, Some(0.3));
        assert_eq!(p.stop, Some(vec!["x".to_string()]));
        assert_eq!(b, body(json!({"seed": 1})));
    }

    #[test]
    fn out_of_range_and_wrong_types_name_the_field() {
        let err = |v: Value| {
            take_params(&mut body(v), "n", 2.0)
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
