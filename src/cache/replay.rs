//! Streams and stored answers: a stored answer replayed as a stream of deltas (the surface's
//! reframer turns them into its own events, as for a live stream), and a live stream recorded as
//! it passes into the answer it adds up to.

use std::collections::BTreeMap;

use crate::llm::{Choice, Generation, LlmResponse, Role, StreamDelta, ToolCall, ToolCallDelta};

/// Bytes of text per replayed chunk: a hit streams like a live answer (many small deltas), not
/// one blob, so clients that render as they read behave the same.
const CHUNK: usize = 32;

/// A stored answer as the deltas of a stream, one per chunk of text or tool-call arguments; the
/// last carries the finish reason, the usage and the cost (`cost_usd`, zero for a hit).
pub fn replay(answer: &Generation, cost_usd: &str) -> Vec<Vec<StreamDelta>> {
    let mut out = Vec::new();
    for c in &answer.choices {
        let head = |text: Option<String>| StreamDelta {
            id: Some(answer.id.clone()),
            model: Some(answer.model.clone()),
            created: Some(answer.created),
            index: c.index,
            role: Some(Role::Assistant),
            text,
            ..Default::default()
        };
        let mut chunks = split(&c.text).peekable();
        out.push(vec![head(chunks.next().map(str::to_string))]);
        for chunk in chunks {
            out.push(vec![StreamDelta {
                index: c.index,
                text: Some(chunk.to_string()),
                ..Default::default()
            }]);
        }
        for (i, call) in c.tool_calls.iter().enumerate() {
            let mut args = split(&call.arguments);
            out.push(vec![StreamDelta {
                index: c.index,
                tool_calls: vec![ToolCallDelta {
                    index: i as u32,
                    id: Some(call.id.clone()),
                    name: Some(call.name.clone()),
                    arguments: args.next().unwrap_or_default().to_string(),
                }],
                ..Default::default()
            }]);
            for more in args {
                out.push(vec![StreamDelta {
                    index: c.index,
                    tool_calls: vec![ToolCallDelta {
                        index: i as u32,
                        arguments: more.to_string(),
                        ..Default::default()
                    }],
                    ..Default::default()
                }]);
            }
        }
        out.push(vec![StreamDelta {
            index: c.index,
            finish_reason: Some(c.finish_reason.clone().unwrap_or_else(|| "stop".into())),
            ..Default::default()
        }]);
    }
    // The usage chunk, as providers send it: after every choice has finished.
    if let Some(last) = out.last_mut().and_then(|d| d.last_mut()) {
        last.usage = Some(answer.usage);
        last.cost_usd = Some(cost_usd.to_string());
    }
    out
}

/// `text` in pieces of about `CHUNK` bytes, cut on character boundaries.
fn split(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = CHUNK.min(rest.len());
        while !rest.is_char_boundary(end) {
            end += 1;
        }
        let (piece, tail) = rest.split_at(end);
        rest = tail;
        Some(piece)
    })
}

/// A live stream's deltas added up, as they pass, into the answer they make.
#[derive(Default)]
pub struct Recorder {
    id: Option<String>,
    model: Option<String>,
    created: Option<i64>,
    choices: BTreeMap<u32, Recorded>,
    usage: Option<crate::llm::Usage>,
    /// Bytes of text recorded so far: past the bound, recording stops (the answer is not stored).
    bytes: usize,
    over: bool,
}

#[derive(Default)]
struct Recorded {
    text: String,
    finish_reason: Option<String>,
    calls: BTreeMap<u32, ToolCall>,
}

impl Recorder {
    /// Adds one read's deltas; `max_bytes` bounds what is kept (a larger answer is not stored).
    pub fn see(&mut self, deltas: &[StreamDelta], max_bytes: usize) {
        if self.over {
            return;
        }
        for d in deltas {
            if d.raw.is_some() {
                // A native stream is never cached.
                self.over = true;
                return;
            }
            self.id = self.id.take().or_else(|| d.id.clone());
            self.model = self.model.take().or_else(|| d.model.clone());
            self.created = self.created.or(d.created);
            if d.usage.is_some() {
                self.usage = d.usage;
            }
            let choice = self.choices.entry(d.index).or_default();
            if let Some(text) = &d.text {
                choice.text.push_str(text);
                self.bytes += text.len();
            }
            if d.finish_reason.is_some() {
                choice.finish_reason.clone_from(&d.finish_reason);
            }
            for t in &d.tool_calls {
                let call = choice.calls.entry(t.index).or_default();
                if let Some(id) = &t.id {
                    call.id.clone_from(id);
                }
                if let Some(name) = &t.name {
                    call.name.clone_from(name);
                }
                call.arguments.push_str(&t.arguments);
                self.bytes += t.arguments.len();
            }
        }
        self.over = self.bytes > max_bytes;
    }

    /// The answer of a stream that ended normally: `None` when it was too large, or some choice
    /// never finished (a stream cut short is never an answer).
    pub fn finish(self, route_model: &str) -> Option<LlmResponse> {
        if self.over
            || self.choices.is_empty()
            || self.choices.values().any(|c| c.finish_reason.is_none())
        {
            return None;
        }
        Some(LlmResponse::Generation(Generation {
            id: self.id.unwrap_or_default(),
            created: self.created.unwrap_or_else(crate::llm::unix_now),
            model: self.model.unwrap_or_else(|| route_model.to_string()),
            choices: self
                .choices
                .into_iter()
                .map(|(index, c)| Choice {
                    index,
                    text: c.text,
                    finish_reason: c.finish_reason,
                    tool_calls: c.calls.into_values().collect(),
                    message_extra: Default::default(),
                })
                .collect(),
            usage: self.usage.unwrap_or_default(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::Usage;

    fn answer() -> Generation {
        Generation {
            id: "chatcmpl-9".into(),
            created: 5,
            model: "m".into(),
            choices: vec![Choice {
                index: 0,
                text: "héllo ".repeat(20),
                finish_reason: Some("tool_calls".into()),
                tool_calls: vec![ToolCall::function(
                    "c1",
                    "f",
                    format!("{{\"a\":\"{}\"}}", "z".repeat(50)),
                )],
                message_extra: Default::default(),
            }],
            usage: Usage::new(Some(3), Some(40)),
        }
    }

    #[test]
    fn a_replayed_answer_is_many_chunks_that_record_back_into_the_same_answer() {
        let a = answer();
        let chunks = replay(&a, "0");
        assert!(chunks.len() > 5, "{} chunks", chunks.len());
        let last = chunks.last().unwrap().last().unwrap();
        assert_eq!(last.usage, Some(a.usage));
        assert_eq!(last.cost_usd.as_deref(), Some("0"));
        let mut r = Recorder::default();
        for c in &chunks {
            r.see(c, 1 << 20);
        }
        assert_eq!(r.finish("x"), Some(LlmResponse::Generation(a)));
    }

    #[test]
    fn unfinished_or_oversized_streams_are_no_answer() {
        let chunks = replay(&answer(), "0");
        let mut cut = Recorder::default();
        for c in &chunks[..chunks.len() - 1] {
            cut.see(c, 1 << 20);
        }
        assert_eq!(cut.finish("m"), None);
        let mut big = Recorder::default();
        for c in &chunks {
            big.see(c, 10);
        }
        assert_eq!(big.finish("m"), None);
    }
}
