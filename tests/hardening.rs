//! Hostile callers against the real gateway binary: slow and stalled clients never stop normal
//! traffic, and are cut at the listener's timeouts.

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
