//! LiteLLM proxy configs (`litellm --config config.yaml`): every `model_list` entry is a
//! deployment of its `model_name`, and each `model_name` becomes one Route whose backends are its
//! deployments (weights from `weight`, fallbacks from `fallbacks` as higher priorities). What
//! LiteLLM does that a Route cannot say is listed in `Converted::unsupported`.

use std::collections::BTreeMap;

use serde_yaml::Value;

use super::convert::{Converted, KeyRef, k8s_name};
use super::yaml::{Fields, kind};
use crate::api::{
    BackendSpec, DEFAULT_SECRET_KEY, Limit, LimitKey, ModelSpec, OutlierDetection, Provider,
    RenewalPeriod, RetryPolicy, Route, RouteSpec, RouteType, SecretKeyRef,
};
use crate::traffic::MAX_BACKENDS;

/// Whether a parsed YAML document looks like a LiteLLM proxy config.
pub fn is_litellm(doc: &Value) -> bool {
    doc.get("model_list").is_some()
}

/// One `model_list` entry, translated.
struct Deployment {
    path: String,
    model_name: String,
    route_type: RouteType,
    model: ModelSpec,
    weight: Option<u32>,
    rpm: Option<u64>,
    tpm: Option<u64>,
}

/// The provider of a LiteLLM model string (`provider/model`), with the model name sent upstream
/// and the default base URL for OpenAI-compatible providers Portcullis has no adapter of its own for.
fn provider_of(model: &str) -> Option<(Provider, String, Option<&'static str>)> {
    let (prefix, rest) = match model.split_once('/') {
        Some((p, r)) => (p, r.to_string()),
        None => {
            // LiteLLM infers a few providers from bare model names.
            let bare = model.to_ascii_lowercase();
            let provider = if bare.starts_with("gpt-")
                || bare.starts_with("o1")
                || bare.starts_with("o3")
                || bare.starts_with("o4")
                || bare.starts_with("chatgpt")
                || bare.starts_with("text-embedding-")
                || bare.starts_with("gpt-3.5-turbo-instruct")
            {
                Provider::Openai
            } else if bare.starts_with("claude") {
                Provider::Anthropic
            } else if bare.starts_with("command") {
                Provider::Cohere
            } else {
                return None;
            };
            return Some((provider, model.to_string(), None));
        }
    };
    let (provider, base) = match prefix {
        "openai" | "text-completion-openai" => (Provider::Openai, None),
        "azure" | "azure_text" => (Provider::AzureOpenai, None),
        "anthropic" => (Provider::Anthropic, None),
        "cohere" | "cohere_chat" => (Provider::Cohere, None),
        "gemini" => (Provider::Gemini, None),
        "bedrock" => (Provider::Bedrock, None),
        "mistral" => (Provider::Mistral, None),
        "databricks" => (Provider::DatabricksModelServing, None),
        "ai21" | "ai21_chat" => (Provider::Ai21, None),
        "together_ai" => (Provider::Together, None),
        "groq" => (Provider::Groq, None),
        "deepseek" => (Provider::Deepseek, None),
        "ollama" | "ollama_chat" => (Provider::Ollama, None),
        "huggingface" => (Provider::HuggingfaceTgi, None),
        "hosted_vllm" | "lm_studio" | "openai_like" => (Provider::OpenaiCompatible, None),
        "xai" => (Provider::OpenaiCompatible, Some("https://api.x.ai/v1")),
        "openrouter" => (
            Provider::OpenaiCompatible,
            Some("https://openrouter.ai/api/v1"),
        ),
        _ => return None,
    };
    // Bedrock's Converse route is LiteLLM's `bedrock/converse/<model>`.
    let rest = match rest.strip_prefix("converse/") {
        Some(r) if provider == Provider::Bedrock => r.to_string(),
        _ => rest,
    };
    Some((provider, rest, base))
}

/// Converts a LiteLLM proxy config: one Route per `model_name`.
pub fn convert(doc: Value, namespace: Option<&str>) -> Converted {
    let mut out = Converted::default();
    let Some(mut top) = Fields::of("", doc, &mut out.unsupported) else {
        return out;
    };
    let list = top.take("model_list");
    let mut fallbacks: Vec<(String, Vec<String>)> = Vec::new();
    let mut policy = RouterPolicy::default();
    for section in ["router_settings", "litellm_settings"] {
        if let Some(mut s) = top.take_map(section, &mut out.unsupported) {
            let u = &mut out.unsupported;
            if let Some(f) = s.take("fallbacks") {
                fallbacks.extend(parse_fallbacks(&s.at("fallbacks"), f, u));
            }
            policy.num_retries = s.take_u64("num_retries", u).or(policy.num_retries);
            policy.allowed_fails = s.take_u64("allowed_fails", u).or(policy.allowed_fails);
            policy.cooldown_time = s.take_u64("cooldown_time", u).or(policy.cooldown_time);
            // Weighted random choice is what backends' weights do.
            if let Some(strategy) = s.take_str("routing_strategy", u)
                && strategy != "simple-shuffle"
            {
                u.push(format!(
                    "{}: {strategy:?} is not carried over; backends are chosen at random by weight (simple-shuffle)",
                    s.at("routing_strategy")
                ));
            }
            s.finish(u);
        }
    }
    top.finish(&mut out.unsupported);
    let entries = match list {
        Some(Value::Sequence(entries)) => entries,
        Some(other) => {
            out.unsupported.push(format!(
                "model_list: expected a list, found {}",
                kind(&other)
            ));
            return out;
        }
        None => return out,
    };
    let mut deployments = Vec::new();
    for (i, entry) in entries.into_iter().enumerate() {
        if let Some(d) = deployment(&format!("model_list[{i}]"), entry, &mut out) {
            deployments.push(d);
        }
    }
    routes_per_model_name(deployments, &fallbacks, &policy, namespace, &mut out);
    out
}

fn parse_fallbacks(
    path: &str,
    value: Value,
    unsupported: &mut Vec<String>,
) -> Vec<(String, Vec<String>)> {
    let mut all = Vec::new();
    let Value::Sequence(items) = value else {
        unsupported.push(format!("{path}: expected a list, found {}", kind(&value)));
        return all;
    };
    for (i, item) in items.into_iter().enumerate() {
        let Value::Mapping(m) = item else {
            unsupported.push(format!("{path}[{i}]: expected a mapping"));
            continue;
        };
        for (k, v) in m {
            let (Some(from), Value::Sequence(to)) = (k.as_str(), v) else {
                unsupported.push(format!("{path}[{i}]: expected `name: [fallback, ...]`"));
                continue;
            };
            let to = to
                .into_iter()
                .filter_map(|t| t.as_str().map(str::to_string))
                .collect();
            all.push((from.to_string(), to));
        }
    }
    all
}

fn deployment(path: &str, entry: Value, out: &mut Converted) -> Option<Deployment> {
    let u = &mut out.unsupported;
    let mut f = Fields::of(path, entry, u)?;
    let model_name = f.take_str("model_name", u);
    let mut params = f.take_map("litellm_params", u);
    let mut info = f.take_map("model_info", u);
    let mut rpm = f.take_u64("rpm", u);
    let mut tpm = f.take_u64("tpm", u);
    f.finish(u);
    let Some(model_name) = model_name else {
        u.push(format!("{path}.model_name is missing"));
        return None;
    };
    let Some(mut p) = params.take() else {
        u.push(format!("{path}.litellm_params is missing"));
        return None;
    };
    let model = p.take_str("model", u);
    let api_key = p.take_str("api_key", u);
    let api_base = p
        .take_str("api_base", u)
        .and_then(|b| env_value(&p.at("api_base"), &b, u));
    let api_version = p
        .take_str("api_version", u)
        .and_then(|v| env_value(&p.at("api_version"), &v, u));
    let organization = p.take_str("organization", u);
    let region = p.take_str("aws_region_name", u);
    let aws: Vec<(&str, String)> = [
        ("aws_access_key_id", "awsAccessKeyId"),
        ("aws_secret_access_key", "awsSecretAccessKey"),
        ("aws_session_token", "awsSessionToken"),
    ]
    .into_iter()
    .filter_map(|(field, key)| p.take_str(field, u).map(|v| (key, v)))
    .collect();
    rpm = p.take_u64("rpm", u).or(rpm);
    tpm = p.take_u64("tpm", u).or(tpm);
    let weight = p.take_u64("weight", u).map(|w| w.min(10_000) as u32);
    p.finish(u);
    let mode = info.as_mut().and_then(|i| i.take_str("mode", u));
    if let Some(i) = info {
        i.finish(u);
    }

    let Some(model) = model else {
        u.push(format!("{path}.litellm_params.model is missing"));
        return None;
    };
    let Some((provider, name, default_base)) = provider_of(&model) else {
        u.push(format!(
            "{path}.litellm_params.model: {model:?}: the provider is not supported (Portcullis serves openai, azure, anthropic, cohere, gemini, bedrock, mistral, databricks, ai21, together_ai, groq, deepseek, ollama, huggingface (TGI), hosted_vllm, xai, openrouter)"
        ));
        return None;
    };
    let route_type = match mode.as_deref() {
        Some("chat") => RouteType::Chat,
        Some("completion") => RouteType::Completions,
        Some("embedding") => RouteType::Embeddings,
        Some(other) => {
            u.push(format!(
                "{path}.model_info.mode: {other:?} is not served (chat, completion or embedding)"
            ));
            return None;
        }
        None if model.starts_with("text-completion-openai/") => RouteType::Completions,
        None if name.contains("embed") => RouteType::Embeddings,
        None => RouteType::Chat,
    };
    let mut api_base = api_base.or(default_base.map(str::to_string));
    if provider == Provider::Ollama
        && let Some(base) = &api_base
        && !base.trim_end_matches('/').ends_with("/v1")
    {
        // LiteLLM talks to Ollama's native API; Portcullis to its OpenAI-compatible /v1.
        api_base = Some(format!("{}/v1", base.trim_end_matches('/')));
    }
    let mut config = BTreeMap::new();
    if let Some(v) = api_version {
        if provider == Provider::AzureOpenai {
            config.insert("apiVersion".to_string(), v);
        } else {
            u.push(format!(
                "{path}.litellm_params.api_version: only used with azure/ models"
            ));
        }
    }
    if let Some(o) = organization {
        if provider == Provider::Openai {
            config.insert("organization".to_string(), o);
        } else {
            u.push(format!(
                "{path}.litellm_params.organization: only used with openai/ models"
            ));
        }
    }
    if let Some(r) = region {
        config.insert("region".to_string(), r);
    }
    let route_name = k8s_name(&model_name);
    let secret_ref = if !aws.is_empty() {
        let data = aws
            .into_iter()
            .map(|(k, v)| (k.to_string(), KeyRef::litellm(&v)))
            .collect();
        Some(out.add_secret(&format!("{route_name}-aws"), data))
    } else {
        api_key.map(|k| out.add_key_secret(&route_name, DEFAULT_SECRET_KEY, KeyRef::litellm(&k)))
    }
    .map(|name| SecretKeyRef {
        name,
        key: DEFAULT_SECRET_KEY.to_string(),
    });
    Some(Deployment {
        path: path.to_string(),
        model_name,
        route_type,
        model: ModelSpec {
            provider,
            name,
            api_base,
            secret_ref,
            config,
            inference_pool: None,
            service: None,
            saturation: None,
        },
        weight,
        rpm,
        tpm,
    })
}

/// `os.environ/NAME` in a non-secret field is read now; it must be set.
fn env_value(path: &str, value: &str, unsupported: &mut Vec<String>) -> Option<String> {
    match KeyRef::litellm(value) {
        KeyRef::Literal(v) => Some(v),
        env => match env.resolve() {
            Ok(v) => Some(v),
            Err(e) => {
                unsupported.push(format!("{path}: {e}"));
                None
            }
        },
    }
}

fn limits(rpm: Option<u64>, tpm: Option<u64>) -> Vec<Limit> {
    let minute = |calls, tokens| Limit {
        renewal_period: RenewalPeriod::Minute,
        calls,
        tokens,
        usd: None,
        on_exceed: None,
        action: None,
        key: LimitKey::Route,
    };
    match (rpm, tpm) {
        (None, None) => vec![],
        (calls, tokens) => vec![minute(calls, tokens)],
    }
}

fn route(name: &str, namespace: Option<&str>, spec: RouteSpec) -> Route {
    let mut route = Route::new(name, spec);
    route.metadata.namespace = namespace.map(str::to_string);
    route
}

/// What `router_settings` says about retries and cooldowns, carried into each multi-backend Route.
#[derive(Default)]
struct RouterPolicy {
    num_retries: Option<u64>,
    allowed_fails: Option<u64>,
    cooldown_time: Option<u64>,
}

/// One Route per `model_name`. A name with one deployment and no fallbacks is a `model` Route;
/// otherwise each deployment is a priority-0 backend (weighted by `weight`), and the deployments
/// of each fallback name follow at priority 1, 2, ... in the order `fallbacks` lists them.
fn routes_per_model_name(
    deployments: Vec<Deployment>,
    fallbacks: &[(String, Vec<String>)],
    policy: &RouterPolicy,
    namespace: Option<&str>,
    out: &mut Converted,
) {
    let mut groups: Vec<(String, Vec<Deployment>)> = Vec::new();
    for d in deployments {
        match groups.iter_mut().find(|(name, _)| *name == d.model_name) {
            Some((_, group)) => group.push(d),
            None => groups.push((d.model_name.clone(), vec![d])),
        }
    }
    let mut taken: Vec<String> = Vec::new();
    for (model_name, group) in &groups {
        let mut name = k8s_name(model_name);
        while taken.contains(&name) {
            name.push_str("-x");
        }
        taken.push(name.clone());
        if name != *model_name {
            out.comment(
                &name,
                format!("LiteLLM model_name {model_name:?} is called {name:?} here"),
            );
        }
        let route_type = group[0].route_type;
        let paths: Vec<&str> = group.iter().map(|d| d.path.as_str()).collect();
        let chain: Vec<&String> = fallbacks
            .iter()
            .filter(|(from, _)| from == model_name)
            .flat_map(|(_, to)| to)
            .collect();
        let limits = limits(
            sum(group.iter().map(|d| d.rpm)),
            sum(group.iter().map(|d| d.tpm)),
        );
        if group.len() > 1 && !limits.is_empty() {
            out.comment(
                &name,
                "limits: the sum of the deployments' rpm/tpm, for the route as a whole".into(),
            );
        }
        if group.len() == 1 && chain.is_empty() {
            let spec = RouteSpec {
                limits,
                ..RouteSpec::new(route_type, group[0].model.clone())
            };
            out.routes
                .push((paths.join(", "), route(&name, namespace, spec)));
            continue;
        }
        let mut backends = Vec::new();
        for d in group {
            if d.route_type != route_type {
                out.unsupported.push(format!(
                    "{}: a {} deployment of {model_name:?}, whose first deployment is {}; left out",
                    d.path, d.route_type, route_type
                ));
                continue;
            }
            backends.push(backend(d, 0));
        }
        for (i, fallback) in chain.iter().enumerate() {
            let priority = (i + 1).min(15) as u32;
            let Some((_, fallback_group)) = groups.iter().find(|(n, _)| n == *fallback) else {
                out.unsupported.push(format!(
                    "fallbacks: {model_name:?} -> {fallback:?}: no model_list entry is named {fallback:?}"
                ));
                continue;
            };
            for d in fallback_group {
                if d.route_type != route_type {
                    out.unsupported.push(format!(
                        "fallbacks: {model_name:?} -> {fallback:?}: {} is a {} deployment, {model_name:?} serves {route_type}; left out",
                        d.path, d.route_type
                    ));
                    continue;
                }
                backends.push(backend(d, priority));
            }
            out.comment(
                &name,
                format!("priority {priority}: the fallback to {fallback:?}"),
            );
        }
        if backends.len() > MAX_BACKENDS {
            out.unsupported.push(format!(
                "model_list: {model_name:?} has {} deployments and fallbacks; a Route takes {MAX_BACKENDS}, the rest are left out",
                backends.len()
            ));
            backends.truncate(MAX_BACKENDS);
        }
        let mixed = route_type == RouteType::Embeddings
            && backends
                .windows(2)
                .any(|w| w[0].model.name != w[1].model.name);
        if mixed {
            out.comment(
                &name,
                "allowMixedModels: LiteLLM mixes these embedding models; their vectors are not comparable".into(),
            );
        }
        let retry = policy.num_retries.map(|n| RetryPolicy {
            attempts: Some((n + 1).min(10) as u32),
            ..Default::default()
        });
        let outlier_detection = (policy.allowed_fails.is_some() || policy.cooldown_time.is_some())
            .then(|| OutlierDetection {
                consecutive_failures: policy.allowed_fails.map(|n| n.min(1000) as u32),
                base_ejection_time: policy.cooldown_time.map(|s| format!("{}s", s.min(999_999))),
                ..Default::default()
            });
        let spec = RouteSpec {
            route_type,
            model: None,
            backends,
            retry,
            outlier_detection,
            allow_mixed_models: mixed,
            limits,
            access: None,
            pricing: None,
            cache: None,
            guardrails: Vec::new(),
        };
        out.routes
            .push((paths.join(", "), route(&name, namespace, spec)));
    }
}

fn backend(d: &Deployment, priority: u32) -> BackendSpec {
    BackendSpec {
        model: d.model.clone(),
        weight: d.weight,
        priority: (priority > 0).then_some(priority),
        pricing: None,
    }
}

/// The sum of the values that are set; `None` when none is.
fn sum(values: impl Iterator<Item = Option<u64>>) -> Option<u64> {
    values.flatten().reduce(|a, b| a.saturating_add(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convert_str(yaml: &str) -> Converted {
        convert(serde_yaml::from_str(yaml).unwrap(), None)
    }

    fn spec(c: &Converted, name: &str) -> RouteSpec {
        c.routes
            .iter()
            .find(|(_, r)| r.metadata.name.as_deref() == Some(name))
            .map(|(_, r)| r.spec.clone())
            .unwrap()
    }

    #[test]
    fn providers_keys_modes_and_limits() {
        let c = convert_str(
            r#"
model_list:
  - model_name: gpt-4o
    litellm_params: {model: openai/gpt-4o, api_key: os.environ/OPENAI_API_KEY, rpm: 60, tpm: 10000}
  - model_name: claude
    litellm_params: {model: anthropic/claude-3-5-sonnet-latest, api_key: os.environ/ANTHROPIC_API_KEY}
  - model_name: embed
    litellm_params: {model: azure/my-embedding-deployment, api_base: "https://res.openai.azure.com", api_version: "2024-02-01", api_key: os.environ/AZURE_API_KEY}
    model_info: {mode: embedding}
  - model_name: titan
    litellm_params: {model: bedrock/amazon.titan-text-express-v1, aws_access_key_id: os.environ/AWS_ID, aws_secret_access_key: os.environ/AWS_SECRET, aws_region_name: us-west-2}
  - model_name: local
    litellm_params: {model: ollama/llama3, api_base: "http://localhost:11434"}
"#,
        );
        assert_eq!(c.unsupported, Vec::<String>::new());
        let model = |n: &str| spec(&c, n).model.unwrap();
        let gpt = spec(&c, "gpt-4o");
        assert_eq!(gpt.limits[0].calls, Some(60));
        assert_eq!(gpt.limits[0].tokens, Some(10000));
        assert_eq!(model("gpt-4o").provider, Provider::Openai);
        assert_eq!(model("gpt-4o").name, "gpt-4o");
        assert_eq!(model("gpt-4o").secret_ref.unwrap().name, "openai-api-key");
        assert_eq!(spec(&c, "embed").route_type, RouteType::Embeddings);
        let embed = model("embed");
        assert_eq!(embed.provider, Provider::AzureOpenai);
        assert_eq!(embed.name, "my-embedding-deployment");
        assert_eq!(embed.config["apiVersion"], "2024-02-01");
        let titan = model("titan");
        assert_eq!(titan.config["region"], "us-west-2");
        assert_eq!(titan.secret_ref.unwrap().name, "titan-aws");
        assert_eq!(
            model("local").api_base.as_deref(),
            Some("http://localhost:11434/v1")
        );
        assert_eq!(model("claude").provider, Provider::Anthropic);
    }

    #[test]
    fn untranslatable_keys_are_listed() {
        let c = convert_str(
            r#"
model_list:
  - model_name: a
    litellm_params: {model: openai/gpt-4o, temperature: 0.2, timeout: 10}
  - model_name: b
    litellm_params: {model: vertex_ai/gemini-pro}
litellm_settings: {drop_params: true}
general_settings: {master_key: sk-1234}
router_settings: {routing_strategy: latency-based-routing}
"#,
        );
        let all = c.unsupported.join("\n");
        for needle in [
            "model_list[0].litellm_params.temperature: not supported",
            "model_list[0].litellm_params.timeout: not supported",
            "model_list[1].litellm_params.model: \"vertex_ai/gemini-pro\"",
            "litellm_settings.drop_params: not supported",
            "general_settings: not supported",
            "router_settings.routing_strategy: \"latency-based-routing\" is not carried over",
        ] {
            assert!(all.contains(needle), "{needle} missing from:\n{all}");
        }
        assert!(!all.contains("sk-1234"), "values are never echoed");
        assert_eq!(c.routes.len(), 1);
    }

    #[test]
    fn deployments_of_one_name_are_weighted_backends_and_fallbacks_follow_by_priority() {
        let c = convert_str(
            r#"
model_list:
  - model_name: gpt-4o
    litellm_params: {model: azure/gpt-4o-eu, api_base: "https://eu.openai.azure.com", api_key: os.environ/AZURE_EU, weight: 3, rpm: 100}
  - model_name: gpt-4o
    litellm_params: {model: openai/gpt-4o, api_key: os.environ/OPENAI_API_KEY, weight: 1, rpm: 50}
  - model_name: claude
    litellm_params: {model: anthropic/claude-3-5-haiku-latest, api_key: os.environ/ANTHROPIC_API_KEY}
  - model_name: mini
    litellm_params: {model: openai/gpt-4o-mini, api_key: os.environ/OPENAI_API_KEY}
router_settings:
  fallbacks: [{gpt-4o: [claude, mini]}]
  num_retries: 2
  allowed_fails: 3
  cooldown_time: 45
"#,
        );
        assert_eq!(c.unsupported, Vec::<String>::new());
        let names: Vec<_> = c
            .routes
            .iter()
            .map(|(_, r)| r.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["gpt-4o", "claude", "mini"]);
        let gpt = spec(&c, "gpt-4o");
        assert!(gpt.model.is_none());
        let summary: Vec<_> = gpt
            .backends
            .iter()
            .map(|b| {
                (
                    b.model.provider,
                    b.model.name.as_str(),
                    b.weight,
                    b.priority,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (Provider::AzureOpenai, "gpt-4o-eu", Some(3), None),
                (Provider::Openai, "gpt-4o", Some(1), None),
                (
                    Provider::Anthropic,
                    "claude-3-5-haiku-latest",
                    None,
                    Some(1)
                ),
                (Provider::Openai, "gpt-4o-mini", None, Some(2)),
            ]
        );
        assert_eq!(gpt.limits[0].calls, Some(150));
        assert_eq!(gpt.retry.unwrap().attempts, Some(3));
        let od = gpt.outlier_detection.unwrap();
        assert_eq!(od.consecutive_failures, Some(3));
        assert_eq!(od.base_ejection_time.as_deref(), Some("45s"));
        assert!(
            spec(&c, "claude").model.is_some(),
            "no fallbacks of its own"
        );
    }
}
