//! The MLflow deployments surface (`mlflow.deployments.get_deploy_client`, MLflow 2.9 to 3.x):
//! `GET /api/2.0/endpoints/[{name}]` and `POST /endpoints/{name}/invocations`. Bodies are OpenAI's
//! shapes without `model`, so parsing and rendering are the OpenAI surface's; errors are MLflow's.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::response::Response;
use http::HeaderMap;
use serde_json::{Value, json};

use super::AppState;
use super::body::read_json_object;
use super::error::{GatewayError, MlflowError};
use super::forward;
use super::listing::{self, Listed};
use super::openai::respond;
use super::request::{OPENAI, check_body_kind, parse_request, reject_model, route_name};
use crate::table::RouteEntry;

type Result<T, E = MlflowError> = std::result::Result<T, E>;

/// Streams when asked, like `/v1`, but without OpenAI's `data: [DONE]`: MLflow's streams just end.
pub async fn invoke(
    State(state): State<Arc<AppState>>,
    name: std::result::Result<Path<Vec<String>>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    let name = route_name(name)?;
    let route = forward::lookup_route(&state, &name).await?;
    let body = read_json_object(&state, &headers, body).await?;
    let route_type = route.entry.route_type;
    reject_model(&body)?;
    check_body_kind(&name, route_type, &body, OPENAI.input_field)?;
    let request =
        parse_request(route_type, body, &OPENAI).map_err(GatewayError::schema_violation)?;
    Ok(respond(&state, &route, request, false).await?)
}

/// The deployments listing: `{"endpoints": [...]}` of `{name, endpoint_type, model: {name, provider},
/// endpoint_url, limit}`; MLflow 3's client requires the `limit` key even when it is null.
pub struct Endpoints;

impl Listed for Endpoints {
    const KEY: &'static str = "endpoints";

    fn object(entry: &RouteEntry) -> Value {
        json!({
            "name": &*entry.name,
            "endpoint_type": entry.route_type.as_str(),
            "model": {"name": &*entry.model, "provider": entry.provider.as_str()},
            "endpoint_url": format!("/endpoints/{}/invocations", entry.name),
            "limit": listing::limit(entry),
        })
    }
}
