//! What the operator allows Routes to do, checked at reconcile time: which Secrets a Route may
//! use (`--secret-selector`), which hosts it may send them to (`--allowed-upstream-hosts`), and
//! never this gateway itself.

use std::collections::BTreeMap;
use std::net::IpAddr;

use kube::core::{Expression, Selector, SelectorExt};

use crate::api::{Outcome, Reason};

/// The operator's rules; the default allows what Kubernetes itself would, less cloud metadata.
#[derive(Clone, Debug, Default)]
pub struct OperatorPolicy {
    /// Labels a referenced Secret must carry; `None`: any Secret of the Route's namespace.
    pub secret_selector: Option<Selector>,
    pub egress: Egress,
    /// `host:port` (lower case) at which this gateway is reachable: an `apiBase` there is a loop.
    pub self_addresses: Vec<String>,
    /// Namespaces whose Routes also get their one-word name; `None`: every namespace.
    pub public_namespaces: Option<std::collections::HashSet<String>>,
}

impl OperatorPolicy {
    pub fn is_public(&self, namespace: &str) -> bool {
        self.public_namespaces
            .as_ref()
            .is_none_or(|set| set.contains(namespace))
    }

    pub fn secret_allowed(&self, labels: &BTreeMap<String, String>) -> bool {
        self.secret_selector
            .as_ref()
            .is_none_or(|s| s.matches(labels))
    }

    /// Why a Route may not call `api_base`, if it may not: `InvalidSpec` for an address that is
    /// no upstream at all (not a URL, this gateway), `EgressDenied` for one the operator forbids.
    pub fn refuse_upstream(&self, api_base: &str) -> Option<Outcome> {
        let Ok(url) = reqwest::Url::parse(api_base) else {
            return Some(Outcome::not_ready(
                Reason::InvalidSpec,
                format!("apiBase {api_base:?} is not a URL"),
            ));
        };
        let host = normalize_name(url.host_str()?);
        let port = url.port_or_known_default().unwrap_or(0);
        let address = match host.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
            _ => format!("{host}:{port}"),
        };
        if self.self_addresses.contains(&address) {
            return Some(Outcome::not_ready(
                Reason::InvalidSpec,
                format!("apiBase {api_base:?} points at this gateway itself; a call would loop"),
            ));
        }
        self.egress
            .refuse(&host)
            .map(|why| Outcome::not_ready(Reason::EgressDenied, why))
    }
}

/// Where this gateway answers: its listen port on loopback and its own address, and its Service
/// (port 80) by every DNS name a pod could use.
pub fn self_addresses(listen: std::net::SocketAddr, service: &str, namespace: &str) -> Vec<String> {
    let port = listen.port();
    let mut out: Vec<String> = ["127.0.0.1", "localhost", "[::1]", "0.0.0.0"]
        .iter()
        .map(|h| format!("{h}:{port}"))
        .collect();
    match listen.ip() {
        IpAddr::V4(ip) if !ip.is_unspecified() => out.push(format!("{ip}:{port}")),
        IpAddr::V6(ip) if !ip.is_unspecified() => out.push(format!("[{ip}]:{port}")),
        _ => {}
    }
    for name in [
        service.to_string(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ] {
        out.push(format!("{}:80", name.to_ascii_lowercase()));
    }
    out
}

/// Allowed upstream hosts: names (`api.openai.com`, `*.openai.azure.com`), addresses and CIDRs.
#[derive(Clone, Debug, Default)]
pub struct Egress {
    /// Empty: any host but the denied ranges.
    allowed: Vec<HostRule>,
}

#[derive(Clone, Debug, PartialEq)]
enum HostRule {
    Name(String),
    Suffix(String),
    Net(IpAddr, u8),
}

/// Cloud metadata and link-local addresses: a Route author must never reach them through us.
const DENIED: [(&str, u8); 3] = [("169.254.0.0", 16), ("fe80::", 10), ("fd00:ec2::254", 128)];
const DENIED_NAMES: [&str; 2] = ["metadata.google.internal", "metadata"];

impl Egress {
    /// Parses `--allowed-upstream-hosts` entries.
    pub fn parse(entries: &[String]) -> Result<Egress, String> {
        let mut allowed = Vec::new();
        for raw in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
            let entry = raw.to_ascii_lowercase();
            let rule = if let Some((ip, bits)) = entry.split_once('/') {
                let ip: IpAddr = ip.parse().map_err(|_| format!("{raw:?} is not a CIDR"))?;
                let bits: u8 = bits.parse().map_err(|_| format!("{raw:?} is not a CIDR"))?;
                if bits > if ip.is_ipv4() { 32 } else { 128 } {
                    return Err(format!("{raw:?} is not a CIDR"));
                }
                HostRule::Net(ip, bits)
            } else if let Ok(ip) = entry.parse::<IpAddr>() {
                HostRule::Net(ip, if ip.is_ipv4() { 32 } else { 128 })
            } else if let Some(suffix) = entry.strip_prefix("*.") {
                HostRule::Suffix(format!(".{suffix}"))
            } else {
                HostRule::Name(entry)
            };
            allowed.push(rule);
        }
        Ok(Egress { allowed })
    }

    /// Whether a connection to `ip`, resolved from `name`, may be made: anything but link-local
    /// and cloud metadata addresses, which only an entry of `--allowed-upstream-hosts` naming the
    /// address (or its CIDR) or the name itself opens. Checked by the upstream client's resolver
    /// on every connection, so a DNS name that resolves to a metadata address is refused there.
    pub fn allows_address(&self, name: &str, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        let name = normalize_name(name);
        let listed = self.allowed.iter().any(|rule| match rule {
            HostRule::Net(net, bits) => in_net(ip, *net, *bits),
            HostRule::Name(n) => *n == name,
            HostRule::Suffix(s) => name.ends_with(s.as_str()),
        });
        listed || !denied_address(ip)
    }

    /// Why `host` is refused, if it is.
    fn refuse(&self, host: &str) -> Option<String> {
        // `metadata.google.internal.` is the same host as without its dot; `::ffff:169.254.169.254`
        // is the IPv4 address it maps.
        let host = normalize_name(host);
        let host = host.as_str();
        let ip = host.parse::<IpAddr>().ok().map(canonical);
        let listed = self.allowed.iter().any(|rule| match (rule, ip) {
            (HostRule::Name(n), None) => n == host,
            (HostRule::Suffix(s), None) => host.ends_with(s.as_str()),
            (HostRule::Net(net, bits), Some(ip)) => in_net(ip, *net, *bits),
            _ => false,
        });
        if listed {
            return None;
        }
        let denied = match ip {
            Some(ip) => denied_address(ip),
            None => DENIED_NAMES.contains(&host),
        };
        if denied {
            return Some(format!(
                "upstream host {host} is a link-local or cloud metadata address, which Routes may not reach"
            ));
        }
        if !self.allowed.is_empty() {
            return Some(format!(
                "upstream host {host} is not in the gateway's allowed upstream hosts"
            ));
        }
        None
    }
}

fn denied_address(ip: IpAddr) -> bool {
    DENIED
        .iter()
        .any(|(net, bits)| net.parse().is_ok_and(|net| in_net(ip, net, *bits)))
}

/// An IPv4 address written as IPv6 (`::ffff:a.b.c.d`) is that IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Lower case, without brackets and without the root's trailing dot.
fn normalize_name(host: &str) -> String {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(ip), IpAddr::V4(net)) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(bits.min(32)))
                .unwrap_or(0);
            u32::from(ip) & mask == u32::from(net) & mask
        }
        (IpAddr::V6(ip), IpAddr::V6(net)) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(bits.min(128)))
                .unwrap_or(0);
            u128::from(ip) & mask == u128::from(net) & mask
        }
        _ => false,
    }
}

/// Parses a Kubernetes label selector (`a=b,c!=d,e,!f,g in (x,y),h notin (z)`).
pub fn parse_selector(text: &str) -> Result<Selector, String> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    let mut selector = Selector::default();
    for part in parts.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
        let bad = || format!("{part:?} is not a label selector requirement");
        let set = |values: &str| -> Result<std::collections::BTreeSet<String>, String> {
            let inner = values
                .trim()
                .strip_prefix('(')
                .and_then(|v| v.strip_suffix(')'))
                .ok_or_else(bad)?;
            Ok(inner.split(',').map(|v| v.trim().to_string()).collect())
        };
        let expr = if let Some((k, v)) = part.split_once("!=") {
            Expression::NotEqual(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
            Expression::Equal(k.trim().into(), v.trim().into())
        } else if let Some((k, v)) = part.split_once(" notin ") {
            Expression::NotIn(k.trim().into(), set(v)?)
        } else if let Some((k, v)) = part.split_once(" in ") {
            Expression::In(k.trim().into(), set(v)?)
        } else if let Some(k) = part.strip_prefix('!') {
            Expression::DoesNotExist(k.trim().into())
        } else if part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        {
            Expression::Exists(part.into())
        } else {
            return Err(bad());
        };
        selector.extend(expr);
    }
    Ok(selector)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selectors_parse_and_match_like_kubectl() {
        let s = parse_selector("portcullis.dev/provider-key=true, tier in (gold,silver),!banned")
            .unwrap();
        assert!(s.matches(&labels(&[
            ("portcullis.dev/provider-key", "true"),
            ("tier", "gold")
        ])));
        assert!(!s.matches(&labels(&[
            ("portcullis.dev/provider-key", "true"),
            ("tier", "bronze")
        ])));
        assert!(!s.matches(&labels(&[
            ("portcullis.dev/provider-key", "true"),
            ("tier", "gold"),
            ("banned", "")
        ])));
        assert!(parse_selector("a b c").is_err());
        let policy = OperatorPolicy {
            secret_selector: Some(parse_selector("x=1").unwrap()),
            ..Default::default()
        };
        assert!(!policy.secret_allowed(&labels(&[])));
        assert!(OperatorPolicy::default().secret_allowed(&labels(&[])));
    }

    #[test]
    fn metadata_addresses_are_refused_unless_listed_and_allowlists_hold() {
        let open = OperatorPolicy::default();
        assert!(open.refuse_upstream("https://api.openai.com/v1").is_none());
        assert!(
            open.refuse_upstream("http://169.254.169.254/latest")
                .is_some()
        );
        assert!(open.refuse_upstream("http://[fd00:ec2::254]/").is_some());
        assert!(
            open.refuse_upstream("http://metadata.google.internal/x")
                .is_some()
        );
        let strict = OperatorPolicy {
            egress: Egress::parse(&[
                "*.openai.azure.com".into(),
                "10.0.0.0/8".into(),
                "api.anthropic.com".into(),
            ])
            .unwrap(),
            ..Default::default()
        };
        assert!(
            strict
                .refuse_upstream("https://x.openai.azure.com")
                .is_none()
        );
        assert!(
            strict
                .refuse_upstream("https://api.anthropic.com/v1")
                .is_none()
        );
        assert!(strict.refuse_upstream("http://10.1.2.3:8000/v1").is_none());
        assert!(
            strict
                .refuse_upstream("https://api.openai.com/v1")
                .is_some()
        );
        assert!(strict.refuse_upstream("http://11.0.0.1/v1").is_some());
        assert!(Egress::parse(&["10.0.0.0/33".into()]).is_err());
    }

    #[test]
    fn metadata_addresses_in_disguise_are_refused_too() {
        let open = OperatorPolicy::default();
        for disguised in [
            "http://[::ffff:169.254.169.254]/latest",
            "http://[::ffff:a9fe:a9fe]/",
            "http://metadata.google.internal./computeMetadata/v1",
            "http://METADATA.google.internal../x",
            "http://169.254.169.254./",
        ] {
            assert!(open.refuse_upstream(disguised).is_some(), "{disguised}");
        }
        // Resolved addresses, as the upstream client's resolver checks them.
        let meta: IpAddr = "169.254.169.254".parse().unwrap();
        let mapped: IpAddr = "::ffff:169.254.169.254".parse().unwrap();
        let public: IpAddr = "203.0.113.7".parse().unwrap();
        assert!(!open.egress.allows_address("innocent.example.com", meta));
        assert!(!open.egress.allows_address("innocent.example.com", mapped));
        assert!(open.egress.allows_address("api.openai.com", public));
        // Listed explicitly (the address, its network or the name), it is reachable.
        for entry in ["169.254.169.254", "169.254.0.0/16", "innocent.example.com"] {
            let listed = Egress::parse(&[entry.into()]).unwrap();
            assert!(
                listed.allows_address("innocent.example.com.", meta),
                "{entry}"
            );
        }
    }

    #[test]
    fn an_api_base_at_the_gateway_itself_is_a_loop() {
        let policy = OperatorPolicy {
            self_addresses: vec![
                "127.0.0.1:8080".into(),
                "[::1]:8080".into(),
                "portcullis.portcullis-system.svc:80".into(),
            ],
            ..Default::default()
        };
        assert!(policy.refuse_upstream("http://127.0.0.1:8080/v1").is_some());
        assert!(policy.refuse_upstream("http://[::1]:8080/v1").is_some());
        assert!(
            policy
                .refuse_upstream("http://portcullis.portcullis-system.svc/v1")
                .is_some()
        );
        assert!(policy.refuse_upstream("http://127.0.0.1:9090/v1").is_none());
    }
}
