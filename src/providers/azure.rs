//! Azure OpenAI: OpenAI's bodies on deployment-scoped URLs with a dated `api-version`, and an
//! `api-key` header (or a Microsoft Entra ID bearer token).

use http::header;
use serde_json::Value;

use super::info::AZURE_AD_TOKEN;
use super::{
    API_KEY, ProviderAdapter, ProviderError, ProviderInfo, StreamDecoder, Target, UpstreamRequest,
    insert_secret, json_headers, openai, path_segment, post_json,
};
use crate::api::RouteType;
use crate::llm::{LlmRequest, LlmResponse};

/// The newest GA version when this adapter was written; `config.apiVersion` overrides it.
pub const DEFAULT_API_VERSION: &str = "2024-10-21";

pub struct AzureOpenAi;

impl ProviderAdapter for AzureOpenAi {
    fn info(&self) -> &'static ProviderInfo {
        &super::info::AZURE_OPENAI
    }

    fn build_request(
        &self,
        target: &Target,
        request: &LlmRequest,
    ) -> Result<UpstreamRequest, ProviderError> {
        let path = openai::path(request.route_type());
        let version = target
            .config
            .get("apiVersion")
            .map(String::as_str)
            .unwrap_or(DEFAULT_API_VERSION);
        // The v1 API takes the deployment as the body's `model`; dated versions take it in the path.
        let v1 = version == "v1";
        let url = if v1 {
            format!("{}/openai/v1{path}", target.api_base)
        } else {
            format!(
                "{}/openai/deployments/{}{path}?api-version={}",
                target.api_base,
                path_segment(&target.model)?,
                path_segment(version)?
            )
        };
        let mut headers = json_headers();
        let entra = matches!(
            target.config.get("authType").map(String::as_str),
            Some("azureAd" | "azure_ad" | "entra")
        );
        match (
            target.credentials.get(AZURE_AD_TOKEN),
            target.credentials.get(API_KEY),
        ) {
            (Some(token), _) => insert_secret(
                &mut headers,
                header::AUTHORIZATION,
                &format!("Bearer {token}"),
            )?,
            (None, Some(key)) if entra => insert_secret(
                &mut headers,
                header::AUTHORIZATION,
                &format!("Bearer {key}"),
            )?,
            (None, Some(key)) => insert_secret(&mut headers, "api-key", key)?,
            (None, None) => {}
        }
        if let LlmRequest::Native(request) = request {
            let model = v1.then_some(target.model.as_str());
            return Ok(post_json(
                url,
                headers,
                &openai::NativeBody::plain(model, request),
            ));
        }
        let mut body = openai::request_body(&target.model, request)?;
        if !v1 && let Value::Object(fields) = &mut body {
            fields.remove("model");
        }
        Ok(post_json(url, headers, &body))
    }

    fn parse_response(
        &self,
        _target: &Target,
        route_type: RouteType,
        body: &[u8],
    ) -> Result<LlmResponse, ProviderError> {
        openai::parse_response(route_type, body)
    }

    fn stream_decoder(&self, route_type: RouteType) -> Box<dyn StreamDecoder> {
        openai::stream_decoder(route_type)
    }
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, StatusCode};
    use serde_json::{Map, json};

    use super::*;
    use crate::llm::{ChatMessage, ChatRequest, EmbeddingsRequest, Params, StreamOptions};
    use crate::providers::{Credentials, SecretValue};

    fn target(creds: &[(&str, &str)], config: &[(&str, &str)]) -> Target {
        let mut credentials = Credentials::default();
        for (k, v) in creds {
            credentials.insert(*k, SecretValue::new(*v));
        }
        Target {
            model: "gpt4o-prod".into(),
            api_base: "https://res.openai.azure.com".into(),
            credentials,
            config: config
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn chat() -> LlmRequest {
        LlmRequest::Chat(ChatRequest {
            messages: vec![ChatMessage::from_json("user", json!("hi"))],
            params: Params {
                temperature: Some(0.1),
                ..Default::default()
            },
            stream: StreamOptions {
                stream: true,
                include_usage: false,
            },
            extra: Map::new(),
        })
    }

    #[test]
    fn deployment_url_api_version_and_api_key_header() {
        let req = AzureOpenAi
            .build_request(&target(&[(API_KEY, "az-key")], &[]), &chat())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            req.url,
            "https://res.openai.azure.com/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
        );
        assert_eq!(req.headers["api-key"], "az-key");
        assert!(req.headers["api-key"].is_sensitive());
        assert!(req.headers.get("authorization").is_none());
        let body: Value = serde_json::from_slice(&req.body).unwrap_or_default();
        assert_eq!(
            body,
            json!({"messages":[{"role":"user","content":"hi"}],"temperature":0.1,"stream":true,"stream_options":{"include_usage":true}})
        );
        let emb = LlmRequest::Embeddings(EmbeddingsRequest {
            input: vec!["a".into()],
            extra: Map::new(),
        });
        let req = AzureOpenAi
            .build_request(
                &target(&[(API_KEY, "k")], &[("apiVersion", "2025-04-01-preview")]),
                &emb,
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            req.url,
            "https://res.openai.azure.com/openai/deployments/gpt4o-prod/embeddings?api-version=2025-04-01-preview"
        );
    }

    #[test]
    fn entra_token_goes_out_as_bearer() {
        let req = AzureOpenAi
            .build_request(&target(&[(AZURE_AD_TOKEN, "eyJ0")], &[]), &chat())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(req.headers["authorization"], "Bearer eyJ0");
        assert!(req.headers.get("api-key").is_none());
        let req = AzureOpenAi
            .build_request(
                &target(&[(API_KEY, "tok")], &[("authType", "azureAd")]),
                &chat(),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(req.headers["authorization"], "Bearer tok");
    }

    #[test]
    fn v1_api_keeps_model_in_body_without_api_version() {
        let req = AzureOpenAi
            .build_request(&target(&[(API_KEY, "k")], &[("apiVersion", "v1")]), &chat())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            req.url,
            "https://res.openai.azure.com/openai/v1/chat/completions"
        );
        let body: Value = serde_json::from_slice(&req.body).unwrap_or_default();
        assert_eq!(body["model"], "gpt4o-prod");
    }

    #[test]
    fn filter_only_chunks_are_skipped_and_errors_keep_azure_messages() {
        let wire = b"data: {\"id\":\"\",\"model\":\"\",\"choices\":[],\"prompt_filter_results\":[{\"prompt_index\":0}]}\n\ndata: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"ok\"},\"finish_reason\":\"content_filter\"}]}\n\ndata: [DONE]\n\n";
        let mut d = AzureOpenAi.stream_decoder(RouteType::Chat);
        let mut out = Vec::new();
        d.feed(wire, &mut out).unwrap_or_else(|e| panic!("{e}"));
        d.finish(&mut out).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].finish_reason.as_deref(), Some("content_filter"));
        let mut h = HeaderMap::new();
        h.insert(header::RETRY_AFTER, http::HeaderValue::from_static("6"));
        let err = AzureOpenAi.parse_error(
            StatusCode::TOO_MANY_REQUESTS,
            &h,
            br#"{"error":{"code":"429","message":"Requests to the ChatCompletions_Create Operation have exceeded token rate limit. Please retry after 6 seconds."}}"#,
        );
        assert!(
            matches!(err, ProviderError::Upstream { retry_after: Some(6), ref message, .. } if message.starts_with("Requests to the"))
        );
    }

    #[test]
    fn native_bodies_name_the_deployment_in_the_path_or_the_body() {
        let native = LlmRequest::Native(crate::llm::NativeRequest {
            route_type: RouteType::Embeddings,
            body: json!({"input": "hi", "dimensions": 8})
                .as_object()
                .cloned()
                .unwrap_or_default(),
            stream: false,
            max_tokens: None,
            prompt_chars: 2,
            headers: Vec::new(),
        });
        for (version, url, model) in [
            (
                None,
                "https://res.openai.azure.com/openai/deployments/gpt4o-prod/embeddings?api-version=2024-10-21",
                None,
            ),
            (
                Some("v1"),
                "https://res.openai.azure.com/openai/v1/embeddings",
                Some("gpt4o-prod"),
            ),
        ] {
            let config: Vec<_> = version.map(|v| ("apiVersion", v)).into_iter().collect();
            let req = AzureOpenAi
                .build_request(&target(&[(API_KEY, "az-key")], &config), &native)
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(req.url, url);
            assert_eq!(req.headers["api-key"], "az-key");
            let sent: Value = serde_json::from_slice(&req.body).unwrap_or_default();
            assert_eq!(sent["dimensions"], 8);
            assert_eq!(sent.get("model").and_then(Value::as_str), model);
        }
    }
}
