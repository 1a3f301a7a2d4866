//! The MCP table: every McpServer the gateway serves, with the tools it last listed, grouped into
//! virtual servers. Built by the controller, swapped in whole, read lock-free by the data plane.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{HeaderName, HeaderValue};
use rmcp::model::Tool;

use crate::access::{Decision, DefaultAccess, Identity, decide};
use crate::api::{Limit, LimitKey, McpAccessRule, McpLimit};

use super::glob;
use super::oauth::TokenSource;

/// Between a server's name and its tool's in a virtual server: `github_create_issue`. Server
/// names are DNS labels, which never contain `_`, so the first `_` always ends the server name.
pub const SEPARATOR: char = '_';

/// The virtual server `/mcp` serves.
pub const DEFAULT_VIRTUAL_SERVER: &str = "default";

/// What the gateway presents to an upstream server; never printed.
#[derive(Clone, Default)]
pub enum Credential {
    #[default]
    None,
    /// A header from a Secret, marked sensitive.
    Header(HeaderName, HeaderValue),
    /// OAuth client credentials, exchanged for tokens (shared across table rebuilds).
    OAuth(Arc<TokenSource>),
}

/// One upstream server as the data plane uses it.
pub struct ServerEntry {
    pub namespace: String,
    pub name: String,
    /// `namespace/name`: logs, metrics, limit keys.
    pub qualified: String,
    pub url: String,
    pub credential: Credential,
    /// The server speaks the older HTTP+SSE transport (`transport: sse`).
    pub legacy_sse: bool,
    pub access: Option<Vec<McpAccessRule>>,
    pub limits: Vec<McpLimit>,
    pub timeout: Duration,
    /// The tools exposed (after `tools.allow`/`tools.deny`), as the server last listed them.
    pub tools: Vec<Tool>,
}

impl std::fmt::Debug for ServerEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerEntry")
            .field("qualified", &self.qualified)
            .field("url", &self.url)
            .field("tools", &self.tools.len())
            .finish_non_exhaustive()
    }
}

/// Who calls: the identity, and the Teams it belongs to (for `team` rules).
#[derive(Clone, Copy)]
pub struct Caller<'a> {
    pub identity: Option<&'a Identity>,
    pub teams: &'a [String],
}

impl ServerEntry {
    /// Whether `caller` may see and call `tool` (a name as the server knows it).
    pub fn grants(&self, default: DefaultAccess, caller: Caller<'_>, tool: &str) -> bool {
        self.decision(default, caller, Some(tool)) == Decision::Allow
    }

    /// Whether `caller` may see this server's resources and prompts: granted all its tools.
    pub fn grants_all(&self, default: DefaultAccess, caller: Caller<'_>) -> bool {
        self.decision(default, caller, None) == Decision::Allow
    }

    fn decision(&self, default: DefaultAccess, caller: Caller<'_>, tool: Option<&str>) -> Decision {
        let Some(rules) = &self.access else {
            return decide(None, default, caller.identity);
        };
        let applying: Vec<&McpAccessRule> = rules
            .iter()
            .filter(|r| match (&r.tools, tool) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(globs), Some(t)) => glob::any(globs, t),
            })
            .collect();
        let by_team = applying
            .iter()
            .any(|r| r.team.as_ref().is_some_and(|t| caller.teams.contains(t)));
        if by_team && caller.identity.is_some() {
            return Decision::Allow;
        }
        let callers: Vec<_> = applying.iter().filter_map(|r| r.caller()).collect();
        if callers.is_empty() {
            return match caller.identity {
                Some(_) => Decision::Forbidden,
                None => Decision::Unauthenticated,
            };
        }
        decide(Some(&callers), default, caller.identity)
    }

    /// The tool named so, if the server exposes it.
    pub fn tool(&self, name: &str) -> Option<&Tool> {
        self.tools.iter().find(|t| t.name == name)
    }

    /// The limits that cover `tool`, as the limiter counts them.
    pub fn limits_of(&self, tool: &str) -> Vec<Limit> {
        self.limits
            .iter()
            .filter(|l| l.tools.as_ref().is_none_or(|g| glob::any(g, tool)))
            .map(|l| Limit {
                renewal_period: l.renewal_period,
                calls: Some(l.calls),
                tokens: None,
                usd: None,
                key: l.key,
                on_exceed: None,
                action: None,
            })
            .collect()
    }

    /// Whether any limit is per consumer (then anonymous callers are refused: nobody to count).
    pub fn has_consumer_limits(&self) -> bool {
        self.limits.iter().any(|l| l.key == LimitKey::Consumer)
    }
}

/// `server_tool`.
pub fn prefixed(server: &str, name: &str) -> String {
    format!("{server}{SEPARATOR}{name}")
}

/// `server_tool` split at the first separator.
pub fn split(prefixed: &str) -> Option<(&str, &str)> {
    prefixed.split_once(SEPARATOR)
}

/// Every server, and the virtual servers that federate them.
#[derive(Debug, Default)]
pub struct McpTable {
    /// (namespace, virtual server) -> its servers, by name.
    virtuals: HashMap<(String, String), Vec<Arc<ServerEntry>>>,
}

pub type SharedMcpTable = Arc<ArcSwap<McpTable>>;

impl McpTable {
    /// `entries` with the virtual servers each belongs to.
    pub fn new(entries: impl IntoIterator<Item = (Arc<ServerEntry>, Vec<String>)>) -> McpTable {
        let mut virtuals: HashMap<(String, String), Vec<Arc<ServerEntry>>> = HashMap::new();
        for (entry, names) in entries {
            for vs in names {
                virtuals
                    .entry((entry.namespace.clone(), vs))
                    .or_default()
                    .push(Arc::clone(&entry));
            }
        }
        for servers in virtuals.values_mut() {
            servers.sort_by(|a, b| a.name.cmp(&b.name));
        }
        McpTable { virtuals }
    }

    /// The servers of a virtual server.
    pub fn virtual_server(&self, namespace: &str, name: &str) -> Option<&[Arc<ServerEntry>]> {
        self.virtuals
            .get(&(namespace.to_string(), name.to_string()))
            .map(Vec::as_slice)
    }
}

#[cfg(test)]
pub(crate) fn entry(name: &str, tools: &[&str], access: Option<Vec<McpAccessRule>>) -> ServerEntry {
    ServerEntry {
        namespace: "ns".into(),
        name: name.into(),
        qualified: format!("ns/{name}"),
        url: "http://127.0.0.1:1/mcp".into(),
        credential: Credential::None,
        legacy_sse: false,
        access,
        limits: Vec::new(),
        timeout: Duration::from_secs(5),
        tools: tools
            .iter()
            .map(|t| Tool::new(t.to_string(), "", Arc::new(serde_json::Map::new())))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(name: &str) -> Identity {
        Identity::ServiceAccount {
            namespace: "ns".into(),
            name: name.into(),
        }
    }

    #[test]
    fn per_tool_rules_grant_only_their_tools_and_never_resources() {
        let rules = vec![
            McpAccessRule {
                service_account: Some("ns/reader".into()),
                namespace: None,
                consumer: None,
                team: None,
                tools: Some(vec!["get_*".into(), "search".into()]),
            },
            McpAccessRule {
                service_account: Some("ns/admin".into()),
                namespace: None,
                consumer: None,
                team: None,
                tools: None,
            },
            McpAccessRule {
                service_account: None,
                namespace: None,
                consumer: None,
                team: Some("sre".into()),
                tools: Some(vec!["delete_*".into()]),
            },
        ];
        let e = entry(
            "jira",
            &["get_issue", "search", "delete_issue"],
            Some(rules),
        );
        let d = DefaultAccess::AllowAll;
        let reader = sa("reader");
        let admin = sa("admin");
        let other = sa("other");
        let who = |id| Caller {
            identity: id,
            teams: &[],
        };
        assert!(e.grants(d, who(Some(&reader)), "get_issue"));
        assert!(e.grants(d, who(Some(&reader)), "search"));
        assert!(!e.grants(d, who(Some(&reader)), "delete_issue"));
        assert!(!e.grants_all(d, who(Some(&reader))));
        assert!(e.grants(d, who(Some(&admin)), "delete_issue"));
        assert!(e.grants_all(d, who(Some(&admin))));
        assert!(!e.grants(d, who(None), "get_issue"));
        assert!(!e.grants(d, who(Some(&other)), "get_issue"));
        let sre = ["sre".to_string()];
        let member = Caller {
            identity: Some(&other),
            teams: &sre,
        };
        assert!(e.grants(d, member, "delete_issue"));
        assert!(!e.grants(d, member, "get_issue"));
    }

    #[test]
    fn without_rules_the_default_access_decides() {
        let e = entry("gh", &["x"], None);
        let a = sa("a");
        let who = |id| Caller {
            identity: id,
            teams: &[],
        };
        assert!(e.grants(DefaultAccess::AllowAll, who(None), "x"));
        assert!(!e.grants(DefaultAccess::Authenticated, who(None), "x"));
        assert!(e.grants(DefaultAccess::Authenticated, who(Some(&a)), "x"));
    }

    #[test]
    fn prefixes_split_at_the_first_separator() {
        assert_eq!(prefixed("github", "create_issue"), "github_create_issue");
        assert_eq!(
            split("github_create_issue"),
            Some(("github", "create_issue"))
        );
        assert_eq!(split("nounderscore"), None);
    }
}
