use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

/// Machine-readable reasons of the `Ready` condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    Resolved,
    SecretNotFound,
    SecretKeyMissing,
    InvalidSpec,
    ProviderUnsupported,
    /// The referenced Secret does not match the gateway's `--secret-selector`.
    SecretNotAllowed,
    /// An `apiBase` outside the gateway's allowed upstream hosts.
    EgressDenied,
    /// A GuardrailPolicy the Route names is missing or invalid: the Route does not serve
    /// unchecked (fail closed).
    GuardrailNotReady,
    /// The Route serves, but its cache's `semantic.embeddingsRoute` is missing or not an
    /// embeddings Route: the cache matches identical calls only.
    SemanticMatchingOff,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Resolved => "Resolved",
            Reason::SecretNotFound => "SecretNotFound",
            Reason::SecretKeyMissing => "SecretKeyMissing",
            Reason::InvalidSpec => "InvalidSpec",
            Reason::ProviderUnsupported => "ProviderUnsupported",
            Reason::SecretNotAllowed => "SecretNotAllowed",
            Reason::EgressDenied => "EgressDenied",
            Reason::GuardrailNotReady => "GuardrailNotReady",
            Reason::SemanticMatchingOff => "SemanticMatchingOff",
        }
    }

    pub const ALL: [Reason; 9] = [
        Reason::Resolved,
        Reason::SecretNotFound,
        Reason::SecretKeyMissing,
        Reason::InvalidSpec,
        Reason::ProviderUnsupported,
        Reason::SecretNotAllowed,
        Reason::EgressDenied,
        Reason::GuardrailNotReady,
        Reason::SemanticMatchingOff,
    ];
}

/// What reconciling one Route decided. Messages never contain credential values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub reason: Reason,
    pub message: String,
}

impl Outcome {
    pub fn ready() -> Self {
        Outcome {
            reason: Reason::Resolved,
            message: "route is serving".to_string(),
        }
    }

    pub fn not_ready(reason: Reason, message: impl Into<String>) -> Self {
        Outcome {
            reason,
            message: message.into(),
        }
    }

    pub fn is_ready(&self) -> bool {
        matches!(self.reason, Reason::Resolved | Reason::SemanticMatchingOff)
    }
}

/// The `Ready` condition for `outcome` (see `condition`).
pub fn ready_condition(
    outcome: &Outcome,
    generation: Option<i64>,
    previous: Option<&Condition>,
    now: Timestamp,
) -> Condition {
    let status = if outcome.is_ready() { "True" } else { "False" };
    condition(
        "Ready",
        (status, outcome.reason.as_str(), outcome.message.clone()),
        generation,
        previous,
        now,
    )
}

/// A condition of `type_` with `(status, reason, message)`, keeping `lastTransitionTime` from
/// `previous` unless the status flipped, so an unchanged outcome produces a byte-identical status
/// (no write, no churn).
pub fn condition(
    type_: &str,
    (status, reason, message): (&str, &str, String),
    generation: Option<i64>,
    previous: Option<&Condition>,
    now: Timestamp,
) -> Condition {
    let last_transition_time = match previous {
        Some(prev) if prev.status == status => prev.last_transition_time.clone(),
        _ => Time(now),
    };
    Condition {
        type_: type_.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_is_kept_while_status_is_unchanged() {
        let t0 = Timestamp::from_second(1_000).unwrap_or(Timestamp::UNIX_EPOCH);
        let t1 = Timestamp::from_second(2_000).unwrap_or(Timestamp::UNIX_EPOCH);
        let first = ready_condition(&Outcome::ready(), Some(1), None, t0);
        let again = ready_condition(&Outcome::ready(), Some(2), Some(&first), t1);
        assert_eq!(again.last_transition_time, first.last_transition_time);
        assert_eq!(again.observed_generation, Some(2));

        let lost = Outcome::not_ready(Reason::SecretNotFound, "Secret default/x not found");
        let flipped = ready_condition(&lost, Some(2), Some(&again), t1);
        assert_eq!(flipped.last_transition_time, Time(t1));
        assert_eq!(flipped.status, "False");
        assert_eq!(flipped.reason, "SecretNotFound");
    }

    #[test]
    fn reason_change_without_status_flip_keeps_transition_time() {
        let t0 = Timestamp::from_second(1_000).unwrap_or(Timestamp::UNIX_EPOCH);
        let t1 = Timestamp::from_second(2_000).unwrap_or(Timestamp::UNIX_EPOCH);
        let a = ready_condition(
            &Outcome::not_ready(Reason::SecretNotFound, "a"),
            Some(1),
            None,
            t0,
        );
        let b = ready_condition(
            &Outcome::not_ready(Reason::SecretKeyMissing, "b"),
            Some(1),
            Some(&a),
            t1,
        );
        assert_eq!(b.last_transition_time, Time(t0));
    }
}
