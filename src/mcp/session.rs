//! Caller sessions, sealed: the `Mcp-Session-Id` the gateway hands out carries what a replica
//! needs to continue the session (protocol version, virtual server, caller, a nonce) and an
//! HMAC-SHA256 over it with a key every replica shares (`--mcp-session-key`). Any replica can
//! check and continue a session without shared state; upstream sessions are opened per replica
//! on first use (`upstream.rs`), keyed by the nonce.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// Longest session id looked at; a sealed one is about 200 bytes.
const MAX_ID: usize = 1024;

/// What a caller session is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallerSession {
    /// The negotiated protocol version.
    pub v: String,
    /// The virtual server: namespace and name.
    pub ns: String,
    pub vs: String,
    /// The caller's consumer name (`sa/ns/name`, `key/ns/name`, empty when anonymous): a session
    /// id is only good with the credential that opened it.
    pub sub: String,
    /// Random; keys this session's upstream sessions.
    pub n: String,
}

/// Seals and opens session ids.
pub struct Sealer {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer")
    }
}

impl Sealer {
    pub fn new(key: &[u8]) -> Sealer {
        // The key is hashed and zero-padded to the block size, which is what HMAC does with a
        // key of any length itself; it makes the constructor infallible.
        let mut block = [0u8; 64];
        block[..32].copy_from_slice(&Sha256::digest(key));
        Sealer {
            mac: <Hmac<Sha256> as KeyInit>::new(&block.into()),
        }
    }

    /// A key of this process alone: sessions then continue on this replica only.
    pub fn random() -> Sealer {
        let key: Vec<u8> = (0..32).map(|_| fastrand::u8(..)).collect();
        Sealer::new(&key)
    }

    fn mac(&self) -> Hmac<Sha256> {
        self.mac.clone()
    }

    pub fn seal(&self, session: &CallerSession) -> String {
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(session).unwrap_or_default());
        let mut mac = self.mac();
        mac.update(body.as_bytes());
        let tag = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
        format!("{body}.{tag}")
    }

    /// The session behind `id`, if this gateway sealed it.
    pub fn open(&self, id: &str) -> Option<CallerSession> {
        if id.len() > MAX_ID {
            return None;
        }
        let (body, tag) = id.split_once('.')?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        let mut mac = self.mac();
        mac.update(body.as_bytes());
        mac.verify_slice(&tag).ok()?;
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).ok()?).ok()
    }
}

/// A fresh nonce.
pub fn nonce() -> String {
    format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_sessions_open_only_with_their_key_and_unchanged() {
        let s = CallerSession {
            v: "2025-06-18".into(),
            ns: "team-a".into(),
            vs: "default".into(),
            sub: "sa/team-a/agent".into(),
            n: nonce(),
        };
        let a = Sealer::new(b"shared key");
        let id = a.seal(&s);
        assert_eq!(Sealer::new(b"shared key").open(&id), Some(s.clone()));
        assert_eq!(Sealer::new(b"other key").open(&id), None);
        let mut forged = s;
        forged.sub = "sa/team-a/admin".into();
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        let tag = id.split_once('.').unwrap().1;
        assert_eq!(a.open(&format!("{body}.{tag}")), None);
        assert_eq!(a.open("garbage"), None);
        assert_eq!(a.open(&"x".repeat(5000)), None);
    }
}
