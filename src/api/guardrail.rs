// The printcolumn(..) lists of the kube derive repeat keys by design.
#![allow(clippy::duplicated_attributes)]
//! The `GuardrailPolicy` resource: an ordered list of checks a Route (or a Team) applies to what
//! callers send and what they receive. Compiled once by the controller (`guardrails::compile`).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Checks on the text of calls: detectors that block, mask or audit what they find.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "portcullis.dev",
    version = "v1alpha1",
    kind = "GuardrailPolicy",
    plural = "guardrailpolicies",
    namespaced,
    status = "GuardrailPolicyStatus",
    category = "portcullis",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct GuardrailPolicySpec {
    /// The checks, run in order on each text; the first `block` ends the call.
    #[schemars(length(min = 1, max = 64))]
    pub checks: Vec<GuardrailCheck>,
    /// Streamed answers: the most characters held back from the caller while a match may still
    /// be under way (default 256, at most 4096). A detector whose longest match is longer (a PEM
    /// key block) is held back this much and then its pending match is masked whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 16, max = 4096))]
    pub max_hold_back: Option<u32>,
}

/// One check: what it looks for, on which side of the call, and what happens on a match.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GuardrailCheck {
    /// Names the check in errors, metrics and logs. Letters, digits and `-`.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// Which text it reads: what the caller sends (`request`), what the caller receives
    /// (`response`, streamed answers included), or both (default).
    #[serde(default)]
    pub phase: GuardrailPhase,
    /// On a match: `block` the call (a 400 `guardrail_blocked`, or an error event mid-stream),
    /// `mask` the matched text with the detector's placeholder, or `audit` (metric and log only).
    pub action: GuardrailAction,
    /// What it looks for.
    pub detector: Detector,
    /// Streamed answers, `webhook` and `judge` only: `buffer` (default) holds the whole answer
    /// and checks it before the caller sees any of it; `after` passes the stream on untouched
    /// and checks it once complete, so it can only `audit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<StreamMode>,
}

/// How an external check reads a streamed answer.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "lowercase")]
pub enum StreamMode {
    #[default]
    Buffer,
    After,
}

/// Which side of a call a check reads.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "lowercase")]
pub enum GuardrailPhase {
    Request,
    Response,
    #[default]
    Both,
}

impl GuardrailPhase {
    pub fn request(self) -> bool {
        matches!(self, GuardrailPhase::Request | GuardrailPhase::Both)
    }

    pub fn response(self) -> bool {
        matches!(self, GuardrailPhase::Response | GuardrailPhase::Both)
    }
}

/// What a check does on a match.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum GuardrailAction {
    Block,
    Mask,
    Audit,
}

impl GuardrailAction {
    pub fn as_str(self) -> &'static str {
        match self {
            GuardrailAction::Block => "block",
            GuardrailAction::Mask => "mask",
            GuardrailAction::Audit => "audit",
        }
    }
}

/// Exactly one of `builtin`, `keywords`, `regex`, `webhook`, `judge`.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.builtin), has(self.keywords), has(self.regex), has(self.webhook), has(self.judge)].filter(x, x).size() == 1").message("set exactly one of builtin, keywords, regex, webhook, judge"))]
pub struct Detector {
    /// A detector of the gateway: email, phone, card (Luhn-checked), iban (checksum-checked),
    /// ssn (US), ip (v4 and v6), secret (cloud and API keys, tokens, JWTs, PEM private keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub builtin: Option<Builtin>,
    /// Words or phrases, matched case-insensitively as whole words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub keywords: Option<Vec<String>>,
    /// A regular expression in RE2 syntax (linear-time matching: no look-around, no
    /// back-references). An invalid one makes the policy `InvalidSpec`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4096))]
    pub regex: Option<String>,
    /// The text a `mask` puts in place of a match; default `[EMAIL]`, `[PHONE]`, `[CARD]`,
    /// `[IBAN]`, `[SSN]`, `[IP]`, `[SECRET]` for built-ins, `[REDACTED]` for keywords and regexes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub placeholder: Option<String>,
    /// Streamed answers, `regex` only: the longest match the pattern can make, in characters
    /// (default 64): how much text is held back while a match may be under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4096))]
    pub max_match: Option<u32>,
    /// An HTTP endpoint of the platform team's that judges the texts (allow, block, or mask
    /// spans); see the README's Guardrails section for its request and answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<WebhookDetector>,
    /// Another chat Route of the gateway asked for a `safe` / `unsafe` verdict (the Llama Guard
    /// convention); `unsafe` is a match. Not with `action: mask`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge: Option<JudgeDetector>,
}

/// The built-in detectors.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Builtin {
    Email,
    Phone,
    Card,
    Iban,
    Ssn,
    Ip,
    Secret,
}

impl Builtin {
    pub fn as_str(self) -> &'static str {
        match self {
            Builtin::Email => "email",
            Builtin::Phone => "phone",
            Builtin::Card => "card",
            Builtin::Iban => "iban",
            Builtin::Ssn => "ssn",
            Builtin::Ip => "ip",
            Builtin::Secret => "secret",
        }
    }
}

/// An external checker.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WebhookDetector {
    /// Where to POST the texts; the operator's upstream host rules apply as to providers.
    #[schemars(
        length(min = 1, max = 2048),
        regex(pattern = r"^https?://[^\s/?#]+[^\s?#]*$")
    )]
    pub url: String,
    /// How long to wait for the verdict (default 500ms), e.g. `250ms`, `2s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), regex(pattern = r"^([0-9]{1,6}(ms|s|m|h))+$"))]
    pub timeout: Option<String>,
    /// What a failed or late call means: `closed` (default) blocks, `open` lets the text through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_mode: Option<FailureMode>,
    /// The webhook's own credential, sent as `Authorization: Bearer`: a key of a Secret in the
    /// policy's namespace (never the caller's or the provider's credential).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<crate::api::SecretKeyRef>,
}

/// What a failing external check decides.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    Open,
    Closed,
}

/// A chat Route of the gateway asked for a `safe` / `unsafe` verdict.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JudgeDetector {
    /// The chat Route (same namespace) that judges; its limits and prices apply to the judge's
    /// calls, whose consumer is `guardrail:<namespace>/<policy>`.
    #[schemars(length(min = 1, max = 253))]
    pub route: String,
    /// How long to wait for the verdict (default 10s), e.g. `500ms`, `5s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), regex(pattern = r"^([0-9]{1,6}(ms|s|m|h))+$"))]
    pub timeout: Option<String>,
    /// What a failed or late verdict means: `closed` (default) blocks, `open` lets the text
    /// through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_mode: Option<FailureMode>,
}

/// Whether the policy compiled.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct GuardrailPolicyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}
