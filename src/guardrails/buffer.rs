//! Webhook and judge checks on a streamed answer (`mode`): `buffer` holds the whole answer, checks
//! it, then releases it (masked) or ends the stream with the block's error; `after` passes the
//! stream on untouched and checks a copy once it completes (audit only). Built-in detectors keep
//! their hold-back (`stream`); these stages run after it, on what it released.

use std::sync::Arc;
use std::time::Instant;

use futures::stream::BoxStream;
use futures::{Stream, StreamExt};

use super::external::{self, Context};
use super::mask::Finding;
use super::{BlockReason, Blocked, Guard, Phase};
use crate::api::StreamMode;
use crate::llm::StreamDelta;

/// Most text a buffered check holds (and an `after` check copies) of one answer.
pub const MAX_BUFFERED_BYTES: usize = 4 << 20;

/// A text of the answer: the choice, and the tool call (`None`: the choice's text).
type Key = (u32, Option<u32>);

/// The answer's texts, joined per channel in order of first appearance.
#[derive(Default)]
struct Texts {
    keys: Vec<Key>,
    texts: Vec<String>,
    bytes: usize,
}

impl Texts {
    fn slot(&mut self, key: Key) -> usize {
        match self.keys.iter().position(|k| *k == key) {
            Some(i) => i,
            None => {
                self.keys.push(key);
                self.texts.push(String::new());
                self.keys.len() - 1
            }
        }
    }

    /// Copies `d`'s texts; false once past the bound (then nothing more is copied).
    fn add(&mut self, d: &StreamDelta) -> bool {
        let size = d.text.as_ref().map_or(0, String::len)
            + d.tool_calls
                .iter()
                .map(|c| c.arguments.len())
                .sum::<usize>();
        if self.bytes + size > MAX_BUFFERED_BYTES {
            return false;
        }
        self.bytes += size;
        if let Some(t) = &d.text {
            let i = self.slot((d.index, None));
            self.texts[i].push_str(t);
        }
        for c in &d.tool_calls {
            let i = self.slot((d.index, Some(c.index)));
            self.texts[i].push_str(&c.arguments);
        }
        true
    }

    /// Puts the (masked) texts back: each channel's whole text on its first delta, the later
    /// ones emptied.
    fn write_back(&self, all: &mut [StreamDelta], masked: &[String]) {
        let mut done = vec![false; self.keys.len()];
        let mut take = |key: Key| -> Option<&str> {
            let i = self.keys.iter().position(|k| *k == key)?;
            if std::mem::replace(&mut done[i], true) {
                Some("")
            } else {
                Some(&masked[i])
            }
        };
        for d in all {
            if d.text.is_some() {
                let t = take((d.index, None)).unwrap_or_default();
                d.text = (!t.is_empty()).then(|| t.to_string());
            }
            for c in &mut d.tool_calls {
                c.arguments = take((d.index, Some(c.index)))
                    .unwrap_or_default()
                    .to_string();
            }
        }
    }
}

/// `deltas` with `guard`'s webhook and judge response checks applied in their modes.
pub fn external_stream<E: From<Blocked> + Send + 'static>(
    deltas: BoxStream<'static, Result<Vec<StreamDelta>, E>>,
    guard: Arc<Guard>,
    ctx: Arc<Context>,
) -> BoxStream<'static, Result<Vec<StreamDelta>, E>> {
    let mut out = deltas;
    if guard.buffered {
        out = buffered(out, Arc::clone(&guard), Arc::clone(&ctx)).boxed();
    }
    if guard.after {
        out = after(out, guard, ctx).boxed();
    }
    out
}

/// Holds the answer whole, checks it, and releases it in one write (or the block's error).
fn buffered<E: From<Blocked> + Send + 'static>(
    mut deltas: BoxStream<'static, Result<Vec<StreamDelta>, E>>,
    guard: Arc<Guard>,
    ctx: Arc<Context>,
) -> impl Stream<Item = Result<Vec<StreamDelta>, E>> + Send + 'static {
    futures::stream::once(async move {
        let mut all = Vec::new();
        let mut texts = Texts::default();
        while let Some(item) = deltas.next().await {
            match item {
                Ok(d) => {
                    if !d.iter().all(|d| texts.add(d)) {
                        let (policy, e) = guard
                            .externals(Phase::Response)
                            .find(|(_, e)| e.mode == StreamMode::Buffer)
                            .map(|(p, e)| (p, e.check))
                            .unwrap_or_default();
                        let finding = Finding { policy, check: e };
                        return vec![Err(E::from(guard.blocked(
                            finding,
                            Phase::Response,
                            BlockReason::BufferExceeded,
                        )))];
                    }
                    all.extend(d);
                }
                // Nothing unchecked is released: the error ends the stream.
                Err(e) => return vec![Err(e)],
            }
        }
        let mut masked = texts.texts.clone();
        match check(&guard, &ctx, StreamMode::Buffer, &mut masked).await {
            Err(blocked) => vec![Err(E::from(blocked))],
            Ok(()) => {
                if masked != texts.texts {
                    texts.write_back(&mut all, &masked);
                }
                if all.is_empty() {
                    vec![]
                } else {
                    vec![Ok(all)]
                }
            }
        }
    })
    .flat_map(futures::stream::iter)
}

/// Passes the answer on as it comes, copying its texts; once it completes, checks the copy in the
/// background (an `after` check can only audit).
fn after<E: Send + 'static>(
    deltas: BoxStream<'static, Result<Vec<StreamDelta>, E>>,
    guard: Arc<Guard>,
    ctx: Arc<Context>,
) -> impl Stream<Item = Result<Vec<StreamDelta>, E>> + Send + 'static {
    let state = Some((deltas, Texts::default(), true, guard, ctx));
    futures::stream::unfold(state, |st| async move {
        let (mut deltas, mut texts, mut whole, guard, ctx) = st?;
        match deltas.next().await {
            Some(Ok(d)) => {
                whole = whole && d.iter().all(|d| texts.add(d));
                Some((Ok(d), Some((deltas, texts, whole, guard, ctx))))
            }
            // An answer cut short is not checked: it never completed.
            Some(Err(e)) => Some((Err(e), None)),
            None => {
                // A copy past the bound is checked as far as it goes.
                check_after(guard, ctx, texts.texts);
                None
            }
        }
    })
}

/// The `mode: after` checks of a complete answer's texts, in the background (they only audit).
pub fn check_after(guard: Arc<Guard>, ctx: Arc<Context>, mut texts: Vec<String>) {
    tokio::spawn(async move {
        let _ = check(&guard, &ctx, StreamMode::After, &mut texts).await;
    });
}

/// The checks of `mode` on an answer's texts, counted and timed.
async fn check(
    guard: &Guard,
    ctx: &Context,
    mode: StreamMode,
    texts: &mut [String],
) -> Result<(), Blocked> {
    let started = Instant::now();
    let mut findings = Vec::new();
    let verdict = external::check(
        guard,
        Phase::Response,
        Some(mode),
        texts,
        ctx,
        &mut findings,
    )
    .await;
    guard.record(&ctx.metrics, Phase::Response, &findings, started.elapsed());
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::ToolCallDelta;

    #[test]
    fn texts_are_joined_per_channel_and_written_back_on_the_first_delta() {
        let mut all = vec![
            StreamDelta {
                text: Some("my card ".into()),
                ..Default::default()
            },
            StreamDelta {
                text: Some("4111".into()),
                tool_calls: vec![ToolCallDelta {
                    index: 0,
                    arguments: "{\"a\":".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
            StreamDelta {
                tool_calls: vec![ToolCallDelta {
                    index: 0,
                    arguments: "1}".into(),
                    ..Default::default()
                }],
                finish_reason: Some("stop".into()),
                ..Default::default()
            },
        ];
        let mut texts = Texts::default();
        assert!(all.iter().all(|d| texts.add(d)));
        assert_eq!(texts.texts, ["my card 4111", "{\"a\":1}"]);
        texts.write_back(&mut all, &["my card [X]".into(), "{\"a\":2}".into()]);
        assert_eq!(all[0].text.as_deref(), Some("my card [X]"));
        assert_eq!(all[1].text, None);
        assert_eq!(all[1].tool_calls[0].arguments, "{\"a\":2}");
        assert_eq!(all[2].tool_calls[0].arguments, "");
        assert_eq!(all[2].finish_reason.as_deref(), Some("stop"));
    }
}
