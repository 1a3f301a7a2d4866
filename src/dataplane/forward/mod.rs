//! Forwarding a unified request to a route's backends and back: the only place that talks
//! upstream. One room per job: `invocation` (find the route, admit the call, run it plain or
//! streamed), `tries` (which backend next, and the pure retry verdict), `metering` (tokens, cost,
//! errors, a stream's budget), `upstream` (the HTTP call, stream decoding, redaction), `cached`
//! (the response cache: a hit answered, a miss's answer stored), `guarded` (the Route's and the
//! caller's Teams' guardrails on the request, the answer, the stream), `serving` (the Route as one
//! call holds it, shared by those rooms).

mod cached;
mod guarded;
mod invocation;
mod metering;
mod serving;
mod tries;
mod upstream;

pub use invocation::{invoke, invoke_stream, lookup, lookup_route};
pub use serving::ServingRoute;
