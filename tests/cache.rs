//! The response cache end to end: two gateway replicas on one Redis against the real API server,
//! the simulated provider counting the calls that reached it. Hits across replicas and surfaces
//! (and the real OpenAI, Anthropic and MLflow clients), scope isolation, the caller's controls,
//! TTLs, invalidation by a model change, what is never stored, a store that is down, budgets,
//! semantic matching (a paraphrase served, an unrelated prompt, the threshold, scope, tools).
#![allow(clippy::unwrap_used, clippy::expect_used)] // helpers of tests: failing loudly is the point

mod support;

use std::sync::OnceLock;
use std::time::Duration;

use portcullis_sim::{Behaviour, Fault};
use serde_json::{Value, json};
use support::*;

struct Fixture {
    ns: String,
    sim: SimProvider,
    /// Faults are set on this one only (tests run in parallel).
    faulty: SimProvider,
    a: Gateway,
    b: Gateway,
    _redis: Redis,
    /// `scope: route`.
    shared: String,
    /// `scope: consumer` (the default).
    personal: String,
    /// `scope: team`.
    team: String,
    faulty_route: String,
    /// `usd` allows one paid call a day (and the two one-token warm-ups); `calls: 102` a day.
    budget: String,
    alice: String,
    bob: String,
    carol: String,
    key_a: &'static str,
    key_b: &'static str,
}

/// A chat Route on `base` at $1000 per million output tokens (20 words: 2 cents), with `extra`
/// spec YAML (its `cache`, `limits`).
fn route(ns: &str, name: &str, base: &str, model: &str, extra: &str) -> String {
    format!(
        "apiVersion: portcullis.dev/v1alpha1\nkind: Route\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  routeType: llm/v1/chat\n  model:\n    provider: openai\n    name: {model}\n    apiBase: {base}\n    secretRef:\n      name: openai\n  pricing:\n    inputPerMillion: 0\n    outputPerMillion: 1000\n{extra}"
    )
}

/// A namespace of its own holding the provider key and one Route on `sim` with `extra`; its name
/// and the Route's.
fn lone_route(sim: &SimProvider, prefix: &str, extra: &str) -> (String, String) {
    let cp = ControlPlane::shared();
    let ns = cp.namespace(&format!("cache-{prefix}"));
    let name = unique(prefix);
    cp.apply(&format!(
        "{}---\n{}",
        secret_manifest(&ns, "openai", "apiKey", "sk-cache"),
        route(&ns, &name, &sim.openai_base(), "gpt-4o-mini", extra)
    ));
    (ns, name)
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let cp = ControlPlane::shared();
        let (sim, faulty) = (sim(), sim());
        let redis = Redis::start();
        let ns = cp.namespace("cache");
        let name = |p: &str| unique(p);
        let (shared, personal, team, faulty_route, budget) = (
            name("shared"),
            name("personal"),
            name("team"),
            name("faulty"),
            name("budget"),
        );
        let team_name = name("cache-team");
        let (key_a, key_b) = ("pk-cache-a-5c1e", "pk-cache-b-9d2f");
        let docs = [
            secret_manifest(&ns, "openai", "apiKey", "sk-cache"),
            api_key_secret(&ns, "key-a", key_a),
            api_key_secret(&ns, "key-b", key_b),
            route(&ns, &shared, &sim.openai_base(), "gpt-4o-mini", "  cache:\n    scope: route\n    ttl: 1h\n"),
            route(&ns, &personal, &sim.openai_base(), "gpt-4o-mini", "  cache: {}\n"),
            route(&ns, &team, &sim.openai_base(), "gpt-4o-mini", "  cache:\n    scope: team\n"),
            route(&ns, &faulty_route, &faulty.openai_base(), "gpt-4o-mini", "  cache:\n    scope: route\n"),
            route(
                &ns,
                &budget,
                &sim.openai_base(),
                "gpt-4o-mini",
                "  cache:\n    scope: route\n  limits:\n    - renewalPeriod: day\n      usd: 0.03\n    - renewalPeriod: day\n      calls: 102\n",
            ),
            format!(
                "apiVersion: portcullis.dev/v1alpha1\nkind: Team\nmetadata:\n  name: {team_name}\nspec:\n  members:\n    - serviceAccount: {ns}/alice\n    - serviceAccount: {ns}/bob\n"
            ),
        ];
        cp.apply(&docs.join("---\n"));
        let (alice, bob, carol) = (
            cp.new_service_account_token(&ns, "alice"),
            cp.new_service_account_token(&ns, "bob"),
            cp.new_service_account_token(&ns, "carol"),
        );
        let url = redis.url();
        let flags = shared_store_flags(&url);
        let mut args = vec!["--namespace", ns.as_str()];
        args.extend(flags);
        let (a, b) = (Gateway::start(cp, &args), Gateway::start(cp, &args));
        for route in [&shared, &personal, &team, &faulty_route, &budget] {
            cp.wait_ready(&ns, route);
            for gw in [&a, &b] {
                wait_served(gw, route);
            }
        }
        Fixture {
            ns,
            sim,
            faulty,
            a,
            b,
            _redis: redis,
            shared,
            personal,
            team,
            faulty_route,
            budget,
            alice,
            bob,
            carol,
            key_a,
            key_b,
        }
    })
}

/// Waits until `gw` serves `route` (with `no-store`: nothing is cached by waiting; one token:
/// a tenth of a cent of the budget Route's).
fn wait_served(gw: &Gateway, route: &str) {
    let body = json!({"model": route, "max_tokens": 1, "messages": [{"role": "user", "content": "warm-up"}]});
    let served = eventually(Duration::from_secs(20), || {
        send(gw, &body, &[("cache-control", "no-store")]).status == 200
    });
    assert!(served.is_ok(), "{route} not served; log:\n{}", gw.log());
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn cache(&self) -> &str {
        header(&self.headers, "x-portcullis-cache").unwrap_or("none")
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    /// The text of a streamed answer, and its number of content chunks.
    fn streamed_text(&self) -> (String, usize) {
        let chunks = sse_chunks(&self.body);
        let texts: Vec<&str> = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        (texts.concat(), texts.len())
    }
}

/// A chat call of `prompt` (max 20 tokens) on `route` through `gw`, with `headers`.
fn ask(
    gw: &Gateway,
    route: &str,
    prompt: &str,
    stream: bool,
    headers: &[(&str, &str)],
) -> (u16, Answer) {
    let mut body = json!({"model": route, "max_tokens": 20, "messages": [{"role": "user", "content": prompt}]});
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    let answer = send(gw, &body, headers);
    (answer.status, answer)
}

/// An entry is written in the background after the answer: time for it to land.
fn settle() {
    std::thread::sleep(Duration::from_millis(300));
}

fn send(gw: &Gateway, body: &Value, headers: &[(&str, &str)]) -> Answer {
    let (status, headers, body) =
        http_full_with(&gw.url("/v1/chat/completions"), &body.to_string(), headers);
    Answer {
        status,
        headers,
        body,
    }
}

fn call(gw: &Gateway, route: &str, prompt: &str) -> Answer {
    ask(gw, route, prompt, false, &[]).1
}

/// Calls of the provider whose body mentions `marker`.
fn provider_calls(sim: &SimProvider, marker: &str) -> usize {
    sim.requests()
        .iter()
        .filter(|r| String::from_utf8_lossy(&r.body).contains(marker))
        .count()
}

#[test]
fn a_call_stored_through_one_replica_is_a_hit_on_the_other_plain_and_streamed() {
    let f = fixture();
    let prompt = unique("replicas");
    let miss = call(&f.a, &f.shared, &prompt);
    assert_eq!((miss.status, miss.cache()), (200, "miss"), "{}", miss.body);
    settle();
    let hit = call(&f.b, &f.shared, &prompt);
    assert_eq!(hit.cache(), "hit", "replica B serves A's entry");
    assert_eq!(hit.status, 200);
    assert_eq!(
        hit.json(),
        miss.json(),
        "the same answer, id and usage included"
    );
    assert!(header(&hit.headers, "age").is_some());
    assert_eq!(header(&hit.headers, "x-portcullis-cost-usd"), Some("0"));
    assert_eq!(header(&miss.headers, "x-portcullis-cost-usd"), Some("0.02"));
    // Streamed, from the plain entry: many chunks, the same text, usage as first reported.
    let (_, streamed) = ask(&f.a, &f.shared, &prompt, true, &[]);
    assert_eq!(streamed.cache(), "hit");
    let (text, chunks) = streamed.streamed_text();
    assert_eq!(text, miss.json()["choices"][0]["message"]["content"]);
    assert!(
        chunks > 1,
        "replayed as a stream of chunks, not one blob: {}",
        streamed.body
    );
    let last = sse_chunks(&streamed.body).pop().unwrap();
    assert_eq!(last["usage"], miss.json()["usage"], "{}", streamed.body);
    assert!(streamed.body.ends_with("data: [DONE]\n\n"));
    assert_eq!(
        provider_calls(&f.sim, &prompt),
        1,
        "the provider saw one call"
    );

    // A stream stored as it passed answers a plain call.
    let prompt = unique("stream-first");
    let (_, live) = ask(&f.b, &f.shared, &prompt, true, &[]);
    assert_eq!(live.cache(), "miss");
    let (live_text, _) = live.streamed_text();
    let live_finish = sse_chunks(&live.body)
        .iter()
        .find_map(|c| {
            c["choices"][0]["finish_reason"]
                .as_str()
                .map(str::to_string)
        })
        .unwrap();
    settle();
    let plain = call(&f.a, &f.shared, &prompt);
    assert_eq!(plain.cache(), "hit");
    assert_eq!(
        plain.json()["choices"][0]["message"]["content"],
        live_text.as_str()
    );
    assert_eq!(
        plain.json()["choices"][0]["finish_reason"],
        live_finish.as_str()
    );
    assert_eq!(provider_calls(&f.sim, &prompt), 1);
    let m = f.a.metrics();
    assert!(metric_sum(&m, "portcullis_cache_hits_total") >= 2.0, "{m}");
    assert!(
        metric_sum(&m, "portcullis_cache_misses_total") >= 1.0,
        "{m}"
    );
    assert!(
        metric_sum(&f.b.metrics(), "portcullis_cache_stored_bytes_total") > 0.0,
        "B stored the streamed answer"
    );
    // The request log line says what the cache did (and never the prompt).
    let log = f.a.log();
    assert!(log.contains(r#""cache":"hit""#), "{log}");
    assert!(!log.contains(&prompt), "the prompt is not logged");
    assert!(
        metric_sum(&m, "portcullis_cache_saved_usd_total") >= 0.04,
        "{m}"
    );
}

#[test]
fn consumer_scope_never_serves_one_caller_what_another_stored() {
    let f = fixture();
    let prompt = unique("personal");
    let bearer = |t: &str| format!("Bearer {t}");
    let (alice, bob, key_a, key_b) = (
        bearer(&f.alice),
        bearer(&f.bob),
        bearer(f.key_a),
        bearer(f.key_b),
    );
    let as_ = |who: &str| ask(&f.a, &f.personal, &prompt, false, &[("authorization", who)]).1;
    assert_eq!(as_(&alice).cache(), "miss");
    settle();
    assert_eq!(as_(&alice).cache(), "hit");
    assert_eq!(as_(&bob).cache(), "miss", "another ServiceAccount");
    assert_eq!(as_(&key_a).cache(), "miss", "an API key");
    settle();
    assert_eq!(as_(&key_a).cache(), "hit");
    assert_eq!(as_(&key_b).cache(), "miss", "another API key");
    assert_eq!(
        call(&f.a, &f.personal, &prompt).cache(),
        "miss",
        "anonymous"
    );
    settle();
    // Anthropic's clients send the key as x-api-key: the same consumer.
    let anthropic = client()
        .post(f.b.url("/v1/messages"))
        .header("x-api-key", f.key_b)
        .header("content-type", "application/json")
        .body(json!({"model": f.personal, "max_tokens": 20, "messages": [{"role": "user", "content": prompt}]}).to_string())
        .send()
        .unwrap();
    assert_eq!(anthropic.headers()["x-portcullis-cache"], "hit");
    assert_eq!(provider_calls(&f.sim, &prompt), 5);
}

#[test]
fn team_scope_shares_among_members_only() {
    let f = fixture();
    let prompt = unique("team");
    let as_ = |token: &str| {
        ask(
            &f.b,
            &f.team,
            &prompt,
            false,
            &[("authorization", &format!("Bearer {token}"))],
        )
        .1
    };
    assert_eq!(as_(&f.alice).cache(), "miss");
    settle();
    assert_eq!(as_(&f.bob).cache(), "hit", "a member serves another");
    assert_eq!(as_(&f.carol).cache(), "miss", "an outsider");
    assert_eq!(call(&f.b, &f.team, &prompt).cache(), "miss", "anonymous");
    assert_eq!(provider_calls(&f.sim, &prompt), 3);
}

#[test]
fn no_cache_refreshes_no_store_bypasses_and_ttls_expire() {
    let f = fixture();
    let prompt = unique("controls");
    let with = |h: &[(&str, &str)]| ask(&f.a, &f.shared, &prompt, false, h).1;
    let skipped = with(&[("cache-control", "no-store")]);
    assert_eq!(skipped.cache(), "bypass");
    assert_eq!(with(&[("cache-control", "no-store")]).cache(), "bypass");
    assert_eq!(
        provider_calls(&f.sim, &prompt),
        2,
        "neither read nor written"
    );
    assert_eq!(call(&f.a, &f.shared, &prompt).cache(), "miss");
    settle();
    assert_eq!(call(&f.a, &f.shared, &prompt).cache(), "hit");
    assert_eq!(with(&[("cache-control", "no-cache")]).cache(), "bypass");
    assert_eq!(
        provider_calls(&f.sim, &prompt),
        4,
        "no-cache asks the provider"
    );
    settle();
    assert_eq!(call(&f.b, &f.shared, &prompt).cache(), "hit");

    // The caller shortens the TTL of what it stores; the entry then expires.
    let prompt = unique("ttl");
    let short = ask(
        &f.a,
        &f.shared,
        &prompt,
        false,
        &[("x-portcullis-cache-ttl", "2")],
    )
    .1;
    assert_eq!(short.cache(), "miss");
    settle();
    assert_eq!(call(&f.b, &f.shared, &prompt).cache(), "hit");
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(call(&f.b, &f.shared, &prompt).cache(), "miss", "expired");
}

#[test]
fn errors_and_cut_streams_are_never_stored() {
    let f = fixture();
    let prompt = unique("errors");
    f.faulty.set_fault(Fault::Status {
        status: 500,
        body: json!({"error": {"message": "boom", "type": "server_error"}}).to_string(),
        retry_after: None,
    });
    let failed = call(&f.a, &f.faulty_route, &prompt);
    assert!(failed.status >= 500, "{}", failed.body);
    f.faulty.set_fault(Fault::CutStream { after_frames: 3 });
    let (_, cut) = ask(&f.a, &f.faulty_route, &prompt, true, &[]);
    assert_eq!(cut.cache(), "miss");
    f.faulty.set_fault(Fault::EndStream { after_frames: 3 });
    let (_, ended) = ask(&f.a, &f.faulty_route, &prompt, true, &[]);
    assert_eq!(ended.cache(), "miss");
    f.faulty.set_fault(Fault::None);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        call(&f.a, &f.faulty_route, &prompt).cache(),
        "miss",
        "nothing was stored"
    );
    settle();
    assert_eq!(call(&f.a, &f.faulty_route, &prompt).cache(), "hit");
}

#[test]
fn a_model_change_invalidates_the_routes_entries() {
    let f = fixture();
    let cp = ControlPlane::shared();
    let name = unique("model");
    let cache = "  cache:\n    scope: route\n";
    cp.apply(&route(
        &f.ns,
        &name,
        &f.sim.openai_base(),
        "gpt-4o-mini",
        cache,
    ));
    cp.wait_ready(&f.ns, &name);
    wait_served(&f.a, &name);
    let prompt = unique("model-change");
    assert_eq!(call(&f.a, &name, &prompt).cache(), "miss");
    settle();
    assert_eq!(call(&f.a, &name, &prompt).cache(), "hit");
    cp.apply(&route(&f.ns, &name, &f.sim.openai_base(), "gpt-4o", cache));
    let changed = eventually(Duration::from_secs(20), || {
        ask(
            &f.a,
            &name,
            "which-model",
            false,
            &[("cache-control", "no-store")],
        )
        .1
        .json()["model"]
            == "gpt-4o"
    });
    assert!(changed.is_ok());
    let after = call(&f.a, &name, &prompt);
    assert_eq!(after.cache(), "miss", "the old model's entry is not served");
    assert_eq!(after.json()["model"], "gpt-4o");
    assert_eq!(provider_calls(&f.sim, &prompt), 2);
}

#[test]
fn hits_spend_no_budget_but_count_as_calls() {
    let f = fixture();
    let prompt = unique("budget");
    let statuses: Vec<(u16, String)> = (0..100)
        .map(|_| {
            let a = call(&f.a, &f.budget, &prompt);
            // Stored in the background: the next call may come before the write.
            std::thread::sleep(Duration::from_millis(if a.cache() == "miss" {
                200
            } else {
                0
            }));
            (a.status, a.cache().to_string())
        })
        .collect();
    let refused: Vec<_> = statuses.iter().filter(|(s, _)| *s != 200).collect();
    assert!(refused.is_empty(), "none refused on USD: {refused:?}");
    let misses = statuses.iter().filter(|(_, c)| c == "miss").count();
    assert_eq!((misses, 100 - misses), (1, 99));
    assert_eq!(provider_calls(&f.sim, &prompt), 1);
    // With the two warm-ups, 102 calls: this one is past the calls limit.
    let over = call(&f.b, &f.budget, &prompt);
    assert_eq!(over.status, 429, "{}", over.body);
    assert!(over.body.contains("calls"), "{}", over.body);
}

#[test]
fn a_store_that_is_down_is_a_miss_and_calls_are_answered() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let mut redis = Redis::start();
    let (ns, name) = lone_route(&sim, "down", "  cache:\n    scope: route\n");
    let url = redis.url();
    let gw = Gateway::start(
        cp,
        &[
            "--namespace",
            &ns,
            "--cache-store",
            &url,
            "--store-timeout",
            "200ms",
        ],
    );
    cp.wait_ready(&ns, &name);
    wait_served(&gw, &name);
    let prompt = unique("down");
    assert_eq!(call(&gw, &name, &prompt).cache(), "miss");
    settle();
    assert_eq!(call(&gw, &name, &prompt).cache(), "hit");
    redis.kill();
    for _ in 0..3 {
        let a = call(&gw, &name, &prompt);
        assert_eq!((a.status, a.cache()), (200, "miss"), "{}", a.body);
    }
    let (_, streamed) = ask(&gw, &name, &prompt, true, &[]);
    assert_eq!((streamed.status, streamed.cache()), (200, "miss"));
    let metrics = gw.metrics();
    assert!(metric_sum(&metrics, "portcullis_cache_store_errors_total") >= 3.0);
    // Every lookup is timed, the ones the store never answered too.
    assert!(metric_sum(&metrics, "portcullis_cache_lookup_duration_seconds_count") >= 6.0);
}

#[test]
fn without_a_store_each_replica_caches_in_memory() {
    let cp = ControlPlane::shared();
    let sim = sim();
    sim.set_behaviour(Behaviour {
        answer_words: 400,
        ..Default::default()
    });
    let (ns, name) = lone_route(
        &sim,
        "local",
        "  cache:\n    scope: route\n    maxEntryBytes: 2000\n",
    );
    // Room for about two 1 KiB answers.
    let gw = Gateway::start(cp, &["--namespace", &ns, "--cache-memory-bytes", "1500"]);
    cp.wait_ready(&ns, &name);
    wait_served(&gw, &name);
    let prompts: Vec<String> = (0..3).map(|i| unique(&format!("local{i}"))).collect();
    for p in &prompts {
        assert_eq!(call(&gw, &name, p).cache(), "miss");
    }
    settle();
    assert_eq!(call(&gw, &name, &prompts[2]).cache(), "hit");
    assert_eq!(call(&gw, &name, &prompts[0]).cache(), "miss", "evicted");
    assert!(metric_sum(&gw.metrics(), "portcullis_cache_evictions_total") >= 1.0);
    // Larger than maxEntryBytes: answered, never stored.
    let long = unique("long");
    let body =
        json!({"model": name, "max_tokens": 400, "messages": [{"role": "user", "content": long}]});
    for _ in 0..2 {
        let (status, headers, _) = post_full(&gw.url("/v1/chat/completions"), &body);
        assert_eq!(
            (status, header(&headers, "x-portcullis-cache")),
            (200, Some("miss"))
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn openai_anthropic_and_mlflow_clients_get_identical_answers_from_each_other() {
    let f = fixture();
    let marker = unique("clients");
    let routes = json!({"chat": f.shared, "prompt": marker});
    let (passed, _) = support::pytest("mlflow3", "cache", &format!("http://{}", f.a.addr), &routes);
    assert!(passed, "pytest cache failed; gateway log:\n{}", f.a.log());
    assert_eq!(
        provider_calls(&f.sim, &marker),
        2,
        "one call per question reached the provider"
    );
}

/// Calls of the provider's chat endpoint whose body mentions `marker` (embeddings calls of the
/// semantic cache mention it too).
fn provider_chat_calls(sim: &SimProvider, marker: &str) -> usize {
    sim.requests()
        .iter()
        .filter(|r| r.path.ends_with("/chat/completions"))
        .filter(|r| String::from_utf8_lossy(&r.body).contains(marker))
        .count()
}

/// An embeddings Route on `base` whose model the simulated provider embeds as a bag of words
/// (`sim-bow-*`): prompts sharing most words are close, others far.
fn embeddings_route(ns: &str, name: &str, base: &str) -> String {
    format!(
        "apiVersion: portcullis.dev/v1alpha1\nkind: Route\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  routeType: llm/v1/embeddings\n  model:\n    provider: openai\n    name: sim-bow-embed\n    apiBase: {base}\n    secretRef:\n      name: openai\n  pricing:\n    inputPerMillion: 1000\n"
    )
}

#[test]
fn semantic_matching_serves_a_paraphrase_within_its_scope_and_threshold_never_with_tools() {
    // Also: a chat Route named as embeddings Route turns matching off (said in its status), and
    // embeddings that fail are plain misses.
    let f = fixture();
    let cp = ControlPlane::shared();
    let (emb, close, strict, off, dead, blind) = (
        unique("emb"),
        unique("close"),
        unique("strict"),
        unique("semoff"),
        unique("dead"),
        unique("blind"),
    );
    let semantic = |threshold: &str, embeddings: &str| {
        format!(
            "  cache:\n    semantic:\n      embeddingsRoute: {embeddings}\n      threshold: {threshold}\n      maxEntries: 100\n"
        )
    };
    let base = f.sim.openai_base();
    cp.apply(
        &[
            embeddings_route(&f.ns, &emb, &base),
            route(&f.ns, &close, &base, "gpt-4o-mini", &semantic("0.9", &emb)),
            route(
                &f.ns,
                &strict,
                &base,
                "gpt-4o-mini",
                &semantic("0.999", &emb),
            ),
            // A chat Route is no embeddings Route: identical calls only, and said so.
            route(
                &f.ns,
                &off,
                &base,
                "gpt-4o-mini",
                &semantic("0.9", &f.shared),
            ),
            // Embeddings that always fail (nothing listens there): plain misses.
            embeddings_route(&f.ns, &dead, "http://127.0.0.1:9/v1"),
            route(&f.ns, &blind, &base, "gpt-4o-mini", &semantic("0.9", &dead)),
        ]
        .join("---\n"),
    );
    // The API server refuses what the CRD bounds, and explains the fields.
    for (bad, why) in [
        (semantic("0", &emb), "threshold must be above 0"),
        (semantic("1.5", &emb), "spec.cache.semantic.threshold"),
        (
            semantic("0.9", &emb).replace("maxEntries: 100", "maxEntries: 10001"),
            "spec.cache.semantic.maxEntries",
        ),
    ] {
        let out = cp.kubectl_stdin(
            &["apply", "--dry-run=server", "-f", "-"],
            &route(&f.ns, &unique("bad"), &base, "gpt-4o-mini", &bad),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(why), "{bad}: {err}");
    }
    let explained = cp.ok(&["explain", "route.spec.cache.semantic"]);
    assert!(
        explained.contains("embeddingsRoute") && explained.contains("maxEntries"),
        "{explained}"
    );
    for r in [&close, &strict, &blind] {
        cp.wait_reason(&f.ns, r, "Resolved");
    }
    cp.wait_reason(&f.ns, &off, "SemanticMatchingOff");
    for r in [&close, &strict, &off, &blind] {
        wait_served(&f.a, r);
    }
    let marker = unique("sem");
    let original = format!(
        "{marker} what is the capital city of france and why is it famous for its long history"
    );
    // Cosine 0.979 to the original as bags of words; the unrelated one 0.31.
    let paraphrase = format!(
        "{marker} so what is the capital city of france and why is it famous for its long history"
    );
    let unrelated = format!("{marker} list three prime numbers below twenty in ascending order");
    let alice = format!("Bearer {}", f.alice);
    let bob = format!("Bearer {}", f.bob);
    let as_ = |who: &str, route: &str, prompt: &str| {
        ask(&f.a, route, prompt, false, &[("authorization", who)]).1
    };

    let miss = as_(&alice, &close, &original);
    assert_eq!((miss.status, miss.cache()), (200, "miss"), "{}", miss.body);
    settle();
    let hit = as_(&alice, &close, &paraphrase);
    assert_eq!((hit.status, hit.cache()), (200, "hit"), "{}", hit.body);
    assert_eq!(
        header(&hit.headers, "x-portcullis-cache-match"),
        Some("semantic")
    );
    assert_eq!(
        hit.json(),
        miss.json(),
        "the stored answer of the close prompt"
    );
    assert_eq!(header(&hit.headers, "x-portcullis-cost-usd"), Some("0"));
    assert_eq!(
        provider_chat_calls(&f.sim, &marker),
        1,
        "the provider answered one chat call"
    );
    // Streamed: replayed from the close prompt's entry.
    let (_, streamed) = ask(
        &f.a,
        &close,
        &paraphrase.replace(" so ", " well "),
        true,
        &[("authorization", &alice)],
    );
    assert_eq!(streamed.cache(), "hit", "{}", streamed.body);
    assert_eq!(
        header(&streamed.headers, "x-portcullis-cache-match"),
        Some("semantic")
    );
    assert_eq!(
        streamed.streamed_text().0,
        miss.json()["choices"][0]["message"]["content"]
    );
    // An identical call is an exact hit, not a semantic one.
    let exact = as_(&alice, &close, &original);
    assert_eq!(exact.cache(), "hit");
    assert_eq!(header(&exact.headers, "x-portcullis-cache-match"), None);

    assert_eq!(
        as_(&alice, &close, &unrelated).cache(),
        "miss",
        "an unrelated prompt"
    );
    assert_eq!(
        as_(&bob, &close, &paraphrase).cache(),
        "miss",
        "consumer scope: Bob never gets Alice's entry, however close"
    );
    // Tools, or a hot temperature: never matched semantically.
    let mut with_tools = json!({"model": close, "max_tokens": 20,
        "messages": [{"role": "user", "content": paraphrase.replace(" so ", " then ")}],
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]});
    let tools = send(&f.a, &with_tools, &[("authorization", &alice)]);
    assert_eq!(
        (tools.status, tools.cache()),
        (200, "miss"),
        "{}",
        tools.body
    );
    with_tools.as_object_mut().unwrap().remove("tools");
    with_tools["temperature"] = json!(0.9);
    let hot = send(&f.a, &with_tools, &[("authorization", &alice)]);
    assert_eq!((hot.status, hot.cache()), (200, "miss"), "{}", hot.body);

    // The same pair under a threshold of 0.999: not close enough.
    assert_eq!(as_(&alice, &strict, &original).cache(), "miss");
    settle();
    let far = as_(&alice, &strict, &paraphrase);
    assert_eq!(far.cache(), "miss", "0.979 < 0.999");
    assert_eq!(header(&far.headers, "x-portcullis-cache-match"), None);

    // Semantic matching off: the Route serves, identical calls still hit.
    assert_eq!(as_(&alice, &off, &original).cache(), "miss");
    settle();
    assert_eq!(as_(&alice, &off, &paraphrase).cache(), "miss");
    assert_eq!(as_(&alice, &off, &original).cache(), "hit");

    // The embedding fails: a plain miss, the call answered; identical calls still hit.
    for prompt in [&original, &paraphrase] {
        let blind_miss = as_(&alice, &blind, prompt);
        assert_eq!(
            (blind_miss.status, blind_miss.cache()),
            (200, "miss"),
            "{}",
            blind_miss.body
        );
        settle();
    }
    assert_eq!(as_(&alice, &blind, &original).cache(), "hit");

    let m = f.a.metrics();
    assert!(
        metric_sum(&m, "portcullis_cache_semantic_hits_total") >= 1.0,
        "{m}"
    );
    // The embeddings are the cache's calls, on the embeddings Route: counted and priced there.
    let cache_consumer = format!("consumer=\"cache/{}/{close}\"", f.ns);
    assert!(
        m.lines()
            .any(|l| l.contains(&cache_consumer) && l.contains(&emb)),
        "{m}"
    );
    assert!(
        f.sim
            .requests()
            .iter()
            .any(|r| r.path.ends_with("/embeddings")
                && String::from_utf8_lossy(&r.body).contains(&paraphrase)),
        "the prompt was embedded through the embeddings Route"
    );
}
