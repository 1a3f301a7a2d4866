//! Guardrail metrics: `portcullis_guardrail_actions_total{route, policy, check, action, phase}`
//! and the check latency by route and phase. A Route's handles are made on its first checked
//! call and shared by every later one (label sets are never built per call).

use std::sync::{Arc, OnceLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use super::Phase;
use super::compile::CompiledPolicy;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub route: Arc<str>,
    pub policy: Arc<str>,
    pub check: Arc<str>,
    pub action: &'static str,
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LatencyLabels {
    pub route: Arc<str>,
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExternalLabels {
    pub policy: Arc<str>,
    pub check: Arc<str>,
    /// `webhook` or `judge`.
    pub kind: &'static str,
    /// `failed_open` (the text went through) or `failed_closed` (the call was blocked).
    pub outcome: &'static str,
}

/// The families, registered once with the gateway's others, and the audit Events waiting for
/// the controller.
#[derive(Clone)]
pub struct GuardrailMetrics {
    pub actions: Family<ActionLabels, Counter>,
    pub latency: Family<LatencyLabels, Histogram>,
    pub external_errors: Family<ExternalLabels, Counter>,
    pub audits: Arc<super::audit::AuditEvents>,
}

fn check_histogram() -> Histogram {
    // 1 µs .. ~1 s: built-in detectors take microseconds.
    Histogram::new(exponential_buckets(0.000001, 2.5, 16))
}

impl GuardrailMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let actions = Family::default();
        let latency =
            Family::<LatencyLabels, Histogram>::new_with_constructor(check_histogram as fn() -> _);
        registry.register(
            "portcullis_guardrail_actions",
            "Guardrail checks that matched, by route, policy, check, action and phase (each counted once per call)",
            actions.clone(),
        );
        registry.register_with_unit(
            "portcullis_guardrail_check_duration",
            "Time of a call's guardrail checks, by route and phase: the built-in detectors' CPU time (a stream's summed over its chunks) plus the wait for webhooks and judges",
            Unit::Seconds,
            latency.clone(),
        );
        let external_errors = Family::default();
        registry.register(
            "portcullis_guardrail_external_errors",
            "Webhook and judge checks that failed or were late, by policy, check, kind and outcome (failed_open: the text went through; failed_closed: the call was blocked)",
            external_errors.clone(),
        );
        GuardrailMetrics {
            actions,
            latency,
            external_errors,
            audits: Default::default(),
        }
    }
}

/// A check's labels: policy key, check name, action.
type CheckLabels = (Arc<str>, Arc<str>, &'static str);

/// One Route's handles.
pub struct GuardMetrics {
    route: Arc<str>,
    /// Per policy, per check: `(policy key, check name, action)`.
    checks: Vec<Vec<CheckLabels>>,
    handles: OnceLock<Handles>,
}

pub struct Handles {
    /// Indexed by policy, then check, then phase (request, response).
    actions: Vec<Vec<[Counter; 2]>>,
    latency: [Histogram; 2],
}

impl Handles {
    pub fn action(&self, policy: usize, check: usize, phase: Phase) -> &Counter {
        &self.actions[policy][check][phase as usize]
    }

    pub fn latency(&self, phase: Phase) -> &Histogram {
        &self.latency[phase as usize]
    }
}

impl GuardMetrics {
    pub fn new(route: &str, policies: &[Arc<CompiledPolicy>]) -> Self {
        GuardMetrics {
            route: route.into(),
            checks: policies
                .iter()
                .map(|p| {
                    p.checks
                        .iter()
                        .map(|c| (Arc::clone(&p.key), Arc::clone(&c.name), c.action.as_str()))
                        .collect()
                })
                .collect(),
            handles: OnceLock::new(),
        }
    }

    pub fn handles(&self, m: &GuardrailMetrics) -> &Handles {
        self.handles.get_or_init(|| {
            let phases = [Phase::Request, Phase::Response];
            Handles {
                actions: self
                    .checks
                    .iter()
                    .map(|p| {
                        p.iter()
                            .map(|(policy, check, action)| {
                                phases.map(|phase| {
                                    m.actions.get_or_create_owned(&ActionLabels {
                                        route: Arc::clone(&self.route),
                                        policy: Arc::clone(policy),
                                        check: Arc::clone(check),
                                        action,
                                        phase: phase.as_str(),
                                    })
                                })
                            })
                            .collect()
                    })
                    .collect(),
                latency: phases.map(|phase| {
                    m.latency.get_or_create_owned(&LatencyLabels {
                        route: Arc::clone(&self.route),
                        phase: phase.as_str(),
                    })
                }),
            }
        })
    }
}
