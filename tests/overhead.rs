//! The added latency of auth + limits for a caller whose token is cached: the in-process check the
//! data plane runs before every upstream call (identify, decide access, count calls and tokens,
//! settle). Ignored by default; run with
//! `cargo test --release --test overhead -- --ignored --nocapture`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a measurement: failing loudly is the point

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use portcullis::access::{
    ApiKeys, Authenticator, Bearer, CacheTtl, Decision, DefaultAccess, Identity, ReviewError,
    TokenReviewer, decide, digest,
};
use portcullis::api::{AccessRule, Limit, LimitKey, Provider, Reason, RenewalPeriod, RouteType};
use portcullis::limits::Limiter;
use portcullis::table::{RouteEntry, RouteState};
use portcullis::telemetry::metrics::Metrics;

/// Stands in for the API server; after the first call every lookup must be a cache hit.
struct OnceReviewer;

impl TokenReviewer for OnceReviewer {
    fn review<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Option<Identity>, ReviewError>> {
        Box::pin(async {
            Ok(Some(Identity::ServiceAccount {
                namespace: "team-a".into(),
                name: "notebook".into(),
            }))
        })
    }
}

fn route() -> RouteEntry {
    let limit = |calls, tokens, key| Limit {
        renewal_period: RenewalPeriod::Day,
        calls,
        tokens,
        usd: None,
        on_exceed: None,
        action: None,
        key,
    };
    RouteEntry {
        metrics: Default::default(),
        name: "bench".into(),
        counter_keys: portcullis::limits::route_keys("bench"),
        qualified: "team-a/bench".into(),
        namespace: "team-a".into(),
        route_type: RouteType::Chat,
        provider: Provider::Openai,
        model: "m".into(),
        cache: None,
        limits: vec![
            limit(Some(u64::MAX / 4), None, LimitKey::Route),
            limit(Some(u64::MAX / 4), Some(u64::MAX / 4), LimitKey::Consumer),
        ],
        access: Some(
            (0..20)
                .map(|i| AccessRule {
                    service_account: Some(format!("team-{i}/sa")),
                    namespace: None,
                    consumer: None,
                })
                .chain([AccessRule {
                    service_account: None,
                    namespace: Some("team-a".into()),
                    consumer: None,
                }])
                .collect(),
        ),
        guard: None,
        state: RouteState::NotReady {
            reason: Reason::SecretNotFound,
            message: String::new(),
        },
    }
}

async fn measure(limiter: Arc<Limiter>, iterations: u32) -> Duration {
    // 100 API keys, so the constant-time scan is part of the figure.
    let keys = ApiKeys::new((0..100u32).map(|i| {
        (
            digest(format!("pk-{i}").as_bytes()),
            Identity::Consumer {
                namespace: "p".into(),
                name: format!("k{i}"),
            },
        )
    }));
    let auth = Authenticator::new(
        Arc::new(arc_swap::ArcSwap::from_pointee(keys)),
        Some(Arc::new(OnceReviewer)),
        CacheTtl {
            positive: Duration::from_secs(3600),
            ..CacheTtl::default()
        },
        DefaultAccess::Authenticated,
    );
    // A JWT for the gateway's audience expiring in 2100: it passes the local checks once, then
    // is a cached identity.
    let bearer = Bearer::from_header(b"Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4IiwiYXVkIjoicG9ydGN1bGxpcyIsImV4cCI6NDEwMjQ0NDgwMH0.c2ln").unwrap();
    let entry = route();
    let check = || async {
        let caller = auth.authenticate(Some(&bearer)).await.unwrap();
        assert_eq!(
            decide(
                entry.access.as_deref(),
                auth.default_access,
                caller.as_ref()
            ),
            Decision::Allow
        );
        let consumer = caller.map(|c| c.name()).unwrap_or_default();
        let reservation = limiter.admit(&entry, &consumer, 300).await.unwrap();
        if let Some(r) = reservation {
            r.settle(42);
        }
    };
    for _ in 0..1000 {
        check().await;
    }
    let started = Instant::now();
    for _ in 0..iterations {
        check().await;
    }
    started.elapsed() / iterations
}

#[tokio::test]
#[ignore = "a measurement, not a check: run explicitly"]
async fn auth_and_limits_overhead_for_a_cached_token() {
    let local = measure(
        Arc::new(Limiter::local(Arc::new(Metrics::new()), 1)),
        200_000,
    )
    .await;
    println!("auth + limits, cached token, local counters: {local:?} per request");

    // The shared path adds one Redis round trip (a Lua script) per request.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let Ok(mut redis) = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
    else {
        println!("redis-server not installed: skipping the shared-store figure");
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let args = portcullis::store::StoreArgs {
        store_timeout: Duration::from_millis(250),
        ..Default::default()
    };
    let store =
        portcullis::store::Store::open(&args, &format!("redis://127.0.0.1:{port}")).unwrap();
    store.ready().await.unwrap();
    let limiter = Limiter::shared(Arc::new(Metrics::new()), 1, store);
    let shared = measure(Arc::new(limiter), 20_000).await;
    println!("auth + limits, cached token, Redis on loopback: {shared:?} per request");
    let _ = redis.kill();
    let _ = redis.wait();
}

/// One admission with its settlement; with `cost`, a USD budget's share of it plus the cost
/// computed from the usage and added to `portcullis_cost_usd_total`.
async fn admit_and_settle(
    limiter: &Arc<Limiter>,
    metrics: &Metrics,
    entry: &RouteEntry,
    cost: bool,
) {
    use portcullis::cost::{Price, Tokens, Usd};
    use portcullis::limits::Charge;
    use portcullis::telemetry::metrics::CostLabels;
    let price = Price {
        input: 2_500_000,
        output: 10_000_000,
        cached_input: 1_250_000,
    };
    let charge = Charge {
        calls: 1,
        tokens: 556,
        usd: cost.then(|| price.max_cost(300, 256)),
        stream: false,
        usd_floor: Usd::ZERO,
        ..Charge::default()
    };
    let r = limiter
        .admit_charge(entry, "team-a/notebook", charge)
        .await
        .unwrap();
    let spent = cost.then(|| {
        price.cost(Tokens {
            input: 300,
            cached: 0,
            output: 42,
        })
    });
    if let Some(usd) = spent {
        metrics
            .cost
            .usd
            .get_or_create(&CostLabels {
                route: entry.name.clone(),
                gen_ai_provider_name: "openai",
                gen_ai_request_model: "gpt-4o".into(),
                consumer: "team-a/notebook".into(),
            })
            .add(usd);
    }
    if let Some(r) = r {
        r.settle_cost(342, spent);
    }
}

/// What the cost layer adds per request with the local store: a USD budget counted beside the
/// calls and tokens limits (reserved, then settled to the cost), the cost computed from the
/// usage, and `portcullis_cost_usd_total` incremented under its labels.
#[tokio::test]
#[ignore = "a measurement, not a check: run explicitly"]
async fn cost_layer_overhead_with_the_local_store() {
    const N: u32 = 200_000;
    let metrics = Arc::new(Metrics::new());
    let limiter = Arc::new(Limiter::local(metrics.clone(), 1));
    let plain = route();
    let mut budgeted = route();
    budgeted.limits.push(Limit {
        renewal_period: RenewalPeriod::Month,
        calls: None,
        tokens: None,
        usd: Some(1_000_000.0),
        on_exceed: None,
        action: None,
        key: LimitKey::Consumer,
    });
    let mut figures = Vec::new();
    for (entry, cost) in [(&plain, false), (&budgeted, true)] {
        for _ in 0..1000 {
            admit_and_settle(&limiter, &metrics, entry, cost).await;
        }
        let started = Instant::now();
        for _ in 0..N {
            admit_and_settle(&limiter, &metrics, entry, cost).await;
        }
        figures.push(started.elapsed() / N);
    }
    println!(
        "limits without cost: {:?}; with a USD budget, cost and spend metric: {:?}; the cost layer adds {:?} per request",
        figures[0],
        figures[1],
        figures[1].saturating_sub(figures[0])
    );
}
