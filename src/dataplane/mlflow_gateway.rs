//! The MLflow AI Gateway 2.5 surface, the API of MLflow's announcement and of `mlflow.gateway`:
//! `GET /api/2.0/gateway/routes/[{name}]` and `POST /gateway/{name}/invocations`, with 2.5's
//! request fields (`candidate_count`, `text`, temperature on 0-1) and `candidates`/`metadata` answers.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use http::HeaderMap;
use serde_json::{Map, Value, json};

use super::AppState;
use super::body::read_json_object;
use super::error::{GatewayError, MlflowError};
use super::forward;
use super::listing::{self, Listed};
use super::openai::{model_name, native_body};
use super::request::{Dialect, check_body_kind, parse_request, reject_model, route_name};
use crate::api::RouteType;
use crate::llm::{LlmRequest, LlmResponse, Usage};
use crate::providers;
use crate::table::RouteEntry;

type Result<T, E = MlflowError> = std::result::Result<T, E>;

const MLFLOW_25: Dialect = Dialect {
    n_field: "candidate_count",
    n_max: 5,
    temperature_max: 1.0,
    input_field: "text",
};

pub async fn invoke(
    State(state): State<Arc<AppState>>,
    name: std::result::Result<Path<Vec<String>>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>> {
    let name = route_name(name)?;
    let route = forward::lookup_route(&state, &name).await?;
    let body = read_json_object(&state, &headers, body).await?;
    let request = parse(&route.entry, body)?;
    let answer = forward::invoke(&state, &route, &request).await?;
    Ok(Json(render(&answer, &route.entry)))
}

/// The 2.5 listing: `{"routes": [...]}` of `{name, route_type, model: {name, provider}, route_url, limit}`.
pub struct Routes;

impl Listed for Routes {
    const KEY: &'static str = "routes";

    fn object(entry: &RouteEntry) -> Value {
        json!({
            "name": &*entry.name,
            "route_type": entry.route_type.as_str(),
            "model": {"name": &*entry.model, "provider": providers::info(entry.provider).mlflow25_listed_as},
            "route_url": format!("/gateway/{}/invocations", entry.name),
            "limit": listing::limit(entry),
        })
    }
}

/// A 2.5 request body to the unified model: refusals first (wrong shape for the route, `model`,
/// `n`, streaming), then 2.5's schema, whose violations are 422 as in MLflow.
fn parse(entry: &RouteEntry, body: Map<String, Value>) -> Result<LlmRequest, GatewayError> {
    reject_model(&body)?;
    check_body_kind(&entry.name, entry.route_type, &body, MLFLOW_25.input_field)?;
    if body.contains_key("n") {
        return Err(GatewayError::bad_param(
            "n",
            "Invalid parameter `n`. Use `candidate_count` instead.",
        ));
    }
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        return Err(GatewayError::bad_param(
            "stream",
            format!(
                "streaming is not part of the MLflow 2.5 API; stream from /endpoints/{0}/invocations or /v1",
                entry.name
            ),
        ));
    }
    let mut request = parse_request(entry.route_type, body, &MLFLOW_25)
        .map_err(GatewayError::schema_violation)?;
    let params = match &mut request {
        LlmRequest::Chat(r) => Some(&mut r.params),
        LlmRequest::Completions(r) => Some(&mut r.params),
        LlmRequest::Embeddings(_) | LlmRequest::Native(_) => None,
    };
    if let Some(t) = params.and_then(|p| p.temperature.as_mut()) {
        *t *= providers::info(entry.provider).mlflow25_temperature_scale;
    }
    Ok(request)
}

/// The answer in 2.5's shape: `{"candidates": [...], "metadata": {...}}` or `{"embeddings": [...], "metadata": {...}}`.
fn render(answer: &LlmResponse, entry: &RouteEntry) -> Value {
    let route_type = entry.route_type;
    match answer {
        LlmResponse::Generation(g) => {
            let candidates: Vec<Value> = g
                .choices
                .iter()
                .map(|c| {
                    let metadata = json!({"finish_reason": c.finish_reason});
                    if route_type == RouteType::Chat {
                        json!({"message": {"role": "assistant", "content": c.text}, "metadata": metadata})
                    } else {
                        json!({"text": c.text, "metadata": metadata})
                    }
                })
                .collect();
            json!({"candidates": candidates, "metadata": metadata(&g.usage, model_name(&g.model, &entry.model), route_type)})
        }
        LlmResponse::Embeddings(e) => {
            // Embeddings generate nothing: MLflow reports 0 output tokens and input as the total.
            let usage = Usage {
                completion_tokens: e.usage.completion_tokens.or(Some(0)),
                total_tokens: e.usage.total_tokens.or(e.usage.prompt_tokens),
                ..e.usage
            };
            json!({"embeddings": e.data, "metadata": metadata(&usage, model_name(&e.model, &entry.model), route_type)})
        }
        // Only the Messages surface sends native requests.
        LlmResponse::Native(n) => native_body(n),
    }
}

fn metadata(usage: &Usage, model: &str, route_type: RouteType) -> Value {
    json!({
        "input_tokens": usage.prompt_tokens,
        "output_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "model": model,
        "route_type": route_type.as_str(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Provider;
    use crate::llm::{Choice, Embeddings, Generation};

    fn entry(route_type: RouteType, provider: Provider) -> RouteEntry {
        RouteEntry {
            metrics: Default::default(),
            route_type,
            provider,
            model: "configured".into(),
            ..RouteEntry::not_ready("r")
        }
    }

    fn parse_json(
        route_type: RouteType,
        provider: Provider,
        v: Value,
    ) -> Result<LlmRequest, GatewayError> {
        match v {
            Value::Object(m) => parse(&entry(route_type, provider), m),
            _ => Err(GatewayError::bad_request("not an object")),
        }
    }

    fn status(r: Result<LlmRequest, GatewayError>) -> u16 {
        r.err().map_or(200, |e| e.status().as_u16())
    }

    #[test]
    fn provider_shown_to_the_25_client_is_one_it_accepts() {
        let accepted = ["openai", "anthropic", "cohere", "databricks-model-serving"];
        let listed = |p| providers::info(p).mlflow25_listed_as;
        for p in Provider::ALL {
            assert!(accepted.contains(&listed(p)), "{p}");
        }
        assert_eq!(listed(Provider::Groq), "openai");
        assert_eq!(listed(Provider::Anthropic), "anthropic");
    }

    #[test]
    fn maps_25_fields_and_rescales_temperature_per_provider() {
        let chat = json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 0.5, "candidate_count": 2, "top_k": 3});
        let Ok(LlmRequest::Chat(r)) = parse_json(RouteType::Chat, Provider::Openai, chat.clone())
        else {
            panic!("not chat")
        };
        assert_eq!((r.params.temperature, r.params.n), (Some(1.0), Some(2)));
        assert_eq!(r.extra, json!({"top_k": 3}).as_object().cloned().unwrap());
        let Ok(LlmRequest::Chat(r)) = parse_json(RouteType::Chat, Provider::Cohere, chat) else {
            panic!("not chat")
        };
        assert_eq!(r.params.temperature, Some(2.5));
        let Ok(LlmRequest::Embeddings(e)) = parse_json(
            RouteType::Embeddings,
            Provider::Openai,
            json!({"text": "a"}),
        ) else {
            panic!("not embeddings")
        };
        assert_eq!(e.input, vec!["a".to_string()]);
    }

    #[test]
    fn refusals_use_mlflow_statuses() {
        let msgs = json!([{"role": "user", "content": "hi"}]);
        let chat = |extra: Value| {
            let mut b = json!({"messages": msgs});
            if let (Some(b), Value::Object(e)) = (b.as_object_mut(), extra) {
                b.extend(e);
            }
            status(parse_json(RouteType::Chat, Provider::Openai, b))
        };
        assert_eq!(chat(json!({})), 200);
        assert_eq!(chat(json!({"model": "x"})), 422);
        assert_eq!(chat(json!({"n": 2})), 400);
        assert_eq!(chat(json!({"stream": true})), 400);
        assert_eq!(chat(json!({"temperature": 1.5})), 422);
        assert_eq!(chat(json!({"candidate_count": 6})), 422);
        assert_eq!(chat(json!({"max_tokens": 0})), 422);
        assert_eq!(
            status(parse_json(
                RouteType::Chat,
                Provider::Openai,
                json!({"messages": []})
            )),
            422
        );
        assert_eq!(
            status(parse_json(RouteType::Chat, Provider::Openai, json!({}))),
            422
        );
        assert_eq!(
            status(parse_json(
                RouteType::Embeddings,
                Provider::Openai,
                json!({"messages": msgs})
            )),
            400
        );
        assert_eq!(
            status(parse_json(
                RouteType::Completions,
                Provider::Openai,
                json!({"prompt": 3})
            )),
            422
        );
    }

    #[test]
    fn renders_candidates_and_metadata() {
        let g = LlmResponse::Generation(Generation {
            id: "x".into(),
            created: 1,
            model: "gpt-x".into(),
            choices: vec![Choice {
                index: 0,
                text: "hi".into(),
                finish_reason: Some("stop".into()),
                tool_calls: Vec::new(),
                message_extra: Map::new(),
            }],
            usage: Usage::new(Some(3), Some(1)),
        });
        assert_eq!(
            render(&g, &entry(RouteType::Chat, Provider::Openai)),
            json!({"candidates": [{"message": {"role": "assistant", "content": "hi"}, "metadata": {"finish_reason": "stop"}}],
                   "metadata": {"input_tokens": 3, "output_tokens": 1, "total_tokens": 4, "model": "gpt-x", "route_type": "llm/v1/chat"}})
        );
        assert_eq!(
            render(&g, &entry(RouteType::Completions, Provider::Openai))["candidates"][0],
            json!({"text": "hi", "metadata": {"finish_reason": "stop"}})
        );
        let e = LlmResponse::Embeddings(Embeddings {
            model: String::new(),
            data: vec![vec![0.5], vec![0.25]],
            usage: Usage::new(Some(2), None),
        });
        assert_eq!(
            render(&e, &entry(RouteType::Embeddings, Provider::Openai)),
            json!({"embeddings": [[0.5], [0.25]], "metadata": {"input_tokens": 2, "output_tokens": 0, "total_tokens": 2, "model": "configured", "route_type": "llm/v1/embeddings"}})
        );
    }
}
