//! The paged route listings of both MLflow surfaces (`/api/2.0/gateway/routes/`, `/api/2.0/endpoints/`).
//!
//! The page token names the last route of the previous page (hex-encoded, so it is opaque and
//! URL-safe): a route added or removed between two pages shifts nothing, unlike MLflow's index.

use std::sync::Arc;

use axum::Json;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::admission::Visibility;
use super::error::{GatewayError, MlflowError};
use super::request::route_name;
use crate::table::RouteEntry;

#[derive(Deserialize)]
pub struct PageQuery {
    page_token: Option<String>,
}

/// How one MLflow surface shows routes: the listing's key and the object per route.
pub trait Listed {
    const KEY: &'static str;
    fn object(entry: &RouteEntry) -> Value;
}

/// `GET` of a listing: `{<KEY>: [...], "next_page_token": ...}`.
pub async fn list<L: Listed>(
    State(state): State<Arc<AppState>>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<Value>, MlflowError> {
    let visible = Visibility::of_caller(&state).await?;
    let (page, next) = page(&state, query, &visible)?;
    let objects: Vec<Value> = page.iter().map(|e| L::object(e)).collect();
    Ok(Json(json!({L::KEY: objects, "next_page_token": next})))
}

/// `GET` of one route by name.
pub async fn get<L: Listed>(
    State(state): State<Arc<AppState>>,
    name: Result<Path<Vec<String>>, PathRejection>,
) -> Result<Json<Value>, MlflowError> {
    let entry = Visibility::find(&state, route_name(name)?).await?;
    Ok(Json(L::object(&entry)))
}

/// One page of routes and the token of the next, `None` on the last page.
fn page(
    state: &AppState,
    query: Result<Query<PageQuery>, QueryRejection>,
    visible: &Visibility,
) -> Result<(Vec<Arc<RouteEntry>>, Option<String>), GatewayError> {
    let token = query
        .map_err(|e| GatewayError::bad_request(format!("invalid query: {}", e.body_text())))?
        .0
        .page_token
        .filter(|t| !t.is_empty());
    let after = token.as_deref().map(decode_token).transpose()?;
    let table = state.table.load();
    let routes = table.routes();
    let start = after.map_or(0, |after| {
        routes.partition_point(|e| *e.name <= *after.as_str())
    });
    let mut shown = routes[start..].iter().filter(|e| visible.shows(e));
    let page: Vec<Arc<RouteEntry>> = shown
        .by_ref()
        .take(state.page_size.max(1))
        .cloned()
        .collect();
    let next = shown.next().and(page.last()).map(|e| encode_token(&e.name));
    Ok((page, next))
}

/// The route's first calls-limit as MLflow shows it (`{calls, key, renewal_period}`), or null.
pub fn limit(entry: &RouteEntry) -> Value {
    serde_json::to_value(entry.mlflow_limit()).unwrap_or(Value::Null)
}

fn encode_token(name: &str) -> String {
    name.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_token(token: &str) -> Result<String, GatewayError> {
    let invalid = || GatewayError::bad_param("page_token", format!("invalid page_token {token:?}"));
    if !token.len().is_multiple_of(2) {
        return Err(invalid());
    }
    let bytes = (0..token.len())
        .step_by(2)
        .map(|i| {
            token
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(invalid)?;
    String::from_utf8(bytes).map_err(|_| invalid())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Limit, LimitKey, RenewalPeriod};

    #[test]
    fn tokens_round_trip_and_garbage_is_rejected() {
        assert_eq!(decode_token(&encode_token("chat-1.a")).unwrap(), "chat-1.a");
        assert!(decode_token("zz").is_err());
        assert!(decode_token("abc").is_err());
        assert!(decode_token("ff").is_err());
    }

    #[test]
    fn limit_is_the_first_calls_limit() {
        let limit_of = |limits: Vec<Limit>| {
            limit(&RouteEntry {
                metrics: Default::default(),
                limits,
                ..RouteEntry::not_ready("r")
            })
        };
        let l = |calls, tokens, period| Limit {
            renewal_period: period,
            calls,
            tokens,
            usd: None,
            on_exceed: None,
            action: None,
            key: LimitKey::Route,
        };
        assert_eq!(limit_of(vec![]), Value::Null);
        assert_eq!(
            limit_of(vec![
                l(None, Some(100), RenewalPeriod::Day),
                l(Some(5), None, RenewalPeriod::Minute),
                l(Some(9), None, RenewalPeriod::Hour),
            ]),
            json!({"calls": 5, "key": "route", "renewal_period": "minute"})
        );
    }
}
