//! Events of `audit` and `block` matches: the data plane notes them here, rate-limited to one per
//! route, policy and check a minute, and the controller publishes what is pending as Events on
//! the Route (`controller::alarms::run_guardrail_events`). Names only, never the matched text;
//! memory is bounded however many routes and checks match.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::api::GuardrailAction;

/// At most one Event per route, policy and check in this long.
pub const EVENT_WINDOW: Duration = Duration::from_secs(60);
/// Keys remembered at once; past it, new keys wait until old ones age out.
const MAX_KEYS: usize = 4096;
/// Events waiting for the controller; past it, new ones are dropped (the metric still counts).
const MAX_PENDING: usize = 256;

/// One Event to publish.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditEvent {
    /// The Route, `namespace/name`.
    pub route: Arc<str>,
    pub policy: Arc<str>,
    pub check: Arc<str>,
    pub action: GuardrailAction,
    pub phase: &'static str,
}

impl AuditEvent {
    pub fn note(&self) -> String {
        format!(
            "check {} of GuardrailPolicy {} matched the {} of a call (action {}); further matches of this check within a minute are counted in portcullis_guardrail_actions_total only",
            self.check,
            self.policy,
            self.phase,
            self.action.as_str()
        )
    }
}

type Key = (Arc<str>, Arc<str>, Arc<str>);

#[derive(Default)]
struct Inner {
    last: HashMap<Key, Instant>,
    pending: Vec<AuditEvent>,
}

/// The pending Events and when each key last had one. The lock is held for a map update, never
/// across an await.
#[derive(Default)]
pub struct AuditEvents {
    inner: Mutex<Inner>,
}

impl AuditEvents {
    /// Notes a match; an Event is queued unless its route, policy and check had one within the
    /// window.
    pub fn note(&self, event: AuditEvent) {
        self.note_at(event, Instant::now());
    }

    fn note_at(&self, event: AuditEvent, now: Instant) {
        let mut inner = self.inner.lock();
        let key = (
            Arc::clone(&event.route),
            Arc::clone(&event.policy),
            Arc::clone(&event.check),
        );
        if inner
            .last
            .get(&key)
            .is_some_and(|t| now.duration_since(*t) < EVENT_WINDOW)
        {
            return;
        }
        if inner.last.len() >= MAX_KEYS {
            inner
                .last
                .retain(|_, t| now.duration_since(*t) < EVENT_WINDOW);
            if inner.last.len() >= MAX_KEYS {
                return;
            }
        }
        inner.last.insert(key, now);
        if inner.pending.len() < MAX_PENDING {
            inner.pending.push(event);
        }
    }

    /// The Events noted since the last call.
    pub fn take(&self) -> Vec<AuditEvent> {
        std::mem::take(&mut self.inner.lock().pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_per_check_a_minute_and_bounded() {
        let events = AuditEvents::default();
        let event = |check: &str, action| AuditEvent {
            route: "ns/r".into(),
            policy: "ns/p".into(),
            check: check.into(),
            action,
            phase: "request",
        };
        let t0 = Instant::now();
        for i in 0..5 {
            let at = t0 + Duration::from_secs(i);
            events.note_at(event("c", GuardrailAction::Audit), at);
        }
        events.note_at(event("d", GuardrailAction::Block), t0);
        assert_eq!(events.take().len(), 2);
        assert!(events.take().is_empty());
        let later = t0 + EVENT_WINDOW + Duration::from_secs(1);
        events.note_at(event("c", GuardrailAction::Audit), later);
        let again = events.take();
        assert_eq!(again.len(), 1);
        assert!(again[0].note().contains("check c of GuardrailPolicy ns/p"));
        for i in 0..(MAX_KEYS + 10) {
            events.note_at(event(&format!("c{i}"), GuardrailAction::Audit), later);
        }
        assert_eq!(events.take().len(), MAX_PENDING);
        assert!(events.inner.lock().last.len() <= MAX_KEYS);
    }
}
