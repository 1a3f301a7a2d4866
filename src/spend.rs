//! `portcullis spend`: what each USD budget has spent in its current window, for a human at a
//! terminal. Reads the shared limits store (the counts every replica enforces) and the Routes and
//! Teams of the cluster (the budgets beside them).

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};

use crate::api::{Limit, LimitKey, Route, Team};
use crate::controller::API_CALL_TIMEOUT;
use crate::cost::Usd;
use crate::limits::{budget_units, utc_text, window};
use crate::store::{Store, StoreArgs};

#[derive(clap::Args, Debug)]
pub struct SpendArgs {
    /// The shared limits store the gateways count in: the same --limits-store (and TLS,
    /// password-file and timeout flags) as theirs.
    #[command(flatten)]
    pub store: StoreArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum SpendError {
    #[error("cannot reach the Kubernetes API: {0}")]
    Kube(String),
    #[error("cannot read the limits store: {0}")]
    Store(String),
}

/// One budget window's spend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// `route` or `team`.
    pub scope: &'static str,
    /// `namespace/name` of a Route, the name of a Team.
    pub name: String,
    /// `*` for the whole route or team, else the consumer.
    pub who: String,
    pub period: &'static str,
    pub ends: u64,
    /// Nanodollars, as the store counts.
    pub spent: u64,
    pub budget: u64,
}

/// A USD budget counter key: `portcullis:NAME:I:usd:WHO:WINDOW` (a route by its served name) or
/// `portcullis:team:NAME:I:usd:WHO:WINDOW`.
fn parse_key(key: &str) -> Option<(bool, &str, usize, &str, u64)> {
    let parts: Vec<&str> = key.split(':').collect();
    let (team, rest) = match parts.as_slice() {
        ["portcullis", "team", rest @ ..] if rest.len() == 5 => (true, rest),
        ["portcullis", rest @ ..] if rest.len() == 5 => (false, rest),
        _ => return None,
    };
    let [name, i, kind, who, window] = rest else {
        return None;
    };
    (*kind == "usd").then_some(())?;
    // In a Cluster the name is a hash tag: `{chat}`.
    let name = name
        .strip_prefix('{')
        .and_then(|n| n.strip_suffix('}'))
        .unwrap_or(name);
    Some((team, name, i.parse().ok()?, who, window.parse().ok()?))
}

fn period_name(limit: &Limit) -> &'static str {
    match serde_json::to_value(limit.renewal_period)
        .ok()
        .as_ref()
        .and_then(|v| v.as_str())
    {
        Some("second") => "second",
        Some("minute") => "minute",
        Some("hour") => "hour",
        Some("day") => "day",
        Some("week") => "week",
        _ => "month",
    }
}

/// Rows for every counter of a current window, with every USD budget that has spent nothing yet
/// as a zero row (whole-route and whole-team budgets only: consumers appear once they spend).
pub fn rows(
    routes: &[Route],
    teams: &[Team],
    counts: &BTreeMap<String, u64>,
    now: u64,
) -> Vec<Row> {
    type Rows = BTreeMap<(&'static str, String, String, usize), Row>;
    let mut out: Rows = BTreeMap::new();
    let budget =
        |out: &mut Rows, scope: &'static str, name: String, i: usize, limit: &Limit, who: &str| {
            let Some(usd) = limit.usd else { return };
            let (_, ends) = window(limit.renewal_period, now);
            out.entry((scope, name.clone(), who.to_string(), i))
                .or_insert(Row {
                    scope,
                    name,
                    who: who.to_string(),
                    period: period_name(limit),
                    ends,
                    spent: 0,
                    budget: budget_units(usd),
                });
        };
    for r in routes {
        let name = format!("{}/{}", r.namespace().unwrap_or_default(), r.name_any());
        for (i, l) in r.spec.limits.iter().enumerate() {
            if l.key == LimitKey::Route {
                budget(&mut out, "route", name.clone(), i, l, "*");
            }
        }
    }
    for t in teams {
        for (i, l) in t.spec.limits.iter().enumerate() {
            if l.key == LimitKey::Route {
                budget(&mut out, "team", t.name_any(), i, l, "*");
            }
        }
    }
    for (key, spent) in counts {
        let Some((team, served, i, who, win)) = parse_key(key) else {
            continue;
        };
        let found = if team {
            teams
                .iter()
                .find(|t| t.name_any() == served)
                .and_then(|t| Some(("team", t.name_any(), t.spec.limits.get(i)?)))
        } else {
            route_for(routes, served).and_then(|r| {
                let name = format!("{}/{}", r.namespace().unwrap_or_default(), r.name_any());
                Some(("route", name, r.spec.limits.get(i)?))
            })
        };
        let Some((scope, name, limit)) = found else {
            continue;
        };
        // Only the window in force now: older keys wait for their expiry.
        if limit.usd.is_none() || window(limit.renewal_period, now).0 != win {
            continue;
        }
        budget(&mut out, scope, name.clone(), i, limit, who);
        if let Some(row) = out.get_mut(&(scope, name, who.to_string(), i)) {
            row.spent = *spent;
        }
    }
    out.into_values().collect()
}

/// The Route a served name belongs to: `namespace/name`, or the one-word name of the Route that
/// owns it (its ShortName condition), else the only Route of that name.
fn route_for<'a>(routes: &'a [Route], served: &str) -> Option<&'a Route> {
    if let Some((ns, name)) = served.split_once('/') {
        return routes
            .iter()
            .find(|r| r.namespace().as_deref() == Some(ns) && r.name_any() == name);
    }
    let named: Vec<&Route> = routes.iter().filter(|r| r.name_any() == served).collect();
    named
        .iter()
        .find(|r| {
            r.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "ShortName" && c.status == "True")
            })
        })
        .or(named.first())
        .copied()
}

/// The table a human reads.
pub fn render(rows: &[Row]) -> String {
    let dollars = |n: u64| format!("${}", Usd(n.saturating_mul(1000)).format(2));
    let mut lines = vec![[
        "SCOPE".to_string(),
        "NAME".into(),
        "CONSUMER".into(),
        "WINDOW".into(),
        "RESETS".into(),
        "SPENT".into(),
        "BUDGET".into(),
        "USED".into(),
    ]];
    for r in rows {
        let used = if r.budget == 0 {
            "-".to_string()
        } else {
            // Tenths of a percent, in integers.
            let permille = u128::from(r.spent) * 1000 / u128::from(r.budget);
            format!("{}.{}%", permille / 10, permille % 10)
        };
        lines.push([
            r.scope.to_string(),
            r.name.clone(),
            if r.who == "*" {
                "(all)".into()
            } else {
                r.who.clone()
            },
            r.period.to_string(),
            utc_text(r.ends),
            dollars(r.spent),
            dollars(r.budget),
            used,
        ]);
    }
    let widths: Vec<usize> = (0..8)
        .map(|c| lines.iter().map(|l| l[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for l in &lines {
        let cells: Vec<String> = l
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Reads the cluster and the store and renders the table. Every API-server request and every
/// store operation has the gateway's deadline (API_CALL_TIMEOUT, --store-timeout), so a hanging
/// server ends the command with an error instead of stalling it.
pub async fn run(args: &SpendArgs) -> Result<String, SpendError> {
    // The store first: its deadline is the shorter.
    let url = args
        .store
        .limits_store
        .as_deref()
        .ok_or_else(|| SpendError::Store("--limits-store is required".into()))?;
    let store = Store::open(&args.store, url).map_err(|e| SpendError::Store(e.to_string()))?;
    let err = |e: crate::store::StoreError| SpendError::Store(e.to_string());
    store.ready().await.map_err(err)?;
    let kube = |e: String| SpendError::Kube(e);
    let deadline = |what: &str| SpendError::Kube(format!("{what} timed out"));
    let client = tokio::time::timeout(API_CALL_TIMEOUT, Client::try_default())
        .await
        .map_err(|_| deadline("connecting"))?
        .map_err(|e| kube(e.to_string()))?;
    let routes = tokio::time::timeout(
        API_CALL_TIMEOUT,
        Api::<Route>::all(client.clone()).list(&ListParams::default()),
    )
    .await
    .map_err(|_| deadline("listing Routes"))?
    .map_err(|e| kube(e.to_string()))?
    .items;
    // Teams are optional (their CRD may not be installed).
    let teams = tokio::time::timeout(
        API_CALL_TIMEOUT,
        Api::<Team>::all(client).list(&ListParams::default()),
    )
    .await
    .map_err(|_| deadline("listing Teams"))?
    .map(|l| l.items)
    .unwrap_or_default();
    let mut counts = BTreeMap::new();
    // A Cluster's keys are spread over its primaries: each is scanned.
    for node in store.primaries().await.map_err(err)? {
        node.ready().await.map_err(err)?;
        let mut keys = Vec::new();
        let mut cursor = 0u64;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg("portcullis:*:usd:*")
                .arg("COUNT")
                .arg(1000);
            let (next, page): (u64, Vec<String>) = node.query(&scan).await.map_err(err)?;
            keys.extend(page);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        for chunk in keys.chunks(500) {
            // One GET each: MGET of keys in different slots is refused by a Cluster.
            let mut pipe = redis::pipe();
            for k in chunk {
                pipe.get(k);
            }
            let values: Vec<Option<String>> = node.pipeline(&pipe).await.map_err(err)?;
            for (k, v) in chunk.iter().zip(values) {
                counts.insert(k.clone(), v.and_then(|n| n.parse().ok()).unwrap_or(0));
            }
        }
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    Ok(render(&rows(&routes, &teams, &counts, now)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(ns: &str, name: &str, limits: &str) -> Route {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "portcullis.dev/v1alpha1", "kind": "Route",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"routeType": "llm/v1/chat", "model": {"provider": "openai", "name": "m"},
                     "limits": serde_json::from_str::<serde_json::Value>(limits).unwrap()}
        }))
        .unwrap()
    }

    #[test]
    fn keys_parse_for_routes_and_teams_only_when_usd() {
        // A Cluster's keys carry the name as a hash tag.
        assert_eq!(
            parse_key("portcullis:{chat}:0:usd:*:20000"),
            Some((false, "chat", 0, "*", 20000))
        );
        assert_eq!(
            parse_key("portcullis:team:{research}:1:usd:*:7"),
            Some((true, "research", 1, "*", 7))
        );
        assert_eq!(
            parse_key("portcullis:chat:0:usd:*:20000"),
            Some((false, "chat", 0, "*", 20000))
        );
        assert_eq!(
            parse_key("portcullis:ns/chat:1:usd:ns/sa:7"),
            Some((false, "ns/chat", 1, "ns/sa", 7))
        );
        assert_eq!(
            parse_key("portcullis:team:ml:2:usd:*:661"),
            Some((true, "ml", 2, "*", 661))
        );
        assert_eq!(parse_key("portcullis:chat:0:calls:*:20000"), None);
        assert_eq!(parse_key("portcullis:chat:0:usd:*:20000:alert80"), None);
        assert_eq!(parse_key("other:chat:0:usd:*:1"), None);
    }

    #[test]
    fn rows_put_the_budget_beside_the_current_window_only() {
        let now = 1_796_029_200; // 2026-11-30T09:00:00Z
        let day = window(crate::api::RenewalPeriod::Day, now).0;
        let r = route(
            "ns",
            "chat",
            r#"[{"renewalPeriod": "day", "usd": 1.0},
                {"renewalPeriod": "month", "usd": 50, "key": "consumer"},
                {"renewalPeriod": "day", "calls": 5}]"#,
        );
        let counts = BTreeMap::from([
            (format!("portcullis:chat:0:usd:*:{day}"), 420_000_000),
            (format!("portcullis:chat:0:usd:*:{}", day - 1), 999),
            (
                format!(
                    "portcullis:ns/chat:1:usd:ns/nb:{}",
                    window(crate::api::RenewalPeriod::Month, now).0
                ),
                12_500_000_000,
            ),
        ]);
        let rows = rows(&[r], &[], &counts, now);
        assert_eq!(rows.len(), 2, "{rows:?}");
        let text = render(&rows);
        println!("{text}");
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("SCOPE  NAME     CONSUMER"), "{text}");
        assert!(
            lines[1].contains("(all)") && lines[1].contains("$0.42") && lines[1].contains("$1.00")
        );
        assert!(
            lines[1].contains("2026-12-01T00:00:00Z") && lines[1].ends_with("42.0%"),
            "{text}"
        );
        assert!(
            lines[2].contains("ns/nb")
                && lines[2].contains("$12.50")
                && lines[2].ends_with("25.0%")
        );
    }
}
