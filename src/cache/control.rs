//! What the caller asks of the cache for one call: `Cache-Control: no-cache` (answer live and
//! store the answer), `no-store` (neither read nor write), and `x-portcullis-cache-ttl` (a
//! shorter life for the entry this call stores).

use std::time::Duration;

use http::{HeaderName, HeaderValue};

pub const TTL_HEADER: HeaderName = HeaderName::from_static("x-portcullis-cache-ttl");

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Directive {
    /// Skip the lookup; the live answer is stored.
    pub no_cache: bool,
    /// Skip the lookup and do not store.
    pub no_store: bool,
    /// The caller's TTL for what this call stores (only ever shortens the Route's).
    pub ttl: Option<Duration>,
}

impl Directive {
    /// From the request's `Cache-Control` and `x-portcullis-cache-ttl`; anything unreadable is
    /// ignored (a cache hint never fails a call).
    pub fn from_headers(cache_control: Option<&HeaderValue>, ttl: Option<&HeaderValue>) -> Self {
        let mut d = Directive::default();
        if let Some(text) = cache_control.and_then(|v| v.to_str().ok()) {
            for word in text.split(',').map(str::trim) {
                let word = word.split('=').next().unwrap_or_default();
                if word.eq_ignore_ascii_case("no-cache") {
                    d.no_cache = true;
                } else if word.eq_ignore_ascii_case("no-store") {
                    d.no_store = true;
                }
            }
        }
        d.ttl = ttl.and_then(|v| v.to_str().ok()).and_then(|t| {
            // Seconds (`30`) or a duration as Routes write them (`30s`, `5m`).
            t.trim()
                .parse::<u64>()
                .ok()
                .map(Duration::from_secs)
                .or_else(|| crate::api::parse_duration(t.trim()))
        });
        d
    }

    /// The TTL of an entry this call stores: the Route's, or the caller's when shorter.
    pub fn ttl(&self, route: Duration) -> Duration {
        self.ttl.map_or(route, |t| t.min(route))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_callers_words_and_only_ever_shortens() {
        let v = |s: &'static str| HeaderValue::from_static(s);
        let d = Directive::from_headers(Some(&v("max-age=0, No-Cache")), Some(&v("30")));
        assert!(d.no_cache && !d.no_store);
        assert_eq!(d.ttl(Duration::from_secs(3600)), Duration::from_secs(30));
        assert_eq!(d.ttl(Duration::from_secs(10)), Duration::from_secs(10));
        let d = Directive::from_headers(Some(&v("no-store")), Some(&v("2m")));
        assert!(d.no_store && !d.no_cache);
        assert_eq!(d.ttl, Some(Duration::from_secs(120)));
        let d = Directive::from_headers(None, Some(&v("soon")));
        assert_eq!(d, Directive::default());
    }
}
