//! Checks answered outside the gateway's own detectors: a webhook of the platform team's (a
//! documented JSON body in, allow / block / mask spans out) and an LLM judge (another chat Route
//! asked in the Llama Guard convention, `safe` / `unsafe` + categories). Both are bounded in time
//! (`timeout`) and size, and a failure is decided by the check's `failureMode`.
//!
//! This module needs two things of the data plane, given as `Services`: its HTTP client (the
//! operator's egress rules are in its resolver) and a way to call a Route (the judge's call goes
//! through the gateway's own forward path, so its limits and prices apply).

use std::sync::Arc;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::compile::{CompiledPolicy, External, ExternalKind};
use super::mask::Finding;
use super::metrics::{ExternalLabels, GuardrailMetrics};
use super::{BlockReason, Blocked, Guard, Phase};
use crate::api::{GuardrailAction, StreamMode};

/// Largest body sent to a webhook, and largest judge prompt: beyond it the check fails (and its
/// `failureMode` decides).
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Largest webhook answer read.
pub const MAX_ANSWER_BYTES: usize = 64 << 10;
/// A webhook's `reason` is cut to this many characters.
const MAX_REASON_CHARS: usize = 256;
/// A judge's categories: at most this many, each at most this long.
const MAX_CATEGORIES: usize = 16;
const MAX_CATEGORY_CHARS: usize = 32;

/// What external checks need from the data plane.
pub trait Services: Send + Sync {
    /// The gateway's upstream client (its resolver applies the operator's egress rules).
    fn http(&self) -> &reqwest::Client;
    /// Asks the chat Route `route` (`namespace/name`) with one user message, as `consumer`;
    /// the answer's text, or why there is none.
    fn ask(
        &self,
        route: Arc<str>,
        consumer: Arc<str>,
        prompt: String,
    ) -> BoxFuture<'static, Result<String, String>>;
}

/// One call's view for its external checks.
pub struct Context {
    pub services: Arc<dyn Services>,
    pub metrics: GuardrailMetrics,
    /// The caller, as the request log line names it ("" when anonymous).
    pub consumer: Arc<str>,
}

/// The body POSTed to a webhook (README "Guardrails").
#[derive(Debug, Serialize, PartialEq)]
pub struct WebhookRequest<'a> {
    /// `request` or `response`.
    pub phase: &'a str,
    /// The Route called, `namespace/name`.
    pub route: &'a str,
    pub consumer: &'a str,
    /// The policy (`namespace/name`) and check asking.
    pub policy: &'a str,
    pub check: &'a str,
    /// The texts, in order: a request's messages and parts, an answer's choices and tool calls.
    pub texts: &'a [String],
}

/// A webhook's answer.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "action", rename_all = "lowercase")]
pub enum WebhookAnswer {
    Allow,
    Block {
        #[serde(default)]
        reason: Option<String>,
    },
    Mask {
        #[serde(default)]
        spans: Vec<Span>,
    },
}

/// Characters `start..end` (Unicode scalar values, not bytes) of `texts[text]`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
pub struct Span {
    pub text: usize,
    pub start: usize,
    pub end: usize,
}

/// What a check found.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    Allow,
    /// A match: a reason to tell the caller, and the spans a `mask` replaces (`None`: the texts
    /// whole).
    Match {
        reason: Option<String>,
        spans: Option<Vec<Span>>,
    },
}

tokio::task_local! {
    /// Set while a judge's call runs: a judge Route's own policy asking a judge would loop.
    static JUDGING: ();
}

/// Runs the external checks of `guard` on `phase` (of one stream `mode` only, when given) over
/// `texts`, masking them in place; a blocked call's error. Matches are added to `findings`.
pub async fn check(
    guard: &Guard,
    phase: Phase,
    mode: Option<StreamMode>,
    texts: &mut [String],
    ctx: &Context,
    findings: &mut Vec<Finding>,
) -> Result<(), Blocked> {
    let checks: Vec<(usize, &External)> = guard
        .externals(phase)
        .filter(|(_, e)| mode.is_none_or(|m| e.mode == m))
        .collect();
    for (index, e) in checks {
        let policy = &guard.policies[index];
        let check = &policy.checks[e.check];
        let finding = Finding {
            policy: index,
            check: e.check,
        };
        let asked = ask(e, policy, &check.name, phase, &guard.qualified, texts, ctx);
        let verdict = match tokio::time::timeout(e.timeout, asked).await {
            Ok(Ok(v)) => v,
            Ok(Err(why)) => {
                failed(e, policy, &check.name, &why, &ctx.metrics);
                if e.fail_open {
                    continue;
                }
                return Err(guard.blocked(finding, phase, BlockReason::CheckFailed));
            }
            Err(_) => {
                let why = format!("no verdict within {:?}", e.timeout);
                failed(e, policy, &check.name, &why, &ctx.metrics);
                if e.fail_open {
                    continue;
                }
                return Err(guard.blocked(finding, phase, BlockReason::CheckFailed));
            }
        };
        let Verdict::Match { reason, spans } = verdict else {
            continue;
        };
        if !findings.contains(&finding) {
            findings.push(finding);
        }
        match check.action {
            GuardrailAction::Block => {
                let mut blocked = guard.blocked(finding, phase, BlockReason::Matched);
                blocked.reason = reason;
                return Err(blocked);
            }
            GuardrailAction::Audit => {}
            GuardrailAction::Mask => mask_spans(texts, spans.as_deref(), &check.placeholder),
        }
    }
    Ok(())
}

/// Counts and logs a failed check: names and the failure, never the texts.
fn failed(
    e: &External,
    policy: &CompiledPolicy,
    check: &Arc<str>,
    why: &str,
    metrics: &GuardrailMetrics,
) {
    let outcome = if e.fail_open {
        "failed_open"
    } else {
        "failed_closed"
    };
    metrics
        .external_errors
        .get_or_create(&ExternalLabels {
            policy: Arc::clone(&policy.key),
            check: Arc::clone(check),
            kind: e.kind.as_str(),
            outcome,
        })
        .inc();
    tracing::warn!(policy = %policy.key, check = %check, kind = e.kind.as_str(), outcome, error = %why, "guardrail check failed");
}

async fn ask(
    e: &External,
    policy: &CompiledPolicy,
    check: &str,
    phase: Phase,
    route: &str,
    texts: &[String],
    ctx: &Context,
) -> Result<Verdict, String> {
    match &e.kind {
        ExternalKind::Webhook { url, bearer, .. } => {
            let body = serde_json::to_vec(&WebhookRequest {
                phase: phase.as_str(),
                route,
                consumer: &ctx.consumer,
                policy: &policy.key,
                check,
                texts,
            })
            .map_err(|e| e.to_string())?;
            if body.len() > MAX_REQUEST_BYTES {
                return Err(format!(
                    "the texts are {} bytes, more than a webhook is sent ({MAX_REQUEST_BYTES})",
                    body.len()
                ));
            }
            let mut request = ctx
                .services
                .http()
                .post(&**url)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body);
            if let Some(bearer) = bearer {
                request = request.bearer_auth(bearer.expose());
            }
            let mut answer = request
                .send()
                .await
                .map_err(|e| format!("webhook unreachable: {e}"))?;
            if !answer.status().is_success() {
                return Err(format!("webhook answered {}", answer.status()));
            }
            let mut read = Vec::new();
            while let Some(chunk) = answer
                .chunk()
                .await
                .map_err(|e| format!("webhook answer cut: {e}"))?
            {
                if read.len() + chunk.len() > MAX_ANSWER_BYTES {
                    return Err(format!("webhook answer over {MAX_ANSWER_BYTES} bytes"));
                }
                read.extend_from_slice(&chunk);
            }
            webhook_verdict(&read, texts)
        }
        ExternalKind::Judge { route: judge } => {
            if JUDGING.try_with(|_| ()).is_ok() {
                return Err("a judge's own call cannot ask a judge".into());
            }
            let prompt = judge_prompt(phase, texts);
            if prompt.len() > MAX_REQUEST_BYTES {
                return Err(format!(
                    "the texts are {} bytes, more than a judge is sent ({MAX_REQUEST_BYTES})",
                    prompt.len()
                ));
            }
            let consumer: Arc<str> = format!("guardrail:{}", policy.key).into();
            let answer = JUDGING
                .scope((), ctx.services.ask(Arc::clone(judge), consumer, prompt))
                .await?;
            Ok(match judge_verdict(&answer)? {
                None => Verdict::Allow,
                Some(categories) if categories.is_empty() => Verdict::Match {
                    reason: Some("unsafe".into()),
                    spans: None,
                },
                Some(categories) => Verdict::Match {
                    reason: Some(format!("unsafe: {}", categories.join(","))),
                    spans: None,
                },
            })
        }
    }
}

/// A webhook's answer, its spans checked against `texts`.
pub fn webhook_verdict(body: &[u8], texts: &[String]) -> Result<Verdict, String> {
    let answer: WebhookAnswer = serde_json::from_slice(body)
        .map_err(|e| format!("webhook answer is not allow, block or mask: {e}"))?;
    Ok(match answer {
        WebhookAnswer::Allow => Verdict::Allow,
        WebhookAnswer::Block { reason } => Verdict::Match {
            reason: reason
                .map(|r| {
                    r.chars()
                        .filter(|c| !c.is_control())
                        .take(MAX_REASON_CHARS)
                        .collect::<String>()
                })
                .filter(|r| !r.trim().is_empty()),
            spans: None,
        },
        WebhookAnswer::Mask { spans } => {
            for s in &spans {
                let chars = texts.get(s.text).map(|t| t.chars().count());
                if chars.is_none_or(|n| s.start >= s.end || s.end > n) {
                    return Err(format!(
                        "webhook span {}..{} of text {} is outside the texts",
                        s.start, s.end, s.text
                    ));
                }
            }
            Verdict::Match {
                reason: None,
                spans: Some(spans),
            }
        }
    })
}

/// Replaces each span (in characters) by `placeholder`; overlapping spans are masked as one.
/// Without spans every text is replaced whole.
pub fn mask_spans(texts: &mut [String], spans: Option<&[Span]>, placeholder: &str) {
    let Some(spans) = spans else {
        for t in texts.iter_mut().filter(|t| !t.is_empty()) {
            *t = placeholder.to_string();
        }
        return;
    };
    for (i, text) in texts.iter_mut().enumerate() {
        let mut mine: Vec<(usize, usize)> = spans
            .iter()
            .filter(|s| s.text == i)
            .map(|s| (s.start, s.end))
            .collect();
        if mine.is_empty() {
            continue;
        }
        mine.sort_unstable();
        // Character offsets to byte offsets (one extra for the end of the text).
        let bytes: Vec<usize> = text
            .char_indices()
            .map(|(b, _)| b)
            .chain([text.len()])
            .collect();
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        for (start, end) in mine {
            let (start, end) = (
                bytes[start.min(bytes.len() - 1)],
                bytes[end.min(bytes.len() - 1)],
            );
            if end <= at {
                continue;
            }
            if start >= at {
                out.push_str(&text[at..start]);
                out.push_str(placeholder);
            }
            at = end;
        }
        out.push_str(&text[at..]);
        *text = out;
    }
}

/// The judge's prompt (README "Guardrails"): the Llama Guard task, with the texts as the one
/// turn assessed (`User` for requests, `Agent` for answers).
pub fn judge_prompt(phase: Phase, texts: &[String]) -> String {
    let role = match phase {
        Phase::Request => "User",
        Phase::Response => "Agent",
    };
    format!(
        "Task: Check if there is unsafe content in '{role}' messages in conversations according to our safety policy.\n\n<BEGIN CONVERSATION>\n\n{role}: {}\n\n<END CONVERSATION>\n\nProvide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n- First line must read 'safe' or 'unsafe'.\n- If unsafe, a second line must include a comma-separated list of violated categories.",
        texts.join("\n\n")
    )
}

/// A judge's verdict: `None` for `safe`, the categories for `unsafe` (first line `safe` or
/// `unsafe`, any case; second line, if any, comma-separated categories).
pub fn judge_verdict(answer: &str) -> Result<Option<Vec<String>>, String> {
    let mut lines = answer.lines().map(str::trim).filter(|l| !l.is_empty());
    match lines.next().map(str::to_ascii_lowercase).as_deref() {
        Some("safe") => Ok(None),
        Some("unsafe") => Ok(Some(
            lines
                .next()
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .take(MAX_CATEGORIES)
                .map(|c| c.chars().take(MAX_CATEGORY_CHARS).collect())
                .collect(),
        )),
        // Not echoed: a judge that misbehaves may repeat the text it was shown.
        _ => Err("the judge answered neither safe nor unsafe".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn judge_verdicts_follow_the_llama_guard_convention() {
        assert_eq!(judge_verdict("safe"), Ok(None));
        assert_eq!(judge_verdict("\n Safe \n"), Ok(None));
        assert_eq!(
            judge_verdict("unsafe\nS1, S10"),
            Ok(Some(vec!["S1".into(), "S10".into()]))
        );
        assert_eq!(judge_verdict("UNSAFE"), Ok(Some(vec![])));
        let e = judge_verdict("I think the card 4111 is fine").unwrap_err();
        assert!(!e.contains("4111"), "{e}");
        assert!(judge_verdict("").is_err());
        assert!(judge_verdict("safely unsafe").is_err());
        let many = format!("unsafe\n{}", vec!["S".repeat(100); 40].join(","));
        let cats = judge_verdict(&many).unwrap().unwrap();
        assert_eq!(cats.len(), MAX_CATEGORIES);
        assert!(cats.iter().all(|c| c.len() == MAX_CATEGORY_CHARS));
    }

    #[test]
    fn the_judge_prompt_names_the_turn_and_carries_the_texts() {
        let p = judge_prompt(Phase::Response, &["a".into(), "b".into()]);
        assert!(p.contains("Agent: a\n\nb\n\n<END CONVERSATION>"), "{p}");
        assert!(p.contains("First line must read 'safe' or 'unsafe'"));
        assert!(judge_prompt(Phase::Request, &[]).contains("'User' messages"));
    }

    #[test]
    fn the_webhook_body_and_answers_are_as_documented() {
        let texts = vec!["my card is 4111".to_string(), "héllo wörld".to_string()];
        let body = serde_json::to_value(WebhookRequest {
            phase: "request",
            route: "ns/chat",
            consumer: "alice",
            policy: "ns/pii",
            check: "presidio",
            texts: &texts,
        })
        .unwrap();
        assert_eq!(
            body,
            serde_json::json!({"phase": "request", "route": "ns/chat", "consumer": "alice",
                "policy": "ns/pii", "check": "presidio", "texts": ["my card is 4111", "héllo wörld"]})
        );
        assert_eq!(
            webhook_verdict(br#"{"action":"allow"}"#, &texts),
            Ok(Verdict::Allow)
        );
        assert_eq!(
            webhook_verdict(br#"{"action":"block","reason":"PII\nfound"}"#, &texts),
            Ok(Verdict::Match {
                reason: Some("PIIfound".into()),
                spans: None
            })
        );
        let Ok(Verdict::Match {
            spans: Some(spans), ..
        }) = webhook_verdict(
            br#"{"action":"mask","spans":[{"text":0,"start":11,"end":15},{"text":1,"start":6,"end":11},{"text":1,"start":7,"end":9}]}"#,
            &texts,
        )
        else {
            panic!("no spans");
        };
        let mut masked = texts.clone();
        mask_spans(&mut masked, Some(&spans), "[PII]");
        assert_eq!(masked, ["my card is [PII]", "héllo [PII]"]);
        for bad in [
            &br#"{"action":"mask","spans":[{"text":2,"start":0,"end":1}]}"#[..],
            br#"{"action":"mask","spans":[{"text":1,"start":3,"end":12}]}"#,
            br#"{"action":"maybe"}"#,
            b"<html>",
        ] {
            assert!(webhook_verdict(bad, &texts).is_err());
        }
        let mut whole = texts.clone();
        mask_spans(&mut whole, None, "[X]");
        assert_eq!(whole, ["[X]", "[X]"]);
    }
}
