//! Name resolution for upstream calls that refuses link-local and cloud metadata addresses: the
//! reconcile-time check sees only the text of a Route's `apiBase`, and a DNS name can resolve to
//! 169.254.169.254. Every connection the upstream client opens resolves here.

use std::net::SocketAddr;
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use crate::controller::policy::Egress;

/// Resolves with the system resolver, then drops the addresses `--allowed-upstream-hosts` does
/// not open; a name left with none is a connect error.
#[derive(Clone, Debug)]
pub struct EgressResolver {
    egress: Arc<Egress>,
}

impl EgressResolver {
    pub fn new(egress: Egress) -> EgressResolver {
        EgressResolver {
            egress: Arc::new(egress),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "upstream host {0} resolves only to link-local or cloud metadata addresses, which Routes may not reach"
)]
pub struct Refused(String);

/// The addresses of `name` a connection may use.
pub fn permitted(
    egress: &Egress,
    name: &str,
    addrs: impl IntoIterator<Item = SocketAddr>,
) -> Result<Vec<SocketAddr>, Refused> {
    let kept: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|a| egress.allows_address(name, a.ip()))
        .collect();
    if kept.is_empty() {
        return Err(Refused(name.to_string()));
    }
    Ok(kept)
}

impl Resolve for EgressResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let egress = Arc::clone(&self.egress);
        Box::pin(async move {
            let host = name.as_str().to_string();
            // getaddrinfo on tokio's blocking pool, as reqwest's own resolver does.
            let found = tokio::net::lookup_host((host.as_str(), 0)).await?;
            let kept = permitted(&egress, &host, found)?;
            let addrs: Addrs = Box::new(kept.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        SocketAddr::new(s.parse().unwrap(), 443)
    }

    #[test]
    fn metadata_addresses_are_dropped_and_a_name_left_with_none_refused() {
        let open = Egress::default();
        let both = [addr("169.254.169.254"), addr("203.0.113.7")];
        assert_eq!(
            permitted(&open, "mixed.example.com", both).unwrap(),
            [addr("203.0.113.7")]
        );
        for meta in [
            "169.254.169.254",
            "::ffff:169.254.169.254",
            "fe80::1",
            "fd00:ec2::254",
        ] {
            let err = permitted(&open, "innocent.example.com", [addr(meta)]).unwrap_err();
            assert!(err.to_string().contains("innocent.example.com"), "{meta}");
        }
        let listed = Egress::parse(&["169.254.169.254".into()]).unwrap();
        assert!(permitted(&listed, "innocent.example.com", [addr("169.254.169.254")]).is_ok());
    }

    #[tokio::test]
    async fn the_resolver_resolves_ordinary_names() {
        let resolver = EgressResolver::new(Egress::default());
        let name: Name = "localhost".parse().unwrap();
        let addrs: Vec<SocketAddr> = resolver.resolve(name).await.unwrap().collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
        assert!(!addrs.is_empty());
        let refusing = EgressResolver::new(Egress::default());
        // A name that resolves only to a link-local address (as `metadata.google.internal` does in
        // a cloud): the resolver refuses it. Offline, a literal stands in for the lookup result.
        assert!(
            permitted(
                &refusing.egress,
                "metadata.google.internal",
                [addr("169.254.169.254")]
            )
            .is_err()
        );
    }
}
