// The printcolumn(..) lists of the kube derive repeat keys by design.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The Secret key read when `secretRef.key` is not given.
pub const DEFAULT_SECRET_KEY: &str = "apiKey";

/// A named gateway route: one task type served by one provider model, with its credential and guardrails.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "portcullis.dev",
    version = "v1alpha1",
    kind = "Route",
    plural = "routes",
    namespaced,
    status = "RouteStatus",
    category = "portcullis",
    printcolumn(
        name = "Type",
        type_ = "string",
        json_path = ".spec.routeType",
        description = "Task type served"
    ),
    printcolumn(
        name = "Provider",
        type_ = "string",
        json_path = ".spec.model.provider",
        description = "LLM provider"
    ),
    printcolumn(
        name = "Model",
        type_ = "string",
        json_path = ".spec.model.name",
        description = "Provider model"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the route serves requests"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct RouteSpec {
    /// The task this route serves: llm/v1/completions, llm/v1/chat or llm/v1/embeddings.
    pub route_type: RouteType,
    /// The provider model behind the route and how to reach it.
    pub model: ModelSpec,
    /// Optional guardrails, each checked independently: calls and/or tokens per renewal period.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub limits: Vec<Limit>,
    /// Who may call this route. Absent: the gateway-wide default access policy applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub access: Option<Vec<AccessRule>>,
}

/// Task types, named as in MLflow's AI Gateway.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RouteType {
    #[serde(rename = "llm/v1/completions")]
    Completions,
    #[serde(rename = "llm/v1/chat")]
    Chat,
    #[serde(rename = "llm/v1/embeddings")]
    Embeddings,
}

impl RouteType {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteType::Completions => "llm/v1/completions",
            RouteType::Chat => "llm/v1/chat",
            RouteType::Embeddings => "llm/v1/embeddings",
        }
    }
}

impl std::fmt::Display for RouteType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The provider model a route forwards to.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// The LLM provider that serves the model.
    pub provider: Provider,
    /// The provider's model (or deployment) name, sent upstream.
    #[schemars(length(min = 1, max = 256))]
    pub name: String,
    /// Overrides the provider's default base URL (for example a proxy or a self-hosted server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048), regex(pattern = r"^https?://[^\s/?#]+[^\s?#]*$"))]
    pub api_base: Option<String>,
    /// The Secret in the Route's namespace that holds the provider credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
    /// Provider-specific, non-secret settings (for example region or api-version).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
}

/// A reference to a key in a Secret of the Route's own namespace.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret, in the Route's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key within the Secret that holds the API key (default "apiKey").
    #[serde(default = "default_secret_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_secret_key() -> String {
    DEFAULT_SECRET_KEY.to_string()
}

/// Supported providers: the set MLflow's gateway speaks plus the OpenAI-compatible family.
#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum Provider {
    Openai,
    AzureOpenai,
    Anthropic,
    Cohere,
    Gemini,
    Bedrock,
    Mistral,
    HuggingfaceTgi,
    DatabricksModelServing,
    MlflowModelServing,
    Ai21,
    Together,
    Groq,
    Deepseek,
    Ollama,
    OpenaiCompatible,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Openai => "openai",
            Provider::AzureOpenai => "azure-openai",
            Provider::Anthropic => "anthropic",
            Provider::Cohere => "cohere",
            Provider::Gemini => "gemini",
            Provider::Bedrock => "bedrock",
            Provider::Mistral => "mistral",
            Provider::HuggingfaceTgi => "huggingface-tgi",
            Provider::DatabricksModelServing => "databricks-model-serving",
            Provider::MlflowModelServing => "mlflow-model-serving",
            Provider::Ai21 => "ai21",
            Provider::Together => "together",
            Provider::Groq => "groq",
            Provider::Deepseek => "deepseek",
            Provider::Ollama => "ollama",
            Provider::OpenaiCompatible => "openai-compatible",
        }
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One guardrail: a number of calls and/or tokens allowed per renewal period.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.calls) || has(self.tokens)").message("a limit needs calls, tokens or both"))]
pub struct Limit {
    /// The window after which the counts start again: second, minute, hour or day.
    pub renewal_period: RenewalPeriod,
    /// Requests allowed per period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub calls: Option<u64>,
    /// Prompt plus completion tokens allowed per period (a budget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub tokens: Option<u64>,
    /// What is counted: the route as a whole, or each consumer separately.
    #[serde(default)]
    pub key: LimitKey,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum RenewalPeriod {
    Second,
    Minute,
    Hour,
    Day,
}

#[derive(Serialize, Deserialize, JsonSchema, Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[serde(rename_all = "lowercase")]
pub enum LimitKey {
    /// All callers of the route together.
    #[default]
    Route,
    /// Each caller separately.
    Consumer,
}

/// One grant of access; exactly one field is set.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("[has(self.serviceAccount), has(self.namespace), has(self.consumer)].filter(x, x).size() == 1").message("set exactly one of serviceAccount, namespace, consumer"))]
pub struct AccessRule {
    /// A Kubernetes ServiceAccount, as namespace/name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 317), regex(pattern = r"^[a-z0-9-]+/[a-z0-9.-]+$"))]
    pub service_account: Option<String>,
    /// Every ServiceAccount of this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 63))]
    pub namespace: Option<String>,
    /// An API-key consumer, as the namespace/name of its Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 317), regex(pattern = r"^[a-z0-9-]+/[a-z0-9.-]+$"))]
    pub consumer: Option<String>,
}

/// What the controller observed and decided about a Route.
#[derive(Serialize, Deserialize, KubeSchema, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RouteStatus {
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The MLflow gateway invocation path of this route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The limits the gateway enforces for this route (its accepted spec.limits; empty while the
    /// route does not serve). With a shared limits store they hold across all replicas together;
    /// otherwise each of N replicas enforces 1/N of each.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limits: Vec<Limit>,
    /// Current state; Ready is the summary condition.
    #[serde(default)]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}
