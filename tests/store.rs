//! The shared store in production shapes, with real `redis-server` processes: TLS with a CA and
//! client certificate made here by `openssl`, an ACL user whose password file is rotated,
//! Sentinel failover under load, a three-primary Cluster, and a store that answers slowly or
//! with garbage. The gateways are `portcullis serve` on files (no control plane needed).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use support::{
    Gateway, Redis, RedisCluster, eventually, free_port, post_full, secret_manifest,
    shared_store_flags,
};

/// A Route `name` on the simulated provider at a cent per call (10 output tokens at $1000 per
/// million), with `limits` (spec YAML).
fn route(name: &str, base: &str, limits: &str) -> String {
    format!(
        "apiVersion: portcullis.dev/v1alpha1\nkind: Route\nmetadata:\n  name: {name}\nspec:\n  routeType: llm/v1/chat\n  model:\n    provider: openai\n    name: gpt-4o-mini\n    apiBase: {base}\n    secretRef:\n      name: openai\n  pricing:\n    inputPerMillion: 0\n    outputPerMillion: 1000\n{limits}"
    )
}

fn routes_file(dir: &Path, routes: &[String]) -> PathBuf {
    let mut docs = vec![secret_manifest("default", "openai", "apiKey", "sk-store")];
    docs.extend(routes.iter().cloned());
    let path = dir.join("routes.yaml");
    std::fs::write(&path, docs.join("---\n")).unwrap();
    path
}

fn call(gw: &Gateway, route: &str) -> u16 {
    let body = json!({"model": route, "max_tokens": 10, "messages": [{"role": "user", "content": "hello there"}]});
    post_full(&gw.url("/v1/chat/completions"), &body).0
}

fn metric(gw: &Gateway, prefix: &str) -> f64 {
    gw.metrics()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`{ca}.pem`), and a certificate it signs for `name` (`{name}.pem`, `{name}.key`) valid
/// for localhost and 127.0.0.1.
fn certificate(dir: &Path, ca: &str, name: &str) {
    if !dir.join(format!("{ca}.pem")).exists() {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN={ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
            ],
        );
    }
    std::fs::write(
        dir.join(format!("{name}.ext")),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

/// The value of the one counter key matching `pattern` on `redis`.
fn counter(redis: &Redis, pattern: &str) -> u64 {
    let keys = redis.cli(&["--scan", "--pattern", pattern]);
    keys.lines()
        .filter(|k| !k.is_empty())
        .map(|k| redis.cli(&["GET", k]).trim().parse::<u64>().unwrap_or(0))
        .sum()
}

/// TLS with mutual authentication, an ACL user limited to the gateway's keys, its password read
/// from a file that is rotated while the gateway runs; a gateway trusting another CA refuses the
/// store's certificate, says why, and counts alone.
#[test]
fn tls_with_an_acl_user_whose_password_file_rotates_and_a_wrong_ca_refused() {
    let sim = support::sim();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    certificate(d, "ca", "server");
    certificate(d, "ca", "client");
    certificate(d, "other-ca", "impostor");
    let path = |f: &str| d.join(f).display().to_string();
    let tls_port = free_port();
    let redis = Redis::start_with(
        free_port(),
        &[
            "--tls-port",
            &tls_port.to_string(),
            "--tls-cert-file",
            &path("server.pem"),
            "--tls-key-file",
            &path("server.key"),
            "--tls-ca-cert-file",
            &path("ca.pem"),
            "--tls-auth-clients",
            "yes",
        ],
    );
    // Least privilege: the gateway's user reaches only the gateway's keys.
    redis.cli(&[
        "ACL",
        "SETUSER",
        "gateway",
        "on",
        ">first-pass-1b7c",
        "~portcullis:*",
        "+@all",
    ]);
    let password = d.join("password");
    std::fs::write(&password, "first-pass-1b7c\n").unwrap();
    let file = routes_file(
        d,
        &[route(
            "chat",
            &sim.openai_base(),
            "  limits:\n    - renewalPeriod: day\n      calls: 1000\n",
        )],
    );
    let url = format!("rediss://gateway@localhost:{tls_port}");
    let (ca, cert, key, pw) = (
        path("ca.pem"),
        path("client.pem"),
        path("client.key"),
        password.display().to_string(),
    );
    let flags = [
        "--limits-store",
        &url,
        "--store-ca-file",
        &ca,
        "--store-client-cert",
        &cert,
        "--store-client-key",
        &key,
        "--store-password-file",
        &pw,
        "--replicas",
        "2",
        // Counts are checked exactly: no fallback on a busy runner.
        "--store-timeout",
        "1s",
    ];
    let gw = Gateway::serve(&[&file], &flags, &[]);
    for _ in 0..3 {
        assert_eq!(call(&gw, "chat"), 200);
    }
    assert_eq!(
        counter(&redis, "portcullis:chat:0:calls:*"),
        3,
        "{}",
        gw.log()
    );
    assert_eq!(metric(&gw, "portcullis_limits_fallback "), 0.0);

    // Rotation as an operator does it: the new password is added to the user, the Secret
    // changes, the old password is removed and its connections closed.
    redis.cli(&["ACL", "SETUSER", "gateway", ">second-pass-9e2d"]);
    std::fs::write(&password, "second-pass-9e2d\n").unwrap();
    eventually(Duration::from_secs(10), || {
        gw.log().contains("the store password file changed")
    })
    .unwrap_or_else(|_| panic!("the password file change was not noticed:\n{}", gw.log()));
    redis.cli(&["ACL", "SETUSER", "gateway", "<first-pass-1b7c"]);
    redis.cli(&["CLIENT", "KILL", "USER", "gateway"]);
    // Calls keep being answered; within the retry interval they are counted in the store again.
    let before = counter(&redis, "portcullis:chat:0:calls:*");
    eventually(Duration::from_secs(10), || {
        assert_eq!(call(&gw, "chat"), 200);
        counter(&redis, "portcullis:chat:0:calls:*") > before
            && metric(&gw, "portcullis_limits_fallback ") == 0.0
    })
    .unwrap_or_else(|_| {
        panic!(
            "never counted in the store with the new password:\n{}",
            gw.log()
        )
    });

    // Another CA: the handshake is refused, the log says why, the calls are answered and counted
    // by this replica alone.
    let other = path("other-ca.pem");
    let wrong = Gateway::serve(
        &[&file],
        &[
            "--limits-store",
            &url,
            "--store-ca-file",
            &other,
            "--store-client-cert",
            &cert,
            "--store-client-key",
            &key,
            "--store-password-file",
            &pw,
            "--replicas",
            "2",
        ],
        &[],
    );
    assert_eq!(call(&wrong, "chat"), 200);
    eventually(Duration::from_secs(5), || {
        metric(&wrong, "portcullis_limits_fallback ") == 1.0
            && wrong.log().contains("cannot connect to the shared store")
    })
    .unwrap_or_else(|_| panic!("no fallback reported:\n{}", wrong.log()));
    let log = wrong.log();
    let line = log
        .lines()
        .find(|l| l.contains("cannot connect to the shared store"))
        .unwrap();
    assert!(line.contains("UnknownIssuer"), "{line}");

    // Verification turned off: the same wrong CA is accepted, with a loud warning.
    let unverified = Gateway::serve(
        &[&file],
        &[
            "--limits-store",
            &url,
            "--store-ca-file",
            &other,
            "--store-client-cert",
            &cert,
            "--store-client-key",
            &key,
            "--store-password-file",
            &pw,
            "--store-tls-insecure-skip-verify",
        ],
        &[],
    );
    assert_eq!(call(&unverified, "chat"), 200);
    assert_eq!(
        metric(&unverified, "portcullis_limits_fallback "),
        0.0,
        "{}",
        unverified.log()
    );
    assert!(unverified.log().contains("certificate is NOT verified"));

    // A password in the URL still works, with a warning.
    let inline = format!("rediss://gateway:second-pass-9e2d@localhost:{tls_port}");
    let warned = Gateway::serve(
        &[&file],
        &[
            "--limits-store",
            &inline,
            "--store-ca-file",
            &ca,
            "--store-client-cert",
            &cert,
            "--store-client-key",
            &key,
        ],
        &[],
    );
    assert_eq!(call(&warned, "chat"), 200);
    assert!(
        warned
            .log()
            .contains("the --limits-store URL carries a password")
    );
    assert_eq!(
        metric(&warned, "portcullis_limits_fallback "),
        0.0,
        "{}",
        warned.log()
    );

    for g in [&gw, &wrong, &unverified, &warned] {
        let (log, metrics) = (g.log(), g.metrics());
        for secret in ["first-pass-1b7c", "second-pass-9e2d"] {
            assert!(!log.contains(secret) && !metrics.contains(secret), "{log}");
        }
    }
}

/// A TCP proxy in front of the store whose replies can be delayed.
struct SlowProxy {
    port: u16,
    delay_ms: Arc<AtomicU64>,
}

impl SlowProxy {
    fn start(target: u16) -> SlowProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let delay_ms = Arc::new(AtomicU64::new(0));
        let delay = delay_ms.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let Ok(upstream) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let (mut from_client, mut to_upstream) =
                    (client.try_clone().unwrap(), upstream.try_clone().unwrap());
                std::thread::spawn(move || std::io::copy(&mut from_client, &mut to_upstream));
                let (mut from_upstream, mut to_client, delay) = (upstream, client, delay.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = from_upstream.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(delay.load(Ordering::Relaxed)));
                        if to_client.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        SlowProxy { port, delay_ms }
    }
}

/// A store that answers late or with garbage never fails a call and never holds one longer than
/// --store-timeout: the replica counts alone, says so, and returns to the store when it answers.
#[test]
fn a_slow_or_garbled_store_costs_a_call_at_most_the_store_timeout() {
    let sim = support::sim();
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start();
    let proxy = SlowProxy::start(redis.port);
    let file = routes_file(
        dir.path(),
        &[route(
            "chat",
            &sim.openai_base(),
            "  limits:\n    - renewalPeriod: day\n      calls: 1000\n",
        )],
    );
    let url = format!("redis://127.0.0.1:{}", proxy.port);
    let gw = Gateway::serve(
        &[&file],
        &[
            "--limits-store",
            &url,
            "--store-timeout",
            "50ms",
            "--replicas",
            "2",
        ],
        &[],
    );
    // The first call may find the connection still being made.
    eventually(Duration::from_secs(5), || {
        call(&gw, "chat") == 200 && counter(&redis, "portcullis:chat:0:calls:*") >= 1
    })
    .unwrap_or_else(|_| panic!("never counted in the store:\n{}", gw.log()));
    let timed = |gw: &Gateway| {
        let start = Instant::now();
        assert_eq!(call(gw, "chat"), 200);
        start.elapsed()
    };
    let fast = (0..5).map(|_| timed(&gw)).max().unwrap();

    // Replies 400 ms late: every call is answered well before that.
    proxy.delay_ms.store(400, Ordering::Relaxed);
    let errors = metric(&gw, "portcullis_limits_store_errors_total");
    let slow: Vec<Duration> = (0..10).map(|_| timed(&gw)).collect();
    let worst = *slow.iter().max().unwrap();
    assert!(
        worst < fast + Duration::from_millis(200),
        "a slow store held a call {worst:?} (fast calls: {fast:?}); {slow:?}"
    );
    assert_eq!(metric(&gw, "portcullis_limits_fallback "), 1.0);
    assert!(metric(&gw, "portcullis_limits_store_errors_total") > errors);

    // Fast again: back to the store within the retry interval.
    proxy.delay_ms.store(0, Ordering::Relaxed);
    eventually(Duration::from_secs(10), || {
        call(&gw, "chat") == 200 && metric(&gw, "portcullis_limits_fallback ") == 0.0
    })
    .unwrap_or_else(|_| panic!("never back to the store:\n{}", gw.log()));

    // Garbage: the counter is a hash, then a string that is not a number.
    let key = redis
        .cli(&["--scan", "--pattern", "portcullis:chat:0:calls:*"])
        .trim()
        .to_string();
    let errors = metric(&gw, "portcullis_limits_store_errors_total");
    redis.cli(&["DEL", &key]);
    redis.cli(&["HSET", &key, "a", "b"]);
    for _ in 0..3 {
        assert_eq!(call(&gw, "chat"), 200);
    }
    assert!(metric(&gw, "portcullis_limits_store_errors_total") > errors);
    redis.cli(&["DEL", &key]);
    redis.cli(&["SET", &key, "not-a-number"]);
    std::thread::sleep(Duration::from_millis(1100));
    let errors = metric(&gw, "portcullis_limits_store_errors_total");
    for _ in 0..3 {
        assert_eq!(call(&gw, "chat"), 200);
    }
    assert!(
        metric(&gw, "portcullis_limits_store_errors_total") > errors,
        "{}",
        gw.log()
    );
}

/// One primary, one replica, three Sentinels; two gateways under load while the primary is
/// killed. Every call is answered (200 or 429), the gateways follow the promoted replica, and
/// the admitted count stays within the README's bound: the replicas counting alone start from
/// the store's last counts and hand what they admitted back to the new primary.
#[test]
fn sentinel_failover_under_load_follows_the_new_primary_within_the_bound() {
    let sim = support::sim();
    let dir = tempfile::tempdir().unwrap();
    let mut primary = Redis::start();
    let replica = Redis::start_with(
        free_port(),
        &["--replicaof", "127.0.0.1", &primary.port.to_string()],
    );
    eventually(Duration::from_secs(10), || {
        replica
            .cli(&["INFO", "replication"])
            .contains("master_link_status:up")
    })
    .expect("the replica never synced");
    let sentinels: Vec<Redis> = (0..3)
        .map(|_| Redis::sentinel(free_port(), dir.path(), "main", primary.port))
        .collect();
    eventually(Duration::from_secs(15), || {
        sentinels.iter().all(|s| {
            s.cli(&["SENTINEL", "CKQUORUM", "main"]).starts_with("OK")
                && s.cli(&["SENTINEL", "REPLICAS", "main"])
                    .contains(&replica.port.to_string())
        })
    })
    .expect("the sentinels never agreed");

    const LIMIT: usize = 100;
    const CALLS: usize = 300;
    let file = routes_file(
        dir.path(),
        &[route(
            "chat",
            &sim.openai_base(),
            &format!("  limits:\n    - renewalPeriod: day\n      calls: {LIMIT}\n"),
        )],
    );
    let seeds: Vec<String> = sentinels
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.port))
        .collect();
    let url = format!("redis+sentinel://{}/main", seeds.join(","));
    let flags = ["--limits-store", url.as_str(), "--replicas", "2"];
    let (a, b) = (
        Gateway::serve(&[&file], &flags, &[]),
        Gateway::serve(&[&file], &flags, &[]),
    );
    assert_eq!(call(&a, "chat"), 200);
    assert_eq!(call(&b, "chat"), 200);

    // 300 calls over ~6 s from 20 threads over both gateways; the primary dies after ~1 s.
    let admitted = AtomicUsize::new(2);
    let statuses = parking_lot::Mutex::new(Vec::new());
    let killed_at = std::thread::scope(|s| {
        for t in 0..20 {
            let (a, b, admitted, statuses) = (&a, &b, &admitted, &statuses);
            s.spawn(move || {
                for i in 0..CALLS / 20 {
                    std::thread::sleep(Duration::from_millis(400));
                    let gw = if (t + i) % 2 == 0 { a } else { b };
                    let code = call(gw, "chat");
                    if code == 200 {
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                    statuses.lock().push(code);
                }
            });
        }
        std::thread::sleep(Duration::from_millis(1000));
        primary.kill();
        Instant::now()
    });
    let statuses = statuses.into_inner();
    assert!(
        statuses.iter().all(|c| *c == 200 || *c == 429),
        "a call failed during the failover: {statuses:?}"
    );
    let admitted = admitted.into_inner();
    // The gateways follow the promoted replica.
    eventually(Duration::from_secs(20), || {
        sentinels[0]
            .cli(&["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "main"])
            .contains(&replica.port.to_string())
    })
    .expect("no failover");
    for gw in [&a, &b] {
        eventually(Duration::from_secs(10), || {
            call(gw, "chat");
            metric(gw, "portcullis_limits_fallback ") == 0.0
        })
        .unwrap_or_else(|_| panic!("never followed the new primary:\n{}", gw.log()));
    }
    let recovered = killed_at.elapsed();
    let in_store = counter(&replica, "portcullis:chat:0:calls:*");
    let episodes = |gw: &Gateway| gw.log().matches("enforcing limits locally").count();
    eprintln!(
        "failover: {admitted} of {CALLS} calls admitted against a limit of {LIMIT}; \
         the new primary counts {in_store}; both gateways back on the store {recovered:?} after \
         the kill; episodes of counting alone: {} and {}",
        episodes(&a),
        episodes(&b)
    );
    assert!(admitted >= LIMIT, "{admitted} admitted");
    // The hard bound is twice the limit; with the shares starting from the store's last counts
    // and handed back, a failover measures well under half that.
    assert!(
        admitted <= LIMIT * 3 / 2,
        "{admitted} admitted against a limit of {LIMIT}"
    );
    assert!(
        in_store as usize >= LIMIT,
        "the new primary counts {in_store}"
    );
}

/// Three primaries: Routes' keys land in different slots; calls, USD budgets and alert dedup are
/// exact across two gateways; a Route and a Team budget in different slots are charged all or
/// nothing.
#[test]
fn a_cluster_keeps_every_count_exact_over_slots() {
    let sim = support::sim();
    let dir = tempfile::tempdir().unwrap();
    let cluster = RedisCluster::start();
    let names = ["calls-a", "calls-b", "calls-c"];
    let mut routes: Vec<String> = names
        .iter()
        .map(|n| {
            route(
                n,
                &sim.openai_base(),
                "  limits:\n    - renewalPeriod: day\n      calls: 10\n",
            )
        })
        .collect();
    routes.push(route(
        "usd",
        &sim.openai_base(),
        "  limits:\n    - renewalPeriod: day\n      usd: 0.05\n",
    ));
    routes.push(route(
        "tokens",
        &sim.openai_base(),
        "  limits:\n    - renewalPeriod: day\n      tokens: 150\n",
    ));
    routes.push(route(
        "alert",
        &sim.openai_base(),
        "  limits:\n    - renewalPeriod: day\n      calls: 5\n      action: alert\n",
    ));
    let file = routes_file(dir.path(), &routes);
    let url = cluster.url();
    let flags = shared_store_flags(&url);
    let (a, b) = (
        Gateway::serve(&[&file], &flags, &[]),
        Gateway::serve(&[&file], &flags, &[]),
    );
    let burst = |route: &str, n: usize| -> usize {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|i| {
                    let gw = if i % 2 == 0 { &a } else { &b };
                    s.spawn(move || call(gw, route))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .filter(|c| *c == 200)
                .count()
        })
    };
    for r in &names {
        assert_eq!(burst(r, 30), 10, "{r}:\n{}", a.log());
    }
    assert_eq!(burst("usd", 20), 5, "5 cents fit in $0.05");
    assert_eq!(burst("alert", 10), 10, "an alert never refuses");
    // A token budget, one call at a time over both replicas: each charged up front, settled to
    // its usage; the store ends at exactly what the answers report.
    let mut used = 0;
    let mut refused = 0;
    for i in 0..20 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let body = json!({"model": "tokens", "max_tokens": 10, "messages": [{"role": "user", "content": "hello there"}]});
        let (code, _, text) = post_full(&gw.url("/v1/chat/completions"), &body);
        match code {
            200 => {
                let answer: serde_json::Value = serde_json::from_str(&text).unwrap();
                used += answer["usage"]["total_tokens"].as_u64().unwrap();
            }
            429 => refused += 1,
            other => panic!("{other}: {text}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        refused > 0 && used <= 150,
        "{used} tokens used, {refused} refused"
    );
    assert_eq!(
        metric(&a, "portcullis_limits_fallback "),
        0.0,
        "{}",
        a.log()
    );
    assert_eq!(
        metric(&b, "portcullis_limits_fallback "),
        0.0,
        "{}",
        b.log()
    );
    // Each crossing (80%, 100%) told once across both replicas.
    eventually(Duration::from_secs(5), || {
        metric(&a, "portcullis_limit_alerts_total") + metric(&b, "portcullis_limit_alerts_total")
            == 2.0
    })
    .unwrap_or_else(|_| panic!("{}\n{}", a.metrics(), b.metrics()));
    // The keys are spread over the nodes, each Route's in one slot.
    let keys = cluster.keys("portcullis:*");
    let nodes: std::collections::HashSet<usize> = keys.iter().map(|(n, _)| *n).collect();
    assert!(nodes.len() >= 2, "{keys:?}");
    for (_, k) in &keys {
        assert!(k.starts_with("portcullis:{"), "{k}");
    }
    // The USD counter settled at exactly five cents (in nanodollars).
    let usd: u64 = keys
        .iter()
        .filter(|(_, k)| k.starts_with("portcullis:{usd}:0:usd:"))
        .map(|(n, k)| {
            cluster.nodes[*n]
                .cli(&["GET", k])
                .trim()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(usd, 50_000_000);
    let tokens: u64 = keys
        .iter()
        .filter(|(_, k)| k.starts_with("portcullis:{tokens}:0:tokens:"))
        .map(|(n, k)| {
            cluster.nodes[*n]
                .cli(&["GET", k])
                .trim()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(
        tokens, used,
        "the budget's counter is what the answers used"
    );

    // A Route and a Team in different slots: refused by the Team, the Route is not charged.
    support::runtime().block_on(route_and_team_over_slots(&url));
}

async fn route_and_team_over_slots(url: &str) {
    use portcullis::limits::Limiter;
    use portcullis::store::{Store, StoreArgs};
    use portcullis::table::RouteEntry;
    use portcullis::teams::TeamEntry;
    let args = StoreArgs {
        store_timeout: Duration::from_millis(500),
        ..Default::default()
    };
    let store = Store::open(&args, url).unwrap();
    store.ready().await.unwrap();
    let metrics = Arc::new(portcullis::telemetry::metrics::Metrics::new());
    let limiter = Arc::new(Limiter::shared(metrics.clone(), 1, store));
    let limit = |calls: u64| -> portcullis::api::Limit {
        serde_json::from_value(json!({"renewalPeriod": "day", "calls": calls})).unwrap()
    };
    let entry = |name: String, limits| RouteEntry {
        name: name.as_str().into(),
        qualified: format!("ns/{name}"),
        namespace: "ns".into(),
        route_type: portcullis::api::RouteType::Chat,
        provider: portcullis::api::Provider::Openai,
        model: "m".into(),
        counter_keys: portcullis::limits::route_keys(&name),
        limits,
        access: None,
        cache: None,
        guard: None,
        state: portcullis::table::RouteState::NotReady {
            reason: portcullis::api::Reason::SecretNotFound,
            message: String::new(),
        },
        metrics: Default::default(),
    };
    let route = entry(support::unique("slot-route"), vec![limit(5)]);
    let team_name = support::unique("slot-team");
    let team = Arc::new(TeamEntry {
        counter_keys: portcullis::limits::team_keys(&team_name),
        name: team_name,
        limits: vec![limit(3)],
        routes: None,
        guards: Ok(Default::default()),
    });
    let other = entry(support::unique("slot-other"), vec![limit(100)]);
    let charge = portcullis::limits::Charge {
        calls: 1,
        ..Default::default()
    };
    let teams = std::slice::from_ref(&team);
    let admitted = |r: Result<_, _>| r.is_ok();
    let mut ok = 0;
    for _ in 0..5 {
        ok += usize::from(admitted(
            limiter.admit_with_teams(&route, teams, "c", charge).await,
        ));
    }
    assert_eq!(ok, 3, "the Team's 3 calls");
    // The two refused calls were taken back from the Route: 2 of its 5 are left.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut left = 0;
    for _ in 0..5 {
        left += usize::from(admitted(
            limiter.admit_with_teams(&route, &[], "c", charge).await,
        ));
    }
    assert_eq!(left, 2, "refused calls were charged to the Route");
    // The Team's count is shared with its other Routes.
    assert!(
        limiter
            .admit_with_teams(&other, teams, "c", charge)
            .await
            .is_err()
    );
    assert_eq!(metrics.limits_fallback.get(), 0);
}

/// `portcullis spend` has deadlines: a store that accepts connections and never answers, or an
/// API server that never answers, ends it with an error in seconds.
#[test]
fn spend_gives_up_on_a_silent_store_or_api_server() {
    // Accepts, reads, never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in silent.incoming().map_while(Result::ok) {
            held.push(c);
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:{port}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\nusers:\n- name: u\n  user: {{token: t}}\n"
        ),
    )
    .unwrap();
    let redis = Redis::start();
    let spend = |store: &str| {
        let start = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
            .args(["spend", "--limits-store", store])
            .env("KUBECONFIG", &kubeconfig)
            .output()
            .expect("portcullis spend");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
            start.elapsed(),
        )
    };
    let (ok, err, took) = spend(&format!("redis://127.0.0.1:{port}"));
    assert!(!ok && err.contains("limits store"), "{err}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let (ok, err, took) = spend(&redis.url());
    assert!(!ok && err.contains("timed out"), "{err}");
    assert!(took < Duration::from_secs(15), "{took:?}");
}

/// The shipped overlay mounts the password Secret as a directory (so rotation reaches the file)
/// and names it and the CA by file, never in args.
#[test]
fn the_redis_tls_overlay_mounts_the_password_and_ca_from_a_secret() {
    let out = Command::new(support::ControlPlane::bin_dir().join("kubectl"))
        .args([
            "kustomize",
            concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/overlays/redis-tls"),
        ])
        .output()
        .expect("kubectl kustomize");
    let yaml = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for expected in [
        "--limits-store=rediss://",
        "--store-password-file=/etc/portcullis/store/password",
        "--store-ca-file=/etc/portcullis/store/ca.crt",
        "mountPath: /etc/portcullis/store",
        "secretName: portcullis-store",
    ] {
        assert!(yaml.contains(expected), "{expected} missing:\n{yaml}");
    }
    assert!(
        !yaml.contains("subPath"),
        "a subPath mount never sees a rotation"
    );
}

/// A data-plane worker's cache writes wait to go with its next lookup, in one pipeline: a miss
/// costs the store one read, not two. A write no lookup takes goes out on its own within
/// milliseconds, and either way its sender learns that it landed.
#[test]
fn cache_writes_ride_with_the_workers_next_lookup() {
    use bytes::Bytes;
    use portcullis::cache::CacheStore;
    use portcullis::store::{Store, StoreArgs};
    let redis = Redis::start();
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let reads = || -> u64 {
        redis
            .cli(&["INFO", "stats"])
            .lines()
            .find_map(|l| l.strip_prefix("total_reads_processed:"))
            .and_then(|n| n.trim().parse().ok())
            .expect("INFO stats has total_reads_processed")
    };
    // A worker is a single-threaded runtime.
    let worker = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    worker.block_on(async {
        let args = StoreArgs {
            store_timeout: Duration::from_secs(2),
            ..Default::default()
        };
        let cache = CacheStore::shared(Store::open(&args, &url).unwrap());
        // The worker's own connection comes up on its first lookup.
        assert_eq!(cache.get("warm-up").await.unwrap(), None);
        let entry = Bytes::from_static(b"an entry");
        // What asking costs: redis-cli's command and its closing are reads too.
        let asking = {
            let first = reads();
            reads() - first
        };
        let before = reads();
        let (written, found) = tokio::join!(
            cache.put("a", entry.clone(), Duration::from_secs(60)),
            async {
                tokio::task::yield_now().await;
                cache.get("b").await
            }
        );
        written.unwrap();
        assert_eq!(found.unwrap(), None);
        assert_eq!(
            reads() - before,
            1 + asking,
            "the write went with the lookup"
        );
        assert_eq!(cache.get("a").await.unwrap(), Some(entry.clone()));

        let alone = Instant::now();
        cache
            .put("c", entry.clone(), Duration::from_secs(60))
            .await
            .unwrap();
        assert!(alone.elapsed() < Duration::from_millis(500));
        assert_eq!(redis.cli(&["GET", "portcullis:cache:c"]).trim(), "an entry");
    });
}
