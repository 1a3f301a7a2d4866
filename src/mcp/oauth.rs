//! OAuth 2.0 client credentials toward an upstream MCP server: a token is fetched from the
//! server's token endpoint, cached, and replaced before it expires (a quarter of its lifetime, at
//! most a minute, before), so no call goes out with an expired token. One fetch at a time per
//! server; callers meanwhile wait for it rather than each asking.

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http::HeaderValue;
use serde::Deserialize;

use super::reply::UpstreamError;

/// Longest token-endpoint answer read.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;
/// Lifetime assumed when the endpoint states none.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);

/// What the token request needs; the secret is never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientCredentials {
    pub token_url: String,
    pub client_id: String,
    pub client_secret: Vec<u8>,
    pub scopes: Vec<String>,
}

impl std::fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// A cached token: the `Authorization` value and when to fetch the next.
struct Cached {
    header: HeaderValue,
    refresh_at: Instant,
}

#[derive(Debug)]
pub struct TokenSource {
    pub credentials: ClientCredentials,
    cached: tokio::sync::Mutex<Option<Cached>>,
}

impl std::fmt::Debug for Cached {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cached")
    }
}

/// When to replace a token that lives `lifetime`: a quarter of it, at most a minute, early.
pub fn refresh_after(lifetime: Duration) -> Duration {
    lifetime.saturating_sub((lifetime / 4).min(Duration::from_secs(60)))
}

impl TokenSource {
    pub fn new(credentials: ClientCredentials) -> TokenSource {
        TokenSource {
            credentials,
            cached: tokio::sync::Mutex::new(None),
        }
    }

    /// The `Authorization` header value to send now.
    pub async fn header(&self, http: &reqwest::Client) -> Result<HeaderValue, UpstreamError> {
        // Held across the fetch on purpose: one fetch per server at a time (an async mutex).
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref()
            && Instant::now() < c.refresh_at
        {
            return Ok(c.header.clone());
        }
        let fresh = self.fetch(http).await?;
        let header = fresh.header.clone();
        *cached = Some(fresh);
        Ok(header)
    }

    /// Forgets the token (the server refused it): the next call fetches a new one.
    pub async fn forget(&self) {
        *self.cached.lock().await = None;
    }

    async fn fetch(&self, http: &reqwest::Client) -> Result<Cached, UpstreamError> {
        let c = &self.credentials;
        let mut basic = c.client_id.as_bytes().to_vec();
        basic.push(b':');
        basic.extend_from_slice(&c.client_secret);
        let mut authorization =
            HeaderValue::from_str(&format!("Basic {}", STANDARD.encode(&basic)))
                .map_err(|_| UpstreamError::TokenUnavailable)?;
        authorization.set_sensitive(true);
        let mut form = vec![("grant_type", "client_credentials".to_string())];
        if !c.scopes.is_empty() {
            form.push(("scope", c.scopes.join(" ")));
        }
        let body = form
            .iter()
            .map(|(k, v)| format!("{k}={}", urlencode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let started = Instant::now();
        let response = http
            .post(&c.token_url)
            .header(http::header::AUTHORIZATION, authorization)
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(http::header::ACCEPT, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|_| UpstreamError::TokenUnavailable)?;
        if !response.status().is_success() {
            // The endpoint's body is never read: it may echo what was sent.
            return Err(UpstreamError::TokenRefused(response.status().as_u16()));
        }
        let mut bytes = Vec::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
            let chunk = chunk.map_err(|_| UpstreamError::TokenUnavailable)?;
            if bytes.len() + chunk.len() > MAX_TOKEN_RESPONSE {
                return Err(UpstreamError::TokenUnavailable);
            }
            bytes.extend_from_slice(&chunk);
        }
        let token: TokenResponse =
            serde_json::from_slice(&bytes).map_err(|_| UpstreamError::TokenUnavailable)?;
        let mut header = HeaderValue::from_str(&format!("Bearer {}", token.access_token))
            .map_err(|_| UpstreamError::TokenUnavailable)?;
        header.set_sensitive(true);
        let lifetime = token
            .expires_in
            .map_or(DEFAULT_LIFETIME, Duration::from_secs);
        Ok(Cached {
            header,
            refresh_at: started + refresh_after(lifetime),
        })
    }
}

/// `application/x-www-form-urlencoded` for the few values sent (grant type, scopes).
fn urlencode(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            b' ' => "+".to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_replaced_a_quarter_of_their_life_early_at_most_a_minute() {
        assert_eq!(
            refresh_after(Duration::from_secs(4)),
            Duration::from_secs(3)
        );
        assert_eq!(
            refresh_after(Duration::from_secs(3600)),
            Duration::from_secs(3540)
        );
        assert_eq!(urlencode("read write:all"), "read+write%3Aall");
    }

    #[test]
    fn the_secret_is_never_printed() {
        let c = ClientCredentials {
            token_url: "http://t/token".into(),
            client_id: "id".into(),
            client_secret: b"very-secret".to_vec(),
            scopes: vec![],
        };
        assert!(!format!("{c:?}").contains("very-secret"));
    }
}
