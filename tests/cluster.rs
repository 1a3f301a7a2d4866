//! Portcullis as pods on a real single-node cluster (`hack/cluster.sh`: etcd, kube-apiserver,
//! controller-manager, scheduler, kubelet on containerd + runc, CNI bridge, kube-proxy, CoreDNS),
//! installed with the README's own commands from the image `make image` builds, and called by pods
//! through its Service with their projected ServiceAccount tokens.
//!
//! The cluster tests are `#[ignore]`d: `make cluster-test` builds the images and runs them with
//! `--include-ignored --test-threads=1` (the steps share one cluster and run in name order). Only
//! the cheap Dockerfile check runs in `make test`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test: failing loudly is the point

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

const SYSTEM_NS: &str = "portcullis-system";
const TEAM_NS: &str = "team-a";
const SIM_NS: &str = "llm-sim";
const PROVIDER_KEY: &str = "sk-cluster-provider-key";
const GATEWAY_IMAGE: &str = "docker.io/library/portcullis:0.1.0";
/// The Service URL the README tells in-cluster callers to use.
const SERVICE_URL: &str = "http://portcullis.portcullis-system.svc/v1/chat/completions";
/// team-a's Route by its qualified name: the shipped install gives one-word names only to Routes
/// of the namespaces in --public-namespaces (its own).
const CHAT: &str = "team-a/chat";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn cluster_script(args: &[&str]) -> String {
    let out = Command::new(repo().join("hack/cluster.sh"))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("run hack/cluster.sh");
    assert!(out.status.success(), "hack/cluster.sh {args:?} failed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The cluster: one per test process, started here unless PORTCULLIS_CLUSTER names the state folder
/// of one already up (`make cluster-up`). A started one stops when this process exits (watchdog).
fn cluster() -> &'static ControlPlane {
    static CLUSTER: OnceLock<ControlPlane> = OnceLock::new();
    CLUSTER.get_or_init(|| match std::env::var("PORTCULLIS_CLUSTER") {
        Ok(dir) if !dir.is_empty() => ControlPlane::attach(PathBuf::from(dir)),
        _ => {
            let dir = repo().join("target/cluster-test");
            let started = Instant::now();
            cluster_script(&[
                "up",
                dir.to_str().expect("utf-8 path"),
                &std::process::id().to_string(),
            ]);
            eprintln!("cluster up in {:?}", started.elapsed());
            ControlPlane::attach(dir)
        }
    })
}

/// kubectl that must succeed; its stdout.
fn k(args: &[&str]) -> String {
    cluster().ok(args)
}

fn pods(ns: &str, selector: &str) -> Vec<Value> {
    cluster().json(&["get", "pods", "-n", ns, "-l", selector])["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn is_ready(pod: &Value) -> bool {
    pod.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
        && pod.pointer("/metadata/deletionTimestamp").is_none()
}

fn name(pod: &Value) -> String {
    pod["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn gateway_pods() -> Vec<Value> {
    pods(SYSTEM_NS, "app.kubernetes.io/name=portcullis")
}

fn rollout_status(ns: &str) {
    k(&[
        "-n",
        ns,
        "rollout",
        "status",
        "deployment/portcullis",
        "--timeout=240s",
    ]);
}

/// The rollout is done and the replaced pods are gone: exactly two Ready replicas, none terminating.
fn settled() {
    rollout_status(SYSTEM_NS);
    let stable = eventually(Duration::from_secs(120), || {
        let pods = gateway_pods();
        pods.len() == 2 && pods.iter().all(is_ready)
    });
    assert!(
        stable.is_ok(),
        "replicas did not settle: {:?}",
        gateway_pods().iter().map(name).collect::<Vec<_>>()
    );
}

/// Uncordons the node even when the test fails, so later steps can schedule.
struct Uncordon(String);

impl Drop for Uncordon {
    fn drop(&mut self) {
        let _ = cluster().kubectl(&["uncordon", &self.0]);
    }
}

fn lease_holder(ns: &str) -> String {
    let lease = cluster().json(&["get", "lease", "-n", ns, "portcullis-leader"]);
    lease["spec"]["holderIdentity"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn client_pod(ns: &str, pod: &str, sa: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: ServiceAccount
metadata:
  name: {sa}
  namespace: {ns}
---
apiVersion: v1
kind: Pod
metadata:
  name: {pod}
  namespace: {ns}
spec:
  serviceAccountName: {sa}
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  containers:
    - name: client
      image: portcullis.local/client:1
      imagePullPolicy: Never
      command: ["/bin/sleep", "100000"]
      volumeMounts:
        - name: portcullis-token
          mountPath: /var/run/portcullis
          readOnly: true
  volumes:
    - name: portcullis-token
      projected:
        sources:
          - serviceAccountToken:
              audience: portcullis
              expirationSeconds: 3600
              path: token
"#
    )
}

fn sim_manifests() -> String {
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: {SIM_NS}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: sim
  namespace: {SIM_NS}
spec:
  replicas: 1
  selector:
    matchLabels: {{app: sim}}
  template:
    metadata:
      labels: {{app: sim}}
    spec:
      containers:
        - name: sim
          image: portcullis.local/sim-provider:1
          imagePullPolicy: Never
          # 100 ms between streamed words: a 150-token stream stays open for 15 s.
          args: ["--listen", "0.0.0.0:9090", "--chunk-delay-ms", "100", "--words", "300", "--record"]
          ports:
            - containerPort: 9090
          readinessProbe:
            tcpSocket: {{port: 9090}}
            periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata:
  name: sim
  namespace: {SIM_NS}
spec:
  selector: {{app: sim}}
  ports:
    - port: 9090
"#
    )
}

fn namespace(ns: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n")
}

fn sim_base() -> String {
    format!("http://sim.{SIM_NS}.svc.cluster.local:9090/openai/v1")
}

/// A Route and its provider key, labelled for the shipped install's --secret-selector.
fn chat_route(ns: &str, route: &str, allowed_sa: &str) -> String {
    format!(
        "{}---\n{}  access:\n    - serviceAccount: {allowed_sa}\n",
        provider_key_manifest(ns, "provider-key", "apiKey", PROVIDER_KEY),
        route_manifest(ns, route, "llm/v1/chat", "provider-key", &sim_base())
    )
}

/// The base install, the simulated provider, a Route and two client pods in team-a: `notebook`
/// (allowed by the Route) and `intruder` (not). Done once; every step starts from here.
fn deployed() -> &'static ControlPlane {
    static DEPLOYED: OnceLock<()> = OnceLock::new();
    let cp = cluster();
    DEPLOYED.get_or_init(|| {
        cp.apply(&sim_manifests());
        // The README's install commands, word for word.
        k(&["apply", "-k", "deploy/"]);
        rollout_status(SYSTEM_NS);
        cp.apply(&namespace(TEAM_NS));
        cp.apply(&chat_route(TEAM_NS, "chat", &format!("{TEAM_NS}/notebook")));
        cp.apply(&client_pod(TEAM_NS, "notebook", "notebook"));
        cp.apply(&client_pod(TEAM_NS, "intruder", "intruder"));
        for (ns, what) in [
            (TEAM_NS, "pod/notebook"),
            (TEAM_NS, "pod/intruder"),
            (SIM_NS, "deployment/sim"),
        ] {
            let condition = if what.starts_with("pod") {
                "--for=condition=Ready"
            } else {
                "--for=condition=Available"
            };
            k(&["wait", "-n", ns, condition, what, "--timeout=120s"]);
        }
    });
    cp
}

/// Runs a shell script in a client pod; returns (exit status, stdout).
fn exec(pod: &str, script: &str) -> (bool, String) {
    let out = cluster().kubectl(&["exec", "-n", TEAM_NS, pod, "--", "sh", "-c", script]);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn exec_background(pod: &str, script: &str) -> Child {
    Command::new(ControlPlane::bin_dir().join("kubectl"))
        .args(["exec", "-n", TEAM_NS, pod, "--", "sh", "-c", script])
        .env("KUBECONFIG", cluster().kubeconfig())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kubectl exec")
}

/// A shell command that POSTs a chat request with the pod's projected token and prints the body,
/// then `HTTP <status>` on its own line.
fn curl_chat(url: &str, model: &str, extra: &str) -> String {
    format!(
        r#"curl -sS --max-time 60 -w '\nHTTP %{{http_code}}\n' {url} -H "authorization: Bearer $(cat /var/run/portcullis/token)" -H 'content-type: application/json' -d '{{"model":"{model}","messages":[{{"role":"user","content":"hello from a pod"}}]{extra}}}'"#
    )
}

fn http_status(output: &str) -> u16 {
    output
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("HTTP "))
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn body(output: &str) -> Value {
    let text: Vec<&str> = output.lines().filter(|l| !l.starts_with("HTTP ")).collect();
    serde_json::from_str(&text.join("\n")).unwrap_or(Value::Null)
}

/// Oldest-first names of the gateway's Ready pods.
fn ready_gateway_pods() -> Vec<String> {
    gateway_pods()
        .iter()
        .filter(|p| is_ready(p))
        .map(name)
        .collect()
}

#[test]
fn dockerfile_and_image_config_agree() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).expect("Dockerfile");
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("hack/image/portcullis.json"))
            .expect("hack/image/portcullis.json"),
    )
    .expect("image config json");
    // The final stage is what runs.
    let last_stage = dockerfile
        .rsplit_once("\nFROM ")
        .map(|(_, s)| s)
        .expect("a multi-stage Dockerfile");
    let instruction = |word: &str| -> Vec<String> {
        last_stage
            .lines()
            .filter_map(|l| l.strip_prefix(word))
            .map(|rest| rest.trim().to_string())
            .collect()
    };
    let json_form = |word: &str| -> Value {
        let all = instruction(word);
        assert_eq!(all.len(), 1, "one {word} in the final stage");
        serde_json::from_str(&all[0]).expect("exec (JSON) form")
    };
    assert_eq!(instruction("USER "), vec![config["user"].as_str().unwrap()]);
    assert_eq!(json_form("ENTRYPOINT "), config["entrypoint"]);
    assert_eq!(json_form("CMD "), config["cmd"]);
    let mut exposed: Vec<String> = instruction("EXPOSE ")
        .iter()
        .flat_map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .map(|p| {
            if p.contains('/') {
                p
            } else {
                format!("{p}/tcp")
            }
        })
        .collect();
    exposed.sort();
    let mut declared: Vec<String> = config["exposedPorts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    declared.sort();
    assert_eq!(exposed, declared);
    // Both copy the binary to the path the entrypoint runs.
    assert!(last_stage.contains(&format!(" {}\n", config["entrypoint"][0].as_str().unwrap())));
    // The deployment runs as the image's user.
    let deployment =
        std::fs::read_to_string(repo().join("deploy/base/deployment.yaml")).expect("deployment");
    let uid = config["user"].as_str().unwrap().split(':').next().unwrap();
    assert!(deployment.contains(&format!("runAsUser: {uid}")));
    for port in declared {
        let number = port.trim_end_matches("/tcp");
        assert!(deployment.contains(&format!("containerPort: {number}")));
    }
}

/// The image `make image` built carries the config the Dockerfile test checks.
#[test]
#[ignore = "needs `make image` (run by make cluster-test)"]
fn step0_built_image_has_the_declared_config() {
    let archive = repo().join("target/images/portcullis.tar");
    let read = |member: &str| -> Vec<u8> {
        let out = Command::new("tar")
            .args(["-xOf", archive.to_str().unwrap(), member])
            .output()
            .expect("tar");
        assert!(out.status.success(), "{member} missing from {archive:?}");
        out.stdout
    };
    let blob = |digest: &str| -> Value {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        serde_json::from_slice(&read(&format!("blobs/sha256/{hex}"))).expect("json blob")
    };
    let index: Value = serde_json::from_slice(&read("index.json")).expect("index.json");
    let entry = &index["manifests"][0];
    assert_eq!(
        entry["annotations"]["io.containerd.image.name"],
        GATEWAY_IMAGE
    );
    let manifest = blob(entry["digest"].as_str().unwrap());
    let config = blob(manifest["config"]["digest"].as_str().unwrap());
    let declared: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("hack/image/portcullis.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["config"]["User"], declared["user"]);
    assert_eq!(config["config"]["Entrypoint"], declared["entrypoint"]);
    assert_eq!(config["config"]["Cmd"], declared["cmd"]);
    let ports: Vec<&String> = config["config"]["ExposedPorts"]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(
        ports.len(),
        declared["exposedPorts"].as_array().unwrap().len()
    );
}

#[test]
#[ignore = "needs the local cluster (make cluster-test)"]
fn step1_install_gives_ready_replicas_a_leader_and_ready_routes() {
    deployed();
    let pods = gateway_pods();
    assert_eq!(pods.len(), 2, "two replicas");
    for pod in &pods {
        assert!(is_ready(pod), "{} not Ready: {pod}", name(pod));
        let status = &pod["status"]["containerStatuses"][0];
        assert_eq!(status["image"], GATEWAY_IMAGE);
        assert_eq!(status["restartCount"], 0, "{} restarted", name(pod));
    }
    // Liveness keeps passing over several periods (10 s each): no restarts, no probe failures.
    std::thread::sleep(Duration::from_secs(25));
    for pod in gateway_pods() {
        assert!(is_ready(&pod));
        assert_eq!(pod["status"]["containerStatuses"][0]["restartCount"], 0);
    }
    let events = k(&["get", "events", "-n", SYSTEM_NS]);
    assert!(!events.contains("Unhealthy"), "a probe failed:\n{events}");

    let holder = lease_holder(SYSTEM_NS);
    assert!(
        pods.iter().any(|p| name(p) == holder),
        "leader {holder:?} is not one of the replicas"
    );
    cluster().wait_ready(TEAM_NS, "chat");
    let route = cluster().json(&["get", "route.portcullis.dev", "-n", TEAM_NS, "chat"]);
    assert_eq!(
        route["status"]["url"],
        format!("/gateway/{CHAT}/invocations"),
        "served by its qualified name only (not in --public-namespaces)"
    );

    // Scale as the README says, and back.
    k(&[
        "-n",
        SYSTEM_NS,
        "scale",
        "deployment/portcullis",
        "--replicas=3",
    ]);
    rollout_status(SYSTEM_NS);
    assert_eq!(ready_gateway_pods().len(), 3);
    k(&[
        "-n",
        SYSTEM_NS,
        "scale",
        "deployment/portcullis",
        "--replicas=2",
    ]);
    rollout_status(SYSTEM_NS);
}

#[test]
#[ignore = "needs the local cluster (make cluster-test)"]
fn step2_pods_call_the_service_by_dns_with_projected_tokens() {
    deployed();
    cluster().wait_ready(TEAM_NS, "chat");
    let call = curl_chat(SERVICE_URL, CHAT, r#","max_tokens":5"#);
    let mut last = String::new();
    // The first call may race the Service's endpoints settling after step 1's scale-down.
    let ok = eventually(Duration::from_secs(30), || {
        last = exec("notebook", &call).1;
        http_status(&last) == 200
    });
    assert!(ok.is_ok(), "the allowed pod was not served:\n{last}");
    let answer = body(&last);
    assert_eq!(answer["object"], "chat.completion");
    let text = answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(text.split_whitespace().count(), 5, "{answer}");
    // The provider got the Route's key, not the caller's ServiceAccount token.
    let (_, seen) = exec(
        "notebook",
        &format!("curl -sS http://sim.{SIM_NS}.svc.cluster.local:9090/_sim/last-authorization"),
    );
    assert_eq!(seen.trim(), format!("Bearer {PROVIDER_KEY}"));

    // A streamed answer arrives as SSE through the Service.
    let (_, streamed) = exec(
        "notebook",
        &curl_chat(SERVICE_URL, CHAT, r#","max_tokens":3,"stream":true"#),
    );
    assert_eq!(http_status(&streamed), 200, "{streamed}");
    assert!(streamed.contains("data: [DONE]"), "{streamed}");

    // Another ServiceAccount's token is valid but not granted: refused.
    let (_, refused) = exec("intruder", &call);
    let status = http_status(&refused);
    assert!(
        status == 403 || status == 404,
        "a pod whose ServiceAccount is not allowed got {status}:\n{refused}"
    );
    // No token at all: refused too (401, or 404 now that a hidden route answers like a missing one).
    let (_, anonymous) = exec(
        "notebook",
        &format!(
            r#"curl -sS -o /dev/null -w 'HTTP %{{http_code}}\n' {SERVICE_URL} -H 'content-type: application/json' -d '{{"model":"{CHAT}","messages":[{{"role":"user","content":"hi"}}]}}'"#
        ),
    );
    assert!(matches!(http_status(&anonymous), 401 | 404), "{anonymous}");
    // Tokens never reach the gateway's logs.
    let (_, token) = exec("notebook", "cat /var/run/portcullis/token");
    assert!(token.len() > 100, "no projected token: {token}");
    for pod in ready_gateway_pods() {
        let logs = k(&["logs", "-n", SYSTEM_NS, &pod]);
        assert!(!logs.contains(token.trim()), "a token reached {pod}'s log");
        assert!(
            !logs.contains(PROVIDER_KEY),
            "the provider key reached {pod}'s log"
        );
    }
}

#[test]
#[ignore = "needs the local cluster (make cluster-test)"]
fn step3_security_context_is_enforced_not_just_declared() {
    deployed();
    for pod in gateway_pods().iter().filter(|p| is_ready(p)) {
        let id = pod["status"]["containerStatuses"][0]["containerID"]
            .as_str()
            .expect("container id")
            .to_string();
        let pid = cluster_script(&["pid", &id]);
        assert!(!pid.is_empty(), "no process for {id}");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let field = |key: &str| -> String {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap_or_default()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(field("Uid:"), "65532 65532 65532 65532", "{}", name(pod));
        assert_eq!(field("Gid:"), "65532 65532 65532 65532");
        for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
            assert_eq!(field(caps), "0000000000000000", "{caps} of {}", name(pod));
        }
        assert_eq!(field("NoNewPrivs:"), "1", "allowPrivilegeEscalation: false");
        assert_eq!(field("Seccomp:"), "2", "RuntimeDefault seccomp filter");
        // A write into the container's own root filesystem fails, even for root from outside.
        let probe = format!("/proc/{pid}/root/write-probe");
        let err = std::fs::write(&probe, b"x").expect_err("the root filesystem is writable");
        assert_eq!(
            err.raw_os_error(),
            Some(30),
            "expected EROFS writing {probe}: {err}"
        );
        let mounts = std::fs::read_to_string(format!("/proc/{pid}/mounts")).expect("mounts");
        let root = mounts
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some("/"))
            .expect("root mount");
        assert!(
            root.split_whitespace()
                .nth(3)
                .is_some_and(|o| o.split(',').any(|f| f == "ro")),
            "{root}"
        );
    }
}

/// Requests in a loop from a pod, each `HTTP <code>` line, until /tmp/stop exists (or 5 minutes).
const REQUEST_LOOP: &str = r#"rm -f /tmp/stop; end=$(( $(date +%s) + 300 )); while [ ! -f /tmp/stop ] && [ $(date +%s) -lt $end ]; do curl -sS -o /dev/null --max-time 30 -w 'HTTP %{http_code}\n' http://portcullis.portcullis-system.svc/v1/chat/completions -H "authorization: Bearer $(cat /var/run/portcullis/token)" -H 'content-type: application/json' -d '{"model":"team-a/chat","messages":[{"role":"user","content":"loop"}],"max_tokens":2}' || echo 'HTTP 000'; sleep 0.1; done"#;

struct Traffic {
    loop_: Child,
    stream: Child,
}

impl Traffic {
    fn start() -> Traffic {
        let loop_ = exec_background("notebook", REQUEST_LOOP);
        // 150 words, 100 ms apart: open through a whole rollout step.
        let stream = exec_background(
            "notebook",
            &curl_chat(SERVICE_URL, CHAT, r#","max_tokens":150,"stream":true"#),
        );
        std::thread::sleep(Duration::from_secs(2));
        Traffic { loop_, stream }
    }

    /// Stops the loop; returns (statuses of the loop, the stream's output).
    fn finish(self) -> (Vec<u16>, String) {
        exec("notebook", "touch /tmp/stop");
        let loop_out = self.loop_.wait_with_output().expect("loop");
        let stream_out = self.stream.wait_with_output().expect("stream");
        let statuses = String::from_utf8_lossy(&loop_out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("HTTP "))
            .map(|s| s.trim().parse().unwrap_or(0))
            .collect();
        (
            statuses,
            String::from_utf8_lossy(&stream_out.stdout).into_owned(),
        )
    }
}

fn assert_no_failures(what: &str, statuses: &[u16], stream: &str) {
    let failed: Vec<&u16> = statuses.iter().filter(|s| **s != 200).collect();
    assert!(
        statuses.len() >= 10,
        "{what}: only {} requests",
        statuses.len()
    );
    assert!(
        failed.is_empty(),
        "{what}: {} of {} requests failed: {failed:?}",
        failed.len(),
        statuses.len()
    );
    let chunks = sse_chunks(stream);
    assert!(
        stream.contains("data: [DONE]") && chunks.len() >= 150,
        "{what}: the open stream did not complete ({} chunks):\n{stream}",
        chunks.len()
    );
    eprintln!(
        "{what}: {} requests, all 200; stream of {} chunks completed",
        statuses.len(),
        chunks.len()
    );
}

#[test]
#[ignore = "needs the local cluster (make cluster-test)"]
fn step4_rolling_updates_fail_no_request_and_finish_open_streams() {
    deployed();
    cluster().wait_ready(TEAM_NS, "chat");
    let before: Vec<String> = gateway_pods().iter().map(name).collect();

    let traffic = Traffic::start();
    k(&[
        "-n",
        SYSTEM_NS,
        "rollout",
        "restart",
        "deployment/portcullis",
    ]);
    rollout_status(SYSTEM_NS);
    let (statuses, stream) = traffic.finish();
    assert_no_failures("rollout restart", &statuses, &stream);
    let after = ready_gateway_pods();
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "pods were not replaced"
    );

    // An image change: the same bits under a new tag, as a release would be.
    cluster_script(&[
        "tag",
        GATEWAY_IMAGE,
        "docker.io/library/portcullis:0.1.0-next",
    ]);
    let traffic = Traffic::start();
    k(&[
        "-n",
        SYSTEM_NS,
        "set",
        "image",
        "deployment/portcullis",
        "portcullis=portcullis:0.1.0-next",
    ]);
    rollout_status(SYSTEM_NS);
    let (statuses, stream) = traffic.finish();
    assert_no_failures("image change", &statuses, &stream);
    // (Both tags name one image, so the runtime may report either in the status.)
    let ready: Vec<Value> = gateway_pods().into_iter().filter(is_ready).collect();
    assert_eq!(ready.len(), 2);
    for pod in ready {
        assert_eq!(
            pod["spec"]["containers"][0]["image"],
            "portcullis:0.1.0-next"
        );
    }
}

#[test]
#[ignore = "needs the local cluster (make cluster-test)"]
fn step5_eviction_respects_the_disruption_budget() {
    deployed();
    settled();
    let node = k(&["get", "nodes", "-o", "jsonpath={.items[0].metadata.name}"]);
    let _uncordon = Uncordon(node.clone());
    let traffic = Traffic::start();
    // Drain the only node of the gateway's pods: one eviction is allowed, the second would leave
    // fewer than minAvailable and is refused until the drain gives up.
    let out = cluster().kubectl(&[
        "drain",
        &node,
        "--pod-selector=app.kubernetes.io/name=portcullis",
        "--delete-emptydir-data",
        "--timeout=30s",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !out.status.success(),
        "the drain evicted both replicas:\n{stdout}{stderr}"
    );
    assert!(
        stderr.contains("disruption budget"),
        "the drain was not held back by the PodDisruptionBudget:\n{stderr}"
    );
    assert_eq!(
        stdout.matches("evicted").count(),
        1,
        "exactly one replica is evicted:\n{stdout}"
    );
    assert_eq!(ready_gateway_pods().len(), 1);
    k(&["uncordon", &node]);
    rollout_status(SYSTEM_NS);
    let (statuses, stream) = traffic.finish();
    assert_no_failures("drain", &statuses, &stream);
    assert_eq!(ready_gateway_pods().len(), 2);
}

#[test]
#[ignore = "needs the local cluster (make cluster-test)"]
fn step6_status_writes_resume_after_the_leader_is_killed() {
    deployed();
    settled();
    let pods = ready_gateway_pods();
    assert_eq!(pods.len(), 2);
    let leader = lease_holder(SYSTEM_NS);
    assert!(pods.contains(&leader), "{leader} leads but is not Ready");
    let survivor = pods.iter().find(|p| **p != leader).cloned().unwrap();
    let pod = cluster().json(&["get", "pod", "-n", SYSTEM_NS, &leader]);
    let id = pod["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .unwrap()
        .to_string();
    let pid = cluster_script(&["pid", &id]);

    // SIGKILL: the leader cannot hand the lease over, so the survivor must wait for it to expire.
    let killed = Instant::now();
    assert!(
        Command::new("kill")
            .args(["-9", &pid])
            .status()
            .unwrap()
            .success()
    );
    k(&[
        "delete",
        "pod",
        "-n",
        SYSTEM_NS,
        &leader,
        "--grace-period=0",
        "--force",
        "--wait=false",
    ]);
    cluster().apply(&chat_route(
        TEAM_NS,
        "after-failover",
        &format!("{TEAM_NS}/notebook"),
    ));
    let resumed = eventually(Duration::from_secs(40), || {
        cluster().ready_reason(TEAM_NS, "after-failover").is_some()
    });
    let holder = lease_holder(SYSTEM_NS);
    assert!(
        resumed.is_ok(),
        "no status written within 40 s of killing the leader; lease holder now {holder:?}"
    );
    let elapsed = killed.elapsed();
    eprintln!(
        "status writes resumed {elapsed:?} after the leader was killed (new leader {holder}, {})",
        if holder == survivor {
            "the surviving replica"
        } else {
            "its replacement"
        }
    );
    assert_ne!(holder, leader);
    // Lease duration 15 s, plus the survivor's retry period and one reconcile.
    assert!(elapsed < Duration::from_secs(25), "took {elapsed:?}");
    cluster().wait_ready(TEAM_NS, "after-failover");
    rollout_status(SYSTEM_NS);
}

#[test]
#[ignore = "needs the local cluster (make cluster-test)"]
fn step7_namespaced_overlay_installs_and_serves() {
    deployed();
    let ns = "team-gw";
    // A team installs the overlay into its own namespace by wrapping it with the same transformer
    // the overlay uses (kustomize takes relative paths only, so the wrapper sits inside the repo).
    let dir = repo().join("target/cluster-namespaced");
    std::fs::create_dir_all(&dir).expect("kustomization dir");
    std::fs::write(
        dir.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - ../../deploy/overlays/namespaced\ntransformers:\n  - |-\n    apiVersion: builtin\n    kind: NamespaceTransformer\n    metadata:\n      name: team-namespace\n      namespace: {ns}\n    setRoleBindingSubjects: allServiceAccounts\n"
        ),
    )
    .expect("kustomization");
    cluster().apply(&namespace(ns));
    let kdir = dir.to_str().unwrap().to_string();
    k(&["apply", "-k", &kdir]);
    k(&[
        "-n",
        ns,
        "rollout",
        "status",
        "deployment/portcullis",
        "--timeout=240s",
    ]);
    // Its own Route, callable by team-a's notebook; team-a's Route is not this gateway's.
    cluster().apply(&chat_route(
        ns,
        "local-chat",
        &format!("{TEAM_NS}/notebook"),
    ));
    cluster().wait_ready(ns, "local-chat");
    let url = format!("http://portcullis.{ns}.svc/v1/chat/completions");
    let mut last = String::new();
    let served = eventually(Duration::from_secs(30), || {
        last = exec(
            "notebook",
            &curl_chat(&url, "local-chat", r#","max_tokens":4"#),
        )
        .1;
        http_status(&last) == 200
    });
    assert!(
        served.is_ok(),
        "the namespaced gateway did not serve:\n{last}"
    );
    let (_, other) = exec("notebook", &curl_chat(&url, "chat", ""));
    assert_eq!(http_status(&other), 404, "{other}");
    let holder = lease_holder(ns);
    assert!(
        holder.starts_with("portcullis-"),
        "no leader in {ns}: {holder:?}"
    );
    k(&["delete", "namespace", ns, "--timeout=120s"]);
}

#[test]
#[ignore = "needs the local cluster (make cluster-test)"]
fn step8_uninstall_removes_the_gateway() {
    deployed();
    k(&["delete", "-k", "deploy/", "--timeout=180s"]);
    let out = cluster().kubectl(&["get", "crd", "routes.portcullis.dev"]);
    assert!(!out.status.success(), "the CRD is still there");
    let out = cluster().kubectl(&["get", "namespace", SYSTEM_NS]);
    assert!(!out.status.success(), "{SYSTEM_NS} is still there");
}

/// `helm ARGS` against the cluster that must succeed; its stdout.
fn helm(args: &[&str]) -> String {
    cluster().helm_ok(args)
}

fn gateway_images() -> Vec<String> {
    gateway_pods()
        .into_iter()
        .filter(is_ready)
        .map(|p| {
            p["spec"]["containers"][0]["image"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// After step 8's `kubectl delete -k deploy/`: the chart installs the same gateway, serves a pod's
/// call, upgrades to a new image and rolls back under load with no failed request, and its
/// uninstall removes what it installed but leaves the CRDs (Helm never deletes crds/) and Routes.
#[test]
#[ignore = "needs the local cluster (make cluster-test)"]
fn step9_helm_install_upgrade_rollback_and_uninstall() {
    deployed();
    let gone = eventually(Duration::from_secs(180), || {
        !cluster()
            .kubectl(&["get", "namespace", SYSTEM_NS])
            .status
            .success()
    });
    assert!(gone.is_ok(), "{SYSTEM_NS} from step 8 is still terminating");
    let chart = repo().join("deploy/helm/portcullis");
    let chart = chart.to_str().unwrap();
    helm(&[
        "install",
        "portcullis",
        chart,
        "-n",
        SYSTEM_NS,
        "--create-namespace",
    ]);
    rollout_status(SYSTEM_NS);
    let deployment = cluster().json(&["get", "deployment", "-n", SYSTEM_NS, "portcullis"]);
    assert_eq!(
        deployment["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "Helm"
    );
    // The CRDs came from the chart's crds/: team-a's Route is back once re-applied.
    cluster().apply(&chat_route(TEAM_NS, "chat", &format!("{TEAM_NS}/notebook")));
    cluster().wait_ready(TEAM_NS, "chat");
    let call = curl_chat(SERVICE_URL, CHAT, r#","max_tokens":5"#);
    let mut last = String::new();
    let served = eventually(Duration::from_secs(60), || {
        last = exec("notebook", &call).1;
        http_status(&last) == 200
    });
    assert!(served.is_ok(), "the Helm install did not serve:\n{last}");
    assert_eq!(body(&last)["object"], "chat.completion", "{last}");
    settled();
    assert_eq!(gateway_images(), ["portcullis:0.1.0", "portcullis:0.1.0"]);

    // The upgrade: a new image tag (the same bits, as in step 4), under load.
    cluster_script(&[
        "tag",
        GATEWAY_IMAGE,
        "docker.io/library/portcullis:0.1.0-next",
    ]);
    let installed = ready_gateway_pods();
    let traffic = Traffic::start();
    helm(&[
        "upgrade",
        "portcullis",
        chart,
        "-n",
        SYSTEM_NS,
        "--reuse-values",
        "--set",
        "image.tag=0.1.0-next",
    ]);
    rollout_status(SYSTEM_NS);
    let (statuses, stream) = traffic.finish();
    assert_no_failures("helm upgrade", &statuses, &stream);
    settled();
    assert_eq!(
        gateway_images(),
        ["portcullis:0.1.0-next", "portcullis:0.1.0-next"]
    );
    let upgraded = ready_gateway_pods();
    assert!(
        upgraded.iter().all(|p| !installed.contains(p)),
        "the upgrade did not replace the pods: {installed:?} -> {upgraded:?}"
    );

    // The rollback: revision 1's values (no image.tag) as a new revision, under load.
    let traffic = Traffic::start();
    helm(&["rollback", "portcullis", "1", "-n", SYSTEM_NS]);
    rollout_status(SYSTEM_NS);
    let (statuses, stream) = traffic.finish();
    assert_no_failures("helm rollback", &statuses, &stream);
    settled();
    assert_eq!(gateway_images(), ["portcullis:0.1.0", "portcullis:0.1.0"]);
    let rolled_back = ready_gateway_pods();
    assert!(
        rolled_back.iter().all(|p| !upgraded.contains(p)),
        "the rollback did not replace the pods: {upgraded:?} -> {rolled_back:?}"
    );
    let history = helm(&["history", "portcullis", "-n", SYSTEM_NS, "-o", "json"]);
    let revisions: Value = serde_json::from_str(&history).unwrap();
    let summary: Vec<(i64, &str, &str)> = revisions
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["revision"].as_i64().unwrap_or(0),
                r["status"].as_str().unwrap_or_default(),
                r["description"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (1, "superseded", "Install complete"),
            (2, "superseded", "Upgrade complete"),
            (3, "deployed", "Rollback to 1"),
        ],
        "{history}"
    );
    let tag = |revision: &str| -> Value {
        let values = helm(&[
            "get",
            "values",
            "portcullis",
            "-n",
            SYSTEM_NS,
            "--revision",
            revision,
            "-o",
            "json",
        ]);
        serde_json::from_str::<Value>(&values).unwrap()["image"]["tag"].clone()
    };
    assert_eq!(tag("2"), "0.1.0-next");
    assert_eq!(
        tag("3"),
        Value::Null,
        "revision 3 is not revision 1's values"
    );

    helm(&["uninstall", "portcullis", "-n", SYSTEM_NS, "--wait"]);
    let removed = eventually(Duration::from_secs(120), || gateway_pods().is_empty());
    assert!(removed.is_ok(), "gateway pods left after helm uninstall");
    let (found, _, _) = cluster().helm(&["status", "portcullis", "-n", SYSTEM_NS]);
    assert!(!found, "the release outlived helm uninstall");
    for what in [
        "deployment/portcullis",
        "service/portcullis",
        "serviceaccount/portcullis",
        "configmap/portcullis-policy",
        "poddisruptionbudget/portcullis",
    ] {
        let out = cluster().kubectl(&["get", "-n", SYSTEM_NS, what]);
        assert!(!out.status.success(), "{what} outlived helm uninstall");
    }
    for what in ["clusterrole/portcullis", "clusterrolebinding/portcullis"] {
        let out = cluster().kubectl(&["get", what]);
        assert!(!out.status.success(), "{what} outlived helm uninstall");
    }
    k(&[
        "get",
        "crd",
        "routes.portcullis.dev",
        "teams.portcullis.dev",
    ]);
    k(&["get", "route.portcullis.dev", "-n", TEAM_NS, "chat"]);
}
