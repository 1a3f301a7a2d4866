//! Semantic matching: which chat calls may be answered by a stored answer to a prompt close in
//! meaning, the text that is embedded, and this replica's index of embedded prompts (Redis 7 has no
//! vector search, so the index lives in memory; the entries it points to stay in the store).

use std::collections::VecDeque;

use serde_json::Value;

use super::key::CacheKey;
use crate::llm::{Content, LlmRequest, Role};

/// Calls with a higher `temperature` are never matched semantically: their caller asked for
/// variety, and another prompt's answer is not it. A call that sets none is matched.
pub const MAX_TEMPERATURE: f64 = 0.5;
/// Longest prompt embedded, in bytes of text; a longer one is matched exactly only.
const MAX_PROMPT_BYTES: usize = 32 * 1024;
/// Request fields that make a call one that is never matched semantically: tools change what an
/// answer is (a call to make, not text), so only identical calls share them.
const TOOL_FIELDS: &[&str] = &["tools", "functions", "tool_choice", "function_call"];

/// The text of `request` that is embedded (each message as `role: text` on its own line), or
/// `None` for a call never matched semantically: not chat, tools offered or used, a non-text
/// part (an image), a temperature above `MAX_TEMPERATURE`, or a prompt too long.
pub fn prompt_text(request: &LlmRequest) -> Option<String> {
    let LlmRequest::Chat(chat) = request else {
        return None;
    };
    if chat.params.temperature.is_some_and(|t| t > MAX_TEMPERATURE)
        || TOOL_FIELDS.iter().any(|f| chat.extra.contains_key(*f))
    {
        return None;
    }
    let mut text = String::new();
    for m in &chat.messages {
        if matches!(m.role, Role::Tool) || !m.tool_calls.is_empty() || m.tool_call_id.is_some() {
            return None;
        }
        if let Content::Parts(parts) = &m.content
            && parts
                .iter()
                .any(|p| p.get("type").and_then(Value::as_str) != Some("text"))
        {
            return None;
        }
        text.push_str(m.role.as_str());
        text.push_str(": ");
        text.push_str(&m.content.as_text());
        text.push('\n');
        if text.len() > MAX_PROMPT_BYTES {
            return None;
        }
    }
    (!text.is_empty()).then_some(text)
}

/// A vector scaled to length 1 (so cosine similarity is a dot product), as `f32`; `None` for an
/// empty, zero or non-finite one.
pub fn normalized(vector: &[f64]) -> Option<Box<[f32]>> {
    let norm = vector.iter().map(|x| x * x).sum::<f64>().sqrt();
    if vector.is_empty() || !norm.is_finite() || norm == 0.0 {
        return None;
    }
    Some(vector.iter().map(|x| (x / norm) as f32).collect())
}

/// The cosine similarity of two normalized vectors; vectors of different lengths (another model)
/// are not comparable and score nothing.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    if a.len() != b.len() {
        return f32::NEG_INFINITY;
    }
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// One Route's embedded prompts on this replica, oldest out first once `max` are held. Each
/// remembers its shape (scope and every request field but the messages): only prompts of the
/// caller's shape are compared, so no entry is served across a scope or to other parameters.
pub struct Index {
    /// The Route generation the prompts belong to (its backends' digest): a new one empties it.
    pub digest: [u8; 32],
    max: usize,
    items: VecDeque<Item>,
}

struct Item {
    shape: [u8; 32],
    vector: Box<[f32]>,
    key: CacheKey,
}

impl Index {
    pub fn new(digest: [u8; 32], max: usize) -> Index {
        Index {
            digest,
            max: max.max(1),
            items: VecDeque::new(),
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.items.len()
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// A new bound, keeping the newest prompts.
    pub fn set_max(&mut self, max: usize) {
        self.max = max.max(1);
        while self.items.len() > self.max {
            self.items.pop_front();
        }
    }

    /// The key of the prompt of `shape` most similar to `vector`, if at least `threshold`.
    pub fn nearest(&self, shape: &[u8; 32], vector: &[f32], threshold: f32) -> Option<CacheKey> {
        self.items
            .iter()
            .filter(|i| i.shape == *shape)
            .map(|i| (cosine(&i.vector, vector), i))
            .filter(|(s, _)| *s >= threshold)
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, i)| i.key.clone())
    }

    /// Remembers a stored prompt; returns how many older ones were dropped for it. A key already
    /// held is replaced (a refreshed entry).
    pub fn insert(&mut self, shape: [u8; 32], vector: Box<[f32]>, key: CacheKey) -> u64 {
        self.remove(&key);
        self.items.push_back(Item { shape, vector, key });
        let mut evicted = 0;
        while self.items.len() > self.max {
            self.items.pop_front();
            evicted += 1;
        }
        evicted
    }

    /// Forgets a prompt whose entry is gone from the store (expired or evicted).
    pub fn remove(&mut self, key: &CacheKey) {
        self.items.retain(|i| i.key != *key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::{ChatMessage, ChatRequest, Params};
    use serde_json::json;

    fn key(n: u8) -> CacheKey {
        CacheKey(format!("{n:064}"))
    }

    fn v(x: &[f64]) -> Box<[f32]> {
        normalized(x).unwrap()
    }

    #[test]
    fn cosine_of_normalized_vectors() {
        let a = v(&[3.0, 4.0]);
        assert!((cosine(&a, &a) - 1.0).abs() < 1e-6);
        assert!(cosine(&a, &v(&[-4.0, 3.0])).abs() < 1e-6, "orthogonal");
        assert!(
            (cosine(&a, &v(&[-3.0, -4.0])) + 1.0).abs() < 1e-6,
            "opposite"
        );
        assert_eq!(cosine(&a, &v(&[1.0, 2.0, 3.0])), f32::NEG_INFINITY);
        assert!(normalized(&[]).is_none());
        assert!(normalized(&[0.0, 0.0]).is_none());
        assert!(normalized(&[f64::NAN, 1.0]).is_none());
    }

    #[test]
    fn the_nearest_above_the_threshold_of_the_same_shape_only() {
        let mut index = Index::new([0; 32], 10);
        let (mine, theirs) = ([1; 32], [2; 32]);
        index.insert(mine, v(&[1.0, 0.0, 0.0]), key(1));
        index.insert(mine, v(&[1.0, 0.2, 0.0]), key(2));
        index.insert(theirs, v(&[1.0, 0.1, 0.0]), key(3));
        let q = v(&[1.0, 0.03, 0.0]);
        // Key 1 is the nearest of this shape; key 3, of another shape, is never a candidate.
        assert_eq!(index.nearest(&mine, &q, 0.9), Some(key(1)));
        assert_eq!(index.nearest(&theirs, &q, 0.9), Some(key(3)));
        assert_eq!(index.nearest(&mine, &q, 0.99999), None, "threshold");
        assert_eq!(index.nearest(&[9; 32], &q, 0.0), None);
        index.remove(&key(1));
        assert_eq!(index.nearest(&mine, &q, 0.9), Some(key(2)));
    }

    #[test]
    fn bounded_oldest_out_first() {
        let mut index = Index::new([0; 32], 2);
        assert_eq!(index.insert([1; 32], v(&[1.0, 0.0]), key(1)), 0);
        assert_eq!(index.insert([1; 32], v(&[0.0, 1.0]), key(2)), 0);
        // The same key again replaces, and evicts nothing.
        assert_eq!(index.insert([1; 32], v(&[0.0, 1.0]), key(2)), 0);
        assert_eq!(index.insert([1; 32], v(&[1.0, 1.0]), key(3)), 1);
        assert_eq!(index.len(), 2);
        assert_eq!(index.nearest(&[1; 32], &v(&[1.0, 0.0]), 0.99), None);
        index.set_max(1);
        assert_eq!(index.len(), 1);
        assert_eq!(index.nearest(&[1; 32], &v(&[1.0, 1.0]), 0.99), Some(key(3)));
    }

    fn chat(messages: serde_json::Value, params: Params, extra: serde_json::Value) -> LlmRequest {
        let serde_json::Value::Array(messages) = messages else {
            panic!()
        };
        let serde_json::Value::Object(extra) = extra else {
            panic!()
        };
        LlmRequest::Chat(ChatRequest {
            messages: messages.into_iter().map(ChatMessage::openai).collect(),
            params,
            stream: Default::default(),
            extra,
        })
    }

    #[test]
    fn only_plain_text_chat_without_tools_and_not_hot() {
        let hi =
            json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]);
        assert_eq!(
            prompt_text(&chat(hi.clone(), Params::default(), json!({}))).as_deref(),
            Some("system: Be brief.\nuser: hi\n")
        );
        let cool = Params {
            temperature: Some(0.5),
            ..Default::default()
        };
        assert!(prompt_text(&chat(hi.clone(), cool, json!({}))).is_some());
        let hot = Params {
            temperature: Some(0.7),
            ..Default::default()
        };
        assert!(prompt_text(&chat(hi.clone(), hot, json!({}))).is_none());
        let tools = json!({"tools": [{"type": "function", "function": {"name": "f"}}]});
        assert!(prompt_text(&chat(hi, Params::default(), tools)).is_none());
        let image = json!([{"role": "user", "content": [{"type": "text", "text": "what is it"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]);
        assert!(prompt_text(&chat(image, Params::default(), json!({}))).is_none());
        let long = json!([{"role": "user", "content": "x".repeat(MAX_PROMPT_BYTES)}]);
        assert!(prompt_text(&chat(long, Params::default(), json!({}))).is_none());
    }
}
