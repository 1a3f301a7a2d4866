//! A Route as one call holds it: the table entry and backends by `Arc` (a table swap during the
//! call is harmless), the caller, and the guards of the caller's Teams. Its own room, so that the
//! forward path's rooms (invocation, cached, guarded) share it without importing each other.

use std::sync::Arc;

use crate::access::Identity;
use crate::dataplane::AppState;
use crate::dataplane::admission::{self, Admission};
use crate::dataplane::error::GatewayError;
use crate::llm::LlmRequest;
use crate::table::{Backends, RouteEntry};

/// A route looked up for serving: the entry is held by `Arc`, so a table swap during the call is harmless.
pub struct ServingRoute {
    pub entry: Arc<RouteEntry>,
    pub(super) backends: Arc<Backends>,
    pub(super) caller: Option<Identity>,
    /// The guards of the caller's Teams on this route, after the route's own (`entry.guard`);
    /// empty (no allocation) unless some Team names GuardrailPolicies.
    pub(super) team_guards: Vec<Arc<crate::guardrails::Guard>>,
    /// Set for a call the gateway makes itself (`invocation::invoke_as`): counted under this
    /// consumer and in no Team, and not looked up in this Route's own cache.
    pub(super) on_behalf_of: Option<Arc<str>>,
}

impl ServingRoute {
    /// Counts the call, costing `calls` upstream calls, against the Route's limits (and its
    /// caller's Teams', unless the gateway itself calls).
    pub(super) async fn admit(
        &self,
        state: &AppState,
        request: &LlmRequest,
        calls: u64,
    ) -> Result<Admission, GatewayError> {
        match &self.on_behalf_of {
            Some(consumer) => {
                admission::admit_as(state, &self.entry, consumer, &[], request, calls).await
            }
            None => {
                admission::admit(state, &self.entry, self.caller.as_ref(), request, calls).await
            }
        }
    }

    /// The API all the route's backends speak, if they share one.
    pub fn wire(&self) -> Option<crate::providers::Wire> {
        self.backends.wire
    }

    /// Whether the route's streams in that API pass through (see `Backends::wire_streams`).
    pub fn wire_streams(&self) -> bool {
        self.backends.wire_streams
    }

    /// The providers of the route's backends (a surface passes provider-only fields through only
    /// when every backend understands them).
    pub fn providers(&self) -> impl Iterator<Item = crate::api::Provider> + '_ {
        self.backends
            .list
            .iter()
            .map(|b| b.upstream.adapter.info().provider)
    }
}
