//! Response checks on a streamed answer, between the provider's decoder and the surface's
//! framing. Each text of the answer (a choice's text, each tool call's arguments) is a channel:
//! its fragments are appended to what is held, and only the part in which no match can still
//! start or grow is released, checked and masked. What is held is the last `hold` bytes (the
//! longest match the policies' detectors can make, plus the bytes that decide a match), and from
//! the start of any match that may still grow. A match still growing past the policy's cap ends
//! the stream with `guardrail_blocked` rather than release it unmasked. At a choice's finish, and
//! at the end of the stream, everything held is checked whole and released.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};

use super::mask::{self, Finding, Hits};
use super::metrics::GuardrailMetrics;
use super::{BlockReason, Blocked, Guard, Phase};
use crate::llm::{StreamDelta, ToolCallDelta};

/// Bytes of released text kept as context: word boundaries and validators look back this far.
const CONTEXT: usize = 32;

/// One text of the answer being released.
#[derive(Default)]
struct Channel {
    /// Context (already released) followed by what is held.
    text: String,
    /// Where the held part of `text` starts.
    held: usize,
}

/// A channel: the choice, and the tool call (`None`: the choice's text).
type Key = (u32, Option<u32>);

pub struct StreamGuard {
    guard: Arc<Guard>,
    channels: HashMap<Key, Channel>,
    findings: Vec<Finding>,
    busy: Duration,
    hits: Hits,
}

impl StreamGuard {
    pub fn new(guard: Arc<Guard>) -> StreamGuard {
        StreamGuard {
            guard,
            channels: HashMap::new(),
            findings: Vec::new(),
            busy: Duration::ZERO,
            hits: Vec::new(),
        }
    }

    /// Appends `fragment` to the channel and returns what may be released of it, masked.
    fn release(&mut self, key: Key, fragment: &str, last: bool) -> Result<String, Blocked> {
        let guard = Arc::clone(&self.guard);
        let ch = self.channels.entry(key).or_default();
        ch.text.push_str(fragment);
        let len = ch.text.len();
        self.hits.clear();
        guard.scan(Phase::Response, &ch.text, ch.held, &mut self.hits);
        let mut upto = if last {
            len
        } else {
            floor_boundary(&ch.text, len.saturating_sub(guard.hold).max(ch.held))
        };
        if !last {
            // A match that reaches past the release point may still grow: hold it whole. Latest
            // first, so each earlier one is judged against the point the later ones left.
            self.hits
                .sort_unstable_by_key(|(_, h)| std::cmp::Reverse(h.start));
            for (p, h) in &self.hits {
                if h.start < upto && h.end > upto {
                    upto = h.start;
                    let finding = Finding {
                        policy: *p,
                        check: h.check,
                    };
                    if len - h.start > guard.cap
                        && guard.action(finding) != crate::api::GuardrailAction::Audit
                    {
                        return Err(guard.blocked(
                            finding,
                            Phase::Response,
                            BlockReason::HoldBackExceeded,
                        ));
                    }
                }
            }
        }
        // Matches that may still grow end after `upto`: `apply` leaves them for later.
        let mut hits = std::mem::take(&mut self.hits);
        let mut out = String::new();
        let res = mask::apply(
            &guard,
            &mut hits,
            &ch.text,
            ch.held,
            upto,
            &mut out,
            &mut self.findings,
        );
        self.hits = hits;
        res.map_err(|f| guard.blocked(f, Phase::Response, BlockReason::Matched))?;
        Self::advance(ch, upto);
        Ok(out)
    }

    /// Releases `text[..upto]`, keeping a little of it as context.
    fn advance(ch: &mut Channel, upto: usize) {
        let keep = ceil_boundary(&ch.text, upto.saturating_sub(CONTEXT));
        ch.text.drain(..keep);
        ch.held = upto - keep;
    }

    /// The deltas of one upstream read with their texts held back, checked and masked.
    pub fn deltas(&mut self, deltas: Vec<StreamDelta>) -> Result<Vec<StreamDelta>, Blocked> {
        let started = Instant::now();
        let out = self.deltas_inner(deltas);
        self.busy += started.elapsed();
        out
    }

    fn deltas_inner(&mut self, deltas: Vec<StreamDelta>) -> Result<Vec<StreamDelta>, Blocked> {
        let mut out = Vec::with_capacity(deltas.len());
        for mut d in deltas {
            if d.raw.is_some() {
                // A provider's own events: not readable here (Routes with response checks are
                // not served natively, so this is a bug, and fails closed).
                return Err(self.guard.blocked(
                    Finding {
                        policy: 0,
                        check: 0,
                    },
                    Phase::Response,
                    BlockReason::Unreadable,
                ));
            }
            let last = d.finish_reason.is_some();
            if let Some(t) = d.text.take() {
                let released = self.release((d.index, None), &t, false)?;
                d.text = (!released.is_empty()).then_some(released);
            }
            let mut calls: Vec<ToolCallDelta> = Vec::with_capacity(d.tool_calls.len());
            for mut c in std::mem::take(&mut d.tool_calls) {
                let released = self.release((d.index, Some(c.index)), &c.arguments, false)?;
                c.arguments = released;
                if let Some(prev) = calls.iter_mut().find(|p| p.index == c.index) {
                    prev.arguments.push_str(&c.arguments);
                    continue;
                }
                calls.push(c);
            }
            d.tool_calls = calls;
            if last {
                self.flush_choice(&mut d)?;
            }
            out.push(d);
        }
        Ok(out)
    }

    /// Everything held for `d`'s choice, checked whole, into `d`.
    fn flush_choice(&mut self, d: &mut StreamDelta) -> Result<(), Blocked> {
        let mut keys: Vec<Key> = self
            .channels
            .keys()
            .filter(|(i, _)| *i == d.index)
            .copied()
            .collect();
        keys.sort_unstable();
        for key in keys {
            let rest = self.release(key, "", true)?;
            self.channels.remove(&key);
            if rest.is_empty() {
                continue;
            }
            match key.1 {
                None => d.text.get_or_insert_default().push_str(&rest),
                Some(call) => match d.tool_calls.iter_mut().find(|c| c.index == call) {
                    Some(c) => c.arguments.push_str(&rest),
                    None => d.tool_calls.push(ToolCallDelta {
                        index: call,
                        arguments: rest,
                        ..Default::default()
                    }),
                },
            }
        }
        Ok(())
    }

    /// At the end of the stream: what is still held, as deltas.
    pub fn finish(&mut self) -> Result<Vec<StreamDelta>, Blocked> {
        let mut choices: Vec<u32> = self.channels.keys().map(|(i, _)| *i).collect();
        choices.sort_unstable();
        choices.dedup();
        let mut out = Vec::new();
        for index in choices {
            let mut d = StreamDelta {
                index,
                ..Default::default()
            };
            self.flush_choice(&mut d)?;
            if d.text.is_some() || !d.tool_calls.is_empty() {
                out.push(d);
            }
        }
        Ok(out)
    }

    fn record(&self, metrics: &GuardrailMetrics) {
        self.guard
            .record(metrics, Phase::Response, &self.findings, self.busy);
        // The request's log line was written when the stream began: the findings have their own.
    }
}

/// `deltas` with `guard`'s response checks applied as they flow; a block ends the stream with
/// its error item (the surface writes its dialect's error event, never its normal end).
pub fn guard_stream<E: From<Blocked> + Send + 'static>(
    deltas: impl Stream<Item = Result<Vec<StreamDelta>, E>> + Send + 'static,
    guard: Arc<Guard>,
    metrics: GuardrailMetrics,
) -> impl Stream<Item = Result<Vec<StreamDelta>, E>> + Send + 'static {
    let state = Some((deltas.boxed(), StreamGuard::new(guard), metrics));
    futures::stream::unfold(state, |st| async move {
        let (mut deltas, mut g, metrics) = st?;
        loop {
            let item = match deltas.next().await {
                Some(Ok(d)) => g.deltas(d).map_err(E::from),
                Some(Err(e)) => {
                    g.record(&metrics);
                    return Some((Err(e), None));
                }
                None => {
                    let rest = g.finish().map_err(E::from);
                    g.record(&metrics);
                    return match rest {
                        Ok(d) if d.is_empty() => None,
                        Ok(d) => Some((Ok(d), None)),
                        Err(e) => Some((Err(e), None)),
                    };
                }
            };
            match item {
                // Everything was held: read on rather than send an empty write.
                Ok(d) if d.iter().all(is_empty) => continue,
                Ok(d) => return Some((Ok(d), Some((deltas, g, metrics)))),
                Err(e) => {
                    g.record(&metrics);
                    return Some((Err(e), None));
                }
            }
        }
    })
}

fn is_empty(d: &StreamDelta) -> bool {
    d.text.is_none()
        && d.tool_calls.is_empty()
        && d.finish_reason.is_none()
        && d.usage.is_none()
        && d.role.is_none()
        && d.id.is_none()
}

fn floor_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn ceil_boundary(s: &str, mut i: usize) -> usize {
    while i < s.len() && !s.is_char_boundary(i) {
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::super::testing::guard;
    use super::*;
    use proptest::prelude::*;

    const POLICY: &str = "checks:\n- {name: keys, phase: response, action: mask, detector: {builtin: secret}}\n- {name: cards, phase: response, action: mask, detector: {builtin: card}}\n- {name: t, phase: response, action: block, detector: {keywords: [nightjar]}}";
    const KEY: &str = "sk-proj-abcdefghijklmnopqrstuvwxyz0123";

    fn text(i: u32, t: &str) -> StreamDelta {
        StreamDelta {
            index: i,
            text: Some(t.into()),
            ..Default::default()
        }
    }

    fn args(t: &str, first: bool) -> StreamDelta {
        StreamDelta {
            tool_calls: vec![ToolCallDelta {
                index: 0,
                id: first.then(|| "call_1".into()),
                name: first.then(|| "f".into()),
                arguments: t.into(),
            }],
            ..Default::default()
        }
    }

    /// What the caller sees: text and arguments of every delta joined, or the error.
    fn run(g: &Arc<Guard>, items: Vec<StreamDelta>) -> Result<(String, String), Blocked> {
        let mut s = StreamGuard::new(Arc::clone(g));
        let (mut text, mut arguments) = (String::new(), String::new());
        let mut seen = |ds: Vec<StreamDelta>| {
            for d in ds {
                text.push_str(d.text.as_deref().unwrap_or_default());
                for c in d.tool_calls {
                    arguments.push_str(&c.arguments);
                }
            }
        };
        for d in items {
            seen(s.deltas(vec![d])?);
        }
        seen(s.finish()?);
        Ok((text, arguments))
    }

    #[test]
    fn a_key_split_anywhere_is_masked_in_text_and_arguments() {
        let g = Arc::new(guard(POLICY));
        let answer = format!("the key is {KEY}, card 4111 1111 1111 1111 ok");
        let want = "the key is [SECRET], card [CARD] ok";
        for i in 0..=answer.len() {
            for j in i..=answer.len() {
                let parts = [&answer[..i], &answer[i..j], &answer[j..]];
                let (t, _) = run(&g, parts.iter().map(|p| text(0, p)).collect()).unwrap();
                assert_eq!(t, want, "split at {i}, {j}");
            }
            let (_, a) = run(
                &g,
                vec![args(&answer[..i], true), args(&answer[i..], false)],
            )
            .unwrap();
            assert_eq!(a, want, "arguments split at {i}");
        }
    }

    #[test]
    fn text_is_released_once_no_match_can_start_in_it() {
        let g = Arc::new(guard(POLICY));
        let mut s = StreamGuard::new(Arc::clone(&g));
        let long = "x ".repeat(200);
        let out = s.deltas(vec![text(0, &long)]).unwrap();
        let released = out[0].text.clone().unwrap_or_default();
        assert_eq!(released.len(), long.len() - g.hold);
        assert!(g.hold <= g.cap);
    }

    #[test]
    fn a_block_mid_stream_is_an_error_and_choices_are_apart() {
        let g = Arc::new(guard(POLICY));
        let e = run(&g, vec![text(0, "a night"), text(0, "jar flies")]).unwrap_err();
        assert_eq!(e.why, BlockReason::Matched, "{e}");
        // Two choices each holding half a key: neither is a key.
        let (t, _) = run(
            &g,
            vec![
                text(0, "sk-proj-abcdefghij"),
                text(1, "klmnopqrstuvwxyz0123"),
            ],
        )
        .unwrap();
        assert_eq!(t, "sk-proj-abcdefghijklmnopqrstuvwxyz0123");
    }

    #[test]
    fn a_match_longer_than_the_cap_ends_the_stream() {
        let g = Arc::new(guard(
            "maxHoldBack: 64\nchecks:\n- {name: keys, action: mask, detector: {builtin: secret}}",
        ));
        let pem = format!("-----BEGIN PRIVATE KEY-----\n{}", "A".repeat(200));
        let e = run(
            &g,
            pem.as_bytes()
                .chunks(10)
                .map(|c| text(0, std::str::from_utf8(c).unwrap()))
                .collect(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("hold back"), "{e}");
    }

    proptest! {
        #[test]
        fn masked_values_never_leak_whatever_the_chunking(
            cuts in proptest::collection::vec(0usize..120, 0..12),
            before in "[a-z .]{0,30}",
        ) {
            let g = Arc::new(guard(POLICY));
            let answer = format!("{before} {KEY} and 5555 5555 5555 4444.");
            let mut cuts = cuts.into_iter().map(|c| c % (answer.len() + 1)).collect::<Vec<_>>();
            cuts.sort_unstable();
            let mut parts = Vec::new();
            let mut at = 0;
            for c in cuts { parts.push(&answer[at..c]); at = c; }
            parts.push(&answer[at..]);
            let mut s = StreamGuard::new(Arc::clone(&g));
            let mut seen = String::new();
            for p in parts {
                for d in s.deltas(vec![text(0, p)]).unwrap() {
                    seen.push_str(d.text.as_deref().unwrap_or_default());
                    // At no point has any part of a secret been released.
                    prop_assert!(!seen.contains("sk-proj"), "{seen}");
                    prop_assert!(!seen.contains("5555"), "{seen}");
                }
            }
            for d in s.finish().unwrap() { seen.push_str(d.text.as_deref().unwrap_or_default()); }
            prop_assert_eq!(seen, format!("{before} [SECRET] and [CARD]."));
        }
    }
}
