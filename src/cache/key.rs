//! What makes two calls the same: the Route (and its backends), the caller's scope, and the
//! request after parsing, so the same question asked through any surface has one key. Fields that
//! do not change the answer are left out, so a streamed call and a plain one share an entry.

use std::io::Write;

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::llm::{ChatRequest, LlmRequest};

/// Request fields that never change an answer: how it is delivered, and who or what asked.
const NOT_IN_KEY: &[&str] = &[
    "stream",
    "stream_options",
    "user",
    "metadata",
    "request_id",
    "store",
    "service_tier",
];

/// A cache key: the SHA-256 of everything that decides the answer, as hex.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CacheKey(pub String);

/// Bumped when the stored format or what the key covers changes: old entries are then not read.
const VERSION: &[u8] = b"portcullis-cache-v1\0";

/// The key of `request` on the Route `route_digest` for callers of `scope`; `None` for a request
/// that is never cached (a native pass-through: see the README).
pub fn cache_key(route_digest: &[u8; 32], scope: &str, request: &LlmRequest) -> Option<CacheKey> {
    let mut h = Hashed(Sha256::new());
    h.0.update(VERSION);
    h.0.update(route_digest);
    h.0.update(scope.as_bytes());
    h.0.update([0]);
    // Writing JSON into a hasher cannot fail.
    let _ = match request {
        LlmRequest::Chat(c) => {
            h.0.update(b"chat\0");
            serde_json::to_writer(&mut h, &c.messages)
                .and_then(|()| serde_json::to_writer(&mut h, &c.params))
                .and_then(|()| write_extra(&mut h, &c.extra))
        }
        LlmRequest::Completions(c) => {
            h.0.update(b"completions\0");
            serde_json::to_writer(&mut h, &c.prompt)
                .and_then(|()| serde_json::to_writer(&mut h, &c.params))
                .and_then(|()| write_extra(&mut h, &c.extra))
        }
        LlmRequest::Embeddings(e) => {
            h.0.update(b"embeddings\0");
            serde_json::to_writer(&mut h, &e.input).and_then(|()| write_extra(&mut h, &e.extra))
        }
        LlmRequest::Native(_) => return None,
    };
    let digest = h.0.finalize();
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(64);
    for b in digest {
        hex.push(DIGITS[usize::from(b >> 4)] as char);
        hex.push(DIGITS[usize::from(b & 15)] as char);
    }
    Some(CacheKey(hex))
}

/// What a chat call is besides its messages (the Route, the scope, the sampling parameters and
/// every other field in the key): semantic matching compares prompts of the same shape only.
pub fn chat_shape(route_digest: &[u8; 32], scope: &str, chat: &ChatRequest) -> [u8; 32] {
    let mut h = Hashed(Sha256::new());
    h.0.update(VERSION);
    h.0.update(route_digest);
    h.0.update(scope.as_bytes());
    h.0.update(b"\0chat-shape\0");
    // Writing JSON into a hasher cannot fail.
    let _ =
        serde_json::to_writer(&mut h, &chat.params).and_then(|()| write_extra(&mut h, &chat.extra));
    h.0.finalize().into()
}

/// The caller's other fields (tools, response format, seed, ...) in key order, less those that do
/// not change the answer.
fn write_extra(h: &mut Hashed, extra: &Map<String, Value>) -> serde_json::Result<()> {
    for (k, v) in extra
        .iter()
        .filter(|(k, _)| !NOT_IN_KEY.contains(&k.as_str()))
    {
        serde_json::to_writer(&mut *h, k)?;
        h.0.update(b":");
        serde_json::to_writer(&mut *h, v)?;
    }
    Ok(())
}

struct Hashed(Sha256);

impl Write for Hashed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::{ChatMessage, ChatRequest, Params, StreamOptions};
    use serde_json::json;

    fn chat(text: &str, params: Params, extra: Value, stream: bool) -> LlmRequest {
        let Value::Object(extra) = extra else {
            panic!()
        };
        LlmRequest::Chat(ChatRequest {
            messages: vec![ChatMessage::openai(
                json!({"role": "user", "content": text}),
            )],
            params,
            stream: StreamOptions {
                stream,
                include_usage: stream,
            },
            extra,
        })
    }

    fn key(scope: &str, request: &LlmRequest) -> CacheKey {
        cache_key(&[7; 32], scope, request).unwrap()
    }

    #[test]
    fn delivery_and_caller_fields_are_not_in_the_key_but_the_question_is() {
        let base = key("c:a", &chat("hi", Params::default(), json!({}), false));
        let streamed = chat(
            "hi",
            Params::default(),
            json!({"stream_options": {"include_usage": true}, "user": "u-1"}),
            true,
        );
        assert_eq!(base, key("c:a", &streamed));
        let hot = Params {
            temperature: Some(0.5),
            ..Default::default()
        };
        let short = Params {
            max_tokens: Some(5),
            ..Default::default()
        };
        for other in [
            chat("hi!", Params::default(), json!({}), false),
            chat("hi", hot, json!({}), false),
            chat("hi", short, json!({}), false),
            chat(
                "hi",
                Params::default(),
                json!({"tools": [{"type": "function"}]}),
                false,
            ),
            chat(
                "hi",
                Params::default(),
                json!({"response_format": {"type": "json_object"}}),
                false,
            ),
        ] {
            assert_ne!(base, key("c:a", &other));
        }
        let same = chat("hi", Params::default(), json!({}), false);
        assert_ne!(base, key("c:b", &same), "another scope");
        assert_ne!(
            base,
            cache_key(&[8; 32], "c:a", &same).unwrap(),
            "another model"
        );
        assert_eq!(base.0.len(), 64);
    }
}
