//! The OpenAI-compatible family: servers that speak OpenAI's API, each with a few documented quirks.
//! One adapter serves them all; a provider is a row of `Quirks`, not a copy of the OpenAI code.

use bytes::Bytes;
use http::StatusCode;
use serde_json::Value;

use super::{
    ProviderAdapter, ProviderError, ProviderInfo, StreamDecoder, Target, UpstreamRequest, info,
    openai, path_segment, post_json, reject_n,
};
use crate::api::RouteType;
use crate::llm::{ChatRequest, CompletionsRequest, LlmRequest, LlmResponse};

/// How one OpenAI-compatible server departs from OpenAI.
pub struct OpenAiCompatible {
    info: &'static ProviderInfo,
    /// Whether `n > 1` is refused upstream (then the gateway refuses it first, with a clear message).
    n_must_be_one: bool,
    /// Fields the server spells differently: (OpenAI name, server name).
    renames: &'static [(&'static str, &'static str)],
    /// Databricks serving endpoints: `/serving-endpoints/{name}/invocations`, the endpoint fixes the model.
    serving_endpoint: bool,
}

const DEFAULTS: OpenAiCompatible = OpenAiCompatible {
    info: &info::OPENAI_COMPATIBLE,
    n_must_be_one: false,
    renames: &[],
    serving_endpoint: false,
};

pub static OPENAI_COMPATIBLE: OpenAiCompatible = OpenAiCompatible {
    info: &info::OPENAI_COMPATIBLE,
    ..DEFAULTS
};

pub static TOGETHER: OpenAiCompatible = OpenAiCompatible {
    info: &info::TOGETHER,
    ..DEFAULTS
};

pub static GROQ: OpenAiCompatible = OpenAiCompatible {
    info: &info::GROQ,
    n_must_be_one: true,
    ..DEFAULTS
};

pub static DEEPSEEK: OpenAiCompatible = OpenAiCompatible {
    info: &info::DEEPSEEK,
    ..DEFAULTS
};

pub static OLLAMA: OpenAiCompatible = OpenAiCompatible {
    info: &info::OLLAMA,
    ..DEFAULTS
};

pub static MISTRAL: OpenAiCompatible = OpenAiCompatible {
    info: &info::MISTRAL,
    renames: &[("seed", "random_seed")],
    ..DEFAULTS
};

pub static AI21: OpenAiCompatible = OpenAiCompatible {
    info: &info::AI21,
    ..DEFAULTS
};

pub static DATABRICKS: OpenAiCompatible = OpenAiCompatible {
    info: &info::DATABRICKS_MODEL_SERVING,
    serving_endpoint: true,
    ..DEFAULTS
};

impl ProviderAdapter for OpenAiCompatible {
    fn info(&self) -> &'static ProviderInfo {
        self.info
    }

    fn build_request(
        &self,
        target: &Target,
        request: &LlmRequest,
    ) -> Result<UpstreamRequest, ProviderError> {
        if self.n_must_be_one
            && let LlmRequest::Chat(ChatRequest { params, .. })
            | LlmRequest::Completions(CompletionsRequest { params, .. }) = request
        {
            reject_n(self.info.provider, params)?;
        }
        let url = if self.serving_endpoint {
            format!(
                "{}/serving-endpoints/{}/invocations",
                target.api_base,
                path_segment(&target.model)?
            )
        } else {
            [target.api_base.as_str(), openai::path(request.route_type())].concat()
        };
        let headers = openai::bearer_headers(target)?;
        if let LlmRequest::Native(request) = request {
            let body = openai::NativeBody {
                model: (!self.serving_endpoint).then_some(target.model.as_str()),
                request,
                stream_options: self.info.stream_options,
                renames: self.renames,
            };
            return Ok(post_json(url, headers, &body));
        }
        let mut body = openai::request_body(&target.model, request)?;
        if let Value::Object(fields) = &mut body {
            if !self.info.stream_options {
                fields.remove("stream_options");
            }
            for (from, to) in self.renames {
                if let Some(v) = fields.remove(*from) {
                    fields.insert((*to).to_string(), v);
                }
            }
            if self.serving_endpoint {
                fields.remove("model");
            }
        }
        Ok(post_json(url, headers, &body))
    }

    fn parse_response(
        &self,
        _target: &Target,
        route_type: RouteType,
        body: &[u8],
    ) -> Result<LlmResponse, ProviderError> {
        let answer = openai::parse_response(route_type, body)?;
        self.refuse_capacity_failure(&answer)?;
        Ok(answer)
    }

    fn stream_decoder(&self, route_type: RouteType) -> Box<dyn StreamDecoder> {
        openai::stream_decoder(route_type)
    }

    fn parse_native(
        &self,
        route_type: RouteType,
        body: Bytes,
    ) -> Result<LlmResponse, ProviderError> {
        // Read whole only when it may be the capacity failure: the usual answer is not parsed twice.
        if body
            .windows(CAPACITY_FAILURE.len())
            .any(|w| w == CAPACITY_FAILURE.as_bytes())
        {
            self.refuse_capacity_failure(&openai::parse_response(route_type, &body)?)?;
        }
        openai::parse_native(route_type, body)
    }
}

/// DeepSeek's "the server ran out of capacity mid-answer": a retryable failure, not an answer.
const CAPACITY_FAILURE: &str = "insufficient_system_resource";

impl OpenAiCompatible {
    fn refuse_capacity_failure(&self, answer: &LlmResponse) -> Result<(), ProviderError> {
        if let LlmResponse::Generation(g) = answer
            && g.choices
                .iter()
                .any(|c| c.finish_reason.as_deref() == Some(CAPACITY_FAILURE))
        {
            return Err(ProviderError::Upstream {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: format!(
                    "provider {} stopped generating: insufficient system resource",
                    self.info.provider
                ),
                retry_after: None,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, Method};
    use serde_json::{Map, json};

    use super::*;
    use crate::api::Provider;
    use crate::llm::{
        ChatMessage, ChatRequest, EmbeddingsRequest, LlmResponse, Params, StreamOptions,
    };
    use crate::providers::CredentialKeys;
    use crate::providers::{API_KEY, Credentials, SecretValue, adapter_for};

    fn target(key: Option<&str>) -> Target {
        let mut credentials = Credentials::default();
        if let Some(k) = key {
            credentials.insert(API_KEY, SecretValue::new(k));
        }
        Target {
            model: "m1".into(),
            api_base: "http://sim/base".into(),
            credentials,
            config: Default::default(),
        }
    }

    fn chat(n: Option<u32>, stream: bool, extra: Map<String, Value>) -> LlmRequest {
        LlmRequest::Chat(ChatRequest {
            messages: vec![ChatMessage::from_json("user", json!("hi"))],
            params: Params {
                max_tokens: Some(5),
                n,
                ..Default::default()
            },
            stream: StreamOptions {
                stream,
                include_usage: false,
            },
            extra,
        })
    }

    fn body(req: &UpstreamRequest) -> Value {
        serde_json::from_slice(&req.body).unwrap_or_default()
    }

    #[test]
    fn every_family_member_sends_openai_chat_with_bearer_key() {
        for p in [
            &TOGETHER,
            &GROQ,
            &DEEPSEEK,
            &OLLAMA,
            &OPENAI_COMPATIBLE,
            &MISTRAL,
            &AI21,
        ] {
            let req = p
                .build_request(&target(Some("k-1")), &chat(None, false, Map::new()))
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(req.method, Method::POST);
            assert_eq!(
                req.url, "http://sim/base/chat/completions",
                "{}",
                p.info.provider
            );
            assert_eq!(req.headers["authorization"], "Bearer k-1");
            assert!(req.headers["authorization"].is_sensitive());
            assert_eq!(
                body(&req),
                json!({"model":"m1","messages":[{"role":"user","content":"hi"}],"max_tokens":5})
            );
        }
    }

    #[test]
    fn keyless_servers_get_no_auth_header() {
        let req = OLLAMA
            .build_request(&target(None), &chat(None, false, Map::new()))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(req.headers.get("authorization").is_none());
        assert_eq!(
            OLLAMA.info().credential_keys,
            CredentialKeys::ApiKey { required: false }
        );
        assert_eq!(
            GROQ.info().credential_keys,
            CredentialKeys::ApiKey { required: true }
        );
    }

    #[test]
    fn groq_refuses_n_above_one_and_others_pass_it() {
        let err = GROQ
            .build_request(&target(Some("k")), &chat(Some(2), false, Map::new()))
            .err();
        assert_eq!(
            err,
            Some(ProviderError::Unsupported(
                "provider groq does not support n > 1".into()
            ))
        );
        let req = TOGETHER
            .build_request(&target(Some("k")), &chat(Some(2), false, Map::new()))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(body(&req)["n"], 2);
    }

    #[test]
    fn mistral_gets_random_seed_and_no_stream_options() {
        let mut extra = Map::new();
        extra.insert("seed".into(), json!(7));
        let req = MISTRAL
            .build_request(&target(Some("k")), &chat(None, true, extra.clone()))
            .unwrap_or_else(|e| panic!("{e}"));
        let b = body(&req);
        assert_eq!(b["random_seed"], 7);
        assert!(b.get("seed").is_none() && b.get("stream_options").is_none());
        assert_eq!(b["stream"], true);
        let req = DEEPSEEK
            .build_request(&target(Some("k")), &chat(None, true, extra))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(body(&req)["stream_options"], json!({"include_usage": true}));
        assert_eq!(body(&req)["seed"], 7);
    }

    #[test]
    fn databricks_posts_to_the_serving_endpoint_without_model() {
        let req = DATABRICKS
            .build_request(&target(Some("dapi-1")), &chat(None, true, Map::new()))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(req.url, "http://sim/base/serving-endpoints/m1/invocations");
        assert_eq!(req.headers["authorization"], "Bearer dapi-1");
        assert_eq!(
            body(&req),
            json!({"messages":[{"role":"user","content":"hi"}],"max_tokens":5,"stream":true})
        );
        let emb = LlmRequest::Embeddings(EmbeddingsRequest {
            input: vec!["a".into()],
            extra: Map::new(),
        });
        let req = DATABRICKS
            .build_request(&target(Some("d")), &emb)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(body(&req), json!({"input":["a"]}));
    }

    #[test]
    fn databricks_array_content_and_quirky_finish_reasons_are_normalised() {
        let body = br#"{"id":"x","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":[{"type":"reasoning","summary":[]},{"type":"text","text":"7"}]},"finish_reason":"eos"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
        let Ok(LlmResponse::Generation(g)) =
            DATABRICKS.parse_response(&target(None), RouteType::Chat, body)
        else {
            panic!("not a generation")
        };
        assert_eq!(g.choices[0].text, "7");
        assert_eq!(g.choices[0].finish_reason.as_deref(), Some("stop"));
        for (raw, want) in [
            ("model_length", "length"),
            ("stop_sequence", "stop"),
            ("tool_calls", "tool_calls"),
        ] {
            let body = format!(
                r#"{{"choices":[{{"index":0,"message":{{"content":"x"}},"finish_reason":"{raw}"}}]}}"#
            );
            let Ok(LlmResponse::Generation(g)) =
                MISTRAL.parse_response(&target(None), RouteType::Chat, body.as_bytes())
            else {
                panic!("not a generation")
            };
            assert_eq!(g.choices[0].finish_reason.as_deref(), Some(want));
        }
    }

    #[test]
    fn deepseek_resource_exhaustion_is_a_retryable_error() {
        let body = br#"{"choices":[{"index":0,"message":{"content":""},"finish_reason":"insufficient_system_resource"}]}"#;
        let err = DEEPSEEK
            .parse_response(&target(None), RouteType::Chat, body)
            .err();
        assert!(matches!(
            err,
            Some(ProviderError::Upstream { status, .. }) if status == StatusCode::SERVICE_UNAVAILABLE
        ));
    }

    #[test]
    fn error_shapes_of_the_family_keep_their_message() {
        let h = HeaderMap::new();
        for (p, body, want) in [
            (
                &MISTRAL,
                r#"{"object":"error","message":"Rate limit exceeded","type":"rate_limited","param":null,"code":"1300"}"#,
                "Rate limit exceeded",
            ),
            (
                &OLLAMA,
                r#"{"error":"model 'x' not found"}"#,
                "model 'x' not found",
            ),
            (
                &DATABRICKS,
                r#"{"error_code":"REQUEST_LIMIT_EXCEEDED","message":"slow down"}"#,
                "slow down",
            ),
            (
                &GROQ,
                r#"{"error":{"message":"Rate limit reached","type":"tokens","code":"rate_limit_exceeded"}}"#,
                "Rate limit reached",
            ),
        ] {
            let ProviderError::Upstream { message, .. } =
                p.parse_error(StatusCode::TOO_MANY_REQUESTS, &h, body.as_bytes())
            else {
                panic!("not upstream")
            };
            assert_eq!(message, want);
        }
    }

    #[test]
    fn groq_stream_usage_and_databricks_cumulative_usage_are_reported_once() {
        let wire = "data: {\"id\":\"g\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"},\"finish_reason\":null}],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1,\"total_tokens\":2}}\n\ndata: {\"id\":\"g\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"x_groq\":{\"id\":\"g\",\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}}\n\n";
        let mut d = GROQ.stream_decoder(RouteType::Chat);
        let mut out = Vec::new();
        d.feed(wire.as_bytes(), &mut out)
            .unwrap_or_else(|e| panic!("{e}"));
        d.finish(&mut out).unwrap_or_else(|e| panic!("{e}"));
        let usages: Vec<_> = out.iter().filter_map(|d| d.usage).collect();
        assert_eq!(usages.len(), 1);
        assert_eq!(usages[0].total_tokens, Some(3));
        assert_eq!(out[1].finish_reason.as_deref(), Some("stop"));
    }

    #[test]
    fn registry_serves_each_member_with_its_route_types() {
        assert_eq!(
            adapter_for(Provider::Deepseek).map(|a| a.info().route_types),
            Some(&[RouteType::Chat][..])
        );
        assert_eq!(
            adapter_for(Provider::Together).map(|a| a.info().default_api_base),
            Some(Some("https://api.together.xyz/v1"))
        );
        assert_eq!(
            adapter_for(Provider::OpenaiCompatible).map(|a| a.info().default_api_base),
            Some(None)
        );
    }

    fn native(route_type: RouteType, stream: bool, body: Value) -> LlmRequest {
        LlmRequest::Native(crate::llm::NativeRequest {
            route_type,
            body: body.as_object().cloned().unwrap_or_default(),
            stream,
            max_tokens: None,
            prompt_chars: 2,
            headers: Vec::new(),
        })
    }

    #[test]
    fn native_bodies_keep_the_callers_fields_through_each_members_quirks() {
        let chat = json!({
            "messages": [{"role": "user", "content": "hi"}],
            "seed": 7,
            "stream_options": {"include_obfuscation": false},
            "a_parameter_of_tomorrow": 1,
        });
        let sent = |p: &OpenAiCompatible, stream| {
            let req = p
                .build_request(
                    &target(Some("k")),
                    &native(RouteType::Chat, stream, chat.clone()),
                )
                .unwrap_or_else(|e| panic!("{e}"));
            (req.url.clone(), body(&req))
        };
        let (url, together) = sent(&TOGETHER, true);
        assert_eq!(url, "http://sim/base/chat/completions");
        assert_eq!(together["model"], "m1");
        assert_eq!(together["a_parameter_of_tomorrow"], 1);
        assert_eq!(
            together["stream_options"],
            json!({"include_obfuscation": false, "include_usage": true})
        );
        // Mistral: `seed` spelled its way, and no stream options at all.
        let (_, mistral) = sent(&MISTRAL, true);
        assert_eq!(
            (mistral["random_seed"].clone(), mistral.get("seed")),
            (json!(7), None)
        );
        assert!(mistral.get("stream_options").is_none());
        // Databricks: the endpoint names the model.
        let (url, databricks) = sent(&DATABRICKS, false);
        assert_eq!(url, "http://sim/base/serving-endpoints/m1/invocations");
        assert!(databricks.get("model").is_none() && databricks.get("stream_options").is_none());
        let embeddings = OLLAMA
            .build_request(
                &target(None),
                &native(RouteType::Embeddings, false, json!({"input": "hi"})),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(embeddings.url, "http://sim/base/embeddings");
    }

    #[test]
    fn a_native_answer_out_of_capacity_is_a_retryable_failure() {
        let answer = |reason: &str| {
            bytes::Bytes::from(format!(
                r#"{{"choices":[{{"index":0,"message":{{"role":"assistant","content":"par"}},"finish_reason":"{reason}"}}],"usage":{{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}}}"#
            ))
        };
        match DEEPSEEK.parse_native(RouteType::Chat, answer("insufficient_system_resource")) {
            Err(ProviderError::Upstream { status, .. }) => {
                assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE)
            }
            other => panic!("{other:?}"),
        }
        let Ok(LlmResponse::Native(n)) = DEEPSEEK.parse_native(RouteType::Chat, answer("stop"))
        else {
            panic!("not a native answer")
        };
        assert_eq!(n.usage.completion_tokens, Some(1));
    }
}
