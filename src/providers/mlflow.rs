//! MLflow model serving (`mlflow models serve`, or any server with its scoring protocol):
//! `POST {apiBase}/invocations` with `{"inputs": [...], "params": {...}}`, answering `{"predictions": [...]}`.

use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::features;
use super::{
    ProviderAdapter, ProviderError, ProviderInfo, StreamDecoder, Target, UpstreamRequest,
    malformed, openai, post_json,
};
use crate::api::{Provider, RouteType};
use crate::llm::{
    Choice, Embeddings, Generation, LlmRequest, LlmResponse, Params, StreamDelta, Usage, unix_now,
};

pub struct MlflowModelServing;

impl ProviderAdapter for MlflowModelServing {
    fn info(&self) -> &'static ProviderInfo {
        &super::info::MLFLOW_MODEL_SERVING
    }

    fn build_request(
        &self,
        target: &Target,
        request: &LlmRequest,
    ) -> Result<UpstreamRequest, ProviderError> {
        if request.stream().stream {
            return Err(ProviderError::Unsupported(
                "provider mlflow-model-serving does not support streaming".into(),
            ));
        }
        if let LlmRequest::Chat(c) = request {
            // A served model takes one text: images, formats and tools would be silently lost.
            features::refuse_images(Provider::MlflowModelServing, &c.messages)?;
            features::refuse_output_format(Provider::MlflowModelServing, &c.extra)?;
            if !features::tools(&c.extra)?.is_empty() {
                return Err(ProviderError::Unsupported(
                    "provider mlflow-model-serving does not support tools".into(),
                ));
            }
        }
        let body = match request {
            // As MLflow's own gateway does: a served pyfunc chat model answers one query per call.
            LlmRequest::Chat(c) => match c.messages.as_slice() {
                [one] => with_params(json!([one.text()]), &c.params),
                _ => {
                    return Err(ProviderError::Unsupported(
                        "provider mlflow-model-serving takes exactly one chat message per request"
                            .into(),
                    ));
                }
            },
            LlmRequest::Completions(c) => with_params(json!([c.prompt]), &c.params),
            LlmRequest::Embeddings(e) => json!({"inputs": e.input}),
            LlmRequest::Native(_) => {
                return Err(super::native_unsupported(Provider::MlflowModelServing));
            }
        };
        Ok(post_json(
            format!("{}/invocations", target.api_base),
            openai::bearer_headers(target)?,
            &body,
        ))
    }

    fn parse_response(
        &self,
        target: &Target,
        route_type: RouteType,
        body: &[u8],
    ) -> Result<LlmResponse, ProviderError> {
        let wire: WirePredictions = serde_json::from_slice(body).map_err(malformed)?;
        if route_type == RouteType::Embeddings {
            let data = wire
                .predictions
                .into_iter()
                .map(serde_json::from_value::<Vec<f64>>)
                .collect::<Result<Vec<_>, _>>()
                .map_err(malformed)?;
            return Ok(LlmResponse::Embeddings(Embeddings {
                model: target.model.clone(),
                data,
                usage: Usage::default(),
            }));
        }
        let choices = wire
            .predictions
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let text = match p {
                    Value::String(s) => Ok(s.clone()),
                    Value::Object(o) => o
                        .get("text")
                        .or(o.get("generated_text"))
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .ok_or_else(|| malformed("a prediction without text")),
                    _ => Err(malformed("a prediction that is not text")),
                }?;
                Ok(Choice {
                    index: i as u32,
                    text,
                    finish_reason: Some("stop".into()),
                    tool_calls: Vec::new(),
                    message_extra: Map::new(),
                })
            })
            .collect::<Result<Vec<_>, ProviderError>>()?;
        Ok(LlmResponse::Generation(Generation {
            id: String::new(),
            created: unix_now(),
            model: target.model.clone(),
            choices,
            usage: Usage::default(),
        }))
    }

    fn stream_decoder(&self, _route_type: RouteType) -> Box<dyn StreamDecoder> {
        Box::new(NoStream)
    }
}

fn with_params(inputs: Value, params: &Params) -> Value {
    match serde_json::to_value(params) {
        Ok(Value::Object(p)) if !p.is_empty() => json!({"inputs": inputs, "params": p}),
        _ => json!({"inputs": inputs}),
    }
}

#[derive(Deserialize)]
struct WirePredictions {
    predictions: Vec<Value>,
}

/// Never used: streaming requests are refused before they are sent.
struct NoStream;

impl StreamDecoder for NoStream {
    fn feed(&mut self, _bytes: &[u8], _out: &mut Vec<StreamDelta>) -> Result<(), ProviderError> {
        Err(ProviderError::Unsupported(
            "provider mlflow-model-serving does not support streaming".into(),
        ))
    }

    fn finish(&mut self, _out: &mut Vec<StreamDelta>) -> Result<(), ProviderError> {
        Ok(())
    }

    fn set_max_frame(&mut self, _max_bytes: usize) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::{
        ChatMessage, ChatRequest, CompletionsRequest, EmbeddingsRequest, StreamOptions,
    };
    use crate::providers::Credentials;
    use http::{HeaderMap, StatusCode};

    fn target() -> Target {
        Target {
            model: "my-model".into(),
            api_base: "http://serving:5000".into(),
            credentials: Credentials::default(),
            config: Default::default(),
        }
    }

    fn chat(messages: usize, stream: bool) -> LlmRequest {
        LlmRequest::Chat(ChatRequest {
            messages: (0..messages)
                .map(|_| ChatMessage::from_json("user", json!("hi")))
                .collect(),
            params: Params {
                temperature: Some(0.5),
                ..Default::default()
            },
            stream: StreamOptions {
                stream,
                include_usage: false,
            },
            extra: Map::new(),
        })
    }

    #[test]
    fn requests_follow_the_scoring_protocol() {
        let req = MlflowModelServing
            .build_request(&target(), &chat(1, false))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(req.url, "http://serving:5000/invocations");
        assert!(req.headers.get("authorization").is_none());
        let body: Value = serde_json::from_slice(&req.body).unwrap_or_default();
        assert_eq!(body, json!({"inputs":["hi"],"params":{"temperature":0.5}}));
        let req = MlflowModelServing
            .build_request(
                &target(),
                &LlmRequest::Completions(CompletionsRequest {
                    prompt: "p".into(),
                    params: Params::default(),
                    stream: StreamOptions::default(),
                    extra: Map::new(),
                }),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            serde_json::from_slice::<Value>(&req.body).unwrap_or_default(),
            json!({"inputs":["p"]})
        );
        let req = MlflowModelServing
            .build_request(
                &target(),
                &LlmRequest::Embeddings(EmbeddingsRequest {
                    input: vec!["a".into(), "b".into()],
                    extra: Map::new(),
                }),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            serde_json::from_slice::<Value>(&req.body).unwrap_or_default(),
            json!({"inputs":["a","b"]})
        );
    }

    #[test]
    fn several_messages_and_streaming_are_refused() {
        assert!(matches!(
            MlflowModelServing.build_request(&target(), &chat(2, false)),
            Err(ProviderError::Unsupported(_))
        ));
        assert!(matches!(
            MlflowModelServing.build_request(&target(), &chat(1, true)),
            Err(ProviderError::Unsupported(_))
        ));
    }

    #[test]
    fn parses_predictions() {
        let Ok(LlmResponse::Generation(g)) = MlflowModelServing.parse_response(
            &target(),
            RouteType::Completions,
            br#"{"predictions":["hello",{"text":"hi"}]}"#,
        ) else {
            panic!("generation")
        };
        assert_eq!(
            g.choices
                .iter()
                .map(|c| c.text.as_str())
                .collect::<Vec<_>>(),
            ["hello", "hi"]
        );
        let Ok(LlmResponse::Embeddings(e)) = MlflowModelServing.parse_response(
            &target(),
            RouteType::Embeddings,
            br#"{"predictions":[[0.1,0.2],[0.3,0.4]]}"#,
        ) else {
            panic!("embeddings")
        };
        assert_eq!(e.data, vec![vec![0.1, 0.2], vec![0.3, 0.4]]);
        let err = MlflowModelServing.parse_error(
            StatusCode::BAD_REQUEST,
            &HeaderMap::new(),
            br#"{"error_code":"BAD_REQUEST","message":"Failed to parse input"}"#,
        );
        assert!(
            matches!(err, ProviderError::Upstream { ref message, .. } if message == "Failed to parse input")
        );
    }
}
