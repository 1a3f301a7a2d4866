//! The MCP gateway end to end: two real MCP servers on the official Python SDK
//! (tests/python/mcp/servers.py), McpServers applied with kubectl to a real API server, callers
//! with API keys and ServiceAccount tokens, the Python SDK's client, two replicas on Redis.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: failing loudly is the point

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use support::{
    ControlPlane, Gateway, Redis, api_key_secret, client, eventually, free_port, node_env, pytest,
    python_env, secret_with, shared_store_flags,
};

const JIRA_TOKEN: &str = "jira-upstream-token-5f2c9a";
const SESSION_KEY: &str = "test-session-key";

/// One of the Python SDK servers, killed on drop; its request log (headers) is kept.
struct PyServer {
    child: Child,
    port: u16,
    log: Arc<Mutex<Vec<String>>>,
}

impl PyServer {
    fn start(kind: &str, args: &[&str]) -> PyServer {
        Self::start_on(kind, free_port(), args)
    }

    fn start_on(kind: &str, port: u16, args: &[&str]) -> PyServer {
        let python = python_env("mcp");
        let mut cmd = Command::new(python);
        cmd.arg(format!(
            "{}/tests/python/mcp/servers.py",
            env!("CARGO_MANIFEST_DIR")
        ))
        .arg(kind)
        .arg(port.to_string())
        .args(args);
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the MCP server");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().push(line);
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line == "ready" {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("MCP server {kind} did not start: {:?}", log.lock()));
        PyServer { child, port, log }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/mcp", self.port)
    }

    /// The requests it received (method, path, headers).
    fn requests(&self) -> Vec<Value> {
        self.logged()
            .into_iter()
            .filter(|v| v.get("headers").is_some())
            .collect()
    }

    fn logged(&self) -> Vec<Value> {
        self.log
            .lock()
            .iter()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn events(&self, event: &str) -> usize {
        self.logged().iter().filter(|v| v["event"] == event).count()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PyServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A caller speaking Streamable HTTP by hand, to see exactly what the gateway answers.
struct Caller {
    url: String,
    token: Option<String>,
    session: Option<String>,
    next_id: i64,
}

impl Caller {
    fn new(gw: &Gateway, path: &str, token: Option<&str>) -> Caller {
        Caller {
            url: gw.url(path),
            token: token.map(str::to_string),
            session: None,
            next_id: 1,
        }
    }

    /// POST one message: status, headers, and the JSON-RPC messages of the answer (an SSE
    /// answer's events, or the one JSON body).
    fn post(&self, message: &Value) -> (u16, reqwest::header::HeaderMap, Vec<Value>) {
        let mut req = client()
            .post(&self.url)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(message.to_string());
        if let Some(t) = &self.token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if let Some(s) = &self.session {
            req = req.header("mcp-session-id", s);
        }
        let resp = req.send().expect("POST");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let sse = headers
            .get("content-type")
            .is_some_and(|v| v.to_str().unwrap().starts_with("text/event-stream"));
        let text = resp.text().unwrap_or_default();
        let messages = if sse {
            text.lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .map(|d| serde_json::from_str(d).unwrap())
                .collect()
        } else if text.is_empty() {
            Vec::new()
        } else {
            vec![serde_json::from_str(&text).unwrap_or(json!({"raw": text}))]
        };
        (status, headers, messages)
    }

    fn initialize(&mut self) -> Value {
        let (status, headers, messages) = self.post(&json!({
            "jsonrpc": "2.0", "id": 0, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                       "clientInfo": {"name": "test", "version": "1"}}
        }));
        assert_eq!(status, 200, "{messages:?}");
        self.session = Some(
            headers
                .get("mcp-session-id")
                .expect("Mcp-Session-Id")
                .to_str()
                .unwrap()
                .to_string(),
        );
        let (status, _, _) =
            self.post(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}));
        assert_eq!(status, 202);
        messages.into_iter().next().unwrap()
    }

    /// A request; its response message (the last one, after any notifications).
    fn request(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let (status, _, messages) = self.post(&json!({
            "jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params
        }));
        assert_eq!(status, 200, "{method}: {messages:?}");
        let last = messages.last().cloned().expect("a response");
        assert_eq!(last["id"], json!(self.next_id), "{last}");
        last
    }

    fn tool_names(&mut self) -> Vec<String> {
        let listed = self.request("tools/list", json!({}));
        let mut names: Vec<String> = listed["result"]["tools"]
            .as_array()
            .unwrap_or_else(|| panic!("{listed}"))
            .iter()
            .map(|t| t["name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    }

    fn call(&mut self, tool: &str, arguments: Value) -> Value {
        self.request("tools/call", json!({"name": tool, "arguments": arguments}))
    }
}

fn text_of(answer: &Value) -> &str {
    answer["result"]["content"][0]["text"]
        .as_str()
        .unwrap_or_else(|| panic!("no text in {answer}"))
}

fn mcp_server_yaml(ns: &str, name: &str, url: &str, extra: &str) -> String {
    format!(
        "apiVersion: portcullis.dev/v1alpha1\nkind: McpServer\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  url: {url}\n{extra}"
    )
}

fn jira_yaml(ns: &str, jira: &PyServer, extra: &str) -> String {
    mcp_server_yaml(
        ns,
        "jira",
        &jira.url(),
        &format!(
            "  credential:\n    secretRef:\n      name: jira-token\n      key: token\n{extra}"
        ),
    )
}

/// The McpServer's Ready condition (status, reason, message) and tool count.
fn mcp_status(cp: &ControlPlane, ns: &str, name: &str) -> (String, String, String, i64) {
    let v = cp.json(&["get", "mcpserver", "-n", ns, name, "-o", "json"]);
    let ready = v["status"]["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Ready"))
        .cloned()
        .unwrap_or_default();
    let s = |k: &str| ready[k].as_str().unwrap_or_default().to_string();
    (
        s("status"),
        s("reason"),
        s("message"),
        v["status"]["tools"].as_i64().unwrap_or(-1),
    )
}

fn wait_mcp_ready(cp: &ControlPlane, ns: &str, name: &str, tools: i64) {
    let mut last = Default::default();
    let ok = eventually(Duration::from_secs(60), || {
        last = mcp_status(cp, ns, name);
        last.0 == "True" && last.3 == tools
    });
    assert!(
        ok.is_ok(),
        "McpServer {ns}/{name} not Ready with {tools} tools: {last:?}"
    );
}

/// A namespace with both servers in the virtual server `tools` and an API-key consumer.
fn federation(
    cp: &ControlPlane,
    jira_extra: &str,
    slow_extra: &str,
) -> (String, PyServer, PyServer) {
    let ns = cp.namespace("mcp");
    let jira = PyServer::start("jira", &[JIRA_TOKEN]);
    let slow = PyServer::start("slow", &[]);
    cp.apply(&secret_with(&ns, "jira-token", &[("token", JIRA_TOKEN)]));
    cp.apply(&api_key_secret(&ns, "agent-key", "sk-agent-key-1"));
    cp.apply(&jira_yaml(
        &ns,
        &jira,
        &format!("  virtualServers: [tools]\n{jira_extra}"),
    ));
    cp.apply(&mcp_server_yaml(
        &ns,
        "slow",
        &slow.url(),
        &format!("  virtualServers: [tools]\n{slow_extra}"),
    ));
    (ns, jira, slow)
}

const ALL_TOOLS: [&str; 6] = [
    "jira_delete_issue",
    "jira_get_issue",
    "jira_search_issues",
    "slow_echo",
    "slow_hang",
    "slow_slow",
];

#[test]
fn python_sdk_client_lists_and_calls_tools_of_two_servers_through_one_virtual_server() {
    let cp = ControlPlane::shared();
    let (ns, mut jira, slow) = federation(cp, "", "");
    let gw = Gateway::start(cp, &["--namespace", &ns, "--mcp-refresh-interval", "1"]);
    wait_mcp_ready(cp, &ns, "jira", 3);
    wait_mcp_ready(cp, &ns, "slow", 3);

    // The official Python SDK client; the API key's namespace picks the virtual server.
    let setup = json!({"path": "/mcp/tools", "key": "sk-agent-key-1", "tools": ALL_TOOLS});
    let (passed, output) = pytest("mcp", "mcp", &gw.url(""), &setup);
    assert!(passed, "the MCP Python SDK client failed:\n{output}");

    // The official TypeScript SDK's client, at /mcp/{namespace}/{name}.
    let out = Command::new("node")
        .arg(format!(
            "{}/tests/node/mcp_client.cjs",
            env!("CARGO_MANIFEST_DIR")
        ))
        .arg(gw.url(&format!("/mcp/{ns}/tools")))
        .arg("sk-agent-key-1")
        .env("NODE_PATH", node_env())
        .output()
        .expect("node");
    assert!(
        out.status.success(),
        "the MCP TypeScript SDK client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ts: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ts["tools"], json!(ALL_TOOLS), "{ts}");
    assert_eq!(ts["issue"], "issue TS-1: the build is red (from jira)");
    assert_eq!(ts["slept"], "slept 0.3s");
    assert_eq!(
        ts["progress"],
        json!([0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
        "{ts}"
    );
    assert!(
        ts["unknown"]
            .as_str()
            .unwrap()
            .contains("Unknown tool: jira_missing"),
        "{ts}"
    );
    assert_eq!(ts["sessionId"], "set");

    // The gateway sent the Secret's token to the server that wants it, and the caller's own
    // key to no server.
    let sent: Vec<Value> = jira.requests();
    assert!(!sent.is_empty());
    assert!(
        sent.iter()
            .all(|r| r["headers"]["authorization"] == format!("Bearer {JIRA_TOKEN}"))
    );
    assert!(
        slow.requests()
            .iter()
            .all(|r| r["headers"].get("authorization").is_none())
    );
    let everything_sent = format!("{sent:?}{:?}", slow.requests());
    assert!(!everything_sent.contains("sk-agent-key-1"));

    // An upstream session that expires (the server restarts and forgets it) is opened again
    // without the caller noticing.
    let mut caller = Caller::new(&gw, "/mcp/tools", Some("sk-agent-key-1"));
    caller.initialize();
    assert_eq!(
        text_of(&caller.call("jira_get_issue", json!({"key": "A-1"}))),
        "issue A-1: the build is red (from jira)"
    );
    let port = jira.port;
    jira.kill();
    let jira = PyServer::start_on("jira", port, &[JIRA_TOKEN]);
    let answer = caller.call("jira_get_issue", json!({"key": "A-2"}));
    assert_eq!(
        text_of(&answer),
        "issue A-2: the build is red (from jira)",
        "{answer}"
    );
    drop(jira);

    // Cancellation passes through: the server stops the hung tool and says so.
    let mut hung = Caller::new(&gw, "/mcp/tools", Some("sk-agent-key-1"));
    hung.session = caller.session.clone();
    hung.next_id = 1000;
    let started = Instant::now();
    let call = std::thread::spawn(move || hung.call("slow_hang", json!({})));
    std::thread::sleep(Duration::from_millis(700));
    let (status, _, _) = caller.post(&json!({
        "jsonrpc": "2.0", "method": "notifications/cancelled",
        "params": {"requestId": 1001, "reason": "the user gave up"}
    }));
    assert_eq!(status, 202);
    let cancelled = call.join().unwrap();
    assert_eq!(
        cancelled["error"]["message"], "Request cancelled",
        "{cancelled}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    // Without a credential: 401 pointing at the protected-resource metadata, which is served.
    let anonymous = Caller::new(&gw, "/mcp", None);
    let (status, headers, _) =
        anonymous.post(&json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}));
    assert_eq!(status, 401);
    let challenge = headers["www-authenticate"].to_str().unwrap();
    assert_eq!(
        challenge,
        format!(
            "Bearer resource_metadata=\"http://{}/.well-known/oauth-protected-resource\"",
            gw.addr
        )
    );
    let doc: Value = serde_json::from_str(
        &client()
            .get(gw.url("/.well-known/oauth-protected-resource"))
            .send()
            .unwrap()
            .text()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(doc["resource"], format!("http://{}/mcp", gw.addr));
    assert_eq!(doc["bearer_methods_supported"], json!(["header"]));

    // Audit: one line per call with caller, server, tool and outcome; metrics per tool; the
    // upstream credential nowhere.
    let log = gw.log();
    let calls: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["message"] == "mcp tools/call")
        .collect();
    let audited = calls
        .iter()
        .find(|v| v["tool"] == "get_issue" && v["outcome"] == "ok")
        .unwrap_or_else(|| panic!("no audit line: {calls:?}"));
    assert_eq!(audited["caller"], format!("key/{ns}/agent-key"));
    assert_eq!(audited["server"], format!("{ns}/jira"));
    assert!(
        audited["duration_ms"].as_f64().is_some() && audited["response_bytes"].as_u64() > Some(0)
    );
    assert!(!log.contains("PC-7"), "arguments are not logged by default");
    let metrics = gw.metrics();
    assert!(
        metrics.contains(&format!(
            "portcullis_mcp_calls_total{{server=\"{ns}/jira\",tool=\"get_issue\",outcome=\"ok\"}}"
        )),
        "{metrics}"
    );
    assert!(metrics.contains("portcullis_mcp_call_duration_seconds_bucket"));
    let status = cp.ok(&["get", "mcpserver", "-n", &ns, "-o", "yaml"]);
    for place in [&log, &metrics, &status] {
        assert!(
            !place.contains(JIRA_TOKEN),
            "the upstream credential leaked"
        );
    }
}

#[test]
fn a_caller_sees_and_calls_only_the_tools_its_rules_grant() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("mcp-access");
    let jira = PyServer::start("jira", &[JIRA_TOKEN]);
    cp.apply(&secret_with(&ns, "jira-token", &[("token", JIRA_TOKEN)]));
    cp.apply(&api_key_secret(&ns, "admin-key", "sk-admin-key-1"));
    cp.apply(&api_key_secret(&ns, "other-key", "sk-other-key-1"));
    cp.apply(&api_key_secret(&ns, "oncall-key", "sk-oncall-key-1"));
    // A Team (cluster-scoped) granted the delete tool through its membership.
    let team = format!("oncall-{ns}");
    cp.apply(&format!(
        "apiVersion: portcullis.dev/v1alpha1\nkind: Team\nmetadata:\n  name: {team}\nspec:\n  members:\n  - consumer: {ns}/oncall-key\n"
    ));
    let reader = cp.new_service_account_token(&ns, "reader");
    cp.apply(&jira_yaml(
        &ns,
        &jira,
        &format!(
            "  access:\n  - serviceAccount: {ns}/reader\n    tools: [\"get_*\", \"search_*\"]\n  - consumer: {ns}/admin-key\n  - team: {team}\n    tools: [delete_issue]\n"
        ),
    ));
    let gw = Gateway::start(cp, &["--namespace", &ns]);
    wait_mcp_ready(cp, &ns, "jira", 3);

    // The ServiceAccount allowed only the read tools sees only those, at /mcp (its namespace's default).
    let mut sa = Caller::new(&gw, "/mcp", Some(&reader));
    sa.initialize();
    assert_eq!(sa.tool_names(), ["jira_get_issue", "jira_search_issues"]);
    assert_eq!(
        text_of(&sa.call("jira_get_issue", json!({"key": "R-1"}))),
        "issue R-1: the build is red (from jira)"
    );
    // A hidden tool is exactly as unknown as a missing one.
    let hidden = sa.call("jira_delete_issue", json!({"key": "R-1"}));
    let missing = sa.call("jira_delete_everything", json!({"key": "R-1"}));
    assert_eq!(hidden["error"]["code"], -32602, "{hidden}");
    assert_eq!(
        hidden["error"]["message"],
        "Unknown tool: jira_delete_issue"
    );
    assert_eq!(missing["error"]["code"], hidden["error"]["code"]);
    assert_eq!(
        missing["error"]["message"],
        "Unknown tool: jira_delete_everything"
    );
    // ... and prompts and resources are for callers granted the whole server.
    assert_eq!(
        sa.request("prompts/list", json!({}))["result"]["prompts"],
        json!([])
    );

    // The API-key consumer granted the whole server sees and calls everything.
    let mut admin = Caller::new(&gw, "/mcp", Some("sk-admin-key-1"));
    admin.initialize();
    assert_eq!(
        admin.tool_names(),
        ["jira_delete_issue", "jira_get_issue", "jira_search_issues"]
    );
    assert_eq!(
        text_of(&admin.call("jira_delete_issue", json!({"key": "R-1"}))),
        "deleted R-1"
    );

    // A Team member sees what its Team is granted.
    let mut oncall = Caller::new(&gw, "/mcp", Some("sk-oncall-key-1"));
    let mut listed = Vec::new();
    let joined = eventually(Duration::from_secs(20), || {
        if oncall.session.is_none() {
            let (status, headers, _) = oncall
                .post(&json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {}}));
            if status != 200 {
                return false;
            }
            oncall.session = headers
                .get("mcp-session-id")
                .map(|v| v.to_str().unwrap().to_string());
        }
        listed = oncall.tool_names();
        !listed.is_empty()
    });
    assert!(
        joined.is_ok(),
        "the Team member never saw its tools: {listed:?}"
    );
    assert_eq!(listed, ["jira_delete_issue"]);
    assert_eq!(
        text_of(&oncall.call("jira_delete_issue", json!({"key": "T-1"}))),
        "deleted T-1"
    );

    // A consumer granted nothing: the virtual server does not exist for it.
    let other = Caller::new(&gw, "/mcp", Some("sk-other-key-1"));
    let (status, _, messages) =
        other.post(&json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}));
    assert_eq!(status, 404, "{messages:?}");

    // A session id is good only with the credential that opened it.
    let mut stolen = Caller::new(&gw, "/mcp", Some("sk-admin-key-1"));
    stolen.session = sa.session.clone();
    let (status, _, _) = stolen.post(&json!({"jsonrpc": "2.0", "id": 5, "method": "tools/list"}));
    assert_eq!(status, 404);
}

/// Seconds into the current UTC minute.
fn second_of_minute() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        % 60
}

#[test]
fn ten_calls_a_minute_per_tool_and_consumer_hold_across_two_replicas_and_sessions_move_between_them()
 {
    let cp = ControlPlane::shared();
    let redis = Redis::start();
    let url = redis.url();
    let ns = cp.namespace("mcp-limits");
    let slow = PyServer::start("slow", &[]);
    cp.apply(&api_key_secret(&ns, "agent-key", "sk-limited-1"));
    cp.apply(&api_key_secret(&ns, "second-key", "sk-limited-2"));
    cp.apply(&mcp_server_yaml(
        &ns,
        "slow",
        &slow.url(),
        "  limits:\n  - renewalPeriod: minute\n    calls: 10\n    key: consumer\n    tools: [echo]\n",
    ));
    let mut flags = vec!["--namespace", &ns, "--mcp-session-key", SESSION_KEY];
    flags.extend(shared_store_flags(&url));
    let a = Gateway::start(cp, &flags);
    let b = Gateway::start(cp, &flags);
    wait_mcp_ready(cp, &ns, "slow", 3);
    // All 20 calls in one minute window.
    if second_of_minute() > 40 {
        std::thread::sleep(Duration::from_secs(62 - second_of_minute()));
    }

    // One session, opened on replica A, its calls alternating between A and B.
    let mut on_a = Caller::new(&a, "/mcp", Some("sk-limited-1"));
    on_a.initialize();
    let mut on_b = Caller::new(&b, "/mcp", Some("sk-limited-1"));
    on_b.session = on_a.session.clone();
    let mut passed = 0;
    let mut refusals = Vec::new();
    for i in 0..16 {
        let caller = if i % 2 == 0 { &mut on_a } else { &mut on_b };
        let answer = caller.call("slow_echo", json!({"text": format!("n{i}")}));
        if answer.get("result").is_some() {
            assert_eq!(text_of(&answer), format!("echo: n{i}"));
            passed += 1;
        } else {
            refusals.push(answer);
        }
    }
    assert_eq!(
        passed, 10,
        "exactly the limit passes across both replicas: {refusals:?}"
    );
    let refusal = &refusals[0]["error"];
    assert_eq!(refusal["code"], -32029, "{refusal}");
    let message = refusal["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!(
            "rate limit exceeded for tool {ns}/slow/echo: 10 calls per minute per consumer; resets "
        )),
        "{message}"
    );
    assert!(refusal["data"]["retryAfterSeconds"].as_u64().unwrap() <= 60);
    // Other tools and other consumers count apart.
    assert_eq!(
        text_of(&on_b.call("slow_slow", json!({"seconds": 0.1}))),
        "slept 0.1s"
    );
    let mut second = Caller::new(&b, "/mcp", Some("sk-limited-2"));
    second.initialize();
    assert_eq!(
        text_of(&second.call("slow_echo", json!({"text": "x"}))),
        "echo: x"
    );
    let keys = redis.cli(&["--scan", "--pattern", "portcullis:mcp:*"]);
    assert!(
        keys.contains(&format!(
            "portcullis:mcp:{ns}/slow/echo:0:calls:key/{ns}/agent-key:"
        )),
        "{keys}"
    );
}

#[test]
fn an_upstream_that_hangs_or_dies_fails_only_its_own_tools_and_status_says_why() {
    let cp = ControlPlane::shared();
    let (ns, _jira, mut slow) = federation(cp, "", "  timeoutSeconds: 2\n");
    let gw = Gateway::start(cp, &["--namespace", &ns, "--mcp-refresh-interval", "30"]);
    wait_mcp_ready(cp, &ns, "slow", 3);
    let mut caller = Caller::new(&gw, "/mcp/tools", Some("sk-agent-key-1"));
    caller.initialize();

    // A tool that never answers fails at the server's deadline; the other server is untouched.
    let started = Instant::now();
    let hung = caller.call("slow_hang", json!({}));
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(hung["error"]["code"], -32001, "{hung}");
    assert!(
        hung["error"]["message"]
            .as_str()
            .unwrap()
            .contains("did not answer in time"),
        "{hung}"
    );
    assert_eq!(
        text_of(&caller.call("jira_get_issue", json!({"key": "H-1"}))),
        "issue H-1: the build is red (from jira)"
    );

    // The server dies in the middle of a call: that call ends with a clean error.
    let mut during = Caller::new(&gw, "/mcp/tools", Some("sk-agent-key-1"));
    during.session = caller.session.clone();
    let in_flight = std::thread::spawn(move || during.call("slow_slow", json!({"seconds": 1.0})));
    std::thread::sleep(Duration::from_millis(400));
    slow.kill();
    let died = in_flight.join().unwrap();
    assert_eq!(died["error"]["code"], -32001, "{died}");
    assert!(
        died["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with(&format!("MCP server {ns}/slow: ")),
        "{died}"
    );
    // The other server's tools keep working; the dead one's still listed (last good list) but fail.
    assert_eq!(
        text_of(&caller.call("jira_get_issue", json!({"key": "H-2"}))),
        "issue H-2: the build is red (from jira)"
    );
    assert_eq!(caller.tool_names(), ALL_TOOLS);
    let echo = caller.call("slow_echo", json!({"text": "x"}));
    assert_eq!(
        echo["error"]["message"],
        format!("MCP server {ns}/slow: the MCP server cannot be reached")
    );
    // The failed call told the controller: status says why well before the 30 s refresh.
    let mut last = Default::default();
    let told = eventually(Duration::from_secs(15), || {
        last = mcp_status(cp, &ns, "slow");
        last.0 == "False" && last.1 == "Unreachable"
    });
    assert!(told.is_ok(), "{last:?}");
    assert_eq!(
        last.2,
        "the MCP server cannot be reached; serving the 3 tools listed before"
    );
    assert_eq!(last.3, 3);
}

#[test]
fn oauth_client_credentials_tokens_are_replaced_before_they_expire_without_a_failed_call() {
    const CLIENT_SECRET: &str = "oauth-client-secret-77d1";
    let cp = ControlPlane::shared();
    let ns = cp.namespace("mcp-oauth");
    // Tokens live 4 s; the gateway replaces each a quarter of its life early.
    let oauth = PyServer::start("oauth", &["portcullis-gw", CLIENT_SECRET, "4"]);
    cp.apply(&secret_with(
        &ns,
        "oauth-client",
        &[("secret", CLIENT_SECRET)],
    ));
    cp.apply(&api_key_secret(&ns, "agent-key", "sk-oauth-agent"));
    cp.apply(&mcp_server_yaml(
        &ns,
        "vault",
        &oauth.url(),
        &format!(
            "  credential:\n    oauth:\n      tokenUrl: http://127.0.0.1:{}/token\n      clientId: portcullis-gw\n      clientSecretRef:\n        name: oauth-client\n        key: secret\n",
            oauth.port
        ),
    ));
    let gw = Gateway::start(cp, &["--namespace", &ns]);
    wait_mcp_ready(cp, &ns, "vault", 1);
    let mut caller = Caller::new(&gw, "/mcp", Some("sk-oauth-agent"));
    caller.initialize();
    let until = Instant::now() + Duration::from_secs(10);
    let mut calls = 0;
    while Instant::now() < until {
        let answer = caller.call("vault_whoami", json!({}));
        assert_eq!(text_of(&answer), "token ok", "call {calls}: {answer}");
        calls += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(calls >= 20);
    // Over 10 s of 4 s tokens: at least three fetched, none ever presented expired or refused.
    assert!(oauth.events("token_issued") >= 3, "{:?}", oauth.logged());
    assert_eq!(
        oauth.events("expired_or_unknown_token"),
        0,
        "{:?}",
        oauth.logged()
    );
    assert_eq!(oauth.events("token_refused"), 0);
    // Neither the client secret nor a token appears anywhere the gateway writes.
    let status = cp.ok(&["get", "mcpserver", "-n", &ns, "-o", "yaml"]);
    for place in [gw.log(), gw.metrics(), status] {
        assert!(
            !place.contains(CLIENT_SECRET) && !place.contains("tok-"),
            "a credential leaked"
        );
    }
}

#[test]
fn a_server_answering_plain_json_is_proxied_as_json() {
    // The simulated provider's MCP endpoint (make bench's upstream) answers JSON, not SSE.
    let cp = ControlPlane::shared();
    let ns = cp.namespace("mcp-json");
    let sim = support::sim();
    cp.apply(&mcp_server_yaml(
        &ns,
        "sim",
        &format!("http://{}/mcp", sim.addr),
        "",
    ));
    let gw = Gateway::start(cp, &["--namespace", &ns]);
    wait_mcp_ready(cp, &ns, "sim", 1);
    let mut caller = Caller::new(&gw, &format!("/mcp/{ns}/default"), None);
    let init = caller.initialize();
    assert_eq!(init["result"]["protocolVersion"], "2025-06-18");
    let (status, headers, messages) = caller.post(&json!({
        "jsonrpc": "2.0", "id": "a", "method": "tools/call",
        "params": {"name": "sim_echo", "arguments": {"text": "plain"}}
    }));
    assert_eq!(status, 200);
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(
        messages,
        [
            json!({"jsonrpc": "2.0", "id": "a", "result": {"content": [{"type": "text", "text": "plain"}]}})
        ]
    );
    // The upstream saw the tool's own name, and a session the gateway opened for this caller.
    let calls: Vec<_> = sim
        .requests()
        .into_iter()
        .filter(|r| r.path == "/mcp" && String::from_utf8_lossy(&r.body).contains("tools/call"))
        .collect();
    assert_eq!(calls.len(), 1);
    let body = String::from_utf8_lossy(&calls[0].body);
    assert!(body.contains("\"name\":\"echo\""), "{body}");
    assert_eq!(calls[0].header("mcp-session-id"), Some("sim-session"));
}

#[test]
fn a_server_on_the_older_http_sse_transport_is_served_as_streamable_http() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("mcp-legacy");
    let legacy = PyServer::start("legacy", &[]);
    cp.apply(&mcp_server_yaml(
        &ns,
        "old",
        &format!("http://127.0.0.1:{}/sse", legacy.port),
        "  transport: sse\n",
    ));
    let gw = Gateway::start(cp, &["--namespace", &ns]);
    wait_mcp_ready(cp, &ns, "old", 2);
    let server = cp.json(&["get", "mcpserver", "-n", &ns, "old", "-o", "json"]);
    assert_eq!(server["status"]["protocolVersion"], "2024-11-05");
    let mut caller = Caller::new(&gw, &format!("/mcp/{ns}/default"), None);
    caller.initialize();
    assert_eq!(caller.tool_names(), ["old_count", "old_hello"]);
    assert_eq!(
        text_of(&caller.call("old_hello", json!({"name": "gateway"}))),
        "hello gateway over HTTP+SSE"
    );
    // Progress notifications find their request by its token; the result ends the answer.
    let (status, _, messages) = caller.post(&json!({
        "jsonrpc": "2.0", "id": 9, "method": "tools/call",
        "params": {"name": "old_count", "arguments": {"to": 5}, "_meta": {"progressToken": "p-1"}}
    }));
    assert_eq!(status, 200);
    let progress: Vec<_> = messages
        .iter()
        .filter(|m| m["method"] == "notifications/progress")
        .map(|m| m["params"]["progress"].as_f64().unwrap())
        .collect();
    assert_eq!(progress, [0.0, 1.0, 2.0, 3.0, 4.0], "{messages:?}");
    assert_eq!(text_of(messages.last().unwrap()), "counted to 5");
}
