//! A Route as one call holds it: the table entry and backends by `Arc` (a table swap during the
//! call is harmless), the caller, and the guards of the caller's Teams. Its own room, so that the
//! forward path's rooms (invocation, cached, guarded) share it without importing each other.

use std::sync::Arc;

use crate::access::Identity;
use crate::table::{Backends, RouteEntry};

/// A route looked up for serving: the entry is held by `Arc`, so a table swap during the call is harmless.
pub struct ServingRoute {
    pub entry: Arc<RouteEntry>,
    pub(super) backends: Arc<Backends>,
    pub(super) caller: Option<Identity>,
    /// The guards of the caller's Teams on this route, after the route's own (`entry.guard`);
    /// empty (no allocation) unless some Team names GuardrailPolicies.
    pub(super) team_guards: Vec<Arc<crate::guardrails::Guard>>,
}

impl ServingRoute {
    /// The providers of the route's backends (a surface passes provider-only fields through only
    /// when every backend understands them).
    pub fn providers(&self) -> impl Iterator<Item = crate::api::Provider> + '_ {
        self.backends
            .list
            .iter()
            .map(|b| b.upstream.adapter.info().provider)
    }
}
