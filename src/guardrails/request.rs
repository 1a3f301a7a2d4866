//! The texts of a call: every text the caller sends (messages of every role, text parts, tool
//! calls' arguments and tool results, prompts, embeddings inputs, the text fields of a native
//! Messages body) and every text the caller receives in a plain answer (choices' text and tool
//! calls' arguments).

use serde_json::Value;

use super::mask::Finding;
use super::{Guard, Phase};
use crate::llm::{Content, Generation, LlmRequest};

/// Checks and masks every text of `request` in place.
pub fn check_request(
    guard: &Guard,
    request: &mut LlmRequest,
    findings: &mut Vec<Finding>,
) -> Result<(), Finding> {
    visit_request(request, &mut |t: &mut String| {
        guard.check_text(Phase::Request, t, findings)
    })
}

/// Calls `check` on every text of `request` the caller sent, in order (the same order each time:
/// the external checks collect the texts once and write them back masked).
pub fn visit_request<E>(
    request: &mut LlmRequest,
    check: &mut impl FnMut(&mut String) -> Result<(), E>,
) -> Result<(), E> {
    match request {
        LlmRequest::Chat(chat) => {
            for m in &mut chat.messages {
                match &mut m.content {
                    Content::Text(t) => check(t)?,
                    Content::Parts(parts) => {
                        for part in parts {
                            if let Some(Value::String(t)) = part.get_mut("text") {
                                check(t)?;
                            }
                        }
                    }
                    Content::Empty => {}
                }
                for call in &mut m.tool_calls {
                    check(&mut call.arguments)?;
                }
            }
        }
        LlmRequest::Completions(c) => check(&mut c.prompt)?,
        LlmRequest::Embeddings(e) => {
            for input in &mut e.input {
                check(input)?;
            }
        }
        LlmRequest::Native(n) => {
            for key in ["system", "messages"] {
                if let Some(v) = n.body.get_mut(key) {
                    native_texts(v, check)?;
                }
            }
        }
    }
    Ok(())
}

/// The caller's texts in a Messages body: string contents, `text` blocks, tool inputs and tool
/// results; not opaque fields (base64 `data`, `signature`s, ids, types).
fn native_texts<E>(
    value: &mut Value,
    check: &mut impl FnMut(&mut String) -> Result<(), E>,
) -> Result<(), E> {
    match value {
        Value::String(s) => check(s),
        Value::Array(items) => items.iter_mut().try_for_each(|v| native_texts(v, check)),
        Value::Object(fields) => {
            for (k, v) in fields.iter_mut() {
                match (k.as_str(), v) {
                    ("text" | "content" | "thinking", v) => native_texts(v, check)?,
                    ("input", v @ Value::Object(_)) => {
                        // Tool inputs are checked as the JSON text the model wrote.
                        let mut text = v.to_string();
                        let before = text.clone();
                        check(&mut text)?;
                        if text != before
                            && let Ok(masked) = serde_json::from_str(&text)
                        {
                            *v = masked;
                        }
                    }
                    _ => {}
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Checks and masks a plain answer's texts in place.
pub fn check_generation(
    guard: &Guard,
    g: &mut Generation,
    findings: &mut Vec<Finding>,
) -> Result<(), Finding> {
    visit_generation(g, &mut |t: &mut String| {
        guard.check_text(Phase::Response, t, findings)
    })
}

/// Calls `check` on every text of a plain answer: each choice's text, then its tool calls'
/// arguments.
pub fn visit_generation<E>(
    g: &mut Generation,
    check: &mut impl FnMut(&mut String) -> Result<(), E>,
) -> Result<(), E> {
    for c in &mut g.choices {
        check(&mut c.text)?;
        for call in &mut c.tool_calls {
            check(&mut call.arguments)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testing::guard;
    use super::*;
    use crate::llm::{ChatMessage, ChatRequest, NativeRequest, Params, StreamOptions};
    use serde_json::json;

    #[test]
    fn every_text_of_a_chat_request_is_masked() {
        let g = guard("checks:\n- {name: mail, action: mask, detector: {builtin: email}}");
        let mut r = LlmRequest::Chat(ChatRequest {
            messages: vec![
                ChatMessage::openai(json!({"role": "system", "content": "ops@corp.com"})),
                ChatMessage::openai(
                    json!({"role": "user", "content": [{"type": "text", "text": "me: a@b.io"}, {"type": "image_url", "image_url": {"url": "x@y.zz"}}]}),
                ),
                ChatMessage::openai(
                    json!({"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{\"to\":\"c@d.org\"}"}}]}),
                ),
                ChatMessage::tool_result("1", "sent to c@d.org"),
            ],
            params: Params::default(),
            stream: StreamOptions::default(),
            extra: Default::default(),
        });
        let mut f = Vec::new();
        check_request(&g, &mut r, &mut f).unwrap();
        let LlmRequest::Chat(c) = r else { panic!() };
        let body = serde_json::to_string(&c.messages).unwrap();
        assert!(
            !body.contains("ops@corp.com") && !body.contains("a@b.io") && !body.contains("c@d.org"),
            "{body}"
        );
        assert!(body.contains("x@y.zz"), "image urls are no text: {body}");
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn native_messages_bodies_are_masked() {
        let g = guard("checks:\n- {name: k, action: mask, detector: {builtin: secret}}");
        let key = "sk-ant-api03-abcdefghijklmnopqrstuvwxyz";
        let body = json!({"system": [{"type": "text", "text": key}], "messages": [
            {"role": "user", "content": key},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "text", "text": key}]},
                                         {"type": "image", "source": {"type": "base64", "data": "sk-ant-api03-abcdefghijklmnopqrstuvwxyz"}}]},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"k": key}}]}
        ]});
        let mut r = LlmRequest::Native(NativeRequest {
            route_type: crate::api::RouteType::Chat,
            body: body.as_object().unwrap().clone(),
            stream: false,
            max_tokens: Some(1),
            prompt_chars: 0,
            headers: vec![],
        });
        check_request(&g, &mut r, &mut Vec::new()).unwrap();
        let LlmRequest::Native(n) = r else { panic!() };
        let text = serde_json::to_string(&n.body).unwrap();
        assert_eq!(
            text.matches(key).count(),
            1,
            "only the image data is left: {text}"
        );
        assert_eq!(text.matches("[SECRET]").count(), 4, "{text}");
    }
}
