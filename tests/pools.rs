//! Self-hosted model pools end to end: simulated vLLM-like model servers on their own loopback
//! addresses, each a Pod (IP and Ready set through the status subresource) selected by an
//! InferencePool of the Inference Extension's CRD, or listed in a Service's EndpointSlice, on the
//! real API server; and which server each call of the gateway reached.
#![allow(clippy::expect_used, clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use portcullis::api::{ModelSpec, PoolRef, Provider, RouteSpec, RouteType, Saturation, ServiceRef};
use portcullis_sim::{ModelServer, ModelServerConfig};
use serde_json::{Value, json};
use support::*;

/// A pool of model servers, each with its Pod.
struct Pool {
    servers: Vec<Arc<ModelServer>>,
    pods: Vec<String>,
    port: u16,
}

impl Pool {
    fn served(&self) -> Vec<usize> {
        self.servers.iter().map(|s| s.served()).collect()
    }
}

/// Starts one server per config on addresses of its own, all on one port (the pool's target
/// port, as pods share one), and, when `app` is given, a Ready Pod labelled `app` for each.
fn start_servers(
    cp: &ControlPlane,
    ns: &str,
    app: Option<&str>,
    configs: Vec<ModelServerConfig>,
) -> Pool {
    let ips = loopback_ips(configs.len());
    let mut servers = Vec::new();
    let mut port = 0;
    for (ip, config) in ips.iter().zip(configs) {
        let addr = SocketAddr::new((*ip).into(), port);
        let server = runtime()
            .block_on(ModelServer::start(addr, config))
            .expect("start a model server");
        port = server.addr.port();
        servers.push(Arc::new(server));
    }
    let pods: Vec<String> = (0..servers.len()).map(|i| format!("vllm-{i}")).collect();
    let ips: Vec<String> = ips.iter().map(ToString::to_string).collect();
    if let Some(app) = app {
        for (pod, ip) in pods.iter().zip(&ips) {
            model_server_pod(cp, ns, pod, ip, &json!({"app": app}));
        }
    }
    Pool {
        servers,
        pods,
        port,
    }
}

fn inference_pool(cp: &ControlPlane, ns: &str, name: &str, port: u16) {
    cp.apply(
        &json!({
            "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"matchLabels": {"app": name}}, "targetPorts": [{"number": port}]},
        })
        .to_string(),
    );
}

fn pool_model(name: &str, pool: &str) -> ModelSpec {
    ModelSpec {
        provider: Provider::OpenaiCompatible,
        name: name.into(),
        api_base: None,
        secret_ref: None,
        config: Default::default(),
        inference_pool: Some(PoolRef {
            name: pool.into(),
            namespace: None,
        }),
        service: None,
        saturation: None,
    }
}

fn configs(n: usize, config: ModelServerConfig) -> Vec<ModelServerConfig> {
    vec![config; n]
}

/// A namespace with the CRD, a gateway, and a pool of `n` servers behind a Route `chat`.
struct Fixture<'a> {
    cp: &'a ControlPlane,
    ns: String,
    gw: Gateway,
    pool: Pool,
}

fn fixture(
    prefix: &str,
    servers: Vec<ModelServerConfig>,
    spec: impl FnOnce(ModelSpec) -> RouteSpec,
) -> Fixture<'static> {
    fixture_on(ControlPlane::shared(), prefix, servers, spec)
}

fn fixture_on<'a>(
    cp: &'a ControlPlane,
    prefix: &str,
    servers: Vec<ModelServerConfig>,
    spec: impl FnOnce(ModelSpec) -> RouteSpec,
) -> Fixture<'a> {
    install_inference_pool_crd(cp);
    let ns = cp.namespace(prefix);
    let pool = start_servers(cp, &ns, Some("llama"), servers);
    inference_pool(cp, &ns, "llama", pool.port);
    let gw = Gateway::start(cp, &["--namespace", &ns, "--pool-scrape-interval-ms", "50"]);
    cp.apply(&route_yaml(&ns, "chat", spec(pool_model("llama", "llama"))));
    cp.wait_ready(&ns, "chat");
    let f = Fixture { cp, ns, gw, pool };
    f.wait_endpoints("chat", f.pool.servers.len());
    // Figures from a few scrapes.
    eventually(Duration::from_secs(10), || {
        f.pool.servers.iter().all(|s| s.scrapes() >= 2)
    })
    .expect("every endpoint scraped");
    f
}

impl Fixture<'_> {
    /// Waits for status.backends[0].readyEndpoints == n.
    fn wait_endpoints(&self, route: &str, n: usize) {
        let found = eventually(Duration::from_secs(15), || {
            self.cp
                .json(&["get", "route", route, "-n", &self.ns, "-o", "json"])["status"]["backends"]
                [0]["readyEndpoints"]
                == json!(n)
        });
        assert!(
            found.is_ok(),
            "route {route} never showed {n} ready endpoints: {}\n{}",
            self.cp
                .json(&["get", "route", route, "-n", &self.ns, "-o", "json"])["status"],
            self.gw.log()
        );
    }

    /// One call: status, the endpoint (pod) that answered, and the body.
    fn call(&self, route: &str, body: Value) -> (u16, Option<String>, String) {
        let mut body = body;
        body["model"] = json!(route);
        let (status, headers, text) = post_full(&self.gw.url("/v1/chat/completions"), &body);
        (
            status,
            header(&headers, "x-portcullis-endpoint").map(str::to_string),
            text,
        )
    }

    fn chat(&self, text: &str) -> (u16, Option<String>, String) {
        self.call(
            "chat",
            json!({"messages": [{"role": "user", "content": text}]}),
        )
    }
}

/// Sends `n` requests straight to a server (not through the gateway), to load it.
fn load_directly(server: &ModelServer, model: &str, n: usize) {
    let url = format!("http://{}/v1/chat/completions", server.addr);
    for _ in 0..n {
        let url = url.clone();
        let body =
            json!({"model": model, "messages": [{"role": "user", "content": "busy"}]}).to_string();
        std::thread::spawn(move || {
            let _ = reqwest::blocking::Client::new()
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .timeout(Duration::from_secs(60))
                .send();
        });
    }
}

fn quick(service_ms: u64) -> ModelServerConfig {
    ModelServerConfig {
        service_time: Duration::from_millis(service_ms),
        ..Default::default()
    }
}

#[test]
fn under_skewed_load_the_next_calls_go_to_the_least_loaded_endpoint() {
    let servers = configs(
        3,
        ModelServerConfig {
            max_running: 2,
            ..quick(20)
        },
    );
    let f = fixture("pool-skew", servers, |m| RouteSpec::new(RouteType::Chat, m));
    // Two of three servers busy for a while: 2 running and 3 waiting each.
    for s in &f.pool.servers[..2] {
        s.set_service_time(Duration::from_secs(4));
        load_directly(s, "llama", 5);
    }
    eventually(Duration::from_secs(5), || {
        f.pool.servers[..2].iter().all(|s| s.waiting() >= 3)
    })
    .expect("load in place");
    f.pool.servers[2].set_service_time(Duration::from_millis(20));
    // Let a scrape see it.
    std::thread::sleep(Duration::from_millis(300));
    let before = f.pool.servers[2].served();
    for i in 0..8 {
        let (status, endpoint, body) = f.chat(&format!("question {i}"));
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            endpoint.as_deref(),
            Some(f.pool.pods[2].as_str()),
            "call {i} went to a loaded endpoint"
        );
    }
    assert_eq!(f.pool.servers[2].served() - before, 8);
    // One scrape per endpoint per interval (50 ms here), however many calls there are.
    let scrapes = f.pool.servers[2].scrapes();
    let window = Instant::now();
    for i in 0..20 {
        assert_eq!(f.chat(&format!("more {i}")).0, 200);
    }
    let allowed = window.elapsed().as_millis() as usize / 50 + 2;
    assert!(
        f.pool.servers[2].scrapes() - scrapes <= allowed,
        "{} scrapes in {:?}",
        f.pool.servers[2].scrapes() - scrapes,
        window.elapsed()
    );
    let metrics = f.gw.metrics();
    assert!(
        metrics.contains("portcullis_pool_picks_total{pool=\"inferencepool/"),
        "{metrics}"
    );
    assert!(metrics.contains("portcullis_pool_queue{"), "{metrics}");
}

#[test]
fn calls_sharing_a_long_prompt_prefix_stick_to_one_endpoint() {
    let f = fixture("pool-prefix", configs(3, quick(10)), |m| {
        RouteSpec::new(RouteType::Chat, m)
    });
    let system =
        "You are the support assistant of a large shop. Answer with care, cite the policy. "
            .repeat(30);
    let mut endpoints = Vec::new();
    for i in 0..8 {
        let (status, endpoint, body) = f.call(
            "chat",
            json!({"messages": [{"role": "system", "content": system}, {"role": "user", "content": format!("question number {i}")}]}),
        );
        assert_eq!(status, 200, "{body}");
        endpoints.push(endpoint.unwrap());
    }
    assert!(
        endpoints.iter().all(|e| *e == endpoints[0]),
        "{endpoints:?}"
    );
    // Short, unrelated prompts are spread over the pool.
    let mut spread = std::collections::HashSet::new();
    for i in 0..30 {
        spread.insert(f.chat(&format!("hi {i}")).1.unwrap());
    }
    assert!(spread.len() >= 2, "{spread:?}");
}

#[test]
fn a_lora_call_goes_where_its_adapter_is_loaded() {
    let mut servers = configs(3, quick(10));
    servers[1].adapters = vec!["sql-lora".into()];
    let f = fixture("pool-lora", servers, |m| RouteSpec::new(RouteType::Chat, m));
    f.cp.apply(&route_yaml(
        &f.ns,
        "sql",
        RouteSpec::new(RouteType::Chat, pool_model("sql-lora", "llama")),
    ));
    f.cp.wait_ready(&f.ns, "sql");
    for i in 0..8 {
        let (status, endpoint, body) = f.call(
            "sql",
            json!({"messages": [{"role": "user", "content": format!("select {i}")}]}),
        );
        assert_eq!(
            status,
            200,
            "{body}\n{}\n{}",
            f.gw.metrics(),
            http_blocking(
                "GET",
                &format!("http://{}/metrics", f.pool.servers[1].addr),
                None
            )
            .1
        );
        assert_eq!(endpoint.as_deref(), Some(f.pool.pods[1].as_str()));
    }
    let sent = f.pool.servers[1].requests();
    assert!(
        sent.iter()
            .filter(|r| r.json()["model"] == "sql-lora")
            .count()
            >= 8
    );
}

#[test]
fn a_pod_deleted_mid_run_loses_no_call() {
    let f = fixture("pool-delete", configs(3, quick(30)), |m| {
        RouteSpec::new(RouteType::Chat, m)
    });
    let stop = Instant::now() + Duration::from_secs(4);
    let results = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..6)
        .map(|w| {
            let url = f.gw.url("/v1/chat/completions");
            let results = results.clone();
            std::thread::spawn(move || {
                let mut i = 0;
                while Instant::now() < stop {
                    let stream = (w + i) % 2 == 0;
                    let body = json!({"model": "chat", "stream": stream, "messages": [{"role": "user", "content": format!("w{w} call {i}")}]});
                    let (status, _, text) = post_full(&url, &body);
                    let complete = !stream || text.contains("[DONE]") && !text.contains("\"error\"");
                    results.lock().push((status, complete, text));
                    i += 1;
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    // The pod goes: its object first (as the kubelet's graceful stop), then the server.
    f.cp.ok(&[
        "delete",
        "pod",
        &f.pool.pods[0],
        "-n",
        &f.ns,
        "--grace-period=0",
        "--force",
    ]);
    std::thread::sleep(Duration::from_millis(300));
    f.pool.servers[0].kill();
    let served_at_kill = f.pool.servers[0].served();
    for w in workers {
        w.join().unwrap();
    }
    let results = results.lock();
    assert!(results.len() > 30, "{}", results.len());
    for (status, complete, text) in results.iter() {
        assert!(
            *status == 200 && *complete,
            "a call was lost: {status} {text}\n{}",
            f.gw.log()
        );
    }
    assert_eq!(f.pool.servers[0].served(), served_at_kill);
    f.wait_endpoints("chat", 2);
}

#[test]
fn when_every_endpoint_is_saturated_the_hosted_priority_1_backend_answers() {
    let hosted = sim();
    let cp = ControlPlane::shared();
    let slow = ModelServerConfig {
        max_running: 1,
        service_time: Duration::from_secs(5),
        ..Default::default()
    };
    let f = fixture("pool-spill", configs(2, slow), |m| {
        let mut pool = m;
        pool.saturation = Some(Saturation { queue_depth: 1 });
        let mut spec = RouteSpec::new(RouteType::Chat, pool.clone());
        spec.model = None;
        spec.backends = vec![
            backend(pool, 1, 0),
            backend(
                model(
                    Provider::Openai,
                    "gpt-4o-mini",
                    &hosted.openai_base(),
                    "hosted-key",
                ),
                1,
                1,
            ),
        ];
        spec
    });
    cp.apply(&secret_manifest(&f.ns, "hosted-key", "apiKey", "sk-hosted"));
    f.cp.wait_ready(&f.ns, "chat");
    // Idle pool: the pool answers.
    let (status, headers, body) = post_full(
        &f.gw.url("/v1/chat/completions"),
        &json!({"model": "chat", "messages": [{"role": "user", "content": "x"}]}),
    );
    let _ = (status, body);
    assert_eq!(
        header(&headers, "x-portcullis-backend"),
        Some(format!("inferencepool/{}/llama", f.ns).as_str())
    );
    // 1 running and 2 waiting on each: above a queue depth of 1.
    for s in &f.pool.servers {
        load_directly(s, "llama", 3);
    }
    eventually(Duration::from_secs(5), || {
        f.pool.servers.iter().all(|s| s.waiting() >= 2)
    })
    .expect("saturated");
    std::thread::sleep(Duration::from_millis(300));
    let served: Vec<usize> = f.pool.served();
    let started = Instant::now();
    let (status, headers, body) = post_full(
        &f.gw.url("/v1/chat/completions"),
        &json!({"model": "chat", "messages": [{"role": "user", "content": "burst"}]}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        header(&headers, "x-portcullis-backend"),
        Some("openai/gpt-4o-mini")
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the call waited for the pool"
    );
    assert_eq!(f.pool.served(), served, "the saturated pool got the call");
    assert!(
        hosted
            .requests()
            .iter()
            .any(|r| String::from_utf8_lossy(&r.body).contains("burst"))
    );
    assert!(metric_sum(&f.gw.metrics(), "portcullis_pool_spillovers_total") >= 1.0);
}

/// The API server refuses loopback addresses in EndpointSlices (and these tests may send traffic
/// to loopback only), so a Service backend's endpoints are documentation addresses (TEST-NET-1)
/// that no call is sent to: this checks the endpoint set the slices give, through status; the
/// data path after the pick is the InferencePool tests'.
#[test]
fn a_service_backend_follows_its_ready_endpoint_slice_addresses() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("pool-svc");
    let port = 8000;
    cp.apply(
        &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "vllm", "namespace": ns},
                "spec": {"ports": [{"port": 80, "targetPort": port}]}})
        .to_string(),
    );
    cp.apply(&endpoint_slice(
        &ns,
        "vllm",
        port,
        &[
            ("192.0.2.1", "vllm-0", true),
            ("192.0.2.2", "vllm-1", true),
            ("192.0.2.3", "vllm-2", false),
        ],
    ));
    let _gw = Gateway::start(cp, &["--namespace", &ns]);
    let mut m = pool_model("llama", "unused");
    m.inference_pool = None;
    m.service = Some(ServiceRef {
        name: "vllm".into(),
        port,
    });
    cp.apply(&route_yaml(&ns, "svc", RouteSpec::new(RouteType::Chat, m)));
    cp.wait_ready(&ns, "svc");
    let backend = || {
        cp.json(&["get", "route", "svc", "-n", &ns, "-o", "json"])["status"]["backends"][0].clone()
    };
    eventually(Duration::from_secs(15), || {
        backend()["readyEndpoints"] == json!(2)
    })
    .unwrap_or_else(|_| panic!("two ready endpoints: {}", backend()));
    assert_eq!(
        backend()["pool"],
        json!(format!("service/{ns}/vllm:{port}"))
    );
    // A slice on another port, or of another Service, adds nothing; vllm-1 turning not ready
    // leaves one.
    cp.apply(&endpoint_slice(
        &ns,
        "other",
        port,
        &[("192.0.2.9", "x", true)],
    ));
    cp.apply(&endpoint_slice(
        &ns,
        "vllm",
        port,
        &[
            ("192.0.2.1", "vllm-0", true),
            ("192.0.2.2", "vllm-1", false),
        ],
    ));
    eventually(Duration::from_secs(15), || {
        backend()["readyEndpoints"] == json!(1)
    })
    .unwrap_or_else(|_| panic!("one ready endpoint: {}", backend()));
}

#[test]
fn the_openai_and_anthropic_sdks_call_a_pool_backed_route() {
    let f = fixture("pool-sdk", configs(2, quick(10)), |m| {
        RouteSpec::new(RouteType::Chat, m)
    });
    let (passed, _) = pytest(
        "mlflow3",
        "pools",
        &format!("http://{}", f.gw.addr),
        &json!({"chat": "chat"}),
    );
    assert!(passed, "pytest pools failed; gateway log:\n{}", f.gw.log());
    assert!(
        f.pool.served().iter().sum::<usize>() >= 4,
        "{:?}",
        f.pool.served()
    );
}

#[test]
fn the_last_endpoints_serve_while_the_api_server_is_away() {
    let cp = ControlPlane::start_private();
    let f = fixture_on(&cp, "pool-away", configs(2, quick(10)), |m| {
        RouteSpec::new(RouteType::Chat, m)
    });
    cp.stop_apiserver();
    let mut seen = std::collections::HashSet::new();
    for i in 0..20 {
        let (status, endpoint, body) = f.chat(&format!("while away {i}"));
        assert_eq!(status, 200, "{body}");
        seen.insert(endpoint.unwrap());
    }
    assert_eq!(seen.len(), 2, "both endpoints kept serving: {seen:?}");
    cp.start_apiserver();
    // Changes made after it came back are followed again.
    cp.ok(&[
        "delete",
        "pod",
        "vllm-1",
        "-n",
        &f.ns,
        "--grace-period=0",
        "--force",
    ]);
    f.wait_endpoints("chat", 1);
    for i in 0..5 {
        let (status, endpoint, _) = f.chat(&format!("after {i}"));
        assert_eq!((status, endpoint.as_deref()), (200, Some("vllm-0")));
    }
}

/// The Inference Extension's own endpoint picker process, killed on drop.
struct Picker(std::process::Child);

impl Drop for Picker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The Inference Extension's own endpoint picker (its module's `cmd/lwepp`, built by
/// hack/tools.sh: round robin over the pool's Ready pods, over Envoy's ext_proc) picks the
/// endpoints the gateway calls; when it is gone, `FailClose` sends the calls to the Route's next
/// priority and `FailOpen` lets the gateway pick.
#[test]
fn the_inference_extensions_endpoint_picker_chooses_and_its_failure_mode_holds() {
    let hosted = sim();
    let cp = ControlPlane::shared();
    install_inference_pool_crd(cp);
    let ns = cp.namespace("pool-epp");
    let pool = start_servers(cp, &ns, Some("llama"), configs(3, quick(10)));
    let (grpc, health, metrics) = (free_port(), free_port(), free_port());
    let log = std::fs::File::create(std::env::temp_dir().join(format!("lwepp-{ns}.log"))).unwrap();
    let mut picker = Picker(
        std::process::Command::new(tool("lwepp"))
            .args([
                "--pool-name=llama",
                &format!("--pool-namespace={ns}"),
                &format!("--grpc-port={grpc}"),
                &format!("--grpc-health-port={health}"),
                &format!("--metrics-port={metrics}"),
            ])
            .env("KUBECONFIG", cp.kubeconfig())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start lwepp"),
    );
    // As in a cluster: the picker is a Pod behind a Service the InferencePool names.
    model_server_pod(cp, &ns, "epp", "127.0.0.1", &json!({"app": "epp"}));
    cp.apply(
        &json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "epp", "namespace": ns},
                "spec": {"selector": {"app": "epp"}, "ports": [{"port": 9002, "targetPort": grpc}]}})
        .to_string(),
    );
    let port = pool.port;
    let pool_object = |mode: &str| {
        json!({
            "apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
            "metadata": {"name": "llama", "namespace": ns},
            "spec": {"selector": {"matchLabels": {"app": "llama"}}, "targetPorts": [{"number": port}],
                     "endpointPickerRef": {"name": "epp", "port": {"number": 9002}, "failureMode": mode}},
        })
        .to_string()
    };
    cp.apply(&pool_object("FailClose"));
    cp.apply(&secret_manifest(&ns, "hosted-key", "apiKey", "sk-hosted"));
    let gw = Gateway::start(cp, &["--namespace", &ns, "--pool-scrape-interval-ms", "50"]);
    let mut spec = RouteSpec::new(RouteType::Chat, pool_model("llama", "llama"));
    spec.backends = vec![
        backend(spec.model.take().unwrap(), 1, 0),
        backend(
            model(
                Provider::Openai,
                "gpt-4o-mini",
                &hosted.openai_base(),
                "hosted-key",
            ),
            1,
            1,
        ),
    ];
    cp.apply(&route_yaml(&ns, "chat", spec));
    cp.wait_ready(&ns, "chat");
    let f = Fixture {
        cp,
        ns: ns.clone(),
        gw,
        pool,
    };
    f.wait_endpoints("chat", 3);
    let system = "You are the support assistant of a large shop. Answer with care. ".repeat(30);
    let call = |i: usize| {
        let body = json!({"model": "chat", "stream": i % 2 == 1, "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": format!("question {i}")}]});
        let (status, headers, text) = post_full(&f.gw.url("/v1/chat/completions"), &body);
        assert_eq!(status, 200, "{text}");
        (
            header(&headers, "x-portcullis-backend")
                .unwrap()
                .to_string(),
            header(&headers, "x-portcullis-endpoint").map(str::to_string),
        )
    };
    // The picker answers once it has listed the pool's pods.
    eventually(Duration::from_secs(30), || {
        call(0).0.starts_with("inferencepool/")
    })
    .unwrap_or_else(|_| panic!("the picker never chose: {}", f.gw.log()));
    let mut counts = std::collections::HashMap::new();
    for i in 0..9 {
        let (backend, endpoint) = call(i);
        assert_eq!(backend, format!("inferencepool/{ns}/llama"));
        *counts.entry(endpoint.unwrap()).or_insert(0) += 1;
    }
    // Round robin over the pool's pods, whatever the shared prefix (the gateway's own choice
    // sticks to one endpoint, as the FailOpen part below shows).
    assert_eq!(counts.len(), 3, "{counts:?}");
    let picker_status = || {
        f.cp.json(&["get", "route", "chat", "-n", &f.ns, "-o", "json"])["status"]["backends"][0]["endpointPicker"]
            .clone()
    };
    eventually(Duration::from_secs(10), || {
        picker_status() == json!("Reachable")
    })
    .unwrap_or_else(|_| panic!("{}", picker_status()));
    let metrics_text = f.gw.metrics();
    assert!(
        metrics_text.contains("portcullis_pool_epp_duration_seconds_count"),
        "{metrics_text}"
    );

    // FailClose: the picker gone, the pool takes nothing; the hosted backend answers.
    let _ = picker.0.kill();
    let _ = picker.0.wait();
    let served = f.pool.served();
    for i in 0..4 {
        assert_eq!(call(i).0, "openai/gpt-4o-mini");
    }
    assert_eq!(f.pool.served(), served);
    eventually(Duration::from_secs(10), || {
        picker_status() == json!("Unreachable")
    })
    .unwrap_or_else(|_| panic!("{}", picker_status()));
    assert!(metric_sum(&f.gw.metrics(), "portcullis_pool_epp_errors_total") >= 1.0);

    // FailOpen: the gateway picks; the shared prefix now sticks to one endpoint.
    f.cp.apply(&pool_object("FailOpen"));
    eventually(Duration::from_secs(15), || {
        call(0).0.starts_with("inferencepool/")
    })
    .expect("FailOpen never let the pool answer");
    let endpoints: std::collections::HashSet<_> = (0..6).map(|i| call(i).1.unwrap()).collect();
    assert_eq!(endpoints.len(), 1, "{endpoints:?}");
}

#[test]
fn bad_pool_backends_are_refused_by_the_api_server() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("pool-cel");
    let mut both = pool_model("llama", "llama");
    both.api_base = Some("http://127.0.0.1:1/v1".into());
    let out = cp.kubectl_stdin(
        &["apply", "-f", "-"],
        &route_yaml(&ns, "both", RouteSpec::new(RouteType::Chat, both)),
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("set at most one of apiBase, inferencePool and service")
    );
    let mut saturation = model(
        Provider::Openai,
        "gpt-4o-mini",
        "http://127.0.0.1:1/v1",
        "k",
    );
    saturation.saturation = Some(Saturation { queue_depth: 3 });
    let out = cp.kubectl_stdin(
        &["apply", "-f", "-"],
        &route_yaml(&ns, "sat", RouteSpec::new(RouteType::Chat, saturation)),
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("saturation applies to inferencePool and service backends")
    );
}

#[test]
fn the_vendored_inference_pool_crd_is_the_pinned_upstream_version() {
    let crd = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/third_party/gateway-api-inference-extension/inferencepools.yaml"
    ))
    .unwrap();
    assert!(crd.contains("inference.networking.k8s.io/bundle-version: v1.6.2"));
    assert!(crd.contains("name: inferencepools.inference.networking.k8s.io"));
}
