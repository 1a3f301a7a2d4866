//! Guardrails: the checks of GuardrailPolicies run on what callers send and receive. One room per
//! job: `detectors` (the built-in patterns and validators), `compile` (a policy made ready to run,
//! once per change), `mask` (acting on hits), `request` (the texts of a unified request),
//! `stream` (hold-back on streamed answers), `external` (webhook and judge checks), `buffer`
//! (external checks on streamed answers), `audit` (rate-limited Events of audits and blocks),
//! `metrics` (counters by route, policy, check).
//!
//! A Route's `Guard` is built with the routing table and held by its entry: a call never compiles
//! anything, and a policy change reaches the next call with the next table.

pub mod audit;
pub mod buffer;
pub mod compile;
pub mod detectors;
pub mod external;
pub mod mask;
pub mod metrics;
pub mod request;
pub mod stream;

use std::sync::Arc;

use crate::api::{GuardrailAction, SecretKeyRef, StreamMode};
use crate::providers::SecretValue;
use compile::{CompiledPolicy, External, ExternalKind};
use mask::{Finding, Hits};

pub use compile::CompileError;

/// Every GuardrailPolicy by `(namespace, name)`: compiled, or why it is not.
pub type Policies =
    std::collections::HashMap<(String, String), Result<Arc<CompiledPolicy>, String>>;

/// The compiled policy `namespace/name`, or why it cannot be applied.
fn lookup(namespace: &str, name: &str, policies: &Policies) -> Result<Arc<CompiledPolicy>, String> {
    match policies.get(&(namespace.to_string(), name.to_string())) {
        Some(Ok(p)) => Ok(Arc::clone(p)),
        Some(Err(why)) => Err(format!(
            "GuardrailPolicy {namespace}/{name} is not ready: {why}"
        )),
        None => Err(format!("GuardrailPolicy {namespace}/{name} does not exist")),
    }
}

/// The guard of a Route named `served_as` (`qualified`: `namespace/name`) over the policies it
/// names, or why it cannot serve (a policy missing or invalid).
pub fn route_guard(
    served_as: &str,
    qualified: &str,
    names: &[String],
    policies: &Policies,
) -> Result<Option<Arc<Guard>>, String> {
    let namespace = qualified.split_once('/').map_or("", |(ns, _)| ns);
    let list = names
        .iter()
        .map(|name| lookup(namespace, name, policies))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Guard::new(served_as, qualified, list).map(Arc::new))
}

/// What the external checks of policies need from the cluster, read at reconcile.
pub trait Environment {
    /// The value of a key of a Secret in `namespace`, or why it cannot be used.
    fn secret(&self, namespace: &str, secret: &SecretKeyRef) -> Result<SecretValue, String>;
    /// Why the gateway may not call `url` (the operator's upstream host rules), if it may not.
    fn refuse(&self, url: &str) -> Option<String>;
    /// Why `namespace/name` cannot judge (no such Route, not a chat Route), if it cannot.
    fn judge(&self, namespace: &str, name: &str) -> Result<(), String>;
}

/// The policies with their webhooks' credentials read and their webhooks and judges checked
/// against the cluster, once per table build; a policy whose external check cannot run is kept as
/// why (its Routes and Teams fail closed). Policies without external checks are shared as they are.
pub fn resolve_all(policies: &Policies, env: &dyn Environment) -> Policies {
    policies
        .iter()
        .map(|(key, compiled)| {
            let resolved = match compiled {
                Ok(p) if !p.external.is_empty() => resolve(&key.0, p, env).map(Arc::new),
                other => other.clone(),
            };
            (key.clone(), resolved)
        })
        .collect()
}

fn resolve(
    namespace: &str,
    policy: &CompiledPolicy,
    env: &dyn Environment,
) -> Result<CompiledPolicy, String> {
    let mut out = policy.clone();
    for e in &mut out.external {
        let check = &policy.checks[e.check].name;
        let why = |message: String| format!("check {check}: {message}");
        match &mut e.kind {
            ExternalKind::Webhook {
                url,
                secret_ref,
                bearer,
            } => {
                if let Some(refused) = env.refuse(url) {
                    return Err(why(format!("webhook: {refused}")));
                }
                if let Some(r) = secret_ref {
                    *bearer = Some(env.secret(namespace, r).map_err(why)?);
                }
            }
            ExternalKind::Judge { route } => {
                let name = route.rsplit('/').next().unwrap_or_default();
                env.judge(namespace, name)
                    .map_err(|m| why(format!("judge: {m}")))?;
            }
        }
    }
    Ok(out)
}

/// The policies a Team names (`namespace/name` each), or why its members cannot call.
pub fn team_policies(
    refs: &[String],
    policies: &Policies,
) -> Result<Vec<Arc<CompiledPolicy>>, String> {
    refs.iter()
        .map(|r| match r.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() => lookup(ns, name, policies),
            _ => Err(format!(
                "guardrails entry {r:?} is not a namespace/name reference"
            )),
        })
        .collect()
}

/// Compiles every policy; a bad one is kept as its error (its status, and its Routes' reason).
pub fn compile_all(policies: &[Arc<crate::api::GuardrailPolicy>]) -> Policies {
    use kube::ResourceExt;
    policies
        .iter()
        .map(|p| {
            let (ns, name) = (p.namespace().unwrap_or_default(), p.name_any());
            let compiled = CompiledPolicy::compile(&format!("{ns}/{name}"), &p.spec)
                .map(Arc::new)
                .map_err(|e| e.to_string());
            ((ns, name), compiled)
        })
        .collect()
}

/// Which side of a call a text is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Request,
    Response,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Request => "request",
            Phase::Response => "response",
        }
    }
}

/// The policies a Route applies, in order, with their metric handles.
pub struct Guard {
    pub policies: Vec<Arc<CompiledPolicy>>,
    /// Some policy checks requests / answers.
    pub request: bool,
    pub response: bool,
    /// Some policy's built-in detectors read answers (the stream's hold-back runs).
    pub scanned_response: bool,
    /// Some webhook or judge check reads requests; answers in `mode: buffer`; in `mode: after`.
    pub external_request: bool,
    pub buffered: bool,
    pub after: bool,
    /// The Route it guards, `namespace/name`: its audit Events are recorded there.
    pub qualified: Arc<str>,
    /// Streams: bytes held back (the longest response match any policy can make, up to its cap)
    /// and the most an unfinished match may hold before the stream is ended.
    pub hold: usize,
    pub cap: usize,
    pub metrics: metrics::GuardMetrics,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field(
                "policies",
                &self.policies.iter().map(|p| &p.key).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Guard {
    /// The guard of Route `route` (`qualified`: `namespace/name`) over `policies`; `None` when
    /// there are none.
    pub fn new(route: &str, qualified: &str, policies: Vec<Arc<CompiledPolicy>>) -> Option<Guard> {
        if policies.is_empty() {
            return None;
        }
        let scanned_response = policies.iter().any(|p| !p.response.is_empty());
        let external =
            |f: &dyn Fn(&External) -> bool| policies.iter().any(|p| p.external.iter().any(f));
        let external_request = external(&|e| e.request);
        let buffered = external(&|e| e.response && e.mode == StreamMode::Buffer);
        let after = external(&|e| e.response && e.mode == StreamMode::After);
        let request = external_request || policies.iter().any(|p| !p.request.is_empty());
        let response = scanned_response || buffered || after;
        let hold = policies
            .iter()
            .filter(|p| !p.response.is_empty())
            .map(|p| p.response.hold)
            .max()
            .unwrap_or(0);
        let cap = policies.iter().map(|p| p.cap).max().unwrap_or(0).max(hold);
        Some(Guard {
            metrics: metrics::GuardMetrics::new(route, &policies),
            policies,
            request,
            response,
            scanned_response,
            external_request,
            buffered,
            after,
            qualified: qualified.into(),
            hold,
            cap,
        })
    }

    /// The external checks of `phase`, in order, with their policy's index.
    pub fn externals(&self, phase: Phase) -> impl Iterator<Item = (usize, &External)> {
        self.policies.iter().enumerate().flat_map(move |(i, p)| {
            p.external
                .iter()
                .filter(move |e| match phase {
                    Phase::Request => e.request,
                    Phase::Response => e.response,
                })
                .map(move |e| (i, e))
        })
    }

    fn scan(&self, phase: Phase, text: &str, from: usize, hits: &mut Hits) {
        let mut one = Vec::new();
        for (i, p) in self.policies.iter().enumerate() {
            let scanner = match phase {
                Phase::Request => &p.request,
                Phase::Response => &p.response,
            };
            if scanner.is_empty() {
                continue;
            }
            one.clear();
            scanner.scan(text, from, &mut one);
            hits.extend(one.iter().map(|h| (i, *h)));
        }
    }

    /// Checks a whole text, masking it in place; the blocking finding, if any.
    pub fn check_text(
        &self,
        phase: Phase,
        text: &mut String,
        findings: &mut Vec<Finding>,
    ) -> Result<(), Finding> {
        let mut hits = Vec::new();
        self.scan(phase, text, 0, &mut hits);
        if hits.iter().all(|(_, h)| !h.valid) {
            return Ok(());
        }
        let mut out = String::with_capacity(text.len());
        mask::apply(self, &mut hits, text, 0, text.len(), &mut out, findings)?;
        if out != *text {
            *text = out;
        }
        Ok(())
    }

    /// The error a blocking finding gives the caller: names, never the matched text.
    pub fn blocked(&self, finding: Finding, phase: Phase, why: BlockReason) -> Blocked {
        let policy = &self.policies[finding.policy];
        Blocked {
            policy: policy.key.to_string(),
            check: policy.checks[finding.check].name.to_string(),
            phase: phase.as_str(),
            why,
            reason: None,
        }
    }

    /// Counts `findings` (once each per call) and logs them; the summary for the request log
    /// line (`policy/check:action:phase`, comma-separated: names, never the matched text).
    pub fn record(
        &self,
        metrics: &metrics::GuardrailMetrics,
        phase: Phase,
        findings: &[Finding],
        elapsed: std::time::Duration,
    ) -> Option<String> {
        let handles = self.metrics.handles(metrics);
        handles.latency(phase).observe(elapsed.as_secs_f64());
        if findings.is_empty() {
            return None;
        }
        let mut summary = String::new();
        for f in findings {
            handles.action(f.policy, f.check, phase).inc();
            let p = &self.policies[f.policy];
            let c = &p.checks[f.check];
            if c.action != GuardrailAction::Mask {
                metrics.audits.note(audit::AuditEvent {
                    route: Arc::clone(&self.qualified),
                    policy: Arc::clone(&p.key),
                    check: Arc::clone(&c.name),
                    action: c.action,
                    phase: phase.as_str(),
                });
            }
            if !summary.is_empty() {
                summary.push(',');
            }
            summary.push_str(&format!(
                "{}/{}:{}:{}",
                p.key,
                c.name,
                c.action.as_str(),
                phase.as_str()
            ));
        }
        tracing::info!(guardrail = %summary, "guardrail matched");
        Some(summary)
    }

    /// The action of a finding's check.
    pub fn action(&self, f: Finding) -> GuardrailAction {
        self.policies[f.policy].checks[f.check].action
    }
}

/// A guardrail ended the call: the policy and check by name, never the matched text. The data
/// plane wraps it in its error (`GatewayError::GuardrailBlocked`); this module needs none of it.
#[derive(Clone, Debug, thiserror::Error)]
#[error("guardrail_blocked: check {check:?} of guardrail policy {policy} blocked the {phase}{}{}", match why { BlockReason::Matched => String::new(), other => format!(" ({})", other.as_str()) }, reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
pub struct Blocked {
    pub policy: String,
    pub check: String,
    pub phase: &'static str,
    pub why: BlockReason,
    /// What an external check said (a webhook's `reason`, a judge's categories); bounded.
    pub reason: Option<String>,
}

/// Why a guardrail ended a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockReason {
    /// A `block` check matched.
    Matched,
    /// A match in a streamed answer grew past what the policy may hold back, so it could not be
    /// masked whole.
    HoldBackExceeded,
    /// A stream the gateway cannot read (a provider's own events) met a response check.
    Unreadable,
    /// A webhook or judge failed or was late, and its check fails closed.
    CheckFailed,
    /// A streamed answer outgrew what a buffered webhook or judge check may hold.
    BufferExceeded,
}

impl BlockReason {
    pub fn as_str(self) -> &'static str {
        match self {
            BlockReason::Matched => "matched",
            BlockReason::HoldBackExceeded => {
                "matched text longer than the stream may hold back (spec.maxHoldBack)"
            }
            BlockReason::Unreadable => "the answer cannot be checked",
            BlockReason::CheckFailed => "the check could not be made and fails closed",
            BlockReason::BufferExceeded => {
                "the streamed answer is longer than a buffered check may hold"
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A guard over one policy written as YAML.
    pub fn guard(yaml: &str) -> Guard {
        let spec: crate::api::GuardrailPolicySpec =
            serde_yaml::from_str(yaml).unwrap_or_else(|e| panic!("{e}"));
        let p = CompiledPolicy::compile("ns/p", &spec).unwrap_or_else(|e| panic!("{e}"));
        Guard::new("r", "ns/r", vec![Arc::new(p)]).unwrap_or_else(|| panic!("no guard"))
    }
}

#[cfg(test)]
mod tests {
    use super::testing::guard;
    use super::*;

    #[test]
    fn a_teams_references_are_namespace_slash_name_and_must_compile() {
        let mut p = crate::api::GuardrailPolicy::new(
            "pii",
            serde_yaml::from_str("checks:\n- {name: c, action: mask, detector: {builtin: card}}")
                .unwrap(),
        );
        p.metadata.namespace = Some("a".into());
        let compiled = compile_all(&[Arc::new(p)]);
        let refs = |r: &[&str]| r.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            team_policies(&refs(&["a/pii"]), &compiled).unwrap().len(),
            1
        );
        let e = team_policies(&refs(&["a/pii", "b/pii"]), &compiled).unwrap_err();
        assert!(e.contains("b/pii does not exist"), "{e}");
        let e = team_policies(&refs(&["pii"]), &compiled).unwrap_err();
        assert!(e.contains("not a namespace/name"), "{e}");
    }

    struct Env;

    impl Environment for Env {
        fn secret(&self, namespace: &str, r: &SecretKeyRef) -> Result<SecretValue, String> {
            match (namespace, r.name.as_str()) {
                ("a", "hook") => Ok(SecretValue::new("t0ken")),
                _ => Err(format!("Secret {namespace}/{} not found", r.name)),
            }
        }
        fn refuse(&self, url: &str) -> Option<String> {
            url.contains("169.254")
                .then(|| "cloud metadata".to_string())
        }
        fn judge(&self, namespace: &str, name: &str) -> Result<(), String> {
            (name == "guard")
                .then_some(())
                .ok_or_else(|| format!("Route {namespace}/{name} does not exist"))
        }
    }

    #[test]
    fn external_checks_are_resolved_against_the_cluster_or_fail_the_policy() {
        let policy = |name: &str, check: &str| {
            let mut p = crate::api::GuardrailPolicy::new(
                name,
                serde_yaml::from_str(&format!("checks:\n- {check}")).unwrap(),
            );
            p.metadata.namespace = Some("a".into());
            Arc::new(p)
        };
        let compiled = compile_all(&[
            policy(
                "plain",
                "{name: c, action: mask, detector: {builtin: card}}",
            ),
            policy(
                "hooked",
                "{name: w, action: block, detector: {webhook: {url: 'http://h', secretRef: {name: hook, key: k}}}}",
            ),
            policy(
                "keyless",
                "{name: w, action: block, detector: {webhook: {url: 'http://h', secretRef: {name: gone, key: k}}}}",
            ),
            policy(
                "metadata",
                "{name: w, action: block, detector: {webhook: {url: 'http://169.254.169.254/'}}}",
            ),
            policy(
                "judged",
                "{name: j, action: block, detector: {judge: {route: guard}}}",
            ),
            policy(
                "orphan",
                "{name: j, action: block, detector: {judge: {route: nobody}}}",
            ),
        ]);
        let resolved = resolve_all(&compiled, &Env);
        let get = |n: &str| resolved[&("a".to_string(), n.to_string())].clone();
        let plain = |n: &str| compiled[&("a".to_string(), n.to_string())].clone();
        // Without external checks the compiled policy is shared, not copied.
        assert!(Arc::ptr_eq(
            &get("plain").unwrap(),
            &plain("plain").unwrap()
        ));
        let hooked = get("hooked").unwrap();
        let ExternalKind::Webhook { bearer, .. } = &hooked.external[0].kind else {
            panic!("not a webhook");
        };
        assert_eq!(bearer.as_ref().map(SecretValue::expose), Some("t0ken"));
        assert!(get("judged").is_ok());
        for (name, says) in [
            ("keyless", "check w: Secret a/gone not found"),
            ("metadata", "check w: webhook: cloud metadata"),
            ("orphan", "check j: judge: Route a/nobody does not exist"),
        ] {
            assert_eq!(get(name).unwrap_err(), says);
        }
        let guard = route_guard("r", "a/r", &["hooked".into()], &resolved)
            .unwrap()
            .unwrap();
        assert!(guard.request && guard.external_request && guard.buffered && !guard.after);
        assert!(!guard.scanned_response);
        let e = route_guard("r", "a/r", &["orphan".into()], &resolved).unwrap_err();
        assert!(e.contains("does not exist"), "{e}");
    }

    #[test]
    fn masks_blocks_and_audits_whole_texts() {
        let g = guard(
            "checks:\n- {name: cards, action: mask, detector: {builtin: card}}\n- {name: mail, action: audit, detector: {builtin: email}}\n- {name: code, phase: request, action: block, detector: {keywords: [bluebird]}}\n- {name: t, phase: response, action: mask, detector: {regex: 'TCK-[0-9]{6}', placeholder: '[TICKET]'}}",
        );
        let mut f = Vec::new();
        let mut t = "pay 4111 1111 1111 1111 to a@b.com re TCK-123456".to_string();
        g.check_text(Phase::Request, &mut t, &mut f).unwrap();
        assert_eq!(t, "pay [CARD] to a@b.com re TCK-123456");
        assert_eq!(f.len(), 2);
        let mut t = "re TCK-123456 and 4111111111111111".to_string();
        g.check_text(Phase::Response, &mut t, &mut Vec::new())
            .unwrap();
        assert_eq!(t, "re [TICKET] and [CARD]");
        let mut t = "about Bluebird".to_string();
        let blocked = g.check_text(Phase::Request, &mut t, &mut f).unwrap_err();
        assert_eq!(g.action(blocked), GuardrailAction::Block);
        let e = g.blocked(blocked, Phase::Request, BlockReason::Matched);
        assert!(e.to_string().starts_with("guardrail_blocked"), "{e}");
        assert!(!e.to_string().to_lowercase().contains("bluebird"), "{e}");
        let mut t = "about Bluebird".to_string();
        g.check_text(Phase::Response, &mut t, &mut Vec::new())
            .unwrap();
    }
}
