//! MLflow AI Gateway config files, as `mlflow gateway start --config-path` reads them: the 2.5
//! `routes:` format and the later `endpoints:` format (`route_type`/`endpoint_type`,
//! `model.provider`, `model.config` with `$ENV_VAR` keys, `limit`). Each endpoint becomes one Route;
//! anything that cannot be honoured is named in `Converted::unsupported`.

use std::collections::{BTreeMap, HashSet};

use serde_yaml::Value;

use super::convert::{Converted, KeyRef};
use super::yaml::{Fields, kind, scalar};
use crate::api::{
    BackendSpec, DEFAULT_SECRET_KEY, Limit, LimitKey, ModelSpec, Provider, RenewalPeriod, Route,
    RouteSpec, RouteType, SecretKeyRef,
};

/// Whether a parsed YAML document looks like an MLflow gateway config.
pub fn is_mlflow(doc: &Value) -> bool {
    doc.as_mapping().is_some_and(|m| {
        (m.contains_key("endpoints") || m.contains_key("routes"))
            && !m.contains_key("apiVersion")
            && !m.contains_key("model_list")
    })
}

/// Converts an MLflow gateway config. Route names are kept as MLflow wrote them; `import`
/// makes them Kubernetes names.
pub fn convert(doc: Value, namespace: Option<&str>) -> Converted {
    let mut out = Converted::default();
    let Some(mut top) = Fields::of("", doc, &mut out.unsupported) else {
        return out;
    };
    let endpoints = top.take("endpoints");
    let routes = top.take("routes");
    let (list_key, entries, traffic) = match (endpoints, routes) {
        (Some(e), traffic) => ("endpoints", e, traffic),
        (None, Some(r)) => ("routes", r, None),
        (None, None) => {
            out.unsupported
                .push("the config has neither `endpoints` nor `routes`".into());
            return out;
        }
    };
    top.finish(&mut out.unsupported);
    let Value::Sequence(entries) = entries else {
        out.unsupported.push(format!(
            "{list_key}: expected a list, found {}",
            kind(&entries)
        ));
        return out;
    };
    let mut names = HashSet::new();
    for (i, entry) in entries.into_iter().enumerate() {
        let path = format!("{list_key}[{i}]");
        if let Some(route) = endpoint(&path, entry, namespace, &mut out) {
            let name = route.metadata.name.clone().unwrap_or_default();
            if !names.insert(name.clone()) {
                out.unsupported
                    .push(format!("{path}.name: {name:?} is used by an earlier entry"));
                continue;
            }
            out.routes.push((path, route));
        }
    }
    if let Some(traffic) = traffic {
        traffic_routes(traffic, namespace, &mut names, &mut out);
    }
    out
}

/// MLflow 3's traffic routes (`routes:` next to `endpoints:`): each destination endpoint's model
/// becomes a backend weighted by its `traffic_percentage`, as MLflow picks one per request.
fn traffic_routes(
    traffic: Value,
    namespace: Option<&str>,
    names: &mut HashSet<String>,
    out: &mut Converted,
) {
    let Value::Sequence(entries) = traffic else {
        out.unsupported
            .push(format!("routes: expected a list, found {}", kind(&traffic)));
        return;
    };
    for (i, entry) in entries.into_iter().enumerate() {
        let path = format!("routes[{i}]");
        let Some(mut f) = Fields::of(&path, entry, &mut out.unsupported) else {
            continue;
        };
        let name = f.take_str("name", &mut out.unsupported);
        let task_type = f.take_str("task_type", &mut out.unsupported);
        let destinations = f.take("destinations");
        if let Some(strategy) = f.take_str("routing_strategy", &mut out.unsupported)
            && strategy != "TRAFFIC_SPLIT"
        {
            out.unsupported.push(format!(
                "{path}.routing_strategy: {strategy:?} is not supported (TRAFFIC_SPLIT)"
            ));
        }
        f.finish(&mut out.unsupported);
        let (Some(name), Some(task_type)) = (name, task_type) else {
            out.unsupported
                .push(format!("{path}: a traffic route needs name and task_type"));
            continue;
        };
        if !valid_name(&name) || !names.insert(name.clone()) {
            out.unsupported.push(format!(
                "{path}.name: {name:?} is not a valid name or is used by an earlier entry"
            ));
            continue;
        }
        let Some(route_type) = route_type_of(&task_type) else {
            out.unsupported
                .push(format!("{path}.task_type: {task_type:?} is not supported"));
            continue;
        };
        let Some(Value::Sequence(destinations)) = destinations else {
            out.unsupported
                .push(format!("{path}.destinations: expected a list"));
            continue;
        };
        let mut backends = Vec::new();
        for (j, d) in destinations.into_iter().enumerate() {
            let dpath = format!("{path}.destinations[{j}]");
            let Some(mut d) = Fields::of(&dpath, d, &mut out.unsupported) else {
                continue;
            };
            let target = d.take_str("name", &mut out.unsupported);
            let percentage = d.take_u64("traffic_percentage", &mut out.unsupported);
            d.finish(&mut out.unsupported);
            let Some(target) = target else {
                out.unsupported.push(format!("{dpath}.name is missing"));
                continue;
            };
            let endpoint = out
                .routes
                .iter()
                .map(|(_, r)| r)
                .find(|r| r.metadata.name.as_deref() == Some(target.as_str()));
            match endpoint.and_then(|r| Some((r.spec.route_type, r.spec.model.clone()?))) {
                Some((t, model)) if t == route_type => backends.push(BackendSpec {
                    model,
                    weight: Some(percentage.unwrap_or(0).min(10_000) as u32),
                    priority: None,
                    pricing: None,
                }),
                Some((t, _)) => out.unsupported.push(format!(
                    "{dpath}: endpoint {target:?} serves {t}, the route {route_type}"
                )),
                None => out
                    .unsupported
                    .push(format!("{dpath}: no endpoint is named {target:?}")),
            }
        }
        if backends.is_empty() {
            continue;
        }
        // MLflow mixes embedding models in a split as asked; say so rather than refuse it.
        let mixed = route_type == RouteType::Embeddings
            && backends
                .windows(2)
                .any(|w| w[0].model.name != w[1].model.name);
        let mut route = Route::new(
            &name,
            RouteSpec {
                route_type,
                model: None,
                backends,
                retry: None,
                outlier_detection: None,
                allow_mixed_models: mixed,
                limits: Vec::new(),
                access: None,
                pricing: None,
                cache: None,
                guardrails: Vec::new(),
            },
        );
        route.metadata.namespace = namespace.map(str::to_string);
        out.routes.push((path, route));
    }
}

fn route_type_of(text: &str) -> Option<RouteType> {
    match text {
        "llm/v1/chat" => Some(RouteType::Chat),
        "llm/v1/completions" => Some(RouteType::Completions),
        "llm/v1/embeddings" => Some(RouteType::Embeddings),
        _ => None,
    }
}

/// The gateway's name rule (`[\w\-\.]+`): a name must be usable in a URL path.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || c == '_' || c == '-' || c == '.')
}

fn endpoint(
    path: &str,
    entry: Value,
    namespace: Option<&str>,
    out: &mut Converted,
) -> Option<Route> {
    let mut f = Fields::of(path, entry, &mut out.unsupported)?;
    if f.take("destinations").is_some() {
        out.unsupported.push(format!(
            "{path}: traffic routes (destinations) are not supported"
        ));
        return None;
    }
    let name = f.take_str("name", &mut out.unsupported);
    let route_type = match (f.take("endpoint_type"), f.take("route_type")) {
        (Some(t), None) | (None, Some(t)) => {
            scalar(&f.at("endpoint_type"), t, &mut out.unsupported)
        }
        (Some(_), Some(_)) => {
            out.unsupported.push(format!(
                "{path}: give endpoint_type or route_type, not both"
            ));
            None
        }
        (None, None) => {
            out.unsupported.push(format!(
                "{path}: endpoint_type (route_type in 2.5) is missing"
            ));
            None
        }
    };
    let model = f.take_map("model", &mut out.unsupported);
    let limit = f.take_map("limit", &mut out.unsupported);
    f.finish(&mut out.unsupported);

    let Some(name) = name else {
        out.unsupported.push(format!("{path}.name is missing"));
        return None;
    };
    if !valid_name(&name) {
        out.unsupported.push(format!(
            "{path}.name: {name:?} may only hold letters, digits, '_', '-' and '.'"
        ));
        return None;
    }
    let route_type = route_type.as_deref()?;
    let Some(route_type) = route_type_of(route_type) else {
        out.unsupported.push(format!(
            "{path}.endpoint_type: {route_type:?} is not one of llm/v1/chat, llm/v1/completions, llm/v1/embeddings"
        ));
        return None;
    };
    let Some(model) = model else {
        out.unsupported.push(format!("{path}.model is missing"));
        return None;
    };
    let model_spec = model_spec(model, &name, out)?;
    let limits = limit
        .and_then(|l| mlflow_limit(l, out))
        .into_iter()
        .collect();
    let mut route = Route::new(
        &name,
        RouteSpec {
            limits,
            ..RouteSpec::new(route_type, model_spec)
        },
    );
    route.metadata.namespace = namespace.map(str::to_string);
    Some(route)
}

/// Where one `model.config` key goes.
enum Target {
    /// A key of the route's Secret.
    Secret(&'static str),
    ApiBase,
    /// A `spec.model.config` key.
    Config(&'static str),
    /// Azure: the deployment, which is the model name Portcullis sends.
    Deployment,
    /// OpenAI: `openai_api_type` picks OpenAI or Azure.
    ApiType,
    /// Bedrock's nested `aws_config`.
    Aws,
}

fn provider_of(raw: &str) -> Option<(Provider, Option<&'static str>)> {
    let normalised = raw.trim().to_ascii_lowercase().replace('_', "-");
    Some(match normalised.as_str() {
        "openai" => (Provider::Openai, None),
        "azure" | "azuread" => (Provider::AzureOpenai, None),
        "anthropic" => (Provider::Anthropic, None),
        "cohere" => (Provider::Cohere, None),
        "gemini" => (Provider::Gemini, None),
        "bedrock" | "amazon-bedrock" => (Provider::Bedrock, None),
        "mistral" => (Provider::Mistral, None),
        "huggingface-text-generation-inference" => (Provider::HuggingfaceTgi, None),
        "databricks" | "databricks-model-serving" => (Provider::DatabricksModelServing, None),
        "mlflow-model-serving" => (Provider::MlflowModelServing, None),
        "ai21labs" => (Provider::Ai21, None),
        "togetherai" => (Provider::Together, None),
        "groq" => (Provider::Groq, None),
        "deepseek" => (Provider::Deepseek, None),
        "ollama" => (Provider::Ollama, None),
        "xai" => (Provider::OpenaiCompatible, Some("https://api.x.ai/v1")),
        "openrouter" => (
            Provider::OpenaiCompatible,
            Some("https://openrouter.ai/api/v1"),
        ),
        _ => return None,
    })
}

fn target(provider: Provider, key: &str) -> Option<Target> {
    use Provider::*;
    Some(match (provider, key) {
        (Openai | AzureOpenai, "openai_api_key") => Target::Secret(DEFAULT_SECRET_KEY),
        (Openai | AzureOpenai, "openai_api_base") => Target::ApiBase,
        (Openai | AzureOpenai, "openai_organization") => Target::Config("organization"),
        (Openai | AzureOpenai, "openai_api_version") => Target::Config("apiVersion"),
        (Openai | AzureOpenai, "openai_deployment_name") => Target::Deployment,
        (Openai | AzureOpenai, "openai_api_type") => Target::ApiType,
        (Anthropic, "anthropic_api_key") => Target::Secret(DEFAULT_SECRET_KEY),
        (Anthropic, "anthropic_version") => Target::Config("anthropicVersion"),
        (Anthropic, "anthropic_api_base") => Target::ApiBase,
        (Cohere, "cohere_api_key") => Target::Secret(DEFAULT_SECRET_KEY),
        (Gemini, "gemini_api_key") => Target::Secret(DEFAULT_SECRET_KEY),
        (Bedrock, "aws_config") => Target::Aws,
        (Mistral, "mistral_api_key") => Target::Secret(DEFAULT_SECRET_KEY),
        (HuggingfaceTgi, "hf_server_url") => Target::ApiBase,
        (DatabricksModelServing, "host" | "databricks_workspace_url") => Target::ApiBase,
        (DatabricksModelServing, "token" | "databricks_api_token") => {
            Target::Secret(DEFAULT_SECRET_KEY)
        }
        (MlflowModelServing, "model_server_url") => Target::ApiBase,
        (Ai21, "ai21labs_api_key") => Target::Secret(DEFAULT_SECRET_KEY),
        (Together, "togetherai_api_key") => Target::Secret(DEFAULT_SECRET_KEY),
        (Groq | Deepseek | Ollama | OpenaiCompatible, "api_key") => {
            Target::Secret(DEFAULT_SECRET_KEY)
        }
        (Groq | Deepseek | Ollama | OpenaiCompatible, "api_base") => Target::ApiBase,
        _ => return None,
    })
}

fn model_spec(mut model: Fields, route: &str, out: &mut Converted) -> Option<ModelSpec> {
    let path = model.path().to_string();
    let provider_raw = model.take_str("provider", &mut out.unsupported);
    let name = model.take_str("name", &mut out.unsupported);
    // `config` is MLflow's key; `<provider>_config` blocks are read the same way.
    let mut configs = Vec::new();
    if let Some(c) = model.take_map("config", &mut out.unsupported) {
        configs.push(c);
    }
    for key in model.leftover_keys() {
        let short = key.rsplit('.').next().unwrap_or_default().to_string();
        if short.ends_with("_config")
            && let Some(c) = model.take_map(&short, &mut out.unsupported)
        {
            configs.push(c);
        }
    }
    model.finish(&mut out.unsupported);

    let Some(provider_raw) = provider_raw else {
        out.unsupported.push(format!("{path}.provider is missing"));
        return None;
    };
    let Some((mut provider, default_base)) = provider_of(&provider_raw) else {
        out.unsupported.push(format!(
            "{path}.provider: {provider_raw:?} is not supported (Portcullis serves openai, azure, azuread, anthropic, cohere, gemini, bedrock, mistral, huggingface-text-generation-inference, databricks, mlflow-model-serving, ai21labs, togetherai, groq, deepseek, ollama, xai, openrouter)"
        ));
        return None;
    };
    let Some(mut model_name) = name else {
        out.unsupported.push(format!("{path}.name is missing"));
        return None;
    };
    let mut api_base = default_base.map(str::to_string);
    let mut config = BTreeMap::new();
    let mut secret: BTreeMap<String, KeyRef> = BTreeMap::new();
    let mut deployment = None;
    if provider_raw.eq_ignore_ascii_case("azuread") {
        config.insert("authType".to_string(), "azureAd".to_string());
    }
    for mut block in configs {
        let keys: Vec<String> = block
            .leftover_keys()
            .into_iter()
            .map(|k| k.rsplit('.').next().unwrap_or_default().to_string())
            .collect();
        for key in keys {
            let Some(t) = target(provider, &key) else {
                continue;
            };
            if let Target::Aws = t {
                if let Some(mut aws) = block.take_map(&key, &mut out.unsupported) {
                    if let Some(region) = aws.take_str("aws_region", &mut out.unsupported) {
                        config.insert("region".to_string(), region);
                    }
                    for (field, secret_key) in [
                        ("aws_access_key_id", "awsAccessKeyId"),
                        ("aws_secret_access_key", "awsSecretAccessKey"),
                        ("aws_session_token", "awsSessionToken"),
                    ] {
                        if let Some(v) = aws.take_str(field, &mut out.unsupported) {
                            secret.insert(secret_key.to_string(), KeyRef::mlflow(&v));
                        }
                    }
                    aws.finish(&mut out.unsupported);
                }
                continue;
            }
            let Some(value) = block.take_str(&key, &mut out.unsupported) else {
                continue;
            };
            match t {
                Target::Secret(k) => {
                    secret.insert(k.to_string(), KeyRef::mlflow(&value));
                }
                Target::ApiBase => api_base = Some(value.trim_end_matches('/').to_string()),
                Target::Config(k) => {
                    config.insert(k.to_string(), value);
                }
                Target::Deployment => deployment = Some(value),
                Target::ApiType => match value.to_ascii_lowercase().as_str() {
                    "openai" | "open_ai" => {}
                    "azure" => provider = Provider::AzureOpenai,
                    "azuread" | "azure_ad" => {
                        provider = Provider::AzureOpenai;
                        config.insert("authType".to_string(), "azureAd".to_string());
                    }
                    other => out.unsupported.push(format!(
                        "{}.openai_api_type: {other:?} is not one of openai, azure, azuread",
                        block.path()
                    )),
                },
                Target::Aws => {}
            }
        }
        block.finish(&mut out.unsupported);
    }
    match provider {
        Provider::AzureOpenai => {
            // MLflow names the model and the deployment apart; Azure is called by deployment.
            if let Some(d) = deployment {
                model_name = d;
            }
        }
        _ => {
            if config.remove("apiVersion").is_some() {
                out.unsupported.push(format!(
                    "{path}.config.openai_api_version: only used with openai_api_type azure"
                ));
            }
            if deployment.is_some() {
                out.unsupported.push(format!(
                    "{path}.config.openai_deployment_name: only used with openai_api_type azure"
                ));
            }
        }
    }
    let secret_ref = if secret.is_empty() {
        None
    } else {
        let name = if secret.len() == 1
            && let Some(k) = secret.get(DEFAULT_SECRET_KEY)
        {
            out.add_key_secret(route, DEFAULT_SECRET_KEY, k.clone())
        } else {
            out.add_secret(&format!("{route}-credentials"), secret)
        };
        // Bedrock's adapter reads its own key names; `key` only matters for single-key providers.
        Some(SecretKeyRef {
            name,
            key: DEFAULT_SECRET_KEY.to_string(),
        })
    };
    Some(ModelSpec {
        provider,
        name: model_name,
        api_base,
        secret_ref,
        config,
        inference_pool: None,
        service: None,
        saturation: None,
    })
}

fn mlflow_limit(mut f: Fields, out: &mut Converted) -> Option<Limit> {
    let path = f.path().to_string();
    let period = f.take_str("renewal_period", &mut out.unsupported);
    let calls = f.take_u64("calls", &mut out.unsupported);
    if f.take("key").is_some() {
        out.unsupported.push(format!(
            "{path}.key: MLflow's open-source gateway does not use it; Portcullis counts per route (or per consumer with Route limits)"
        ));
    }
    f.finish(&mut out.unsupported);
    let period = period?;
    let renewal_period = match period.trim().to_ascii_lowercase().trim_start_matches("1 ") {
        "second" | "seconds" => RenewalPeriod::Second,
        "minute" | "minutes" => RenewalPeriod::Minute,
        "hour" | "hours" => RenewalPeriod::Hour,
        "day" | "days" => RenewalPeriod::Day,
        other => {
            out.unsupported.push(format!(
                "{path}.renewal_period: {other:?} is not supported (second, minute, hour or day)"
            ));
            return None;
        }
    };
    let Some(calls) = calls else {
        out.unsupported.push(format!("{path}.calls is missing"));
        return None;
    };
    Some(Limit {
        renewal_period,
        calls: Some(calls),
        tokens: None,
        usd: None,
        on_exceed: None,
        action: None,
        key: LimitKey::Route,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convert_str(yaml: &str) -> Converted {
        convert(serde_yaml::from_str(yaml).unwrap(), Some("default"))
    }

    #[test]
    fn the_25_routes_format() {
        let c = convert_str(
            r#"
routes:
  - name: completions
    route_type: llm/v1/completions
    model:
      provider: openai
      name: gpt-3.5-turbo-instruct
      config:
        openai_api_key: $OPENAI_API_KEY
  - name: claude
    route_type: llm/v1/chat
    model:
      provider: Anthropic
      name: claude-2
      config:
        anthropic_api_key: $ANTHROPIC_API_KEY
"#,
        );
        assert_eq!(c.unsupported, Vec::<String>::new());
        assert_eq!(c.routes.len(), 2);
        let (path, r) = &c.routes[0];
        assert_eq!(path, "routes[0]");
        assert_eq!(r.metadata.name.as_deref(), Some("completions"));
        assert_eq!(r.spec.route_type, RouteType::Completions);
        assert_eq!(r.spec.model.as_ref().unwrap().provider, Provider::Openai);
        let secret = r.spec.model.as_ref().unwrap().secret_ref.as_ref().unwrap();
        assert_eq!(
            (secret.name.as_str(), secret.key.as_str()),
            ("openai-api-key", "apiKey")
        );
        assert_eq!(
            c.routes[1].1.spec.model.as_ref().unwrap().provider,
            Provider::Anthropic
        );
        assert_eq!(
            c.secrets[0].data["apiKey"],
            KeyRef::Env("OPENAI_API_KEY".into())
        );
    }

    #[test]
    fn the_endpoints_format_with_limits_bases_and_azure() {
        let c = convert_str(
            r#"
endpoints:
  - name: chat
    endpoint_type: llm/v1/chat
    model: {provider: openai, name: gpt-4o-mini, config: {openai_api_key: $OPENAI_API_KEY, openai_api_base: "http://127.0.0.1:9/v1/"}}
    limit: {renewal_period: minute, calls: 10}
  - name: azure-chat
    endpoint_type: llm/v1/chat
    model:
      provider: openai
      name: gpt-35-turbo
      config:
        openai_api_type: azuread
        openai_api_key: $AZURE_TOKEN
        openai_api_base: https://res.openai.azure.com
        openai_api_version: "2024-02-01"
        openai_deployment_name: my-deployment
  - name: bedrock
    endpoint_type: llm/v1/embeddings
    model:
      provider: amazon_bedrock
      name: amazon.titan-embed-text-v1
      config:
        aws_config: {aws_region: eu-west-1, aws_access_key_id: $AWS_ID, aws_secret_access_key: $AWS_SECRET}
"#,
        );
        assert_eq!(c.unsupported, Vec::<String>::new());
        let chat = &c.routes[0].1.spec;
        assert_eq!(
            chat.model.as_ref().unwrap().api_base.as_deref(),
            Some("http://127.0.0.1:9/v1")
        );
        assert_eq!(chat.limits[0].calls, Some(10));
        assert_eq!(chat.limits[0].renewal_period, RenewalPeriod::Minute);
        let azure = c.routes[1].1.spec.model.as_ref().unwrap();
        assert_eq!(azure.provider, Provider::AzureOpenai);
        assert_eq!(azure.name, "my-deployment");
        assert_eq!(azure.config["apiVersion"], "2024-02-01");
        assert_eq!(azure.config["authType"], "azureAd");
        let bedrock = c.routes[2].1.spec.model.as_ref().unwrap();
        assert_eq!(bedrock.provider, Provider::Bedrock);
        assert_eq!(bedrock.config["region"], "eu-west-1");
        let plan = c
            .secrets
            .iter()
            .find(|s| Some(&s.name) == bedrock.secret_ref.as_ref().map(|r| &r.name))
            .unwrap();
        assert_eq!(plan.name, "bedrock-credentials");
        assert_eq!(
            plan.data["awsSecretAccessKey"],
            KeyRef::Env("AWS_SECRET".into())
        );
    }

    #[test]
    fn unsupported_keys_and_values_are_named() {
        let c = convert_str(
            r#"
endpoints:
  - name: chat
    endpoint_type: llm/v1/chat
    model: {provider: palm, name: chat-bison, config: {palm_api_key: x}}
  - name: chat2
    endpoint_type: llm/v1/chat
    extra_field: 1
    model: {provider: openai, name: gpt-4o, config: {openai_api_key: $K, openai_proxy: http://x}}
    limit: {renewal_period: 5 minutes, calls: 3}
routes:
  - {name: split, task_type: llm/v1/embeddings, destinations: [{name: chat2, traffic_percentage: 100}]}
"#,
        );
        let all = c.unsupported.join("\n");
        for needle in [
            "endpoints[0].model.provider: \"palm\" is not supported",
            "endpoints[1].extra_field: not supported",
            "endpoints[1].model.config.openai_proxy: not supported",
            "endpoints[1].limit.renewal_period: \"5 minutes\"",
            "routes[0].destinations[0]: endpoint \"chat2\" serves llm/v1/chat, the route llm/v1/embeddings",
        ] {
            assert!(all.contains(needle), "{needle} missing from:\n{all}");
        }
        assert_eq!(
            c.routes.len(),
            1,
            "chat2 still converts; serve refuses the file"
        );
    }

    #[test]
    fn bad_names_types_and_duplicates() {
        let c = convert_str(
            r#"
endpoints:
  - {name: "a/b", endpoint_type: llm/v1/chat, model: {provider: openai, name: m}}
  - {name: ok, endpoint_type: llm/v2/chat, model: {provider: openai, name: m}}
  - {name: dup, endpoint_type: llm/v1/chat, model: {provider: openai, name: m}}
  - {name: dup, endpoint_type: llm/v1/chat, model: {provider: openai, name: m}}
"#,
        );
        let all = c.unsupported.join("\n");
        assert!(all.contains("endpoints[0].name: \"a/b\""), "{all}");
        assert!(
            all.contains("endpoints[1].endpoint_type: \"llm/v2/chat\""),
            "{all}"
        );
        assert!(
            all.contains("endpoints[3].name: \"dup\" is used by an earlier entry"),
            "{all}"
        );
    }

    #[test]
    fn traffic_routes_split_by_weight() {
        let c = convert_str(
            r#"
endpoints:
  - {name: a, endpoint_type: llm/v1/chat, model: {provider: openai, name: gpt-4o, config: {openai_api_key: $K}}}
  - {name: b, endpoint_type: llm/v1/chat, model: {provider: anthropic, name: claude, config: {anthropic_api_key: $A}}}
routes:
  - name: split
    task_type: llm/v1/chat
    destinations: [{name: a, traffic_percentage: 80}, {name: b, traffic_percentage: 20}]
    routing_strategy: TRAFFIC_SPLIT
"#,
        );
        assert_eq!(c.unsupported, Vec::<String>::new());
        let split = &c.routes[2].1.spec;
        assert!(split.model.is_none());
        let backends: Vec<_> = split
            .backends
            .iter()
            .map(|b| (b.model.provider, b.weight))
            .collect();
        assert_eq!(
            backends,
            [
                (Provider::Openai, Some(80)),
                (Provider::Anthropic, Some(20))
            ]
        );
    }

    #[test]
    fn provider_config_blocks_are_read_like_config() {
        let c = convert_str(
            "endpoints:\n  - name: chat\n    endpoint_type: llm/v1/chat\n    model:\n      provider: openai\n      name: gpt-4o\n      openai_config: {openai_api_key: $OPENAI_API_KEY, openai_api_base: \"http://127.0.0.1:9/v1\"}\n",
        );
        assert_eq!(c.unsupported, Vec::<String>::new());
        let model = c.routes[0].1.spec.model.clone().unwrap();
        assert_eq!(model.api_base.as_deref(), Some("http://127.0.0.1:9/v1"));
        assert_eq!(model.secret_ref.unwrap().name, "openai-api-key");
    }

    #[test]
    fn recognises_mlflow_configs() {
        assert!(is_mlflow(&serde_yaml::from_str("endpoints: []").unwrap()));
        assert!(!is_mlflow(
            &serde_yaml::from_str("apiVersion: v1\nkind: Secret").unwrap()
        ));
    }
}
