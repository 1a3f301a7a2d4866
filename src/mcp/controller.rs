//! The McpServer control loop: watches McpServers, reads each one's credential, opens a session
//! with the server and lists its tools, publishes the MCP table, and writes each server's status.
//!
//! It runs after every change, every `--mcp-refresh-interval`, and at once when the data plane saw
//! a server fail a call (so status tells why soon). A server that cannot be listed keeps the last
//! tools it listed: callers still see them and each call fails or succeeds on its own. While the
//! API server is away the reflector keeps its objects and the loop goes on with them.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use http::{HeaderName, HeaderValue};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::api::{McpServer, McpServerStatus, McpTransport, ToolFilter, condition};
use crate::controller::policy::OperatorPolicy;

use super::McpGateway;
use super::glob;
use super::oauth::{ClientCredentials, TokenSource};
use super::reply::UpstreamError;
use super::table::{Credential, DEFAULT_VIRTUAL_SERVER, McpTable, ServerEntry};
use super::upstream::Discovery;

/// The status writer's field manager (the same as the Route controller's).
const FIELD_MANAGER: &str = "portcullis-controller";
/// Longest a discovery round waits for one server.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(20);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
const API_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a server is not Ready; messages never contain the credential.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotReady {
    pub reason: &'static str,
    pub message: String,
}

fn not_ready(reason: &'static str, message: impl Into<String>) -> NotReady {
    NotReady {
        reason,
        message: message.into(),
    }
}

/// The tools a server exposes after `tools.allow` and `tools.deny`.
pub fn filter_tools(
    filter: Option<&ToolFilter>,
    tools: Vec<rmcp::model::Tool>,
) -> Vec<rmcp::model::Tool> {
    let Some(f) = filter else { return tools };
    tools
        .into_iter()
        .filter(|t| f.allow.as_ref().is_none_or(|a| glob::any(a, &t.name)))
        .filter(|t| !glob::any(&f.deny, &t.name))
        .collect()
}

/// The status for a round's outcome (`tools`: the count served, fresh or last good).
pub fn desired_status(
    server: &McpServer,
    outcome: &Result<String, NotReady>,
    tools: Option<usize>,
    now: Timestamp,
) -> McpServerStatus {
    let previous = server
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    let generation = server.metadata.generation;
    let ready = match outcome {
        Ok(_) => (
            "True",
            "ToolsListed",
            format!("{} tools listed", tools.unwrap_or(0)),
        ),
        Err(e) => {
            let mut message = e.message.clone();
            if let Some(n) = tools {
                message.push_str(&format!("; serving the {n} tools listed before"));
            }
            ("False", e.reason, message)
        }
    };
    McpServerStatus {
        observed_generation: generation,
        tools: tools.map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
        protocol_version: outcome.as_ref().ok().cloned().or_else(|| {
            server
                .status
                .as_ref()
                .and_then(|s| s.protocol_version.clone())
        }),
        conditions: vec![condition("Ready", ready, generation, previous, now)],
    }
}

/// The credential header from the Secret's value, marked sensitive, built without a formatted copy.
fn credential_header(
    header: Option<&str>,
    value: &[u8],
) -> Result<(HeaderName, HeaderValue), NotReady> {
    let value = value.trim_ascii();
    let (name, bytes) = match header {
        None => (
            http::header::AUTHORIZATION,
            [b"Bearer ".as_slice(), value].concat(),
        ),
        Some(h) if h.eq_ignore_ascii_case("authorization") => (
            http::header::AUTHORIZATION,
            [b"Bearer ".as_slice(), value].concat(),
        ),
        Some(h) => (
            HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                not_ready(
                    "InvalidSpec",
                    format!("credential.header {h:?} is not a header name"),
                )
            })?,
            value.to_vec(),
        ),
    };
    let mut v = HeaderValue::from_bytes(&bytes).map_err(|_| {
        not_ready(
            "InvalidSpec",
            "the credential holds characters a header cannot carry",
        )
    })?;
    v.set_sensitive(true);
    Ok((name, v))
}

/// The value under `key` of Secret `namespace/name`, if the operator lets McpServers use it.
async fn secret_value(
    client: &Client,
    policy: &OperatorPolicy,
    ns: &str,
    secret: &crate::api::SecretKeyRef,
) -> Result<Vec<u8>, NotReady> {
    let name = &secret.name;
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let found = match tokio::time::timeout(API_CALL_TIMEOUT, api.get_opt(name)).await {
        Ok(Ok(Some(s))) => s,
        Ok(Ok(None)) => {
            return Err(not_ready(
                "SecretNotFound",
                format!("Secret {ns}/{name} not found"),
            ));
        }
        _ => {
            return Err(not_ready(
                "SecretUnavailable",
                format!("Secret {ns}/{name} cannot be read now"),
            ));
        }
    };
    if !policy.secret_allowed(found.labels()) {
        return Err(not_ready(
            "SecretNotAllowed",
            format!("Secret {ns}/{name} does not match the gateway's --secret-selector"),
        ));
    }
    let key = &secret.key;
    found
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|v| v.0.clone())
        .ok_or_else(|| {
            not_ready(
                "SecretKeyMissing",
                format!("Secret {ns}/{name} has no key {key:?}"),
            )
        })
}

/// The server's credential; an OAuth token source is kept from `previous` while its client
/// credentials are the same, so its cached token survives the table rebuild.
async fn read_credential(
    client: &Client,
    policy: &OperatorPolicy,
    server: &McpServer,
    previous: Option<&Credential>,
) -> Result<Credential, NotReady> {
    let Some(cred) = &server.spec.credential else {
        return Ok(Credential::None);
    };
    let ns = server.namespace().unwrap_or_default();
    if let Some(secret) = &cred.secret_ref {
        let value = secret_value(client, policy, &ns, secret).await?;
        let (name, value) = credential_header(cred.header.as_deref(), &value)?;
        return Ok(Credential::Header(name, value));
    }
    let Some(oauth) = &cred.oauth else {
        return Err(not_ready(
            "InvalidSpec",
            "credential needs secretRef or oauth",
        ));
    };
    if let Some(refused) = policy.refuse_upstream(&oauth.token_url) {
        return Err(not_ready(
            "EgressDenied",
            refused.message.replace("apiBase", "tokenUrl"),
        ));
    }
    let secret = secret_value(client, policy, &ns, &oauth.client_secret_ref).await?;
    let credentials = ClientCredentials {
        token_url: oauth.token_url.clone(),
        client_id: oauth.client_id.clone(),
        client_secret: secret.trim_ascii().to_vec(),
        scopes: oauth.scopes.clone(),
    };
    Ok(match previous {
        Some(Credential::OAuth(t)) if t.credentials == credentials => {
            Credential::OAuth(Arc::clone(t))
        }
        _ => Credential::OAuth(Arc::new(TokenSource::new(credentials))),
    })
}

fn why(e: &UpstreamError) -> NotReady {
    match e {
        UpstreamError::Unauthorized(_) | UpstreamError::TokenRefused(_) => {
            not_ready("Unauthorized", e.to_string())
        }
        _ => not_ready("Unreachable", e.to_string()),
    }
}

/// One server's round: its entry for the table (when it has tools to serve) and its outcome.
async fn reconcile_one(
    client: &Client,
    policy: &OperatorPolicy,
    gateway: &McpGateway,
    server: &McpServer,
    previous: Option<&Arc<ServerEntry>>,
) -> (Option<Arc<ServerEntry>>, Result<String, NotReady>) {
    let namespace = server.namespace().unwrap_or_default();
    let name = server.name_any();
    let spec = &server.spec;
    // The last good tools carry over only while the server is the same endpoint.
    let last_good = previous
        .filter(|p| p.url == spec.url)
        .map(|p| p.tools.clone());
    if let Some(refused) = policy.refuse_upstream(&spec.url) {
        let reason = if refused.reason == crate::api::Reason::EgressDenied {
            "EgressDenied"
        } else {
            "InvalidSpec"
        };
        return (
            None,
            Err(not_ready(reason, refused.message.replace("apiBase", "url"))),
        );
    }
    let credential =
        match read_credential(client, policy, server, previous.map(|p| &p.credential)).await {
            Ok(c) => c,
            // A Secret that cannot be read right now: keep serving with the credential we had.
            Err(e) if e.reason == "SecretUnavailable" => match previous {
                Some(p) => return (Some(Arc::clone(p)), Err(e)),
                None => return (None, Err(e)),
            },
            Err(e) => return (None, Err(e)),
        };
    let mut entry = ServerEntry {
        qualified: format!("{namespace}/{name}"),
        namespace,
        name,
        url: spec.url.clone(),
        credential,
        legacy_sse: spec.transport == Some(McpTransport::Sse),
        access: spec.access.clone(),
        limits: spec.limits.clone(),
        timeout: spec
            .timeout_seconds
            .map_or(DEFAULT_TIMEOUT, |s| Duration::from_secs(u64::from(s))),
        tools: Vec::new(),
    };
    let deadline = entry.timeout.min(DISCOVERY_TIMEOUT);
    let discovered = tokio::time::timeout(deadline, gateway.upstreams.discover(&entry))
        .await
        .unwrap_or(Err(UpstreamError::Timeout));
    match discovered {
        Ok(Discovery { version, tools }) => {
            entry.tools = filter_tools(spec.tools.as_ref(), tools);
            (Some(Arc::new(entry)), Ok(version))
        }
        Err(e) => match last_good {
            Some(tools) => {
                entry.tools = tools;
                (Some(Arc::new(entry)), Err(why(&e)))
            }
            None => (None, Err(why(&e))),
        },
    }
}

fn virtual_servers(server: &McpServer) -> Vec<String> {
    server
        .spec
        .virtual_servers
        .clone()
        .unwrap_or_else(|| vec![DEFAULT_VIRTUAL_SERVER.to_string()])
}

/// Runs until `shutdown`.
pub async fn run(
    client: Client,
    namespace: Option<String>,
    policy: OperatorPolicy,
    gateway: Arc<McpGateway>,
    refresh: Duration,
    shutdown: CancellationToken,
) {
    let api: Api<McpServer> = match &namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (reader, writer) = reflector::store::<McpServer>();
    let (changed_tx, mut changed) = watch::channel(());
    let stream = watcher(api.clone(), watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects();
    let watching = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            if let Err(e) = event {
                debug!(error = %e, "McpServer watch interrupted; retrying");
            }
            let _ = changed_tx.send(());
        }
    });
    tokio::select! {
        _ = reader.wait_until_ready() => {}
        _ = shutdown.cancelled() => { watching.abort(); return; }
    }
    info!("watching McpServers");
    let mut served: HashMap<(String, String), Arc<ServerEntry>> = HashMap::new();
    loop {
        changed.borrow_and_update();
        served = round(&client, &policy, &gateway, &reader, &served).await;
        tokio::select! {
            _ = changed.changed() => {}
            _ = gateway.nudge.notified() => {}
            _ = tokio::time::sleep(refresh) => {}
            _ = shutdown.cancelled() => break,
        }
        // Gather a burst of changes into one round.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    watching.abort();
}

async fn round(
    client: &Client,
    policy: &OperatorPolicy,
    gateway: &McpGateway,
    reader: &Store<McpServer>,
    served: &HashMap<(String, String), Arc<ServerEntry>>,
) -> HashMap<(String, String), Arc<ServerEntry>> {
    let servers = reader.state();
    let results = futures::future::join_all(servers.iter().map(|s| {
        let key = (s.namespace().unwrap_or_default(), s.name_any());
        reconcile_one(client, policy, gateway, s, served.get(&key))
    }))
    .await;
    let mut next = HashMap::new();
    let mut entries = Vec::new();
    for (server, (entry, outcome)) in servers.iter().zip(results) {
        if let Some(e) = &entry {
            next.insert((e.namespace.clone(), e.name.clone()), Arc::clone(e));
            entries.push((Arc::clone(e), virtual_servers(server)));
        }
        if let Err(e) = &outcome {
            debug!(server = %server.name_any(), reason = e.reason, message = %e.message, "McpServer not ready");
        }
        let status = desired_status(
            server,
            &outcome,
            entry.as_ref().map(|e| e.tools.len()),
            Timestamp::now(),
        );
        write_status(client, server, status).await;
    }
    gateway.table.store(Arc::new(McpTable::new(entries)));
    next
}

async fn write_status(client: &Client, server: &McpServer, status: McpServerStatus) {
    let current = server.status.clone().unwrap_or_default();
    // Unchanged but for the transition time kept from `previous`: no write, no watch event.
    if current == status {
        return;
    }
    let api: Api<McpServer> =
        Api::namespaced(client.clone(), &server.namespace().unwrap_or_default());
    let patch =
        json!({"apiVersion": "portcullis.dev/v1alpha1", "kind": "McpServer", "status": status});
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let name = server.name_any();
    match tokio::time::timeout(
        API_CALL_TIMEOUT,
        api.patch_status(&name, &params, &Patch::Apply(&patch)),
    )
    .await
    {
        Ok(Ok(_)) => debug!(server = %name, "wrote McpServer status"),
        Ok(Err(kube::Error::Api(s))) if s.code == 404 => {}
        Ok(Err(e)) => warn!(server = %name, error = %e, "writing McpServer status failed"),
        Err(_) => warn!(server = %name, "writing McpServer status timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::McpServerSpec;

    fn server() -> McpServer {
        let mut s = McpServer::new(
            "jira",
            McpServerSpec {
                url: "http://127.0.0.1:9/mcp".into(),
                credential: None,
                tools: None,
                access: None,
                limits: Vec::new(),
                virtual_servers: None,
                timeout_seconds: None,
                transport: None,
            },
        );
        s.metadata.generation = Some(3);
        s
    }

    #[test]
    fn allow_then_deny() {
        let tools = ["get_issue", "search", "delete_issue"]
            .iter()
            .map(|t| rmcp::model::Tool::new(t.to_string(), "", Arc::new(serde_json::Map::new())))
            .collect();
        let f = ToolFilter {
            allow: Some(vec!["get_*".into(), "delete_*".into()]),
            deny: vec!["delete_*".into()],
        };
        let kept: Vec<_> = filter_tools(Some(&f), tools)
            .into_iter()
            .map(|t| t.name.to_string())
            .collect();
        assert_eq!(kept, ["get_issue"]);
    }

    #[test]
    fn status_says_why_and_keeps_the_last_count() {
        let t = Timestamp::from_second(1_000).unwrap_or(Timestamp::UNIX_EPOCH);
        let s = server();
        let ok = desired_status(&s, &Ok("2025-06-18".into()), Some(4), t);
        assert_eq!(ok.tools, Some(4));
        assert_eq!(ok.conditions[0].status, "True");
        assert_eq!(ok.conditions[0].message, "4 tools listed");
        let mut s = s;
        s.status = Some(ok);
        let down = desired_status(&s, &Err(why(&UpstreamError::Unreachable)), Some(4), t);
        assert_eq!(down.conditions[0].reason, "Unreachable");
        assert_eq!(
            down.conditions[0].message,
            "the MCP server cannot be reached; serving the 4 tools listed before"
        );
        assert_eq!(down.protocol_version.as_deref(), Some("2025-06-18"));
    }

    #[test]
    fn credential_headers_are_sensitive() {
        let (n, v) = credential_header(None, b"tok\n").unwrap();
        assert_eq!(n, http::header::AUTHORIZATION);
        assert_eq!(v.as_bytes(), b"Bearer tok");
        assert!(v.is_sensitive());
        let (n, v) = credential_header(Some("X-Api-Key"), b"k").unwrap();
        assert_eq!(n.as_str(), "x-api-key");
        assert_eq!(v.as_bytes(), b"k");
        assert!(credential_header(Some("bad header"), b"k").is_err());
    }
}
