//! Consumer identity, per-route access, rate limits and token budgets, end to end: real
//! ServiceAccount tokens checked by a real kube-apiserver, API-key Secrets, the real gateway binary,
//! and (for limits shared across replicas) a real redis-server on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: failing loudly is the point

mod support;

use std::io::Read;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::*;

/// One call with an optional bearer credential: status, headers, JSON body (Null when not JSON).
fn call(
    gw: &Gateway,
    bearer: Option<&str>,
    body: &Value,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut req = client()
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body.to_string());
    if let Some(b) = bearer {
        req = req.header("authorization", format!("Bearer {b}"));
    }
    let resp = req.send().expect("request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let text = resp.text().unwrap_or_default();
    (
        status,
        headers,
        serde_json::from_str(&text).unwrap_or(Value::Null),
    )
}

/// A GET with an optional bearer credential: status and JSON body.
fn get(gw: &Gateway, path: &str, bearer: Option<&str>) -> (u16, Value) {
    let mut req = client().get(gw.url(path));
    if let Some(b) = bearer {
        req = req.header("authorization", format!("Bearer {b}"));
    }
    let resp = req.send().expect("request");
    let status = resp.status().as_u16();
    (
        status,
        serde_json::from_str(&resp.text().unwrap_or_default()).unwrap_or(Value::Null),
    )
}

fn chat_body(route: &str) -> Value {
    json!({"model": route, "messages": [{"role": "user", "content": "hello there"}]})
}

fn status(gw: &Gateway, route: &str, bearer: Option<&str>) -> u16 {
    call(gw, bearer, &chat_body(route)).0
}

/// A chat Route on the simulated provider with extra `spec` YAML (indented two spaces).
fn route_with(ns: &str, name: &str, secret: &str, sim: &SimProvider, spec_extra: &str) -> String {
    format!(
        "{}{spec_extra}",
        route_manifest(ns, name, "llm/v1/chat", secret, &sim.openai_base())
    )
}

/// The provider Secret plus one chat Route per `(name prefix, extra spec YAML)` in `ns`, each
/// waited for until Ready; returns the Routes' unique names.
fn serve<const N: usize>(
    cp: &ControlPlane,
    ns: &str,
    sim: &SimProvider,
    routes: [(&str, &str); N],
) -> [String; N] {
    cp.apply(&secret_manifest(ns, "openai", "apiKey", "sk-upstream"));
    let names = routes.map(|(prefix, extra)| {
        let name = unique(prefix);
        cp.apply(&route_with(ns, &name, "openai", sim, extra));
        name
    });
    for name in &names {
        cp.wait_ready(ns, name);
    }
    names
}

/// `token` re-signed with the control plane's own ServiceAccount key after moving its expiry an hour
/// into the past: a genuinely expired token (the TokenRequest API will not issue one shorter than 10 min).
fn expired_copy(cp: &ControlPlane, token: &str) -> String {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use std::io::Write;
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: Value = serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    claims["iat"] = json!(now - 7200);
    claims["nbf"] = json!(now - 7200);
    claims["exp"] = json!(now - 3600);
    let signing_input = format!("{}.{}", parts[0], B64.encode(claims.to_string()));
    let key = cp.dir.join("pki/sa.key");
    let mut openssl = std::process::Command::new("openssl")
        .args(["dgst", "-sha256", "-binary", "-sign", key.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    openssl
        .stdin
        .take()
        .unwrap()
        .write_all(signing_input.as_bytes())
        .unwrap();
    let signature = openssl.wait_with_output().unwrap();
    assert!(signature.status.success(), "openssl could not sign");
    format!("{signing_input}.{}", B64.encode(signature.stdout))
}

/// The value of a metric line starting with `prefix` (0 when absent).
fn metric(gw: &Gateway, prefix: &str) -> f64 {
    gw.metrics()
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

fn assert_no_credentials(gw: &Gateway, secrets: &[&str]) {
    let (log, metrics) = (gw.log(), gw.metrics());
    for s in secrets {
        assert!(!log.contains(s), "a credential reached the log");
        assert!(!metrics.contains(s), "a credential reached the metrics");
    }
}

#[test]
fn service_account_tokens_are_reviewed_cached_and_checked_against_access() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("gov-sa");
    let other_ns = cp.namespace("gov-sa-b");
    let gw = Gateway::start(cp, &["--default-access", "authenticated"]);
    for (n, sa) in [
        (&ns, "notebook"),
        (&ns, "intruder"),
        (&ns, "ghost"),
        (&other_ns, "batch"),
    ] {
        cp.ok(&["create", "serviceaccount", sa, "-n", n]);
    }
    let access =
        format!("  access:\n    - serviceAccount: {ns}/notebook\n    - namespace: {other_ns}\n");
    let [restricted, open] = serve(cp, &ns, &sim, [("restricted", &access), ("open", "")]);

    let notebook = cp.token(&ns, "notebook", "portcullis");
    let intruder = cp.token(&ns, "intruder", "portcullis");
    let batch = cp.token(&other_ns, "batch", "portcullis");
    let wrong_audience = cp.token(&ns, "notebook", "someone-else");
    let expired = expired_copy(cp, &cp.token(&ns, "notebook", "portcullis"));
    // A token whose ServiceAccount was deleted and recreated: same name, new uid, so it is rejected.
    let ghost = cp.token(&ns, "ghost", "portcullis");
    cp.ok(&["delete", "serviceaccount", "ghost", "-n", &ns]);
    cp.ok(&["create", "serviceaccount", "ghost", "-n", &ns]);

    eventually(Duration::from_secs(10), || {
        status(&gw, &restricted, Some(&notebook)) == 200
    })
    .unwrap_or_else(|_| panic!("the allowed ServiceAccount was refused:\n{}", gw.log()));
    assert_eq!(
        status(&gw, &restricted, Some(&batch)),
        200,
        "namespace grant"
    );
    assert_eq!(
        status(&gw, &open, Some(&intruder)),
        200,
        "default: any valid caller"
    );

    // A valid caller not on the list gets exactly what a missing route gives (apart from the name).
    let (code, headers, body) = call(&gw, Some(&intruder), &chat_body(&restricted));
    assert_eq!(code, 404, "{body}");
    assert_eq!(body["error"]["code"], "route_not_found");
    assert!(headers.get("retry-after").is_none());
    let (_, _, missing) = call(&gw, Some(&intruder), &chat_body("no-such-route"));
    assert_eq!(
        body.to_string().replace(&restricted, "NAME"),
        missing.to_string().replace("no-such-route", "NAME")
    );
    // With `--default-access authenticated` every route needs a caller: a missing or invalid
    // credential is a 401 whatever the name, so it reveals nothing either.
    for (what, bearer) in [
        ("no token", None),
        ("expired", Some(expired.as_str())),
        ("recreated ServiceAccount", Some(ghost.as_str())),
        ("garbage", Some("not-a-token")),
        ("garbage JWT", Some("eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl")),
    ] {
        for route in [restricted.as_str(), open.as_str(), "no-such-route"] {
            let (code, headers, body) = call(&gw, bearer, &chat_body(route));
            assert_eq!(code, 401, "{what} on {route}: {body}");
            assert_eq!(body["error"]["type"], "authentication_error");
            let scheme = headers["www-authenticate"].to_str().unwrap_or_default();
            assert!(scheme.starts_with("Bearer"), "{scheme}");
        }
    }

    // Listings show a caller only the routes it may use; a hidden route is not found by name either.
    let listed = |path: &str, key: &str, field: &str, bearer: Option<&str>| -> Vec<String> {
        let (code, body) = get(&gw, path, bearer);
        assert_eq!(code, 200, "{path}: {body}");
        body[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o[field].as_str().unwrap().to_string())
            .collect()
    };
    for (path, key, field) in [
        ("/v1/models", "data", "id"),
        ("/api/2.0/endpoints/", "endpoints", "name"),
        ("/api/2.0/gateway/routes/", "routes", "name"),
    ] {
        let mine = listed(path, key, field, Some(&notebook));
        assert!(mine.contains(&restricted) && mine.contains(&open), "{path}");
        let theirs = listed(path, key, field, Some(&intruder));
        assert!(
            !theirs.contains(&restricted) && theirs.contains(&open),
            "{path}"
        );
        assert!(
            listed(path, key, field, None).is_empty(),
            "{path}: anonymous"
        );
    }
    assert_eq!(
        get(
            &gw,
            &format!("/api/2.0/endpoints/{restricted}"),
            Some(&intruder)
        )
        .0,
        404
    );
    assert_eq!(
        get(&gw, &format!("/v1/models/{restricted}"), Some(&intruder)).0,
        404
    );
    assert_eq!(
        get(
            &gw,
            &format!("/api/2.0/endpoints/{restricted}"),
            Some(&notebook)
        )
        .0,
        200
    );

    // Cached: repeating known tokens, good or bad, makes no further TokenReview call.
    let reviews = |outcome: &str| {
        metric(
            &gw,
            &format!("portcullis_token_reviews_total{{outcome=\"{outcome}\"}}"),
        )
    };
    // Fresh cache entries first: a rejected token is remembered for 5 s only.
    assert_eq!(status(&gw, &restricted, Some(&wrong_audience)), 401);
    let (ok_before, bad_before) = (reviews("authenticated"), reviews("rejected"));
    // Expired and wrong-audience tokens are refused without a review; the ghost is reviewed.
    assert!(ok_before >= 3.0 && bad_before >= 1.0, "{}", gw.metrics());
    for _ in 0..10 {
        assert_eq!(status(&gw, &restricted, Some(&notebook)), 200);
        assert_eq!(status(&gw, &restricted, Some(&wrong_audience)), 401);
    }
    assert_eq!(reviews("authenticated"), ok_before);
    assert_eq!(reviews("rejected"), bad_before);
    assert_eq!(reviews("error"), 0.0);

    // The caller's identity is the consumer in the log and the token metrics.
    let consumer = format!("sa/{ns}/notebook");
    // Log lines are written by a background thread: give it a moment.
    let logged = |who: &str| {
        let field = format!("\"consumer\":\"{who}\"");
        eventually(Duration::from_secs(2), || gw.log().contains(&field)).is_ok()
    };
    assert!(logged(&consumer), "{}", gw.log());
    assert!(
        gw.metrics().contains(&format!("consumer=\"{consumer}\"")),
        "{}",
        gw.metrics()
    );
    assert_no_credentials(
        &gw,
        &[
            &notebook,
            &intruder,
            &batch,
            &ghost,
            &wrong_audience,
            &expired,
        ],
    );
    // The upstream credential is the route's, never the caller's.
    let upstream = sim.last_request().unwrap();
    assert_eq!(upstream.header("authorization"), Some("Bearer sk-upstream"));
}

#[test]
fn api_keys_are_accepted_and_revoked_within_a_second() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("gov-key");
    let gw = Gateway::start(cp, &[]);
    let access = format!("  access:\n    - consumer: {ns}/partner\n");
    let [route] = serve(cp, &ns, &sim, [("keyed", &access)]);
    // An unlabelled Secret with an apiKey field is not a consumer.
    cp.apply(&secret_manifest(
        &ns,
        "partner-unlabelled",
        "apiKey",
        "pk-unlabelled-1",
    ));
    cp.apply(&api_key_secret(&ns, "partner", "pk-partner-first-1"));

    eventually(Duration::from_secs(10), || {
        status(&gw, &route, Some("pk-partner-first-1")) == 200
    })
    .unwrap_or_else(|_| panic!("the API key was not accepted:\n{}", gw.log()));
    let field = format!("\"consumer\":\"key/{ns}/partner\"");
    eventually(Duration::from_secs(2), || gw.log().contains(&field))
        .unwrap_or_else(|_| panic!("the consumer is not logged:\n{}", gw.log()));
    // A replica that starts later turns ready only once it knows the keys.
    let late = Gateway::start(cp, &[]);
    assert_eq!(status(&late, &route, Some("pk-partner-first-1")), 200);
    drop(late);
    // Credentials are optional by default: an invalid key counts as none, and a route the caller
    // may not use answers like a missing one.
    assert_eq!(status(&gw, &route, Some("pk-unlabelled-1")), 404);
    assert_eq!(status(&gw, &route, Some("pk-partner-wrong")), 404);
    assert_eq!(status(&gw, &route, None), 404);

    // Rotation: the old key stops working within a second, the new one works.
    cp.apply(&api_key_secret(&ns, "partner", "pk-partner-second-2"));
    let revoked = eventually(Duration::from_secs(1), || {
        status(&gw, &route, Some("pk-partner-first-1")) == 404
    })
    .expect("the old key still works a second after the Secret changed");
    eventually(Duration::from_secs(1), || {
        status(&gw, &route, Some("pk-partner-second-2")) == 200
    })
    .expect("the new key is not accepted");

    // Deletion revokes within a second.
    cp.ok(&["delete", "secret", "partner", "-n", &ns]);
    let deleted = eventually(Duration::from_secs(1), || {
        status(&gw, &route, Some("pk-partner-second-2")) == 404
    })
    .expect("the key still works a second after its Secret was deleted");
    println!("API key revoked {revoked:?} after a change, {deleted:?} after deletion");
    assert_no_credentials(
        &gw,
        &[
            "pk-partner-first-1",
            "pk-partner-second-2",
            "pk-unlabelled-1",
            "sk-upstream",
        ],
    );
}

fn assert_rate_limited(headers: &reqwest::header::HeaderMap, body: &Value, kind: &str) {
    assert_eq!(body["error"]["type"], "rate_limit_error", "{body}");
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("rate limit exceeded")
    );
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry));
    for name in ["limit", "remaining", "reset"] {
        assert!(
            headers.contains_key(format!("x-ratelimit-{name}-{kind}").as_str()),
            "x-ratelimit-{name}-{kind} missing: {headers:?}"
        );
    }
}

#[test]
fn calls_are_limited_per_route_and_per_consumer() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("gov-calls");
    let gw = Gateway::start(cp, &[]);
    cp.apply(&api_key_secret(&ns, "alice", "pk-alice-1"));
    cp.apply(&api_key_secret(&ns, "bob", "pk-bob-1"));
    let consumer_limit = format!(
        "  limits:\n    - renewalPeriod: day\n      calls: 2\n      key: consumer\n  access:\n    - consumer: {ns}/alice\n    - consumer: {ns}/bob\n"
    );
    let [per_route, per_consumer] = serve(
        cp,
        &ns,
        &sim,
        [
            (
                "per-route",
                "  limits:\n    - renewalPeriod: day\n      calls: 3\n",
            ),
            ("per-consumer", &consumer_limit),
        ],
    );
    // Status reports what is enforced.
    let st = cp.json(&["get", "-n", &ns, "route.portcullis.dev", &per_consumer]);
    eventually(Duration::from_secs(10), || {
        cp.json(&["get", "-n", &ns, "route.portcullis.dev", &per_consumer])
            .pointer("/status/limits/0/calls")
            == Some(&json!(2))
    })
    .unwrap_or_else(|_| panic!("status does not report the limits: {st}"));

    eventually(Duration::from_secs(10), || {
        status(&gw, &per_consumer, Some("pk-alice-1")) == 200
    })
    .expect("the API key never worked");
    sim.clear();

    let codes: Vec<u16> = (0..5).map(|_| status(&gw, &per_route, None)).collect();
    assert_eq!(codes, [200, 200, 200, 429, 429]);
    let (code, headers, body) = call(&gw, None, &chat_body(&per_route));
    assert_eq!(code, 429);
    assert_rate_limited(&headers, &body, "requests");
    assert_eq!(headers["x-ratelimit-limit-requests"], "3");
    assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
    // Limited calls never reach the provider.
    assert_eq!(sim.requests().len(), 3);

    // Alice used one of her two calls above; Bob's count is his own.
    assert_eq!(status(&gw, &per_consumer, Some("pk-alice-1")), 200);
    let (code, headers, body) = call(&gw, Some("pk-alice-1"), &chat_body(&per_consumer));
    assert_eq!(code, 429);
    assert_rate_limited(&headers, &body, "requests");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("per consumer")
    );
    assert_eq!(status(&gw, &per_consumer, Some("pk-bob-1")), 200);
    assert_eq!(status(&gw, &per_consumer, Some("pk-bob-1")), 200);
    assert_eq!(status(&gw, &per_consumer, Some("pk-bob-1")), 429);
    // The MLflow surfaces answer a 429 in their own shape, with the same headers.
    let resp = client()
        .post(gw.url(&format!("/endpoints/{per_route}/invocations")))
        .header("content-type", "application/json")
        .body(json!({"messages": [{"role": "user", "content": "hi"}]}).to_string())
        .send()
        .unwrap();
    assert_eq!(resp.status(), 429);
    let headers = resp.headers().clone();
    let body: Value = serde_json::from_str(&resp.text().unwrap()).unwrap();
    assert!(
        body["detail"]
            .as_str()
            .unwrap()
            .contains("rate limit exceeded"),
        "{body}"
    );
    assert!(
        headers.contains_key("retry-after")
            && headers.contains_key("x-ratelimit-remaining-requests")
    );
    assert_eq!(
        gw.get(&format!("/api/2.0/endpoints/{per_route}")).1["limit"],
        json!({"calls": 3, "key": "route", "renewal_period": "day"})
    );
    assert!(
        metric(
            &gw,
            &format!("portcullis_rate_limited_total{{route=\"{per_route}\",limit=\"calls\"}}")
        ) >= 3.0,
        "{}",
        gw.metrics()
    );
    assert_no_credentials(&gw, &["pk-alice-1", "pk-bob-1"]);
}

fn total_tokens(body: &Value) -> u64 {
    body["usage"]["total_tokens"].as_u64().expect("usage")
}

/// Reads an SSE answer to the end; returns the usage chunk's total.
fn stream_call(gw: &Gateway, route: &str, max_tokens: u64) -> (u16, Option<u64>) {
    let body = json!({"model": route, "stream": true, "max_tokens": max_tokens,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "hello there"}]});
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().unwrap_or_default();
    let usage = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(|v| v["usage"]["total_tokens"].as_u64());
    (status, usage)
}

#[test]
fn token_budgets_charge_up_front_and_settle_to_real_usage() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("gov-tokens");
    let gw = Gateway::start(cp, &[]);
    let budget = "  limits:\n    - renewalPeriod: day\n      tokens: 100\n";
    let [plain, streamed] = serve(
        cp,
        &ns,
        &sim,
        [("budget-plain", budget), ("budget-stream", budget)],
    );

    // Each call reserves about 63 tokens (prompt estimate + max_tokens 60) and really uses 22
    // (the simulated answer has 20 words). Without settling, the second call would not fit.
    let body = json!({"model": plain, "max_tokens": 60, "messages": [{"role": "user", "content": "hello there"}]});
    let (c1, _, b1) = call(&gw, None, &body);
    let (c2, _, b2) = call(&gw, None, &body);
    assert_eq!((c1, c2), (200, 200), "{b1} {b2}");
    let used = total_tokens(&b1) + total_tokens(&b2);
    assert!(used < 60, "the simulated answers are short: {used}");
    let (code, headers, body3) = call(&gw, None, &body);
    assert_eq!(code, 429, "{body3}");
    assert_rate_limited(&headers, &body3, "tokens");
    assert_eq!(headers["x-ratelimit-limit-tokens"], "100");
    assert_eq!(
        headers["x-ratelimit-remaining-tokens"],
        (100 - used).to_string().as_str()
    );
    // A smaller request still fits in what is left.
    let small = json!({"model": plain, "max_tokens": 10, "messages": [{"role": "user", "content": "hello there"}]});
    assert_eq!(call(&gw, None, &small).0, 200);

    // Streaming: settled from the final usage chunk.
    let (s1, u1) = stream_call(&gw, &streamed, 60);
    assert_eq!(s1, 200);
    let u1 = u1.expect("usage chunk");
    std::thread::sleep(Duration::from_millis(200));
    let (s2, u2) = stream_call(&gw, &streamed, 60);
    assert_eq!(s2, 200, "a streamed answer was not settled to its usage");
    std::thread::sleep(Duration::from_millis(200));
    let (code, headers, body) = call(
        &gw,
        None,
        &json!({"model": streamed, "max_tokens": 60, "messages": [{"role": "user", "content": "hello there"}]}),
    );
    assert_eq!(code, 429);
    assert_eq!(
        headers["x-ratelimit-remaining-tokens"],
        (100 - u1 - u2.unwrap()).to_string().as_str(),
        "{body}"
    );
}

/// A stream its caller leaves early is read to its end in the background and charged the
/// provider's final usage report, not just the few words the caller saw.
#[test]
fn a_stream_left_early_is_drained_and_charged_its_reported_usage() {
    let cp = ControlPlane::shared();
    let sim = sim();
    sim.set_behaviour(portcullis_sim::Behaviour {
        chunk_delay: Duration::from_millis(20),
        answer_words: 200,
        ..Default::default()
    });
    let ns = cp.namespace("gov-early");
    let gw = Gateway::start(cp, &[]);
    let [route] = serve(
        cp,
        &ns,
        &sim,
        [(
            "budget-early",
            "  limits:\n    - renewalPeriod: day\n      tokens: 1000\n",
        )],
    );

    // Reserve 903 tokens, read the first chunk, hang up.
    let body = json!({"model": route, "stream": true, "max_tokens": 900,
        "messages": [{"role": "user", "content": "hello there"}]});
    let mut resp = client()
        .post(gw.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .expect("request");
    assert_eq!(resp.status(), 200);
    let mut buf = [0u8; 64];
    let n = resp.read(&mut buf).expect("first chunk");
    assert!(n > 0);
    drop(resp);

    // The provider's stream runs to its end (about 4 s) and its usage, 2 + 200 tokens, is
    // charged: a call that would need 993 is refused with 798 left.
    let started = Instant::now();
    let too_big = json!({"model": route, "max_tokens": 990,
        "messages": [{"role": "user", "content": "hello there"}]});
    eventually(Duration::from_secs(15), || {
        let (code, headers, _) = call(&gw, None, &too_big);
        code == 429 && headers["x-ratelimit-remaining-tokens"] == "798"
    })
    .unwrap_or_else(|_| {
        panic!(
            "the stream left early was not charged its usage:\n{}",
            gw.log()
        )
    });
    println!("stream left early settled after {:?}", started.elapsed());
    assert_eq!(
        sim.cancelled_streams(),
        0,
        "the provider's stream was drained to its end"
    );
}

#[test]
fn two_replicas_share_one_limit_through_redis_and_survive_its_loss() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let mut redis = Redis::start();
    let ns = cp.namespace("gov-redis");
    let url = redis.url();
    let flags = shared_store_flags(&url);
    let a = Gateway::start(cp, &flags);
    let b = Gateway::start(cp, &flags);
    let [limited, roomy, budget] = serve(
        cp,
        &ns,
        &sim,
        [
            (
                "shared-limit",
                "  limits:\n    - renewalPeriod: day\n      calls: 40\n",
            ),
            (
                "roomy",
                "  limits:\n    - renewalPeriod: day\n      calls: 100000\n      tokens: 10000000\n",
            ),
            (
                "shared-budget",
                "  limits:\n    - renewalPeriod: day\n      tokens: 100\n",
            ),
        ],
    );

    // 120 calls from 4 threads spread over both replicas: one limit of 40 in all, not 40 each.
    let ok = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for t in 0..4 {
            let (a, b, ok, limited) = (&a, &b, &ok, &limited);
            s.spawn(move || {
                for i in 0..30 {
                    let gw = if (t + i) % 2 == 0 { a } else { b };
                    match status(gw, limited, None) {
                        200 => {
                            ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        429 => {}
                        other => panic!("unexpected status {other}"),
                    }
                }
            });
        }
    });
    let ok = ok.into_inner();
    assert!(
        (38..=42).contains(&ok),
        "{ok} calls passed a shared limit of 40"
    );
    assert_eq!(ok, 40, "the Lua script admits exactly the limit");
    for gw in [&a, &b] {
        assert_eq!(metric(gw, "portcullis_limits_fallback "), 0.0);
    }

    // A token budget is charged and settled in Redis: what one replica's answers used is what the
    // other sees left (each call reserves about 63 and uses 22).
    let body = json!({"model": budget, "max_tokens": 60, "messages": [{"role": "user", "content": "hello there"}]});
    let (c1, _, b1) = call(&a, None, &body);
    std::thread::sleep(Duration::from_millis(100));
    let (c2, _, b2) = call(&b, None, &body);
    assert_eq!((c1, c2), (200, 200), "{b1} {b2}");
    let used = total_tokens(&b1) + total_tokens(&b2);
    std::thread::sleep(Duration::from_millis(100));
    let (code, headers, refused) = call(&a, None, &body);
    assert_eq!(code, 429, "{refused}");
    assert_eq!(
        headers["x-ratelimit-remaining-tokens"],
        (100 - used).to_string().as_str()
    );

    // Redis goes away mid-test: both replicas keep serving, counting locally, and say so.
    redis.kill();
    for _ in 0..10 {
        assert_eq!(status(&a, &roomy, None), 200);
        assert_eq!(status(&b, &roomy, None), 200);
    }
    for gw in [&a, &b] {
        assert_eq!(
            metric(gw, "portcullis_limits_fallback "),
            1.0,
            "{}",
            gw.metrics()
        );
        assert!(metric(gw, "portcullis_limits_store_errors_total ") >= 1.0);
        eventually(Duration::from_secs(2), || {
            gw.log().contains("enforcing limits locally")
        })
        .unwrap_or_else(|_| panic!("no log line reports the fallback:\n{}", gw.log()));
    }

    // Redis comes back (empty): within the retry interval both replicas share counts again.
    let _redis = Redis::start_on(redis.port);
    for gw in [&a, &b] {
        eventually(Duration::from_secs(5), || {
            status(gw, &roomy, None) == 200 && metric(gw, "portcullis_limits_fallback ") == 0.0
        })
        .unwrap_or_else(|_| panic!("never went back to the shared store:\n{}", gw.log()));
    }
    let ok = (0..50)
        .filter(|i| status(if i % 2 == 0 { &a } else { &b }, &limited, None) == 200)
        .count();
    assert_eq!(ok, 40, "a fresh Redis window admits the whole limit once");
}

/// On every invocation path, a caller who may not use a route learns nothing about it: not its
/// type (no 400), not its readiness or Secret (no 503), only what a missing route answers.
#[test]
fn hidden_routes_answer_exactly_like_missing_ones_on_every_path() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("gov-hidden");
    cp.ok(&["create", "serviceaccount", "outsider", "-n", &ns]);
    let gw = Gateway::start(cp, &["--namespace", &ns]);
    let only_nobody = "  access:\n    - serviceAccount: nobody/none\n";
    // A public Route too: were every Route hidden, anonymous callers would get a 401 at once.
    let [chat, _public] = serve(cp, &ns, &sim, [("hidden", only_nobody), ("public", "")]);
    // A Route that is not ready (its Secret is missing) and hidden.
    let broken = unique("hidden-broken");
    cp.apply(&format!(
        "{}{only_nobody}",
        route_manifest(
            &ns,
            &broken,
            "llm/v1/chat",
            "no-such-secret",
            &sim.openai_base()
        )
    ));
    cp.wait_reason(&ns, &broken, "SecretNotFound");
    let outsider = cp.token(&ns, "outsider", "portcullis");

    let request = |path: &str, body: &Value, bearer: Option<&str>| -> (u16, String) {
        let mut headers = vec![("content-type", "application/json".to_string())];
        if let Some(b) = bearer {
            headers.push(("authorization", format!("Bearer {b}")));
        }
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        http_request("POST", &gw.url(path), Some(&body.to_string()), &headers)
    };
    let messages = json!({"messages": [{"role": "user", "content": "hi"}]});
    for name in [&chat, &broken] {
        for bearer in [None, Some(outsider.as_str()), Some("garbage")] {
            let cases = [
                ("/v1/chat/completions".to_string(), chat_body(name)),
                // The wrong surface for a chat route: a visible route would answer 400.
                (
                    "/v1/embeddings".to_string(),
                    json!({"model": name, "input": "x"}),
                ),
                (
                    "/v1/completions".to_string(),
                    json!({"model": name, "prompt": "x"}),
                ),
                (format!("/endpoints/{name}/invocations"), messages.clone()),
                (format!("/gateway/{name}/invocations"), messages.clone()),
            ];
            for (path, body) in cases {
                let (status, text) = request(&path, &body, bearer);
                let missing_path = path.replace(name.as_str(), "no-such-route");
                let mut missing_body = body.clone();
                if missing_body.get("model").is_some() {
                    missing_body["model"] = json!("no-such-route");
                }
                let (missing_status, missing_text) = request(&missing_path, &missing_body, bearer);
                assert_eq!(status, 404, "{path} as {bearer:?}: {text}");
                assert_eq!(
                    (status, text.replace(name.as_str(), "NAME")),
                    (
                        missing_status,
                        missing_text.replace("no-such-route", "NAME")
                    ),
                    "{path} as {bearer:?}"
                );
                assert!(!text.contains("SecretNotFound") && !text.contains("llm/v1/chat"));
            }
        }
    }
}
