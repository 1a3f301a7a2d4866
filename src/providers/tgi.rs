//! Hugging Face Text Generation Inference, native API: `/generate` and `/generate_stream` (SSE that
//! ends by connection close, the last event carrying `details`).

use http::StatusCode;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::sse::{SseDecoder, SseEvent, SseHandler};
use super::{
    ProviderAdapter, ProviderError, ProviderInfo, StreamDecoder, Target, UpstreamRequest,
    malformed, normalize_finish_reason, openai, post_json, reject_n, single_choice,
};
use crate::api::{Provider, RouteType};
use crate::llm::{LlmRequest, LlmResponse, StreamDelta, Usage};

pub struct Tgi;

impl ProviderAdapter for Tgi {
    fn info(&self) -> &'static ProviderInfo {
        &super::info::HUGGINGFACE_TGI
    }

    fn build_request(
        &self,
        target: &Target,
        request: &LlmRequest,
    ) -> Result<UpstreamRequest, ProviderError> {
        let LlmRequest::Completions(c) = request else {
            return Err(ProviderError::Unsupported(
                "provider huggingface-tgi serves only completions".into(),
            ));
        };
        reject_n(Provider::HuggingfaceTgi, &c.params)?;
        let mut parameters = Map::new();
        // TGI validates strictly: temperature must be > 0 (greedy is do_sample=false) and top_p < 1.
        match c.params.temperature {
            Some(t) if t > 0.0 => {
                parameters.insert("temperature".into(), json!(t));
                parameters.insert("do_sample".into(), json!(true));
            }
            Some(_) => {
                parameters.insert("do_sample".into(), json!(false));
            }
            None => {}
        }
        if let Some(p) = c.params.top_p.filter(|p| *p > 0.0 && *p < 1.0) {
            parameters.insert("top_p".into(), json!(p));
        }
        if let Some(m) = c.params.max_tokens {
            parameters.insert("max_new_tokens".into(), json!(m));
        }
        if let Some(stop) = &c.params.stop {
            parameters.insert("stop".into(), json!(stop));
        }
        for key in [
            "seed",
            "top_k",
            "repetition_penalty",
            "frequency_penalty",
            "truncate",
        ] {
            if let Some(v) = c.extra.get(key) {
                parameters.insert(key.into(), v.clone());
            }
        }
        parameters.insert("details".into(), json!(true));
        // Needed for prompt token counts: the prefill tokens are listed in `details`.
        parameters.insert("decoder_input_details".into(), json!(!c.stream.stream));
        let body = json!({"inputs": c.prompt, "parameters": parameters});
        let path = if c.stream.stream {
            "/generate_stream"
        } else {
            "/generate"
        };
        Ok(post_json(
            format!("{}{path}", target.api_base),
            openai::bearer_headers(target)?,
            &body,
        ))
    }

    fn parse_response(
        &self,
        _target: &Target,
        _route_type: RouteType,
        body: &[u8],
    ) -> Result<LlmResponse, ProviderError> {
        let wire: WireGenerate = serde_json::from_slice(body).map_err(malformed)?;
        let details = wire.details.unwrap_or_default();
        let prompt = details.prefill.as_ref().map(|p| p.len() as u64);
        Ok(single_choice(
            String::new(),
            String::new(),
            wire.generated_text,
            details.finish_reason.as_deref(),
            Vec::new(),
            Usage::new(prompt, details.generated_tokens),
        ))
    }

    fn stream_decoder(&self, _route_type: RouteType) -> Box<dyn StreamDecoder> {
        SseDecoder::boxed(TgiStream)
    }
}

#[derive(Deserialize)]
struct WireGenerate {
    #[serde(default)]
    generated_text: String,
    details: Option<WireDetails>,
}

#[derive(Deserialize, Default)]
struct WireDetails {
    finish_reason: Option<String>,
    #[serde(default, deserialize_with = "crate::llm::token_count")]
    generated_tokens: Option<u64>,
    #[serde(default, deserialize_with = "crate::llm::token_count")]
    input_length: Option<u64>,
    prefill: Option<Vec<Value>>,
}

#[derive(Deserialize)]
struct WireStreamEvent {
    token: Option<WireToken>,
    details: Option<WireDetails>,
    error: Option<String>,
}

#[derive(Deserialize)]
struct WireToken {
    #[serde(default)]
    text: String,
    #[serde(default)]
    special: bool,
}

struct TgiStream;

impl SseHandler for TgiStream {
    fn event(&mut self, event: SseEvent, out: &mut Vec<StreamDelta>) -> Result<(), ProviderError> {
        let wire: WireStreamEvent = serde_json::from_str(&event.data).map_err(malformed)?;
        if let Some(message) = wire.error {
            return Err(ProviderError::Upstream {
                status: StatusCode::BAD_GATEWAY,
                message,
                retry_after: None,
            });
        }
        let text = wire
            .token
            .filter(|t| !t.special && !t.text.is_empty())
            .map(|t| t.text);
        let (finish_reason, usage) = match wire.details {
            Some(d) => (
                d.finish_reason.as_deref().and_then(normalize_finish_reason),
                Some(Usage::new(d.input_length, d.generated_tokens)),
            ),
            None => (None, None),
        };
        if text.is_some() || finish_reason.is_some() {
            out.push(StreamDelta {
                text,
                finish_reason,
                ..Default::default()
            });
        }
        if usage.is_some() {
            out.push(StreamDelta {
                usage,
                ..Default::default()
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::{CompletionsRequest, Params, StreamOptions};
    use crate::providers::testing::{decode_split, text};
    use crate::providers::{API_KEY, Credentials, SecretValue};
    use http::HeaderMap;
    use proptest::prelude::*;

    fn target(key: Option<&str>) -> Target {
        let mut credentials = Credentials::default();
        if let Some(k) = key {
            credentials.insert(API_KEY, SecretValue::new(k));
        }
        Target {
            model: "tgi".into(),
            api_base: "http://tgi:8080".into(),
            credentials,
            config: Default::default(),
        }
    }

    fn completion(params: Params, stream: bool) -> LlmRequest {
        LlmRequest::Completions(CompletionsRequest {
            prompt: "Name a prime.".into(),
            params,
            stream: StreamOptions {
                stream,
                include_usage: false,
            },
            extra: Map::new(),
        })
    }

    #[test]
    fn generate_request_maps_params_within_tgi_validation() {
        let req = Tgi
            .build_request(
                &target(Some("hf_x")),
                &completion(
                    Params {
                        temperature: Some(0.7),
                        top_p: Some(1.0),
                        max_tokens: Some(50),
                        stop: Some(vec!["\n\n".into()]),
                        n: None,
                    },
                    false,
                ),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(req.url, "http://tgi:8080/generate");
        assert_eq!(req.headers["authorization"], "Bearer hf_x");
        let body: Value = serde_json::from_slice(&req.body).unwrap_or_default();
        assert_eq!(
            body,
            json!({"inputs":"Name a prime.","parameters":{"temperature":0.7,"do_sample":true,"max_new_tokens":50,"stop":["\n\n"],"details":true,"decoder_input_details":true}})
        );
        let req = Tgi
            .build_request(
                &target(None),
                &completion(
                    Params {
                        temperature: Some(0.0),
                        top_p: Some(0.5),
                        ..Default::default()
                    },
                    true,
                ),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(req.url, "http://tgi:8080/generate_stream");
        assert!(req.headers.get("authorization").is_none());
        let body: Value = serde_json::from_slice(&req.body).unwrap_or_default();
        assert_eq!(
            body["parameters"],
            json!({"do_sample":false,"top_p":0.5,"details":true,"decoder_input_details":false})
        );
        let err = Tgi
            .build_request(
                &target(None),
                &completion(
                    Params {
                        n: Some(2),
                        ..Default::default()
                    },
                    false,
                ),
            )
            .err();
        assert!(matches!(err, Some(ProviderError::Unsupported(_))));
    }

    #[test]
    fn parses_generation_and_errors() {
        let body = br#"{"generated_text":"7","details":{"finish_reason":"eos_token","generated_tokens":2,"seed":null,"prefill":[{"id":1,"text":"a"},{"id":2,"text":"b"},{"id":3,"text":"c"}],"tokens":[]}}"#;
        let Ok(LlmResponse::Generation(g)) =
            Tgi.parse_response(&target(None), RouteType::Completions, body)
        else {
            panic!("generation")
        };
        assert_eq!(g.choices[0].text, "7");
        assert_eq!(g.choices[0].finish_reason.as_deref(), Some("stop"));
        assert_eq!(g.usage, Usage::new(Some(3), Some(2)));
        let err = Tgi.parse_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            &HeaderMap::new(),
            br#"{"error":"Input validation error: `temperature` must be strictly positive","error_type":"validation"}"#,
        );
        assert!(
            matches!(err, ProviderError::Upstream { ref message, .. } if message.starts_with("Input validation error"))
        );
    }

    const STREAM: &str = "data:{\"index\":1,\"token\":{\"id\":1,\"text\":\"Hel\",\"logprob\":-0.1,\"special\":false},\"generated_text\":null,\"details\":null}\n\n:keep-alive\n\ndata:{\"index\":2,\"token\":{\"id\":2,\"text\":\"lo\",\"logprob\":-0.1,\"special\":false},\"generated_text\":null,\"details\":null}\n\ndata:{\"index\":3,\"token\":{\"id\":3,\"text\":\"</s>\",\"logprob\":-0.1,\"special\":true},\"generated_text\":\"Hello\",\"details\":{\"finish_reason\":\"length\",\"generated_tokens\":3,\"seed\":null,\"input_length\":4}}\n\n";

    #[test]
    fn stream_skips_special_tokens_and_reports_details() {
        let out = decode_split(&Tgi, RouteType::Completions, STREAM.as_bytes(), vec![])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(text(&out), "Hello");
        assert!(
            out.iter()
                .any(|d| d.finish_reason.as_deref() == Some("length"))
        );
        assert_eq!(
            out.iter().filter_map(|d| d.usage).collect::<Vec<_>>(),
            vec![Usage::new(Some(4), Some(3))]
        );
        let err = decode_split(
            &Tgi,
            RouteType::Completions,
            b"data: {\"error\":\"Request failed during generation\",\"error_type\":\"generation\"}\n\n",
            vec![],
        )
        .err();
        assert!(matches!(err, Some(ProviderError::Upstream { .. })));
    }

    proptest! {
        #[test]
        fn stream_is_the_same_however_it_is_cut(cuts in proptest::collection::vec(0..STREAM.len(), 0..8)) {
            let whole = decode_split(&Tgi, RouteType::Completions, STREAM.as_bytes(), vec![]);
            prop_assert_eq!(decode_split(&Tgi, RouteType::Completions, STREAM.as_bytes(), cuts), whole);
        }
    }
}
