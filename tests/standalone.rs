//! `portcullis serve`: the data plane from files, no cluster. The real MLflow 2.5, MLflow 3 and
//! OpenAI Python clients run their suites (the ones tests/clients.rs runs against the cluster
//! mode) against manifests, an MLflow 2.5 `routes:` config and an MLflow `endpoints:` config;
//! invalid input is reported with its file and document; hot reload under a request loop.
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers of tests: failing loudly is the point

mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use portcullis_sim::Behaviour;
use serde_json::{Value, json};
use support::*;

const PAGE_SIZE: usize = 3;

/// The simulated providers of a suite: `sim` answers, `limited` always answers 429.
struct Sims {
    sim: SimProvider,
    limited: SimProvider,
}

fn sims() -> Sims {
    let (sim, limited) = (support::sim(), support::sim());
    limited.set_fault(Fault::Status {
        status: 429,
        body: json!({"error": {"message": "Rate limit reached for gpt-4o-mini", "type": "requests", "code": "rate_limit_exceeded"}}).to_string(),
        retry_after: Some(7),
    });
    Sims { sim, limited }
}

/// The route names the Python suites read (tests/python/conftest.py); `resilient` (two backends,
/// the first unreachable) only where the config can say so.
fn suite_routes(all: &[&str]) -> Value {
    let mut routes = json!({
        "chat": "chat", "completions": "completions", "embeddings": "embeddings",
        "limited": "limited", "throttled": "throttled", "all": all, "page_size": PAGE_SIZE,
    });
    if all.contains(&"resilient") {
        routes["resilient"] = json!("resilient");
    }
    routes
}

fn run_suites(gw: &Gateway, suites: &[(&str, &str)], all: &[&str]) {
    for (venv, dir) in suites {
        let (passed, _) = pytest(
            venv,
            dir,
            &format!("http://{}", gw.addr),
            &suite_routes(all),
        );
        assert!(passed, "pytest {dir} failed; gateway log:\n{}", gw.log());
    }
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Every request the simulated OpenAI provider got carried this bearer key.
fn assert_key(sim: &SimProvider, key: &str) {
    let requests: Vec<_> = sim
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/openai/"))
        .collect();
    assert!(!requests.is_empty(), "no request reached the provider");
    for r in requests {
        assert_eq!(
            r.header("authorization"),
            Some(format!("Bearer {key}").as_str())
        );
    }
}

fn manifest_route(name: &str, route_type: &str, base: &str, secret: &str, extra: &str) -> String {
    format!(
        "apiVersion: portcullis.dev/v1alpha1\nkind: Route\nmetadata:\n  name: {name}\nspec:\n  routeType: {route_type}\n  model:\n    provider: openai\n    name: gpt-4o-mini\n    apiBase: {base}\n    secretRef:\n      name: {secret}\n{extra}"
    )
}

#[test]
fn manifests_serve_the_mlflow_25_mlflow_3_and_openai_clients() {
    let s = sims();
    let dir = tempfile::tempdir().unwrap();
    let base = s.sim.openai_base();
    let calls = "  limits:\n    - renewalPeriod: minute\n      calls: 100\n    - renewalPeriod: day\n      tokens: 5000\n";
    let throttle = "  limits:\n    - renewalPeriod: second\n      calls: 1\n";
    // Routes in one file, the Secret (data, base64) in another, a filler in a third.
    write(
        dir.path(),
        "routes.yaml",
        &[
            manifest_route("chat", "llm/v1/chat", &base, "openai", calls),
            manifest_route("completions", "llm/v1/completions", &base, "openai", ""),
            manifest_route("embeddings", "llm/v1/embeddings", &base, "openai", ""),
            manifest_route(
                "limited",
                "llm/v1/chat",
                &s.limited.openai_base(),
                "openai",
                "",
            ),
            manifest_route("throttled", "llm/v1/chat", &base, "openai", throttle),
        ]
        .join("---\n"),
    );
    write(
        dir.path(),
        "secret.yml",
        // "sk-files" in base64, as `kubectl create secret` writes it.
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: openai\ndata:\n  apiKey: c2stZmlsZXM=\n",
    );
    // Two backends, the first refusing connections: every call falls back to Anthropic.
    write(
        dir.path(),
        "resilient.yaml",
        &format!(
            "apiVersion: portcullis.dev/v1alpha1\nkind: Route\nmetadata:\n  name: resilient\nspec:\n  routeType: llm/v1/chat\n  backends:\n    - {{provider: openai, name: gpt-4o-mini, apiBase: \"http://127.0.0.1:9/v1\", secretRef: {{name: openai}}}}\n    - {{provider: anthropic, name: claude-sonnet-4-5, apiBase: \"{}\", secretRef: {{name: openai}}, priority: 1}}\n",
            s.sim.anthropic_base()
        ),
    );
    write(
        dir.path(),
        "filler.yaml",
        &[
            manifest_route("filler-1", "llm/v1/chat", &base, "openai", ""),
            manifest_route("filler-2", "llm/v1/chat", &base, "openai", ""),
        ]
        .join("---\n"),
    );
    write(dir.path(), "README.md", "not a config: ignored");
    let gw = Gateway::serve(&[dir.path()], &["--page-size", "3"], &[]);
    let all = [
        "chat",
        "completions",
        "embeddings",
        "limited",
        "throttled",
        "filler-1",
        "filler-2",
        "resilient",
    ];
    run_suites(
        &gw,
        &[("mlflow25", "mlflow25"), ("mlflow3", "mlflow3")],
        &all,
    );
    assert_key(&s.sim, "sk-files");
    let ready = gw.get("/readyz").1;
    assert_eq!(ready["status"], "ok", "{ready}");
    assert_eq!(ready["configGeneration"], 1, "{ready}");
    assert_eq!(ready["lastReloadError"], Value::Null, "{ready}");
    let metrics = gw.metrics();
    assert!(
        metrics.contains("portcullis_config_generation 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("portcullis_routes{reason=\"Resolved\"} 8"),
        "{metrics}"
    );
    assert!(
        !gw.log().contains("sk-files"),
        "the key must never be logged"
    );
}

/// An MLflow 2.5 config as the 2.5 announcement wrote them: `routes:`, `route_type`, `$ENV` keys.
#[test]
fn an_mlflow_25_config_serves_the_25_client_as_is() {
    let s = sims();
    let dir = tempfile::tempdir().unwrap();
    let route = |name: &str, route_type: &str, base: &str| {
        format!(
            "  - name: {name}\n    route_type: {route_type}\n    model:\n      provider: openai\n      name: gpt-4o-mini\n      config:\n        openai_api_key: $PORTCULLIS_TEST_OPENAI_KEY\n        openai_api_base: {base}\n"
        )
    };
    let base = s.sim.openai_base();
    let mut config = String::from("routes:\n");
    for (name, t, b) in [
        ("chat", "llm/v1/chat", base.as_str()),
        ("completions", "llm/v1/completions", &base),
        ("embeddings", "llm/v1/embeddings", &base),
        ("limited", "llm/v1/chat", &s.limited.openai_base()),
        ("filler-1", "llm/v1/chat", &base),
        ("filler-2", "llm/v1/chat", &base),
        ("filler-3", "llm/v1/chat", &base),
    ] {
        config.push_str(&route(name, t, b));
    }
    let file = write(dir.path(), "config.yaml", &config);
    let gw = Gateway::serve(
        &[&file],
        &["--page-size", "3"],
        &[("PORTCULLIS_TEST_OPENAI_KEY", "sk-from-env")],
    );
    let all = [
        "chat",
        "completions",
        "embeddings",
        "limited",
        "filler-1",
        "filler-2",
        "filler-3",
    ];
    run_suites(&gw, &[("mlflow25", "mlflow25")], &all);
    assert_key(&s.sim, "sk-from-env");
    assert!(
        !gw.log().contains("sk-from-env"),
        "the key must never be logged"
    );
}

/// The later format: `endpoints:`, `endpoint_type`, `limit`; the MLflow 3 deployments client,
/// the OpenAI SDK and the 2.5 client all pass.
#[test]
fn an_mlflow_endpoints_config_serves_the_deployments_client_and_the_openai_sdk() {
    let s = sims();
    let dir = tempfile::tempdir().unwrap();
    let base = s.sim.openai_base();
    let endpoint = |name: &str, t: &str, b: &str, limit: &str| {
        format!(
            "  - name: {name}\n    endpoint_type: {t}\n    model: {{provider: openai, name: gpt-4o-mini, config: {{openai_api_key: $PORTCULLIS_TEST_OPENAI_KEY, openai_api_base: \"{b}\"}}}}\n{limit}"
        )
    };
    let mut config = String::from("endpoints:\n");
    for (name, t, b, limit) in [
        (
            "chat",
            "llm/v1/chat",
            base.as_str(),
            "    limit: {renewal_period: minute, calls: 100}\n",
        ),
        ("completions", "llm/v1/completions", &base, ""),
        ("embeddings", "llm/v1/embeddings", &base, ""),
        ("limited", "llm/v1/chat", &s.limited.openai_base(), ""),
        (
            "throttled",
            "llm/v1/chat",
            &base,
            "    limit:\n      renewal_period: second\n      calls: 1\n",
        ),
        ("filler-1", "llm/v1/chat", &base, ""),
        ("filler-2", "llm/v1/chat", &base, ""),
    ] {
        config.push_str(&endpoint(name, t, b, limit));
    }
    // MLflow 3's traffic routes: a split across two endpoints.
    config.push_str(
        "routes:\n  - name: split\n    task_type: llm/v1/chat\n    destinations:\n      - {name: chat, traffic_percentage: 50}\n      - {name: filler-1, traffic_percentage: 50}\n    routing_strategy: TRAFFIC_SPLIT\n",
    );
    let file = write(dir.path(), "gateway.yaml", &config);
    let gw = Gateway::serve(
        &[&file],
        &["--page-size", "3"],
        &[("PORTCULLIS_TEST_OPENAI_KEY", "sk-endpoints")],
    );
    assert_eq!(gw.chat("split").0, 200, "{}", gw.log());
    let all = [
        "chat",
        "completions",
        "embeddings",
        "limited",
        "throttled",
        "filler-1",
        "filler-2",
        "split",
    ];
    run_suites(
        &gw,
        &[("mlflow3", "mlflow3"), ("mlflow25", "mlflow25")],
        &all,
    );
    assert_key(&s.sim, "sk-endpoints");
}

#[test]
fn an_invalid_route_is_reported_with_its_file_and_document_and_the_others_serve() {
    let sim = support::sim();
    let dir = tempfile::tempdir().unwrap();
    let base = sim.openai_base();
    let file = write(
        dir.path(),
        "routes.yaml",
        &[
            secret_manifest("default", "openai", "apiKey", "sk-1"),
            // Document 2: not a Route the schema admits (an unknown provider).
            "apiVersion: portcullis.dev/v1alpha1\nkind: Route\nmetadata: {name: palm}\nspec: {routeType: llm/v1/chat, model: {provider: palm, name: chat-bison}}\n".into(),
            // Document 3: valid, but its Secret does not exist: reported by reconcile, 503.
            manifest_route("orphan", "llm/v1/chat", &base, "missing", ""),
            manifest_route("chat", "llm/v1/chat", &base, "openai", ""),
            // Document 5: the cloud metadata address, refused by the operator's egress policy.
            manifest_route("metadata", "llm/v1/chat", "http://169.254.169.254/v1", "openai", ""),
        ]
        .join("---\n"),
    );
    let gw = Gateway::serve(&[&file], &[], &[]);
    assert_eq!(gw.chat("chat").0, 200);
    let (status, body) = gw.chat("metadata");
    assert_eq!(status, 503, "{body}");
    assert!(body.to_string().contains("EgressDenied"), "{body}");
    let (status, body) = gw.chat("orphan");
    assert_eq!(status, 503, "{body}");
    assert!(body.to_string().contains("SecretNotFound"), "{body}");
    assert_eq!(gw.chat("palm").0, 404);
    let log = gw.log();
    let line = |needle: &str| {
        log.lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .find(|l| l.to_string().contains(needle))
            .unwrap_or_else(|| panic!("no log line with {needle}:\n{log}"))
    };
    let palm = line("unknown variant `palm`");
    assert_eq!(palm["document"], 2, "{palm}");
    assert_eq!(palm["file"], file.display().to_string(), "{palm}");
    let orphan = line("Secret default/missing not found");
    assert_eq!(orphan["document"], 3, "{orphan}");
    assert_eq!(orphan["reason"], "SecretNotFound", "{orphan}");
    let metadata = line("169.254.169.254");
    assert_eq!(metadata["document"], 5, "{metadata}");
    assert_eq!(metadata["reason"], "EgressDenied", "{metadata}");

    // Nothing valid: exit 2 at start-up, with the reason.
    let bad = write(
        dir.path(),
        "bad.yaml",
        &manifest_route("orphan", "llm/v1/chat", &base, "missing", ""),
    );
    let (code, log) = Gateway::serve_refused(&[&bad], &[], &[]);
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("nothing to serve"), "{log}");
    assert!(log.contains("Secret default/missing not found"), "{log}");
}

#[test]
fn mlflow_settings_portcullis_cannot_honour_stop_the_start_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "gateway.yaml",
        "endpoints:\n  - name: chat\n    endpoint_type: llm/v1/chat\n    model:\n      provider: openai\n      name: gpt-4o-mini\n      config:\n        openai_api_key: sk-literal-secret\n        openai_proxy: http://proxy:3128\n  - name: palm\n    endpoint_type: llm/v1/chat\n    model: {provider: palm, name: chat-bison, config: {palm_api_key: $PALM_API_KEY}}\n",
    );
    let (code, log) = Gateway::serve_refused(&[&file], &[], &[]);
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains("endpoints[0].model.config.openai_proxy: not supported"),
        "{log}"
    );
    assert!(
        log.contains("endpoints[1].model.provider: \\\"palm\\\" is not supported"),
        "{log}"
    );
    assert!(!log.contains("sk-literal-secret"), "{log}");

    // A LiteLLM config is imported, not served.
    let litellm = write(
        dir.path(),
        "litellm.yaml",
        "model_list:\n  - {model_name: a, litellm_params: {model: openai/gpt-4o}}\n",
    );
    let (code, log) = Gateway::serve_refused(&[&litellm], &[], &[]);
    assert_eq!(code, Some(2), "{log}");
    assert!(log.contains("portcullis import litellm"), "{log}");
}

#[test]
fn api_key_consumers_come_from_labelled_secrets_in_the_files() {
    let sim = support::sim();
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "routes.yaml",
        &[
            secret_manifest("default", "openai", "apiKey", "sk-upstream"),
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: team-a\n  namespace: default\n  labels: {portcullis.dev/api-key: \"true\"}\nstringData:\n  apiKey: caller-key-a\n".into(),
            manifest_route(
                "chat",
                "llm/v1/chat",
                &sim.openai_base(),
                "openai",
                "  access:\n    - consumer: default/team-a\n",
            ),
        ]
        .join("---\n"),
    );
    let gw = Gateway::serve(&[&file], &["--default-access", "authenticated"], &[]);
    let body =
        json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let call = |auth: Option<&str>| {
        let mut headers = vec![("content-type", "application/json")];
        let bearer = auth.map(|a| format!("Bearer {a}"));
        if let Some(b) = &bearer {
            headers.push(("authorization", b.as_str()));
        }
        http_request(
            "POST",
            &gw.url("/v1/chat/completions"),
            Some(&body),
            &headers,
        )
        .0
    };
    assert_eq!(call(None), 401);
    assert_eq!(call(Some("wrong")), 401);
    assert_eq!(call(Some("caller-key-a")), 200);
    assert!(!gw.log().contains("caller-key-a"));
}

/// Calls `route` in a loop on two threads until `stop`; counts calls that did not get a 200.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<parking_lot::Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(url: String, route: &str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let body =
            json!({"model": route, "messages": [{"role": "user", "content": "hi"}]}).to_string();
        let threads = (0..2)
            .map(|_| {
                let (stop, ok, failed, url, body) = (
                    stop.clone(),
                    ok.clone(),
                    failed.clone(),
                    url.clone(),
                    body.clone(),
                );
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let (status, text) = http_blocking("POST", &url, Some(&body));
                        if status == 200 {
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            failed.lock().push(format!("{status}: {text}"));
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            threads,
        }
    }

    fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let failed = self.failed.lock().clone();
        (self.ok.load(Ordering::Relaxed), failed)
    }
}

/// Waits until `check` holds; the time it took must be under a second.
fn within_a_second(what: &str, gw: &Gateway, check: impl FnMut() -> bool) -> Duration {
    let took = eventually(Duration::from_secs(5), check)
        .unwrap_or_else(|_| panic!("{what}: never visible; log:\n{}", gw.log()));
    assert!(took < Duration::from_secs(1), "{what}: took {took:?}");
    eprintln!("{what}: visible after {took:?}");
    took
}

#[test]
fn hot_reload_under_a_request_loop() {
    let (sim, slow) = (support::sim(), support::sim());
    slow.set_behaviour(Behaviour {
        chunk_delay: Duration::from_millis(100),
        answer_words: 30,
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let base = sim.openai_base();
    write(
        dir.path(),
        "stable.yaml",
        &[
            secret_manifest("default", "stable-key", "apiKey", "sk-stable"),
            manifest_route("stable", "llm/v1/chat", &base, "stable-key", ""),
            manifest_route("slow", "llm/v1/chat", &slow.openai_base(), "stable-key", ""),
        ]
        .join("---\n"),
    );
    let gw = Gateway::serve(&[dir.path()], &[], &[]);
    let generation = || {
        gw.get("/readyz").1["configGeneration"]
            .as_u64()
            .unwrap_or(0)
    };
    assert_eq!(generation(), 1);
    let load = Load::start(gw.url("/v1/chat/completions"), "stable");

    // A stream that spans every change below: it must end whole.
    let stream_url = gw.url("/v1/chat/completions");
    let stream = std::thread::spawn(move || {
        let mut resp = client()
            .post(stream_url)
            .header("content-type", "application/json")
            .body(json!({"model": "slow", "stream": true, "messages": [{"role": "user", "content": "hi"}]}).to_string())
            .send()
            .unwrap();
        let mut text = String::new();
        resp.read_to_string(&mut text).unwrap();
        (resp.status().as_u16(), text)
    });

    // Add a file with a new Route and its Secret.
    let added = |model: &str, secret: &str, key: &str| {
        [
            secret_manifest("default", secret, "apiKey", key),
            format!(
                "apiVersion: portcullis.dev/v1alpha1\nkind: Route\nmetadata:\n  name: added\nspec:\n  routeType: llm/v1/chat\n  model:\n    provider: openai\n    name: {model}\n    apiBase: {base}\n    secretRef:\n      name: {secret}\n"
            ),
        ]
        .join("---\n")
    };
    let file = dir.path().join("added.yaml");
    std::fs::write(&file, added("gpt-4o-mini", "added-key", "sk-added-1")).unwrap();
    within_a_second("a new file", &gw, || gw.chat("added").0 == 200);
    assert_eq!(generation(), 2);

    // Change the model and the key of the Route.
    sim.clear();
    std::fs::write(&file, added("gpt-4.1", "added-key-2", "sk-added-2")).unwrap();
    within_a_second("a changed model and key", &gw, || {
        let (status, body) = gw.chat("added");
        status == 200 && body["model"] == "gpt-4.1"
    });
    let last = sim
        .requests()
        .into_iter()
        .rfind(|r| r.json()["model"] == "gpt-4.1")
        .unwrap();
    assert_eq!(last.header("authorization"), Some("Bearer sk-added-2"));

    // Break the file: the last good version keeps serving, /readyz and the metric say why.
    std::fs::write(&file, "apiVersion: v1\nkind: Secret\nmetadata: [broken\n").unwrap();
    within_a_second("a broken file", &gw, || {
        gw.get("/readyz").1["lastReloadError"]
            .as_str()
            .is_some_and(|e| e.contains("added.yaml") && e.contains("not valid YAML"))
    });
    let (status, body) = gw.chat("added");
    assert_eq!((status, &body["model"]), (200, &json!("gpt-4.1")), "{body}");
    assert!(gw.metrics().contains("portcullis_config_reload_failing 1"));
    let ready = gw.get("/readyz");
    assert_eq!(
        ready.0, 200,
        "a broken file does not make the gateway unready"
    );

    // Fix it.
    std::fs::write(&file, added("gpt-4o", "added-key", "sk-added-3")).unwrap();
    within_a_second("a fixed file", &gw, || {
        gw.chat("added").1["model"] == "gpt-4o"
    });
    assert_eq!(gw.get("/readyz").1["lastReloadError"], Value::Null);
    assert!(gw.metrics().contains("portcullis_config_reload_failing 0"));

    // Remove it.
    std::fs::remove_file(&file).unwrap();
    within_a_second("a removed file", &gw, || gw.chat("added").0 == 404);

    // SIGHUP reloads at once, even with nothing changed.
    let before = generation();
    gw.hangup();
    within_a_second("SIGHUP", &gw, || generation() > before);

    let (status, text) = stream.join().unwrap();
    assert_eq!(status, 200);
    assert!(
        text.trim_end().ends_with("data: [DONE]"),
        "the stream was cut: {text}"
    );
    let (ok, failed) = load.finish();
    assert!(ok > 20, "the request loop made only {ok} calls");
    assert!(
        failed.is_empty(),
        "{} calls on the stable route failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    let log = gw.log();
    assert!(!log.contains("sk-added"), "keys must never be logged");
}

/// The commands of the README's "Run without Kubernetes" section (what `make run-standalone`
/// runs), on copies of examples/ pointed at this test's simulated provider instead of the fixed
/// port of `make run`.
#[test]
fn the_readme_run_without_kubernetes_commands_work_on_the_examples() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(repo.join("README.md")).unwrap();
    let script = std::fs::read_to_string(repo.join("hack/run-standalone.sh")).unwrap();
    for command in [
        "portcullis serve --config examples/",
        "--config examples/migrate/mlflow-gateway.yaml",
    ] {
        assert!(readme.contains(command), "README lost {command:?}");
        assert!(
            script.contains(command),
            "hack/run-standalone.sh lost {command:?}"
        );
    }
    let sim = support::sim();
    let addr = sim.openai_base().trim_end_matches("/openai/v1").to_string();
    let dir = tempfile::tempdir().unwrap();
    let examples = dir.path().join("examples");
    std::fs::create_dir_all(examples.join("migrate")).unwrap();
    let copy = |from: &Path, to: &Path| {
        let text = std::fs::read_to_string(from).unwrap();
        std::fs::write(to, text.replace("http://127.0.0.1:9090", &addr)).unwrap();
    };
    for entry in std::fs::read_dir(repo.join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            copy(&path, &examples.join(path.file_name().unwrap()));
        }
    }
    let mlflow = examples.join("migrate/mlflow-gateway.yaml");
    copy(&repo.join("examples/migrate/mlflow-gateway.yaml"), &mlflow);
    let gw = Gateway::serve(
        &[&examples, &mlflow],
        &[],
        &[("OPENAI_API_KEY", "sk-local-demo-key")],
    );
    for route in ["chat", "mlflow-chat"] {
        let (status, body) = gw.chat(route);
        assert_eq!(status, 200, "{route}: {body}");
    }
    let (status, body) = gw.post(
        "/endpoints/mlflow-chat/invocations",
        &json!({"messages": [{"role": "user", "content": "Hello!"}]}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        gw.get("/readyz").1,
        json!({"status": "ok", "configGeneration": 1, "lastReloadError": null})
    );
    let models: Vec<String> = gw.get("/v1/models").1["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    for name in [
        "chat",
        "completions",
        "embeddings",
        "mlflow-chat",
        "mlflow-embeddings",
    ] {
        assert!(
            models.iter().any(|m| m == name),
            "{name} not served: {models:?}"
        );
    }
    assert!(
        !gw.log().contains("route does not serve"),
        "every example serves: {}",
        gw.log()
    );
    assert_key(&sim, "sk-local-demo-key");
}

/// `--limits-store`: two `serve` processes on the same files share one limit through Redis.
#[test]
fn two_serve_processes_share_a_limit_through_redis() {
    let sim = support::sim();
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "routes.yaml",
        &[
            secret_manifest("default", "openai", "apiKey", "sk-1"),
            manifest_route(
                "chat",
                "llm/v1/chat",
                &sim.openai_base(),
                "openai",
                "  limits:\n    - renewalPeriod: minute\n      calls: 4\n",
            ),
        ]
        .join("---\n"),
    );
    let args = ["--limits-store", &redis.url(), "--replicas", "2"];
    let (a, b) = (
        Gateway::serve(&[&file], &args, &[]),
        Gateway::serve(&[&file], &args, &[]),
    );
    let statuses: Vec<u16> = (0..6)
        .map(|i| if i % 2 == 0 { &a } else { &b }.chat("chat").0)
        .collect();
    assert_eq!(statuses, [200, 200, 200, 200, 429, 429], "{}", a.log());
}

/// ServiceAccount tokens are accepted only when `--kubeconfig` names a cluster to review them;
/// nothing else of the cluster is used (the Routes still come from the files).
#[test]
fn service_account_tokens_only_with_a_kubeconfig() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("serve-sa");
    cp.ok(&["create", "serviceaccount", "notebook", "-n", &ns]);
    let token = cp
        .ok(&[
            "create",
            "token",
            "notebook",
            "-n",
            &ns,
            "--audience",
            "portcullis",
            "--duration",
            "10m",
        ])
        .trim()
        .to_string();
    let sim = support::sim();
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "routes.yaml",
        &[
            secret_manifest("default", "openai", "apiKey", "sk-1"),
            manifest_route(
                "chat",
                "llm/v1/chat",
                &sim.openai_base(),
                "openai",
                &format!("  access:\n    - serviceAccount: {ns}/notebook\n"),
            ),
        ]
        .join("---\n"),
    );
    let body =
        json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}).to_string();
    let call = |gw: &Gateway| {
        let bearer = format!("Bearer {token}");
        http_request(
            "POST",
            &gw.url("/v1/chat/completions"),
            Some(&body),
            &[
                ("content-type", "application/json"),
                ("authorization", &bearer),
            ],
        )
        .0
    };
    let kubeconfig = cp.kubeconfig();
    let with = Gateway::serve(&[&file], &["--kubeconfig", path_str(&kubeconfig)], &[]);
    assert_eq!(call(&with), 200, "{}", with.log());
    // Without a cluster to review it the token cannot be accepted: a 401 that says so (a JWT
    // never counts as no credential).
    let without = Gateway::serve(&[&file], &[], &[]);
    assert_eq!(call(&without), 401);
    assert!(!with.log().contains(&token) && !without.log().contains(&token));
}

/// An MLflow config edited to hold a setting Portcullis cannot honour: the last good version keeps
/// serving, /readyz names the setting, and the fixed file applies.
#[test]
fn an_mlflow_config_edit_with_an_unsupported_key_keeps_the_last_good_version() {
    let sim = support::sim();
    let dir = tempfile::tempdir().unwrap();
    let config = |extra: &str| {
        format!(
            "endpoints:\n  - name: chat\n    endpoint_type: llm/v1/chat\n    model:\n      provider: openai\n      name: gpt-4o-mini\n      config:\n        openai_api_key: $PORTCULLIS_TEST_KEY\n        openai_api_base: {}\n{extra}",
            sim.openai_base()
        )
    };
    let file = write(dir.path(), "gateway.yaml", &config(""));
    let gw = Gateway::serve(&[&file], &[], &[("PORTCULLIS_TEST_KEY", "sk-1")]);
    std::fs::write(&file, config("        openai_proxy: http://proxy:3128\n")).unwrap();
    within_a_second("an unsupported key", &gw, || {
        gw.get("/readyz").1["lastReloadError"]
            .as_str()
            .is_some_and(|e| e.contains("endpoints[0].model.config.openai_proxy: not supported"))
    });
    assert_eq!(gw.chat("chat").0, 200);
    std::fs::write(
        &file,
        config("    limit: {renewal_period: minute, calls: 1}\n"),
    )
    .unwrap();
    within_a_second("the fixed config", &gw, || {
        gw.get("/api/2.0/endpoints/chat").1["limit"]["calls"] == 1
    });
    assert_eq!(gw.get("/readyz").1["lastReloadError"], Value::Null);
}

/// `mlflow gateway start --config-path FILE --host H --port P` works with `portcullis serve`.
#[test]
fn mlflow_gateway_start_flags_are_accepted() {
    let sim = support::sim();
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "config.yaml",
        &format!(
            "routes:\n  - name: chat\n    route_type: llm/v1/chat\n    model: {{provider: openai, name: gpt-4o-mini, config: {{openai_api_key: sk-literal, openai_api_base: \"{}\"}}}}\n",
            sim.openai_base()
        ),
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gw = Gateway::serve(
        &[],
        &[
            "--config-path",
            path_str(&file),
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
        ],
        &[],
    );
    assert_eq!(gw.addr, format!("127.0.0.1:{port}"));
    assert_eq!(gw.get("/health").1, json!({"status": "OK"}));
    assert_eq!(gw.chat("chat").0, 200);
    assert_key(&sim, "sk-literal");
}
