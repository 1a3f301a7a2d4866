//! Reading each endpoint's model-server metrics on a timer: one scrape per endpoint per interval
//! whatever the request rate, in the background (never per request). A failed scrape leaves the
//! endpoint's figures to go stale; it never removes the endpoint (only the API objects do).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::{Endpoint, Pools};
use crate::traffic::now_ms;

/// Bounds of `--pool-scrape-interval`: often enough to follow queues, rarely enough to cost
/// nothing on the model servers.
pub const MIN_INTERVAL: Duration = Duration::from_millis(50);
pub const MAX_INTERVAL: Duration = Duration::from_millis(200);
/// The largest metrics page read (vLLM's is a few tens of KiB).
const MAX_PAGE: usize = 1024 * 1024;
/// The longest one scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(1);
/// Endpoints scraped at once.
const CONCURRENCY: usize = 64;

/// What one scrape found.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Figures {
    pub waiting: u32,
    pub running: u32,
    /// 0 to 1.
    pub kv_cache: f64,
    /// LoRA adapters running or waiting.
    pub adapters: Vec<String>,
    pub max_adapters: u32,
}

/// The metric names of the model servers the Inference Extension's model-server protocol lists.
const WAITING: [&str; 2] = ["vllm:num_requests_waiting", "sglang:num_queue_reqs"];
const RUNNING: [&str; 2] = ["vllm:num_requests_running", "sglang:num_running_reqs"];
const KV_CACHE: [&str; 3] = [
    "vllm:kv_cache_usage_perc",
    // vLLM before 0.10.
    "vllm:gpu_cache_usage_perc",
    "sglang:token_usage",
];
const LORA_INFO: &str = "vllm:lora_requests_info";

/// Reads the Prometheus text exposition; `None` when it holds none of the known queue metrics
/// (not a model server we understand). Counts are summed over label sets (one per model or
/// engine), KV-cache usage is the highest.
pub fn parse(page: &str) -> Option<Figures> {
    let mut figures = Figures::default();
    let mut known = false;
    // vLLM exports one lora_requests_info series per adapter set; its value is the time the set
    // was reported, and the latest one is current.
    let mut lora_at = f64::MIN;
    for line in page.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        // `name{labels} value [timestamp]`: label values may hold spaces, so split after `}`.
        let (name, labels, rest) = match line.find('{') {
            Some(open) => {
                let Some(close) = line.rfind('}') else {
                    continue;
                };
                (&line[..open], &line[open + 1..close], &line[close + 1..])
            }
            None => match line.split_once(' ') {
                Some((n, r)) => (n, "", r),
                None => continue,
            },
        };
        let Some(value) = rest.split_whitespace().next() else {
            continue;
        };
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        if !v.is_finite() {
            continue;
        }
        if WAITING.contains(&name) {
            known = true;
            figures.waiting = figures.waiting.saturating_add(v.max(0.0) as u32);
        } else if RUNNING.contains(&name) {
            known = true;
            figures.running = figures.running.saturating_add(v.max(0.0) as u32);
        } else if KV_CACHE.contains(&name) {
            figures.kv_cache = figures.kv_cache.max(v.clamp(0.0, 1.0));
        } else if name == LORA_INFO && v >= lora_at {
            lora_at = v;
            figures.adapters.clear();
            for key in ["running_lora_adapters", "waiting_lora_adapters"] {
                if let Some(list) = label(labels, key) {
                    figures.adapters.extend(
                        list.split(',')
                            .map(str::trim)
                            .filter(|a| !a.is_empty())
                            .map(str::to_string),
                    );
                }
            }
            figures.adapters.sort();
            figures.adapters.dedup();
            figures.max_adapters = label(labels, "max_lora")
                .and_then(|m| m.parse().ok())
                .unwrap_or(0);
        }
    }
    known.then_some(figures)
}

/// The value of `key` in a label set such as `a="x",b="y"` (values without escapes).
fn label<'a>(labels: &'a str, key: &str) -> Option<&'a str> {
    let mut rest = labels;
    while let Some(eq) = rest.find("=\"") {
        let name = rest[..eq].trim_start_matches(',').trim();
        let after = &rest[eq + 2..];
        let end = after.find('"')?;
        if name == key {
            return Some(&after[..end]);
        }
        rest = &after[end + 1..];
    }
    None
}

/// Scrapes every endpoint of every pool each `interval` until `shutdown`.
pub async fn run(pools: Arc<Pools>, interval: Duration, shutdown: CancellationToken) {
    let interval = interval.clamp(MIN_INTERVAL, MAX_INTERVAL);
    // A slow answer delays the next round rather than failing: still one scrape per endpoint
    // per interval at most, and a busy server's figures are still read.
    let client = match reqwest::Client::builder()
        .timeout(SCRAPE_TIMEOUT)
        .connect_timeout(SCRAPE_TIMEOUT)
        .pool_max_idle_per_host(1)
        .no_proxy()
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the pool metrics client; pools are picked on the gateway's own counts");
            return;
        }
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let mut seen = HashSet::new();
        let endpoints: Vec<Arc<Endpoint>> = pools
            .all()
            .iter()
            .flat_map(|p| p.endpoints().list.clone())
            .filter(|e| seen.insert(e.addr))
            .collect();
        futures::stream::iter(endpoints)
            .for_each_concurrent(CONCURRENCY, |e| {
                let client = client.clone();
                async move { scrape(&client, &e).await }
            })
            .await;
    }
}

async fn scrape(client: &reqwest::Client, endpoint: &Endpoint) {
    let url = format!("http://{}/metrics", endpoint.addr);
    let page = async {
        let mut response = client.get(url).send().await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.ok()? {
            if body.len() + chunk.len() > MAX_PAGE {
                return None;
            }
            body.extend_from_slice(&chunk);
        }
        String::from_utf8(body).ok()
    };
    match page.await.as_deref().and_then(parse) {
        Some(figures) => endpoint.scraped(&figures, now_ms()),
        None => endpoint.scrape_failed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vllm_figures() {
        let page = r#"# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama"} 3.0
vllm:num_requests_running{engine="0",model_name="llama"} 4.0
vllm:kv_cache_usage_perc{engine="0",model_name="llama"} 0.42
vllm:lora_requests_info{max_lora="2",running_lora_adapters="sql-lora",waiting_lora_adapters=""} 1.7e9
vllm:lora_requests_info{max_lora="2",running_lora_adapters="old",waiting_lora_adapters=""} 1.6e9
"#;
        let f = parse(page).unwrap();
        assert_eq!((f.waiting, f.running), (3, 4));
        assert!((f.kv_cache - 0.42).abs() < 1e-9);
        assert_eq!(f.adapters, ["sql-lora"]);
        assert_eq!(f.max_adapters, 2);
    }

    #[test]
    fn older_and_other_servers() {
        let f = parse("vllm:num_requests_waiting 1\nvllm:num_requests_running 2\nvllm:gpu_cache_usage_perc 0.5\n").unwrap();
        assert_eq!((f.waiting, f.running, f.kv_cache), (1, 2, 0.5));
        let f =
            parse("sglang:num_queue_reqs{a=\"b\"} 7 1700000000000\nsglang:num_running_reqs 1\n")
                .unwrap();
        assert_eq!((f.waiting, f.running), (7, 1));
        assert_eq!(parse("process_cpu_seconds_total 4\n"), None);
        assert_eq!(parse("vllm:num_requests_waiting NaN\n"), None);
    }
}
