//! The `McpServer` resource: one upstream MCP server, its credential, which of its tools the
//! gateway exposes, to whom, and under which limits.
//!
//! Virtual servers are not a resource of their own: an McpServer names the virtual servers it
//! belongs to (`virtualServers`, default `[default]`), and the data plane serves each name of a
//! namespace at `/mcp/{namespace}/{name}` (`/mcp/{name}` and `/mcp` in the caller's own
//! namespace). Membership lives on the server so that adding a server is one object, and a
//! namespace owner cannot pull another namespace's servers into a virtual server.

// The printcolumn(..) lists of the kube derive repeat keys by design.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::route::{AccessRule, LimitKey, RenewalPeriod};

/// An upstream MCP server reached over Streamable HTTP.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "portcullis.dev",
    version = "v1alpha1",
    kind = "McpServer",
    plural = "mcpservers",
    namespaced,
    status = "McpServerStatus",
    category = "portcullis",
    printcolumn(
        name = "URL",
        type_ = "string",
        json_path = ".spec.url",
        description = "Upstream MCP endpoint"
    ),
    printcolumn(
        name = "Tools",
        type_ = "integer",
        json_path = ".status.tools",
        description = "Tools exposed (after allow/deny)"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the gateway has listed the server's tools"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct McpServerSpec {
    /// The server's Streamable HTTP endpoint, such as `https://mcp.example.com/mcp`.
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https?://"))]
    pub url: String,
    /// The credential sent to the server, read from a Secret of this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<McpCredential>,
    /// Which of the server's tools the gateway exposes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<ToolFilter>,
    /// Who may see and call which tools. Absent: the gateway's `--default-access`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub access: Option<Vec<McpAccessRule>>,
    /// Calls allowed per tool, per window (each tool counted apart).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub limits: Vec<McpLimit>,
    /// The virtual servers of this namespace that federate this server. Default: `[default]`,
    /// the one `/mcp` serves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 16))]
    pub virtual_servers: Option<Vec<String>>,
    /// `streamable-http` (default) or `sse`, the older HTTP+SSE transport (a GET event stream
    /// and a POST endpoint), for servers that have only that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<McpTransport>,
    /// Deadline of one call to this server, in seconds (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: Option<u32>,
}

/// How the gateway talks to the server.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq)]
pub enum McpTransport {
    #[serde(rename = "streamable-http")]
    StreamableHttp,
    #[serde(rename = "sse")]
    Sse,
}

/// A bearer token or a header of the server's choosing from a Secret, or OAuth client credentials.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.secretRef) != has(self.oauth)").message("set exactly one of secretRef and oauth"))]
pub struct McpCredential {
    /// The Secret key holding the token or header value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<super::SecretKeyRef>,
    /// OAuth 2.0 client credentials: the gateway fetches tokens and replaces each before it expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oauth: Option<McpOAuth>,
    /// The header that carries it (default `Authorization`, sent as `Bearer <value>`); any other
    /// header carries the value as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9-]+$"))]
    pub header: Option<String>,
}

/// The OAuth 2.0 client-credentials grant (client_secret_basic).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct McpOAuth {
    /// The token endpoint.
    #[schemars(length(min = 1, max = 2048), regex(pattern = r"^https?://"))]
    pub token_url: String,
    #[schemars(length(min = 1, max = 256))]
    pub client_id: String,
    /// The Secret key holding the client secret.
    pub client_secret_ref: super::SecretKeyRef,
    /// Scopes asked for (none by default).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub scopes: Vec<String>,
}

/// Tool names or globs (`*` any run of characters, `?` one).
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ToolFilter {
    /// Only these tools (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub allow: Option<Vec<String>>,
    /// Never these tools, even if allowed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub deny: Vec<String>,
}

/// One grant: a caller (as a Route's `access` rule) and the tools it may see and call.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.serviceAccount), has(self.namespace), has(self.consumer), has(self.team)].filter(x, x).size() == 1").message("set exactly one of serviceAccount, namespace, consumer, team"))]
pub struct McpAccessRule {
    /// A Kubernetes ServiceAccount, as namespace/name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 317), regex(pattern = r"^[a-z0-9-]+/[a-z0-9.-]+$"))]
    pub service_account: Option<String>,
    /// Every ServiceAccount of this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub namespace: Option<String>,
    /// An API-key consumer, as the namespace/name of its Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 317), regex(pattern = r"^[a-z0-9-]+/[a-z0-9.-]+$"))]
    pub consumer: Option<String>,
    /// Every member of a Team.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub team: Option<String>,
    /// The tools granted, by name or glob (default: all the server exposes). Resources and
    /// prompts are shown only to callers granted all tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub tools: Option<Vec<String>>,
}

impl McpAccessRule {
    /// The caller part, as a Route's rule (so `access::decide` judges both alike); `None` for a
    /// Team rule, which Route rules do not have.
    pub fn caller(&self) -> Option<AccessRule> {
        self.team.is_none().then(|| AccessRule {
            service_account: self.service_account.clone(),
            namespace: self.namespace.clone(),
            consumer: self.consumer.clone(),
        })
    }
}

/// Calls allowed per window, for each tool the limit covers.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct McpLimit {
    pub renewal_period: RenewalPeriod,
    /// Calls of one tool allowed per period.
    #[schemars(range(min = 1))]
    pub calls: u64,
    /// The tools covered, by name or glob (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub tools: Option<Vec<String>>,
    /// `route`: one count per tool for all callers; `consumer`: per tool and caller.
    #[serde(default)]
    pub key: LimitKey,
}

/// What the gateway last learnt from the server.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct McpServerStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Tools exposed after `tools.allow`/`tools.deny` (the last good list while the server is away).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<u32>,
    /// The protocol version the server answered with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
