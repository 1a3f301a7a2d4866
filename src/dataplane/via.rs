//! Request loops: a Route whose `apiBase` points back at this gateway (directly or through other
//! gateways) would send a call round forever. Every upstream call carries `x-portcullis-via` with
//! the gateways it passed through; a request that already passed through this one is refused.

use std::sync::Arc;

use axum::extract::Request;
use axum::response::Response;
use http::{HeaderMap, HeaderName, HeaderValue};

use super::error::{self, GatewayError};

pub const VIA: HeaderName = HeaderName::from_static("x-portcullis-via");

/// More gateways than this in a row is a loop whatever their names.
const MAX_HOPS: usize = 8;

/// This gateway's name, the same on every replica (a loop may come back through another one).
#[derive(Clone, Debug)]
pub struct Via {
    id: Arc<str>,
    header: HeaderValue,
}

impl Via {
    /// `id` is printable ASCII without commas; anything else is replaced so the header stays valid.
    pub fn new(id: &str) -> Via {
        let clean: String = id
            .chars()
            .map(|c| {
                if c.is_ascii_graphic() && c != ',' {
                    c
                } else {
                    '-'
                }
            })
            .take(128)
            .collect();
        let header =
            HeaderValue::from_str(&clean).unwrap_or(HeaderValue::from_static("portcullis"));
        Via {
            id: clean.into(),
            header,
        }
    }

    /// The default name: unique per namespace, so two installations can chain without being
    /// mistaken for a loop while the replicas of one are seen as the same gateway.
    pub fn for_namespace(namespace: &str) -> Via {
        Via::new(&format!("portcullis.{namespace}"))
    }

    /// The `x-portcullis-via` value for an upstream call: the caller's chain plus this gateway.
    pub fn upstream_value(&self, incoming: Option<&HeaderValue>) -> HeaderValue {
        match incoming
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
        {
            Some(chain) => HeaderValue::from_str(&format!("{chain}, {}", self.id))
                .unwrap_or_else(|_| self.header.clone()),
            None => self.header.clone(),
        }
    }

    fn is_loop(&self, headers: &HeaderMap) -> bool {
        let hops = headers
            .get_all(VIA)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim);
        let mut count = 0;
        for hop in hops {
            count += 1;
            if hop == &*self.id || count > MAX_HOPS {
                return true;
            }
        }
        false
    }
}

impl Default for Via {
    fn default() -> Self {
        Via::new("portcullis")
    }
}

/// The refusal of a request that already passed through this gateway, before any route is looked
/// up; `None` for every other request. Called by the request middleware (`observe`), so a refused
/// loop is logged and counted like any answer without a layer of its own.
pub fn refuse_loop(via: &Via, req: &Request) -> Option<Response> {
    if !via.is_loop(req.headers()) {
        return None;
    }
    tracing::warn!(
        path = req.uri().path(),
        "request loop refused: the request already passed through this gateway"
    );
    Some(error::for_path(
        req.uri().path(),
        GatewayError::LoopDetected(via.id.to_string()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_that_passed_through_this_gateway_is_a_loop() {
        let via = Via::new("portcullis.team-a");
        let mut h = HeaderMap::new();
        assert!(!via.is_loop(&h));
        h.insert(VIA, HeaderValue::from_static("portcullis.edge"));
        assert!(!via.is_loop(&h), "another gateway in front is fine");
        h.insert(
            VIA,
            HeaderValue::from_static("portcullis.edge, portcullis.team-a"),
        );
        assert!(via.is_loop(&h));
        let long = ["g"; 9].join(",");
        h.insert(VIA, HeaderValue::from_str(&long).unwrap());
        assert!(via.is_loop(&h), "too many hops");
        assert_eq!(
            via.upstream_value(Some(&HeaderValue::from_static("portcullis.edge"))),
            "portcullis.edge, portcullis.team-a"
        );
        assert_eq!(via.upstream_value(None), "portcullis.team-a");
        assert_eq!(Via::new("a,b c").upstream_value(None), "a-b-c");
    }
}
