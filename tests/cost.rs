//! Cost governance end to end: prices from the catalog and overrides applied to the usage the
//! simulated providers report, spend metrics and headers, and USD budgets on the real gateway
//! binary against the real kube-apiserver (and a real redis-server for budgets across replicas).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: failing loudly is the point

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::*;

/// The tests of this file run one at a time: the exact counts across replicas rely on the shared
/// store answering within its timeout, which a 2-core machine running them all at once (200
/// threads, several gateways) cannot promise.
fn one_at_a_time() -> parking_lot::MutexGuard<'static, ()> {
    static LOCK: parking_lot::Mutex<()> = parking_lot::Mutex::new(());
    LOCK.lock()
}

/// Picodollars per token for a price of `usd` per million tokens.
fn per_token(usd_per_million: u64) -> u64 {
    usd_per_million * 1_000_000
}

/// Exact dollars of an amount of picodollars, as the gateway writes them (no trailing zeros).
fn dollars(picos: u64) -> String {
    let whole = picos / 1_000_000_000_000;
    let frac = format!("{:012}", picos % 1_000_000_000_000);
    let frac = frac.trim_end_matches('0');
    if frac.is_empty() {
        whole.to_string()
    } else {
        format!("{whole}.{frac}")
    }
}

/// A chat or embeddings Route on the simulated OpenAI provider serving `model`, with extra spec YAML.
fn priced_route(
    ns: &str,
    name: &str,
    route_type: &str,
    sim: &SimProvider,
    model: &str,
    extra: &str,
) -> String {
    route_manifest(ns, name, route_type, "openai", &sim.openai_base())
        .replace("name: gpt-4o-mini", &format!("name: {model}"))
        + extra
}

fn usage_of(body: &Value) -> (u64, u64) {
    let u = &body["usage"];
    (
        u["prompt_tokens"].as_u64().unwrap_or(0),
        u["completion_tokens"].as_u64().unwrap_or(0),
    )
}

/// The sum of the `portcullis_cost_usd_total` samples of `route`, in picodollars.
fn spent(gw: &Gateway, route: &str) -> u64 {
    let needle = format!("portcullis_cost_usd_total{{route=\"{route}\"");
    gw.metrics()
        .lines()
        .filter(|l| l.starts_with(&needle))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|usd| (usd * 1e12).round() as u64)
        .sum()
}

#[test]
fn calls_cost_what_the_provider_reported_at_the_catalog_or_overridden_price() {
    let _serial = one_at_a_time();
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("cost");
    let gw = Gateway::start(cp, &[]);
    cp.apply(&secret_manifest(
        &ns,
        "openai",
        "apiKey",
        "sk-cost-upstream",
    ));
    let catalog = unique("catalog");
    let overridden = unique("overridden");
    let cut = unique("cut");
    let embed = unique("embed");
    let unpriced = unique("unpriced");
    let pool = unique("pool");
    let high = "  pricing:\n    inputPerMillion: 3\n    outputPerMillion: 1000\n";
    cp.apply(&priced_route(
        &ns,
        &catalog,
        "llm/v1/chat",
        &sim,
        "gpt-4o-mini",
        "",
    ));
    cp.apply(&priced_route(
        &ns,
        &overridden,
        "llm/v1/chat",
        &sim,
        "house-model",
        high,
    ));
    cp.apply(&priced_route(
        &ns,
        &cut,
        "llm/v1/chat",
        &sim,
        "house-model",
        high,
    ));
    cp.apply(&priced_route(
        &ns,
        &embed,
        "llm/v1/embeddings",
        &sim,
        "text-embedding-3-small",
        "",
    ));
    cp.apply(&priced_route(
        &ns,
        &unpriced,
        "llm/v1/chat",
        &sim,
        "house-model",
        "",
    ));
    // Two backends, each priced by its own override over the Route's.
    let mut a = model(
        portcullis::api::Provider::Openai,
        "house-a",
        &sim.openai_base(),
        "openai",
    );
    a.name = "house-a".into();
    let mut b = a.clone();
    b.name = "house-b".into();
    let mut ba = backend(a, 1, 0);
    ba.pricing = Some(portcullis::api::Pricing {
        output_per_million: Some(2.0),
        ..Default::default()
    });
    let bb = backend(b, 1, 0);
    let mut spec =
        portcullis::api::RouteSpec::new(portcullis::api::RouteType::Chat, ba.model.clone());
    spec.model = None;
    spec.backends = vec![ba, bb];
    spec.pricing = Some(portcullis::api::Pricing {
        input_per_million: Some(1.0),
        output_per_million: Some(5.0),
        cached_input_per_million: None,
    });
    cp.apply(&route_yaml(&ns, &pool, spec));
    for r in [&catalog, &overridden, &cut, &embed, &unpriced, &pool] {
        cp.wait_ready(&ns, r);
    }
    let chat = |route: &str, extra: Value| {
        let mut body =
            json!({"model": route, "messages": [{"role": "user", "content": "hello there"}]});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        post_full(&gw.url("/v1/chat/completions"), &body)
    };

    // Plain call at the catalog's gpt-4o-mini price ($0.15 in, $0.60 out per million).
    let (code, headers, text) = chat(&catalog, json!({}));
    assert_eq!(code, 200, "{text}");
    let (p, c) = usage_of(&serde_json::from_str(&text).unwrap());
    assert_eq!((p, c), (2, 20));
    let expected = p * 150_000 + c * 600_000;
    assert_eq!(expected, 12_300_000);
    assert_eq!(header(&headers, "x-portcullis-cost-usd"), Some("0.0000123"));
    assert_eq!(spent(&gw, &catalog), expected);
    let logged = gw
        .log()
        .lines()
        .any(|l| l.contains(&catalog) && l.contains("\"cost_usd\":\"0.0000123\""));
    assert!(logged, "no cost on the request log line:\n{}", gw.log());

    // The Route's override: $3 in, $1000 out per million.
    let (code, headers, text) = chat(&overridden, json!({"max_tokens": 10}));
    assert_eq!(code, 200, "{text}");
    let (p, c) = usage_of(&serde_json::from_str(&text).unwrap());
    let plain = p * per_token(3) + c * per_token(1000);
    assert_eq!(plain, 2 * 3_000_000 + 10 * 1_000_000_000);
    assert_eq!(
        header(&headers, "x-portcullis-cost-usd"),
        Some(dollars(plain).as_str())
    );

    // A stream is charged its final usage report, on its log line, in the metric and on its
    // final usage chunk (`x_portcullis_cost_usd`); no header.
    let (code, headers, text) = chat(
        &overridden,
        json!({"stream": true, "stream_options": {"include_usage": true}}),
    );
    assert_eq!(code, 200, "{text}");
    assert_eq!(header(&headers, "x-portcullis-cost-usd"), None);
    let chunks = sse_chunks(&text);
    let (p, c) = usage_of(chunks.last().unwrap());
    let streamed = p * per_token(3) + c * per_token(1000);
    assert_eq!((p, c), (2, 20));
    assert_eq!(
        chunks.last().unwrap()["x_portcullis_cost_usd"],
        json!(dollars(streamed)),
        "{text}"
    );
    let line = format!("\"cost_usd\":\"{}\"", dollars(streamed));
    // The stream's line is written as it ends, after the last chunk reached the caller.
    eventually(Duration::from_secs(5), || {
        spent(&gw, &overridden) == plain + streamed && gw.log().contains(&line)
    })
    .unwrap_or_else(|_| panic!("stream spend or log line ({line}): {}", gw.metrics()));

    // A stream cut by the provider costs the prompt estimate and the text that was sent.
    sim.set_behaviour(portcullis_sim::Behaviour {
        fault: portcullis_sim::Fault::CutStream { after_frames: 6 },
        // Paced, so the first frames surely leave before the cut.
        chunk_delay: Duration::from_millis(30),
        ..Default::default()
    });
    let (code, _, text) = chat(&cut, json!({"stream": true}));
    sim.set_behaviour(portcullis_sim::Behaviour::default());
    assert_eq!(code, 200, "{text}");
    let sent: String = sse_chunks(&text)
        .iter()
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert!(!sent.is_empty() && sent.len() < 60, "{sent:?}");
    // "hello there": 11 characters, 3 tokens at four characters a token.
    let cut_cost = 3 * per_token(3) + (sent.len() as u64).div_ceil(4) * per_token(1000);
    eventually(Duration::from_secs(5), || spent(&gw, &cut) == cut_cost)
        .unwrap_or_else(|_| panic!("cut stream spend {} != {cut_cost}", spent(&gw, &cut)));

    // Embeddings are priced on input: $0.02 per million for text-embedding-3-small.
    let (code, headers, text) = post_full(
        &gw.url("/v1/embeddings"),
        &json!({"model": embed, "input": ["hello there", "general kenobi"]}),
    );
    assert_eq!(code, 200, "{text}");
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["usage"]["prompt_tokens"],
        4
    );
    assert_eq!(
        header(&headers, "x-portcullis-cost-usd"),
        Some("0.00000008")
    );
    assert_eq!(spent(&gw, &embed), 80_000);

    // A model without a price costs "unknown", never zero.
    let (code, headers, _) = chat(&unpriced, json!({}));
    assert_eq!(code, 200);
    assert_eq!(header(&headers, "x-portcullis-cost-usd"), Some("unknown"));
    assert_eq!(spent(&gw, &unpriced), 0);
    assert!(
        gw.metrics().lines().any(|l| l.starts_with(&format!(
            "portcullis_cost_unknown_calls_total{{route=\"{unpriced}\""
        )) && l.ends_with(" 1")),
        "{}",
        gw.metrics()
    );

    // Each backend at its own price: house-a's output override ($2) over the Route's ($1 in, $5 out).
    let mut total = 0;
    for _ in 0..6 {
        let (code, headers, text) = chat(&pool, json!({}));
        assert_eq!(code, 200, "{text}");
        let (p, c) = usage_of(&serde_json::from_str(&text).unwrap());
        let out = match header(&headers, "x-portcullis-backend") {
            Some("openai/house-a") => per_token(2),
            Some("openai/house-b") => per_token(5),
            other => panic!("backend {other:?}"),
        };
        let cost = p * per_token(1) + c * out;
        assert_eq!(
            header(&headers, "x-portcullis-cost-usd"),
            Some(dollars(cost).as_str())
        );
        total += cost;
    }
    assert_eq!(spent(&gw, &pool), total);
    assert!(!gw.log().contains("sk-cost-upstream") && !gw.metrics().contains("sk-cost-upstream"));
}

/// A chat Route at exactly $0.01 per call asking for 10 tokens: input free, output $1000 per
/// million, and the simulated provider answers exactly `max_tokens` words.
const CENT_PER_CALL: &str = "  pricing:\n    inputPerMillion: 0\n    outputPerMillion: 1000\n";

/// A Ready chat Route named after `prefix`, priced at a cent a call, with `limits` (spec YAML),
/// and the upstream key Secret it uses.
fn cent_route(
    cp: &ControlPlane,
    sim: &SimProvider,
    ns: &str,
    prefix: &str,
    limits: &str,
) -> String {
    cp.apply(&secret_manifest(ns, "openai", "apiKey", "sk-cost-upstream"));
    let route = unique(prefix);
    cp.apply(&priced_route(
        ns,
        &route,
        "llm/v1/chat",
        sim,
        "house-model",
        &format!("{CENT_PER_CALL}{limits}"),
    ));
    cp.wait_ready(ns, &route);
    route
}

fn cent_call(route: &str) -> Value {
    json!({"model": route, "max_tokens": 10, "messages": [{"role": "user", "content": "hello there"}]})
}

/// The values of the USD budget counters in the shared store, in nanodollars.
fn redis_usd_counters(redis: &Redis, route: &str) -> Vec<u64> {
    let cli = |args: &[&str]| {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &redis.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    cli(&[
        "--scan",
        "--pattern",
        &format!("portcullis:{route}:*:usd:*"),
    ])
    .lines()
    .filter(|k| !k.is_empty())
    .map(|k| cli(&["GET", k]).trim().parse().unwrap())
    .collect()
}

fn metric_line(gw: &Gateway, prefix: &str) -> String {
    gw.metrics()
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_default()
        .to_string()
}

/// `portcullis spend` against the shared store, as an operator runs it.
fn spend(cp: &ControlPlane, redis: &Redis) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["spend", "--limits-store", &redis.url()])
        .env("KUBECONFIG", cp.kubeconfig())
        .output()
        .expect("portcullis spend");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Midnight UTC after now, as the budget message writes it.
fn next_midnight_utc() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    portcullis::limits::utc_text((now / 86_400 + 1) * 86_400)
}

#[test]
fn a_usd_budget_holds_exactly_across_two_replicas_on_one_redis() {
    let _serial = one_at_a_time();
    let cp = ControlPlane::shared();
    let sim = sim();
    let redis = Redis::start();
    let url = redis.url();
    let flags = shared_store_flags(&url);
    let a = Gateway::start(cp, &flags);
    let b = Gateway::start(cp, &flags);
    let ns = cp.namespace("cost-redis");
    let route = cent_route(
        cp,
        &sim,
        &ns,
        "dollar",
        "  limits:\n    - renewalPeriod: day\n      usd: 1.00\n",
    );
    let status = cp.json(&["get", "route", &route, "-n", &ns]);
    assert_eq!(status["status"]["limits"][0]["usd"], 1.0, "{status}");

    // 200 calls at once, half on each replica: exactly 100 cents fit in the dollar.
    type Answer = (u16, Vec<(String, String)>, String);
    let results: Vec<Answer> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..200)
            .map(|i| {
                let gw = if i % 2 == 0 { &a } else { &b };
                let body = cent_call(&route);
                s.spawn(move || post_full(&gw.url("/v1/chat/completions"), &body))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let answered: Vec<_> = results.iter().filter(|r| r.0 == 200).collect();
    let refused: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert_eq!(
        (answered.len(), refused.len()),
        (100, 100),
        "{:?}\nstore errors: {} / {}",
        results.iter().map(|r| r.0).collect::<Vec<_>>(),
        metric_line(&a, "portcullis_limits_store_errors_total"),
        metric_line(&b, "portcullis_limits_store_errors_total"),
    );
    for (_, headers, _) in &answered {
        assert_eq!(header(headers, "x-portcullis-cost-usd"), Some("0.01"));
    }
    let message = format!(
        "USD budget exceeded for route {ns}/{route}: $1.00 per day, resets {}",
        next_midnight_utc()
    );
    for (_, headers, text) in &refused {
        let body: Value = serde_json::from_str(text).unwrap();
        assert_eq!(body["error"]["message"], message.as_str(), "{text}");
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
        assert_eq!(header(headers, "x-ratelimit-limit-usd"), Some("1.00"));
        assert_eq!(header(headers, "x-ratelimit-remaining-usd"), Some("0.00"));
        let retry: u64 = header(headers, "retry-after").unwrap().parse().unwrap();
        assert!((1..=86_400).contains(&retry), "{retry}");
    }

    // After settlement the spend is exact: a dollar in the store, a dollar in the metrics.
    eventually(Duration::from_secs(5), || {
        redis_usd_counters(&redis, &route) == vec![1_000_000_000]
    })
    .unwrap_or_else(|_| panic!("store: {:?}", redis_usd_counters(&redis, &route)));
    assert_eq!(spent(&a, &route) + spent(&b, &route), 1_000_000_000_000);

    // `portcullis spend` shows the window's spend beside the budget.
    let table = spend(cp, &redis);
    let row = table
        .lines()
        .find(|l| l.contains(&format!("{ns}/{route}")))
        .unwrap_or_else(|| panic!("{table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        cells,
        [
            "route",
            &format!("{ns}/{route}"),
            "(all)",
            "day",
            &next_midnight_utc(),
            "$1.00",
            "$1.00",
            "100.0%"
        ],
        "{table}"
    );

    // The MLflow surface refuses in its own shape with the same message.
    let (code, _, text) = post_full(
        &a.url(&format!("/gateway/{route}/invocations")),
        &json!({"max_tokens": 10, "messages": [{"role": "user", "content": "hello there"}]}),
    );
    assert_eq!(code, 429, "{text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(body["detail"], message.as_str(), "{text}");
}

#[test]
fn a_usd_budget_on_a_route_of_unknown_price_is_refused_in_status() {
    let _serial = one_at_a_time();
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("cost-unpriced");
    cp.apply(&secret_manifest(
        &ns,
        "openai",
        "apiKey",
        "sk-cost-upstream",
    ));
    let route = unique("unpriced-budget");
    cp.apply(&priced_route(
        &ns,
        &route,
        "llm/v1/chat",
        &sim,
        "house-model",
        "  limits:\n    - renewalPeriod: month\n      usd: 5\n",
    ));
    // The schema refuses what cannot work: truncation without a USD budget, a negative budget.
    for (bad, why) in [
        (
            "  limits:\n    - renewalPeriod: day\n      calls: 5\n      onExceed: truncate\n",
            "onExceed: truncate applies to USD budgets",
        ),
        (
            "  limits:\n    - renewalPeriod: day\n      usd: -1\n",
            "spec.limits[0].usd",
        ),
    ] {
        let manifest = priced_route(&ns, "bad", "llm/v1/chat", &sim, "house-model", bad);
        let out = cp.kubectl_stdin(&["apply", "-f", "-"], &manifest);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{err}");
    }
    let _gw = Gateway::start(cp, &[]);
    cp.wait_reason(&ns, &route, "InvalidSpec");
    let r = cp.json(&["get", "route", &route, "-n", &ns]);
    let ready = r["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap();
    assert!(
        ready["message"]
            .as_str()
            .unwrap()
            .contains("spec.limits[0].usd needs a price for every backend; openai/house-model"),
        "{ready}"
    );
}

fn call_as(gw: &Gateway, bearer: &str, route: &str) -> (u16, Value) {
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {bearer}"))
        .body(cent_call(route).to_string())
        .send()
        .expect("request");
    let code = resp.status().as_u16();
    (
        code,
        serde_json::from_str(&resp.text().unwrap_or_default()).unwrap_or(Value::Null),
    )
}

#[test]
fn team_budgets_hold_across_routes_and_members_and_each_team_binds() {
    let _serial = one_at_a_time();
    let cp = ControlPlane::shared();
    let sim = sim();
    let (ns, other) = (cp.namespace("team-a"), cp.namespace("team-b"));
    cp.apply(&secret_manifest(
        &ns,
        "openai",
        "apiKey",
        "sk-team-upstream",
    ));
    let routes = [unique("t-one"), unique("t-two"), unique("t-three")];
    for r in &routes {
        cp.apply(&priced_route(
            &ns,
            r,
            "llm/v1/chat",
            &sim,
            "house-model",
            CENT_PER_CALL,
        ));
    }
    let (alice, bob, carol) = (
        cp.new_service_account_token(&ns, "alice"),
        cp.new_service_account_token(&other, "bob"),
        cp.new_service_account_token(&ns, "carol"),
    );
    let (shared, tight, loose) = (unique("research"), unique("tight"), unique("loose"));
    let team = |name: &str, members: &str, usd: &str, extra: &str| {
        format!(
            "apiVersion: portcullis.dev/v1alpha1\nkind: Team\nmetadata:\n  name: {name}\nspec:\n  members:\n{members}  limits:\n    - renewalPeriod: week\n      usd: {usd}\n{extra}"
        )
    };
    cp.apply(&team(
        &shared,
        &format!("    - serviceAccount: {ns}/alice\n    - serviceAccount: {other}/bob\n"),
        "0.05",
        "",
    ));
    cp.apply(&team(
        &tight,
        &format!("    - serviceAccount: {ns}/carol\n"),
        "0.02",
        &format!("  routes: [{ns}/{}, {ns}/{}]\n", routes[0], routes[1]),
    ));
    cp.apply(&team(
        &loose,
        &format!("    - namespace: {ns}\n"),
        "1.00",
        "",
    ));
    // Started after the Teams exist: its first table (readiness waits for it) has them all.
    let gw = Gateway::start(cp, &[]);
    for r in &routes {
        cp.wait_ready(&ns, r);
    }
    // The Teams' status lists what is enforced.
    eventually(Duration::from_secs(15), || {
        let t = cp.json(&["get", "team", &tight]);
        t["status"]["limits"][0]["usd"] == 0.02
            && t["status"]["routes"][0] == format!("{ns}/{}", routes[0]).as_str()
    })
    .unwrap_or_else(|_| panic!("{}", cp.json(&["get", "team", &tight])));

    // Alice and Bob share $0.05 a week across the three routes: five cent-calls in all.
    let week_end = {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        portcullis::limits::utc_text(
            portcullis::limits::window(portcullis::api::RenewalPeriod::Week, now).1,
        )
    };
    eventually(Duration::from_secs(10), || {
        call_as(&gw, &alice, &routes[0]).0 == 200
    })
    .unwrap_or_else(|_| panic!("alice never got through:\n{}", gw.log()));
    let mut answered = 1;
    for i in 0..8 {
        let (who, route) = if i % 2 == 0 {
            (&bob, &routes[1])
        } else {
            (&alice, &routes[2])
        };
        let (code, body) = call_as(&gw, who, route);
        match code {
            200 => answered += 1,
            429 => assert_eq!(
                body["error"]["message"],
                format!("USD budget exceeded for team {shared}: $0.05 per week, resets {week_end}")
                    .as_str(),
                "{body}"
            ),
            other => panic!("{other}: {body}"),
        }
    }
    assert_eq!(
        answered, 5,
        "the shared budget admits exactly five cent-calls"
    );

    // Carol is in the tight team ($0.02) and, by namespace, the loose one ($1.00): the tight binds.
    assert_eq!(call_as(&gw, &carol, &routes[0]).0, 200);
    assert_eq!(call_as(&gw, &carol, &routes[1]).0, 200);
    let (code, body) = call_as(&gw, &carol, &routes[0]);
    assert_eq!(code, 429, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!(
            "USD budget exceeded for team {tight}: $0.02 per week"
        )),
        "{message}"
    );
    // And the tight team lists its routes: the third is not among them.
    let (code, body) = call_as(&gw, &carol, &routes[2]);
    assert_eq!(code, 403, "{body}");
    assert_eq!(body["error"]["code"], "route_not_in_team");
    // A route of unknown cost is not free for members of a team with a USD budget.
    let unpriced = unique("t-unpriced");
    cp.apply(&priced_route(
        &ns,
        &unpriced,
        "llm/v1/chat",
        &sim,
        "house-model",
        "",
    ));
    cp.wait_ready(&ns, &unpriced);
    let (code, body) = call_as(&gw, &alice, &unpriced);
    assert_eq!(code, 403, "{body}");
    assert_eq!(body["error"]["code"], "route_unpriced");
    assert!(!gw.log().contains("sk-team-upstream"));
}

#[test]
fn a_truncating_budget_ends_a_stream_at_the_chunk_that_would_cross_it() {
    let _serial = one_at_a_time();
    let cp = ControlPlane::shared();
    let sim = sim();
    let redis = Redis::start();
    let url = redis.url();
    let gw = Gateway::start(cp, &["--limits-store", url.as_str()]);
    let ns = cp.namespace("cost-cut");
    let route = cent_route(
        cp,
        &sim,
        &ns,
        "truncating",
        "  limits:\n    - renewalPeriod: day\n      usd: 0.01\n      onExceed: truncate\n",
    );
    let stream = |route: &str| {
        let body = json!({"model": route, "stream": true,
            "messages": [{"role": "user", "content": "hello there"}]});
        let (code, _, text) = post_full(&gw.url("/v1/chat/completions"), &body);
        assert_eq!(code, 200, "{text}");
        let chunks = sse_chunks(&text);
        let words: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        (words, chunks.last().cloned().unwrap(), text)
    };

    // $0.01 buys 10 output tokens at four characters a token: "word1 " .. "word6 " are 36
    // characters (9 tokens); "word7 " would make 42 (11 tokens), so the stream ends before it.
    let (words, last, text) = stream(&route);
    assert_eq!(words, "word1 word2 word3 word4 word5 word6 ", "{text}");
    assert_eq!(last["error"]["code"], "budget_exceeded", "{text}");
    let message = last["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("route {ns}/{route}: $0.01 per day")),
        "{message}"
    );
    assert!(!text.contains("[DONE]"), "{text}");
    // Charged what was sent: 9 tokens at $0.001.
    eventually(Duration::from_secs(5), || {
        spent(&gw, &route) == 9_000_000_000
    })
    .unwrap_or_else(|_| panic!("spent {}", spent(&gw, &route)));
    eventually(Duration::from_secs(5), || {
        redis_usd_counters(&redis, &route) == vec![9_000_000]
    })
    .unwrap_or_else(|_| panic!("store: {:?}", redis_usd_counters(&redis, &route)));

    // What is left ($0.001) admits a stream that ends before its first word; a plain call that
    // needs $0.01 is refused before it starts.
    let (words, last, _) = stream(&route);
    assert_eq!(words, "");
    assert_eq!(last["error"]["code"], "budget_exceeded");
    let (code, _, text) = post_full(&gw.url("/v1/chat/completions"), &cent_call(&route));
    assert_eq!(code, 429, "{text}");
    assert!(text.contains("USD budget exceeded for route"), "{text}");
}

#[test]
fn alert_budgets_never_refuse_and_emit_one_event_at_80_and_one_at_100_percent() {
    let _serial = one_at_a_time();
    let cp = ControlPlane::shared();
    let sim = sim();
    let redis = Redis::start();
    let url = redis.url();
    let flags = shared_store_flags(&url);
    let ns = cp.namespace("cost-alert");
    // A Team whose API-key member is watched with an alert on calls, applied before the gateways
    // start (their first table has it).
    let team = unique("watchers");
    cp.apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: analyst\n  namespace: {ns}\n  labels:\n    portcullis.dev/api-key: \"true\"\nstringData:\n  apiKey: pk-analyst-7f3a9c2e\n---\napiVersion: portcullis.dev/v1alpha1\nkind: Team\nmetadata:\n  name: {team}\nspec:\n  members:\n    - consumer: {ns}/analyst\n  limits:\n    - renewalPeriod: month\n      calls: 5\n      action: alert\n"
    ));
    let (a, b) = (Gateway::start(cp, &flags), Gateway::start(cp, &flags));
    let route = cent_route(
        cp,
        &sim,
        &ns,
        "watched",
        "  limits:\n    - renewalPeriod: month\n      usd: 0.05\n      action: alert\n",
    );
    // Twice the budget, over both replicas: never refused.
    for i in 0..10 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let (code, _, text) = post_full(&gw.url("/v1/chat/completions"), &cent_call(&route));
        assert_eq!(code, 200, "{text}");
    }
    let events = || -> Vec<(String, String)> {
        cp.json(&["get", "events", "-n", &ns])["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["involvedObject"]["name"] == route.as_str())
            .filter(|e| {
                e["reason"]
                    .as_str()
                    .unwrap_or_default()
                    .starts_with("Limit")
            })
            .map(|e| {
                (
                    e["reason"].as_str().unwrap_or_default().to_string(),
                    e["message"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    };
    eventually(Duration::from_secs(15), || events().len() >= 2)
        .unwrap_or_else(|_| panic!("events: {:?}", events()));
    // Given time for any duplicate to show, exactly one of each.
    std::thread::sleep(Duration::from_secs(2));
    let mut seen = events();
    seen.sort();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].0, "LimitNearlyReached");
    assert!(
        seen[0]
            .1
            .starts_with(&format!("route {ns}/{route}: $0.05 per month reached 80%")),
        "{seen:?}"
    );
    assert_eq!(seen[1].0, "LimitReached");
    assert!(seen[1].1.contains("reached 100%"), "{seen:?}");
    // The metric and the log line, from whichever replica saw each crossing.
    let alerts = |gw: &Gateway| -> f64 {
        gw.metrics()
            .lines()
            .filter(|l| l.starts_with("portcullis_limit_alerts_total{") && l.contains(&route))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert_eq!(alerts(&a) + alerts(&b), 2.0);
    let logged = [&a, &b]
        .iter()
        .map(|gw| gw.log().matches("limit alert").count())
        .sum::<usize>();
    assert_eq!(logged, 2);

    // The Team's alert on calls: its member makes 8 calls, never refused; a Team is cluster-scoped,
    // so its Events are in the default namespace.
    for i in 0..8 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let (code, _) = call_as(gw, "pk-analyst-7f3a9c2e", &route);
        assert_eq!(code, 200);
    }
    let team_events = || -> Vec<String> {
        cp.json(&["get", "events", "-n", "default"])["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["involvedObject"]["name"] == team.as_str())
            .filter(|e| e["involvedObject"]["kind"] == "Team")
            .map(|e| e["message"].as_str().unwrap_or_default().to_string())
            .collect()
    };
    eventually(Duration::from_secs(15), || team_events().len() >= 2)
        .unwrap_or_else(|_| panic!("team events: {:?}", team_events()));
    std::thread::sleep(Duration::from_secs(2));
    let mut seen = team_events();
    seen.sort();
    assert_eq!(
        seen,
        [
            format!(
                "team {team}: 5 calls per month reached 100% (window ends {})",
                month_end()
            ),
            format!(
                "team {team}: 5 calls per month reached 80% (window ends {})",
                month_end()
            ),
        ]
        .map(|m| format!("{m}; alert only, calls are not refused")),
    );
}

fn month_end() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    portcullis::limits::utc_text(
        portcullis::limits::window(portcullis::api::RenewalPeriod::Month, now).1,
    )
}

#[test]
fn cluster_wide_prices_from_the_pricing_configmap_apply_without_a_restart() {
    let _serial = one_at_a_time();
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("cost-cluster");
    let pricing = |output: &str| {
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: portcullis-pricing\n  namespace: {ns}\ndata:\n  prices.yaml: |\n    openai:\n      source: contract 2026-17\n      asOf: 2026-11-01\n      models:\n        house-cluster: {{input: 0, output: {output}}}\n        gpt-4o-mini: {{input: 0, output: 1}}\n"
        )
    };
    cp.apply(&pricing("2000"));
    // The gateway's own namespace (where it looks for portcullis-pricing) is the test's.
    let gw = Gateway::start(cp, &["--lease-namespace", &ns]);
    cp.apply(&secret_manifest(
        &ns,
        "openai",
        "apiKey",
        "sk-cost-upstream",
    ));
    let (negotiated, overridden, catalog) =
        (unique("negotiated"), unique("route-wins"), unique("mini"));
    cp.apply(&priced_route(
        &ns,
        &negotiated,
        "llm/v1/chat",
        &sim,
        "house-cluster",
        "",
    ));
    cp.apply(&priced_route(
        &ns,
        &overridden,
        "llm/v1/chat",
        &sim,
        "house-cluster",
        "  pricing:\n    outputPerMillion: 5000\n",
    ));
    cp.apply(&priced_route(
        &ns,
        &catalog,
        "llm/v1/chat",
        &sim,
        "gpt-4o-mini",
        "",
    ));
    for r in [&negotiated, &overridden, &catalog] {
        cp.wait_ready(&ns, r);
    }
    let cost = |route: &str| {
        let (code, headers, text) = post_full(&gw.url("/v1/chat/completions"), &cent_call(route));
        assert_eq!(code, 200, "{text}");
        header(&headers, "x-portcullis-cost-usd")
            .unwrap_or_default()
            .to_string()
    };
    // 10 output tokens: $2000 per million is $0.02; the Route's own $5000 wins ($0.05); the
    // cluster's gpt-4o-mini ($1 per million out, free input) replaces the catalog's.
    assert_eq!(cost(&negotiated), "0.02");
    assert_eq!(cost(&overridden), "0.05");
    assert_eq!(cost(&catalog), "0.00001");
    // A new negotiated price applies without a restart.
    cp.apply(&pricing("1000"));
    eventually(Duration::from_secs(10), || cost(&negotiated) == "0.01")
        .unwrap_or_else(|_| panic!("the new price never applied:\n{}", gw.log()));
    // A ConfigMap that does not parse keeps the last good prices.
    cp.apply(&pricing("-3"));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(cost(&negotiated), "0.01");
    assert!(gw.log().contains("the pricing ConfigMap does not parse"));
}

/// A call the provider may have billed without reporting its usage (an answer the gateway could
/// not read, a stream broken mid-way) keeps its reservation; one the provider refused (a 500) is
/// refunded.
#[test]
fn a_call_the_provider_may_have_billed_keeps_its_reservation() {
    let _serial = one_at_a_time();
    let cp = ControlPlane::shared();
    let sim = sim();
    let gw = Gateway::start(cp, &[]);
    let ns = cp.namespace("cost-billed");
    let route = cent_route(
        cp,
        &sim,
        &ns,
        "billed",
        "  limits:\n    - renewalPeriod: day\n      usd: 0.04\n",
    );
    let plain = || post_full(&gw.url("/v1/chat/completions"), &cent_call(&route));
    sim.set_fault(portcullis_sim::Fault::Malformed);
    assert_eq!(plain().0, 502);
    sim.set_fault(portcullis_sim::Fault::Status {
        status: 500,
        body: r#"{"error":{"message":"boom","type":"server_error"}}"#.into(),
        retry_after: None,
    });
    assert_eq!(plain().0, 502);
    sim.set_behaviour(portcullis_sim::Behaviour {
        fault: portcullis_sim::Fault::CutStream { after_frames: 3 },
        chunk_delay: Duration::from_millis(20),
        ..Default::default()
    });
    let mut stream = cent_call(&route);
    stream["stream"] = json!(true);
    let (code, _, text) = post_full(&gw.url("/v1/chat/completions"), &stream);
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("word1") && !text.contains("[DONE]"), "{text}");
    sim.set_behaviour(portcullis_sim::Behaviour::default());
    // $0.01 kept for the unreadable answer, $0.01 for the broken stream, nothing for the 500:
    // two of the $0.04 are left.
    std::thread::sleep(Duration::from_millis(300));
    let codes: Vec<u16> = (0..4).map(|_| plain().0).collect();
    assert_eq!(codes, [200, 200, 429, 429], "{}", gw.log());
}

/// The README's promise: concurrent calls that set no `max_tokens` overshoot a budget by at most
/// one call. Each reserves its model's output maximum (gpt-4o-mini: 16,384 tokens, from the
/// catalog), so the call that takes what is left of the budget holds everyone else off until it
/// settles; with a fixed 256-token guess, ten calls would fit and each would use 1,002.
#[test]
fn concurrent_calls_without_max_tokens_overshoot_a_budget_by_at_most_one_call() {
    let _serial = one_at_a_time();
    let cp = ControlPlane::shared();
    let sim = sim();
    sim.set_behaviour(portcullis_sim::Behaviour {
        fault: portcullis_sim::Fault::Delay(Duration::from_millis(300)),
        answer_words: 1000,
        ..Default::default()
    });
    let redis = Redis::start();
    let url = redis.url();
    let gw = Gateway::start(cp, &["--limits-store", url.as_str()]);
    let ns = cp.namespace("cost-overshoot");
    cp.apply(&secret_manifest(&ns, "openai", "apiKey", "sk-overshoot"));
    let route = unique("overshoot");
    cp.apply(&priced_route(
        &ns,
        &route,
        "llm/v1/chat",
        &sim,
        "gpt-4o-mini",
        "  limits:\n    - renewalPeriod: day\n      tokens: 3000\n",
    ));
    cp.wait_ready(&ns, &route);
    let body = json!({"model": route, "messages": [{"role": "user", "content": "hello there"}]});
    let mut used = Vec::new();
    for _ in 0..3 {
        let wave: Vec<(u16, Value)> = std::thread::scope(|s| {
            let calls: Vec<_> = (0..10)
                .map(|_| s.spawn(|| gw.post("/v1/chat/completions", &body)))
                .collect();
            calls.into_iter().map(|c| c.join().unwrap()).collect()
        });
        for (code, answer) in wave {
            match code {
                200 => used.push(answer["usage"]["total_tokens"].as_u64().unwrap()),
                429 => {}
                other => panic!("{other}: {answer}"),
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let total: u64 = used.iter().sum();
    let largest = used.iter().copied().max().unwrap_or_default();
    assert!(!used.is_empty());
    assert!(
        total <= 3000 + largest,
        "{} calls used {total} tokens of a 3000-token budget: {used:?}",
        used.len()
    );
}

/// Team budgets are the platform's: a member who prices their own Route at 0 is still charged the
/// catalog price against the Team, and a `namespace:` member rule covers the namespace's API-key
/// consumers as well as its ServiceAccounts.
#[test]
fn team_budgets_charge_the_catalog_price_and_cover_a_namespaces_api_keys() {
    let _serial = one_at_a_time();
    let cp = ControlPlane::shared();
    let sim = sim();
    sim.set_behaviour(portcullis_sim::Behaviour {
        answer_words: 100,
        ..Default::default()
    });
    let ns = cp.namespace("team-free");
    cp.apply(&secret_manifest(
        &ns,
        "openai",
        "apiKey",
        "sk-free-upstream",
    ));
    // o1 is $15 / $60 per million tokens in the catalog: a 100-word answer costs about $0.006.
    let route = unique("free-o1");
    cp.apply(&priced_route(
        &ns,
        &route,
        "llm/v1/chat",
        &sim,
        "o1",
        "  pricing: {inputPerMillion: 0, outputPerMillion: 0}\n",
    ));
    cp.apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: member-key\n  namespace: {ns}\n  labels:\n    portcullis.dev/api-key: \"true\"\nstringData:\n  apiKey: pk-team-free-member-0123456789\n"
    ));
    let team = unique("frugal");
    cp.apply(&format!(
        "apiVersion: portcullis.dev/v1alpha1\nkind: Team\nmetadata:\n  name: {team}\nspec:\n  members:\n    - namespace: {ns}\n  limits:\n    - renewalPeriod: week\n      usd: 0.02\n      key: consumer\n"
    ));
    let token = cp.new_service_account_token(&ns, "member");
    let gw = Gateway::start(cp, &[]);
    cp.wait_ready(&ns, &route);
    let call = |bearer: &str| {
        let resp = client()
            .post(gw.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {bearer}"))
            .body(json!({"model": route, "max_tokens": 100, "messages": [{"role": "user", "content": "hello there"}]}).to_string())
            .send()
            .expect("request");
        let code = resp.status().as_u16();
        let cost = resp
            .headers()
            .get("x-portcullis-cost-usd")
            .map(|v| v.to_str().unwrap().to_string());
        (code, cost, resp.text().unwrap_or_default())
    };
    for bearer in [token.as_str(), "pk-team-free-member-0123456789"] {
        eventually(Duration::from_secs(10), || call(bearer).0 == 200)
            .unwrap_or_else(|_| panic!("never admitted:\n{}", gw.log()));
        let (code, cost, _) = call(bearer);
        assert_eq!(code, 200);
        // The Route's own accounting keeps its price.
        assert_eq!(cost.as_deref(), Some("0"));
        assert_eq!(call(bearer).0, 200);
        let (code, _, text) = call(bearer);
        assert_eq!(code, 429, "{text}");
        assert!(
            text.contains(&format!(
                "USD budget exceeded for team {team}: $0.02 per week"
            )),
            "{text}"
        );
    }
}

/// `--anonymous-team`: callers without identity are members of that Team (its budgets and its
/// `routes` hold them), and are refused while it does not exist.
#[test]
fn callers_without_identity_belong_to_the_anonymous_team() {
    let _serial = one_at_a_time();
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("team-anon");
    cp.apply(&secret_manifest(
        &ns,
        "openai",
        "apiKey",
        "sk-anon-upstream",
    ));
    let (open, other) = (unique("anon-open"), unique("anon-other"));
    for r in [&open, &other] {
        cp.apply(&priced_route(
            &ns,
            r,
            "llm/v1/chat",
            &sim,
            "gpt-4o-mini",
            "",
        ));
    }
    let team = unique("anonymous");
    let gw = Gateway::start(cp, &["--anonymous-team", &team]);
    cp.wait_ready(&ns, &open);
    cp.wait_ready(&ns, &other);
    let (code, body) = gw.chat(&open);
    assert_eq!(code, 401, "no such Team yet: {body}");
    cp.apply(&format!(
        "apiVersion: portcullis.dev/v1alpha1\nkind: Team\nmetadata:\n  name: {team}\nspec:\n  members:\n    - serviceAccount: nobody/nobody\n  limits:\n    - renewalPeriod: hour\n      calls: 2\n  routes: [{ns}/{open}]\n"
    ));
    eventually(Duration::from_secs(10), || gw.chat(&open).0 == 200)
        .unwrap_or_else(|_| panic!("{}", gw.log()));
    assert_eq!(gw.chat(&open).0, 200);
    let (code, body) = gw.chat(&open);
    assert_eq!(code, 429, "{body}");
    let (code, body) = gw.chat(&other);
    assert_eq!(code, 403, "{body}");
    assert_eq!(body["error"]["code"], "route_not_in_team");
}
