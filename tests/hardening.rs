//! Hostile callers against the real gateway binary: slow and stalled clients never stop normal
//! traffic, and are cut at the listener's timeouts; unauthenticated callers cost no body buffer,
//! no in-flight slot and at most the review bucket's TokenReviews; a body's memory is bounded by
//! its size and a global budget.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: failing loudly is the point

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::*;

const TRICKLERS: usize = 300;
const STALLED_BODIES: usize = 100;

#[test]
fn slowloris_and_stalled_bodies_do_not_stop_a_normal_request_loop() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("slowloris");
    let gw = Gateway::start(
        cp,
        &[
            "--namespace",
            &ns,
            "--header-read-timeout",
            "3",
            "--body-read-timeout",
            "3",
            "--idle-timeout",
            "5",
        ],
    );
    cp.apply(&openai_manifests(&ns, "chat", "openai", "sk-1", &sim));
    cp.wait_ready(&ns, "chat");
    eventually(Duration::from_secs(10), || gw.chat("chat").0 == 200).expect("route never served");

    let addr = gw.addr.clone();
    let cut = Arc::new(AtomicUsize::new(0));
    let timed_out = Arc::new(AtomicUsize::new(0));
    let rt = runtime();
    let mut attackers = Vec::new();
    for _ in 0..TRICKLERS {
        let (addr, cut) = (addr.clone(), cut.clone());
        // One header byte per second; the server must close the connection by itself.
        attackers.push(rt.spawn(async move {
            let Ok(mut tcp) = TcpStream::connect(&addr).await else {
                return;
            };
            let head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\nx-slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
            for b in head {
                if tcp.write_all(&[*b]).await.is_err() {
                    cut.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let mut probe = [0u8; 64];
                match tokio::time::timeout(Duration::from_secs(1), tcp.read(&mut probe)).await {
                    Ok(Ok(_)) | Ok(Err(_)) => {
                        cut.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Err(_) => {}
                }
            }
        }));
    }
    for _ in 0..STALLED_BODIES {
        let (addr, timed_out) = (addr.clone(), timed_out.clone());
        // A complete head, half the announced body, then silence.
        attackers.push(rt.spawn(async move {
            let Ok(mut tcp) = TcpStream::connect(&addr).await else {
                return;
            };
            let raw = "POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\ncontent-length: 200\r\n\r\n{\"model\":\"chat\",\"messages\":[{\"role\":\"user\",\"content\":\"hello";
            if tcp.write_all(raw.as_bytes()).await.is_err() {
                return;
            }
            let mut answer = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_secs(30), tcp.read_to_end(&mut answer)).await;
            if answer.starts_with(b"HTTP/1.1 408") {
                timed_out.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    // Normal callers, meanwhile: every request succeeds, and quickly.
    let started = Instant::now();
    let mut served = 0;
    let mut slowest = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(8) {
        let t = Instant::now();
        let (status, body) = gw.chat("chat");
        assert_eq!(status, 200, "a normal request failed under attack: {body}");
        slowest = slowest.max(t.elapsed());
        served += 1;
    }
    assert!(served > 20, "only {served} requests in 8 s");
    assert!(
        slowest < Duration::from_secs(2),
        "a normal request took {slowest:?}"
    );

    rt.block_on(async {
        for a in attackers {
            let _ = a.await;
        }
    });
    assert_eq!(
        cut.load(Ordering::Relaxed),
        TRICKLERS,
        "every trickling connection is closed by the gateway before its head is complete"
    );
    assert_eq!(
        timed_out.load(Ordering::Relaxed),
        STALLED_BODIES,
        "every stalled body ends with 408"
    );
    assert_eq!(gw.chat("chat").0, 200);
}

/// Status, `Retry-After` and how long a chat call with `token` took.
fn chat_as(gw: &Gateway, token: &str) -> (u16, Option<String>, Duration) {
    let started = Instant::now();
    let resp = client()
        .post(gw.url("/v1/chat/completions"))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(r#"{"model": "chat", "messages": [{"role": "user", "content": "hi"}]}"#)
        .send();
    let took = started.elapsed();
    match resp {
        Ok(r) => (
            r.status().as_u16(),
            r.headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .map(String::from),
            took,
        ),
        Err(_) => (0, None, took),
    }
}

fn signal_apiserver(cp: &ControlPlane, sig: &str) {
    let pid = std::fs::read_to_string(cp.dir.join("apiserver.pid"))
        .unwrap_or_else(|e| panic!("apiserver pid: {e}"));
    let ok = std::process::Command::new("kill")
        .args([sig, pid.trim()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill {sig} apiserver");
}

#[test]
fn a_hanging_or_stopped_api_server_never_hangs_callers_and_cached_identities_keep_working() {
    let cp = ControlPlane::start_private();
    let sim = sim();
    let ns = cp.namespace("apiserver-faults");
    let known = cp.new_service_account_token(&ns, "known");
    let newcomer = cp.new_service_account_token(&ns, "newcomer");
    let late = cp.new_service_account_token(&ns, "late");
    let gw = Gateway::start(
        &cp,
        &[
            "--namespace",
            &ns,
            "--default-access",
            "authenticated",
            "--token-cache-ttl",
            "1",
        ],
    );
    cp.apply(&openai_manifests(&ns, "chat", "openai", "sk-1", &sim));
    cp.wait_ready(&ns, "chat");
    eventually(Duration::from_secs(10), || chat_as(&gw, &known).0 == 200)
        .expect("the known caller was never served");

    // Frozen: connections are accepted, nothing answers.
    signal_apiserver(&cp, "-STOP");
    std::thread::sleep(Duration::from_millis(1500));
    let (status, _, took) = chat_as(&gw, &known);
    assert_eq!(status, 200, "a cached identity stopped working");
    assert!(took < Duration::from_secs(10), "took {took:?}");
    let (status, retry_after, took) = chat_as(&gw, &newcomer);
    assert_eq!(status, 503, "a token that cannot be reviewed");
    assert!(retry_after.is_some(), "503 without Retry-After");
    assert!(
        took < Duration::from_secs(10),
        "the caller hung for {took:?}"
    );
    // After the first failure callers are not made to wait out the deadline again and again.
    for _ in 0..5 {
        let (status, _, took) = chat_as(&gw, &known);
        assert_eq!(status, 200);
        assert!(took < Duration::from_secs(2), "took {took:?}");
        let (status, _, took) = chat_as(&gw, &newcomer);
        assert_eq!(status, 503);
        assert!(took < Duration::from_secs(6), "took {took:?}");
    }
    assert_eq!(gw.get("/readyz").0, 200);

    // Stopped: connections are refused.
    signal_apiserver(&cp, "-CONT");
    cp.stop_apiserver();
    let (status, retry_after, took) = chat_as(&gw, &late);
    assert_eq!(status, 503);
    assert!(retry_after.is_some());
    assert!(took < Duration::from_secs(10), "took {took:?}");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        chat_as(&gw, &known).0,
        200,
        "a cached identity stopped working"
    );

    cp.start_apiserver();
    eventually(Duration::from_secs(30), || chat_as(&gw, &late).0 == 200)
        .expect("reviews never came back after the API server did");
}

#[test]
fn requests_beyond_the_in_flight_cap_are_shed_with_503_retry_after_and_a_metric() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("shed");
    let gw = Gateway::start(cp, &["--namespace", &ns, "--max-in-flight", "3"]);
    cp.apply(&openai_manifests(&ns, "chat", "openai", "sk-1", &sim));
    cp.wait_ready(&ns, "chat");
    eventually(Duration::from_secs(10), || gw.chat("chat").0 == 200).expect("route never served");

    sim.set_fault(portcullis_sim::Fault::Delay(Duration::from_secs(3)));
    let busy: Vec<_> = (0..3)
        .map(|_| {
            let url = gw.url("/v1/chat/completions");
            std::thread::spawn(move || {
                http_blocking(
                    "POST",
                    &url,
                    Some(r#"{"model":"chat","messages":[{"role":"user","content":"hi"}]}"#),
                )
                .0
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    let body = r#"{"model":"chat","messages":[{"role":"user","content":"hi"}]}"#;
    let (status, headers, text) = http_full(&gw.url("/v1/chat/completions"), body);
    assert_eq!(status, 503, "{text}");
    assert!(
        headers.iter().any(|(k, v)| k == "retry-after" && v == "1"),
        "{headers:?}"
    );
    let error: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    assert_eq!(error["error"]["code"], "overloaded", "{text}");
    let (status, _, text) = http_full(
        &gw.url("/gateway/chat/invocations"),
        r#"{"messages":[{"role":"user","content":"hi"}]}"#,
    );
    assert_eq!(status, 503);
    assert!(text.starts_with(r#"{"detail":"#), "MLflow's shape: {text}");
    assert_eq!(gw.get("/readyz").0, 200, "probes are never shed");
    assert!(
        gw.metrics().contains("portcullis_requests_shed_total 2"),
        "{}",
        gw.metrics()
    );

    for b in busy {
        assert_eq!(b.join().unwrap_or_default(), 200);
    }
    sim.set_fault(portcullis_sim::Fault::None);
    assert_eq!(gw.chat("chat").0, 200, "slots come back");
}

// ---------------------------------------------------------------------------------------------
// Second pass (issue 22): memory, slots and the API server are safe from unauthenticated callers.

/// Sends `raw` on a new connection and returns what comes back within `within` (the status line
/// first), without sending anything more.
fn raw_exchange(addr: &str, raw: &[u8], within: Duration) -> (String, Duration) {
    let started = Instant::now();
    let out = runtime().block_on(async {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(raw).await.expect("write");
        let mut out = vec![0u8; 4096];
        match tokio::time::timeout(within, tcp.read(&mut out)).await {
            Ok(Ok(n)) => out.truncate(n),
            _ => out.clear(),
        }
        out
    });
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

/// A request head announcing a body of `length` bytes, with `auth` headers, and no body.
fn head_only(path: &str, length: usize, auth: &str) -> Vec<u8> {
    format!("POST {path} HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n{auth}\r\n")
        .into_bytes()
}

/// A chat call as `bearer` (or anonymous): status and body text.
fn chat_text(gw: &Gateway, route: &str, bearer: Option<&str>) -> (u16, String) {
    let auth = bearer.map(|b| format!("Bearer {b}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    let body = format!(r#"{{"model":"{route}","messages":[{{"role":"user","content":"hi"}}]}}"#);
    http_request(
        "POST",
        &gw.url("/v1/chat/completions"),
        Some(&body),
        &headers,
    )
}

#[test]
fn callers_that_need_credentials_are_refused_before_their_body_is_read() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("before-body");
    let gw = Gateway::start(
        cp,
        &["--namespace", &ns, "--default-access", "authenticated"],
    );
    cp.apply(&openai_manifests(&ns, "chat", "openai", "sk-1", &sim));
    cp.wait_ready(&ns, "chat");
    let expired = unsigned_jwt("portcullis", -7200, "old");
    for path in [
        "/v1/chat/completions",
        "/v1/messages",
        "/v1/responses",
        "/gateway/chat/invocations",
    ] {
        for (who, auth, says) in [
            ("anonymous", String::new(), "missing or invalid credentials"),
            (
                "a placeholder key",
                "authorization: Bearer sk-xxx\r\n".to_string(),
                "missing or invalid credentials",
            ),
            (
                "an expired token",
                format!("authorization: Bearer {expired}\r\n"),
                "expired",
            ),
        ] {
            // The body never comes: the answer must not wait for it.
            let (answer, took) = raw_exchange(
                &gw.addr,
                &head_only(path, 1_000_000, &auth),
                Duration::from_secs(5),
            );
            assert!(
                answer.starts_with("HTTP/1.1 401"),
                "{who} on {path}: {answer:?}"
            );
            assert!(answer.contains(says), "{who} on {path}: {answer}");
            assert!(took < Duration::from_secs(3), "{who} on {path}: {took:?}");
        }
    }

    // Under allow-all, a namespace whose every Route has access rules: anonymous callers too.
    let locked_ns = cp.namespace("before-body-locked");
    let locked = Gateway::start(cp, &["--namespace", &locked_ns]);
    cp.apply(&format!(
        "{}---\n{}  access:\n    - serviceAccount: {locked_ns}/nobody\n",
        secret_manifest(&locked_ns, "openai", "apiKey", "sk-1"),
        route_manifest(
            &locked_ns,
            "chat",
            "llm/v1/chat",
            "openai",
            &sim.openai_base()
        )
    ));
    cp.wait_ready(&locked_ns, "chat");
    let (answer, took) = raw_exchange(
        &locked.addr,
        &head_only("/v1/chat/completions", 1_000_000, ""),
        Duration::from_secs(5),
    );
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[test]
fn request_bodies_are_capped_and_share_one_budget() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("budget");
    let gw = Gateway::start(
        cp,
        &[
            "--namespace",
            &ns,
            "--max-buffered-request-bytes",
            "1500000",
        ],
    );
    cp.apply(&openai_manifests(&ns, "chat", "openai", "sk-1", &sim));
    cp.wait_ready(&ns, "chat");
    eventually(Duration::from_secs(10), || gw.chat("chat").0 == 200).expect("route never served");
    let padded = |len: usize| {
        let text = "x".repeat(len);
        format!(r#"{{"model":"chat","messages":[{{"role":"user","content":"{text}"}}]}}"#)
    };

    // The per-request cap is 2 MiB by default.
    let (status, text) = gw.post_raw("/v1/chat/completions", &padded(2 * 1024 * 1024 + 10));
    assert_eq!(status, 413, "{text}");

    // Two bodies held half-way hold 1.3 MB of the 1.5 MB budget ...
    let held: Vec<_> = (0..2)
        .map(|_| {
            let addr = gw.addr.clone();
            runtime().spawn(async move {
                let mut tcp = TcpStream::connect(&addr).await.expect("connect");
                let head = head_only("/v1/chat/completions", 700_000, "");
                tcp.write_all(&head).await.expect("head");
                tcp.write_all(&vec![b' '; 650_000]).await.expect("body");
                tokio::time::sleep(Duration::from_secs(4)).await;
                drop(tcp);
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1000));
    // ... so a third is refused with a 503 in the dialect of its surface, not buffered.
    let (status, headers, text) = http_full(&gw.url("/v1/chat/completions"), &padded(300_000));
    assert_eq!(status, 503, "{text}");
    assert_eq!(header(&headers, "retry-after"), Some("1"));
    assert!(text.contains(r#""code":"overloaded""#), "{text}");
    let (status, _, text) = http_full(
        &gw.url("/gateway/chat/invocations"),
        &padded(300_000).replace(r#""model":"chat","#, ""),
    );
    assert_eq!(status, 503, "{text}");
    assert!(text.starts_with(r#"{"detail":"#), "MLflow's shape: {text}");
    runtime().block_on(async {
        for h in held {
            let _ = h.await;
        }
    });
    // Given back once those requests ended.
    eventually(Duration::from_secs(10), || {
        gw.post_raw("/v1/chat/completions", &padded(300_000)).0 == 200
    })
    .expect("the budget was not given back");
}

#[test]
fn the_worst_shaped_bodies_cost_a_small_multiple_of_their_size() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("shapes");
    let gw = Gateway::start(cp, &["--namespace", &ns]);
    cp.apply(&openai_manifests(&ns, "chat", "openai", "sk-1", &sim));
    cp.wait_ready(&ns, "chat");
    eventually(Duration::from_secs(10), || gw.chat("chat").0 == 200).expect("route never served");
    let body = |item: &str, n: usize| {
        format!(
            r#"{{"model":"chat","messages":[{{"role":"user","content":"hi"}}],"metadata_list":[{}]}}"#,
            vec![item; n].join(",")
        )
    };
    let two_mib = 2 * 1024 * 1024 - 200;
    let mut worst_growth = 0u64;
    for (shape, text, refused) in [
        ("one-key objects", body(r#"{"a":0}"#, two_mib / 8), true),
        ("empty objects", body("{}", two_mib / 3), true),
        ("zeros", body("0", two_mib / 2), true),
        // The largest list of one-key objects the parse bound lets through (about 15 MiB parsed).
        (
            "one-key objects, accepted",
            body(r#"{"a":0}"#, 18_000),
            false,
        ),
    ] {
        let before = proc_kib(gw.pid(), "VmHWM");
        let (status, answer) = gw.post_raw("/v1/chat/completions", &text);
        let after = proc_kib(gw.pid(), "VmHWM");
        let growth = after.saturating_sub(before);
        println!(
            "{shape}: {} bytes -> {status}, peak RSS {before} -> {after} KiB (+{growth} KiB)",
            text.len()
        );
        if refused {
            assert_eq!(status, 413, "{shape}: {answer}");
            assert!(answer.contains("in memory"), "{answer}");
        } else {
            assert_ne!(status, 413, "{shape}: {answer}");
        }
        worst_growth = worst_growth.max(growth);
    }
    // Parsed, 2 MiB of one-key objects took about 180 MiB; now no shape takes much more than the
    // parse bound (8 x --body-limit) plus the body itself.
    assert!(
        worst_growth < 48 * 1024,
        "peak RSS grew by {worst_growth} KiB"
    );
}

#[test]
fn trickling_bodies_hold_no_in_flight_slot_and_end_at_the_body_deadline() {
    // The point of 4,100 trickling bodies against 4,096 slots, made with 32 slots and 200 bodies.
    const SLOTS: &str = "32";
    const TRICKLING: usize = 200;
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("trickle");
    let caller = cp.new_service_account_token(&ns, "caller");
    let gw = Gateway::start(
        cp,
        &[
            "--namespace",
            &ns,
            "--max-in-flight",
            SLOTS,
            "--body-timeout",
            "5",
        ],
    );
    cp.apply(&openai_manifests(&ns, "chat", "openai", "sk-1", &sim));
    cp.wait_ready(&ns, "chat");
    eventually(Duration::from_secs(10), || {
        chat_text(&gw, "chat", Some(&caller)).0 == 200
    })
    .expect("route never served");

    let cut = Arc::new(AtomicUsize::new(0));
    let mut tricklers = Vec::new();
    for _ in 0..TRICKLING {
        let (addr, cut) = (gw.addr.clone(), cut.clone());
        // Anonymous, a byte every 300 ms: never a pause long enough for --body-read-timeout.
        tricklers.push(runtime().spawn(async move {
            let Ok(mut tcp) = TcpStream::connect(&addr).await else {
                return;
            };
            let head = head_only("/v1/chat/completions", 10_000, "");
            if tcp.write_all(&head).await.is_err() || tcp.write_all(b"{").await.is_err() {
                return;
            }
            let started = Instant::now();
            let mut answer = [0u8; 64];
            while started.elapsed() < Duration::from_secs(20) {
                match tokio::time::timeout(Duration::from_millis(300), tcp.read(&mut answer)).await
                {
                    Ok(Ok(n)) if answer[..n].starts_with(b"HTTP/1.1 408") => {
                        if started.elapsed() < Duration::from_secs(9) {
                            cut.fetch_add(1, Ordering::Relaxed);
                        }
                        return;
                    }
                    Ok(_) => return,
                    Err(_) => {
                        if tcp.write_all(b" ").await.is_err() {
                            return;
                        }
                    }
                }
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let mut served = 0;
    while started.elapsed() < Duration::from_secs(4) {
        let (status, text) = chat_text(&gw, "chat", Some(&caller));
        assert_eq!(
            status, 200,
            "an authenticated call under the trickle: {text}"
        );
        served += 1;
    }
    assert!(served > 5, "only {served} calls in 4 s");
    runtime().block_on(async {
        for t in tricklers {
            let _ = t.await;
        }
    });
    assert_eq!(
        cut.load(Ordering::Relaxed),
        TRICKLING,
        "every trickling body ends with 408 at --body-timeout"
    );
    assert!(
        gw.metrics().contains("portcullis_requests_shed_total 0"),
        "{}",
        gw.metrics()
    );
}

#[test]
fn junk_tokens_cost_at_most_the_review_bucket_while_known_callers_are_served() {
    const RATE: f64 = 5.0;
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("junk-jwt");
    let known = cp.new_service_account_token(&ns, "known");
    let gw = Gateway::start(
        cp,
        &[
            "--namespace",
            &ns,
            "--default-access",
            "authenticated",
            "--token-review-rate",
            "5",
        ],
    );
    cp.apply(&openai_manifests(&ns, "chat", "openai", "sk-1", &sim));
    cp.wait_ready(&ns, "chat");
    eventually(Duration::from_secs(10), || {
        chat_text(&gw, "chat", Some(&known)).0 == 200
    })
    .expect("the known caller was never served");
    let reviews_before = metric_sum(&gw.metrics(), "portcullis_token_reviews_total");

    // As many distinct junk tokens (right audience, future expiry, bad signature) as the machine
    // sends in 10 s, from 64 connections, while the known caller keeps calling.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let odd = Arc::new(AtomicUsize::new(0));
    let _ = client(); // installs the TLS provider reqwest's builder needs
    let client = reqwest::Client::new();
    let flood: Vec<_> = (0..64)
        .map(|w| {
            let (stop, sent, odd, client) =
                (stop.clone(), sent.clone(), odd.clone(), client.clone());
            let url = gw.url("/v1/chat/completions");
            runtime().spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let token = unsigned_jwt("portcullis", 3600, &format!("junk-{w}-{i}"));
                    let status = client
                        .post(&url)
                        .bearer_auth(token)
                        .header("content-type", "application/json")
                        .body(r#"{"model":"chat","messages":[{"role":"user","content":"hi"}]}"#)
                        .send()
                        .await
                        .map_or(0, |r| r.status().as_u16());
                    sent.fetch_add(1, Ordering::Relaxed);
                    if status != 401 && status != 503 {
                        odd.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let started = Instant::now();
    let mut known_calls = 0;
    while started.elapsed() < Duration::from_secs(10) {
        let (status, text) = chat_text(&gw, "chat", Some(&known));
        assert_eq!(status, 200, "the known caller under the flood: {text}");
        known_calls += 1;
    }
    stop.store(true, Ordering::Relaxed);
    runtime().block_on(async {
        for f in flood {
            let _ = f.await;
        }
    });
    let elapsed = started.elapsed().as_secs_f64();
    let reviews = metric_sum(&gw.metrics(), "portcullis_token_reviews_total") - reviews_before;
    let sent = sent.load(Ordering::Relaxed);
    println!(
        "{sent} junk tokens in {elapsed:.1} s ({:.0}/s): {reviews} TokenReviews; {known_calls} calls of the known caller",
        sent as f64 / elapsed
    );
    assert!(sent > 1000, "only {sent} junk tokens sent");
    assert_eq!(
        odd.load(Ordering::Relaxed),
        0,
        "junk tokens answered other than 401/503"
    );
    assert!(
        reviews <= RATE + RATE * (elapsed + 1.0),
        "{reviews} reviews for {sent} junk tokens in {elapsed:.1} s"
    );
}

#[test]
fn a_bad_token_is_a_401_that_says_why_on_every_path() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("bad-token");
    cp.ok(&["create", "serviceaccount", "notebook", "-n", &ns]);
    let gw = Gateway::start(cp, &["--namespace", &ns]);
    cp.apply(&format!(
        "{}---\n{}---\n{}  access:\n    - serviceAccount: {ns}/notebook\n",
        secret_manifest(&ns, "openai", "apiKey", "sk-1"),
        route_manifest(&ns, "open", "llm/v1/chat", "openai", &sim.openai_base()),
        route_manifest(&ns, "locked", "llm/v1/chat", "openai", &sim.openai_base()),
    ));
    cp.wait_ready(&ns, "open");
    cp.wait_ready(&ns, "locked");
    let notebook = cp.token(&ns, "notebook", "portcullis");
    eventually(Duration::from_secs(10), || {
        chat_text(&gw, "locked", Some(&notebook)).0 == 200
    })
    .expect("the allowed caller was never served");

    let other_audience = cp.token(&ns, "notebook", "someone-else");
    let expired = unsigned_jwt("portcullis", -7200, "old");
    let forged = unsigned_jwt("portcullis", 3600, "forged");
    let messages = r#"{"messages":[{"role":"user","content":"hi"}]}"#;
    for (token, says) in [
        (other_audience.as_str(), "audience"),
        (expired.as_str(), "expired"),
        (forged.as_str(), "rejected"),
    ] {
        let auth = format!("Bearer {token}");
        let headers = [
            ("content-type", "application/json"),
            ("authorization", auth.as_str()),
        ];
        for route in ["locked", "open", "no-such-route"] {
            let body =
                format!(r#"{{"model":"{route}","messages":[{{"role":"user","content":"hi"}}]}}"#);
            for (method, path, body) in [
                (
                    "POST",
                    "/v1/chat/completions".to_string(),
                    Some(body.as_str()),
                ),
                (
                    "POST",
                    format!("/gateway/{route}/invocations"),
                    Some(messages),
                ),
                (
                    "POST",
                    format!("/endpoints/{route}/invocations"),
                    Some(messages),
                ),
                ("GET", format!("/v1/models/{route}"), None),
                ("GET", "/v1/models".to_string(), None),
            ] {
                let (status, text) = http_request(method, &gw.url(&path), body, &headers);
                assert_eq!(status, 401, "{says} token on {path}: {text}");
                assert!(text.contains(says), "{says} token on {path}: {text}");
            }
        }
    }
    // Values that are not tokens (SDK placeholders) are no credential under allow-all.
    for placeholder in ["sk-xxx", "EMPTY"] {
        assert_eq!(chat_text(&gw, "open", Some(placeholder)).0, 200);
        assert_eq!(chat_text(&gw, "locked", Some(placeholder)).0, 404);
    }
}

#[test]
fn a_service_account_and_an_api_key_of_the_same_name_are_two_consumers() {
    let cp = ControlPlane::shared();
    let sim = sim();
    let ns = cp.namespace("twins");
    let sa = cp.new_service_account_token(&ns, "twin");
    let gw = Gateway::start(cp, &["--namespace", &ns]);
    cp.apply(&format!(
        "{}---\n{}---\n{}  access:\n    - serviceAccount: {ns}/twin\n    - consumer: {ns}/twin\n  limits:\n    - renewalPeriod: day\n      calls: 1\n      key: consumer\n",
        secret_manifest(&ns, "openai", "apiKey", "sk-1"),
        api_key_secret(&ns, "twin", "pk-twin-0123456789"),
        route_manifest(&ns, "chat", "llm/v1/chat", "openai", &sim.openai_base()),
    ));
    cp.wait_ready(&ns, "chat");
    let key = "pk-twin-0123456789";
    eventually(Duration::from_secs(10), || {
        chat_text(&gw, "chat", Some(&sa)).0 == 200
    })
    .expect("the ServiceAccount was never served");
    // The key is known once its Secret is watched (until then the Route answers 404).
    let mut answer = chat_text(&gw, "chat", Some(key));
    let started = Instant::now();
    while answer.0 == 404 && started.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
        answer = chat_text(&gw, "chat", Some(key));
    }
    assert_eq!(
        answer.0, 200,
        "the API key shares the ServiceAccount's counter: {}",
        answer.1
    );
    assert_eq!(chat_text(&gw, "chat", Some(&sa)).0, 429);
    assert_eq!(chat_text(&gw, "chat", Some(key)).0, 429);
    let metrics = gw.metrics();
    for consumer in [format!("sa/{ns}/twin"), format!("key/{ns}/twin")] {
        assert!(
            metrics.contains(&format!("consumer=\"{consumer}\"")),
            "{consumer}: {metrics}"
        );
        let field = format!("\"consumer\":\"{consumer}\"");
        eventually(Duration::from_secs(2), || gw.log().contains(&field))
            .unwrap_or_else(|_| panic!("{consumer} not logged"));
    }
}

/// An answer given before the request's body was read (an unknown route on a per-route path) says
/// `connection: close` when the gateway will not keep the connection: a pooling client (MLflow's,
/// `requests`) then opens a new one instead of sending its next call into a closed socket. A body
/// that had fully arrived keeps the connection.
#[test]
fn an_answer_before_the_body_closes_the_connection_only_when_it_says_so() {
    let cp = ControlPlane::shared();
    let ns = cp.namespace("early");
    let gw = Gateway::start(cp, &["--namespace", &ns]);
    let body = br#"{"prompt": "x"}"#;
    let head = |path: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
    };
    for pause in [Duration::ZERO, Duration::from_millis(200)] {
        let (first, second) = runtime().block_on(async {
            let mut tcp = TcpStream::connect(&gw.addr).await.expect("connect");
            // Head and body in two writes, as Python's http.client sends them.
            tcp.write_all(head("/gateway/no-such-route/invocations").as_bytes())
                .await
                .expect("head");
            tokio::time::sleep(pause).await;
            let _ = tcp.write_all(body).await;
            let first = read_answer(&mut tcp).await;
            let _ = tcp
                .write_all(b"GET /healthz HTTP/1.1\r\nhost: gateway\r\n\r\n")
                .await;
            let second = read_answer(&mut tcp).await;
            (first, second)
        });
        assert!(first.starts_with("HTTP/1.1 404"), "{pause:?}: {first:?}");
        let closes = first.to_ascii_lowercase().contains("connection: close");
        // Kept: the next request is answered. Not kept: the answer said so.
        assert!(
            closes || second.starts_with("HTTP/1.1 200"),
            "{pause:?}: the connection closed without saying so: {first:?} then {second:?}"
        );
    }
}

/// One HTTP/1.1 answer's head and small body (or what arrived before the peer closed).
async fn read_answer(tcp: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(2), tcp.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out);
        if let Some(end) = text.find("\r\n\r\n") {
            let length = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(str::to_string)
                })
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if out.len() >= end + 4 + length {
                break;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
