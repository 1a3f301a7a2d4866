//! The three API surfaces end to end: the real MLflow 2.5, MLflow 3 and OpenAI Python clients
//! (pytest in the venvs of `hack/python-env.sh`), a bad-input table across every surface, upstream
//! failures, and streaming (chunk by chunk, `[DONE]` or not, cancellation on disconnect).
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers of tests: failing loudly is the point

mod support;

use std::io::Read;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use portcullis_sim::Behaviour;
use serde_json::{Value, json};
use support::*;

/// One gateway with every route the tests here use, shared by all of them.
struct Fixture {
    gw: Gateway,
    /// Chat, completions, embeddings and the paging filler.
    sim: SimProvider,
    /// Streams slowly: one word every 100 ms.
    slow: SimProvider,
    /// Faults are set on this one by `upstream_failures_keep_their_meaning_on_every_surface` only.
    faulty: SimProvider,
    /// Always answers 429 with `Retry-After: 7`.
    _limited: SimProvider,
    chat: String,
    completions: String,
    embeddings: String,
    limited: String,
    slow_chat: String,
    faulty_chat: String,
    dead: String,
    /// The gateway's own limit: one call per second.
    throttled: String,
    /// Two backends, the first unreachable.
    resilient: String,
    /// A USD budget already spent: every call is refused with the budget message.
    broke: String,
    all: Vec<String>,
}

const PAGE_SIZE: usize = 3;
const BODY_LIMIT: usize = 16 * 1024;

fn route(ns: &str, name: &str, route_type: &str, api_base: &str, limits: &str) -> String {
    format!(
        "apiVersion: portcullis.dev/v1alpha1\nkind: Route\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  routeType: {route_type}\n  model:\n    provider: openai\n    name: gpt-4o-mini\n    apiBase: {api_base}\n    secretRef:\n      name: openai\n{limits}"
    )
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let cp = ControlPlane::shared();
        let (sim, slow, faulty, limited_sim) = (sim(), support::sim(), support::sim(), support::sim());
        limited_sim.set_fault(Fault::Status {
            status: 429,
            body: json!({"error": {"message": "Rate limit reached for gpt-4o-mini", "type": "requests", "code": "rate_limit_exceeded"}}).to_string(),
            retry_after: Some(7),
        });
        slow.set_behaviour(Behaviour {
            chunk_delay: Duration::from_millis(100),
            answer_words: 40,
            ..Default::default()
        });
        let ns = cp.namespace("clients");
        let gw = Gateway::start(
            cp,
            &[
                "--namespace",
                &ns,
                "--page-size",
                &PAGE_SIZE.to_string(),
                "--body-limit",
                &BODY_LIMIT.to_string(),
                "--upstream-timeout",
                "2",
            ],
        );
        let name = |p: &str| unique(p);
        let (chat, completions, embeddings) = (name("chat"), name("completions"), name("emb"));
        let (limited, slow_chat, faulty_chat, dead) =
            (name("limited"), name("slow"), name("faulty"), name("dead"));
        let throttled = name("throttled");
        let resilient = name("resilient");
        let broke = name("broke");
        let calls_limit =
            // Room for many calls at once: a call without max_tokens holds gpt-4o-mini's output
            // maximum (16,384 tokens) until it settles.
            "  limits:\n    - renewalPeriod: day\n      tokens: 500000\n    - renewalPeriod: minute\n      calls: 100\n";
        let mut docs = vec![
            secret_manifest(&ns, "openai", "apiKey", "sk-clients"),
            route(&ns, &chat, "llm/v1/chat", &sim.openai_base(), calls_limit),
            route(&ns, &completions, "llm/v1/completions", &sim.openai_base(), ""),
            route(&ns, &embeddings, "llm/v1/embeddings", &sim.openai_base(), ""),
            route(&ns, &limited, "llm/v1/chat", &limited_sim.openai_base(), ""),
            route(&ns, &slow_chat, "llm/v1/chat", &slow.openai_base(), ""),
            route(&ns, &faulty_chat, "llm/v1/chat", &faulty.openai_base(), ""),
            // Nothing listens on port 9 of loopback.
            route(&ns, &dead, "llm/v1/chat", "http://127.0.0.1:9/v1", ""),
            route(
                &ns,
                &throttled,
                "llm/v1/chat",
                &sim.openai_base(),
                "  limits:\n    - renewalPeriod: second\n      calls: 1\n",
            ),
            // One call at the catalog's gpt-4o-mini price ($0.0000123) spends more than the budget.
            route(
                &ns,
                &broke,
                "llm/v1/chat",
                &sim.openai_base(),
                "  limits:\n    - renewalPeriod: month\n      usd: 0.000001\n",
            ),
            // Its OpenAI backend refuses every connection: every call falls back to Anthropic.
            route_yaml(&ns, &resilient, {
                let mut spec = portcullis::api::RouteSpec::new(
                    portcullis::api::RouteType::Chat,
                    model(portcullis::api::Provider::Openai, "gpt-4o-mini", "http://127.0.0.1:9/v1", "openai"),
                );
                let primary = spec.model.take().expect("model");
                spec.backends = vec![
                    backend(primary, 1, 0),
                    backend(
                        model(portcullis::api::Provider::Anthropic, "claude-sonnet-4-5", &sim.anthropic_base(), "openai"),
                        1,
                        1,
                    ),
                ];
                spec
            }),
        ];
        let mut all = vec![
            chat.clone(),
            completions.clone(),
            embeddings.clone(),
            limited.clone(),
            slow_chat.clone(),
            faulty_chat.clone(),
            dead.clone(),
            throttled.clone(),
            resilient.clone(),
            broke.clone(),
        ];
        for _ in 0..2 {
            let filler = name("filler");
            docs.push(route(&ns, &filler, "llm/v1/chat", &sim.openai_base(), ""));
            all.push(filler);
        }
        cp.apply(&docs.join("---\n"));
        for r in &all {
            cp.wait_ready(&ns, r);
        }
        eventually(Duration::from_secs(10), || {
            gw.get("/v1/models").1["data"]
                .as_array()
                .is_some_and(|d| d.len() == all.len())
        })
        .expect("the gateway never served every route");
        // Spend the budget: the first call is admitted (its reservation is capped at the budget).
        assert_eq!(gw.chat(&broke).0, 200);
        eventually(Duration::from_secs(5), || gw.chat(&broke).0 == 429)
            .expect("the spent budget never refused");
        Fixture {
            gw,
            sim,
            slow,
            faulty,
            _limited: limited_sim,
            chat,
            completions,
            embeddings,
            limited,
            slow_chat,
            faulty_chat,
            dead,
            throttled,
            resilient,
            broke,
            all,
        }
    })
}

/// Runs pytest on `dir` (under tests/python) with the venv `venv`; fails with its output.
fn pytest(venv: &str, dir: &str) {
    let f = fixture();
    let routes = json!({
        "chat": f.chat, "completions": f.completions, "embeddings": f.embeddings,
        "limited": f.limited, "throttled": f.throttled, "resilient": f.resilient, "broke": f.broke, "all": f.all, "page_size": PAGE_SIZE,
    });
    let (passed, _) = support::pytest(venv, dir, &format!("http://{}", f.gw.addr), &routes);
    assert!(passed, "pytest {dir} failed; gateway log:\n{}", f.gw.log());
}

#[test]
fn mlflow_25_gateway_client() {
    pytest("mlflow25", "mlflow25");
    // What MLflow 2.5 sent upstream for the same call: temperature doubled, candidate_count as n.
    let f = fixture();
    let sent = f
        .sim
        .requests()
        .into_iter()
        .map(|r| r.json())
        .find(|b| b["messages"][0]["content"] == "temperature-check")
        .expect("the 2.5 chat query reached the provider");
    assert_eq!(sent["temperature"], 1.0, "{sent}");
    assert_eq!(sent["n"], 2, "{sent}");
    assert_eq!(sent["max_tokens"], 5, "{sent}");
    assert_eq!(sent["stop"], json!(["END"]), "{sent}");
    assert_eq!(sent["top_p"], 0.9, "{sent}");
    assert_eq!(sent["user"], "passed-through", "{sent}");
    assert!(sent.get("candidate_count").is_none(), "{sent}");
}

#[test]
fn mlflow_3_deployments_client_and_openai_sdk() {
    pytest("mlflow3", "mlflow3");
    // Deployments bodies are OpenAI's: no rescaling, extras passed through.
    let sent = fixture()
        .sim
        .requests()
        .into_iter()
        .map(|r| r.json())
        .find(|b| b["user"] == "deployments-extra")
        .expect("the deployments chat call reached the provider");
    assert_eq!(sent["temperature"], 0.7, "{sent}");
    assert_eq!(sent["n"], 2, "{sent}");
    assert_eq!(sent["model"], "gpt-4o-mini", "{sent}");
}

/// Status and body shape of one call.
fn call(method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> (u16, Value) {
    let f = fixture();
    let mut req = client().request(
        reqwest::Method::from_bytes(method.as_bytes()).unwrap(),
        f.gw.url(path),
    );
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    if !body.is_empty() {
        req = req.body(body.to_vec());
    }
    let resp = req.send().unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(json!({"raw": text})),
    )
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Shape {
    Mlflow,
    OpenAi,
}

fn assert_shape(shape: Shape, body: &Value, what: &str) {
    match shape {
        Shape::Mlflow => {
            let detail = body["detail"].as_str().unwrap_or_default();
            assert!(
                !detail.is_empty() && body.get("error").is_none(),
                "{what}: want {{\"detail\": ...}}, got {body}"
            );
        }
        Shape::OpenAi => {
            let message = body["error"]["message"].as_str().unwrap_or_default();
            assert!(
                !message.is_empty() && body["error"].get("code").is_some(),
                "{what}: want {{\"error\": {{...}}}}, got {body}"
            );
        }
    }
}

#[test]
fn bad_input_gets_a_clear_error_in_each_surface_dialect() {
    let f = fixture();
    let json_ct = Some("application/json");
    let msgs = json!([{"role": "user", "content": "hi"}]);
    // Per surface: where a route is called, the status of a schema violation (FastAPI's 422 on
    // MLflow's surfaces, OpenAI's 400), the sample-count field and the temperature ceiling.
    struct Surface {
        name: &'static str,
        shape: Shape,
        /// `/{prefix}/{route}/invocations`; `None`: `/v1/chat/completions` with the route as `model`.
        prefix: Option<&'static str>,
        schema: u16,
        n_field: &'static str,
        too_hot: f64,
    }
    impl Surface {
        fn path(&self, route: &str) -> String {
            match self.prefix {
                Some(p) => format!("/{p}/{route}/invocations"),
                None => "/v1/chat/completions".to_string(),
            }
        }
        fn body(&self, route: &str, mut body: Value) -> Value {
            if self.prefix.is_none() {
                body["model"] = json!(route);
            }
            body
        }
    }
    let surfaces = [
        Surface {
            name: "mlflow 2.5",
            shape: Shape::Mlflow,
            prefix: Some("gateway"),
            schema: 422,
            n_field: "candidate_count",
            too_hot: 1.5,
        },
        Surface {
            name: "deployments",
            shape: Shape::Mlflow,
            prefix: Some("endpoints"),
            schema: 422,
            n_field: "n",
            too_hot: 2.5,
        },
        Surface {
            name: "openai",
            shape: Shape::OpenAi,
            prefix: None,
            schema: 400,
            n_field: "n",
            too_hot: 2.5,
        },
    ];
    let mut checked = 0;
    for s in &surfaces {
        let chat_path = s.path(&f.chat);
        let with = |extra: Value| {
            let mut b = json!({"messages": msgs});
            if let (Some(o), Value::Object(e)) = (b.as_object_mut(), extra) {
                o.extend(e);
            }
            s.body(&f.chat, b)
        };
        let mut check = |what: &str, (status, body): (u16, Value), want: u16| {
            assert_eq!(status, want, "{} / {what}: {body}", s.name);
            assert_shape(s.shape, &body, &format!("{} / {what}", s.name));
            checked += 1;
        };
        let post =
            |path: &str, body: &Value| call("POST", path, json_ct, body.to_string().as_bytes());
        let big = "x".repeat(BODY_LIMIT + 1);

        let (status, body) = post(&chat_path, &with(json!({})));
        assert_eq!(status, 200, "{}: a good request must pass: {body}", s.name);
        let schema_violations = [
            (
                "missing messages",
                s.body(&f.chat, json!({"temperature": 0.5})),
            ),
            (
                "messages of the wrong type",
                s.body(&f.chat, json!({"messages": "hi"})),
            ),
            ("empty messages", s.body(&f.chat, json!({"messages": []}))),
            (
                "message without a role",
                s.body(&f.chat, json!({"messages": [{"content": "x"}]})),
            ),
            (
                "temperature too high",
                with(json!({"temperature": s.too_hot})),
            ),
            ("temperature below 0", with(json!({"temperature": -0.1}))),
            (
                "temperature as a string",
                with(json!({"temperature": "hot"})),
            ),
            ("zero samples", with(json!({s.n_field: 0}))),
            ("fractional samples", with(json!({s.n_field: 1.5}))),
            ("max_tokens 0", with(json!({"max_tokens": 0}))),
            ("max_tokens negative", with(json!({"max_tokens": -5}))),
            ("stop of the wrong type", with(json!({"stop": 3}))),
        ];
        for (what, body) in &schema_violations {
            check(what, post(&chat_path, body), s.schema);
        }
        check(
            "chat body to an embeddings route",
            post(
                &s.path(&f.embeddings),
                &s.body(&f.embeddings, json!({"messages": msgs})),
            ),
            400,
        );
        check(
            "unknown route",
            post(
                &s.path("no-such-route"),
                &s.body("no-such-route", json!({"messages": msgs})),
            ),
            404,
        );
        check("wrong method", call("GET", &chat_path, None, b""), 405);
        let raw_bodies: [(&str, Option<&str>, &[u8], u16); 6] = [
            ("not JSON", json_ct, b"{not json", 400),
            ("a JSON array", json_ct, b"[1, 2]", 400),
            ("empty body", json_ct, b"", 400),
            (
                "invalid UTF-8",
                json_ct,
                b"{\"messages\": \"\xff\xfe\"}",
                400,
            ),
            ("wrong content type", Some("text/plain"), b"hello", 415),
            (
                "form content type",
                Some("application/x-www-form-urlencoded"),
                b"a=b",
                415,
            ),
        ];
        for (what, content_type, body, want) in raw_bodies {
            check(what, call("POST", &chat_path, content_type, body), want);
        }
        check(
            "oversize body",
            post(&chat_path, &with(json!({"user": big}))),
            413,
        );
        if s.shape == Shape::Mlflow {
            check(
                "a model key on a per-route path",
                post(&chat_path, &with(json!({"model": "gpt-4"}))),
                422,
            );
        } else {
            check(
                "no model",
                post(&chat_path, &json!({"messages": msgs})),
                400,
            );
            check(
                "model of the wrong type",
                post(&chat_path, &json!({"model": 7, "messages": msgs})),
                400,
            );
        }
    }

    // Cases particular to one surface: shape, what, method, path, body (empty: none), status.
    let gw_chat = format!("/gateway/{}/invocations", f.chat);
    let dep = |r: &str| format!("/endpoints/{r}/invocations");
    let body = |v: Value| v.to_string();
    let (mlflow, openai) = (Shape::Mlflow, Shape::OpenAi);
    let cases: Vec<(Shape, &str, &str, String, String, u16)> = vec![
        (
            mlflow,
            "2.5: n instead of candidate_count",
            "POST",
            gw_chat.clone(),
            body(json!({"messages": msgs, "n": 2})),
            400,
        ),
        (
            mlflow,
            "2.5: stream",
            "POST",
            gw_chat.clone(),
            body(json!({"messages": msgs, "stream": true})),
            400,
        ),
        (
            mlflow,
            "2.5: candidate_count above 5",
            "POST",
            gw_chat.clone(),
            body(json!({"messages": msgs, "candidate_count": 6})),
            422,
        ),
        (
            mlflow,
            "2.5: embeddings text of the wrong type",
            "POST",
            format!("/gateway/{}/invocations", f.embeddings),
            body(json!({"text": [1, 2]})),
            422,
        ),
        (
            mlflow,
            "deployments: empty embeddings input",
            "POST",
            dep(&f.embeddings),
            body(json!({"input": []})),
            422,
        ),
        (
            mlflow,
            "deployments: prompt to a chat route",
            "POST",
            dep(&f.chat),
            body(json!({"prompt": "x"})),
            400,
        ),
        (
            mlflow,
            "unknown route on the 2.5 listing",
            "GET",
            "/api/2.0/gateway/routes/no-such-route".into(),
            String::new(),
            404,
        ),
        (
            mlflow,
            "unknown endpoint",
            "GET",
            "/api/2.0/endpoints/no-such-route".into(),
            String::new(),
            404,
        ),
        (
            mlflow,
            "a bad page token",
            "GET",
            "/api/2.0/gateway/routes/?page_token=zz".into(),
            String::new(),
            400,
        ),
        (
            mlflow,
            "a bad endpoints page token",
            "GET",
            "/api/2.0/endpoints/?page_token=abc".into(),
            String::new(),
            400,
        ),
        (
            mlflow,
            "POST on the route listing",
            "POST",
            "/api/2.0/gateway/routes/".into(),
            "{}".into(),
            405,
        ),
        (
            mlflow,
            "DELETE on a route",
            "DELETE",
            format!("/api/2.0/gateway/routes/{}", f.chat),
            String::new(),
            405,
        ),
        (
            mlflow,
            "unknown path under /api/2.0",
            "GET",
            "/api/2.0/gateway/limits/x".into(),
            String::new(),
            404,
        ),
        (
            mlflow,
            "unknown path under /gateway",
            "POST",
            "/gateway/x/y".into(),
            "{}".into(),
            404,
        ),
        (
            openai,
            "unknown path under /v1",
            "GET",
            "/v1/nothing".into(),
            String::new(),
            404,
        ),
        (
            openai,
            "wrong method on /v1",
            "GET",
            "/v1/embeddings".into(),
            String::new(),
            405,
        ),
        (
            openai,
            "/v1 completions: prompt of the wrong type",
            "POST",
            "/v1/completions".into(),
            body(json!({"model": f.completions, "prompt": 5})),
            400,
        ),
        (
            openai,
            "/v1 embeddings: input of the wrong type",
            "POST",
            "/v1/embeddings".into(),
            body(json!({"model": f.embeddings, "input": {"a": 1}})),
            400,
        ),
        (
            openai,
            "/v1 stream_options of the wrong type",
            "POST",
            "/v1/chat/completions".into(),
            body(json!({"model": f.chat, "messages": msgs, "stream": true, "stream_options": 1})),
            400,
        ),
    ];
    for (shape, what, method, path, body, want) in &cases {
        let content_type = (!body.is_empty()).then_some("application/json");
        let (status, got) = call(method, path, content_type, body.as_bytes());
        assert_eq!(status, *want, "{what}: {got}");
        assert_shape(*shape, &got, what);
    }
    eprintln!(
        "{checked} table rows and {} surface-specific cases checked",
        cases.len()
    );
}

/// A chat call to `route` on each surface, with the error shape it answers in.
fn chat_on_every_surface(route: &str) -> [(Shape, String, Value); 3] {
    let msgs = json!([{"role": "user", "content": "hi"}]);
    [
        (
            Shape::Mlflow,
            format!("/gateway/{route}/invocations"),
            json!({"messages": msgs}),
        ),
        (
            Shape::Mlflow,
            format!("/endpoints/{route}/invocations"),
            json!({"messages": msgs}),
        ),
        (
            Shape::OpenAi,
            "/v1/chat/completions".to_string(),
            json!({"model": route, "messages": msgs}),
        ),
    ]
}

fn error_message(shape: Shape, body: &Value) -> String {
    match shape {
        Shape::Mlflow => body["detail"].as_str(),
        Shape::OpenAi => body["error"]["message"].as_str(),
    }
    .unwrap_or_default()
    .to_string()
}

#[test]
fn upstream_failures_keep_their_meaning_on_every_surface() {
    let f = fixture();
    let post = |path: &str, body: &Value| {
        call(
            "POST",
            path,
            Some("application/json"),
            body.to_string().as_bytes(),
        )
    };
    for (shape, path, body) in &chat_on_every_surface(&f.faulty_chat) {
        f.faulty.set_fault(Fault::Status {
            status: 429,
            body: json!({"error": {"message": "Rate limit reached for gpt-4o-mini", "type": "requests"}}).to_string(),
            retry_after: Some(7),
        });
        let resp = client()
            .post(f.gw.url(path))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 429, "{path}");
        assert_eq!(resp.headers()["retry-after"], "7", "{path}");
        let b: Value = serde_json::from_str(&resp.text().unwrap()).unwrap();
        assert_shape(*shape, &b, path);
        assert!(
            error_message(*shape, &b).contains("Rate limit reached for gpt-4o-mini"),
            "{b}"
        );

        f.faulty.set_fault(Fault::Status {
            status: 400,
            body: json!({"error": {"message": "This model's maximum context length is 8 tokens", "type": "invalid_request_error"}}).to_string(),
            retry_after: None,
        });
        let (status, b) = post(path, body);
        assert_eq!(status, 400, "{path}: {b}");
        assert!(
            error_message(*shape, &b).contains("maximum context length"),
            "{b}"
        );

        f.faulty.set_fault(Fault::Malformed);
        let (status, b) = post(path, body);
        assert_eq!(status, 502, "{path}: {b}");
        assert!(error_message(*shape, &b).contains("malformed"), "{b}");

        f.faulty.set_fault(Fault::Delay(Duration::from_secs(3)));
        let (status, b) = post(path, body);
        assert_eq!(status, 504, "{path}: {b}");
        assert_shape(*shape, &b, path);
    }
    f.faulty.set_fault(Fault::None);
    for (shape, path, body) in &chat_on_every_surface(&f.dead) {
        let (status, b) = post(path, body);
        assert_eq!(status, 502, "{path}: {b}");
        assert_shape(*shape, &b, path);
        assert!(
            error_message(*shape, &b).contains("could not connect"),
            "{b}"
        );
    }
}

/// SSE `data:` payloads of a whole stream.
fn events(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

fn stream_text(events: &[String], chat: bool) -> String {
    events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| {
            let choice = c["choices"].get(0)?.clone();
            let text = if chat {
                &choice["delta"]["content"]
            } else {
                &choice["text"]
            };
            text.as_str().map(str::to_string)
        })
        .collect()
}

#[test]
fn deployments_streams_end_without_done_and_v1_streams_with_it() {
    let f = fixture();
    let answer = (1..=20)
        .map(|i| format!("word{i}"))
        .collect::<Vec<_>>()
        .join(" ");
    let msgs = json!([{"role": "user", "content": "hi"}]);
    for (path, body, chat, done) in [
        (
            format!("/endpoints/{}/invocations", f.chat),
            json!({"messages": msgs, "stream": true}),
            true,
            false,
        ),
        (
            format!("/endpoints/{}/invocations", f.completions),
            json!({"prompt": "hi", "stream": true}),
            false,
            false,
        ),
        (
            "/v1/chat/completions".to_string(),
            json!({"model": f.chat, "messages": msgs, "stream": true}),
            true,
            true,
        ),
        (
            "/v1/completions".to_string(),
            json!({"model": f.completions, "prompt": "hi", "stream": true}),
            false,
            true,
        ),
    ] {
        for include_usage in [false, true] {
            let mut body = body.clone();
            if include_usage {
                body["stream_options"] = json!({"include_usage": true});
            }
            let resp = client()
                .post(f.gw.url(&path))
                .header("content-type", "application/json")
                .body(body.to_string())
                .send()
                .unwrap();
            assert_eq!(resp.status().as_u16(), 200, "{path}");
            assert!(
                resp.headers()["content-type"]
                    .to_str()
                    .unwrap()
                    .starts_with("text/event-stream")
            );
            let text = resp.text().unwrap();
            let ev = events(&text);
            assert_eq!(
                ev.last().map(String::as_str) == Some("[DONE]"),
                done,
                "{path}: {text}"
            );
            assert_eq!(stream_text(&ev, chat), answer, "{path}: {text}");
            let usage: Vec<Value> = ev
                .iter()
                .filter_map(|e| serde_json::from_str::<Value>(e).ok())
                .filter(|c| c.get("usage").is_some_and(|u| !u.is_null()))
                .collect();
            assert_eq!(usage.len(), usize::from(include_usage), "{path}: {text}");
            if include_usage {
                assert_eq!(usage[0]["usage"]["completion_tokens"], 20);
                assert_eq!(usage[0]["choices"], json!([]));
            }
            let object = if chat {
                "chat.completion.chunk"
            } else {
                "text_completion"
            };
            let first: Value = serde_json::from_str(&ev[0]).unwrap();
            assert_eq!(first["object"], object, "{path}");
        }
    }
}

/// Reads from `resp` until `want` SSE events have arrived; returns when that happened.
fn read_events(resp: &mut reqwest::blocking::Response, want: usize) -> String {
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while seen.matches("\n\n").count() < want {
        let n = resp.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    seen
}

#[test]
fn streams_are_forwarded_chunk_by_chunk_and_a_disconnect_drains_the_upstream_call() {
    let f = fixture();
    let msgs = json!([{"role": "user", "content": "hi"}]);
    // 40 words at 100 ms each: the whole answer takes 4 s upstream.
    for (path, body) in [
        (
            format!("/endpoints/{}/invocations", f.slow_chat),
            json!({"messages": msgs, "stream": true}),
        ),
        (
            "/v1/chat/completions".to_string(),
            json!({"model": f.slow_chat, "messages": msgs, "stream": true}),
        ),
    ] {
        let before = f.slow.cancelled_streams();
        let finished = |gw: &Gateway| gw.log().matches("\"completion_tokens\":40").count();
        let finished_before = finished(&f.gw);
        let started = Instant::now();
        let mut resp = client()
            .post(f.gw.url(&path))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        let first = read_events(&mut resp, 3);
        let first_at = started.elapsed();
        assert!(
            first_at < Duration::from_millis(1500),
            "{path}: the first chunks took {first_at:?}, as if the answer were buffered"
        );
        assert!(first.contains("word1"), "{first}");
        drop(resp);
        // The gateway reads the provider's stream to its end in the background, so the call is
        // charged the provider's final usage (40 output tokens), not the three chunks sent.
        let drained = eventually(Duration::from_secs(10), || {
            finished(&f.gw) > finished_before
        });
        assert!(
            drained.is_ok(),
            "{path}: the provider's stream was not drained after the client went away"
        );
        assert_eq!(f.slow.cancelled_streams(), before, "{path}");
        eprintln!(
            "{path}: first chunks after {first_at:?}; upstream drained {:?} after the disconnect",
            drained.unwrap_or_default()
        );
    }
}
