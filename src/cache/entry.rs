//! An answer as the cache stores it: the unified answer (so any surface renders it as a live
//! one), when it was stored, as JSON, LZ4-compressed when large.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::llm::{Choice, Embeddings, Generation, LlmResponse, ToolCall, Usage};

/// Entries at least this large are compressed: below it LZ4 saves little and costs a copy.
const COMPRESS_FROM: usize = 1024;
/// The first byte of a stored entry: how the rest is written.
const PLAIN: u8 = 0;
const LZ4: u8 = 1;
/// The unified finish reason of an answer a provider's content filter or guardrail blocked.
const BLOCKED: &str = "content_filter";

#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    #[error("the entry is not in a format this version reads")]
    Format,
    #[error("the entry decompresses to more than its bound")]
    TooLarge,
}

/// A stored answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Unix milliseconds when it was stored (the `age` of a hit).
    pub stored_ms: u64,
    pub answer: Answer,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Answer {
    Generation {
        id: String,
        created: i64,
        model: String,
        choices: Vec<StoredChoice>,
        usage: Usage,
    },
    Embeddings {
        model: String,
        data: Vec<Vec<f64>>,
        usage: Usage,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredChoice {
    index: u32,
    text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    finish_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<ToolCall>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    message_extra: Map<String, Value>,
}

impl Entry {
    /// The entry of an answer; `None` for one never cached: a native answer, or one a content
    /// filter or guardrail blocked (a block is not an answer to replay; the next call asks again).
    pub fn of(answer: &LlmResponse, stored_ms: u64) -> Option<Entry> {
        let answer = match answer {
            LlmResponse::Generation(g)
                if g.choices
                    .iter()
                    .any(|c| c.finish_reason.as_deref() == Some(BLOCKED)) =>
            {
                return None;
            }
            LlmResponse::Generation(g) => Answer::Generation {
                id: g.id.clone(),
                created: g.created,
                model: g.model.clone(),
                choices: g
                    .choices
                    .iter()
                    .map(|c| StoredChoice {
                        index: c.index,
                        text: c.text.clone(),
                        finish_reason: c.finish_reason.clone(),
                        tool_calls: c.tool_calls.clone(),
                        message_extra: c.message_extra.clone(),
                    })
                    .collect(),
                usage: g.usage,
            },
            LlmResponse::Embeddings(e) => Answer::Embeddings {
                model: e.model.clone(),
                data: e.data.clone(),
                usage: e.usage,
            },
            LlmResponse::Native(_) => return None,
        };
        Some(Entry { stored_ms, answer })
    }

    /// The answer as the forward path gives it to a surface.
    pub fn into_response(self) -> LlmResponse {
        match self.answer {
            Answer::Generation {
                id,
                created,
                model,
                choices,
                usage,
            } => LlmResponse::Generation(Generation {
                id,
                created,
                model,
                choices: choices
                    .into_iter()
                    .map(|c| Choice {
                        index: c.index,
                        text: c.text,
                        finish_reason: c.finish_reason,
                        tool_calls: c.tool_calls,
                        message_extra: c.message_extra,
                    })
                    .collect(),
                usage,
            }),
            Answer::Embeddings { model, data, usage } => {
                LlmResponse::Embeddings(Embeddings { model, data, usage })
            }
        }
    }

    /// The usage the provider reported for the original call.
    pub fn usage(&self) -> Usage {
        match &self.answer {
            Answer::Generation { usage, .. } | Answer::Embeddings { usage, .. } => *usage,
        }
    }

    /// The stored bytes, and the entry's size before compression (what `maxEntryBytes` bounds).
    pub fn encode(&self) -> (Bytes, usize) {
        // Written after its kind byte, so a small entry is stored without a copy.
        let mut out = Vec::with_capacity(COMPRESS_FROM / 2);
        out.push(PLAIN);
        if serde_json::to_writer(&mut out, self).is_err() {
            out.truncate(1);
        }
        let size = out.len() - 1;
        if size >= COMPRESS_FROM {
            let mut packed = vec![LZ4];
            packed.extend_from_slice(&lz4_flex::compress_prepend_size(&out[1..]));
            out = packed;
        }
        (out.into(), size)
    }

    /// An entry read back; `max_bytes` bounds what a compressed one may grow to (a store is shared
    /// and its contents are not trusted to be small).
    pub fn decode(bytes: &[u8], max_bytes: usize) -> Result<Entry, EntryError> {
        let (&kind, rest) = bytes.split_first().ok_or(EntryError::Format)?;
        let json = match kind {
            PLAIN => std::borrow::Cow::Borrowed(rest),
            LZ4 => {
                let size = rest
                    .get(..4)
                    .and_then(|b| <[u8; 4]>::try_from(b).ok())
                    .map(u32::from_le_bytes)
                    .ok_or(EntryError::Format)?;
                if size as usize > max_bytes {
                    return Err(EntryError::TooLarge);
                }
                lz4_flex::decompress_size_prepended(rest)
                    .map_err(|_| EntryError::Format)?
                    .into()
            }
            _ => return Err(EntryError::Format),
        };
        serde_json::from_slice(&json).map_err(|_| EntryError::Format)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generation(text: &str) -> LlmResponse {
        LlmResponse::Generation(Generation {
            id: "chatcmpl-1".into(),
            created: 7,
            model: "m".into(),
            choices: vec![Choice {
                index: 0,
                text: text.into(),
                finish_reason: Some("stop".into()),
                tool_calls: vec![ToolCall::function("c1", "f", "{}".into())],
                message_extra: Map::new(),
            }],
            usage: Usage::new(Some(3), Some(4)),
        })
    }

    #[test]
    fn round_trips_small_and_compressed_and_refuses_what_it_cannot_read() {
        for text in ["hello", &"long text ".repeat(500)] {
            let answer = generation(text);
            let entry = Entry::of(&answer, 42).unwrap();
            let (bytes, size) = entry.encode();
            if text.len() > COMPRESS_FROM {
                assert_eq!(bytes[0], LZ4);
                assert!(bytes.len() < size / 3, "{} of {size}", bytes.len());
            } else {
                assert_eq!(bytes[0], PLAIN);
            }
            let back = Entry::decode(&bytes, 1 << 20).unwrap();
            assert_eq!(back.stored_ms, 42);
            assert_eq!(back.into_response(), answer);
        }
        let big = Entry::of(&generation(&"x".repeat(5000)), 0)
            .unwrap()
            .encode()
            .0;
        assert!(matches!(
            Entry::decode(&big, 100),
            Err(EntryError::TooLarge)
        ));
        let LlmResponse::Generation(mut blocked) = generation("no") else {
            unreachable!()
        };
        blocked.choices[0].finish_reason = Some(BLOCKED.into());
        assert_eq!(Entry::of(&LlmResponse::Generation(blocked), 0), None);
        assert!(Entry::decode(b"", 100).is_err());
        assert!(Entry::decode(b"\x07abc", 100).is_err());
        assert!(Entry::decode(b"\x00{not json", 100).is_err());
    }
}
