//! The response cache: a Route with `spec.cache` answers a repeated identical call from a stored
//! answer instead of its provider. One room per job: `policy` (a Route's settings, compiled at
//! reconcile), `key` (what makes two calls the same), `entry` (an answer as stored, compressed),
//! `store` (the shared store or this replica's LRU), `control` (the caller's `Cache-Control`),
//! `replay` (a stored answer as a stream, and a live stream recorded as it passes), `lookup` (the
//! per-call decision the forward path applies), `semantic` (which calls may be answered for a
//! prompt close in meaning, and this replica's index of embedded prompts).

mod control;
mod entry;
mod key;
mod lookup;
mod policy;
mod replay;
mod semantic;
mod store;

pub use control::{Directive, TTL_HEADER};
pub use entry::{Entry, EntryError};
pub use key::{CacheKey, cache_key};
pub use lookup::{Cache, CacheStatus, Hit, Lookup, Probe, Ticket, scope_of};
pub use policy::{CachePolicy, SemanticPolicy};
pub use replay::{Recorder, replay};
pub use store::{CacheStore, LocalStore};
