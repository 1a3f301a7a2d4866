//! End-to-end test harness: a real etcd + kube-apiserver (started by `hack/control-plane.sh`),
//! real `kubectl`, the real `portcullis` binary, and simulated providers on loopback.
#![allow(dead_code, unused_imports, clippy::expect_used, clippy::unwrap_used)] // test harness: failing loudly is the point

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::Value;

pub use portcullis_sim::{Fault, SimProvider};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A running control plane; stopped on drop when this test started it.
pub struct ControlPlane {
    pub dir: PathBuf,
    owned: bool,
    _tmp: Option<tempfile::TempDir>,
}

impl ControlPlane {
    /// A private control plane, for tests that stop or restart parts of it.
    pub fn start_private() -> ControlPlane {
        Self::start_with_args("")
    }

    pub fn start_with_args(apiserver_args: &str) -> ControlPlane {
        let tmp = tempfile::Builder::new()
            .prefix("portcullis-cp-")
            .tempdir()
            .expect("temp dir");
        let dir = tmp.path().to_path_buf();
        let status = Command::new(repo().join("hack/control-plane.sh"))
            .args([
                "start",
                dir.to_str().unwrap_or_default(),
                &std::process::id().to_string(),
                "remove",
            ])
            .env("PORTCULLIS_APISERVER_ARGS", apiserver_args)
            .status()
            .expect("run hack/control-plane.sh");
        assert!(status.success(), "the control plane did not start");
        let cp = ControlPlane {
            dir,
            owned: true,
            _tmp: Some(tmp),
        };
        cp.install_crds();
        cp
    }

    /// One control plane per test binary; `make test` passes a running one in PORTCULLIS_TEST_CONTROL_PLANE.
    pub fn shared() -> &'static ControlPlane {
        static SHARED: OnceLock<ControlPlane> = OnceLock::new();
        SHARED.get_or_init(|| match std::env::var("PORTCULLIS_TEST_CONTROL_PLANE") {
            Ok(dir) if !dir.is_empty() => {
                let cp = ControlPlane {
                    dir: PathBuf::from(dir),
                    owned: false,
                    _tmp: None,
                };
                cp.install_crds();
                cp
            }
            _ => {
                let mut cp = Self::start_private();
                // Statics are never dropped: the script's watchdog stops it when this process exits.
                cp.owned = false;
                cp
            }
        })
    }

    /// A control plane started by someone else (hack/cluster.sh), found by its state folder.
    pub fn attach(dir: PathBuf) -> ControlPlane {
        ControlPlane {
            dir,
            owned: false,
            _tmp: None,
        }
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    fn script(&self, verb: &str) {
        let status = Command::new(repo().join("hack/control-plane.sh"))
            .args([verb, self.dir.to_str().unwrap_or_default()])
            .status()
            .expect("run hack/control-plane.sh");
        assert!(status.success(), "control-plane.sh {verb} failed");
    }

    pub fn stop_apiserver(&self) {
        self.script("stop-apiserver");
    }

    pub fn start_apiserver(&self) {
        self.script("start-apiserver");
    }

    /// Compacts etcd at its current revision, so watches resuming from older revisions get 410 Gone.
    pub fn compact_etcd(&self) {
        let ports = std::fs::read_to_string(self.dir.join("ports")).expect("ports file");
        let port = ports
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("ETCD_PORT="))
            .expect("etcd port")
            .to_string();
        let etcdctl = Self::bin_dir().join("etcdctl");
        let endpoint = format!("http://127.0.0.1:{port}");
        let out = Command::new(&etcdctl)
            .args(["--endpoints", &endpoint, "endpoint", "status", "-w", "json"])
            .output()
            .expect("etcdctl");
        let status: Value = serde_json::from_slice(&out.stdout).expect("etcdctl json");
        let rev = status[0]["Status"]["header"]["revision"]
            .as_i64()
            .expect("revision");
        let out = Command::new(&etcdctl)
            .args(["--endpoints", &endpoint, "compact", &rev.to_string()])
            .output()
            .expect("etcdctl");
        assert!(
            out.status.success(),
            "etcd compaction failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn install_crds(&self) {
        let out = self.kubectl(&[
            "apply",
            "-f",
            repo().join("crds").to_str().unwrap_or_default(),
        ]);
        assert!(
            out.status.success(),
            "kubectl apply -f crds/: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // `kubectl wait` fails outright while a just-created CRD has no status yet: retried.
        let mut last = String::new();
        let established = eventually(Duration::from_secs(60), || {
            let out = self.kubectl(&[
                "wait",
                "--for=condition=Established",
                "crd/routes.portcullis.dev",
                "crd/teams.portcullis.dev",
                "crd/guardrailpolicies.portcullis.dev",
                "crd/mcpservers.portcullis.dev",
                "--timeout=60s",
            ]);
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            out.status.success()
        });
        assert!(established.is_ok(), "CRD not established: {last}");
    }

    pub fn bin_dir() -> PathBuf {
        static BIN: OnceLock<PathBuf> = OnceLock::new();
        BIN.get_or_init(|| {
            let out = Command::new(repo().join("hack/control-plane.sh"))
                .arg("bin-dir")
                .output()
                .expect("bin-dir");
            assert!(out.status.success(), "control-plane binaries unavailable");
            PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
        })
        .clone()
    }

    /// The Prometheus Operator's CRDs (ServiceMonitor, PrometheusRule), from the operator's own
    /// module (`hack/tools.sh prometheus-operator-crds`), installed once per control plane.
    pub fn install_prometheus_operator_crds(&self) {
        let crds = tool("prometheus-operator-crds");
        self.ok(&["apply", "--server-side", "-f", path_str(&crds)]);
        self.ok(&[
            "wait",
            "--for=condition=Established",
            "crd/servicemonitors.monitoring.coreos.com",
            "crd/prometheusrules.monitoring.coreos.com",
            "--timeout=60s",
        ]);
    }

    /// Runs the real kubectl against this control plane.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_stdin(args, "")
    }

    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Output {
        use std::io::Write;
        let mut child = Command::new(Self::bin_dir().join("kubectl"))
            .args(args)
            .env("KUBECONFIG", self.kubeconfig())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kubectl");
        if let Some(mut input) = child.stdin.take() {
            let _ = input.write_all(stdin.as_bytes());
        }
        child.wait_with_output().expect("kubectl output")
    }

    /// `kubectl apply -f -` that must succeed.
    pub fn apply(&self, yaml: &str) {
        let out = self.kubectl_stdin(&["apply", "-f", "-"], yaml);
        assert!(
            out.status.success(),
            "kubectl apply failed: {}\n{yaml}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// kubectl that must succeed; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The pinned `helm` (hack/tools.sh) with this cluster as its own, run from the repository
    /// root; (success, stdout, stderr).
    pub fn helm(&self, args: &[&str]) -> (bool, String, String) {
        run_with_stdin(
            &tool("helm"),
            args,
            &[("KUBECONFIG", self.kubeconfig().as_path())],
            "",
        )
    }

    /// helm that must succeed; returns stdout.
    pub fn helm_ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.helm(args);
        assert!(ok, "helm {args:?} failed:\n{err}");
        out
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.ok(&all)).expect("kubectl json")
    }

    /// A fresh namespace (namespaces never finish deleting without a controller-manager, so each test gets its own).
    pub fn namespace(&self, prefix: &str) -> String {
        let name = unique(prefix);
        self.ok(&["create", "namespace", &name]);
        name
    }

    /// A token of ServiceAccount `sa` for `audience` from the TokenRequest API (10 minutes).
    pub fn token(&self, namespace: &str, sa: &str, audience: &str) -> String {
        self.ok(&[
            "create",
            "token",
            sa,
            "-n",
            namespace,
            "--audience",
            audience,
            "--duration",
            "10m",
        ])
        .trim()
        .to_string()
    }

    /// Creates ServiceAccount `sa` and returns a token of it for the gateway's audience.
    pub fn new_service_account_token(&self, namespace: &str, sa: &str) -> String {
        self.ok(&["create", "serviceaccount", sa, "-n", namespace]);
        self.token(namespace, sa, "portcullis")
    }

    /// A kubeconfig that authenticates as a ServiceAccount, with a token from the TokenRequest API.
    pub fn service_account_kubeconfig(&self, namespace: &str, name: &str, path: &Path) -> PathBuf {
        let token = self.ok(&["create", "token", name, "-n", namespace, "--duration=1h"]);
        let admin = std::fs::read_to_string(self.kubeconfig()).expect("kubeconfig");
        let field = |key: &str| {
            admin
                .lines()
                .find_map(|l| l.trim().strip_prefix(key))
                .expect("kubeconfig field")
                .trim()
                .to_string()
        };
        let config = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    certificate-authority: {}\ncontexts:\n- name: sa\n  context:\n    cluster: c\n    user: sa\ncurrent-context: sa\nusers:\n- name: sa\n  user:\n    token: {}\n",
            field("server:"),
            field("certificate-authority:"),
            token.trim()
        );
        std::fs::write(path, config).expect("write kubeconfig");
        path.to_path_buf()
    }

    pub fn wait_ready(&self, ns: &str, route: &str) {
        self.ok(&[
            "wait",
            "-n",
            ns,
            "--for=condition=Ready",
            &format!("route.portcullis.dev/{route}"),
            "--timeout=30s",
        ]);
    }

    /// The Ready condition's reason, once the controller wrote one.
    pub fn ready_reason(&self, ns: &str, route: &str) -> Option<String> {
        let v = self.json(&["get", "-n", ns, "route.portcullis.dev", route]);
        v.pointer("/status/conditions")?
            .as_array()?
            .iter()
            .find(|c| c["type"] == "Ready")
            .and_then(|c| c["reason"].as_str().map(str::to_string))
    }

    /// The `ShortName` condition of a Route: (status, reason, message).
    pub fn short_name(&self, ns: &str, route: &str) -> Option<(String, String, String)> {
        let r = self.json(&["get", "-n", ns, "route.portcullis.dev", route]);
        let c = r["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == "ShortName")?
            .clone();
        Some((
            c["status"].as_str()?.to_string(),
            c["reason"].as_str()?.to_string(),
            c["message"].as_str()?.to_string(),
        ))
    }

    pub fn wait_reason(&self, ns: &str, route: &str, reason: &str) {
        eventually(Duration::from_secs(30), || {
            self.ready_reason(ns, route).as_deref() == Some(reason)
        })
        .unwrap_or_else(|_| {
            panic!(
                "route {ns}/{route} never reached reason {reason}; last: {:?}",
                self.ready_reason(ns, route)
            )
        });
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if self.owned {
            self.script("stop");
        }
    }
}

pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{n}-{:x}",
        std::process::id() % 10000,
        nanos % 0xffff
    )
}

/// Polls `check` until it is true or `timeout` passes.
pub fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> Result<Duration, ()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check() {
            return Ok(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(())
}

/// The gateway binary running against a control plane; killed on drop. Its log is kept for assertions.
pub struct Gateway {
    child: Child,
    pub addr: String,
    pub metrics_addr: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Gateway {
    pub fn start(cp: &ControlPlane, extra: &[&str]) -> Gateway {
        Self::start_with_kubeconfig(&cp.kubeconfig(), extra)
    }

    /// Runs the gateway with environment variables set (as a pod's `env`/`envFrom` would).
    pub fn start_with_env(cp: &ControlPlane, extra: &[&str], env: &[(&str, &str)]) -> Gateway {
        let mut cmd = Self::run_command(&cp.kubeconfig(), extra);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::spawn(cmd)
    }

    /// Runs the gateway with other credentials (for example a ServiceAccount token).
    pub fn start_with_kubeconfig(kubeconfig: &Path, extra: &[&str]) -> Gateway {
        Self::spawn(Self::run_command(kubeconfig, extra))
    }

    fn run_command(kubeconfig: &Path, extra: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_portcullis"));
        cmd.args([
            "run",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
            "--max-watch-backoff",
            "2",
        ])
        .args(extra)
        .env("KUBECONFIG", kubeconfig);
        cmd
    }

    /// `portcullis serve` on files (each `--config`), with `env` set for the process (the
    /// variables an MLflow config names). No control plane involved.
    pub fn serve(configs: &[&Path], extra: &[&str], env: &[(&str, &str)]) -> Gateway {
        Self::spawn(Self::serve_command(configs, extra, env))
    }

    /// `portcullis serve` that must stop at start-up: its exit code and its log.
    pub fn serve_refused(
        configs: &[&Path],
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> (Option<i32>, String) {
        let out = Self::serve_command(configs, extra, env)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn portcullis")
            .wait_with_output()
            .expect("portcullis output");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn serve_command(configs: &[&Path], extra: &[&str], env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_portcullis"));
        cmd.args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ]);
        for c in configs {
            cmd.arg("--config").arg(c);
        }
        cmd.args(extra).env_remove("KUBECONFIG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }

    fn spawn(mut cmd: Command) -> Gateway {
        let mut child = cmd
            .env("RUST_LOG", "info,portcullis=debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn portcullis");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && v["message"] == "data plane listening"
                {
                    let _ = tx.send((
                        v["listen"].as_str().unwrap_or_default().to_string(),
                        v["metrics_listen"].as_str().unwrap_or_default().to_string(),
                    ));
                }
                sink.lock().push(line);
            }
        });
        let (addr, metrics_addr) = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                std::thread::sleep(Duration::from_millis(200));
                panic!(
                    "the gateway did not report its address; log:\n{}",
                    log.lock().join("\n")
                )
            });
        // A gateway held in a static (shared by a test binary) is never dropped: a detached
        // watchdog kills it once this test process is gone.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while kill -0 {} 2>/dev/null; do sleep 1; done; kill -9 {} 2>/dev/null",
                std::process::id(),
                child.id()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let gw = Gateway {
            child,
            addr,
            metrics_addr,
            log,
        };
        let ready = eventually(Duration::from_secs(30), || gw.get_status("/readyz") == 200);
        assert!(
            ready.is_ok(),
            "gateway never became ready; log:\n{}",
            gw.log()
        );
        gw
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The Prometheus exposition from the metrics port.
    pub fn metrics(&self) -> String {
        http_blocking(
            "GET",
            &format!("http://{}/metrics", self.metrics_addr),
            None,
        )
        .1
    }

    pub fn log(&self) -> String {
        // The gateway writes its log in batches (at most 20 ms apart): wait for the current one.
        std::thread::sleep(Duration::from_millis(60));
        self.log.lock().join("\n")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGHUP (`serve` reloads its files).
    pub fn hangup(&self) {
        let ok = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .map(|s| s.success());
        assert!(matches!(ok, Ok(true)), "kill -HUP failed");
    }

    /// Sends SIGTERM (a graceful shutdown), as Kubernetes does.
    pub fn terminate(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .map(|s| s.success());
        assert!(matches!(ok, Ok(true)), "kill -TERM failed");
    }

    /// Waits for the process to exit; `None` if it is still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    fn get_status(&self, path: &str) -> u16 {
        http_blocking("GET", &self.url(path), None).0
    }

    /// POST a JSON body; returns status and parsed body (Null when not JSON).
    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, text) = http_blocking("POST", &self.url(path), Some(&body.to_string()));
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub fn post_raw(&self, path: &str, body: &str) -> (u16, String) {
        http_blocking("POST", &self.url(path), Some(body))
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        let (status, text) = http_blocking("GET", &self.url(path), None);
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub fn chat(&self, route: &str) -> (u16, Value) {
        self.post(
            "/v1/chat/completions",
            &serde_json::json!({"model": route, "messages": [{"role": "user", "content": "hello there"}]}),
        )
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs pytest on `tests/python/{dir}` with the venv `venv` of `hack/python-env.sh` against the
/// gateway at `url`; `routes` is the JSON the suites read (see tests/python/conftest.py).
/// Returns whether it passed and its output.
pub fn pytest(venv: &str, dir: &str, url: &str, routes: &Value) -> (bool, String) {
    let repo = env!("CARGO_MANIFEST_DIR");
    let python = python_env(venv);
    let started = Instant::now();
    let out = Command::new(&python)
        .args(["-m", "pytest", "-v", &format!("tests/python/{dir}")])
        .current_dir(repo)
        .env("PORTCULLIS_URL", url)
        .env("PORTCULLIS_ROUTES", routes.to_string())
        .env("PYTHONDONTWRITEBYTECODE", "1")
        // The clients retry 429/5xx with backoff by default; one try keeps failures quick.
        .env("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        .env("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        .env("MLFLOW_DISABLE_TELEMETRY", "true")
        .env("DO_NOT_TRACK", "true")
        .output()
        .expect("run pytest");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "pytest {dir} ({venv}) took {:?}:\n{output}",
        started.elapsed()
    );
    (out.status.success(), output)
}

/// The python of the venv `venv` of `hack/python-env.sh`, built on first use.
pub fn python_env(venv: &str) -> String {
    let repo = env!("CARGO_MANIFEST_DIR");
    let started = Instant::now();
    let ensured = Command::new(format!("{repo}/hack/python-env.sh"))
        .args(["ensure", venv])
        .output()
        .expect("run hack/python-env.sh");
    assert!(
        ensured.status.success(),
        "python-env.sh ensure {venv} failed:\n{}",
        String::from_utf8_lossy(&ensured.stderr)
    );
    eprintln!("venv {venv} ready after {:?}", started.elapsed());
    String::from_utf8_lossy(&ensured.stdout).trim().to_string()
}

/// The `node_modules` of `hack/node-env.sh` (tests/node/package-lock.json), installed on first use.
pub fn node_env() -> String {
    let repo = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(format!("{repo}/hack/node-env.sh"))
        .arg("ensure")
        .output()
        .expect("run hack/node-env.sh");
    assert!(
        out.status.success(),
        "node-env.sh ensure failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The blocking HTTP client the tests call the gateway with.
pub fn client() -> &'static reqwest::blocking::Client {
    static CLIENT: OnceLock<reqwest::blocking::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .expect("http client")
    })
}

pub fn http_blocking(method: &str, url: &str, body: Option<&str>) -> (u16, String) {
    http_request(method, url, body, &[("content-type", "application/json")])
}

/// Status 0 means the connection failed.
pub fn http_request(
    method: &str,
    url: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut req = client().request(method, url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.body(b.to_string());
    }
    match req.send() {
        Ok(resp) => {
            let status = resp.status().as_u16();
            (status, resp.text().unwrap_or_default())
        }
        Err(_) => (0, String::new()),
    }
}

/// A Secret plus a chat Route pointing at the simulated OpenAI provider.
pub fn openai_manifests(
    ns: &str,
    route: &str,
    secret: &str,
    key: &str,
    sim: &SimProvider,
) -> String {
    format!(
        "{}---\n{}",
        secret_manifest(ns, secret, "apiKey", key),
        route_manifest(ns, route, "llm/v1/chat", secret, &sim.openai_base())
    )
}

pub fn secret_manifest(ns: &str, name: &str, key: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {ns}\nstringData:\n  {key}: {value}\n"
    )
}

pub fn route_manifest(
    ns: &str,
    name: &str,
    route_type: &str,
    secret: &str,
    api_base: &str,
) -> String {
    format!(
        "apiVersion: portcullis.dev/v1alpha1\nkind: Route\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  routeType: {route_type}\n  model:\n    provider: openai\n    name: gpt-4o-mini\n    apiBase: {api_base}\n    secretRef:\n      name: {secret}\n"
    )
}

/// A free loopback TCP port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A redis-server (or Sentinel) on a loopback port, killed on drop. Plain `port` always serves
/// (the tests administer through it with `cli`); TLS, ACL, replication and Cluster mode are
/// extra arguments.
pub struct Redis {
    child: Child,
    pub port: u16,
    args: Vec<String>,
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Redis {
        Self::start_with(port, &[])
    }

    /// redis-server on `port` with `extra` arguments (`--tls-port`, `--replicaof`, ...).
    pub fn start_with(port: u16, extra: &[&str]) -> Redis {
        let mut args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // A replica's full sync still writes an RDB file: into the temp dir, never the checkout.
        args.extend([
            "--dir".to_string(),
            std::env::temp_dir().display().to_string(),
            "--dbfilename".to_string(),
            format!("portcullis-test-{port}.rdb"),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(port, args)
    }

    /// A Sentinel on `port` watching the primary `name` at `primary` (quorum 2), writing its
    /// state into `dir`; it declares the primary down after 1 s without an answer.
    pub fn sentinel(port: u16, dir: &Path, name: &str, primary: u16) -> Redis {
        let conf = dir.join(format!("sentinel-{port}.conf"));
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {name} 127.0.0.1 {primary} 2\nsentinel down-after-milliseconds {name} 1000\nsentinel failover-timeout {name} 4000\nsentinel parallel-syncs {name} 1\n",
                dir.display()
            ),
        )
        .unwrap();
        Self::spawn(
            port,
            vec![conf.display().to_string(), "--sentinel".to_string()],
        )
    }

    fn spawn(port: u16, args: Vec<String>) -> Redis {
        let child = Command::new("redis-server")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (make redis installs it)");
        stop_with_this_process(child.id());
        let redis = Redis { child, port, args };
        eventually(Duration::from_secs(10), || {
            redis.cli(&["PING"]).trim() == "PONG"
        })
        .expect("redis-server did not start");
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `redis-cli` against the plain port as the default user; its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli (make redis installs it)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the same server again (after `kill`), with an empty data set.
    pub fn restart(&mut self) {
        self.kill();
        *self = Self::spawn(self.port, self.args.clone());
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A fixture kept in a `static` is never dropped, and a test binary exits without running its
/// destructors: a watcher stops the process `pid` once this test process is gone (and itself
/// goes as soon as `pid` does, so a recycled pid is never hit).
fn stop_with_this_process(pid: u32) {
    let owner = std::process::id();
    let script = format!(
        "while kill -0 {owner} 2>/dev/null; do kill -0 {pid} 2>/dev/null || exit 0; sleep 1; done; kill {pid}"
    );
    let _ = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}

/// A Redis Cluster of three primaries (no replicas) on loopback, all slots assigned.
pub struct RedisCluster {
    pub nodes: Vec<Redis>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let dir = tempfile::tempdir().unwrap();
        let nodes: Vec<Redis> = (0..3)
            .map(|_| {
                let port = free_port();
                let conf = dir.path().join(format!("nodes-{port}.conf"));
                Redis::start_with(
                    port,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        &conf.display().to_string(),
                        "--cluster-node-timeout",
                        "2000",
                        "--dir",
                        &dir.path().display().to_string(),
                    ],
                )
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .arg("--cluster-yes")
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        for n in &nodes {
            eventually(Duration::from_secs(20), || {
                n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok")
            })
            .expect("the cluster never became ok");
        }
        RedisCluster { nodes, _dir: dir }
    }

    /// `redis+cluster://` with every node as a seed.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// Every key matching `pattern` on every node, with the node's index.
    pub fn keys(&self, pattern: &str) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        for (i, n) in self.nodes.iter().enumerate() {
            for k in n.cli(&["--scan", "--pattern", pattern]).lines() {
                if !k.is_empty() {
                    out.push((i, k.to_string()));
                }
            }
        }
        out
    }
}

/// Runs async code (the simulated provider) from a plain #[test].
pub fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    })
}

pub fn sim() -> SimProvider {
    let rt = runtime();
    let _guard = rt.enter();
    rt.block_on(SimProvider::start())
        .expect("start simulated provider")
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// A Secret holding several keys.
pub fn secret_with(ns: &str, name: &str, data: &[(&str, &str)]) -> String {
    let mut yaml = format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {ns}\nstringData:\n"
    );
    for (k, v) in data {
        yaml.push_str(&format!("  {k}: {v:?}\n"));
    }
    yaml
}

/// A Secret labelled for the shipped install's `--secret-selector` (portcullis.dev/provider-key=true).
pub fn provider_key_manifest(ns: &str, name: &str, key: &str, value: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels:\n    portcullis.dev/provider-key: \"true\"\nstringData:\n  {key}: {value}\n"
    )
}

/// A Route for any provider; `secret` and `config` are optional.
#[allow(clippy::too_many_arguments)] // mirrors the Route fields one to one
pub fn provider_route(
    ns: &str,
    name: &str,
    route_type: &str,
    provider: &str,
    model: &str,
    api_base: &str,
    secret: Option<&str>,
    config: &[(&str, &str)],
) -> String {
    let mut yaml = format!(
        "apiVersion: portcullis.dev/v1alpha1\nkind: Route\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  routeType: {route_type}\n  model:\n    provider: {provider}\n    name: {model:?}\n    apiBase: {api_base}\n"
    );
    if let Some(s) = secret {
        yaml.push_str(&format!("    secretRef:\n      name: {s}\n"));
    }
    if !config.is_empty() {
        yaml.push_str("    config:\n");
        for (k, v) in config {
            yaml.push_str(&format!("      {k}: {v:?}\n"));
        }
    }
    yaml
}

/// Status, response headers (lower-case names) and body text.
pub fn http_full(url: &str, body: &str) -> (u16, Vec<(String, String)>, String) {
    http_full_with(url, body, &[])
}

/// `http_full` with request headers.
pub fn http_full_with(
    url: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> (u16, Vec<(String, String)>, String) {
    let mut req = client()
        .post(url)
        .header("content-type", "application/json")
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().expect("request");
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or_default().to_string()))
        .collect();
    (status, headers, resp.text().unwrap_or_default())
}

/// The JSON chunks of an SSE body (`data: ...` lines), without the `[DONE]` marker.
pub fn sse_chunks(body: &str) -> Vec<Value> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("chunk json"))
        .collect()
}

/// A typed Route manifest (YAML for `kubectl apply`), so tests cannot write a malformed one.
pub fn route_yaml(ns: &str, name: &str, spec: portcullis::api::RouteSpec) -> String {
    let mut route = portcullis::api::Route::new(name, spec);
    route.metadata.namespace = Some(ns.to_string());
    portcullis::yaml::to_string(&route).expect("route yaml")
}

/// A provider model at `api_base` whose credential is the `apiKey` of Secret `secret`.
pub fn model(
    provider: portcullis::api::Provider,
    name: &str,
    api_base: &str,
    secret: &str,
) -> portcullis::api::ModelSpec {
    portcullis::api::ModelSpec {
        provider,
        name: name.to_string(),
        api_base: Some(api_base.to_string()),
        secret_ref: Some(portcullis::api::SecretKeyRef {
            name: secret.to_string(),
            key: portcullis::api::DEFAULT_SECRET_KEY.to_string(),
        }),
        config: Default::default(),
        inference_pool: None,
        service: None,
        saturation: None,
    }
}

/// One backend of a Route.
pub fn backend(
    model: portcullis::api::ModelSpec,
    weight: u32,
    priority: u32,
) -> portcullis::api::BackendSpec {
    portcullis::api::BackendSpec {
        model,
        weight: Some(weight),
        priority: Some(priority),
        pricing: None,
    }
}

/// Status and response headers of a POST, with the body as text.
pub fn post_full(url: &str, body: &Value) -> (u16, Vec<(String, String)>, String) {
    http_full(url, &body.to_string())
}

/// The value of a header in a list from `http_full`.
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// A JWT-shaped token for `audience` expiring `exp_in` seconds from now (negative: in the past),
/// unique by `label`, with a signature no API server accepts.
pub fn unsigned_jwt(audience: &str, exp_in: i64, label: &str) -> String {
    use base64::Engine as _;
    let enc = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let claims = serde_json::json!({"aud": [audience], "exp": now + exp_in, "sub": label});
    format!(
        "{}.{}.c2lnbmF0dXJl",
        enc(r#"{"alg":"RS256","kid":"x"}"#),
        enc(&claims.to_string())
    )
}

/// A field of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`); 0 when unreadable.
pub fn proc_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The sum of every sample of the counter family `name` (all label sets) in a metrics text.
pub fn metric_sum(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| matches!(l.as_bytes().get(name.len()), Some(b'{' | b' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// An API-key consumer: a Secret labelled `portcullis.dev/api-key` holding `key`.
pub fn api_key_secret(ns: &str, name: &str, key: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels:\n    portcullis.dev/api-key: \"true\"\nstringData:\n  apiKey: {key}\n"
    )
}

/// A pinned tool from `hack/tools.sh` (helm, promtool, prometheus-operator-crds), built into
/// ~/.cache/portcullis on first use.
pub fn tool(name: &str) -> PathBuf {
    static TOOLS: OnceLock<Mutex<std::collections::HashMap<String, PathBuf>>> = OnceLock::new();
    let tools = TOOLS.get_or_init(Default::default);
    if let Some(path) = tools.lock().get(name) {
        return path.clone();
    }
    let out = Command::new(repo().join("hack/tools.sh"))
        .arg(name)
        .stderr(Stdio::inherit())
        .output()
        .expect("run hack/tools.sh");
    assert!(out.status.success(), "hack/tools.sh {name} failed");
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    tools.lock().insert(name.to_string(), path.clone());
    path
}

/// Runs a program with `stdin`; returns (success, stdout, stderr).
pub fn run_with_stdin(
    program: &Path,
    args: &[&str],
    env: &[(&str, &Path)],
    stdin: &str,
) -> (bool, String, String) {
    use std::io::Write;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(repo())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn tool");
    if let Some(mut input) = child.stdin.take() {
        let _ = input.write_all(stdin.as_bytes());
    }
    let out = child.wait_with_output().expect("tool output");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The documents of a multi-document YAML stream (empty ones left out).
pub fn yaml_documents(text: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(text)
        .filter_map(|doc| Value::deserialize(doc).ok())
        .filter(|v| !v.is_null())
        .collect()
}

/// The ```yaml blocks of README.md, as written there.
pub fn readme_yaml_blocks() -> Vec<String> {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let mut blocks = Vec::new();
    let mut rest = readme.as_str();
    while let Some(start) = rest.find("```yaml\n") {
        let block = &rest[start + 8..];
        let end = block.find("```").expect("closed fence");
        blocks.push(block[..end].to_string());
        rest = &block[end + 3..];
    }
    blocks
}

/// Gateway flags for two replicas sharing the store at `url`. Exactness is what such tests check,
/// not the store's deadline: a debug build answering a burst on a shared 2-core runner can take
/// longer than the 50 ms default to poll a reply, so the deadline is 1 s.
pub fn shared_store_flags(url: &str) -> [&str; 6] {
    [
        "--limits-store",
        url,
        "--replicas",
        "2",
        "--store-timeout",
        "1s",
    ]
}

/// Installs the Inference Extension's InferencePool CRD, as vendored under deploy/third_party.
pub fn install_inference_pool_crd(cp: &ControlPlane) {
    let file =
        repo().join("deploy/third_party/gateway-api-inference-extension/inferencepools.yaml");
    cp.ok(&["apply", "--server-side", "-f", path_str(&file)]);
    cp.ok(&[
        "wait",
        "--for=condition=Established",
        "crd/inferencepools.inference.networking.k8s.io",
        "--timeout=60s",
    ]);
}

/// A Pod object for a model server at `ip` with `labels`. No kubelet runs here: its IP and
/// readiness are written through the status subresource, as a kubelet would.
pub fn model_server_pod(cp: &ControlPlane, ns: &str, name: &str, ip: &str, labels: &Value) {
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai:v0.11.0"}]},
    });
    cp.apply(&pod.to_string());
    set_pod_ready(cp, ns, name, ip, true);
}

/// Sets a Pod's IP and Ready condition (status subresource).
pub fn set_pod_ready(cp: &ControlPlane, ns: &str, name: &str, ip: &str, ready: bool) {
    let status = if ready { "True" } else { "False" };
    let patch = serde_json::json!({"status": {
        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": status}],
    }});
    cp.ok(&[
        "patch",
        "pod",
        name,
        "-n",
        ns,
        "--subresource=status",
        "--type=merge",
        "-p",
        &patch.to_string(),
    ]);
}

/// An EndpointSlice of Service `service` on `port`: (address, pod name, ready) per endpoint.
pub fn endpoint_slice(
    ns: &str,
    service: &str,
    port: u16,
    endpoints: &[(&str, &str, bool)],
) -> String {
    serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-1"), "namespace": ns,
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints.iter().map(|(ip, pod, ready)| serde_json::json!({
            "addresses": [ip], "conditions": {"ready": ready},
            "targetRef": {"kind": "Pod", "name": pod, "namespace": ns},
        })).collect::<Vec<_>>(),
    })
    .to_string()
}

/// `n` loopback addresses of a /24 no other test uses (127.x.y.1..n), for servers that must
/// share one port (a pool's target port), as pods do.
pub fn loopback_ips(n: usize) -> Vec<std::net::Ipv4Addr> {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let k = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let seed = std::process::id().wrapping_mul(31).wrapping_add(k * 7919);
    let (a, b) = (2 + (seed % 250) as u8, ((seed / 250) % 250) as u8);
    (1..=n as u8)
        .map(|i| std::net::Ipv4Addr::new(127, a, b, i))
        .collect()
}
