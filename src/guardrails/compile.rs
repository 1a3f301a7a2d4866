//! A GuardrailPolicy compiled once, at reconcile: per phase one `RegexSet` over every pattern of
//! its checks (built-ins and the user's regexes) and one Aho-Corasick automaton over every
//! keyword, so a text is read once per policy however many checks it has.

use std::sync::Arc;
use std::time::Duration;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use regex::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};

use super::detectors::{self, Validator, is_word_byte};
use crate::api::{
    Detector, FailureMode, GuardrailAction, GuardrailCheck, GuardrailPolicySpec, SecretKeyRef,
    StreamMode,
};
use crate::providers::SecretValue;

/// Compiled automata of one pattern may take this much memory (the user's regexes included).
const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Hold-back cap when the policy sets none.
pub const DEFAULT_MAX_HOLD_BACK: usize = 256;
/// The longest regex match assumed for an unbounded pattern without `maxMatch`.
const DEFAULT_MAX_MATCH: usize = 64;
/// Bytes after a match that decide it (a word boundary, a validator's look at what follows).
const LOOKAHEAD: usize = 2;
/// Keywords longer than this are refused (they would only lengthen every stream's hold-back).
const MAX_KEYWORD_BYTES: usize = 256;
/// How long a webhook / a judge is waited for when the check does not say.
const DEFAULT_WEBHOOK_TIMEOUT: Duration = Duration::from_millis(500);
const DEFAULT_JUDGE_TIMEOUT: Duration = Duration::from_secs(10);

/// One check of a compiled policy.
#[derive(Clone, Debug)]
pub struct Check {
    pub name: Arc<str>,
    pub action: GuardrailAction,
    pub placeholder: Arc<str>,
}

/// What is wrong with a policy: the check and why, for its `InvalidSpec` status.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("spec.checks[{index}] ({check}): {message}")]
pub struct CompileError {
    pub index: usize,
    pub check: String,
    pub message: String,
}

/// A policy ready to run (cloned only to fill in its external checks' credentials: the
/// automata inside are shared).
#[derive(Clone, Debug)]
pub struct CompiledPolicy {
    /// `namespace/name`: the label of its metrics and the name in its errors.
    pub key: Arc<str>,
    pub checks: Vec<Check>,
    pub request: Scanner,
    pub response: Scanner,
    /// Streams: the most bytes held back for an unfinished match.
    pub cap: usize,
    /// Its webhook and judge checks, in order.
    pub external: Vec<External>,
}

/// A check answered outside the gateway's own detectors.
#[derive(Clone, Debug)]
pub struct External {
    /// Its index in `checks`.
    pub check: usize,
    pub request: bool,
    pub response: bool,
    pub mode: StreamMode,
    pub timeout: Duration,
    pub fail_open: bool,
    pub kind: ExternalKind,
}

#[derive(Clone, Debug)]
pub enum ExternalKind {
    /// `bearer` is filled in from `secret_ref` at reconcile (`guardrails::resolve_all`).
    Webhook {
        url: Arc<str>,
        secret_ref: Option<SecretKeyRef>,
        bearer: Option<SecretValue>,
    },
    /// The judge Route, `namespace/name`.
    Judge { route: Arc<str> },
}

impl ExternalKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            ExternalKind::Webhook { .. } => "webhook",
            ExternalKind::Judge { .. } => "judge",
        }
    }
}

/// A pattern match: of check `check`, at `start..end`; `valid` once its validator agreed (an
/// invalid one still holds a stream back while it may grow into a valid one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    pub check: usize,
    pub start: usize,
    pub end: usize,
    pub valid: bool,
}

/// The detectors of one phase.
#[derive(Clone, Debug, Default)]
pub struct Scanner {
    set: Option<RegexSet>,
    regexes: Vec<(Regex, usize, Validator)>,
    keywords: Option<(AhoCorasick, Vec<usize>)>,
    /// The longest match any of its detectors can make plus what decides it, up to the cap: how
    /// much of a stream is held back.
    pub hold: usize,
}

fn always(_: &str, _: usize, _: usize) -> bool {
    true
}

impl Scanner {
    pub fn is_empty(&self) -> bool {
        self.regexes.is_empty() && self.keywords.is_none()
    }

    /// Every match that starts at or after `from` (the text before is context: word boundaries
    /// and validators read it), in no particular order.
    pub fn scan(&self, text: &str, from: usize, out: &mut Vec<Hit>) {
        if let Some(set) = &self.set {
            for i in set.matches_at(text, from).iter() {
                let (re, check, validate) = &self.regexes[i];
                let mut at = from;
                while at <= text.len() {
                    let Some(m) = re.find_at(text, at) else { break };
                    out.push(Hit {
                        check: *check,
                        start: m.start(),
                        end: m.end(),
                        valid: validate(text, m.start(), m.end()),
                    });
                    at = if m.end() > m.start() {
                        m.end()
                    } else {
                        next_char(text, m.end())
                    };
                }
            }
        }
        if let Some((ac, checks)) = &self.keywords {
            let input = aho_corasick::Input::new(text).span(from..text.len());
            let bytes = text.as_bytes();
            for m in ac.find_iter(input) {
                let whole = m
                    .start()
                    .checked_sub(1)
                    .is_none_or(|i| !is_word_byte(bytes[i]))
                    && bytes.get(m.end()).is_none_or(|b| !is_word_byte(*b));
                out.push(Hit {
                    check: checks[m.pattern().as_usize()],
                    start: m.start(),
                    end: m.end(),
                    valid: whole,
                });
            }
        }
    }
}

fn next_char(text: &str, at: usize) -> usize {
    text[at..]
        .chars()
        .next()
        .map_or(at + 1, |c| at + c.len_utf8())
}

/// Patterns and keywords of one phase, gathered before building.
#[derive(Default)]
struct Parts {
    patterns: Vec<(String, usize, Validator)>,
    keywords: Vec<(String, usize)>,
    longest: usize,
}

impl CompiledPolicy {
    pub fn compile(key: &str, spec: &GuardrailPolicySpec) -> Result<CompiledPolicy, CompileError> {
        let cap = spec
            .max_hold_back
            .map_or(DEFAULT_MAX_HOLD_BACK, |c| c as usize)
            .clamp(16, 4096);
        let (mut request, mut response) = (Parts::default(), Parts::default());
        let mut checks = Vec::with_capacity(spec.checks.len());
        let mut external = Vec::new();
        let namespace = key.split_once('/').map_or("", |(ns, _)| ns);
        for (index, c) in spec.checks.iter().enumerate() {
            let err = |message: String| CompileError {
                index,
                check: c.name.clone(),
                message,
            };
            if spec.checks[..index].iter().any(|o| o.name == c.name) {
                return Err(err("another check has this name".into()));
            }
            let d = &c.detector;
            let set = [
                d.builtin.is_some(),
                d.keywords.is_some(),
                d.regex.is_some(),
                d.webhook.is_some(),
                d.judge.is_some(),
            ]
            .iter()
            .filter(|x| **x)
            .count();
            if set != 1 {
                return Err(err(
                    "set exactly one of builtin, keywords, regex, webhook, judge".into(),
                ));
            }
            let mut patterns: Vec<(String, Validator)> = Vec::new();
            let mut keywords = Vec::new();
            let mut longest = 0;
            let default_placeholder = if let Some(b) = d.builtin {
                for p in detectors::patterns(b) {
                    longest = longest.max(max_len(p.regex).unwrap_or(cap));
                    patterns.push((p.regex.to_string(), p.validate));
                }
                detectors::placeholder(b)
            } else if let Some(words) = &d.keywords {
                for w in words {
                    if w.trim().is_empty() || w.len() > MAX_KEYWORD_BYTES {
                        return Err(err(format!(
                            "keywords must be non-empty and at most {MAX_KEYWORD_BYTES} bytes"
                        )));
                    }
                    longest = longest.max(w.len());
                    keywords.push(w.clone());
                }
                "[REDACTED]"
            } else if let Some(re) = &d.regex {
                RegexBuilder::new(re)
                    .size_limit(REGEX_SIZE_LIMIT)
                    .build()
                    .map_err(|e| err(format!("invalid regex: {}", first_line(&e.to_string()))))?;
                let bound = max_len(re)
                    .or(d.max_match.map(|m| m as usize))
                    .unwrap_or(DEFAULT_MAX_MATCH);
                longest = longest.max(bound);
                patterns.push((re.clone(), always));
                "[REDACTED]"
            } else {
                external.push(compile_external(index, c, namespace).map_err(err)?);
                "[REDACTED]"
            };
            if c.mode.is_some() && d.webhook.is_none() && d.judge.is_none() {
                return Err(err(
                    "mode applies to webhook and judge checks only (built-in detectors hold back)"
                        .into(),
                ));
            }
            for (phase, on) in [
                (&mut request, c.phase.request()),
                (&mut response, c.phase.response()),
            ] {
                if !on {
                    continue;
                }
                phase
                    .patterns
                    .extend(patterns.iter().map(|(p, v)| (p.clone(), index, *v)));
                phase
                    .keywords
                    .extend(keywords.iter().map(|k| (k.clone(), index)));
                phase.longest = phase.longest.max(longest);
            }
            checks.push(Check {
                name: c.name.as_str().into(),
                action: c.action,
                placeholder: d
                    .placeholder
                    .as_deref()
                    .unwrap_or(default_placeholder)
                    .into(),
            });
        }
        let build = |parts: Parts| -> Result<Scanner, String> {
            let set = if parts.patterns.is_empty() {
                None
            } else {
                Some(
                    RegexSetBuilder::new(parts.patterns.iter().map(|(p, _, _)| p))
                        .size_limit(REGEX_SIZE_LIMIT * parts.patterns.len())
                        .build()
                        .map_err(|e| first_line(&e.to_string()).to_string())?,
                )
            };
            let regexes = parts
                .patterns
                .iter()
                .map(|(p, check, v)| {
                    RegexBuilder::new(p)
                        .size_limit(REGEX_SIZE_LIMIT)
                        .build()
                        .map(|re| (re, *check, *v))
                        .map_err(|e| first_line(&e.to_string()).to_string())
                })
                .collect::<Result<_, _>>()?;
            let keywords = if parts.keywords.is_empty() {
                None
            } else {
                let ac = AhoCorasickBuilder::new()
                    .ascii_case_insensitive(true)
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(parts.keywords.iter().map(|(k, _)| k))
                    .map_err(|e| e.to_string())?;
                Some((ac, parts.keywords.iter().map(|(_, c)| *c).collect()))
            };
            Ok(Scanner {
                set,
                regexes,
                keywords,
                hold: (parts.longest + LOOKAHEAD).min(cap),
            })
        };
        let whole = |message: String| CompileError {
            index: 0,
            check: "*".into(),
            message,
        };
        Ok(CompiledPolicy {
            key: key.into(),
            checks,
            request: build(request).map_err(whole)?,
            response: build(response).map_err(whole)?,
            cap,
            external,
        })
    }
}

/// A webhook or judge check as it will run (its webhook credential still to be read).
fn compile_external(index: usize, c: &GuardrailCheck, namespace: &str) -> Result<External, String> {
    let Detector { webhook, judge, .. } = &c.detector;
    let mode = c.mode.unwrap_or_default();
    if mode == StreamMode::After && c.action != GuardrailAction::Audit {
        return Err(
            "mode after checks a stream once the caller has all of it: only action audit".into(),
        );
    }
    let timeout = |t: &Option<String>, default| match t {
        None => Ok(default),
        Some(t) => crate::api::parse_duration(t)
            .filter(|d| !d.is_zero())
            .ok_or_else(|| format!("timeout {t:?} is not a duration such as 500ms or 2s")),
    };
    let (timeout, failure_mode, kind) = match (webhook, judge) {
        (Some(w), _) => (
            timeout(&w.timeout, DEFAULT_WEBHOOK_TIMEOUT)?,
            w.failure_mode,
            ExternalKind::Webhook {
                url: w.url.as_str().into(),
                secret_ref: w.secret_ref.clone(),
                bearer: None,
            },
        ),
        (None, Some(j)) => {
            if c.action == GuardrailAction::Mask {
                return Err(
                    "a judge's verdict has no spans to mask: use action block or audit".into(),
                );
            }
            if j.route.contains('/') {
                return Err("judge.route names a Route of the policy's namespace".into());
            }
            (
                timeout(&j.timeout, DEFAULT_JUDGE_TIMEOUT)?,
                j.failure_mode,
                ExternalKind::Judge {
                    route: format!("{namespace}/{}", j.route).into(),
                },
            )
        }
        (None, None) => {
            return Err("set exactly one of builtin, keywords, regex, webhook, judge".into());
        }
    };
    Ok(External {
        check: index,
        request: c.phase.request(),
        response: c.phase.response(),
        mode,
        timeout,
        fail_open: failure_mode == Some(FailureMode::Open),
        kind,
    })
}

/// The most bytes a match of `pattern` can span, when bounded.
fn max_len(pattern: &str) -> Option<usize> {
    regex_syntax::parse(pattern)
        .ok()?
        .properties()
        .maximum_len()
}

fn first_line(s: &str) -> &str {
    // The regex crate's errors draw the pattern over several lines; status wants one.
    s.lines()
        .rev()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| s.lines().next().unwrap_or(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn policy(yaml: &str) -> Result<CompiledPolicy, CompileError> {
        let spec: GuardrailPolicySpec = serde_yaml::from_str(yaml).unwrap();
        CompiledPolicy::compile("ns/p", &spec)
    }

    #[test]
    fn an_invalid_regex_names_its_check() {
        let e = policy(
            "checks:\n- {name: ok, action: mask, detector: {builtin: card}}\n- {name: bad, action: block, detector: {regex: 'a(b'}}",
        )
        .unwrap_err();
        assert_eq!(e.index, 1);
        assert_eq!(e.check, "bad");
        assert!(
            e.to_string()
                .starts_with("spec.checks[1] (bad): invalid regex"),
            "{e}"
        );
        assert!(!e.to_string().contains('\n'), "{e}");
    }

    #[test]
    fn external_checks_compile_and_their_misuses_are_invalid() {
        let p = policy("checks:\n- {name: w, action: mask, detector: {webhook: {url: 'http://x', timeout: 250ms, failureMode: open}}}\n- {name: j, phase: response, action: audit, mode: after, detector: {judge: {route: guard}}}").unwrap();
        assert_eq!(p.external.len(), 2);
        assert_eq!(p.external[0].timeout, Duration::from_millis(250));
        assert!(p.external[0].fail_open && !p.external[1].fail_open);
        assert!(!p.external[1].request && p.external[1].response);
        assert!(
            matches!(&p.external[1].kind, ExternalKind::Judge { route } if &**route == "ns/guard")
        );
        assert!(p.request.is_empty() && p.response.is_empty());
        for (bad, says) in [
            (
                "{name: j, action: mask, detector: {judge: {route: g}}}",
                "no spans",
            ),
            (
                "{name: j, action: block, mode: after, detector: {judge: {route: g}}}",
                "only action audit",
            ),
            (
                "{name: w, action: block, detector: {webhook: {url: 'http://x', timeout: soon}}}",
                "not a duration",
            ),
            (
                "{name: k, action: block, mode: buffer, detector: {keywords: [x]}}",
                "webhook and judge checks only",
            ),
        ] {
            let e = policy(&format!("checks:\n- {bad}")).unwrap_err();
            assert!(e.message.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn duplicates_are_invalid() {
        let e = policy("checks:\n- {name: a, action: block, detector: {builtin: ip}}\n- {name: a, action: mask, detector: {builtin: ssn}}").unwrap_err();
        assert_eq!(e.index, 1);
        let e = policy("checks:\n- {name: a, action: block, detector: {}}").unwrap_err();
        assert!(e.message.contains("exactly one"));
    }

    #[test]
    fn hold_back_is_the_longest_match_up_to_the_cap() {
        let p = policy("checks:\n- {name: s, phase: response, action: mask, detector: {builtin: ssn}}\n- {name: t, phase: request, action: mask, detector: {regex: 'TCK-[0-9]{6}'}}").unwrap();
        assert_eq!(p.response.hold, 11 + LOOKAHEAD);
        assert_eq!(p.request.hold, 10 + LOOKAHEAD);
        let p = policy(
            "maxHoldBack: 100\nchecks:\n- {name: s, action: mask, detector: {builtin: secret}}",
        )
        .unwrap();
        assert_eq!(p.response.hold, 100);
        let p = policy(
            "checks:\n- {name: t, action: mask, detector: {regex: 'T[0-9]+', maxMatch: 20}}",
        )
        .unwrap();
        assert_eq!(p.response.hold, 20 + LOOKAHEAD);
    }

    #[test]
    fn each_builtins_hold_back_is_bounded_as_the_readme_says() {
        // README "Guardrails": the hold-back of each built-in alone, at the default cap.
        let mut got = Vec::new();
        for b in ["email", "phone", "card", "iban", "ssn", "ip", "secret"] {
            let p = policy(&format!(
                "checks:\n- {{name: b, phase: response, action: mask, detector: {{builtin: {b}}}}}"
            ))
            .unwrap();
            got.push((b, p.response.hold));
        }
        // email and secret (a PEM block) can be longer than the default cap: they hold the cap.
        assert_eq!(
            got,
            [
                ("email", 256),
                ("phone", 55),
                ("card", 36),
                ("iban", 45),
                ("ssn", 13),
                ("ip", 46),
                ("secret", 256)
            ]
        );
    }

    #[test]
    fn keywords_are_whole_words_in_any_case() {
        let p = policy(
            "checks:\n- {name: k, action: block, detector: {keywords: [bluebird, night jar]}}",
        )
        .unwrap();
        let hits = |t: &str| {
            let mut out = Vec::new();
            p.request.scan(t, 0, &mut out);
            out.iter().filter(|h| h.valid).count()
        };
        assert_eq!(hits("Project BlueBird is on"), 1);
        assert_eq!(hits("the NIGHT JAR."), 1);
        assert_eq!(hits("bluebirds and nightjars"), 0);
        assert_eq!(hits("xbluebird"), 0);
    }
}
